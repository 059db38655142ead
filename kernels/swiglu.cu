// Op: the SwiGLU gate of the Llama MLP, silu(g) * u, forward and backward fused on the GPU (one launch
// each, instead of two forward and three backward ATen ops), bit-identical to the composite
// `at::silu(g) * u` and its autograd in every dtype: silu is computed in float32 and rounded to T, the
// product rounded again; backward rounds dy*u and dy*silu(g) to T as the composite's mul backward does,
// then applies silu's derivative in float32. Saves nothing but g and u (the composite also keeps silu(g)).
// Shapes: g, u, dy [n] contiguous, one dtype (bfloat16, float16, float32); elementwise.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float f32(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float f32<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T cast(float v);
template <> __device__ __forceinline__ float cast<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 cast<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half cast<__half>(float v) { return __float2half_rn(v); }

// ATen's silu: x / (1 + exp(-x)) in float32.
__device__ __forceinline__ float silu(float x) { return x / (1.0f + ::expf(-x)); }

template <typename T>
static __global__ void swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, int64_t n,
                                         T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T s = cast<T>(silu(f32(g[i])));
    out[i] = cast<T>(f32(s) * f32(u[i]));
  }
}

template <typename T>
static __global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                                         int64_t n, T* __restrict__ dg, T* __restrict__ du) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = f32(g[i]), d = f32(dy[i]);
    const T s = cast<T>(silu(x));
    du[i] = cast<T>(d * f32(s));
    const float ds = f32(cast<T>(d * f32(u[i])));
    // ATen's silu_backward: grad * sigmoid(x) * (1 + x * (1 - sigmoid(x))).
    const float sig = 1.0f / (1.0f + ::expf(-x));
    dg[i] = cast<T>(ds * sig * (1.0f + x * (1.0f - sig)));
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

template <typename F>
void dispatch(at::ScalarType s, F&& f) {
  if (s == at::kBFloat16) f(static_cast<__nv_bfloat16*>(nullptr));
  else if (s == at::kHalf) f(static_cast<__half*>(nullptr));
  else if (s == at::kFloat) f(static_cast<float*>(nullptr));
  else TORCH_CHECK(false, "swiglu_cuda: dtype must be bfloat16, float16 or float32, got ", s);
}

}  // namespace

at::Tensor swiglu_fwd_cuda(const at::Tensor& g, const at::Tensor& u) {
  check(g, "gate", g);
  check(u, "up", g);
  const c10::cuda::CUDAGuard guard(g.device());
  auto out = at::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return out;
  dispatch(g.scalar_type(), [&](auto* tag) {
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
  dispatch(g.scalar_type(), [&](auto* tag) {
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
