// The Llama-2 chat template (Meta's llama repo, generation.py chat_completion) and label masking.
//
// A dialogue of completed turns becomes, per turn,
//   BOS + encode("[INST] " + strip(user) + " [/INST] " + strip(answer) + " ") + EOS
// where the first user turn carries the system prompt: strip("<<SYS>>\n" + system + "\n<</SYS>>\n\n" +
// user) (Meta strips the combined string). Each turn is tokenized as one string, exactly as Meta does.
//
// Labels (aligned with ids; the model shifts them): the loss covers every piece whose bytes start at or
// after the space that follows "[/INST]" (so the answer's first piece "▁word" and the trailing "▁" are
// included), plus the turn's EOS. SentencePiece never merges across that space, so these pieces are
// exactly the answer's tokens (the fixture checks this against a prefix-tokenization reference).
// Position 0 never carries loss (nothing predicts it), with or without train_on_prompt.
// kIgnore (-100) marks positions without loss, as in PyTorch's cross_entropy ignore_index.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "datasets/tokenizer.h"

namespace qlora::data {

inline constexpr int32_t kIgnore = -100;

// One tokenized training sequence. Invariant: ids.size() == labels.size(); labels[i] is kIgnore or
// ids[i]. segment_starts lists where each packed example begins ({0} when not packed).
struct Example {
  std::vector<int32_t> ids;             // [T]
  std::vector<int32_t> labels;          // [T], kIgnore where there is no loss
  std::vector<int32_t> segment_starts;  // [examples in this row], ascending, first is 0
  int64_t trained_tokens() const;
};

struct Turn {
  std::string user, assistant;
};

// A dialogue of completed turns -> ids/labels. `system` "" means no system block. With
// train_on_prompt every position but the first carries loss.
Example format_chat(const Tokenizer& tok, const std::string& system, const std::vector<Turn>& turns,
                    bool train_on_prompt);

// The prompt for generation: the completed `history` turns, then BOS + encode("[INST] {user} [/INST]").
std::vector<int32_t> chat_prompt(const Tokenizer& tok, const std::string& system,
                                 const std::vector<Turn>& history, const std::string& user);

// A pre-formatted Llama-2 "text" field (mlabonne/guanaco-llama2-1k). Literal "<s>" / "</s>" become the
// BOS / EOS ids, never pieces; the text between them is encoded as is (whitespace-only stretches between
// them are dropped), a BOS is prepended only if the text does not already start with one, and
// adjacent "<s>"s collapse into one BOS.
// Answers: after each "[/INST]", from the following space up to the next "[INST]", "<s>" or "</s>"; an
// EOS that closes an answer carries loss. A text with no "[/INST]" at all is plain text: every
// position but the first carries loss (completion training).
Example format_text(const Tokenizer& tok, const std::string& text, bool train_on_prompt);

// "### Human: q### Assistant: a### Human: ..." (timdettmers/openassistant-guanaco) -> turns.
// Throws qlora::Error (no location: the caller adds it) unless it starts with "### Human:", alternates,
// and ends with an answer.
std::vector<Turn> parse_guanaco(const std::string& text);

}  // namespace qlora::data
