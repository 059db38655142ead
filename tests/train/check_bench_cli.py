"""`qlora bench` end to end on the tiny shape on the CPU (the 7B figures come from scripts/gpu.sh on a GPU):
the JSON has every figure, the step splits into its phases, MFU's formula is the one documented in
cmd_bench.cpp, --fused and --checkpointing are reported as given, steps are pipelined unless --pipeline off,
--profile writes a Chrome trace with the step's ops, scripts/trace_summary.py reads traces (the CPU's, and a
synthetic one with known figures), and bad options fail with a message naming the option.
"""
import json
import os
import subprocess
import sys
import tempfile

from checks import Checks

CLI = os.environ["QLORA_CLI"]
check = Checks()


def bench(*args):
    return subprocess.run([CLI, "bench", "--shape", "tiny", "--device", "cpu", "--seq", "48", "--warmup", "1",
                           "--steps", "2", *args], capture_output=True, text=True)


with tempfile.TemporaryDirectory() as d:
    out, trace = os.path.join(d, "b.json"), os.path.join(d, "trace.json")
    p = bench("--r", "4", "--checkpointing", "off", "--fused", "on", "--json", out, "--profile", trace)
    check(p.returncode == 0, f"bench exits 0 (stderr: {p.stderr[-300:]})")
    j = json.load(open(out))
    for key in ("tokens_per_s", "step_ms", "forward_ms", "backward_ms", "optimizer_ms", "peak_bytes", "mfu",
                "flops_per_token", "lora_params", "forward_host_ms", "backward_host_ms"):
        check(key in j, f"json has {key}")
    check(j["tokens_per_s"] > 0 and j["step_ms"] > 0, "positive speed")
    check(abs(j["tokens_per_s"] - 48 / (j["step_ms"] / 1e3)) < 1e-6 * j["tokens_per_s"], "tokens/s = tokens / step")
    parts = j["forward_ms"] + j["backward_ms"] + j["optimizer_ms"]
    check(parts <= 1.5 * j["step_ms"] and parts >= 0.5 * j["step_ms"], f"phases {parts:.1f} ms ~ step {j['step_ms']:.1f} ms")
    # tiny: H 256, I 688, L 4, heads 8/4 (kv 128 wide), V 1024; LoRA r 4 on all seven projections.
    h, i, layers, kv, v, r = 256, 688, 4, 128, 1024, 4
    proj = layers * (h * h * 2 + h * kv * 2 + 3 * h * i)
    lora = layers * r * ((h + h) * 2 + (h + kv) * 2 + 2 * (h + i) + (i + h))
    check(j["lora_params"] == lora, f"LoRA params {j['lora_params']} == {lora}")
    want = 4 * proj + 4 * v * h + 12 * layers * h * 48 + 6 * lora
    check(abs(j["flops_per_token"] - want) < 1, f"flops/token {j['flops_per_token']} == {want}")
    check(j["fused"] == "on" and j["checkpointing"] is False, "options echoed")
    t = json.load(open(trace))
    names = {e.get("name") for e in t.get("traceEvents", [])}
    check(any(n and n.startswith("aten::") for n in names), "trace holds the step's ATen ops")

    check(j["pipeline"] is True, "steps pipelined by default")
    p = bench("--pipeline", "off", "--json", out)
    check(p.returncode == 0 and json.load(open(out))["pipeline"] is False, "--pipeline off runs and is echoed")

    # scripts/trace_summary.py: on the CPU trace (no device activities), and on a synthetic trace with two
    # streams whose busy time, gaps and kinds are known.
    summary = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                                            "trace_summary.py")]
    p = subprocess.run(summary + [trace], capture_output=True, text=True)
    check(p.returncode == 0 and "no device activities" in p.stdout,
          f"trace_summary on the CPU trace ({p.stderr[-200:]})")
    kernel = lambda name, ts, dur, stream: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
                                            "args": {"stream": stream}}
    synthetic = os.path.join(d, "synthetic.json")
    json.dump({"traceEvents": [kernel("nvjet_sm90_tst_128x256", 0, 3000, 7),       # a base GEMM (us)
                               kernel("rmsnorm_fwd_kernel", 3002, 200, 7),        # 2 us gap
                               kernel("nvjet_sm90_tst_48x64_splitK", 3502, 40, 7),  # 300 us gap; an adapter's
                               kernel("dequant_span_v9", 100, 400, 13)]}, open(synthetic, "w"))
    p = subprocess.run(summary + [synthetic], capture_output=True, text=True)
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines()[2:]}
    check(p.returncode == 0 and "span 3.5 ms, 4 device activities" in p.stdout, f"trace_summary's span: {p.stdout}")
    # stream count busy gaps >20us gemm adapters attention dequant elementwise other (ms)
    check(rows.get("7") == ["7", "3", "3.2", "0.3", "0.3", "3.00", "0.04", "0.00", "0.00", "0.20", "0.00"],
          f"trace_summary's step stream: {rows.get('7')}")
    check(rows.get("13") == ["13", "1", "0.4", "0.0", "0.0", "0.00", "0.00", "0.00", "0.40", "0.00", "0.00"],
          f"its side stream: {rows.get('13')}")
    # --kernels: a kernel's times alone and beside the other stream (busy for 90-200 us), under its short name.
    norm = "void qlora::kernels::(anonymous namespace)::rmsnorm_fwd_kernel<__nv_bfloat16, 8>(__nv_bfloat16 const*)"
    json.dump({"traceEvents": [kernel(norm, ts, dur, 7) for ts, dur in ((0, 20), (100, 40), (300, 30))]
               + [kernel("nvjet_sm90_tst_48x64_splitK", 400, 10, 7), kernel("dequant_span_v9", 90, 110, 13)]},
              open(synthetic, "w"))
    p = subprocess.run(summary + ["--kernels", "1", synthetic], capture_output=True, text=True)
    last = p.stdout.splitlines()[-1].split() if p.stdout else []
    # total ms, count, median, alone (n), beside (n), kernel: only the busiest one
    check(p.returncode == 0 and last == ["0.09", "3", "30.0", "25.0", "2", "40.0", "1", "rmsnorm_fwd_kernel"]
          and "nvjet" not in p.stdout, f"trace_summary --kernels: {p.stdout}")
    p = subprocess.run(summary + ["--kernels", "many", synthetic], capture_output=True, text=True)
    check(p.returncode == 2 and "--kernels" in p.stderr, f"a bad --kernels count is refused: {p.stderr}")

    j = json.load(open(out))
    check(len(j["losses"]) == 2 and all(5.0 < l < 9.0 for l in j["losses"]) and j["update_norm"] > 0,
          f"per-step losses near ln(1024) and the update's norm reported: {j['losses']}, {j['update_norm']}")
    p = bench("--segments", "3", "--padding", "8", "--json", out)
    j = json.load(open(out))
    check(p.returncode == 0 and j["segments"] == 3 and j["padding"] == 8 and len(j["losses"]) == 2,
          f"packed and padded rows run and are echoed ({p.stderr[-200:]})")
    p = bench("--padding", "47")
    check(p.returncode != 0 and "--padding" in p.stderr, "--padding that leaves no label is refused naming the option")
    p = bench("--cuda-graph", "on")
    check(p.returncode != 0 and "--cuda-graph" in p.stderr and "CUDA" in p.stderr,
          "--cuda-graph on is refused on the CPU naming the option")
    p = bench("--fused", "sometimes")
    check(p.returncode != 0 and "--fused" in p.stderr, "bad --fused is refused naming the option")
    p = bench("--seq", "1")
    check(p.returncode != 0 and "--seq" in p.stderr, "--seq 1 is refused naming the option")

sys.exit(check.report())
