"""The Python stack on the same job as `qlora bench`: transformers + PEFT, LoRA on all seven projections,
a base in bf16 (`--base bf16`) or bitsandbytes NF4 with double quantization (`--base bnb4`, QLoRA as
people run it), random weights created on the GPU, random tokens with every position trained, AdamW on
the adapters. Prints the same figures as `qlora bench` (the step split into forward / backward /
optimizer, tokens/s, peak allocated memory; steps pipelined as ours are unless --pipeline off) and writes
them as JSON with --json.

Used by scripts/gpu.sh; run it on a CUDA machine: python3 scripts/bench_hf.py --shape llama2-7b --r 16
"""
import argparse
import json
import statistics
import time

import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024, max_position_embeddings=1024),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def to_bnb4(model):
    """Replaces every projection by a bitsandbytes Linear4bit (NF4, double quant, block 64, bf16 compute),
    quantizing on the GPU one weight at a time, as transformers' load_in_4bit does."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64)._quantize("cuda")
                setattr(parent, name, q)
                del lin
    torch.cuda.empty_cache()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama2-7b", choices=SHAPES)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--checkpointing", default="on", choices=["on", "off"])
    ap.add_argument("--base", default="bf16", choices=["bf16", "bnb4"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pipeline", default="on", choices=["on", "off"],
                    help="queue each step before reading the previous one's loss (on), or wait for every step")
    ap.add_argument("--json")
    a = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    shape = dict(SHAPES[a.shape])
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], a.seq)
    cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, attn_implementation="sdpa", use_cache=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if a.base == "bnb4":
        model = to_bnb4(model)
    if a.checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=a.lora_dropout,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # float32 adapters, as PEFT keeps them under autocast training
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    # Timed like ours (qlora bench): pipelined by default (step N's loss read once step N + 1's forward and
    # backward are queued, the step's time the timed steps' wall time over their number), or with
    # --pipeline off each step waited for at its end (the median of the steps' wall times); the forward /
    # backward / optimizer split comes from CUDA events between the phases, which make nothing wait.
    fwd, bwd, optim, total = [], [], [], []
    g = torch.Generator(device="cuda").manual_seed(42)

    def queue(record, meanwhile=None):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda", generator=g)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        q = {"t0": time.perf_counter(), "marks": marks, "record": record}
        marks[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        marks[1].record()
        loss.backward()
        if meanwhile:
            meanwhile()
        marks[2].record()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks[3].record()
        q["status"] = torch.stack([loss.detach().float(), norm.float()]).to("cpu", non_blocking=True)
        q["copied"] = torch.cuda.Event()
        q["copied"].record()
        return q

    def finish(q):
        q["copied"].synchronize()
        if not torch.isfinite(q["status"]).all():
            raise SystemExit("bench_hf: non-finite loss or gradient norm")
        if q["record"]:
            m = q["marks"]
            fwd.append(m[0].elapsed_time(m[1]) / 1e3), bwd.append(m[1].elapsed_time(m[2]) / 1e3)
            optim.append(m[2].elapsed_time(m[3]) / 1e3), total.append(time.perf_counter() - q["t0"])

    for _ in range(a.warmup):
        torch.cuda.synchronize()
        finish(queue(False))
    torch.cuda.synchronize()
    timed_from = time.time()  # the timed steps' span in Unix seconds, for samplers outside the process
    if a.pipeline == "on":
        t_start = time.perf_counter()
        unread = None
        for _ in range(a.steps):
            q = queue(True, (lambda u=unread: finish(u)) if unread else None)
            unread = q
        finish(unread)
        step = (time.perf_counter() - t_start) / a.steps
    else:
        for _ in range(a.steps):
            torch.cuda.synchronize()
            finish(queue(True))
        step = statistics.median(total)
    timed_to = time.time()
    # As ours: pipelined, the phases' means (their sum is the step's time on the GPU); else medians.
    typical = statistics.fmean if a.pipeline == "on" else statistics.median
    out = {
        "stack": f"transformers+peft ({a.base})", "shape": a.shape, "r": a.r, "lora_dropout": a.lora_dropout,
        "seq": a.seq, "batch": a.batch,
        "checkpointing": a.checkpointing == "on", "pipeline": a.pipeline == "on", "step_ms": step * 1e3,
        "forward_ms": typical(fwd) * 1e3, "backward_ms": typical(bwd) * 1e3,
        "optimizer_ms": typical(optim) * 1e3, "tokens_per_s": a.batch * a.seq / step,
        "peak_bytes": torch.cuda.max_memory_allocated(), "timed_unix_s": [timed_from, timed_to],
    }
    print(f"transformers+peft {a.base} {a.shape} r={a.r} seq={a.seq} checkpointing={a.checkpointing}: "
          f"step {out['step_ms']:.1f} ms, {out['tokens_per_s']:.0f} tokens/s, "
          f"peak {out['peak_bytes'] / 2**30:.2f} GiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
