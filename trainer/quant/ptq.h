// Post-training quantization (PTQ) of one weight, and how much accuracy it loses.
//
// Four schemes, each mapping a float weight to a few bits and back:
//   int8-sym   symmetric: scale only, zero point 0. scale = max|w| / 127, q = clamp(round(w / scale), -127, 127),
//              w ~ q * scale. Zero is exact; the range is centred, so a one-sided weight wastes half the codes.
//   int8-asym  asymmetric (min-max calibration): the range [min(w, 0), max(w, 0)] is mapped onto 0..255.
//              scale = (max - min) / 255, zero_point = clamp(round(-min / scale), 0, 255) (an unsigned
//              uint8 zero point: torch's quint8 convention), q = clamp(round(w / scale) + zp, 0, 255),
//              w ~ (q - zp) * scale. Zero is still exact (q = zp), which is why the range always holds 0.
//   nf4 / fp4  bitsandbytes' 4-bit blockwise formats (trainer/quant/quant.h): one float32 absmax per block of
//              `block_size` flat elements, optionally double-quantized to uint8 + a float32 scale per 256 blocks.
// int8 is per tensor (one scale) or per output channel (one scale per row of [out, in]); 4-bit is per block.
//
// The int8 arithmetic is torch's, op for op, so torch is the reference (tests/ptq): the scale and zero point
// are torch.ao.quantization's MinMaxObserver / PerChannelMinMaxObserver (float32; symmetric with
// quant_min = -127, quant_max = 127, i.e. scale = max|w| / 127.0f; affine quint8: scale = (max_pos - min_neg)
// / 255.0f; both floored at float32 eps; zp = -round_half_even(min_neg / scale), clamped to [0, 255]), and q is
// torch.quantize_per_tensor / quantize_per_channel on the CPU (fbgemm): round_half_even(w * (1.0f / scale))
// + zp, clamped. Dequantization is (q - zp) * scale in float32 (one rounding).
//
// Error statistics are computed in float64 (both tensors widened first, so w - d is exact up to float64
// rounding, and every sum accumulates in float64): mse = sum (w - d)^2 / n,
// max_abs = max |w - d|, sqnr_db = 10 log10(sum w^2 / sum (w - d)^2) (+inf when the error is zero).
// Bits per parameter count every stored byte that belongs to this weight: codes, scales, zero points,
// nested scales and the nested offset (float32). The format's fixed tables (the 16-entry 4-bit codebook and
// the 256-entry dynamic map that bitsandbytes repeats per weight) are constants of the format, not of the
// weight, and are left out: nf4 block 64 is 4.5 bits, 4.127 with double quantization (shared/INTEROP.md).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

#include "trainer/quant/quant.h"

namespace qlora::quant::ptq {

enum class Scheme { Int8Sym, Int8Asym, NF4, FP4 };

// "int8-sym" | "int8-asym" | "nf4" | "fp4"; anything else throws qlora::Error naming the valid ones.
Scheme parse_scheme(const std::string& name);
const char* scheme_name(Scheme s);
inline bool is_int8(Scheme s) { return s == Scheme::Int8Sym || s == Scheme::Int8Asym; }

struct Options {
  Scheme scheme = Scheme::Int8Sym;
  bool per_channel = false;   // int8 only: one scale (and zero point) per output row
  bool double_quant = false;  // 4-bit only: quantize the block scales again (bnb compress_statistics)
  int64_t block_size = 64;    // 4-bit only: a power of two in [32, 4096]
};

// Throws qlora::Error for options that do not apply to the scheme or are out of range (block size).
void validate(const Options& o);

struct Int8Quantized {
  at::Tensor q;           // int8 [out, in] (symmetric) or uint8 [out, in] (asymmetric)
  at::Tensor scale;       // float32 [] per tensor, [out] per channel
  at::Tensor zero_point;  // uint8, same shape as scale (asymmetric only; undefined when symmetric)
  bool symmetric = true;
  bool per_channel = false;
};

// w: a float tensor [out, in] (any float dtype; computed in float32) on the CPU.
Int8Quantized quantize_int8(const at::Tensor& w, bool symmetric, bool per_channel);
// float32 [out, in].
at::Tensor dequantize_int8(const Int8Quantized& q);
// Bytes of q, scale and zero_point.
int64_t bytes(const Int8Quantized& q);

// Bytes of a 4-bit weight that count towards bits per parameter: packed codes, absmax, nested absmax and
// the nested offset (the codebook and the dynamic map are format constants; see above).
int64_t payload_bytes(const Quantized4bit& q);

struct ErrorStats {
  int64_t numel = 0;
  double mse = 0;
  double max_abs = 0;
  double sqnr_db = 0;         // +inf when w == deq exactly
  double bits_per_param = 0;
  int64_t bytes = 0;          // storage counted in bits_per_param
  double sum_sq_weight = 0;   // sum w^2 (float64)
  double sum_sq_error = 0;    // sum (w - deq)^2 (float64)
};

// Compares the original `w` with its dequantization `deq` (same shape; both widened to float64). `storage_bytes` gives bits_per_param.
ErrorStats error_stats(const at::Tensor& w, const at::Tensor& deq, int64_t storage_bytes);

// One weight through a scheme: quantize, dequantize to float32, measure. The quantized forms are kept so
// a caller can serialize them (exactly one of int8 / q4 is set).
struct Result {
  ErrorStats stats;
  at::Tensor dequantized;        // float32, shape of w
  std::optional<Int8Quantized> int8;
  std::optional<Quantized4bit> q4;
};
Result quantize_weight(const at::Tensor& w, const Options& o);

}  // namespace qlora::quant::ptq
