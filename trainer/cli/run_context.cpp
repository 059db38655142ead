#include "trainer/cli/run_context.h"

#include <c10/core/AllocatorConfig.h>
#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <cstdlib>

#include "trainer/core/error.h"

namespace qlora::cli {

namespace fs = std::filesystem;

namespace {
// Unless the user configured PyTorch's caching allocator (PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF),
// it grows its segments in place (expandable segments) instead of keeping blocks of every size it once
// needed. Long sequences need it: the 7B shape at 160K tokens failed with 20 GiB of the card reserved
// but unallocated when a 6.7 GiB block was asked for. Before the first CUDA allocation.
void default_cuda_allocator_settings() {
  if (std::getenv("PYTORCH_ALLOC_CONF") || std::getenv("PYTORCH_CUDA_ALLOC_CONF")) return;
  c10::CachingAllocator::setAllocatorSettings("expandable_segments:True");
}
}  // namespace

RunContext resolve_run_context(Device device, DType dtype, int64_t gpu_index) {
  const int64_t gpus = at::hasCUDA() ? static_cast<int64_t>(at::getNumGPUs()) : 0;
  const bool gpu = gpus > 0;
  if (gpu) default_cuda_allocator_settings();
  RunContext c;
  if (device == Device::CUDA || (device == Device::Auto && gpu)) {
    QLORA_REQUIRE(gpu, "model.device is cuda but no CUDA GPU is usable here (set model.device: cpu or auto)");
    // One visible GPU: the launcher gave each process its own (SLURM's GPU binding, CUDA_VISIBLE_DEVICES).
    const int64_t index = gpus == 1 ? 0 : gpu_index;
    QLORA_REQUIRE(index < gpus, "LOCAL_RANK {} asks for GPU {}, but this process sees {} (CUDA_VISIBLE_DEVICES)",
                  gpu_index, index, gpus);
    c.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
#ifdef QLORA_WITH_CUDA
    c10::cuda::set_device(c.device.index());
#endif
  }
  switch (dtype) {
    case DType::Auto: c.dtype = c.device.is_cuda() ? at::kBFloat16 : at::kFloat; break;
    case DType::BFloat16: c.dtype = at::kBFloat16; break;
    case DType::Float16: c.dtype = at::kHalf; break;
    case DType::Float32: c.dtype = at::kFloat; break;
  }
  return c;
}

RunContext resolve_run_context(const Config& cfg, int64_t gpu) {
  return resolve_run_context(cfg.model.device, cfg.model.dtype, gpu);
}

std::string tokenizer_path(const std::string& model_dir, const std::string& explicit_path) {
  if (!explicit_path.empty()) return explicit_path;
  return (fs::path(model_dir) / "tokenizer.model").string();
}

std::string tokenizer_path(const Config& cfg) { return tokenizer_path(cfg.model.path, cfg.model.tokenizer); }

void copy_tokenizer(const Config& cfg, const fs::path& dest) {
  fs::path tok = tokenizer_path(cfg);
  if (fs::exists(tok)) fs::copy_file(tok, dest / "tokenizer.model", fs::copy_options::overwrite_existing);
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}) {
    fs::path p = fs::path(cfg.model.path) / name;
    if (fs::exists(p)) fs::copy_file(p, dest / name, fs::copy_options::overwrite_existing);
  }
}

}  // namespace qlora::cli
