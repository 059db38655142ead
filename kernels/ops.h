// The exported CUDA ops (qlora_kernels). Same signatures and bit-identical results as the CPU reference
// ops in trainer/quant/ops.h (which documents the shapes); every op checks dtype, device, contiguity,
// shape and parameters, launches on the current stream and checks the launch.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "kernels/format_4bit.h"

namespace qlora::kernels {

std::pair<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& x, fmt4::Code code, int64_t blocksize);
std::pair<at::Tensor, at::Tensor> quantize_nested_cuda(const at::Tensor& absmax, float offset, const at::Tensor& lut);
at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                                const at::Tensor& nested_code, float offset, fmt4::Code code, int64_t blocksize,
                                int64_t n, at::ScalarType out);

// RMSNorm (kernels/rmsnorm.cu): x [..., H], w [H], same dtype (bf16 / fp16 / fp32), contiguous.
// Forward returns (y like x, rstd float32 [rows]); backward returns dx like x (no weight gradient).
std::pair<at::Tensor, at::Tensor> rmsnorm_fwd_cuda(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor rmsnorm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd);

// SwiGLU gate (kernels/swiglu.cu): silu(g) * u and its backward (dg, du); g, u, dy same shape and dtype.
at::Tensor swiglu_fwd_cuda(const at::Tensor& g, const at::Tensor& u);
std::pair<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u);

}  // namespace qlora::kernels
