#!/usr/bin/env python3
"""Where a profiled step's GPU time goes, from `qlora bench --profile` traces (Chrome trace JSON, .gz or not).

    python3 scripts/trace_summary.py [--kernels N] TRACE [TRACE ...]

For each trace: the span from the first device activity to the last, then per stream the activities, their
busy time, the gaps between them (and how much of that is in gaps over 20 us: waits, not launch latency),
and the busy time per kind of kernel (the kinds of docs/performance.md's "Where a step goes"). The cuBLAS
GEMMs are told apart by duration: the base projections and lm_head run for more than 60 us each at the 7B
shape, the adapters' skinny GEMMs and their split-K reductions for less.

--kernels N adds the N busiest kernels of the busiest stream (the step's): their count, total and median
time, and the median apart from the cases where another stream (the dequantization ahead) was busy for under
10% of the kernel's time ("alone") and over 90% ("beside"). A memory-bound kernel much slower beside than
alone shares the memory system with the other stream; one as slow alone is slow in itself.
"""
import bisect
import collections
import gzip
import json
import os
import re
import statistics
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


def short_name(name):
    """A kernel's function name without its namespaces, template arguments and parameters."""
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
    cut = min((i for i in (name.find("<"), name.find("(")) if i >= 0), default=len(name))
    return name[:cut].split("::")[-1][:60] or name[:60]


def overlap_with(intervals):
    """A function of an activity: the fraction of its time in which one of the (sorted, merged) intervals runs."""
    starts = [a for a, _ in intervals]

    def fraction(e):
        a, b = e["ts"], e["ts"] + e["dur"]
        if b <= a:
            return 0.0
        covered = 0.0
        for s, t in intervals[max(bisect.bisect_right(starts, a) - 1, 0):]:
            if s >= b:
                break
            covered += max(0.0, min(b, t) - max(a, s))
        return covered / (b - a)

    return fraction


def merged(events):
    out = []
    for e in sorted(events, key=lambda e: e["ts"]):
        a, b = e["ts"], e["ts"] + e["dur"]
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def kernel_table(streams, top):
    stream, es = max(streams.items(), key=lambda kv: len(kv[1]))
    others = merged([e for s, ev in streams.items() if s != stream for e in ev])
    beside = overlap_with(others)
    per = collections.defaultdict(list)
    for e in es:
        per[short_name(e["name"])].append((e["dur"], beside(e)))
    print(f"  busiest kernels of stream {stream} (at most {top}): median us, alone / beside another stream (count)")
    print(f"  {'total ms':>8} {'count':>6} {'median':>7} {'alone':>7} {'(n)':>5} {'beside':>7} {'(n)':>5}  kernel")
    for name, v in sorted(per.items(), key=lambda kv: -sum(d for d, _ in kv[1]))[:top]:
        alone = [d for d, f in v if f < 0.1]
        busy = [d for d, f in v if f > 0.9]
        print(f"  {sum(d for d, _ in v) / 1e3:8.2f} {len(v):6d} {median([d for d, _ in v]):7.1f} {median(alone):7.1f} "
              f"{len(alone):5d} {median(busy):7.1f} {len(busy):5d}  {name}")


def summarize(path, top=0):
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
    if top > 0:
        kernel_table(streams, top)


def main(argv):
    args = argv[1:]
    top = 0
    if args[:1] == ["--kernels"]:
        if len(args) < 2 or not args[1].isdigit():
            print("trace_summary.py: --kernels takes a count of kernels, e.g. --kernels 20", file=sys.stderr)
            return 2
        top, args = int(args[1]), args[2:]
    if not args:
        print(__doc__.strip())
        return 2
    for path in args:
        summarize(path, top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
