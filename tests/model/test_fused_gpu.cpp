// The fused CUDA kernels of the model (kernels/rmsnorm.cu, used by RMSNormImpl on the GPU) against a
// float64 reference of Hugging Face's LlamaRMSNorm, forward and input gradient, on fresh random inputs
// (rows of odd widths too), in float32 and bfloat16; the residual add fused into it against the add and the
// norm. Skips without a GPU.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <random>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "kernels/lora_dropout.h"
#include "kernels/ops.h"
#endif
#include "tests/test_util.h"
#include "trainer/model/fused.h"
#include "trainer/model/llama.h"

namespace qlora {
namespace {

void check_rmsnorm(at::ScalarType dt, int64_t rows, int64_t h, double tol) {
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  // Rows of different scales, so rstd matters; weights around 1 with spread.
  auto x = (at::randn({rows, h}, gen, at::kDouble) * at::exp(at::randn({rows, 1}, gen, at::kDouble))).to(dt);
  auto w = (1 + 0.3 * at::randn({h}, gen, at::kDouble)).to(dt);
  auto dy = at::randn({rows, h}, gen, at::kDouble).to(dt);
  const double eps = 1e-5;

  model::RMSNorm norm(w.to(dev), eps, /*trainable=*/false);
  auto xd = x.to(dev).requires_grad_(true);
  auto y = norm->forward(xd);
  y.backward(dy.to(dev));
  ASSERT_FALSE(y.isnan().any().item<bool>());

  // float64 reference on the values actually fed in.
  auto xr = x.to(at::kDouble).requires_grad_(true);
  auto yr = w.to(at::kDouble) * (xr * at::rsqrt(xr.pow(2).mean(-1, true) + eps));
  yr.backward(dy.to(at::kDouble));
  const double ey = test::rel_err(y.detach().cpu().to(at::kDouble), yr.detach());
  const double ex = test::rel_err(xd.grad().cpu().to(at::kDouble), xr.grad());
  std::printf("rmsnorm %s [%lld, %lld]: forward rel err %.2e, grad_x rel err %.2e\n", c10::toString(dt),
              static_cast<long long>(rows), static_cast<long long>(h), ey, ex);
  EXPECT_LE(ey, tol);
  EXPECT_LE(ex, tol);
}

// Tolerances: float32 sums of up to 5000 squares in a block-tree order stay within ~1e-6 relative;
// bfloat16 output rounds twice (the normalised value, then the product with w), each 2^-9 relative, and
// the gradient rounds dy*w once and dx once: 1e-2 bounds the Frobenius error with margin (METHOD.md's
// range for bf16 operands).
TEST(FusedKernels, RmsNormFloat32) {
  QLORA_SKIP_WITHOUT_CUDA();
  for (int64_t h : {96, 4096, 5000}) check_rmsnorm(at::kFloat, 37, h, 1e-5);
}

TEST(FusedKernels, RmsNormBFloat16) {
  QLORA_SKIP_WITHOUT_CUDA();
  for (int64_t h : {96, 4096, 5000}) check_rmsnorm(at::kBFloat16, 37, h, 1e-2);
}

// SwiGLU: the fused kernels compute what the composite at::silu(g) * u and its autograd compute on the
// same GPU (same float32 formulas, same roundings), in every dtype.
TEST(FusedKernels, SwiGLUMatchesCompositeBitForBit) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  auto mlp_of = [&](at::ScalarType dt) {
    // The model's MLP with dense projections, against the same ops written out.
    const int64_t in = 64, hid = 173;
    auto wg = (at::randn({hid, in}, gen, at::kFloat) * 0.3).to(dt).to(dev);
    auto wu = (at::randn({hid, in}, gen, at::kFloat) * 0.3).to(dt).to(dev);
    auto wd = (at::randn({in, hid}, gen, at::kFloat) * 0.1).to(dt).to(dev);
    auto x = (at::randn({5, 31, in}, gen, at::kFloat) * 2).to(dt).to(dev);
    auto dy = at::randn({5, 31, in}, gen, at::kFloat).to(dt).to(dev);
    // fused, through the model's MLP
    model::MLP mlp(std::make_shared<model::DenseLinear>(wg, false), std::make_shared<model::DenseLinear>(wu, false),
                   std::make_shared<model::DenseLinear>(wd, false));
    auto x1 = x.clone().requires_grad_(true);
    auto y1 = mlp->forward(x1);
    y1.backward(dy);
    // composite, same ops by hand
    auto x2 = x.clone().requires_grad_(true);
    auto y2 = at::linear(at::silu(at::linear(x2, wg)) * at::linear(x2, wu), wd);
    y2.backward(dy);
    const double same_y = y1.eq(y2).to(at::kDouble).mean().item<double>();
    const double same_g = x1.grad().eq(x2.grad()).to(at::kDouble).mean().item<double>();
    const double ey = test::rel_err(y1.cpu().to(at::kDouble), y2.cpu().to(at::kDouble));
    const double eg = test::rel_err(x1.grad().cpu().to(at::kDouble), x2.grad().cpu().to(at::kDouble));
    std::printf("swiglu %s: %.4f of outputs and %.4f of input grads bit-identical; rel err %.2e / %.2e\n",
                c10::toString(dt), same_y, same_g, ey, eg);
    // Same formulas, same roundings: only the compiler's choice to contract a*b+c into one FMA (in our
    // kernel or in ATen's) can move a float32 intermediate by an ulp, and a rounding to T then rarely
    // lands one T-ulp away. So: nearly all elements identical, and the rest within one ulp of T.
    const double tol = dt == at::kFloat ? 1e-6 : 1e-2;
    EXPECT_GE(same_y, 0.99) << c10::toString(dt);
    EXPECT_LE(ey, tol) << c10::toString(dt);
    EXPECT_LE(eg, tol) << c10::toString(dt);
  };
  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) mlp_of(dt);
}

// RMSNorm and the packed SwiGLU leave spare columns right of their output rows for the next group's x A^T
// (fused.h): the values are the ones without spare columns, bit for bit, the rows lie width + spare apart,
// and the gradient is unchanged.
TEST(FusedKernels, SpareColumnsChangeNoValue) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    SCOPED_TRACE(c10::toString(dt));
    const at::Tensor x = at::randn({3, 7, 96}, gen, at::kFloat).to(dt).to(dev);
    const at::Tensor dy = at::randn({3, 7, 96}, gen, at::kFloat).to(dt).to(dev);
    model::RMSNorm norm((1 + 0.3 * at::randn({96}, gen, at::kFloat)).to(dt).to(dev), 1e-5, false);
    at::Tensor x0 = x.clone().requires_grad_(true), x1 = x.clone().requires_grad_(true);
    const at::Tensor y0 = norm->forward(x0), y1 = norm->forward(x1, 24);
    EXPECT_EQ(y1.sizes(), y0.sizes());
    EXPECT_EQ(y1.stride(1), 96 + 24);
    EXPECT_TRUE(test::same_bits(y1.contiguous(), y0));
    y0.backward(dy), y1.backward(dy);
    EXPECT_TRUE(test::same_bits(x1.grad(), x0.grad()));

    const at::Tensor gu = at::randn({2, 5, 2 * 88}, gen, at::kFloat).to(dt).to(dev);
    const at::Tensor s0 = model::swiglu_packed(gu), s1 = model::swiglu_packed(gu, 16);
    EXPECT_EQ(s1.stride(1), 88 + 16);
    EXPECT_TRUE(test::same_bits(s1.contiguous(), s0));
  }
}

// The residual add fused into the norm that reads its sum (RMSNorm::add_forward, kernels/rmsnorm.cu) against
// the add, the norm and autograd's sum of the two gradients of s, bit for bit: s, y (with spare columns),
// and the gradients of both addends when s feeds the residual stream as well as the norm; and when only the
// norm's output is used (the residual gradient then undefined). Likewise residual_forward, the norm whose
// input also feeds a kept sum.
TEST(FusedKernels, AddRMSNormMatchesAddThenNormBitForBit) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    for (int64_t h : {96, 4096, 1000}) {
      SCOPED_TRACE(std::string(c10::toString(dt)) + " H " + std::to_string(h));
      auto rnd = [&](std::vector<int64_t> sizes) { return at::randn(sizes, gen, at::kFloat).to(dt).to(dev); };
      const at::Tensor a = rnd({2, 9, h}), b = rnd({2, 9, h}), ds = rnd({2, 9, h}), dy = rnd({2, 9, h});
      model::RMSNorm norm((1 + 0.3 * at::randn({h}, gen, at::kFloat)).to(dt).to(dev), 1e-5, false);
      for (bool residual_used : {true, false}) {
        at::Tensor a0 = a.clone().requires_grad_(true), b0 = b.clone().requires_grad_(true);
        at::Tensor a1 = a.clone().requires_grad_(true), b1 = b.clone().requires_grad_(true);
        const at::Tensor s0 = a0 + b0, y0 = norm->forward(s0, 8);
        const auto [s1, y1] = norm->add_forward(a1, b1, 8);
        EXPECT_EQ(y1.stride(1), h + 8);
        EXPECT_TRUE(test::same_bits(s1, s0));
        EXPECT_TRUE(test::same_bits(y1.contiguous(), y0.contiguous()));
        if (residual_used) {
          torch::autograd::backward({s0, y0}, {ds, dy});
          torch::autograd::backward({s1, y1}, {ds, dy});
        } else {
          y0.backward(dy), y1.backward(dy);
        }
        EXPECT_TRUE(test::same_bits(a1.grad(), a0.grad())) << "residual used: " << residual_used;
        EXPECT_TRUE(test::same_bits(b1.grad(), b0.grad())) << "residual used: " << residual_used;
        // The gradient carries both paths (the check above would pass if neither did).
        EXPECT_GT((a1.grad().to(at::kFloat) - (residual_used ? ds : dy).to(at::kFloat)).abs().max().item<double>(), 0.0);
      }
      // residual_forward (a recomputation's kept sum): the gradient through r summed in the norm's backward,
      // bit for bit autograd's sum of the norm's gradient and ds.
      at::Tensor x0 = a.clone().requires_grad_(true), x1 = a.clone().requires_grad_(true);
      norm->forward(x0, 8).backward(dy);
      const at::Tensor expected = x0.grad() + ds;
      const auto [r1, y1] = norm->residual_forward(x1, 8);
      EXPECT_TRUE(test::same_bits(y1.contiguous(), norm->forward(a, 8).contiguous()));
      torch::autograd::backward({r1, y1}, {ds, dy});
      EXPECT_TRUE(test::same_bits(x1.grad(), expected));
    }
  }
}

#ifdef QLORA_WITH_CUDA
// The block-diagonal B operand in one launch against the composite it replaces (zeros, then each member's
// s * B cast into its block), bit for bit, into the last columns of a wider matrix; the other columns kept.
TEST(FusedKernels, BlockDiagonalAdaptersMatchComposite) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  // Three members (q, k, v shaped) with ranks 8, 0 (unadapted) and 16, a lone member, r 64 in three members
  // (the vector kernel's 16-byte stores in every dtype), and ranks 12 and 64 (the scalar kernel for the
  // 16-bit types, whose 8-column vectors 12 does not divide; the vector kernel for float32).
  struct Member { int64_t rows, rank; double scale; };
  const std::vector<std::vector<Member>> groups = {{{40, 8, 2.0}, {24, 0, 0.0}, {24, 16, 0.37}},
                                                   {{33, 4, 1.5}},
                                                   {{200, 64, 0.25}, {104, 64, 2.0}, {96, 64, 1.0}},
                                                   {{16, 12, 0.5}, {40, 64, 0.25}}};
  for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const auto& group : groups) {
      SCOPED_TRACE(c10::toString(dt));
      int64_t total = 0, ranks = 0;
      for (const auto& m : group) total += m.rows, ranks += m.rank;
      std::vector<kernels::BlockDiagMember> blocks;
      at::Tensor expected = at::zeros({total, ranks}, at::TensorOptions(dev).dtype(dt));
      int64_t offset = 0, col = 0;
      for (const auto& m : group) {
        if (m.rank > 0) {
          const at::Tensor b = at::randn({m.rows, m.rank}, gen, at::kFloat).to(dev);
          blocks.push_back({b, offset, col, m.scale});
          expected.narrow(0, offset, m.rows).narrow(1, col, m.rank).copy_(b * m.scale);
        }
        offset += m.rows, col += m.rank;
      }
      const at::Tensor wide = at::full({total, 64 + ranks}, 5.0, at::TensorOptions(dev).dtype(dt));
      kernels::lora_block_diag_cuda(wide.narrow(1, 64, ranks), blocks);
      EXPECT_TRUE(test::same_bits(wide.narrow(1, 64, ranks).contiguous(), expected));
      EXPECT_TRUE(wide.narrow(1, 0, 64).eq(5.0).all().item<bool>());
    }
  }
}

// The adapters' two backward products in one pass over dy (kernels/lora_grad.cu) against float64 on the
// same rounded operands: dxa = dy bd with bd = T(s B) rounded as block_diag_kernel rounds it, dB = s dy^T xa.
// Token counts around the kernel's 256-token tiles and its 8192-token slices, members whose widths are
// multiples of 8 but not of 64, both supported ranks, xa in the spare columns of a wider buffer, bfloat16
// and float16; a second call gives the same bits (the partial sums are added in a fixed order); arguments
// it does not take are refused.
TEST(FusedKernels, LoraGradMatchesReference) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  struct Case {
    int64_t n;
    std::vector<int64_t> outs;
    int64_t r;
  };
  const std::vector<Case> cases = {{1, {64}, 8},           {37, {40, 24, 24}, 16},        {300, {520, 136, 136}, 16},
                                   {257, {1000}, 8},       {2048, {4096, 1024, 1024}, 16}, {513, {200, 72}, 8},
                                   {2048, {11008, 11008}, 16}, {8492, {64, 40}, 8},       {16500, {72}, 16}};
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    for (const auto& c : cases) {
      SCOPED_TRACE(std::string(c10::toString(dt)) + " n " + std::to_string(c.n) + " r " + std::to_string(c.r));
      int64_t total = 0;
      for (int64_t o : c.outs) total += o;
      const int64_t ranks = c.r * static_cast<int64_t>(c.outs.size());
      const at::Tensor dy = at::randn({c.n, total}, gen, at::kFloat).to(dt).to(dev);
      const at::Tensor wide = at::randn({c.n, 40 + ranks}, gen, at::kFloat).to(dt).to(dev);
      const at::Tensor xa = wide.narrow(1, 40, ranks);
      std::vector<kernels::LoraGradMember> members;
      at::Tensor dxa_ref = at::zeros({c.n, ranks}, at::kDouble);
      std::vector<at::Tensor> db_ref;
      int64_t offset = 0, col = 0;
      for (size_t i = 0; i < c.outs.size(); ++i) {
        const double scale = 0.5 + 0.25 * static_cast<double>(i);
        const at::Tensor b = (at::randn({c.outs[i], c.r}, gen, at::kFloat) * 0.1).to(dev);
        members.push_back({b, offset, col, scale});
        const at::Tensor dym = dy.narrow(1, offset, c.outs[i]).cpu().to(at::kDouble);
        const at::Tensor bd = (b * scale).to(dt).cpu().to(at::kDouble);
        dxa_ref.narrow(1, col, c.r).copy_(at::mm(dym, bd));
        db_ref.push_back(scale * at::mm(dym.t(), xa.narrow(1, col, c.r).cpu().to(at::kDouble)));
        offset += c.outs[i], col += c.r;
      }
      ASSERT_TRUE(kernels::lora_grad_supported(dy, xa, members));
      const auto [dxa, db] = kernels::lora_grad_cuda(dy, xa, members);
      ASSERT_EQ(dxa.sizes(), (std::vector<int64_t>{c.n, ranks}));
      ASSERT_EQ(db.size(), c.outs.size());
      // dxa rounds once to the 16-bit type (2^-9 / 2^-12 relative); dB is a float32 sum of up to 2048 terms.
      EXPECT_LE(test::rel_err(dxa.cpu().to(at::kDouble), dxa_ref), dt == at::kBFloat16 ? 5e-3 : 1e-3);
      for (size_t i = 0; i < db.size(); ++i) {
        EXPECT_EQ(db[i].scalar_type(), at::kFloat);
        EXPECT_LE(test::rel_err(db[i].cpu().to(at::kDouble), db_ref[i]), 1e-5) << "member " << i;
      }
      const auto [dxa2, db2] = kernels::lora_grad_cuda(dy, xa, members);
      EXPECT_TRUE(test::same_bits(dxa2, dxa));
      for (size_t i = 0; i < db.size(); ++i) EXPECT_TRUE(test::same_bits(db2[i], db[i]));
    }
  }
  // Refused: ranks it has no kernel for, a member not 8-aligned in dy, float32 gradients.
  const at::Tensor dy = at::randn({16, 64}, at::TensorOptions(dev).dtype(at::kBFloat16));
  const at::Tensor xa = at::randn({16, 64}, at::TensorOptions(dev).dtype(at::kBFloat16));
  const at::Tensor b16 = at::randn({32, 16}, at::TensorOptions(dev)), b12 = at::randn({32, 12}, at::TensorOptions(dev));
  EXPECT_TRUE(kernels::lora_grad_supported(dy, xa, {{b16, 8, 0, 1.0}}));
  EXPECT_FALSE(kernels::lora_grad_supported(dy, xa, {{b12, 8, 0, 1.0}}));
  for (int64_t r : {32, 64})
    EXPECT_FALSE(kernels::lora_grad_supported(dy, xa, {{at::randn({32, r}, at::TensorOptions(dev)), 8, 0, 1.0}}));
  EXPECT_FALSE(kernels::lora_grad_supported(dy, xa, {{b16, 4, 0, 1.0}}));
  EXPECT_FALSE(kernels::lora_grad_supported(dy.to(at::kFloat), xa.to(at::kFloat), {{b16, 8, 0, 1.0}}));
  EXPECT_THROW(kernels::lora_grad_cuda(dy, xa, {{b12, 8, 0, 1.0}}), c10::Error);
}
// LoRA dropout by counters (kernels/lora_dropout.cu) against its definition (kernels/lora_dropout.h) recomputed
// on the CPU with PyTorch's Philox engine: every member's copy and keep bits bit for bit, the copies made
// again from the bits, the backward's masked sums bit for bit (float32 sums in member order, one rounding), on
// strided rows and odd widths (the element-wise kernels) in each dtype; then the masks' statistics, and the
// module-level op's gradient and replay from the generator.
at::Tensor reference_keep(const kernels::DropoutDraw& d, int64_t n, int64_t cols) {
  at::Tensor keep = at::empty({n, cols}, at::kBool);
  auto k = keep.accessor<bool, 2>();
  const uint32_t threshold = kernels::dropout_threshold(d.p);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = 0; b * 8 < cols; ++b) {
      const uint32_t bits = kernels::dropout_keep_bits(d.seed, d.offset, static_cast<uint64_t>(r),
                                                       static_cast<uint64_t>(b), threshold);
      for (int64_t e = 0; e < 8 && 8 * b + e < cols; ++e) k[r][8 * b + e] = (bits >> e) & 1u;
    }
  }
  return keep;
}

// The keep bits of a mask [n, ceil(cols / 8)] (uint8) as bools [n, cols].
at::Tensor unpack_bits(const at::Tensor& mask, int64_t cols) {
  const at::Tensor bits = at::arange(8, at::kByte);
  const at::Tensor unpacked = mask.cpu().unsqueeze(-1).bitwise_right_shift(bits).bitwise_and(1).to(at::kBool);
  return unpacked.flatten(-2).narrow(-1, 0, cols);
}

TEST(LoraDropoutKernel, MatchesItsDefinition) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  const std::vector<kernels::DropoutDraw> draws = {
      {0.1, 0x9e3779b97f4a7c15ULL, 0}, {0.25, 0x9e3779b97f4a7c15ULL, 4}, {0.0, 17, 8}, {0.5, 1234567, 1ULL << 40}};
  std::vector<double> p;
  for (const auto& d : draws) p.push_back(d.p);
  struct Case {
    int64_t n, cols, pitch;
  };
  for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const Case& c : {Case{37, 40, 56}, Case{300, 1000, 1000}, Case{129, 45, 51}, Case{64, 4096, 4144}}) {
      SCOPED_TRACE(std::string(c10::toString(dt)) + " " + std::to_string(c.n) + "x" + std::to_string(c.cols) +
                   " pitch " + std::to_string(c.pitch));
      const at::Tensor wide = at::randn({c.n, c.pitch}, gen, at::kFloat).to(dt);
      const at::Tensor x = wide.to(dev).narrow(1, 0, c.cols);  // rows c.pitch apart, as a producer's buffer
      const auto [h_dev, mask] = kernels::lora_dropout_fwd_cuda(x, draws);
      const at::Tensor h = h_dev.cpu();
      ASSERT_EQ(h.sizes(), (std::vector<int64_t>{static_cast<int64_t>(draws.size()), c.n, c.cols}));
      EXPECT_TRUE(test::same_bits(kernels::lora_dropout_apply_cuda(x, mask, p), h_dev));
      const at::Tensor g = at::randn({static_cast<int64_t>(draws.size()), c.n, c.cols}, gen, at::kFloat).to(dt);
      const at::Tensor dx = kernels::lora_dropout_bwd_cuda(g.to(dev), mask, p).cpu();
      at::Tensor acc = at::zeros({c.n, c.cols}, at::kFloat);
      for (size_t m = 0; m < draws.size(); ++m) {
        const at::Tensor keep = reference_keep(draws[m], c.n, c.cols);
        EXPECT_TRUE(at::equal(unpack_bits(mask[m], c.cols), keep)) << "member " << m;
        const float scale = static_cast<float>(1.0 / (1.0 - draws[m].p));
        const at::Tensor xs = wide.narrow(1, 0, c.cols).to(at::kFloat) * scale;
        EXPECT_TRUE(test::same_bits(h[m], at::where(keep, xs, at::zeros_like(xs)).to(dt))) << "member " << m;
        acc = acc + at::where(keep, g[m].to(at::kFloat) * scale, at::zeros_like(acc));
      }
      EXPECT_TRUE(test::same_bits(dx, acc.to(dt)));
    }
  }
}

TEST(LoraDropoutKernel, MasksLookIndependent) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  // 2048 x 4096 ones: the copies' non-zeros are the keep decisions.
  const int64_t n = 2048, cols = 4096;
  const at::Tensor x = at::ones({n, cols}, at::TensorOptions(dev).dtype(at::kBFloat16));
  const std::vector<kernels::DropoutDraw> draws = {{0.1, 42, 0}, {0.1, 42, 4}, {0.3, 43, 0}};
  const at::Tensor keep = (kernels::lora_dropout_fwd_cuda(x, draws).first != 0).to(at::kDouble);
  // Within five standard deviations of the fraction that independent decisions give.
  auto expect_fraction = [&](const at::Tensor& k, double p, const char* what) {
    const double got = k.mean().item<double>(), tol = 5 * std::sqrt(p * (1 - p) / static_cast<double>(k.numel()));
    EXPECT_NEAR(got, p, tol) << what;
  };
  expect_fraction(keep[0], 0.9, "kept, p 0.1");
  expect_fraction(keep[2], 0.7, "kept, p 0.3");
  expect_fraction(keep[0] * keep[1], 0.81, "kept by two draws of one seed");
  expect_fraction(keep[0] * keep[2], 0.63, "kept by draws of two seeds");
  expect_fraction(keep[0].narrow(1, 0, cols - 1) * keep[0].narrow(1, 1, cols - 1), 0.81, "next column (half)");
  expect_fraction(keep[0].narrow(1, 0, cols - 2) * keep[0].narrow(1, 2, cols - 2), 0.81, "next engine word");
  expect_fraction(keep[0].narrow(1, 0, cols - 8) * keep[0].narrow(1, 8, cols - 8), 0.81, "next engine block");
  expect_fraction(keep[0].narrow(0, 0, n - 1) * keep[0].narrow(0, 1, n - 1), 0.81, "next row");
  // Kept values are 1 / (1 - p) rounded to bf16, dropped ones 0.
  const at::Tensor h0 = kernels::lora_dropout_fwd_cuda(x, {draws[0]}).first[0].to(at::kFloat);
  EXPECT_TRUE(((h0 == 0) | (h0 == h0.max())).all().item<bool>());
  EXPECT_FLOAT_EQ(h0.max().item<float>(), static_cast<float>(at::tensor(1.0f / 0.9f).to(at::kBFloat16).item<float>()));
}

// Draws of `members` members: p = p0 + dp m, seed seed0 + m, offset 4 m; and their p's.
std::pair<std::vector<kernels::DropoutDraw>, std::vector<double>> member_draws(int64_t members, double p0, double dp,
                                                                               uint64_t seed0) {
  std::vector<kernels::DropoutDraw> draws;
  std::vector<double> p;
  for (int64_t m = 0; m < members; ++m) {
    const auto um = static_cast<uint64_t>(m);
    draws.push_back({p0 + dp * static_cast<double>(m), seed0 + um, 4 * um});
    p.push_back(draws.back().p);
  }
  return {draws, p};
}

// The masked products (kernels/lora_dropout_mm.cu) against float64 products of the definition's copies: every
// member's x A^T (rounded to x's dtype: within half an ulp of it, plus 1e-6 of the sum of the terms'
// magnitudes for the float32 sums) and dA (float32: 3e-5 of that sum), members at offset columns of wider
// tensors, x's rows strided, row counts and widths off the tiles' sizes; then probes that pin each element:
// one-hot rows of A (xa = the copy's element, bit for bit) and one-hot columns of dxa (dA = x / (1 - p) in
// float32 where kept). The draw-only kernel's bits equal the forward's.
TEST(LoraDropoutKernel, MaskedProductsMatchTheCopies) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  struct Case {
    int64_t n, in, pitch, r, members;
  };
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    const double ulp = dt == at::kBFloat16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
    for (const Case& c : {Case{300, 192, 200, 16, 3}, Case{37, 64, 64, 8, 1}, Case{129, 320, 336, 64, 2},
                          Case{200, 4096, 4096, 32, 3}, Case{70, 128, 128, 64, 5}}) {
      SCOPED_TRACE(std::string(c10::toString(dt)) + " n " + std::to_string(c.n) + " in " + std::to_string(c.in) +
                   " r " + std::to_string(c.r) + " members " + std::to_string(c.members));
      const at::Tensor wide = at::randn({c.n, c.pitch}, gen, at::kFloat).to(dt);
      const at::Tensor x = wide.to(dev).narrow(1, 0, c.in);
      ASSERT_TRUE(kernels::lora_dropout_mm_supported(x, std::vector<kernels::DropoutMmMember>(c.members), c.r));
      const auto [draws, p] = member_draws(c.members, 0.1, 0.15, 77);
      const at::Tensor mask = kernels::lora_dropout_draw_cuda(x, draws);
      const auto [h_dev, mask_fwd] = kernels::lora_dropout_fwd_cuda(x, draws);
      EXPECT_TRUE(at::equal(mask, mask_fwd));
      const at::Tensor h = h_dev.cpu();
      // The members' columns start after 8 of a member without dropout; out has 16 columns more than used.
      const int64_t ranks = 8 + c.members * c.r;
      const at::Tensor a_cat = (at::randn({ranks, c.in}, gen, at::kFloat) / std::sqrt(c.in)).to(dt);
      const at::Tensor dxa = at::randn({c.n, ranks}, gen, at::kFloat).to(dt);
      auto run = [&](const at::Tensor& a, const at::Tensor& d) {
        std::vector<kernels::DropoutMmMember> mm;
        for (int64_t m = 0; m < c.members; ++m)
          mm.push_back({a.to(dev).narrow(0, 8 + m * c.r, c.r), 8 + m * c.r, p[m]});
        const at::Tensor out = at::zeros({c.n, ranks + 16}, x.options());
        kernels::lora_dropout_xa_cuda(x, mask, mm, out.narrow(1, 0, ranks));
        return std::pair{out.cpu(), kernels::lora_dropout_da_cuda(x, mask, d.to(dev), mm, c.r)};
      };
      const auto [out, da] = run(a_cat, dxa);
      EXPECT_TRUE(at::equal(out.narrow(1, 0, 8), at::zeros({c.n, 8}, out.options())));
      EXPECT_TRUE(at::equal(out.narrow(1, ranks, 16), at::zeros({c.n, 16}, out.options())));
      for (int64_t m = 0; m < c.members; ++m) {
        const double scale = 1.0 / (1.0 - p[m]);
        const at::Tensor keep = unpack_bits(mask[m], c.in);
        const at::Tensor xk = at::where(keep, wide.narrow(1, 0, c.in).to(at::kDouble), at::zeros({}, at::kDouble));
        const at::Tensor am = a_cat.narrow(0, 8 + m * c.r, c.r).to(at::kDouble);
        const at::Tensor dm = dxa.narrow(1, 8 + m * c.r, c.r).to(at::kDouble);
        const at::Tensor ref = at::mm(xk, am.t()) * scale, cond = at::mm(xk.abs(), am.abs().t()) * scale;
        const at::Tensor got = out.narrow(1, 8 + m * c.r, c.r).to(at::kDouble);
        EXPECT_TRUE(((got - ref).abs() <= ulp * ref.abs() + 1e-6 * cond + 1e-30).all().item<bool>())
            << "xa, member " << m << ": worst " << ((got - ref).abs() / (ref.abs() + cond)).max().item<double>();
        const at::Tensor dref = at::mm(dm.t(), xk) * scale, dcond = at::mm(dm.abs().t(), xk.abs()) * scale;
        ASSERT_EQ(da[m].sizes(), (std::vector<int64_t>{c.r, c.in}));
        EXPECT_TRUE(((da[m].cpu().to(at::kDouble) - dref).abs() <= 3e-5 * dcond + 1e-30).all().item<bool>())
            << "dA, member " << m;
      }
      // Probes: A's row j of member m one-hot at column (7 j + 3 m + 5) % in, dxa's column j one-hot at row
      // (11 j + 5 m + 1) % n.
      at::Tensor a1 = at::zeros({ranks, c.in}, at::kFloat), d1 = at::zeros({c.n, ranks}, at::kFloat);
      for (int64_t m = 0; m < c.members; ++m) {
        for (int64_t j = 0; j < c.r; ++j) {
          a1[8 + m * c.r + j][(7 * j + 3 * m + 5) % c.in] = 1.0f;
          d1[(11 * j + 5 * m + 1) % c.n][8 + m * c.r + j] = 1.0f;
        }
      }
      const auto [out1, da1] = run(a1.to(dt), d1.to(dt));
      for (int64_t m = 0; m < c.members; ++m) {
        const float scale = static_cast<float>(1.0 / (1.0 - p[m]));
        const at::Tensor keep = unpack_bits(mask[m], c.in);
        const at::Tensor xf = wide.narrow(1, 0, c.in).to(at::kFloat);
        const at::Tensor xs = at::where(keep, xf * scale, at::zeros({}, at::kFloat));
        const at::Tensor dam = da1[m].cpu();
        for (int64_t j = 0; j < c.r; ++j) {
          const int64_t col = (7 * j + 3 * m + 5) % c.in, row = (11 * j + 5 * m + 1) % c.n;
          EXPECT_TRUE(test::same_bits(out1.select(1, 8 + m * c.r + j), h[m].select(1, col)))
              << "xa probe " << m << "," << j;
          EXPECT_TRUE(test::same_bits(dam[j], xs[row])) << "dA probe " << m << "," << j;
        }
      }
    }
  }
  // What the kernels refuse: a width off 64 or none, ranks off 8 / 16 / 32 / 64, too many members, float32.
  const at::Tensor x = at::randn({16, 96}, at::TensorOptions(dev).dtype(at::kBFloat16));
  using Members = std::vector<kernels::DropoutMmMember>;
  const Members one(1);
  const at::Tensor x64 = x.narrow(1, 0, 64);
  EXPECT_FALSE(kernels::lora_dropout_mm_supported(x, one, 16));
  EXPECT_FALSE(kernels::lora_dropout_mm_supported(x.narrow(1, 0, 0), one, 16));
  EXPECT_FALSE(kernels::lora_dropout_mm_supported(x64, one, 12));
  EXPECT_FALSE(kernels::lora_dropout_mm_supported(x64, Members(kernels::kMaxDropoutMm + 1), 16));
  EXPECT_FALSE(kernels::lora_dropout_mm_supported(x64.to(at::kFloat), one, 16));
  EXPECT_TRUE(kernels::lora_dropout_mm_supported(x64, one, 16));
  // dA's dxa: its rows 16-byte aligned, each member's columns at a multiple of 8 inside it.
  const at::Tensor dxa = at::zeros({16, 40}, x.options());
  EXPECT_TRUE(kernels::lora_dropout_mm_supported(x64, Members{{at::Tensor(), 8, 0.1}}, 16, dxa));
  EXPECT_FALSE(kernels::lora_dropout_mm_supported(x64, Members{{at::Tensor(), 4, 0.1}}, 16, dxa));
  EXPECT_FALSE(kernels::lora_dropout_mm_supported(x64, Members{{at::Tensor(), 32, 0.1}}, 16, dxa));
  EXPECT_FALSE(kernels::lora_dropout_mm_supported(x64, one, 16, at::zeros({16, 36}, x.options())));  // 72-byte rows
}

// The backward's input gradient through the masks (lora_dropout_mm.cu's dx) against float64 sums of the
// members' products through the definition's masks (rounded to the dtype: within an ulp of the sum, plus 1e-6 of
// the sum of the terms' magnitudes for the float32 products), members at offset columns of a wider dxa, row
// counts and widths off the 128 x 128 tiles, 1 to 8 members; then probes that pin each element: one-hot rows of
// dxa make each member's product a row of its A exactly, and dx must equal the float32 sum of the kept ones,
// scaled, in member order, rounded once, bit for bit. Last, what the kernel refuses.
TEST(LoraDropoutKernel, InputGradientMatchesTheDefinition) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::random_device{}());
  struct Case {
    int64_t n, in, r, members;
  };
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    const double ulp = dt == at::kBFloat16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
    for (const Case& c : {Case{300, 192, 16, 3}, Case{37, 64, 8, 1}, Case{129, 320, 64, 2}, Case{200, 4096, 32, 3},
                          Case{70, 128, 64, 5}, Case{130, 256, 8, 8}}) {
      SCOPED_TRACE(std::string(c10::toString(dt)) + " n " + std::to_string(c.n) + " in " + std::to_string(c.in) +
                   " r " + std::to_string(c.r) + " members " + std::to_string(c.members));
      const auto [draws, p] = member_draws(c.members, 0.05, 0.1, 91);
      const at::Tensor shape = at::empty({c.n, c.in}, at::TensorOptions(dev).dtype(dt));  // the draw reads no x
      const at::Tensor mask = kernels::lora_dropout_draw_cuda(shape, draws);
      // The members' columns start after 8 of a member without dropout; dxa has 16 columns more than used.
      const int64_t ranks = 8 + c.members * c.r;
      auto run = [&](const at::Tensor& a_cat, const at::Tensor& dxa) {
        const at::Tensor a = a_cat.to(dev), d = at::zeros({c.n, ranks + 16}, a.options());
        d.narrow(1, 0, ranks).copy_(dxa);
        std::vector<kernels::DropoutMmMember> mm;
        for (int64_t m = 0; m < c.members; ++m) mm.push_back({a.narrow(0, 8 + m * c.r, c.r), 8 + m * c.r, p[m]});
        EXPECT_TRUE(kernels::lora_dropout_dx_supported(d, mm, c.r));
        return kernels::lora_dropout_dx_cuda(d, mask, mm, c.r).cpu();
      };
      const at::Tensor a_cat = (at::randn({ranks, c.in}, gen, at::kFloat) / std::sqrt(c.r)).to(dt);
      const at::Tensor dxa = at::randn({c.n, ranks}, gen, at::kFloat).to(dt);
      const at::Tensor dx = run(a_cat, dxa);
      ASSERT_EQ(dx.sizes(), (std::vector<int64_t>{c.n, c.in}));
      at::Tensor ref = at::zeros({c.n, c.in}, at::kDouble), cond = at::zeros({c.n, c.in}, at::kDouble);
      for (int64_t m = 0; m < c.members; ++m) {
        const double scale = 1.0 / (1.0 - p[m]);
        const at::Tensor keep = unpack_bits(mask[m], c.in);
        const at::Tensor am = a_cat.narrow(0, 8 + m * c.r, c.r).to(at::kDouble);
        const at::Tensor dm = dxa.narrow(1, 8 + m * c.r, c.r).to(at::kDouble);
        const at::Tensor zero = at::zeros({}, at::kDouble);
        ref += at::where(keep, at::mm(dm, am) * scale, zero);
        cond += at::where(keep, at::mm(dm.abs(), am.abs()) * scale, zero);
      }
      const at::Tensor err = (dx.to(at::kDouble) - ref).abs();
      EXPECT_TRUE((err <= ulp * ref.abs() + 1e-6 * cond + 1e-30).all().item<bool>())
          << "worst " << (err / (ref.abs() + cond)).max().item<double>();
      // Probes: dxa's row t one-hot at column (7 t + 3 m) % r of member m.
      at::Tensor d1 = at::zeros({c.n, ranks}, at::kFloat);
      for (int64_t t = 0; t < c.n; ++t)
        for (int64_t m = 0; m < c.members; ++m) d1[t][8 + m * c.r + (7 * t + 3 * m) % c.r] = 1.0f;
      const at::Tensor dx1 = run(a_cat, d1.to(dt));
      at::Tensor acc = at::zeros({c.n, c.in}, at::kFloat);
      const at::Tensor rows = at::arange(c.n, at::kLong);
      for (int64_t m = 0; m < c.members; ++m) {
        const float scale = static_cast<float>(1.0 / (1.0 - p[m]));
        const at::Tensor picked = a_cat.to(at::kFloat).index_select(0, 8 + m * c.r + (7 * rows + 3 * m) % c.r);
        acc = acc + at::where(unpack_bits(mask[m], c.in), picked * scale, at::zeros_like(acc));
      }
      EXPECT_TRUE(test::same_bits(dx1, acc.to(dt)));
    }
  }
  // What it refuses: ranks off 8 / 16 / 32 / 64, no or too many members, float32, dxa's rows off 16 bytes, a
  // member's columns off a multiple of 8 or past dxa, widths off 64, A's of another dtype, shape or stride.
  const auto opt = at::TensorOptions(dev).dtype(at::kBFloat16);
  const at::Tensor dxa = at::zeros({16, 48}, opt), a = at::zeros({32, 128}, opt);
  using Members = std::vector<kernels::DropoutMmMember>;
  const Members one{{a.narrow(0, 0, 16), 8, 0.1}};
  EXPECT_TRUE(kernels::lora_dropout_dx_supported(dxa, one, 16));
  EXPECT_TRUE(kernels::lora_dropout_dx_supported(dxa, Members{{a.narrow(0, 0, 16), 8, 0.1}, {a.narrow(0, 16, 16),
                                                                                            24, 0.1}}, 16));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members{{a.narrow(0, 0, 12), 8, 0.1}}, 12));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members{}, 16));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members(kernels::kMaxDropoutMm + 1, one[0]), 16));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa.to(at::kFloat), Members{{a.narrow(0, 0, 16).to(at::kFloat), 8,
                                                                               0.1}}, 16));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(at::zeros({16, 36}, opt), one, 16));  // 72-byte rows
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members{{a.narrow(0, 0, 16), 4, 0.1}}, 16));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members{{a.narrow(0, 0, 16), 40, 0.1}}, 16));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members{{a.narrow(0, 0, 16).narrow(1, 0, 96), 8, 0.1}}, 16));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members{{a.narrow(0, 0, 16).to(at::kHalf), 8, 0.1}}, 16));
  const at::Tensor other_stride = at::zeros({16, 192}, opt).narrow(1, 0, 128);
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members{{a.narrow(0, 0, 16), 8, 0.1}, {other_stride, 24, 0.1}},
                                                  16));
  EXPECT_FALSE(kernels::lora_dropout_dx_supported(dxa, Members{{at::Tensor(), 8, 0.1}}, 16));
  const at::Tensor two_members_bits = at::zeros({2, 16, 16}, opt.dtype(at::kByte));
  EXPECT_THROW(kernels::lora_dropout_dx_cuda(dxa, two_members_bits, one, 16), c10::Error);
}

TEST(LoraDropoutKernel, ModuleOpReplaysFromTheGenerator) {
  QLORA_SKIP_WITHOUT_CUDA();
  const at::Device dev(at::kCUDA, 0);
  const at::Tensor x0 = at::randn({3, 50, 64}, at::TensorOptions(dev).dtype(at::kBFloat16));
  auto run = [&](uint64_t seed) {
    at::manual_seed(seed);
    const at::Tensor x = x0.clone().requires_grad_(true);
    const at::Tensor y = model::lora_dropout(x, 0.2);
    y.backward(at::ones_like(y));
    return std::pair{y.detach(), x.grad()};
  };
  const auto [y1, g1] = run(5);
  const auto [y2, g2] = run(5);
  const auto [y3, g3] = run(6);
  EXPECT_TRUE(test::same_bits(y1, y2));  // the same generator state, the same mask
  EXPECT_FALSE(test::same_bits(y1, y3));
  // The gradient passes where the forward kept, scaled like it: 1 / 0.8 in bf16 where kept, 0 elsewhere.
  const at::Tensor kept = (y1 != 0) | (x0 == 0);
  const float s = at::tensor(1.25f).to(at::kBFloat16).item<float>();
  EXPECT_TRUE(at::equal(g1.to(at::kFloat), at::where(kept, at::full_like(g1, s, at::kFloat), at::zeros_like(g1, at::kFloat))));
}
#endif

}  // namespace
}  // namespace qlora
