// `qlora inspect MODEL_DIR`: architecture, parameter counts, and the memory the weights take in bf16,
// in NF4 and in NF4 with double quantization (computed from config.json; no weights are read).
#include <fmt/format.h>

#include "trainer/cli/commands.h"
#include "trainer/model/hf_config.h"

namespace qlora::cli {

namespace {

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  return fmt::format("{:.2f} {}", b, units[u]);
}

std::string human_count(int64_t n) {
  if (n >= 1'000'000'000) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1'000'000) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1'000) return fmt::format("{:.1f}K", n / 1e3);
  return std::to_string(n);
}

// Bytes of one quantized weight of n elements in bitsandbytes' layout (trainer/quant/quant.h): packed
// nibbles, absmax per block (float32, or uint8 + nested float32 scales per 256 blocks + the 256-entry
// dynamic map), and the 16-entry code book.
int64_t storage_bytes(int64_t n, int64_t block, bool double_quant) {
  const int64_t blocks = (n + block - 1) / block;
  int64_t b = (n + 1) / 2 + 16 * 4;
  b += double_quant ? blocks + (blocks + 255) / 256 * 4 + 256 * 4 : blocks * 4;
  return b;
}

}  // namespace

Runner add_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "Print a Hugging Face Llama model's architecture and memory needs");
  auto dir = std::make_shared<std::string>();
  auto block = std::make_shared<int64_t>(64);
  cmd->add_option("model_dir", *dir, "Model directory (config.json + safetensors)")->required();
  cmd->add_option("--block-size", *block, "4-bit quantization block size")->capture_default_str();
  return [dir, block]() {
    model::LlamaArch a = model::load_llama_config(*dir);
    const int64_t proj = a.num_layers * a.projection_params_per_layer();
    const int64_t rest = a.total_params() - proj;
    fmt::print("model            {}\n", *dir);
    fmt::print("layers           {}\n", a.num_layers);
    fmt::print("hidden / mlp     {} / {}\n", a.hidden_size, a.intermediate_size);
    fmt::print("heads / kv heads {} / {} (head_dim {}{})\n", a.num_heads, a.num_kv_heads, a.head_dim,
               a.num_kv_heads < a.num_heads ? ", grouped-query" : "");
    fmt::print("vocab            {}{}\n", a.vocab_size, a.tie_word_embeddings ? " (tied lm_head)" : "");
    fmt::print("positions        {} (rope {}, theta {})\n", a.max_position_embeddings, model::to_string(a.rope.type),
               a.rope.theta);
    fmt::print("stored dtype     {}{}\n", a.dtype,
               a.quantization ? fmt::format(" (bitsandbytes {}-quantized)", a.quantization->quant_type) : "");
    fmt::print("parameters       {} ({} total: {} in the 7 projections x {} layers, {} embeddings/norms/head)\n",
               human_count(a.total_params()), a.total_params(), proj, a.num_layers, rest);
    // Memory: projections in 4 bits plus their scales (exact per-tensor byte counts); the rest in bf16.
    const char* kinds[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    int64_t nf4 = 0, nf4dq = 0;
    for (const char* k : kinds) {
      auto [out, in] = model::projection_shape(a, k);
      nf4 += a.num_layers * storage_bytes(out * in, *block, /*double_quant=*/false);
      nf4dq += a.num_layers * storage_bytes(out * in, *block, /*double_quant=*/true);
    }
    const double bf16 = 2.0 * a.total_params();
    fmt::print("\n{:<28} {:>12} {:>16}\n", "weights", "memory", "bits/projection");
    fmt::print("{:<28} {:>12} {:>16.3f}\n", "bf16", human_bytes(bf16), 16.0);
    fmt::print("{:<28} {:>12} {:>16.3f}\n", fmt::format("nf4 (block {})", *block), human_bytes(2.0 * rest + nf4),
               8.0 * nf4 / proj);
    fmt::print("{:<28} {:>12} {:>16.3f}\n", "nf4 + double quantization", human_bytes(2.0 * rest + nf4dq),
               8.0 * nf4dq / proj);
    return 0;
  };
}

}  // namespace qlora::cli
