"""bitsandbytes' portable (torch) 4-bit dequantization, shared by the fixture and readback scripts.

bnb 0.50.2's public F.dequantize_4bit runs an AVX512 C++ kernel on the CPU that assumes quantization blocks
never straddle rows, so it returns wrong values when shape[-1] % blocksize != 0. This portable path is the
flat-index semantics of bnb's CUDA kernel and of shared/INTEROP.md section 1; it is our reference.
"""
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code


def generic_dequant(packed, state, dtype):
    """Dequantizes `packed` with QuantState `state` to `dtype`, nested scales decoded as F.dequantize_4bit does."""
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        absmax = absmax.float()
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, dtype)
