// What `qlora generate` and `qlora eval` share: the options that pick a model (+ adapter, tokenizer,
// device, dtype, optional 4-bit load) and loading them.
#pragma once

#include <CLI/CLI.hpp>

#include <string>

#include "datasets/tokenizer.h"
#include "trainer/model/llama.h"

namespace qlora::cli {

struct InferenceArgs {
  std::string model;      // HF model directory: a base, a merged export, or a bitsandbytes 4-bit checkpoint
  std::string adapter;    // PEFT adapter directory ("" = none)
  std::string tokenizer;  // "" = <model>/tokenizer.model, then <adapter>/tokenizer.model
  std::string device = "auto";
  std::string dtype = "auto";
  std::string quantize = "none";  // none | nf4 | fp4: quantize a dense base on load, as QLoRA training does
};

// Declares --model/-m, --adapter, --tokenizer, --device, --dtype, --quantize on `cmd`.
void add_inference_options(CLI::App* cmd, InferenceArgs& a);

struct Inference {
  model::LlamaForCausalLM model;
  data::Tokenizer tok;
};

// Loads the tokenizer first (a missing one fails fast), then the model and adapter; logs to stderr.
Inference load_inference(const InferenceArgs& a);

}  // namespace qlora::cli
