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
  // as torch does). Increments steps(). `skip`: an optional float32 scalar, 1 = leave everything as it is
  // (non-finite gradients), 0 = update; on CUDA the kernel reads it (torch's found_inf), so queuing the
  // step never waits for the GPU.
  void step(double lr, const at::Tensor& skip = {});
  void zero_grad();
  // Updates applied so far (skipped ones not counted). On CUDA the count lives on the device: reading it
  // waits for the queued steps.
  int64_t steps() const;

  // Resume state: exp_avg / exp_avg_sq / master per parameter name, and the step count.
  NamedTensors state() const;
  void load_state(const NamedTensors& state, int64_t step);
  const NamedTensors& params() const { return params_; }

 private:
  bool fused_step(double lr, const at::Tensor& skip);  // the CUDA fused kernel; false when it does not apply

  NamedTensors params_;
  std::vector<at::Tensor> master_, exp_avg_, exp_avg_sq_;  // float32, shaped like params_
  AdamWOptions opts_;
  // The step count: on the host for the op-by-op path; for the fused kernel a float32 scalar on the device
  // (defined only then), which it reads and a skipped step leaves unchanged.
  int64_t step_ = 0;
  at::Tensor device_step_;
};

// The multiplier of the base lr at optimizer step `step` (0-based: the first update uses step 0), as
// transformers' schedules: linear warmup from 0 over `warmup` steps, then constant / linear decay to 0
// at `total` / half-cosine decay to 0 at `total`.
double lr_multiplier(Schedule s, int64_t step, int64_t warmup, int64_t total);

// warmup_steps if > 0, else ceil(warmup_ratio * total) (transformers' get_warmup_steps).
int64_t warmup_steps(const TrainConfig& t, int64_t total);

// Scales the gradients so their global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_,
// eps 1e-6); returns the norm before clipping as a float32 scalar on the gradients' device, as torch
// does (nothing waits for the GPU). max_norm <= 0: no clip, the norm only.
at::Tensor clip_grad_norm(const NamedTensors& params, double max_norm);

}  // namespace qlora::train
