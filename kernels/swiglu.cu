// Op: the SwiGLU gate of the Llama MLP, silu(g) * u, forward and backward fused on the GPU (one launch
// each, instead of two forward and three backward ATen ops), bit-identical to the composite
// `at::silu(g) * u` and its autograd in every dtype: silu is computed in float32 and rounded to T, the
// product rounded again; backward rounds dy*u and dy*silu(g) to T as the composite's mul backward does,
// then applies silu's derivative in float32. Saves nothing but g and u (the composite also keeps silu(g)).
// Shapes: g, u, dy [n] contiguous, one dtype (bfloat16, float16, float32); elementwise. The packed ops
// take gate and up as the two halves of each row of gu [rows, 2I] (what the fused gate|up projection
// produces) and return out [rows, I] / dgu [rows, 2I] in the same layout, so no slice is ever copied.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>

#include "kernels/convert.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;

// ATen's silu: x / (1 + exp(-x)) in float32.
__device__ __forceinline__ float silu(float x) { return x / (1.0f + ::expf(-x)); }

// Rows of `cols` elements on the grid's y axis, columns on x (grid-stride in both); g, u, dy, out, dg, du
// each advance by their own row stride, so gate and up can be the two halves of one packed row.
struct Layout {
  int64_t rows, cols;
  int64_t in_stride;   // g and u
  int64_t out_stride;  // out (forward) or dy (backward)
  int64_t grad_stride;  // dg and du (backward)
};

// VEC consecutive columns per thread (VEC = 1: the scalar kernel; 16 / sizeof(T): one 16-byte access
// per operand when the columns and row strides allow it).
template <typename T, int VEC>
static __global__ void swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, Layout l,
                                         T* __restrict__ out) {
  using P = Pack<T, VEC>;
  const int64_t groups = l.cols / VEC;
  for (int64_t r = blockIdx.y; r < l.rows; r += gridDim.y) {
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < groups;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t i = r * l.in_stride + c * VEC;
      const P gv = *reinterpret_cast<const P*>(g + i), uv = *reinterpret_cast<const P*>(u + i);
      P o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const T s = from_f32<T>(silu(to_f32(gv.v[e])));
        o.v[e] = from_f32<T>(to_f32(s) * to_f32(uv.v[e]));
      }
      *reinterpret_cast<P*>(out + r * l.out_stride + c * VEC) = o;
    }
  }
}

template <typename T, int VEC>
static __global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                                         Layout l, T* __restrict__ dg, T* __restrict__ du) {
  using P = Pack<T, VEC>;
  const int64_t groups = l.cols / VEC;
  for (int64_t r = blockIdx.y; r < l.rows; r += gridDim.y) {
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < groups;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t i = r * l.in_stride + c * VEC, o = r * l.grad_stride + c * VEC;
      const P gv = *reinterpret_cast<const P*>(g + i), uv = *reinterpret_cast<const P*>(u + i);
      const P dv = *reinterpret_cast<const P*>(dy + r * l.out_stride + c * VEC);
      P dgv, duv;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float x = to_f32(gv.v[e]), d = to_f32(dv.v[e]);
        const T s = from_f32<T>(silu(x));
        duv.v[e] = from_f32<T>(d * to_f32(s));
        const float ds = to_f32(from_f32<T>(d * to_f32(uv.v[e])));
        // ATen's silu_backward: grad * sigmoid(x) * (1 + x * (1 - sigmoid(x))).
        const float sig = 1.0f / (1.0f + ::expf(-x));
        dgv.v[e] = from_f32<T>(ds * sig * (1.0f + x * (1.0f - sig)));
      }
      *reinterpret_cast<P*>(dg + o) = dgv;
      *reinterpret_cast<P*>(du + o) = duv;
    }
  }
}

void check(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == ref.device(), "swiglu_cuda: ", name, " must be on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), "swiglu_cuda: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == ref.sizes() && t.scalar_type() == ref.scalar_type(), "swiglu_cuda: ", name,
              " must match the gate's shape and dtype");
}

dim3 grid_for(const Layout& l, int vec) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t x = std::min<int64_t>((l.cols / vec + kThreads - 1) / kThreads, l.rows == 1 ? sms * 8 : 1024);
  return dim3(static_cast<unsigned>(std::max<int64_t>(x, 1)), static_cast<unsigned>(std::min<int64_t>(l.rows, 65535)));
}

// 16-byte accesses when every row of every operand starts 16-byte aligned and the columns split evenly.
template <typename T>
bool vector_ok(const Layout& l, std::initializer_list<const void*> ptrs) {
  constexpr int64_t v = 16 / sizeof(T);
  if (l.cols % v != 0 || (l.rows > 1 && (l.in_stride % v != 0 || l.out_stride % v != 0 || l.grad_stride % v != 0)))
    return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

template <typename T>
static void launch_fwd(const T* g, const T* u, const Layout& l, T* out, cudaStream_t stream) {
  constexpr int v = 16 / sizeof(T);
  if (vector_ok<T>(l, {g, u, out})) {
    swiglu_fwd_kernel<T, v><<<grid_for(l, v), kThreads, 0, stream>>>(g, u, l, out);
  } else {
    swiglu_fwd_kernel<T, 1><<<grid_for(l, 1), kThreads, 0, stream>>>(g, u, l, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
static void launch_bwd(const T* dy, const T* g, const T* u, const Layout& l, T* dg, T* du, cudaStream_t stream) {
  constexpr int v = 16 / sizeof(T);
  if (vector_ok<T>(l, {dy, g, u, dg, du})) {
    swiglu_bwd_kernel<T, v><<<grid_for(l, v), kThreads, 0, stream>>>(dy, g, u, l, dg, du);
  } else {
    swiglu_bwd_kernel<T, 1><<<grid_for(l, 1), kThreads, 0, stream>>>(dy, g, u, l, dg, du);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    launch_fwd<T>(static_cast<const T*>(g.const_data_ptr()), static_cast<const T*>(u.const_data_ptr()),
                  Layout{1, n, n, n, n}, static_cast<T*>(out.data_ptr()), at::cuda::getCurrentCUDAStream());
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
    launch_bwd<T>(static_cast<const T*>(dy.const_data_ptr()), static_cast<const T*>(g.const_data_ptr()),
                  static_cast<const T*>(u.const_data_ptr()), Layout{1, n, n, n, n}, static_cast<T*>(dg.data_ptr()),
                  static_cast<T*>(du.data_ptr()), at::cuda::getCurrentCUDAStream());
  });
  return {dg, du};
}

namespace {
void check_packed(const at::Tensor& gu, const char* name) {
  TORCH_CHECK(gu.defined() && gu.is_cuda(), "swiglu_packed_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(gu.is_contiguous(), "swiglu_packed_cuda: ", name, " must be contiguous");
  TORCH_CHECK(gu.dim() >= 1 && gu.size(-1) % 2 == 0, "swiglu_packed_cuda: ", name,
              " must end in an even number of columns (gate | up)");
}
}  // namespace

at::Tensor swiglu_packed_fwd_cuda(const at::Tensor& gu, int64_t spare) {
  check_packed(gu, "gate|up");
  TORCH_CHECK(spare >= 0, "swiglu_packed_cuda: spare columns must be >= 0");
  const c10::cuda::CUDAGuard guard(gu.device());
  const int64_t i = gu.size(-1) / 2, rows = i == 0 ? 0 : gu.numel() / (2 * i);
  auto sizes = gu.sizes().vec();
  sizes.back() = i;
  const at::Tensor buffer = at::empty({rows, i + spare}, gu.options());
  const at::Tensor out = buffer.narrow(1, 0, i).view(sizes);
  if (rows == 0 || i == 0) return out;
  dispatch_float_types(gu.scalar_type(), "swiglu_packed_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* base = static_cast<const T*>(gu.const_data_ptr());
    launch_fwd<T>(base, base + i, Layout{rows, i, 2 * i, i + spare, 0}, static_cast<T*>(buffer.data_ptr()),
                  at::cuda::getCurrentCUDAStream());
  });
  return out;
}

at::Tensor swiglu_packed_bwd_cuda(const at::Tensor& dy, const at::Tensor& gu) {
  check_packed(gu, "gate|up");
  const int64_t i = gu.size(-1) / 2, rows = i == 0 ? 0 : gu.numel() / (2 * i);
  TORCH_CHECK(dy.defined() && dy.is_cuda() && dy.device() == gu.device() && dy.is_contiguous() &&
                  dy.scalar_type() == gu.scalar_type() && dy.numel() == rows * i,
              "swiglu_packed_cuda: grad must be contiguous, ", gu.scalar_type(), ", with ", rows * i, " elements");
  const c10::cuda::CUDAGuard guard(gu.device());
  auto dgu = at::empty_like(gu);
  if (rows == 0 || i == 0) return dgu;
  dispatch_float_types(gu.scalar_type(), "swiglu_packed_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* base = static_cast<const T*>(gu.const_data_ptr());
    T* d = static_cast<T*>(dgu.data_ptr());
    launch_bwd<T>(static_cast<const T*>(dy.const_data_ptr()), base, base + i, Layout{rows, i, 2 * i, i, 2 * i}, d,
                  d + i, at::cuda::getCurrentCUDAStream());
  });
  return dgu;
}

}  // namespace qlora::kernels
