// safetensors reader and writer, and Hugging Face checkpoints made of one or many of them.
//
// File layout (little-endian): u64 N, then N bytes of JSON header
//   {"__metadata__": {str: str}?, name: {"dtype": "F32", "shape": [d0, ...], "data_offsets": [b, e)}, ...}
// then the data section; offsets are bytes relative to the data section's start.
//
// Invariants enforced on open (the header is untrusted input): N <= 100 MB and 8 + N <= file size; the
// header is a JSON object with no duplicate keys at any level; every entry has exactly dtype, shape and
// data_offsets; shapes are non-negative integers whose element count and byte count do not overflow;
// e - b == numel * dtype size; the tensors, sorted by offset, tile the data section exactly (no holes,
// overlaps or trailing bytes). Every error is a qlora::Error naming the file and the tensor or key.
//
// Reading maps the file with mmap(2) (MAP_PRIVATE, copy-on-write, like torch's UntypedStorage.from_file
// that Python's safetensors uses) so tensors are zero-copy views when their address is aligned to the
// element size; the view keeps the mapping alive. Writing to a view never touches the file, but tensors
// taken from the same File share pages: clone() before mutating in place if you read that tensor again.
// Truncating a file while it is mapped is undefined (SIGBUS), as for every mmap reader.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qlora::st {

// The dtypes of safetensors' format we read and write (F4/F6/F8_E8M0/complex are rejected by name).
enum class DType { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2 };

// "F32", "BF16", ... exactly as in the header.
const char* dtype_name(DType);
// Bytes per element.
size_t dtype_size(DType);
at::ScalarType to_scalar_type(DType);
// Throws qlora::Error for scalar types safetensors cannot hold (complex, quantized, ...).
DType from_scalar_type(at::ScalarType);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;  // [] for a scalar; dims may be 0
  uint64_t begin, end;         // [begin, end) bytes within the data section
};

// One memory-mapped .safetensors file whose header was validated on open.
class File {
 public:
  static std::shared_ptr<File> open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  // Tensor names in header order.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  // Throws (naming the file, the tensor and the nearest existing name) when absent.
  const TensorInfo& info(const std::string& name) const;
  // CPU tensor of info(name).shape and dtype: a zero-copy view of the mapping when aligned, else a copy.
  // BOOL data must hold only bytes 0 and 1.
  at::Tensor tensor(const std::string& name) const;
  // The "__metadata__" map (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  struct Mapping;  // the mmap region; shared with every view tensor

 private:
  File() = default;
  std::filesystem::path path_;
  std::shared_ptr<Mapping> map_;
  const uint8_t* data_ = nullptr;  // start of the data section inside the mapping
  std::vector<std::string> names_;
  std::vector<TensorInfo> infos_;  // same order as names_
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A model: a directory holding model.safetensors or model.safetensors.index.json (+ its shards), an
// index.json file itself, or a single .safetensors file. Names are unique across shards; every tensor
// of every shard is listed in the index's weight_map under that shard.
class Checkpoint {
 public:
  static Checkpoint open(const std::filesystem::path& dir_or_file);

  // Shards in file-name order, each shard's names in header order.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;
  at::Tensor tensor(const std::string& name) const;
  // As tensor(name), but first requires the stored shape (and dtype, when given) to match; the error
  // names the file, the tensor, and the expected and actual shape or dtype.
  at::Tensor tensor(const std::string& name, at::IntArrayRef expected_shape,
                    std::optional<DType> expected_dtype = std::nullopt) const;
  // The file holding `name`.
  const File& file_of(const std::string& name) const;
  const std::vector<std::shared_ptr<File>>& files() const { return files_; }
  // What was opened (directory, index.json or file), for messages.
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::vector<std::shared_ptr<File>> files_;
  std::vector<std::string> names_;
  std::unordered_map<std::string, size_t> where_;  // name -> index into files_
};

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes one .safetensors file atomically (path.tmp-<pid>, fsync, rename). Tensors may live on any
// device and be non-contiguous; they are written as contiguous CPU bytes. The header lists them in the
// given order; the data section orders them by element size, largest first (stable), so every tensor
// is aligned to its element size as in Python's writer. The header is padded with spaces to a multiple
// of 8 bytes. Throws for duplicate or reserved names and unsupported dtypes.
void save(const std::filesystem::path& path, const NamedTensors& tensors,
          const std::map<std::string, std::string>& metadata = {});

// Writes a Hugging Face checkpoint into `dir` (created if needed): shards of at most max_shard_bytes of
// tensor data (a larger tensor gets a shard of its own), filled greedily in the given order, named
// model-00001-of-0000N.safetensors, plus model.safetensors.index.json
// {"metadata": {"total_size": bytes}, "weight_map": {name: shard}}; a single shard is written as plain
// model.safetensors instead. Each file is atomic; a stale model.safetensors or index.json of the other
// layout is removed so the directory is unambiguous. For an all-or-nothing directory wrap this in
// qlora::write_dir_atomic.
void save_sharded(const std::filesystem::path& dir, const NamedTensors& tensors, uint64_t max_shard_bytes,
                  const std::map<std::string, std::string>& metadata = {});

}  // namespace qlora::st
