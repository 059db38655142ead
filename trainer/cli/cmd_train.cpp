// `qlora train --config FILE [--set section.key=value ...]`: the whole job. Wires the stages together:
// config -> tokenizer + data -> model (quantized for qlora) -> adapters -> train loop (checkpoints,
// metrics) -> exports (PEFT adapter, merged model). Everything it writes goes under output.dir.
//
// Under a launcher (`torchrun --nproc-per-node N --no-python qlora train ...`, or srun: trainer/dist/dist.h)
// the same command trains data-parallel: one process a GPU, each on cuda:LOCAL_RANK, the ranks' gradients
// summed every step. Rank 0 alone writes (config.yaml, metrics, checkpoints, exports) and reports; every rank
// reads the resume checkpoint.
#include <fmt/format.h>

#include <fstream>

#include "datasets/dataset.h"
#include "datasets/tokenizer.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/cli/commands.h"
#include "trainer/cli/run_context.h"
#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/dist/dist.h"
#include "trainer/lora/lora.h"
#include "trainer/lora/peft.h"
#include "trainer/model/loader.h"
#include "trainer/train/trainer.h"

namespace qlora::cli {

namespace {

bool g_lead = true;  // this process reports (rank 0, or the only one)

void log(const std::string& m) {
  if (g_lead) fmt::print(stderr, "{}\n", m);
}

int run_train(const std::string& config_path, const std::vector<std::string>& overrides) {
  Config cfg = load_config(config_path, overrides);
  const dist::Env env = dist::env_from();
  g_lead = env.rank == 0;
  RunContext ctx = resolve_run_context(cfg, env.local_rank);
  const std::unique_ptr<dist::Group> group = dist::join(env, ctx.device);
  fs::path run_dir = cfg.output.dir;
  if (g_lead) {
    fs::create_directories(run_dir);
    write_file_atomic(run_dir / "config.yaml", to_yaml(cfg));
  }
  log(fmt::format("qlora train: method {}, device {}, dtype {}, output {}", to_string(cfg.method), ctx.device.str(),
                  model::dtype_name(ctx.dtype), run_dir.string()));
  if (group) {
    const auto& t = cfg.train;
    log(fmt::format("data parallel: {} ranks ({}, {}) on {} host(s); a step is {} micro-batches of {} a rank, {} "
                    "sequences in all", group->world(), env.launcher, group->backend(), group->nodes(), t.grad_accum,
                    t.micro_batch_size, t.grad_accum * t.micro_batch_size * group->world()));
  }
  at::manual_seed(static_cast<uint64_t>(cfg.train.seed));

  data::Tokenizer tok = data::Tokenizer::load(tokenizer_path(cfg));
  data::DataSplits splits = data::load_datasets(cfg.data, tok);
  log(data::describe(splits.train.stats(), "train"));
  if (splits.eval) log(data::describe(splits.eval->stats(), "eval"));

  auto model = model::load_llama(cfg.model.path, model::load_options_for(cfg, ctx.device, ctx.dtype));
  QLORA_REQUIRE(tok.vocab_size() <= model->arch().vocab_size,
                "tokenizer {} has {} pieces but the model's vocab_size is {}", tokenizer_path(cfg), tok.vocab_size(),
                model->arch().vocab_size);
  train::NamedTensors trainable;
  if (cfg.method == Method::Full) {
    for (auto& p : model->named_parameters()) trainable.emplace_back(p.key(), p.value());
  } else {
    lora::apply_lora(*model, cfg.lora, static_cast<uint64_t>(cfg.train.seed));
    trainable = lora::lora_named_parameters(*model);
  }
  // The ranks start from rank 0's weights (they draw the same ones from the same seed; this makes it so).
  if (group) {
    std::vector<at::Tensor> weights;
    for (auto& [name, p] : trainable) weights.push_back(p);
    dist::broadcast(*group, weights, 0);
  }
  auto summary = lora::trainable_summary(*model);
  log(fmt::format("trainable parameters: {} of {} ({:.4f}%); weights on {}: {:.1f} MiB", summary.trainable,
                  summary.total, summary.percent, ctx.device.str(), model::model_bytes(*model) / 1048576.0));

  const int32_t pad = tok.pad_id() >= 0 ? tok.pad_id() : tok.eos_id();
  train::Trainer trainer(cfg, model, trainable, splits.train, splits.eval ? &*splits.eval : nullptr, pad,
                         group.get());
  if (cfg.checkpoint.resume == "auto") {
    if (auto from = ckpt::load_latest(run_dir, trainer, cfg, log)) {
      log(fmt::format("resumed from {} (step {})", from->string(), trainer.state().step));
    }
  } else if (auto from = ckpt::resolve_resume(run_dir, cfg)) {
    ckpt::load_checkpoint(*from, trainer, cfg);
    log(fmt::format("resumed from {} (step {})", from->string(), trainer.state().step));
  }

  train::Hooks hooks;
  std::ofstream metrics;
  if (g_lead) {  // the other ranks hold the same weights and state: rank 0 writes for all
    metrics.open(run_dir / "metrics.jsonl", std::ios::app);
    hooks.on_message = log;
    hooks.on_metrics = [&](const nlohmann::json& j) { metrics << j.dump() << "\n" << std::flush; };
    hooks.on_checkpoint = [&](int64_t) {
      fs::path p = ckpt::save_checkpoint(run_dir, trainer, cfg);
      log(fmt::format("checkpoint {}", p.string()));
    };
  } else {
    hooks.on_checkpoint = [](int64_t) {};  // the loop's decisions stay the same on every rank
  }
  trainer.run(hooks);
  if (!g_lead) return 0;

  if (cfg.method == Method::Full) {
    write_dir_atomic(run_dir / "model", /*overwrite=*/true, [&](const fs::path& d) {
      model::save_llama(*model, d, ctx.dtype == at::kFloat ? at::kFloat : at::kBFloat16);
      copy_tokenizer(cfg, d);
    });
    log(fmt::format("model: {}", (run_dir / "model").string()));
  } else if (cfg.output.export_adapter) {
    lora::save_peft_adapter(*model, cfg.lora, run_dir / "adapter", cfg.model.path, /*overwrite=*/true);
    log(fmt::format("adapter: {}", (run_dir / "adapter").string()));
  }
  if (cfg.output.export_merged && cfg.method != Method::Full) {
    lora::merge_lora(*model);
    write_dir_atomic(run_dir / "merged", /*overwrite=*/true, [&](const fs::path& d) {
      model::save_llama(*model, d, model::parse_dtype_name(to_string(cfg.output.merged_dtype), "output.merged_dtype"));
      copy_tokenizer(cfg, d);
    });
    log(fmt::format("merged model: {}", (run_dir / "merged").string()));
  }
  return 0;
}

}  // namespace

Runner add_train(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Fine-tune a model as a YAML config describes");
  auto config = std::make_shared<std::string>();
  auto sets = std::make_shared<std::vector<std::string>>();
  cmd->add_option("-c,--config", *config, "YAML config (see configs/)")->required();
  cmd->add_option("--set", *sets, "Override a config value: --set train.lr=1e-4 (repeatable)");
  return [config, sets] { return run_train(*config, *sets); };
}

}  // namespace qlora::cli
