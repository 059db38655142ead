// Op: a projection group's LoRA B matrices as one block-diagonal matrix in the compute dtype, in one launch
// (trainer/model/fused.cpp: the columns the base GEMM reads for the adapters, and the dxa GEMM's operand).
//   out[i, j] = T(scale_m * B_m[i - offset_m, j - col_m])  inside member m's block, else 0,
// with the product in float32 and one rounding to T: what ATen's `(b * scale)` followed by a cast gives.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/convert.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

struct Blocks {
  const float* b[kMaxBlockDiagMembers];
  int64_t offset[kMaxBlockDiagMembers], rows[kMaxBlockDiagMembers], col[kMaxBlockDiagMembers];
  int64_t rank[kMaxBlockDiagMembers];
  float scale[kMaxBlockDiagMembers];
  int count;
};

// Threads along a row's columns (coalesced stores), warps along rows; no index division.
constexpr int kCols = 32, kRows = 8;
template <typename T>
static __global__ void block_diag_kernel(Blocks m, int64_t total, int64_t ranks, int64_t ld, T* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  if (j >= ranks) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * kRows + threadIdx.y; i < total;
       i += static_cast<int64_t>(gridDim.y) * kRows) {
    float v = 0.0f;
    for (int k = 0; k < m.count; ++k) {
      const int64_t r = i - m.offset[k], c = j - m.col[k];
      if (r >= 0 && r < m.rows[k] && c >= 0 && c < m.rank[k]) v = m.scale[k] * m.b[k][r * m.rank[k] + c];
    }
    out[i * ld + j] = from_f32<T>(v);
  }
}

// The same with one 16-byte store of V = 16 / sizeof(T) columns a thread, for blocks whose columns and ranks
// are multiples of V on 16-byte aligned rows (every rank the recipes use): the scalar kernel's 2-byte stores
// held it at a quarter of the bandwidth (15 us for q|k|v's [12288, 192] at r 64 against ~4 for its bytes).
// A vector never straddles two members' columns, and a row belongs to at most one member.
template <typename T>
static __global__ void block_diag_vec_kernel(Blocks m, int64_t total, int64_t vecs, int64_t ld,
                                             T* __restrict__ out) {
  constexpr int V = 16 / sizeof(T);
  const int64_t n = total * vecs;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / vecs, j = (idx - i * vecs) * V;
    Pack<T, V> p;
    for (int e = 0; e < V; ++e) p.v[e] = from_f32<T>(0.0f);
    for (int k = 0; k < m.count; ++k) {
      const int64_t r = i - m.offset[k], c = j - m.col[k];
      if (r >= 0 && r < m.rows[k] && c >= 0 && c < m.rank[k]) {
        const float4* src = reinterpret_cast<const float4*>(m.b[k] + r * m.rank[k] + c);
        for (int h = 0; h < V / 4; ++h) {
          const float4 f = src[h];
          p.v[4 * h] = from_f32<T>(m.scale[k] * f.x), p.v[4 * h + 1] = from_f32<T>(m.scale[k] * f.y);
          p.v[4 * h + 2] = from_f32<T>(m.scale[k] * f.z), p.v[4 * h + 3] = from_f32<T>(m.scale[k] * f.w);
        }
      }
    }
    *reinterpret_cast<Pack<T, V>*>(out + i * ld + j) = p;
  }
}

}  // namespace

void lora_block_diag_cuda(const at::Tensor& out, const std::vector<BlockDiagMember>& members) {
  TORCH_CHECK(out.defined() && out.is_cuda() && out.dim() == 2 && out.stride(1) == 1 && out.stride(0) >= out.size(1),
              "lora_block_diag_cuda: out must be a 2-D CUDA tensor of contiguous rows");
  TORCH_CHECK(members.size() <= static_cast<size_t>(kMaxBlockDiagMembers), "lora_block_diag_cuda: at most ",
              kMaxBlockDiagMembers, " members, got ", members.size());
  Blocks m{};
  m.count = static_cast<int>(members.size());
  for (size_t k = 0; k < members.size(); ++k) {
    const BlockDiagMember& b = members[k];
    TORCH_CHECK(b.b.defined() && b.b.device() == out.device() && b.b.scalar_type() == at::kFloat &&
                    b.b.is_contiguous() && b.b.dim() == 2,
                "lora_block_diag_cuda: member ", k, "'s B must be a contiguous float32 matrix on ", out.device());
    TORCH_CHECK(b.offset >= 0 && b.offset + b.b.size(0) <= out.size(0) && b.col >= 0 &&
                    b.col + b.b.size(1) <= out.size(1),
                "lora_block_diag_cuda: member ", k, "'s block ", b.b.sizes(), " at (", b.offset, ", ", b.col,
                ") does not fit ", out.sizes());
    m.b[k] = b.b.const_data_ptr<float>();
    m.offset[k] = b.offset, m.rows[k] = b.b.size(0), m.col[k] = b.col, m.rank[k] = b.b.size(1);
    m.scale[k] = static_cast<float>(b.scale);
  }
  const int64_t total = out.size(0), ranks = out.size(1);
  if (total == 0 || ranks == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  dispatch_float_types(out.scalar_type(), "lora_block_diag_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t V = 16 / sizeof(T);
    bool vec = ranks % V == 0 && out.stride(0) % V == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
    for (int k = 0; k < m.count; ++k) {
      vec = vec && m.col[k] % V == 0 && m.rank[k] % V == 0 && reinterpret_cast<uintptr_t>(m.b[k]) % 16 == 0;
    }
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (vec) {
      const int64_t vecs = ranks / V;
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total * vecs, 256), 8 * sms));
      block_diag_vec_kernel<T><<<blocks, 256, 0, stream>>>(m, total, vecs, out.stride(0),
                                                           static_cast<T*>(out.data_ptr()));
    } else {
      const dim3 grid(static_cast<unsigned>(ceil_div(ranks, kCols)),
                      static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kRows), 65535)));
      block_diag_kernel<T><<<grid, dim3(kCols, kRows), 0, stream>>>(m, total, ranks, out.stride(0),
                                                                     static_cast<T*>(out.data_ptr()));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace qlora::kernels
