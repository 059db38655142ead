// Tokenizer: a SentencePiece model (Llama's tokenizer.model) behind a small value-type interface.
//
// encode() never adds BOS/EOS: callers insert bos_id()/eos_id() as ids (INTEROP.md section 4), so a
// literal "<s>" in text is never tokenized into pieces by accident of the template code.
// Ids are int32 in [0, vocab_size). pad_id() is -1 when the model has none (Llama's case).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace qlora::data {

// One piece of an encoding and the byte range [begin, end) of the input text it covers.
struct TokenSpan {
  int32_t id;
  uint32_t begin;
  uint32_t end;
};

class Tokenizer {
 public:
  // Loads a SentencePiece model file; the error names the file. Requires BOS and EOS ids.
  static Tokenizer load(const std::string& path);
  // The same from the serialized model bytes; `origin` names it in errors.
  static Tokenizer from_bytes(const std::string& model_bytes, const std::string& origin);

  // Text -> ids, exactly as sentencepiece's Python encode(text) (no BOS/EOS).
  std::vector<int32_t> encode(std::string_view text) const;
  // The same with each piece's byte span in `text` (used to place answer boundaries exactly).
  std::vector<TokenSpan> encode_spans(std::string_view text) const;
  // Ids -> text. Control ids (BOS/EOS) decode to nothing, as in sentencepiece.
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  int32_t pad_id() const { return pad_; }  // -1: none
  int32_t unk_id() const { return unk_; }
  int64_t vocab_size() const { return vocab_; }
  // The piece string of an id ("▁the", "<0x0A>", "<s>"); throws on an id out of range.
  std::string piece(int32_t id) const;
  const std::string& origin() const { return origin_; }

 private:
  Tokenizer() = default;
  void init(const std::string& origin);

  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;  // immutable once loaded: shareable
  std::string origin_;
  int32_t bos_ = -1, eos_ = -1, pad_ = -1, unk_ = -1;
  int64_t vocab_ = 0;
};

}  // namespace qlora::data
