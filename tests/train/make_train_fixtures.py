"""Reference data for the training stage (tests/train), computed by torch / transformers.

Writes under $QLORA_TEST_DATA/train/:
  optim.safetensors + optim.json   torch.optim.AdamW (foreach=False, i.e. _single_tensor_adam) driven by
      transformers' get_{cosine,linear,constant}_schedule_with_warmup and torch.nn.utils.clip_grad_norm_
      for 3 steps on fixed parameters with fixed per-step gradients (both random, fresh seed each run,
      recorded in optim.json):
        init.<i>                        float32 parameter i before training ([5, 7], [7, 3], [11])
        grad.<k>.<i>                    the gradient of parameter i at step k (before clipping)
        <case>.param.<k>.<i>            parameter i after step k
        <case>.norm.<k>                 [] float32, what clip_grad_norm_ returned (cases with clipping)
        <case>.exp_avg.<i>, .exp_avg_sq.<i>   the optimizer state after the last step
      optim.json: {"seed", "cases": [{name, schedule, lr, total, warmup, weight_decay, max_norm, lrs}],
                   "multipliers": [{schedule, total, warmup, values}], "warmup": [{total, ratio, steps}]}
      (floats in JSON are Python's repr: they read back to the same double)
  base/        a tiny random LlamaForCausalLM (vocab 512 to fit the data fixture's tokenizer, hidden 96,
               intermediate 192, 2 layers, 6 heads / 2 kv heads), float32
  train.jsonl  60 "messages" records of random words, for the end-to-end runs of test_resume.py
"""
import json
import math
import os
import random
import tempfile

import torch
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, TrainingArguments, get_constant_schedule_with_warmup,
                          get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)

OUT = os.path.join(os.environ["QLORA_TEST_DATA"], "train")
SCHEDULES = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup,
             "constant": lambda opt, w, t: get_constant_schedule_with_warmup(opt, w)}
SHAPES = [(5, 7), (7, 3), (11,)]
STEPS = 3
# Per-step gradient scales: step 0's global norm is far above max_norm (clipped), step 1's far below
# (clip_coef clamps to 1), step 2's near it.
GRAD_SCALES = [3.0, 0.02, 0.25]
CASES = [
    dict(name="cosine", schedule="cosine", lr=1e-2, total=4, warmup=1, weight_decay=0.01, max_norm=1.0),
    dict(name="linear", schedule="linear", lr=3e-3, total=5, warmup=0, weight_decay=0.001, max_norm=0.0),
    dict(name="constant", schedule="constant", lr=2e-4, total=3, warmup=2, weight_decay=0.0, max_norm=0.3),
]


def optim_reference(seed):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i, s in enumerate(SHAPES):
        t[f"init.{i}"] = torch.randn(s, generator=g)
    for k in range(STEPS):
        for i, s in enumerate(SHAPES):
            t[f"grad.{k}.{i}"] = torch.randn(s, generator=g) * GRAD_SCALES[k]
    cases = []
    for c in CASES:
        params = [torch.nn.Parameter(t[f"init.{i}"].clone()) for i in range(len(SHAPES))]
        opt = torch.optim.AdamW(params, lr=c["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=c["weight_decay"],
                                foreach=False)
        sched = SCHEDULES[c["schedule"]](opt, c["warmup"], c["total"])
        lrs = []
        for k in range(STEPS):
            for i, p in enumerate(params):
                p.grad = t[f"grad.{k}.{i}"].clone()
            if c["max_norm"] > 0:
                t[f"{c['name']}.norm.{k}"] = torch.nn.utils.clip_grad_norm_(params, c["max_norm"]).reshape(())
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            for i, p in enumerate(params):
                t[f"{c['name']}.param.{k}.{i}"] = p.detach().clone()
        for i, p in enumerate(params):
            t[f"{c['name']}.exp_avg.{i}"] = opt.state[p]["exp_avg"].clone()
            t[f"{c['name']}.exp_avg_sq.{i}"] = opt.state[p]["exp_avg_sq"].clone()
        cases.append(dict(c, lrs=lrs))
    return t, cases


def multipliers():
    out = []
    for name, make in SCHEDULES.items():
        for total, warmup in [(50, 7), (50, 0), (9, 3), (1, 0)]:
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.AdamW([p], lr=1.0)  # base lr 1: the group's lr is the multiplier itself
            sched = make(opt, warmup, total)
            values = []
            for _ in range(total + 2):  # two past the end: the schedules must stay at their floor
                values.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            out.append(dict(schedule=name, total=total, warmup=warmup, values=values))
    return out


def warmups():
    out = []
    with tempfile.TemporaryDirectory() as d:
        for total, ratio in [(100, 0.03), (1000, 0.03), (7, 0.1), (33, 0.5), (10, 0.0), (3, 0.999), (60, 0.05)]:
            args = TrainingArguments(output_dir=d, warmup_steps=ratio, report_to=[])
            out.append(dict(total=total, ratio=ratio, steps=args.get_warmup_steps(total)))
    return out


def tiny_base():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(os.path.join(OUT, "base"))


def train_jsonl():
    rng = random.Random(7)
    words = ("the a of to and in is it that for on with as model data train token answer question help "
             "explain why how what small large fast slow good write code read file line test value list "
             "llama chat time day world water light music story").split()
    say = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).capitalize()
    with open(os.path.join(OUT, "train.jsonl"), "w") as f:
        for i in range(60):
            f.write(json.dumps({"messages": [{"role": "user", "content": say(3, 12) + "?"},
                                             {"role": "assistant", "content": say(4, 30) + "."}]}) + "\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    seed = int.from_bytes(os.urandom(4), "little")
    t, cases = optim_reference(seed)
    save_file(t, os.path.join(OUT, "optim.safetensors"))
    with open(os.path.join(OUT, "optim.json"), "w") as f:
        json.dump({"seed": seed, "cases": cases, "multipliers": multipliers(), "warmup": warmups()}, f, indent=1)
    tiny_base()
    train_jsonl()
    print("seed", seed, "cases", [c["name"] for c in cases])


if __name__ == "__main__":
    main()
