// Bad model directories give a qlora::Error naming the file and the tensor or key.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"
#include "trainer/model/loader.h"

namespace qlora::model {
namespace {

// A single-file copy of the mha_llama3 fixture whose tensors `edit` may change.
fs::path make_variant(const std::string& tag, const std::function<void(st::NamedTensors&)>& edit,
                      const std::function<void(nlohmann::json&)>& edit_config = {}) {
  fs::path src = test::data_dir() / "llama" / "mha_llama3";
  fs::path dir = test::temp_dir(tag);
  auto f = st::File::open(src / "model.safetensors");
  st::NamedTensors t;
  for (const auto& n : f->names()) t.emplace_back(n, f->tensor(n).clone());
  edit(t);
  st::save(dir / "model.safetensors", t);
  auto cfg = nlohmann::json::parse(read_file(src / "config.json"));
  if (edit_config) edit_config(cfg);
  write_file_atomic(dir / "config.json", cfg.dump());
  return dir;
}

TEST(ModelErrors, MissingDirectory) {
  EXPECT_THROW_MSG(load_llama("/nonexistent/model", LoadOptions{}), "/nonexistent/model", "does not exist");
}

TEST(ModelErrors, MissingConfig) {
  fs::path dir = test::temp_dir("noconfig");
  EXPECT_THROW_MSG(load_llama(dir, LoadOptions{}), "config.json");
}

TEST(ModelErrors, MissingTensor) {
  auto dir = make_variant("missing", [](st::NamedTensors& t) {
    std::erase_if(t, [](auto& p) { return p.first == "model.layers.1.mlp.up_proj.weight"; });
  });
  EXPECT_THROW_MSG(load_llama(dir, LoadOptions{}), "model.layers.1.mlp.up_proj.weight", "missing", "[128, 64]");
}

TEST(ModelErrors, WrongShape) {
  auto dir = make_variant("shape", [](st::NamedTensors& t) {
    for (auto& [n, v] : t)
      if (n == "model.layers.0.self_attn.k_proj.weight") v = at::zeros({60, 64});
  });
  EXPECT_THROW_MSG(load_llama(dir, LoadOptions{}), "model.layers.0.self_attn.k_proj.weight", "64, 64", "60, 64");
}

TEST(ModelErrors, UnexpectedTensor) {
  auto dir = make_variant("extra", [](st::NamedTensors& t) { t.emplace_back("model.layers.0.extra.bias", at::ones({3})); });
  EXPECT_THROW_MSG(load_llama(dir, LoadOptions{}), "unexpected", "model.layers.0.extra.bias");
}

TEST(ModelErrors, BadConfigValues) {
  auto nothing = [](st::NamedTensors&) {};
  auto dir = make_variant("cfg1", nothing, [](nlohmann::json& j) { j.erase("hidden_size"); });
  EXPECT_THROW_MSG(load_llama(dir, LoadOptions{}), "config.json", "hidden_size");
  dir = make_variant("cfg2", nothing, [](nlohmann::json& j) { j["num_key_value_heads"] = 3; });
  EXPECT_THROW_MSG(load_llama(dir, LoadOptions{}), "config.json", "num_key_value_heads");
  dir = make_variant("cfg3", nothing, [](nlohmann::json& j) { j["model_type"] = "gpt2"; });
  EXPECT_THROW_MSG(load_llama(dir, LoadOptions{}), "config.json", "gpt2");
  dir = make_variant("cfg4", nothing, [](nlohmann::json& j) { j["rope_parameters"]["rope_type"] = "yarn"; });
  EXPECT_THROW_MSG(load_llama(dir, LoadOptions{}), "config.json", "yarn");
}

}  // namespace
}  // namespace qlora::model
