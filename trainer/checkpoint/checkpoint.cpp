#include "trainer/checkpoint/checkpoint.h"

#include <nlohmann/json.hpp>

#include <algorithm>

#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"

namespace qlora::ckpt {

using nlohmann::json;

namespace {

std::vector<fs::path> list_checkpoints(const fs::path& run_dir) {
  std::vector<fs::path> out;
  fs::path d = run_dir / "checkpoints";
  if (!fs::is_directory(d)) return out;
  for (auto& e : fs::directory_iterator(d)) {
    std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step-", 0) == 0) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());  // zero-padded step numbers sort by step
  return out;
}

std::vector<at::Generator> generators() {
  std::vector<at::Generator> g{at::globalContext().defaultGenerator(at::kCPU)};
  if (at::hasCUDA()) {
    for (int i = 0; i < static_cast<int>(at::getNumGPUs()); ++i)
      g.push_back(at::globalContext().defaultGenerator(at::Device(at::kCUDA, i)));
  }
  return g;
}

st::NamedTensors cpu_copy(const st::NamedTensors& in) {
  st::NamedTensors out;
  for (auto& [n, t] : in) out.emplace_back(n, t.detach().cpu());
  return out;
}

}  // namespace

fs::path save_checkpoint(const fs::path& run_dir, train::Trainer& trainer, const Config& cfg) {
  const auto& s = trainer.state();
  fs::path dest = run_dir / "checkpoints" / fmt::format("step-{:08d}", s.step);
  write_dir_atomic(dest, /*overwrite=*/true, [&](const fs::path& tmp) {
    st::save(tmp / "trainable.safetensors", cpu_copy(trainer.trainable()));
    st::save(tmp / "optimizer.safetensors", cpu_copy(trainer.optimizer().state()));
    st::NamedTensors rng;
    auto gens = generators();
    for (size_t i = 0; i < gens.size(); ++i) rng.emplace_back(fmt::format("generator.{}", i), gens[i].get_state());
    st::save(tmp / "rng.safetensors", rng);
    write_file_atomic(tmp / "config.yaml", to_yaml(cfg));
    json j = {{"format_version", kFormatVersion},
              {"step", s.step},
              {"total_steps", s.total_steps},
              {"consecutive_nonfinite", s.consecutive_nonfinite},
              {"skipped_steps", s.skipped_steps},
              {"tokens_seen", s.tokens_seen},
              {"cursor", {{"epoch", s.cursor.epoch}, {"position", s.cursor.position}}},
              {"optimizer_steps", trainer.optimizer().steps()},
              {"world_size", trainer.world()},
              {"config_hash", config_hash(cfg)}};
    // state.json last: its presence marks the checkpoint complete.
    write_file_atomic(tmp / "state.json", j.dump(2) + "\n");
  });
  auto all = list_checkpoints(run_dir);
  const int64_t keep = std::max<int64_t>(1, cfg.checkpoint.keep_last);
  for (size_t i = 0; i + keep < all.size(); ++i) remove_tree(all[i]);  // not fs::remove_all: see core/fs.h
  return dest;
}

std::optional<fs::path> resolve_resume(const fs::path& run_dir, const Config& cfg) {
  const std::string& r = cfg.checkpoint.resume;
  if (r == "none" || r.empty()) return std::nullopt;
  if (r == "auto") {
    auto all = list_checkpoints(run_dir);
    if (all.empty()) return std::nullopt;
    return all.back();
  }
  QLORA_REQUIRE(fs::is_directory(r), "checkpoint.resume: {} is not a checkpoint directory", r);
  return fs::path(r);
}

void load_checkpoint(const fs::path& dir, train::Trainer& trainer, const Config& cfg) {
  fs::path state_path = dir / "state.json";
  QLORA_REQUIRE(fs::exists(state_path), "{}: incomplete checkpoint (no state.json)", dir.string());
  json j;
  try {
    j = json::parse(read_file(state_path));
  } catch (const json::exception& e) {
    fail("{}: corrupt: {}", state_path.string(), e.what());
  }
  try {
    QLORA_REQUIRE(j.at("format_version").get<int>() == kFormatVersion,
                  "{}: format_version {} is not supported (this build reads {})", state_path.string(),
                  j.at("format_version").dump(), kFormatVersion);
    if (j.at("config_hash").get<std::string>() != config_hash(cfg)) {
      Config old = load_config(dir / "config.yaml");
      auto keys = config_diff(old, cfg);
      if (!cfg.checkpoint.force_resume) {
        // No key differs when the hash was taken over another set of keys (a build before a key became
        // resume-neutral, e.g. model.gradient_checkpointing).
        const std::string what = keys.empty() ? std::string("no key; its config hash comes from another build")
                                              : fmt::format("differs in: {}", fmt::join(keys, ", "));
        fail("{}: made with a different config ({}); set checkpoint.force_resume=true to resume anyway",
             dir.string(), what);
      }
    }
    // A step is grad_accum micro-batches on each data-parallel rank: another number of ranks changes what a
    // step is (and where the data cursor's steps fall). Checkpoints from before the key had one rank.
    const int64_t world = j.value("world_size", int64_t{1});
    QLORA_REQUIRE(world == trainer.world() || cfg.checkpoint.force_resume,
                  "{}: made by {} data-parallel rank(s), this run has {} (a step would take another number of "
                  "micro-batches); set checkpoint.force_resume=true to resume anyway",
                  dir.string(), world, trainer.world());
    train::TrainerState s;
    s.step = j.at("step").get<int64_t>();
    s.total_steps = j.at("total_steps").get<int64_t>();
    s.consecutive_nonfinite = j.at("consecutive_nonfinite").get<int64_t>();
    s.skipped_steps = j.at("skipped_steps").get<int64_t>();
    s.tokens_seen = j.at("tokens_seen").get<double>();
    s.cursor.epoch = j.at("cursor").at("epoch").get<int64_t>();
    s.cursor.position = j.at("cursor").at("position").get<int64_t>();

    auto weights = st::File::open(dir / "trainable.safetensors");
    {
      at::NoGradGuard no_grad;
      for (auto& [name, p] : trainer.trainable()) {
        QLORA_REQUIRE(weights->contains(name), "{}: lacks trainable weight '{}'", weights->path().string(), name);
        at::Tensor t = weights->tensor(name);
        QLORA_REQUIRE(t.sizes() == p.sizes(), "{}: '{}' has shape [{}], the model expects [{}]",
                      weights->path().string(), name, fmt::join(t.sizes(), ", "), fmt::join(p.sizes(), ", "));
        p.copy_(t);
      }
    }
    auto opt = st::File::open(dir / "optimizer.safetensors");
    st::NamedTensors opt_state;
    for (auto& n : opt->names()) opt_state.emplace_back(n, opt->tensor(n));
    trainer.restore(s, opt_state);
    auto rng = st::File::open(dir / "rng.safetensors");
    auto gens = generators();
    for (size_t i = 0; i < gens.size(); ++i) {
      std::string key = fmt::format("generator.{}", i);
      if (rng->contains(key)) gens[i].set_state(rng->tensor(key).clone());
    }
  } catch (const json::exception& e) {
    fail("{}: corrupt: {}", state_path.string(), e.what());
  }
}

std::optional<fs::path> load_latest(const fs::path& run_dir, train::Trainer& trainer, const Config& cfg,
                                    const std::function<void(const std::string&)>& warn) {
  auto all = list_checkpoints(run_dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      load_checkpoint(*it, trainer, cfg);
      return *it;
    } catch (const Error& e) {
      // A config or rank-count mismatch is the user's decision, not corruption: never skip past it (both
      // messages offer checkpoint.force_resume).
      if (std::string(e.what()).find("checkpoint.force_resume") != std::string::npos) throw;
      warn(fmt::format("warning: checkpoint {} is unusable ({}); trying the previous one", it->string(), e.what()));
    }
  }
  return std::nullopt;
}

}  // namespace qlora::ckpt
