"""On two GPUs: data-parallel `qlora train` through NCCL (`torchrun --nproc-per-node 2 --no-python`), the CLI in
$QLORA_CLI on the train fixture's tiny base and chat data.

  1. float32, dropout 0: two ranks with grad_accum 1 against one GPU with grad_accum 2 (the same sequences a
     step), the adapters' gradients in 16 KiB buckets (many NCCL sums, started as the backward finishes them). The ranks' gradients meet in NCCL's sum and the single GPU's in autograd's accumulation, both one
     float32 addition of the same two terms, so the losses and gradient norms agree to 1e-6 and the adapters
     to 1e-5 relative (the float32 GEMMs of two GPUs of one model and driver agree to the bit in practice;
     the tolerance leaves room for a reduction order NCCL might pick).
  2. The recipe's path: bf16, selective recomputation, padding-free batches, LoRA dropout 0.1 (each rank its
     own masks, the recomputation redrawing them): two ranks train, every loss finite, and the loss curve
     follows one GPU's with grad_accum 2 within bf16's and dropout's spread (3e-2 relative a step, 1.5e-2 on
     average); the loss itself moves over 2% over the run (checked), so the runs do train.
Exits 77 (ctest: skipped) with fewer than two GPUs.
"""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

if torch.cuda.device_count() < 2:
    print(f"SKIPPED: {torch.cuda.device_count()} CUDA GPU(s), two needed")
    sys.exit(77)

from checks import Checks  # noqa: E402
from fixture_util import free_port, scratch_dir  # noqa: E402

CLI = os.environ["QLORA_CLI"]
DATA = os.environ["QLORA_TEST_DATA"]
CONFIG = """\
method: qlora
model: {{path: {base}, tokenizer: {tok}, dtype: {dtype}, device: cuda, gradient_checkpointing: {ckpt}}}
quant: {{type: nf4, block_size: 64, double_quant: true}}
lora: {{r: 8, alpha: 16.0, dropout: {dropout}}}
data: {{train_file: {data}, format: auto, max_seq_len: 96, seed: 1234, padding_free: {flat}}}
train: {{max_steps: 16, micro_batch_size: 4, grad_accum: {accum}, lr: 3.0e-3, schedule: cosine, warmup_steps: 2,
        max_grad_norm: 1.0, seed: 1234, log_every: 1}}
checkpoint: {{every: 0, resume: none}}
output: {{dir: {out}, export_adapter: true}}
"""
checks = Checks()


def run(work, name, ranks, bucket_kb=None, **kw):
    out = os.path.join(work, name)
    cfg = os.path.join(work, name + ".yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(base=os.path.join(DATA, "train", "base"), tok=os.path.join(DATA, "data", "tok.model"),
                              data=os.path.join(DATA, "train", "train.jsonl"), out=out, **kw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if bucket_kb:
        env["QLORA_DIST_BUCKET_KB"] = str(bucket_kb)
    cmd = [CLI, "train", "--config", cfg]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--no-python",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port())] + cmd
    else:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name}: exit {p.returncode}")
    losses, norms = {}, {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "loss" in j:
                losses[j["step"]], norms[j["step"]] = j["loss"], j["grad_norm"]
    return out, losses, norms, p.stderr


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def main():
    work = scratch_dir("dist_gpu")
    # 1. float32: two ranks against one GPU accumulating the same micro-batches.
    base = dict(dtype="float32", ckpt="false", dropout=0.0, flat="false")
    one, l1, n1, _ = run(work, "f32_one", 1, accum=2, **base)
    two, l2, n2, err = run(work, "f32_two", 2, accum=1, bucket_kb=16, **base)
    checks("data parallel: 2 ranks (torchrun, nccl)" in err, "rank 0 trains data-parallel through NCCL")
    checks(sorted(l1) == sorted(l2) == list(range(1, 17)), "both runs log the 16 steps")
    worst_loss = max(rel(l2[s], l1[s]) for s in l1)
    worst_norm = max(rel(n2[s], n1[s]) for s in n1)
    checks(worst_loss <= 1e-6 and worst_norm <= 1e-6,
           f"float32: losses and gradient norms agree (worst {worst_loss:.2e} / {worst_norm:.2e}, bound 1e-6)")
    a = load_file(os.path.join(one, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(two, "adapter", "adapter_model.safetensors"))
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)
    identical = all(a[k].equal(b[k]) for k in a)
    checks(sorted(a) == sorted(b) and worst <= 1e-5,
           f"float32: the adapters agree (worst {worst:.2e} of each tensor's largest, bound 1e-5; "
           f"{'bit-identical' if identical else 'not bit-identical'})")

    # 2. The recipe's path on two GPUs against one.
    recipe = dict(dtype="bfloat16", ckpt="selective", dropout=0.1, flat="true")
    _, r1, _, _ = run(work, "bf16_one", 1, accum=2, **recipe)
    _, r2, _, _ = run(work, "bf16_two", 2, accum=1, bucket_kb=16, **recipe)
    finite = all(v == v and abs(v) != float("inf") for v in r2.values())
    devs = [rel(r2[s], r1[s]) for s in r1]
    movement = rel(r1[1], r1[16])
    checks(finite and sorted(r1) == sorted(r2), "bf16 recipe: two ranks log 16 finite losses")
    checks(max(devs) <= 3e-2 and sum(devs) / len(devs) <= 1.5e-2 and movement > 0.02,
           f"bf16 recipe: two ranks follow one GPU (worst {max(devs):.2e}, mean {sum(devs) / len(devs):.2e}; "
           f"the loss moved {movement:.2e} over the run)")
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
