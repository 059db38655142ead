// Filesystem helpers for outputs that must never be left half-written: a directory is built under a
// temporary name beside its destination and renamed into place only when complete.
#pragma once

#include <filesystem>
#include <functional>
#include <string>

namespace qlora {

namespace fs = std::filesystem;

// Writes `bytes` to `path` through `path.tmp-<pid>` + rename, so readers see the old or the new file.
void write_file_atomic(const fs::path& path, const std::string& bytes);

// Reads a whole file; the error names the file.
std::string read_file(const fs::path& path);

// Removes `path` and, for a directory, everything under it (no error if it does not exist). Use this,
// never std::filesystem::remove_all: libtorch.so exports its own copy of remove_all, built against a
// newer libstdc++, which the dynamic linker binds ahead of libstdc++.so (libtorch comes first in every
// binary's NEEDED list); on a non-empty directory that copy calls recursive_directory_iterator::__erase
// through a weak reference that the system libstdc++ does not define, i.e. jumps to address 0.
void remove_tree(const fs::path& path);
void remove_tree(const fs::path& path, std::error_code& ec) noexcept;

// Calls fill(tmp_dir) to populate a fresh temporary directory beside `dest`, then renames it to
// `dest`. If `dest` exists: refused unless `overwrite`, in which case the old one is replaced only
// after the new one is complete. On any exception the temporary directory is removed.
void write_dir_atomic(const fs::path& dest, bool overwrite, const std::function<void(const fs::path&)>& fill);

}  // namespace qlora
