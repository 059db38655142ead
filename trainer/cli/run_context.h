// What the subcommands share: resolving the config's device/dtype against this machine, and where the
// tokenizer of a model lives.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <string>

#include "trainer/config/config.h"

namespace qlora::cli {

struct RunContext {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
};

// device auto -> cuda when a GPU is usable; dtype auto -> bfloat16 on cuda, float32 on the CPU.
// Asking for cuda without a GPU is an error naming model.device. The GPU is cuda:`gpu` (a data-parallel rank's
// LOCAL_RANK; 0 where the launcher shows each process only its own GPU), made the current device.
RunContext resolve_run_context(const Config& cfg, int64_t gpu = 0);
RunContext resolve_run_context(Device device, DType dtype, int64_t gpu = 0);

// model.tokenizer, or <model.path>/tokenizer.model.
std::string tokenizer_path(const Config& cfg);
std::string tokenizer_path(const std::string& model_dir, const std::string& explicit_path);

// Copies the tokenizer files next to an exported model (tokenizer.model and any tokenizer*.json /
// special_tokens_map.json / generation_config.json the base has).
void copy_tokenizer(const Config& cfg, const std::filesystem::path& dest);

}  // namespace qlora::cli
