// The training loop: micro-batches with gradient accumulation, a token-level causal-LM loss, global-norm
// clipping, AdamW on float32 masters, the lr schedule, periodic evaluation, and skipping of non-finite
// steps. It knows nothing about files: progress, metrics and checkpoints go out through Hooks, which the
// CLI supplies; everything a checkpoint must hold to resume exactly is in TrainerState + the AdamW state
// + the trainable weights, all reachable from here.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <nlohmann/json.hpp>

#include <functional>
#include <optional>

#include "datasets/batcher.h"
#include "trainer/config/config.h"
#include "trainer/dist/dist.h"
#include "trainer/model/llama.h"
#include "trainer/train/optim.h"

namespace qlora::train {

// The end of a training step, queued without waiting for the GPU: clips the gradients to max_grad_norm
// (<= 0: no clip), steps `opt` at `lr` unless the loss or the gradient norm is not finite (the update is
// then skipped on the device), clears the gradients. loss_sum: the step's summed loss, or undefined when no
// token carried a label. Returns [loss_sum, norm] as float32 on the gradients' device, for the host to read
// once the step is queued.
at::Tensor queue_update(AdamW& opt, const NamedTensors& params, double max_grad_norm, double lr,
                        const at::Tensor& loss_sum);

// Sum over the label tokens of -log p(label), logits computed from `hidden` [B, T, H] only at positions
// whose shifted label carries loss (labels [B, T], -100 = none; logits[:, t] predicts labels[:, t + 1]),
// in float32. Returns {sum (0-dim float32, differentiable in hidden and lm_head), count}. The logits are
// formed chunk_rows rows at a time (0 = loss_chunk_rows(V)) and never all at once; their gradient is
// computed in the same pass, so the float32 [N, V] logits are never stored.
std::pair<at::Tensor, int64_t> causal_lm_loss_sum(model::LlamaForCausalLMImpl& model, const at::Tensor& hidden,
                                                  const at::Tensor& labels, int64_t chunk_rows = 0);
// The same in two halves. LossTargets are the labelled positions of a [B, T] batch, flattened over its
// shifted [B (T-1)] positions: their indices and labels on `device`, and their count. loss_targets finds them
// where the labels are (the CPU for the trainer's batches: no wait for the GPU); the second half only reads
// them on the device, so a CUDA graph can capture it with targets of a fixed count refilled between replays
// (`qlora bench --cuda-graph`).
struct LossTargets {
  at::Tensor positions;  // int64 [count], into the [B (T-1)] shifted positions
  at::Tensor labels;     // int64 [count]
  int64_t count = 0;
};
LossTargets loss_targets(const at::Tensor& labels, at::Device device);
at::Tensor causal_lm_loss_sum(model::LlamaForCausalLMImpl& model, const at::Tensor& hidden, const LossTargets& targets,
                              int64_t chunk_rows = 0);
// Rows per loss chunk for a vocabulary of `vocab`: about 256 MiB of float32 logits.
int64_t loss_chunk_rows(int64_t vocab);

// Mean token loss of a batch (no gradient), e.g. for evaluation: {sum, count}.
std::pair<double, int64_t> batch_loss(model::LlamaForCausalLMImpl& model, const data::Batch& batch);

// A tensor's values on the host without waiting for the device: on an accelerator the copy is queued on the
// current stream into pinned memory and an event marks its landing, and get() waits for that event only,
// not for the work queued after it; on the CPU, the tensor itself.
class HostCopy {
 public:
  HostCopy() = default;
  explicit HostCopy(const at::Tensor& t);
  const at::Tensor& get();

 private:
  at::Tensor host_;
  std::optional<c10::Event> landed_;
};

struct TrainerState {
  int64_t step = 0;                  // optimizer steps completed
  int64_t total_steps = 0;
  int64_t consecutive_nonfinite = 0;
  int64_t skipped_steps = 0;
  double tokens_seen = 0;
  data::Batcher::State cursor;
};

struct Hooks {
  std::function<void(const nlohmann::json&)> on_metrics;  // {"step", "loss", "lr", ...} per log / eval
  std::function<void(int64_t step)> on_checkpoint;         // every checkpoint.every steps and at the end
  std::function<void(const std::string&)> on_message;      // human-readable progress / warnings
};

class Trainer {
 public:
  // `trainable` are the parameters the optimizer updates (LoRA adapters, or every weight for method full).
  // With a `group` of several ranks (trainer/dist/dist.h) every rank runs this loop over the same data order:
  // a step takes grad_accum x world micro-batches, rank r trains on micro-batches r, r + world, ..., and the
  // ranks' gradient and loss sums are added before the update (dist::GradSync, from the step's last backward),
  // so every rank takes the step one process with grad_accum x world micro-batches would take (up to the order
  // of the float sums). Evaluation splits the eval batches likewise. Each step's generators are then seeded
  // from (train.seed, step, rank): every rank draws its own LoRA dropout masks, and a resumed run draws what
  // the uninterrupted one did.
  Trainer(const Config& cfg, model::LlamaForCausalLM model, NamedTensors trainable, const data::Dataset& train,
          const data::Dataset* eval, int32_t pad_value, dist::Group* group = nullptr);

  // Trains until total_steps. Throws qlora::Error after max_nonfinite_steps non-finite losses in a row.
  void run(const Hooks& hooks);
  // Mean loss over the eval set (or `data`), without gradients.
  double evaluate(const data::Dataset& data);

  // One optimizer step over grad_accum micro-batches; returns the mean token loss (NaN if skipped: a
  // non-finite loss or gradient norm). It waits for the GPU once, at its end. (run() does not wait there:
  // it queues the next step before it reads this one's loss.)
  double train_step();
  // The gradient norm of the last step, before clipping.
  double last_grad_norm() const { return last_grad_norm_; }

  // Resume state.
  const TrainerState& state() const { return state_; }
  void restore(const TrainerState& s, const NamedTensors& optimizer_state);
  AdamW& optimizer() { return opt_; }
  const NamedTensors& trainable() const { return trainable_; }
  model::LlamaForCausalLM& model() { return model_; }
  double current_lr() const;
  // The data-parallel ranks (1 without a group).
  int64_t world() const { return group_ ? group_->world() : 1; }

 private:
  // A step queued on the device whose loss and gradient norm the host has not read yet: train_step's two
  // halves. run() reads step N's values while it queues step N + 1 (queue_step's `meanwhile`, called once
  // the step's backward passes are queued), so the GPU does not idle while the CPU starts a step
  // (docs/performance.md item 23: within the spread at 2048 tokens on the 7B shape, +1% at 512-1024).
  struct QueuedStep {
    HostCopy status;                   // [loss sum, gradient norm] float32, copied after the step
    int64_t count = 0;                 // the step's label tokens
    int64_t step = 0;                  // its number (1-based: state_.step once it is queued)
    double lr = 0;                     // its learning rate
    double tokens_seen = 0;            // state_.tokens_seen once it is queued
    int64_t epoch = 0;                 // the data cursor's epoch once it is queued
  };
  QueuedStep queue_step(const std::function<void()>& meanwhile = {});
  // Waits for q's values, counts a skipped step; returns what train_step returns.
  double finish_step(QueuedStep& q);

  const Config& cfg_;
  model::LlamaForCausalLM model_;
  NamedTensors trainable_;
  const data::Dataset& train_;
  const data::Dataset* eval_;
  int32_t pad_value_;
  dist::Group* group_;
  std::unique_ptr<dist::GradSync> sync_;  // with a group: the gradients summed over the ranks
  data::Batcher batcher_;
  AdamW opt_;
  TrainerState state_;
  int64_t warmup_ = 0;
  double last_grad_norm_ = 0;
};

// Steps for the whole run: max_steps if > 0, else epochs x ceil(batches per epoch / (grad_accum x world)).
int64_t total_steps(const TrainConfig& t, int64_t batches_per_epoch, int64_t world = 1);

}  // namespace qlora::train
