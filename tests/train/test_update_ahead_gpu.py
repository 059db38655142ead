"""On a GPU: the optimizer's update queued ahead (`qlora bench --update-ahead on`, the default: each layer's update
runs on a stream of its own beside the next forward, which waits for it before that layer) trains exactly as the
update between the steps (`--update-ahead off`). Both launch the same kernels on the same data in the same order
on each stream, so each step's loss and the weights' total movement must agree bit for bit, without and with
checkpointing and with LoRA dropout; a forward that read a layer's weights before its update landed would change
that step's gradients and every later value. (test_train_gpu runs the trainer itself on the GPU, checkpoints and
all, with the update ahead.) Exits 77 (ctest: skipped) without a GPU.
"""
import json
import os
import subprocess
import sys

import torch
from fixture_util import scratch_dir

if not torch.cuda.is_available():
    print("SKIPPED: no CUDA GPU")
    sys.exit(77)

CLI = os.environ["QLORA_CLI"]
STEPS = 6


def bench(work, name, *args):
    out = os.path.join(work, name + ".json")
    p = subprocess.run([CLI, "bench", "--shape", "tiny", "--device", "cuda", "--seq", "256", "--batch", "2",
                        "--warmup", "1", "--steps", str(STEPS), "--json", out, *args],
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        print(p.stdout, p.stderr)
        sys.exit(f"{name}: bench failed ({p.returncode})")
    with open(out) as f:
        return json.load(f)


work = scratch_dir("qlora-test-update-ahead-")
failures = []
for ckpt in ["off", "on"]:
    for dropout in ["0", "0.1"]:
        runs = {mode: bench(work, f"{mode}-{ckpt}-{dropout}", "--checkpointing", ckpt, "--lora-dropout", dropout,
                            "--update-ahead", mode) for mode in ["on", "off"]}
        on, off = runs["on"], runs["off"]
        assert on["update_ahead"] and not off["update_ahead"]
        print(f"checkpointing {ckpt}, dropout {dropout}: update norm {on['update_norm']!r} / {off['update_norm']!r}, "
              f"{on['tokens_per_s']:.0f} / {off['tokens_per_s']:.0f} tokens/s")
        for i, (a, b) in enumerate(zip(on["losses"], off["losses"]), 1):
            print(f"  {i}  {a!r}  {b!r}")
            if a != b:
                failures.append(f"checkpointing {ckpt}, dropout {dropout}, step {i}: loss {a!r} against {b!r}")
        if not off["update_norm"] > 0 or on["update_norm"] != off["update_norm"]:
            failures.append(f"checkpointing {ckpt}, dropout {dropout}: update norm {on['update_norm']!r} against "
                            f"{off['update_norm']!r}")
if failures:
    sys.exit("FAILED:\n" + "\n".join(failures))
print("OK: the update queued ahead trains as the update between the steps, bit for bit")
