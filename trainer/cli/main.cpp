#include <CLI/CLI.hpp>
#include "trainer/core/error.h"
#include <ATen/ATen.h>
int main(int argc, char** argv) {
  CLI::App app{"qlora"};
  CLI11_PARSE(app, argc, argv);
  fmt::print("cuda: {}\n", at::hasCUDA());
  return 0;
}
