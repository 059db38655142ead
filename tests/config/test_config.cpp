// Config stage, the working paths: to_yaml -> parse round trips (defaults and a config with every key
// changed), PyYAML (an independent YAML implementation) reading our dump and writing YAML we read,
// --set overrides, the key list other stages code against, diff and hash, and every shipped
// configs/*.yaml. Error paths live in test_config_errors.cpp.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>

#include "tests/test_util.h"
#include "trainer/config/config.h"
#include "trainer/core/error.h"

namespace qlora {
namespace {

// The two keys without defaults; everything else may stay default.
const std::vector<std::string> kRequired = {"model.path=m", "data.train_file=t.jsonl"};

Config minimal() {
  Config c;
  c.model.path = "m";
  c.data.train_file = "t.jsonl";
  return c;
}

// One override per key, each to a valid non-default value. The list doubles as the contract check:
// other stages read these names, so a rename or removal must show up here.
const std::vector<std::pair<std::string, std::string>> kEveryKey = {
    {"method", "lora"},
    {"model.path", "models/other"},
    {"model.tokenizer", "tok/sp.model"},
    {"model.dtype", "float16"},
    {"model.device", "cpu"},
    {"model.gradient_checkpointing", "full"},
    {"model.gradient_checkpointing_layers", "12"},
    {"quant.type", "fp4"},
    {"quant.block_size", "128"},
    {"quant.double_quant", "false"},
    {"lora.r", "8"},
    {"lora.alpha", "32.5"},
    {"lora.dropout", "0.05"},
    {"lora.rslora", "true"},
    {"lora.target_modules", "[q_proj, v_proj]"},
    {"data.train_file", "d/train.json"},
    {"data.eval_file", "d/eval.jsonl"},
    {"data.format", "messages"},
    {"data.system_prompt", "You are #1: \"helpful\"\n\tand kind, ünïcode"},
    {"data.max_seq_len", "1024"},
    {"data.train_on_prompt", "true"},
    {"data.packing", "true"},
    {"data.padding_free", "true"},
    {"data.eval_fraction", "0"},  // stays 0: eval_file is set above; changed separately below
    {"data.shuffle", "false"},
    {"data.seed", "7"},
    {"data.skip_bad_records", "true"},
    {"train.epochs", "3"},
    {"train.max_steps", "100"},
    {"train.micro_batch_size", "2"},
    {"train.grad_accum", "8"},
    {"train.lr", "3e-5"},
    {"train.schedule", "linear"},
    {"train.warmup_steps", "10"},
    {"train.warmup_ratio", "0.1"},
    {"train.weight_decay", "0.01"},
    {"train.adam_beta1", "0.8"},
    {"train.adam_beta2", "0.95"},
    {"train.adam_eps", "1e-6"},
    {"train.max_grad_norm", "1.0"},
    {"train.seed", "1"},
    {"train.log_every", "10"},
    {"train.eval_every", "50"},
    {"train.max_nonfinite_steps", "2"},
    {"checkpoint.every", "100"},
    {"checkpoint.keep_last", "5"},
    {"checkpoint.resume", "auto"},
    {"checkpoint.force_resume", "true"},
    {"output.dir", "runs/x"},
    {"output.export_adapter", "false"},
    {"output.export_merged", "true"},
    {"output.merged_dtype", "float32"},
};

// A config with every key changed from its default (through the public override path).
Config everything_changed() {
  std::vector<std::string> sets;
  for (const auto& [k, v] : kEveryKey) sets.push_back(k + "=" + v);
  Config c = parse_config("", "<test>", sets);
  c.data.system_prompt = "You are #1: \"helpful\"\n\tand kind, ünïcode \x01";  // control chars too
  return c;
}

TEST(Config, KeyListIsTheContract) {
  std::vector<std::string> expected;
  for (const auto& kv : kEveryKey) expected.push_back(kv.first);
  EXPECT_EQ(config_keys(), expected);
}

TEST(Config, DefaultsRoundTrip) {
  Config d = minimal();
  validate(d);
  std::string y = to_yaml(d);
  EXPECT_EQ(parse_config(y, "<dump>"), d);
  EXPECT_EQ(to_yaml(parse_config(y, "<dump>")), y);
  // Every key appears in the dump (the resolved config lists defaults too).
  for (const auto& k : config_keys()) {
    auto dot = k.find('.');
    auto line = dot == std::string::npos ? "\n" + k + ": " : "\n  " + k.substr(dot + 1) + ": ";
    EXPECT_NE(y.find(line), std::string::npos) << k;
  }
  // Defaults stated in config.h, the one place they live.
  EXPECT_EQ(d.method, Method::QLoRA);
  EXPECT_EQ(d.lora.r, 64);
  EXPECT_EQ(d.lora.target_modules.size(), 7u);
}

TEST(Config, ChangedConfigRoundTrips) {
  Config c = everything_changed();
  Config d = minimal();
  // Every field differs from the defaults (so the round trip below exercises each one)...
  for (const auto& k : config_keys()) {
    if (k == "data.eval_fraction") continue;
    EXPECT_NE(config_value(c, k), config_value(d, k)) << k;
  }
  // ...and comes back exactly, including doubles in shortest form and escaped strings.
  std::string y = to_yaml(c);
  Config back = parse_config(y, "<dump>");
  EXPECT_EQ(back, c);
  EXPECT_EQ(back.data.system_prompt, c.data.system_prompt);
  EXPECT_EQ(back.train.lr, 3e-5);
  EXPECT_EQ(back.lora.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));

  // Awkward doubles survive bit-exactly.
  Config e = minimal();
  e.train.lr = 0.1 + 0.2;  // 0.30000000000000004
  e.train.adam_eps = 1e-8;
  e.lora.alpha = 16.0;
  e.train.max_grad_norm = -1.0;
  e.train.weight_decay = 5e-324;  // smallest subnormal
  EXPECT_EQ(parse_config(to_yaml(e), "<dump>"), e);
}

// Runs the reference python on `code` with argv[1] = `arg`; returns stdout.
std::string run_python(const std::string& code, const std::string& arg) {
  auto dir = test::temp_dir("cfgpy");
  auto script = dir / "s.py";
  std::ofstream(script) << code;
  const char* py = std::getenv("QLORA_PYTHON");
  EXPECT_NE(py, nullptr);
  std::string cmd = fmt::format("'{}' '{}' '{}'", py ? py : "python3", script.string(), arg);
  FILE* f = popen(cmd.c_str(), "r");
  EXPECT_NE(f, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while (f && (n = fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  int rc = f ? pclose(f) : -1;
  EXPECT_EQ(rc, 0) << cmd << "\n" << out;
  return out;
}

TEST(Config, PyYamlReadsOurDump) {
  // An independent YAML parser must read the dump to the same values and types (floats as floats,
  // escapes decoded): the resolved config is also read by people's scripts.
  Config c = everything_changed();
  auto dir = test::temp_dir("cfgdump");
  save_config(c, dir / "config.yaml");
  auto out = run_python("import sys, json, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1], encoding='utf-8'))))\n",
                        (dir / "config.yaml").string());
  auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["method"], "lora");
  EXPECT_EQ(j["data"]["system_prompt"], c.data.system_prompt);
  EXPECT_EQ(j["model"]["path"], "models/other");
  EXPECT_TRUE(j["train"]["lr"].is_number_float());
  EXPECT_EQ(j["train"]["lr"].get<double>(), c.train.lr);
  EXPECT_TRUE(j["train"]["adam_eps"].is_number_float());  // "1.0e-06", not YAML 1.1's string "1e-06"
  EXPECT_EQ(j["train"]["adam_eps"].get<double>(), c.train.adam_eps);
  EXPECT_TRUE(j["lora"]["alpha"].is_number_float());
  EXPECT_EQ(j["lora"]["r"], 8);
  EXPECT_EQ(j["lora"]["rslora"], true);
  EXPECT_EQ(j["lora"]["target_modules"], nlohmann::json::array({"q_proj", "v_proj"}));
  EXPECT_EQ(j["output"]["merged_dtype"], "float32");
  EXPECT_EQ(j["model"]["gradient_checkpointing"], "full");
  // "off" is quoted: bare, YAML 1.1 reads it as the boolean false.
  Config off = c;
  off.model.gradient_checkpointing = Checkpointing::Off;
  save_config(off, dir / "off.yaml");
  auto off_out = run_python("import sys, json, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1], encoding='utf-8'))))\n",
                            (dir / "off.yaml").string());
  EXPECT_EQ(nlohmann::json::parse(off_out)["model"]["gradient_checkpointing"], "off");
  EXPECT_EQ(load_config(dir / "off.yaml").model.gradient_checkpointing, Checkpointing::Off);
  // Every key, at its place.
  for (const auto& k : config_keys()) {
    auto dot = k.find('.');
    if (dot == std::string::npos) EXPECT_TRUE(j.contains(k)) << k;
    else EXPECT_TRUE(j[k.substr(0, dot)].contains(k.substr(dot + 1))) << k;
  }
}

TEST(Config, ReadsYamlWrittenByPyYaml) {
  // YAML as another tool writes it (block style, its own quoting and float spelling).
  auto dir = test::temp_dir("cfgpyw");
  auto path = dir / "in.yaml";
  run_python(
      "import sys, yaml\n"
      "d = {'method': 'full', 'model': {'path': 'm p', 'dtype': 'bfloat16', 'gradient_checkpointing': False},\n"
      "     'lora': {'target_modules': ['down_proj', 'up_proj'], 'alpha': 8.0},\n"
      "     'data': {'train_file': 'a: b.jsonl', 'system_prompt': \"it's #1\\nok\", 'eval_fraction': 0.25},\n"
      "     'train': {'lr': 1e-05, 'max_steps': 10, 'eval_every': 5}}\n"
      "yaml.safe_dump(d, open(sys.argv[1], 'w'), default_flow_style=False)\n",
      path.string());
  Config c = load_config(path);
  EXPECT_EQ(c.method, Method::Full);
  EXPECT_EQ(c.model.path, "m p");
  EXPECT_EQ(c.model.dtype, DType::BFloat16);
  EXPECT_EQ(c.model.gradient_checkpointing, Checkpointing::Off);  // PyYAML's False: the key was a boolean
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"down_proj", "up_proj"}));
  EXPECT_EQ(c.lora.alpha, 8.0);
  EXPECT_EQ(c.data.train_file, "a: b.jsonl");
  EXPECT_EQ(c.data.system_prompt, "it's #1\nok");
  EXPECT_EQ(c.data.eval_fraction, 0.25);
  EXPECT_EQ(c.train.lr, 1e-5);
  EXPECT_EQ(c.train.max_steps, 10);
  // Unset keys keep their defaults.
  EXPECT_EQ(c.train.micro_batch_size, Config{}.train.micro_batch_size);
  EXPECT_EQ(c.quant, Config{}.quant);
}

TEST(Config, Overrides) {
  const std::string yaml = "model:\n  path: m\ndata:\n  train_file: t.jsonl\ntrain:\n  lr: 0.001\n";
  Config c = parse_config(yaml, "x.yaml",
                          {"train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]", "method=lora",
                           "data.system_prompt=You are #1: be brief", "data.eval_file=\"a b.jsonl\"",
                           "model.dtype=bf16", "quant.double_quant=false", "train.max_steps=+20"});
  EXPECT_EQ(c.train.lr, 1e-4);
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(c.method, Method::LoRA);
  EXPECT_EQ(c.data.system_prompt, "You are #1: be brief");  // strings verbatim: '#' is no comment here
  EXPECT_EQ(c.data.eval_file, "a b.jsonl");                 // quoted: read as YAML
  EXPECT_EQ(c.model.dtype, DType::BFloat16);                // alias, dumped canonically
  EXPECT_NE(to_yaml(c).find("dtype: bfloat16"), std::string::npos);
  EXPECT_FALSE(c.quant.double_quant);
  EXPECT_EQ(c.train.max_steps, 20);

  // Later overrides win; an empty value clears a string.
  Config d = parse_config(yaml, "x.yaml", {"train.lr=1", "train.lr=2", "model.tokenizer=x", "model.tokenizer="});
  EXPECT_EQ(d.train.lr, 2.0);
  EXPECT_EQ(d.model.tokenizer, "");

  // Overrides apply before validation: they can repair an invalid file.
  const std::string bad = "model:\n  path: m\ndata:\n  train_file: t.jsonl\ntrain:\n  lr: 0\n";
  EXPECT_THROW(parse_config(bad, "bad.yaml"), Error);
  EXPECT_EQ(parse_config(bad, "bad.yaml", {"train.lr=5e-5"}).train.lr, 5e-5);
  // And supply required keys.
  EXPECT_EQ(parse_config("", "empty.yaml", kRequired).model.path, "m");
}

TEST(Config, LoadConfigFromFile) {
  auto dir = test::temp_dir("cfgload");
  auto path = dir / "run.yaml";
  std::ofstream(path) << "# comment\nmethod: qlora\nmodel:\n  path: ../models/x   # relative: kept as written\n"
                         "data:\n  train_file: data/t.jsonl\nlora:\n";
  Config c = load_config(path, {"lora.r=16"});
  EXPECT_EQ(c.model.path, "../models/x");  // not resolved against the file's directory
  EXPECT_EQ(c.data.train_file, "data/t.jsonl");
  EXPECT_EQ(c.lora.r, 16);
  EXPECT_EQ(c.lora.alpha, Config{}.lora.alpha);  // `lora:` with nothing under it: defaults

  // save_config writes a file load_config reads back to the same config.
  save_config(c, dir / "out" / "config.yaml");
  EXPECT_EQ(load_config(dir / "out" / "config.yaml"), c);
}

TEST(Config, DiffAndHash) {
  Config a = minimal();
  const std::string h = config_hash(a);
  EXPECT_EQ(h.size(), 16u);
  EXPECT_EQ(h.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ(config_hash(a), h);  // deterministic
  EXPECT_TRUE(config_diff(a, a).empty());

  Config b = a;
  b.train.lr = 1e-4;
  EXPECT_NE(config_hash(b), h);
  EXPECT_EQ(config_diff(a, b), std::vector<std::string>{"train.lr"});
  EXPECT_EQ(config_value(a, "train.lr"), "0.0002");
  EXPECT_EQ(config_value(b, "train.lr"), "0.0001");

  Config k = a;
  k.checkpoint.keep_last = 10;
  k.output.dir = "elsewhere";
  k.checkpoint.resume = "auto";
  EXPECT_EQ(config_hash(k), h);
  EXPECT_TRUE(config_diff(a, k).empty());

  // Every key: changing it alone changes the hash and the diff iff it is not resume-neutral.
  std::vector<std::string> neutral;
  for (const auto& [key, kv_value] : kEveryKey) {
    std::vector<std::string> sets = kRequired;
    if (key == "train.eval_every") sets.push_back("data.eval_fraction=0.1");  // eval_every needs eval data
    Config base = parse_config("", "<t>", sets);
    sets.push_back(key + "=" + (key == "data.eval_fraction" ? std::string("0.2") : kv_value));
    Config changed = parse_config("", "<t>", sets);
    ASSERT_NE(changed, base) << key;
    if (is_resume_neutral(key)) {
      neutral.push_back(key);
      EXPECT_EQ(config_hash(changed), config_hash(base)) << key;
      EXPECT_TRUE(config_diff(base, changed).empty()) << key;
    } else {
      EXPECT_NE(config_hash(changed), config_hash(base)) << key;
      EXPECT_EQ(config_diff(base, changed), std::vector<std::string>{key}) << key;
    }
  }
  EXPECT_EQ(neutral, (std::vector<std::string>{"model.gradient_checkpointing", "model.gradient_checkpointing_layers",
                                               "train.log_every", "checkpoint.every", "checkpoint.keep_last",
                                               "checkpoint.resume", "checkpoint.force_resume", "output.dir",
                                               "output.export_adapter", "output.export_merged",
                                               "output.merged_dtype"}));

  // A string cannot imitate another key's line in the hashed text.
  Config s1 = a, s2 = a;
  s1.data.system_prompt = "x\"\ndata.train_file=\"t.jsonl";
  s2.data.system_prompt = "x";
  EXPECT_NE(config_hash(s1), config_hash(s2));
}

TEST(Config, EnumSpellings) {
  EXPECT_EQ(to_string(Method::QLoRA), "qlora");
  EXPECT_EQ(to_string(Method::Full), "full");
  EXPECT_EQ(to_string(QuantType::FP4), "fp4");
  EXPECT_EQ(to_string(DType::BFloat16), "bfloat16");
  EXPECT_EQ(to_string(Device::CUDA), "cuda");
  EXPECT_EQ(to_string(DataFormat::Messages), "messages");
  EXPECT_EQ(to_string(Schedule::Cosine), "cosine");
  // Each spelling parses back to its value.
  for (auto m : {Method::QLoRA, Method::LoRA, Method::Full})
    EXPECT_EQ(parse_config("", "<t>", {kRequired[0], kRequired[1], "method=" + to_string(m)}).method, m);
  for (auto f : {DataFormat::Auto, DataFormat::Text, DataFormat::Guanaco, DataFormat::Messages, DataFormat::Alpaca})
    EXPECT_EQ(parse_config("", "<t>", {kRequired[0], kRequired[1], "data.format=" + to_string(f)}).data.format, f);
  for (auto s : {Schedule::Constant, Schedule::Linear, Schedule::Cosine})
    EXPECT_EQ(parse_config("", "<t>", {kRequired[0], kRequired[1], "train.schedule=" + to_string(s)}).train.schedule, s);
  // gradient_checkpointing was a boolean: true and false still read, as selective and off.
  const std::pair<const char*, Checkpointing> ckpt[] = {{"off", Checkpointing::Off},
                                                        {"selective", Checkpointing::Selective},
                                                        {"full", Checkpointing::Full},
                                                        {"true", Checkpointing::Selective},
                                                        {"false", Checkpointing::Off}};
  for (const auto& [text, value] : ckpt) {
    EXPECT_EQ(parse_config("", "<t>", {kRequired[0], kRequired[1], std::string("model.gradient_checkpointing=") + text})
                  .model.gradient_checkpointing,
              value)
        << text;
  }
  EXPECT_EQ(to_string(Checkpointing::Selective), "selective");
  try {
    parse_config("", "<t>", {kRequired[0], kRequired[1], "model.gradient_checkpointing=sometimes"});
    ADD_FAILURE() << "gradient_checkpointing=sometimes was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("off, selective, full"), std::string::npos) << e.what();
  }
}

TEST(Config, MethodFullAcceptsUnusedSections) {
  // lora/quant are ignored by `full` but a recipe may keep them (e.g. switched with --set method=full).
  Config c = parse_config("method: full\nmodel: {path: m}\ndata: {train_file: t}\nlora: {r: 4}\nquant: {type: fp4}\n",
                          "full.yaml");
  EXPECT_EQ(c.method, Method::Full);
  EXPECT_EQ(c.lora.r, 4);
}

TEST(Config, EveryShippedConfigLoads) {
  namespace fs = std::filesystem;
  const fs::path dir = test::source_dir() / "configs";
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".yaml" || e.path().extension() == ".yml") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  ASSERT_GE(files.size(), 2u) << "expected at least llama2-qlora.yaml and tiny-cpu.yaml in " << dir;
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    Config c;
    EXPECT_NO_THROW(c = load_config(f)) << f;
    EXPECT_EQ(parse_config(to_yaml(c), "<dump>"), c);
    // The first line is the exact launch command (paths in the file are relative to the repo root).
    std::ifstream in(f);
    std::string first;
    std::getline(in, first);
    EXPECT_EQ(first, "# Launch: train --config configs/" + f.filename().string());
  }

  // The seed recipe (INTEROP.md section 4) is what llama2-qlora.yaml says.
  Config s = load_config(dir / "llama2-qlora.yaml");
  EXPECT_EQ(s.method, Method::QLoRA);
  EXPECT_EQ(s.model.path, "models/Llama-2-7b-chat-hf");
  EXPECT_EQ(s.data.train_file, "data/guanaco-llama2-1k.jsonl");
  EXPECT_EQ(s.quant.type, QuantType::NF4);
  EXPECT_TRUE(s.quant.double_quant);
  EXPECT_EQ(s.lora.r, 64);
  EXPECT_EQ(s.lora.alpha, 16.0);
  EXPECT_EQ(s.lora.dropout, 0.1);
  EXPECT_EQ(s.train.epochs, 1);
  EXPECT_EQ(s.train.lr, 2e-4);
  EXPECT_EQ(s.train.schedule, Schedule::Cosine);
  EXPECT_EQ(s.train.warmup_ratio, 0.03);
  EXPECT_EQ(s.train.max_grad_norm, 0.3);
  EXPECT_EQ(s.train.weight_decay, 0.001);
  EXPECT_EQ(s.train.micro_batch_size * s.train.grad_accum, 4);
  EXPECT_EQ(s.data.max_seq_len, 512);
  EXPECT_FALSE(s.data.packing);
  EXPECT_TRUE(s.data.padding_free);
  EXPECT_EQ(s.model.dtype, DType::BFloat16);
  EXPECT_EQ(s.model.gradient_checkpointing, Checkpointing::Selective);

  Config t = load_config(dir / "tiny-cpu.yaml");
  EXPECT_EQ(t.model.device, Device::CPU);
  EXPECT_EQ(t.model.path, "runs/demo/base");
  EXPECT_EQ(t.data.train_file, "runs/demo/data/train.jsonl");
}

}  // namespace
}  // namespace qlora
