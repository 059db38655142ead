// Tokenizer against Python sentencepiece on the fixture's model: ids, decode, pieces, special ids, errors.
#include <gtest/gtest.h>

#include "datasets/tokenizer.h"
#include "tests/data/data_fixtures.h"

namespace qlora::data {
namespace {

using test::fixture;
using test::tokenizer;

nlohmann::json cases() {
  std::ifstream in(fixture("tokenizer_cases.json"));
  return nlohmann::json::parse(in);
}

TEST(Tokenizer, SpecialIdsLikeLlama) {
  const Tokenizer& t = tokenizer();
  EXPECT_EQ(t.vocab_size(), cases()["vocab_size"].get<int64_t>());
  EXPECT_EQ(t.unk_id(), 0);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.pad_id(), -1);
}

TEST(Tokenizer, EncodeDecodeMatchPythonSentencepiece) {
  const Tokenizer& t = tokenizer();
  auto c = cases();
  ASSERT_GT(c["cases"].size(), 20u);
  for (const auto& k : c["cases"]) {
    std::string text = k["text"];
    std::vector<int32_t> ids = t.encode(text);
    EXPECT_EQ(ids, test::ints(k["ids"])) << "text: " << text;
    EXPECT_EQ(t.decode(ids), k["decoded"].get<std::string>()) << "text: " << text;
    // The spans give the same ids and cover the text in order.
    auto spans = t.encode_spans(text);
    ASSERT_EQ(spans.size(), ids.size());
    for (size_t i = 0; i < spans.size(); ++i) {
      EXPECT_EQ(spans[i].id, ids[i]);
      EXPECT_LE(spans[i].end, text.size());
      if (i > 0) {
        EXPECT_GE(spans[i].begin, spans[i - 1].begin);
      }
    }
  }
}

TEST(Tokenizer, PiecesMatchAndBosEosAreNotText) {
  const Tokenizer& t = tokenizer();
  auto pieces = cases()["pieces"];
  ASSERT_EQ(static_cast<int64_t>(pieces.size()), t.vocab_size());
  for (int32_t i = 0; i < t.vocab_size(); ++i) EXPECT_EQ(t.piece(i), pieces[i].get<std::string>()) << i;
  // A literal "<s>" is text, not the control id.
  for (int32_t id : t.encode("<s>")) EXPECT_NE(id, t.bos_id());
  EXPECT_THROW_MSG(t.piece(static_cast<int32_t>(t.vocab_size())), "out of range");
  EXPECT_THROW_MSG(t.decode({-1}), "out of range");
}

TEST(Tokenizer, LoadErrorsNameTheFile) {
  EXPECT_THROW_MSG(Tokenizer::load("/nonexistent/tokenizer.model"), "/nonexistent/tokenizer.model", "does not exist");
  std::string junk = test::write_temp("tokenizer.model", "this is not a protobuf");
  EXPECT_THROW_MSG(Tokenizer::load(junk), junk.c_str(), "cannot load SentencePiece model");
}

}  // namespace
}  // namespace qlora::data
