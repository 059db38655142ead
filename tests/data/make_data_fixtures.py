"""Fixtures for the data stage (tests/data): a small Llama-like SentencePiece model and, for every dataset
format, reference ids/labels computed here in Python, independently of the C++ code.

The reference tokenization is Meta's llama repo, llama/generation.py, Llama.chat_completion (July 2023):
each completed turn is tokenizer.encode(f"{B_INST} {prompt.strip()} {E_INST} {answer.strip()} ",
bos=True, eos=True), a system message is folded into the first user message as
B_SYS + system + E_SYS + user before that strip, and a generation prompt ends with
encode(f"{B_INST} {user.strip()} {E_INST}", bos=True, eos=False).
The reference masking: a turn's prompt length is the length of encode(f"{B_INST} {prompt} {E_INST}")
tokenized on its own (asserted to be a prefix of the whole turn's ids), everything after it (answer
pieces, the trailing space piece, EOS) carries loss; position 0 never does.

Writes into $QLORA_TEST_DATA/data/.
"""
import io
import json
import os
import random
import re

import sentencepiece as spm

OUT = os.path.join(os.environ["QLORA_TEST_DATA"], "data")
os.makedirs(OUT, exist_ok=True)
rng = random.Random(1234)

WORDS = ("the a an of to and in is it that for on with as was be by this are at from or have not but "
         "model data train learn token answer question help please explain why how what when where who "
         "small large fast slow good better best write code read file line error test value number list "
         "python llama chat user system assistant human sentence word text story time day world people "
         "water energy light music history science example simple answer result problem idea").split()
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.\nUse plain words.", "Be kind"]


def sentence(n_min=3, n_max=12):
    s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max)))
    s = s[0].upper() + s[1:]
    extra = rng.random()
    if extra < 0.1:
        s += " café naïve"        # Latin-1 letters: pieces or byte fallback
    elif extra < 0.15:
        s += " 日本語 ✓"            # surely outside the vocabulary: byte fallback
    elif extra < 0.25:
        s += " 42 3.14"           # digits are split one by one
    return s + rng.choice([".", "?", "!", ""])


def paragraph():
    parts = [sentence() for _ in range(rng.randint(1, 3))]
    return rng.choice([" ", "\n", "\n\n"]).join(parts)


# ---- 1. tokenizer: BPE with Llama's options (byte fallback, identity normalizer, dummy prefix,
# whitespace kept, digits split, unk 0 / bos 1 / eos 2 / no pad).
corpus = []
for _ in range(3000):
    corpus.append(f"[INST] {paragraph()} [/INST] {paragraph()} ")
    corpus.append(f"<<SYS>>\n{rng.choice(SYSTEMS)}\n<</SYS>>\n\n### Human: {sentence()}### Assistant: {sentence()}")
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=512,
    byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
    character_coverage=0.9995, num_threads=1, minloglevel=2)
with open(os.path.join(OUT, "tok.model"), "wb") as f:
    f.write(model.getvalue())
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
assert sp.get_piece_size() == 512 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == -1
BOS, EOS, IGNORE = sp.bos_id(), sp.eos_id(), -100

tok_cases = ["", "hello", "Hello world.", "  two leading spaces", "trailing space ", "a  b   c",
             "[INST] what is a model? [/INST] a model learns ", "line one\nline two\n\nend",
             "<s>not special</s>", "café naïve 日本語 ✓ 😀", "numbers 12345 and 3.14", "\ttab\r\n",
             "<<SYS>>\nBe kind\n<</SYS>>\n\nHi"] + [paragraph() for _ in range(20)]
with open(os.path.join(OUT, "tokenizer_cases.json"), "w") as f:
    json.dump({"vocab_size": sp.get_piece_size(),
               "cases": [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in tok_cases],
               "pieces": [sp.id_to_piece(i) for i in range(sp.get_piece_size())]}, f, ensure_ascii=False)

# ---- 2. Meta's chat_completion, with the reference labels.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def fold_system(dialog):
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    assert all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])
    return dialog


def meta_train(dialog):
    """ids and labels of a dialogue of completed turns."""
    dialog = fold_system(dialog)
    assert dialog[-1]["role"] == "assistant"
    ids, labels = [], []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        turn = [BOS] + sp.encode(f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ") + [EOS]
        head = sp.encode(f"{B_INST} {(prompt['content']).strip()} {E_INST}")
        assert turn[1:1 + len(head)] == head, "the answer boundary is not a token boundary"
        ids += turn
        labels += [IGNORE] * (1 + len(head)) + turn[1 + len(head):]
    labels[0] = IGNORE
    return ids, labels


def meta_prompt(dialog):
    """Meta's generation prompt: completed turns, then the last user message up to [/INST]."""
    dialog = fold_system(dialog)
    assert dialog[-1]["role"] == "user"
    ids = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += [BOS] + sp.encode(f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ") + [EOS]
    return ids + [BOS] + sp.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}")


def dialogue(system, n_turns):
    d = [{"role": "system", "content": system}] if system else []
    for _ in range(n_turns):
        d += [{"role": "user", "content": rng.choice(["", " ", "\n"]) + paragraph() + rng.choice(["", " ", "\n"])},
              {"role": "assistant", "content": paragraph() + rng.choice(["", " "])}]
    return d


def shapes():  # (system?, turns) covering single/multi-turn, with and without a system prompt
    return [(None, 1), (SYSTEMS[0], 1), (None, 3), (SYSTEMS[1], 2), (SYSTEMS[2], 4), (None, 2), (None, 1),
            (SYSTEMS[0], 3)]


CONFIG_SYSTEM = "Answer as a pirate."  # data.system_prompt for formats without their own
sets = {}


def add_set(name, fmt, system_prompt, records, dialogs, ext="jsonl"):
    path = os.path.join(OUT, f"{name}.{ext}")
    with open(path, "w") as f:
        if ext == "json":
            json.dump(records, f, ensure_ascii=False, indent=1)
        else:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    exs = []
    for d in dialogs:
        ids, labels = meta_train(d)
        exs.append({"ids": ids, "labels": labels, "labels_all": [IGNORE] + ids[1:]})
    sets[name] = {"file": path, "format": fmt, "system_prompt": system_prompt, "examples": exs}


# messages: system from the record, else data.system_prompt
recs, dls = [], []
for sysm, n in shapes():
    d = dialogue(sysm, n)
    recs.append({"messages": d, "id": len(recs)})
    dls.append(d if sysm else [{"role": "system", "content": CONFIG_SYSTEM}] + d)
add_set("messages", "messages", CONFIG_SYSTEM, recs, dls)

# messages without any system prompt at all
recs, dls = [], []
for _, n in shapes():
    d = dialogue(None, n)
    recs.append({"messages": d})
    dls.append(d)
add_set("messages_nosys", "messages", "", recs, dls)

# alpaca: user = instruction, or instruction + "\n\n" + input
recs, dls = [], []
for i in range(8):
    ins, inp, out = sentence(), (paragraph() if i % 2 else ""), paragraph()
    r = {"instruction": ins, "output": out}
    if i % 4 != 0:
        r["input"] = inp
    recs.append(r)
    user = ins + ("\n\n" + inp if inp and "input" in r else "")
    dls.append([{"role": "system", "content": CONFIG_SYSTEM}, {"role": "user", "content": user},
                {"role": "assistant", "content": out}])
add_set("alpaca", "alpaca", CONFIG_SYSTEM, recs, dls)

# guanaco (openassistant-guanaco): "### Human: q### Assistant: a..." parsed with a regex here
recs, dls = [], []
for _, n in shapes():
    d = dialogue(None, n)
    text = "".join(f"### {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in d)
    recs.append({"text": text})
    parts = re.split(r"### (Human|Assistant):", text)[1:]
    parsed = [{"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
              for i in range(0, len(parts), 2)]
    dls.append([{"role": "system", "content": CONFIG_SYSTEM}] + parsed)
add_set("guanaco", "guanaco", CONFIG_SYSTEM, recs, dls)

# text (guanaco-llama2-1k): "<s>[INST] u [/INST] a </s>" per turn, parsed back with a regex here
recs, dls = [], []
for sysm, n in shapes():
    d = fold_system(dialogue(sysm, n))
    text = "".join(f"<s>[INST] {u['content'].strip()} [/INST] {a['content'].strip()} </s>"
                   for u, a in zip(d[::2], d[1::2]))
    recs.append({"text": text})
    turns = re.findall(r"<s>\[INST\] (.*?) \[/INST\] (.*?) </s>", text, flags=re.S)
    dls.append([m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})])
add_set("text", "text", CONFIG_SYSTEM, recs, dls)  # the system prompt must NOT apply to "text"

# mixed formats, auto-detected, as a JSON array
mixed_recs, mixed_ex = [], []
for name in ["text", "guanaco", "messages", "alpaca"]:
    with open(sets[name]["file"]) as f:
        rs = [json.loads(l) for l in f]
    mixed_recs += rs[:3]
    mixed_ex += sets[name]["examples"][:3]
with open(os.path.join(OUT, "mixed.json"), "w") as f:
    json.dump(mixed_recs, f, ensure_ascii=False, indent=1)
sets["mixed"] = {"file": os.path.join(OUT, "mixed.json"), "format": "auto", "system_prompt": CONFIG_SYSTEM,
                 "examples": mixed_ex}

# generation prompts
prompts = []
for sysm, n in [(None, 0), (SYSTEMS[0], 0), (None, 2), (SYSTEMS[1], 1)]:
    d = dialogue(sysm, n) + [{"role": "user", "content": paragraph()}]
    hist = [m for m in d if m["role"] != "system"]
    prompts.append({"system": sysm or "", "history": [[u["content"], a["content"]] for u, a in zip(hist[:-1:2], hist[1:-1:2])],
                    "user": hist[-1]["content"], "ids": meta_prompt(d)})

with open(os.path.join(OUT, "reference.json"), "w") as f:
    json.dump({"sets": sets, "prompts": prompts}, f, ensure_ascii=False)
print("wrote", OUT, {k: len(v["examples"]) for k, v in sets.items()})
