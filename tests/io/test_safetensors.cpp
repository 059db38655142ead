// safetensors interop with the reference Python library, both directions:
//  - files written by Python (fixture io_py_files, manifest of sha256 per tensor computed in Python) load
//    here with the same dtype, shape, bytes and metadata; ours reproduce Python's file byte for byte;
//  - files written here (random tensors of every dtype, non-contiguous inputs, metadata, sharded) plus a
//    manifest land in $QLORA_TEST_DATA/io/cpp for the Python check io_py_reads_cpp (fixture io_cpp_files).
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>

#include "tests/io/sha256.h"
#include "tests/test_util.h"
#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"

namespace st = qlora::st;
namespace fs = std::filesystem;
using nlohmann::json;
using qlora::test::sha256_hex;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p);
  EXPECT_TRUE(in.good()) << p;
  return json::parse(in);
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

constexpr st::DType kAll[] = {st::DType::BOOL, st::DType::U8,   st::DType::I8,      st::DType::I16,
                              st::DType::U16,  st::DType::F16,  st::DType::BF16,    st::DType::I32,
                              st::DType::U32,  st::DType::F32,  st::DType::F64,     st::DType::I64,
                              st::DType::U64,  st::DType::F8_E4M3, st::DType::F8_E5M2};

// Random bit patterns of `d` (NaNs included: everything here compares bytes, never values).
at::Tensor random_tensor(st::DType d, std::vector<int64_t> shape, at::Generator& gen) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  if (d == st::DType::BOOL) return at::randint(0, 2, {n}, gen, at::kLong).to(at::kBool).reshape(shape);
  int64_t size = static_cast<int64_t>(st::dtype_size(d));
  return at::randint(0, 256, {n * size}, gen, at::kByte).view(st::to_scalar_type(d)).reshape(shape).clone();
}

// Checks every tensor of `tensors` (a manifest's name -> {dtype, shape, sha256}) against `get`.
void expect_matches_manifest(const json& tensors, const std::vector<std::string>& names,
                             const std::function<at::Tensor(const std::string&)>& get,
                             const std::function<const st::TensorInfo&(const std::string&)>& info,
                             const std::string& what) {
  std::set<std::string> expected, got(names.begin(), names.end());
  for (const auto& [name, _] : tensors.items()) expected.insert(name);
  EXPECT_EQ(got, expected) << what;
  EXPECT_EQ(names.size(), got.size()) << what << ": duplicate names";
  for (const auto& [name, m] : tensors.items()) {
    if (!got.count(name)) continue;
    const st::TensorInfo& i = info(name);
    at::Tensor t = get(name);
    EXPECT_EQ(st::dtype_name(i.dtype), m["dtype"].get<std::string>()) << what << " " << name;
    EXPECT_EQ(i.shape, m["shape"].get<std::vector<int64_t>>()) << what << " " << name;
    EXPECT_EQ(t.sizes().vec(), m["shape"].get<std::vector<int64_t>>()) << what << " " << name;
    EXPECT_EQ(t.scalar_type(), st::to_scalar_type(i.dtype)) << what << " " << name;
    EXPECT_EQ(sha256_hex(t), m["sha256"].get<std::string>()) << what << " " << name;
  }
}

fs::path py_dir() { return qlora::test::data_dir() / "io" / "py"; }

}  // namespace

TEST(Sha256, FipsVectors) {
  EXPECT_EQ(sha256_hex(std::string()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex(std::string("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(std::string("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(DTypes, ScalarTypeRoundTrip) {
  for (st::DType d : kAll) {
    EXPECT_EQ(st::from_scalar_type(st::to_scalar_type(d)), d) << st::dtype_name(d);
    EXPECT_EQ(st::dtype_size(d), at::elementSize(st::to_scalar_type(d))) << st::dtype_name(d);
  }
}

TEST(ReadPython, EveryFileMatchesManifest) {
  json manifest = read_json(py_dir() / "manifest.json");
  ASSERT_GE(manifest["files"].size(), 3u);
  for (const auto& [fname, m] : manifest["files"].items()) {
    auto f = st::File::open(py_dir() / fname);
    expect_matches_manifest(
        m["tensors"], f->names(), [&](const std::string& n) { return f->tensor(n); },
        [&](const std::string& n) -> const st::TensorInfo& { return f->info(n); }, fname);
    EXPECT_EQ(f->metadata(), (m["metadata"].get<std::map<std::string, std::string>>())) << fname;
    // The same through the Checkpoint front door (a single file).
    auto c = st::Checkpoint::open(py_dir() / fname);
    expect_matches_manifest(
        m["tensors"], c.names(), [&](const std::string& n) { return c.tensor(n); },
        [&](const std::string& n) -> const st::TensorInfo& { return c.info(n); }, fname + " (checkpoint)");
  }
}

TEST(ReadPython, ShardedCheckpoint) {
  json m = read_json(py_dir() / "manifest.json")["checkpoints"]["sharded"];
  for (fs::path p : {py_dir() / "sharded", py_dir() / "sharded" / "model.safetensors.index.json"}) {
    auto c = st::Checkpoint::open(p);
    EXPECT_EQ(c.files().size(), m["shards"].size()) << p;
    expect_matches_manifest(
        m["tensors"], c.names(), [&](const std::string& n) { return c.tensor(n); },
        [&](const std::string& n) -> const st::TensorInfo& { return c.info(n); }, p.string());
    for (const auto& [name, shard] : m["weight_map"].items())
      EXPECT_EQ(c.file_of(name).path().filename().string(), shard.get<std::string>()) << name;
    // The loader-facing overload passes with the right shape/dtype.
    EXPECT_EQ(c.tensor("model.norm.weight", {16}, st::DType::F32).numel(), 16);
  }
}

TEST(ReadPython, ZeroCopyViewsOutliveTheFile) {
  auto path = py_dir() / "all_dtypes.safetensors";
  const std::string expected = read_json(py_dir() / "manifest.json")["files"]["all_dtypes.safetensors"]["tensors"]
                                   ["t.f32"]["sha256"];
  auto f = st::File::open(path);
  at::Tensor a = f->tensor("t.f32"), b = f->tensor("t.f32");
  // Python's writer aligns every tensor, so these are views of the mapping: both share one address.
  EXPECT_EQ(a.data_ptr(), b.data_ptr());
  f.reset();  // the views keep the mapping alive
  EXPECT_EQ(sha256_hex(a), expected);
  // Writing to a view is copy-on-write: no fault, and the file on disk is unchanged.
  a.zero_();
  EXPECT_EQ(sha256_hex(st::File::open(path)->tensor("t.f32")), expected);
}

TEST(WritePython, ReproducesPythonFilesByteForByte) {
  // Given Python's header order, our writer lays out the same bytes: same JSON, same padding, same data order.
  for (const char* name : {"one_meta.safetensors", "empty.safetensors"}) {
    auto src = st::File::open(py_dir() / name);
    st::NamedTensors ts;
    for (const auto& n : src->names()) ts.emplace_back(n, src->tensor(n));
    auto out = qlora::test::temp_dir("io-repro") / name;
    st::save(out, ts, src->metadata());
    EXPECT_EQ(read_bytes(out), read_bytes(py_dir() / name)) << name;
  }
}

TEST(Write, RoundTripEveryDTypeAndLayout) {
  at::Generator gen = at::detail::createCPUGenerator(7);
  st::NamedTensors ts;
  std::vector<at::Tensor> want;
  for (st::DType d : kAll) {
    std::string n = st::dtype_name(d);
    ts.emplace_back("odd." + n, random_tensor(d, {3}, gen));  // odd byte counts before wider dtypes
    ts.emplace_back("m." + n, random_tensor(d, {4, 5}, gen).t());  // transposed: non-contiguous
    ts.emplace_back("s." + n, random_tensor(d, {}, gen));
    ts.emplace_back("e." + n, random_tensor(d, {2, 0}, gen));
  }
  ts.emplace_back("strided", random_tensor(st::DType::F32, {6, 8}, gen).slice(1, 1, 8, 3));
  ts.emplace_back("expanded", random_tensor(st::DType::I16, {1, 3}, gen).expand({4, 3}));
  auto path = qlora::test::temp_dir("io-rt") / "rt.safetensors";
  st::save(path, ts, {{"format", "pt"}, {"k", "v"}});

  std::string raw = read_bytes(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u) << "header must be padded to 8 bytes";
  EXPECT_EQ(raw[8], '{');

  auto f = st::File::open(path);
  ASSERT_EQ(f->names().size(), ts.size());
  EXPECT_EQ(f->metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"k", "v"}}));
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& [name, t] = ts[i];
    EXPECT_EQ(f->names()[i], name) << "header order is the given order";
    const auto& info = f->info(name);
    EXPECT_EQ(info.begin % st::dtype_size(info.dtype), 0u) << name << " is not aligned";
    at::Tensor back = f->tensor(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(back.sizes(), t.sizes()) << name;
    EXPECT_EQ(sha256_hex(back), sha256_hex(t)) << name;
  }
  EXPECT_FALSE(fs::exists(path.string() + ".tmp-" + std::to_string(::getpid()))) << "temporary file left behind";
}

TEST(Write, ShardedLayoutAndCleanup) {
  at::Generator gen = at::detail::createCPUGenerator(11);
  st::NamedTensors ts;
  for (int i = 0; i < 7; ++i) ts.emplace_back(fmt::format("layer.{}.w", i), random_tensor(st::DType::BF16, {10, 10}, gen));
  ts.emplace_back("big", random_tensor(st::DType::F32, {100}, gen));  // 400 bytes > shard size: own shard
  auto dir = qlora::test::temp_dir("io-shard");
  st::save_sharded(dir, ts, 450, {{"format", "pt"}});  // 200-byte tensors: two per shard

  json idx = read_json(dir / "model.safetensors.index.json");
  EXPECT_EQ(idx["metadata"]["total_size"].get<uint64_t>(), 7u * 200 + 400);
  std::set<std::string> shards;
  for (const auto& [_, s] : idx["weight_map"].items()) shards.insert(s.get<std::string>());
  EXPECT_EQ(shards, (std::set<std::string>{"model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors",
                                           "model-00003-of-00005.safetensors", "model-00004-of-00005.safetensors",
                                           "model-00005-of-00005.safetensors"}));
  EXPECT_EQ(idx["weight_map"]["big"], "model-00005-of-00005.safetensors");
  EXPECT_EQ(idx["weight_map"]["layer.6.w"], "model-00004-of-00005.safetensors");
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  auto c = st::Checkpoint::open(dir);
  ASSERT_EQ(c.names().size(), ts.size());
  for (const auto& [name, t] : ts) EXPECT_EQ(sha256_hex(c.tensor(name)), sha256_hex(t)) << name;
  EXPECT_EQ(c.file_of("big").metadata().at("format"), "pt");

  // Re-saving as one file removes the index and the old shards: the directory is never ambiguous.
  st::save_sharded(dir, ts, 1 << 20);
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir / "model-00001-of-00005.safetensors"));
  EXPECT_EQ(st::Checkpoint::open(dir).files().size(), 1u);
  // And back to shards: model.safetensors goes.
  st::save_sharded(dir, ts, 450);
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  EXPECT_EQ(st::Checkpoint::open(dir).files().size(), 5u);
}

// Fixture for the Python check (tests/io/check_cpp_files.py): files written by us + a manifest whose
// digests are computed from the inputs before saving.
TEST(WritePython, FilesForThePythonCheck) {
  auto out = qlora::test::data_dir() / "io" / "cpp";
  if (fs::exists(out)) qlora::remove_tree(out);  // not fs::remove_all: core/fs.h
  fs::create_directories(out);
  at::Generator gen = at::detail::createCPUGenerator(2024);
  json manifest = {{"files", json::object()}, {"checkpoints", json::object()}};
  auto describe = [](const st::NamedTensors& ts) {
    json d = json::object();
    for (const auto& [n, t] : ts)
      d[n] = {{"dtype", st::dtype_name(st::from_scalar_type(t.scalar_type()))},
              {"shape", t.sizes().vec()},
              {"sha256", sha256_hex(t)}};
    return d;
  };

  st::NamedTensors all;
  for (st::DType d : kAll) {
    std::string n = st::dtype_name(d);
    all.emplace_back("u8first." + n, random_tensor(st::DType::U8, {5}, gen));
    all.emplace_back("t." + n, random_tensor(d, {3, 7}, gen));
    all.emplace_back("nc." + n, random_tensor(d, {6, 4}, gen).t().slice(0, 0, 4, 2));
    all.emplace_back("scalar." + n, random_tensor(d, {}, gen));
    all.emplace_back("empty." + n, random_tensor(d, {0, 4}, gen));
  }
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "grüße \"q\" \\ \n"}};
  st::save(out / "all_dtypes.safetensors", all, meta);
  manifest["files"]["all_dtypes.safetensors"] = {{"metadata", meta}, {"tensors", describe(all)}};
  st::save(out / "empty.safetensors", {});
  manifest["files"]["empty.safetensors"] = {{"metadata", json::object()}, {"tensors", json::object()}};

  st::NamedTensors model;
  model.emplace_back("model.embed_tokens.weight", random_tensor(st::DType::BF16, {32, 8}, gen));
  for (int l = 0; l < 3; ++l)
    for (const char* p : {"q_proj", "k_proj", "v_proj", "o_proj"})
      model.emplace_back(fmt::format("model.layers.{}.self_attn.{}.weight", l, p),
                         random_tensor(st::DType::BF16, {8, 8}, gen));
  model.emplace_back("model.norm.weight", random_tensor(st::DType::F32, {8}, gen));
  st::save_sharded(out / "sharded", model, 600, {{"format", "pt"}});
  manifest["checkpoints"]["sharded"] = {{"tensors", describe(model)}, {"metadata", {{"format", "pt"}}}};
  st::save_sharded(out / "single", model, 1 << 20);
  manifest["checkpoints"]["single"] = {{"tensors", describe(model)}, {"metadata", json::object()}};
  std::ofstream(out / "manifest.json") << manifest.dump(1);
}
