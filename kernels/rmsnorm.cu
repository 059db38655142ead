// Op: RMSNorm forward and input-gradient on the GPU, fused (one launch each instead of the six and about
// ten ATen ops of the composite), with Hugging Face's LlamaRMSNorm semantics:
//   y = w * (x * rsqrt(mean(x^2) + eps)).to(T)          sum of squares and rsqrt in float32;
//   the normalised value is rounded to T, then multiplied by w (rounded again), as in the composite.
// Backward (dx only; the LoRA methods freeze w, and `full` computes dw with ATen from the saved rstd):
//   g = float(T(dy * w));  dx = rstd * g - rstd^3 * x * sum(g * x) / H,  rounded once to T.
// One block per row; H up to any size (a strided loop of 16-byte vectors where the shapes allow, else of
// elements), two passes over the row (the second from cache).
// Shapes: x, dy [rows, H] contiguous (T = bfloat16, float16 or float32); w [H] (T); rstd float32 [rows].
// The forward can leave `spare` columns right of each output row (y then has row stride H + spare): room
// the next projection group writes its x A^T into (trainer/model/fused.h).
// The residual add can ride along: forward s = T(a + b) (the composite's add), written out, and y = RMSNorm(s);
// backward dx + ds, rounded as autograd sums the two gradients of s (T(T(dx) + ds)). Each saves an
// element-wise launch and a pass over a [rows, H] tensor.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <initializer_list>

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

// The kernels move VEC elements of T in one access (convert.cuh's Pack): 16 bytes where the row width and
// every pointer allow (the 2-byte loads of a scalar loop left the kernels at ~2.2 TB/s), 1 otherwise. The
// order of the sums depends on VEC; for one VEC the add variant visits the elements as the plain kernel
// does, so its sums are the plain kernel's on the same values (fresh contiguous buffers get the same VEC).

// add (not null): x = T(x + add) first, written to sum (the residual stream's next value); the second
// pass reads it back (this thread wrote those elements).
template <typename T, int VEC>
static __global__ void rmsnorm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ add, const T* __restrict__ w,
                                          int64_t h, float eps, int64_t ldy, T* __restrict__ y,
                                          float* __restrict__ rstd, T* __restrict__ sum) {
  using P = Pack<T, VEC>;
  const int64_t row = blockIdx.x, groups = h / VEC;
  const P* xr = reinterpret_cast<const P*>(x + row * h);
  const P* wr = reinterpret_cast<const P*>(w);
  P* yr = reinterpret_cast<P*>(y + row * ldy);
  float ss = 0.0f;
  if (add) {
    const P* ar = reinterpret_cast<const P*>(add + row * h);
    P* sr = reinterpret_cast<P*>(sum + row * h);
    for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
      const P a = xr[g], b = ar[g];
      P out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        out.v[e] = from_f32<T>(to_f32(a.v[e]) + to_f32(b.v[e]));
        const float v = to_f32(out.v[e]);
        ss += v * v;
      }
      sr[g] = out;
    }
    xr = sr;
  } else {
    for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
      const P a = xr[g];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float v = to_f32(a.v[e]);
        ss += v * v;
      }
    }
  }
  const float r = rsqrtf(block_sum(ss) / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    const P a = xr[g], wv = wr[g];
    P out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const T normed = from_f32<T>(to_f32(a.v[e]) * r);
      out.v[e] = from_f32<T>(to_f32(wv.v[e]) * to_f32(normed));
    }
    yr[g] = out;
  }
}

// dres (not null): the gradient reaching x by the residual path, added to dx.
template <typename T, int VEC>
static __global__ void rmsnorm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                          const float* __restrict__ rstd, const T* __restrict__ dres, int64_t h,
                                          T* __restrict__ dx) {
  using P = Pack<T, VEC>;
  const int64_t row = blockIdx.x, groups = h / VEC;
  const P* dyr = reinterpret_cast<const P*>(dy + row * h);
  const P* xr = reinterpret_cast<const P*>(x + row * h);
  const P* wr = reinterpret_cast<const P*>(w);
  const float r = rstd[row];
  float dot = 0.0f;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    const P d = dyr[g], xv = xr[g], wv = wr[g];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float gv = to_f32(from_f32<T>(to_f32(d.v[e]) * to_f32(wv.v[e])));
      dot += gv * to_f32(xv.v[e]);
    }
  }
  const float c = block_sum(dot) / static_cast<float>(h) * r * r * r;
  const P* drr = dres ? reinterpret_cast<const P*>(dres + row * h) : nullptr;
  P* dxr = reinterpret_cast<P*>(dx + row * h);
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    const P d = dyr[g], xv = xr[g], wv = wr[g];
    P out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float gv = to_f32(from_f32<T>(to_f32(d.v[e]) * to_f32(wv.v[e])));
      out.v[e] = from_f32<T>(r * gv - c * to_f32(xv.v[e]));
    }
    if (drr) {
      const P dr = drr[g];
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.v[e] = from_f32<T>(to_f32(out.v[e]) + to_f32(dr.v[e]));
    }
    dxr[g] = out;
  }
}

// The vector width for rows of h elements `ld` apart at these pointers (null ones ignored).
template <typename T>
int vec_width(int64_t h, int64_t ld, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(T);
  if (h % vec != 0 || ld % vec != 0) return 1;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return vec;
}

void check(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == ref.device(), "rmsnorm_cuda: ", name, " must be on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), "rmsnorm_cuda: ", name, " must be contiguous");
}

}  // namespace

namespace {
// y, rstd and (with `add`) the sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_fwd(const at::Tensor& x, const at::Tensor& add,
                                                           const at::Tensor& w, double eps, int64_t spare) {
  check(x, "x", x);
  check(w, "weight", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rmsnorm_cuda: x must have a last dimension");
  const int64_t h = x.size(-1), rows = x.numel() / h;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == h, "rmsnorm_cuda: weight must be [", h, "], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rmsnorm_cuda: weight dtype ", w.scalar_type(), " != x dtype ",
              x.scalar_type());
  TORCH_CHECK(rows < (int64_t{1} << 31), "rmsnorm_cuda: too many rows");
  TORCH_CHECK(spare >= 0, "rmsnorm_cuda: spare columns must be >= 0");
  if (add.defined()) {
    check(add, "the added residual", x);
    TORCH_CHECK(add.sizes() == x.sizes() && add.scalar_type() == x.scalar_type(),
                "rmsnorm_cuda: the added residual must match x, got ", add.sizes(), " ", add.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor buffer = at::empty({rows, h + spare}, x.options());
  const at::Tensor y = buffer.narrow(1, 0, h).view(x.sizes());
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  const at::Tensor sum = add.defined() ? at::empty_like(x) : at::Tensor();
  if (rows == 0) return {y, rstd, sum};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "rmsnorm_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
    const T* ap = add.defined() ? reinterpret_cast<const T*>(add.const_data_ptr()) : nullptr;
    const T* wp = reinterpret_cast<const T*>(w.const_data_ptr());
    T* yp = reinterpret_cast<T*>(buffer.data_ptr());
    T* sp = add.defined() ? reinterpret_cast<T*>(sum.data_ptr()) : nullptr;
    constexpr int vec = 16 / sizeof(T);
    if (vec_width<T>(h, h + spare, {xp, ap, wp, yp, sp}) == vec) {
      rmsnorm_fwd_kernel<T, vec><<<rows, kThreads, 0, stream>>>(xp, ap, wp, h, static_cast<float>(eps), h + spare, yp,
                                                                rstd.data_ptr<float>(), sp);
    } else {
      rmsnorm_fwd_kernel<T, 1><<<rows, kThreads, 0, stream>>>(xp, ap, wp, h, static_cast<float>(eps), h + spare, yp,
                                                              rstd.data_ptr<float>(), sp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd, sum};
}
}  // namespace

std::pair<at::Tensor, at::Tensor> rmsnorm_fwd_cuda(const at::Tensor& x, const at::Tensor& w, double eps,
                                                   int64_t spare) {
  auto [y, rstd, sum] = rmsnorm_fwd(x, at::Tensor(), w, eps, spare);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_fwd_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                    const at::Tensor& w, double eps, int64_t spare) {
  auto [y, rstd, sum] = rmsnorm_fwd(a, b, w, eps, spare);
  return {sum, y, rstd};
}

at::Tensor rmsnorm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                            const at::Tensor& residual_grad) {
  check(dy, "grad", x);
  check(x, "x", x);
  check(w, "weight", x);
  check(rstd, "rstd", x);
  const int64_t h = x.size(-1), rows = x.numel() / h;
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "rmsnorm_cuda: grad must match x");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == h && w.scalar_type() == x.scalar_type(), "rmsnorm_cuda: bad weight");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows, "rmsnorm_cuda: rstd must be float32 [",
              rows, "]");
  if (residual_grad.defined()) {
    check(residual_grad, "residual grad", x);
    TORCH_CHECK(residual_grad.sizes() == x.sizes() && residual_grad.scalar_type() == x.scalar_type(),
                "rmsnorm_cuda: residual grad must match x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  if (rows == 0) return dx;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "rmsnorm_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* dyp = reinterpret_cast<const T*>(dy.const_data_ptr());
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
    const T* wp = reinterpret_cast<const T*>(w.const_data_ptr());
    const T* rp = residual_grad.defined() ? reinterpret_cast<const T*>(residual_grad.const_data_ptr()) : nullptr;
    T* dxp = reinterpret_cast<T*>(dx.data_ptr());
    constexpr int vec = 16 / sizeof(T);
    if (vec_width<T>(h, h, {dyp, xp, wp, rp, dxp}) == vec) {
      rmsnorm_bwd_kernel<T, vec><<<rows, kThreads, 0, stream>>>(dyp, xp, wp, rstd.const_data_ptr<float>(), rp, h, dxp);
    } else {
      rmsnorm_bwd_kernel<T, 1><<<rows, kThreads, 0, stream>>>(dyp, xp, wp, rstd.const_data_ptr<float>(), rp, h, dxp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace qlora::kernels
