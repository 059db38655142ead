"""A tiny random Llama and the per-layer post-training quantization error that torch and bitsandbytes give it:
the reference for `qlora quantize` (tests/ptq/check_ptq_cli.py compares the CLI's --json with it).

Writes into $QLORA_TEST_DATA/ptq/:
  model/      save_pretrained of a float32 LlamaForCausalLM (transformers), weights drawn fresh every run
  ref.json    {"cases": {case: {"args": [CLI flags], "layers": {module: {"shape", "numel", "mse",
              "max_abs_error", "sqnr_db", "bits_per_param", "bytes"}}}}}

Reference arithmetic (nothing here shares code with the trainer):
  int8-sym   torch.ao.quantization MinMaxObserver / PerChannelMinMaxObserver(ch_axis=0), dtype qint8,
             per_tensor_symmetric / per_channel_symmetric, quant_min=-127, quant_max=127 -> scale = max|w|/127;
             then torch.quantize_per_tensor / quantize_per_channel(qint8) and .dequantize().
  int8-asym  the same observers with quint8, per_tensor_affine / per_channel_affine (quant range 0..255).
  nf4 / fp4  bitsandbytes.functional.quantize_4bit (CPU backend), dequantized with bnb's portable path
             (tests/quant/bnb_ref.py: its public CPU kernel is wrong when blocks straddle rows); where that
             kernel is right (in % blocksize == 0) F.dequantize_4bit must agree exactly.
  errors     float64: e = w.double() - deq.double(); mse = sum e^2 / n; max |e|; sqnr = 10 log10(sum w^2 / sum e^2).
  bits       8 * bytes / n, bytes = codes + scales (float32) + zero points (uint8) for int8; for 4-bit the bnb
             QuantState's own tensors: packed + absmax (+ nested absmax float32 + the float32 nested offset).
"""
import json
import math
import os
import sys

# bnb's portable dequantization is torch.compile'd; eager runs the same ops and skips minutes of compiling.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "quant"))
from bnb_ref import generic_dequant  # noqa: E402

OUT = os.path.join(os.environ["QLORA_TEST_DATA"], "ptq")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# case -> (scheme, per_channel, double_quant, block_size); every case also reports the embeddings.
CASES = {
    "int8_sym_tensor": ("int8-sym", False, False, None),
    "int8_sym_channel": ("int8-sym", True, False, None),
    "int8_asym_tensor": ("int8-asym", False, False, None),
    "int8_asym_channel": ("int8-asym", True, False, None),
    "nf4_b64": ("nf4", False, False, 64),
    "nf4_b64_dq": ("nf4", False, True, 64),
    "fp4_b64": ("fp4", False, False, 64),
    "fp4_b128_dq": ("fp4", False, True, 128),  # 128 does not divide in = 192: blocks straddle rows
    "nf4_b32_dq": ("nf4", False, True, 32),
}


def cli_args(scheme, per_channel, dq, bs):
    a = ["--scheme", scheme, "--embeddings"]
    if per_channel:
        a.append("--per-channel")
    if dq:
        a.append("--double-quant")
    if bs is not None:
        a += ["--block-size", str(bs)]
    return a


def int8_ref(w, symmetric, per_channel):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    if symmetric:
        kw = dict(dtype=torch.qint8, quant_min=-127, quant_max=127,
                  qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric)
    else:
        kw = dict(dtype=torch.quint8, qscheme=torch.per_channel_affine if per_channel else torch.per_tensor_affine)
    obs = PerChannelMinMaxObserver(ch_axis=0, **kw) if per_channel else MinMaxObserver(**kw)
    obs(w)
    scale, zp = obs.calculate_qparams()
    if per_channel:
        q = torch.quantize_per_channel(w, scale.double(), zp.long(), 0, kw["dtype"])
    else:
        q = torch.quantize_per_tensor(w, float(scale), int(zp), kw["dtype"])
    nbytes = w.numel() + scale.numel() * 4 + (0 if symmetric else zp.numel())
    return q.dequantize(), nbytes, dict(q=q.int_repr(), scale=scale.float(), zero_point=zp)


def q4_ref(w, quant_type, dq, bs):
    packed, state = F.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=dq)
    deq = generic_dequant(packed, state, torch.float32)
    if w.shape[-1] % bs == 0:
        state.dtype = torch.float32
        pub = F.dequantize_4bit(packed, state)
        assert torch.equal(pub + 0.0, deq + 0.0), "bnb's CPU kernel and its portable path disagree"
    nbytes = packed.numel() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        nbytes += state.state2.absmax.numel() * 4 + 4
    return deq, nbytes


def stats(w, deq, nbytes):
    wd = w.double()
    e = wd - deq.double()
    sw, se = (wd * wd).sum().item(), (e * e).sum().item()
    return {"shape": list(w.shape), "numel": w.numel(), "mse": se / w.numel(), "max_abs_error": e.abs().max().item(),
            "sqnr_db": 10 * math.log10(sw / se) if se > 0 else None, "bits_per_param": 8 * nbytes / w.numel(),
            "bytes": nbytes}


def make_model(path, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:
                p.uniform_(0.5, 1.5)
                continue
            # Rows of different magnitude (per-channel scales help), heavy-ish tails and a few outliers
            # (absmax scaling suffers), so the schemes differ visibly.
            p.normal_(0.0, 0.02)
            p.mul_(torch.exp(torch.randn(p.shape[0], 1) * 0.5))
            flat = p.view(-1)
            idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 1000),))
            flat[idx] *= 6
        # One-sided weight: symmetric int8 wastes its negative half here, asymmetric does not.
        model.model.layers[1].mlp.gate_proj.weight.abs_()
    model.save_pretrained(path)
    return model


def main():
    os.makedirs(OUT, exist_ok=True)
    model = make_model(os.path.join(OUT, "model"), int.from_bytes(os.urandom(4), "little"))
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    weights = ["model.embed_tokens"]
    for i in range(model.config.num_hidden_layers):
        weights += [f"model.layers.{i}.{'self_attn' if j < 4 else 'mlp'}.{p}" for j, p in enumerate(PROJ)]
    weights.append("lm_head")
    ref = {"cases": {}}
    for case, (scheme, per_channel, dq, bs) in CASES.items():
        layers = {}
        for m in weights:
            w = sd[m + ".weight"]
            if scheme.startswith("int8"):
                deq, nbytes, _ = int8_ref(w, scheme == "int8-sym", per_channel)
            else:
                deq, nbytes = q4_ref(w, scheme, dq, bs)
            layers[m] = stats(w, deq, nbytes)
        ref["cases"][case] = {"args": cli_args(scheme, per_channel, dq, bs), "layers": layers}
        tot_e = sum(l["mse"] * l["numel"] for l in layers.values())
        print(f"{case}: {len(layers)} weights, mean mse {tot_e / sum(l['numel'] for l in layers.values()):.3e}",
              file=sys.stderr)
    with open(os.path.join(OUT, "ref.json"), "w") as f:
        json.dump(ref, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
