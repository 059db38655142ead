// Resume checkpoints: everything needed to continue a run exactly, in a versioned directory
//   <output.dir>/checkpoints/step-00000120/
//     state.json             {"format_version": 1, "step", "total_steps", "cursor": {epoch, position}, ...,
//                             "config_hash"}
//     trainable.safetensors  the trainable weights by HF name (LoRA A/B, or every weight for method full)
//     optimizer.safetensors  AdamW moments (and float32 masters) by "<name>.exp_avg" etc.
//     rng.safetensors        the CPU (and CUDA) generator states, so dropout continues identically
//     config.yaml            the resolved config of the run
// Each is written into a temporary directory renamed into place, so a crash leaves either the old set or
// the new one. Export (PEFT adapter, merged model) is separate: see trainer/lora and trainer/model.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "trainer/config/config.h"
#include "trainer/train/trainer.h"

namespace qlora::ckpt {

inline constexpr int kFormatVersion = 1;

// Writes the checkpoint of trainer's current step under <run_dir>/checkpoints and prunes all but the
// newest keep_last. Returns its path.
std::filesystem::path save_checkpoint(const std::filesystem::path& run_dir, train::Trainer& trainer,
                                      const Config& cfg);

// The checkpoint to resume from for cfg.checkpoint.resume: none -> nullopt; auto -> the newest complete
// checkpoint under <run_dir>/checkpoints (nullopt if none); otherwise that path (must exist).
std::optional<std::filesystem::path> resolve_resume(const std::filesystem::path& run_dir, const Config& cfg);

// Restores trainer from `dir`. A checkpoint whose config differs (resume-neutral keys aside) is refused
// with the differing keys named unless cfg.checkpoint.force_resume. A corrupt or incomplete checkpoint
// throws qlora::Error naming the file.
void load_checkpoint(const std::filesystem::path& dir, train::Trainer& trainer, const Config& cfg);

// For resume=auto: tries checkpoints newest first, telling `warn` about each one that is corrupt, and
// returns the one that loaded (nullopt if none did).
std::optional<std::filesystem::path> load_latest(const std::filesystem::path& run_dir, train::Trainer& trainer,
                                                 const Config& cfg,
                                                 const std::function<void(const std::string&)>& warn);

}  // namespace qlora::ckpt
