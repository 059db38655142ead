"""`qlora export` outputs, loaded by the reference libraries and compared with PEFT on the same base.

  adapter      from a resume checkpoint -> PeftModel.from_pretrained; logits equal PEFT with the original
               adapter (which test_export shows equal ours) within 2e-5 (float32, summation order only)
  merged fp32  sharded into >= 2 files; transformers' logits equal PEFT's unmerged ones within 2e-5
               (W + s B A summed once in float32 vs y = Wx + s B(Ax): a few float32 roundings apart)
  merged bf16  sharded; every weight equals PEFT's merge_and_unload() rounded to bf16, up to one bf16 ulp
               where the float32 sums differ in the last bit (counted); logits within 2e-2 of PEFT's
               float32 ones: every weight carries a relative rounding error <= 2^-9, about 2^-9/sqrt(3)
               in norm, and 7 matmuls in sequence add up to ~5e-3; 2e-2 leaves margin, while a missing
               or doubled adapter is off by > 1e-1 (checked)
  4-bit base   base_bnb (transformers + bitsandbytes NF4 + double quant): merged fp32 equals PEFT on the
               base dequantized by bnb.functional.dequantize_4bit, within 2e-5
  merged-4bit  loads with AutoModelForCausalLM.from_pretrained on the CPU (bitsandbytes); the dequantized
               weights (bnb.functional) equal bnb's own quantization of the merged weight
               (F.quantize_4bit of deq(base) + s B A, cast to the storage dtype) element for element, and
               the 4-bit model's logits equal a float32 model holding those dequantized weights within 2e-2:
               bitsandbytes' CPU 4-bit matmul (backends/cpu/ops.py, gemv_4bit) casts the activations and the
               scales to bf16 and computes in bf16 whatever the compute dtype, i.e. the same bf16 rounding
               budget as the merged-bf16 check (measured ~8e-3); the unquantized merge is ~2e-1 away (printed),
               so the bound still tells our 4-bit weights from the float ones
"""
import json
import os
import subprocess
import sys

import torch
import bitsandbytes.functional as F
from bitsandbytes.functional import QuantState
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from checks import Checks
from fixture_util import scratch_dir

D = os.path.join(os.environ["QLORA_TEST_DATA"], "export")
CLI = os.environ["QLORA_CLI"]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
check = Checks()


def export(out, *args):
    p = subprocess.run([CLI, "export", "--out", out, *args], capture_output=True, text=True)
    print(p.stderr.strip())
    if p.returncode != 0:
        raise SystemExit(f"qlora export failed: {p.stderr}")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def logits(model, ref):
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits.float()
    return out[ref["attention_mask"].bool()]


def shards(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if not os.path.exists(idx):
        return 1
    return len(set(json.load(open(idx))["weight_map"].values()))


def proj_names(n_layers):
    for i in range(n_layers):
        for p in PROJ:
            yield f"model.layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}"


def dequantized_bnb_base(tmp):
    """base_bnb with every projection dequantized by bitsandbytes, saved as a float32 checkpoint."""
    path = os.path.join(D, "base_bnb")
    cfg = LlamaConfig.from_pretrained(os.path.join(D, "base"))
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v.float() for k, v in sd.items() if not any(f".{p}.weight" in k for p in PROJ)}
    for pre in proj_names(cfg.num_hidden_layers):
        w = pre + ".weight"
        qs = QuantState.from_dict({k[len(w) + 1:]: v for k, v in sd.items() if k.startswith(w + ".")},
                                  device=torch.device("cpu"))
        qs.dtype = torch.float32
        state[w] = F.dequantize_4bit(sd[w], qs)
    m = LlamaForCausalLM(cfg)
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    out = os.path.join(tmp, "base_bnb_dequantized")
    m.save_pretrained(out)
    return out


def peft_on(base_dir):
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, os.path.join(D, "adapter")).eval()


def main():
    tmp = scratch_dir("qlora_export_")
    ref = load_file(os.path.join(D, "ref.safetensors"))
    want = ref["logits_peft"][ref["attention_mask"].bool()]
    base_logits = ref["logits_base"][ref["attention_mask"].bool()]
    base, adapter = os.path.join(D, "base"), os.path.join(D, "adapter")

    # 1. PEFT adapter from a resume checkpoint.
    out = os.path.join(tmp, "adapter")
    export(out, "--base", base, "--adapter", os.path.join(D, "ckpt"), "--format", "adapter")
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    check(cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == sorted(PROJ),
          f"adapter_config: r {cfg['r']}, alpha {cfg['lora_alpha']}, targets {cfg['target_modules']}")
    m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    r = rel(logits(m, ref), want)
    print(f"exported adapter in PEFT vs PEFT reference: rel {r:.3e}")
    check(r < 2e-5, "exported adapter: PEFT logits equal")

    # 2. Merged fp32, sharded.
    out = os.path.join(tmp, "merged_fp32")
    export(out, "--base", base, "--adapter", adapter, "--format", "merged", "--dtype", "fp32", "--shard-size", "100KB")
    check(shards(out) >= 2, f"merged fp32 sharded into {shards(out)} files")
    check(os.path.exists(os.path.join(out, "tokenizer.model")), "tokenizer copied")
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    r = rel(logits(m, ref), want)
    print(f"merged fp32 vs PEFT: rel {r:.3e}")
    check(r < 2e-5, "merged fp32: transformers logits equal PEFT's")

    # 3. Merged bf16, sharded.
    out = os.path.join(tmp, "merged_bf16")
    export(out, "--base", base, "--adapter", adapter, "--format", "merged", "--dtype", "bf16", "--shard-size", "100KB")
    check(shards(out) >= 2, f"merged bf16 sharded into {shards(out)} files")
    check(json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16", "config dtype bfloat16")
    ours_sd = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    ref_sd = peft_on(base).merge_and_unload().state_dict()
    total = diff = 0
    worst = 0.0
    for k, v in ref_sd.items():
        rb = v.to(torch.bfloat16)
        o = ours_sd[k]
        check_ok = o.dtype == torch.bfloat16 and o.shape == rb.shape
        if not check_ok:
            check(False, f"{k}: dtype/shape {o.dtype} {tuple(o.shape)}")
            continue
        ne = o != rb
        total += o.numel()
        diff += int(ne.sum())
        if ne.any():
            # one bf16 ulp at most: |a - b| <= 2^-7 * max(|a|, |b|) (8 bits of mantissa incl. the hidden one)
            ulp = torch.maximum(o.float().abs(), rb.float().abs()) * 2.0 ** -7
            worst = max(worst, ((o.float() - rb.float()).abs() / ulp)[ne].max().item())
    print(f"merged bf16 weights vs PEFT merge_and_unload().to(bf16): {diff} of {total} differ, worst {worst:.2f} ulp")
    check(worst <= 1.0 and diff <= 1e-3 * total, "merged bf16 weights equal PEFT's rounded to bf16")
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    r = rel(logits(m, ref), want)
    r_base = rel(base_logits, want)
    print(f"merged bf16 vs PEFT float32: rel {r:.3e} (the base without adapter: {r_base:.3e})")
    check(r < 2e-2 and r_base > 1e-1, "merged bf16: logits within bf16 rounding of PEFT's")

    # 4. 4-bit base (bitsandbytes checkpoint) merged to fp32.
    deq_base = dequantized_bnb_base(tmp)
    want4 = logits(peft_on(deq_base), ref)
    out = os.path.join(tmp, "merged_from_bnb")
    export(out, "--base", os.path.join(D, "base_bnb"), "--adapter", adapter, "--format", "merged", "--dtype", "fp32",
           "--shard-size", "100KB")
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    r = rel(logits(m, ref), want4)
    print(f"merged from the 4-bit base vs PEFT on the bnb-dequantized base: rel {r:.3e}")
    check(r < 2e-5, "merged from a 4-bit base: logits equal PEFT on the dequantized base")

    # 5. Merged 4-bit (bitsandbytes serialization), from the 4-bit base.
    merged_ref = peft_on(deq_base).merge_and_unload().state_dict()
    for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = os.path.join(tmp, "merged_4bit_" + dt)
        export(out, "--base", os.path.join(D, "base_bnb"), "--adapter", adapter, "--format", "merged-4bit",
               "--dtype", dt, "--shard-size", "100KB")
        qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
        check(qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
              and qc["bnb_4bit_use_double_quant"] is True, f"quantization_config {qc}")
        m = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
        check(type(m.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
              and type(m.lm_head).__name__ == "Linear", f"{dt}: projections Linear4bit, lm_head dense")
        total = diff = 0
        dense = LlamaForCausalLM(m.config).eval()
        state = {k: v.float() for k, v in m.state_dict().items() if not any(f".{p}." in k for p in PROJ)}
        for pre in proj_names(m.config.num_hidden_layers):
            mod = m.get_submodule(pre)
            got = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            w = merged_ref[pre + ".weight"].to(tdt)
            q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            exp = F.dequantize_4bit(q, qs).float()
            total += got.numel()
            diff += int((got != exp).sum())
            state[pre + ".weight"] = got
        print(f"merged-4bit {dt}: dequantized weights vs bnb quantizing the merged weight: {diff} of {total} differ")
        check(diff == 0, f"merged-4bit {dt}: dequantized weights equal bnb's quantization of the merged weight")
        if dt == "fp32":
            dense.load_state_dict(state, strict=False)
            r = rel(logits(m, ref), logits(dense, ref))
            r_q = rel(logits(m, ref), want4)
            print(f"merged-4bit fp32 (bnb forward) vs float32 model of its dequantized weights: rel {r:.3e}; "
                  f"vs the unquantized merge: {r_q:.3e} (re-quantization error)")
            check(r < 2e-2 and r_q > 5 * r, "merged-4bit: bnb's bf16 logits equal the dequantized model's")

    return check.report()


if __name__ == "__main__":
    sys.exit(main())
