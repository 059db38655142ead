// Gradient checkpointing (per-layer recomputation in backward) changes memory, never results: the LoRA
// gradients of one QLoRA step are the same with it off, selective and full, in every layer or in the first
// few only (model.gradient_checkpointing_layers), selective taking each layer's attention output kept from
// the forward where cuDNN or flash attention by segments runs it (and counted doing so), on a fresh random
// tiny model, with LoRA dropout on (so the recomputation must replay the RNG) and with and without a padding
// mask (the plain causal path passes no mask at all). On the CPU in float32, and on a GPU in bfloat16 where
// there is one. The padding mask is passed on the CPU, as the trainer passes it: on the GPU the padded rows
// then take the attention by segments (llama.h's AttentionMask), kept like the plain causal one.
// Also on a GPU: a training step queued from the CPU batch (padded, packed rows) never waits for the GPU
// (CUDA's sync debug mode set to error), and gives the step of the same batch passed on the device (which
// takes the dense mask); and the attention by segments gives the dense mask's loss and LoRA gradients on a
// batch of packed and padded rows, with and without checkpointing. A padding-free batch (the rows end to end)
// gives the padded batch's loss and gradients, on the CPU and on a GPU. Grouped-query attention with the grouped k
// and v handed to cuDNN gives the step of k and v repeated to every query head (GPU).
#include <gtest/gtest.h>

#include <ATen/SDPBackend.h>

#include <cmath>
#include <random>
#include <set>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "tests/test_util.h"
#include "trainer/lora/lora.h"
#include "trainer/model/loader.h"
#include "trainer/train/optim.h"
#include "trainer/train/trainer.h"

namespace qlora {
namespace {

model::LlamaArch tiny_arch() {
  model::LlamaArch a;
  a.hidden_size = 96, a.intermediate_size = 192, a.num_layers = 3, a.num_heads = 6, a.num_kv_heads = 2;
  a.head_dim = 16, a.vocab_size = 200, a.max_position_embeddings = 128, a.rms_norm_eps = 1e-5;
  return a;
}

// How many checkpointed layers the graph behind `out` holds (the nodes of CheckpointedLayer).
int64_t checkpointed_nodes(const at::Tensor& out) {
  std::vector<torch::autograd::Node*> todo{out.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  int64_t n = 0;
  while (!todo.empty()) {
    torch::autograd::Node* node = todo.back();
    todo.pop_back();
    if (!node || !seen.insert(node).second) continue;
    n += node->name().find("CheckpointedLayer") != std::string::npos;
    for (const auto& e : node->next_edges()) todo.push_back(e.function.get());
  }
  return n;
}

// The tiny model, NF4 base, LoRA r 4 on every projection with `dropout`, drawn from `seed`; with draw_b the
// B's too (PEFT starts them at zero, which would make every lora_A gradient zero).
model::LlamaForCausalLM tiny_qlora(at::Device dev, at::ScalarType dtype, uint64_t seed, double dropout,
                                   bool draw_b) {
  model::LoadOptions o;
  o.device = dev;
  o.dtype = dtype;
  o.quantize = true;
  auto m = model::init_llama(tiny_arch(), o, seed);
  LoraConfig lc;
  lc.r = 4, lc.alpha = 8, lc.dropout = dropout;
  lora::apply_lora(*m, lc, seed);
  if (draw_b) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
    for (auto& [name, p] : lora::lora_named_parameters(*m)) {
      at::NoGradGuard g;
      if (name.find("lora_B") != std::string::npos) p.copy_(at::randn(p.sizes(), gen, at::kFloat).mul_(0.05));
    }
  }
  m->train();
  return m;
}

// One backward of the mean loss on a batch: the loss sum first, then every LoRA gradient, as doubles on the CPU.
std::vector<at::Tensor> loss_and_grads(model::LlamaForCausalLMImpl& m, const at::Tensor& ids, const at::Tensor& mask,
                                       const at::Tensor& pos, const at::Tensor& labels) {
  const at::Tensor hidden = m.hidden_states(ids, mask, pos);
  auto [sum, n] = train::causal_lm_loss_sum(m, hidden, labels);
  (sum / static_cast<double>(n)).backward();
  std::vector<at::Tensor> out{sum.detach().cpu().to(at::kDouble)};
  for (auto& [name, p] : lora::lora_named_parameters(m)) out.push_back(p.grad().detach().cpu().to(at::kDouble));
  return out;
}

// loss_and_grads of two ways to the same step: the losses within `tol` relative, every gradient (none all
// zero) within `tol` relative error. Returns the worst gradient's.
double expect_same_step(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& want, double tol) {
  EXPECT_EQ(got.size(), want.size());
  EXPECT_NEAR(got[0].item<double>(), want[0].item<double>(), tol * std::abs(want[0].item<double>()));
  double worst = 0;
  for (size_t i = 1; i < want.size() && i < got.size(); ++i) {
    EXPECT_GT(want[i].abs().max().item<double>(), 0.0) << i << ": zero gradient proves nothing";
    worst = std::max(worst, test::rel_err(got[i], want[i]));
  }
  EXPECT_LE(worst, tol);
  return worst;
}

// LoRA gradients (by name) of one loss.backward() on a fixed batch. Everything random is drawn from
// `seed`, so two calls differ only in `checkpointing` and in how many layers recompute (`layers`, -1 = all).
std::vector<std::pair<std::string, at::Tensor>> lora_grads(at::Device dev, at::ScalarType dtype, Checkpointing checkpointing,
                                                           bool padded, uint64_t seed, int64_t layers = -1) {
  auto m = tiny_qlora(dev, dtype, seed, /*dropout=*/0.2, /*draw_b=*/true);
  m->set_gradient_checkpointing(checkpointing, layers);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 2);
  const int64_t B = 3, T = 40;
  auto ids = at::randint(3, 200, {B, T}, gen, at::kLong);
  auto mask = at::ones({B, T}, at::kLong);
  if (padded) mask.index_put_({1, at::indexing::Slice(T - 11, at::indexing::None)}, 0);
  auto labels = ids.clone().masked_fill_(mask.eq(0), -100);
  labels.index_put_({at::indexing::Slice(), at::indexing::Slice(0, 5)}, -100);  // a "prompt"

  at::manual_seed(seed + 2);  // the dropout masks
  auto hidden = m->hidden_states(ids.to(dev), padded ? mask : at::Tensor());
  const int64_t all = tiny_arch().num_layers;
  EXPECT_EQ(checkpointed_nodes(hidden),
            checkpointing == Checkpointing::Off ? 0 : layers < 0 ? all : std::min(layers, all));
  auto [sum, n] = train::causal_lm_loss_sum(*m, hidden, labels);
  (sum / static_cast<double>(n)).backward();
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [name, p] : lora::lora_named_parameters(*m)) {
    EXPECT_TRUE(p.grad().defined()) << name;
    out.emplace_back(name, p.grad().detach().to(at::kCPU, at::kDouble));
  }
  return out;
}

// Whether SDPA runs the tiny model's plain causal attention on cuDNN on `dev` (then selective checkpointing
// keeps its output: llama.h's kept_attention_uses).
bool sdpa_picks_cudnn(at::Device dev, at::ScalarType dtype) {
  if (!dev.is_cuda()) return false;
  const auto a = tiny_arch();
  const int64_t t = 40;
  auto q = at::randn({1, t, a.num_heads, a.head_dim}, at::TensorOptions().dtype(dtype).device(dev)).transpose(1, 2);
  return at::_fused_sdp_choice(q, q, q, {}, 0.0, true, 1.0 / std::sqrt(static_cast<double>(a.head_dim))) ==
         static_cast<int64_t>(at::SDPBackend::cudnn_attention);
}

void compare(at::Device dev, at::ScalarType dtype, double tol) {
  const bool cudnn = sdpa_picks_cudnn(dev, dtype);
  std::printf("%s: SDPA's plain causal attention %s cuDNN\n", dev.str().c_str(), cudnn ? "runs on" : "does not run on");
  for (bool padded : {false, true}) {
    const uint64_t seed = std::random_device{}();
    auto off = lora_grads(dev, dtype, Checkpointing::Off, padded, seed);
    // Every layer recomputing, and some of them only (the others keep their activations).
    for (auto [mode, layers] : {std::pair{Checkpointing::Selective, int64_t{-1}}, {Checkpointing::Full, int64_t{-1}},
                                {Checkpointing::Selective, int64_t{1}}, {Checkpointing::Full, int64_t{2}}}) {
      const int64_t kept0 = model::kept_attention_uses();
      auto on = lora_grads(dev, dtype, mode, padded, seed, layers);
      // Selective recomputation took each recomputed layer's attention output kept from the forward, where
      // cuDNN ran the plain causal attention (no padding mask), and where the padded rows attended by segments
      // (on a GPU in 16-bit: attention_layout).
      const int64_t recomputed = layers < 0 ? tiny_arch().num_layers : std::min(layers, tiny_arch().num_layers);
      const bool by_segments = padded && dev.is_cuda() && dtype != at::kFloat;
      EXPECT_EQ(model::kept_attention_uses() - kept0,
                mode == Checkpointing::Selective && (padded ? by_segments : cudnn) ? recomputed : 0)
          << to_string(mode) << " in " << layers << " layers" << (padded ? " (padded)" : " (causal)");
      ASSERT_EQ(off.size(), on.size());
      double worst = 0;
      for (size_t i = 0; i < off.size(); ++i) {
        ASSERT_EQ(off[i].first, on[i].first);
        ASSERT_GT(off[i].second.abs().max().item<double>(), 0.0) << off[i].first << ": zero gradient proves nothing";
        const double e = test::rel_err(on[i].second, off[i].second);
        worst = std::max(worst, e);
        EXPECT_LE(e, tol) << off[i].first << " " << to_string(mode) << " in " << layers << " layers"
                          << (padded ? " (padded)" : " (causal)") << " seed " << seed;
      }
      std::printf("checkpointing %s in %lld layers vs off, %s %s %s: worst relative gradient difference %.3g over %zu "
                  "tensors\n", to_string(mode).c_str(), static_cast<long long>(layers), dev.str().c_str(),
                  c10::toString(dtype), padded ? "padded" : "causal", worst, off.size());
    }
  }
}

// CPU float32: the recomputation runs the same kernels on the same inputs in the same order, so the
// gradients agree to the bit; 1e-6 leaves room only for a summation-order change inside a kernel.
TEST(GradientCheckpointing, SameGradientsCpu) { compare(at::kCPU, at::kFloat, 1e-6); }

// GPU bfloat16: same argument, but cuBLAS/SDPA may pick another algorithm between the two runs and bf16
// keeps 8 bits of mantissa (unit roundoff 2^-9 = 2e-3); one such rounding per element through a few
// layers stays well under 1e-2, the bound METHOD.md gives for bf16 operands.
TEST(GradientCheckpointing, SameGradientsGpuBf16) {
  QLORA_SKIP_WITHOUT_CUDA();
  compare(at::Device(at::kCUDA, 0), at::kBFloat16, 1e-2);
}

// A padding-free batch (data.padding_free: the rows end to end in one row, data::collate_flat) gives the padded
// batch's loss and LoRA gradients: the same examples, each attending only to itself either way. On the CPU
// (float32, dense masks; summation order may differ) and on a GPU (bfloat16, by segments).
void padding_free_matches_padded(at::Device dev, at::ScalarType dtype, double tol) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(41);
  // Three rows: a long example, a row packing two, a short one; a "prompt" without loss in each example.
  std::vector<data::Example> rows(3);
  const std::vector<std::vector<int64_t>> lengths = {{37}, {12, 16}, {9}};
  for (size_t r = 0; r < rows.size(); ++r) {
    for (int64_t len : lengths[r]) {
      rows[r].segment_starts.push_back(static_cast<int32_t>(rows[r].ids.size()));
      const at::Tensor ids = at::randint(3, 200, {len}, gen, at::kLong);
      for (int64_t i = 0; i < len; ++i) {
        rows[r].ids.push_back(static_cast<int32_t>(ids[i].item<int64_t>()));
        rows[r].labels.push_back(i < 3 ? data::kIgnore : rows[r].ids.back());
      }
    }
  }
  const std::vector<const data::Example*> ptrs = {&rows[0], &rows[1], &rows[2]};
  auto run = [&](const data::Batch& b) {
    // No dropout: its masks would be drawn over another layout.
    auto m = tiny_qlora(dev, dtype, 43, /*dropout=*/0.0, /*draw_b=*/true);
    return loss_and_grads(*m, b.input_ids, b.attention_mask, b.position_ids, b.labels);
  };
  const data::Batch padded = data::collate(ptrs, 0), flat = data::collate_flat(ptrs);
  ASSERT_EQ(flat.input_ids.size(0), 1);
  ASSERT_EQ(padded.tokens, flat.tokens);
  const auto a = run(padded), b = run(flat);
  const double worst = expect_same_step(b, a, tol);
  std::printf("padding-free against padded, %s %s: loss sum %.6f / %.6f, worst relative LoRA gradient difference "
              "%.3g\n", dev.str().c_str(), c10::toString(dtype), b[0].item<double>(), a[0].item<double>(), worst);
}

TEST(PaddingFree, SameLossAndGradientsAsPaddedRowsCpu) { padding_free_matches_padded(at::kCPU, at::kFloat, 1e-5); }

TEST(PaddingFree, SameLossAndGradientsAsPaddedRowsGpuBf16) {
  QLORA_SKIP_WITHOUT_CUDA();
  padding_free_matches_padded(at::Device(at::kCUDA, 0), at::kBFloat16, 2e-2);
}

#ifdef QLORA_WITH_CUDA
// loss_and_grads of one bf16 step of the tiny QLoRA model (drawn from `seed`, LoRA dropout 0.1) on the GPU under
// `mode`, with one of llama.h's switches set to `on` for the step and back to its default (on) after. The dropout
// masks come from one fixed seed, so two calls that differ in the switch draw the same masks.
std::vector<at::Tensor> gpu_step_with(void (*set)(bool), bool on, uint64_t seed, Checkpointing mode,
                                      const at::Tensor& ids, const at::Tensor& mask, const at::Tensor& pos,
                                      const at::Tensor& labels) {
  set(on);
  auto m = tiny_qlora(at::Device(at::kCUDA, 0), at::kBFloat16, seed, /*dropout=*/0.1, /*draw_b=*/true);
  m->set_gradient_checkpointing(mode);
  at::manual_seed(5);
  auto out = loss_and_grads(*m, ids, mask, pos, labels);
  set(true);
  return out;
}

// bf16 on both sides, flash attention's variable-length kernels against SDPA with the dense mask: a few
// roundings apart, well under the 2e-2 of this file's other bf16 comparisons of a whole step.
TEST(SegmentAttention, MatchesTheDenseMask) {
  QLORA_SKIP_WITHOUT_CUDA();
  using at::indexing::None;
  using at::indexing::Slice;
  const at::Device dev(at::kCUDA, 0);
  const int64_t B = 3, T = 40;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  const at::Tensor ids = at::randint(3, 200, {B, T}, gen, at::kLong);
  // Row 0 packs three examples (positions restart at 12 and 30), row 1 two and then 6 of padding (whose
  // positions go on counting, as the batcher's do), row 2 is one whole example.
  at::Tensor mask = at::ones({B, T}, at::kLong), pos = at::arange(T, at::kLong).repeat({B, 1});
  pos.index_put_({0, Slice(12, 30)}, at::arange(18, at::kLong));
  pos.index_put_({0, Slice(30, None)}, at::arange(10, at::kLong));
  pos.index_put_({1, Slice(15, None)}, at::arange(T - 15, at::kLong));
  mask.index_put_({1, Slice(T - 6, None)}, 0);
  at::Tensor labels = ids.clone().masked_fill_(mask.eq(0), -100);
  labels.index_put_({Slice(), Slice(0, 3)}, -100);

  const model::AttentionMask layout =
      model::attention_layout(mask, pos, B, T, 0, dev, at::kBFloat16, tiny_arch().head_dim);
  ASSERT_TRUE(layout.offsets.defined() && !layout.dense.defined());
  const at::Tensor offsets = layout.offsets.cpu();
  EXPECT_EQ(std::vector<int32_t>(offsets.data_ptr<int32_t>(), offsets.data_ptr<int32_t>() + offsets.numel()),
            (std::vector<int32_t>{0, 12, 30, 40, 55, 74, 80, 120}));
  EXPECT_EQ(layout.longest, 40);
  model::set_segment_attention(false);
  EXPECT_TRUE(model::attention_layout(mask, pos, B, T, 0, dev, at::kBFloat16, tiny_arch().head_dim).dense.defined());
  model::set_segment_attention(true);

  for (Checkpointing mode : {Checkpointing::Off, Checkpointing::Selective, Checkpointing::Full}) {
    SCOPED_TRACE(to_string(mode));
    auto run = [&](bool segments) {
      return gpu_step_with(model::set_segment_attention, segments, 23, mode, ids, mask, pos, labels);
    };
    const int64_t kept0 = model::kept_attention_uses();
    const auto by_segments = run(true);
    // Selective recomputation took every layer's attention by segments kept from the forward.
    EXPECT_EQ(model::kept_attention_uses() - kept0, mode == Checkpointing::Selective ? tiny_arch().num_layers : 0);
    const auto dense = run(false);
    const double worst = expect_same_step(by_segments, dense, 2e-2);
    std::printf("segments against the dense mask, checkpointing %s: loss %.6f / %.6f, worst relative LoRA gradient "
                "difference %.3g over %zu tensors\n", to_string(mode).c_str(), by_segments[0].item<double>(),
                dense[0].item<double>(), worst, dense.size() - 1);
  }
}

// Grouped-query attention (the tiny model: 6 query heads over 2 key/value heads) with the grouped k and v handed to
// cuDNN (llama.h's set_grouped_attention) gives the step that k and v repeated to every query head first gives (HF's
// repeat_kv, the path before): the same kernels over the same values, the k/v heads' gradients summed inside cuDNN
// instead of by autograd's expand backward, so a few bf16 roundings apart at most (this file's 2e-2 of a whole
// step); with and without checkpointing, and counted as taken wherever SDPA picks cuDNN for grouped heads.
TEST(GroupedAttention, MatchesRepeatedKeysAndValuesGpuBf16) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  const auto a = tiny_arch();
  ASSERT_LT(a.num_kv_heads, a.num_heads);
  const int64_t B = 2, T = 40;
  auto q = at::randn({B, T, a.num_heads, a.head_dim}, at::TensorOptions().dtype(at::kBFloat16).device(dev));
  auto kv = q.narrow(2, 0, a.num_kv_heads);
  const bool cudnn = at::_fused_sdp_choice(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), {}, 0.0, true,
                                           1.0 / std::sqrt(static_cast<double>(a.head_dim)), /*enable_gqa=*/true) ==
                     static_cast<int64_t>(at::SDPBackend::cudnn_attention);
  std::printf("SDPA %s cuDNN for grouped k and v\n", cudnn ? "picks" : "does not pick");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(29);
  const at::Tensor ids = at::randint(3, 200, {B, T}, gen, at::kLong);
  at::Tensor labels = ids.clone();
  labels.index_put_({at::indexing::Slice(), at::indexing::Slice(0, 4)}, -100);
  for (Checkpointing mode : {Checkpointing::Off, Checkpointing::Selective, Checkpointing::Full}) {
    SCOPED_TRACE(to_string(mode));
    auto run = [&](bool grouped) {
      return gpu_step_with(model::set_grouped_attention, grouped, 31, mode, ids, at::Tensor(), at::Tensor(), labels);
    };
    const int64_t uses0 = model::grouped_attention_uses();
    const auto grouped = run(true);
    // Every layer's forward, and each recomputed layer's forward again.
    const int64_t calls = a.num_layers * (mode == Checkpointing::Off ? 1 : 2);
    EXPECT_EQ(model::grouped_attention_uses() - uses0, cudnn ? calls : 0);
    const int64_t uses1 = model::grouped_attention_uses();
    const auto repeated = run(false);
    EXPECT_EQ(model::grouped_attention_uses(), uses1);
    const double worst = expect_same_step(grouped, repeated, 2e-2);
    std::printf("grouped k and v against repeated, checkpointing %s: loss %.6f / %.6f, worst relative LoRA gradient "
                "difference %.3g over %zu tensors\n", to_string(mode).c_str(), grouped[0].item<double>(),
                repeated[0].item<double>(), worst, repeated.size() - 1);
  }
}

// Errors out of any synchronizing CUDA call (an .item(), a copy from pageable memory) while it lives.
struct NoWaitGuard {
  NoWaitGuard() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR); }
  ~NoWaitGuard() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED); }
};

TEST(TrainingStep, QueuedFromTheCpuBatchWithoutWaiting) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  for (Checkpointing mode : {Checkpointing::Off, Checkpointing::Selective}) {
    SCOPED_TRACE(to_string(mode));
    // The batch as the batcher makes it, on the CPU: row 0 packs two examples (positions restart at 0),
    // row 1 ends in padding; a prompt without labels.
    const int64_t B = 2, T = 32;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
    const at::Tensor ids = at::randint(3, 200, {B, T}, gen, at::kLong);
    at::Tensor mask = at::ones({B, T}, at::kLong), pos = at::arange(T, at::kLong).repeat({B, 1});
    mask.index_put_({1, at::indexing::Slice(T - 7, at::indexing::None)}, 0);
    pos.index_put_({0, at::indexing::Slice(20, at::indexing::None)}, at::arange(T - 20, at::kLong));
    at::Tensor labels = ids.clone().masked_fill_(mask.eq(0), -100);
    labels.index_put_({at::indexing::Slice(), at::indexing::Slice(0, 4)}, -100);

    auto step = [&](bool cpu_batch) {
      auto m = tiny_qlora(dev, at::kBFloat16, 31, /*dropout=*/0.1, /*draw_b=*/false);
      m->set_gradient_checkpointing(mode);
      at::manual_seed(5);  // the dropout masks: the same in both steps
      auto params = lora::lora_named_parameters(*m);
      train::AdamW opt(params, train::AdamWOptions{1e-3, 0.9, 0.999, 1e-8, 0.0});
      at::Tensor status;
      {
        std::optional<NoWaitGuard> no_wait;
        if (cpu_batch) no_wait.emplace();
        const at::Tensor hidden = cpu_batch ? m->hidden_states(ids, mask, pos)
                                            : m->hidden_states(ids.to(dev), mask.to(dev), pos.to(dev));
        auto [sum, n] = train::causal_lm_loss_sum(*m, hidden, labels);
        (sum / static_cast<double>(n)).backward();
        status = train::queue_update(opt, params, 1.0, 1e-3, sum.detach());
      }
      return status.cpu().to(at::kDouble);  // [loss sum, gradient norm]
    };
    at::Tensor queued, reference;
    ASSERT_NO_THROW(queued = step(true)) << "the step waited for the GPU";
    reference = step(false);
    // The same step: loss and gradient norm (cuDNN's attention backward is not deterministic, so within
    // bf16's rounding rather than bit for bit).
    for (int i = 0; i < 2; ++i) {
      const double q = queued[i].item<double>(), r = reference[i].item<double>();
      EXPECT_TRUE(std::isfinite(q) && r > 0) << i;
      EXPECT_NEAR(q, r, 1e-2 * r) << (i == 0 ? "loss" : "gradient norm");
    }
  }
}
#endif

}  // namespace
}  // namespace qlora
