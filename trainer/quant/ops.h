// The 4-bit ops on raw flat tensors, one CPU implementation (the reference, quant_cpu.cpp) and one CUDA
// implementation (kernels/*.cu) with the same signature. quant.cpp dispatches on the device.
//
// Shapes: x [n] (float32 / bfloat16 / float16); packed uint8 [(n+1)/2]; absmax float32 [blocks]
// (blocks = ceil(n / blocksize)), or uint8 [blocks] with nested_absmax float32 [ceil(blocks/256)],
// nested_code float32 [256] and offset when double-quantized (pass undefined tensors otherwise);
// lut uint8 [65536] (build_nested_lut). All contiguous, all on the op's device. The dequantize ops
// write into `into` when given (contiguous, n elements of dtype `out`, e.g. rows of a larger buffer).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "kernels/format_4bit.h"

namespace qlora::quant {

std::pair<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& x, fmt4::Code code, int64_t blocksize);
// Quantizes (absmax - offset) in blocks of 256 to the dynamic map through its lookup table:
// returns (uint8 [blocks], float32 nested_absmax [ceil(blocks/256)]).
std::pair<at::Tensor, at::Tensor> quantize_nested_cpu(const at::Tensor& absmax, float offset, const at::Tensor& lut);
at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                               const at::Tensor& nested_code, float offset, fmt4::Code code, int64_t blocksize,
                               int64_t n, at::ScalarType out, const at::Tensor& into = {});

// bnb's 65536-bin table for the 8-bit map `code` (float32 [256], ascending): uint8 [65536] on the CPU.
at::Tensor build_nested_lut(const at::Tensor& code);

}  // namespace qlora::quant

#ifdef QLORA_WITH_CUDA
#include "kernels/ops.h"
#endif
