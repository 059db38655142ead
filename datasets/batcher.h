// Batcher: a seeded per-epoch shuffle over a Dataset's rows, cut into micro-batches, with a cursor that
// can be saved and restored (resume mid-epoch gives exactly the batches an uninterrupted run would).
//
// Epoch e visits rows in seeded_permutation(n, seed + e) order (or 0..n-1 without shuffle). Micro-batches
// take the next micro_batch_size rows; an epoch's last batch may be smaller (never mixes two epochs).
// Rows are right-padded to the longest row in the batch.
//
// Batch tensors (CPU; the train loop moves them):
//   labels follow the Hugging Face convention: aligned with input_ids, the loss shifts them
//   (logits[:, t] predicts labels[:, t + 1]). Padding is marked by position, never by token id.
//   position_ids restart at 0 at every packed example (segment), so a model can build the block-diagonal
//   causal mask from them: a new example starts wherever position_ids == 0. Padding positions continue
//   counting from the last segment (they are masked anyway).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "datasets/dataset.h"

namespace qlora::data {

struct Batch {
  at::Tensor input_ids;       // int64 [B, T]; pad positions hold pad_value (any id: they are masked)
  at::Tensor labels;          // int64 [B, T]; kIgnore (-100) where no loss: prompt, padding, row starts
  at::Tensor attention_mask;  // bool [B, T]; false on padding (by position)
  at::Tensor position_ids;    // int64 [B, T]; 0-based within each packed example
  int64_t tokens = 0;         // label positions that carry loss (labels != -100)
};

// Pads and stacks rows into a Batch. pad_value fills input_ids on padding.
Batch collate(const std::vector<const Example*>& rows, int32_t pad_value);
// The rows end to end as one row [1, their total length], no padding: each row (and each example packed in
// it) a segment whose positions restart at 0, the label at each row's start ignored (the row before may not
// predict it). The same loss as collate's batch; on the GPU the model attends by segments (llama.h).
Batch collate_flat(const std::vector<const Example*>& rows);

struct BatcherOptions {
  int64_t micro_batch_size = 4;
  bool shuffle = true;
  int64_t seed = 42;
  int32_t pad_value = 0;  // tokenizer's pad id, or its EOS when it has none
  bool padding_free = false;  // collate_flat instead of collate
};

class Batcher {
 public:
  // Where the next batch starts: `position` rows into epoch `epoch`'s order.
  struct State {
    int64_t epoch = 0;
    int64_t position = 0;
    bool operator==(const State&) const = default;
  };

  // `data` must outlive the Batcher.
  Batcher(const Dataset& data, BatcherOptions opts);

  // The next micro-batch; moves to the next epoch after an epoch's last batch.
  Batch next();
  int64_t batches_per_epoch() const;
  State state() const { return state_; }
  // Throws qlora::Error if the state does not fit this dataset (e.g. a checkpoint of other data).
  void restore(State s);
  // The row order of `epoch`.
  std::vector<int64_t> order(int64_t epoch) const;

 private:
  const Dataset* data_;
  BatcherOptions opts_;
  State state_;
  int64_t order_epoch_ = -1;
  std::vector<int64_t> order_;  // cached order(order_epoch_)
};

}  // namespace qlora::data
