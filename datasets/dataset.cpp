// Dataset reading, formats, truncation, packing, split: see dataset.h.
#include "datasets/dataset.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "trainer/core/error.h"

namespace qlora::data {

using nlohmann::json;

namespace {

const std::string& get_string(const json& rec, const char* key, DataFormat f) {
  auto it = rec.find(key);
  QLORA_REQUIRE(it != rec.end(), "missing field \"{}\" (format {})", key, to_string(f));
  QLORA_REQUIRE(it->is_string(), "field \"{}\" must be a string, got {}", key, it->type_name());
  return it->get_ref<const std::string&>();
}

std::string keys_of(const json& rec) {
  std::vector<std::string> ks;
  for (auto it = rec.begin(); it != rec.end(); ++it) ks.push_back("\"" + it.key() + "\"");
  return ks.empty() ? "none" : fmt::format("{}", fmt::join(ks, ", "));
}

DataFormat detect(const json& rec) {
  if (rec.contains("messages")) return DataFormat::Messages;
  if (rec.contains("instruction") && rec.contains("output")) return DataFormat::Alpaca;
  if (rec.contains("text")) {
    const auto& t = rec["text"];
    if (t.is_string() && t.get_ref<const std::string&>().find("### Human:") != std::string::npos)
      return DataFormat::Guanaco;
    return DataFormat::Text;
  }
  fail("cannot detect the record format from its keys ({}): expected \"text\", \"messages\", or "
       "\"instruction\" + \"output\" (or set data.format)", keys_of(rec));
}

Example encode_messages(const Tokenizer& tok, const json& rec, const DataConfig& cfg) {
  auto it = rec.find("messages");
  QLORA_REQUIRE(it != rec.end(), "missing field \"messages\" (format messages)");
  QLORA_REQUIRE(it->is_array(), "field \"messages\" must be an array of {{\"role\", \"content\"}} objects, got {}",
                it->type_name());
  std::string system = cfg.system_prompt;
  std::vector<Turn> turns;
  bool want_user = true;
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    QLORA_REQUIRE(m.is_object(), "messages[{}] must be an object with \"role\" and \"content\", got {}", i,
                  m.type_name());
    auto r = m.find("role"), c = m.find("content");
    QLORA_REQUIRE(r != m.end() && r->is_string(), "messages[{}]: missing string field \"role\"", i);
    QLORA_REQUIRE(c != m.end() && c->is_string(), "messages[{}]: missing string field \"content\"", i);
    const std::string& role = r->get_ref<const std::string&>();
    const std::string& content = c->get_ref<const std::string&>();
    if (role == "system") {
      QLORA_REQUIRE(i == 0, "messages[{}]: a \"system\" message may only come first", i);
      system = content;
    } else if (role == "user" || role == "assistant") {
      QLORA_REQUIRE((role == "user") == want_user, "messages[{}]: expected role \"{}\", got \"{}\" (user and "
                    "assistant must alternate, starting with user)", i, want_user ? "user" : "assistant", role);
      if (want_user) turns.push_back({content, ""});
      else turns.back().assistant = content;
      want_user = !want_user;
    } else {
      fail("messages[{}]: unknown role \"{}\" (expected \"system\", \"user\" or \"assistant\")", i, role);
    }
  }
  QLORA_REQUIRE(!turns.empty(), "\"messages\" has no user/assistant turn");
  QLORA_REQUIRE(want_user, "\"messages\" ends with a user message: the last message must be the assistant's answer");
  return format_chat(tok, system, turns, cfg.train_on_prompt);
}

Example encode_record(const Tokenizer& tok, const json& rec, const DataConfig& cfg) {
  QLORA_REQUIRE(rec.is_object(), "a record must be a JSON object, got {}", rec.type_name());
  DataFormat f = cfg.format == DataFormat::Auto ? detect(rec) : cfg.format;
  switch (f) {
    case DataFormat::Text:
      return format_text(tok, get_string(rec, "text", f), cfg.train_on_prompt);
    case DataFormat::Guanaco:
      return format_chat(tok, cfg.system_prompt, parse_guanaco(get_string(rec, "text", f)), cfg.train_on_prompt);
    case DataFormat::Messages:
      return encode_messages(tok, rec, cfg);
    case DataFormat::Alpaca: {
      const std::string& instruction = get_string(rec, "instruction", f);
      const std::string& output = get_string(rec, "output", f);
      std::string user = instruction;
      if (rec.contains("input") && !rec["input"].is_null()) {
        const std::string& input = get_string(rec, "input", f);
        if (!input.empty()) user += "\n\n" + input;
      }
      return format_chat(tok, cfg.system_prompt, {{user, output}}, cfg.train_on_prompt);
    }
    case DataFormat::Auto:
      break;
  }
  fail("unknown data format {}", static_cast<int>(f));
}

// 1-based line of byte offset `pos` in `text`.
int64_t line_of(const std::string& text, size_t pos) {
  return 1 + std::count(text.begin(), text.begin() + std::min(pos, text.size()), '\n');
}

bool starts_with_bracket(const std::string& text) {
  for (char c : text) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') continue;
    return c == '[';
  }
  return false;
}

}  // namespace

std::string describe(const DatasetStats& s, const std::string& name) {
  std::string out = fmt::format("{}: {} examples", name, s.examples);
  if (s.rows != s.examples) out += fmt::format(" in {} packed rows", s.rows);
  out += fmt::format(", {} tokens ({} trained), {} truncated, {} too long (dropped), {} bad records skipped",
                     s.tokens, s.trained_tokens, s.truncated, s.too_long, s.skipped);
  return out;
}

const Example& Dataset::at(int64_t i) const {
  TORCH_CHECK(i >= 0 && i < size(), "Dataset::at(", i, ") out of range [0, ", size(), ")");
  return examples_[static_cast<size_t>(i)];
}

Dataset Dataset::from_examples(std::vector<Example> examples, DatasetStats read_stats) {
  Dataset d;
  d.examples_ = std::move(examples);
  d.stats_ = read_stats;
  d.stats_.rows = d.size();
  d.stats_.tokens = d.stats_.trained_tokens = 0;
  int64_t segments = 0;
  for (const Example& ex : d.examples_) {
    d.stats_.tokens += static_cast<int64_t>(ex.ids.size());
    d.stats_.trained_tokens += ex.trained_tokens();
    segments += static_cast<int64_t>(ex.segment_starts.size());
  }
  d.stats_.examples = segments;
  return d;
}

Dataset Dataset::load(const DataConfig& cfg, const Tokenizer& tok, const std::string& file) {
  QLORA_REQUIRE(cfg.max_seq_len >= 2, "data.max_seq_len must be at least 2, got {}", cfg.max_seq_len);
  namespace fs = std::filesystem;
  QLORA_REQUIRE(fs::is_regular_file(file), "data file '{}' does not exist or is not a file", file);
  std::string ext = fs::path(file).extension().string();
  QLORA_REQUIRE(ext == ".jsonl" || ext == ".json",
                "data file '{}': unsupported extension '{}' (expected .jsonl, or .json holding an array or JSONL)",
                file, ext);
  std::ifstream in(file, std::ios::binary);
  QLORA_REQUIRE(in.good(), "cannot open data file '{}'", file);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();

  DatasetStats st;
  std::vector<Example> kept;
  // Tokenizes one parsed record; `where` is "file:line N" or "file: record N".
  auto take = [&](const json& rec, const std::string& where) {
    Example ex;
    try {
      ex = encode_record(tok, rec, cfg);
      QLORA_REQUIRE(ex.trained_tokens() > 0, "the record has no answer to train on (no text after \"[/INST]\")");
    } catch (const Error& e) {
      if (!cfg.skip_bad_records)
        fail("{}: {} (data.skip_bad_records: true skips such records)", where, e.what());
      ++st.skipped;
      return;
    }
    if (static_cast<int64_t>(ex.ids.size()) > cfg.max_seq_len) {
      ex.ids.resize(static_cast<size_t>(cfg.max_seq_len));
      ex.labels.resize(static_cast<size_t>(cfg.max_seq_len));
      if (ex.trained_tokens() == 0) {
        ++st.too_long;
        return;
      }
      ++st.truncated;
    }
    kept.push_back(std::move(ex));
  };

  if (ext == ".json" && starts_with_bracket(text)) {
    json arr;
    try {
      arr = json::parse(text);
    } catch (const json::parse_error& e) {
      fail("data file '{}': line {}: invalid JSON: {}", file, line_of(text, e.byte == 0 ? 0 : e.byte - 1), e.what());
    }
    QLORA_REQUIRE(arr.is_array(), "data file '{}': expected a JSON array of records", file);
    for (size_t i = 0; i < arr.size(); ++i) {
      ++st.records;
      take(arr[i], fmt::format("data file '{}': record {}", file, i));
    }
  } else {
    size_t pos = 0;
    int64_t line = 0;
    while (pos < text.size()) {
      size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      std::string_view l(text.data() + pos, end - pos);
      pos = end + 1;
      ++line;
      if (l.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      ++st.records;
      std::string where = fmt::format("data file '{}': line {}", file, line);
      json rec;
      try {
        rec = json::parse(l);
      } catch (const json::parse_error& e) {
        if (!cfg.skip_bad_records)
          fail("{}: invalid JSON: {} (data.skip_bad_records: true skips such lines)", where, e.what());
        ++st.skipped;
        continue;
      }
      take(rec, where);
    }
  }

  QLORA_REQUIRE(st.records > 0, "data file '{}' holds no records (empty dataset)", file);
  if (kept.empty()) {
    if (st.too_long > 0)
      fail("data file '{}': every usable example is too long: {} of {} records have no answer token within "
           "data.max_seq_len = {} (raise max_seq_len or set train_on_prompt)", file, st.too_long, st.records,
           cfg.max_seq_len);
    fail("data file '{}': no usable records ({} of {} were bad and skipped)", file, st.skipped, st.records);
  }
  return from_examples(std::move(kept), st);
}

std::vector<Example> pack(const std::vector<Example>& examples, int64_t max_seq_len) {
  std::vector<Example> rows;
  Example cur;
  for (const Example& ex : examples) {
    TORCH_CHECK(static_cast<int64_t>(ex.ids.size()) <= max_seq_len, "pack: example longer than max_seq_len");
    if (static_cast<int64_t>(cur.ids.size() + ex.ids.size()) > max_seq_len) {
      rows.push_back(std::move(cur));
      cur = Example{};
    }
    cur.segment_starts.push_back(static_cast<int32_t>(cur.ids.size()));
    cur.ids.insert(cur.ids.end(), ex.ids.begin(), ex.ids.end());
    size_t start = cur.labels.size();
    cur.labels.insert(cur.labels.end(), ex.labels.begin(), ex.labels.end());
    if (start < cur.labels.size()) cur.labels[start] = kIgnore;
  }
  if (!cur.ids.empty()) rows.push_back(std::move(cur));
  return rows;
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[static_cast<size_t>(i)] = i;
  uint64_t state = seed;
  auto next = [&state]() {  // SplitMix64
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  for (int64_t i = n - 1; i > 0; --i) {
    uint64_t bound = static_cast<uint64_t>(i) + 1;
    uint64_t limit = UINT64_MAX - UINT64_MAX % bound;  // reject the biased tail
    uint64_t r;
    do r = next(); while (r >= limit);
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(r % bound)]);
  }
  return p;
}

std::vector<int64_t> eval_indices(int64_t n, double fraction, int64_t seed) {
  if (fraction <= 0.0 || n < 2) return {};
  int64_t k = std::clamp<int64_t>(std::llround(static_cast<double>(n) * fraction), 1, n - 1);
  // A different stream from the batcher's epoch shuffles, which use seed + epoch.
  std::vector<int64_t> p = seeded_permutation(n, static_cast<uint64_t>(seed) ^ 0x5EED0E7A15017ull);
  p.resize(static_cast<size_t>(k));
  std::sort(p.begin(), p.end());
  return p;
}

DataSplits load_datasets(const DataConfig& cfg, const Tokenizer& tok) {
  QLORA_REQUIRE(!cfg.train_file.empty(), "data.train_file is not set");
  QLORA_REQUIRE(cfg.eval_fraction >= 0.0 && cfg.eval_fraction <= 0.5,
                "data.eval_fraction must be in [0, 0.5], got {}", cfg.eval_fraction);
  Dataset train = Dataset::load(cfg, tok, cfg.train_file);
  std::optional<Dataset> eval;
  if (!cfg.eval_file.empty()) {
    eval = Dataset::load(cfg, tok, cfg.eval_file);
  } else if (cfg.eval_fraction > 0.0) {
    QLORA_REQUIRE(train.size() >= 2, "data.eval_fraction = {} needs at least 2 usable examples in '{}', found {}",
                  cfg.eval_fraction, cfg.train_file, train.size());
    std::vector<int64_t> ev = eval_indices(train.size(), cfg.eval_fraction, cfg.seed);
    std::vector<Example> tr_ex, ev_ex;
    size_t j = 0;
    for (int64_t i = 0; i < train.size(); ++i) {
      if (j < ev.size() && ev[j] == i) ev_ex.push_back(train.at(i)), ++j;
      else tr_ex.push_back(train.at(i));
    }
    DatasetStats read = train.stats();
    DatasetStats ev_read{};  // read-time counters belong to the file, reported with train
    train = Dataset::from_examples(std::move(tr_ex), read);
    eval = Dataset::from_examples(std::move(ev_ex), ev_read);
  }
  if (cfg.packing) {
    train = Dataset::from_examples(pack(train.examples(), cfg.max_seq_len), train.stats());
    if (eval) eval = Dataset::from_examples(pack(eval->examples(), cfg.max_seq_len), eval->stats());
  }
  return {std::move(train), std::move(eval)};
}

}  // namespace qlora::data
