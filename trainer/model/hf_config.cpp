#include "trainer/model/hf_config.h"

#include <nlohmann/json.hpp>

#include "trainer/core/error.h"
#include "trainer/core/fs.h"

namespace qlora::model {

using nlohmann::json;

namespace {

// Typed field access with errors naming the file and key.
struct Reader {
  const json& j;
  const std::string& origin;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }

  int64_t get_int(const char* key, std::optional<int64_t> def = std::nullopt) const {
    if (!has(key)) {
      QLORA_REQUIRE(def.has_value(), "{}: missing required key '{}'", origin, key);
      return *def;
    }
    const json& v = j.at(key);
    QLORA_REQUIRE(v.is_number_integer(), "{}: '{}' must be an integer, got {}", origin, key, v.dump());
    return v.get<int64_t>();
  }
  double get_num(const char* key, std::optional<double> def = std::nullopt) const {
    if (!has(key)) {
      QLORA_REQUIRE(def.has_value(), "{}: missing required key '{}'", origin, key);
      return *def;
    }
    const json& v = j.at(key);
    QLORA_REQUIRE(v.is_number(), "{}: '{}' must be a number, got {}", origin, key, v.dump());
    return v.get<double>();
  }
  bool get_bool(const char* key, bool def) const {
    if (!has(key)) return def;
    const json& v = j.at(key);
    QLORA_REQUIRE(v.is_boolean(), "{}: '{}' must be true or false, got {}", origin, key, v.dump());
    return v.get<bool>();
  }
  std::string get_str(const char* key, const std::string& def) const {
    if (!has(key)) return def;
    const json& v = j.at(key);
    QLORA_REQUIRE(v.is_string(), "{}: '{}' must be a string, got {}", origin, key, v.dump());
    return v.get<std::string>();
  }
  // eos_token_id may be a list (Llama 3): the first one ends generation.
  int64_t get_token_id(const char* key, int64_t def) const {
    if (!has(key)) return def;
    const json& v = j.at(key);
    if (v.is_array() && !v.empty() && v[0].is_number_integer()) return v[0].get<int64_t>();
    QLORA_REQUIRE(v.is_number_integer(), "{}: '{}' must be a token id, got {}", origin, key, v.dump());
    return v.get<int64_t>();
  }
};

RopeConfig parse_rope(const json& j, const std::string& origin) {
  RopeConfig r;
  Reader top{j, origin};
  // transformers 5: everything in rope_parameters; transformers 4: rope_theta + rope_scaling.
  const json* scaling = nullptr;
  if (top.has("rope_parameters")) {
    QLORA_REQUIRE(j.at("rope_parameters").is_object(), "{}: 'rope_parameters' must be an object", origin);
    scaling = &j.at("rope_parameters");
  } else if (top.has("rope_scaling")) {
    QLORA_REQUIRE(j.at("rope_scaling").is_object(), "{}: 'rope_scaling' must be an object", origin);
    scaling = &j.at("rope_scaling");
  }
  r.theta = top.get_num("rope_theta", 10000.0);
  if (!scaling) return r;
  Reader s{*scaling, origin};
  r.theta = s.get_num("rope_theta", r.theta);
  // "type" is the transformers 4.3x spelling of "rope_type".
  std::string type = s.get_str("rope_type", s.get_str("type", "default"));
  if (type == "default") {
    r.type = RopeType::Default;
  } else if (type == "linear") {
    r.type = RopeType::Linear;
  } else if (type == "dynamic") {
    r.type = RopeType::Dynamic;
  } else if (type == "llama3") {
    r.type = RopeType::Llama3;
  } else {
    fail("{}: rope type '{}' is not supported (expected default, linear, dynamic or llama3)", origin, type);
  }
  if (r.type != RopeType::Default) {
    r.factor = s.get_num("factor");
    QLORA_REQUIRE(r.factor >= 1.0, "{}: rope 'factor' must be >= 1, got {}", origin, r.factor);
  }
  if (r.type == RopeType::Llama3) {
    r.low_freq_factor = s.get_num("low_freq_factor");
    r.high_freq_factor = s.get_num("high_freq_factor");
    r.original_max_position_embeddings = s.get_int("original_max_position_embeddings");
    QLORA_REQUIRE(r.high_freq_factor > r.low_freq_factor,
                  "{}: llama3 rope needs high_freq_factor > low_freq_factor", origin);
  }
  QLORA_REQUIRE(r.theta > 0, "{}: rope_theta must be > 0, got {}", origin, r.theta);
  return r;
}

}  // namespace

const char* const kProjectionKinds[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

std::pair<int64_t, int64_t> projection_shape(const LlamaArch& a, const std::string& kind) {
  const int64_t q = a.num_heads * a.head_dim, kv = a.num_kv_heads * a.head_dim;
  if (kind == "q_proj") return {q, a.hidden_size};
  if (kind == "k_proj" || kind == "v_proj") return {kv, a.hidden_size};
  if (kind == "o_proj") return {a.hidden_size, q};
  if (kind == "gate_proj" || kind == "up_proj") return {a.intermediate_size, a.hidden_size};
  if (kind == "down_proj") return {a.hidden_size, a.intermediate_size};
  fail("unknown projection '{}' (expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)", kind);
}

int64_t LlamaArch::projection_params_per_layer() const {
  int64_t q = hidden_size * num_heads * head_dim;
  int64_t kv = 2 * hidden_size * num_kv_heads * head_dim;
  int64_t o = num_heads * head_dim * hidden_size;
  int64_t mlp = 3 * hidden_size * intermediate_size;
  return q + kv + o + mlp;
}

int64_t LlamaArch::total_params() const {
  return embedding_params() + num_layers * projection_params_per_layer() + norm_params() + lm_head_params();
}

LlamaArch parse_llama_config(const json& j, const std::string& origin) {
  QLORA_REQUIRE(j.is_object(), "{}: expected a JSON object", origin);
  Reader r{j, origin};
  std::string model_type = r.get_str("model_type", "llama");
  QLORA_REQUIRE(model_type == "llama" || model_type == "mistral",
                "{}: model_type '{}' is not a Llama-family model (expected 'llama')", origin, model_type);
  LlamaArch a;
  a.hidden_size = r.get_int("hidden_size");
  a.intermediate_size = r.get_int("intermediate_size");
  a.num_layers = r.get_int("num_hidden_layers");
  a.num_heads = r.get_int("num_attention_heads");
  a.num_kv_heads = r.get_int("num_key_value_heads", a.num_heads);
  a.vocab_size = r.get_int("vocab_size");
  a.max_position_embeddings = r.get_int("max_position_embeddings", 2048);
  a.rms_norm_eps = r.get_num("rms_norm_eps", 1e-6);
  a.tie_word_embeddings = r.get_bool("tie_word_embeddings", false);
  a.bos_token_id = r.get_token_id("bos_token_id", 1);
  a.eos_token_id = r.get_token_id("eos_token_id", 2);
  a.dtype = r.get_str("dtype", r.get_str("torch_dtype", "float32"));
  QLORA_REQUIRE(a.hidden_size > 0 && a.intermediate_size > 0 && a.num_layers > 0 && a.num_heads > 0 &&
                    a.num_kv_heads > 0 && a.vocab_size > 0,
                "{}: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                "num_key_value_heads and vocab_size must all be positive",
                origin);
  QLORA_REQUIRE(a.num_heads % a.num_kv_heads == 0,
                "{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", origin,
                a.num_heads, a.num_kv_heads);
  if (r.has("head_dim")) {
    a.head_dim = r.get_int("head_dim");
  } else {
    QLORA_REQUIRE(a.hidden_size % a.num_heads == 0,
                  "{}: hidden_size ({}) must be a multiple of num_attention_heads ({}) when head_dim is absent",
                  origin, a.hidden_size, a.num_heads);
    a.head_dim = a.hidden_size / a.num_heads;
  }
  QLORA_REQUIRE(a.head_dim > 0 && a.head_dim % 2 == 0, "{}: head_dim must be positive and even, got {}",
                origin, a.head_dim);
  QLORA_REQUIRE(!r.get_bool("attention_bias", false) && !r.get_bool("mlp_bias", false),
                "{}: attention_bias / mlp_bias are not supported (Llama has no biases)", origin);
  std::string act = r.get_str("hidden_act", "silu");
  QLORA_REQUIRE(act == "silu", "{}: hidden_act '{}' is not supported (expected silu)", origin, act);
  a.rope = parse_rope(j, origin);
  if (r.has("quantization_config")) {
    const json& q = j.at("quantization_config");
    Reader qr{q, origin};
    std::string method = qr.get_str("quant_method", "");
    QLORA_REQUIRE(method == "bitsandbytes", "{}: quantization_config.quant_method '{}' is not supported "
                  "(expected bitsandbytes)", origin, method);
    QLORA_REQUIRE(qr.get_bool("load_in_4bit", false), "{}: only 4-bit bitsandbytes checkpoints are supported "
                  "(quantization_config.load_in_4bit is not true)", origin);
    BnbQuantConfig b;
    b.quant_type = qr.get_str("bnb_4bit_quant_type", "fp4");
    QLORA_REQUIRE(b.quant_type == "nf4" || b.quant_type == "fp4",
                  "{}: bnb_4bit_quant_type '{}' (expected nf4 or fp4)", origin, b.quant_type);
    b.double_quant = qr.get_bool("bnb_4bit_use_double_quant", false);
    b.compute_dtype = qr.get_str("bnb_4bit_compute_dtype", "float32");
    a.quantization = b;
  }
  return a;
}

LlamaArch load_llama_config(const std::filesystem::path& model_dir) {
  QLORA_REQUIRE(fs::is_directory(model_dir), "model directory {} does not exist", model_dir.string());
  fs::path p = model_dir / "config.json";
  QLORA_REQUIRE(fs::exists(p), "{}: no config.json (is this a Hugging Face model directory?)", model_dir.string());
  json j;
  try {
    j = json::parse(read_file(p));
  } catch (const json::parse_error& e) {
    fail("{}: invalid JSON: {}", p.string(), e.what());
  }
  return parse_llama_config(j, p.string());
}

std::string to_string(RopeType t) {
  switch (t) {
    case RopeType::Default: return "default";
    case RopeType::Linear: return "linear";
    case RopeType::Dynamic: return "dynamic";
    case RopeType::Llama3: return "llama3";
  }
  return "?";
}

json to_hf_json(const LlamaArch& a) {
  json rope = {{"rope_type", to_string(a.rope.type)}, {"rope_theta", a.rope.theta}};
  if (a.rope.type != RopeType::Default) rope["factor"] = a.rope.factor;
  if (a.rope.type == RopeType::Llama3) {
    rope["low_freq_factor"] = a.rope.low_freq_factor;
    rope["high_freq_factor"] = a.rope.high_freq_factor;
    rope["original_max_position_embeddings"] = a.rope.original_max_position_embeddings;
  }
  return json{{"architectures", {"LlamaForCausalLM"}},
              {"model_type", "llama"},
              {"hidden_size", a.hidden_size},
              {"intermediate_size", a.intermediate_size},
              {"num_hidden_layers", a.num_layers},
              {"num_attention_heads", a.num_heads},
              {"num_key_value_heads", a.num_kv_heads},
              {"head_dim", a.head_dim},
              {"vocab_size", a.vocab_size},
              {"max_position_embeddings", a.max_position_embeddings},
              {"rms_norm_eps", a.rms_norm_eps},
              {"rope_parameters", rope},
              {"tie_word_embeddings", a.tie_word_embeddings},
              {"bos_token_id", a.bos_token_id},
              {"eos_token_id", a.eos_token_id},
              {"hidden_act", "silu"},
              {"attention_bias", false},
              {"mlp_bias", false},
              {"dtype", a.dtype}};
}

}  // namespace qlora::model
