// Logits parity with Hugging Face transformers on tiny random checkpoints that transformers wrote
// (tests/model/make_llama_fixtures.py): GQA, tied/untied, rope linear/dynamic/llama3, f32/bf16 files,
// sharded checkpoints, right padding.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"
#include "trainer/model/loader.h"

namespace qlora::model {
namespace {

std::vector<std::string> variants() {
  auto j = nlohmann::json::parse(read_file(test::data_dir() / "llama" / "variants.json"));
  return j.get<std::vector<std::string>>();
}

struct Reference {
  at::Tensor ids, mask, logits_f32, logits_bf16;
};

Reference load_reference(const std::string& name) {
  auto f = st::File::open(test::data_dir() / "llama" / (name + ".ref.safetensors"));
  Reference r{f->tensor("input_ids"), f->tensor("attention_mask"), f->tensor("logits_f32"), {}};
  if (f->contains("logits_bf16")) r.logits_bf16 = f->tensor("logits_bf16");
  return r;
}

// Keeps [B, T, V] rows where mask [B, T] is 1 -> [N, V].
at::Tensor valid_rows(const at::Tensor& logits, const at::Tensor& mask) {
  auto m = mask.to(logits.device()).to(at::kBool);
  return logits.index({m});
}

TEST(LlamaParity, Float32LogitsMatchTransformersOnCpu) {
  at::NoGradGuard no_grad;
  for (const auto& name : variants()) {
    SCOPED_TRACE(name);
    Reference ref = load_reference(name);
    LoadOptions o;  // CPU, float32, dense
    auto model = load_llama(test::data_dir() / "llama" / name, o);
    at::Tensor logits = model->forward(ref.ids, ref.mask);
    ASSERT_EQ(logits.sizes(), ref.logits_f32.sizes());
    // Tolerance: both sides compute in float32 (unit roundoff u = 6e-8) with different summation
    // orders in matmuls of length <= 128 across <= 3 layers; the error is a few hundred u at most
    // (~1e-5 relative). A wrong RoPE pairing, mask or norm gives O(1).
    double err = test::rel_err(valid_rows(logits, ref.mask), valid_rows(ref.logits_f32, ref.mask));
    EXPECT_LT(err, 2e-5) << "relative error " << err;
  }
}

TEST(LlamaParity, BFloat16LogitsMatchTransformersOnGpu) {
  QLORA_SKIP_WITHOUT_CUDA();
  at::NoGradGuard no_grad;
  for (const auto& name : variants()) {
    SCOPED_TRACE(name);
    Reference ref = load_reference(name);
    ASSERT_TRUE(ref.logits_bf16.defined()) << "fixture made without a GPU";
    LoadOptions o;
    o.device = at::Device(at::kCUDA);
    o.dtype = at::kBFloat16;
    auto model = load_llama(test::data_dir() / "llama" / name, o);
    at::Tensor logits = model->forward(ref.ids.cuda(), ref.mask.cuda()).to(at::kFloat).cpu();
    // Tolerance: bf16 has u = 2^-9 = 2e-3; both implementations round every activation to bf16 but
    // fuse differently, so per-layer differences of a few u compound over <= 3 layers: ~1e-2.
    double err = test::rel_err(valid_rows(logits, ref.mask), valid_rows(ref.logits_bf16, ref.mask));
    EXPECT_LT(err, 2e-2) << "relative error " << err;
    // And against the float32 truth, to show bf16 is not simply wrong the same way on both sides.
    double err32 = test::rel_err(valid_rows(logits, ref.mask), valid_rows(ref.logits_f32, ref.mask));
    EXPECT_LT(err32, 3e-2) << "relative error vs float32 " << err32;
  }
}

TEST(LlamaParity, KvCacheDecodingEqualsFullRecompute) {
  at::NoGradGuard no_grad;
  const std::string name = "gqa_linear_f32";
  Reference ref = load_reference(name);
  auto model = load_llama(test::data_dir() / "llama" / name, LoadOptions{});
  at::Tensor ids = ref.ids.slice(0, 0, 1);  // unpadded row
  at::Tensor full = model->forward(ids);
  KVCache cache;
  std::vector<at::Tensor> steps;
  steps.push_back(model->forward(ids.slice(1, 0, 7), {}, {}, &cache));
  for (int64_t t = 7; t < ids.size(1); ++t) steps.push_back(model->forward(ids.slice(1, t, t + 1), {}, {}, &cache));
  at::Tensor inc = at::cat(steps, 1);
  EXPECT_LT(test::rel_err(inc, full), 1e-5);
}

// The model's cached RoPE tables (LlamaForCausalLMImpl::rope) against the per-forward computation that the
// logits tests above check against transformers (rope_tables), bit for bit: default positions after a KV
// cache (the table grows past its first 256 rows), packed CPU positions, two dtypes, every rope type of the
// fixtures (dynamic NTK past max_position_embeddings too, where its scaling changes with the length).
TEST(LlamaParity, CachedRopeTablesEqualThePerForwardComputation) {
  at::NoGradGuard no_grad;
  for (const auto& name : variants()) {
    SCOPED_TRACE(name);
    auto model = load_llama(test::data_dir() / "llama" / name, LoadOptions{});
    const LlamaArch& arch = model->arch();
    auto expect_same = [&](const Rope& got, const Rope& want, const std::string& what) {
      EXPECT_TRUE(test::same_bits(got.cos.contiguous(), want.cos) && test::same_bits(got.sin.contiguous(), want.sin))
          << what;
    };
    for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
      for (auto [past, t] : std::vector<std::pair<int64_t, int64_t>>{{0, 12}, {5, 3}, {300, 4}, {20, 1}, {0, 9}}) {
        const at::Tensor pos = at::arange(past, past + t, at::kLong).unsqueeze(0).expand({2, t});
        expect_same(model->rope({}, 2, t, past, dt), rope_tables(arch, pos, dt),
                    "past " + std::to_string(past) + ", T " + std::to_string(t) + ", " + c10::toString(dt));
      }
      const at::Tensor packed =
          at::cat({at::arange(6, at::kLong), at::arange(6, at::kLong), at::arange(12, at::kLong)}).view({2, 12});
      expect_same(model->rope(packed, 2, 12, 0, dt), rope_tables(arch, packed, dt),
                  std::string("packed, ") + c10::toString(dt));
    }
  }
}

TEST(LlamaParity, SaveThenLoadRoundTrips) {
  at::NoGradGuard no_grad;
  const std::string name = "tied_dynamic_bf16";
  Reference ref = load_reference(name);
  auto model = load_llama(test::data_dir() / "llama" / name, LoadOptions{});
  auto dir = test::temp_dir("save-llama");
  save_llama(*model, dir, at::kFloat, /*max_shard_bytes=*/20000);
  ASSERT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  auto again = load_llama(dir, LoadOptions{});
  EXPECT_TRUE(at::equal(again->forward(ref.ids, ref.mask), model->forward(ref.ids, ref.mask)));
}

}  // namespace
}  // namespace qlora::model
