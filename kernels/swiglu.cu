// Op: the SwiGLU gate of the Llama MLP, silu(g) * u, forward and backward fused on the GPU (one launch
// each, instead of two forward and three backward ATen ops), bit-identical to the composite
// `at::silu(g) * u` and its autograd in every dtype: silu is computed in float32 and rounded to T, the
// product rounded again; backward rounds dy*u and dy*silu(g) to T as the composite's mul backward does,
// then applies silu's derivative in float32. Saves nothing but g and u (the composite also keeps silu(g)).
// Shapes: g, u, dy [n] contiguous, one dtype (bfloat16, float16, float32); elementwise.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/convert.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;

// ATen's silu: x / (1 + exp(-x)) in float32.
__device__ __forceinline__ float silu(float x) { return x / (1.0f + ::expf(-x)); }

template <typename T>
static __global__ void swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, int64_t n,
                                         T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T s = from_f32<T>(silu(to_f32(g[i])));
    out[i] = from_f32<T>(to_f32(s) * to_f32(u[i]));
  }
}

template <typename T>
static __global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                                         int64_t n, T* __restrict__ dg, T* __restrict__ du) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = to_f32(g[i]), d = to_f32(dy[i]);
    const T s = from_f32<T>(silu(x));
    du[i] = from_f32<T>(d * to_f32(s));
    const float ds = to_f32(from_f32<T>(d * to_f32(u[i])));
    // ATen's silu_backward: grad * sigmoid(x) * (1 + x * (1 - sigmoid(x))).
    const float sig = 1.0f / (1.0f + ::expf(-x));
    dg[i] = from_f32<T>(ds * sig * (1.0f + x * (1.0f - sig)));
  }
}

void check(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == ref.device(), "swiglu_cuda: ", name, " must be on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), "swiglu_cuda: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == ref.sizes() && t.scalar_type() == ref.scalar_type(), "swiglu_cuda: ", name,
              " must match the gate's shape and dtype");
}

int blocks_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 8));
}

}  // namespace

at::Tensor swiglu_fwd_cuda(const at::Tensor& g, const at::Tensor& u) {
  check(g, "gate", g);
  check(u, "up", g);
  const c10::cuda::CUDAGuard guard(g.device());
  auto out = at::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return out;
  dispatch_float_types(g.scalar_type(), "swiglu_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    swiglu_fwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(g.const_data_ptr()), reinterpret_cast<const T*>(u.const_data_ptr()), n,
        reinterpret_cast<T*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::pair<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u) {
  check(g, "gate", g);
  check(u, "up", g);
  check(dy, "grad", g);
  const c10::cuda::CUDAGuard guard(g.device());
  auto dg = at::empty_like(g), du = at::empty_like(u);
  const int64_t n = g.numel();
  if (n == 0) return {dg, du};
  dispatch_float_types(g.scalar_type(), "swiglu_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    swiglu_bwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(dy.const_data_ptr()), reinterpret_cast<const T*>(g.const_data_ptr()),
        reinterpret_cast<const T*>(u.const_data_ptr()), n, reinterpret_cast<T*>(dg.data_ptr()),
        reinterpret_cast<T*>(du.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dg, du};
}

}  // namespace qlora::kernels
