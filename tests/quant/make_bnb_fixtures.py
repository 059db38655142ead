"""Writes bitsandbytes 0.50.2 (CPU backend) 4-bit quantizations of fresh random tensors for the C++ tests.

Output: $QLORA_TEST_DATA/quant_bnb/{manifest.json, data.bin}. manifest.json lists cases; every tensor is
{"offset", "nbytes", "dtype", "shape"} into data.bin (little-endian, C order). Each case holds the input,
bnb's packed state dict entries (QuantState.as_dict(packed=True)) under prefix "layer.", and bnb's
dequantization in the input dtype and in float32, twice:
  "dequant" / "dequant_f32": the public F.dequantize_4bit. On the CPU it runs bnb's AVX512 C++ kernel, which
      in 0.50.2 assumes blocks never straddle rows and returns wrong values when shape[-1] % blocksize != 0
      (e.g. [64, 32] at block size 64); "cpu_kernel_agrees" says whether it equals the next one.
  "dequant_ref" / "dequant_ref_f32": bnb's portable torch implementation (_dequantize_4bit_compute, the
      flat-index semantics of its CUDA kernel and of shared/INTEROP.md), on the same state.
"""
import json
import os
import sys

import torch
import bitsandbytes.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bnb_ref import generic_dequant  # noqa: E402

out_dir = os.path.join(os.environ["QLORA_TEST_DATA"], "quant_bnb")
os.makedirs(out_dir, exist_ok=True)
blob = bytearray()
DT = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.uint8: "uint8"}


def put(t):
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    entry = {"offset": len(blob), "nbytes": len(raw), "dtype": DT[t.dtype], "shape": list(t.shape)}
    blob.extend(raw)
    return entry


g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run


def randn(*shape):
    x = torch.randn(*shape, generator=g)
    # Heavy-ish tails so blocks have different scales, and a few large outliers.
    x = x * torch.exp(torch.randn(*shape, generator=g) * 0.5)
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
    flat[idx] *= 8
    return x * 0.02


inputs = []
inputs.append(("f32_64x96", randn(64, 96)))
a = randn(37, 53)
a.view(-1)[-20:] = 0  # all-zero partial last block at block size 32 (bnb stores its clamped absmax)
inputs.append(("f32_odd_37x53", a))
inputs.append(("bf16_129x31", randn(129, 31).to(torch.bfloat16)))
inputs.append(("f16_3x4097", randn(3, 4097).to(torch.float16)))
z = randn(300, 200)
z[10:13] = 0  # 600 zeros: whole blocks of 32..512 are all-zero
inputs.append(("f32_zero_rows_300x200", z))
inputs.append(("bf16_1d_5001", randn(5001).to(torch.bfloat16)))
inputs.append(("f32_1x1", randn(1, 1)))

cases = []
for name, x in inputs:
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            for bs in (32, 64, 128, 4096):
                packed, state = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=dq)
                entries = {"layer.weight": put(packed)}
                for k, v in state.as_dict(packed=True).items():
                    entries["layer.weight." + k] = put(v)
                deq = F.dequantize_4bit(packed, state)
                assert deq.dtype == x.dtype
                ref = generic_dequant(packed, state, x.dtype)
                state.dtype = torch.float32
                deq32 = F.dequantize_4bit(packed, state)
                ref32 = generic_dequant(packed, state, torch.float32)
                cases.append({
                    "name": f"{name}/{qt}/bs{bs}/{'dq' if dq else 'plain'}",
                    "quant_type": qt, "blocksize": bs, "double_quant": dq,
                    "input": put(x), "entries": entries,
                    "dequant": put(deq), "dequant_f32": put(deq32),
                    "dequant_ref": put(ref), "dequant_ref_f32": put(ref32),
                    "cpu_kernel_agrees": bool(torch.equal(deq, ref) and torch.equal(deq32, ref32)),
                })

manifest = {
    "bitsandbytes": __import__("bitsandbytes").__version__,
    "dynamic_map": put(F.create_dynamic_map()),
    "nf4_code": put(F.get_4bit_type("nf4", device="cpu")),
    "fp4_code": put(F.get_4bit_type("fp4", device="cpu")),
    "cases": cases,
}
with open(os.path.join(out_dir, "data.bin"), "wb") as f:
    f.write(blob)
with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f)
print(f"wrote {len(cases)} cases, {len(blob)} bytes to {out_dir}", file=sys.stderr)
