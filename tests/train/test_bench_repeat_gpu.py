"""On a GPU: `qlora bench` with LoRA dropout trains the same way in every process. Its masks come from the default
generators, which a process seeds at random on CUDA unless told (PyTorch's CUDA default generator), so before the
bench seeded them as `qlora train` does, two runs with dropout 0.1 drew different masks: the first step's loss
agreed (B starts at zero, so the masks do not reach the loss yet) and its update did not (three runs 5e-6 to 3e-5
relative apart). Every kernel of the step is deterministic, so the two runs must agree bit for bit: each step's loss
and the weights' total movement, without and with checkpointing (whose recomputation replays the generator). That is
what lets A/B runs of the bench compare dropout variants value for value.
Exits 77 (ctest: skipped) without a GPU.
"""
import sys

import torch
from fixture_util import scratch_dir, tiny_cuda_bench

if not torch.cuda.is_available():
    print("SKIPPED: no CUDA GPU")
    sys.exit(77)

STEPS = 4


def bench(work, name, *args):
    return tiny_cuda_bench(work, name, "--warmup", "1", "--steps", str(STEPS), "--lora-dropout", "0.1", *args)


work = scratch_dir("qlora-test-bench-repeat-")
failures = []
for ckpt in ["off", "on"]:
    first, second = (bench(work, f"{ckpt}-{i}", "--checkpointing", ckpt) for i in (1, 2))
    print(f"checkpointing {ckpt}: update norm {first['update_norm']!r} / {second['update_norm']!r}")
    for i, (a, b) in enumerate(zip(first["losses"], second["losses"]), 1):
        print(f"  {i}  {a!r}  {b!r}")
        if a != b:
            failures.append(f"checkpointing {ckpt}, step {i}: loss {a!r} against {b!r}")
    if not first["update_norm"] > 0 or first["update_norm"] != second["update_norm"]:
        failures.append(f"checkpointing {ckpt}: update norm {first['update_norm']!r} against {second['update_norm']!r}")
if failures:
    sys.exit("FAILED:\n" + "\n".join(failures))
print("OK: two bench processes with LoRA dropout train bit for bit alike")
