#include "trainer/generate/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <limits>

#include "trainer/core/error.h"
#include "trainer/lora/peft.h"
#include "trainer/model/loader.h"

namespace qlora::gen {

namespace fs = std::filesystem;

model::LlamaForCausalLM load_for_inference(const fs::path& model_dir, const fs::path& adapter_dir,
                                           const InferenceOptions& opts) {
  QLORA_REQUIRE(fs::is_directory(model_dir), "model directory '{}' does not exist", model_dir.string());
  model::LlamaArch arch = model::load_llama_config(model_dir);
  model::LoadOptions lo;
  lo.device = opts.device;
  lo.dtype = opts.dtype;
  // A bitsandbytes checkpoint is 4-bit already and loads as it is stored.
  lo.quantize = arch.quantization.has_value() || opts.quantize.has_value();
  lo.quant_type = opts.quantize.value_or(QuantType::NF4);
  lo.block_size = opts.block_size;
  lo.double_quant = opts.double_quant;
  model::LlamaForCausalLM m = model::load_llama(model_dir, lo);
  if (!adapter_dir.empty()) {
    QLORA_REQUIRE(fs::is_directory(adapter_dir), "adapter directory '{}' does not exist", adapter_dir.string());
    lora::load_peft_adapter(*m, adapter_dir);
  }
  m->eval();
  for (auto& p : m->parameters()) p.requires_grad_(false);
  return m;
}

data::Tokenizer load_tokenizer(const fs::path& model_dir, const fs::path& adapter_dir,
                               const std::string& explicit_path) {
  if (!explicit_path.empty()) {
    QLORA_REQUIRE(fs::is_regular_file(explicit_path), "tokenizer '{}' (--tokenizer) does not exist", explicit_path);
    return data::Tokenizer::load(explicit_path);
  }
  std::vector<std::string> tried;
  for (const fs::path& d : {model_dir, adapter_dir}) {
    if (d.empty()) continue;
    fs::path p = d / "tokenizer.model";
    if (fs::is_regular_file(p)) return data::Tokenizer::load(p.string());
    tried.push_back(p.string());
  }
  fail("no tokenizer found: {} does not exist (pass --tokenizer FILE with the base model's SentencePiece "
       "tokenizer.model)", fmt::join(tried, " nor "));
}

void validate(const SamplingOptions& o) {
  QLORA_REQUIRE(o.max_new_tokens >= 1, "--max-new-tokens must be at least 1, got {}", o.max_new_tokens);
  QLORA_REQUIRE(o.temperature >= 0.0, "--temperature must be >= 0 (0 = greedy), got {}", o.temperature);
  QLORA_REQUIRE(o.top_k >= 0, "--top-k must be >= 0 (0 = off), got {}", o.top_k);
  QLORA_REQUIRE(o.top_p > 0.0 && o.top_p <= 1.0, "--top-p must be in (0, 1], got {}", o.top_p);
}

int64_t pick_next(const at::Tensor& logits, const SamplingOptions& o, at::Generator& gen) {
  at::Tensor l = logits.detach().to(at::kCPU, at::kFloat).flatten();
  if (o.temperature <= 0.0) return l.argmax().item<int64_t>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  l = l / o.temperature;
  const int64_t v = l.size(0);
  if (o.top_k > 0 && o.top_k < v) {
    at::Tensor kth = std::get<0>(l.topk(o.top_k)).select(0, o.top_k - 1);
    l = l.masked_fill(l < kth, neg_inf);
  }
  if (o.top_p < 1.0) {
    // HF's TopPLogitsWarper: drop the smallest tokens whose cumulative probability is <= 1 - top_p,
    // always keeping the most likely one.
    auto [sorted, idx] = l.sort(/*dim=*/0, /*descending=*/false);
    at::Tensor cum = sorted.softmax(0).cumsum(0);
    at::Tensor remove = cum <= (1.0 - o.top_p);
    remove.index_put_({v - 1}, false);
    l = l.scatter(0, idx, sorted.masked_fill(remove, neg_inf));
  }
  at::Tensor probs = l.softmax(0);
  return at::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
}

std::vector<int32_t> generate(model::LlamaForCausalLMImpl& model, const std::vector<int32_t>& prompt,
                              const SamplingOptions& o, const std::function<void(int32_t)>& on_token) {
  validate(o);
  QLORA_REQUIRE(!prompt.empty(), "generate: the prompt has no tokens");
  at::NoGradGuard no_grad;
  const at::Device dev = model.device();
  std::vector<int64_t> p64(prompt.begin(), prompt.end());
  at::Tensor ids = at::tensor(p64, at::kLong).view({1, -1}).to(dev);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  model::KVCache cache;
  std::vector<int32_t> out;
  at::Tensor hidden = model.hidden_states(ids, {}, {}, &cache);  // prefill: [1, P, H]
  while (static_cast<int64_t>(out.size()) < o.max_new_tokens) {
    // Only the last position's logits are needed: [V].
    at::Tensor logits = model.lm_logits(hidden.select(1, hidden.size(1) - 1)).select(0, 0);
    const int64_t next = pick_next(logits, o, gen);
    out.push_back(static_cast<int32_t>(next));
    if (on_token) on_token(static_cast<int32_t>(next));
    if (std::find(o.stop_ids.begin(), o.stop_ids.end(), next) != o.stop_ids.end()) break;
    if (static_cast<int64_t>(out.size()) == o.max_new_tokens) break;
    hidden = model.hidden_states(at::full({1, 1}, next, at::TensorOptions().dtype(at::kLong).device(dev)), {}, {},
                                 &cache);
  }
  return out;
}

std::string TextStream::push(int32_t id) {
  ids_.push_back(id);
  const std::string t = tok_->decode(ids_);
  // A byte-fallback character split over several tokens decodes as U+FFFD until its last byte arrives.
  static const std::string kReplacement = "\xEF\xBF\xBD";
  size_t end = t.size();
  while (end >= printed_ + 3 && t.compare(end - 3, 3, kReplacement) == 0) end -= 3;
  if (end <= printed_) return "";
  std::string piece = t.substr(printed_, end - printed_);
  printed_ = end;
  return piece;
}

std::string TextStream::flush() {
  const std::string t = tok_->decode(ids_);
  std::string rest = t.size() > printed_ ? t.substr(printed_) : "";
  printed_ = t.size();
  return rest;
}

std::string strip(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

}  // namespace qlora::gen
