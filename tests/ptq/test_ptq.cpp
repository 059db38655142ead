// Post-training quantization (trainer/quant/ptq.h): int8 codes, scales and zero points equal torch's own
// quantize_per_tensor / quantize_per_channel (called in-process through ATen, the implementation the Python
// reference uses), the error statistics on a hand-computed case, option errors, and a 4-bit checkpoint
// written by `qlora quantize --out` loading in model::load_llama without re-quantizing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

#include "tests/test_util.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"
#include "trainer/model/linear.h"
#include "trainer/model/loader.h"
#include "trainer/quant/ptq.h"

namespace qlora::quant::ptq {
namespace {

// Fresh weights with rows of different magnitude and a few outliers; one all-zero row (scale floors at
// eps) and, when one_sided, only non-negative values (the asymmetric zero point is then 0).
at::Tensor weight(int64_t out, int64_t in, bool one_sided) {
  at::Tensor w = at::randn({out, in}) * 0.02 * at::exp(at::randn({out, 1}) * 0.5);
  w.view(-1).index_put_({at::randint(0, out * in, {std::max<int64_t>(1, out * in / 500)})},
                        at::randn({std::max<int64_t>(1, out * in / 500)}) * 0.2);
  if (one_sided) w = w.abs();
  w[3].zero_();
  return w;
}

// torch's reference: observer parameters as in MinMaxObserver (ptq.h), then ATen's quantize op.
TEST(Int8, CodesScalesAndZeroPointsEqualTorch) {
  for (bool symmetric : {true, false}) {
    for (bool per_channel : {false, true}) {
      for (bool one_sided : {false, true}) {
        SCOPED_TRACE(testing::Message() << "symmetric " << symmetric << " per_channel " << per_channel
                                        << " one_sided " << one_sided);
        const at::Tensor w = weight(96, 160, one_sided);
        const Int8Quantized q = quantize_int8(w, symmetric, per_channel);
        ASSERT_EQ(q.scale.dim(), per_channel ? 1 : 0);
        const auto qtype = symmetric ? at::kQInt8 : at::kQUInt8;
        const at::Tensor zp = symmetric ? at::zeros(q.scale.sizes(), at::kLong) : q.zero_point.to(at::kLong);
        at::Tensor ref = per_channel ? at::quantize_per_channel(w, q.scale.to(at::kDouble), zp, 0, qtype)
                                     : at::quantize_per_tensor(w, q.scale.item<double>(), zp.item<int64_t>(), qtype);
        EXPECT_TRUE(at::equal(q.q, ref.int_repr()));
        EXPECT_TRUE(at::equal(dequantize_int8(q), ref.dequantize()));
        // Every code within the documented range, zero exact.
        EXPECT_GE(q.q.to(at::kInt).min().item<int>(), symmetric ? -127 : 0);
        EXPECT_TRUE(at::equal(dequantize_int8(q)[3], at::zeros({160})));
        if (!symmetric && one_sided) EXPECT_EQ(q.zero_point.max().item<int>(), 0);
        // Asymmetric uses the full 0..255 where the data spans it (per tensor: its min and max are codes).
        if (!symmetric && !per_channel) {
          EXPECT_EQ(q.q.min().item<int>(), 0);
          EXPECT_EQ(q.q.max().item<int>(), 255);
        }
      }
    }
  }
}

TEST(Int8, AsymmetricBeatsSymmetricOnOneSidedWeights) {
  // Symmetric spends half its codes on negative values that never occur: its step is ~2x, its MSE ~4x.
  const at::Tensor w = weight(64, 256, /*one_sided=*/true);
  auto sym = quantize_weight(w, {Scheme::Int8Sym, true}).stats;
  auto asym = quantize_weight(w, {Scheme::Int8Asym, true}).stats;
  EXPECT_GT(sym.mse, 2.5 * asym.mse);
  EXPECT_GT(asym.sqnr_db, sym.sqnr_db + 4.0);  // ~6 dB: one bit
}

TEST(Stats, HandComputedCase) {
  const at::Tensor w = at::tensor({1.0f, -2.0f, 0.5f, 0.0f});
  const at::Tensor d = at::tensor({1.0f, -1.5f, 0.75f, 0.0f});
  const ErrorStats s = error_stats(w, d, /*storage_bytes=*/3);
  EXPECT_DOUBLE_EQ(s.mse, (0.25 + 0.0625) / 4);
  EXPECT_DOUBLE_EQ(s.max_abs, 0.5);
  EXPECT_DOUBLE_EQ(s.sqnr_db, 10 * std::log10(5.25 / 0.3125));
  EXPECT_DOUBLE_EQ(s.bits_per_param, 6.0);
  EXPECT_TRUE(std::isinf(error_stats(w, w, 1).sqnr_db));
}

TEST(Bits, FourBitPayloadMatchesTheFormat) {
  // [4096, 4096] at block 64: 4 + 32/64 = 4.5 bits; double quant: 4 + 8/64 + 32/(64*256) (+ the offset).
  const at::Tensor w = at::randn({256, 1024});
  const int64_t n = w.numel();
  auto plain = quantize_weight(w, {Scheme::NF4, false, false, 64}).stats;
  EXPECT_DOUBLE_EQ(plain.bits_per_param, 4.5);
  auto dq = quantize_weight(w, {Scheme::NF4, false, true, 64}).stats;
  EXPECT_DOUBLE_EQ(dq.bits_per_param, 8.0 * (n / 2 + n / 64 + (n / 64 / 256) * 4 + 4) / n);
}

TEST(Options, ErrorsSayWhatIsWrong) {
  EXPECT_THROW_MSG(parse_scheme("int4"), "unknown quantization scheme 'int4'", "int8-sym, int8-asym, nf4, fp4");
  EXPECT_THROW_MSG(parse_scheme("nf5"), "did you mean 'nf4'");
  EXPECT_THROW_MSG(validate({Scheme::NF4, false, false, 48}), "unsupported block size 48", "[32, 4096]");
  EXPECT_THROW_MSG(validate({Scheme::FP4, false, false, 8192}), "unsupported block size 8192");
  EXPECT_THROW_MSG(validate({Scheme::NF4, true, false, 64}), "--per-channel applies to the int8 schemes");
  EXPECT_THROW_MSG(validate({Scheme::Int8Asym, false, true, 64}), "--double-quant applies to the 4-bit schemes");
}

// `qlora quantize --out` (nf4 + double quant) -> model::load_llama keeps the file's 4-bit state (no
// re-quantization: the load options ask for something else) and that state is exactly what quantizing the
// original weights gives, so the logits equal a model quantized while loading.
TEST(QuantizeOut, Nf4CheckpointLoadsInOurLoaderWithoutRequantizing) {
  at::NoGradGuard no_grad;
  const auto model_dir = test::data_dir() / "ptq" / "model";
  const auto out = test::temp_dir("ptq") / "nf4";
  const char* cli = std::getenv("QLORA_CLI");
  ASSERT_NE(cli, nullptr);
  const std::string cmd = std::string(cli) + " quantize '" + model_dir.string() +
                          "' --scheme nf4 --double-quant --block-size 64 --out '" + out.string() + "' > /dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;

  model::LoadOptions o;  // CPU float32
  o.quantize = true;
  o.block_size = 128;  // a loader that re-quantized would give a different state below
  o.double_quant = false;
  auto loaded = model::load_llama(out, o);
  auto orig = st::Checkpoint::open(model_dir);
  int n = 0;
  for (auto& slot : loaded->projections()) {
    SCOPED_TRACE(slot.name);
    auto* lin = dynamic_cast<model::Quant4Linear*>(slot.get().get());
    ASSERT_NE(lin, nullptr);
    const auto& q = lin->quantized();
    const auto want = quantize_4bit(orig.tensor(slot.name + ".weight"), QuantType::NF4, 64, true);
    EXPECT_EQ(q.blocksize, 64);
    ASSERT_TRUE(q.double_quant());
    EXPECT_TRUE(at::equal(q.packed, want.packed));
    EXPECT_TRUE(at::equal(q.absmax, want.absmax));
    EXPECT_TRUE(at::equal(q.nested_absmax, want.nested_absmax));
    EXPECT_EQ(q.nested_offset, want.nested_offset);
    ++n;
  }
  EXPECT_EQ(n, 7 * loaded->arch().num_layers);

  model::LoadOptions d;
  d.quantize = true;
  d.block_size = 64;
  d.double_quant = true;
  auto direct = model::load_llama(model_dir, d);
  const at::Tensor ids = at::randint(0, loaded->arch().vocab_size, {2, 11});
  EXPECT_TRUE(at::equal(loaded->forward(ids), direct->forward(ids)));
  remove_tree(out.parent_path());
}

}  // namespace
}  // namespace qlora::quant::ptq
