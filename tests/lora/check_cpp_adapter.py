"""PEFT loads the adapter our save_peft_adapter wrote (test_lora's LoraExport.SaveForPeft) and
reproduces our logits.

Reads $QLORA_TEST_DATA/lora/{base, cpp_adapter/, cpp_adapter_logits.safetensors}. Exits non-zero on
failure. Tolerance: both sides compute the same float32 model (see test_lora.cpp's kLogitsRel: different
summation orders, 2 layers, relative error well below 1e-6; 2e-5 leaves margin), while a dropped target
module, the wrong rsLoRA scaling or misnamed keys (PEFT would then keep B = 0 and warn) are off by
far more.
"""
import json
import math
import os
import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

D = os.path.join(os.environ["QLORA_TEST_DATA"], "lora")


def main():
    cfg = json.load(open(os.path.join(D, "cpp_adapter", "adapter_config.json")))
    ours = load_file(os.path.join(D, "cpp_adapter_logits.safetensors"))
    base = LlamaForCausalLM.from_pretrained(os.path.join(D, "base"), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a key PEFT does not recognise ("missing adapter keys") fails
        model = PeftModel.from_pretrained(base, os.path.join(D, "cpp_adapter")).eval()
    # Every adapter weight in the file was loaded (B is random, so none may be PEFT's zero init).
    n_b = 0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert p.abs().sum() > 0, f"{name} is still zero: our key names did not match PEFT's"
            n_b += 1
    assert n_b == 3 * 2, f"expected lora_B on q_proj, v_proj, down_proj of 2 layers, found {n_b}"
    lay = model.base_model.model.model.layers[0]
    want_scaling = cfg["lora_alpha"] / math.sqrt(cfg["r"])
    assert abs(lay.self_attn.q_proj.scaling["default"] - want_scaling) < 1e-12, lay.self_attn.q_proj.scaling
    assert not hasattr(lay.self_attn.k_proj, "lora_A"), "k_proj was not targeted"
    with torch.no_grad():
        logits = model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"]).logits.float()
    m = ours["attention_mask"].bool()
    a, b = logits[m].double(), ours["logits"][m].double()
    rel = ((a - b).norm() / b.norm()).item()
    print(f"PEFT logits vs ours: rel err {rel:.3e}, max abs diff {(a - b).abs().max().item():.3e}")
    base_logits = LlamaForCausalLM.from_pretrained(os.path.join(D, "base"), dtype=torch.float32)(
        input_ids=ours["input_ids"], attention_mask=ours["attention_mask"]).logits.float().detach()
    rel_base = ((base_logits[m].double() - b).norm() / b.norm()).item()
    print(f"(without the adapter: rel err {rel_base:.3e})")
    if not rel < 2e-5 or not rel_base > 2e-3:
        print("FAIL", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
