#!/usr/bin/env bash
# The README's main command: a tiny model learns a new skill end to end, on the CPU, in a few minutes.
#
#   1. set-up and build (scripts/setup.sh, then the `qlora` target; skipped with --no-build)
#   2. a synthetic world (datasets/demo/make_demo.py): biographies of 48 made-up people as plain prose,
#      chat questions about two of each person's three facts, held-out questions about the third (which
#      only the prose states), a SentencePiece tokenizer trained on the text, and a random Llama-shaped
#      initialization
#   3. pretraining by our trainer, every weight trained:     train --config configs/demo-pretrain.yaml
#   4. the base's score on the held-out questions:            qlora eval (greedy, exact match)
#   5. QLoRA fine-tuning in the Llama-2 chat format:          train --config configs/demo-qlora.yaml
#      (NF4 base, LoRA on all seven projections, PEFT adapter and merged model exported)
#   6. the score again (adapter on the NF4 base, and the merged export), the exports checked with PEFT +
#      bitsandbytes, a few generated answers, the before/after table and runs/demo/loss.png.
#
# It exits non-zero unless held-out exact match is at most 10% before fine-tuning and at least 80% after
# (datasets/demo/report.py): the gap is the demo's claim. Idempotent: a second run reuses the venv, ccache
# and build, and rewrites runs/demo from scratch.
#
# Environment: QLORA_BUILD_DIR (default build), QLORA_JOBS (build parallelism, default nproc),
# QLORA_CLI (the qlora binary; default $QLORA_BUILD_DIR/trainer/cli/qlora), QLORA_DEMO_WORKDIR (where
# runs/demo is written, default the repository root; the configs' relative paths resolve against it),
# QLORA_DEMO_SEED (the synthetic world's seed, default 1234), QLORA_DEMO_PRETRAIN_SET and
# QLORA_DEMO_QLORA_SET (extra space-separated section.key=value overrides for the two runs).
# ctest runs this as demo_end_to_end (tests/demo), label demo.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUILD="${QLORA_BUILD_DIR:-build}"
if [ "${1:-}" = "--no-build" ]; then
  : "${QLORA_PYTHON:?--no-build needs QLORA_PYTHON (the venv made by scripts/setup.sh)}"
else
  source scripts/setup.sh
  cmake -S . -B "$BUILD" -G Ninja -DQLORA_PYTHON="$QLORA_PYTHON" >/dev/null
  ninja -C "$BUILD" -j "${QLORA_JOBS:-$(nproc)}" qlora
fi
QLORA="$(realpath "${QLORA_CLI:-$BUILD/trainer/cli/qlora}")"
PY="$QLORA_PYTHON"
cd "${QLORA_DEMO_WORKDIR:-$ROOT}"
D=runs/demo
sets() { for s in $1; do printf -- '--set\n%s\n' "$s"; done; }
mapfile -t PRE_SET < <(sets "${QLORA_DEMO_PRETRAIN_SET:-}")
mapfile -t FT_SET < <(sets "${QLORA_DEMO_QLORA_SET:-}")
step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

SECONDS=0
step "data, tokenizer, random initialization"
rm -rf "$D"  # metrics.jsonl is appended to and checkpoints would resume: start clean
"$PY" "$ROOT/datasets/demo/make_demo.py" "$D" --seed "${QLORA_DEMO_SEED:-1234}"

step "pretraining: train --config configs/demo-pretrain.yaml"
"$QLORA" train --config "$ROOT/configs/demo-pretrain.yaml" "${PRE_SET[@]}"

step "held-out questions before fine-tuning"
"$QLORA" eval --model $D/pretrain/model --data $D/data/eval.jsonl --max-new-tokens 32 --json $D/eval-before.json \
  | tail -n 1

step "QLoRA fine-tuning: train --config configs/demo-qlora.yaml"
"$QLORA" train --config "$ROOT/configs/demo-qlora.yaml" "${FT_SET[@]}"

step "held-out questions after fine-tuning: NF4 base + adapter, then the merged export"
"$QLORA" eval --model $D/pretrain/model --quantize nf4 --adapter $D/qlora/adapter --data $D/data/eval.jsonl \
  --max-new-tokens 32 --json $D/eval-after.json | tail -n 1
"$QLORA" eval --model $D/qlora/merged --data $D/data/eval.jsonl --max-new-tokens 32 --json $D/eval-merged.json \
  | tail -n 1

step "the exports checked with PEFT + bitsandbytes"
# What users do next, checked with the reference libraries: PEFT loads the adapter onto the base with its
# projections quantized by bitsandbytes (NF4, double quantization, block 64: the base the adapter was
# trained through), and that model's logits equal those of our merged export.
"$PY" - "$D" <<'PY' 2>&1 | grep -v -e "kernels-community" -e "Loading weights"
import sys
import torch
import bitsandbytes.functional as F
from transformers import AutoModelForCausalLM
from peft import PeftModel
d = sys.argv[1]
base = AutoModelForCausalLM.from_pretrained(f"{d}/pretrain/model")
for name, mod in base.named_modules():
    if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        q, state = F.quantize_4bit(mod.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True)
        mod.weight.data = F.dequantize_4bit(q, state)
peft = PeftModel.from_pretrained(base, f"{d}/qlora/adapter").eval()
merged = AutoModelForCausalLM.from_pretrained(f"{d}/qlora/merged").eval()
ids = torch.randint(3, base.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    diff = (peft(ids).logits - merged(ids).logits).abs().max().item()
print(f"PEFT(bnb-NF4 base + our adapter) vs our merged export: max |logit diff| {diff:.2e}")
assert diff < 1e-4, "the merged export disagrees with PEFT + bitsandbytes"
PY

step "a few held-out questions, answered by the merged model (qlora generate)"
"$QLORA" generate --model $D/qlora/merged --prompt-file $D/data/prompts.jsonl --max-new-tokens 32 \
  --json $D/generated.json >/dev/null 2>&1
"$PY" - "$D" <<'PY'
import json, sys
d = sys.argv[1]
want = [json.loads(l) for l in open(f"{d}/data/prompts.jsonl")]
for w, g in zip(want, json.load(open(f"{d}/generated.json"))):
    mark = "ok  " if g["text"].strip() == w["answer"] else "MISS"
    print(f"{mark} Q: {w['prompt']}\n     A: {g['text'].strip()}" + ("" if mark == "ok  " else f"  (expected: {w['answer']})"))
PY

step "report"
set +e
"$PY" "$ROOT/datasets/demo/report.py" "$D"
rc=$?
set -e
echo "outputs in $(realpath $D): pretrain/model (base), qlora/adapter (PEFT), qlora/merged, eval-*.json, loss.png"
echo "demo finished in ${SECONDS}s after the build"
exit $rc
