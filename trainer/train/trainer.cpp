#include "trainer/train/trainer.h"

#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <functional>
#include <optional>

#include "trainer/core/error.h"
#include "trainer/model/fused.h"

#ifdef QLORA_WITH_CUDA
#include "kernels/ops.h"
#endif

namespace qlora::train {

namespace {

// Sum of token cross-entropies of logits = hs W^T, computed chunk by chunk so that at most `chunk` rows of
// float32 logits [chunk, V] exist at a time (the full [N, V] float32 logits and their gradient are the
// largest tensors of a step at long sequences or large vocabularies). The gradients are computed in the
// same pass and kept as [N, H] (and [V, H] when the head is trained), then scaled by the incoming
// gradient in backward, so nothing of size V is saved. Same math as cross_entropy(logits.float()):
//   d/dlogits = softmax(logits) - onehot(target), cast to the compute dtype as autograd's cast would.
// On the GPU one kernel (kernels/cross_entropy.cu) does the composite below on the compute-dtype logits,
// overwriting them with that gradient, so no float32 copy exists there; the composite is the CPU path.
struct ChunkedLmLoss : public torch::autograd::Function<ChunkedLmLoss> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& hs, const at::Tensor& w,
                            const at::Tensor& targets, int64_t chunk) {
    const int64_t n = hs.size(0);
    const bool need_h = hs.requires_grad(), need_w = w.requires_grad();
    at::Tensor grad_h = need_h ? at::empty_like(hs) : at::Tensor();
    at::Tensor grad_w = need_w ? at::zeros(w.sizes(), w.options().dtype(at::kFloat)) : at::Tensor();
    at::Tensor total = at::zeros({}, hs.options().dtype(at::kFloat));
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t e = std::min(n, s + chunk);
      at::Tensor h = hs.slice(0, s, e);                                   // [c, H]
      at::Tensor gl;                                                      // [c, V] d/dlogits, compute dtype
#ifdef QLORA_WITH_CUDA
      if (h.is_cuda()) {
        gl = at::matmul(h, w.t());                                        // logits, then their gradient
        total.add_(kernels::cross_entropy_fwd_bwd_cuda(gl, targets.slice(0, s, e)).sum());
      }
#endif
      if (!gl.defined()) {
        at::Tensor t = targets.slice(0, s, e).unsqueeze(1);               // [c, 1]
        at::Tensor logits = at::matmul(h, w.t()).to(at::kFloat);          // [c, V]
        at::Tensor lse = at::logsumexp(logits, 1, /*keepdim=*/true);      // [c, 1]
        total.add_((lse - logits.gather(1, t)).sum());
        if (!need_h && !need_w) continue;
        at::Tensor g = logits.sub_(lse).exp_();                           // softmax, in place of the logits
        g.scatter_add_(1, t, at::full_like(t, -1, g.options()));          // - onehot
        gl = g.to(hs.scalar_type());
      }
      if (need_h) grad_h.slice(0, s, e).copy_(at::matmul(gl, w));
      if (need_w) grad_w.add_(at::matmul(gl.t(), h).to(at::kFloat));
    }
    ctx->save_for_backward({grad_h, grad_w});
    ctx->saved_data["w_dtype"] = w.scalar_type();
    return total;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g = grad[0];  // scalar
    at::Tensor gh = saved[0].defined() ? saved[0] * g.to(saved[0].scalar_type()) : at::Tensor();
    at::Tensor gw;
    if (saved[1].defined()) gw = (saved[1] * g).to(ctx->saved_data["w_dtype"].toScalarType());
    return {gh, gw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

int64_t loss_chunk_rows(int64_t vocab) {
  // About 256 MiB of float32 logits per chunk: large enough that the GEMMs stay efficient.
  return std::max<int64_t>(64, (int64_t{64} << 20) / std::max<int64_t>(1, vocab));
}

LossTargets loss_targets(const at::Tensor& labels, at::Device device) {
  // Shift: hidden at t predicts labels at t + 1. Only positions with a label get logits at all, so the
  // logits cover the answer tokens, not the whole (mostly prompt) batch. The labelled positions are
  // found where the labels are: for the trainer's batches on the CPU, so the GPU is not waited for.
  const at::Tensor target = labels.slice(1, 1).reshape(-1);  // [B (T-1)]
  const at::Tensor idx = target.ne(-100).nonzero().squeeze(1);
  return {model::to_device(idx, device), model::to_device(target.index_select(0, idx), device), idx.numel()};
}

at::Tensor causal_lm_loss_sum(model::LlamaForCausalLMImpl& model, const at::Tensor& hidden, const LossTargets& targets,
                              int64_t chunk_rows) {
  const int64_t n = targets.count;
  if (n == 0) return hidden.sum() * 0.0;
  const at::Tensor& ts = targets.labels;                                // [N]
  at::Tensor h = hidden.slice(1, 0, hidden.size(1) - 1);                // [B, T-1, H]
  at::Tensor hs = h.reshape({-1, h.size(-1)}).index_select(0, targets.positions);  // [N, H]
  const at::Tensor& w = model.lm_head;                                  // [V, H]
  const int64_t chunk = chunk_rows > 0 ? chunk_rows : loss_chunk_rows(w.size(0));
  if (!at::GradMode::is_enabled() || (!hs.requires_grad() && !w.requires_grad())) {
    // No gradient wanted (evaluation): the plain form, chunked the same way for memory.
    at::Tensor total = at::zeros({}, hs.options().dtype(at::kFloat));
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t e = std::min(n, s + chunk);
      at::Tensor logits = model.lm_logits(hs.slice(0, s, e)).to(at::kFloat);
      total = total + at::cross_entropy_loss(logits, ts.slice(0, s, e), {}, at::Reduction::Sum);
    }
    return total;
  }
  return ChunkedLmLoss::apply(hs, w, ts, chunk);
}

std::pair<at::Tensor, int64_t> causal_lm_loss_sum(model::LlamaForCausalLMImpl& model, const at::Tensor& hidden,
                                                  const at::Tensor& labels, int64_t chunk_rows) {
  const LossTargets targets = loss_targets(labels, hidden.device());
  return {causal_lm_loss_sum(model, hidden, targets, chunk_rows), targets.count};
}

at::Tensor queue_update(AdamW& opt, const NamedTensors& params, double max_grad_norm, double lr,
                        const at::Tensor& loss_sum) {
  const at::Tensor norm = clip_grad_norm(params, max_grad_norm);
  const at::Tensor loss = loss_sum.defined() ? loss_sum : at::zeros({}, norm.options());
  const at::Tensor status = at::stack({loss.to(norm.device(), at::kFloat), norm.to(at::kFloat)});
  opt.step(lr, at::logical_not(at::isfinite(status).all()).to(at::kFloat));
  opt.zero_grad();
  model::refresh_adapter_casts();  // the next forward's casts, queued now instead of at its start
  return status;
}

HostCopy::HostCopy(const at::Tensor& t) {
  if (t.device().is_cpu()) {
    host_ = t;
    return;
  }
  host_ = t.to(at::kCPU, /*non_blocking=*/true);  // into pinned memory
  const c10::impl::VirtualGuardImpl guard(t.device().type());
  landed_.emplace(t.device().type());
  landed_->record(guard.getStream(t.device()));
}

const at::Tensor& HostCopy::get() {
  if (landed_) {
    landed_->synchronize();
    landed_.reset();
  }
  return host_;
}

std::pair<double, int64_t> batch_loss(model::LlamaForCausalLMImpl& model, const data::Batch& b) {
  at::NoGradGuard no_grad;
  at::Tensor hidden = model.hidden_states(b.input_ids, b.attention_mask, b.position_ids);  // copied there
  auto [sum, n] = causal_lm_loss_sum(model, hidden, b.labels);
  return {sum.item<double>(), n};
}

namespace {
// Test hook (tests/train/test_resume.py): with QLORA_TEST_KILL_AT_STEP=N in the environment the process
// sends itself SIGKILL in the middle of optimizer step N (1-based: after that step's backward passes,
// before its update), a crash no handler can tidy up, at a point no outside timer could hit reliably.
// Unset in normal use; read once.
int64_t kill_at_step() {
  static const int64_t v = [] {
    const char* e = std::getenv("QLORA_TEST_KILL_AT_STEP");
    return e ? std::atoll(e) : int64_t{-1};
  }();
  return v;
}
}  // namespace

int64_t total_steps(const TrainConfig& t, int64_t batches_per_epoch, int64_t world) {
  if (t.max_steps > 0) return t.max_steps;
  const int64_t per_step = t.grad_accum * world;
  return t.epochs * ((batches_per_epoch + per_step - 1) / per_step);
}

namespace {
data::BatcherOptions batcher_options(const Config& cfg, int32_t pad) {
  data::BatcherOptions o;
  o.micro_batch_size = cfg.train.micro_batch_size;
  o.shuffle = cfg.data.shuffle;
  o.seed = cfg.data.seed;
  o.pad_value = pad;
  o.padding_free = cfg.data.padding_free;
  return o;
}

AdamWOptions adamw_options(const TrainConfig& t) {
  return AdamWOptions{t.lr, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay};
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A data-parallel step's seed for every generator (see the Trainer's constructor): one per (seed, step, rank).
void seed_step(int64_t seed, int64_t step, int64_t rank) {
  uint64_t x = splitmix64(static_cast<uint64_t>(seed));
  x = splitmix64(x ^ static_cast<uint64_t>(step));
  x = splitmix64(x ^ static_cast<uint64_t>(rank));
  at::manual_seed(x >> 1);  // below 2^63: what a Python int seed would be
}
}  // namespace

Trainer::Trainer(const Config& cfg, model::LlamaForCausalLM model, NamedTensors trainable, const data::Dataset& train,
                 const data::Dataset* eval, int32_t pad_value, dist::Group* group)
    : cfg_(cfg),
      model_(std::move(model)),
      trainable_(std::move(trainable)),
      train_(train),
      eval_(eval),
      pad_value_(pad_value),
      group_(group && group->world() > 1 ? group : nullptr),
      batcher_(train, batcher_options(cfg, pad_value)),
      opt_(trainable_, adamw_options(cfg.train)) {
  QLORA_REQUIRE(!trainable_.empty(), "nothing to train: no trainable parameters (check lora.target_modules)");
  if (group_) {
    std::vector<at::Tensor> params;
    for (auto& [name, p] : trainable_) params.push_back(p);
    sync_ = std::make_unique<dist::GradSync>(*group_, std::move(params), dist::bucket_bytes(*group_));
  }
  state_.total_steps = total_steps(cfg.train, batcher_.batches_per_epoch(), world());
  warmup_ = warmup_steps(cfg.train, state_.total_steps);
  model_->set_gradient_checkpointing(cfg.model.gradient_checkpointing, cfg.model.gradient_checkpointing_layers);
}

double Trainer::current_lr() const {
  return cfg_.train.lr * lr_multiplier(cfg_.train.schedule, state_.step, warmup_, state_.total_steps);
}

double Trainer::train_step() {
  QueuedStep q = queue_step();
  return finish_step(q);
}

Trainer::QueuedStep Trainer::queue_step(const std::function<void()>& meanwhile) {
  model_->train();
  // The step's kernels on a stream above the dequantization's priority (fused.h's DequantAhead).
  const model::StepStream on_step(model_->device());
  QueuedStep q;
  q.lr = current_lr();
  const int64_t world = this->world(), rank = group_ ? group_->rank() : 0;
  if (group_) seed_step(cfg_.train.seed, state_.step + 1, rank);
  // Gather the step's micro-batches first: the loss is the mean over every label token of the step,
  // so each micro-batch's sum is divided by the step's total count (exact under accumulation). With several
  // ranks every rank reads all of the step's micro-batches (their counts) and trains on its share.
  std::vector<data::Batch> micro;
  for (int64_t i = 0; i < cfg_.train.grad_accum * world; ++i) {
    data::Batch b = batcher_.next();
    q.count += b.tokens;
    state_.tokens_seen += b.input_ids.numel();
    if (i % world == rank) micro.push_back(std::move(b));
  }
  // Everything up to the update is queued without waiting for the GPU: the loss stays on the device, and a
  // non-finite loss or gradient norm skips the update there (the optimizer's `skip`). The host learns the
  // step's loss and norm from one copy queued at the end (finish_step).
  at::Tensor loss_sum;  // float32 scalar on the device
  // This rank's last micro-batch with a label: its backward finishes the gradients, whose sums over the ranks
  // start as it runs.
  const data::Batch* last = nullptr;
  for (const auto& b : micro)
    if (b.tokens > 0) last = &b;
  for (auto& b : micro) {
    // The batch stays on the CPU: hidden_states copies it over and reads the mask's and the positions'
    // layout from the CPU copies, so no micro-batch waits for the previous one's backward.
    at::Tensor hidden = model_->hidden_states(b.input_ids, b.attention_mask, b.position_ids);
    auto [sum, n] = causal_lm_loss_sum(*model_, hidden, b.labels);
    if (n == 0) continue;
    loss_sum = loss_sum.defined() ? loss_sum + sum.detach() : sum.detach();
    if (sync_ && &b == last) sync_->arm(loss_sum);
    (sum / static_cast<double>(q.count)).backward();
  }
  // Every rank knows the step's count: all of them sum, or none (no label in the whole step). A rank whose
  // share had no label adds zeros.
  if (sync_ && q.count > 0) {
    const at::Device device = trainable_[0].second.device();
    loss_sum = sync_->finish(loss_sum.defined() ? loss_sum : at::zeros({}, at::TensorOptions(device).dtype(at::kFloat)));
  }
  if (meanwhile) meanwhile();  // the GPU has this step's forward and backward to run meanwhile
  if (state_.step + 1 == kill_at_step()) std::raise(SIGKILL);
  q.status = HostCopy(queue_update(opt_, trainable_, cfg_.train.max_grad_norm, q.lr, loss_sum));
  ++state_.step;  // a skipped step too: the schedule and the data move on, as if it had happened
  state_.cursor = batcher_.state();
  q.step = state_.step;
  q.tokens_seen = state_.tokens_seen;
  q.epoch = state_.cursor.epoch;
  return q;
}

double Trainer::finish_step(QueuedStep& q) {
  const at::Tensor& status = q.status.get();  // the step's one wait
  const double loss = status[0].item<double>();
  last_grad_norm_ = status[1].item<double>();
  if (!std::isfinite(loss) || !std::isfinite(last_grad_norm_)) {
    ++state_.consecutive_nonfinite;
    ++state_.skipped_steps;
    return std::nan("");
  }
  state_.consecutive_nonfinite = 0;
  return q.count > 0 ? loss / q.count : 0.0;
}

double Trainer::evaluate(const data::Dataset& data) {
  model_->eval();
  data::BatcherOptions o = batcher_options(cfg_, pad_value_);
  o.shuffle = false;
  data::Batcher b(data, o);
  double sum = 0;
  int64_t n = 0;
  const int64_t world = this->world(), rank = group_ ? group_->rank() : 0;
  for (int64_t i = 0; i < b.batches_per_epoch(); ++i) {
    data::Batch batch = b.next();
    if (i % world != rank) continue;  // the ranks split the batches, and add their sums below
    auto [s, c] = batch_loss(*model_, batch);
    sum += s;
    n += c;
  }
  if (group_) {
    at::Tensor t = at::tensor({sum, static_cast<double>(n)}, at::kDouble).to(model_->device());
    group_->all_reduce_sum(t);
    t = t.cpu();
    sum = t[0].item<double>();
    n = static_cast<int64_t>(t[1].item<double>());
  }
  model_->train();
  return n > 0 ? sum / n : std::nan("");
}

void Trainer::restore(const TrainerState& s, const NamedTensors& optimizer_state) {
  state_ = s;
  batcher_.restore(s.cursor);
  opt_.load_state(optimizer_state, s.step - s.skipped_steps);
}

void Trainer::run(const Hooks& hooks) {
  auto say = [&](const std::string& m) {
    if (hooks.on_message) hooks.on_message(m);
  };
  const bool tty = ::isatty(STDERR_FILENO);
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  const double tokens0 = state_.tokens_seen;
  const int64_t step0 = state_.step;
  auto do_eval = [&]() {
    if (!eval_ || eval_->size() == 0) return;
    double l = evaluate(*eval_);
    if (hooks.on_metrics)
      hooks.on_metrics({{"step", state_.step}, {"eval_loss", l}, {"eval_perplexity", std::exp(l)}});
    say(fmt::format("step {}: eval loss {:.4f}, perplexity {:.2f}", state_.step, l, std::exp(l)));
  };
  // What the host learns of a step once its values are read: the log line, the metrics, the divergence check.
  auto report = [&](QueuedStep& q) {
    const double loss = finish_step(q);
    const double secs = std::chrono::duration<double>(clock::now() - t0).count();
    const double tps = (q.tokens_seen - tokens0) / std::max(secs, 1e-9);
    const int64_t done = q.step - step0;
    const double eta = done > 0 ? secs / done * (state_.total_steps - q.step) : 0;
    if (std::isnan(loss)) {
      say(fmt::format("warning: step {}: non-finite loss, step skipped ({} in a row)", q.step,
                      state_.consecutive_nonfinite));
      QLORA_REQUIRE(state_.consecutive_nonfinite < cfg_.train.max_nonfinite_steps,
                    "training diverged: {} non-finite losses in a row (train.max_nonfinite_steps); "
                    "try a lower train.lr or train.max_grad_norm",
                    state_.consecutive_nonfinite);
    } else if (q.step % cfg_.train.log_every == 0 || q.step == state_.total_steps) {
      if (hooks.on_metrics)
        hooks.on_metrics({{"step", q.step}, {"loss", loss}, {"lr", q.lr}, {"grad_norm", last_grad_norm_},
                          {"tokens_per_s", tps}, {"epoch", q.epoch}});
      std::string line = fmt::format("step {}/{}  loss {:.4f}  lr {:.3e}  {:.0f} tok/s  eta {:.0f}s", q.step,
                                     state_.total_steps, loss, q.lr, tps, eta);
      if (tty) {
        int width = 30, filled = static_cast<int>(width * q.step / std::max<int64_t>(1, state_.total_steps));
        fmt::print(stderr, "\r[{}{}] {}", std::string(filled, '#'), std::string(width - filled, '.'), line);
        if (q.step == state_.total_steps) fmt::print(stderr, "\n");
      } else {
        say(line);
      }
    }
  };
  // Step N's values are read once step N + 1's forward and backward are queued, so the GPU works through
  // the host's start of a step. Before an evaluation, a checkpoint or the end, the last step queued is read
  // first: they see every step's outcome (the skipped-step counts a checkpoint saves included).
  std::optional<QueuedStep> unread;
  while (state_.step < state_.total_steps) {
    QueuedStep q = queue_step([&] {
      if (unread) report(*unread);
    });
    unread = std::move(q);
    const bool eval_now = cfg_.train.eval_every > 0 && state_.step % cfg_.train.eval_every == 0 &&
                          state_.step < state_.total_steps;
    const bool checkpoint_now = hooks.on_checkpoint && cfg_.checkpoint.every > 0 &&
                                state_.step % cfg_.checkpoint.every == 0 && state_.step < state_.total_steps;
    if (eval_now || checkpoint_now || state_.step == state_.total_steps) {
      report(*unread);
      unread.reset();
    }
    if (eval_now) {
      if (tty) fmt::print(stderr, "\n");
      do_eval();
    }
    if (checkpoint_now) hooks.on_checkpoint(state_.step);
  }
  do_eval();
  if (hooks.on_checkpoint) hooks.on_checkpoint(state_.step);
}

}  // namespace qlora::train
