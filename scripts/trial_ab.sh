#!/usr/bin/env bash
# Trial A/B: cuBLAS (a) against CUTLASS forward (b) and forward + dx (c), r 16, rounds interleaved.
set -uo pipefail
OUT="${OUT:-/tmp/qlora-gpu}"; mkdir -p "$OUT"
cmake -S . -B build-gpu -G Ninja -DQLORA_PYTHON=$(command -v python3) -DQLORA_SANITIZE=OFF -DQLORA_WITH_CUDA=ON \
  -DCMAKE_BUILD_TYPE=Release > "$OUT/cmake.log" 2>&1
ninja -C build-gpu -j 16 qlora > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
Q=build-gpu/trainer/cli/qlora
$Q bench --shape llama2-7b --r 16 --checkpointing off --warmup 1 --steps 2 --base-gemm cutlass 2>&1 | grep -E 'CUTLASS|tokens|loss' | head -5
for r in ${AB_R:-16}; do for c in off on; do for i in 1 2; do
  for v in a:cublas b:cutlass-fwd c:cutlass; do
    $Q bench --shape llama2-7b --r $r --checkpointing $c --base-gemm ${v#*:} --json "$OUT/ab_r${r}_${c}_${v%%:*}.$i.json" >/dev/null 2>&1
  done
done; done; done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
for prefix in sorted({f.rsplit('_', 1)[0] for f in glob.glob(os.path.join(out, 'ab_*.json'))}):
    best = {}
    for v in "abc":
        runs = [json.load(open(f)) for f in sorted(glob.glob(f"{prefix}_{v}.*.json"))]
        best[v] = max(j["tokens_per_s"] for j in runs) if runs else float("nan")
        print(os.path.basename(prefix), v, [round(j["tokens_per_s"]) for j in runs], f"{runs[0]['peak_bytes']/2**30:.2f} GiB" if runs else "")
    print(os.path.basename(prefix), "b/a %.3f c/a %.3f" % (best["b"] / best["a"], best["c"] / best["a"]))
PY
