#include "trainer/train/optim.h"

#include <cmath>

#include "trainer/core/error.h"

namespace qlora::train {

AdamW::AdamW(NamedTensors params, AdamWOptions opts) : params_(std::move(params)), opts_(opts) {
  at::NoGradGuard no_grad;
  for (auto& [name, p] : params_) {
    master_.push_back(p.scalar_type() == at::kFloat ? at::Tensor() : p.detach().to(at::kFloat));
    exp_avg_.push_back(at::zeros_like(p, p.options().dtype(at::kFloat)));
    exp_avg_sq_.push_back(at::zeros_like(p, p.options().dtype(at::kFloat)));
  }
  // The fused kernel (fused_step) serves CUDA float32 parameters, i.e. LoRA adapters.
  bool fused = !params_.empty();
  for (size_t i = 0; i < params_.size(); ++i) fused = fused && params_[i].second.is_cuda() && !master_[i].defined();
  if (fused) device_step_ = at::zeros({}, params_[0].second.options().dtype(at::kFloat));
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

// On CUDA, when every parameter is float32 (LoRA adapters are), the whole update is torch's fused AdamW
// kernel (torch.optim.AdamW(fused=True)): one launch instead of about ten per tensor, which for the 448
// adapter tensors of a 7B model took 45 ms a step. It computes the same update in a different operation
// order, so it agrees with the single-tensor path to rounding, not to the bit; the CPU keeps the
// op-for-op path that the parity tests compare with torch bit for bit.
bool AdamW::fused_step(double lr, const at::Tensor& skip) {
  if (!device_step_.defined()) return false;
  std::vector<at::Tensor> ps, gs, m, v;
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    ps.push_back(p), gs.push_back(p.grad()), m.push_back(exp_avg_[i]), v.push_back(exp_avg_sq_[i]);
  }
  if (ps.empty()) return true;
  // The kernel reads one step count per parameter (after the increment, as torch's fused path); they are
  // all this optimizer's count, which a skipped step leaves as it was.
  if (skip.defined()) device_step_.add_(1).sub_(skip);
  else device_step_.add_(1);
  std::vector<at::Tensor> steps(ps.size(), device_step_);
  at::_fused_adamw_(ps, gs, m, v, /*max_exp_avg_sqs=*/{}, steps, lr, opts_.beta1, opts_.beta2, opts_.weight_decay,
                    opts_.eps, /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt,
                    skip.defined() ? std::optional<at::Tensor>(skip) : std::nullopt);
  // The kernel writes the parameters without moving their version counters (torch 2.11), which is how
  // readers of derived copies see a change (the fused path's adapter casts, trainer/model/fused.cpp).
  for (auto& p : ps) p.unsafeGetTensorImpl()->bump_version();
  return true;
}

int64_t AdamW::steps() const {
  return device_step_.defined() ? static_cast<int64_t>(device_step_.item<double>()) : step_;
}

void AdamW::step(double lr, const at::Tensor& skip) {
  at::NoGradGuard no_grad;
  if (fused_step(lr, skip)) return;
  if (skip.defined() && skip.item<double>() != 0.0) return;
  ++step_;
  // torch.optim.adamw._single_tensor_adamw, step by step (same ops, same order, same rounding).
  const double bias_correction1 = 1 - std::pow(opts_.beta1, static_cast<double>(step_));
  const double bias_correction2 = 1 - std::pow(opts_.beta2, static_cast<double>(step_));
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::sqrt(bias_correction2);
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    at::Tensor w = master_[i].defined() ? master_[i] : p;
    at::Tensor g = p.grad().to(at::kFloat);
    w.mul_(1 - lr * opts_.weight_decay);
    exp_avg_[i].lerp_(g, 1 - opts_.beta1);
    exp_avg_sq_[i].mul_(opts_.beta2).addcmul_(g, g, 1 - opts_.beta2);
    at::Tensor denom = (exp_avg_sq_[i].sqrt() / bias_correction2_sqrt).add_(opts_.eps);
    w.addcdiv_(exp_avg_[i], denom, -step_size);
    if (master_[i].defined()) p.copy_(w);
  }
}

NamedTensors AdamW::state() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& n = params_[i].first;
    out.emplace_back(n + ".exp_avg", exp_avg_[i]);
    out.emplace_back(n + ".exp_avg_sq", exp_avg_sq_[i]);
    if (master_[i].defined()) out.emplace_back(n + ".master", master_[i]);
  }
  return out;
}

void AdamW::load_state(const NamedTensors& state, int64_t step) {
  at::NoGradGuard no_grad;
  auto find = [&](const std::string& key) -> const at::Tensor& {
    for (auto& [k, v] : state)
      if (k == key) return v;
    fail("optimizer state lacks '{}'", key);
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& n = params_[i].first;
    auto load = [&](at::Tensor& dst, const std::string& key) {
      const at::Tensor& src = find(key);
      QLORA_REQUIRE(src.sizes() == dst.sizes(), "optimizer state '{}' has shape {}, expected {}", key,
                    fmt::format("{}", fmt::join(src.sizes(), ", ")), fmt::format("{}", fmt::join(dst.sizes(), ", ")));
      dst.copy_(src);
    };
    load(exp_avg_[i], n + ".exp_avg");
    load(exp_avg_sq_[i], n + ".exp_avg_sq");
    if (master_[i].defined()) {
      load(master_[i], n + ".master");
      params_[i].second.copy_(master_[i]);
    }
  }
  step_ = step;
  if (device_step_.defined()) device_step_.fill_(static_cast<double>(step));
}

double lr_multiplier(Schedule s, int64_t step, int64_t warmup, int64_t total) {
  if (step < warmup) return static_cast<double>(step) / std::max<int64_t>(1, warmup);
  switch (s) {
    case Schedule::Constant:
      return 1.0;
    case Schedule::Linear:
      return std::max(0.0, static_cast<double>(total - step) / std::max<int64_t>(1, total - warmup));
    case Schedule::Cosine: {
      double progress = static_cast<double>(step - warmup) / std::max<int64_t>(1, total - warmup);
      return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * 0.5 * 2.0 * progress)));
    }
  }
  return 1.0;
}

int64_t warmup_steps(const TrainConfig& t, int64_t total) {
  if (t.warmup_steps > 0) return t.warmup_steps;
  return static_cast<int64_t>(std::ceil(total * t.warmup_ratio));
}

namespace {

// The per-tensor norms as one [n] tensor. _foreach_norm writes them into one buffer and returns its
// elements: then that buffer is viewed as is, which spares stack's n unsqueezes (about 1 ms of CPU time
// for the 448 adapters of a 7B model); anything else is stacked.
at::Tensor as_vector(const std::vector<at::Tensor>& norms) {
  const at::Tensor& first = norms[0];
  bool one_buffer = first.dim() == 0;
  for (size_t i = 1; i < norms.size() && one_buffer; ++i) {
    one_buffer = norms[i].dim() == 0 && norms[i].scalar_type() == first.scalar_type() &&
                 norms[i].storage().is_alias_of(first.storage()) &&
                 norms[i].storage_offset() == first.storage_offset() + static_cast<int64_t>(i);
  }
  if (one_buffer) return first.as_strided({static_cast<int64_t>(norms.size())}, {1});
  return at::stack(norms);
}

}  // namespace

at::Tensor clip_grad_norm(const NamedTensors& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (auto& [n, p] : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return at::zeros({}, at::kFloat);
  bool all_cuda_f32 = true;
  for (auto& g : grads) all_cuda_f32 = all_cuda_f32 && g.is_cuda() && g.scalar_type() == at::kFloat;
  if (all_cuda_f32) {
    // What torch itself runs on CUDA (foreach norms, one foreach multiply): a few launches, not 900.
    at::Tensor total = at::linalg_vector_norm(as_vector(at::_foreach_norm(grads, 2)), 2);
    if (max_norm > 0) at::_foreach_mul_(grads, at::clamp((total + 1e-6).reciprocal() * max_norm, c10::nullopt, 1.0));
    return total;
  }
  std::vector<at::Tensor> norms;
  for (auto& g : grads) norms.push_back(at::linalg_vector_norm(g, 2).to(at::kFloat));
  at::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
  if (max_norm > 0) {
    // torch writes max_norm / (total + 1e-6), which Python evaluates as Tensor.__rtruediv__, i.e.
    // reciprocal(total + 1e-6) * max_norm: one ulp away from a true division for most max_norm != 1.
    at::Tensor coef = at::clamp((total + 1e-6).reciprocal() * max_norm, c10::nullopt, 1.0);
    for (auto& [n, p] : params)
      if (p.grad().defined()) p.mutable_grad().mul_(coef.to(p.grad().scalar_type()));
  }
  return total;
}

}  // namespace qlora::train
