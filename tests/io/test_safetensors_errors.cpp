// Malformed safetensors files and checkpoints: each is crafted byte by byte here and must give a
// qlora::Error whose message names the file and the problem. Ends with a seeded mutation loop over a
// valid file that must only ever throw qlora::Error. Self-contained (no fixtures) so that the sanitizer
// build (ASan + UBSan) can compile and run this file on its own.
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "tests/test_util.h"
#include "trainer/core/error.h"
#include "trainer/io/safetensors.h"

namespace st = qlora::st;
namespace fs = std::filesystem;

namespace {

fs::path dir() {
  static fs::path d = qlora::test::temp_dir("io-errors");
  return d;
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// A file with the given header text and data bytes; `len` overrides the header length field.
fs::path raw(const std::string& name, const std::string& header, const std::string& data = "",
             std::optional<uint64_t> len = std::nullopt) {
  fs::path p = dir() / (name + ".safetensors");
  write_bytes(p, le64(len.value_or(header.size())) + header + data);
  return p;
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, uint64_t b,
                  uint64_t e) {
  return fmt::format(R"("{}":{{"dtype":"{}","shape":{},"data_offsets":[{},{}]}})", name, dtype, shape, b, e);
}

// Opens `p` and reads every tensor (reading is where BOOL contents are checked).
void open_all(const fs::path& p) {
  auto f = st::File::open(p);
  for (const auto& n : f->names()) f->tensor(n);
}

}  // namespace

TEST(SafetensorsErrors, MissingAndTruncatedFiles) {
  EXPECT_THROW_MSG(st::File::open(dir() / "nope.safetensors"), "nope.safetensors", "No such file");
  auto p = dir() / "five.safetensors";
  write_bytes(p, "abcde");
  EXPECT_THROW_MSG(st::File::open(p), "five.safetensors", "truncated", "5 bytes");
  EXPECT_THROW_MSG(st::File::open(dir()), "not a regular file");
  // Header length beyond the end of the file: a valid file cut short.
  std::string h = "{" + entry("w", "F32", "[2]", 0, 8) + "}";
  EXPECT_THROW_MSG(st::File::open(raw("cut_header", h.substr(0, 10), "", h.size())), "cut_header.safetensors",
                   "truncated", "beyond the file");
  EXPECT_THROW_MSG(st::File::open(raw("cut_data", h, std::string(5, 'x'))), "cut_data.safetensors", "'w'",
                   "out of bounds", "truncated");
  EXPECT_THROW_MSG(st::File::open(raw("huge_len", h, "", uint64_t(1) << 62)), "huge_len.safetensors",
                   "exceeds the 100000000-byte limit");
  EXPECT_THROW_MSG(st::File::open(raw("max_len", h, "", UINT64_MAX)), "max_len.safetensors", "exceeds");
}

TEST(SafetensorsErrors, HeaderNotAnObject) {
  EXPECT_THROW_MSG(st::File::open(raw("notjson", "{\"a\": nope}")), "notjson.safetensors", "not valid JSON");
  EXPECT_THROW_MSG(st::File::open(raw("array", "[1, 2]   ")), "array.safetensors", "header is a JSON array",
                   "expected an object");
  EXPECT_THROW_MSG(st::File::open(raw("nul", std::string("{}\0\0", 4))), "nul.safetensors", "not valid JSON");
  EXPECT_THROW_MSG(st::File::open(raw("comment", "{/* c */}")), "comment.safetensors", "not valid JSON");
  EXPECT_THROW_MSG(st::File::open(raw("utf8", "{\"\xff\":1}")), "utf8.safetensors", "not valid JSON");
  EXPECT_THROW_MSG(st::File::open(raw("deep", "{\"a\":{\"b\":{\"c\":{\"d\":{}}}}}")), "deep.safetensors",
                   "nested deeper");
  EXPECT_THROW_MSG(st::File::open(raw("short", "{")), "short.safetensors", "too short");
}

TEST(SafetensorsErrors, BadEntries) {
  EXPECT_THROW_MSG(st::File::open(raw("entry_num", R"({"w": 3})")), "entry_num.safetensors", "'w'",
                   "must be an object");
  EXPECT_THROW_MSG(st::File::open(raw("no_dtype", R"({"w": {"shape": [1], "data_offsets": [0, 4]}})")),
                   "no_dtype.safetensors", "'w'", "missing \"dtype\"");
  EXPECT_THROW_MSG(
      st::File::open(raw("extra_key", R"({"w": {"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}})", "a")),
      "extra_key.safetensors", "'w'", "unknown key \"x\"");
  EXPECT_THROW_MSG(st::File::open(raw("bad_dtype", "{" + entry("w", "F33", "[1]", 0, 4) + "}", "abcd")),
                   "bad_dtype.safetensors", "'w'", "unknown dtype \"F33\"");
  EXPECT_THROW_MSG(st::File::open(raw("c64", "{" + entry("w", "C64", "[1]", 0, 8) + "}", "abcdefgh")),
                   "c64.safetensors", "'w'", "C64 is not supported");
  EXPECT_THROW_MSG(st::File::open(raw("neg_dim", "{" + entry("w", "U8", "[-1]", 0, 0) + "}")),
                   "neg_dim.safetensors", "'w'", "shape[0]", "non-negative integer");
  EXPECT_THROW_MSG(st::File::open(raw("float_dim", "{" + entry("w", "U8", "[1.0]", 0, 1) + "}", "a")),
                   "float_dim.safetensors", "shape[0]", "non-negative integer");
  EXPECT_THROW_MSG(st::File::open(raw("shape_str", R"({"w":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", "a")),
                   "shape_str.safetensors", "'w'", "shape must be an array");
  // 2^40 * 2^40 elements: the product overflows before any byte count could be compared.
  EXPECT_THROW_MSG(
      st::File::open(raw("overflow", "{" + entry("w", "U8", "[1099511627776,1099511627776]", 0, 0) + "}")),
      "overflow.safetensors", "'w'", "element count", "overflows");
  // Element count fits, bytes do not: 2^62 F32 elements.
  EXPECT_THROW_MSG(st::File::open(raw("overflow_bytes", "{" + entry("w", "F32", "[4611686018427387904]", 0, 0) + "}")),
                   "overflow_bytes.safetensors", "byte count", "overflows");
  EXPECT_THROW_MSG(st::File::open(raw("big_dim", "{" + entry("w", "U8", "[18446744073709551615]", 0, 0) + "}")),
                   "big_dim.safetensors", "too large");
  EXPECT_THROW_MSG(st::File::open(raw("offs3", R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", "a")),
                   "offs3.safetensors", "'w'", "data_offsets must be [begin, end]");
  EXPECT_THROW_MSG(st::File::open(raw("reversed", "{" + entry("w", "U8", "[0]", 4, 0) + "}", "abcd")),
                   "reversed.safetensors", "'w'", "end before they begin");
  EXPECT_THROW_MSG(st::File::open(raw("wrong_len", "{" + entry("w", "F32", "[2, 3]", 0, 20) + "}", std::string(20, 0))),
                   "wrong_len.safetensors", "'w'", "span 20 bytes", "F32", "needs 24 bytes");
}

TEST(SafetensorsErrors, LayoutAndDuplicates) {
  std::string d16(16, '\0');
  EXPECT_THROW_MSG(st::File::open(raw("overlap", "{" + entry("a", "U8", "[8]", 0, 8) + "," +
                                                     entry("b", "U8", "[8]", 4, 12) + "}", d16.substr(0, 12))),
                   "overlap.safetensors", "'a'", "'b'", "overlap");
  EXPECT_THROW_MSG(st::File::open(raw("hole", "{" + entry("a", "U8", "[4]", 0, 4) + "," +
                                                  entry("b", "U8", "[4]", 8, 12) + "}", d16.substr(0, 12))),
                   "hole.safetensors", "hole of 4 bytes", "'b'");
  EXPECT_THROW_MSG(st::File::open(raw("hole_start", "{" + entry("a", "U8", "[4]", 4, 8) + "}", d16.substr(0, 8))),
                   "hole_start.safetensors", "hole of 4 bytes", "'a'");
  EXPECT_THROW_MSG(st::File::open(raw("trailing", "{" + entry("a", "U8", "[4]", 0, 4) + "}", d16.substr(0, 6))),
                   "trailing.safetensors", "2 trailing bytes");
  EXPECT_THROW_MSG(st::File::open(raw("no_tensors_data", "{}", "xx")), "no_tensors_data.safetensors",
                   "2 trailing bytes");
  // Two views of the same bytes (aliasing) are an overlap too.
  EXPECT_THROW_MSG(st::File::open(raw("alias", "{" + entry("a", "U8", "[4]", 0, 4) + "," +
                                                   entry("b", "U8", "[4]", 0, 4) + "}", d16.substr(0, 4))),
                   "alias.safetensors", "overlap");
  EXPECT_THROW_MSG(st::File::open(raw("dup", "{" + entry("a", "U8", "[4]", 0, 4) + "," +
                                                 entry("a", "U8", "[4]", 4, 8) + "}", d16.substr(0, 8))),
                   "dup.safetensors", "duplicate key \"a\"");
  EXPECT_THROW_MSG(st::File::open(raw("dup_meta", R"({"__metadata__":{"k":"1","k":"2"}})")),
                   "dup_meta.safetensors", "duplicate key \"k\"");
  EXPECT_THROW_MSG(st::File::open(raw("dup_field", R"({"a":{"dtype":"U8","dtype":"U8","shape":[0],"data_offsets":[0,0]}})")),
                   "dup_field.safetensors", "duplicate key \"dtype\"");
  EXPECT_THROW_MSG(st::File::open(raw("meta_num", R"({"__metadata__":{"k":1}})")), "meta_num.safetensors",
                   "__metadata__ \"k\" must be a string");
  EXPECT_THROW_MSG(st::File::open(raw("meta_arr", R"({"__metadata__":[]})")), "meta_arr.safetensors",
                   "__metadata__ must be an object");
}

TEST(SafetensorsErrors, Requests) {
  auto p = dir() / "good.safetensors";
  st::save(p, {{"model.norm.weight", at::ones({4})}, {"flag", at::ones({3}, at::kBool)}});
  auto f = st::File::open(p);
  EXPECT_THROW_MSG(f->info("model.norm.weigth"), "good.safetensors", "no tensor named 'model.norm.weigth'",
                   "did you mean 'model.norm.weight'");
  auto c = st::Checkpoint::open(p);
  EXPECT_THROW_MSG(c.tensor("lm_head.weight"), "good.safetensors", "no tensor named 'lm_head.weight'");
  EXPECT_THROW_MSG(c.tensor("model.norm.weight", {4, 1}), "good.safetensors", "'model.norm.weight'",
                   "has shape [4], expected [4, 1]");
  EXPECT_THROW_MSG(c.tensor("model.norm.weight", {4}, st::DType::BF16), "'model.norm.weight'",
                   "has dtype F32, expected BF16");
  // BOOL bytes other than 0/1 are rejected when read (torch assumes 0/1).
  EXPECT_THROW_MSG(open_all(raw("bool2", "{" + entry("m", "BOOL", "[3]", 0, 3) + "}", std::string("\1\0\2", 3))),
                   "bool2.safetensors", "'m'", "byte 2 at element 2");
}

TEST(SafetensorsErrors, WriterRejects) {
  auto p = dir() / "w.safetensors";
  EXPECT_THROW_MSG(st::save(p, {{"a", at::ones({1})}, {"a", at::ones({1})}}), "w.safetensors", "'a' given twice");
  EXPECT_THROW_MSG(st::save(p, {{"__metadata__", at::ones({1})}}), "'__metadata__' is reserved");
  EXPECT_THROW_MSG(st::save(p, {{"c", at::ones({2}, at::kComplexFloat)}}), "w.safetensors", "'c'",
                   "cannot be stored in safetensors");
  EXPECT_THROW_MSG(st::save(p, {{"u", at::Tensor()}}), "'u' is undefined");
  EXPECT_THROW_MSG(st::save(p, {{"bad\xff", at::ones({1})}}), "w.safetensors", "cannot write header");
  EXPECT_THROW_MSG(st::save(dir() / "no_such_dir" / "x.safetensors", {{"a", at::ones({1})}}), "no_such_dir",
                   "cannot open");
  EXPECT_FALSE(fs::exists(p)) << "a refused save must not leave a file";
}

TEST(SafetensorsErrors, Checkpoints) {
  auto mk = [](const std::string& name) {
    auto d = dir() / name;
    fs::create_directories(d);
    st::save(d / "model-00001-of-00002.safetensors", {{"a", at::ones({2})}});
    st::save(d / "model-00002-of-00002.safetensors", {{"b", at::ones({2})}});
    return d;
  };
  auto index = [](const fs::path& d, const std::string& text) {
    write_bytes(d / "model.safetensors.index.json", text);
    return d;
  };
  const std::string good_map =
      R"({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})";
  EXPECT_EQ(st::Checkpoint::open(index(mk("ok"), R"({"metadata":{"total_size":16},"weight_map":)" + good_map + "}"))
                .names()
                .size(),
            2u);

  EXPECT_THROW_MSG(st::Checkpoint::open(dir() / "absent"), "absent", "does not exist");
  fs::create_directories(dir() / "emptydir");
  EXPECT_THROW_MSG(st::Checkpoint::open(dir() / "emptydir"), "emptydir",
                   "no model.safetensors or model.safetensors.index.json");
  EXPECT_THROW_MSG(st::Checkpoint::open(index(mk("malformed"), "{\"weight_map\": {")), "malformed",
                   "model.safetensors.index.json", "not valid JSON");
  EXPECT_THROW_MSG(st::Checkpoint::open(index(mk("nomap"), R"({"metadata": {}})")), "nomap", "missing \"weight_map\"");
  EXPECT_THROW_MSG(st::Checkpoint::open(index(mk("maparr"), R"({"weight_map": []})")), "maparr",
                   "\"weight_map\" must be an object");
  EXPECT_THROW_MSG(st::Checkpoint::open(index(mk("mapnum"), R"({"weight_map": {"a": 1}})")), "mapnum",
                   "weight_map[\"a\"] must be a file name string");
  EXPECT_THROW_MSG(st::Checkpoint::open(index(mk("emptymap"), R"({"weight_map": {}})")), "emptymap",
                   "weight_map is empty");
  EXPECT_THROW_MSG(
      st::Checkpoint::open(index(mk("missing_shard"), R"({"weight_map": {"a": "model-00009-of-00009.safetensors"}})")),
      "missing_shard", "shard model-00009-of-00009.safetensors", "'a'", "does not exist");
  EXPECT_THROW_MSG(st::Checkpoint::open(index(mk("traversal"), R"({"weight_map": {"a": "../ok/model-00001-of-00002.safetensors"}})")),
                   "traversal", "not a plain file name");
  EXPECT_THROW_MSG(
      st::Checkpoint::open(index(mk("wrong_shard"), R"({"weight_map": {"a": "model-00002-of-00002.safetensors",
                                                                      "b": "model-00002-of-00002.safetensors"}})")),
      "wrong_shard", "puts 'a' in model-00002-of-00002.safetensors", "no such tensor");
  {  // A shard holding a tensor the index does not list: the index and the files disagree.
    auto d = mk("unlisted");
    st::save(d / "model-00001-of-00002.safetensors", {{"a", at::ones({2})}, {"c", at::ones({2})}});
    EXPECT_THROW_MSG(st::Checkpoint::open(index(d, "{\"weight_map\":" + good_map + "}")), "unlisted",
                     "tensor 'c' of shard model-00001-of-00002.safetensors is not listed in weight_map");
  }
  EXPECT_THROW_MSG(st::Checkpoint::open(index(mk("dup_map"), R"({"weight_map": {"a": "x", "a": "y"}})")), "dup_map",
                   "duplicate key \"a\"");
  // The same tensor name in two shards.
  {
    auto d = mk("twice");
    st::save(d / "model-00002-of-00002.safetensors", {{"b", at::ones({2})}, {"a", at::ones({2})}});
    EXPECT_THROW_MSG(st::Checkpoint::open(index(d, "{\"weight_map\":" + good_map + "}")), "twice", "'a' is in both");
  }
  {
    auto d = index(mk("ambiguous"), "{\"weight_map\":" + good_map + "}");
    st::save(d / "model.safetensors", {{"a", at::ones({2})}});
    EXPECT_THROW_MSG(st::Checkpoint::open(d), "ambiguous", "both model.safetensors and model.safetensors.index.json");
  }
  // A corrupt shard is reported with the shard's own name.
  {
    auto d = index(mk("bad_shard"), "{\"weight_map\":" + good_map + "}");
    write_bytes(d / "model-00002-of-00002.safetensors", "xyz");
    EXPECT_THROW_MSG(st::Checkpoint::open(d), "model-00002-of-00002.safetensors", "truncated");
  }
}

// Random corruptions of a valid file must end in qlora::Error or a successful read, never in a crash,
// another exception type, or (under the sanitizers) undefined behaviour.
TEST(SafetensorsErrors, MutatedFilesOnlyThrowQloraError) {
  auto good = dir() / "base.safetensors";
  at::manual_seed(3);
  st::save(good, {{"w", at::randn({3, 5})},
                  {"b", at::randn({5}).to(at::kBFloat16)},
                  {"m", at::randint(0, 2, {7}).to(at::kBool)},
                  {"s", at::tensor(3, at::kLong).reshape({})},
                  {"e", at::empty({0, 2}, at::kHalf)},
                  {"q", at::randint(0, 255, {9}, at::kByte)}},
           {{"format", "pt"}});
  std::string base;
  {
    std::ifstream in(good, std::ios::binary);
    base.assign(std::istreambuf_iterator<char>(in), {});
  }
  uint64_t header_len = 0;
  std::memcpy(&header_len, base.data(), 8);
  const std::string json_chars = "{}[]\":,-.0123456789eE \\u";

  std::mt19937_64 rng(20240601);
  auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  int opened = 0, refused = 0;
  auto p = dir() / "mutant.safetensors";
  for (int it = 0; it < 600; ++it) {
    std::string m = base;
    switch (pick(5)) {
      case 0:  // flip bits anywhere
        for (int k = 1 + pick(3); k > 0; --k) m[pick(m.size())] ^= static_cast<char>(1 + pick(255));
        break;
      case 1:  // JSON-ish characters into the header, to reach deeper parser and validator paths
        for (int k = 1 + pick(3); k > 0; --k) m[8 + pick(header_len)] = json_chars[pick(json_chars.size())];
        break;
      case 2:  // truncate
        m.resize(pick(m.size()));
        break;
      case 3:  // a random header length
        for (int i = 0; i < 8; ++i) m[i] = static_cast<char>(pick(4) ? 0 : pick(256));
        m[0] = static_cast<char>(pick(256));
        break;
      default:  // change one digit of the header (offsets and shapes)
        for (uint64_t tries = 0; tries < 64; ++tries) {
          uint64_t i = 8 + pick(header_len);
          if (m[i] >= '0' && m[i] <= '9') {
            m[i] = static_cast<char>('0' + pick(10));
            break;
          }
        }
    }
    write_bytes(p, m);
    try {
      open_all(p);
      ++opened;
    } catch (const qlora::Error& e) {
      ++refused;
      EXPECT_NE(std::string(e.what()).find("mutant.safetensors"), std::string::npos)
          << "iteration " << it << ": message does not name the file: " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "iteration " << it << ": non-qlora exception: " << e.what();
    }
  }
  // Both outcomes must occur, or the loop is not exercising what it claims.
  EXPECT_GT(opened, 10);
  EXPECT_GT(refused, 300);
}
