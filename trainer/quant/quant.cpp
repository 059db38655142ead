// quantize_4bit / dequantize_4bit: argument checks with user-facing messages, double quantization,
// and dispatch to the CPU reference or the CUDA kernels by the input's device.
#include "trainer/quant/quant.h"

#include <fmt/ranges.h>

#include <cmath>

#include "trainer/core/error.h"
#include "trainer/quant/ops.h"

namespace qlora::quant {

const char* quant_type_name(QuantType type) { return type == QuantType::NF4 ? "nf4" : "fp4"; }

namespace {

fmt4::Code code_of(QuantType t) { return t == QuantType::NF4 ? fmt4::Code::NF4 : fmt4::Code::FP4; }

void require_device(const at::Tensor& t, const char* what) {
  const auto d = t.device();
  QLORA_REQUIRE(d.is_cpu() || d.is_cuda(), "{}: tensor is on device '{}', expected CPU or CUDA", what, d.str());
#ifndef QLORA_WITH_CUDA
  QLORA_REQUIRE(!d.is_cuda(), "{}: tensor is on {}, but this build has no CUDA kernels (configure with "
                "QLORA_WITH_CUDA=ON on a machine with nvcc)", what, d.str());
#endif
}

bool is_float_dtype(at::ScalarType s) { return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf; }

// The 65536-bin table of the dynamic map, built once.
const at::Tensor& nested_lut() {
  static const at::Tensor lut = build_nested_lut(dynamic_map());
  return lut;
}

}  // namespace

int64_t Quantized4bit::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

int64_t Quantized4bit::blocks() const { return (numel() + blocksize - 1) / blocksize; }

at::Tensor codebook(QuantType type) {
  auto t = at::empty({fmt4::kCodes}, at::kFloat);
  for (int i = 0; i < fmt4::kCodes; ++i) t.data_ptr<float>()[i] = fmt4::code_value(code_of(type), i);
  return t;
}

at::Tensor dynamic_map() {
  // bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), op for op:
  // float32 linspace, float32 means, float32 times a double scale, then sorted. Regenerating it with the
  // same ATen kernels reproduces every bit.
  static const at::Tensor map = [] {
    std::vector<at::Tensor> parts;
    const int max_exp = 7, non_sign = 7;
    for (int i = 0; i < max_exp; ++i) {
      const int64_t items = (int64_t{1} << (i + non_sign - max_exp)) + 1;
      auto b = at::linspace(0.1, 1.0, items, at::TensorOptions().dtype(at::kFloat));
      auto means = (b.slice(0, 0, items - 1) + b.slice(0, 1, items)) / 2.0;
      const double scale = std::pow(10.0, -(max_exp - 1) + i);
      parts.push_back(means * scale);
      parts.push_back(means * -scale);
    }
    parts.push_back(at::zeros({1}, at::kFloat));
    parts.push_back(at::ones({1}, at::kFloat));
    auto all = at::cat(parts);
    TORCH_CHECK(all.numel() == fmt4::kDynamicCodes, "dynamic map has ", all.numel(), " entries");
    return std::get<0>(all.sort()).contiguous();
  }();
  return map;
}

void validate(const Quantized4bit& q, const std::string& what) {
  QLORA_REQUIRE(fmt4::valid_blocksize(q.blocksize), "{}: unsupported block size {}: expected a power of two in [32, 4096]",
                what, q.blocksize);
  QLORA_REQUIRE(!q.shape.empty(), "{}: empty shape", what);
  for (int64_t s : q.shape) QLORA_REQUIRE(s > 0, "{}: shape has a non-positive dimension {}", what, s);
  QLORA_REQUIRE(is_float_dtype(q.dtype), "{}: original dtype {} is not float32, bfloat16 or float16", what,
                c10::toString(q.dtype));
  const int64_t n = q.numel(), blocks = q.blocks();
  auto check = [&](const at::Tensor& t, const char* name, at::ScalarType dt, int64_t numel) {
    QLORA_REQUIRE(t.defined(), "{}: {} is missing", what, name);
    QLORA_REQUIRE(t.scalar_type() == dt, "{}: {} has dtype {}, expected {}", what, name, c10::toString(t.scalar_type()),
                  c10::toString(dt));
    QLORA_REQUIRE(t.numel() == numel, "{}: {} has {} elements, expected {} for shape {} and block size {}", what, name,
                  t.numel(), numel, fmt::format("{}", fmt::join(q.shape, "x")), q.blocksize);
    QLORA_REQUIRE(t.is_contiguous(), "{}: {} is not contiguous", what, name);
    QLORA_REQUIRE(t.device() == q.packed.device(), "{}: {} is on {}, the packed weight on {}", what, name,
                  t.device().str(), q.packed.device().str());
  };
  check(q.packed, "packed weight", at::kByte, (n + 1) / 2);
  check(q.code, "quant_map", at::kFloat, fmt4::kCodes);
  if (q.double_quant()) {
    check(q.absmax, "absmax", at::kByte, blocks);
    check(q.nested_absmax, "nested_absmax", at::kFloat, (blocks + fmt4::kNestedBlock - 1) / fmt4::kNestedBlock);
    check(q.nested_code, "nested_quant_map", at::kFloat, fmt4::kDynamicCodes);
  } else {
    check(q.absmax, "absmax", at::kFloat, blocks);
  }
}

Quantized4bit quantize_4bit(const at::Tensor& w, QuantType type, int64_t blocksize, bool double_quant) {
  QLORA_REQUIRE(w.defined(), "quantize_4bit: undefined weight tensor");
  QLORA_REQUIRE(fmt4::valid_blocksize(blocksize),
                "quantize_4bit: unsupported block size {}: expected a power of two in [32, 4096] (default 64)", blocksize);
  QLORA_REQUIRE(is_float_dtype(w.scalar_type()), "quantize_4bit: weight dtype {} is not supported: expected float32, "
                "bfloat16 or float16", c10::toString(w.scalar_type()));
  require_device(w, "quantize_4bit");
  QLORA_REQUIRE(w.is_contiguous(), "quantize_4bit: weight of shape [{}] is not contiguous (call .contiguous() first)",
                fmt::join(w.sizes(), ", "));
  QLORA_REQUIRE(w.numel() > 0, "quantize_4bit: weight of shape [{}] is empty", fmt::join(w.sizes(), ", "));

  Quantized4bit q;
  q.type = type;
  q.blocksize = blocksize;
  q.shape = w.sizes().vec();
  q.dtype = w.scalar_type();
  const auto flat = w.reshape({-1});
  std::pair<at::Tensor, at::Tensor> pa;
  if (w.is_cuda()) {
#ifdef QLORA_WITH_CUDA
    pa = kernels::quantize_4bit_cuda(flat, code_of(type), blocksize);
#endif
  } else {
    pa = quantize_4bit_cpu(flat, code_of(type), blocksize);
  }
  q.packed = pa.first.view({-1, 1});
  q.absmax = pa.second;
  q.code = codebook(type).to(w.device());
  if (double_quant) {
    // bnb: offset = absmax.mean() in float32. The mean is taken on the CPU on every device so that the
    // CUDA path's offset (and so every nested code) is bit-identical to the reference's.
    q.nested_offset = q.absmax.to(at::kCPU).mean().item<float>();
    std::pair<at::Tensor, at::Tensor> qn;
    if (w.is_cuda()) {
#ifdef QLORA_WITH_CUDA
      qn = kernels::quantize_nested_cuda(q.absmax, q.nested_offset, nested_lut().to(w.device()));
#endif
    } else {
      qn = quantize_nested_cpu(q.absmax, q.nested_offset, nested_lut());
    }
    q.absmax = qn.first;
    q.nested_absmax = qn.second;
    q.nested_code = dynamic_map().to(w.device());
  }
  return q;
}

namespace {
at::Tensor dequantize_impl(const Quantized4bit& q, at::ScalarType out, const at::Tensor& into) {
  QLORA_REQUIRE(is_float_dtype(out), "dequantize_4bit: output dtype {} is not supported: expected float32, bfloat16 or "
                "float16", c10::toString(out));
  QLORA_REQUIRE(q.packed.defined(), "dequantize_4bit: empty quantized weight");
  require_device(q.packed, "dequantize_4bit");
  validate(q, "dequantize_4bit");
  const auto flat = q.packed.view({-1});
  at::Tensor y;
  if (q.packed.is_cuda()) {
#ifdef QLORA_WITH_CUDA
    y = kernels::dequantize_4bit_cuda(flat, q.absmax, q.nested_absmax, q.nested_code, q.nested_offset, code_of(q.type),
                                      q.blocksize, q.numel(), out, into);
#endif
  } else {
    y = dequantize_4bit_cpu(flat, q.absmax, q.nested_absmax, q.nested_code, q.nested_offset, code_of(q.type),
                            q.blocksize, q.numel(), out, into);
  }
  return y;
}
}  // namespace

at::Tensor dequantize_4bit(const Quantized4bit& q, at::ScalarType out) {
  return dequantize_impl(q, out, {}).view(q.shape);
}

void dequantize_4bit_into(const Quantized4bit& q, const at::Tensor& into) {
  QLORA_REQUIRE(into.defined() && into.numel() == q.numel() && into.device() == q.device(),
                "dequantize_4bit_into: target must be a tensor of {} elements on {}", q.numel(), q.device().str());
  if (into.is_contiguous()) {
    dequantize_impl(q, into.scalar_type(), into.view({-1}));
    return;
  }
  QLORA_REQUIRE(into.dim() == 2 && into.stride(1) == 1 && into.stride(0) >= into.size(1),
                "dequantize_4bit_into: a non-contiguous target must be 2-D rows of contiguous elements, got sizes {}",
                c10::str(into.sizes()));
#ifdef QLORA_WITH_CUDA
  if (into.is_cuda() && kernels::pitched_ok(into)) {
    dequantize_impl(q, into.scalar_type(), into);
    return;
  }
#endif
  at::NoGradGuard no_grad;
  into.copy_(dequantize_impl(q, into.scalar_type(), {}).view(into.sizes()));
}

at::Tensor absmax_float(const Quantized4bit& q) {
  if (!q.double_quant()) return q.absmax;
  // Two float32 roundings, as bnb: dequantize_blockwise (code * scale) then + offset.
  auto scale = q.nested_absmax.repeat_interleave(fmt4::kNestedBlock).slice(0, 0, q.absmax.numel());
  return q.nested_code.index_select(0, q.absmax.to(at::kLong)).mul(scale).add(q.nested_offset);
}

int64_t bytes(const Quantized4bit& q) {
  int64_t b = 0;
  for (const auto* t : {&q.packed, &q.absmax, &q.nested_absmax, &q.nested_code, &q.code})
    if (t->defined()) b += t->nbytes();
  return b;
}

Quantized4bit to_device(const Quantized4bit& q, at::Device device) {
  Quantized4bit r = q;
  for (auto* t : {&r.packed, &r.absmax, &r.nested_absmax, &r.nested_code, &r.code})
    if (t->defined()) *t = t->to(device);
  return r;
}

}  // namespace qlora::quant
