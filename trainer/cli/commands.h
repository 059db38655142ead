// The CLI's subcommands. Each registers itself on the CLI11 app and runs when selected; main() is the
// only place that catches errors (qlora::Error -> "error: ..." and exit code 1).
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace qlora::cli {

// A subcommand: add(app) declares it and its options, returns the function that runs it.
using Runner = std::function<int()>;

Runner add_train(CLI::App& app);
Runner add_inspect(CLI::App& app);
Runner add_bench(CLI::App& app);
Runner add_quantize(CLI::App& app);
Runner add_eval(CLI::App& app);
Runner add_export(CLI::App& app);
Runner add_generate(CLI::App& app);

}  // namespace qlora::cli
