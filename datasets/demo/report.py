"""The demo's last step (scripts/demo.sh): the before/after table, the loss-curve PNG, and the gate.

  report.py DEMO_DIR [--max-before F] [--min-after F]

Reads DEMO_DIR/eval-before.json, eval-after.json and eval-merged.json (`qlora eval --json` reports on the
held-out questions: the pretrained base alone, base quantized to NF4 + our adapter, our merged export),
and DEMO_DIR/{pretrain,qlora}/metrics.jsonl (one JSON object per log line from `qlora train`). Writes
DEMO_DIR/loss.png and prints the table. Exits 1, saying why, unless held-out exact match is at most
--max-before before fine-tuning and at least --min-after after it (adapter and merged export both): the
demo's claim is the gap, so a run that does not show it must fail loudly.
"""
import argparse
import json
import os
import sys


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def plot(demo, out, before, after):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, run, title in ((axes[0], "pretrain", "pretraining (method full, plain prose)"),
                           (axes[1], "qlora", "QLoRA fine-tuning (Llama-2 chat)")):
        rows = read_jsonl(os.path.join(demo, run, "metrics.jsonl"))
        tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        ax.plot(*zip(*tr), label="train loss (per-token, mean over the log interval)")
        if ev:
            ax.plot(*zip(*ev), "o-", label="held-out loss (answer tokens)")
        if run == "qlora":
            ax.set_yscale("log")  # the answer loss falls by two orders of magnitude
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"held-out exact match: {before:.0%} before fine-tuning, {after:.0%} after")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("demo")
    ap.add_argument("--max-before", type=float, default=0.10)
    ap.add_argument("--min-after", type=float, default=0.80)
    a = ap.parse_args()

    rep = {k: json.load(open(os.path.join(a.demo, f"eval-{k}.json"))) for k in ("before", "after", "merged")}
    png = os.path.join(a.demo, "loss.png")
    plot(a.demo, png, rep["before"]["exact_match"], rep["after"]["exact_match"])

    rows = [("pretrained base, before fine-tuning", rep["before"]),
            ("NF4 base + QLoRA adapter", rep["after"]),
            ("merged export (float32)", rep["merged"])]
    n = rep["before"]["examples"]
    print(f"\nheld-out questions ({n}: facts no chat example states, half in phrasings never trained on)")
    print(f"| {'model':<36} | {'exact match':<15} | answer loss |")
    print(f"|{'-' * 38}|{'-' * 17}|-------------|")
    for name, r in rows:
        em = f"{r['exact_match']:.1%} ({r['exact_match_count']}/{r['examples']})"
        print(f"| {name:<36} | {em:>15} | {r['loss']:>11.3f} |")
    print(f"loss curves: {png}")

    failures = []
    if rep["before"]["exact_match"] > a.max_before:
        failures.append(f"before fine-tuning exact match {rep['before']['exact_match']:.1%} > {a.max_before:.0%}: "
                        "the held-out questions are answerable without fine-tuning")
    for k in ("after", "merged"):
        if rep[k]["exact_match"] < a.min_after:
            failures.append(f"{k}: exact match {rep[k]['exact_match']:.1%} < {a.min_after:.0%}: "
                            "the model did not learn to answer")
    for f in failures:
        print(f"DEMO FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
