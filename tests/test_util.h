// Helpers shared by the C++ tests: where fixtures live, GPU skipping, comparing tensors.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace qlora::test {

// $QLORA_TEST_DATA: where the Python fixture scripts write (set by ctest).
std::filesystem::path data_dir();
// $QLORA_SOURCE_DIR: the repository root.
std::filesystem::path source_dir();
// A fresh empty directory under the system temp dir, unique per call; removed once the tests have run (unless
// QLORA_KEEP_TEST_DIRS is set).
std::filesystem::path temp_dir(const std::string& tag);
// True when a CUDA device is usable.
bool has_cuda();
// ||a - b|| / ||b|| in float64.
double rel_err(const at::Tensor& a, const at::Tensor& b);
// Same dtype, same element count and identical bytes (so -0.0 != 0.0 and NaN payloads count); the
// failure message gives the number of differing elements and the first one.
::testing::AssertionResult same_bits(const at::Tensor& a, const at::Tensor& b);

}  // namespace qlora::test

#define QLORA_SKIP_WITHOUT_CUDA()                                   \
  do {                                                              \
    if (!::qlora::test::has_cuda()) GTEST_SKIP() << "no CUDA GPU";  \
  } while (0)

// EXPECT that `stmt` throws qlora::Error (or another std::exception) whose message contains every
// one of the given substrings.
#define EXPECT_THROW_MSG(stmt, ...)                                                        \
  do {                                                                                     \
    bool _thrown = false;                                                                  \
    try {                                                                                  \
      stmt;                                                                                \
    } catch (const std::exception& _e) {                                                   \
      _thrown = true;                                                                      \
      std::string _m = _e.what();                                                          \
      for (const char* _s : {__VA_ARGS__})                                                 \
        EXPECT_NE(_m.find(_s), std::string::npos) << "message lacks '" << _s << "': " << _m; \
    }                                                                                      \
    EXPECT_TRUE(_thrown) << #stmt " did not throw";                                        \
  } while (0)
