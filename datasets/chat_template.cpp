// Llama-2 chat template and label masking: see chat_template.h.
#include "datasets/chat_template.h"

#include <algorithm>
#include <string_view>

#include "trainer/core/error.h"

namespace qlora::data {

namespace {

constexpr std::string_view kBInst = "[INST]";
constexpr std::string_view kEInst = "[/INST]";
constexpr std::string_view kBSys = "<<SYS>>\n";
constexpr std::string_view kESys = "\n<</SYS>>\n\n";
constexpr std::string_view kBos = "<s>";
constexpr std::string_view kEos = "</s>";

// Python's str.strip() for the ASCII whitespace that occurs in practice (Meta strips with it).
std::string strip(std::string_view s) {
  auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  size_t b = 0, e = s.size();
  while (b < e && ws(s[b])) ++b;
  while (e > b && ws(s[e - 1])) --e;
  return std::string(s.substr(b, e - b));
}

bool all_space(std::string_view s) { return strip(s).empty(); }

// Appends `text` encoded, labelling pieces that start inside one of `answer` byte ranges [b, e).
void append_encoded(const Tokenizer& tok, std::string_view text,
                    const std::vector<std::pair<size_t, size_t>>& answers, Example& ex) {
  for (const TokenSpan& t : tok.encode_spans(text)) {
    bool in_answer = std::any_of(answers.begin(), answers.end(),
                                 [&](const auto& r) { return t.begin >= r.first && t.begin < r.second; });
    ex.ids.push_back(t.id);
    ex.labels.push_back(in_answer ? t.id : kIgnore);
  }
}

void finish(Example& ex, bool train_on_prompt) {
  if (train_on_prompt) ex.labels = ex.ids;
  if (!ex.labels.empty()) ex.labels[0] = kIgnore;
  ex.segment_starts = {0};
}

// The user content of turn i, with the system block folded into the first (Meta's order, then strip).
std::string user_content(const std::string& system, const std::vector<Turn>& turns, size_t i,
                         const std::string& user) {
  if (i == 0 && !system.empty()) return strip(std::string(kBSys) + system + std::string(kESys) + user);
  return strip(user);
}

}  // namespace

int64_t Example::trained_tokens() const {
  return std::count_if(labels.begin(), labels.end(), [](int32_t l) { return l != kIgnore; });
}

Example format_chat(const Tokenizer& tok, const std::string& system, const std::vector<Turn>& turns,
                    bool train_on_prompt) {
  Example ex;
  for (size_t i = 0; i < turns.size(); ++i) {
    std::string prompt = fmt::format("{} {} {}", kBInst, user_content(system, turns, i, turns[i].user), kEInst);
    std::string text = fmt::format("{} {} ", prompt, strip(turns[i].assistant));
    ex.ids.push_back(tok.bos_id());
    ex.labels.push_back(kIgnore);
    append_encoded(tok, text, {{prompt.size(), text.size()}}, ex);
    ex.ids.push_back(tok.eos_id());
    ex.labels.push_back(tok.eos_id());
  }
  finish(ex, train_on_prompt);
  return ex;
}

std::vector<int32_t> chat_prompt(const Tokenizer& tok, const std::string& system,
                                 const std::vector<Turn>& history, const std::string& user) {
  std::vector<int32_t> ids = format_chat(tok, system, history, false).ids;
  std::vector<Turn> all = history;
  all.push_back({user, ""});
  ids.push_back(tok.bos_id());
  auto tail = tok.encode(fmt::format("{} {} {}", kBInst, user_content(system, all, history.size(), user), kEInst));
  ids.insert(ids.end(), tail.begin(), tail.end());
  return ids;
}

Example format_text(const Tokenizer& tok, const std::string& text, bool train_on_prompt) {
  const bool plain = text.find(kEInst) == std::string::npos;
  Example ex;
  bool in_answer = false;  // the text so far ends inside an answer: a following EOS carries loss
  size_t pos = 0;
  while (pos < text.size()) {
    size_t next_bos = text.find(kBos, pos), next_eos = text.find(kEos, pos);
    size_t next = std::min(next_bos, next_eos);
    std::string_view seg = std::string_view(text).substr(pos, next == std::string::npos ? std::string::npos : next - pos);
    if (!all_space(seg)) {
      // Answer ranges inside seg: from just after each "[/INST]" to the next "[INST]" or seg's end.
      std::vector<std::pair<size_t, size_t>> answers;
      size_t at = 0;
      bool open = false;
      while ((at = seg.find(kEInst, at)) != std::string_view::npos) {
        size_t b = at + kEInst.size();
        size_t e = seg.find(kBInst, b);
        answers.emplace_back(b, e == std::string_view::npos ? seg.size() : e);
        open = e == std::string_view::npos;
        at = b;
      }
      append_encoded(tok, seg, answers, ex);
      in_answer = open;
    }
    if (next == std::string::npos) break;
    if (next == next_bos) {
      if (ex.ids.empty() || ex.ids.back() != tok.bos_id()) {  // "<s><s>" would double BOS
        ex.ids.push_back(tok.bos_id());
        ex.labels.push_back(kIgnore);
      }
      in_answer = false;
      pos = next + kBos.size();
    } else {
      ex.ids.push_back(tok.eos_id());
      ex.labels.push_back(in_answer || plain ? tok.eos_id() : kIgnore);
      in_answer = false;
      pos = next + kEos.size();
    }
  }
  if (ex.ids.empty() || ex.ids[0] != tok.bos_id()) {
    ex.ids.insert(ex.ids.begin(), tok.bos_id());
    ex.labels.insert(ex.labels.begin(), kIgnore);
  }
  if (plain) ex.labels = ex.ids;
  finish(ex, train_on_prompt);
  return ex;
}

std::vector<Turn> parse_guanaco(const std::string& text) {
  constexpr std::string_view kHuman = "### Human:";
  constexpr std::string_view kAssistant = "### Assistant:";
  // Markers in order of appearance: (position, is_human).
  std::vector<std::pair<size_t, bool>> marks;
  for (size_t p = text.find("### "); p != std::string::npos; p = text.find("### ", p + 1)) {
    std::string_view rest = std::string_view(text).substr(p);
    if (rest.starts_with(kHuman)) marks.emplace_back(p, true);
    else if (rest.starts_with(kAssistant)) marks.emplace_back(p, false);
  }
  QLORA_REQUIRE(!marks.empty() && marks[0].second && all_space(std::string_view(text).substr(0, marks[0].first)),
                "guanaco text must start with \"### Human:\"");
  std::vector<Turn> turns;
  for (size_t i = 0; i < marks.size(); ++i) {
    bool human = marks[i].second;
    QLORA_REQUIRE(human == (i % 2 == 0), "guanaco text: marker {} (\"{}\") breaks the Human/Assistant alternation",
                  i + 1, human ? kHuman : kAssistant);
    size_t b = marks[i].first + (human ? kHuman.size() : kAssistant.size());
    size_t e = i + 1 < marks.size() ? marks[i + 1].first : text.size();
    std::string content = strip(std::string_view(text).substr(b, e - b));
    if (human) turns.push_back({content, ""});
    else turns.back().assistant = content;
  }
  QLORA_REQUIRE(marks.size() % 2 == 0, "guanaco text ends with a \"### Human:\" turn that has no \"### Assistant:\" answer");
  return turns;
}

}  // namespace qlora::data
