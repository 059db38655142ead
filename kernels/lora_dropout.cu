// Op: LoRA dropout for every adapted member of a projection group in one pass (the fused groups of
// trainer/model/fused.cpp; a single member for the per-projection modules), the keep decisions drawn from
// counters (kernels/lora_dropout.h) and kept as one bit an element:
//   forward   x [n, in] (rows contiguous, any row stride: x may be a producer's wider buffer) is read once;
//             each member m gets its dropped copy h_m = keep_m * x / (1 - p_m) in out[m] ([M, n, in]) and
//             its keep bits in mask[m] ([M, n, ceil(in / 8)] bytes, bit e of byte c: column 8 c + e);
//   draw      the forward's keep bits alone (for kernels/lora_dropout_mm.cu's products, which need no copies);
//   apply     the copies again from x and the mask (the backward's dA = dxa^T h), no draws;
//   backward  g [M, n, in] (each member's gradient of h_m) -> dx = sum_m keep_m * g_m / (1 - p_m), the terms
//             scaled and summed in float32 and rounded once.
// Before: per member ATen's dropout writing h and a byte mask (kept until the backward), and in the backward
// two mask passes and an add per member (docs/performance.md item 26).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/convert.cuh"
#include "kernels/lora_dropout.h"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 8;  // columns a thread: one mask byte, one engine block

struct Members {
  uint64_t seed[kMaxDropoutMembers];
  uint64_t offset[kMaxDropoutMembers];
  uint32_t threshold[kMaxDropoutMembers];
  float scale[kMaxDropoutMembers];
  int count;
};

// A thread's 8 columns of a row: one aligned access of 8 elements (VEC) where the caller checked that the
// columns, the row strides and the pointers allow it, else element by element with the row's end checked.
template <typename T, bool VEC>
struct Cols {
  float v[kCols];
  __device__ __forceinline__ void load(const T* p, int64_t valid) {
    if constexpr (VEC) {
      const Pack<T, kCols> pk = *reinterpret_cast<const Pack<T, kCols>*>(p);
#pragma unroll
      for (int e = 0; e < kCols; ++e) v[e] = to_f32(pk.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < kCols; ++e) v[e] = e < valid ? to_f32(p[e]) : 0.0f;
    }
  }
  __device__ __forceinline__ void store(T* p, int64_t valid) const {
    if constexpr (VEC) {
      Pack<T, kCols> pk;
#pragma unroll
      for (int e = 0; e < kCols; ++e) pk.v[e] = from_f32<T>(v[e]);
      *reinterpret_cast<Pack<T, kCols>*>(p) = pk;
    } else {
#pragma unroll
      for (int e = 0; e < kCols; ++e)
        if (e < valid) p[e] = from_f32<T>(v[e]);
    }
  }
};

// Grid-stride over rows x blocks of 8 columns; `f(row, block, c, valid)` does one.
template <typename F>
__device__ __forceinline__ void for_blocks(int64_t n, int64_t blocks, int64_t cols, F&& f) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n * blocks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / blocks, b = i % blocks, c = b * kCols;
    f(row, b, c, cols - c);
  }
}

// Each member's copy of x; DRAW: the keep bits drawn and written to mask (the forward), else read from it.
template <typename T, bool VEC, bool DRAW>
static __global__ void __launch_bounds__(kThreads)
    dropout_copies_kernel(const T* __restrict__ x, int64_t ldx, int64_t n, int64_t cols, Members mb,
                          uint8_t* __restrict__ mask, T* __restrict__ out) {
  const int64_t blocks = ceil_div(cols, kCols);
  for_blocks(n, blocks, cols, [&](int64_t row, int64_t b, int64_t c, int64_t valid) {
    Cols<T, VEC> xv;
    xv.load(x + row * ldx + c, valid);
    for (int m = 0; m < mb.count; ++m) {
      uint8_t* bits = mask + (m * n + row) * blocks + b;
      uint32_t keep;
      if constexpr (DRAW) {
        keep = dropout_keep_bits(mb.seed[m], mb.offset[m], static_cast<uint64_t>(row), static_cast<uint64_t>(b),
                                 mb.threshold[m]);
        *bits = static_cast<uint8_t>(keep);
      } else {
        keep = *bits;
      }
      Cols<T, VEC> h;
#pragma unroll
      for (int e = 0; e < kCols; ++e) h.v[e] = (keep >> e) & 1u ? xv.v[e] * mb.scale[m] : 0.0f;
      h.store(out + (m * n + row) * cols + c, valid);
    }
  });
}

// The keep bits alone (the forward of kernels/lora_dropout_mm.cu's products): x is not read.
static __global__ void __launch_bounds__(kThreads)
    dropout_bits_kernel(int64_t n, int64_t cols, Members mb, uint8_t* __restrict__ mask) {
  const int64_t blocks = ceil_div(cols, kCols);
  for_blocks(n, blocks, cols, [&](int64_t row, int64_t b, int64_t, int64_t) {
    for (int m = 0; m < mb.count; ++m)
      mask[(m * n + row) * blocks + b] = static_cast<uint8_t>(dropout_keep_bits(
          mb.seed[m], mb.offset[m], static_cast<uint64_t>(row), static_cast<uint64_t>(b), mb.threshold[m]));
  });
}

template <typename T, bool VEC>
static __global__ void __launch_bounds__(kThreads)
    dropout_bwd_kernel(const T* __restrict__ g, int64_t n, int64_t cols, Members mb, const uint8_t* __restrict__ mask,
                       T* __restrict__ dx) {
  const int64_t blocks = ceil_div(cols, kCols);
  for_blocks(n, blocks, cols, [&](int64_t row, int64_t b, int64_t c, int64_t valid) {
    Cols<T, VEC> acc;
#pragma unroll
    for (int e = 0; e < kCols; ++e) acc.v[e] = 0.0f;
    for (int m = 0; m < mb.count; ++m) {
      Cols<T, VEC> gv;
      gv.load(g + (m * n + row) * cols + c, valid);
      const uint32_t keep = mask[(m * n + row) * blocks + b];
#pragma unroll
      for (int e = 0; e < kCols; ++e)  // no FMA: the tests redo these sums term by term
        if ((keep >> e) & 1u) acc.v[e] += __fmul_rn(gv.v[e], mb.scale[m]);
    }
    acc.store(dx + row * cols + c, valid);
  });
}

Members make_members(const std::vector<DropoutDraw>& draws, const char* op) {
  TORCH_CHECK(!draws.empty() && draws.size() <= static_cast<size_t>(kMaxDropoutMembers), op, ": 1 to ",
              kMaxDropoutMembers, " members, got ", draws.size());
  Members mb{};
  mb.count = static_cast<int>(draws.size());
  for (int m = 0; m < mb.count; ++m) {
    const DropoutDraw& w = draws[m];
    TORCH_CHECK(w.p >= 0.0 && w.p < 1.0, op, ": p must be in [0, 1), got ", w.p);
    TORCH_CHECK(w.offset % 4 == 0, op, ": a draw's offset must be a multiple of 4, got ", w.offset);
    mb.seed[m] = w.seed;
    mb.offset[m] = w.offset;
    mb.threshold[m] = dropout_threshold(w.p);
    mb.scale[m] = static_cast<float>(1.0 / (1.0 - w.p));  // ATen's dropout scales by this float
  }
  return mb;
}

// Calls launch(tag, vec) with T's null pointer and whether 8-element accesses fit: the columns and every row
// stride a multiple of 8 elements, the pointers aligned to 8 elements.
template <typename Launch>
void dispatch(const at::Tensor& like, int64_t cols, std::initializer_list<int64_t> strides,
              std::initializer_list<const void*> ptrs, const char* op, Launch&& launch) {
  dispatch_float_types(like.scalar_type(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    bool vec = cols % kCols == 0;
    for (int64_t s : strides) vec = vec && s % kCols == 0;
    for (const void* p : ptrs) vec = vec && reinterpret_cast<uintptr_t>(p) % (kCols * sizeof(T)) == 0;
    if (vec) launch(tag, std::true_type{});
    else launch(tag, std::false_type{});
  });
}

int grid_for(int64_t n, int64_t cols) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t work = n * ceil_div(cols, kCols);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), int64_t{sms} * 16)));
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, op, ": x must be a 2-D CUDA tensor, got ", x.sizes());
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, op, ": x's rows must be contiguous");
}

void check_mask(const at::Tensor& mask, int count, int64_t n, int64_t cols, const at::Tensor& like, const char* op) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.device() == like.device() && mask.is_contiguous() &&
                  mask.sizes() == at::IntArrayRef({count, n, ceil_div(cols, kCols)}),
              op, ": mask must be contiguous uint8 [", count, ", ", n, ", ", ceil_div(cols, kCols), "] on ",
              like.device(), ", got ", mask.sizes());
}

}  // namespace

namespace {

// The members' copies of x into a new [M, n, in] tensor: drawing the keep bits into mask, or reading them.
at::Tensor copies(const at::Tensor& x, const Members& mb, const at::Tensor& mask, bool draw, const char* op) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), cols = x.size(1), ldx = n > 1 ? x.stride(0) : cols;
  at::Tensor out = at::empty({mb.count, n, cols}, x.options());
  if (n == 0 || cols == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, cols, {ldx}, {x.const_data_ptr(), out.data_ptr()}, op, [&](auto* tag, auto vec) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr bool V = decltype(vec)::value;
    const auto kernel = draw ? dropout_copies_kernel<T, V, true> : dropout_copies_kernel<T, V, false>;
    kernel<<<grid_for(n, cols), kThreads, 0, stream>>>(reinterpret_cast<const T*>(x.const_data_ptr()), ldx, n, cols, mb,
                                                       mask.data_ptr<uint8_t>(), reinterpret_cast<T*>(out.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> lora_dropout_fwd_cuda(const at::Tensor& x, const std::vector<DropoutDraw>& draws) {
  check_x(x, "lora_dropout_fwd");
  const Members mb = make_members(draws, "lora_dropout_fwd");
  at::Tensor mask = at::empty({mb.count, x.size(0), ceil_div(x.size(1), kCols)}, x.options().dtype(at::kByte));
  return {copies(x, mb, mask, /*draw=*/true, "lora_dropout_fwd"), mask};
}

at::Tensor lora_dropout_draw_cuda(const at::Tensor& x, const std::vector<DropoutDraw>& draws) {
  check_x(x, "lora_dropout_draw");
  const Members mb = make_members(draws, "lora_dropout_draw");
  const int64_t n = x.size(0), cols = x.size(1);
  at::Tensor mask = at::empty({mb.count, n, ceil_div(cols, kCols)}, x.options().dtype(at::kByte));
  if (n == 0 || cols == 0) return mask;
  const c10::cuda::CUDAGuard guard(x.device());
  dropout_bits_kernel<<<grid_for(n, cols), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      n, cols, mb, mask.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

at::Tensor lora_dropout_apply_cuda(const at::Tensor& x, const at::Tensor& mask, const std::vector<double>& p) {
  check_x(x, "lora_dropout_apply");
  std::vector<DropoutDraw> draws;
  for (double q : p) draws.push_back({q, 0, 0});
  const Members mb = make_members(draws, "lora_dropout_apply");
  check_mask(mask, mb.count, x.size(0), x.size(1), x, "lora_dropout_apply");
  return copies(x, mb, mask, /*draw=*/false, "lora_dropout_apply");
}

at::Tensor lora_dropout_bwd_cuda(const at::Tensor& g, const at::Tensor& mask, const std::vector<double>& p) {
  std::vector<DropoutDraw> draws;
  for (double q : p) draws.push_back({q, 0, 0});
  const Members mb = make_members(draws, "lora_dropout_bwd");
  TORCH_CHECK(g.is_cuda() && g.dim() == 3 && g.size(0) == mb.count && g.is_contiguous(),
              "lora_dropout_bwd: g must be a contiguous CUDA tensor [", mb.count, ", n, in], got ", g.sizes());
  const int64_t n = g.size(1), cols = g.size(2);
  check_mask(mask, mb.count, n, cols, g, "lora_dropout_bwd");
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor dx = at::empty({n, cols}, g.options());
  if (n == 0 || cols == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(g, cols, {cols}, {g.const_data_ptr(), dx.data_ptr()}, "lora_dropout_bwd", [&](auto* tag, auto vec) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dropout_bwd_kernel<T, decltype(vec)::value><<<grid_for(n, cols), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(g.const_data_ptr()), n, cols, mb, mask.const_data_ptr<uint8_t>(),
        reinterpret_cast<T*>(dx.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace qlora::kernels
