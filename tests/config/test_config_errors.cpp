// Config stage, every error path: each bad input gives a qlora::Error whose message names the file,
// the line (where there is one), the key and what was expected. Also built under ASan + UBSan.
// Line numbers below count from 1 in the YAML text each test builds; kBase is lines 1-4 (comments, so
// tests may open any section); the two required keys come in as overrides.
#include <gtest/gtest.h>

#include <fstream>

#include "tests/test_util.h"
#include "trainer/config/config.h"
#include "trainer/core/error.h"

namespace qlora {
namespace {

const std::string kBase = "# line 1\n# line 2\n# line 3\n# line 4\n";

Config parse(const std::string& extra, const std::vector<std::string>& overrides = {}) {
  std::vector<std::string> all = {"model.path=m", "data.train_file=t.jsonl"};
  all.insert(all.end(), overrides.begin(), overrides.end());
  return parse_config(kBase + extra, "configs/x.yaml", all);
}

TEST(ConfigErrors, BaseIsValid) { EXPECT_NO_THROW(parse("")); }

TEST(ConfigErrors, UnknownKeyNamesFileLineAndNearest) {
  EXPECT_THROW_MSG(parse("train:\n  lrr: 0.1\n"), "configs/x.yaml:6: unknown key 'train.lrr' (did you mean 'train.lr'?)");
  EXPECT_THROW_MSG(parse("lora:\n  target_module: [q_proj]\n"), "configs/x.yaml:6:", "'lora.target_module'",
                   "did you mean 'lora.target_modules'");
  // The right key in the wrong section.
  EXPECT_THROW_MSG(parse("lora:\n  r: 8\n  lr: 0.1\n"), "configs/x.yaml:7:", "unknown key 'lora.lr'",
                   "did you mean 'train.lr'");
  // Nothing close: the section's valid keys are listed.
  EXPECT_THROW_MSG(parse("quant:\n  zzzzzzzzzz: 1\n"), "configs/x.yaml:6:", "'quant.zzzzzzzzzz'",
                   "valid keys in quant: type, block_size, double_quant");
}

TEST(ConfigErrors, UnknownSection) {
  EXPECT_THROW_MSG(parse("trian:\n  lr: 0.1\n"), "configs/x.yaml:5: unknown section 'trian' (did you mean 'train'?)");
  EXPECT_THROW_MSG(parse("lr: 0.1\n"), "configs/x.yaml:5:", "unknown section 'lr'", "'train.lr'");
  EXPECT_THROW_MSG(parse("optimizer:\n  name: adamw\n"), "configs/x.yaml:5:", "unknown section 'optimizer'",
                   "valid: method, model, quant, lora, data, train, checkpoint, output");
}

TEST(ConfigErrors, WrongTypes) {
  EXPECT_THROW_MSG(parse("train:\n  lr: fast\n"), "configs/x.yaml:6: train.lr: expected a number, got 'fast'");
  EXPECT_THROW_MSG(parse("train:\n  micro_batch_size: 1.5\n"),
                   "configs/x.yaml:6: train.micro_batch_size: expected an integer, got '1.5'");
  EXPECT_THROW_MSG(parse("train:\n  epochs: 99999999999999999999\n"), "configs/x.yaml:6:", "train.epochs",
                   "64-bit range");
  EXPECT_THROW_MSG(parse("data:\n  packing: maybe\n"), "configs/x.yaml:6: data.packing: expected true or false, got 'maybe'");
  EXPECT_THROW_MSG(parse("train:\n  lr: .inf\n"), "configs/x.yaml:6: train.lr: expected a finite number");
  EXPECT_THROW_MSG(parse("train:\n  lr: .nan\n"), "configs/x.yaml:6: train.lr: expected a finite number");
  EXPECT_THROW_MSG(parse("train:\n  lr: [1]\n"), "configs/x.yaml:6: train.lr: expected a number, got a list");
  EXPECT_THROW_MSG(parse("train:\n  lr:\n"), "configs/x.yaml:", "train.lr: expected a number, got nothing");
  EXPECT_THROW_MSG(parse("model:\n  tokenizer: {a: 1}\n"), "configs/x.yaml:", "model.tokenizer: expected a string, got a mapping");
  EXPECT_THROW_MSG(parse("lora:\n  target_modules: q_proj\n"),
                   "configs/x.yaml:6: lora.target_modules: expected a list of strings", "got 'q_proj'");
  EXPECT_THROW_MSG(parse("lora:\n  target_modules: [q_proj, [v_proj]]\n"), "configs/x.yaml:6:",
                   "lora.target_modules: expected a list of strings, got an item that is a list");
  EXPECT_THROW_MSG(parse("train: 5\n"), "configs/x.yaml:5: train: expected a mapping of train.* keys, got '5'");
}

TEST(ConfigErrors, EnumsListValidSpellings) {
  EXPECT_THROW_MSG(parse("model:\n  dtype: bfloat\n"),
                   "configs/x.yaml:6: model.dtype: expected one of auto, bfloat16, float16, float32, got 'bfloat'",
                   "did you mean 'bfloat16'");
  EXPECT_THROW_MSG(parse("method: qlorra\n"), "configs/x.yaml:5: method: expected one of qlora, lora, full, got 'qlorra'");
  EXPECT_THROW_MSG(parse("train:\n  schedule: exponential\n"), "configs/x.yaml:6:",
                   "train.schedule: expected one of constant, linear, cosine, got 'exponential'");
  EXPECT_THROW_MSG(parse("data:\n  format: csv\n"), "data.format: expected one of auto, text, guanaco, messages, alpaca");
  EXPECT_THROW_MSG(parse("quant:\n  type: int8\n"), "quant.type: expected one of nf4, fp4, got 'int8'");
  EXPECT_THROW_MSG(parse("model:\n  device: tpu\n"), "model.device: expected one of auto, cpu, cuda, got 'tpu'");
}

// A range error from the file names file, line and key; validate() on a struct names the key only.
TEST(ConfigErrors, Ranges) {
  EXPECT_THROW_MSG(parse("train:\n  micro_batch_size: 0\n"),
                   "configs/x.yaml:6: train.micro_batch_size: must be >= 1, got 0");
  Config c = parse("");
  c.train.micro_batch_size = 0;
  EXPECT_THROW_MSG(validate(c), "train.micro_batch_size: must be >= 1, got 0");

  struct Case {
    const char* yaml;
    const char* message;
  };
  const Case cases[] = {
      {"lora:\n  r: 0\n", "lora.r: must be >= 1, got 0"},
      {"lora:\n  alpha: 0\n", "lora.alpha: must be > 0, got 0.0"},
      {"lora:\n  dropout: 1\n", "lora.dropout: must be in [0, 1), got 1.0"},
      {"lora:\n  dropout: -0.1\n", "lora.dropout: must be in [0, 1), got -0.1"},
      {"quant:\n  block_size: 16\n", "quant.block_size: must be in [32, 4096], got 16"},
      {"quant:\n  block_size: 8192\n", "quant.block_size: must be in [32, 4096], got 8192"},
      {"quant:\n  block_size: 96\n", "quant.block_size: must be a power of two in [32, 4096], got 96"},
      {"train:\n  lr: 0\n", "train.lr: must be > 0, got 0.0"},
      {"train:\n  lr: -1e-4\n", "train.lr: must be > 0, got -0.0001"},
      {"train:\n  adam_beta1: 1\n", "train.adam_beta1: must be in [0, 1), got 1.0"},
      {"train:\n  adam_beta2: 1.5\n", "train.adam_beta2: must be in [0, 1), got 1.5"},
      {"train:\n  adam_eps: 0\n", "train.adam_eps: must be > 0, got 0.0"},
      {"train:\n  warmup_ratio: 1\n", "train.warmup_ratio: must be in [0, 1), got 1.0"},
      {"train:\n  grad_accum: 0\n", "train.grad_accum: must be >= 1, got 0"},
      {"train:\n  epochs: 0\n", "train.epochs: must be >= 1, got 0"},
      {"train:\n  max_steps: -2\n", "train.max_steps: must be >= -1, got -2"},
      {"train:\n  weight_decay: -0.1\n", "train.weight_decay: must be >= 0, got -0.1"},
      {"train:\n  log_every: 0\n", "train.log_every: must be >= 1, got 0"},
      {"train:\n  max_nonfinite_steps: 0\n", "train.max_nonfinite_steps: must be >= 1, got 0"},
      {"data:\n  eval_fraction: 0.6\n", "data.eval_fraction: must be in [0, 0.5], got 0.6"},
      {"data:\n  max_seq_len: 7\n", "data.max_seq_len: must be >= 8, got 7"},
      {"checkpoint:\n  keep_last: 0\n", "checkpoint.keep_last: must be >= 1, got 0"},
      {"checkpoint:\n  every: -1\n", "checkpoint.every: must be >= 0, got -1"},
  };
  for (const auto& k : cases) EXPECT_THROW_MSG(parse(k.yaml), "configs/x.yaml:6: ", k.message);
  // Boundaries that are allowed.
  EXPECT_NO_THROW(parse("lora:\n  dropout: 0\nquant:\n  block_size: 4096\ndata:\n  eval_fraction: 0.5\n"
                        "train:\n  warmup_ratio: 0\n  adam_beta1: 0\n  max_steps: -1\n"));
  EXPECT_NO_THROW(parse("quant:\n  block_size: 32\ndata:\n  max_seq_len: 8\n"));
}

TEST(ConfigErrors, CrossFieldRules) {
  // Required keys left at their empty defaults name the file (there is no line to name).
  EXPECT_THROW_MSG(parse_config("data:\n  train_file: t\n", "configs/y.yaml"),
                   "configs/y.yaml: model.path: must be set");
  EXPECT_THROW_MSG(parse_config("model:\n  path: m\n", "configs/y.yaml"), "configs/y.yaml: data.train_file: must be set");
  EXPECT_THROW_MSG(parse_config("model:\n  path: \"\"\ndata:\n  train_file: t\n", "configs/y.yaml"),
                   "configs/y.yaml:2: model.path: must be set");
  EXPECT_THROW_MSG(parse("output:\n  dir: \"\"\n"), "configs/x.yaml:6: output.dir: must be set");
  EXPECT_THROW_MSG(parse("checkpoint:\n  resume: \"\"\n"), "configs/x.yaml:6: checkpoint.resume: must be set",
                   "none, auto or a checkpoint directory");

  EXPECT_THROW_MSG(parse("lora:\n  target_modules: []\n"), "configs/x.yaml:6: lora.target_modules: must name at least one",
                   "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
  EXPECT_THROW_MSG(parse("lora:\n  target_modules: [q_proj, lm_head]\n"), "configs/x.yaml:6:",
                   "lora.target_modules: 'lm_head' is not one of q_proj");
  EXPECT_THROW_MSG(parse("lora:\n  target_modules: [q_prj]\n"), "'q_prj' is not one of", "did you mean 'q_proj'");
  EXPECT_THROW_MSG(parse("lora:\n  target_modules: [v_proj, v_proj]\n"), "lora.target_modules: 'v_proj' is listed twice");

  EXPECT_THROW_MSG(parse("data:\n  eval_file: e.jsonl\n  eval_fraction: 0.1\n"), "configs/x.yaml:7:",
                   "data.eval_fraction: must be 0 when data.eval_file is set");
  EXPECT_THROW_MSG(parse("train:\n  eval_every: 10\n"), "configs/x.yaml:6: train.eval_every:", "no eval data");
  EXPECT_THROW_MSG(parse("output:\n  merged_dtype: auto\n"), "configs/x.yaml:6: output.merged_dtype:", "got auto");

  // validate() alone names the key without a location.
  Config c = parse("");
  c.lora.target_modules = {"q_proj", "bogus"};
  EXPECT_THROW_MSG(validate(c), "lora.target_modules: 'bogus' is not one of");
  c = parse("");
  c.quant.block_size = 100;
  EXPECT_THROW_MSG(validate(c), "quant.block_size: must be a power of two");
}

TEST(ConfigErrors, YamlStructure) {
  // Syntax error: file and line.
  EXPECT_THROW_MSG(parse("train:\n  lr: [1, 2\n"), "configs/x.yaml:", "YAML syntax error");
  EXPECT_THROW_MSG(parse_config("model:\n  path: m\n bad_indent: 1\n", "configs/z.yaml"), "configs/z.yaml:3: YAML syntax error");
  EXPECT_THROW_MSG(parse_config("model: {path: \"m\n", "configs/z.yaml"), "configs/z.yaml:", "YAML syntax error");
  // Not a mapping at the top.
  EXPECT_THROW_MSG(parse_config("- a\n- b\n", "configs/z.yaml"), "configs/z.yaml:1: expected a mapping of sections",
                   "got a list");
  EXPECT_THROW_MSG(parse_config("just text\n", "configs/z.yaml"), "configs/z.yaml:1: expected a mapping of sections");
  // Two documents.
  EXPECT_THROW_MSG(parse_config("model: {path: m}\n---\ntrain: {lr: 1}\n", "configs/z.yaml"),
                   "configs/z.yaml: expected one YAML document, found 2");
  // Duplicate keys would silently pick one.
  EXPECT_THROW_MSG(parse("train:\n  lr: 0.1\n  lr: 0.2\n"), "configs/x.yaml:7: duplicate key 'train.lr' (first set at configs/x.yaml:6)");
  EXPECT_THROW_MSG(parse("model:\n  dtype: auto\nmodel:\n  device: cpu\n"),
                   "configs/x.yaml:7: duplicate key 'model' (first set at configs/x.yaml:5)");
  // A non-scalar key.
  EXPECT_THROW_MSG(parse("? [a, b]\n: 1\n"), "configs/x.yaml:5: expected a section name, got a list");
}

TEST(ConfigErrors, MissingFile) {
  auto dir = test::temp_dir("cfgerr");
  auto missing = dir / "nope.yaml";
  const std::string missing_s = missing.string(), dir_s = dir.string();
  EXPECT_THROW_MSG(load_config(missing), missing_s.c_str(), "does not exist");
  EXPECT_THROW_MSG(load_config(dir), dir_s.c_str(), "is a directory");
  // Errors from a file name it by the path given.
  auto bad = dir / "bad.yaml";
  std::ofstream(bad) << "model:\n  path: m\ndata:\n  train_file: t.jsonl\ntrain:\n  lrr: 1\n";
  const std::string want = bad.string() + ":6: unknown key 'train.lrr'";
  EXPECT_THROW_MSG(load_config(bad), want.c_str());
}

TEST(ConfigErrors, Overrides) {
  EXPECT_THROW_MSG(parse("", {"train.lrr=1e-4"}), "--set train.lrr=1e-4: unknown key 'train.lrr' (did you mean 'train.lr'?)");
  EXPECT_THROW_MSG(parse("", {"trian.lr=1e-4"}), "--set trian.lr=1e-4: unknown key 'trian.lr'", "did you mean 'train.lr'");
  EXPECT_THROW_MSG(parse("", {"lr=1e-4"}), "--set lr=1e-4: unknown key 'lr'", "'train.lr'");
  EXPECT_THROW_MSG(parse("", {"train.lr"}), "--set 'train.lr': expected section.key=value");
  EXPECT_THROW_MSG(parse("", {"=1"}), "--set '=1': expected section.key=value");
  EXPECT_THROW_MSG(parse("", {"train=1"}), "--set train=1: 'train' is a section");
  EXPECT_THROW_MSG(parse("", {"train.lr=fast"}), "--set train.lr=fast: train.lr: expected a number, got 'fast'");
  EXPECT_THROW_MSG(parse("", {"train.lr=[1, 2"}), "--set train.lr=[1, 2: cannot read the value");
  EXPECT_THROW_MSG(parse("", {"lora.target_modules=[q_proj,nope]"}), "--set lora.target_modules=[q_proj,nope]: ",
                   "'nope' is not one of");
  EXPECT_THROW_MSG(parse("", {"method=fulll"}), "--set method=fulll: method: expected one of qlora, lora, full");
  // A range error caused by an override names the override, not the file.
  EXPECT_THROW_MSG(parse("train:\n  micro_batch_size: 2\n", {"train.micro_batch_size=0"}),
                   "--set train.micro_batch_size=0: train.micro_batch_size: must be >= 1, got 0");
}

TEST(ConfigErrors, UnknownKeyLookups) {
  EXPECT_THROW_MSG(config_value(Config{}, "train.lrr"), "unknown config key 'train.lrr'", "'train.lr'");
  EXPECT_FALSE(is_resume_neutral("train.lr"));
  EXPECT_TRUE(is_resume_neutral("output.anything"));
}

}  // namespace
}  // namespace qlora
