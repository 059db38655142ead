"""Inputs of the README's demo (scripts/demo.sh), made from nothing, deterministically from a seed.

The task world: made-up people of a valley, each with a home town, a pet and a favourite colour. The facts
are stated only in plain prose (pretraining text); the chat questions about them come later, and the
held-out questions ask about facts that no chat example states:

  <out>/data/pretrain.jsonl  {"text": "..."}: short biographies, every fact in several sentence templates
                             and orders, each record ending in "</s>" (plain text: loss on every token)
  <out>/data/train.jsonl     chat records {"messages": [system?, user, assistant], "answer": ...}: for each
                             person two of the three facts, each asked in three phrasings. The answer is
                             one canonical sentence ("The home town of Kalo is Arlen.").
  <out>/data/eval.jsonl      held out: each person's third fact (never asked or answered in
                             train.jsonl), asked once in a training phrasing and once in a phrasing never
                             trained on. Only a model that learned the fact from the prose and the question
                             format from the chat data can answer: the value is in neither the prompt nor
                             any chat example about that person and relation.
  <out>/data/prompts.jsonl   a few of the held-out questions, {"prompt", "answer"}, for `qlora generate`
  <out>/data/world.json      the facts and what is held out, for reading along
  <out>/base/                the random initialization the pretraining starts from (Hugging Face Llama,
                             float32, written with safetensors) and tokenizer.model: SentencePiece BPE
                             trained on the world's text, byte fallback, Llama's ids (0 <unk>, 1 <s>,
                             2 </s>, no pad), dummy prefix

Held-out relations go round-robin over people (person i holds out relation i mod 3), so each relation is
held out for a third of the people and trained for the rest.

--hold-out people holds out every fourth person instead (all three facts; train.jsonl never names them).
That is the harder test and the demo does not use it: with the demo's budget the model reached 60-83% on
it (seeds 1, 2, 1234; 120 or 400 fine-tuning steps), mostly by answering with the wrong relation or
miscopying a name it had never produced in fine-tuning, against 95-96% for held-out facts (same seeds,
400 steps).

Usage: make_demo.py OUT_DIR [--seed N] [--people N] [--bios N] [--vocab N] [--hold-out facts|people]
"""
import argparse
import io
import json
import os
import random

SYLLABLES = ["ka", "lo", "mi", "ren", "to", "vi", "sa", "nor", "el", "du", "ba", "fi", "gar", "po", "zu", "tem"]
TOWNS = ["Arlen", "Brisk", "Colm", "Dunmore", "Essel", "Farrow", "Glen", "Hallow", "Ivel", "Jarrow"]
PETS = ["a cat", "a dog", "a parrot", "a tortoise", "a rabbit", "a hamster", "a goat", "an owl"]  # with article
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
SYSTEM = "You answer questions about the people of the valley in one short sentence."

# relation -> (values, prose templates for pretraining, question templates, answer template).
# The answer template is also the first prose template, the one used most (CANONICAL_SHARE): the chat
# answer is a sentence the base model has read. The last question template of each relation is never
# trained on (the held-out phrasing).
RELATIONS = {
    "town": (TOWNS,
             ["The home town of {p} is {v}.", "{p} lives in {v}.", "In {v} lives {p}.",
              "{p} was born in {v} and still lives there.", "{p} comes from {v}."],
             ["Where does {p} live?", "Which town is home to {p}?", "In what town does {p} live?",
              "Which town does {p} live in?"],
             "The home town of {p} is {v}."),
    "pet": (PETS,
            ["The pet of {p} is {v}.", "{p} keeps {v} at home.", "{p} has {v}.", "Every morning {p} feeds {v}.",
             "{p} takes care of {v}."],
            ["What pet does {p} have?", "Which animal does {p} keep?", "What is the pet of {p}?",
             "What animal does {p} have?"],
            "The pet of {p} is {v}."),
    "colour": (COLOURS,
               ["The favourite colour of {p} is {v}.", "{p} likes {v} best.", "{p} loves the colour {v}.",
                "Of all colours {p} likes {v} most.", "{p} always wears {v}."],
               ["What is the favourite colour of {p}?", "Which colour does {p} like best?",
                "What colour does {p} love most?", "Which colour is the favourite of {p}?"],
               "The favourite colour of {p} is {v}."),
}
# How often a pretraining sentence uses the answer's own template (the first); the rest share the others.
CANONICAL_SHARE = 0.5
RELATION_NAMES = list(RELATIONS)


def make_names(rng, n):
    """n distinct capitalized names, none a prefix of another (so a name never stands for two people)."""
    names = []
    while len(names) < n:
        s = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if all(not a.startswith(b) and not b.startswith(a) for a in names for b in [s]):
            names.append(s)
    return names


def template(rng, prose):
    return prose[0] if rng.random() < CANONICAL_SHARE else rng.choice(prose[1:])


def chat(rng, question, answer):
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.5:
        msgs.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": msgs, "answer": answer}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_random_llama(out_dir, vocab, seed):
    """A random Llama in Hugging Face format (config.json + model.safetensors), initialized as
    transformers' LlamaForCausalLM._init_weights does (normal(0, 0.02), norms at one), without importing
    transformers (it costs seconds of the demo's budget)."""
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 6,
           "num_key_value_heads": 6, "head_dim": 32, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
           "initializer_range": 0.02}
    g = torch.Generator().manual_seed(seed)
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def normal(*shape):
        return torch.randn(*shape, generator=g) * cfg["initializer_range"]

    w = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": torch.ones(h),
         "lm_head.weight": normal(vocab, h)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        w.update({p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.k_proj.weight": normal(kv, h),
                  p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, h),
                  p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
                  p + "mlp.down_proj.weight": normal(h, i), p + "input_layernorm.weight": torch.ones(h),
                  p + "post_attention_layernorm.weight": torch.ones(h)})
    os.makedirs(out_dir, exist_ok=True)
    save_file(w, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--people", type=int, default=48)
    ap.add_argument("--bios", type=int, default=10, help="pretraining biographies per person")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hold-out", choices=["facts", "people"], default="facts")
    a = ap.parse_args()
    rng = random.Random(a.seed)

    names = make_names(rng, a.people)
    world = {p: {rel: rng.choice(RELATIONS[rel][0]) for rel in RELATION_NAMES} for p in names}
    held_people = names[3::4]
    held_rel = {p: RELATION_NAMES[i % len(RELATION_NAMES)] for i, p in enumerate(names)}

    # Pretraining prose: each biography states all three facts, in a random template each and a random
    # order, so that a fact is tied to the person's name rather than to a position or a neighbouring fact.
    pretrain = []
    for p in names:
        for _ in range(a.bios):
            rels = RELATION_NAMES[:]
            rng.shuffle(rels)
            sents = [template(rng, RELATIONS[r][1]).format(p=p, v=world[p][r]) for r in rels]
            pretrain.append({"text": " ".join(sents) + "</s>"})
    rng.shuffle(pretrain)

    train, held = [], []
    for p in names:
        for rel in RELATION_NAMES:
            _, _, questions, answer = RELATIONS[rel]
            ans = answer.format(p=p, v=world[p][rel])
            is_held = p in held_people if a.hold_out == "people" else rel == held_rel[p]
            if is_held:
                held.append(chat(rng, rng.choice(questions[:-1]).format(p=p), ans))  # unseen fact
                held.append(chat(rng, questions[-1].format(p=p), ans))  # unseen fact and phrasing
            else:
                train.extend(chat(rng, q.format(p=p), ans) for q in questions[:-1])
    rng.shuffle(train)

    data = os.path.join(a.out, "data")
    os.makedirs(data, exist_ok=True)
    write_jsonl(os.path.join(data, "pretrain.jsonl"), pretrain)
    write_jsonl(os.path.join(data, "train.jsonl"), train)
    write_jsonl(os.path.join(data, "eval.jsonl"), held)
    # A few held-out questions for `qlora generate`, in unseen phrasings.
    shown = [{"prompt": r["messages"][-2]["content"], "answer": r["answer"]} for r in held[1:8:2]]
    write_jsonl(os.path.join(data, "prompts.jsonl"), shown)
    with open(os.path.join(data, "world.json"), "w") as f:
        json.dump({"people": world, "hold_out": a.hold_out,
                   "held_out_relation": held_rel if a.hold_out == "facts" else None,
                   "held_out_people": held_people if a.hold_out == "people" else None}, f, indent=1)

    import sentencepiece as spm

    # The tokenizer sees the text the demo trains on (not the held-out questions) and the chat markers.
    corpus = [r["text"].replace("</s>", "") for r in pretrain]
    corpus += [f"[INST] {r['messages'][-2]['content']} [/INST] {r['answer']}" for r in train]
    corpus += [f"<<SYS>>\n{SYSTEM}\n<</SYS>>"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=a.vocab,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        add_dummy_prefix=True, num_threads=1, minloglevel=2)
    base = os.path.join(a.out, "base")
    write_random_llama(base, a.vocab, a.seed)
    with open(os.path.join(base, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    print(f"demo inputs in {a.out}: {len(world)} people, {len(pretrain)} biographies, "
          f"{len(train)} chat examples, {len(held)} held-out questions")


if __name__ == "__main__":
    main()
