// Errors the user can act on. Every message names what was wrong and where (file, key, line, tensor)
// and what was expected; the CLI prints it and exits non-zero. Internal invariants use TORCH_CHECK.
#pragma once

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>
#include <vector>
#include <string>

namespace qlora {

// Bad input: config, model files, data, command line. Caught at the CLI boundary.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// Throws qlora::Error with the formatted message unless cond holds.
#define QLORA_REQUIRE(cond, ...)                 \
  do {                                           \
    if (!(cond)) ::qlora::fail(__VA_ARGS__);     \
  } while (0)

// Levenshtein distance based suggestion: the candidate closest to `word`, or "" if none is close.
std::string nearest(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace qlora
