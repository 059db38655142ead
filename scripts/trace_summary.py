#!/usr/bin/env python3
"""Where a profiled step's GPU time goes, from `qlora bench --profile` traces (Chrome trace JSON, .gz or not).

    python3 scripts/trace_summary.py TRACE [TRACE ...]

For each trace: the span from the first device activity to the last, then per stream the activities, their
busy time, the gaps between them (and how much of that is in gaps over 20 us: waits, not launch latency),
and the busy time per kind of kernel (the kinds of docs/performance.md's "Where a step goes"). The cuBLAS
GEMMs are told apart by duration: the base projections and lm_head run for more than 60 us each at the 7B
shape, the adapters' skinny GEMMs and their split-K reductions for less.
"""
import collections
import gzip
import json
import os
import sys

KINDS = ("gemm", "adapters", "attention", "dequant", "elementwise", "other")


def kind(name, dur_us):
    if "dequant" in name:
        return "dequant"
    if "lora_grad" in name or "block_diag" in name or "splitKreduce" in name:
        return "adapters"
    if "sdpa" in name or "cudnn" in name or "flash" in name:
        return "attention"
    if name.startswith(("nvjet", "sm90_xmma", "cutlass")) or "gemm" in name.lower():
        return "gemm" if dur_us > 60 else "adapters"
    if any(k in name for k in ("rmsnorm", "rope", "swiglu", "cross_entropy")):
        return "elementwise"
    return "other"  # AdamW's multi-tensor kernels, the norm, copies, memsets, ATen's element-wise


def load(path):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def summarize(path):
    events = load(path)
    if not events:
        print(f"{path}: no device activities")
        return
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    print(f"{os.path.basename(path)}: span {(end - start) / 1e3:.1f} ms, {len(events)} device activities")
    print(f"  {'stream':>6} {'count':>6} {'busy':>7} {'gaps':>6} {'>20us':>6}  " + " ".join(f"{k:>10}" for k in KINDS))
    streams = collections.defaultdict(list)
    for e in events:
        streams[e["args"].get("stream")].append(e)
    for stream, es in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        es.sort(key=lambda e: e["ts"])
        gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(es, es[1:])]
        per_kind = collections.Counter()
        for e in es:
            per_kind[kind(e["name"], e["dur"])] += e["dur"]
        print(f"  {stream!s:>6} {len(es):6d} {sum(e['dur'] for e in es) / 1e3:7.1f} "
              f"{sum(g for g in gaps if g > 0) / 1e3:6.1f} {sum(g for g in gaps if g > 20) / 1e3:6.1f}  "
              + " ".join(f"{per_kind[k] / 1e3:10.2f}" for k in KINDS))


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip())
        return 2
    for path in argv[1:]:
        summarize(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
