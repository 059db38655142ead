#include "tests/test_util.h"

#include <atomic>
#include <cstdlib>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace qlora::test {

namespace {
std::filesystem::path env_path(const char* name) {
  const char* v = std::getenv(name);
  if (!v) throw std::runtime_error(std::string("environment variable ") + name + " is not set (run through ctest)");
  return v;
}
}  // namespace

std::filesystem::path data_dir() { return env_path("QLORA_TEST_DATA"); }
std::filesystem::path source_dir() { return env_path("QLORA_SOURCE_DIR"); }

std::filesystem::path temp_dir(const std::string& tag) {
  static std::atomic<int> counter{0};
  auto p = std::filesystem::temp_directory_path() /
           ("qlora-test-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

bool has_cuda() { return at::hasCUDA() && at::getNumGPUs() > 0; }

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  auto a64 = a.detach().to(at::kCPU, at::kDouble);
  auto b64 = b.detach().to(at::kCPU, at::kDouble);
  double den = b64.norm().item<double>();
  double num = (a64 - b64).norm().item<double>();
  return den == 0 ? num : num / den;
}

}  // namespace qlora::test
