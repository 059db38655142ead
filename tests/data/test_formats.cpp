// Every dataset format's ids/labels against the Python reference (Meta's chat_completion), label masking
// properties, truncation at the answer boundary, and every bad-input error.
#include <gtest/gtest.h>

#include <fstream>

#include "datasets/chat_template.h"
#include "datasets/dataset.h"
#include "tests/data/data_fixtures.h"

namespace qlora::data {
namespace {

using test::config;
using test::fixture;
using test::ints;
using test::reference;
using test::tokenizer;
using test::write_temp;

DataFormat format_of(const std::string& s) {
  if (s == "text") return DataFormat::Text;
  if (s == "guanaco") return DataFormat::Guanaco;
  if (s == "messages") return DataFormat::Messages;
  if (s == "alpaca") return DataFormat::Alpaca;
  return DataFormat::Auto;
}

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

// Each set, in its declared format and auto-detected, masked and train_on_prompt, equals the reference.
TEST(Formats, IdsAndLabelsMatchMetaReference) {
  for (const auto& [name, set] : reference()["sets"].items()) {
    for (bool autodetect : {false, true}) {
      for (bool all : {false, true}) {
        DataConfig cfg = config(autodetect ? DataFormat::Auto : format_of(set["format"]));
        cfg.system_prompt = set["system_prompt"];
        cfg.train_on_prompt = all;
        Dataset d = Dataset::load(cfg, tokenizer(), set["file"]);
        const auto& exs = set["examples"];
        ASSERT_EQ(d.size(), static_cast<int64_t>(exs.size())) << name;
        int64_t trained = 0;
        for (size_t i = 0; i < exs.size(); ++i) {
          SCOPED_TRACE(fmt::format("set {} example {} auto {} train_on_prompt {}", name, i, autodetect, all));
          EXPECT_EQ(d.at(i).ids, ints(exs[i]["ids"]));
          EXPECT_EQ(d.at(i).labels, ints(exs[i][all ? "labels_all" : "labels"]));
          trained += d.at(i).trained_tokens();
        }
        EXPECT_EQ(d.stats().examples, d.size());
        EXPECT_EQ(d.stats().trained_tokens, trained);
        EXPECT_EQ(d.stats().truncated + d.stats().too_long + d.stats().skipped, 0);
      }
    }
  }
}

TEST(Formats, GenerationPromptMatchesMeta) {
  for (const auto& p : reference()["prompts"]) {
    std::vector<Turn> hist;
    for (const auto& h : p["history"]) hist.push_back({h[0], h[1]});
    EXPECT_EQ(chat_prompt(tokenizer(), p["system"], hist, p["user"]), ints(p["ids"]));
  }
}

// The labelled pieces of a turn are exactly the answer: they decode to it (the trailing space piece
// decodes to a space, EOS to nothing), and nothing of the prompt is labelled.
TEST(Masking, LabelsCoverExactlyTheAnswersInEveryTurn) {
  const Tokenizer& t = tokenizer();
  std::vector<Turn> turns = {{"  What is a llama? ", " A large animal. "}, {"And a model?", "It learns from data."}};
  Example ex = format_chat(t, "Be kind", turns, false);
  ASSERT_EQ(ex.ids.size(), ex.labels.size());
  std::vector<std::string> answers;
  std::vector<int32_t> run;
  for (size_t i = 0; i < ex.ids.size(); ++i) {
    if (ex.labels[i] == kIgnore) continue;
    EXPECT_EQ(ex.labels[i], ex.ids[i]);
    if (ex.ids[i] == t.eos_id()) {
      answers.push_back(t.decode(run));
      run.clear();
    } else {
      run.push_back(ex.ids[i]);
    }
  }
  EXPECT_EQ(answers, (std::vector<std::string>{"A large animal. ", "It learns from data. "}));
  EXPECT_EQ(std::count(ex.ids.begin(), ex.ids.end(), t.bos_id()), 2);
  EXPECT_EQ(ex.ids[0], t.bos_id());
  EXPECT_EQ(ex.labels[0], kIgnore);
  // The prompt decodes to the template with the system block folded into the first turn.
  std::vector<int32_t> prompt;
  for (size_t i = 0; i < ex.ids.size() && ex.labels[i] == kIgnore; ++i) prompt.push_back(ex.ids[i]);
  // Meta strips the combined system + user string, so the user's leading spaces stay inside.
  EXPECT_EQ(t.decode(prompt), "[INST] <<SYS>>\nBe kind\n<</SYS>>\n\n  What is a llama? [/INST]");
}

TEST(Masking, TextFormatLiteralBosEosBecomeIdsNeverDoubled) {
  const Tokenizer& t = tokenizer();
  const std::string body = "[INST] hello there [/INST] a model learns </s><s>[INST] why [/INST] data </s>";
  Example with = format_text(t, "<s>" + body, false);
  Example without = format_text(t, body, false);
  Example doubled = format_text(t, "<s><s>" + body, false);
  EXPECT_EQ(with.ids, without.ids);  // BOS added when missing, not doubled when present
  EXPECT_EQ(with.ids, doubled.ids);
  EXPECT_EQ(with.labels, without.labels);
  // Same as the chat template of the same turns.
  Example chat = format_chat(t, "", {{"hello there", "a model learns"}, {"why", "data"}}, false);
  EXPECT_EQ(with.ids, chat.ids);
  EXPECT_EQ(with.labels, chat.labels);
  // Pieces of "<s>" / "</s>" never appear.
  auto lt = t.encode("<s>");
  EXPECT_EQ(std::search(with.ids.begin(), with.ids.end(), lt.begin(), lt.end()), with.ids.end());
  // Plain text (no [/INST]): completion training on every position but the first.
  Example plain = format_text(t, "just some text</s>", false);
  EXPECT_EQ(plain.ids.front(), t.bos_id());
  EXPECT_EQ(plain.ids.back(), t.eos_id());
  EXPECT_EQ(plain.trained_tokens(), static_cast<int64_t>(plain.ids.size()) - 1);
}

TEST(Masking, GuanacoParsing) {
  auto turns = parse_guanaco(" ### Human: hi there### Assistant: hello ### Human: q2\n### Assistant: a2");
  ASSERT_EQ(turns.size(), 2u);
  EXPECT_EQ(turns[0].user, "hi there");
  EXPECT_EQ(turns[0].assistant, "hello");
  EXPECT_EQ(turns[1].user, "q2");
  EXPECT_EQ(turns[1].assistant, "a2");
  EXPECT_THROW_MSG(parse_guanaco("### Assistant: x"), "must start with \"### Human:\"");
  EXPECT_THROW_MSG(parse_guanaco("### Human: a### Human: b### Assistant: c"), "alternation");
  EXPECT_THROW_MSG(parse_guanaco("### Human: a### Assistant: b### Human: c"), "no \"### Assistant:\" answer");
}

// Truncation exactly at the answer boundary: max_seq_len = prompt length leaves no answer (dropped, and
// as the only record an error); one more token keeps exactly the answer's first piece.
TEST(Truncation, AtTheAnswerBoundary) {
  for (const char* name : {"messages", "alpaca", "guanaco", "text"}) {
    SCOPED_TRACE(name);
    const auto& set = reference()["sets"][name];
    auto labels = ints(set["examples"][0]["labels"]);
    auto ids = ints(set["examples"][0]["ids"]);
    int64_t P = std::find_if(labels.begin(), labels.end(), [](int32_t l) { return l != kIgnore; }) - labels.begin();
    ASSERT_GT(P, 2);
    std::string one = write_temp("one.jsonl", lines_of(set["file"])[0] + "\n");
    DataConfig cfg = config(format_of(set["format"]), P);
    cfg.system_prompt = set["system_prompt"];
    const std::string limit = fmt::format("max_seq_len = {}", P);
    EXPECT_THROW_MSG(Dataset::load(cfg, tokenizer(), one), "every usable example is too long", limit.c_str(),
                     one.c_str());
    cfg.max_seq_len = P + 1;
    Dataset d = Dataset::load(cfg, tokenizer(), one);
    ASSERT_EQ(d.size(), 1);
    EXPECT_EQ(d.at(0).ids, std::vector<int32_t>(ids.begin(), ids.begin() + P + 1));
    EXPECT_EQ(d.at(0).trained_tokens(), 1);
    EXPECT_EQ(d.at(0).labels.back(), ids[P]);
    EXPECT_EQ(d.stats().truncated, 1);
    // train_on_prompt keeps it even at P tokens.
    cfg.max_seq_len = P;
    cfg.train_on_prompt = true;
    EXPECT_EQ(Dataset::load(cfg, tokenizer(), one).at(0).trained_tokens(), P - 1);
  }
}

TEST(Truncation, TooLongOnesAreDroppedAndCounted) {
  const auto& set = reference()["sets"]["messages"];
  // Keep examples whose first answer token fits within L; drop the rest.
  const int64_t L = 40;
  int64_t expect_kept = 0, expect_trunc = 0;
  for (const auto& e : set["examples"]) {
    auto labels = ints(e["labels"]);
    int64_t P = std::find_if(labels.begin(), labels.end(), [](int32_t l) { return l != kIgnore; }) - labels.begin();
    if (P < L) ++expect_kept, expect_trunc += static_cast<int64_t>(labels.size()) > L;
  }
  ASSERT_GT(expect_kept, 0);
  ASSERT_LT(expect_kept, static_cast<int64_t>(set["examples"].size()));
  DataConfig cfg = config(DataFormat::Messages, L);
  cfg.system_prompt = set["system_prompt"];
  Dataset d = Dataset::load(cfg, tokenizer(), set["file"]);
  EXPECT_EQ(d.size(), expect_kept);
  EXPECT_EQ(d.stats().too_long, static_cast<int64_t>(set["examples"].size()) - expect_kept);
  EXPECT_EQ(d.stats().truncated, expect_trunc);
  for (const auto& ex : d.examples()) EXPECT_LE(static_cast<int64_t>(ex.ids.size()), L);
  EXPECT_NE(describe(d.stats(), "train").find("too long"), std::string::npos);
}

// ---- bad input ------------------------------------------------------------------------------------

const char* kGood = R"({"text": "<s>[INST] hi [/INST] hello </s>"})";

TEST(BadInput, MalformedLineNamesFileAndLineAndCanBeSkipped) {
  std::string f = write_temp("bad.jsonl", std::string(kGood) + "\n\n{\"text\": \"unterminated\n" + kGood + "\n");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), f), f.c_str(), "line 3", "invalid JSON", "skip_bad_records");
  DataConfig cfg = config();
  cfg.skip_bad_records = true;
  Dataset d = Dataset::load(cfg, tokenizer(), f);
  EXPECT_EQ(d.size(), 2);
  EXPECT_EQ(d.stats().skipped, 1);
  EXPECT_EQ(d.stats().records, 3);
  EXPECT_NE(describe(d.stats(), "train").find("1 bad records skipped"), std::string::npos);
}

TEST(BadInput, EmptyDataset) {
  std::string f = write_temp("empty.jsonl", "");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), f), f.c_str(), "no records");
  std::string blank = write_temp("blank.jsonl", "\n  \n\n");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), blank), blank.c_str(), "no records");
  std::string arr = write_temp("empty.json", " []");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), arr), arr.c_str(), "no records");
  // Every record bad and skipped: nothing usable.
  std::string bad = write_temp("allbad.jsonl", "{\n[\n");
  DataConfig cfg = config();
  cfg.skip_bad_records = true;
  EXPECT_THROW_MSG(Dataset::load(cfg, tokenizer(), bad), bad.c_str(), "no usable records", "2 of 2");
}

TEST(BadInput, MissingOrMistypedFields) {
  struct Case { DataFormat f; const char* line; const char* msg; };
  std::vector<Case> cases = {
      {DataFormat::Alpaca, R"({"instruction": "x"})", "missing field \"output\""},
      {DataFormat::Alpaca, R"({"instruction": "x", "output": 3})", "field \"output\" must be a string, got number"},
      {DataFormat::Text, R"({"prompt": "x"})", "missing field \"text\""},
      {DataFormat::Guanaco, R"({"text": "### Assistant: x"})", "must start with \"### Human:\""},
      {DataFormat::Messages, R"({"messages": "hi"})", "\"messages\" must be an array"},
      {DataFormat::Messages, R"({"messages": [{"role": "user"}]})", "messages[0]: missing string field \"content\""},
      {DataFormat::Messages, R"({"messages": [{"role": "user", "content": "q"}]})", "ends with a user message"},
      {DataFormat::Messages, R"({"messages": [{"role": "assistant", "content": "a"}]})", "expected role \"user\""},
      {DataFormat::Messages, R"({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]})",
       "unknown role \"bot\""},
      {DataFormat::Messages, R"({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]})",
       "may only come first"},
      {DataFormat::Messages, R"({"messages": []})", "no user/assistant turn"},
      {DataFormat::Text, R"({"text": "<s>[INST] q [/INST]"})", "no answer to train on"},
      {DataFormat::Auto, R"(["not", "an object"])", "must be a JSON object"},
  };
  // A good first line in each format, so the error must name line 2.
  auto good = [](DataFormat f) -> std::string {
    switch (f) {
      case DataFormat::Alpaca: return R"({"instruction": "i", "output": "o"})";
      case DataFormat::Guanaco: return R"({"text": "### Human: q### Assistant: a"})";
      case DataFormat::Messages:
        return R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})";
      default: return kGood;
    }
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.line);
    std::string f = write_temp("fields.jsonl", good(c.f) + "\n" + c.line + "\n");
    DataConfig cfg = config(c.f);
    EXPECT_THROW_MSG(Dataset::load(cfg, tokenizer(), f), f.c_str(), "line 2", c.msg);
  }
}

TEST(BadInput, UnknownFormat) {
  std::string f = write_temp("unknown.jsonl", R"({"prompt": "x", "completion": "y"})");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), f), f.c_str(), "line 1", "cannot detect the record format",
                   "\"prompt\"", "\"completion\"", "data.format");
  std::string csv = write_temp("data.csv", "text\nhello\n");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), csv), csv.c_str(), "unsupported extension '.csv'");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), "/nonexistent/train.jsonl"), "/nonexistent/train.jsonl",
                   "does not exist");
}

TEST(BadInput, JsonArrayErrorsNameTheRecord) {
  std::string f = write_temp("arr.json", std::string("[") + kGood + ",\n {\"foo\": 1}]");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), f), f.c_str(), "record 1", "cannot detect");
  std::string broken = write_temp("broken.json", std::string("[") + kGood + ",\n {\"foo\": ]");
  EXPECT_THROW_MSG(Dataset::load(config(), tokenizer(), broken), broken.c_str(), "line 2", "invalid JSON");
  // A ".json" file holding JSONL is read as JSONL.
  std::string jl = write_temp("lines.json", std::string(kGood) + "\n" + kGood + "\n");
  EXPECT_EQ(Dataset::load(config(), tokenizer(), jl).size(), 2);
}

TEST(BadInput, EveryExampleTooLong) {
  const auto& set = reference()["sets"]["guanaco"];
  DataConfig cfg = config(DataFormat::Guanaco, 4);
  EXPECT_THROW_MSG(Dataset::load(cfg, tokenizer(), set["file"]), "every usable example is too long",
                   "8 of 8 records", "max_seq_len = 4");
}

}  // namespace
}  // namespace qlora::data
