"""bitsandbytes reads back the 4-bit state dicts our to_bnb_state wrote (test_quant,
BnbState.WritesStateDictsForBitsandbytesReadback -> $QLORA_TEST_DATA/quant_ours/).

For every file: QuantState.from_dict on the "layer.weight.*" entries, then bnb's dequantization must equal
ours bit for bit (float32 and the original dtype). bnb's portable torch path is the reference (its CPU
C++ kernel is wrong when blocks straddle rows; see make_bnb_fixtures.py); the public F.dequantize_4bit
must also agree wherever that kernel agrees with the portable path. Exits non-zero on any mismatch.
"""
import json
import os
import sys

import torch
import bitsandbytes.functional as F
from bitsandbytes.functional import QuantState
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bnb_ref import generic_dequant  # noqa: E402

DIR = os.path.join(os.environ["QLORA_TEST_DATA"], "quant_ours")


def main():
    listing = os.path.join(DIR, "cases.json")
    if not os.path.exists(listing):
        print(f"{listing} is missing: run test_quant first (it writes our state dicts)", file=sys.stderr)
        return 1
    failures = 0
    names = json.load(open(listing))
    for name in names:
        t = load_file(os.path.join(DIR, name))
        qs_entries = {k[len("layer.weight."):]: v for k, v in t.items() if k.startswith("layer.weight.")}
        state = QuantState.from_dict(qs_entries, device=torch.device("cpu"))
        packed = t["layer.weight"]
        x = t["input"]
        assert state.dtype == x.dtype and tuple(state.shape) == tuple(x.shape), (name, state.dtype, state.shape)
        for dtype, ours in ((x.dtype, t["ours_dtype"]), (torch.float32, t["ours_f32"])):
            ref = generic_dequant(packed, state, dtype)
            state.dtype = dtype
            pub = F.dequantize_4bit(packed, state)
            ok_ref = torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))
            kernel_agrees = torch.equal(pub, ref)
            # FP4 code 8 is +0.0 in bnb's quant_map and portable path but -0.0 in its C++ kernels: for the
            # public kernel compare with -0 mapped to +0 (x + 0.0), bit-exact otherwise.
            z = (lambda t: t + 0.0) if state.quant_type == "fp4" else (lambda t: t)
            ok_pub = torch.equal(z(ours).view(torch.uint8), z(pub).view(torch.uint8)) if kernel_agrees else True
            print(f"{name} {state.quant_type} bs{state.blocksize} {'dq' if state.nested else 'plain'} "
                  f"{tuple(x.shape)} -> {dtype}: portable {'ok' if ok_ref else 'MISMATCH'}, "
                  f"F.dequantize_4bit {'ok' if ok_pub else 'MISMATCH'}"
                  f"{'' if kernel_agrees else ' (bnb CPU kernel disagrees with its portable path; skipped)'}")
            failures += (not ok_ref) + (not ok_pub)
        state.dtype = x.dtype
        # And bnb quantizing the same input gives our packed state where blocks are not all zero (none are).
        p2, s2 = F.quantize_4bit(x, blocksize=state.blocksize, quant_type=state.quant_type,
                                 compress_statistics=state.nested)
        if not torch.equal(p2, packed):
            print(f"{name}: bnb's quantization of the input differs from ours", file=sys.stderr)
            failures += 1
    print(f"{len(names)} files, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
