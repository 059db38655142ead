"""End-to-end resume test of `qlora train` (the CLI in $QLORA_CLI) on a tiny model, on the CPU.

  1. uninterrupted: 12 steps, a checkpoint every 4 (keep_last 2, so pruning runs too)
  2. the same config killed by SIGKILL in the middle of step 6 (QLORA_TEST_KILL_AT_STEP, a documented
     test hook in trainer/train/trainer.cpp), i.e. after the step-4 checkpoint and a completed step 5,
     then run again with checkpoint.resume=auto: the final adapter, the last checkpoint's trainable
     weights and optimizer moments are bit-identical to run 1, and every logged loss, lr and eval loss
     equals run 1's (LoRA dropout 0.1, so this needs the RNG state restored, and data shuffling, so it
     needs the data cursor).
  3. a changed config (train.lr, train.weight_decay) is refused naming exactly those keys, unless
     checkpoint.force_resume=true.
  4. the newest checkpoint's trainable.safetensors truncated: resume=auto says so, falls back to the
     previous checkpoint and still ends bit-identical to run 1.
  5. a huge lr makes the loss non-finite: each such step is skipped with a warning, and the run aborts
     after train.max_nonfinite_steps in a row.
Exits non-zero on the first failure.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

from checks import Checks

CLI = os.environ["QLORA_CLI"]
DATA = os.environ["QLORA_TEST_DATA"]
STEPS, EVERY, KILL_AT = 12, 4, 6

CONFIG = """\
method: qlora
model: {{path: {base}, tokenizer: {tok}, dtype: float32, device: cpu, gradient_checkpointing: false}}
quant: {{type: nf4, block_size: 64, double_quant: true}}
lora: {{r: 4, alpha: 8.0, dropout: 0.1, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
data: {{train_file: {data}, format: auto, max_seq_len: 96, eval_fraction: 0.1, seed: 1234}}
train: {{max_steps: {steps}, micro_batch_size: 4, grad_accum: 2, lr: 2.0e-3, schedule: cosine, warmup_steps: 2,
        max_grad_norm: 1.0, weight_decay: 0.001, seed: 1234, log_every: 1, eval_every: 4}}
checkpoint: {{every: {every}, keep_last: 2, resume: none}}
output: {{dir: {out}, export_adapter: true, export_merged: false}}
"""

check = Checks(passes=False)


def train(work, out, *sets, env_extra=None):
    cfg = os.path.join(work, "config.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(base=os.path.join(DATA, "train", "base"), tok=os.path.join(DATA, "data", "tok.model"),
                              data=os.path.join(DATA, "train", "train.jsonl"), steps=STEPS, every=EVERY, out=out))
    cmd = [CLI, "train", "--config", cfg]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    env.pop("QLORA_TEST_KILL_AT_STEP", None)
    env.update(env_extra or {})
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    return p.returncode, p.stderr


def metrics(out):
    """{step: entry} for train steps and {step: eval_loss}, the LAST entry per step (a resumed run appends)."""
    train_m, eval_m, order = {}, {}, []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "loss" in j:
                train_m[j["step"]] = j
                order.append((j["step"], j["loss"], j["lr"]))
            if "eval_loss" in j:
                eval_m[j["step"]] = j["eval_loss"]
    return train_m, eval_m, order


def checkpoints(out):
    d = os.path.join(out, "checkpoints")
    return sorted(n for n in os.listdir(d) if n.startswith("step-")) if os.path.isdir(d) else []


def same_tensors(a_path, b_path, what):
    a, b = load_file(a_path), load_file(b_path)
    if not check(a.keys() == b.keys(), f"{what}: different tensor names"):
        return
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max(((a[k].double() - b[k].double()).abs().max().item() for k in bad), default=0.0)
    check(not bad, f"{what}: {len(bad)} of {len(a)} tensors differ (max abs diff {worst:.3e}), e.g. {bad[:3]}")
    return len(a)


def same_run(ref, out, what):
    """Bit-identical final weights and equal logged numbers."""
    before = len(check.failures)
    n = same_tensors(os.path.join(ref, "adapter", "adapter_model.safetensors"),
                     os.path.join(out, "adapter", "adapter_model.safetensors"), f"{what}: adapter")
    last = f"step-{STEPS:08d}"
    for f in ("trainable.safetensors", "optimizer.safetensors"):
        same_tensors(os.path.join(ref, "checkpoints", last, f), os.path.join(out, "checkpoints", last, f),
                     f"{what}: {last}/{f}")
    rt, re_, _ = metrics(ref)
    ot, oe, _ = metrics(out)
    check(sorted(ot) == list(range(1, STEPS + 1)), f"{what}: logged steps {sorted(ot)}")
    for s in rt:
        if s in ot:
            check(ot[s]["loss"] == rt[s]["loss"] and ot[s]["lr"] == rt[s]["lr"],
                  f"{what}: step {s} loss/lr {ot[s]['loss']}/{ot[s]['lr']} != {rt[s]['loss']}/{rt[s]['lr']}")
    check(oe == re_, f"{what}: eval losses {oe} != {re_}")
    if len(check.failures) == before:
        print(f"{what}: {n} adapter tensors bit-identical, {len(rt)} step losses and {len(re_)} eval losses equal",
              flush=True)


def main():
    work = tempfile.mkdtemp(prefix="qlora-test-resume-")
    try:
        # 1. uninterrupted
        ref = os.path.join(work, "ref")
        rc, err = train(work, ref)
        if not check(rc == 0, f"uninterrupted run failed ({rc}):\n{err}"):
            return 1
        check(checkpoints(ref) == [f"step-{8:08d}", f"step-{12:08d}"], f"keep_last 2: {checkpoints(ref)}")
        rt, _, _ = metrics(ref)
        losses = [rt[s]["loss"] for s in sorted(rt)]
        print("losses", ["%.4f" % x for x in losses], flush=True)
        check(len(set(losses)) == len(losses), "every step should have a different loss")

        # 2. killed mid-step, resumed
        out = os.path.join(work, "killed")
        rc, err = train(work, out, env_extra={"QLORA_TEST_KILL_AT_STEP": str(KILL_AT)})
        check(rc == -signal.SIGKILL, f"the run should die of SIGKILL, got {rc}:\n{err[-2000:]}")
        check(checkpoints(out) == [f"step-{4:08d}"], f"after the kill: checkpoints {checkpoints(out)}")
        _, _, order = metrics(out)
        check([s for s, _, _ in order] == list(range(1, KILL_AT)), f"steps logged before the kill: {order}")
        check(not os.path.exists(os.path.join(out, "adapter")), "no adapter may exist after the kill")
        rc, err = train(work, out, "checkpoint.resume=auto")
        if check(rc == 0, f"resumed run failed ({rc}):\n{err}"):
            check(f"resumed from {os.path.join(out, 'checkpoints', 'step-00000004')} (step 4)" in err,
                  f"resume message missing:\n{err}")
            same_run(ref, out, "killed at step 6 + resumed")
            # Step 5 ran twice (before the kill and after the resume): the same loss both times.
            _, _, order = metrics(out)
            fives = [l for s, l, _ in order if s == 5]
            check(len(fives) == 2 and fives[0] == fives[1], f"step 5 before/after the crash: {fives}")

        # 3. a different config is refused, by name, unless forced
        diff = os.path.join(work, "diff")
        shutil.copytree(ref, diff)
        rc, err = train(work, diff, "checkpoint.resume=auto", "train.lr=5e-4", "train.weight_decay=0.1")
        check(rc != 0, "a changed config must be refused")
        line = next((l for l in err.splitlines() if "different config" in l), "")
        check("(differs in: train.lr, train.weight_decay)" in line and "checkpoint.force_resume" in line,
              f"the refusal must name exactly the differing keys and the way out:\n{err[-2000:]}")
        rc, err = train(work, diff, "checkpoint.resume=auto", "train.lr=5e-4", "train.weight_decay=0.1",
                        "checkpoint.force_resume=true")
        check(rc == 0 and "resumed from" in err, f"force_resume must resume ({rc}):\n{err[-2000:]}")
        # ... and a hash taken by another build (over other keys) is refused with that reason, not an empty list
        other = os.path.join(work, "other-build")
        shutil.copytree(ref, other)
        for step_dir in glob.glob(os.path.join(other, "checkpoints", "step-*")):
            state = os.path.join(step_dir, "state.json")
            with open(state) as f:
                j = json.load(f)
            j["config_hash"] = "0123456789abcdef"
            with open(state, "w") as f:
                json.dump(j, f)
        rc, err = train(work, other, "checkpoint.resume=auto")
        line = next((l for l in err.splitlines() if "different config" in l), "")
        check(rc != 0 and "no key; its config hash comes from another build" in line,
              f"a hash from another build must be named as such:\n{err[-2000:]}")

        # 4. a corrupt newest checkpoint: fall back to the previous one, say so, and still end identical
        corrupt = os.path.join(work, "corrupt")
        shutil.copytree(ref, corrupt)
        newest = os.path.join(corrupt, "checkpoints", f"step-{12:08d}")
        ts = os.path.join(newest, "trainable.safetensors")
        os.truncate(ts, os.path.getsize(ts) // 2)
        with open(os.path.join(corrupt, "metrics.jsonl"), "w"):
            pass  # start the log afresh so the comparison sees only the resumed steps 9..12
        rc, err = train(work, corrupt, "checkpoint.resume=auto")
        if check(rc == 0, f"fallback run failed ({rc}):\n{err}"):
            check(f"warning: checkpoint {newest} is unusable" in err and "trying the previous one" in err,
                  f"the user must be told about the corrupt checkpoint:\n{err[-2000:]}")
            check("step-00000008 (step 8)" in err, f"must resume from step 8:\n{err[-2000:]}")
            same_tensors(os.path.join(ref, "adapter", "adapter_model.safetensors"),
                         os.path.join(corrupt, "adapter", "adapter_model.safetensors"), "fallback: adapter")
            rt, _, _ = metrics(ref)
            ct, _, _ = metrics(corrupt)
            check(sorted(ct) == list(range(9, STEPS + 1)), f"fallback: logged steps {sorted(ct)}")
            if check(all(ct[s]["loss"] == rt[s]["loss"] for s in ct), "fallback: losses of steps 9..12 differ"):
                print("fallback to step 8: adapter bit-identical, steps 9..12 losses equal", flush=True)

        # 5. non-finite losses: skipped with a warning, then abort
        nan = os.path.join(work, "nan")
        rc, err = train(work, nan, "train.lr=1e12", "train.warmup_steps=0", "train.warmup_ratio=0", "train.max_grad_norm=0",
                        "train.max_nonfinite_steps=3")
        check(rc != 0, f"a diverged run must fail, got {rc}")
        for n in (1, 2, 3):
            check(f"non-finite loss, step skipped ({n} in a row)" in err, f"warning {n} missing:\n{err[-2000:]}")
        check("training diverged: 3 non-finite losses in a row" in err, f"abort message missing:\n{err[-2000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
