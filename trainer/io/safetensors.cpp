// safetensors reader/writer and sharded checkpoints. See safetensors.h for the format and invariants.
// Validation order on open: sizes of the file and header (before any parse), JSON well-formedness
// (duplicate keys and nesting depth checked while parsing), each entry on its own, then the layout of
// all entries together. All arithmetic on header numbers is bounded or overflow-checked first.
#include "trainer/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "trainer/core/error.h"

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace qlora::st {

namespace {

using ojson = nlohmann::ordered_json;

// The Python/Rust library's limit; real headers are well under 10 MB even for 70B-parameter models.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Our header is at most 3 levels deep (root, entry, shape); anything deeper is not a safetensors header.
constexpr int kMaxJsonDepth = 4;

struct DTypeRow {
  DType dtype;
  const char* name;
  size_t size;
  at::ScalarType scalar;
};
constexpr DTypeRow kDTypes[] = {
    {DType::BOOL, "BOOL", 1, at::kBool},         {DType::U8, "U8", 1, at::kByte},
    {DType::I8, "I8", 1, at::kChar},             {DType::I16, "I16", 2, at::kShort},
    {DType::U16, "U16", 2, at::kUInt16},         {DType::F16, "F16", 2, at::kHalf},
    {DType::BF16, "BF16", 2, at::kBFloat16},     {DType::I32, "I32", 4, at::kInt},
    {DType::U32, "U32", 4, at::kUInt32},         {DType::F32, "F32", 4, at::kFloat},
    {DType::F64, "F64", 8, at::kDouble},         {DType::I64, "I64", 8, at::kLong},
    {DType::U64, "U64", 8, at::kUInt64},         {DType::F8_E4M3, "F8_E4M3", 1, at::kFloat8_e4m3fn},
    {DType::F8_E5M2, "F8_E5M2", 1, at::kFloat8_e5m2},
};
// Valid in the format but not representable here; named so the error can say "unsupported", not "unknown".
constexpr const char* kUnsupportedDTypes[] = {"F4",      "F6_E2M3",     "F6_E3M2", "F8_E8M0",
                                                   "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"};

const DTypeRow& row(DType d) {
  for (const auto& r : kDTypes)
    if (r.dtype == d) return r;
  TORCH_CHECK(false, "invalid qlora::st::DType ", static_cast<int>(d));
}

std::string shape_str(at::IntArrayRef shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

std::string errno_str() { return std::strerror(errno); }

}  // namespace

const char* dtype_name(DType d) { return row(d).name; }
size_t dtype_size(DType d) { return row(d).size; }
at::ScalarType to_scalar_type(DType d) { return row(d).scalar; }

DType from_scalar_type(at::ScalarType s) {
  for (const auto& r : kDTypes)
    if (r.scalar == s) return r.dtype;
  fail("scalar type {} cannot be stored in safetensors (supported: bool, integer, float16/32/64, bfloat16, "
       "float8_e4m3fn, float8_e5m2)",
       c10::toString(s));
}

// ---------------------------------------------------------------------------------------------------
// Reading

struct File::Mapping {
  void* addr = MAP_FAILED;
  size_t size = 0;
  ~Mapping() {
    if (addr != MAP_FAILED) ::munmap(addr, size);
  }
};

namespace {

// Parses `text` as JSON, rejecting duplicate keys at any level (nlohmann would silently keep the last)
// and nesting deeper than max_depth. `where` prefixes every message.
template <typename Json>
Json parse_strict_json(const std::string& text, const std::string& where, int max_depth) {
  std::vector<std::set<std::string>> keys;  // one set per open object; arrays push an empty placeholder
  auto cb = [&](int depth, nlohmann::json::parse_event_t ev, Json& parsed) -> bool {
    using E = nlohmann::json::parse_event_t;
    switch (ev) {
      case E::object_start:
      case E::array_start:
        if (depth >= max_depth) fail("{}: JSON nested deeper than {} levels", where, max_depth);
        keys.emplace_back();
        break;
      case E::object_end:
      case E::array_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case E::key: {
        const std::string& k = parsed.template get_ref<const std::string&>();
        if (!keys.empty() && !keys.back().insert(k).second) fail("{}: duplicate key \"{}\"", where, k);
        break;
      }
      default:
        break;
    }
    return true;
  };
  // nlohmann stops at a NUL as if the input ended there; JSON never contains a raw NUL.
  if (size_t z = text.find('\0'); z != std::string::npos)
    fail("{}: not valid JSON: NUL byte at offset {}", where, z);
  try {
    return Json::parse(text, cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: not valid JSON: {}", where, e.what());
  }
}

uint64_t json_u64(const ojson& v, const std::string& where) {
  QLORA_REQUIRE(v.is_number_unsigned(), "{}: expected a non-negative integer, got {}", where, v.dump());
  return v.get<uint64_t>();
}

// Validates one header entry; never touches the data.
TensorInfo parse_entry(const std::string& name, const ojson& v, const std::string& file) {
  std::string where = fmt::format("{}: tensor '{}'", file, name);
  QLORA_REQUIRE(v.is_object(), "{}: header entry must be an object with dtype, shape, data_offsets, got {}", where,
                v.type_name());
  for (const auto& [k, _] : v.items())
    QLORA_REQUIRE(k == "dtype" || k == "shape" || k == "data_offsets",
                  "{}: unknown key \"{}\" (expected dtype, shape, data_offsets)", where, k);
  for (const char* k : {"dtype", "shape", "data_offsets"})
    QLORA_REQUIRE(v.contains(k), "{}: missing \"{}\"", where, k);

  TensorInfo info;
  info.name = name;
  const auto& dt = v["dtype"];
  QLORA_REQUIRE(dt.is_string(), "{}: dtype must be a string, got {}", where, dt.dump());
  const std::string& ds = dt.get_ref<const std::string&>();
  const DTypeRow* found = nullptr;
  for (const auto& r : kDTypes)
    if (ds == r.name) found = &r;
  if (!found) {
    for (const char* u : kUnsupportedDTypes)
      if (ds == u) fail("{}: dtype {} is not supported by this reader", where, ds);
    fail("{}: unknown dtype \"{}\" (expected one of BOOL U8 I8 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64 "
         "F8_E4M3 F8_E5M2)",
         where, ds);
  }
  info.dtype = found->dtype;

  const auto& sh = v["shape"];
  QLORA_REQUIRE(sh.is_array(), "{}: shape must be an array, got {}", where, sh.type_name());
  uint64_t numel = 1;
  for (size_t i = 0; i < sh.size(); ++i) {
    uint64_t d = json_u64(sh[i], fmt::format("{}: shape[{}]", where, i));
    QLORA_REQUIRE(d <= static_cast<uint64_t>(INT64_MAX), "{}: shape[{}] = {} is too large", where, i, d);
    info.shape.push_back(static_cast<int64_t>(d));
    QLORA_REQUIRE(!__builtin_mul_overflow(numel, d, &numel) && numel <= static_cast<uint64_t>(INT64_MAX),
                  "{}: the element count of shape {} overflows 64 bits", where, sh.dump());
  }
  uint64_t nbytes = 0;
  QLORA_REQUIRE(!__builtin_mul_overflow(numel, static_cast<uint64_t>(found->size), &nbytes),
                "{}: the byte count of shape {} x {} overflows 64 bits", where, sh.dump(), ds);

  const auto& off = v["data_offsets"];
  QLORA_REQUIRE(off.is_array() && off.size() == 2, "{}: data_offsets must be [begin, end], got {}", where,
                off.dump());
  info.begin = json_u64(off[0], where + ": data_offsets[0]");
  info.end = json_u64(off[1], where + ": data_offsets[1]");
  QLORA_REQUIRE(info.begin <= info.end, "{}: data_offsets [{}, {}) end before they begin", where, info.begin,
                info.end);
  QLORA_REQUIRE(info.end - info.begin == nbytes,
                "{}: data_offsets [{}, {}) span {} bytes but dtype {} x shape {} needs {} bytes", where,
                info.begin, info.end, info.end - info.begin, ds, sh.dump(), nbytes);
  return info;
}

}  // namespace

std::shared_ptr<File> File::open(const std::filesystem::path& path) {
  const std::string file = path.string();
  auto self = std::shared_ptr<File>(new File());
  self->path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  QLORA_REQUIRE(fd >= 0, "cannot open safetensors file {}: {}", file, errno_str());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", file);
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail("{}: truncated safetensors file: {} bytes, fewer than the 8-byte header length", file, size);
  }
  self->map_ = std::make_shared<Mapping>();
  // PROT_WRITE + MAP_PRIVATE: views may be written without faulting (copy-on-write, the file never
  // changes); MAP_NORESERVE keeps multi-GB checkpoints from being charged as private memory up front.
  self->map_->addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
  int map_errno = errno;
  ::close(fd);
  QLORA_REQUIRE(self->map_->addr != MAP_FAILED, "{}: mmap of {} bytes failed: {}", file, size,
                std::strerror(map_errno));
  self->map_->size = size;
  const auto* base = static_cast<const uint8_t*>(self->map_->addr);

  uint64_t n = 0;
  std::memcpy(&n, base, 8);
  QLORA_REQUIRE(n <= kMaxHeaderBytes,
                "{}: header length {} exceeds the {}-byte limit (corrupt, or not a safetensors file)", file, n,
                kMaxHeaderBytes);
  QLORA_REQUIRE(8 + n <= size,
                "{}: truncated safetensors file: header length {} reaches beyond the file end ({} bytes)", file,
                n, size);
  QLORA_REQUIRE(n >= 2, "{}: header length {} is too short for a JSON object", file, n);
  self->data_ = base + 8 + n;
  const uint64_t data_len = size - 8 - n;

  std::string header(reinterpret_cast<const char*>(base + 8), n);
  ojson h;
  try {
    h = parse_strict_json<ojson>(header, file + ": header", kMaxJsonDepth);
    QLORA_REQUIRE(h.is_object(), "{}: header is a JSON {}, expected an object", file, h.type_name());
    for (const auto& [name, v] : h.items()) {
      if (name == "__metadata__") {
        QLORA_REQUIRE(v.is_object(), "{}: __metadata__ must be an object of strings, got {}", file, v.type_name());
        for (const auto& [k, mv] : v.items()) {
          QLORA_REQUIRE(mv.is_string(), "{}: __metadata__ \"{}\" must be a string, got {}", file, k, mv.dump());
          self->metadata_[k] = mv.get<std::string>();
        }
        continue;
      }
      self->infos_.push_back(parse_entry(name, v, file));
      self->names_.push_back(name);
      self->index_[name] = self->infos_.size() - 1;  // keys are unique: the parser rejected duplicates
    }
  } catch (const nlohmann::json::exception& e) {  // defensive: no nlohmann error escapes unnamed
    fail("{}: malformed header: {}", file, e.what());
  }

  // Layout: sorted by offset the tensors must tile [0, data_len) exactly, as the Rust library requires.
  for (const auto& t : self->infos_)
    QLORA_REQUIRE(t.end <= data_len,
                  "{}: tensor '{}': data_offsets [{}, {}) out of bounds: the data section has {} bytes "
                  "(truncated file?)",
                  file, t.name, t.begin, t.end, data_len);
  std::vector<const TensorInfo*> order;
  for (const auto& t : self->infos_) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* t : order) {
    if (t->begin < pos)
      fail("{}: tensors '{}' [{}, {}) and '{}' [{}, {}) overlap", file, prev->name, prev->begin, prev->end,
           t->name, t->begin, t->end);
    if (t->begin > pos)
      fail("{}: hole of {} bytes before tensor '{}' at data offset {} (tensors must be contiguous)", file,
           t->begin - pos, t->name, pos);
    pos = t->end;
    prev = t;
  }
  QLORA_REQUIRE(pos == data_len, "{}: {} trailing bytes after the last tensor (data section {} bytes, tensors end at {})",
                file, data_len - pos, data_len, pos);
  return self;
}

const TensorInfo& File::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    std::string near = nearest(name, names_);
    fail("{}: no tensor named '{}' ({} tensors{})", path_.string(), name, names_.size(),
         near.empty() ? "" : fmt::format("; did you mean '{}'?", near));
  }
  return infos_[it->second];
}

at::Tensor File::tensor(const std::string& name) const {
  const TensorInfo& t = info(name);
  const DTypeRow& r = row(t.dtype);
  const uint8_t* src = data_ + t.begin;
  const uint64_t nbytes = t.end - t.begin;
  if (t.dtype == DType::BOOL) {
    // torch assumes bool bytes are 0 or 1; anything else is undefined behaviour downstream.
    const void* bad = std::find_if(src, src + nbytes, [](uint8_t b) { return b > 1; });
    if (bad != src + nbytes) {
      uint64_t i = static_cast<const uint8_t*>(bad) - src;
      fail("{}: tensor '{}' (BOOL) holds byte {} at element {}; expected 0 or 1", path_.string(), name, src[i], i);
    }
  }
  auto opts = at::TensorOptions().dtype(r.scalar).device(at::kCPU);
  if (reinterpret_cast<uintptr_t>(src) % r.size == 0) {
    auto keep = map_;
    return at::from_blob(const_cast<uint8_t*>(src), t.shape, [keep](void*) {}, opts);
  }
  at::Tensor out = at::empty(t.shape, opts);
  if (nbytes) std::memcpy(out.data_ptr(), src, nbytes);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Checkpoints

namespace {

void open_index(const std::filesystem::path& index_path, std::vector<std::shared_ptr<File>>& files,
                                 std::unordered_map<std::string, size_t>& where,
                                 std::vector<std::string>& names) {
  const std::string ip = index_path.string();
  std::string text;
  {
    std::FILE* f = std::fopen(index_path.c_str(), "rb");
    QLORA_REQUIRE(f, "cannot open {}: {}", ip, errno_str());
    char buf[65536];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) {
      text.append(buf, got);
      if (text.size() > kMaxHeaderBytes) {
        std::fclose(f);
        fail("{}: larger than {} bytes; not a checkpoint index", ip, kMaxHeaderBytes);
      }
    }
    std::fclose(f);
  }
  ojson j;
  std::map<std::string, std::vector<std::string>> by_shard;  // shard file -> names the index puts there
  std::unordered_map<std::string, std::string> shard_of;
  try {
    j = parse_strict_json<ojson>(text, ip, kMaxJsonDepth);
    QLORA_REQUIRE(j.is_object(), "{}: expected a JSON object with \"weight_map\", got {}", ip, j.type_name());
    QLORA_REQUIRE(j.contains("weight_map"), "{}: missing \"weight_map\"", ip);
    const auto& wm = j["weight_map"];
    QLORA_REQUIRE(wm.is_object(), "{}: \"weight_map\" must be an object of tensor name -> shard file, got {}", ip,
                  wm.type_name());
    if (j.contains("metadata"))
      QLORA_REQUIRE(j["metadata"].is_object(), "{}: \"metadata\" must be an object, got {}", ip,
                    j["metadata"].type_name());
    for (const auto& [name, shard] : wm.items()) {
      QLORA_REQUIRE(shard.is_string(), "{}: weight_map[\"{}\"] must be a file name string, got {}", ip, name,
                    shard.dump());
      const std::string& s = shard.get_ref<const std::string&>();
      // Shards live beside the index: a path component would let an untrusted index read anywhere.
      QLORA_REQUIRE(!s.empty() && s.find('/') == std::string::npos && s != "." && s != "..",
                    "{}: weight_map[\"{}\"] = \"{}\" is not a plain file name beside the index", ip, name, s);
      by_shard[s].push_back(name);
      shard_of[name] = s;
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed index: {}", ip, e.what());
  }
  QLORA_REQUIRE(!by_shard.empty(), "{}: weight_map is empty", ip);

  const auto dir = index_path.parent_path();
  for (const auto& [shard, listed] : by_shard) {
    auto sp = dir / shard;
    QLORA_REQUIRE(std::filesystem::exists(sp), "{}: shard {} (holding '{}') does not exist at {}", ip, shard,
                  listed.front(), sp.string());
    auto f = File::open(sp);
    for (const auto& name : listed)
      QLORA_REQUIRE(f->contains(name), "{}: weight_map puts '{}' in {}, but that shard has no such tensor", ip,
                    name, shard);
    for (const auto& name : f->names()) {
      auto it = shard_of.find(name);
      QLORA_REQUIRE(it != shard_of.end(), "{}: tensor '{}' of shard {} is not listed in weight_map", ip, name,
                    shard);
      // Listed under another shard while also present here: the same name in two shards.
      QLORA_REQUIRE(it->second == shard, "{}: tensor '{}' is in both {} and {}", ip, name, shard, it->second);
      where[name] = files.size();
      names.push_back(name);
    }
    files.push_back(std::move(f));
  }
}

}  // namespace

Checkpoint Checkpoint::open(const std::filesystem::path& p) {
  namespace fs = std::filesystem;
  Checkpoint c;
  c.path_ = p;
  QLORA_REQUIRE(fs::exists(p), "checkpoint {} does not exist", p.string());
  fs::path index, single;
  if (fs::is_directory(p)) {
    bool has_index = fs::exists(p / "model.safetensors.index.json");
    bool has_single = fs::exists(p / "model.safetensors");
    QLORA_REQUIRE(!(has_index && has_single),
                  "{}: holds both model.safetensors and model.safetensors.index.json; remove the stale one", p.string());
    QLORA_REQUIRE(has_index || has_single, "{}: no model.safetensors or model.safetensors.index.json", p.string());
    if (has_index)
      index = p / "model.safetensors.index.json";
    else
      single = p / "model.safetensors";
  } else if (p.filename().string().ends_with(".index.json")) {
    index = p;
  } else {
    single = p;
  }
  if (!index.empty()) {
    open_index(index, c.files_, c.where_, c.names_);
  } else {
    c.files_.push_back(File::open(single));
    c.names_ = c.files_[0]->names();
    for (const auto& n : c.names_) c.where_[n] = 0;
  }
  return c;
}

const File& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    std::string near = nearest(name, names_);
    fail("{}: no tensor named '{}' ({} tensors in {} file(s){})", path_.string(), name, names_.size(),
         files_.size(), near.empty() ? "" : fmt::format("; did you mean '{}'?", near));
  }
  return *files_[it->second];
}

const TensorInfo& Checkpoint::info(const std::string& name) const { return file_of(name).info(name); }
at::Tensor Checkpoint::tensor(const std::string& name) const { return file_of(name).tensor(name); }

at::Tensor Checkpoint::tensor(const std::string& name, at::IntArrayRef expected_shape,
                              std::optional<DType> expected_dtype) const {
  const File& f = file_of(name);
  const TensorInfo& t = f.info(name);
  QLORA_REQUIRE(at::IntArrayRef(t.shape) == expected_shape, "{}: tensor '{}' has shape {}, expected {}",
                f.path().string(), name, shape_str(t.shape), shape_str(expected_shape));
  QLORA_REQUIRE(!expected_dtype || *expected_dtype == t.dtype, "{}: tensor '{}' has dtype {}, expected {}",
                f.path().string(), name, dtype_name(t.dtype), expected_dtype ? dtype_name(*expected_dtype) : "");
  return f.tensor(name);
}

// ---------------------------------------------------------------------------------------------------
// Writing

namespace {

struct Prepared {
  std::string name;
  DType dtype;
  at::Tensor t;  // contiguous CPU
  uint64_t nbytes;
};

std::vector<Prepared> prepare(const std::filesystem::path& path, const NamedTensors& tensors) {
  std::vector<Prepared> out;
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    QLORA_REQUIRE(name != "__metadata__", "{}: '__metadata__' is reserved and cannot name a tensor", path.string());
    QLORA_REQUIRE(seen.insert(name).second, "{}: tensor name '{}' given twice", path.string(), name);
    QLORA_REQUIRE(t.defined(), "{}: tensor '{}' is undefined", path.string(), name);
    DType d;
    try {
      d = from_scalar_type(t.scalar_type());
    } catch (const Error& e) {
      fail("{}: tensor '{}': {}", path.string(), name, e.what());
    }
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    out.push_back({name, d, c, static_cast<uint64_t>(c.numel()) * dtype_size(d)});
  }
  return out;
}

void write_prepared(const std::filesystem::path& path, const std::vector<Prepared>& ts,
                    const std::map<std::string, std::string>& metadata) {
  const std::string file = path.string();
  // Data order: element size descending, stable; every offset is then a multiple of its element size.
  std::vector<size_t> order(ts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return dtype_size(ts[a].dtype) > dtype_size(ts[b].dtype); });
  std::vector<uint64_t> begin(ts.size());
  uint64_t pos = 0;
  for (size_t i : order) begin[i] = pos, pos += ts[i].nbytes;

  ojson h = ojson::object();
  if (!metadata.empty()) {
    ojson m = ojson::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = m;
  }
  for (size_t i = 0; i < ts.size(); ++i) {
    ojson e = ojson::object();
    e["dtype"] = dtype_name(ts[i].dtype);
    e["shape"] = ts[i].t.sizes().vec();
    e["data_offsets"] = {begin[i], begin[i] + ts[i].nbytes};
    h[ts[i].name] = e;
  }
  std::string header;
  try {
    header = h.dump();
  } catch (const nlohmann::json::type_error& e) {  // invalid UTF-8 in a name or metadata
    fail("{}: cannot write header: {}", file, e.what());
  }
  header.append((8 - header.size() % 8) % 8, ' ');
  uint64_t n = header.size();

  auto tmp = path;
  tmp += fmt::format(".tmp-{}", ::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  QLORA_REQUIRE(f, "cannot open {} for writing: {}", tmp.string(), errno_str());
  bool ok = std::fwrite(&n, 8, 1, f) == 1 && std::fwrite(header.data(), 1, n, f) == n;
  for (size_t i : order) {
    if (!ok) break;
    if (ts[i].nbytes) ok = std::fwrite(ts[i].t.data_ptr(), 1, ts[i].nbytes, f) == ts[i].nbytes;
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  int err = errno;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    fail("writing {} failed: {}", tmp.string(), std::strerror(err));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    fail("cannot rename {} to {}: {}", tmp.string(), file, ec.message());
  }
}

}  // namespace

void save(const std::filesystem::path& path, const NamedTensors& tensors,
          const std::map<std::string, std::string>& metadata) {
  write_prepared(path, prepare(path, tensors), metadata);
}

void save_sharded(const std::filesystem::path& dir, const NamedTensors& tensors, uint64_t max_shard_bytes,
                  const std::map<std::string, std::string>& metadata) {
  namespace fs = std::filesystem;
  QLORA_REQUIRE(max_shard_bytes > 0, "{}: max_shard_bytes must be positive", dir.string());
  std::error_code ec;
  fs::create_directories(dir, ec);
  QLORA_REQUIRE(!ec && fs::is_directory(dir), "cannot create checkpoint directory {}: {}", dir.string(),
                ec ? ec.message() : "exists and is not a directory");
  auto all = prepare(dir, tensors);

  std::vector<std::vector<Prepared>> shards;
  uint64_t cur = 0, total = 0;
  for (auto& p : all) {
    if (shards.empty() || (cur + p.nbytes > max_shard_bytes && cur > 0)) shards.emplace_back(), cur = 0;
    cur += p.nbytes;
    total += p.nbytes;
    shards.back().push_back(std::move(p));
  }
  if (shards.empty()) shards.emplace_back();  // an empty model is still one (empty) file

  const fs::path single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
  std::set<std::string> written;
  // Files of an earlier save with another layout would otherwise linger and make the directory ambiguous.
  auto remove_stale = [&] {
    static const std::regex shard_re(R"(model-\d{5}-of-\d{5}\.safetensors)");
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      std::string name = e.path().filename().string();
      if (std::regex_match(name, shard_re) && !written.count(name)) fs::remove(e.path(), ec);
    }
  };
  if (shards.size() == 1) {
    write_prepared(single, shards[0], metadata);
    fs::remove(index, ec);
    remove_stale();
    return;
  }
  nlohmann::json wm = nlohmann::json::object();  // sorted keys, as transformers writes it
  for (size_t s = 0; s < shards.size(); ++s) {
    std::string fname = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
    write_prepared(dir / fname, shards[s], metadata);
    written.insert(fname);
    for (const auto& p : shards[s]) wm[p.name] = fname;
  }
  nlohmann::json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", wm}};
  std::string text = idx.dump(2) + "\n";
  auto tmp = index;
  tmp += fmt::format(".tmp-{}", ::getpid());
  {
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    QLORA_REQUIRE(f, "cannot open {} for writing: {}", tmp.string(), errno_str());
    bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0;
    ok = (std::fclose(f) == 0) && ok;
    QLORA_REQUIRE(ok, "writing {} failed: {}", tmp.string(), errno_str());
  }
  fs::rename(tmp, index);
  fs::remove(single, ec);
  remove_stale();
}

}  // namespace qlora::st
