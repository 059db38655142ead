#!/usr/bin/env bash
# The README's main command: from a fresh clone, set up, build the CLI, make the demo's inputs (a small
# synthetic chat data set, a SentencePiece tokenizer trained on it, a small random Llama), then run
#   train --config configs/tiny-cpu.yaml
# (NF4 base + LoRA, Llama-2 chat data, checkpoints, eval loss, PEFT adapter + merged export) and check the
# exported adapter with PEFT itself. Idempotent: a second run reuses the venv, ccache and build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
BUILD="${QLORA_BUILD_DIR:-build}"
cmake -S . -B "$BUILD" -G Ninja -DQLORA_PYTHON="$QLORA_PYTHON" >/dev/null
ninja -C "$BUILD" -j "${QLORA_JOBS:-$(nproc)}" qlora
SECONDS=0
"$QLORA_PYTHON" datasets/demo/make_demo.py runs/demo
"$BUILD/trainer/cli/train" --config configs/tiny-cpu.yaml
# What users do next, checked with the reference libraries: PEFT loads the adapter onto the base with its
# projections quantized by bitsandbytes (NF4, double quantization, block 64: the base the adapter was
# trained through), and that model's logits equal those of our merged export.
"$QLORA_PYTHON" - <<'PY' 2>&1 | grep -v -e "kernels-community" -e "Loading weights"
import torch
import bitsandbytes.functional as F
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("runs/demo/base")
for name, mod in base.named_modules():
    if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        q, state = F.quantize_4bit(mod.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True)
        mod.weight.data = F.dequantize_4bit(q, state)
peft = PeftModel.from_pretrained(base, "runs/demo/tiny-cpu/adapter").eval()
merged = AutoModelForCausalLM.from_pretrained("runs/demo/tiny-cpu/merged").eval()
ids = torch.randint(3, 384, (2, 48), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    d = (peft(ids).logits - merged(ids).logits).abs().max().item()
print(f"PEFT(bnb-NF4 base + our adapter) vs our merged export: max |logit diff| {d:.2e}")
assert d < 1e-4, "the merged export disagrees with PEFT + bitsandbytes"
PY
echo "demo finished in ${SECONDS}s: outputs in runs/demo/tiny-cpu (adapter/, merged/, checkpoints/, metrics.jsonl)"
