// A tiny random Llama quantized and serialized by transformers + bitsandbytes (tests/quant/make_bnb_llama.py)
// loads in our loader without re-quantizing (every projection holds exactly the file's 4-bit state) and
// gives transformers' logits on the dequantized model.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"
#include "trainer/model/linear.h"
#include "trainer/model/loader.h"

namespace qlora::model {
namespace {

std::filesystem::path dir() { return test::data_dir() / "quant_bnb_llama"; }

std::vector<std::string> variants() {
  return nlohmann::json::parse(read_file(dir() / "variants.json")).get<std::vector<std::string>>();
}

// Keeps [B, T, V] rows where mask [B, T] is 1 -> [N, V].
at::Tensor valid_rows(const at::Tensor& logits, const at::Tensor& mask) { return logits.index({mask.to(at::kBool)}); }

TEST(BnbLlama, LoadsWithoutRequantizingAndMatchesTransformersLogits) {
  at::NoGradGuard no_grad;
  const auto names = variants();
  ASSERT_FALSE(names.empty());
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    LoadOptions o;  // CPU, float32 compute
    o.quantize = true;
    // Deliberately different from the file's settings: a loader that re-quantized would use these, and
    // its state would then differ from the file's below.
    o.block_size = 128;
    o.double_quant = false;
    auto model = load_llama(dir() / name, o);

    // Every projection is the file's 4-bit state, bit for bit.
    auto ckpt = st::Checkpoint::open(dir() / name);
    int n_proj = 0;
    for (auto& slot : model->projections()) {
      SCOPED_TRACE(slot.name);
      auto* lin = dynamic_cast<Quant4Linear*>(slot.get().get());
      ASSERT_NE(lin, nullptr) << "projection is not 4-bit";
      const auto& q = lin->quantized();
      const std::string w = slot.name + ".weight";
      EXPECT_EQ(q.blocksize, 64);  // what transformers writes
      EXPECT_TRUE(at::equal(q.packed, ckpt.tensor(w)));
      EXPECT_TRUE(at::equal(q.absmax, ckpt.tensor(w + ".absmax")));
      EXPECT_EQ(q.double_quant(), ckpt.contains(w + ".nested_absmax"));
      if (q.double_quant()) {
        EXPECT_TRUE(at::equal(q.nested_absmax, ckpt.tensor(w + ".nested_absmax")));
      }
      ++n_proj;
    }
    EXPECT_EQ(n_proj, 7 * model->arch().num_layers);

    auto ref = st::File::open(dir() / (name + ".ref.safetensors"));
    const at::Tensor ids = ref->tensor("input_ids"), mask = ref->tensor("attention_mask");
    const at::Tensor want = ref->tensor("logits_f32");
    const at::Tensor got = model->forward(ids, mask);
    ASSERT_EQ(got.sizes(), want.sizes());
    // Tolerance: both sides hold the same float32 weights (our dequantization of bnb's state is bit-identical
    // to bnb's, test_quant) and compute in float32 (u = 6e-8) with different summation orders in matmuls of
    // length <= 192 over 2 layers: a few hundred u, ~1e-5 relative (as test_llama_parity). Reading the
    // nibbles or scales wrong, or re-quantizing, gives >= 1e-2.
    const double err = test::rel_err(valid_rows(got, mask), valid_rows(want, mask));
    std::printf("%s: relative logits error %.2e\n", name.c_str(), err);
    EXPECT_LT(err, 2e-5);
  }
}

}  // namespace
}  // namespace qlora::model
