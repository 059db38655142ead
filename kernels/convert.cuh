// float32 <-> the element types of the kernels (float, __nv_bfloat16, __half), round-to-nearest-even, as
// ATen's casts round, and the small helpers the kernels and their launchers share.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace qlora::kernels {

template <typename T> __device__ __forceinline__ float to_f32(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Calls f with a null T* for the kernel element type of `s` (bfloat16, float16, float32); `op` names the
// caller in the error for any other dtype.
template <typename F>
void dispatch_float_types(c10::ScalarType s, const char* op, F&& f) {
  if (s == c10::ScalarType::BFloat16) f(static_cast<__nv_bfloat16*>(nullptr));
  else if (s == c10::ScalarType::Half) f(static_cast<__half*>(nullptr));
  else if (s == c10::ScalarType::Float) f(static_cast<float*>(nullptr));
  else TORCH_CHECK(false, op, ": dtype must be bfloat16, float16 or float32, got ", s);
}

// VEC consecutive elements of T moved in one aligned access (16 bytes for VEC = 16 / sizeof(T); VEC = 1
// is the scalar fallback of the vector kernels).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Blocks of b that cover a (launch sizes).
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace qlora::kernels
