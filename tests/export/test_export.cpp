// Inference against transformers + PEFT (make_export_fixtures.py writes the reference):
//   KV-cache decoding equals one full forward; greedy generation is token-identical to transformers'
//   generate(do_sample=False) (base, base + adapter, stopping at an EOS id); our logits with the adapter
//   equal PEFT's; loading errors (adapter targets / shapes that do not fit, no tokenizer) say what and where.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <fstream>
#include <set>

#include "tests/test_util.h"
#include "trainer/core/fs.h"
#include "trainer/generate/generate.h"
#include "trainer/io/safetensors.h"

namespace {

using namespace qlora;
namespace fs = std::filesystem;

fs::path dir() { return test::data_dir() / "export"; }

model::LlamaForCausalLM load(const std::string& adapter = "adapter") {
  return gen::load_for_inference(dir() / "base", adapter.empty() ? fs::path() : dir() / adapter, {});
}

nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(read_file(p)); }

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() / b.abs().max().item<double>();
}

// Tolerance for two float32 evaluations of the same 2-layer model that differ only in the shapes of the
// matmuls (summation order): each dot product has relative error ~ K * 2^-24 with K <= 128, i.e. < 1e-5,
// and the two layers do not amplify it measurably; 1e-5 of the largest logit still catches a wrong
// position, a stale cache entry or a wrong mask (those change logits by O(1)).
constexpr double kF32Rel = 1e-5;

TEST(KVCache, IncrementalEqualsFullForward) {
  auto m = load();
  at::NoGradGuard ng;
  auto ref = st::File::open(dir() / "ref.safetensors");
  at::Tensor ids = ref->tensor("input_ids").slice(0, 0, 1);  // [1, 19]
  const int64_t t = ids.size(1);
  at::Tensor full = m->forward(ids);  // [1, T, V]
  model::KVCache cache;
  std::vector<at::Tensor> parts;
  parts.push_back(m->forward(ids.slice(1, 0, 7), {}, {}, &cache));    // prefill
  parts.push_back(m->forward(ids.slice(1, 7, 12), {}, {}, &cache));   // a chunk after a past (masked)
  for (int64_t i = 12; i < t; ++i) parts.push_back(m->forward(ids.slice(1, i, i + 1), {}, {}, &cache));
  at::Tensor inc = at::cat(parts, 1);
  EXPECT_EQ(cache.length(), t);
  const double rel = max_rel(inc, full);
  std::printf("incremental vs full forward: max |diff| / max |logit| = %.3e\n", rel);
  EXPECT_LT(rel, kF32Rel);
  // A wrong cache (positions restarting at 0) must fail the same bound: the check has teeth.
  model::KVCache c2;
  m->forward(ids.slice(1, 0, 7), {}, {}, &c2);
  at::Tensor wrong = m->forward(ids.slice(1, 7, 8), {}, at::zeros({1, 1}, at::kLong), &c2);
  EXPECT_GT(max_rel(wrong, full.slice(1, 7, 8)), 100 * kF32Rel);
}

TEST(Adapter, LogitsEqualPeft) {
  auto m = load();
  at::NoGradGuard ng;
  auto ref = st::File::open(dir() / "ref.safetensors");
  at::Tensor mask = ref->tensor("attention_mask");
  at::Tensor logits = m->forward(ref->tensor("input_ids"), mask);
  at::Tensor sel = mask.to(at::kBool);
  const double rel = test::rel_err(logits.index({sel}), ref->tensor("logits_peft").index({sel}));
  const double rel_base = test::rel_err(logits.index({sel}), ref->tensor("logits_base").index({sel}));
  std::printf("ours vs PEFT: rel err %.3e (vs the base alone: %.3e)\n", rel, rel_base);
  EXPECT_LT(rel, 2e-5);  // as tests/lora: same float32 model, different summation orders
  EXPECT_GT(rel_base, 1e-2);
}

std::vector<int32_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

TEST(Generate, GreedyMatchesTransformers) {
  auto g = read_json(dir() / "generate.json");
  gen::SamplingOptions o;
  o.max_new_tokens = g["max_new_tokens"].get<int64_t>();
  o.stop_ids = {2};
  for (const char* which : {"base", "adapter"}) {
    auto m = load(std::string(which) == "base" ? "" : "adapter");
    for (size_t i = 0; i < g["prompts"].size(); ++i) {
      auto got = gen::generate(*m, ids_of(g["prompts"][i]), o);
      EXPECT_EQ(got, ids_of(g[which][i])) << which << " prompt " << i;
    }
  }
  // Stopping: with a stop id the continuation emits mid-way, generation ends right after it.
  auto m = load();
  o.stop_ids = {g["stop"]["eos"].get<int64_t>()};
  std::vector<int32_t> streamed;
  auto got = gen::generate(*m, ids_of(g["prompts"][g["stop"]["prompt"].get<size_t>()]), o,
                           [&](int32_t id) { streamed.push_back(id); });
  EXPECT_EQ(got, ids_of(g["stop"]["ids"]));
  EXPECT_EQ(streamed, got);
}

TEST(Generate, SamplingOptions) {
  gen::SamplingOptions o;
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(3);
  at::Tensor logits = at::tensor({0.0f, 5.0f, 4.9f, -1.0f});
  EXPECT_EQ(gen::pick_next(logits, o, g), 1);  // greedy
  o.temperature = 1.0;
  o.top_k = 1;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(gen::pick_next(logits, o, g), 1);  // top-1 = greedy
  o.top_k = 0;
  o.top_p = 0.5;  // p(1) = 0.51 > 0.5: the nucleus is {1}
  for (int i = 0; i < 20; ++i) EXPECT_EQ(gen::pick_next(logits, o, g), 1);
  o.top_p = 0.9;  // {1, 2}
  std::set<int64_t> seen;
  for (int i = 0; i < 200; ++i) seen.insert(gen::pick_next(logits, o, g));
  EXPECT_EQ(seen, (std::set<int64_t>{1, 2}));
  o.top_p = 0.0;
  EXPECT_THROW_MSG(gen::validate(o), "--top-p");
}

TEST(Errors, AdapterThatDoesNotFit) {
  EXPECT_THROW_MSG(load("adapter_badtarget"), "adapter_config.json", "w_gate");
  EXPECT_THROW_MSG(load("adapter_badshape"), "adapter_model.safetensors", "shape");
  EXPECT_THROW_MSG(load("no_such_adapter"), "no_such_adapter", "does not exist");
}

TEST(Errors, MissingTokenizer) {
  const std::string looked_at = (dir() / "base_notok" / "tokenizer.model").string();
  EXPECT_THROW_MSG(gen::load_tokenizer(dir() / "base_notok", "", ""), "no tokenizer", looked_at.c_str(), "--tokenizer");
  EXPECT_THROW_MSG(gen::load_tokenizer(dir() / "base", "", "/nonexistent/tok.model"), "/nonexistent/tok.model");
}

}  // namespace
