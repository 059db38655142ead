"""Prints the table that ends scripts/gpu.sh from the JSON files it wrote into a folder (argv[1]).

Every ratio compares figures measured in the same run on the same card."""
import json
import os
import sys

d = sys.argv[1]


def load(name):
    p = os.path.join(d, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None


k = load("kernels")
if k:
    print(f"copy bandwidth {k['copy_gbps']:.0f} GB/s")
    for key in ("dequant", "dequant_dq"):
        if key in k:
            v = k[key]
            print(f"{key:<11} 7B projections -> bf16: {v['ms']:.2f} ms  {v['gbps']:.0f} GB/s  "
                  f"{100 * v['of_copy']:.1f}% of copy (goal >= 90%)")
    for v in k.get("linear", []):
        print(f"linear4bit fwd+bwd T={v['tokens']:>5} {v['in']:>5}->{v['out']:<5}: {v['ms_4bit']:.3f} ms vs bf16 "
              f"{v['ms_bf16']:.3f} ms (x{v['ratio']:.3f}, goal <= 1.10); bf16 with dW {v['ms_bf16_dw']:.3f} ms")
    for key in ("load_7b", "load_7b_dq"):
        if key in k:
            v = k[key]
            print(f"{key:<11} {v['bytes'] / 2**30:.3f} GiB vs theory {v['theory'] / 2**30:.3f} GiB "
                  f"(x{v['ratio']:.4f}, goal within 5%)")
print()
print(f"{'run':<22} {'tokens/s':>9} {'step ms':>8} {'fwd':>7} {'bwd':>7} {'opt':>6} {'peak GiB':>9} {'MFU':>6} "
      f"{'vs HF bf16':>10} {'mem vs HF':>9} {'SM MHz':>6} {'W':>4}")
for r in ("r16", "r64"):
    for c in ("ckpt", "nockpt"):
        hf = load(f"hf_bf16_{r}_{c}")
        for name in (f"ours_{r}_{c}", f"ours_{r}_{c}_half", f"ours_{r}_{c}_full", f"ours_{r}_{c}_unfused", f"hf_bf16_{r}_{c}",
                     f"hf_bnb4_{r}_{c}"):
            v = load(name)
            if not v:
                continue
            speed = mem = ""
            if hf and name != f"hf_bf16_{r}_{c}":
                speed = f"x{v['tokens_per_s'] / hf['tokens_per_s']:.2f}"
                mem = f"x{v['peak_bytes'] / hf['peak_bytes']:.2f}"
            mfu = f"{100 * v['mfu']:.1f}%" if "mfu" in v else ""
            # The SM clock and board power while it ran (gpu.sh's sampled(): medians over its timed steps).
            clock = f"{v['gpu_sm_mhz']:.0f}" if "gpu_sm_mhz" in v else ""
            power = f"{v['gpu_power_w']:.0f}" if "gpu_power_w" in v else ""
            print(f"{name:<22} {v['tokens_per_s']:>9.0f} {v['step_ms']:>8.1f} {v['forward_ms']:>7.1f} "
                  f"{v['backward_ms']:>7.1f} {v['optimizer_ms']:>6.1f} {v['peak_bytes'] / 2**30:>9.2f} {mfu:>6} "
                  f"{speed:>10} {mem:>9} {clock:>6} {power:>4}")
