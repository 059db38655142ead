// The training loss computed chunk by chunk (train::causal_lm_loss_sum, which never stores the float32
// [N, V] logits) against the plain form that materialises them (cross_entropy over lm_head(hidden) in
// float32, autograd's gradients): the loss, the gradient of the hidden states and, with a trainable tied
// head, the gradient of the head, for several chunk sizes including ones that do not divide N. On a GPU
// the same in float32 and bfloat16 (there the fused kernel kernels/cross_entropy.cu does the loss), and
// that kernel alone against the composite it replaces, on rows chosen to break a careless softmax.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <random>

#ifdef QLORA_WITH_CUDA
#include "kernels/ops.h"
#endif
#include "tests/test_util.h"
#include "trainer/model/loader.h"
#include "trainer/train/trainer.h"

namespace qlora {
namespace {

// float32 on the CPU: the same dot products in the same GEMMs, but the chunked form sums the token losses
// chunk by chunk and multiplies by the incoming gradient after the GEMM instead of before: a few float32
// roundings (2^-24 each) on values of order 1, so 1e-5 relative is ample and still far below any real
// error (a wrong target or a missing softmax term moves the gradient by O(1)).
constexpr double kTol = 1e-5;

struct Case {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  int64_t vocab = 301;  // odd: the GPU kernel's scalar path; a multiple of 8 takes its 16-byte path
  double tol = kTol;
};

void check(const Case& c, bool tied, int64_t chunk) {
  SCOPED_TRACE(::testing::Message() << c.device << " " << c.dtype << " V " << c.vocab << " chunk " << chunk
                                    << (tied ? " tied" : ""));
  model::LlamaArch a;
  a.hidden_size = 48, a.intermediate_size = 96, a.num_layers = 1, a.num_heads = 4, a.num_kv_heads = 2;
  a.head_dim = 12, a.vocab_size = c.vocab, a.max_position_embeddings = 64, a.tie_word_embeddings = tied;
  model::LoadOptions o;
  o.device = c.device, o.dtype = c.dtype;
  o.trainable = true;  // method full: the head (or the tied embeddings) gets a gradient too
  const uint64_t seed = std::random_device{}();
  auto m = model::init_llama(a, o, seed);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t B = 3, T = 29;
  auto hidden_base = at::randn({B, T, a.hidden_size}, gen, at::kFloat).to(c.device, c.dtype);
  auto labels = at::randint(0, a.vocab_size, {B, T}, gen, at::kLong);
  labels.index_put_({0, at::indexing::Slice(0, 9)}, -100);
  labels.index_put_({2, at::indexing::Slice(20, at::indexing::None)}, -100);

  auto run = [&](bool chunked) {
    m->zero_grad();
    auto hidden = hidden_base.clone().requires_grad_(true);
    at::Tensor loss;
    if (chunked) {
      loss = train::causal_lm_loss_sum(*m, hidden, labels, chunk).first;
    } else {
      auto logits = m->lm_logits(hidden.slice(1, 0, T - 1)).to(at::kFloat).reshape({-1, a.vocab_size});
      loss = at::cross_entropy_loss(logits, labels.slice(1, 1).reshape(-1).to(c.device), {}, at::Reduction::Sum,
                                    -100);
    }
    (loss / 7.0).backward();  // a non-unit upstream gradient, as the trainer's division by the count gives
    return std::make_tuple(loss.item<double>(), hidden.grad().clone(), m->lm_head.grad().clone());
  };
  auto [l0, gh0, gw0] = run(false);
  auto [l1, gh1, gw1] = run(true);
  EXPECT_NEAR(l1, l0, c.tol * std::abs(l0));
  EXPECT_LE(test::rel_err(gh1, gh0), c.tol);
  EXPECT_LE(test::rel_err(gw1, gw0), c.tol);
  ASSERT_GT(gw0.abs().max().item<double>(), 0.0);
}

TEST(ChunkedLoss, MatchesMaterialisedLogits) {
  for (bool tied : {false, true})
    for (int64_t chunk : {1, 7, 16, 1000}) check(Case{}, tied, chunk);
}

// The GPU path (the fused kernel) against autograd through cross_entropy of the float32 logits on the same
// GPU. float32: the CPU argument above holds (cuBLAS float32 GEMMs, TF32 off by default). bfloat16: the two
// forms round the logit gradient differently, softmax - onehot to bf16 here and (softmax - onehot) / 7
// to bf16 there, then bf16 GEMM outputs and the bf16 upstream gradient 1/7: a few roundings of 2^-9
// relative each, under 1e-2 together; a missing onehot or a wrong target is an O(1) error either way.
TEST(ChunkedLoss, MatchesMaterialisedLogitsGpu) {
  QLORA_SKIP_WITHOUT_CUDA();
  for (auto [dt, tol] : {std::pair{at::kFloat, kTol}, std::pair{at::kBFloat16, 1e-2}})
    for (int64_t vocab : {301, 304})
      for (bool tied : {false, true})
        for (int64_t chunk : {1, 16, 1000}) check(Case{at::Device(at::kCUDA, 0), dt, vocab, tol}, tied, chunk);
}

#ifdef QLORA_WITH_CUDA
// kernels::cross_entropy_fwd_bwd_cuda against the composite it replaces (ChunkedLmLoss's CPU path), run on
// the same GPU logits. Rows with extremes: a +100 spike at the target (loss ~ 0) and off it, a row shifted
// by -120 (every exp(x) underflows unless the max is subtracted) and one by +90 (the sum overflows);
// targets at the first and last column. V = 32000 takes the 16-byte path, V = 1003 the scalar one.
//
// Tolerances. Both sides compute the same float32 expressions on the same inputs; they differ only in
// the order of the sum of exponentials, and so in lse by a rounding of lse (2^-24 |lse|) plus the sums'
// relative errors: at most 2^-24 per serial step (additions, rescales, merges, ~250 counting both
// sides at V = 32000), taken twice here for margin.
//  loss = lse - x[t]: 1e-5 relative to the operands of that subtraction, |loss| + |x[t]| + 1, since for
//    the rows near 100 both sides carry lse's rounding (~1e-7 * 100) whatever the loss.
//  gradient: exp's argument differs by dArg <= 2^-24 (4 (|x - lse| + |lse|) + 512) (the roundings of lse
//    and of x - lse, the sums' errors, expf's 2 ulp), so the float gradient by p * dArg; rounding to
//    T then differs by at most one ulp of T at b, <= |b| 2^-7 (bf16) or |b| 2^-23 (fp32); FLT_MIN
//    covers denormal probabilities. For bf16 that is one ulp; a missing onehot is off by 1, a missing
//    max subtraction is NaN. (A numpy emulation of the kernel's float32 order against torch's composite
//    on these inputs came to 0.9 of the bf16 bound, one rounding flip, and 0.06 of the fp32 one.)
TEST(ChunkedLoss, FusedKernelMatchesComposite) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  for (auto [dt, ulp] : {std::pair{at::kBFloat16, 0x1p-7}, std::pair{at::kFloat, 0x1p-23}}) {
    for (int64_t v : {32000, 1003}) {
      SCOPED_TRACE(::testing::Message() << dt << " V " << v);
      const int64_t rows = 37;
      at::Tensor x = 3.0 * at::randn({rows, v}, gen, at::kFloat);  // [rows, V] a peaked softmax
      at::Tensor t = at::randint(0, v, {rows}, gen, at::kLong);
      t.index_put_({4}, 0), t.index_put_({5}, v - 1);
      x.index_put_({0, t[0].item<int64_t>()}, 100.0);
      x.index_put_({1, (t[1].item<int64_t>() + 1) % v}, 100.0);
      x[2].sub_(120.0), x[3].add_(90.0);
      x = x.to(dev, dt);
      t = t.to(dev);

      // The composite, on the same rounded logits.
      const at::Tensor lf = x.to(at::kFloat), t1 = t.unsqueeze(1);
      const at::Tensor lse = at::logsumexp(lf, 1, /*keepdim=*/true);           // [rows, 1]
      const at::Tensor xt = lf.gather(1, t1);                                  // [rows, 1]
      const at::Tensor loss_ref = (lse - xt).squeeze(1);
      const at::Tensor p = (lf - lse).exp();
      const at::Tensor g_ref = p.scatter_add(1, t1, at::full_like(t1, -1, p.options())).to(dt).to(at::kFloat);

      at::Tensor g = x.clone();
      const at::Tensor loss = kernels::cross_entropy_fwd_bwd_cuda(g, t);
      ASSERT_EQ(loss.scalar_type(), at::kFloat);
      ASSERT_EQ(g.scalar_type(), dt);
      ASSERT_EQ(loss.sizes(), loss_ref.sizes());

      const at::Tensor loss_tol = 1e-5 * (loss_ref.abs() + xt.squeeze(1).abs() + 1.0);
      const at::Tensor loss_bad = (loss - loss_ref).abs().gt(loss_tol).logical_or(loss.isnan());
      EXPECT_EQ(loss_bad.sum().item<int64_t>(), 0) << "losses " << loss.cpu().slice(0, 0, 6) << "\nexpected "
                                                   << loss_ref.cpu().slice(0, 0, 6);
      const at::Tensor darg = 0x1p-24 * (4.0 * ((lf - lse).abs() + lse.abs()) + 512.0);
      const at::Tensor g_tol = ulp * g_ref.abs() + p * darg + FLT_MIN;
      const at::Tensor gf = g.to(at::kFloat), err = (gf - g_ref).abs();
      const at::Tensor g_bad = err.gt(g_tol).logical_or(gf.isnan());
      const int64_t n_bad = g_bad.sum().item<int64_t>();
      if (n_bad > 0) {
        const int64_t i = g_bad.reshape(-1).nonzero()[0].item<int64_t>();
        ADD_FAILURE() << n_bad << " gradient elements out of tolerance; first at row " << i / v << " col "
                      << i % v << ": " << gf.reshape(-1)[i].item<float>() << " vs "
                      << g_ref.reshape(-1)[i].item<float>() << " (tol " << g_tol.reshape(-1)[i].item<float>() << ")";
      }
    }
  }

  // Bad arguments say which.
  at::Tensor x = at::randn({4, 64}, at::TensorOptions(dev).dtype(at::kBFloat16));
  const at::Tensor t = at::zeros({4}, at::TensorOptions(dev).dtype(at::kLong));
  at::Tensor xc = x.cpu(), xtr = x.t(), xd = x.to(at::kDouble);
  EXPECT_THROW_MSG(kernels::cross_entropy_fwd_bwd_cuda(xc, t), "logits must be a CUDA tensor");
  EXPECT_THROW_MSG(kernels::cross_entropy_fwd_bwd_cuda(xtr, t.repeat(16)), "logits must be contiguous");
  EXPECT_THROW_MSG(kernels::cross_entropy_fwd_bwd_cuda(xd, t), "dtype must be bfloat16");
  EXPECT_THROW_MSG(kernels::cross_entropy_fwd_bwd_cuda(x, t.to(at::kInt)), "targets must be int64");
  EXPECT_THROW_MSG(kernels::cross_entropy_fwd_bwd_cuda(x, t.slice(0, 0, 3)), "targets must be contiguous [4]");
}
#endif

TEST(ChunkedLoss, DefaultChunkCoversAbout256MiB) {
  EXPECT_EQ(train::loss_chunk_rows(32000), (int64_t{64} << 20) / 32000);
  EXPECT_EQ(train::loss_chunk_rows(10'000'000), 64);  // never fewer than 64 rows
}

}  // namespace
}  // namespace qlora
