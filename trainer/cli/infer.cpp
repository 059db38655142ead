#include "trainer/cli/infer.h"

#include "trainer/cli/run_context.h"
#include "trainer/core/error.h"
#include "trainer/generate/generate.h"
#include "trainer/model/loader.h"

namespace qlora::cli {

void add_inference_options(CLI::App* cmd, InferenceArgs& a) {
  cmd->add_option("-m,--model", a.model, "Model directory (HF Llama: base, merged export, or bitsandbytes 4-bit)")
      ->required();
  cmd->add_option("-a,--adapter", a.adapter, "PEFT LoRA adapter directory to apply on the model");
  cmd->add_option("--tokenizer", a.tokenizer, "SentencePiece tokenizer.model (default: the model's, then the adapter's)");
  cmd->add_option("--device", a.device, "auto | cpu | cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--dtype", a.dtype, "Compute dtype: auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16 | fp16")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"}));
  cmd->add_option("--quantize", a.quantize, "Quantize a dense base on load: none | nf4 | fp4 (as QLoRA training)")
      ->check(CLI::IsMember({"none", "nf4", "fp4"}));
}

Inference load_inference(const InferenceArgs& a) {
  Device dev = a.device == "cuda" ? Device::CUDA : a.device == "cpu" ? Device::CPU : Device::Auto;
  DType dt = DType::Auto;
  if (a.dtype != "auto") {
    switch (model::parse_dtype_name(a.dtype, "--dtype")) {
      case at::kBFloat16: dt = DType::BFloat16; break;
      case at::kHalf: dt = DType::Float16; break;
      default: dt = DType::Float32; break;
    }
  }
  RunContext ctx = resolve_run_context(dev, dt);
  gen::InferenceOptions o;
  o.device = ctx.device;
  o.dtype = ctx.dtype;
  if (a.quantize == "nf4") o.quantize = QuantType::NF4;
  if (a.quantize == "fp4") o.quantize = QuantType::FP4;
  data::Tokenizer tok = gen::load_tokenizer(a.model, a.adapter, a.tokenizer);
  Inference inf{gen::load_for_inference(a.model, a.adapter, o), std::move(tok)};
  QLORA_REQUIRE(inf.tok.vocab_size() <= inf.model->arch().vocab_size,
                "tokenizer {} has {} pieces but the model's vocab_size is {}", inf.tok.origin(), inf.tok.vocab_size(),
                inf.model->arch().vocab_size);
  fmt::print(stderr, "model {}{}{} on {} in {}\n", a.model, a.adapter.empty() ? "" : " + adapter ", a.adapter,
             ctx.device.str(), model::dtype_name(ctx.dtype));
  return inf;
}

}  // namespace qlora::cli
