// The frozen 4-bit linear: a torch::autograd::Function whose only differentiable input is x.
//
// Forward dequantizes W [out, in] into x's dtype and computes y = x W^T; backward dequantizes W again
// for grad_x = grad_y W. Only the packed weight and its scales are saved (no full-precision copy
// lives between forward and backward), and W never receives a gradient: it is not an autograd input.
#include <torch/csrc/autograd/custom_function.h>

#include <fmt/ranges.h>

#include "trainer/core/error.h"
#include "trainer/quant/quant.h"

namespace qlora::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Quantized4bit <-> ctx->saved_data: the tensors are shared (no copies), the scalars are IValues.
void save(AutogradContext* ctx, const Quantized4bit& w) {
  auto& d = ctx->saved_data;
  d["packed"] = w.packed;
  d["absmax"] = w.absmax;
  d["code"] = w.code;
  if (w.double_quant()) {
    d["nested_absmax"] = w.nested_absmax;
    d["nested_code"] = w.nested_code;
  }
  d["offset"] = static_cast<double>(w.nested_offset);
  d["type"] = static_cast<int64_t>(w.type);
  d["blocksize"] = w.blocksize;
  d["shape"] = w.shape;
  d["dtype"] = static_cast<int64_t>(w.dtype);
}

Quantized4bit load(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  Quantized4bit w;
  w.packed = d["packed"].toTensor();
  w.absmax = d["absmax"].toTensor();
  w.code = d["code"].toTensor();
  if (d.count("nested_absmax")) {
    w.nested_absmax = d["nested_absmax"].toTensor();
    w.nested_code = d["nested_code"].toTensor();
  }
  w.nested_offset = static_cast<float>(d["offset"].toDouble());
  w.type = static_cast<QuantType>(d["type"].toInt());
  w.blocksize = d["blocksize"].toInt();
  w.shape = d["shape"].toIntVector();
  w.dtype = static_cast<at::ScalarType>(d["dtype"].toInt());
  return w;
}

struct Linear4bitFunction : public torch::autograd::Function<Linear4bitFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Quantized4bit& w) {
    save(ctx, w);
    return at::linear(x, dequantize_4bit(w, x.scalar_type()));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto w = load(ctx);
    const auto& g = grad_out[0];  // [..., out]
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) grad_x = at::matmul(g, dequantize_4bit(w, g.scalar_type()));
    return {grad_x, at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_4bit(const at::Tensor& x, const Quantized4bit& w) {
  QLORA_REQUIRE(x.defined(), "linear_4bit: undefined input");
  QLORA_REQUIRE(w.shape.size() == 2, "linear_4bit: weight must be 2-D [out, in], got shape [{}]",
                fmt::join(w.shape, ", "));
  QLORA_REQUIRE(x.dim() >= 1 && x.size(-1) == w.shape[1],
                "linear_4bit: input shape [{}] does not match weight [{}, {}]: the last dimension must be {}",
                fmt::join(x.sizes(), ", "), w.shape[0], w.shape[1], w.shape[1]);
  QLORA_REQUIRE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                "linear_4bit: input dtype {} is not supported: expected float32, bfloat16 or float16",
                c10::toString(x.scalar_type()));
  QLORA_REQUIRE(x.device() == w.device(), "linear_4bit: input is on {} but the weight is on {}", x.device().str(),
                w.device().str());
  return Linear4bitFunction::apply(x, w);
}

}  // namespace qlora::quant
