// The LoRA stage against transformers + PEFT on a tiny random Llama (tests/lora/make_lora_fixtures.py):
// logits, the masked causal-LM loss and every adapter gradient; rsLoRA scaling; PEFT's kaiming init bit
// for bit; PEFT's trainable-parameter count; and our saved adapter for PEFT to load
// (check_cpp_adapter.py reads what SaveForPeft writes). Errors of load / save name what and where.
//
// Float32 everywhere (CPU). Shapes: B = 2 rows, T = 17 positions, V = 300, H = 48, I = 100, r = 4.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <fstream>

#include "tests/test_util.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"
#include "trainer/lora/lora.h"
#include "trainer/lora/loss.h"
#include "trainer/lora/peft.h"
#include "trainer/model/loader.h"
#include "trainer/train/trainer.h"

namespace qlora::lora {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

fs::path dir() { return test::data_dir() / "lora"; }

struct Reference {
  std::shared_ptr<st::File> f;
  at::Tensor ids, mask, labels;  // int64 [B, T]
  at::Tensor t(const std::string& name) const { return f->tensor(name).clone(); }
};

const Reference& ref() {
  static Reference r = [] {
    Reference x;
    x.f = st::File::open(dir() / "ref.safetensors");
    x.ids = x.t("input_ids");
    x.mask = x.t("attention_mask");
    x.labels = x.t("labels");
    return x;
  }();
  return r;
}

model::LlamaForCausalLM base() { return model::load_llama(dir() / "base", model::LoadOptions{}); }

// [B, T, V] rows where mask [B, T] is 1 -> [N, V] (logits at padding are not compared: nobody reads them).
at::Tensor valid_rows(const at::Tensor& logits, const at::Tensor& mask) { return logits.index({mask.to(at::kBool)}); }

double max_abs(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

// Float32 logits tolerance. Both sides compute in float32 (u = 2^-24 = 6e-8) and differ only in the
// summation order of matmuls (length <= I = 100) and attention, across 2 layers plus the LoRA branch
// (two more matmuls of length <= 100 and r = 4 per projection). Each layer contributes a few tens of u
// relative error; through 2 layers and lm_head that stays below ~1e-6 relative. 2e-5 leaves a factor of
// 20 for unlucky cancellation while a wrong scaling (alpha/r vs alpha/sqrt(r) is a factor 2 on the
// branch), a missed projection or a dropout left on in eval mode gives errors of 1e-2 or more.
constexpr double kLogitsRel = 2e-5;

TEST(LoraParity, LogitsMatchPeftInEvalMode) {
  at::NoGradGuard no_grad;
  auto model = base();
  auto loaded = load_peft_adapter(*model, dir() / "adapter");
  EXPECT_EQ(loaded.config.r, 4);
  EXPECT_EQ(loaded.config.alpha, 8.0);
  EXPECT_EQ(loaded.parameters.size(), 2u * 7 * 2);
  model->eval();
  at::Tensor logits = model->forward(ref().ids, ref().mask);
  at::Tensor want = ref().t("logits");
  ASSERT_EQ(logits.sizes(), want.sizes());
  double err = test::rel_err(valid_rows(logits, ref().mask), valid_rows(want, ref().mask));
  double abs_err = max_abs(valid_rows(logits, ref().mask), valid_rows(want, ref().mask));
  std::cout << "logits: rel err " << err << ", max abs diff " << abs_err << "\n";
  EXPECT_LT(err, kLogitsRel);
  // The adapter matters: without it the logits are far from PEFT's (guards against a no-op comparison).
  auto plain = base();
  plain->eval();
  EXPECT_GT(test::rel_err(valid_rows(plain->forward(ref().ids, ref().mask), ref().mask), valid_rows(want, ref().mask)),
            100 * kLogitsRel);
}

TEST(LoraParity, RsLoraLogitsMatchPeft) {
  at::NoGradGuard no_grad;
  auto model = base();
  auto loaded = load_peft_adapter(*model, dir() / "adapter_rslora");
  ASSERT_TRUE(loaded.config.rslora);
  auto mods = lora_modules(*model);
  ASSERT_FALSE(mods.empty());
  EXPECT_EQ(mods[0].second->scaling(), 8.0 / std::sqrt(4.0));  // alpha / sqrt(r), not alpha / r
  model->eval();
  at::Tensor logits = model->forward(ref().ids, ref().mask);
  at::Tensor want = ref().t("logits_rslora");
  double err = test::rel_err(valid_rows(logits, ref().mask), valid_rows(want, ref().mask));
  std::cout << "rslora logits: rel err " << err << ", max abs diff "
            << max_abs(valid_rows(logits, ref().mask), valid_rows(want, ref().mask)) << "\n";
  EXPECT_LT(err, kLogitsRel);
}

// Loss and every lora_A / lora_B gradient, through both of our loss paths: lora::causal_lm_loss on full
// logits (transformers' ForCausalLMLoss) and the trainer's causal_lm_loss_sum, which computes logits only
// at the label positions.
TEST(LoraParity, LossAndAdapterGradientsMatchPeft) {
  const at::Tensor want_loss = ref().t("loss");
  for (int path = 0; path < 2; ++path) {
    SCOPED_TRACE(path == 0 ? "lora::causal_lm_loss" : "train::causal_lm_loss_sum");
    auto model = base();
    load_peft_adapter(*model, dir() / "adapter");
    model->train();  // dropout is 0 in the adapter: train mode changes nothing but must not break parity
    at::Tensor loss;
    at::Tensor logits;
    if (path == 0) {
      logits = model->forward(ref().ids, ref().mask);
      loss = causal_lm_loss(logits, ref().labels);
    } else {
      at::Tensor hidden = model->hidden_states(ref().ids, ref().mask);
      auto [sum, n] = train::causal_lm_loss_sum(*model, hidden, ref().labels);
      EXPECT_EQ(n, count_loss_tokens(ref().labels));
      loss = sum / static_cast<double>(n);
      at::NoGradGuard no_grad;
      logits = model->forward(ref().ids, ref().mask);
    }
    // Loss tolerance, derived from the logits' difference: d CE / d logits = softmax - onehot has an L1
    // norm <= 2 per row, so |d loss| <= 2 max |d logits| over the rows with a label; plus the float32
    // rounding of the mean over N <= 34 terms (N u |loss|, taken as 64 u).
    at::Tensor lab = ref().labels.slice(1, 1).ne(kIgnoreIndex);  // [B, T-1]
    at::Tensor rows_ours = logits.detach().slice(1, 0, -1).index({lab});
    at::Tensor rows_ref = ref().t("logits").slice(1, 0, -1).index({lab});
    const double dlogits = max_abs(rows_ours, rows_ref);
    const double tol = 2 * dlogits + 64 * std::ldexp(1.0, -24) * std::abs(want_loss.item<double>());
    const double dloss = std::abs(loss.item<double>() - want_loss.item<double>());
    std::cout << "loss " << loss.item<double>() << " vs " << want_loss.item<double>() << ": diff " << dloss
              << " (tolerance " << tol << ")\n";
    EXPECT_LE(dloss, tol);

    loss.backward();
    // Gradient tolerance: the backward pass runs the same float32 ops transposed (reductions of length
    // <= B T = 34 or <= I = 100), so each gradient carries the forward's ~1e-6 relative error plus the
    // same again for the backward's own sums; through 2 layers, attention softmax and the residual stream
    // 1e-4 keeps a factor ~30 of margin. A wrong scaling, a missing mask or -100 handling, or a loss
    // normalised by the wrong count (e.g. counting padding) is off by 5% or more.
    int n_checked = 0;
    double worst = 0, worst_abs = 0;
    for (const auto& [name, p] : lora_named_parameters(*model)) {
      SCOPED_TRACE(name);
      ASSERT_TRUE(ref().f->contains("grad." + name)) << "no reference gradient for " << name;
      ASSERT_TRUE(p.grad().defined());
      at::Tensor want = ref().t("grad." + name);
      ASSERT_EQ(p.grad().sizes(), want.sizes());
      double e = test::rel_err(p.grad(), want);
      worst = std::max(worst, e);
      worst_abs = std::max(worst_abs, max_abs(p.grad(), want));
      EXPECT_LT(e, 1e-4);
      ++n_checked;
    }
    EXPECT_EQ(n_checked, 2 * 7 * 2);
    std::cout << "gradients: worst rel err " << worst << ", max abs diff " << worst_abs << "\n";
    // Only the adapter learns: every base weight is frozen and got no gradient.
    for (const auto& p : model->named_parameters()) {
      if (p.key().find(".lora_") != std::string::npos) continue;
      EXPECT_FALSE(p.value().requires_grad()) << p.key();
      EXPECT_FALSE(p.value().grad().defined()) << p.key();
    }
  }
}

TEST(LoraParity, KaimingInitIsBitIdenticalToPeft) {
  // The fixture: torch.nn.init.kaiming_uniform_(w [4, 48], a=sqrt(5), generator=Generator().manual_seed(1234)).
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  auto [a, b] = peft_init(4, 48, 100, gen);
  at::Tensor want = ref().t("kaiming_a");
  ASSERT_EQ(a.sizes(), want.sizes());
  EXPECT_TRUE(at::equal(a, want)) << "max abs diff " << max_abs(a, want);
  // B starts at zero ([out, r]), so a fresh adapter leaves the model's output unchanged.
  EXPECT_EQ(b.sizes(), (std::vector<int64_t>{100, 4}));
  EXPECT_EQ(b.abs().max().item<float>(), 0.0f);
  // Every draw within PEFT's bound 1/sqrt(in).
  EXPECT_LE(a.abs().max().item<double>(), 1.0 / std::sqrt(48.0));
}

TEST(LoraParity, TrainableParameterCountEqualsPeft) {
  auto counts = json::parse(read_file(dir() / "counts.json"));
  // Loaded from PEFT's file, and built by apply_lora with the same r and targets: both count like PEFT.
  auto loaded = base();
  load_peft_adapter(*loaded, dir() / "adapter");
  auto applied = base();
  LoraConfig cfg;
  cfg.r = 4;
  cfg.alpha = 8;
  cfg.dropout = 0;
  apply_lora(*applied, cfg, /*seed=*/7);
  for (auto* m : {&loaded, &applied}) {
    TrainableSummary s = trainable_summary(**m);
    EXPECT_EQ(s.trainable, counts["trainable"].get<int64_t>());
    EXPECT_EQ(s.total, counts["all"].get<int64_t>());
    EXPECT_EQ(format_summary(s), counts["printed"].get<std::string>());
  }
}

// Writes an adapter of ours with random B (a fresh seed, printed) over a subset of projections, with
// rsLoRA, plus our eval-mode logits, for check_cpp_adapter.py to load with PeftModel.from_pretrained.
TEST(LoraExport, SaveForPeft) {
  const uint64_t seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  std::cout << "seed " << seed << "\n";
  auto model = base();
  LoraConfig cfg;
  cfg.r = 8;
  cfg.alpha = 16;
  cfg.dropout = 0.1;
  cfg.rslora = true;
  cfg.target_modules = {"q_proj", "v_proj", "mlp.down_proj"};
  auto params = apply_lora(*model, cfg, seed);
  ASSERT_EQ(params.size(), 2u * 3 * 2);
  {
    at::NoGradGuard no_grad;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
    for (auto& [name, l] : lora_modules(*model)) l->lora_b().normal_(0.0, 0.1, gen);
  }
  const fs::path out = dir() / "cpp_adapter";
  save_peft_adapter(*model, cfg, out, (dir() / "base").string(), /*overwrite=*/true);

  at::NoGradGuard no_grad;
  model->eval();
  st::NamedTensors ours = {{"input_ids", ref().ids}, {"attention_mask", ref().mask},
                           {"logits", model->forward(ref().ids, ref().mask).contiguous()}};
  st::save(dir() / "cpp_adapter_logits.safetensors", ours);

  // Our own loader reads it back to the same numbers.
  auto again = base();
  auto loaded = load_peft_adapter(*again, out);
  EXPECT_EQ(loaded.config.r, 8);
  EXPECT_TRUE(loaded.config.rslora);
  EXPECT_EQ(loaded.config.target_modules, (std::vector<std::string>{"q_proj", "v_proj", "down_proj"}));
  again->eval();
  EXPECT_TRUE(at::equal(again->forward(ref().ids, ref().mask), ours[2].second));
  auto j = json::parse(read_file(out / "adapter_config.json"));
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["lora_alpha"], 16);
  EXPECT_EQ(j["use_rslora"], true);
}

// ---- errors ----------------------------------------------------------------------------------------

// A copy of the fixture adapter in a temp dir, for mutating.
fs::path adapter_copy(const std::string& tag) {
  fs::path d = test::temp_dir(tag) / "adapter";
  fs::copy(dir() / "adapter", d, fs::copy_options::recursive);
  return d;
}

void rewrite_config(const fs::path& d, const std::function<void(json&)>& edit) {
  json j = json::parse(read_file(d / "adapter_config.json"));
  edit(j);
  std::ofstream(d / "adapter_config.json") << j.dump(2);
}

TEST(LoraErrors, TargetModuleNotInBase) {
  fs::path d = adapter_copy("lora-target");
  rewrite_config(d, [](json& j) { j["target_modules"] = {"q_proj", "c_attn"}; });
  auto model = base();
  EXPECT_THROW_MSG(load_peft_adapter(*model, d), "adapter_config.json", "'c_attn'", "does not exist in the base model");
  EXPECT_TRUE(lora_modules(*model).empty()) << "a failed load must leave the model untouched";
}

TEST(LoraErrors, AdapterOfAnotherShapeDoesNotFit) {
  // A base with hidden size 64 instead of 48: the adapter's lora_A [4, 48] cannot wrap q_proj [64, 64].
  model::LlamaArch arch;
  arch.hidden_size = 64;
  arch.intermediate_size = 100;
  arch.num_layers = 2;
  arch.num_heads = 4;
  arch.num_kv_heads = 2;
  arch.head_dim = 16;
  arch.vocab_size = 300;
  auto other = model::init_llama(arch, model::LoadOptions{}, /*seed=*/3);
  EXPECT_THROW_MSG(load_peft_adapter(*other, dir() / "adapter"), "adapter_model.safetensors",
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "[4, 48]", "[4, 64]",
                   "does not fit");
  EXPECT_TRUE(lora_modules(*other).empty());
  // And a config whose r disagrees with the tensors.
  fs::path d = adapter_copy("lora-rank");
  rewrite_config(d, [](json& j) { j["r"] = 8; });
  auto model = base();
  EXPECT_THROW_MSG(load_peft_adapter(*model, d), "lora_A.weight", "[4, 48]", "[8, 48]");
  EXPECT_TRUE(lora_modules(*model).empty());
}

TEST(LoraErrors, MissingFiles) {
  auto model = base();
  fs::path nowhere = test::temp_dir("lora-missing") / "nope";
  const std::string where = nowhere.string();
  EXPECT_THROW_MSG(load_peft_adapter(*model, nowhere), where.c_str(), "no such directory");
  fs::path d = adapter_copy("lora-noweights");
  fs::remove(d / "adapter_model.safetensors");
  EXPECT_THROW_MSG(load_peft_adapter(*model, d), "adapter_model.safetensors is missing");
  fs::path d2 = adapter_copy("lora-noconfig");
  fs::remove(d2 / "adapter_config.json");
  EXPECT_THROW_MSG(load_peft_adapter(*model, d2), "adapter_config.json is missing");
  EXPECT_TRUE(lora_modules(*model).empty());
}

TEST(LoraErrors, BadJson) {
  auto model = base();
  fs::path d = adapter_copy("lora-badjson");
  std::ofstream(d / "adapter_config.json") << "{\"peft_type\": \"LORA\", \"r\": 4,";
  EXPECT_THROW_MSG(load_peft_adapter(*model, d), "adapter_config.json", "not valid JSON");
  rewrite_config(d = adapter_copy("lora-badtype"), [](json& j) { j["r"] = "four"; });
  EXPECT_THROW_MSG(load_peft_adapter(*model, d), "adapter_config.json", "'r'", "\"four\"");
  rewrite_config(d = adapter_copy("lora-dora"), [](json& j) { j["use_dora"] = true; });
  EXPECT_THROW_MSG(load_peft_adapter(*model, d), "'use_dora'", "not supported");
  EXPECT_TRUE(lora_modules(*model).empty());
}

TEST(LoraErrors, ExportTargetExistsWithoutOverwrite) {
  auto model = base();
  LoraConfig cfg;
  cfg.r = 2;
  apply_lora(*model, cfg, 11);
  fs::path d = test::temp_dir("lora-export") / "adapter";
  save_peft_adapter(*model, cfg, d, "base");
  const std::string before = read_file(d / "adapter_config.json");
  const std::string where = d.string();
  EXPECT_THROW_MSG(save_peft_adapter(*model, cfg, d, "base"), where.c_str(), "already exists");
  EXPECT_EQ(read_file(d / "adapter_config.json"), before);
  save_peft_adapter(*model, cfg, d, "base", /*overwrite=*/true);  // allowed when asked
  // A config that does not describe the model's adapters is refused, not written.
  LoraConfig other = cfg;
  other.r = 4;
  EXPECT_THROW_MSG(save_peft_adapter(*model, other, test::temp_dir("lora-export2") / "a", "base"), "r 2", "r 4");
}

}  // namespace
}  // namespace qlora::lora
