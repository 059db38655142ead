// The training loss computed chunk by chunk (train::causal_lm_loss_sum, which never stores the float32
// [N, V] logits) against the plain form that materialises them (cross_entropy over lm_head(hidden) in
// float32, autograd's gradients): the loss, the gradient of the hidden states and, with a trainable tied
// head, the gradient of the head, for several chunk sizes including ones that do not divide N.
#include <gtest/gtest.h>

#include <random>

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

void check(bool tied, int64_t chunk) {
  model::LlamaArch a;
  a.hidden_size = 48, a.intermediate_size = 96, a.num_layers = 1, a.num_heads = 4, a.num_kv_heads = 2;
  a.head_dim = 12, a.vocab_size = 301, a.max_position_embeddings = 64, a.tie_word_embeddings = tied;
  model::LoadOptions o;
  o.trainable = true;  // method full: the head (or the tied embeddings) gets a gradient too
  const uint64_t seed = std::random_device{}();
  auto m = model::init_llama(a, o, seed);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t B = 3, T = 29;
  auto hidden_base = at::randn({B, T, a.hidden_size}, gen, at::kFloat);
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
      loss = at::cross_entropy_loss(logits, labels.slice(1, 1).reshape(-1), {}, at::Reduction::Sum, -100);
    }
    (loss / 7.0).backward();  // a non-unit upstream gradient, as the trainer's division by the count gives
    return std::make_tuple(loss.item<double>(), hidden.grad().clone(), m->lm_head.grad().clone());
  };
  auto [l0, gh0, gw0] = run(false);
  auto [l1, gh1, gw1] = run(true);
  EXPECT_NEAR(l1, l0, kTol * std::abs(l0)) << "chunk " << chunk;
  EXPECT_LE(test::rel_err(gh1, gh0), kTol) << "chunk " << chunk;
  EXPECT_LE(test::rel_err(gw1, gw0), kTol) << "chunk " << chunk << (tied ? " (tied)" : "");
  ASSERT_GT(gw0.abs().max().item<double>(), 0.0);
}

TEST(ChunkedLoss, MatchesMaterialisedLogits) {
  for (bool tied : {false, true})
    for (int64_t chunk : {1, 7, 16, 1000}) check(tied, chunk);
}

TEST(ChunkedLoss, DefaultChunkCoversAbout256MiB) {
  EXPECT_EQ(train::loss_chunk_rows(32000), (int64_t{64} << 20) / 32000);
  EXPECT_EQ(train::loss_chunk_rows(10'000'000), 64);  // never fewer than 64 rows
}

}  // namespace
}  // namespace qlora
