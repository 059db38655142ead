// LoRA adapters around the projections of a Llama model, with PEFT's semantics (shared/INTEROP.md 2).
//
// LoraLinear wraps any base model::Linear (DenseLinear for method lora, Quant4Linear for qlora) and
// computes  y = base(x) + lora_B(lora_A(dropout(x))) * scaling,  dropout on the LoRA branch only and
// only in training mode. scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
//
// Module layout, chosen so that named_parameters() are PEFT's names minus the "base_model.model."
// prefix and minus the adapter name ("default"); peft.h holds the one mapping to PEFT's file keys:
//   <slot>.base_layer.weight   the frozen base (no parameter at all for a 4-bit base)
//   <slot>.lora_A.weight       float32 [r, in]
//   <slot>.lora_B.weight       float32 [out, r]
// e.g. "model.layers.0.self_attn.q_proj.lora_A.weight".
//
// Precision: A and B are float32 master parameters (adapters are tiny: 2 r (in + out) floats per
// projection), so the optimizer updates them in full precision. The branch is computed in the dtype of
// the base's output (the compute dtype): A and B are cast in forward, and autograd casts their
// gradients back to float32. This is what PEFT under autocast (HF Trainer with bf16) computes.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "trainer/config/config.h"
#include "trainer/model/linear.h"
#include "trainer/model/llama.h"

namespace qlora::lora {

// The hyper-parameters of one adapted projection.
struct LoraOptions {
  int64_t r = 8;
  double alpha = 8.0;
  double dropout = 0.0;  // probability in [0, 1) on the branch input, training mode only
  bool rslora = false;   // scaling alpha / sqrt(r) instead of alpha / r

  double scaling() const;
  static LoraOptions from(const LoraConfig& cfg);
};

// PEFT's default initialisation (init_lora_weights=True) for a projection [out, in], drawn on the CPU
// from `gen` so that a seed gives the same adapter on every device:
//   A = kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), float32 [r, in]; B = 0, float32 [out, r].
std::pair<at::Tensor, at::Tensor> peft_init(int64_t r, int64_t in, int64_t out, at::Generator& gen);

class LoraLinear : public model::Linear {
 public:
  // lora_a float32 [r, in], lora_b float32 [out, r], on the device the base computes on; both become
  // trainable parameters.
  LoraLinear(std::shared_ptr<model::Linear> base, const LoraOptions& opts, at::Tensor lora_a, at::Tensor lora_b);

  at::Tensor forward(const at::Tensor& x) override;  // x [..., in] -> [..., out]
  int64_t in_features() const override { return base_->in_features(); }
  int64_t out_features() const override { return base_->out_features(); }
  // base + (B @ A) * scaling, [out, in]: summed in float32, then cast once to `dtype`.
  at::Tensor effective_weight(at::ScalarType dtype) const override;
  // The base's bytes only (the interface's meaning); adapter_bytes() gives the adapter's.
  int64_t weight_bytes() const override { return base_->weight_bytes(); }
  int64_t adapter_bytes() const { return (a_.numel() + b_.numel()) * a_.element_size(); }
  const model::Quant4Linear* frozen_4bit() const override { return base_->frozen_4bit(); }
  std::optional<model::LowRank> low_rank() const override {
    return model::LowRank{a_, b_, scaling_, is_training() ? opts_.dropout : 0.0};
  }

  const std::shared_ptr<model::Linear>& base() const { return base_; }
  const LoraOptions& options() const { return opts_; }
  int64_t r() const { return opts_.r; }
  double scaling() const { return scaling_; }
  const at::Tensor& lora_a() const { return a_; }  // float32 [r, in]
  const at::Tensor& lora_b() const { return b_; }  // float32 [out, r]

 private:
  std::shared_ptr<model::Linear> base_;
  LoraOptions opts_;
  double scaling_;
  at::Tensor a_;  // float32 [r, in]
  at::Tensor b_;  // float32 [out, r]
};

// True when the projection named `name` ("model.layers.3.mlp.down_proj") is selected by PEFT-style
// target_modules: an entry equal to the name or to its last dotted components ("down_proj",
// "mlp.down_proj").
bool targets(const std::vector<std::string>& target_modules, const std::string& name);

// Wraps every projection selected by cfg.target_modules in a LoraLinear with PEFT's initialisation
// (seeded; projections in model order), freezes every other parameter (requires_grad false) and returns
// the LoRA parameters (A, B per wrapped projection, in model order). Errors: r < 1, alpha <= 0, dropout
// outside [0, 1), a target that names no projection, a projection that already has an adapter.
std::vector<at::Tensor> apply_lora(model::LlamaForCausalLMImpl& model, const LoraConfig& cfg, uint64_t seed);

// The LoRA parameters by name ("model.layers.0.self_attn.q_proj.lora_A.weight"), in model order.
std::vector<std::pair<std::string, at::Tensor>> lora_named_parameters(model::LlamaForCausalLMImpl& model);

// The wrapped projections: (slot name, adapter), in model order.
std::vector<std::pair<std::string, std::shared_ptr<LoraLinear>>> lora_modules(model::LlamaForCausalLMImpl& model);

struct TrainableSummary {
  int64_t trainable = 0;  // elements of parameters with requires_grad
  int64_t total = 0;      // logical elements of every weight (see trainable_summary)
  double percent = 0.0;   // 100 * trainable / total
};

// Counts like PEFT's print_trainable_parameters: every distinct parameter once (tied weights once), and
// a frozen 4-bit weight, which is not a parameter, as its logical out * in elements rather than its
// packed bytes or scales (PEFT counts a Params4bit as numel * 2 for the same reason).
TrainableSummary trainable_summary(torch::nn::Module& model);
// "trainable params: 1,024 || all params: 65,536 || trainable%: 1.5625" (PEFT's wording).
std::string format_summary(const TrainableSummary& s);

// Replaces every LoraLinear by a frozen DenseLinear holding its merged weight in the model's compute
// dtype (for the merged export). Returns how many were merged. A 4-bit base is dequantized, so the
// merged weight is exactly base + delta (merging back into 4 bits would re-quantize and lose accuracy).
int64_t merge_lora(model::LlamaForCausalLMImpl& model);

}  // namespace qlora::lora
