// SentencePiece wrapper: see tokenizer.h.
#include "datasets/tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>

#include "trainer/core/error.h"

namespace qlora::data {

Tokenizer Tokenizer::load(const std::string& path) {
  QLORA_REQUIRE(std::filesystem::is_regular_file(path),
                "tokenizer: '{}' does not exist or is not a file (expected a SentencePiece tokenizer.model)",
                path);
  auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
  auto st = sp->Load(path);
  QLORA_REQUIRE(st.ok(), "tokenizer: cannot load SentencePiece model '{}': {}", path, st.ToString());
  Tokenizer t;
  t.sp_ = std::move(sp);
  t.init(path);
  return t;
}

Tokenizer Tokenizer::from_bytes(const std::string& model_bytes, const std::string& origin) {
  auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
  auto st = sp->LoadFromSerializedProto(model_bytes);
  QLORA_REQUIRE(st.ok(), "tokenizer: cannot load SentencePiece model '{}': {}", origin, st.ToString());
  Tokenizer t;
  t.sp_ = std::move(sp);
  t.init(origin);
  return t;
}

void Tokenizer::init(const std::string& origin) {
  origin_ = origin;
  vocab_ = sp_->GetPieceSize();
  bos_ = sp_->bos_id();
  eos_ = sp_->eos_id();
  pad_ = sp_->pad_id();
  unk_ = sp_->unk_id();
  // The chat template inserts BOS/EOS as ids; a model without them cannot express a turn boundary.
  QLORA_REQUIRE(bos_ >= 0 && bos_ < vocab_ && eos_ >= 0 && eos_ < vocab_,
                "tokenizer '{}': the model defines no BOS/EOS ids (bos={}, eos={}); Llama's has 1 and 2",
                origin, bos_, eos_);
  if (pad_ >= vocab_) pad_ = -1;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  auto st = sp_->Encode(text, &ids);
  QLORA_REQUIRE(st.ok(), "tokenizer '{}': cannot encode text: {}", origin_, st.ToString());
  return {ids.begin(), ids.end()};
}

std::vector<TokenSpan> Tokenizer::encode_spans(std::string_view text) const {
  sentencepiece::ImmutableSentencePieceText spt;
  auto st = sp_->Encode(text, spt.mutable_proto());
  QLORA_REQUIRE(st.ok(), "tokenizer '{}': cannot encode text: {}", origin_, st.ToString());
  std::vector<TokenSpan> out;
  out.reserve(spt.pieces_size());
  for (size_t i = 0; i < spt.pieces_size(); ++i) {
    auto p = spt.pieces(static_cast<int>(i));
    out.push_back({static_cast<int32_t>(p.id()), p.begin(), p.end()});
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<int> v;
  v.reserve(ids.size());
  for (int32_t id : ids) {
    QLORA_REQUIRE(id >= 0 && id < vocab_, "tokenizer '{}': id {} out of range [0, {})", origin_, id, vocab_);
    v.push_back(id);
  }
  std::string out;
  auto st = sp_->Decode(v, &out);
  QLORA_REQUIRE(st.ok(), "tokenizer '{}': cannot decode: {}", origin_, st.ToString());
  return out;
}

std::string Tokenizer::piece(int32_t id) const {
  QLORA_REQUIRE(id >= 0 && id < vocab_, "tokenizer '{}': id {} out of range [0, {})", origin_, id, vocab_);
  return sp_->IdToPiece(id);
}

}  // namespace qlora::data
