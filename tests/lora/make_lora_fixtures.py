"""Reference data for the LoRA stage, computed by transformers + PEFT (nobody here wrote them).

Writes under $QLORA_TEST_DATA/lora/:
  base/             a tiny random LlamaForCausalLM (GQA 6 heads / 2 kv heads, 2 layers, float32, untied)
  adapter/          PEFT LoRA adapter: r 4, alpha 8, all seven projections, PEFT's default init for A,
                    then B drawn at random (B = 0 would make every lora_A gradient zero: a weak test)
  adapter_rslora/   the same shape of adapter with use_rslora (scaling alpha / sqrt(r) = 4, not 2)
  ref.safetensors
      input_ids [B, T] int64, attention_mask [B, T] int64 (row 1 right-padded),
      labels [B, T] int64 (-100 on the first 3 "prompt" positions and on padding),
      loss [] float32             transformers' causal-LM loss with `adapter`
      logits [B, T, V] float32    with `adapter`, eval mode
      logits_rslora [B, T, V]     with `adapter_rslora`
      grad.<our name> float32     d loss / d lora_A, lora_B for every projection, named as our
                                  parameters ("model.layers.0.self_attn.q_proj.lora_A.weight")
      kaiming_a [4, 48] float32   nn.init.kaiming_uniform_(a=sqrt(5)) drawn from a generator seeded
                                  with 1234 (what PEFT does to lora_A), to check our init bit for bit
  counts.json       PEFT's get_nb_trainable_parameters() for the model with `adapter` (trainable, all)
                    and the line print_trainable_parameters() prints
"""
import contextlib
import io
import json
import math
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fixture_util import our_name, randomize_lora_b, spread_weights

OUT = os.path.join(os.environ["QLORA_TEST_DATA"], "lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_path, name, seed, **kw):
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM", **kw)
    model = randomize_lora_b(get_peft_model(base, cfg), seed + 100)
    path = os.path.join(OUT, name)
    model.save_pretrained(path)
    return path


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = spread_weights(LlamaForCausalLM(cfg))
    base_path = os.path.join(OUT, "base")
    model.save_pretrained(base_path)

    adapter = make_adapter(base_path, "adapter", 1)
    adapter_rs = make_adapter(base_path, "adapter_rslora", 2, use_rslora=True)

    b, t = 2, 17
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 5:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100

    ref = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    base = LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    peft_model.train()  # dropout is 0: train mode only enables autograd bookkeeping
    trainable, total = peft_model.get_nb_trainable_parameters()
    line = io.StringIO()
    with contextlib.redirect_stdout(line):
        peft_model.print_trainable_parameters()
    with open(os.path.join(OUT, "counts.json"), "w") as f:
        json.dump({"trainable": trainable, "all": total, "printed": line.getvalue().strip()}, f, indent=1)
    out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref["loss"] = out.loss.detach().float().reshape(())
    ref["logits"] = out.logits.detach().float().contiguous()
    n_grads = 0
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            ref["grad." + our_name(n)] = p.grad.detach().float().contiguous()
            n_grads += 1
    assert n_grads == 2 * 7 * cfg.num_hidden_layers, n_grads

    base = LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    rs = PeftModel.from_pretrained(base, adapter_rs).eval()
    assert abs(rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] - 8 / math.sqrt(4)) < 1e-12
    with torch.no_grad():
        ref["logits_rslora"] = rs(input_ids=ids, attention_mask=mask).logits.float().contiguous()

    w = torch.empty(4, 48)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=torch.Generator().manual_seed(1234))
    ref["kaiming_a"] = w

    save_file(ref, os.path.join(OUT, "ref.safetensors"))
    print("loss", float(out.loss.detach()), "grads", n_grads)


if __name__ == "__main__":
    main()
