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

#include <optional>

#include "trainer/quant/quant.h"

namespace qlora::model {

class Quant4Linear;

// The trainable low-rank branch of an adapted projection (LoRA), as the fused path (fused.h) reads it.
struct LowRank {
  at::Tensor a;          // float32 [r, in], trainable
  at::Tensor b;          // float32 [out, r], trainable
  double scaling = 1.0;  // the branch is added times this
  double dropout = 0.0;  // on the branch's input, in effect now (0 outside training)
};

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
  // What the fused path needs to compute this projection itself: its frozen 4-bit base (null if the base
  // is not 4-bit) and its low-rank branch (none if not adapted).
  virtual const Quant4Linear* frozen_4bit() const { return nullptr; }
  virtual std::optional<LowRank> low_rank() const { return std::nullopt; }
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
  at::ScalarType compute_dtype() const { return compute_dtype_; }
  const Quant4Linear* frozen_4bit() const override { return this; }

 private:
  quant::Quantized4bit q_;
  at::ScalarType compute_dtype_;
};

}  // namespace qlora::model
