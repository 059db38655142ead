// Inference: a model (plain, merged, or a bitsandbytes 4-bit checkpoint) with an optional PEFT adapter,
// its tokenizer, and autoregressive decoding with a KV cache.
//
// Decoding semantics follow transformers' generate(): the prompt is run once (prefill) into the cache,
// then one token per step; greedy = argmax of the last position's logits (first index on ties, as
// torch.argmax); sampling applies temperature, then top-k, then top-p (HF's order and its rule that at
// least one token survives), then draws from the softmax. Generation stops after a stop id (EOS), which
// is included in the returned tokens as transformers does, or after max_new_tokens.
// Logits are compared and sampled in float32 whatever the compute dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "datasets/tokenizer.h"
#include "trainer/config/config.h"
#include "trainer/model/llama.h"

namespace qlora::gen {

struct InferenceOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;      // compute dtype
  std::optional<QuantType> quantize;      // quantize a dense base to 4 bits on load (as QLoRA training does)
  int64_t block_size = 64;
  bool double_quant = true;
};

// Loads `model_dir` for inference (a bitsandbytes 4-bit checkpoint loads as 4-bit without re-quantizing),
// then, when `adapter_dir` is not empty, applies that PEFT LoRA adapter (errors name the file and the
// module whose target or shape does not fit). The model is in eval mode with gradients off.
model::LlamaForCausalLM load_for_inference(const std::filesystem::path& model_dir,
                                           const std::filesystem::path& adapter_dir, const InferenceOptions& opts);

// The tokenizer: `explicit_path` if given, else the first tokenizer.model found in model_dir, then
// adapter_dir. A missing one is an error that lists every place looked at.
data::Tokenizer load_tokenizer(const std::filesystem::path& model_dir, const std::filesystem::path& adapter_dir,
                               const std::string& explicit_path);

struct SamplingOptions {
  int64_t max_new_tokens = 256;
  double temperature = 0.0;        // 0 = greedy (top_k / top_p then unused)
  int64_t top_k = 0;               // 0 = off
  double top_p = 1.0;              // 1 = off; in (0, 1]
  uint64_t seed = 0;               // for sampling
  std::vector<int64_t> stop_ids;   // e.g. EOS; generation ends after emitting one
};

// Throws qlora::Error naming the option when a value is out of range.
void validate(const SamplingOptions& o);

// The next token from `logits` [V] (any float dtype; used in float32).
int64_t pick_next(const at::Tensor& logits, const SamplingOptions& o, at::Generator& gen);

// Generates from `prompt` (token ids, non-empty). on_token is called for each new token as it is chosen
// (the stop id included). Returns the new tokens.
std::vector<int32_t> generate(model::LlamaForCausalLMImpl& model, const std::vector<int32_t>& prompt,
                              const SamplingOptions& o, const std::function<void(int32_t)>& on_token = {});

// Turns a growing token sequence into text pieces to print as they come: each push() returns the text
// that the new token added. Decodes the whole sequence each time (SentencePiece's leading-space and
// byte-fallback rules depend on context) and holds back a trailing incomplete UTF-8 character.
class TextStream {
 public:
  explicit TextStream(const data::Tokenizer& tok) : tok_(&tok) {}
  std::string push(int32_t id);
  // Whatever was held back (call at the end).
  std::string flush();

 private:
  const data::Tokenizer* tok_;
  std::vector<int32_t> ids_;
  size_t printed_ = 0;  // bytes of the decoded text already returned
};

// Strips ASCII whitespace at both ends (what exact-match compares).
std::string strip(const std::string& s);

}  // namespace qlora::gen
