"""Tiny random Llama checkpoints written by transformers, and the logits transformers computes for them.

Each variant exercises a different part of the config surface (see VARIANTS). For each one this writes
  $QLORA_TEST_DATA/llama/<name>/            the checkpoint (save_pretrained; sharded where asked)
  $QLORA_TEST_DATA/llama/<name>.ref.safetensors
      input_ids [B, T] int64, attention_mask [B, T] int64 (row 1 right-padded),
      logits_f32 [B, T, V] float32 (CPU, float32 weights),
      logits_bf16 [B, T, V] float32 (CUDA, bfloat16; only where a GPU exists)
The C++ test loads the checkpoint with our loader and compares logits at the unpadded positions.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fixture_util import spread_weights

OUT = os.path.join(os.environ["QLORA_TEST_DATA"], "llama")

VARIANTS = {
    # hidden 48 (not a power of two), GQA 6 heads / 2 kv heads, untied, theta 5000, linear rope,
    # float32, sharded into several files.
    "gqa_linear_f32": dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                           num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                           rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                           tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="float32", shard="40KB"),
    # tied embeddings, bfloat16 file, dynamic NTK rope exercised past max_position_embeddings (16 < T).
    "tied_dynamic_bf16": dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                              num_key_value_heads=1, vocab_size=256, max_position_embeddings=16,
                              rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 20000.0},
                              tie_word_embeddings=True, rms_norm_eps=1e-6, dtype="bfloat16", shard="30KB"),
    # Llama 3 style rope scaling, multi-head (kv heads = heads), default eps, one file.
    "mha_llama3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=320, max_position_embeddings=128,
                       rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                        "rope_theta": 500000.0},
                       tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="float32", shard=None),
}


def make(name, spec, seed):
    spec = dict(spec)
    dtype = getattr(torch, spec.pop("dtype"))
    shard = spec.pop("shard")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**spec, attn_implementation="sdpa")
    model = spread_weights(LlamaForCausalLM(cfg).eval())
    path = os.path.join(OUT, name)
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "100MB")
    files = sorted(os.listdir(path))
    if shard:
        assert "model.safetensors.index.json" in files, files
    b, t = 2, 21
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 6:] = 0  # right padding, as the trainer batches
    ref = {"input_ids": ids, "attention_mask": mask}
    m32 = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref["logits_f32"] = m32(input_ids=ids, attention_mask=mask).logits.float().contiguous()
    if torch.cuda.is_available():
        mbf = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():
            ref["logits_bf16"] = mbf(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu().contiguous()
    save_file(ref, os.path.join(OUT, name + ".ref.safetensors"))
    print(f"{name}: {files}")


def main():
    os.makedirs(OUT, exist_ok=True)
    for i, (name, spec) in enumerate(VARIANTS.items()):
        make(name, spec, 1234 + 17 * i)
    with open(os.path.join(OUT, "variants.json"), "w") as f:
        json.dump(sorted(VARIANTS), f)


if __name__ == "__main__":
    sys.exit(main())
