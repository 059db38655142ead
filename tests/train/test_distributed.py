"""Data-parallel `qlora train` on the CPU: several processes (the CLI in $QLORA_CLI) on a tiny model.

  1. `torchrun --nproc-per-node 2 --no-python qlora train` with grad_accum 1 takes the steps one process takes
     with grad_accum 2 (the same 8 sequences a step): the exported adapter and the last checkpoint's weights
     and optimizer moments are bit-identical, every logged loss, gradient norm and lr equal, the eval losses
     equal to rounding (the ranks add their halves); only rank 0 writes (the same files as one process). The
     same with the gradients in 4 KiB buckets (many sums, started as the backward finishes them); with
     grad_accum 2 a rank against one process's 4 (the float sums in another order) the losses agree to 1e-5.
  2. The same two ranks started as srun's tasks (SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID,
     MASTER_ADDR / MASTER_PORT from the job script): the same adapter, to the bit.
  3. With LoRA dropout 0.1 (each rank draws its own masks, seeded per step) and selective recomputation (whose
     nested backward passes accumulate each layer's adapters while the sums start), two ranks killed by SIGKILL
     in the middle of step 5 and resumed with checkpoint.resume=auto end bit-identical to an uninterrupted
     two-rank run.
  4. Resuming that two-rank run in one process is refused, naming the rank counts; force_resume lets it.
  5. A launcher's environment that does not add up (no MASTER_ADDR, a RANK outside WORLD_SIZE, a bad port) is
     refused naming the variable, before anything is written; a SLURM batch script's own shell (no job step)
     trains alone.
Exits non-zero on the first failure.
"""
import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from checks import Checks
from fixture_util import free_port, scratch_dir

CLI = os.environ["QLORA_CLI"]
DATA = os.environ["QLORA_TEST_DATA"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun script runs
STEPS, EVERY, KILL_AT = 8, 3, 5

CONFIG = """\
method: qlora
model: {{path: {base}, tokenizer: {tok}, dtype: float32, device: cpu, gradient_checkpointing: false}}
quant: {{type: nf4, block_size: 64, double_quant: true}}
lora: {{r: 4, alpha: 8.0, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
data: {{train_file: {data}, format: auto, max_seq_len: 96, eval_fraction: 0.1, seed: 1234}}
train: {{max_steps: {steps}, micro_batch_size: 4, grad_accum: 2, lr: 2.0e-3, schedule: cosine, warmup_steps: 2,
        max_grad_norm: 1.0, weight_decay: 0.001, seed: 1234, log_every: 1, eval_every: 4}}
checkpoint: {{every: {every}, keep_last: 2, resume: none}}
output: {{dir: {out}, export_adapter: true, export_merged: false}}
"""

checks = Checks()


def check(cond, what, detail=""):
    """checks(cond, what), with `detail` (a process's output) printed when cond fails."""
    if not cond and detail:
        print(detail, file=sys.stderr)
    return checks(cond, what)

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "QLORA_TEST_KILL_AT_STEP")
             and not k.startswith("SLURM_")}


def write_config(work, out):
    cfg = os.path.join(work, "config.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(base=os.path.join(DATA, "train", "base"), tok=os.path.join(DATA, "data", "tok.model"),
                              data=os.path.join(DATA, "train", "train.jsonl"), steps=STEPS, every=EVERY, out=out))
    return cfg


def args(cfg, sets):
    a = ["train", "--config", cfg]
    for s in sets:
        a += ["--set", s]
    return a


def single(work, out, *sets, env_extra=None):
    env = dict(CLEAN_ENV, **(env_extra or {}))
    p = subprocess.run([CLI] + args(write_config(work, out), sets), env=env, capture_output=True, text=True,
                       timeout=240)
    return p.returncode, p.stderr


def torchrun(work, out, *sets, env_extra=None):
    env = dict(CLEAN_ENV, **(env_extra or {}))
    cmd = TORCHRUN + ["--nproc-per-node", "2", "--no-python", "--master-addr", "127.0.0.1", "--master-port",
           str(free_port()), CLI] + args(write_config(work, out), sets)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    return p.returncode, p.stdout + p.stderr


def slurm(work, out, *sets):
    cfg, port = write_config(work, out), free_port()
    procs = []
    for rank in range(2):
        env = dict(CLEAN_ENV, SLURM_PROCID=str(rank), SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2",
                   SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([CLI] + args(cfg, sets), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    return max(p.returncode for p in procs), "\n".join(outs)


def metrics(out):
    """Train entries {step: (loss, grad_norm, lr, epoch)} and {step: eval_loss}, the last entry per step."""
    train_m, eval_m, lines = {}, {}, 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            lines += 1
            j = json.loads(line)
            if "loss" in j:
                train_m[j["step"]] = (j["loss"], j["grad_norm"], j["lr"], j["epoch"])
            if "eval_loss" in j:
                eval_m[j["step"]] = j["eval_loss"]
    return train_m, eval_m, lines


def tensors_equal(a, b):
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def last_checkpoint(out):
    d = os.path.join(out, "checkpoints")
    return os.path.join(d, sorted(os.listdir(d))[-1])


def same_run(what, a, b, exact_eval=True):
    ad = lambda o: load_file(os.path.join(o, "adapter", "adapter_model.safetensors"))
    check(tensors_equal(ad(a), ad(b)), f"{what}: the adapters are bit-identical")
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        check(tensors_equal(load_file(os.path.join(last_checkpoint(a), name)),
                            load_file(os.path.join(last_checkpoint(b), name))),
              f"{what}: the last checkpoint's {name} is bit-identical")
    (ta, ea, _), (tb, eb, _) = metrics(a), metrics(b)
    check(ta == tb, f"{what}: every step's loss, gradient norm, lr and epoch are equal")
    close = all(abs(ea[s] - eb[s]) <= 1e-9 * abs(ea[s]) for s in ea)
    check(sorted(ea) == sorted(eb) and (ea == eb if exact_eval else close),
          f"{what}: the eval losses agree" + ("" if exact_eval else " to 1e-9"), f"{ea} vs {eb}")


def main():
    work = scratch_dir("qlora_dist_")
    # 1. One process with grad_accum 2 against two ranks with grad_accum 1 (torchrun).
    one, two = os.path.join(work, "one"), os.path.join(work, "two")
    rc, err = single(work, one)
    check(rc == 0, "one process trains", err[-2000:])
    rc, err = torchrun(work, two, "train.grad_accum=1")
    check(rc == 0, "two ranks under torchrun --no-python train", err[-3000:])
    check("data parallel: 2 ranks (torchrun" in err, "rank 0 says it trains data-parallel")
    check(err.count("adapter: ") == 1, "only rank 0 reports the export")
    same_run("2 ranks x grad_accum 1 against 1 process x grad_accum 2", one, two, exact_eval=False)
    # Buckets of 4 KiB: the adapters' 48 KB of gradients in about a dozen sums, started in order as the
    # backward finishes them.
    small = os.path.join(work, "two_small_buckets")
    rc, err = torchrun(work, small, "train.grad_accum=1", env_extra={"QLORA_DIST_BUCKET_KB": "4"})
    check(rc == 0, "two ranks train with 4 KiB gradient buckets", err[-3000:])
    same_run("4 KiB buckets against one process", one, small, exact_eval=False)
    # grad_accum 2 a rank: the sums start in the second micro-batch's backward only.
    accum = os.path.join(work, "two_accum")
    rc, err = torchrun(work, accum, "train.micro_batch_size=2", env_extra={"QLORA_DIST_BUCKET_KB": "4"})
    check(rc == 0, "two ranks train with grad_accum 2", err[-3000:])
    one_accum = os.path.join(work, "one_accum")
    rc, err = single(work, one_accum, "train.micro_batch_size=2", "train.grad_accum=4")
    check(rc == 0, "one process trains with grad_accum 4", err[-2000:])
    ta, tb = metrics(one_accum)[0], metrics(accum)[0]
    same_steps = sorted(ta) == sorted(tb)
    worst = max(abs(ta[s][0] - tb[s][0]) / abs(ta[s][0]) for s in ta) if same_steps else float("inf")
    check(same_steps and worst < 1e-5,
          f"2 ranks x grad_accum 2 follow 1 process x grad_accum 4 (the same micro-batches, the sums in "
          f"another order: worst loss gap {worst:.1e})")
    check(sorted(os.listdir(one)) == sorted(os.listdir(two)) and
          sorted(os.listdir(os.path.join(one, "checkpoints"))) ==
          sorted(os.listdir(os.path.join(two, "checkpoints"))),
          "the two-rank run wrote the same files as one process (rank 0 alone writes)")
    check(metrics(one)[2] == metrics(two)[2], "metrics.jsonl has one line per entry, not one per rank")

    # 2. The same ranks as SLURM tasks.
    slurm_out = os.path.join(work, "slurm")
    rc, err = slurm(work, slurm_out, "train.grad_accum=1")
    check(rc == 0, "two SLURM tasks train", err[-3000:])
    check("data parallel: 2 ranks (slurm" in err, "rank 0 says it was launched by SLURM")
    same_run("SLURM tasks against torchrun", two, slurm_out)

    # 3. LoRA dropout, killed mid-step and resumed, against uninterrupted (two ranks each).
    drop = ("train.grad_accum=1", "lora.dropout=0.1", "model.gradient_checkpointing=selective")
    full, cut = os.path.join(work, "dropout_full"), os.path.join(work, "dropout_cut")
    rc, err = torchrun(work, full, *drop)
    check(rc == 0, "two ranks train with LoRA dropout", err[-3000:])
    check(not tensors_equal(load_file(os.path.join(full, "adapter", "adapter_model.safetensors")),
                            load_file(os.path.join(two, "adapter", "adapter_model.safetensors"))),
          "LoRA dropout changes the two-rank run (the masks are drawn)")
    rc, err = torchrun(work, cut, *drop, env_extra={"QLORA_TEST_KILL_AT_STEP": str(KILL_AT)})
    check(rc != 0 and not os.path.exists(os.path.join(cut, "adapter")),
          f"two ranks killed in step {KILL_AT} stop without an adapter", f"rc {rc}")
    rc, err = torchrun(work, cut, *drop, "checkpoint.resume=auto")
    check(rc == 0 and f"resumed from {os.path.join(cut, 'checkpoints', 'step-00000003')}" in err,
          "two ranks resume from the step-3 checkpoint", err[-3000:])
    same_run("two ranks with dropout, killed and resumed, against uninterrupted", full, cut)

    # 4. Another number of ranks is refused, unless forced.
    before = sorted(os.listdir(os.path.join(cut, "checkpoints")))
    rc, err = single(work, cut, *drop, "checkpoint.resume=auto")
    check(rc != 0 and "made by 2 data-parallel rank(s), this run has 1" in err,
          "one process refuses the two-rank checkpoint, naming both counts", err[-1500:])
    check(sorted(os.listdir(os.path.join(cut, "checkpoints"))) == before, "the refusal leaves the checkpoints")
    rc, err = single(work, cut, *drop, "checkpoint.resume=auto", "checkpoint.force_resume=true",
                     f"train.max_steps={STEPS + 1}")
    check(rc == 0 and "resumed from" in err, "checkpoint.force_resume=true resumes it in one process", err[-1500:])

    # 5. Launcher environments that do not add up.
    bad = os.path.join(work, "bad")
    for env, names in [({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR"),
                       ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": "29500"}, "RANK=\"2\""),
                       ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": "http"}, "MASTER_PORT"),
                       ({"WORLD_SIZE": "2"}, "RANK is not set"),
                       ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_LOCALID")]:
        rc, err = single(work, bad, env_extra=env)
        check(rc != 0 and names in err and not os.path.exists(bad),
              f"{sorted(env)} is refused naming {names}, before anything is written", err[-800:])
    # A batch script's own shell (SLURM_PROCID 0 of the allocation's 4 tasks, no job step) runs alone.
    alone = os.path.join(work, "batch_shell")
    rc, err = single(work, alone, env_extra={"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"})
    check(rc == 0 and "data parallel" not in err and os.path.exists(os.path.join(alone, "adapter")),
          "a process a SLURM batch script starts without srun trains alone", err[-1500:])
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
