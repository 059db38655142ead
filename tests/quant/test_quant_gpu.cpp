// CUDA tests of the 4-bit stage: the kernels against the CPU reference (itself bit-exact with bitsandbytes,
// test_quant), and the frozen 4-bit linear in bfloat16. Every test skips without a GPU.
//   - quantize on CUDA: packed codes, absmax and the double-quant state identical to the CPU's, for
//     NF4/FP4, double quant on/off, every block size 32..4096, odd sizes, f32/bf16/f16 inputs;
//   - dequantize on CUDA to f32/bf16/f16: identical to the CPU dequantization (which rounds the same float32
//     product once to the output dtype), also from an unaligned packed buffer (the v1 fallback path);
//   - linear_4bit in bf16: forward and grad_x against float32 dequantize-then-matmul within a derived bf16
//     tolerance; no weight gradient, and no dequantized weight kept alive between forward and backward.
#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <limits>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "tests/test_util.h"
#include "trainer/quant/quant.h"

namespace qlora::quant {
namespace {

using test::same_bits;

// Weights like a trained layer's (normal with heavier tails and outliers); drawn on the CPU so both
// devices quantize the very same values.
at::Tensor weight(std::vector<int64_t> shape, at::ScalarType dtype) {
  auto x = at::randn(shape) * at::exp(at::randn(shape) * 0.5) * 0.02;
  auto flat = x.view(-1);
  auto idx = at::randint(0, flat.numel(), {std::max<int64_t>(1, flat.numel() / 500)});
  flat.index_put_({idx}, flat.index({idx}) * 8);
  return x.to(dtype);
}

std::string describe(QuantType t, bool dq, int64_t bs, at::ScalarType dt, const std::vector<int64_t>& shape) {
  std::string s = std::string(quant_type_name(t)) + (dq ? "/dq" : "/plain") + "/bs" + std::to_string(bs) + "/" +
                  c10::toString(dt) + "/";
  for (auto d : shape) s += std::to_string(d) + "x";
  return s;
}

void expect_same_state(const Quantized4bit& gpu, const Quantized4bit& cpu) {
  EXPECT_TRUE(gpu.packed.is_cuda());
  EXPECT_EQ(gpu.packed.sizes(), cpu.packed.sizes());
  EXPECT_TRUE(same_bits(gpu.packed, cpu.packed)) << "packed";
  EXPECT_TRUE(same_bits(gpu.absmax, cpu.absmax)) << "absmax";
  EXPECT_TRUE(same_bits(gpu.code, cpu.code)) << "code";
  ASSERT_EQ(gpu.double_quant(), cpu.double_quant());
  if (cpu.double_quant()) {
    EXPECT_TRUE(same_bits(gpu.nested_absmax, cpu.nested_absmax)) << "nested_absmax";
    EXPECT_TRUE(same_bits(gpu.nested_code, cpu.nested_code)) << "nested_code";
    EXPECT_EQ(std::memcmp(&gpu.nested_offset, &cpu.nested_offset, 4), 0) << gpu.nested_offset << " vs "
                                                                        << cpu.nested_offset;
  }
}

const std::vector<std::vector<int64_t>> kShapes = {
    {1, 1}, {37, 53}, {129, 31}, {3, 4097}, {5001}, {256, 320}, {1000, 333}, {2, 3, 4099}};

TEST(QuantGpu, QuantizeIsBitIdenticalToCpu) {
  QLORA_SKIP_WITHOUT_CUDA();
  int n_cases = 0;
  for (QuantType t : {QuantType::NF4, QuantType::FP4})
    for (bool dq : {false, true})
      for (int64_t bs = 32; bs <= 4096; bs *= 2)
        for (size_t si = 0; si < kShapes.size(); ++si) {
          // Every dtype on every shape would be 3x the time for no new path: rotate the dtype.
          const at::ScalarType dt = std::array{at::kFloat, at::kBFloat16, at::kHalf}[(si + bs / 32) % 3];
          SCOPED_TRACE(describe(t, dq, bs, dt, kShapes[si]));
          const at::Tensor w = weight(kShapes[si], dt);
          const Quantized4bit cpu = quantize_4bit(w, t, bs, dq);
          const Quantized4bit gpu = quantize_4bit(w.cuda(), t, bs, dq);
          expect_same_state(gpu, cpu);
          ++n_cases;
        }
  EXPECT_EQ(n_cases, 2 * 2 * 8 * static_cast<int>(kShapes.size()));
}

// A tensor with one zero row per block size and a whole zero 4096-block: both devices must agree there too
// (they share the formula; only bnb's own CUDA and CPU paths differ on all-zero blocks).
TEST(QuantGpu, QuantizeZeroBlocksLikeCpu) {
  QLORA_SKIP_WITHOUT_CUDA();
  at::Tensor w = weight({64, 4096 + 64}, at::kFloat);
  w.slice(0, 3, 5).zero_();
  w.view(-1).slice(0, 10 * 4096, 11 * 4096 + 17).zero_();
  for (QuantType t : {QuantType::NF4, QuantType::FP4})
    for (bool dq : {false, true})
      for (int64_t bs : {32, 64, 4096}) {
        SCOPED_TRACE(describe(t, dq, bs, at::kFloat, {64, 4160}));
        expect_same_state(quantize_4bit(w.cuda(), t, bs, dq), quantize_4bit(w, t, bs, dq));
      }
}

TEST(QuantGpu, DequantizeIsBitIdenticalToCpu) {
  QLORA_SKIP_WITHOUT_CUDA();
  for (QuantType t : {QuantType::NF4, QuantType::FP4})
    for (bool dq : {false, true})
      for (int64_t bs : {32, 64, 256, 4096})
        for (const auto& shape : kShapes) {
          SCOPED_TRACE(describe(t, dq, bs, at::kFloat, shape));
          const Quantized4bit cpu = quantize_4bit(weight(shape, at::kFloat), t, bs, dq);
          const Quantized4bit gpu = to_device(cpu, at::Device(at::kCUDA));
          for (at::ScalarType out : {at::kFloat, at::kBFloat16, at::kHalf}) {
            SCOPED_TRACE(c10::toString(out));
            // Poison the caching allocator's memory first, so a kernel that skips an element is caught.
            { at::full({2 * cpu.numel() + 1024}, std::numeric_limits<float>::quiet_NaN(), at::kCUDA); }
            const at::Tensor y = dequantize_4bit(gpu, out);
            EXPECT_EQ(y.sizes(), at::IntArrayRef(shape));
            EXPECT_TRUE(same_bits(y, dequantize_4bit(cpu, out)));
          }
        }
}

// Into the first columns of a wider matrix (the fused path's [W | s B] buffer): the 2-byte dtypes take the
// dequantize kernel's pitched stores, float32 goes through a contiguous copy; either way the values are the
// contiguous dequantization's, bit for bit, and the columns right of the weight are left as they were.
// Widths from one quantization block to the 7B MLP's (the kernel's 8192-element spans cross many rows of
// 64 and a row boundary at an odd place for 11008), and a row block of a taller buffer (a group member).
TEST(QuantGpu, DequantizeIntoPitchedRowsMatchesContiguous) {
  QLORA_SKIP_WITHOUT_CUDA();
  const std::vector<std::vector<int64_t>> shapes = {{130, 64}, {37, 200}, {24, 4096}, {9, 11008}};
  for (bool dq : {false, true})
    for (const auto& shape : shapes)
      for (at::ScalarType out : {at::kBFloat16, at::kHalf, at::kFloat}) {
        SCOPED_TRACE(describe(QuantType::NF4, dq, 64, out, shape));
        const Quantized4bit gpu = to_device(quantize_4bit(weight(shape, at::kFloat), QuantType::NF4, 64, dq),
                                            at::Device(at::kCUDA));
        const int64_t rows = shape[0], cols = shape[1], spare = 24, above = 5;
        const at::Tensor buffer = at::full({above + rows + 3, cols + spare}, 7.0, at::TensorOptions(at::kCUDA).dtype(out));
        const at::Tensor into = buffer.narrow(0, above, rows).narrow(1, 0, cols);
        dequantize_4bit_into(gpu, into);
        EXPECT_TRUE(same_bits(into.contiguous(), dequantize_4bit(gpu, out)));
        EXPECT_TRUE(buffer.narrow(1, cols, spare).eq(7.0).all().item<bool>()) << "spare columns written";
        EXPECT_TRUE(buffer.narrow(0, 0, above).eq(7.0).all().item<bool>()) << "rows above written";
        EXPECT_TRUE(buffer.narrow(0, above + rows, 3).eq(7.0).all().item<bool>()) << "rows below written";
      }
}

// The packed buffer at an odd address (a view into a larger allocation): the op must take the byte path.
TEST(QuantGpu, DequantizeFromUnalignedPackedBuffer) {
  QLORA_SKIP_WITHOUT_CUDA();
  for (int64_t shift : {1, 3, 8}) {
    SCOPED_TRACE(shift);
    const Quantized4bit cpu = quantize_4bit(weight({96, 200}, at::kBFloat16), QuantType::NF4, 64, true);
    Quantized4bit gpu = to_device(cpu, at::Device(at::kCUDA));
    const int64_t nb = gpu.packed.numel();
    at::Tensor buf = at::empty({nb + 16}, gpu.packed.options());
    at::Tensor view = buf.slice(0, shift, shift + nb);
    view.copy_(gpu.packed.view(-1));
    ASSERT_TRUE(view.is_contiguous());
    ASSERT_NE(reinterpret_cast<uintptr_t>(view.data_ptr()) % 16, 0u);
    gpu.packed = view.view({-1, 1});
    for (at::ScalarType out : {at::kFloat, at::kBFloat16, at::kHalf})
      EXPECT_TRUE(same_bits(dequantize_4bit(gpu, out), dequantize_4bit(cpu, out))) << c10::toString(out);
  }
}

TEST(QuantGpu, Linear4bitBf16MatchesFloat32DequantMatmul) {
  QLORA_SKIP_WITHOUT_CUDA();
  for (QuantType t : {QuantType::NF4, QuantType::FP4}) {
    SCOPED_TRACE(quant_type_name(t));
    const int64_t out = 704, in = 512;
    const Quantized4bit q = quantize_4bit(weight({out, in}, at::kBFloat16).cuda(), t, 64, true);
    const at::Tensor x = at::randn({4, 9, in}, at::TensorOptions(at::kCUDA).dtype(at::kBFloat16)).requires_grad_(true);
    const at::Tensor y = linear_4bit(x, q);  // [4, 9, out] bf16
    ASSERT_EQ(y.scalar_type(), at::kBFloat16);
    const at::Tensor g = at::randn(y.sizes(), y.options());
    y.backward(g);

    // Reference: the same bf16 x and grad, the weight dequantized to float32, matmul in float32.
    // Tolerance (relative Frobenius): ours rounds W to bf16 (unit roundoff u = 2^-8; random relative errors
    // of RMS ~u/sqrt(3) = 2.3e-3 that average over the dot products, so the output error is at most that)
    // and rounds the fp32-accumulated output to bf16 (another ~2.3e-3); in quadrature ~3.2e-3. Bounded
    // at 1e-2 (3x); a wrong code, scale or nibble order gives O(1).
    const at::Tensor w32 = dequantize_4bit(q, at::kFloat);  // [out, in]
    const at::Tensor y_ref = at::matmul(x.detach().to(at::kFloat), w32.t());
    const at::Tensor gx_ref = at::matmul(g.to(at::kFloat), w32);
    const double ey = test::rel_err(y, y_ref), eg = test::rel_err(x.grad(), gx_ref);
    std::printf("%s: bf16 linear_4bit relative error forward %.2e, grad_x %.2e\n", quant_type_name(t), ey, eg);
    EXPECT_LT(ey, 1e-2);
    EXPECT_LT(eg, 1e-2);
    EXPECT_GT(ey, 0.0);  // bf16 really was used (an fp32 path would be ~1e-7, and this test would be vacuous)
    // No weight gradient: the node has x's edge only; the 4-bit tensors never require grad.
    EXPECT_EQ(y.grad_fn()->next_edges().size(), 1u);
    EXPECT_FALSE(q.packed.requires_grad());
    EXPECT_FALSE(q.absmax.requires_grad());
  }
}

TEST(QuantGpu, Linear4bitKeepsNoDequantizedWeightForBackward) {
  QLORA_SKIP_WITHOUT_CUDA();
#ifdef QLORA_WITH_CUDA
  const int64_t out = 2048, in = 2048;
  const Quantized4bit q = quantize_4bit(weight({out, in}, at::kBFloat16).cuda(), QuantType::NF4, 64, true);
  const at::Tensor x = at::randn({8, in}, at::TensorOptions(at::kCUDA).dtype(at::kBFloat16)).requires_grad_(true);
  c10::cuda::device_synchronize();
  const int dev = c10::cuda::current_device();
  auto allocated = [&] {
    return c10::cuda::CUDACachingAllocator::getDeviceStats(dev)
        .allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .current;
  };
  const int64_t before = allocated();
  at::Tensor y = linear_4bit(x, q);  // [8, out]
  const int64_t held = allocated() - before;
  // A saved bf16 weight would hold out * in * 2 = 8 MiB; the output is 32 KiB.
  std::printf("CUDA bytes held after forward: %lld (output %lld, bf16 weight %lld)\n", static_cast<long long>(held),
              static_cast<long long>(y.nbytes()), static_cast<long long>(out * in * 2));
  EXPECT_LT(held, out * in * 2 / 8);
  y.sum().backward();
  EXPECT_TRUE(x.grad().defined());
#endif
}

}  // namespace
}  // namespace qlora::quant
