// qlora: the command-line entry point. `qlora <subcommand> ...`; installed (or linked) under the name
// `train`, the binary behaves as `qlora train` so `train --config configs/llama2-qlora.yaml` works.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "trainer/cli/commands.h"
#include "trainer/core/error.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  const std::string self = std::filesystem::path(args[0]).filename().string();
  if (self == "train") args.insert(args.begin() + 1, "train");

  CLI::App app{"qlora: QLoRA fine-tuning of Llama-family models (4-bit NF4 base + LoRA adapters)", "qlora"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("qlora 0.1.0"));
  std::vector<std::pair<CLI::App*, qlora::cli::Runner>> cmds;
  auto reg = [&](qlora::cli::Runner (*add)(CLI::App&)) {
    size_t before = app.get_subcommands({}).size();
    auto run = add(app);
    cmds.emplace_back(app.get_subcommands({})[before], std::move(run));
  };
  reg(qlora::cli::add_train);
  reg(qlora::cli::add_inspect);
  reg(qlora::cli::add_bench);
  reg(qlora::cli::add_quantize);
  reg(qlora::cli::add_export);
  reg(qlora::cli::add_generate);
  reg(qlora::cli::add_eval);

  std::vector<const char*> cargs;
  for (auto& a : args) cargs.push_back(a.c_str());
  try {
    app.parse(static_cast<int>(cargs.size()), cargs.data());
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto& [sub, run] : cmds) {
      if (sub->parsed()) return run();
    }
  } catch (const qlora::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
