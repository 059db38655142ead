// The PEFT LoRA adapter directory (shared/INTEROP.md 2): what peft.PeftModel.from_pretrained reads.
//
//   <dir>/adapter_model.safetensors  metadata {"format": "pt"}; F32 tensors
//        base_model.model.<projection>.lora_A.weight  [r, in]
//        base_model.model.<projection>.lora_B.weight  [out, r]
//   <dir>/adapter_config.json        sorted keys: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
//        lora_dropout, target_modules, use_rslora, bias "none", use_dora false, fan_in_fan_out false,
//        init_lora_weights true, base_model_name_or_path, modules_to_save null, inference_mode true,
//        rank_pattern {}, alpha_pattern {}
//
// Key mapping (the only place it is written down): our parameter "<projection>.lora_A.weight" (see
// lora.h) is PEFT's in-memory "base_model.model.<projection>.lora_A.default.weight" and PEFT's file key
// "base_model.model.<projection>.lora_A.weight" (the adapter name is dropped on save).
//
// Loading accepts what PEFT writes for a LoRA adapter on a Llama model's projections. Features our
// model cannot represent (DoRA, biases, per-module rank/alpha patterns, layers_to_transform,
// modules_to_save, exclude_modules, target_parameters, fan_in_fan_out) are refused by name instead of
// being silently dropped. The model is changed only after the whole adapter has been validated.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "trainer/config/config.h"
#include "trainer/lora/lora.h"
#include "trainer/model/llama.h"

namespace qlora::lora {

inline constexpr const char* kPeftPrefix = "base_model.model.";

// "model.layers.0.self_attn.q_proj", "lora_A" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
std::string peft_key(const std::string& projection, const std::string& which);

// Writes the adapter of every LoraLinear in `model` atomically into `dir` (qlora::write_dir_atomic: an
// existing `dir` is refused unless `overwrite`, and is replaced only once the new one is complete).
// cfg must describe the adapters: the same r, scaling and set of targeted projections (checked).
void save_peft_adapter(model::LlamaForCausalLMImpl& model, const LoraConfig& cfg, const std::filesystem::path& dir,
                       const std::string& base_model_name_or_path, bool overwrite = false);

struct LoadedAdapter {
  LoraConfig config;                    // r, alpha, dropout, rslora, target_modules as in the file
  std::string base_model_name_or_path;  // "" when absent
  std::vector<at::Tensor> parameters;   // A, B per wrapped projection, in model order (trainable)
};

// Reads a PEFT LoRA adapter directory, wraps the projections it targets and sets their A and B (float32,
// on the model's device); every other parameter is frozen, as after apply_lora. Errors name the file and
// the key: a missing file, bad JSON, an unknown or absent peft_type, an unsupported feature, a target
// module that matches no projection of the model, a missing tensor, a tensor whose shape does not fit
// the base ([r, in] / [out, r]), a tensor left over, a projection that already has an adapter.
LoadedAdapter load_peft_adapter(model::LlamaForCausalLMImpl& model, const std::filesystem::path& dir);

}  // namespace qlora::lora
