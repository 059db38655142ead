// The run configuration: one typed struct per YAML section, defaults in exactly one place (here).
//
// A YAML file maps 1:1 onto Config: top-level keys are the sections below (plus `method`), and each
// section's keys are its fields, spelled as in the struct. Unknown keys, wrong types and out-of-range
// values are errors naming the file, line and key (with the nearest valid key). `--set a.b=c`
// overrides apply after the file and before validate(). The resolved config (every field, defaults
// included) is written next to every output, and its hash guards checkpoint resumption.
//
// Paths (model.path, model.tokenizer, data.train_file, data.eval_file, output.dir, checkpoint.resume)
// are kept exactly as written and, when relative, resolve against the current working directory at
// use, like every CLI tool; never against the YAML file's directory. Their existence is checked where
// they are used, not here, so a config can be validated on a machine without the model.
//
// Sections a method does not use are accepted and still range-checked, then ignored: `full` ignores
// lora.* and quant.* (and output.export_adapter); `lora` ignores quant.*.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace qlora {

// How the base model is trained.
enum class Method {
  QLoRA,  // frozen base quantized to 4 bits, LoRA adapters trainable
  LoRA,   // frozen base in the compute dtype, LoRA adapters trainable
  Full,   // every weight trainable (small models, e.g. the demo's base)
};

enum class QuantType { NF4, FP4 };
enum class DType { Auto, BFloat16, Float16, Float32 };
enum class Device { Auto, CPU, CUDA };
enum class DataFormat {
  Auto,      // detected per record from its fields
  Text,      // {"text": "<s>[INST] ... [/INST] ... </s>"}: pre-formatted Llama-2 chat
  Guanaco,   // {"text": "### Human: ... ### Assistant: ..."}: converted to the Llama-2 template
  Messages,  // {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  Alpaca,    // {"instruction": ..., "input": ..., "output": ...}
};
enum class Schedule { Constant, Linear, Cosine };
// Gradient checkpointing: what a decoder layer keeps from its forward for the recomputation in backward.
enum class Checkpointing {
  Off,        // nothing recomputed: every activation lives until backward
  Selective,  // the layer's input and its mid-layer residual (x + attention): the recomputation skips the
              // o_proj and down_proj GEMMs, whose outputs backward never reads (~30% of a layer's GEMMs),
              // for one more [tokens, hidden] tensor a layer (8 KB a token at hidden 4096); on a GPU whose
              // SDPA runs cuDNN's flash attention, and for rows that attend by segments (flash attention's
              // variable-length kernels), also the attention's output and log-sum-exp (another 8 KB a token
              // a layer), so the attention's forward is not run again
  Full,       // the layer's input only: the least memory, for the longest sequences
};

struct ModelConfig {
  std::string path;                 // Hugging Face model directory (config.json + safetensors)
  std::string tokenizer;            // SentencePiece model; "" = <path>/tokenizer.model
  DType dtype = DType::Auto;        // compute dtype; auto = bfloat16 on CUDA, float32 on CPU
  Device device = Device::Auto;     // auto = cuda when available
  Checkpointing gradient_checkpointing = Checkpointing::Selective;  // true = selective, false = off
  // How many decoder layers recompute (the first N); the others keep every activation, as with `off`.
  // -1 = all of them. Between the two ends: each layer left out costs its activations' memory (~0.2 GiB
  // at the 7B shape and 2048 tokens) and saves its recomputation (~1.1 ms on an H100).
  int64_t gradient_checkpointing_layers = -1;

  friend bool operator==(const ModelConfig&, const ModelConfig&) = default;
};

struct QuantConfig {
  QuantType type = QuantType::NF4;
  int64_t block_size = 64;          // power of two in [32, 4096] (bitsandbytes' range)
  bool double_quant = true;         // 8-bit-quantize the absmax scales (block 256)

  friend bool operator==(const QuantConfig&, const QuantConfig&) = default;
};

struct LoraConfig {
  int64_t r = 64;
  double alpha = 16.0;
  double dropout = 0.1;             // on the LoRA branch's input only
  bool rslora = false;              // scaling alpha/sqrt(r) instead of alpha/r
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};

  friend bool operator==(const LoraConfig&, const LoraConfig&) = default;
};

struct DataConfig {
  std::string train_file;           // JSONL or JSON (array of records)
  std::string eval_file;            // "" = split eval_fraction off the training data
  DataFormat format = DataFormat::Auto;
  std::string system_prompt;        // used by formats that have no system turn of their own
  int64_t max_seq_len = 512;        // longer examples are truncated
  bool train_on_prompt = false;     // false: loss only on the answers
  bool packing = false;             // concatenate examples into full max_seq_len rows
  bool padding_free = false;        // each micro-batch as one row of its examples end to end: no padding
                                    // (on the GPU the model attends by segments); the same loss, but LoRA
                                    // dropout's masks fall on another layout
  double eval_fraction = 0.0;       // in [0, 0.5]
  bool shuffle = true;
  int64_t seed = 42;
  bool skip_bad_records = false;    // count and skip malformed lines instead of failing

  friend bool operator==(const DataConfig&, const DataConfig&) = default;
};

struct TrainConfig {
  int64_t epochs = 1;
  int64_t max_steps = -1;           // > 0 overrides epochs
  int64_t micro_batch_size = 4;     // sequences per forward pass
  int64_t grad_accum = 1;           // micro-batches per optimizer step
  double lr = 2e-4;
  Schedule schedule = Schedule::Cosine;
  int64_t warmup_steps = 0;         // if > 0, wins over warmup_ratio
  double warmup_ratio = 0.03;
  double weight_decay = 0.001;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  double max_grad_norm = 0.3;       // <= 0 disables clipping
  int64_t seed = 42;
  int64_t log_every = 1;            // steps
  int64_t eval_every = 0;           // steps; 0 = only at the end (if there is eval data)
  int64_t max_nonfinite_steps = 5;  // abort after this many non-finite losses in a row

  friend bool operator==(const TrainConfig&, const TrainConfig&) = default;
};

struct CheckpointConfig {
  int64_t every = 0;                // steps; 0 = only at the end
  int64_t keep_last = 3;
  std::string resume = "none";      // none | auto | <checkpoint directory>
  bool force_resume = false;        // resume even if the config differs (the keys are listed)

  friend bool operator==(const CheckpointConfig&, const CheckpointConfig&) = default;
};

struct OutputConfig {
  std::string dir = "runs/qlora";   // checkpoints/, adapter/, merged/, metrics.jsonl, config.yaml
  bool export_adapter = true;       // PEFT adapter at the end
  bool export_merged = false;       // merged Hugging Face checkpoint at the end
  DType merged_dtype = DType::BFloat16;

  friend bool operator==(const OutputConfig&, const OutputConfig&) = default;
};

struct Config {
  Method method = Method::QLoRA;
  ModelConfig model;
  QuantConfig quant;
  LoraConfig lora;
  DataConfig data;
  TrainConfig train;
  CheckpointConfig checkpoint;
  OutputConfig output;

  friend bool operator==(const Config&, const Config&) = default;
};

// Loads `path`, applies `overrides` ("section.key=value", YAML-typed values), validates.
// Relative paths inside the file are left as written (they resolve against the working directory).
// An override's value is parsed as a YAML scalar or flow sequence (`lora.target_modules=[q_proj,v_proj]`);
// for string fields the text after '=' is taken verbatim unless it starts with a quote.
Config load_config(const std::filesystem::path& path, const std::vector<std::string>& overrides = {});
// The same from YAML text; `origin` names it in errors.
Config parse_config(const std::string& yaml, const std::string& origin,
                    const std::vector<std::string>& overrides = {});
// Cross-field rules; throws qlora::Error naming the key.
void validate(const Config& cfg);
// Every field, defaults included, as YAML that load_config reads back to an equal Config.
std::string to_yaml(const Config& cfg);
// Keys that may differ between a run and its resumption without changing what is computed:
// checkpoint.resume, checkpoint.force_resume, checkpoint.keep_last, checkpoint.every, train.log_every,
// and output.*.
bool is_resume_neutral(const std::string& key);
// Stable hex hash (FNV-1a 64) over every key that is not resume-neutral.
std::string config_hash(const Config& cfg);
// "section.key" names (resume-neutral ones excluded) whose values differ between a and b.
std::vector<std::string> config_diff(const Config& a, const Config& b);

// Every key ("method", "section.key"), in file order.
std::vector<std::string> config_keys();
// The canonical text of one key's value, as to_yaml writes it (strings unquoted, lists "[a, b]");
// for messages such as "train.lr: 0.0002 -> 0.0001". Throws qlora::Error for an unknown key.
std::string config_value(const Config& cfg, const std::string& key);
// Writes to_yaml(cfg) to `file` atomically (the resolved config next to an output).
void save_config(const Config& cfg, const std::filesystem::path& file);

// Enum <-> YAML spelling ("qlora", "nf4", "bfloat16", "cuda", "messages", "cosine", ...).
std::string to_string(Method v);
std::string to_string(QuantType v);
std::string to_string(DType v);
std::string to_string(Device v);
std::string to_string(DataFormat v);
std::string to_string(Schedule v);
std::string to_string(Checkpointing v);

}  // namespace qlora
