// The fused path (trainer/model/fused.h) against the per-projection modules it replaces, on a tiny QLoRA
// model (NF4 + double quant, GQA, LoRA on all seven projections with non-zero B so every branch counts):
// logits, loss and every adapter gradient, with and without gradient checkpointing, with LoRA dropout,
// and in eval mode. The per-projection path is itself checked against transformers + PEFT (test_lora),
// so this closes the chain. CPU float32 in CI; on a GPU also bfloat16, and the RoPE-split and packed
// SwiGLU kernels bit for bit against the composite they replace.
#include <gtest/gtest.h>

#include <random>

#include <torch/csrc/autograd/autograd.h>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include "tests/test_util.h"
#include "trainer/lora/lora.h"
#include "trainer/model/fused.h"
#include "trainer/model/loader.h"

namespace qlora {
namespace {

struct ModeGuard {
  model::FusedMode saved = model::fused_mode();
  explicit ModeGuard(model::FusedMode m) { model::set_fused_mode(m); }
  ~ModeGuard() { model::set_fused_mode(saved); }
};

model::LlamaArch tiny_arch() {
  model::LlamaArch a;
  // Widths are multiples of the 64-wide quantization blocks; GQA (4 query heads over 2 kv heads).
  a.hidden_size = 128, a.intermediate_size = 320, a.num_layers = 2, a.num_heads = 4, a.num_kv_heads = 2;
  a.head_dim = 32, a.vocab_size = 300, a.rms_norm_eps = 1e-5, a.max_position_embeddings = 256;
  return a;
}

struct StepResult {
  at::Tensor logits;                 // [B, T, V] float32 on the CPU
  at::Tensor loss;                   // scalar
  std::vector<at::Tensor> grads;     // every lora_A / lora_B gradient, float32 on the CPU
};

using enum Checkpointing;  // Off, Selective, Full
const Checkpointing kCheckpointing[] = {Off, Selective, Full};

// "", ", selective checkpointing", ", full checkpointing"
std::string label(Checkpointing c) { return c == Off ? "" : ", " + to_string(c) + " checkpointing"; }

const std::vector<std::string> kAllProjections{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"};

// The tiny QLoRA model (same seed, same weights and adapters), with every lora_B drawn non-zero: PEFT
// starts B at zero, which would leave the branches (and their gradients into A) out of every check.
model::LlamaForCausalLM make_model(at::Device dev, at::ScalarType dt, double dropout,
                                   std::vector<std::string> targets = kAllProjections, int64_t r = 4) {
  model::LoadOptions lo;
  lo.device = dev;
  lo.dtype = dt;
  lo.quantize = true;
  lo.double_quant = true;
  auto m = model::init_llama(tiny_arch(), lo, /*seed=*/77);
  LoraConfig lc;
  lc.r = r, lc.alpha = 2.0 * static_cast<double>(r), lc.dropout = dropout;
  lc.target_modules = std::move(targets);
  lora::apply_lora(*m, lc, /*seed=*/5);
  at::NoGradGuard ng;
  auto g = at::make_generator<at::CPUGeneratorImpl>(99);
  for (auto& [name, l] : lora::lora_modules(*m)) l->lora_b().copy_(at::randn(l->lora_b().sizes(), g) * 0.05);
  return m;
}

// One forward + backward of a fresh copy of the same model.
StepResult run_model(at::Device dev, at::ScalarType dt, model::FusedMode mode, Checkpointing checkpointing,
                     double dropout, bool train, uint64_t rng_seed,
                     std::vector<std::string> targets = kAllProjections, int64_t rank = 4) {
  ModeGuard guard(mode);
  auto arch = tiny_arch();
  auto m = make_model(dev, dt, dropout, std::move(targets), rank);
  m->set_gradient_checkpointing(checkpointing);
  if (train) m->train();
  else m->eval();
  auto g = at::make_generator<at::CPUGeneratorImpl>(3);
  at::Tensor ids = at::randint(0, arch.vocab_size, {2, 24}, g, at::kLong).to(dev);
  at::manual_seed(rng_seed);  // the dropout masks
  StepResult r;
  at::Tensor logits = m->forward(ids);
  at::Tensor loss = at::cross_entropy_loss(logits.reshape({-1, arch.vocab_size}).to(at::kFloat), ids.reshape(-1));
  if (train) {
    loss.backward();
    for (auto& [name, p] : lora::lora_named_parameters(*m)) r.grads.push_back(p.grad().cpu());
  }
  r.logits = logits.detach().to(at::kFloat).cpu();
  r.loss = loss.detach().cpu();
  return r;
}

void expect_close(const StepResult& a, const StepResult& b, double tol, const char* what) {
  const double el = test::rel_err(a.logits, b.logits);
  double eg = 0;
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i) {
    ASSERT_TRUE(a.grads[i].defined() && b.grads[i].defined()) << what << ": gradient " << i << " missing";
    ASSERT_GT(b.grads[i].abs().max().item<double>(), 0.0) << what << ": gradient " << i << " is zero";
    eg = std::max(eg, test::rel_err(a.grads[i], b.grads[i]));
  }
  std::printf("%s: logits rel err %.2e, worst adapter-gradient rel err %.2e (%zu gradients)\n", what, el, eg,
              a.grads.size());
  EXPECT_LE(el, tol) << what;
  EXPECT_LE(eg, tol) << what;
}

void expect_same_bits(const StepResult& a, const StepResult& b, const char* what) {
  EXPECT_TRUE(test::same_bits(a.logits, b.logits)) << what << ": logits";
  ASSERT_EQ(a.grads.size(), b.grads.size()) << what;
  for (size_t i = 0; i < a.grads.size(); ++i)
    EXPECT_TRUE(test::same_bits(a.grads[i], b.grads[i])) << what << ": gradient " << i;
}

// float32 tolerance: the two paths sum the same products in different orders (the LoRA branch inside the
// base GEMM, gradients through one GEMM per group): a few ulps of 2^-24 per accumulation over at most a few
// hundred terms, amplified by two layers and the softmax; 1e-5 relative leaves a wide margin over the
// ~1e-7 that such reorderings give, and any missing term (a branch, a scaling, a dropout mask) is >1e-2.
constexpr double kF32Tol = 1e-5;

TEST(FusedPath, MatchesModulesOnCpuFloat32) {
  const at::Device cpu(at::kCPU);
  for (Checkpointing ckpt : kCheckpointing) {
    StepResult ref = run_model(cpu, at::kFloat, model::FusedMode::Off, ckpt, 0.0, true, 1);
    const int64_t folded_before = model::folded_group_calls();
    StepResult got = run_model(cpu, at::kFloat, model::FusedMode::On, ckpt, 0.0, true, 1);
    expect_close(got, ref, kF32Tol, ("cpu f32" + label(ckpt)).c_str());
    // The adapters folded into the base GEMM where x's producer left room: q|k|v, gate|up and down in each
    // of the 2 layers' forward; again in the recomputation, but for down there when selective (its output
    // is not needed), and never o_proj (its input comes from attention).
    const int64_t folded = model::folded_group_calls() - folded_before;
    EXPECT_EQ(folded, ckpt == Off ? 6 : ckpt == Selective ? 10 : 12) << label(ckpt);
  }
}

// One group called directly, with x in a buffer that has room for x A^T (folded) and without (the B
// products written into y first): the same outputs, input gradient and adapter gradients; q|v adapted, k
// not (its rows of the block-diagonal operand are zero).
TEST(FusedPath, FoldedGroupMatchesUnfolded) {
  ModeGuard guard(model::FusedMode::On);
  auto m = make_model(at::kCPU, at::kFloat, 0.0, {"q_proj", "v_proj"});
  auto& attn = m->layer_list[0]->self_attn;
  const std::vector<const model::Linear*> group{attn->q_proj.get(), attn->k_proj.get(), attn->v_proj.get()};
  const int64_t spare = model::adapter_columns(group, at::zeros({1}));
  ASSERT_EQ(spare, 8);  // ranks 4 + 4, a multiple of 8
  auto g = at::make_generator<at::CPUGeneratorImpl>(6);
  const at::Tensor x = at::randn({2, 9, tiny_arch().hidden_size}, g), dy = at::randn({2, 9, 256}, g);
  struct Out { at::Tensor y, dx; std::vector<at::Tensor> grads; };
  auto run = [&](bool fold) {
    for (auto& [name, p] : lora::lora_named_parameters(*m)) p.mutable_grad() = at::Tensor();
    at::Tensor xd = x.clone().requires_grad_(true);
    at::Tensor in = fold ? model::with_spare_columns(xd, spare) : xd;
    const int64_t before = model::folded_group_calls();
    Out o;
    o.y = model::fused_projections(group, in, true, fold ? spare : 0);
    EXPECT_EQ(model::folded_group_calls() - before, fold ? 1 : 0);
    o.y.backward(dy);
    o.dx = xd.grad();
    for (auto& [name, p] : lora::lora_named_parameters(*m))
      if (p.grad().defined()) o.grads.push_back(p.grad().clone());
    return o;
  };
  const Out folded = run(true), plain = run(false);
  ASSERT_EQ(folded.y.sizes(), plain.y.sizes());
  EXPECT_LE(test::rel_err(folded.y, plain.y), kF32Tol);
  EXPECT_LE(test::rel_err(folded.dx, plain.dx), kF32Tol);
  ASSERT_EQ(folded.grads.size(), 4u);  // q and v of layer 0: A and B
  ASSERT_EQ(plain.grads.size(), 4u);
  for (size_t i = 0; i < folded.grads.size(); ++i) EXPECT_LE(test::rel_err(folded.grads[i], plain.grads[i]), kF32Tol);
}

TEST(FusedPath, CheckpointingChangesNothingOnCpu) {
  // The recomputation runs the same ops on the same values and keeps its dequantized weights for the
  // backward (KeepDequantizedWeights) instead of dequantizing again; the selective one starts the MLP from
  // the kept residual and skips o_proj's and down_proj's GEMMs (their outputs only fed it): the step must
  // be bit for bit the one without checkpointing. With and without unadapted members (whose groups save
  // only the weights), and with dropout (the recomputation replays the masks).
  const at::Device cpu(at::kCPU);
  for (const auto& targets : {kAllProjections, std::vector<std::string>{"q_proj", "v_proj", "down_proj"}}) {
    for (double dropout : {0.0, 0.2}) {
      StepResult plain = run_model(cpu, at::kFloat, model::FusedMode::On, Off, dropout, true, 1, targets);
      for (Checkpointing ckpt : {Selective, Full}) {
        StepResult got = run_model(cpu, at::kFloat, model::FusedMode::On, ckpt, dropout, true, 1, targets);
        const std::string what = (targets.size() == kAllProjections.size() ? "all targets" : "q/v/down only") +
                                 label(ckpt) + (dropout > 0 ? ", dropout" : "");
        expect_same_bits(got, plain, what.c_str());
      }
    }
  }
}

TEST(FusedPath, GroupsWithUnadaptedMembers) {
  // PEFT's Llama default adapts q and v only: the q|k|v group then has a member without a branch, and
  // gate|up none at all. Without dropout the group's adapters share one x A^T GEMM and k's output columns
  // start at zero for the base GEMM to accumulate onto; with dropout each adapter reads its own masked x.
  const at::Device cpu(at::kCPU);
  const std::vector<std::string> targets{"q_proj", "v_proj", "down_proj"};
  for (double dropout : {0.0, 0.1}) {
    StepResult ref = run_model(cpu, at::kFloat, model::FusedMode::Off, Off, dropout, true, 4, targets);
    StepResult got = run_model(cpu, at::kFloat, model::FusedMode::On, Off, dropout, true, 4, targets);
    EXPECT_EQ(got.grads.size(), 12u);  // 2 layers x 3 projections x (A, B)
    expect_close(got, ref, kF32Tol, dropout > 0 ? "cpu f32, q/v/down only, dropout" : "cpu f32, q/v/down only");
  }
}

TEST(FusedPath, DropoutDrawsTheSameMasks) {
  // The fused group draws one mask per adapted projection, in the modules' order, from the same
  // generator: the same seed gives the same training step.
  const at::Device cpu(at::kCPU);
  for (Checkpointing ckpt : kCheckpointing) {
    StepResult ref = run_model(cpu, at::kFloat, model::FusedMode::Off, ckpt, 0.25, true, 11);
    StepResult got = run_model(cpu, at::kFloat, model::FusedMode::On, ckpt, 0.25, true, 11);
    expect_close(got, ref, kF32Tol, ("cpu f32 dropout 0.25" + label(ckpt)).c_str());
    // A different seed must change the step (the masks are really drawn).
    StepResult other = run_model(cpu, at::kFloat, model::FusedMode::On, ckpt, 0.25, true, 12);
    EXPECT_GT(test::rel_err(other.logits, got.logits), 1e-3);
  }
}

TEST(FusedPath, EvalModeIgnoresDropout) {
  const at::Device cpu(at::kCPU);
  StepResult ref = run_model(cpu, at::kFloat, model::FusedMode::Off, Off, 0.25, false, 1);
  StepResult got = run_model(cpu, at::kFloat, model::FusedMode::On, Off, 0.25, false, 2);
  StepResult plain = run_model(cpu, at::kFloat, model::FusedMode::On, Off, 0.0, false, 3);
  EXPECT_LE(test::rel_err(got.logits, ref.logits), kF32Tol);
  EXPECT_LE(test::rel_err(got.logits, plain.logits), kF32Tol);
}

TEST(FusedPath, AdapterUpdatesReachTheForward) {
  // The fused path casts the adapters once and reuses the copy until an adapter changes (its version
  // counter moves): an in-place update, as the optimizer's, must show in the next forward.
  ModeGuard guard(model::FusedMode::On);
  auto m = make_model(at::kCPU, at::kFloat, 0.0);
  m->eval();
  at::NoGradGuard ng;
  auto g = at::make_generator<at::CPUGeneratorImpl>(8);
  at::Tensor ids = at::randint(0, tiny_arch().vocab_size, {2, 16}, g, at::kLong);
  const at::Tensor before = m->forward(ids);
  EXPECT_TRUE(test::same_bits(m->forward(ids), before));  // the cached copy, unchanged
  for (auto& [name, l] : lora::lora_modules(*m)) {
    if (name.find("layers.1.mlp.up_proj") != std::string::npos) l->lora_b().add_(0.05);
    if (name.find("layers.0.self_attn.k_proj") != std::string::npos) l->lora_a().mul_(1.5);
  }
  const at::Tensor after = m->forward(ids);
  model::set_fused_mode(model::FusedMode::Off);
  const at::Tensor modules = m->forward(ids);
  EXPECT_GT(test::rel_err(after, before), 1e-3);
  EXPECT_LE(test::rel_err(after, modules), kF32Tol);
}

TEST(FusedPath, AutoModeStaysOffOnCpu) {
  // The CPU keeps the per-projection path (the one compared bit for bit with PEFT) unless asked.
  const at::Device cpu(at::kCPU);
  StepResult ref = run_model(cpu, at::kFloat, model::FusedMode::Off, Off, 0.0, true, 1);
  StepResult got = run_model(cpu, at::kFloat, model::FusedMode::Auto, Off, 0.0, true, 1);
  expect_same_bits(got, ref, "auto on the cpu");
}

// Incremental decoding with the KV cache (what `qlora generate` runs) through the fused path: prefill then
// one token at a time gives the logits of one full forward, and those of the per-projection modules.
void check_kv_cache(at::Device dev, at::ScalarType dt, double tol) {
  ModeGuard guard(model::FusedMode::On);
  auto arch = tiny_arch();
  auto m = make_model(dev, dt, /*dropout=*/0.0);
  m->eval();
  at::NoGradGuard ng;
  auto g = at::make_generator<at::CPUGeneratorImpl>(4);
  at::Tensor ids = at::randint(0, arch.vocab_size, {2, 12}, g, at::kLong).to(dev);
  at::Tensor full = m->forward(ids).to(at::kFloat).cpu();
  model::KVCache cache;
  std::vector<at::Tensor> steps{m->forward(ids.slice(1, 0, 8), {}, {}, &cache)};
  for (int64_t t = 8; t < 12; ++t) steps.push_back(m->forward(ids.slice(1, t, t + 1), {}, {}, &cache));
  at::Tensor incremental = at::cat(steps, 1).to(at::kFloat).cpu();
  model::set_fused_mode(model::FusedMode::Off);
  at::Tensor modules = m->forward(ids).to(at::kFloat).cpu();
  const double ei = test::rel_err(incremental, full), em = test::rel_err(full, modules);
  std::printf("kv cache %s: incremental vs full %.2e, fused vs modules %.2e\n", c10::toString(dt), ei, em);
  EXPECT_LE(ei, tol);
  EXPECT_LE(em, tol);
}

TEST(FusedPath, KvCacheDecodingOnCpu) { check_kv_cache(at::kCPU, at::kFloat, kF32Tol); }

TEST(FusedPath, KvCacheDecodingOnGpu) {
  QLORA_SKIP_WITHOUT_CUDA();
  check_kv_cache(at::Device(at::kCUDA, 0), at::kBFloat16, 2e-2);  // bf16: see the tolerance below
  check_kv_cache(at::Device(at::kCUDA, 0), at::kFloat, kF32Tol);
}

// bfloat16 on the GPU: each path rounds its GEMM outputs and activations to bf16 (2^-9 relative) at
// different points; through two layers the logits and adapter gradients of the two paths differ by a
// few such roundings. 2e-2 bounds that (METHOD.md's range for bf16 operands); the f32 references below
// show both paths are equally close to the exact value.
TEST(FusedPath, MatchesModulesOnGpuBFloat16) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device gpu(at::kCUDA, 0);
  for (Checkpointing ckpt : kCheckpointing) {
    for (double dropout : {0.0, 0.1}) {
      StepResult ref = run_model(gpu, at::kBFloat16, model::FusedMode::Off, ckpt, dropout, true, 21);
      StepResult got = run_model(gpu, at::kBFloat16, model::FusedMode::On, ckpt, dropout, true, 21);
      StepResult exact = run_model(gpu, at::kFloat, model::FusedMode::Off, ckpt, dropout, true, 21);
      const std::string what = "gpu bf16" + label(ckpt) + (dropout > 0 ? ", dropout" : "");
      expect_close(got, ref, 2e-2, what.c_str());
      if (dropout == 0.0) {
        // Against float32 (without dropout: the masks drawn for bf16 and f32 tensors differ). bf16 itself
        // costs a few percent on this random model; the fused path must cost no more than the modules.
        const double ef = test::rel_err(got.logits, exact.logits), em = test::rel_err(ref.logits, exact.logits);
        std::printf("  vs float32: fused %.2e, modules %.2e\n", ef, em);
        EXPECT_LE(ef, 1.1 * em + 1e-3);
      }
    }
  }
  // Float32 on the GPU too (the fused path's GEMMs in TF32-free float32).
  StepResult ref = run_model(gpu, at::kFloat, model::FusedMode::Off, Off, 0.0, true, 1);
  StepResult got = run_model(gpu, at::kFloat, model::FusedMode::On, Off, 0.0, true, 1);
  expect_close(got, ref, kF32Tol, "gpu f32");
}

// LoRA dropout's masked products and input gradient (kernels/lora_dropout_mm.cu, ranks 8 to 64; the test above's rank 4
// takes the copies and the two passes) in the fused path, at rank 8 with checkpointing off, selective and full. The
// masks are the same in every run (counters: the same decisions in float32 and bfloat16, for the modules and the
// groups), so the float32 run (the copies: the kernels take 16-bit types) is the reference: the kernels' logits and
// worst adapter gradient must be no further from it than the fused path's copies (ratio 1.1, plus 1e-3). bf16 alone
// costs ~4% of the logits and ~7.5% of the worst gradient on this random model (H100), the two bf16 paths within 2% of
// each other; a wrong mask or scale would cost far more.
TEST(FusedPath, DropoutMaskedProductsMatchTheCopiesOnGpu) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device gpu(at::kCUDA, 0);
  auto worst_grad = [](const StepResult& a, const StepResult& b) {
    double e = 0;
    for (size_t i = 0; i < a.grads.size(); ++i) e = std::max(e, test::rel_err(a.grads[i], b.grads[i]));
    return e;
  };
  for (Checkpointing ckpt : kCheckpointing) {
    const std::string what = "gpu bf16 r 8, dropout" + label(ckpt);
    auto run = [&](at::ScalarType dt) {
      return run_model(gpu, dt, model::FusedMode::On, ckpt, 0.1, true, 21, kAllProjections, /*rank=*/8);
    };
    const StepResult exact = run(at::kFloat);
    struct Restore {
      ~Restore() { model::set_dropout_mm_kernels(true), model::set_dropout_dx_kernel(true); }
    } restore;
    model::set_dropout_mm_kernels(false), model::set_dropout_dx_kernel(false);
    const int64_t before = model::dropout_mm_calls(), dx_before = model::dropout_dx_calls();
    const StepResult copies = run(at::kBFloat16);
    EXPECT_EQ(model::dropout_mm_calls(), before);
    EXPECT_EQ(model::dropout_dx_calls(), dx_before);
    model::set_dropout_mm_kernels(true), model::set_dropout_dx_kernel(true);
    const StepResult got = run(at::kBFloat16);
    // Without recomputation: x A^T and dA for each layer's four groups (q|k|v, o, gate|up, down), 2 layers.
    const int64_t calls = model::dropout_mm_calls() - before;
    if (ckpt == Off) EXPECT_EQ(calls, 16) << what;
    else EXPECT_GT(calls, 16) << what;
    // dx for each layer's four groups, 2 layers, but the first layer's q|k|v: its input, the frozen embedding's
    // output, wants no gradient (with recomputation too: llama.cpp's CheckpointedLayer).
    EXPECT_EQ(model::dropout_dx_calls() - dx_before, 7) << what;
    ASSERT_EQ(got.grads.size(), exact.grads.size());
    const double lk = test::rel_err(got.logits, exact.logits), lc = test::rel_err(copies.logits, exact.logits);
    const double gk = worst_grad(got, exact), gc = worst_grad(copies, exact);
    std::printf("%s, against float32: logits %.2e (copies %.2e), worst adapter gradient %.2e (copies %.2e)\n",
                what.c_str(), lk, lc, gk, gc);
    EXPECT_LE(lk, 1.1 * lc + 1e-3) << what;
    EXPECT_LE(gk, 1.1 * gc + 1e-3) << what;
  }
}

// Dequantization ahead on a second stream (fused.h's DequantAhead, two groups) changes no bit: three steps of
// two folded groups (forward both, backward both, as a layer calls them, then an update of the adapters in
// place), with the queue off and in each of its modes, each step under a StepStream. From the second step
// on, every dequantization must come from the work done ahead (the order is learned in the first), which the
// hit count shows; the block-diagonal B's made ahead must follow the updates. The weights are those of the
// model in float32 and bfloat16, double quantization on.
#ifdef QLORA_WITH_CUDA
TEST(FusedPath, DequantizationAheadChangesNoBit) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device gpu(at::kCUDA, 0);
  ModeGuard guard(model::FusedMode::On);
  struct AheadGuard {
    model::DequantAhead saved = model::dequant_ahead_mode();
    ~AheadGuard() { model::set_dequant_ahead(saved); }
  } ahead_guard;
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    auto m = make_model(gpu, dt, 0.0);
    auto& attn = m->layer_list[0]->self_attn;
    auto& mlp = m->layer_list[1]->mlp;
    const std::vector<const model::Linear*> qkv{attn->q_proj.get(), attn->k_proj.get(), attn->v_proj.get()};
    const std::vector<const model::Linear*> gate_up{mlp->gate_proj.get(), mlp->up_proj.get()};
    const int64_t h = tiny_arch().hidden_size;
    const int64_t spare_qkv = model::adapter_columns(qkv, at::zeros({1}, at::TensorOptions().dtype(dt).device(gpu)));
    const int64_t spare_gu = model::adapter_columns(gate_up, at::zeros({1}, at::TensorOptions().dtype(dt).device(gpu)));
    ASSERT_GT(spare_qkv, 0);
    auto g = at::make_generator<at::CPUGeneratorImpl>(8);
    const at::Tensor x = at::randn({2, 33, h}, g).to(gpu, dt);
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(0);
    std::vector<at::Tensor> initial;  // each run starts from the same adapters
    for (auto& [name, p] : lora::lora_named_parameters(*m)) initial.push_back(p.detach().clone());
    auto run = [&](model::DequantAhead mode) {
      model::set_dequant_ahead(mode);
      {
        at::NoGradGuard no_grad;
        size_t i = 0;
        for (auto& [name, p] : lora::lora_named_parameters(*m)) p.copy_(initial[i++]);
      }
      const bool own_stream = mode == model::DequantAhead::Low || mode == model::DequantAhead::High;
      std::vector<at::Tensor> out;
      for (int step = 0; step < 3; ++step) {
        at::Tensor y1, y2, xd;
        const int64_t hits_before = model::dequant_ahead_hits();
        {
          const model::StepStream on_step(gpu);  // as the trainer's step
          const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(0);
          EXPECT_EQ(current != caller, own_stream);
          if (own_stream) {
            EXPECT_LT(current.priority(), 0);  // above the side stream's default priority
          }
          for (auto& [name, p] : lora::lora_named_parameters(*m)) p.mutable_grad() = at::Tensor();
          xd = x.clone().requires_grad_(true);
          y1 = model::fused_projections(qkv, model::with_spare_columns(xd, spare_qkv), true, spare_qkv);
          y2 = model::fused_projections(gate_up, model::with_spare_columns(xd, spare_gu), true, spare_gu);
          (y1.to(at::kFloat).square().sum() + y2.to(at::kFloat).sin().sum()).backward();
          // An update in place, as the optimizer's (not after the last step, whose outputs are compared): the
          // next step's first group was made ahead before it, with the B's as they were, so its bd must be
          // written again.
          at::NoGradGuard no_grad;
          for (auto& [name, p] : lora::lora_named_parameters(*m))
            if (step < 2 && p.grad().defined()) p.sub_(p.grad().sign() * 1e-2);
        }
        EXPECT_EQ(c10::cuda::getCurrentCUDAStream(0), caller);
        const int64_t hits = model::dequant_ahead_hits() - hits_before;
        // Four dequantizations a step: each group's forward and backward. The first step learns the order
        // within a step, the second what follows the step's last one (the queue remembers the order across
        // these runs: the first queued run's second step is the one with 3).
        const int64_t expected = mode == model::DequantAhead::Off                       ? 0
                                 : step == 0                                            ? -1
                                 : step == 1 && mode == model::DequantAhead::Low ? 3
                                                                                        : 4;
        if (expected >= 0) {
          EXPECT_EQ(hits, expected) << "step " << step;
        }
        if (step == 2) {  // read on the caller's stream, which waited for the step's
          out = {y1.detach().cpu(), y2.detach().cpu(), xd.grad().cpu()};
          for (auto& [name, p] : lora::lora_named_parameters(*m))
            if (p.grad().defined()) out.push_back(p.grad().cpu());
        }
      }
      if (own_stream) {
        // A forward outside the step's stream (an evaluation between steps, say) makes the request the work
        // ahead was done for, the next step's first: it dequantizes its own (the buffer belongs to the step's
        // stream), with the same result.
        const int64_t hits_before = model::dequant_ahead_hits();
        const at::Tensor xd = x.clone().requires_grad_(true);
        const at::Tensor y = model::fused_projections(qkv, model::with_spare_columns(xd, spare_qkv), true, spare_qkv);
        EXPECT_EQ(model::dequant_ahead_hits(), hits_before);
        EXPECT_TRUE(test::same_bits(y.cpu(), out[0]));
      }
      return out;
    };
    const auto off = run(model::DequantAhead::Off);
    for (auto mode : {model::DequantAhead::Low, model::DequantAhead::Even, model::DequantAhead::High}) {
      const auto on = run(mode);
      ASSERT_EQ(off.size(), on.size());
      ASSERT_GT(off.size(), 3u);
      for (size_t i = 0; i < off.size(); ++i)
        EXPECT_TRUE(test::same_bits(on[i], off[i]))
            << c10::toString(dt) << " mode " << static_cast<int>(mode) << " tensor " << i;
    }
  }
}
#endif

// The composite's input gradient is the sum of its slices' zero-padded gradients, so it carries +0 where
// the packed kernels write a product that underflowed to -0 (IEEE: -0 + 0 = +0; one element in a few
// million of these random tensors, seen once in a float16 SwiGLU gradient). So the kernels' gradient is
// compared with that sum applied (+0 added): every other bit must be equal.
at::Tensor as_summed_with_zero(const at::Tensor& grad) { return grad + 0; }

// The RoPE-split kernel against the composite (view, transpose, x * cos + rotate_half(x) * sin) it
// replaces, forward and backward, bit for bit, in bfloat16 and float32, GQA and plain.
TEST(FusedPath, RopeSplitKernelMatchesCompositeBitForBit) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device gpu(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    for (auto [nq, nk, d] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{4, 2, 32}, {3, 3, 64}, {8, 1, 128}}) {
      const int64_t b = 2, t = 37;
      auto arch = tiny_arch();
      arch.head_dim = d;
      auto pos = at::randint(0, 500, {b, t}, gen, at::kLong).to(gpu);
      model::Rope rope = model::rope_tables(arch, pos, dt);
      auto y = at::randn({b, t, (nq + 2 * nk) * d}, gen, at::kFloat).to(dt).to(gpu);
      auto dq = at::randn({b, t, nq, d}, gen, at::kFloat).to(dt).to(gpu);
      auto dk = at::randn({b, t, nk, d}, gen, at::kFloat).to(dt).to(gpu);
      auto dv = at::randn({b, t, nk, d}, gen, at::kFloat).to(dt).to(gpu);

      auto y1 = y.clone().requires_grad_(true);
      auto [q1, k1, v1] = model::rope_split(y1, rope.cos, rope.sin, nq, nk, d);
      torch::autograd::backward({q1, k1, v1}, {dq, dk, dv});

      // The composite of the per-projection path (model::apply_rope, [B, n, T, D] layout).
      auto y2 = y.clone().requires_grad_(true);
      auto heads = y2.view({b, t, nq + 2 * nk, d});
      auto q2 = model::apply_rope(heads.narrow(2, 0, nq).transpose(1, 2), rope).transpose(1, 2);
      auto k2 = model::apply_rope(heads.narrow(2, nq, nk).transpose(1, 2), rope).transpose(1, 2);
      auto v2 = heads.narrow(2, nq + nk, nk);
      torch::autograd::backward({q2, k2, v2}, {dq, dk, dv});

      EXPECT_TRUE(test::same_bits(q1.detach(), q2.detach().contiguous())) << c10::toString(dt) << " q";
      EXPECT_TRUE(test::same_bits(k1.detach(), k2.detach().contiguous())) << c10::toString(dt) << " k";
      EXPECT_TRUE(test::same_bits(v1.detach(), v2.detach().contiguous())) << c10::toString(dt) << " v";
      EXPECT_TRUE(test::same_bits(as_summed_with_zero(y1.grad()), y2.grad())) << c10::toString(dt) << " grad";
    }
  }
}

// The packed SwiGLU kernels against at::silu(g) * u on the two halves, forward and backward, bit for bit.
TEST(FusedPath, PackedSwiGLUMatchesCompositeBitForBit) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device gpu(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
    const int64_t i = 173;
    auto gu = (at::randn({3, 29, 2 * i}, gen, at::kFloat) * 3).to(dt).to(gpu);
    auto dy = at::randn({3, 29, i}, gen, at::kFloat).to(dt).to(gpu);
    auto a = gu.clone().requires_grad_(true);
    auto y1 = model::swiglu_packed(a);
    y1.backward(dy);
    auto b = gu.clone().requires_grad_(true);
    auto y2 = at::silu(b.narrow(-1, 0, i)) * b.narrow(-1, i, i);
    y2.backward(dy);
    EXPECT_TRUE(test::same_bits(y1.detach(), y2.detach())) << c10::toString(dt);
    EXPECT_TRUE(test::same_bits(as_summed_with_zero(a.grad()), b.grad())) << c10::toString(dt);
  }
}

}  // namespace
}  // namespace qlora
