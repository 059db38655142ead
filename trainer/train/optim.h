// AdamW with decoupled weight decay over float32 master copies, the learning-rate schedules, and
// global-norm gradient clipping, each computing exactly what torch.optim.AdamW (single-tensor path),
// transformers' get_{constant,linear,cosine}_schedule_with_warmup and torch.nn.utils.clip_grad_norm_
// compute, so a run here and a run of the Python stack agree step for step.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "trainer/config/config.h"

namespace qlora::train {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct AdamWOptions {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
};

class AdamW {
 public:
  // params: the trainable parameters (any dtype, any device). A parameter that is not float32 gets a
  // float32 master copy that the update runs on; the parameter receives the rounded result.
  AdamW(NamedTensors params, AdamWOptions opts);

  // One update with learning rate `lr` using each parameter's .grad() (undefined grads are skipped,
  // as torch does). Increments step().
  void step(double lr);
  void zero_grad();
  int64_t steps() const { return step_; }

  // Resume state: exp_avg / exp_avg_sq / master per parameter name, and the step count.
  NamedTensors state() const;
  void load_state(const NamedTensors& state, int64_t step);
  const NamedTensors& params() const { return params_; }

 private:
  bool fused_step(double lr);  // the CUDA fused kernel; false when a parameter does not qualify

  NamedTensors params_;
  std::vector<at::Tensor> master_, exp_avg_, exp_avg_sq_;  // float32, shaped like params_
  AdamWOptions opts_;
  int64_t step_ = 0;
};

// The multiplier of the base lr at optimizer step `step` (0-based: the first update uses step 0), as
// transformers' schedules: linear warmup from 0 over `warmup` steps, then constant / linear decay to 0
// at `total` / half-cosine decay to 0 at `total`.
double lr_multiplier(Schedule s, int64_t step, int64_t warmup, int64_t total);

// warmup_steps if > 0, else ceil(warmup_ratio * total) (transformers' get_warmup_steps).
int64_t warmup_steps(const TrainConfig& t, int64_t total);

// Scales the gradients so their global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_,
// eps 1e-6); returns the norm before clipping (float32, as torch computes it). max_norm <= 0: no clip.
double clip_grad_norm(const NamedTensors& params, double max_norm);

}  // namespace qlora::train
