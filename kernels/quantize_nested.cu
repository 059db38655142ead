// Op: double quantization of the 4-bit scales on the GPU: (absmax - offset) in blocks of 256 to bnb's
// dynamic 8-bit map, through the same 65536-bin lookup table as bnb's CPU library (format_4bit.h), so the
// codes are bit-identical to the CPU reference. One warp per block of 256 scales.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/format_4bit.h"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

static __global__ void quantize_nested_kernel(const float* __restrict__ absmax,  // [n]
                                              float offset, int64_t n, int64_t blocks,
                                              const uint8_t* __restrict__ lut,  // [65536]
                                              uint8_t* __restrict__ q,          // [n]
                                              float* __restrict__ nested) {     // [blocks]
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (b >= blocks) return;
  const int64_t start = b * fmt4::kNestedBlock;
  const int64_t end = start + fmt4::kNestedBlock < n ? start + fmt4::kNestedBlock : n;
  float m = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) m = fmaxf(m, fabsf(__fsub_rn(absmax[i], offset)));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) nested[b] = m;
  const float inv = m == 0.0f ? 0.0f : fmt4::div_rn(1.0f, m);
  for (int64_t i = start + lane; i < end; i += 32)
    q[i] = m == 0.0f ? 0 : __ldg(lut + fmt4::lut_index(fmt4::mul_rn(__fsub_rn(absmax[i], offset), inv)));
}

static void launch_quantize_nested(const float* absmax, float offset, int64_t n, const uint8_t* lut, uint8_t* q,
                                   float* nested, cudaStream_t stream) {
  const int64_t blocks = (n + fmt4::kNestedBlock - 1) / fmt4::kNestedBlock;
  quantize_nested_kernel<<<(blocks + kWarps - 1) / kWarps, kThreads, 0, stream>>>(absmax, offset, n, blocks, lut, q,
                                                                                  nested);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::pair<at::Tensor, at::Tensor> quantize_nested_cuda(const at::Tensor& absmax, float offset, const at::Tensor& lut) {
  TORCH_CHECK(absmax.defined() && absmax.is_cuda(), "quantize_nested_cuda: absmax must be a CUDA tensor");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(),
              "quantize_nested_cuda: absmax must be contiguous float32");
  TORCH_CHECK(lut.defined() && lut.device() == absmax.device() && lut.scalar_type() == at::kByte &&
                  lut.is_contiguous() && lut.numel() == fmt4::kLutSize,
              "quantize_nested_cuda: lut must be contiguous uint8 [65536] on ", absmax.device());
  const int64_t n = absmax.numel();
  TORCH_CHECK(n > 0, "quantize_nested_cuda: empty absmax");
  const c10::cuda::CUDAGuard guard(absmax.device());
  auto q = at::empty({n}, absmax.options().dtype(at::kByte));
  auto nested = at::empty({(n + fmt4::kNestedBlock - 1) / fmt4::kNestedBlock}, absmax.options());
  launch_quantize_nested(absmax.const_data_ptr<float>(), offset, n, lut.const_data_ptr<uint8_t>(),
                         q.data_ptr<uint8_t>(), nested.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  return {q, nested};
}

}  // namespace qlora::kernels
