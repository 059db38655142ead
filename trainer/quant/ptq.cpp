// Post-training quantization: int8 symmetric / asymmetric (per tensor or per channel) and the 4-bit formats,
// with error statistics. See ptq.h for the exact arithmetic (torch's, op for op, for int8).
#include "trainer/quant/ptq.h"

#include <cmath>
#include <limits>
#include <tuple>

#include "kernels/format_4bit.h"
#include "trainer/core/error.h"

namespace qlora::quant::ptq {

Scheme parse_scheme(const std::string& name) {
  if (name == "int8-sym") return Scheme::Int8Sym;
  if (name == "int8-asym") return Scheme::Int8Asym;
  if (name == "nf4") return Scheme::NF4;
  if (name == "fp4") return Scheme::FP4;
  std::string near = nearest(name, {"int8-sym", "int8-asym", "nf4", "fp4"});
  fail("unknown quantization scheme '{}': expected one of int8-sym, int8-asym, nf4, fp4{}", name,
       near.empty() ? "" : fmt::format(" (did you mean '{}'?)", near));
}

const char* scheme_name(Scheme s) {
  switch (s) {
    case Scheme::Int8Sym: return "int8-sym";
    case Scheme::Int8Asym: return "int8-asym";
    case Scheme::NF4: return "nf4";
    case Scheme::FP4: return "fp4";
  }
  return "?";
}

void validate(const Options& o) {
  if (is_int8(o.scheme)) {
    QLORA_REQUIRE(!o.double_quant, "--double-quant applies to the 4-bit schemes (nf4, fp4), not {}",
                  scheme_name(o.scheme));
  } else {
    QLORA_REQUIRE(!o.per_channel, "--per-channel applies to the int8 schemes; {} is always per block of "
                  "--block-size elements", scheme_name(o.scheme));
    QLORA_REQUIRE(fmt4::valid_blocksize(o.block_size),
                  "unsupported block size {}: expected a power of two in [32, 4096] (bitsandbytes' sizes; default 64)",
                  o.block_size);
  }
}

Int8Quantized quantize_int8(const at::Tensor& w, bool symmetric, bool per_channel) {
  TORCH_CHECK(w.dim() == 2 && w.numel() > 0, "quantize_int8: expected a non-empty [out, in] weight, got ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()) && w.device().is_cpu(), "quantize_int8: expected a float CPU tensor");
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  at::Tensor mn, mx;
  if (per_channel) {
    std::tie(mn, mx) = at::aminmax(wf, /*dim=*/1);  // [out]
  } else {
    std::tie(mn, mx) = at::aminmax(wf);  // []
  }
  // The range always includes 0 so that 0 is exact (MinMaxObserver's min_val_neg / max_val_pos).
  const at::Tensor min_neg = at::clamp_max(mn, 0.0), max_pos = at::clamp_min(mx, 0.0);
  const double eps = std::numeric_limits<float>::epsilon();
  Int8Quantized r;
  r.symmetric = symmetric;
  r.per_channel = per_channel;
  // Broadcast a per-channel [out] parameter along `in`.
  auto col = [&](const at::Tensor& t) { return per_channel ? t.unsqueeze(1) : t; };
  if (symmetric) {
    // quant range [-127, 127]: (127 - (-127)) / 2 = 127 steps on each side of zero.
    r.scale = at::clamp_min(at::maximum(-min_neg, max_pos) / 127.0, eps);
    const at::Tensor inv = at::reciprocal(r.scale);  // float32 1.0f / scale, as fbgemm
    r.q = at::clamp(at::round(wf * col(inv)), -127, 127).to(at::kChar);
  } else {
    r.scale = at::clamp_min((max_pos - min_neg) / 255.0, eps);
    // zp = quant_min - round(min_neg / scale), quant_min = 0; round is half to even (torch.round).
    const at::Tensor zp = at::clamp(-at::round(min_neg / r.scale), 0, 255);
    r.zero_point = zp.to(at::kByte);
    const at::Tensor inv = at::reciprocal(r.scale);
    r.q = at::clamp(at::round(wf * col(inv)) + col(zp), 0, 255).to(at::kByte);
  }
  r.scale = r.scale.contiguous();
  return r;
}

at::Tensor dequantize_int8(const Int8Quantized& q) {
  auto col = [&](const at::Tensor& t) { return q.per_channel ? t.unsqueeze(1) : t; };
  at::Tensor v = q.q.to(at::kFloat);  // exact: |q| <= 255
  if (!q.symmetric) v = v - col(q.zero_point.to(at::kFloat));  // exact integer difference
  return v * col(q.scale);  // one float32 rounding
}

int64_t bytes(const Int8Quantized& q) {
  int64_t b = q.q.nbytes() + q.scale.nbytes();
  if (q.zero_point.defined()) b += q.zero_point.nbytes();
  return b;
}

int64_t payload_bytes(const Quantized4bit& q) {
  int64_t b = q.packed.nbytes() + q.absmax.nbytes();
  if (q.double_quant()) b += q.nested_absmax.nbytes() + static_cast<int64_t>(sizeof(float));  // + offset
  return b;
}

ErrorStats error_stats(const at::Tensor& w, const at::Tensor& deq, int64_t storage_bytes) {
  TORCH_CHECK(w.sizes() == deq.sizes(), "error_stats: shapes differ: ", w.sizes(), " vs ", deq.sizes());
  const at::Tensor wd = w.to(at::kDouble), e = wd - deq.to(at::kDouble);
  ErrorStats s;
  s.numel = w.numel();
  s.sum_sq_weight = (wd * wd).sum().item<double>();
  s.sum_sq_error = (e * e).sum().item<double>();
  s.mse = s.numel ? s.sum_sq_error / static_cast<double>(s.numel) : 0.0;
  s.max_abs = s.numel ? e.abs().max().item<double>() : 0.0;
  s.sqnr_db = s.sum_sq_error > 0 ? 10.0 * std::log10(s.sum_sq_weight / s.sum_sq_error)
                                 : std::numeric_limits<double>::infinity();
  s.bytes = storage_bytes;
  s.bits_per_param = s.numel ? 8.0 * static_cast<double>(storage_bytes) / static_cast<double>(s.numel) : 0.0;
  return s;
}

Result quantize_weight(const at::Tensor& w, const Options& o) {
  validate(o);
  Result r;
  if (is_int8(o.scheme)) {
    r.int8 = quantize_int8(w, o.scheme == Scheme::Int8Sym, o.per_channel);
    r.dequantized = dequantize_int8(*r.int8);
    r.stats = error_stats(w, r.dequantized, bytes(*r.int8));
  } else {
    // Quantized in the weight's own dtype, as bitsandbytes does with the checkpoint's torch_dtype.
    const QuantType t = o.scheme == Scheme::NF4 ? QuantType::NF4 : QuantType::FP4;
    r.q4 = quantize_4bit(w.contiguous(), t, o.block_size, o.double_quant);
    r.dequantized = dequantize_4bit(*r.q4, at::kFloat);
    r.stats = error_stats(w, r.dequantized, payload_bytes(*r.q4));
  }
  return r;
}

}  // namespace qlora::quant::ptq
