// Op: RMSNorm forward and input-gradient on the GPU, fused (one launch each instead of the six and about
// ten ATen ops of the composite), with Hugging Face's LlamaRMSNorm semantics:
//   y = w * (x * rsqrt(mean(x^2) + eps)).to(T)          sum of squares and rsqrt in float32;
//   the normalised value is rounded to T, then multiplied by w (rounded again), as in the composite.
// Backward (dx only; the LoRA methods freeze w, and `full` computes dw with ATen from the saved rstd):
//   g = float(T(dy * w));  dx = rstd * g - rstd^3 * x * sum(g * x) / H,  rounded once to T.
// One block per row; H up to any size (a strided loop), two passes over the row (the second from cache).
// Shapes: x, dy [rows, H] contiguous (T = bfloat16, float16 or float32); w [H] (T); rstd float32 [rows].
// The forward can leave `spare` columns right of each output row (y then has row stride H + spare): room
// the next projection group writes its x A^T into (trainer/model/fused.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/convert.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;

// Sum of v over the block; every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) s += partial[i];
  return s;
}

template <typename T>
static __global__ void rmsnorm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, int64_t h, float eps,
                                          int64_t ldy, T* __restrict__ y, float* __restrict__ rstd) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * h;
  T* yr = y + row * ldy;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < h; i += kThreads) {
    const float v = to_f32(xr[i]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss) / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t i = threadIdx.x; i < h; i += kThreads) {
    const T normed = from_f32<T>(to_f32(xr[i]) * r);
    yr[i] = from_f32<T>(to_f32(w[i]) * to_f32(normed));
  }
}

template <typename T>
static __global__ void rmsnorm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                          const float* __restrict__ rstd, int64_t h, T* __restrict__ dx) {
  const int64_t row = blockIdx.x;
  const T* dyr = dy + row * h;
  const T* xr = x + row * h;
  const float r = rstd[row];
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < h; i += kThreads) {
    const float g = to_f32(from_f32<T>(to_f32(dyr[i]) * to_f32(w[i])));
    dot += g * to_f32(xr[i]);
  }
  const float c = block_sum(dot) / static_cast<float>(h) * r * r * r;
  for (int64_t i = threadIdx.x; i < h; i += kThreads) {
    const float g = to_f32(from_f32<T>(to_f32(dyr[i]) * to_f32(w[i])));
    dx[row * h + i] = from_f32<T>(r * g - c * to_f32(xr[i]));
  }
}

void check(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == ref.device(), "rmsnorm_cuda: ", name, " must be on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), "rmsnorm_cuda: ", name, " must be contiguous");
}

}  // namespace

std::pair<at::Tensor, at::Tensor> rmsnorm_fwd_cuda(const at::Tensor& x, const at::Tensor& w, double eps,
                                                   int64_t spare) {
  check(x, "x", x);
  check(w, "weight", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rmsnorm_cuda: x must have a last dimension");
  const int64_t h = x.size(-1), rows = x.numel() / h;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == h, "rmsnorm_cuda: weight must be [", h, "], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rmsnorm_cuda: weight dtype ", w.scalar_type(), " != x dtype ",
              x.scalar_type());
  TORCH_CHECK(rows < (int64_t{1} << 31), "rmsnorm_cuda: too many rows");
  TORCH_CHECK(spare >= 0, "rmsnorm_cuda: spare columns must be >= 0");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor buffer = at::empty({rows, h + spare}, x.options());
  const at::Tensor y = buffer.narrow(1, 0, h).view(x.sizes());
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, rstd};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "rmsnorm_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rmsnorm_fwd_kernel<T><<<rows, kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.const_data_ptr()), reinterpret_cast<const T*>(w.const_data_ptr()), h,
        static_cast<float>(eps), h + spare, reinterpret_cast<T*>(buffer.data_ptr()), rstd.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

at::Tensor rmsnorm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd) {
  check(dy, "grad", x);
  check(x, "x", x);
  check(w, "weight", x);
  check(rstd, "rstd", x);
  const int64_t h = x.size(-1), rows = x.numel() / h;
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "rmsnorm_cuda: grad must match x");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == h && w.scalar_type() == x.scalar_type(), "rmsnorm_cuda: bad weight");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows, "rmsnorm_cuda: rstd must be float32 [",
              rows, "]");
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  if (rows == 0) return dx;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "rmsnorm_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rmsnorm_bwd_kernel<T><<<rows, kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(dy.const_data_ptr()), reinterpret_cast<const T*>(x.const_data_ptr()),
        reinterpret_cast<const T*>(w.const_data_ptr()), rstd.const_data_ptr<float>(), h,
        reinterpret_cast<T*>(dx.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace qlora::kernels
