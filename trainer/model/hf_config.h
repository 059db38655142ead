// The architecture of a Hugging Face Llama checkpoint, read from its config.json.
//
// Accepts both spellings transformers has used: rope_theta / rope_scaling at the top level
// (transformers 4) or inside "rope_parameters" (transformers 5), and torch_dtype / dtype.
// num_key_value_heads absent means multi-head attention (= num_attention_heads).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>

#include <nlohmann/json_fwd.hpp>

namespace qlora::model {

enum class RopeType { Default, Linear, Dynamic, Llama3 };

struct RopeConfig {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  double factor = 1.0;                       // linear, dynamic, llama3
  double low_freq_factor = 1.0;              // llama3
  double high_freq_factor = 4.0;             // llama3
  int64_t original_max_position_embeddings = 0;  // llama3
};

// bitsandbytes "quantization_config" of a pre-quantized checkpoint (absent for ordinary ones).
struct BnbQuantConfig {
  std::string quant_type = "nf4";   // nf4 | fp4
  bool double_quant = false;
  std::string compute_dtype = "float32";
};

struct LlamaArch {
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;              // hidden_size / num_heads unless config.json says otherwise
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  std::string dtype = "float32";     // the dtype the weights were saved in (torch_dtype / dtype)
  std::optional<BnbQuantConfig> quantization;

  // Parameter counts (weights only; Llama has no biases).
  int64_t embedding_params() const { return vocab_size * hidden_size; }
  int64_t projection_params_per_layer() const;  // q, k, v, o, gate, up, down
  int64_t norm_params() const { return (2 * num_layers + 1) * hidden_size; }
  int64_t lm_head_params() const { return tie_word_embeddings ? 0 : vocab_size * hidden_size; }
  int64_t total_params() const;
};

// [out, in] of a projection kind ("q_proj", ..., "down_proj").
std::pair<int64_t, int64_t> projection_shape(const LlamaArch& arch, const std::string& kind);
// The seven projection kinds in layer order.
extern const char* const kProjectionKinds[7];

// Parses config.json text; `origin` names the file in errors.
LlamaArch parse_llama_config(const nlohmann::json& j, const std::string& origin);
// Reads <model_dir>/config.json.
LlamaArch load_llama_config(const std::filesystem::path& model_dir);
// The inverse of parse (transformers 5 spelling), for exported checkpoints.
nlohmann::json to_hf_json(const LlamaArch& arch);

std::string to_string(RopeType t);

}  // namespace qlora::model
