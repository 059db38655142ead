// Shared by the data-stage tests: the fixture files written by make_data_fixtures.py and small helpers.
#pragma once

#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <vector>

#include "datasets/tokenizer.h"
#include "tests/test_util.h"
#include "trainer/config/config.h"

namespace qlora::data::test {

inline std::string fixture(const std::string& name) { return (qlora::test::data_dir() / "data" / name).string(); }

inline const nlohmann::json& reference() {
  static const nlohmann::json j = [] {
    std::ifstream in(fixture("reference.json"));
    return nlohmann::json::parse(in);
  }();
  return j;
}

inline const Tokenizer& tokenizer() {
  static const Tokenizer t = Tokenizer::load(fixture("tok.model"));
  return t;
}

inline std::vector<int32_t> ints(const nlohmann::json& a) { return a.get<std::vector<int32_t>>(); }

// Writes `text` to a fresh file named `name` and returns its path.
inline std::string write_temp(const std::string& name, const std::string& text) {
  auto path = qlora::test::temp_dir("data") / name;
  std::ofstream(path, std::ios::binary) << text;
  return path.string();
}

inline DataConfig config(DataFormat f = DataFormat::Auto, int64_t max_seq_len = 4096) {
  DataConfig c;
  c.format = f;
  c.max_seq_len = max_seq_len;
  return c;
}

}  // namespace qlora::data::test
