// Op: LoRA dropout for every adapted member of a projection group in one pass (the fused groups of
// trainer/model/fused.cpp; a single member for the per-projection modules), with the keep decisions drawn
// from counters (kernels/lora_dropout.h) rather than stored:
//   forward   x [n, in] (rows contiguous, any row stride: x may be a producer's wider buffer) is read once
//             and each member m gets its dropped copy h_m = keep_m * x / (1 - p_m) in out[m] ([M, n, in]);
//   backward  g [M, n, in] (each member's gradient of h_m) -> dx = sum_m keep_m * g_m / (1 - p_m), the terms
//             scaled and summed in float32 and rounded once.
// Before: per member a dropout launch writing h and a byte mask (kept until the backward), and in the
// backward two mask passes and an add per member (docs/performance.md item 26).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/convert.cuh"
#include "kernels/lora_dropout.h"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;

struct Draws {
  uint64_t seed[kMaxDropoutMembers];
  uint64_t offset[kMaxDropoutMembers];
  uint32_t threshold[kMaxDropoutMembers];
  float scale[kMaxDropoutMembers];
  int count;
};

// The keep words of VEC consecutive columns from c (a multiple of VEC when VEC is 4 or 8).
template <int VEC>
__device__ __forceinline__ void keep_words(const Draws& d, int m, int64_t row, int64_t c, uint32_t (&w)[VEC]) {
  if constexpr (VEC == 1) {
    uint32_t b[4];
    dropout_block(d.seed[m], d.offset[m], static_cast<uint64_t>(row), static_cast<uint64_t>(c / 4), b);
    w[0] = b[c % 4];
  } else {
#pragma unroll
    for (int k = 0; k < VEC / 4; ++k) {
      uint32_t b[4];
      dropout_block(d.seed[m], d.offset[m], static_cast<uint64_t>(row), static_cast<uint64_t>(c / 4 + k), b);
#pragma unroll
      for (int e = 0; e < 4; ++e) w[4 * k + e] = b[e];
    }
  }
}

// Each thread takes VEC consecutive columns of one row (grid-stride over rows x column groups).
template <typename T, int VEC>
static __global__ void __launch_bounds__(kThreads)
    dropout_fwd_kernel(const T* __restrict__ x, int64_t ldx, int64_t n, int64_t cols, Draws d, T* __restrict__ out) {
  using P = Pack<T, VEC>;
  const int64_t groups = cols / VEC, total = n * groups;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / groups, c = (i % groups) * VEC;
    const P xv = *reinterpret_cast<const P*>(x + row * ldx + c);
    for (int m = 0; m < d.count; ++m) {
      uint32_t w[VEC];
      keep_words<VEC>(d, m, row, c, w);
      P o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_f32<T>(w[e] >= d.threshold[m] ? to_f32(xv.v[e]) * d.scale[m] : 0.0f);
      *reinterpret_cast<P*>(out + (m * n + row) * cols + c) = o;
    }
  }
}

template <typename T, int VEC>
static __global__ void __launch_bounds__(kThreads)
    dropout_bwd_kernel(const T* __restrict__ g, int64_t n, int64_t cols, Draws d, T* __restrict__ dx) {
  using P = Pack<T, VEC>;
  const int64_t groups = cols / VEC, total = n * groups;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / groups, c = (i % groups) * VEC;
    float acc[VEC] = {};
    for (int m = 0; m < d.count; ++m) {
      const P gv = *reinterpret_cast<const P*>(g + (m * n + row) * cols + c);
      uint32_t w[VEC];
      keep_words<VEC>(d, m, row, c, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (w[e] >= d.threshold[m]) acc[e] += __fmul_rn(to_f32(gv.v[e]), d.scale[m]);  // no FMA: tests redo these sums
    }
    P o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = from_f32<T>(acc[e]);
    *reinterpret_cast<P*>(dx + row * cols + c) = o;
  }
}

Draws make_draws(const std::vector<DropoutDraw>& draws, const char* op) {
  TORCH_CHECK(!draws.empty() && draws.size() <= static_cast<size_t>(kMaxDropoutMembers), op, ": 1 to ",
              kMaxDropoutMembers, " draws, got ", draws.size());
  Draws d{};
  d.count = static_cast<int>(draws.size());
  for (int m = 0; m < d.count; ++m) {
    const DropoutDraw& w = draws[m];
    TORCH_CHECK(w.p >= 0.0 && w.p < 1.0, op, ": p must be in [0, 1), got ", w.p);
    TORCH_CHECK(w.offset % 4 == 0, op, ": a draw's offset must be a multiple of 4, got ", w.offset);
    d.seed[m] = w.seed;
    d.offset[m] = w.offset;
    d.threshold[m] = dropout_threshold(w.p);
    d.scale[m] = static_cast<float>(1.0 / (1.0 - w.p));  // ATen's dropout scales by this float
  }
  return d;
}

// Launches kernel<T, VEC> for the widest VEC the columns, strides and pointers allow (16-byte accesses).
template <typename T, typename Launch>
void with_vec(int64_t cols, int64_t stride, std::initializer_list<const void*> ptrs, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(T);  // 8 for 16-bit types, 4 for float32: whole engine blocks either way
  bool ok = cols % kVec == 0 && stride % kVec == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (ok) launch(std::integral_constant<int, kVec>{});
  else launch(std::integral_constant<int, 1>{});
}

int grid_for(int64_t work) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), int64_t{sms} * 16)));
}

}  // namespace

at::Tensor lora_dropout_fwd_cuda(const at::Tensor& x, const std::vector<DropoutDraw>& draws) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "lora_dropout_fwd: x must be a 2-D CUDA tensor, got ", x.sizes());
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, "lora_dropout_fwd: x's rows must be contiguous");
  const Draws d = make_draws(draws, "lora_dropout_fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), cols = x.size(1), ldx = n > 1 ? x.stride(0) : cols;
  at::Tensor out = at::empty({d.count, n, cols}, x.options());
  if (n == 0 || cols == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "lora_dropout_fwd", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
    T* op = reinterpret_cast<T*>(out.data_ptr());
    with_vec<T>(cols, ldx, {xp, op}, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      dropout_fwd_kernel<T, V><<<grid_for(n * (cols / V)), kThreads, 0, stream>>>(xp, ldx, n, cols, d, op);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor lora_dropout_bwd_cuda(const at::Tensor& g, const std::vector<DropoutDraw>& draws) {
  const Draws d = make_draws(draws, "lora_dropout_bwd");
  TORCH_CHECK(g.is_cuda() && g.dim() == 3 && g.size(0) == d.count && g.is_contiguous(),
              "lora_dropout_bwd: g must be a contiguous CUDA tensor [", d.count, ", n, in], got ", g.sizes());
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.size(1), cols = g.size(2);
  at::Tensor dx = at::empty({n, cols}, g.options());
  if (n == 0 || cols == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(g.scalar_type(), "lora_dropout_bwd", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* gp = reinterpret_cast<const T*>(g.const_data_ptr());
    T* dp = reinterpret_cast<T*>(dx.data_ptr());
    with_vec<T>(cols, cols, {gp, dp}, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      dropout_bwd_kernel<T, V><<<grid_for(n * (cols / V)), kThreads, 0, stream>>>(gp, n, cols, d, dp);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace qlora::kernels
