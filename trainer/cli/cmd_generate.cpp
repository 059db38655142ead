// `qlora generate --model DIR [--adapter DIR] [--prompt TEXT ...] [--prompt-file FILE]`: text from a model
// (+ adapter, or a merged export), streamed to stdout token by token as it is decoded.
// Prompts go through the Llama-2 chat template ("<s>[INST] <<SYS>>...<</SYS>> user [/INST]") unless --raw;
// they come from --prompt (repeatable), --prompt-file (one per line, or JSONL records with "prompt" /
// "question" / "instruction" and an optional "system"), else stdin: an interactive chat (history kept)
// when stdin is a terminal, one prompt per line otherwise. Decoding: greedy by default (--temperature 0),
// else temperature / top-k / top-p sampling (seeded); stops at EOS or after --max-new-tokens.
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "datasets/chat_template.h"
#include "trainer/cli/commands.h"
#include "trainer/cli/infer.h"
#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/generate/generate.h"

namespace qlora::cli {

namespace {

using nlohmann::json;

struct GenerateArgs {
  InferenceArgs inf;
  std::vector<std::string> prompts;
  std::string prompt_file, system, json_out;
  gen::SamplingOptions sampling;
  bool raw = false;
  bool no_eos_stop = false;
};

struct Prompt {
  std::string system, user;
};

std::vector<Prompt> read_prompt_file(const std::string& file, const std::string& default_system) {
  QLORA_REQUIRE(fs::is_regular_file(file), "prompt file '{}' does not exist", file);
  std::istringstream in(read_file(file));
  const bool jsonl = fs::path(file).extension() == ".jsonl";
  std::vector<Prompt> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    size_t first = line.find_first_not_of(" \t");
    if (first == std::string::npos) continue;
    if (!jsonl && line[first] != '{') {
      out.push_back({default_system, line});
      continue;
    }
    json rec;
    try {
      rec = json::parse(line);
    } catch (const json::parse_error& e) {
      fail("prompt file '{}': line {}: invalid JSON: {}", file, n, e.what());
    }
    Prompt p{default_system, ""};
    if (rec.is_string()) {
      p.user = rec.get<std::string>();
    } else if (rec.is_object()) {
      for (const char* k : {"prompt", "question", "instruction"}) {
        if (rec.contains(k) && rec[k].is_string()) {
          p.user = rec[k].get<std::string>();
          break;
        }
      }
      if (rec.contains("system") && rec["system"].is_string()) p.system = rec["system"].get<std::string>();
    }
    QLORA_REQUIRE(!p.user.empty(), "prompt file '{}': line {}: expected a JSON string or an object with a string "
                  "\"prompt\", \"question\" or \"instruction\"", file, n);
    out.push_back(std::move(p));
  }
  QLORA_REQUIRE(!out.empty(), "prompt file '{}' holds no prompts", file);
  return out;
}

int run_generate(GenerateArgs a) {
  gen::validate(a.sampling);
  std::vector<Prompt> prompts;
  for (auto& p : a.prompts) prompts.push_back({a.system, p});
  if (!a.prompt_file.empty()) {
    auto more = read_prompt_file(a.prompt_file, a.system);
    prompts.insert(prompts.end(), more.begin(), more.end());
  }
  Inference inf = load_inference(a.inf);
  auto& model = *inf.model;
  if (!a.no_eos_stop) {
    a.sampling.stop_ids = {inf.tok.eos_id()};
    if (model.arch().eos_token_id != inf.tok.eos_id()) a.sampling.stop_ids.push_back(model.arch().eos_token_id);
  }
  json results = json::array();

  // Generates one answer, streaming it; returns the answer text (without EOS).
  auto answer = [&](const std::vector<int32_t>& prompt_ids, const std::string& shown_prompt) {
    gen::TextStream stream(inf.tok);
    auto t0 = std::chrono::steady_clock::now();
    auto ids = gen::generate(model, prompt_ids, a.sampling, [&](int32_t id) {
      if (std::find(a.sampling.stop_ids.begin(), a.sampling.stop_ids.end(), id) != a.sampling.stop_ids.end()) return;
      std::string piece = stream.push(id);
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    });
    std::string rest = stream.flush();
    std::fwrite(rest.data(), 1, rest.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const bool eos = !ids.empty() && std::find(a.sampling.stop_ids.begin(), a.sampling.stop_ids.end(), ids.back()) !=
                                         a.sampling.stop_ids.end();
    fmt::print(stderr, "[{} tokens, {:.1f} tokens/s, {}]\n", ids.size(), ids.size() / std::max(s, 1e-9),
               eos ? "EOS" : "max_new_tokens");
    std::vector<int32_t> text_ids(ids.begin(), ids.end() - (eos ? 1 : 0));
    std::string text = inf.tok.decode(text_ids);
    results.push_back({{"prompt", shown_prompt}, {"prompt_ids", prompt_ids}, {"ids", ids}, {"text", text},
                       {"stopped_at_eos", eos}});
    return text;
  };
  auto encode = [&](const std::string& system, const std::vector<data::Turn>& history, const std::string& user) {
    if (!a.raw) return data::chat_prompt(inf.tok, system, history, user);
    std::vector<int32_t> ids{inf.tok.bos_id()};
    auto body = inf.tok.encode(user);
    ids.insert(ids.end(), body.begin(), body.end());
    return ids;
  };

  if (!prompts.empty()) {
    for (const auto& p : prompts) answer(encode(p.system, {}, p.user), p.user);
  } else if (::isatty(STDIN_FILENO)) {
    fmt::print(stderr, "interactive chat: type a message, an empty line or Ctrl-D ends, /reset clears history\n");
    std::vector<data::Turn> history;
    std::string line;
    while (true) {
      fmt::print(stderr, "> ");
      std::fflush(stderr);
      if (!std::getline(std::cin, line) || line.empty()) break;
      if (line == "/reset") {
        history.clear();
        continue;
      }
      std::string reply = answer(encode(a.system, a.raw ? std::vector<data::Turn>{} : history, line), line);
      history.push_back({line, reply});
    }
  } else {
    std::string line;
    int64_t n = 0;
    while (std::getline(std::cin, line)) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      answer(encode(a.system, {}, line), line);
      ++n;
    }
    QLORA_REQUIRE(n > 0, "no prompt: pass --prompt TEXT, --prompt-file FILE, or prompts on stdin");
  }
  if (!a.json_out.empty()) write_file_atomic(a.json_out, results.dump(1) + "\n");
  return 0;
}

}  // namespace

Runner add_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text from a model (+ adapter), streamed as it is decoded");
  auto a = std::make_shared<GenerateArgs>();
  add_inference_options(cmd, a->inf);
  cmd->add_option("-p,--prompt", a->prompts, "A user message (repeatable)");
  cmd->add_option("--prompt-file", a->prompt_file, "Prompts: one per line, or JSONL {\"prompt\", \"system\"?}");
  cmd->add_option("-s,--system", a->system, "System prompt (Llama-2 <<SYS>> block)");
  cmd->add_flag("--raw", a->raw, "No chat template: BOS + the prompt text");
  cmd->add_option("-n,--max-new-tokens", a->sampling.max_new_tokens, "Most tokens to generate")->capture_default_str();
  cmd->add_option("-t,--temperature", a->sampling.temperature, "0 = greedy; > 0 samples")->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "Sample among the k most likely (0 = off)")->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass (1 = off)")->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "Sampling seed")->capture_default_str();
  cmd->add_flag("--no-eos-stop", a->no_eos_stop, "Do not stop at EOS (always generate --max-new-tokens)");
  cmd->add_option("--json", a->json_out, "Also write [{prompt, prompt_ids, ids, text, stopped_at_eos}] here");
  return [a] { return run_generate(*a); };
}

}  // namespace qlora::cli
