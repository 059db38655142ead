#!/usr/bin/env bash
# The GPU machine's one call: build for sm_90a, run the GPU tests, run the benchmarks, print a table last.
#
#   scripts/gpu.sh [tests|quick|compare|full|long|profile|layers|short|ab|floor|dist]     (default quick)
#     tests  build + GPU tests only
#     quick  + our training step (7B, r 16, checkpointing on/off) and transformers/PEFT bf16's
#     compare + r 64 and half the layers recomputing (the ten steps of the comparison table; with BEST_OF=2
#            it fits one call)
#     full   + the kernel labs (dequantization; the base GEMMs through CUTLASS where .deps has its headers) and
#            benchmark, r 64, full recomputation, the per-projection path, the bitsandbytes 4-bit Python stack
#     long   build + the longest trainable sequence at batch 1, ours and the Python stack's
#     profile build + GPU tests + one profiled 7B step (r PROFILE_R, default 16) with and without checkpointing
#            (PROFILE_CKPT): the busiest kernels printed, the Chrome traces in results.tgz, and
#            scripts/trace_summary.py's time per kind of kernel and stream last, with the step's busiest
#            kernels alone and beside the dequantization ahead
#     layers build + GPU tests + our step (r LAYERS_R, default 16) with the first N of 32 layers recomputing,
#            N in LAYERS (default 32 24 16 8 0): tokens/s against peak memory
#     short  build + GPU tests + our step at short sequences (SHORT, default 256x1 512x1 1024x1 512x4),
#            eager against one CUDA graph a step (--cuda-graph on): what the host's launches cost
#     ab     build + GPU tests + our step as is (a, with AB_A_FLAGS) against b, ranks AB_R (default 16),
#            with and without checkpointing, AB_ROUNDS (default 2) interleaved rounds. b = this build with AB_FLAGS (default
#            "--fold off"), or, when .deps/base-src holds an older tree (`scripts/gpu.sh --prepare-base
#            REV`), that tree's build with AB_FLAGS (default none); AB_C_FLAGS adds c, this build with those
#            flags. AB_PROFILE=1 adds the profile (device activities only) of a's step without checkpointing
#            at r AB_PROFILE_R (default 16)
#     floor  build + GPU tests + our step (r 16, with and without checkpointing) against its tensor-core work alone
#            (kernels/dev/step_floor.py: base GEMMs, lm_head, attention) and transformers/PEFT bf16's step, clock
#            and power sampled for each
#     dist   build + GPU tests (two GPUs against one among them) + our step (r 16, with and without
#            checkpointing) on one GPU against the same step on every GPU of the machine, data-parallel through
#            NCCL (torchrun --no-python): tokens/s together and the scaling, and the same with the sums in 25 MiB
#            buckets during the backward (for nvidia-h100-x2 / h200-x2)
#   SHAPE=llama2-13b|llama3-8b runs quick, compare, full, profile and ab at that shape (qlora bench --shape; default
#   llama2-7b).
#   NO_TESTS=1 skips the GPU tests (a follow-up call whose build and tests already ran).
#
# Run from the repository root on a CUDA machine whose python3 has torch (+cu130), transformers and peft.
# Headers the machine lacks (CLI11) and bitsandbytes (pure Python + its CUDA library) travel in .deps/,
# filled on the development machine by `scripts/gpu.sh --prepare`. Logs and JSON land in $OUT (the
# device tool's output folder) or /tmp/qlora-gpu.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  # On the development machine: copy what the GPU machine lacks into .deps (ignored by git, carried).
  source scripts/setup.sh
  mkdir -p .deps/include .deps/py
  cp -r /usr/include/CLI .deps/include/
  bnb="$("$QLORA_PYTHON" -c 'import bitsandbytes,os;print(os.path.dirname(bitsandbytes.__file__))' 2>/dev/null)"
  rm -rf .deps/py/bitsandbytes
  cp -r "$bnb" .deps/py/
  # Only the CUDA 13.0 library and the CPU one are needed there (the wheel carries one per toolkit).
  find .deps/py/bitsandbytes \( -name 'libbitsandbytes_cuda1[1-2]*' -o -name 'libbitsandbytes_cuda132*' \
    -o -name 'libbitsandbytes_rocm*' -o -name __pycache__ \) -prune -exec rm -rf {} +
  # CUTLASS's headers for the kernel lab's GEMM variants (kernels/dev/cutlass_gemm.cu): the nvidia-cutlass
  # wheel (PyPI) carries the C++ sources; kept in the cache, its include/ copied (27 MB).
  cutlass_version=4.2.0.0
  cutlass_dir="$QLORA_CACHE/nvidia-cutlass-$cutlass_version"
  rm -rf .deps/cutlass
  if [ ! -f "$cutlass_dir/include/cutlass/cutlass.h" ]; then
    rm -rf "$cutlass_dir.tmp" && mkdir -p "$cutlass_dir.tmp"
    if "$QLORA_PYTHON" -m pip download --quiet --no-deps "nvidia-cutlass==$cutlass_version" -d "$cutlass_dir.tmp" &&
       "$QLORA_PYTHON" -m zipfile -e "$cutlass_dir.tmp"/nvidia_cutlass-*.whl "$cutlass_dir.tmp/w"; then
      mkdir -p "$cutlass_dir" && rm -rf "$cutlass_dir/include"
      mv "$cutlass_dir.tmp/w/cutlass_library/source/include" "$cutlass_dir/include"
    else
      echo "nvidia-cutlass==$cutlass_version could not be fetched: the CUTLASS lab will not build (the rest is ready)"
    fi
    rm -rf "$cutlass_dir.tmp"
  fi
  if [ -f "$cutlass_dir/include/cutlass/cutlass.h" ]; then
    mkdir -p .deps/cutlass && cp -r "$cutlass_dir/include" .deps/cutlass/
  fi
  du -sh .deps
  exit 0
fi
if [ "${1:-}" = "--prepare-base" ]; then
  # On the development machine: the tracked files of revision $2 into .deps/base-src, for `ab` to build.
  rm -rf .deps/base-src && mkdir -p .deps/base-src
  git archive "${2:?usage: scripts/gpu.sh --prepare-base REV}" | tar -x -C .deps/base-src
  git rev-parse "$2" >.deps/base-src/REVISION
  du -sh .deps/base-src
  exit 0
fi

MODE="${1:-quick}"
SHAPE="${SHAPE:-llama2-7b}"  # the training step's shape in quick, compare, full, profile and ab
OUT="${OUT:-/tmp/qlora-gpu}"
mkdir -p "$OUT"
# NVLink multicast stays off on shared machines (the device README says why).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
[ -d .deps/py ] && export PYTHONPATH="$PWD/.deps/py:${PYTHONPATH:-}"
PY="$(command -v python3)"
BUILD=build-gpu
SECONDS=0
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== build ($BUILD, sm_90a)"
if ! cmake -S . -B "$BUILD" -G Ninja -DQLORA_PYTHON="$PY" -DQLORA_SANITIZE=OFF -DQLORA_WITH_CUDA=ON \
      -DCMAKE_BUILD_TYPE=Release >"$OUT/cmake.log" 2>&1; then
  tail -40 "$OUT/cmake.log"; exit 1
fi
if ! ninja -C "$BUILD" -k 0 -j "$(nproc)" >"$OUT/build.log" 2>&1; then
  # Keep going with what built (a broken test target should not cost the benchmarks), but say so.
  status=1
  grep -E "error|FAILED" -A3 "$OUT/build.log" | head -60
  [ -x "$BUILD/trainer/cli/qlora" ] || exit 1
fi
echo "built in ${SECONDS}s"

if [ -z "${NO_TESTS:-}" ]; then  # NO_TESTS=1: a follow-up call whose tests already ran
  echo "== GPU tests"
  ctest --test-dir "$BUILD" -L gpu --output-on-failure -j 4 >"$OUT/ctest.log" 2>&1 || status=1
  grep -E "tests passed|Failed|Passed|\*\*\*" "$OUT/ctest.log" | tail -30
  # Which GPU tests ran rather than skipped (gtest prints SKIPPED only without a GPU).
  grep -hE "^\[  (SKIPPED|FAILED) \]" "$OUT/ctest.log" | sort | uniq | head -20
fi
[ "$MODE" = tests ] && exit $status

# The device tool returns at most 8 files: everything in $OUT goes back as one archive (plus the files
# named, kept beside it).
pack_results() {
  local keep=("$@") f
  (cd "$OUT" && tar czf /tmp/qlora-results.tgz --exclude results.tgz . || exit 1
   find . -type f ! -name results.tgz -print | while read -r f; do
     [[ " ${keep[*]} " == *" ${f#./} "* ]] || rm -f "$f"
   done
   mv /tmp/qlora-results.tgz results.tgz)
}

Q="$BUILD/trainer/cli/qlora"
if [ "$MODE" = long ]; then
  # One step per length and no warmup (memory is the question, not speed), from a length known to train
  # upwards until the first that does not; LONG_OURS / LONG_HF override the ladders (empty: skip).
  # Ours recomputes in LONG_CKPT mode (default full: layer inputs only, the least memory).
  LONG_CKPT="${LONG_CKPT:-full}"
  echo "== longest sequence at batch 1 (llama2-7b, r 16; ours checkpointing $LONG_CKPT, theirs on)"
  try_len() {  # try_len ours|hf SEQ
    local who=$1 s=$2 log="$OUT/$1_seq$2.log" rc
    if [ "$who" = ours ]; then
      "$Q" bench --shape llama2-7b --r 16 --seq "$s" --checkpointing "$LONG_CKPT" --warmup 0 --steps 1 \
        --json "$OUT/ours_seq$s.json" >"$log" 2>&1
    else
      "$PY" scripts/bench_hf.py --shape llama2-7b --r 16 --seq "$s" --warmup 0 --steps 1 --json "$OUT/hf_seq$s.json" >"$log" 2>&1
    fi
    rc=$?
    if [ $rc -eq 0 ]; then
      "$PY" -c "import json,sys; j=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:5s} seq {sys.argv[3]:>6}: trains, peak {j[\"peak_bytes\"]/2**30:.1f} GiB, step {j[\"step_ms\"]/1e3:.1f} s')" \
        "$OUT/${who}_seq$s.json" "$who" "$s"
    elif grep -qiE "out of memory|OutOfMemory" "$log"; then
      echo "$who seq $s: out of memory"
    else
      echo "$who seq $s: failed (rc $rc)"; tail -3 "$log"
    fi
    return $rc
  }
  for s in ${LONG_OURS-65536 98304 131072 163840}; do try_len ours "$s" || break; done
  for s in ${LONG_HF-32768 65536 98304}; do try_len hf "$s" || break; done
  pack_results
  exit $status
fi

if [ "$MODE" = profile ]; then
  # PROFILE_R (ranks, default 16), PROFILE_CKPT (default "off on"), PROFILE_FLAGS (e.g. --profile-gpu-only).
  for r in ${PROFILE_R:-16}; do
    for c in ${PROFILE_CKPT:-off on}; do
      echo "== profile, $SHAPE, r $r, checkpointing $c ${PROFILE_FLAGS:-}"
      # shellcheck disable=SC2086  # the flags are words
      "$Q" bench --shape "$SHAPE" --r "$r" --checkpointing "$c" --warmup 2 --steps 3 ${PROFILE_FLAGS:-} \
        --json "$OUT/ours_r${r}_ckpt_$c.json" --profile "$OUT/trace_r${r}_ckpt_$c.json" 2>&1 | grep -vE "^trace:" | head -40
    done
  done
  gzip -f "$OUT"/trace_*.json
  "$PY" scripts/trace_summary.py --kernels 20 "$OUT"/trace_*.json.gz | tee "$OUT/table.txt"
  pack_results table.txt
  exit $status
fi

if [ "$MODE" = layers ]; then
  # Speed against memory as fewer layers recompute (--checkpoint-layers N: the first N of 32 recompute, the
  # others keep their activations), selective recomputation, r in LAYERS_R (default 16).
  echo "== checkpointed layers, llama2-7b, seq 2048"
  for r in ${LAYERS_R:-16}; do
    for n in ${LAYERS:-32 24 16 8 0}; do
      "$Q" bench --shape llama2-7b --r "$r" --checkpointing on --checkpoint-layers "$n" \
        --json "$OUT/layers_r${r}_$n.json" >"$OUT/layers_r${r}_$n.log" 2>&1 || tail -3 "$OUT/layers_r${r}_$n.log"
    done
  done
  "$PY" - "$OUT" <<'PYEOF' | tee "$OUT/table.txt"
import glob, json, os, sys
rows = [json.load(open(f)) for f in glob.glob(os.path.join(sys.argv[1], "layers_r*.json"))]
rows.sort(key=lambda j: (j["r"], -j["recomputed_layers"]))
print(f"{'r':>3s} {'recomputed':>10s} {'tok/s':>7s} {'step ms':>8s} {'peak GiB':>8s} {'MFU':>6s}")
for j in rows:
    print(f"{j['r']:3d} {j['recomputed_layers']:10d} {j['tokens_per_s']:7.0f} {j['step_ms']:8.1f} "
          f"{j['peak_bytes'] / 2**30:8.2f} {100 * j['mfu']:5.1f}%")
PYEOF
  pack_results table.txt
  exit $status
fi

if [ "$MODE" = short ]; then
  # The host-bound end: our step at short sequences, launched op by op (eager) against replayed as one CUDA
  # graph (--cuda-graph on), r 16 without checkpointing. SHORT: "SEQxBATCH" shapes (default below: batch 1
  # at 256-1024 tokens, and the recipe's 4 x 512), SHORT_ROUNDS interleaved rounds (default 2; best kept).
  echo "== short sequences, llama2-7b, r 16, no checkpointing: eager against one CUDA graph a step"
  for shape in ${SHORT:-256x1 512x1 1024x1 512x4}; do
    for i in $(seq "${SHORT_ROUNDS:-2}"); do
      for g in off on; do
        "$Q" bench --shape llama2-7b --r 16 --checkpointing off --seq "${shape%x*}" --batch "${shape#*x}" \
          --cuda-graph "$g" --json "$OUT/short_${shape}_$g.$i.json" >"$OUT/short_${shape}_$g.$i.log" 2>&1 ||
          tail -3 "$OUT/short_${shape}_$g.$i.log"
      done
    done
  done
  "$PY" - "$OUT" <<'PYEOF' | tee "$OUT/table.txt"
import collections, glob, json, os, sys
best = collections.defaultdict(dict)
for f in glob.glob(os.path.join(sys.argv[1], "short_*.json")):
    j = json.load(open(f))
    key, mode = (j["seq"], j["batch"]), "graph" if j["cuda_graph"] else "eager"
    if j["tokens_per_s"] > best[key].get(mode, {}).get("tokens_per_s", 0):
        best[key][mode] = j
print(f"{'seq x batch':>11s} {'eager tok/s':>11s} {'ms':>6s} {'graph tok/s':>11s} {'ms':>6s} {'graph/eager':>11s} {'GiB e/g':>11s}")
for (seq, batch), m in sorted(best.items()):
    e, g = m.get("eager"), m.get("graph")
    if not e or not g:
        print(f"{seq:>6d} x {batch:<2d} incomplete")
        continue
    print(f"{seq:>6d} x {batch:<2d} {e['tokens_per_s']:11.0f} {e['step_ms']:6.1f} {g['tokens_per_s']:11.0f} "
          f"{g['step_ms']:6.1f} {g['tokens_per_s'] / e['tokens_per_s']:11.3f} "
          f"{e['peak_bytes'] / 2**30:5.2f}/{g['peak_bytes'] / 2**30:.2f}")
PYEOF
  pack_results table.txt
  exit $status
fi

if [ "$MODE" = ab ]; then
  QB="$Q"
  if [ -f .deps/base-src/REVISION ]; then
    echo "== build of the base $(cat .deps/base-src/REVISION) (build-base)"
    ln -sfn "$PWD/.deps" .deps/base-src/.deps  # its headers (CLI11) as for this tree
    if cmake -S .deps/base-src -B build-base -G Ninja -DQLORA_PYTHON="$PY" -DQLORA_SANITIZE=OFF -DQLORA_WITH_CUDA=ON \
         -DCMAKE_BUILD_TYPE=Release >"$OUT/cmake-base.log" 2>&1 &&
       ninja -C build-base -j "$(nproc)" qlora >"$OUT/build-base.log" 2>&1; then
      QB=build-base/trainer/cli/qlora
      flags="${AB_FLAGS:-}"
    else
      echo "the base did not build (build-base.log); b = this build"; tail -5 "$OUT/build-base.log"
    fi
  fi
  flags="${flags-${AB_FLAGS:---fold off}}"
  if [ -n "${AB_PROFILE:-}" ]; then
    pr="${AB_PROFILE_R:-16}"
    echo "== profile (device activities only), $SHAPE, r $pr, checkpointing off, as is"
    "$Q" bench --shape "$SHAPE" --r "$pr" --checkpointing off --warmup 2 --steps 3 ${AB_A_FLAGS:-} --profile-gpu-only \
      --profile "$OUT/trace_r${pr}_ckpt_off.json" \
      2>&1 | grep -vE "^trace:" | head -40
    gzip -f "$OUT"/trace_*.json
    "$PY" scripts/trace_summary.py "$OUT"/trace_*.json.gz
  fi
  # AB_A_FLAGS: flags for a; AB_C_FLAGS (optional): a third variant c, this build with those flags.
  echo "== A/B, $SHAPE, seq 2048: as is '${AB_A_FLAGS:-}' (a) against $QB '$flags' (b)${AB_C_FLAGS:+ and '$AB_C_FLAGS' (c)}, rounds interleaved"
  for r in ${AB_R:-16}; do
    for c in on off; do
      for i in $(seq "${AB_ROUNDS:-2}"); do
        # shellcheck disable=SC2086  # the flags are words
        "$Q" bench --shape "$SHAPE" --r "$r" --checkpointing "$c" ${AB_A_FLAGS:-} --json "$OUT/ab_r${r}_${c}_a.$i.json" \
          >/dev/null 2>&1
        # shellcheck disable=SC2086
        "$QB" bench --shape "$SHAPE" --r "$r" --checkpointing "$c" $flags --json "$OUT/ab_r${r}_${c}_b.$i.json" \
          >/dev/null 2>&1
        if [ -n "${AB_C_FLAGS:-}" ]; then
          # shellcheck disable=SC2086
          "$Q" bench --shape "$SHAPE" --r "$r" --checkpointing "$c" $AB_C_FLAGS --json "$OUT/ab_r${r}_${c}_c.$i.json" \
            >/dev/null 2>&1
        fi
      done
    done
  done
  "$PY" - "$OUT" "b = $QB $flags${AB_C_FLAGS:+; c = $AB_C_FLAGS}" <<'PYEOF' | tee "$OUT/table.txt"
import glob, json, os, sys
out, legend = sys.argv[1], sys.argv[2]
variants = [v for v in "abc" if glob.glob(os.path.join(out, f"ab_*_{v}.*.json"))]
print(f"{'run':14s}" + "".join(f" {v + ' tok/s (runs)':>22s}" for v in variants)
      + "".join(f" {'a/' + v:>6s}" for v in variants[1:]) + "".join(f" {v + ' GiB':>6s}" for v in variants) + "   " + legend)
for prefix in sorted({f.rsplit('_', 1)[0] for f in glob.glob(os.path.join(out, 'ab_*.json'))}):
    runs = {v: [json.load(open(f)) for f in sorted(glob.glob(f"{prefix}_{v}.*.json"))] for v in variants}
    if not all(runs.values()):
        print(os.path.basename(prefix), "missing runs"); continue
    best = {v: max(runs[v], key=lambda j: j["tokens_per_s"]) for v in variants}
    fmt = lambda v: f"{best[v]['tokens_per_s']:.0f} (" + ", ".join(f"{j['tokens_per_s']:.0f}" for j in runs[v]) + ")"
    print(f"{os.path.basename(prefix)[3:]:14s}" + "".join(f" {fmt(v):>22s}" for v in variants)
          + "".join(f" {best['a']['tokens_per_s'] / best[v]['tokens_per_s']:6.3f}" for v in variants[1:])
          + "".join(f" {best[v]['peak_bytes'] / 2**30:6.2f}" for v in variants))
PYEOF
  pack_results table.txt
  exit $status
fi

if [ "$MODE" = full ]; then
  echo "== kernel lab (every dequant variant, checked and timed)"
  "$BUILD/kernels/dev/qlora_dequant_bench" 2>&1 | tee "$OUT/lab.txt" | tail -12 || status=1
  if [ -d .deps/cutlass ]; then  # the base GEMMs, CUTLASS against cuBLAS (built on request only)
    echo "== kernel lab (the base GEMMs through CUTLASS against cuBLAS)"
    if ninja -C "$BUILD" -j "$(nproc)" qlora_cutlass_gemm_bench >"$OUT/build-cutlass.log" 2>&1; then
      "$BUILD/kernels/dev/qlora_cutlass_gemm_bench" 2>&1 | tee "$OUT/lab-cutlass.txt" || status=1
    else
      status=1; tail -20 "$OUT/build-cutlass.log"
    fi
  fi
  echo "== kernels"
  "$Q" bench --kernels --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
fi

# BEST_OF=N runs each benchmark N times, each in its own process, and keeps the fastest (the JSON of every
# run stays, suffixed .1, .2, ...): the Python stack's speed moves by tens of percent between processes
# on the same machine, ours by 1-2%, and the ratio should not hinge on one draw.
keep_fastest() {  # keep_fastest FILE_PREFIX: FILE_PREFIX.N.json -> FILE_PREFIX.json
  "$PY" - "$1" <<'PYEOF'
import glob, json, shutil, sys
runs = [(json.load(open(f))["tokens_per_s"], f) for f in sorted(glob.glob(sys.argv[1] + ".[0-9]*.json"))]
if runs:
    shutil.copy(max(runs)[1], sys.argv[1] + ".json")
    if len(runs) > 1:
        print("   runs:", ", ".join(f"{t:.0f}" for t, _ in runs), "tokens/s; kept the fastest")
PYEOF
}
# sampled JSON CMD...: CMD with the SM clock and the board power sampled every 50 ms (nvidia-smi); the medians
# over the samples within the timed steps (JSON's timed_unix_s) go into JSON as gpu_sm_mhz and gpu_power_w, for
# the table: the card runs our step at its power cap, the Python stack's below it (docs/performance.md).
sampled() {
  local json=$1 sampler rc; shift
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader,nounits -lms 50 >"$json.smi" &
  sampler=$!
  "$@"; rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  "$PY" - "$json" <<'PYEOF'
import datetime, json, os, statistics, sys
path = sys.argv[1]
rows = []  # (Unix seconds, MHz, W); nvidia-smi's timestamps are local time, as the benchmarks' clocks
for line in open(path + ".smi"):
    try:
        t, mhz, w = (v.strip() for v in line.split(","))
        rows.append((datetime.datetime.strptime(t, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(mhz), float(w)))
    except ValueError:
        pass
os.remove(path + ".smi")
if os.path.exists(path):
    j = json.load(open(path))
    lo, hi = j.get("timed_unix_s", (0, 0))
    timed = [r for r in rows if lo <= r[0] <= hi]
    if timed:
        j["gpu_sm_mhz"] = statistics.median(r[1] for r in timed)
        j["gpu_power_w"] = statistics.median(r[2] for r in timed)
        json.dump(j, open(path, "w"))
PYEOF
  return $rc
}
ours() {  # ours NAME ARGS...
  local name=$1; shift
  for i in $(seq "${BEST_OF:-1}"); do
    sampled "$OUT/ours_$name.$i.json" "$Q" bench --shape "$SHAPE" "$@" --json "$OUT/ours_$name.$i.json" 2>&1 | tail -1 ||
      true
  done
  keep_fastest "$OUT/ours_$name"
}
theirs() {  # theirs NAME ARGS...
  local name=$1; shift
  for i in $(seq "${BEST_OF:-1}"); do
    sampled "$OUT/hf_$name.$i.json" "$PY" scripts/bench_hf.py --shape "$SHAPE" "$@" --json "$OUT/hf_$name.$i.json" 2>&1 |
      grep -vE "Warning|warn" | tail -1 || true
  done
  keep_fastest "$OUT/hf_$name"
}
if [ "$MODE" = floor ]; then
  # Our step against only its tensor-core work (kernels/dev/step_floor.py: the base GEMMs, lm_head and cuDNN's
  # attention, back to back), each with the clock and power sampled: how far the step is from what the card at
  # its power cap does with no other kernel at all.
  SHAPE=llama2-7b  # step_floor.py's
  echo "== the step against its tensor-core work alone, llama2-7b, r 16, seq 2048"
  ours r16_nockpt --r 16 --checkpointing off
  ours r16_ckpt --r 16 --checkpointing on
  floor() {  # floor NAME ARGS...
    local name=$1; shift
    sampled "$OUT/floor_$name.json" "$PY" kernels/dev/step_floor.py "$@" --json "$OUT/floor_$name.json" || status=1
  }
  floor gemm --attention off
  floor gemm_attn --attention on
  floor gemm_attn_recompute --attention on --recompute on
  theirs bf16_r16_nockpt --r 16 --checkpointing off --base bf16
  theirs bf16_r16_ckpt --r 16 --checkpointing on --base bf16
  "$PY" - "$OUT" <<'PYEOF' | tee "$OUT/table.txt"
import json, os, sys
d = sys.argv[1]
load = lambda n: json.load(open(os.path.join(d, n + ".json"))) if os.path.exists(os.path.join(d, n + ".json")) else None
print(f"{'run':30s} {'step ms':>8s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'SM MHz':>6s} {'W':>4s}")
for n, label in (("ours_r16_nockpt", "ours, no checkpointing"), ("floor_gemm", "floor: GEMMs"),
                 ("floor_gemm_attn", "floor: GEMMs + attention"),
                 ("hf_bf16_r16_nockpt", "transformers + PEFT, no ckpt"), ("ours_r16_ckpt", "ours, checkpointing"),
                 ("floor_gemm_attn_recompute", "floor: + recomputed GEMMs"),
                 ("hf_bf16_r16_ckpt", "transformers + PEFT, ckpt")):
    j = load(n)
    if j:
        tf = (f"{j['tflops']:.0f}" if "tflops" in j else
              f"{j['tokens_per_s'] * j['flops_per_token'] / 1e12:.0f}*" if "flops_per_token" in j else "")
        print(f"{label:30s} {j['step_ms']:8.1f} {j['tokens_per_s']:9.0f} {tf:>8s} {j.get('gpu_sm_mhz', 0):6.0f} "
              f"{j.get('gpu_power_w', 0):4.0f}")
        if n.startswith("hf_"):
            print(f"{'  2x that needs':30s} {j['step_ms'] / 2:8.1f} {2 * j['tokens_per_s']:9.0f}")
print("* ours: the model FLOPs of the MFU formula (recomputation not counted); the floor's: the work it ran")
PYEOF
  pack_results table.txt
  exit $status
fi

if [ "$MODE" = dist ]; then
  # Data parallelism (trainer/dist/dist.h): the step on GPU 0 alone, then on every GPU at once, each rank its own
  # tokens, the gradients summed through NCCL every step. No clock sampling here (nvidia-smi mixes the GPUs).
  # `--` ends torchrun's options: its parser takes any prefix of them (the bench's --r would be one).
  gpus=$(nvidia-smi -L | wc -l)
  echo "== data-parallel step, $SHAPE, seq 2048, batch 1 a GPU, r 16: 1 GPU and $gpus"
  # On one host the gradients are summed in one piece once the backward is done (dist::bucket_bytes); "buckets"
  # (QLORA_DIST_BUCKET_KB=25600, the default across hosts) starts 25 MiB sums while it runs: what that overlap
  # gains or costs here.
  ranks() {  # ranks NAME ARGS...
    local name=$1; shift
    "$PY" -m torch.distributed.run --nproc-per-node "$gpus" --no-python --master-addr 127.0.0.1 \
      --master-port $((29400 + RANDOM % 500)) -- "$Q" bench --shape "$SHAPE" "$@" --json "$OUT/$name.json" 2>&1 |
      tail -1 || status=1
  }
  for ckpt in on off; do
    for i in $(seq "${BEST_OF:-1}"); do
      CUDA_VISIBLE_DEVICES=0 "$Q" bench --shape "$SHAPE" --r 16 --checkpointing "$ckpt" \
        --json "$OUT/ours_r16_${ckpt}_gpus1.$i.json" 2>&1 | tail -1 || status=1
      ranks "ours_r16_${ckpt}_gpus$gpus.$i" --r 16 --checkpointing "$ckpt"
      QLORA_DIST_BUCKET_KB=25600 ranks "ours_r16_${ckpt}_gpus${gpus}_buckets.$i" --r 16 --checkpointing "$ckpt"
    done
    for n in 1 "$gpus" "${gpus}_buckets"; do keep_fastest "$OUT/ours_r16_${ckpt}_gpus$n"; done
  done
  "$PY" - "$OUT" "$gpus" <<'PYEOF' | tee "$OUT/table.txt"
import json, os, sys
d, n = sys.argv[1], int(sys.argv[2])
load = lambda f: json.load(open(os.path.join(d, f))) if os.path.exists(os.path.join(d, f)) else None
print(f"{'r 16, seq 2048':24s} {'1 GPU tok/s':>11s} {f'{n} GPUs tok/s':>13s} {'per GPU':>8s} {'scaling':>8s} "
      f"{'buckets':>10s} {'peak GiB (1 / each)':>20s}")
for ckpt, label in (("on", "checkpointing"), ("off", "no checkpointing")):
    a, b = load(f"ours_r16_{ckpt}_gpus1.json"), load(f"ours_r16_{ckpt}_gpus{n}.json")
    c = load(f"ours_r16_{ckpt}_gpus{n}_buckets.json")
    if a and b:
        buckets = f"{c['tokens_per_s'] / (n * a['tokens_per_s']):10.3f}" if c else f"{'':10s}"
        print(f"{label:24s} {a['tokens_per_s']:11.0f} {b['tokens_per_s']:13.0f} {b['tokens_per_s_per_gpu']:8.0f} "
              f"{b['tokens_per_s'] / (n * a['tokens_per_s']):8.3f} {buckets} "
              f"{a['peak_bytes'] / 2**30:9.2f} / {b['peak_bytes'] / 2**30:.2f}")
print("scaling: the GPUs' tokens/s together over", n, "x one GPU's, in the same call; buckets: the same with the")
print("gradients summed in 25 MiB buckets while the backward runs instead of in one piece after it")
PYEOF
  pack_results table.txt
  exit $status
fi

echo "== training step, $SHAPE, seq 2048, batch 1"
ours r16_ckpt --r 16 --checkpointing on
ours r16_nockpt --r 16 --checkpointing off
theirs bf16_r16_ckpt --r 16 --checkpointing on --base bf16
theirs bf16_r16_nockpt --r 16 --checkpointing off --base bf16
if [ "$MODE" = compare ]; then  # r 64 as well, without the kernel benchmarks and the extra paths
  # _half: the first 16 of 32 layers recompute (model.gradient_checkpointing_layers: 16)
  ours r16_ckpt_half --r 16 --checkpointing on --checkpoint-layers 16
  ours r64_ckpt --r 64 --checkpointing on
  ours r64_ckpt_half --r 64 --checkpointing on --checkpoint-layers 16
  ours r64_nockpt --r 64 --checkpointing off
  theirs bf16_r64_ckpt --r 64 --checkpointing on --base bf16
  theirs bf16_r64_nockpt --r 64 --checkpointing off --base bf16
fi
if [ "$MODE" = full ]; then
  ours r16_ckpt_full --r 16 --checkpointing full  # recomputation from the layer inputs only, as HF's
  ours r16_ckpt_unfused --r 16 --checkpointing on --fused off  # the per-projection path, for the fused gain
  ours r64_ckpt --r 64 --checkpointing on
  ours r64_nockpt --r 64 --checkpointing off
  theirs bf16_r64_ckpt --r 64 --checkpointing on --base bf16
  theirs bf16_r64_nockpt --r 64 --checkpointing off --base bf16
  if "$PY" -c 'import bitsandbytes' 2>/dev/null; then
    theirs bnb4_r16_ckpt --r 16 --checkpointing on --base bnb4
    theirs bnb4_r16_nockpt --r 16 --checkpointing off --base bnb4
  fi
fi

echo "== summary ($(head -1 "$OUT/gpu.txt"), $SHAPE, ${SECONDS}s)"
"$PY" scripts/gpu_table.py "$OUT" | tee "$OUT/table.txt"
pack_results table.txt
exit $status
