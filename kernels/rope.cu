// Op: rotary position embedding fused with the split of the packed q|k|v projection output (one launch
// each way instead of about ten ATen ops per tensor and their autograd, which materialised the slices'
// gradients as zero-padded full-width buffers).
//
// Forward: y [..., (nq + 2 nk) D] (rows = the leading dims, e.g. B T; q then k then v heads, contiguous)
//   and cos/sin [rows, D] -> q [..., nq, D] and k [..., nk, D] rotated, v [..., nk, D] copied. Hugging
//   Face's rotate_half convention, rounded as the composite `x * cos + rotate_half(x) * sin` rounds in T:
//   each product to T, then the sum (bit-identical to it).
// Backward: dq, dk, dv -> dy [..., (nq + 2 nk) D], what the composite's autograd gives:
//   dx[j] = T(dq[j] cos[j]) + T(dq[j + D/2] sin[j + D/2])   for j <  D/2
//   dx[j] = T(dq[j] cos[j]) - T(dq[j - D/2] sin[j - D/2])   for j >= D/2,  rounded once more to T.
// D even. T = bfloat16, float16 or float32; cos/sin in T (rope_tables gives them in the compute dtype).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>

#include "kernels/convert.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;

// Products and sums with explicit round-to-nearest, so the compiler cannot contract them into an FMA:
// the composite rounds each product on its own (in float32 too).
template <typename T>
__device__ __forceinline__ float round_mul(T a, T b) {
  return to_f32(from_f32<T>(__fmul_rn(to_f32(a), to_f32(b))));
}

// The vector kernels: one thread rotates VEC elements of the first half of a head together with their
// partners in the second half (so each value is loaded once), or copies VEC elements of v. Needs
// (D / 2) % VEC == 0 and 16-byte aligned rows (rope_split checks; the scalar kernels below cover the rest).
// The work of one packed row, shared by both directions: items [0, rotated) each rotate VEC elements of a
// q or k head's first half with their partners in the second half; items [rotated, items) each move VEC
// elements of v.
struct VecRow {
  int half, per_head, rotated, items, width;
  __host__ __device__ VecRow(int nq, int nk, int d, int vec)
      : half(d / 2), per_head(d / 2 / vec), rotated((nq + nk) * (d / 2 / vec)),
        items((nq + nk) * (d / 2 / vec) + nk * d / vec), width((nq + 2 * nk) * d) {}
};

// cos and sin of row r at [j, j + VEC) (1) and [half + j, half + j + VEC) (2).
template <typename P, typename T>
struct Tables {
  P c1, c2, s1, s2;
  __device__ Tables(const T* cos, const T* sin, int64_t r, int d, int half, int j)
      : c1(*reinterpret_cast<const P*>(cos + r * d + j)), c2(*reinterpret_cast<const P*>(cos + r * d + half + j)),
        s1(*reinterpret_cast<const P*>(sin + r * d + j)), s2(*reinterpret_cast<const P*>(sin + r * d + half + j)) {}
};

template <typename T, int VEC>
static __global__ void rope_split_fwd_vec(const T* __restrict__ y, const T* __restrict__ cos, const T* __restrict__ sin,
                                          int64_t rows, int nq, int nk, int d, T* __restrict__ q, T* __restrict__ k,
                                          T* __restrict__ v) {
  using P = Pack<T, VEC>;
  const VecRow w(nq, nk, d, VEC);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* yr = y + r * w.width;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < w.items; i += gridDim.x * blockDim.x) {
      if (i < w.rotated) {
        const int head = i / w.per_head, j = (i - head * w.per_head) * VEC;
        const P x1 = *reinterpret_cast<const P*>(yr + head * d + j);
        const P x2 = *reinterpret_cast<const P*>(yr + head * d + w.half + j);
        const Tables<P, T> t(cos, sin, r, d, w.half, j);
        P o1, o2;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const T neg2 = from_f32<T>(-to_f32(x2.v[e]));
          o1.v[e] = from_f32<T>(__fadd_rn(round_mul(x1.v[e], t.c1.v[e]), round_mul(neg2, t.s1.v[e])));
          o2.v[e] = from_f32<T>(__fadd_rn(round_mul(x2.v[e], t.c2.v[e]), round_mul(x1.v[e], t.s2.v[e])));
        }
        T* dst = head < nq ? q + (r * nq + head) * d : k + (r * nk + head - nq) * d;
        *reinterpret_cast<P*>(dst + j) = o1;
        *reinterpret_cast<P*>(dst + w.half + j) = o2;
      } else {
        const int e = (i - w.rotated) * VEC;  // element within the row's v heads
        *reinterpret_cast<P*>(v + r * nk * d + e) = *reinterpret_cast<const P*>(yr + (nq + nk) * d + e);
      }
    }
  }
}

template <typename T, int VEC>
static __global__ void rope_split_bwd_vec(const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv,
                                          const T* __restrict__ cos, const T* __restrict__ sin, int64_t rows, int nq,
                                          int nk, int d, T* __restrict__ dy) {
  using P = Pack<T, VEC>;
  const VecRow w(nq, nk, d, VEC);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    T* dyr = dy + r * w.width;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < w.items; i += gridDim.x * blockDim.x) {
      if (i < w.rotated) {
        const int head = i / w.per_head, j = (i - head * w.per_head) * VEC;
        const T* g = head < nq ? dq + (r * nq + head) * d : dk + (r * nk + head - nq) * d;
        const P g1 = *reinterpret_cast<const P*>(g + j), g2 = *reinterpret_cast<const P*>(g + w.half + j);
        const Tables<P, T> t(cos, sin, r, d, w.half, j);
        P o1, o2;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          o1.v[e] = from_f32<T>(__fadd_rn(round_mul(g1.v[e], t.c1.v[e]), round_mul(g2.v[e], t.s2.v[e])));
          o2.v[e] = from_f32<T>(__fsub_rn(round_mul(g2.v[e], t.c2.v[e]), round_mul(g1.v[e], t.s1.v[e])));
        }
        *reinterpret_cast<P*>(dyr + head * d + j) = o1;
        *reinterpret_cast<P*>(dyr + head * d + w.half + j) = o2;
      } else {
        const int e = (i - w.rotated) * VEC;
        *reinterpret_cast<P*>(dyr + (nq + nk) * d + e) = *reinterpret_cast<const P*>(dv + r * nk * d + e);
      }
    }
  }
}

// The scalar kernels (any even D, any alignment): one thread per element of a packed row.
template <typename T>
static __global__ void rope_split_fwd_kernel(const T* __restrict__ y, const T* __restrict__ cos,
                                             const T* __restrict__ sin, int64_t rows, int nq, int nk, int d,
                                             T* __restrict__ q, T* __restrict__ k, T* __restrict__ v) {
  const int width = (nq + 2 * nk) * d, half = d / 2;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* yr = y + r * width;
    const T* cr = cos + r * d;
    const T* sr = sin + r * d;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x) {
      const int head = c / d, j = c - head * d;
      if (head < nq + nk) {
        const T partner = j < half ? from_f32<T>(-to_f32(yr[c + half])) : yr[c - half];
        const T out = from_f32<T>(__fadd_rn(round_mul(yr[c], cr[j]), round_mul(partner, sr[j])));
        if (head < nq)
          q[(r * nq + head) * d + j] = out;
        else
          k[(r * nk + head - nq) * d + j] = out;
      } else {
        v[(r * nk + head - nq - nk) * d + j] = yr[c];
      }
    }
  }
}

template <typename T>
static __global__ void rope_split_bwd_kernel(const T* __restrict__ dq, const T* __restrict__ dk,
                                             const T* __restrict__ dv, const T* __restrict__ cos,
                                             const T* __restrict__ sin, int64_t rows, int nq, int nk, int d,
                                             T* __restrict__ dy) {
  const int width = (nq + 2 * nk) * d, half = d / 2;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* cr = cos + r * d;
    const T* sr = sin + r * d;
    T* dyr = dy + r * width;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x) {
      const int head = c / d, j = c - head * d;
      if (head < nq + nk) {
        const T* g = head < nq ? dq + (r * nq + head) * d : dk + (r * nk + head - nq) * d;
        const float direct = round_mul(g[j], cr[j]);
        const float rotated = j < half ? round_mul(g[j + half], sr[j + half]) : -round_mul(g[j - half], sr[j - half]);
        dyr[c] = from_f32<T>(__fadd_rn(direct, rotated));
      } else {
        dyr[c] = dv[(r * nk + head - nq - nk) * d + j];
      }
    }
  }
}

dim3 grid_for(int64_t rows, int64_t width) {
  const int64_t x = (width + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(std::min<int64_t>(x, 1024)), static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
}

// 16 bytes of T per thread when every row and half-head starts 16-byte aligned.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
bool vector_ok(int d, std::initializer_list<const void*> ptrs) {
  if ((d / 2) % kVec<T> != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Work items of a row for the vector kernels: VEC-wide pairs of the rotated heads, VEC-wide pieces of v.
template <typename T>
int64_t vector_items(int nq, int nk, int d) {
  return VecRow(nq, nk, d, kVec<T>).items;
}

template <typename T>
static void launch_rope_fwd(const T* y, const T* cos, const T* sin, int64_t rows, int nq, int nk, int d, T* q, T* k,
                            T* v, cudaStream_t stream) {
  const int64_t width = int64_t{nq + 2 * nk} * d;  // elements of a packed row
  if (vector_ok<T>(d, {y, cos, sin, q, k, v})) {
    rope_split_fwd_vec<T, kVec<T>>
        <<<grid_for(rows, vector_items<T>(nq, nk, d)), kThreads, 0, stream>>>(y, cos, sin, rows, nq, nk, d, q, k, v);
  } else {
    rope_split_fwd_kernel<T><<<grid_for(rows, width), kThreads, 0, stream>>>(y, cos, sin, rows, nq, nk, d, q, k, v);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
static void launch_rope_bwd(const T* dq, const T* dk, const T* dv, const T* cos, const T* sin, int64_t rows, int nq,
                            int nk, int d, T* dy, cudaStream_t stream) {
  const int64_t width = int64_t{nq + 2 * nk} * d;
  if (vector_ok<T>(d, {dq, dk, dv, cos, sin, dy})) {
    rope_split_bwd_vec<T, kVec<T>><<<grid_for(rows, vector_items<T>(nq, nk, d)), kThreads, 0, stream>>>(
        dq, dk, dv, cos, sin, rows, nq, nk, d, dy);
  } else {
    rope_split_bwd_kernel<T><<<grid_for(rows, width), kThreads, 0, stream>>>(dq, dk, dv, cos, sin, rows, nq, nk, d, dy);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t numel) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == ref.device(), "rope_split_cuda: ", name, " must be on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), "rope_split_cuda: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rope_split_cuda: ", name, " must be ", ref.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "rope_split_cuda: ", name, " has ", t.numel(), " elements, expected ", numel);
}

void check_heads(int64_t nq, int64_t nk, int64_t d) {
  TORCH_CHECK(nq > 0 && nk > 0 && d > 0 && d % 2 == 0,
              "rope_split_cuda: heads must be positive and head_dim even, got ", nq, ", ", nk, ", ", d);
  TORCH_CHECK((nq + 2 * nk) * d < (int64_t{1} << 31), "rope_split_cuda: row too wide");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_split_fwd_cuda(const at::Tensor& y, const at::Tensor& cos,
                                                                   const at::Tensor& sin, int64_t nq, int64_t nk,
                                                                   int64_t d) {
  check_heads(nq, nk, d);
  const int64_t width = (nq + 2 * nk) * d;
  TORCH_CHECK(y.defined() && y.dim() >= 1 && y.size(-1) == width, "rope_split_cuda: y must end in ", width,
              " = (nq + 2 nk) head_dim columns");
  const int64_t rows = y.numel() / width;
  check(y, "y", y, rows * width);
  check(cos, "cos", y, rows * d);
  check(sin, "sin", y, rows * d);
  const c10::cuda::CUDAGuard guard(y.device());
  auto lead = y.sizes().vec();
  lead.pop_back();
  auto shape = [&](int64_t heads) {
    auto s = lead;
    s.push_back(heads);
    s.push_back(d);
    return s;
  };
  auto q = at::empty(shape(nq), y.options()), k = at::empty(shape(nk), y.options()),
       v = at::empty(shape(nk), y.options());
  if (rows == 0) return {q, k, v};
  dispatch_float_types(y.scalar_type(), "rope_split_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_rope_fwd<T>(static_cast<const T*>(y.const_data_ptr()), static_cast<const T*>(cos.const_data_ptr()),
                       static_cast<const T*>(sin.const_data_ptr()), rows, static_cast<int>(nq), static_cast<int>(nk),
                       static_cast<int>(d), static_cast<T*>(q.data_ptr()), static_cast<T*>(k.data_ptr()),
                       static_cast<T*>(v.data_ptr()), at::cuda::getCurrentCUDAStream());
  });
  return {q, k, v};
}

at::Tensor rope_split_bwd_cuda(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cos,
                               const at::Tensor& sin) {
  TORCH_CHECK(dq.defined() && dq.dim() >= 2 && dk.defined() && dk.dim() == dq.dim(),
              "rope_split_cuda: dq and dk must be [..., heads, head_dim]");
  const int64_t nq = dq.size(-2), nk = dk.size(-2), d = dq.size(-1), rows = dq.numel() / std::max<int64_t>(nq * d, 1);
  check_heads(nq, nk, d);
  check(dq, "dq", dq, rows * nq * d);
  check(dk, "dk", dq, rows * nk * d);
  check(dv, "dv", dq, rows * nk * d);
  check(cos, "cos", dq, rows * d);
  check(sin, "sin", dq, rows * d);
  const c10::cuda::CUDAGuard guard(dq.device());
  auto sizes = dq.sizes().vec();
  sizes.pop_back();
  sizes.back() = (nq + 2 * nk) * d;
  auto dy = at::empty(sizes, dq.options());
  if (rows == 0) return dy;
  dispatch_float_types(dq.scalar_type(), "rope_split_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_rope_bwd<T>(static_cast<const T*>(dq.const_data_ptr()), static_cast<const T*>(dk.const_data_ptr()),
                       static_cast<const T*>(dv.const_data_ptr()), static_cast<const T*>(cos.const_data_ptr()),
                       static_cast<const T*>(sin.const_data_ptr()), rows, static_cast<int>(nq), static_cast<int>(nk),
                       static_cast<int>(d), static_cast<T*>(dy.data_ptr()), at::cuda::getCurrentCUDAStream());
  });
  return dy;
}

}  // namespace qlora::kernels
