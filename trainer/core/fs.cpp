#include "trainer/core/fs.h"

#include <unistd.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "trainer/core/error.h"

namespace qlora {

void write_file_atomic(const fs::path& path, const std::string& bytes) {
  fs::path tmp = path;
  tmp += fmt::format(".tmp-{}", ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    QLORA_REQUIRE(out.good(), "cannot open {} for writing", tmp.string());
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out.good()) {
      out.close();
      fs::remove(tmp);
      fail("writing {} failed (disk full?)", tmp.string());
    }
  }
  fs::rename(tmp, path);
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  QLORA_REQUIRE(in.good(), "cannot open {}: {}", path.string(),
                fs::exists(path) ? "not readable" : "no such file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void remove_tree(const fs::path& path, std::error_code& ec) noexcept {
  ec.clear();
  const auto st = fs::symlink_status(path, ec);
  if (ec) {
    if (st.type() == fs::file_type::not_found) ec.clear();
    return;
  }
  if (st.type() == fs::file_type::directory) {
    std::vector<fs::path> children;
    for (fs::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec)) children.push_back(it->path());
    if (ec) return;
    for (const auto& c : children) {
      remove_tree(c, ec);
      if (ec) return;
    }
  }
  fs::remove(path, ec);
}

void remove_tree(const fs::path& path) {
  std::error_code ec;
  remove_tree(path, ec);
  QLORA_REQUIRE(!ec, "cannot remove {}: {}", path.string(), ec.message());
}

void write_dir_atomic(const fs::path& dest, bool overwrite, const std::function<void(const fs::path&)>& fill) {
  QLORA_REQUIRE(overwrite || !fs::exists(dest), "{} already exists (pass --overwrite to replace it)",
                dest.string());
  fs::path parent = dest.has_parent_path() ? dest.parent_path() : fs::path(".");
  fs::create_directories(parent);
  fs::path tmp = parent / fmt::format(".{}.tmp-{}", dest.filename().string(), ::getpid());
  remove_tree(tmp);
  fs::create_directories(tmp);
  try {
    fill(tmp);
  } catch (...) {
    std::error_code ec;
    remove_tree(tmp, ec);
    throw;
  }
  if (fs::exists(dest)) {
    // Keep the old directory until the new one is in place, so a crash loses nothing.
    fs::path old = parent / fmt::format(".{}.old-{}", dest.filename().string(), ::getpid());
    fs::rename(dest, old);
    fs::rename(tmp, dest);
    remove_tree(old);
  } else {
    fs::rename(tmp, dest);
  }
}

}  // namespace qlora
