"""Tiny random Llama checkpoints quantized and serialized by transformers + bitsandbytes 0.50.2 (CPU), and
the logits transformers computes on the dequantized model.

For each variant in VARIANTS this writes
  $QLORA_TEST_DATA/quant_bnb_llama/<name>/           save_pretrained of the 4-bit model: config.json with
      "quantization_config", model.safetensors with the bnb keys of shared/INTEROP.md section 1
  $QLORA_TEST_DATA/quant_bnb_llama/<name>.ref.safetensors
      input_ids [B, T] int64, attention_mask [B, T] int64 (row 1 right-padded),
      logits_f32 [B, T, V] float32: transformers' float32 LlamaForCausalLM whose projection weights are
      bnb's own dequantization (F.dequantize_4bit to float32) of the saved 4-bit state
  $QLORA_TEST_DATA/quant_bnb_llama/variants.json     the variant names
For the QLoRA recipe's storage (nf4_dq_f32) also the QLoRA reference: PEFT LoRA (r 4, alpha 8, all seven
projections, lora_B drawn non-zero) on that dequantized float32 model, which is exactly what training
through the frozen 4-bit base computes:
  $QLORA_TEST_DATA/quant_bnb_llama/nf4_dq_f32.adapter/    PEFT's save_pretrained of the adapter
  in nf4_dq_f32.ref.safetensors: labels [B, T] (-100 on padding and the first 3 positions),
      peft_logits [B, T, V], peft_loss [], grad.<our name> (every lora_A / lora_B gradient).
The C++ tests: test_quant_bnb_llama loads the 4-bit checkpoint with our loader (no re-quantization) and
compares logits; test_qlora_peft (tests/lora) trains through it against PEFT, on both of our paths.
Weights are drawn fresh every run.
"""
import json
import os
import sys

import torch
import bitsandbytes.functional as F
from bitsandbytes.functional import QuantState
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from fixture_util import our_name, randomize_lora_b, spread_weights

OUT = os.path.join(os.environ["QLORA_TEST_DATA"], "quant_bnb_llama")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

VARIANTS = {
    # The QLoRA recipe's storage: NF4 + double quantization, float32 checkpoint.
    "nf4_dq_f32": dict(quant_type="nf4", double_quant=True, dtype=torch.float32),
    # FP4 without double quantization, bfloat16 checkpoint (quant_state "dtype": "bfloat16").
    "fp4_plain_bf16": dict(quant_type="fp4", double_quant=False, dtype=torch.bfloat16),
}


def make(name, spec, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, attn_implementation="sdpa")
    model = spread_weights(LlamaForCausalLM(cfg).eval())
    dense = os.path.join(OUT, name + ".dense")
    model.to(spec["dtype"]).save_pretrained(dense)

    # transformers quantizes while loading and serializes the bnb state on save.
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec["quant_type"],
                                 bnb_4bit_use_double_quant=spec["double_quant"],
                                 bnb_4bit_compute_dtype=torch.float32)
    q = LlamaForCausalLM.from_pretrained(dense, quantization_config=bnb_cfg, device_map="cpu", dtype=spec["dtype"])
    path = os.path.join(OUT, name)
    q.save_pretrained(path)
    qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"], qc

    # The reference: a float32 model with the dense tensors of the 4-bit file (norms, embeddings, lm_head)
    # and every projection replaced by bnb's dequantization of the state it saved.
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    ref_model = LlamaForCausalLM(cfg).eval()
    state = {}
    for k, v in sd.items():
        if any(f".{p}.weight" in k for p in PROJ):
            continue
        state[k] = v.float()
    for i in range(cfg.num_hidden_layers):
        for p in PROJ:
            pre = f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}.weight"
            qs = QuantState.from_dict({k[len(pre) + 1:]: v for k, v in sd.items() if k.startswith(pre + ".")},
                                      device=torch.device("cpu"))
            qs.dtype = torch.float32
            state[pre] = F.dequantize_4bit(sd[pre], qs)
    missing, unexpected = ref_model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)

    b, t = 2, 19
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 5:] = 0  # right padding, as the trainer batches
    with torch.no_grad():
        logits = ref_model(input_ids=ids, attention_mask=mask).logits.float().contiguous()
        if spec["dtype"] == torch.float32:
            # Sanity check that the dequantized model is what transformers' 4-bit model means. bnb 0.50.2's
            # CPU Linear4bit forward (AVX512) repacks the weight, rounds the scales to bfloat16 and computes
            # in bfloat16 (u = 2^-8 = 3.9e-3), so it agrees only to bf16 accuracy: a few u per layer over
            # 2 layers, ~1e-2, bounded at 5e-2 (a wrong weight gives O(1)). (It also needs in % 64 == 0, hence the sizes.)
            q4 = q(input_ids=ids, attention_mask=mask).logits.float()
            err = ((q4 - logits)[mask.bool()].norm() / logits[mask.bool()].norm()).item()
            assert err < 5e-2, f"transformers 4-bit vs dequantized model: relative error {err}"
            print(f"{name}: transformers 4-bit (bf16 CPU path) vs dequantized float32: {err:.2e}", file=sys.stderr)
    ref = {"input_ids": ids, "attention_mask": mask, "logits_f32": logits}
    if name == "nf4_dq_f32":
        ref.update(peft_reference(ref_model, name, ids, mask, seed + 2))
    save_file(ref, os.path.join(OUT, name + ".ref.safetensors"))
    print(f"{name}: {sorted(os.listdir(path))}", file=sys.stderr)


def peft_reference(dequantized, name, ids, mask, seed):
    """PEFT LoRA on the dequantized base: logits, loss and every adapter gradient (see the docstring)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJ), lora_dropout=0.0, task_type="CAUSAL_LM")
    model = randomize_lora_b(get_peft_model(dequantized, cfg), seed + 1)
    model.save_pretrained(os.path.join(OUT, name + ".adapter"))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    model.train()  # dropout is 0
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref = {"labels": labels, "peft_logits": out.logits.detach().float().contiguous(),
           "peft_loss": out.loss.detach().float().reshape(())}
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            ref["grad." + our_name(n)] = p.grad.detach().float().contiguous()
    assert sum(k.startswith("grad.") for k in ref) == 2 * len(PROJ) * 2
    return ref


def main():
    os.makedirs(OUT, exist_ok=True)
    seed = int.from_bytes(os.urandom(4), "little")
    for i, (name, spec) in enumerate(VARIANTS.items()):
        make(name, spec, seed + 101 * i)
    with open(os.path.join(OUT, "variants.json"), "w") as f:
        json.dump(sorted(VARIANTS), f)


if __name__ == "__main__":
    sys.exit(main())
