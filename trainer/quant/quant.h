// Frozen 4-bit weights (NF4 / FP4, bitsandbytes layout): quantize, dequantize, the frozen 4-bit linear,
// and the bitsandbytes serialized form.
//
// Invariants of a Quantized4bit (checked by validate()):
//   n = prod(shape); blocks = ceil(n / blocksize); blocksize a power of two in [32, 4096];
//   packed uint8 [(n+1)/2, 1]; absmax float32 [blocks], or uint8 [blocks] when double-quantized, then
//   nested_absmax float32 [ceil(blocks/256)] and nested_code float32 [256]; code float32 [16];
//   all tensors contiguous and on one device (CPU or CUDA).
// Every op runs on the device its inputs are on; the CPU implementation (quant_cpu.cpp) is the reference
// and the path CI runs; the CUDA kernels (kernels/) give identical bits. Units: bytes, elements.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "trainer/config/config.h"  // qlora::QuantType (header-only use)

namespace qlora::quant {

struct Quantized4bit {
  at::Tensor packed;         // uint8 [(n+1)/2, 1], high nibble = even flat index
  at::Tensor absmax;         // float32 [blocks], or uint8 [blocks] when double-quantized
  at::Tensor nested_absmax;  // float32 [ceil(blocks/256)] (double quant only)
  at::Tensor nested_code;    // float32 [256] bnb dynamic map (double quant only)
  float nested_offset = 0;   // mean of the float absmax (double quant only)
  at::Tensor code;           // float32 [16] quant_map (the codebook of `type`)
  QuantType type = QuantType::NF4;
  int64_t blocksize = 64;
  std::vector<int64_t> shape;                 // of the original weight, e.g. [out, in]
  at::ScalarType dtype = at::kBFloat16;       // of the original weight

  bool double_quant() const { return nested_absmax.defined(); }
  int64_t numel() const;
  int64_t blocks() const;
  at::Device device() const { return packed.device(); }
};

// Quantizes `w` (float32, bfloat16 or float16, contiguous, any shape, CPU or CUDA) on its own device.
// The result stays on that device; `w` can be freed afterwards (the loader streams layer by layer).
Quantized4bit quantize_4bit(const at::Tensor& w, QuantType type, int64_t blocksize = 64, bool double_quant = true);

// The weight back in `out` (float32, bfloat16 or float16), shape `q.shape`, on q's device.
at::Tensor dequantize_4bit(const Quantized4bit& q, at::ScalarType out);

// The same into `into` (q.numel() elements, float32 / bfloat16 / float16, on q's device), for example rows
// [o, o + out) of a buffer that holds several weights one after another: contiguous, or 2-D [rows, cols]
// rows further apart than cols (the first columns of a wider matrix; written directly by the CUDA kernel
// where it can, else through a contiguous copy).
void dequantize_4bit_into(const Quantized4bit& q, const at::Tensor& into);

// The float32 per-block scales [blocks], decoding the double quantization if present.
at::Tensor absmax_float(const Quantized4bit& q);

// y = x W^T with W dequantized into x's dtype; x [..., in] -> y [..., out]. Differentiable in x only:
// backward dequantizes W again for grad_x = grad_y W and never produces a weight gradient.
at::Tensor linear_4bit(const at::Tensor& x, const Quantized4bit& w);

// Storage in bytes of every tensor of q (what stays resident for a frozen weight).
int64_t bytes(const Quantized4bit& q);

// Moves every tensor of q to `device` (e.g. after loading a bnb checkpoint on the CPU).
Quantized4bit to_device(const Quantized4bit& q, at::Device device);

// Checks the invariants above; `what` names the tensor in the message.
void validate(const Quantized4bit& q, const std::string& what);

// The bitsandbytes state-dict entries of one weight under a module prefix P ending in '.', e.g.
// "model.layers.0.self_attn.q_proj.": P+"weight", P+"weight.absmax", P+"weight.quant_map",
// [P+"weight.nested_absmax", P+"weight.nested_quant_map"], P+"weight.quant_state.bitsandbytes__nf4".
std::vector<std::pair<std::string, at::Tensor>> to_bnb_state(const std::string& prefix, const Quantized4bit& q);

// Reads those entries back (on the CPU, where `get` returns them), validating the quant_state JSON
// against the tensors. Errors name the key. `has` says whether a key exists.
Quantized4bit from_bnb_state(const std::string& prefix, const std::function<at::Tensor(const std::string&)>& get,
                             const std::function<bool(const std::string&)>& has);

// bnb's signed dynamic 8-bit map (create_dynamic_map()), regenerated with the same float32 ops: [256].
at::Tensor dynamic_map();

// The codebook of `type`: float32 [16] on the CPU.
at::Tensor codebook(QuantType type);

const char* quant_type_name(QuantType type);  // "nf4" / "fp4"

}  // namespace qlora::quant
