// causal_lm_loss: see loss.h.
#include "trainer/lora/loss.h"

#include <ATen/ATen.h>

#include "trainer/core/error.h"

namespace qlora::lora {

at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels, int64_t num_items) {
  TORCH_CHECK(logits.dim() == 3, "logits must be [B, T, V], got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "labels must be [B, T] = [", logits.size(0), ", ", logits.size(1), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
  const int64_t v = logits.size(2), t = logits.size(1);
  at::Tensor lg = logits.slice(1, 0, t - 1).to(at::kFloat).reshape({-1, v});            // [B (T-1), V]
  at::Tensor lb = labels.to(logits.device()).slice(1, 1, t).reshape({-1});              // [B (T-1)]
  // An out-of-range label would otherwise surface as an opaque kernel assertion.
  at::Tensor bad = (lb != kIgnoreIndex) & ((lb < 0) | (lb >= v));
  QLORA_REQUIRE(!bad.any().item<bool>(), "labels hold ids outside [0, {}) other than {}", v, kIgnoreIndex);
  if (num_items > 0) {
    return at::cross_entropy_loss(lg, lb, {}, at::Reduction::Sum, kIgnoreIndex) / static_cast<double>(num_items);
  }
  return at::cross_entropy_loss(lg, lb, {}, at::Reduction::Mean, kIgnoreIndex);
}

int64_t count_loss_tokens(const at::Tensor& labels) {
  TORCH_CHECK(labels.dim() == 2, "labels must be [B, T]");
  return (labels.slice(1, 1, labels.size(1)) != kIgnoreIndex).sum().item<int64_t>();
}

}  // namespace qlora::lora
