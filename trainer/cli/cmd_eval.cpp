// `qlora eval --model DIR [--adapter DIR] --data FILE [--json OUT] [--max-new-tokens N]`: how well a model
// (+ adapter) does on a data set.
//   loss / perplexity: the mean answer-token cross-entropy (the training loss: labels as the dataset
//     loader builds them, loss on the answers only) over every record the loader understands, and
//     exp(loss);
//   exact_match / contains: for records with a reference answer - chat "messages" whose last turn is the
//     assistant's (the reference; a string field "answer" wins when present), or a record with "answer"
//     and a "question" / "prompt" / "instruction" (+ "input"), or an Alpaca record's "output" - the greedy
//     generation for the prompt (the Llama-2 chat template up to "[/INST]") is compared with the
//     reference: exact = equal after stripping whitespace at both ends; contains = the stripped reference
//     occurs in the generation. Both are fractions in [0, 1] (null when no record has a reference).
// Prints a summary on stdout and, with --json, writes the report (see the keys below) atomically.
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "datasets/batcher.h"
#include "datasets/dataset.h"
#include "trainer/cli/commands.h"
#include "trainer/cli/infer.h"
#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/generate/generate.h"
#include "trainer/train/trainer.h"

namespace qlora::cli {

namespace {

using nlohmann::json;

struct EvalArgs {
  InferenceArgs inf;
  std::string data, json_out, system;
  int64_t max_new_tokens = 128;
  int64_t max_seq_len = 2048;
  int64_t batch_size = 4;
  int64_t limit = 0;  // 0 = every record with a reference
};

// A question with its reference answer, ready for generation.
struct QA {
  std::string where;  // "file:line N"
  std::string system, user, reference;
  std::vector<data::Turn> history;
};

// The records of a JSONL file (or a .json array), each with its location.
std::vector<std::pair<json, std::string>> read_records(const std::string& file) {
  QLORA_REQUIRE(fs::is_regular_file(file), "data file '{}' does not exist or is not a file", file);
  const std::string text = read_file(file);
  std::vector<std::pair<json, std::string>> out;
  size_t first = text.find_first_not_of(" \t\r\n");
  if (fs::path(file).extension() == ".json" && first != std::string::npos && text[first] == '[') {
    json arr;
    try {
      arr = json::parse(text);
    } catch (const json::parse_error& e) {
      fail("data file '{}': invalid JSON: {}", file, e.what());
    }
    for (size_t i = 0; i < arr.size(); ++i) out.emplace_back(arr[i], fmt::format("{}: record {}", file, i));
    return out;
  }
  std::istringstream in(text);
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      out.emplace_back(json::parse(line), fmt::format("{}:{}", file, n));
    } catch (const json::parse_error& e) {
      fail("data file '{}': line {}: invalid JSON: {}", file, n, e.what());
    }
  }
  return out;
}

std::string str_field(const json& rec, const char* key) {
  auto it = rec.find(key);
  return it != rec.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// The question and reference answer of a record, if it has one (see the file comment). Malformed chat
// records are left to the loss pass, which reports them.
std::optional<QA> reference_of(const json& rec, const std::string& where, const std::string& default_system) {
  if (!rec.is_object()) return std::nullopt;
  QA qa;
  qa.where = where;
  qa.system = rec.contains("system") && rec["system"].is_string() ? rec["system"].get<std::string>() : default_system;
  const std::string answer = str_field(rec, "answer");
  auto msgs = rec.find("messages");
  if (msgs != rec.end() && msgs->is_array()) {
    std::vector<data::Turn> turns;
    bool want_user = true;
    for (size_t i = 0; i < msgs->size(); ++i) {
      const json& m = (*msgs)[i];
      if (!m.is_object()) return std::nullopt;
      const std::string role = str_field(m, "role"), content = str_field(m, "content");
      if (role == "system" && i == 0) {
        qa.system = content;
      } else if (role == "user" && want_user) {
        turns.push_back({content, ""});
        want_user = false;
      } else if (role == "assistant" && !want_user) {
        turns.back().assistant = content;
        want_user = true;
      } else {
        return std::nullopt;
      }
    }
    if (turns.empty()) return std::nullopt;
    if (want_user) {  // ends with the assistant's answer: the reference unless "answer" says otherwise
      qa.reference = answer.empty() ? turns.back().assistant : answer;
    } else {  // ends with a user turn: needs "answer"
      if (answer.empty()) return std::nullopt;
      qa.reference = answer;
    }
    qa.user = turns.back().user;
    turns.pop_back();
    qa.history = std::move(turns);
    return qa;
  }
  std::string ref = answer.empty() ? str_field(rec, "output") : answer;
  if (ref.empty()) return std::nullopt;
  for (const char* k : {"question", "prompt", "instruction"}) {
    qa.user = str_field(rec, k);
    if (!qa.user.empty()) break;
  }
  if (qa.user.empty()) return std::nullopt;
  const std::string input = str_field(rec, "input");
  if (rec.contains("instruction") && !input.empty()) qa.user += "\n\n" + input;
  qa.reference = ref;
  return qa;
}

int run_eval(const EvalArgs& a) {
  QLORA_REQUIRE(fs::is_regular_file(a.data), "data file '{}' (--data) does not exist or is not a file", a.data);
  QLORA_REQUIRE(a.batch_size >= 1, "--batch-size must be at least 1, got {}", a.batch_size);
  if (!a.json_out.empty()) {
    fs::path parent = fs::absolute(a.json_out).parent_path();
    QLORA_REQUIRE(fs::is_directory(parent), "--json {}: directory '{}' does not exist", a.json_out, parent.string());
  }
  Inference inf = load_inference(a.inf);
  auto& model = *inf.model;
  at::NoGradGuard no_grad;

  // Loss over every record the dataset loader understands (the training loss, answers only).
  DataConfig dc;
  dc.system_prompt = a.system;
  dc.max_seq_len = a.max_seq_len;
  dc.skip_bad_records = true;
  double loss_sum = 0.0;
  int64_t loss_tokens = 0, loss_examples = 0, skipped = 0;
  try {
    data::Dataset ds = data::Dataset::load(dc, inf.tok, a.data);
    skipped = ds.stats().skipped;
    loss_examples = ds.size();
    const int32_t pad = inf.tok.pad_id() >= 0 ? inf.tok.pad_id() : inf.tok.eos_id();
    for (int64_t i = 0; i < ds.size(); i += a.batch_size) {
      std::vector<const data::Example*> rows;
      for (int64_t j = i; j < std::min(ds.size(), i + a.batch_size); ++j) rows.push_back(&ds.at(j));
      auto [s, n] = train::batch_loss(model, data::collate(rows, pad));
      loss_sum += s;
      loss_tokens += n;
    }
  } catch (const Error& e) {
    fmt::print(stderr, "warning: no loss: {}\n", e.what());
  }
  const double loss = loss_tokens > 0 ? loss_sum / static_cast<double>(loss_tokens) : std::nan("");

  // Greedy generation against the references.
  auto records = read_records(a.data);
  std::vector<QA> qas;
  for (auto& [rec, where] : records) {
    if (auto qa = reference_of(rec, where, a.system)) qas.push_back(std::move(*qa));
    if (a.limit > 0 && static_cast<int64_t>(qas.size()) == a.limit) break;
  }
  gen::SamplingOptions so;
  so.max_new_tokens = a.max_new_tokens;
  so.stop_ids = {inf.tok.eos_id()};
  if (model.arch().eos_token_id != inf.tok.eos_id()) so.stop_ids.push_back(model.arch().eos_token_id);
  int64_t exact = 0, contains = 0;
  const bool tty = ::isatty(STDERR_FILENO);
  json predictions = json::array();
  for (size_t i = 0; i < qas.size(); ++i) {
    const QA& qa = qas[i];
    auto prompt = data::chat_prompt(inf.tok, qa.system, qa.history, qa.user);
    auto ids = gen::generate(model, prompt, so);
    if (!ids.empty() && std::find(so.stop_ids.begin(), so.stop_ids.end(), ids.back()) != so.stop_ids.end())
      ids.pop_back();
    const std::string out = inf.tok.decode(ids);
    const std::string ref = gen::strip(qa.reference), got = gen::strip(out);
    const bool ex = got == ref;
    const bool co = out.find(ref) != std::string::npos;
    exact += ex;
    contains += co;
    predictions.push_back({{"where", qa.where}, {"prompt", qa.user}, {"reference", qa.reference},
                           {"generated", out}, {"exact_match", ex}, {"contains", co}});
    // A live counter on a terminal; in a log, a line every 50 records and at the end.
    if (tty) fmt::print(stderr, "\r[{}/{}] exact {} contains {}", i + 1, qas.size(), exact, contains);
    else if ((i + 1) % 50 == 0 || i + 1 == qas.size())
      fmt::print(stderr, "[{}/{}] exact {} contains {}\n", i + 1, qas.size(), exact, contains);
  }
  if (tty && !qas.empty()) fmt::print(stderr, "\n");
  const int64_t n = static_cast<int64_t>(qas.size());
  json em = n ? json(static_cast<double>(exact) / n) : json(nullptr);
  json cm = n ? json(static_cast<double>(contains) / n) : json(nullptr);

  json report = {{"model", a.inf.model},
                 {"adapter", a.inf.adapter.empty() ? json(nullptr) : json(a.inf.adapter)},
                 {"data", a.data},
                 {"records", static_cast<int64_t>(records.size())},
                 {"loss", loss_tokens ? json(loss) : json(nullptr)},
                 {"perplexity", loss_tokens ? json(std::exp(loss)) : json(nullptr)},
                 {"loss_examples", loss_examples},
                 {"loss_tokens", loss_tokens},
                 {"skipped_records", skipped},
                 {"examples", n},
                 {"exact_match", em},
                 {"contains", cm},
                 {"exact_match_count", exact},
                 {"contains_count", contains},
                 {"max_new_tokens", a.max_new_tokens},
                 {"predictions", predictions}};
  if (loss_tokens) {
    fmt::print("loss {:.4f}  perplexity {:.4f}  ({} examples, {} answer tokens)\n", loss, std::exp(loss),
               loss_examples, loss_tokens);
  } else {
    fmt::print("loss: no usable example\n");
  }
  if (n) {
    fmt::print("exact match {:.4f} ({}/{})  contains {:.4f} ({}/{})  (greedy, max {} new tokens)\n",
               static_cast<double>(exact) / n, exact, n, static_cast<double>(contains) / n, contains, n,
               a.max_new_tokens);
  } else {
    fmt::print("exact match: no record with a reference answer\n");
  }
  if (!a.json_out.empty()) {
    write_file_atomic(a.json_out, report.dump(2) + "\n");
    fmt::print(stderr, "report: {}\n", a.json_out);
  }
  return 0;
}

}  // namespace

Runner add_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "Loss, perplexity and exact-match accuracy of a model (+ adapter) on a data set");
  auto a = std::make_shared<EvalArgs>();
  add_inference_options(cmd, a->inf);
  cmd->add_option("-d,--data", a->data, "JSONL/JSON data (text, messages, alpaca, guanaco; \"answer\" fields)")
      ->required();
  cmd->add_option("--json", a->json_out, "Write the report as JSON here");
  cmd->add_option("--max-new-tokens", a->max_new_tokens, "Tokens generated per answer (greedy)")->capture_default_str();
  cmd->add_option("--system", a->system, "System prompt for records that carry none");
  cmd->add_option("--max-seq-len", a->max_seq_len, "Examples are truncated to this for the loss")->capture_default_str();
  cmd->add_option("--batch-size", a->batch_size, "Sequences per forward pass for the loss")->capture_default_str();
  cmd->add_option("--limit", a->limit, "Generate for at most this many records (0 = all)")->capture_default_str();
  return [a] { return run_eval(*a); };
}

}  // namespace qlora::cli
