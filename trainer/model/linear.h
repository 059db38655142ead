// The projections of a Llama layer: y = x W^T, no bias.
//
// Linear is the slot every projection sits in. The model stage provides two bases:
//   DenseLinear  - W in the compute dtype, frozen (method lora) or trainable (method full);
//   Quant4Linear - W frozen in 4-bit NF4/FP4 (method qlora), dequantized on the fly by our kernels.
// The LoRA stage wraps any of them (LoRA is a wrapper around a base linear; QLoRA is LoRA whose base
// is the 4-bit linear) and puts the wrapper into the same slot with set_projection().
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "trainer/quant/quant.h"

namespace qlora::model {

class Linear : public torch::nn::Module {
 public:
  // x [..., in] -> [..., out]
  virtual at::Tensor forward(const at::Tensor& x) = 0;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  // The effective weight [out, in] in `dtype` on the module's device (dequantized if 4-bit); what a
  // merged export writes.
  virtual at::Tensor effective_weight(at::ScalarType dtype) const = 0;
  // Bytes the base weight occupies on its device.
  virtual int64_t weight_bytes() const = 0;
};

class DenseLinear : public Linear {
 public:
  // weight [out, in]; registered as parameter "weight" with requires_grad = trainable.
  DenseLinear(at::Tensor weight, bool trainable);
  at::Tensor forward(const at::Tensor& x) override;
  int64_t in_features() const override { return weight_.size(1); }
  int64_t out_features() const override { return weight_.size(0); }
  at::Tensor effective_weight(at::ScalarType dtype) const override { return weight_.detach().to(dtype); }
  int64_t weight_bytes() const override { return weight_.numel() * weight_.element_size(); }
  const at::Tensor& weight() const { return weight_; }

 private:
  at::Tensor weight_;  // [out, in]
};

class Quant4Linear : public Linear {
 public:
  // q: the frozen 4-bit weight (on the target device); x is computed in `compute_dtype`.
  Quant4Linear(quant::Quantized4bit q, at::ScalarType compute_dtype);
  at::Tensor forward(const at::Tensor& x) override;
  int64_t in_features() const override { return q_.shape[1]; }
  int64_t out_features() const override { return q_.shape[0]; }
  at::Tensor effective_weight(at::ScalarType dtype) const override;
  int64_t weight_bytes() const override { return quant::bytes(q_); }
  const quant::Quantized4bit& quantized() const { return q_; }

 private:
  quant::Quantized4bit q_;
  at::ScalarType compute_dtype_;
};

}  // namespace qlora::model
