// The causal language-model loss of Hugging Face transformers (ForCausalLMLoss), in float32.
//
// Position t predicts labels[t + 1]: the logits of the last position and the label of the first are
// unused. Labels equal to -100 (padding, prompt tokens) are ignored. Lives here until the training
// stage takes it over.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace qlora::lora {

inline constexpr int64_t kIgnoreIndex = -100;

// logits [B, T, V] (any float dtype; upcast to float32 as transformers does), labels [B, T] int64 in
// [0, V) or -100. Returns a float32 scalar: the sum of token cross-entropies over the non-ignored
// shifted labels divided by `num_items` when > 0 (transformers' num_items_in_batch, for gradient
// accumulation over micro-batches), else by their count (the mean; NaN when every label is ignored,
// exactly like transformers).
at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels, int64_t num_items = 0);

// The number of labels causal_lm_loss counts: non-ignored labels at positions 1..T-1.
int64_t count_loss_tokens(const at::Tensor& labels);

}  // namespace qlora::lora
