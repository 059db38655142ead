// `qlora export --base MODEL_DIR --adapter DIR --out DIR --format adapter|merged|merged-4bit`: turns a
// training result into something other tools load.
//   adapter      a PEFT adapter directory (adapter_model.safetensors + adapter_config.json), e.g. from a
//                resume checkpoint (checkpoints/step-N: trainable.safetensors + config.yaml);
//   merged       a Hugging Face checkpoint whose projections are base + scaling * B @ A, summed in float32
//                (a 4-bit base is dequantized first), then cast once to --dtype (bf16 | fp16 | fp32);
//                sharded above --shard-size with model.safetensors.index.json; tokenizer files copied;
//   merged-4bit  the same merged weights re-quantized to 4 bits (NF4/FP4, bitsandbytes serialization, with
//                a "quantization_config" in config.json; shared/INTEROP.md 1); embeddings, norms and
//                lm_head stay in --dtype. Re-quantizing loses accuracy against `merged`.
// The base the adapter is merged into: --quantize auto (default) quantizes a dense base exactly as the
// training run did when --adapter is a checkpoint of method qlora (so the export is the model that was
// trained), and leaves it dense for a PEFT adapter; a bitsandbytes 4-bit base is always used as stored.
// Output goes through a temporary directory renamed into place; an existing --out is refused unless
// --overwrite.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cctype>

#include "trainer/cli/commands.h"
#include "trainer/cli/run_context.h"
#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"
#include "trainer/lora/lora.h"
#include "trainer/lora/peft.h"
#include "trainer/model/loader.h"
#include "trainer/quant/quant.h"

namespace qlora::cli {

namespace {

struct ExportArgs {
  std::string base, adapter, out, format = "merged", dtype = "bf16", shard_size = "2GB", tokenizer;
  std::string quantize = "auto";     // auto | none | nf4 | fp4: how the base is held before merging
  std::string quant_type = "auto";   // merged-4bit: nf4 | fp4 (auto: the base's, else nf4)
  std::string double_quant = "auto"; // merged-4bit: true | false (auto: the base's, else true)
  int64_t block_size = 64;           // merged-4bit
  bool overwrite = false;
  bool no_tokenizer = false;
};

void log(const std::string& m) { fmt::print(stderr, "{}\n", m); }

// "2GB", "500MB", "64KiB", "123" -> bytes (KB/MB/GB decimal as Hugging Face's max_shard_size; KiB... binary).
uint64_t parse_size(const std::string& s) {
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  QLORA_REQUIRE(i > 0, "--shard-size '{}': expected a number with an optional unit (e.g. 2GB, 500MB)", s);
  double v = std::stod(s.substr(0, i));
  std::string unit = s.substr(i);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double mult = 0;
  if (unit.empty() || unit == "B") mult = 1;
  else if (unit == "KB") mult = 1e3;
  else if (unit == "MB") mult = 1e6;
  else if (unit == "GB") mult = 1e9;
  else if (unit == "KIB") mult = 1024.0;
  else if (unit == "MIB") mult = 1048576.0;
  else if (unit == "GIB") mult = 1073741824.0;
  else fail("--shard-size '{}': unknown unit '{}' (expected B, KB, MB, GB, KiB, MiB or GiB)", s, s.substr(i));
  QLORA_REQUIRE(v * mult >= 1, "--shard-size '{}' must be at least 1 byte", s);
  return static_cast<uint64_t>(v * mult);
}

bool is_checkpoint(const fs::path& dir) {
  return fs::exists(dir / "trainable.safetensors") && fs::exists(dir / "config.yaml");
}

// Wraps the model's projections as the resume checkpoint's run did and loads its trained A/B. Returns the
// run's config (its lora section describes the adapter).
Config load_checkpoint_adapter(model::LlamaForCausalLMImpl& model, const fs::path& dir) {
  Config cfg = load_config(dir / "config.yaml");
  QLORA_REQUIRE(cfg.method != Method::Full, "{}: a checkpoint of method full has no adapter to export",
                dir.string());
  lora::apply_lora(model, cfg.lora, static_cast<uint64_t>(cfg.train.seed));
  auto file = st::File::open(dir / "trainable.safetensors");
  at::NoGradGuard no_grad;
  size_t n = 0;
  for (auto& [name, p] : lora::lora_named_parameters(model)) {
    QLORA_REQUIRE(file->contains(name), "{}: missing tensor '{}' (the base does not match the run's model?)",
                  file->path().string(), name);
    at::Tensor t = file->tensor(name);
    QLORA_REQUIRE(t.sizes() == p.sizes(), "{}: tensor '{}' has shape [{}] but the base needs [{}]",
                  file->path().string(), name, fmt::join(t.sizes(), ", "), fmt::join(p.sizes(), ", "));
    p.copy_(t);
    ++n;
  }
  QLORA_REQUIRE(n == file->names().size(), "{}: {} tensors but the run's adapter on this base has {}",
                file->path().string(), file->names().size(), n);
  return cfg;
}

int run_export(const ExportArgs& a) {
  const fs::path out = a.out;
  // Refuse before any expensive work; write_dir_atomic checks again at the end.
  QLORA_REQUIRE(a.overwrite || !fs::exists(out), "export target '{}' already exists (pass --overwrite to replace it)",
                out.string());
  QLORA_REQUIRE(fs::is_directory(a.adapter), "adapter '{}' does not exist (expected a PEFT adapter directory or a "
                "resume checkpoint checkpoints/step-N)", a.adapter);
  const bool checkpoint = is_checkpoint(a.adapter);
  QLORA_REQUIRE(checkpoint || fs::exists(fs::path(a.adapter) / "adapter_config.json"),
                "adapter '{}' is neither a PEFT adapter (no adapter_config.json) nor a resume checkpoint "
                "(no trainable.safetensors + config.yaml)", a.adapter);
  const bool merged = a.format != "adapter";
  const at::ScalarType dtype = model::parse_dtype_name(a.dtype, "--dtype");
  const uint64_t shard = parse_size(a.shard_size);

  Config tokcfg;  // where the tokenizer files come from (copy_tokenizer reads model.path / model.tokenizer)
  tokcfg.model.path = a.base;
  tokcfg.model.tokenizer = a.tokenizer;
  if (merged && !a.no_tokenizer) {
    QLORA_REQUIRE(fs::is_regular_file(tokenizer_path(tokcfg)), "no tokenizer: '{}' does not exist (pass --tokenizer "
                  "FILE, or --no-tokenizer to export the model without one)", tokenizer_path(tokcfg));
  }

  model::LlamaArch arch = model::load_llama_config(a.base);
  std::optional<Config> run_cfg;
  if (checkpoint) run_cfg = load_config(fs::path(a.adapter) / "config.yaml");
  model::LoadOptions lo;  // float32 on the CPU: merging sums in float32 anyway
  lo.quantize = arch.quantization.has_value();
  if (a.quantize == "nf4" || a.quantize == "fp4") {
    lo.quantize = true;
    lo.quant_type = a.quantize == "nf4" ? QuantType::NF4 : QuantType::FP4;
  } else if (a.quantize == "auto" && run_cfg && run_cfg->method == Method::QLoRA) {
    lo.quantize = true;
    lo.quant_type = run_cfg->quant.type;
    lo.block_size = run_cfg->quant.block_size;
    lo.double_quant = run_cfg->quant.double_quant;
  }
  QLORA_REQUIRE(!(a.quantize == "none" && arch.quantization), "--quantize none: the base '{}' is stored in 4 bits "
                "(bitsandbytes); it is dequantized for merging, so use --quantize auto", a.base);
  log(fmt::format("qlora export: base {}{}, adapter {} ({}), format {}", a.base,
                  lo.quantize ? fmt::format(" ({} 4-bit)", quant::quant_type_name(lo.quant_type)) : "", a.adapter,
                  checkpoint ? "resume checkpoint" : "PEFT", a.format));
  auto model = model::load_llama(a.base, lo);

  LoraConfig lcfg;
  std::string base_name = a.base;
  if (checkpoint) {
    lcfg = load_checkpoint_adapter(*model, a.adapter).lora;
  } else {
    auto loaded = lora::load_peft_adapter(*model, a.adapter);
    lcfg = loaded.config;
    if (!loaded.base_model_name_or_path.empty()) base_name = loaded.base_model_name_or_path;
  }
  const auto mods = lora::lora_modules(*model);
  log(fmt::format("adapter: {} projections, r {}, alpha {}{}", mods.size(), lcfg.r, lcfg.alpha,
                  lcfg.rslora ? ", rsLoRA" : ""));

  if (a.format == "adapter") {
    lora::save_peft_adapter(*model, lcfg, out, base_name, a.overwrite);
    log(fmt::format("adapter: {}", out.string()));
    return 0;
  }

  if (a.format == "merged") {
    write_dir_atomic(out, a.overwrite, [&](const fs::path& d) {
      model::save_llama(*model, d, dtype, shard);  // effective weights: base (dequantized) + delta
      if (!a.no_tokenizer) copy_tokenizer(tokcfg, d);
    });
    log(fmt::format("merged model ({}): {}", model::dtype_name(dtype), out.string()));
    return 0;
  }

  // merged-4bit: merged weights, cast to the storage dtype (as transformers casts before quantizing),
  // quantized blockwise, serialized as bitsandbytes does.
  QuantType qt = QuantType::NF4;
  bool dq = true;
  if (arch.quantization) {
    qt = arch.quantization->quant_type == "fp4" ? QuantType::FP4 : QuantType::NF4;
    dq = arch.quantization->double_quant;
  }
  if (a.quant_type != "auto") qt = a.quant_type == "fp4" ? QuantType::FP4 : QuantType::NF4;
  if (a.double_quant != "auto") dq = a.double_quant == "true";
  at::NoGradGuard no_grad;
  auto cpu = [&](const at::Tensor& t) { return t.detach().to(at::kCPU, dtype).contiguous(); };
  st::NamedTensors tensors;
  tensors.emplace_back("model.embed_tokens.weight", cpu(model->embed_tokens));
  const auto slots = model->projections();
  for (size_t i = 0; i < model->layer_list.size(); ++i) {
    auto& layer = model->layer_list[i];
    for (size_t j = 7 * i; j < 7 * i + 7; ++j) {
      at::Tensor w = slots[j].get()->effective_weight(at::kFloat).to(dtype).contiguous();
      for (auto& kv : quant::to_bnb_state(slots[j].name + ".", quant::quantize_4bit(w, qt, a.block_size, dq)))
        tensors.push_back(std::move(kv));
    }
    std::string p = fmt::format("model.layers.{}.", i);
    tensors.emplace_back(p + "input_layernorm.weight", cpu(layer->input_layernorm->weight));
    tensors.emplace_back(p + "post_attention_layernorm.weight", cpu(layer->post_attention_layernorm->weight));
  }
  tensors.emplace_back("model.norm.weight", cpu(model->norm->weight));
  if (!arch.tie_word_embeddings) tensors.emplace_back("lm_head.weight", cpu(model->lm_head));
  model::LlamaArch out_arch = arch;
  out_arch.quantization.reset();
  out_arch.dtype = model::dtype_name(dtype);
  nlohmann::json cfg = model::to_hf_json(out_arch);
  cfg["quantization_config"] = {{"quant_method", "bitsandbytes"},
                                {"load_in_4bit", true},
                                {"load_in_8bit", false},
                                {"bnb_4bit_quant_type", quant::quant_type_name(qt)},
                                {"bnb_4bit_use_double_quant", dq},
                                {"bnb_4bit_compute_dtype", model::dtype_name(dtype)},
                                {"bnb_4bit_quant_storage", "uint8"},
                                {"llm_int8_skip_modules", nullptr}};
  write_dir_atomic(out, a.overwrite, [&](const fs::path& d) {
    st::save_sharded(d, tensors, shard, {{"format", "pt"}});
    write_file_atomic(d / "config.json", cfg.dump(2) + "\n");
    if (!a.no_tokenizer) copy_tokenizer(tokcfg, d);
  });
  log(fmt::format("merged 4-bit model ({}{}, block {}, storage {}): {}", quant::quant_type_name(qt),
                  dq ? " + double quant" : "", a.block_size, model::dtype_name(dtype), out.string()));
  return 0;
}

}  // namespace

Runner add_export(CLI::App& app) {
  auto* cmd = app.add_subcommand("export", "Export a trained adapter: PEFT adapter, merged model, or merged 4-bit model");
  auto a = std::make_shared<ExportArgs>();
  cmd->add_option("-b,--base", a->base, "Base model directory the adapter was trained on")->required();
  cmd->add_option("-a,--adapter", a->adapter, "PEFT adapter directory or resume checkpoint (checkpoints/step-N)")
      ->required();
  cmd->add_option("-o,--out", a->out, "Output directory (refused if it exists, unless --overwrite)")->required();
  cmd->add_option("-f,--format", a->format, "adapter | merged | merged-4bit")
      ->check(CLI::IsMember({"adapter", "merged", "merged-4bit"}))->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "Merged weights' dtype: bf16 | fp16 | fp32")
      ->check(CLI::IsMember({"bf16", "fp16", "fp32", "bfloat16", "float16", "float32"}))->capture_default_str();
  cmd->add_option("--shard-size", a->shard_size, "Largest shard (e.g. 2GB, 500MB, 64KiB)")->capture_default_str();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer.model to copy (default: the base's)");
  cmd->add_flag("--no-tokenizer", a->no_tokenizer, "Export a merged model without tokenizer files");
  cmd->add_option("--quantize", a->quantize, "Base before merging: auto (as the checkpoint's run) | none | nf4 | fp4")
      ->check(CLI::IsMember({"auto", "none", "nf4", "fp4"}))->capture_default_str();
  cmd->add_option("--quant-type", a->quant_type, "merged-4bit: auto | nf4 | fp4")
      ->check(CLI::IsMember({"auto", "nf4", "fp4"}))->capture_default_str();
  cmd->add_option("--double-quant", a->double_quant, "merged-4bit: auto | true | false")
      ->check(CLI::IsMember({"auto", "true", "false"}))->capture_default_str();
  cmd->add_option("--block-size", a->block_size, "merged-4bit: quantization block size")->capture_default_str();
  cmd->add_flag("--overwrite", a->overwrite, "Replace an existing --out");
  return [a] { return run_export(*a); };
}

}  // namespace qlora::cli
