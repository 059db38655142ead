// `qlora quantize MODEL_DIR --scheme int8-sym|int8-asym|nf4|fp4 ...`: post-training quantization of every
// projection of a Hugging Face Llama (and, with --embeddings, of embed_tokens and lm_head), reporting per
// layer what it costs in accuracy (MSE, max abs error, SQNR in dB) and what it saves (bits per parameter);
// the arithmetic and the accounting are trainer/quant/ptq.h's. Optionally writes the quantized checkpoint.
//
// --out DIR (written through qlora::write_dir_atomic; an existing DIR only with --overwrite). Only the
// projections are quantized; embeddings, norms and lm_head are copied as stored (bitsandbytes' convention;
// --embeddings affects the report only). Other files of MODEL_DIR (tokenizer, generation config) are copied.
//   nf4 / fp4: bitsandbytes' serialization (shared/INTEROP.md section 1): per projection P = "<module>.":
//       P.weight U8 [(n+1)/2, 1], P.weight.absmax, P.weight.quant_map, [P.weight.nested_absmax,
//       P.weight.nested_quant_map], P.weight.quant_state.bitsandbytes__<type>; config.json gains
//       "quantization_config" {"quant_method": "bitsandbytes", "load_in_4bit": true, ...}. Loads with
//       model::load_llama (no re-quantization) and with transformers + bitsandbytes.
//   int8-sym / int8-asym: safetensors, per projection P:
//       P.weight             I8 [out, in] (int8-sym) or U8 [out, in] (int8-asym)
//       P.weight_scale       F32 [] (per tensor) or [out] (per channel)
//       P.weight_zero_point  U8, shape of P.weight_scale (int8-asym only; int8-sym's zero point is 0)
//     so that w ~ (weight - weight_zero_point) * weight_scale, the scale broadcast along `in`; config.json
//     gains "quantization_config" {"quant_method": "qlora-ptq", "scheme", "granularity": "per_tensor" |
//     "per_channel", "zero_point_dtype": "uint8"}. No trainer loads it: it shows the format.
// --json FILE: {"model", "scheme", "per_channel", "double_quant", "block_size", "layers": [{"name", "shape",
//     "numel", "mse", "max_abs_error", "sqnr_db", "bits_per_param", "bytes"}], "total": {...}}; sqnr_db is
//     null when a weight round-trips exactly (infinite SQNR).
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <memory>

#include "trainer/cli/commands.h"
#include "trainer/core/error.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"
#include "trainer/model/hf_config.h"
#include "trainer/quant/ptq.h"

namespace qlora::cli {

namespace {

using json = nlohmann::json;
namespace ptq = quant::ptq;

struct Args {
  std::string model_dir;
  std::string scheme;
  bool per_channel = false;
  bool double_quant = false;
  int64_t block_size = 64;
  bool block_size_given = false;
  bool embeddings = false;
  std::string json_file;
  std::string out_dir;
  bool overwrite = false;
};

struct Row {
  std::string name;  // module, e.g. "model.layers.0.self_attn.q_proj"
  std::vector<int64_t> shape;
  ptq::ErrorStats s;
};

json number_or_null(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

json row_json(const std::string& name, const std::vector<int64_t>& shape, const ptq::ErrorStats& s) {
  return {{"name", name},          {"shape", shape},         {"numel", s.numel},
          {"mse", s.mse},          {"max_abs_error", s.max_abs}, {"sqnr_db", number_or_null(s.sqnr_db)},
          {"bits_per_param", s.bits_per_param}, {"bytes", s.bytes}};
}

// The serialized entries of one quantized projection (see the file comment for the key names).
st::NamedTensors serialize(const std::string& module, const ptq::Result& r) {
  if (r.q4) return quant::to_bnb_state(module + ".", *r.q4);
  st::NamedTensors t{{module + ".weight", r.int8->q}, {module + ".weight_scale", r.int8->scale}};
  if (!r.int8->symmetric) t.emplace_back(module + ".weight_zero_point", r.int8->zero_point);
  return t;
}

json quantization_config(const ptq::Options& o, const std::string& compute_dtype) {
  if (ptq::is_int8(o.scheme)) {
    return {{"quant_method", "qlora-ptq"}, {"scheme", ptq::scheme_name(o.scheme)},
            {"granularity", o.per_channel ? "per_channel" : "per_tensor"}, {"zero_point_dtype", "uint8"}};
  }
  // The keys transformers' BitsAndBytesConfig.to_dict() writes for a 4-bit model.
  return {{"quant_method", "bitsandbytes"},
          {"load_in_4bit", true},
          {"load_in_8bit", false},
          {"_load_in_4bit", true},
          {"_load_in_8bit", false},
          {"bnb_4bit_quant_type", ptq::scheme_name(o.scheme)},
          {"bnb_4bit_use_double_quant", o.double_quant},
          {"bnb_4bit_compute_dtype", compute_dtype},
          {"bnb_4bit_quant_storage", "uint8"},
          {"llm_int8_threshold", 6.0},
          {"llm_int8_skip_modules", nullptr},
          {"llm_int8_enable_fp32_cpu_offload", false},
          {"llm_int8_has_fp16_weight", false}};
}

int run(const Args& a) {
  ptq::Options o;
  o.scheme = ptq::parse_scheme(a.scheme);
  o.per_channel = a.per_channel;
  o.double_quant = a.double_quant;
  o.block_size = a.block_size;
  QLORA_REQUIRE(!(ptq::is_int8(o.scheme) && a.block_size_given),
                "--block-size applies to the 4-bit schemes (nf4, fp4); {} uses one scale per {}", a.scheme,
                a.per_channel ? "output channel" : "tensor");
  ptq::validate(o);
  const fs::path model_dir = a.model_dir, out_dir = a.out_dir;
  // Refuse before any work, not after minutes of quantizing (write_dir_atomic checks again).
  QLORA_REQUIRE(out_dir.empty() || a.overwrite || !fs::exists(out_dir),
                "--out {} already exists; pass --overwrite to replace it", out_dir.string());

  const model::LlamaArch arch = model::load_llama_config(model_dir);
  QLORA_REQUIRE(!arch.quantization, "{} is already quantized (bitsandbytes {}): quantize needs the full-precision "
                "checkpoint", model_dir.string(), arch.quantization ? arch.quantization->quant_type : "");
  const st::Checkpoint ckpt = st::Checkpoint::open(model_dir);

  // Weights to quantize: [module, shape, goes into --out].
  struct Target {
    std::string module;
    std::vector<int64_t> shape;
    bool in_checkpoint;
  };
  std::vector<Target> targets;
  const std::vector<int64_t> embed_shape{arch.vocab_size, arch.hidden_size};
  if (a.embeddings) targets.push_back({"model.embed_tokens", embed_shape, false});
  for (int64_t i = 0; i < arch.num_layers; ++i) {
    for (int j = 0; j < 7; ++j) {
      const std::string kind = model::kProjectionKinds[j];
      auto [out, in] = model::projection_shape(arch, kind);
      targets.push_back({fmt::format("model.layers.{}.{}.{}", i, j < 4 ? "self_attn" : "mlp", kind), {out, in}, true});
    }
  }
  if (a.embeddings && !arch.tie_word_embeddings) targets.push_back({"lm_head", embed_shape, false});

  std::vector<Row> rows;
  std::map<std::string, st::NamedTensors> quantized;  // weight name -> serialized entries (--out only)
  for (const auto& t : targets) {
    const std::string name = t.module + ".weight";
    QLORA_REQUIRE(ckpt.contains(name), "{}: missing tensor '{}' (expected shape [{}])", ckpt.path().string(), name,
                  fmt::join(t.shape, ", "));
    at::Tensor w = ckpt.tensor(name, t.shape);
    QLORA_REQUIRE(at::isFloatingType(w.scalar_type()), "{}: tensor '{}' has dtype {}, expected a float type",
                  ckpt.file_of(name).path().string(), name, std::string(c10::toString(w.scalar_type())));
    ptq::Result r = ptq::quantize_weight(w, o);
    rows.push_back({t.module, t.shape, r.stats});
    if (!out_dir.empty() && t.in_checkpoint) quantized[name] = serialize(t.module, r);
  }

  // Totals: sums over every reported weight (so the SQNR is energy-weighted, not a mean of dBs).
  ptq::ErrorStats tot;
  for (const auto& r : rows) {
    tot.numel += r.s.numel;
    tot.bytes += r.s.bytes;
    tot.sum_sq_weight += r.s.sum_sq_weight;
    tot.sum_sq_error += r.s.sum_sq_error;
    tot.max_abs = std::max(tot.max_abs, r.s.max_abs);
  }
  tot.mse = tot.sum_sq_error / static_cast<double>(tot.numel);
  tot.sqnr_db = tot.sum_sq_error > 0 ? 10.0 * std::log10(tot.sum_sq_weight / tot.sum_sq_error) : INFINITY;
  tot.bits_per_param = 8.0 * static_cast<double>(tot.bytes) / static_cast<double>(tot.numel);

  const std::string what =
      ptq::is_int8(o.scheme) ? fmt::format("{} {}", a.scheme, o.per_channel ? "per channel" : "per tensor")
                             : fmt::format("{} block {}{}", a.scheme, o.block_size, o.double_quant ? " + double quant" : "");
  fmt::print("post-training quantization of {}: {}\n\n", model_dir.string(), what);
  fmt::print("{:<34} {:>13} {:>11} {:>11} {:>9} {:>8}\n", "weight", "shape", "mse", "max |err|", "SQNR dB", "bits");
  auto line = [](const std::string& name, const std::string& shape, const ptq::ErrorStats& s) {
    fmt::print("{:<34} {:>13} {:>11.3e} {:>11.3e} {:>9.2f} {:>8.3f}\n", name, shape, s.mse, s.max_abs, s.sqnr_db,
               s.bits_per_param);
  };
  for (const auto& r : rows) line(r.name, fmt::format("{}", fmt::join(r.shape, "x")), r.s);
  line("total", std::to_string(tot.numel), tot);
  fmt::print("\nSQNR = 10 log10(sum w^2 / sum (w - dequant(quant(w)))^2); each bit of precision is worth about 6 dB.\n"
             "bits = stored bits per parameter, scales, zero points and nested scales included.\n");

  if (!a.json_file.empty()) {
    json j = {{"model", model_dir.string()},   {"scheme", a.scheme},
              {"per_channel", o.per_channel},  {"double_quant", o.double_quant},
              {"block_size", ptq::is_int8(o.scheme) ? json(nullptr) : json(o.block_size)}};
    j["layers"] = json::array();
    for (const auto& r : rows) j["layers"].push_back(row_json(r.name, r.shape, r.s));
    j["total"] = row_json("total", {tot.numel}, tot);
    write_file_atomic(a.json_file, j.dump(2) + "\n");
    fmt::print("wrote {}\n", a.json_file);
  }

  if (!out_dir.empty()) {
    st::NamedTensors tensors;
    for (const auto& n : ckpt.names()) {
      if (n.find("rotary_emb.inv_freq") != std::string::npos) continue;
      auto it = quantized.find(n);
      if (it == quantized.end()) {
        tensors.emplace_back(n, ckpt.tensor(n));
      } else {
        for (auto& e : it->second) tensors.push_back(std::move(e));
      }
    }
    json config = json::parse(read_file(model_dir / "config.json"));
    config["quantization_config"] = quantization_config(o, arch.dtype);
    write_dir_atomic(out_dir, a.overwrite, [&](const fs::path& tmp) {
      st::save_sharded(tmp, tensors, 2'000'000'000ULL, {{"format", "pt"}});
      write_file_atomic(tmp / "config.json", config.dump(2) + "\n");
      for (const auto& e : fs::directory_iterator(model_dir)) {
        const std::string f = e.path().filename().string();
        if (!e.is_regular_file() || f == "config.json" || f.ends_with(".safetensors") ||
            f == "model.safetensors.index.json")
          continue;
        fs::copy_file(e.path(), tmp / f);
      }
    });
    fmt::print("wrote {} ({})\n", out_dir.string(),
               ptq::is_int8(o.scheme) ? "int8 safetensors" : "bitsandbytes 4-bit serialization");
  }
  return 0;
}

}  // namespace

Runner add_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "quantize",
      "Post-training quantization of a Llama checkpoint's projections: per-layer error report, optional output");
  cmd->footer(
      "Schemes:\n"
      "  int8-sym   scale = max|w|/127, zero point 0, q = clamp(round(w/scale), -127, 127)\n"
      "  int8-asym  min-max: scale = (max-min)/255, zp = clamp(round(-min/scale), 0, 255) (uint8, torch's quint8),\n"
      "             q = clamp(round(w/scale) + zp, 0, 255); min/max always include 0\n"
      "  nf4, fp4   bitsandbytes 4-bit, one absmax per --block-size elements (+ --double-quant)\n"
      "Reports per weight: MSE, max |error|, SQNR in dB, bits per parameter (scales and zero points included).\n"
      "--out writes only the projections quantized (4-bit: bitsandbytes' format, loadable by the trainer).\n"
      "Example: qlora quantize models/llama --scheme nf4 --double-quant --json nf4.json --out models/llama-nf4");
  auto a = std::make_shared<Args>();
  cmd->add_option("model_dir", a->model_dir, "Model directory (config.json + safetensors)")->required();
  cmd->add_option("--scheme", a->scheme, "int8-sym | int8-asym | nf4 | fp4")->required();
  cmd->add_flag("--per-channel", a->per_channel, "int8: one scale (and zero point) per output channel");
  cmd->add_flag("--double-quant", a->double_quant, "nf4/fp4: quantize the block scales to 8 bits");
  auto* bs = cmd->add_option("--block-size", a->block_size, "nf4/fp4 block size, a power of two in [32, 4096]")
                 ->capture_default_str();
  cmd->add_flag("--embeddings", a->embeddings, "also report embed_tokens and lm_head (never quantized in --out)");
  cmd->add_option("--json", a->json_file, "Write the report as JSON to FILE");
  cmd->add_option("--out", a->out_dir, "Write the quantized checkpoint to DIR");
  cmd->add_flag("--overwrite", a->overwrite, "Replace an existing --out DIR");
  return [a, bs]() {
    a->block_size_given = bs->count() > 0;
    return run(*a);
  };
}

}  // namespace qlora::cli
