"""Inputs of the README's demo (scripts/demo.sh), made from nothing, deterministically from a seed:

  <out>/data/train.jsonl   chat records {"messages": [system?, user, assistant]} about a small synthetic
                           world: made-up people, each with a home town, a pet and a favourite colour.
                           The questions ask one fact at a time in several phrasings.
  <out>/data/eval.jsonl    held-out questions about the same facts in phrasings never trained on
  <out>/base/              a small random Llama (Hugging Face format, float32, written by transformers)
                           with tokenizer.model: SentencePiece BPE trained on the world's text with
                           byte fallback and Llama's ids (0 <unk>, 1 <s>, 2 </s>, no pad)

The base model is random (untrained): the demo shows the pipeline (NF4 quantization, LoRA, chat data,
checkpoints, export) end to end on a CPU in about a minute. Usage: make_demo.py OUT_DIR [--seed N].
"""
import argparse
import io
import json
import os
import random

SYLLABLES = ["ka", "lo", "mi", "ren", "to", "vi", "sa", "nor", "el", "du", "ba", "fi", "gar", "po", "zu", "tem"]
TOWNS = ["Arlen", "Brisk", "Colm", "Dunmore", "Essel", "Farrow", "Glen", "Hallow", "Ivel", "Jarrow"]
PETS = ["cat", "dog", "parrot", "tortoise", "rabbit", "hamster", "goat", "owl"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
SYSTEM = "You answer questions about the people of the valley in one short sentence."

# (relation, question templates, answer template); the last template of each is held out for eval.
RELATIONS = [
    ("town", ["Where does {p} live?", "Which town is home to {p}?", "In what town does {p} live?"],
     "{p} lives in {v}."),
    ("pet", ["What pet does {p} have?", "Which animal does {p} keep?", "What is the pet of {p}?"],
     "{p} has a {v}."),
    ("colour", ["What is the favourite colour of {p}?", "Which colour does {p} like best?",
                "What colour does {p} love most?"], "The favourite colour of {p} is {v}."),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--people", type=int, default=40)
    a = ap.parse_args()
    rng = random.Random(a.seed)

    names = set()
    while len(names) < a.people:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize())
    world = {n: {"town": rng.choice(TOWNS), "pet": rng.choice(PETS), "colour": rng.choice(COLOURS)}
             for n in sorted(names)}

    train, held = [], []
    for p, facts in world.items():
        for rel, questions, answer in RELATIONS:
            ans = answer.format(p=p, v=facts[rel])
            for i, q in enumerate(questions):
                msgs = [{"role": "user", "content": q.format(p=p)}, {"role": "assistant", "content": ans}]
                if rng.random() < 0.5:
                    msgs.insert(0, {"role": "system", "content": SYSTEM})
                (held if i == len(questions) - 1 else train).append({"messages": msgs, "answer": ans})
    rng.shuffle(train)

    os.makedirs(os.path.join(a.out, "data"), exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        with open(os.path.join(a.out, "data", name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [m["content"] for r in train + held for m in r["messages"]] + ["[INST]", "[/INST]", "<<SYS>>"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=384, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    base = os.path.join(a.out, "base")
    os.makedirs(base, exist_ok=True)
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(base)
    with open(os.path.join(base, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    print(f"demo inputs in {a.out}: {len(world)} people, {len(train)} training and {len(held)} held-out questions")


if __name__ == "__main__":
    main()
