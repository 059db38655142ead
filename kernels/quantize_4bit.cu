// Op: blockwise 4-bit quantization (NF4 / FP4) on the GPU, bit-identical to the CPU reference
// (trainer/quant/quant_cpu.cpp; semantics in format_4bit.h). One warp per quantization block: the lanes
// reduce the block's absmax with shuffles, then each lane encodes pairs of elements into packed bytes.
// Quantization runs once per weight at load time; it is bounded by reading the weight once.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/format_4bit.h"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, fmt4::Code C>
static __global__ void quantize_4bit_kernel(const T* __restrict__ x,  // [n]
                                            int64_t n, int64_t bs, int64_t blocks,
                                            uint8_t* __restrict__ packed,  // [(n+1)/2]
                                            float* __restrict__ absmax) {  // [blocks]
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (b >= blocks) return;  // whole warps leave together
  const int64_t start = b * bs, end = start + bs < n ? start + bs : n;
  float m = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) m = fmaxf(m, fabsf(static_cast<float>(x[i])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const bool partial = end - start < bs;
  const float am = fmaxf(m, fmt4::kMinAbsmax);
  if (lane == 0) absmax[b] = partial ? am : m;
  const float r = fmt4::div_rn(1.0f, am);
  auto scaled = [&](int64_t i) -> float {
    if (i >= n) return 0.0f;
    const float v = static_cast<float>(x[i]);
    return fmt4::clamp_unit(partial ? fmt4::div_rn(v, am) : fmt4::mul_rn(v, r));
  };
  for (int64_t p = start / 2 + lane; p < (end + 1) / 2; p += 32)
    packed[p] = fmt4::pack(fmt4::encode(C, scaled(2 * p)), fmt4::encode(C, scaled(2 * p + 1)));
}

template <typename T>
static void launch_quantize(const T* x, int64_t n, int64_t bs, fmt4::Code code, uint8_t* packed, float* absmax,
                            cudaStream_t stream) {
  const int64_t blocks = (n + bs - 1) / bs;
  const int64_t grid = (blocks + kWarps - 1) / kWarps;
  if (code == fmt4::Code::NF4)
    quantize_4bit_kernel<T, fmt4::Code::NF4><<<grid, kThreads, 0, stream>>>(x, n, bs, blocks, packed, absmax);
  else
    quantize_4bit_kernel<T, fmt4::Code::FP4><<<grid, kThreads, 0, stream>>>(x, n, bs, blocks, packed, absmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::pair<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& x, fmt4::Code code, int64_t blocksize) {
  TORCH_CHECK(x.defined() && x.is_cuda(), "quantize_4bit_cuda: x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "quantize_4bit_cuda: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "quantize_4bit_cuda: x must be contiguous");
  TORCH_CHECK(fmt4::valid_blocksize(blocksize), "quantize_4bit_cuda: unsupported block size ", blocksize,
              " (expected a power of two in [32, 4096])");
  TORCH_CHECK(code == fmt4::Code::NF4 || code == fmt4::Code::FP4, "quantize_4bit_cuda: unknown code");
  const int64_t n = x.numel();
  TORCH_CHECK(n > 0, "quantize_4bit_cuda: empty input");
  const c10::cuda::CUDAGuard guard(x.device());
  auto packed = at::empty({(n + 1) / 2}, x.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_4bit_cuda", [&] {
    launch_quantize<scalar_t>(x.const_data_ptr<scalar_t>(), n, blocksize, code, packed.data_ptr<uint8_t>(),
                              absmax.data_ptr<float>(), stream);
  });
  return {packed, absmax};
}

}  // namespace qlora::kernels
