// bitsandbytes' serialized 4-bit weight (shared/INTEROP.md section 1): the state-dict entries under a
// module prefix and back. The quant_state JSON is untrusted: every field is type-checked and checked
// against the tensors, and errors name the key.
#include <fmt/ranges.h>

#include <nlohmann/json.hpp>

#include <cstring>

#include "trainer/core/error.h"
#include "kernels/format_4bit.h"
#include "trainer/quant/quant.h"

namespace qlora::quant {
namespace {

using ojson = nlohmann::ordered_json;

const char* dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: fail("bnb quant_state: dtype {} has no bitsandbytes name", c10::toString(s));
  }
}

at::Tensor json_bytes(const std::string& s) {
  auto t = at::empty({static_cast<int64_t>(s.size())}, at::kByte);
  std::memcpy(t.data_ptr<uint8_t>(), s.data(), s.size());
  return t;
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> to_bnb_state(const std::string& prefix, const Quantized4bit& q) {
  validate(q, "to_bnb_state(" + prefix + "weight)");
  const std::string w = prefix + "weight";
  std::vector<std::pair<std::string, at::Tensor>> out;
  auto cpu = [](const at::Tensor& t) { return t.to(at::kCPU).contiguous(); };
  out.emplace_back(w, cpu(q.packed));
  out.emplace_back(w + ".absmax", cpu(q.absmax));
  out.emplace_back(w + ".quant_map", cpu(q.code));
  // Key order as bnb's QuantState.as_dict writes it.
  ojson js;
  js["quant_type"] = quant_type_name(q.type);
  js["blocksize"] = q.blocksize;
  js["dtype"] = dtype_name(q.dtype);
  js["shape"] = q.shape;
  if (q.double_quant()) {
    out.emplace_back(w + ".nested_absmax", cpu(q.nested_absmax));
    out.emplace_back(w + ".nested_quant_map", cpu(q.nested_code));
    js["nested_blocksize"] = fmt4::kNestedBlock;
    js["nested_dtype"] = "float32";
    js["nested_offset"] = static_cast<double>(q.nested_offset);  // exact; printed as Python prints the float
  }
  out.emplace_back(w + ".quant_state.bitsandbytes__" + quant_type_name(q.type), json_bytes(js.dump()));
  return out;
}

Quantized4bit from_bnb_state(const std::string& prefix, const std::function<at::Tensor(const std::string&)>& get,
                             const std::function<bool(const std::string&)>& has) {
  const std::string w = prefix + "weight";
  const std::string k_nf4 = w + ".quant_state.bitsandbytes__nf4", k_fp4 = w + ".quant_state.bitsandbytes__fp4";
  QLORA_REQUIRE(has(w), "bnb 4-bit weight: key '{}' is missing", w);
  const bool nf4 = has(k_nf4), fp4 = has(k_fp4);
  QLORA_REQUIRE(nf4 || fp4, "bnb 4-bit weight '{}': quant_state is missing: expected key '{}' or '{}'", w, k_nf4, k_fp4);
  QLORA_REQUIRE(!(nf4 && fp4), "bnb 4-bit weight '{}': both '{}' and '{}' are present", w, k_nf4, k_fp4);
  const std::string kq = nf4 ? k_nf4 : k_fp4;

  Quantized4bit q;
  q.type = nf4 ? QuantType::NF4 : QuantType::FP4;

  // The JSON object.
  auto raw = get(kq).to(at::kCPU).contiguous();
  QLORA_REQUIRE(raw.scalar_type() == at::kByte && raw.dim() == 1,
                "key '{}': quant_state must be a 1-D uint8 tensor of UTF-8 JSON, got {} [{}]", kq,
                c10::toString(raw.scalar_type()), fmt::join(raw.sizes(), ", "));
  const std::string text(reinterpret_cast<const char*>(raw.const_data_ptr<uint8_t>()), raw.numel());
  ojson js;
  try {
    js = ojson::parse(text);
  } catch (const std::exception& e) {
    fail("key '{}': malformed quant_state JSON: {}", kq, e.what());
  }
  QLORA_REQUIRE(js.is_object(), "key '{}': quant_state JSON must be an object", kq);
  auto field = [&](const char* name) -> const ojson& {
    QLORA_REQUIRE(js.contains(name), "key '{}': quant_state JSON lacks field \"{}\"", kq, name);
    return js.at(name);
  };
  const auto& jt = field("quant_type");
  QLORA_REQUIRE(jt.is_string() && jt.get<std::string>() == quant_type_name(q.type),
                "key '{}': quant_state \"quant_type\" is {}, expected \"{}\" (from the key name)", kq, jt.dump(),
                quant_type_name(q.type));
  const auto& jb = field("blocksize");
  QLORA_REQUIRE(jb.is_number_integer() && fmt4::valid_blocksize(jb.get<int64_t>()),
                "key '{}': quant_state \"blocksize\" is {}, expected a power of two in [32, 4096]", kq, jb.dump());
  q.blocksize = jb.get<int64_t>();
  const auto& jd = field("dtype");
  const std::string ds = jd.is_string() ? jd.get<std::string>() : "";
  if (ds == "float32") q.dtype = at::kFloat;
  else if (ds == "bfloat16") q.dtype = at::kBFloat16;
  else if (ds == "float16") q.dtype = at::kHalf;
  else fail("key '{}': quant_state \"dtype\" is {}, expected \"float32\", \"bfloat16\" or \"float16\"", kq, jd.dump());
  const auto& js_shape = field("shape");
  QLORA_REQUIRE(js_shape.is_array() && !js_shape.empty(), "key '{}': quant_state \"shape\" must be a non-empty array, got {}",
                kq, js_shape.dump());
  for (const auto& d : js_shape) {
    QLORA_REQUIRE(d.is_number_integer() && d.get<int64_t>() > 0 && d.get<int64_t>() < (int64_t{1} << 40),
                  "key '{}': quant_state \"shape\" {} must hold positive integers", kq, js_shape.dump());
    q.shape.push_back(d.get<int64_t>());
  }
  const bool dq = js.contains("nested_blocksize") || js.contains("nested_offset");
  if (dq) {
    const auto& nb = field("nested_blocksize");
    QLORA_REQUIRE(nb.is_number_integer() && nb.get<int64_t>() == fmt4::kNestedBlock,
                  "key '{}': quant_state \"nested_blocksize\" is {}, expected 256", kq, nb.dump());
    const auto& nd = field("nested_dtype");
    QLORA_REQUIRE(nd.is_string() && nd.get<std::string>() == "float32",
                  "key '{}': quant_state \"nested_dtype\" is {}, expected \"float32\"", kq, nd.dump());
    const auto& no = field("nested_offset");
    QLORA_REQUIRE(no.is_number(), "key '{}': quant_state \"nested_offset\" is {}, expected a number", kq, no.dump());
    q.nested_offset = static_cast<float>(no.get<double>());
  }

  // The tensors, checked against the JSON.
  const int64_t n = q.numel(), blocks = q.blocks();
  auto tensor = [&](const std::string& key, at::ScalarType dt, int64_t numel) {
    QLORA_REQUIRE(has(key), "bnb 4-bit weight '{}': key '{}' is missing (required by {})", w, key,
                  dq ? "double quantization" : "the quant_state");
    auto t = get(key).to(at::kCPU).contiguous();
    QLORA_REQUIRE(t.scalar_type() == dt, "key '{}': dtype {}, expected {}", key, c10::toString(t.scalar_type()),
                  c10::toString(dt));
    QLORA_REQUIRE(t.numel() == numel,
                  "key '{}': {} elements (shape [{}]), but the quant_state (shape [{}], blocksize {}) requires {}", key,
                  t.numel(), fmt::join(t.sizes(), ", "), fmt::join(q.shape, ", "), q.blocksize, numel);
    return t;
  };
  q.packed = tensor(w, at::kByte, (n + 1) / 2).view({-1, 1});
  q.absmax = tensor(w + ".absmax", dq ? at::kByte : at::kFloat, blocks).view({-1});
  q.code = tensor(w + ".quant_map", at::kFloat, fmt4::kCodes).view({-1});
  QLORA_REQUIRE(at::equal(q.code, codebook(q.type)), "key '{}.quant_map': the values differ from the {} codebook", w,
                quant_type_name(q.type));
  if (dq) {
    q.nested_absmax = tensor(w + ".nested_absmax", at::kFloat, (blocks + fmt4::kNestedBlock - 1) / fmt4::kNestedBlock)
                          .view({-1});
    q.nested_code = tensor(w + ".nested_quant_map", at::kFloat, fmt4::kDynamicCodes).view({-1});
  } else {
    for (const char* k : {".nested_absmax", ".nested_quant_map"})
      QLORA_REQUIRE(!has(w + k), "key '{}{}' is present but the quant_state '{}' has no nested fields", w, k, kq);
  }
  validate(q, w);
  return q;
}

}  // namespace qlora::quant
