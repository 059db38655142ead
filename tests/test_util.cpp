#include "tests/test_util.h"

#include "trainer/core/fs.h"

#include <cstring>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <vector>

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

namespace {
// The directories temp_dir made, removed once the tests have run (they piled up in /tmp over runs);
// QLORA_KEEP_TEST_DIRS=1 keeps them to look at. (remove_tree, not std::filesystem::remove_all: core/fs.h.)
class MadeDirs : public ::testing::Environment {
 public:
  static MadeDirs& get() {
    static auto* dirs = static_cast<MadeDirs*>(::testing::AddGlobalTestEnvironment(new MadeDirs));  // gtest owns it
    return *dirs;
  }
  void add(const std::filesystem::path& p) {
    std::lock_guard<std::mutex> lock(mutex_);
    paths_.push_back(p);
  }
  void TearDown() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!std::getenv("QLORA_KEEP_TEST_DIRS")) {
      for (const auto& p : paths_) {
        std::error_code ec;  // best effort: a directory a test left unreadable stays
        remove_tree(p, ec);
      }
    }
    paths_.clear();
  }

 private:
  std::mutex mutex_;
  std::vector<std::filesystem::path> paths_;
};
// Registered before main, so that RUN_ALL_TESTS tears it down.
[[maybe_unused]] const MadeDirs& kMadeDirs = MadeDirs::get();
}  // namespace

std::filesystem::path temp_dir(const std::string& tag) {
  static std::atomic<int> counter{0};
  auto p = std::filesystem::temp_directory_path() /
           ("qlora-test-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  remove_tree(p);
  std::filesystem::create_directories(p);
  MadeDirs::get().add(p);
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

::testing::AssertionResult same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type())
    return ::testing::AssertionFailure() << "dtype " << a.scalar_type() << " vs " << b.scalar_type();
  if (a.numel() != b.numel()) return ::testing::AssertionFailure() << "numel " << a.numel() << " vs " << b.numel();
  auto ac = a.detach().to(at::kCPU).contiguous().view(-1), bc = b.detach().to(at::kCPU).contiguous().view(-1);
  const size_t es = ac.element_size();
  const auto* pa = static_cast<const uint8_t*>(ac.const_data_ptr());
  const auto* pb = static_cast<const uint8_t*>(bc.const_data_ptr());
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < ac.numel(); ++i)
    if (std::memcmp(pa + i * es, pb + i * es, es) != 0 && bad++ == 0) first = i;
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << ac.numel() << " elements differ; first at " << first
                                       << ": " << ac[first].item() << " vs " << bc[first].item();
}

}  // namespace qlora::test
