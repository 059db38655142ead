#include "trainer/model/loader.h"

#include <nlohmann/json.hpp>

#include <set>

#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"

namespace qlora::model {

namespace {

// Where the weights of one model come from: a checkpoint on disk, or a seeded random initialiser.
struct WeightSource {
  std::function<at::Tensor(const std::string& name, std::vector<int64_t> shape, bool is_norm)> dense;
  // Returns the 4-bit weight if the source stores it already quantized (bnb checkpoint), else nullopt.
  std::function<std::optional<quant::Quantized4bit>(const std::string& prefix)> prequantized;
};

LlamaForCausalLM build(const LlamaArch& arch, const LoadOptions& o, const WeightSource& src) {
  auto to_dev = [&](at::Tensor t) { return t.to(o.device, o.dtype).contiguous(); };
  auto projection = [&](const std::string& prefix, const std::string& kind) -> std::shared_ptr<Linear> {
    auto [out, in] = projection_shape(arch, kind);
    if (auto pq = src.prequantized(prefix)) {
      QLORA_REQUIRE(o.quantize, "{}: the checkpoint is 4-bit quantized (bitsandbytes); use method qlora",
                    prefix);
      QLORA_REQUIRE(pq->shape == std::vector<int64_t>({out, in}),
                    "{}: quantized shape [{}] does not match the config's [{}, {}]", prefix,
                    fmt::join(pq->shape, ", "), out, in);
      return std::make_shared<Quant4Linear>(std::move(*pq), o.dtype);
    }
    at::Tensor w = src.dense(prefix + ".weight", {out, in}, false);
    if (o.quantize) {
      // Cast first, as transformers does with torch_dtype + bitsandbytes, then quantize on the device.
      auto q = quant::quantize_4bit(to_dev(w), o.quant_type, o.block_size, o.double_quant);
      return std::make_shared<Quant4Linear>(std::move(q), o.dtype);
    }
    return std::make_shared<DenseLinear>(to_dev(w), o.trainable);
  };
  auto norm = [&](const std::string& name) {
    return RMSNorm(to_dev(src.dense(name, {arch.hidden_size}, true)), arch.rms_norm_eps, o.trainable);
  };

  at::Tensor embed = to_dev(src.dense("model.embed_tokens.weight", {arch.vocab_size, arch.hidden_size}, false));
  std::vector<DecoderLayer> layers;
  for (int64_t i = 0; i < arch.num_layers; ++i) {
    std::string p = fmt::format("model.layers.{}.", i);
    std::shared_ptr<Linear> a[4], m[3];
    for (int j = 0; j < 4; ++j) a[j] = projection(p + "self_attn." + kProjectionKinds[j], kProjectionKinds[j]);
    for (int j = 0; j < 3; ++j) m[j] = projection(p + "mlp." + kProjectionKinds[4 + j], kProjectionKinds[4 + j]);
    layers.emplace_back(Attention(arch, a[0], a[1], a[2], a[3]), MLP(m[0], m[1], m[2]),
                        norm(p + "input_layernorm.weight"), norm(p + "post_attention_layernorm.weight"));
  }
  RMSNorm final_norm = norm("model.norm.weight");
  at::Tensor head;
  if (!arch.tie_word_embeddings) head = to_dev(src.dense("lm_head.weight", {arch.vocab_size, arch.hidden_size}, false));
  return LlamaForCausalLM(arch, embed, std::move(layers), final_norm, head, o.trainable);
}

}  // namespace

LoadOptions load_options_for(const Config& cfg, at::Device device, at::ScalarType dtype) {
  LoadOptions o;
  o.device = device;
  o.dtype = dtype;
  o.quantize = cfg.method == Method::QLoRA;
  o.quant_type = cfg.quant.type;
  o.block_size = cfg.quant.block_size;
  o.double_quant = cfg.quant.double_quant;
  o.trainable = cfg.method == Method::Full;
  return o;
}

LlamaForCausalLM load_llama(const std::filesystem::path& model_dir, const LoadOptions& o) {
  LlamaArch arch = load_llama_config(model_dir);
  st::Checkpoint ckpt = st::Checkpoint::open(model_dir);
  std::set<std::string> used;
  const bool bnb = arch.quantization.has_value();

  WeightSource src;
  src.dense = [&](const std::string& name, std::vector<int64_t> shape, bool) {
    QLORA_REQUIRE(ckpt.contains(name), "{}: missing tensor '{}' (expected shape [{}])", ckpt.path().string(), name,
                  fmt::join(shape, ", "));
    used.insert(name);
    at::Tensor t = ckpt.tensor(name, shape);
    QLORA_REQUIRE(at::isFloatingType(t.scalar_type()), "{}: tensor '{}' has dtype {}, expected a float type",
                  ckpt.file_of(name).path().string(), name, dtype_name(t.scalar_type()));
    return t;
  };
  src.prequantized = [&](const std::string& prefix) -> std::optional<quant::Quantized4bit> {
    if (!bnb || !ckpt.contains(prefix + ".weight.absmax")) return std::nullopt;
    auto get = [&](const std::string& key) {
      QLORA_REQUIRE(ckpt.contains(key), "{}: missing tensor '{}'", ckpt.path().string(), key);
      used.insert(key);
      return ckpt.tensor(key);
    };
    auto has = [&](const std::string& key) { return ckpt.contains(key); };
    quant::Quantized4bit q = quant::from_bnb_state(prefix + ".", get, has);
    // The 4-bit storage moves to the device as is; dequantization happens there.
    return quant::to_device(q, o.device);
  };

  LlamaForCausalLM model = build(arch, o, src);

  std::vector<std::string> leftover;
  for (const auto& n : ckpt.names()) {
    if (used.count(n) || n.find("rotary_emb.inv_freq") != std::string::npos) continue;
    // bnb's per-weight quant_state tensors are consumed by from_bnb_state as a group.
    if (bnb && n.find(".weight.") != std::string::npos) continue;
    leftover.push_back(n);
  }
  if (arch.tie_word_embeddings && !leftover.empty() && leftover.size() == 1 && leftover[0] == "lm_head.weight") {
    leftover.clear();  // some writers store the tied head anyway
  }
  QLORA_REQUIRE(leftover.empty(), "{}: unexpected tensor(s) not used by a Llama model: {}", ckpt.path().string(),
                fmt::join(leftover.begin(), leftover.begin() + std::min<size_t>(leftover.size(), 5), ", "));
  return model;
}

LlamaForCausalLM init_llama(const LlamaArch& arch, const LoadOptions& o, uint64_t seed, bool draw_on_device) {
  const at::Device draw_device = draw_on_device ? o.device : at::Device(at::kCPU);
  at::Generator gen = at::globalContext().defaultGenerator(draw_device).clone();
  gen.set_current_seed(seed);
  WeightSource src;
  // float32 draws (on the CPU unless draw_on_device), cast to the compute dtype by build().
  src.dense = [&](const std::string&, std::vector<int64_t> shape, bool is_norm) {
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(draw_device);
    if (is_norm) return at::ones(shape, opts);
    return at::normal(0.0, 0.02, shape, gen, opts);
  };
  src.prequantized = [](const std::string&) { return std::nullopt; };
  return build(arch, o, src);
}

void save_llama(LlamaForCausalLMImpl& model, const std::filesystem::path& dir, at::ScalarType dtype,
                uint64_t max_shard_bytes) {
  at::NoGradGuard no_grad;
  LlamaArch arch = model.arch();
  arch.quantization.reset();
  arch.dtype = dtype_name(dtype);
  st::NamedTensors tensors;
  auto cpu = [&](const at::Tensor& t) { return t.detach().to(at::kCPU, dtype).contiguous(); };
  tensors.emplace_back("model.embed_tokens.weight", cpu(model.embed_tokens));
  const auto slots = model.projections();  // layer-major, seven per layer
  for (size_t i = 0; i < model.layer_list.size(); ++i) {
    auto& layer = model.layer_list[i];
    std::string p = fmt::format("model.layers.{}.", i);
    for (size_t j = 7 * i; j < 7 * i + 7; ++j) {
      tensors.emplace_back(slots[j].name + ".weight", cpu(slots[j].get()->effective_weight(dtype)));
    }
    tensors.emplace_back(p + "input_layernorm.weight", cpu(layer->input_layernorm->weight));
    tensors.emplace_back(p + "post_attention_layernorm.weight", cpu(layer->post_attention_layernorm->weight));
  }
  tensors.emplace_back("model.norm.weight", cpu(model.norm->weight));
  if (!arch.tie_word_embeddings) tensors.emplace_back("lm_head.weight", cpu(model.lm_head));
  st::save_sharded(dir, tensors, max_shard_bytes, {{"format", "pt"}});
  write_file_atomic(dir / "config.json", to_hf_json(arch).dump(2) + "\n");
}

int64_t model_bytes(LlamaForCausalLMImpl& model) {
  int64_t total = model.embed_tokens.numel() * model.embed_tokens.element_size();
  if (!model.arch().tie_word_embeddings) total += model.lm_head.numel() * model.lm_head.element_size();
  total += model.norm->weight.numel() * model.norm->weight.element_size();
  for (auto& l : model.layer_list) {
    total += 2 * l->input_layernorm->weight.numel() * l->input_layernorm->weight.element_size();
  }
  for (auto& slot : model.projections()) total += slot.get()->weight_bytes();
  return total;
}

at::ScalarType parse_dtype_name(const std::string& name, const std::string& where) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  fail("{}: dtype '{}' is not supported (expected float32, bfloat16 or float16)", where, name);
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(t);
  }
}

}  // namespace qlora::model
