// Op: the token cross-entropy of a chunk of LM-head logits and its gradient, fused on the GPU. Replaces,
// for ChunkedLmLoss (trainer/train/trainer.cpp, whose composite stays the CPU path and the definition),
// a float32 copy of the logits and about ten element-wise / reduction kernels with one read of the logits
// from memory in their own dtype (the second comes from L2) and one in-place write of the gradient:
//   x = float(logits[r]);  lse = max(x) + log(sum(exp(x - max(x))))        all float32
//   loss[r] = lse - x[target[r]]
//   logits[r] <- T(exp(x - lse) - onehot(target[r]))                       rounded once to T
// expf / logf are the accurate ones (not __expf), so the results are within float32 rounding of ATen's
// composite; only the order of the sum differs.
// One block per row, two passes: the row's max and sum of exponentials in one online pass (the sum is
// rescaled when the max grows, once per 16-byte vector), then the gradient written over the row, which
// comes back from L2 (64 KB for V = 32000 in bf16). 16-byte accesses when V and the base pointer allow.
// Shapes: logits [rows, V] contiguous (T = bfloat16, float16 or float32); targets int64 [rows], each in
// [0, V): an out-of-range target is a device-side assert, as ATen's gather / nll_loss give, so the host
// never waits; loss float32 [rows].
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cfloat>

#include "kernels/convert.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

// 512 threads: a V = 32000 bf16 row is 4000 vectors, about 8 per thread; and the rows resident at once
// (32 registers: 4 blocks of 512 per SM, 528 rows on an H100) are 34 MB of bf16 logits, which leaves the
// second pass its row in the 50 MB L2; 8 resident blocks of 256 would hold 67 MB.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// (m, s): a running max and sum of exp(x - m). Empty is (-FLT_MAX, 0), not -inf, so that exp(m - m')
// never meets -inf - -inf (NaN) and rows holding -inf logits stay finite, as in ATen's logsumexp.
// __fmul_rn keeps the products out of an FMA, which would make merge(a, b) and merge(b, a) round apart.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  s = __fmul_rn(s, expf(m - mx)) + __fmul_rn(s2, expf(m2 - mx));
  m = mx;
}

// merge is symmetric bit for bit, so the butterfly leaves the same (m, s) in every lane.
__device__ __forceinline__ void warp_merge(float& m, float& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
}

// VEC consecutive columns per access (1: the scalar kernel for any V or alignment).
template <typename T, int VEC>
static __global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t v,
                         float* __restrict__ loss) {
  using P = Pack<T, VEC>;
  const int64_t row = blockIdx.x, groups = v / VEC;
  P* lr = reinterpret_cast<P*>(logits + row * v);
  const int64_t t = targets[row];
  CUDA_KERNEL_ASSERT_MSG(t >= 0 && t < v, "cross_entropy_cuda: target out of [0, V)");
  // Read before the barrier below, after which the row is overwritten.
  const float xt = threadIdx.x == 0 ? to_f32(logits[row * v + t]) : 0.0f;

  float m = -FLT_MAX, s = 0.0f;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    const P p = lr[g];
    float vm = to_f32(p.v[0]);
#pragma unroll
    for (int e = 1; e < VEC; ++e) vm = fmaxf(vm, to_f32(p.v[e]));
    if (vm > m) {  // one rescale per vector, not per element
      s *= expf(m - vm);
      m = vm;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) s += expf(to_f32(p.v[e]) - m);  // a NaN logit makes s NaN, as it should
  }
  warp_merge(m, s);
  __shared__ float pm[kWarps], ps[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  if (lane == 0) pm[warp] = m, ps[warp] = s;
  __syncthreads();
  m = lane < kWarps ? pm[lane] : -FLT_MAX;
  s = lane < kWarps ? ps[lane] : 0.0f;
  warp_merge(m, s);  // every warp the same, so every thread holds the same lse
  const float lse = m + logf(s);
  if (threadIdx.x == 0) loss[row] = lse - xt;

  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    P p = lr[g];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float y = expf(to_f32(p.v[e]) - lse);
      if (g * VEC + e == t) y -= 1.0f;
      p.v[e] = from_f32<T>(y);
    }
    lr[g] = p;
  }
}

template <typename T>
static void launch(T* logits, const int64_t* targets, int64_t rows, int64_t v, float* loss, cudaStream_t stream) {
  constexpr int vec = 16 / sizeof(T);
  if (v % vec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0) {
    cross_entropy_kernel<T, vec><<<rows, kThreads, 0, stream>>>(logits, targets, v, loss);
  } else {
    cross_entropy_kernel<T, 1><<<rows, kThreads, 0, stream>>>(logits, targets, v, loss);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor cross_entropy_fwd_bwd_cuda(at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.defined() && logits.is_cuda(), "cross_entropy_cuda: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "cross_entropy_cuda: logits must be [rows, V] with V > 0, got ",
              logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "cross_entropy_cuda: logits must be contiguous");
  const int64_t rows = logits.size(0), v = logits.size(1);
  TORCH_CHECK(targets.defined() && targets.is_cuda() && targets.device() == logits.device(),
              "cross_entropy_cuda: targets must be on ", logits.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "cross_entropy_cuda: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == rows && targets.is_contiguous(),
              "cross_entropy_cuda: targets must be contiguous [", rows, "], got ", targets.sizes());
  TORCH_CHECK(rows < (int64_t{1} << 31), "cross_entropy_cuda: too many rows");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return loss;
  dispatch_float_types(logits.scalar_type(), "cross_entropy_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch<T>(static_cast<T*>(logits.data_ptr()), targets.const_data_ptr<int64_t>(), rows, v,
              loss.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  });
  return loss;
}

}  // namespace qlora::kernels
