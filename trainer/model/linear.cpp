#include "trainer/model/linear.h"

namespace qlora::model {

DenseLinear::DenseLinear(at::Tensor weight, bool trainable) {
  TORCH_CHECK(weight.dim() == 2, "DenseLinear weight must be [out, in]");
  weight_ = register_parameter("weight", std::move(weight), trainable);
}

at::Tensor DenseLinear::forward(const at::Tensor& x) { return at::linear(x, weight_); }

Quant4Linear::Quant4Linear(quant::Quantized4bit q, at::ScalarType compute_dtype)
    : q_(std::move(q)), compute_dtype_(compute_dtype) {
  TORCH_CHECK(q_.shape.size() == 2, "Quant4Linear weight must be [out, in]");
}

at::Tensor Quant4Linear::forward(const at::Tensor& x) { return quant::linear_4bit(x.to(compute_dtype_), q_); }

at::Tensor Quant4Linear::effective_weight(at::ScalarType dtype) const { return quant::dequantize_4bit(q_, dtype); }

}  // namespace qlora::model
