// PEFT adapter directory: save and load. Format and key mapping: peft.h.
#include "trainer/lora/peft.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <regex>
#include <set>

#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"

namespace qlora::lora {

namespace {

using json = nlohmann::json;

const std::vector<std::string> kKinds = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";

// Kinds in canonical order that the projections in `names` have.
std::vector<std::string> kinds_of(const std::vector<model::ProjectionSlot>& slots, const std::set<std::string>& names) {
  std::vector<std::string> out;
  for (const auto& k : kKinds) {
    for (const auto& s : slots) {
      if (s.kind == k && names.count(s.name)) {
        out.push_back(k);
        break;
      }
    }
  }
  return out;
}

// The reader of adapter_config.json: each getter checks the type and names file and key in errors.
struct ConfigReader {
  const json& j;
  std::string file;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }

  int64_t positive_int(const char* key, int64_t dflt) const {
    if (!has(key)) return dflt;
    const json& v = j.at(key);
    QLORA_REQUIRE(v.is_number_integer() && v.get<int64_t>() >= 1, "{}: '{}' must be a positive integer, got {}",
                  file, key, v.dump());
    return v.get<int64_t>();
  }
  double number(const char* key, double dflt) const {
    if (!has(key)) return dflt;
    const json& v = j.at(key);
    QLORA_REQUIRE(v.is_number(), "{}: '{}' must be a number, got {}", file, key, v.dump());
    return v.get<double>();
  }
  bool boolean(const char* key, bool dflt) const {
    if (!has(key)) return dflt;
    const json& v = j.at(key);
    QLORA_REQUIRE(v.is_boolean(), "{}: '{}' must be true or false, got {}", file, key, v.dump());
    return v.get<bool>();
  }
  // A feature we cannot represent must be absent, null, false, or empty.
  void unsupported(const char* key, const char* why) const {
    if (!has(key)) return;
    const json& v = j.at(key);
    const bool off = (v.is_boolean() && !v.get<bool>()) || ((v.is_array() || v.is_object()) && v.empty()) ||
                     (v.is_string() && v.get<std::string>().empty());
    QLORA_REQUIRE(off, "{}: '{}' = {} is not supported ({})", file, key, v.dump(), why);
  }
};

}  // namespace

std::string peft_key(const std::string& projection, const std::string& which) {
  return std::string(kPeftPrefix) + projection + "." + which + ".weight";
}

void save_peft_adapter(model::LlamaForCausalLMImpl& model, const LoraConfig& cfg, const fs::path& dir,
                       const std::string& base_model_name_or_path, bool overwrite) {
  auto mods = lora_modules(model);
  QLORA_REQUIRE(!mods.empty(), "saving a PEFT adapter to {}: the model has no LoRA adapters", dir.string());
  const double scaling = LoraOptions::from(cfg).scaling();
  std::set<std::string> wrapped;
  st::NamedTensors tensors;
  for (const auto& [name, l] : mods) {
    QLORA_REQUIRE(l->r() == cfg.r && std::abs(l->scaling() - scaling) <= 1e-12 * std::abs(scaling),
                  "saving a PEFT adapter: {} has r {} and scaling {}, but the config says r {} and scaling {}", name,
                  l->r(), l->scaling(), cfg.r, scaling);
    wrapped.insert(name);
    tensors.emplace_back(peft_key(name, "lora_A"), l->lora_a().detach().to(at::kCPU, at::kFloat).contiguous());
    tensors.emplace_back(peft_key(name, "lora_B"), l->lora_b().detach().to(at::kCPU, at::kFloat).contiguous());
  }
  // PEFT rebuilds the adapters from target_modules: it must select exactly the wrapped projections.
  for (const auto& s : model.projections()) {
    QLORA_REQUIRE(targets(cfg.target_modules, s.name) == (wrapped.count(s.name) > 0),
                  "saving a PEFT adapter: lora.target_modules [{}] {} {}, but the model {}",
                  fmt::join(cfg.target_modules, ", "), targets(cfg.target_modules, s.name) ? "selects" : "skips",
                  s.name, wrapped.count(s.name) ? "has an adapter there" : "has none there");
  }

  json j;  // nlohmann::json objects are std::map based: dump() writes sorted keys, as PEFT does.
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["r"] = cfg.r;
  if (cfg.alpha == std::floor(cfg.alpha) && std::abs(cfg.alpha) < 1e15)
    j["lora_alpha"] = static_cast<int64_t>(cfg.alpha);  // PEFT's type is int; write 16, not 16.0
  else
    j["lora_alpha"] = cfg.alpha;
  j["lora_dropout"] = cfg.dropout;
  j["target_modules"] = cfg.target_modules;
  j["use_rslora"] = cfg.rslora;
  j["bias"] = "none";
  j["use_dora"] = false;
  j["fan_in_fan_out"] = false;
  j["init_lora_weights"] = true;
  j["base_model_name_or_path"] = base_model_name_or_path;
  j["modules_to_save"] = nullptr;
  j["inference_mode"] = true;
  j["rank_pattern"] = json::object();
  j["alpha_pattern"] = json::object();
  const std::string text = j.dump(2) + "\n";

  write_dir_atomic(dir, overwrite, [&](const fs::path& tmp) {
    st::save(tmp / kWeightsFile, tensors, {{"format", "pt"}});
    write_file_atomic(tmp / kConfigFile, text);
  });
}

LoadedAdapter load_peft_adapter(model::LlamaForCausalLMImpl& model, const fs::path& dir) {
  const fs::path cfg_path = dir / kConfigFile;
  const fs::path st_path = dir / kWeightsFile;
  QLORA_REQUIRE(fs::is_directory(dir), "PEFT adapter {}: no such directory", dir.string());
  QLORA_REQUIRE(fs::exists(cfg_path), "PEFT adapter {}: {} is missing", dir.string(), kConfigFile);
  QLORA_REQUIRE(fs::exists(st_path), "PEFT adapter {}: {} is missing (only the safetensors format is read)",
                dir.string(), kWeightsFile);

  json j;
  try {
    j = json::parse(read_file(cfg_path));
  } catch (const json::parse_error& e) {
    fail("{}: not valid JSON: {}", cfg_path.string(), e.what());
  }
  const std::string file = cfg_path.string();
  QLORA_REQUIRE(j.is_object(), "{}: expected a JSON object", file);
  ConfigReader rd{j, file};

  QLORA_REQUIRE(rd.has("peft_type"), "{}: 'peft_type' is missing (expected \"LORA\")", file);
  QLORA_REQUIRE(j["peft_type"].is_string() && j["peft_type"].get<std::string>() == "LORA",
                "{}: peft_type {} is not supported (expected \"LORA\")", file, j["peft_type"].dump());
  rd.unsupported("use_dora", "DoRA adapters");
  rd.unsupported("fan_in_fan_out", "Conv1D-style transposed weights; Llama uses nn.Linear");
  rd.unsupported("lora_bias", "LoRA biases");
  rd.unsupported("modules_to_save", "fully trained extra modules");
  rd.unsupported("rank_pattern", "per-module ranks");
  rd.unsupported("alpha_pattern", "per-module alphas");
  rd.unsupported("layers_to_transform", "adapters on a subset of layers");
  rd.unsupported("exclude_modules", "excluded modules");
  rd.unsupported("target_parameters", "adapters on parameters");
  rd.unsupported("layer_replication", "replicated layers");
  rd.unsupported("trainable_token_indices", "trainable token embeddings");
  rd.unsupported("use_qalora", "QA-LoRA input pooling");
  rd.unsupported("alora_invocation_tokens", "activated LoRA");
  if (rd.has("bias")) {
    QLORA_REQUIRE(j["bias"] == "none", "{}: 'bias' = {} is not supported (expected \"none\")", file, j["bias"].dump());
  }

  // PEFT's defaults (LoraConfig) for absent keys.
  LoraOptions opts;
  opts.r = rd.positive_int("r", 8);
  opts.alpha = rd.number("lora_alpha", 8.0);
  QLORA_REQUIRE(opts.alpha > 0.0 && std::isfinite(opts.alpha), "{}: 'lora_alpha' must be > 0, got {}", file,
                opts.alpha);
  opts.dropout = rd.number("lora_dropout", 0.0);
  QLORA_REQUIRE(opts.dropout >= 0.0 && opts.dropout < 1.0, "{}: 'lora_dropout' must be in [0, 1), got {}", file,
                opts.dropout);
  opts.rslora = rd.boolean("use_rslora", false);

  // Which projections the adapter targets, by PEFT's rules: a string is a regular expression that must
  // match the whole module name ("all-linear" = every linear but the output layer); a list matches a
  // name equal to an entry or ending in "." + entry.
  auto slots = model.projections();
  std::set<std::string> selected;
  QLORA_REQUIRE(rd.has("target_modules"), "{}: 'target_modules' is missing", file);
  const json& tm = j["target_modules"];
  if (tm.is_string()) {
    const std::string pat = tm.get<std::string>();
    if (pat == "all-linear") {
      for (const auto& s : slots) selected.insert(s.name);
    } else {
      std::regex re;
      try {
        re = std::regex(pat, std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        fail("{}: target_modules regular expression '{}' is invalid: {}", file, pat, e.what());
      }
      for (const auto& s : slots)
        if (std::regex_match(s.name, re)) selected.insert(s.name);
      QLORA_REQUIRE(!selected.empty(), "{}: target_modules '{}' matches no projection of the base model ({})", file,
                    pat, fmt::join(kKinds, ", "));
    }
  } else {
    QLORA_REQUIRE(tm.is_array() && !tm.empty(), "{}: 'target_modules' must be a non-empty list or a string, got {}",
                  file, tm.dump());
    for (const auto& e : tm) {
      QLORA_REQUIRE(e.is_string(), "{}: target_modules entries must be strings, got {}", file, e.dump());
      const std::string t = e.get<std::string>();
      bool hit = false;
      for (const auto& s : slots) {
        if (targets({t}, s.name)) {
          selected.insert(s.name);
          hit = true;
        }
      }
      QLORA_REQUIRE(hit, "{}: target module '{}' does not exist in the base model (LoRA fits only {})", file, t,
                    fmt::join(kKinds, ", "));
    }
  }

  // Validate every tensor before touching the model.
  auto f = st::File::open(st_path);
  std::set<std::string> used;
  struct Pending {
    model::ProjectionSlot* slot;
    at::Tensor a, b;
  };
  std::vector<Pending> pending;
  for (auto& s : slots) {
    if (!selected.count(s.name)) continue;
    auto base = s.get();
    QLORA_REQUIRE(!std::dynamic_pointer_cast<LoraLinear>(base), "{}: already has a LoRA adapter", s.name);
    const int64_t in = base->in_features(), out = base->out_features();
    auto fetch = [&](const char* which, std::vector<int64_t> shape, const char* expect) {
      const std::string key = peft_key(s.name, which);
      QLORA_REQUIRE(f->contains(key), "{}: tensor '{}' is missing (target module {} is listed in {})", st_path.string(),
                    key, s.name, kConfigFile);
      const auto& info = f->info(key);
      QLORA_REQUIRE(info.shape == shape,
                    "{}: tensor '{}' has shape [{}], expected {} = [{}] for {} (r = {} from {}); the adapter does "
                    "not fit this base model",
                    st_path.string(), key, fmt::join(info.shape, ", "), expect, fmt::join(shape, ", "), s.name, opts.r,
                    kConfigFile);
      QLORA_REQUIRE(info.dtype == st::DType::F32 || info.dtype == st::DType::BF16 || info.dtype == st::DType::F16,
                    "{}: tensor '{}' has dtype {}, expected F32, BF16 or F16", st_path.string(), key,
                    st::dtype_name(info.dtype));
      used.insert(key);
      return f->tensor(key).to(at::kFloat).clone().to(model.device());
    };
    at::Tensor a = fetch("lora_A", {opts.r, in}, "[r, in]");
    at::Tensor b = fetch("lora_B", {out, opts.r}, "[out, r]");
    pending.push_back({&s, a, b});
  }
  std::vector<std::string> left;
  for (const auto& n : f->names())
    if (!used.count(n)) left.push_back(n);
  if (!left.empty()) {
    const size_t show = std::min<size_t>(left.size(), 5);
    fail("{}: {} tensor(s) do not belong to any target module of {}: {}{}", st_path.string(), left.size(), kConfigFile,
         fmt::join(left.begin(), left.begin() + static_cast<std::ptrdiff_t>(show), ", "), left.size() > show ? ", ..." : "");
  }

  LoadedAdapter res;
  res.config.r = opts.r;
  res.config.alpha = opts.alpha;
  res.config.dropout = opts.dropout;
  res.config.rslora = opts.rslora;
  res.config.target_modules = kinds_of(slots, selected);
  if (rd.has("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    res.base_model_name_or_path = j["base_model_name_or_path"].get<std::string>();

  for (auto& p : model.parameters()) p.set_requires_grad(false);
  for (auto& p : pending) {
    auto lora = std::make_shared<LoraLinear>(p.slot->get(), opts, p.a, p.b);
    res.parameters.push_back(lora->lora_a());
    res.parameters.push_back(lora->lora_b());
    p.slot->set(std::move(lora));
  }
  return res;
}

}  // namespace qlora::lora
