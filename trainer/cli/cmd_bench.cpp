// `qlora bench`: speed and memory of the training step and of the 4-bit kernels, on synthetic data.
//
//   qlora bench [--shape llama2-7b] [--r 16] [--seq 2048] [--batch 1] [--checkpointing on|off|full]
//               [--checkpoint-layers N] ...
//       A model of a named shape with random weights drawn on the device, NF4 (+ double quantization)
//       base, LoRA on all seven projections, random tokens with every position trained. Prints tokens/s,
//       the step split into forward / backward / optimizer, peak memory and MFU (formula below).
//       --fused on|off|auto picks the projection path (trainer/model/fused.h), --fold on|off whether its
//       groups fold the adapters into the base GEMM (A/B); --segments N packs N examples into each row
//       and --padding N ends each with N tokens of padding (attended by segments, llama.h's AttentionMask;
//       --segment-attention off: a dense mask); --profile FILE runs one
//       more step under the Kineto profiler, prints the GPU's busy time and busiest kernels, and writes
//       the step's Chrome trace to FILE.
//   qlora bench --kernels
//       The 4-bit kernels against the hardware: dequantization of every projection of a Llama-2-7B-shaped
//       model against the device-to-device copy bandwidth measured in the same run; the frozen 4-bit
//       linear's forward + backward against a bf16 linear (cuBLAS) at 2048 and 8192 tokens; memory after
//       loading the 7B shape against the theoretical size.
//
// Timing: warm-up steps first, then the timed ones, run as the trainer runs them: pipelined (--pipeline on,
// the default: step N's loss read once step N + 1 is queued; the step time is the timed steps' wall time
// over their number) or each waited for at its end (off: the median of the steps' wall times). The
// forward / backward / optimizer split comes from CUDA events between the phases (their means when
// pipelined, else medians).
// --cuda-graph on captures the step (forward, backward, clipping, AdamW) as one CUDA graph after the warm-up
// and replays it: the measure of what the host's launches cost a step (docs/performance.md). Its inputs are
// refilled in device buffers before each replay; the warm-up runs the same step eagerly on them. The phases
// are not split then (one launch).
// Under a launcher (`torchrun --nproc-per-node N --no-python qlora bench ...`, trainer/dist/dist.h) every rank
// runs the step on its own GPU and its own random tokens, and the ranks' gradients and losses are summed
// before the update, as `qlora train` sums them: tokens/s is then the ranks' together (also per GPU), and
// rank 0 alone prints and writes the JSON.
// Optional --json FILE writes every figure for scripts (scripts/gpu.sh collects them).
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <optional>

#include "trainer/cli/commands.h"
#include "trainer/cli/run_context.h"
#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/dist/dist.h"
#include "trainer/lora/lora.h"
#include "trainer/model/fused.h"
#include "trainer/model/loader.h"
#include "trainer/quant/quant.h"
#include "trainer/train/optim.h"
#include "trainer/train/trainer.h"

#include <torch/csrc/autograd/profiler_kineto.h>

#include <map>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace qlora::cli {

namespace {

// Llama shapes by name (HF config.json values of the public checkpoints).
model::LlamaArch named_arch(const std::string& name) {
  model::LlamaArch a;
  a.rms_norm_eps = 1e-5;
  a.max_position_embeddings = 4096;
  a.vocab_size = 32000;
  if (name == "llama2-7b") {
    a.hidden_size = 4096, a.intermediate_size = 11008, a.num_layers = 32, a.num_heads = 32, a.num_kv_heads = 32;
  } else if (name == "llama2-13b") {
    a.hidden_size = 5120, a.intermediate_size = 13824, a.num_layers = 40, a.num_heads = 40, a.num_kv_heads = 40;
  } else if (name == "llama3-8b") {
    a.hidden_size = 4096, a.intermediate_size = 14336, a.num_layers = 32, a.num_heads = 32, a.num_kv_heads = 8;
    a.vocab_size = 128256, a.max_position_embeddings = 8192, a.rope.theta = 500000.0;
  } else if (name == "tiny") {
    a.hidden_size = 256, a.intermediate_size = 688, a.num_layers = 4, a.num_heads = 8, a.num_kv_heads = 4;
    a.vocab_size = 1024, a.max_position_embeddings = 1024;
  } else {
    fail("--shape: unknown shape '{}' (expected llama2-7b, llama2-13b, llama3-8b or tiny)", name);
  }
  a.head_dim = a.hidden_size / a.num_heads;
  a.dtype = "bfloat16";
  return a;
}

void sync(const at::Device& d) {
#ifdef QLORA_WITH_CUDA
  if (d.is_cuda()) c10::cuda::device_synchronize();
#endif
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0.0 : sum / static_cast<double>(v.size());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

int64_t allocated_bytes(const at::Device& d, bool peak) {
#ifdef QLORA_WITH_CUDA
  if (d.is_cuda()) {
    auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(d.index());
    const auto& a = s.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return peak ? a.peak : a.current;
  }
#endif
  return 0;
}

void reset_peak(const at::Device& d) {
#ifdef QLORA_WITH_CUDA
  if (d.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(d.index());
#endif
}

// Model FLOPs per trained token (the MFU numerator; recomputation is not counted, as usual for MFU):
//   4 x projection params   frozen base: forward 2N + input gradient 2N (no weight gradient)
//   4 x V x H               lm_head, frozen likewise
//   12 x L x H x T          attention scores and values, forward + backward (PaLM's convention; no
//                           causal discount); T the example's length (the row's, unless packed)
//   6 x LoRA params         trainable: forward, input gradient and weight gradient
double flops_per_token(const model::LlamaArch& a, int64_t lora_params, int64_t seq) {
  const double proj = static_cast<double>(a.num_layers) * a.projection_params_per_layer();
  return 4.0 * proj + 4.0 * a.vocab_size * a.hidden_size + 12.0 * a.num_layers * a.hidden_size * seq +
         6.0 * static_cast<double>(lora_params);
}

// Dense bf16 peak of the device, for MFU (the H100/H200 SXM datasheet figure).
double peak_flops(const at::Device& d) { return d.is_cuda() ? 989e12 : 0.0; }

struct StepOptions {
  std::string shape = "llama2-7b";
  int64_t r = 16;
  double lora_dropout = 0.0;  // the recipe's 0.1 measures what the adapters' dropout costs
  std::string lora_dropout_masks = "counters";  // fused.h's set_counter_dropout: counters | aten
  std::string lora_dropout_mm = "kernels";       // fused.h's set_dropout_mm_kernels: kernels | copies
  std::string lora_dropout_dx = "kernel";        // fused.h's set_dropout_dx_kernel: kernel | two-pass
  std::string base = "nf4";  // nf4 (QLoRA) | bf16 (LoRA on a bf16 base): the difference is the 4-bit cost
  int64_t seq = 2048;
  int64_t batch = 1;
  int64_t segments = 1;  // examples packed into each row (their positions restart at 0)
  int64_t padding = 0;   // the last tokens of each row are padding (masked, unlabelled, not counted)
  std::string segment_attention = "on";  // packed rows by flash attention's variable-length form (llama.h): on | off
  Checkpointing checkpointing = Checkpointing::Selective;
  int64_t checkpoint_layers = -1;  // how many layers recompute (the first N); -1 = all
  int64_t warmup = 3;
  int64_t steps = 10;
  std::string device = "auto";
  std::string json;
  std::string fused = "auto";  // the fused projection path (trainer/model/fused.h): auto | on | off
  std::string fold = "on";     // adapters folded into the base GEMM where they can be (fused.h): on | off
  std::string lora_grad = "kernel";  // the backward's dxa and dB's (fused.h): kernel | cublas
  int ahead_depth = 2;         // groups dequantized ahead (fused.h)
  std::string keep_attention = "on";  // selective checkpointing keeps the attention's output (llama.h): on | off
  std::string grouped_attention = "on";  // grouped k and v straight into cuDNN (llama.h): on | off
  std::string pipeline = "on";  // on | off: steps queued as Trainer::run queues them (the next one before
                                // reading this one's loss)
  std::string ahead = "low";   // dequantization ahead on a second stream (fused.h): low | even | high | off
  std::string cuda_graph = "off";  // on: the step captured once as a CUDA graph after the warm-up, then replayed
  std::string profile;  // trace file of one extra step (Chrome trace JSON), plus a kernel summary
  bool profile_gpu_only = false;  // record device activities only: the CPU's op records slow it ~3x, which
                                  // can starve the GPU in a step that is not launch-bound without them
};

// What the GPU did during one profiled step, from the profiler's device events: busy time (the union of
// kernel and copy intervals) against the step's wall time, and the kernels that took the most.
void print_profile_summary(const torch::autograd::profiler::ProfilerResult& r, double wall_ms) {
  struct Agg {
    double ns = 0;
    int64_t count = 0;
  };
  std::map<std::string, Agg> by_name;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  int64_t cpu_ops = 0;
  for (const auto& e : r.events()) {
    if (e.deviceType() == c10::DeviceType::CUDA) {
      if (e.durationNs() == 0) continue;
      auto& a = by_name[e.name().substr(0, 90)];
      a.ns += static_cast<double>(e.durationNs());
      a.count += 1;
      spans.emplace_back(e.startNs(), e.endNs());
    } else if (e.deviceType() == c10::DeviceType::CPU) {
      ++cpu_ops;
    }
  }
  std::sort(spans.begin(), spans.end());
  double busy = 0, total = 0;
  int64_t kernels = 0;
  uint64_t end = 0;
  for (const auto& [s, e] : spans) {
    if (s >= end) {
      busy += static_cast<double>(e - s);
    } else if (e > end) {
      busy += static_cast<double>(e - end);
    }
    end = std::max(end, e);
  }
  std::vector<std::pair<std::string, Agg>> rows(by_name.begin(), by_name.end());
  for (const auto& [n, a] : rows) total += a.ns, kernels += a.count;
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  fmt::print("\nprofile of one step: {:.1f} ms wall, GPU busy {:.1f} ms ({:.1f}%), {} device activities, {} CPU ops\n",
             wall_ms, busy / 1e6, 100.0 * busy / 1e6 / wall_ms, kernels, cpu_ops);
  if (rows.empty()) {
    fmt::print("no device activities (a CPU run): the trace holds the CPU ops\n");
    return;
  }
  fmt::print("{:>9} {:>6} {:>7}  {}\n", "ms", "count", "share", "kernel");
  for (size_t i = 0; i < rows.size() && i < 25; ++i) {
    const auto& [n, a] = rows[i];
    fmt::print("{:>9.2f} {:>6} {:>6.1f}%  {}\n", a.ns / 1e6, a.count, 100.0 * a.ns / total, n);
  }
}

// Phase boundaries of a step, marked without making the host wait: CUDA events on the GPU's timeline, the
// host clock on the CPU (where nothing runs ahead of the host).
class PhaseMarks {
 public:
  explicit PhaseMarks(const at::Device& d) : cuda_(d.is_cuda()) {}
  void mark() {
#ifdef QLORA_WITH_CUDA
    if (cuda_) {
      events_.push_back(std::make_unique<at::cuda::CUDAEvent>(cudaEventDefault));
      events_.back()->record();
      return;
    }
#endif
    host_.push_back(now_ms());
  }
  // Milliseconds between consecutive marks; on CUDA, call once the step's work has finished.
  std::vector<double> spans_ms() const {
    std::vector<double> out;
#ifdef QLORA_WITH_CUDA
    if (cuda_) {
      for (size_t i = 1; i < events_.size(); ++i) out.push_back(events_[i - 1]->elapsed_time(*events_[i]));
      return out;
    }
#endif
    for (size_t i = 1; i < host_.size(); ++i) out.push_back(host_[i] - host_[i - 1]);
    return out;
  }

 private:
  bool cuda_;
  std::vector<double> host_;
#ifdef QLORA_WITH_CUDA
  std::vector<std::unique_ptr<at::cuda::CUDAEvent>> events_;
#endif
};

nlohmann::json bench_step(const StepOptions& so, const dist::Env& env) {
  RunContext ctx = resolve_run_context(so.device == "cpu" ? Device::CPU : so.device == "cuda" ? Device::CUDA : Device::Auto,
                                       DType::Auto, env.local_rank);
  const std::unique_ptr<dist::Group> group = dist::join(env, ctx.device);
  const int64_t world = group ? group->world() : 1;
  model::LlamaArch arch = named_arch(so.shape);
  model::set_fused_mode(so.fused == "on" ? model::FusedMode::On : so.fused == "off" ? model::FusedMode::Off
                                                                                      : model::FusedMode::Auto);
  model::set_fold_adapters(so.fold == "on");
  model::set_lora_grad_kernel(so.lora_grad == "kernel");
  model::set_counter_dropout(so.lora_dropout_masks == "counters");
  model::set_dropout_mm_kernels(so.lora_dropout_mm == "kernels");
  model::set_dropout_dx_kernel(so.lora_dropout_dx == "kernel");
  model::set_dequant_ahead_depth(so.ahead_depth);
  model::set_keep_attention(so.keep_attention == "on");
  model::set_grouped_attention(so.grouped_attention == "on");
  model::set_dequant_ahead(so.ahead == "off"    ? model::DequantAhead::Off
                           : so.ahead == "high" ? model::DequantAhead::High
                           : so.ahead == "even" ? model::DequantAhead::Even
                                                : model::DequantAhead::Low);
  QLORA_REQUIRE(so.seq >= 2, "--seq: must be at least 2, got {}", so.seq);
  // Plain RoPE does not depend on the position limit: longer sequences measure memory and speed as is.
  arch.max_position_embeddings = std::max(arch.max_position_embeddings, so.seq);
  model::LoadOptions lo;
  lo.device = ctx.device;
  lo.dtype = ctx.dtype;
  lo.quantize = so.base == "nf4";
  lo.double_quant = true;
  const double t_load = now_ms();
  auto model = model::init_llama(arch, lo, /*seed=*/1234, /*draw_on_device=*/true);
  sync(ctx.device);
  const double load_ms = now_ms() - t_load;
  const int64_t model_bytes = allocated_bytes(ctx.device, false);

  LoraConfig lc;
  lc.r = so.r;
  lc.alpha = 2.0 * so.r;
  QLORA_REQUIRE(so.lora_dropout >= 0.0 && so.lora_dropout < 1.0, "--lora-dropout: in [0, 1), got {}", so.lora_dropout);
  lc.dropout = so.lora_dropout;
  lora::apply_lora(*model, lc, 1234);
  train::NamedTensors params = lora::lora_named_parameters(*model);
  int64_t lora_params = 0;
  for (auto& [n, p] : params) lora_params += p.numel();
  train::AdamW opt(params, train::AdamWOptions{1e-4, 0.9, 0.999, 1e-8, 0.0});
  std::unique_ptr<dist::GradSync> grad_sync;  // the gradients summed over the ranks, as `qlora train` sums them
  if (group) {
    std::vector<at::Tensor> tensors;
    for (auto& [name, p] : params) tensors.push_back(p);
    grad_sync = std::make_unique<dist::GradSync>(*group, std::move(tensors), dist::bucket_bytes(*group));
  }
  model->set_gradient_checkpointing(so.checkpointing, so.checkpoint_layers);
  model->train();
  // The default generators, which LoRA dropout draws its masks from, seeded as `qlora train` seeds them: the same
  // masks in every process (a CUDA generator is otherwise seeded at random), so runs compare value for value.
  at::manual_seed(1234);

  auto gen = at::make_generator<at::CPUGeneratorImpl>(42 + env.rank);  // each rank its own tokens
  QLORA_REQUIRE(so.padding >= 0 && so.padding < so.seq - 1, "--padding: between 0 and --seq - 2 ({}), got {}",
                so.seq - 2, so.padding);
  at::Tensor attention_mask = at::ones({so.batch, so.seq}, at::kLong);
  attention_mask.narrow(1, so.seq - so.padding, so.padding).zero_();
  const at::Tensor is_padding = attention_mask.eq(0);  // unlabelled
  QLORA_REQUIRE(so.segments >= 1 && so.segments <= so.seq, "--segments: between 1 and --seq ({}), got {}", so.seq,
                so.segments);
  model::set_segment_attention(so.segment_attention == "on");
  // Packed rows: `segments` examples of (about) equal length a row, their positions restarting at 0.
  const at::Tensor position_ids = [&] {
    const at::Tensor t = at::arange(so.seq, at::kLong);
    const int64_t length = (so.seq + so.segments - 1) / so.segments;
    return t.remainder(length).unsqueeze(0).expand({so.batch, so.seq}).contiguous();
  }();
  const bool graphed = so.cuda_graph == "on";
  const int64_t labelled = so.batch * (so.seq - 1 - so.padding);  // every shifted position but the padding
  // The trained weights before the first step, on the host: the JSON's update_norm is how far the steps moved
  // them (tests compare it between --cuda-graph on and off).
  std::vector<at::Tensor> start_weights;
  for (auto& [n, p] : params) start_weights.push_back(p.detach().to(at::kCPU, at::kFloat, false, /*copy=*/true));
  // --cuda-graph on: the step's inputs in device buffers, refilled before each step (a replay reads them
  // where the capture found them). No mask and no positions: plain causal attention over positions 0..T-1,
  // what the CPU tensors above say; every shifted position is labelled, as there.
  at::Tensor ids_on_device;
  train::LossTargets targets_on_device;
#ifdef QLORA_WITH_CUDA
  std::optional<at::cuda::CUDAGraph> graph;
  at::Tensor graph_status;  // the captured step's [loss sum, norm], rewritten by each replay
#endif
  if (graphed) {
    QLORA_REQUIRE(ctx.device.is_cuda(), "--cuda-graph on: needs a CUDA device (this run is on {})", ctx.device.str());
    QLORA_REQUIRE(!group, "--cuda-graph on: runs on one GPU only (this run has {} ranks)", world);
    QLORA_REQUIRE(so.ahead == "low" || so.ahead == "high",
                  "--cuda-graph on: needs --ahead low or high (a graph is captured on the step's own stream)");
    QLORA_REQUIRE(so.warmup >= 1, "--cuda-graph on: needs --warmup 1 or more (the capture repeats a step that ran)");
    QLORA_REQUIRE(so.segments == 1 && so.padding == 0,
                  "--cuda-graph on: takes one whole example a row (--segments 1, --padding 0)");
    const auto on = at::TensorOptions().dtype(at::kLong).device(ctx.device);
    ids_on_device = at::empty({so.batch, so.seq}, on);
    targets_on_device = {at::arange(labelled, on), at::empty({labelled}, on), labelled};
  }
  // The graphed step's body, as queue() below runs it eagerly but on the device buffers.
  auto graph_body = [&]() {
    at::Tensor hidden = model->hidden_states(ids_on_device, at::Tensor(), at::Tensor());
    const at::Tensor sum = train::causal_lm_loss_sum(*model, hidden, targets_on_device);
    (sum / static_cast<double>(targets_on_device.count)).backward();
    return train::queue_update(opt, params, /*max_grad_norm=*/1.0, /*lr=*/1e-4, sum.detach());
  };
  // One step as the trainer runs it (Trainer::queue_step, finish_step): the batch made on the CPU and copied
  // without a wait, the labelled positions found on the CPU, the update skipped on the device if the loss or
  // the gradient norm is not finite, and the loss and the norm read through one copy queued at the end.
  // Pipelined (the default, as Trainer::run): step N's values are read once step N + 1's forward and
  // backward are queued, and the step's time is the measured steps' wall time over their number. Else each
  // step waits for the GPU at its end and starts on an idle GPU, its time the median of the steps' wall
  // times (the Python stack's bench can do either, scripts/bench_hf.py --pipeline). Phase boundaries are
  // marked without waiting (PhaseMarks): forward (to the loss), backward, optimizer.
  std::vector<double> fwd, fwd_host, bwd, bwd_host, optim, total, losses;
  struct Queued {
    train::HostCopy status;  // [loss sum, norm], copied at the step's end
    std::unique_ptr<PhaseMarks> marks;  // none for a graphed step
    double t0 = 0, fwd_host = 0, bwd_host = 0;
    bool record = false;
  };
  auto finish = [&](Queued& q) {
    const at::Tensor& status = q.status.get();
    QLORA_REQUIRE(std::isfinite(status[0].item<double>()) && std::isfinite(status[1].item<double>()),
                  "bench: non-finite loss or gradient norm");
    if (!q.record) return now_ms() - q.t0;
    losses.push_back(status[0].item<double>() / static_cast<double>(labelled));
    if (q.marks) {
      const std::vector<double> ms = q.marks->spans_ms();
      fwd.push_back(ms[0]), bwd.push_back(ms[1]), optim.push_back(ms[2]);
      fwd_host.push_back(q.fwd_host), bwd_host.push_back(q.bwd_host);
    }
    const double t = now_ms() - q.t0;
    total.push_back(t);
    return t;
  };
  auto queue = [&](bool record, const std::function<void()>& meanwhile) {
    const at::Tensor ids = at::randint(0, arch.vocab_size, {so.batch, so.seq}, gen, at::kLong);
    const model::StepStream on_step(ctx.device);  // as Trainer::queue_step
    Queued q;
    q.record = record;
    q.t0 = now_ms();
    if (graphed) {
      ids_on_device.copy_(ids.pin_memory(), /*non_blocking=*/true);
      targets_on_device.labels.copy_(ids_on_device.slice(1, 1).reshape(-1));
      at::Tensor status;
#ifdef QLORA_WITH_CUDA
      if (graph) graph->replay(), status = graph_status;
#endif
      if (!status.defined()) status = graph_body();  // the warm-up
      if (meanwhile) meanwhile();
      q.status = train::HostCopy(status);
      return q;
    }
    q.marks = std::make_unique<PhaseMarks>(ctx.device);
    q.marks->mark();
    // The batcher's tensors, on the CPU as the trainer passes them: no padding, one example a row (or
    // --segments packed ones).
    at::Tensor hidden = model->hidden_states(ids, attention_mask, position_ids);
    q.fwd_host = now_ms() - q.t0;  // the CPU has issued the layers; the GPU may still be running them
    auto [sum, n] = train::causal_lm_loss_sum(*model, hidden, ids.masked_fill(is_padding, -100));
    q.marks->mark();
    const double t2_host = now_ms();
    if (grad_sync) grad_sync->arm(sum);  // as Trainer::queue_step: the sums start while the backward runs
    (sum / static_cast<double>(n * world)).backward();  // the mean over every rank's tokens
    const at::Tensor mean_sum = grad_sync ? grad_sync->finish(sum) / world : sum.detach();  // a rank's, on average
    q.bwd_host = now_ms() - t2_host;  // the CPU has issued the backward (and the ranks' sums)
    if (meanwhile) meanwhile();
    q.marks->mark();
    const at::Tensor status = train::queue_update(opt, params, /*max_grad_norm=*/1.0, /*lr=*/1e-4, mean_sum);
    q.marks->mark();
    q.status = train::HostCopy(status);
    return q;
  };
  // One step on an idle GPU, waited for (warmup, the unpipelined mode, the profiled step).
  auto step = [&](bool record) {
    sync(ctx.device);
    Queued q = queue(record, {});
    return finish(q);
  };
  reset_peak(ctx.device);
  const int64_t kept0 = model::kept_attention_uses();
  for (int64_t i = 0; i < so.warmup; ++i) step(false);
#ifdef QLORA_WITH_CUDA
  if (graphed) {
    // The capture records the step's kernels without running them. Nothing queued before it may be waited
    // for inside it, nor anything forked inside left unjoined: the dequantization queued ahead is settled on
    // both sides. The graph's memory comes from its own pool, which the replays reuse.
    sync(ctx.device);
    const model::StepStream on_step(ctx.device);
    model::settle_dequant_ahead();
    graph.emplace();
    graph->capture_begin();
    graph_status = graph_body();
    model::settle_dequant_ahead();
    graph->capture_end();
  }
#endif
  double wall_ms = 0;
  // The timed steps' span in Unix seconds, for samplers outside the process (gpu.sh: the card's clock and power).
  const auto unix_s = [] {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  };
  sync(ctx.device);
  const double timed_from = unix_s();
  if (so.pipeline == "on") {
    const double t_start = now_ms();
    std::optional<Queued> unread;
    for (int64_t i = 0; i < so.steps; ++i) {
      Queued q = queue(true, [&] {
        if (unread) finish(*unread);
      });
      unread = std::move(q);
    }
    if (unread) finish(*unread);
    wall_ms = now_ms() - t_start;
  } else {
    for (int64_t i = 0; i < so.steps; ++i) step(true);
  }
  const double timed_to = unix_s();
  double update_norm = 0;  // of the trained weights' change since the start
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor now = params[i].second.detach().to(at::kCPU, at::kFloat);
    update_norm += (now - start_weights[i]).pow(2).sum().item<double>();
  }
  update_norm = std::sqrt(update_norm);
  start_weights.clear();
  // Host-side counts see the warm-up and the capture, not the replays.
  const int64_t counted_steps = graphed ? so.warmup + 1 : so.warmup + so.steps;
  const int64_t kept_per_step = (model::kept_attention_uses() - kept0) / counted_steps;
  if (!so.profile.empty()) {
    // One more step under the Kineto profiler (CPU ops and CUDA activities); its trace opens in Perfetto or
    // chrome://tracing.
    using namespace torch::autograd::profiler;
    namespace pi = torch::profiler::impl;
    pi::ProfilerConfig cfg(pi::ProfilerState::KINETO);
    std::set<pi::ActivityType> acts;
    if (!so.profile_gpu_only || !ctx.device.is_cuda()) acts.insert(pi::ActivityType::CPU);
    if (ctx.device.is_cuda()) acts.insert(pi::ActivityType::CUDA);
    prepareProfiler(cfg, acts);
    enableProfiler(cfg, acts);
    const double wall = step(false);
    auto result = disableProfiler();
    print_profile_summary(*result, wall);
    result->save(so.profile);
    fmt::print("trace: {}\n", so.profile);
  }
  // Pipelined, a step's own wall time spans the next one's queueing: the run's wall time over its steps,
  // and the phases' means to match (their sum is the step's time on the GPU). Else medians.
  const bool pipelined = so.pipeline == "on";
  const auto typical = [&](const std::vector<double>& v) { return pipelined ? mean(v) : median(v); };
  const double step_ms = pipelined ? wall_ms / static_cast<double>(so.steps) : median(total);
  const double tokens = static_cast<double>(so.batch * (so.seq - so.padding));  // real ones, a rank
  const double tps = tokens / (step_ms / 1e3);  // a GPU's; the ranks' together below
  // Attention's share counts the context a token sees: its example's length when rows are packed.
  const double fpt = flops_per_token(arch, lora_params, (so.seq + so.segments - 1) / so.segments);
  const double pk = peak_flops(ctx.device);
  nlohmann::json j = {{"shape", so.shape},
                      {"base", so.base},
                      {"r", so.r},
                      {"lora_dropout", so.lora_dropout},
                      {"lora_dropout_masks", so.lora_dropout_masks},
                      {"lora_dropout_mm", so.lora_dropout_mm},
                      {"lora_dropout_dx", so.lora_dropout_dx},
                      {"seq", so.seq},
                      {"batch", so.batch},
                      {"segments", so.segments},
                      {"padding", so.padding},
                      {"segment_attention", so.segment_attention},
                      {"checkpointing", so.checkpointing != Checkpointing::Off},
                      {"checkpointing_mode", to_string(so.checkpointing)},
                      {"recomputed_layers", model->recomputed_layers()},
                      {"fused", so.fused},
                      {"fold", so.fold},
                      {"dequant_ahead", so.ahead},
                      {"ahead_depth", so.ahead_depth},
                      {"lora_grad", so.lora_grad},
                      {"keep_attention", so.keep_attention},
                      {"grouped_attention", so.grouped_attention},
                      {"pipeline", so.pipeline == "on"},
                      {"cuda_graph", graphed},
                      {"losses", losses},
                      {"update_norm", update_norm},
                      {"kept_attention_per_step", kept_per_step},
                      {"device", ctx.device.str()},
                      {"lora_params", lora_params},
                      {"load_ms", load_ms},
                      {"model_bytes", model_bytes},
                      {"step_ms", step_ms},
                      {"forward_ms", typical(fwd)},
                      {"forward_host_ms", typical(fwd_host)},
                      {"backward_host_ms", typical(bwd_host)},
                      {"backward_ms", typical(bwd)},
                      {"optimizer_ms", typical(optim)},
                      {"tokens_per_s", tps * world},
                      {"tokens_per_s_per_gpu", tps},
                      {"world", world},
                      {"dist_backend", group ? group->backend() : "none"},
                      {"peak_bytes", allocated_bytes(ctx.device, true)},
                      {"timed_unix_s", {timed_from, timed_to}},
                      {"flops_per_token", fpt},
                      {"mfu", pk > 0 ? tps * fpt / pk : 0.0}};
  if (env.rank != 0) return j;
  fmt::print("qlora bench  {} {} base r={} seq={} batch={} ({} a row, {} padding, segment-attention={}) "
             "lora-dropout={} ({}, {}, dx {}) checkpointing={} ({} of {} layers) fused={} fold={} "
             "ahead={} (depth {}) "
             "lora-grad={} keep-attention={} ({} a step) pipeline={} cuda-graph={} on {}\n",
             so.shape, so.base, so.r, so.seq, so.batch, so.segments, so.padding, so.segment_attention,
             so.lora_dropout, so.lora_dropout_masks, so.lora_dropout_mm, so.lora_dropout_dx,
             to_string(so.checkpointing), model->recomputed_layers(), arch.num_layers, so.fused, so.fold, so.ahead,
             so.ahead_depth, so.lora_grad, so.keep_attention, kept_per_step, so.pipeline, so.cuda_graph,
             ctx.device.str());
  fmt::print("  weights {:.2f} GiB (loaded in {:.1f} s), LoRA params {}\n", model_bytes / 1073741824.0,
             load_ms / 1e3, lora_params);
  if (graphed) {
    fmt::print("  step {:.1f} ms ({} of {} steps; one graph a step: the phases are not split)\n", step_ms,
               pipelined ? "mean" : "median", so.steps);
  } else {
    fmt::print("  step {:.1f} ms ({} of {} steps) = forward {:.1f} + backward {:.1f} + optimizer {:.1f} ({}); the "
               "CPU issued the layers' forward in {:.1f} ms and the backward in {:.1f} (ahead of the GPU it waits for "
               "room in the launch queue: in the backward{}; its own cost shows at a short --seq{})\n",
               step_ms, pipelined ? "mean" : "median", so.steps, typical(fwd), typical(bwd), typical(optim),
               pipelined ? "means" : "medians", typical(fwd_host), typical(bwd_host),
               pipelined ? " and, pipelined, in the forward" : "", pipelined ? " with --pipeline off" : "");
  }
  fmt::print("  tokens/s {:.0f}   peak memory {:.2f} GiB   MFU {:.1f}% (of {:.0f} TFLOP/s bf16)\n", tps,
             allocated_bytes(ctx.device, true) / 1073741824.0, 100.0 * j["mfu"].get<double>(), pk / 1e12);
  if (group)
    fmt::print("  {} ranks ({}): {:.0f} tokens/s together; peak memory and MFU above are rank 0's GPU's\n", world,
               group->backend(), tps * world);
  return j;
}

#ifdef QLORA_WITH_CUDA
// Median milliseconds of fn() over `iters` runs after `warmup`, timed with CUDA events per run.
template <typename F>
double time_cuda(F&& fn, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    at::cuda::CUDAEvent a(cudaEventDefault), b(cudaEventDefault);
    a.record();
    fn();
    b.record();
    b.synchronize();
    ms.push_back(a.elapsed_time(b));
  }
  return median(ms);
}

nlohmann::json bench_kernels() {
  QLORA_REQUIRE(at::hasCUDA(), "bench --kernels needs a CUDA GPU");
  const at::Device dev(at::kCUDA, 0);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(dev);
  nlohmann::json j;

  // 1. Copy bandwidth: 2 GiB device to device, bytes read + written.
  {
    auto src = at::randint(0, 255, {int64_t{2} << 30}, at::TensorOptions().dtype(at::kByte).device(dev));
    auto dst = at::empty_like(src);
    const double ms = time_cuda([&] { dst.copy_(src); }, 3, 20);
    j["copy_gbps"] = 2.0 * src.numel() / (ms / 1e3) / 1e9;
  }
  fmt::print("device-to-device copy: {:.0f} GB/s (read + write)\n", j["copy_gbps"].get<double>());

  // 2. Dequantization of every projection of a 7B-shaped model (224 weights, 3.4 GB of 4-bit storage:
  //    far beyond L2, so the sweep measures memory, not cache).
  model::LlamaArch arch = named_arch("llama2-7b");
  for (bool dq : {false, true}) {
    std::vector<quant::Quantized4bit> ws;
    double bytes = 0;
    at::manual_seed(7);
    for (int64_t l = 0; l < arch.num_layers; ++l) {
      for (const char* kind : model::kProjectionKinds) {
        auto [out, in] = model::projection_shape(arch, kind);
        auto w = at::randn({out, in}, bf16).mul_(0.02);
        ws.push_back(quant::quantize_4bit(w, QuantType::NF4, 64, dq));
        const auto& q = ws.back();
        const double n = static_cast<double>(out * in);
        // Bytes the kernel must move: packed nibbles + per-block scales (+ nested scales) + bf16 output.
        bytes += n / 2 + q.absmax.numel() * q.absmax.element_size() +
                 (dq ? q.nested_absmax.numel() * 4.0 : 0.0) + 2.0 * n;
      }
    }
    const double ms = time_cuda([&] {
      for (const auto& q : ws) (void)quant::dequantize_4bit(q, at::kBFloat16);
    }, 2, 7);
    const double gbps = bytes / (ms / 1e3) / 1e9;
    const std::string key = dq ? "dequant_dq" : "dequant";
    j[key] = {{"ms", ms}, {"gbps", gbps}, {"of_copy", gbps / j["copy_gbps"].get<double>()}};
    fmt::print("dequant 7B projections nf4{} -> bf16: {:.2f} ms, {:.0f} GB/s = {:.1f}% of copy\n",
               dq ? "+dq" : "", ms, gbps, 100.0 * gbps / j["copy_gbps"].get<double>());
  }
  c10::cuda::CUDACachingAllocator::emptyCache();

  // 3. Frozen 4-bit linear vs bf16 linear, forward + backward (input gradient), per shape and token count.
  //    "frozen" bf16: W without gradient (2 GEMMs, what LoRA on a bf16 base runs); "trainable": nn.Linear
  //    with its weight gradient (3 GEMMs), for reference.
  j["linear"] = nlohmann::json::array();
  fmt::print("\n{:>7} {:>13} {:>11} {:>13} {:>16} {:>12}\n", "tokens", "in -> out", "4-bit ms", "bf16 ms",
             "bf16 (dW) ms", "4-bit/bf16");
  for (int64_t tokens : {2048, 8192}) {
    for (auto [in, out] : std::vector<std::pair<int64_t, int64_t>>{{4096, 4096}, {4096, 11008}, {11008, 4096}}) {
      auto w = at::randn({out, in}, bf16).mul_(0.02);
      auto q = quant::quantize_4bit(w, QuantType::NF4, 64, true);
      auto x = at::randn({tokens, in}, bf16).requires_grad_(true);
      auto g = at::randn({tokens, out}, bf16);
      auto ours = [&] {
        auto y = quant::linear_4bit(x, q);
        y.backward(g);
        x.mutable_grad() = at::Tensor();
      };
      auto dense = [&](const at::Tensor& wt) {
        auto y = at::linear(x, wt);
        y.backward(g);
        x.mutable_grad() = at::Tensor();
        if (wt.requires_grad()) wt.mutable_grad() = at::Tensor();
      };
      const double t4 = time_cuda(ours, 3, 20);
      const double tf = time_cuda([&] { dense(w); }, 3, 20);
      auto wt = w.clone().requires_grad_(true);
      const double tt = time_cuda([&] { dense(wt); }, 3, 20);
      j["linear"].push_back({{"tokens", tokens}, {"in", in}, {"out", out}, {"ms_4bit", t4}, {"ms_bf16", tf},
                             {"ms_bf16_dw", tt}, {"ratio", t4 / tf}});
      fmt::print("{:>7} {:>13} {:>11.3f} {:>13.3f} {:>16.3f} {:>12.3f}\n", tokens, fmt::format("{} -> {}", in, out),
                 t4, tf, tt, t4 / tf);
    }
  }
  c10::cuda::CUDACachingAllocator::emptyCache();

  // 4. Memory after loading the 7B shape (streamed: drawn, quantized and freed projection by projection).
  for (bool dq : {false, true}) {
    const int64_t before = allocated_bytes(dev, false);
    reset_peak(dev);
    model::LoadOptions lo;
    lo.device = dev;
    lo.dtype = at::kBFloat16;
    lo.quantize = true;
    lo.double_quant = dq;
    auto m = model::init_llama(arch, lo, 1, /*draw_on_device=*/true);
    sync(dev);
    const double got = static_cast<double>(allocated_bytes(dev, false) - before);
    const double peak = static_cast<double>(allocated_bytes(dev, true) - before);
    const double proj = static_cast<double>(arch.num_layers) * arch.projection_params_per_layer();
    // Theory: 4 bits + one float32 scale per 64 (4.5 bits), or one uint8 scale per 64 plus a float32 per
    // 256 x 64 (4 + 8/64 + 32/16384 = 4.127 bits); everything else in bf16.
    const double bits = dq ? 4.0 + 8.0 / 64 + 32.0 / (64 * 256) : 4.5;
    const double theory = proj * bits / 8 + 2.0 * (arch.total_params() - proj);
    const std::string key = dq ? "load_7b_dq" : "load_7b";
    j[key] = {{"bytes", got}, {"theory", theory}, {"ratio", got / theory}, {"peak", peak}};
    fmt::print("\nload 7B nf4{}: {:.3f} GiB on the device, theory {:.3f} GiB (ratio {:.4f}); peak while loading "
               "{:.3f} GiB\n", dq ? "+dq" : "", got / 1073741824.0, theory / 1073741824.0, got / theory,
               peak / 1073741824.0);
  }
  return j;
}
#endif

}  // namespace

Runner add_bench(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "Measure training-step speed and memory, or the 4-bit kernels (--kernels)");
  auto so = std::make_shared<StepOptions>();
  auto kernels = std::make_shared<bool>(false);
  auto ckpt = std::make_shared<std::string>("on");
  // An option that takes one of `choices` (the value the JSON and the header line echo), and a switch.
  auto one_of = [&](const char* name, std::string& value, const std::string& help,
                    std::vector<std::string> choices) {
    cmd->add_option(name, value, help)->check(CLI::IsMember(std::move(choices)))->capture_default_str();
  };
  auto on_off = [&](const char* name, std::string& value, const std::string& help) {
    one_of(name, value, help + ": on | off", {"on", "off"});
  };
  cmd->add_option("--shape", so->shape, "llama2-7b | llama2-13b | llama3-8b | tiny")->capture_default_str();
  cmd->add_option("--r", so->r, "LoRA rank (all seven projections, alpha = 2r)")->capture_default_str();
  cmd->add_option("--lora-dropout", so->lora_dropout, "LoRA dropout on every adapter's input (the recipe's: 0.1)")
      ->capture_default_str();
  one_of("--lora-dropout-masks", so->lora_dropout_masks,
         "LoRA dropout's masks on CUDA: counters (a group's members in one pass, 1 bit an element kept) | "
         "aten (ATen's dropout, a byte mask kept per adapter)",
         {"counters", "aten"});
  one_of("--lora-dropout-mm", so->lora_dropout_mm,
         "With counters: x A^T and dA by kernels that mask x as it loads (kernels) | from dropped copies of "
         "x (copies)",
         {"kernels", "copies"});
  one_of("--lora-dropout-dx", so->lora_dropout_dx,
         "With counters: the input gradient through the masks by one kernel (kernel) | each member's product "
         "written by cuBLAS, then summed through the masks (two-pass)",
         {"kernel", "two-pass"});
  one_of("--base", so->base, "Frozen base: nf4 (QLoRA) or bf16 (LoRA)", {"nf4", "bf16"});
  cmd->add_option("--seq", so->seq, "Sequence length")->capture_default_str();
  cmd->add_option("--batch", so->batch, "Sequences per step")->capture_default_str();
  cmd->add_option("--segments", so->segments,
                  "Examples packed into each row, of equal length (their positions restart at 0)")
      ->capture_default_str();
  cmd->add_option("--padding", so->padding,
                  "The last N tokens of each row are padding: masked, unlabelled and not counted in tokens/s")
      ->capture_default_str();
  one_of("--checkpointing", *ckpt,
         "Gradient checkpointing: on (= selective, the trainer's default) | off | full (layer inputs only)",
         {"on", "selective", "off", "full"});
  cmd->add_option("--checkpoint-layers", so->checkpoint_layers,
                  "How many decoder layers recompute (the first N; model.gradient_checkpointing_layers): -1 = all")
      ->check(CLI::Range(int64_t{-1}, std::numeric_limits<int64_t>::max()))
      ->capture_default_str();
  one_of("--fused", so->fused,
         "Fused projection groups: auto (on CUDA) | on | off (per-projection modules)",
         {"auto", "on", "off"});
  on_off("--fold", so->fold,
         "Adapters folded into the base GEMM's K dimension where the input's producer leaves room (off: the B "
         "products written first, the base GEMM accumulating onto them)");
  one_of("--lora-grad", so->lora_grad,
         "The backward's adapter products dxa and dB: kernel (one pass over dy) | cublas (dy bd, then a "
         "GEMM per dB)",
         {"kernel", "cublas"});
  one_of("--ahead", so->ahead,
         "Dequantization ahead on a second stream: low (below the step's stream) | even (the "
         "same priority, the step on the default stream) | high (above it) | off",
         {"low", "even", "high", "off"});
  cmd->add_option("--ahead-depth", so->ahead_depth, "How many projection groups are dequantized ahead")
      ->check(CLI::Range(1, 8))
      ->capture_default_str();
  on_off("--keep-attention", so->keep_attention,
         "Selective checkpointing keeps each layer's attention output where cuDNN or flash attention by "
         "segments computes it, so the recomputation skips the attention's forward");
  on_off("--grouped-attention", so->grouped_attention,
         "Grouped-query attention (fewer k/v heads than query heads) hands the grouped k and v to cuDNN as they "
         "are (on), or repeats them to every query head first (off)");
  cmd->add_option("--warmup", so->warmup, "Untimed steps first")->capture_default_str();
  cmd->add_option("--steps", so->steps, "Timed steps")->capture_default_str();
  on_off("--segment-attention", so->segment_attention,
         "Packed or padded rows attend by segments through flash attention's variable-length kernels (on the GPU "
         "in 16-bit), or through a dense mask (off)");
  on_off("--cuda-graph", so->cuda_graph,
         "Capture the step as one CUDA graph after the warm-up and replay it (static shapes; measures what the "
         "host's launches cost; needs --ahead low or high, and no LoRA dropout under checkpointing)");
  on_off("--pipeline", so->pipeline,
         "Queue each step before reading the previous one's loss, as the trainer does (on), or wait for every "
         "step at its end (off)");
  one_of("--device", so->device, "auto | cuda | cpu", {"auto", "cuda", "cpu"});
  cmd->add_flag("--kernels", *kernels, "Benchmark the 4-bit kernels instead (GPU)");
  cmd->add_option("--json", so->json, "Also write the figures as JSON to this file");
  cmd->add_flag("--profile-gpu-only", so->profile_gpu_only,
                "With --profile: record the GPU's activities only (the CPU's op records slow the step's issue ~3x)");
  cmd->add_option("--profile", so->profile,
                  "Profile one more step: print its busiest kernels, write its trace (Chrome JSON) to this file");
  return [so, kernels, ckpt]() {
    so->checkpointing = *ckpt == "off"    ? Checkpointing::Off
                        : *ckpt == "full" ? Checkpointing::Full
                                          : Checkpointing::Selective;
    nlohmann::json j;
    if (*kernels) {
#ifdef QLORA_WITH_CUDA
      j = bench_kernels();
#else
      fail("bench --kernels: this build has no CUDA kernels");
#endif
    } else {
      const dist::Env env = dist::env_from();
      j = bench_step(*so, env);
      if (env.rank != 0) return 0;  // rank 0 writes for the ranks
    }
    if (!so->json.empty()) write_file_atomic(so->json, j.dump(2) + "\n");
    return 0;
  };
}

}  // namespace qlora::cli
