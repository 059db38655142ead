// Loading, creating and saving Llama models in the Hugging Face layout.
//
// load_llama streams: each projection weight is read from the memory-mapped safetensors, moved to the
// target device, quantized (method qlora) and dropped before the next one is read, so peak memory stays
// near the final model plus one weight. Embeddings, norms and lm_head stay in the compute dtype.
// A checkpoint already quantized by bitsandbytes (config.json "quantization_config") loads without
// re-quantizing. Every expected tensor must be present with the expected shape and nothing else may
// be left over (rotary inv_freq buffers excepted); errors name the tensor and the file.
#pragma once

#include <cstdint>
#include <filesystem>

#include "trainer/config/config.h"
#include "trainer/model/llama.h"

namespace qlora::model {

struct LoadOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;   // compute dtype
  bool quantize = false;               // projections stored in 4 bits (method qlora)
  QuantType quant_type = QuantType::NF4;
  int64_t block_size = 64;
  bool double_quant = true;
  bool trainable = false;              // every weight trainable (method full)
};

// Options for a method from the run config (device and dtype resolved by the caller).
LoadOptions load_options_for(const Config& cfg, at::Device device, at::ScalarType dtype);

LlamaForCausalLM load_llama(const std::filesystem::path& model_dir, const LoadOptions& opts);

// A model with HF's random initialisation (normal(0, 0.02) weights, unit norms), seeded; used for
// pretraining from scratch (the demo) and for benchmarks of a named shape. By default the weights are
// drawn on the CPU so a seed gives the same model on every device; draw_on_device draws them on
// opts.device instead (a 7B shape in seconds rather than minutes; what `qlora bench` uses), streaming
// like load_llama: each projection is drawn, quantized and freed before the next.
LlamaForCausalLM init_llama(const LlamaArch& arch, const LoadOptions& opts, uint64_t seed,
                            bool draw_on_device = false);

// Writes config.json + safetensors (sharded above max_shard_bytes, with an index) in `dtype`, with
// every projection's effective (dequantized, LoRA-merged where wrapped) weight. Writes into `dir`,
// which must exist; callers make it atomic with write_dir_atomic.
void save_llama(LlamaForCausalLMImpl& model, const std::filesystem::path& dir, at::ScalarType dtype,
                uint64_t max_shard_bytes = 2'000'000'000ULL);

// Bytes the model's weights occupy on its device.
int64_t model_bytes(LlamaForCausalLMImpl& model);

at::ScalarType parse_dtype_name(const std::string& name, const std::string& where);
std::string dtype_name(at::ScalarType t);

}  // namespace qlora::model
