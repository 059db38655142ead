// Op: a projection group's two products of the output gradient dy with its adapters, in one pass over dy
// (the backward of trainer/model/fused.cpp's groups). For each adapted member m, which owns columns
// [offset_m, offset_m + out_m) of dy and [col_m, col_m + R) of xa and dxa:
//   dxa[t, col_m + j] = sum_f dy[t, offset_m + f] * T(s_m * B_m[f, j])      (dy times the block-diagonal bd)
//   dB_m[f, j]        = s_m * sum_t dy[t, offset_m + f] * xa[t, col_m + j]   (float32)
// cuBLAS reads dy once for dxa and once more per member for the dB's, with split-K kernels and their reductions between
// (5.7 ms a step at the 7B shape, r 16, 2048 tokens, and the backward's block-diagonal operand built first); this reads
// it once (5.0 ms with its sums, docs/performance.md item 18; 4.8 since item 32). Each CTA takes a tile of kTokens
// tokens by `chunks` x 64 features of one member (8192-token slices at most, so the workspace stays bounded): the tile
// streams through shared memory 64 features at a time (cp.async, double-buffered), tensor cores (mma.sync m16n8k16,
// float32 accumulation) form the tile's dxa over its features and its dB over its tokens, and a second kernel sums the
// tiles' partial products in a fixed order (deterministic) and rounds: dxa to T, dB to float32 times s_m. bd's elements
// are rounded to T as block_diag_kernel rounds them (kernels/lora.cu), so the products differ from cuBLAS's only in the
// order of the float32 sums.
// Ranks 8 and 16 only: the partial sums (feature blocks x tokens x R for dxa, token blocks x features x R
// for dB) grow with R and at 64 outweighed the pass saved (r 64 steps 3-6% slower than with cuBLAS on an
// H100; at 16 they are about a quarter of dy's bytes).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "kernels/convert.cuh"
#include "kernels/mma.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kTokens = 256;  // tokens per CTA (16 m16 tiles: two per warp for dxa)
constexpr int kChunk = 64;    // features per step through shared memory
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kDyPitch = kChunk + 8;     // elements; the padding spreads fragment loads over the banks
constexpr int kXaPitch = kTokens + 8;

struct Members {
  const float* b[kMaxLoraGradMembers];   // B_m [out_m, R], float32
  int64_t offset[kMaxLoraGradMembers];   // first column in dy
  int64_t out[kMaxLoraGradMembers];
  int64_t col[kMaxLoraGradMembers];      // first column in xa / dxa
  float scale[kMaxLoraGradMembers];
  int64_t first_cta[kMaxLoraGradMembers + 1];  // member m's CTAs are [first_cta[m], first_cta[m + 1])
  int64_t fblocks[kMaxLoraGradMembers];  // its feature blocks (of chunks * 64)
  int64_t dxa_part[kMaxLoraGradMembers];  // its partial dxa [fblocks, n, R] in the workspace (floats)
  int64_t db_part[kMaxLoraGradMembers];   // its partial dB [tblocks, out_m, R]
  float* db[kMaxLoraGradMembers];        // dB_m [out_m, R], float32
  int count;
};

// Fragments (their coordinates: kernels/mma.cuh): ldmatrix delivers them from 8x8 blocks: A's four (rows
// +0/+8, columns +0/+8) with x4, B's two (its k rows +0/+8, stored as rows of n) with x2; the dB products'
// A = dy^T with x4.trans of dy's blocks.
template <typename T, int R>
static __global__ void __launch_bounds__(kThreads)
    lora_grad_kernel(Members mb, const T* __restrict__ dy, int64_t ldy, const T* __restrict__ xa, int64_t ldxa,
                     int64_t n, int chunks, float* __restrict__ work) {
  constexpr int NT = R / 8;                        // n8 tiles over the rank
  constexpr int kDbTiles = (kChunk / 16) * NT;     // dB tiles of a chunk: 4 feature tiles x NT
  constexpr int kDbPerWarp = (kDbTiles + kWarps - 1) / kWarps;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* dy_s = reinterpret_cast<T*>(smem_raw);          // [2][kTokens][kDyPitch]
  T* xa_s = dy_s + 2 * kTokens * kDyPitch;           // [R][kXaPitch]: xa's tile transposed
  T* b_s = xa_s + R * kXaPitch;                      // [2][R][kDyPitch]: T(s B) of a chunk, transposed

  // Which member, feature block and token block.
  const int64_t cta = blockIdx.x;
  int m = 0;
  while (m + 1 < mb.count && cta >= mb.first_cta[m + 1]) ++m;
  const int64_t local = cta - mb.first_cta[m];
  const int64_t tblock = local / mb.fblocks[m], fblock = local % mb.fblocks[m];
  const int64_t t0 = tblock * kTokens, fb0 = fblock * chunks * kChunk, out = mb.out[m];
  const T* dym = dy + mb.offset[m];
  const float* bm = mb.b[m];
  const float scale = mb.scale[m];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int mi = lane / 8, mj = lane % 8;  // the ldmatrix block this lane addresses, and the row in it
  const int64_t left = (out - fb0 + kChunk - 1) / kChunk;  // chunks of this block inside the member
  const int steps = static_cast<int>(left < chunks ? left : chunks);

  auto load_dy = [&](int step, int buf) {  // the chunk's [kTokens, 64] tile, zeros past the ends
    const int64_t f = fb0 + static_cast<int64_t>(step) * kChunk;
    T* dst = dy_s + buf * kTokens * kDyPitch;
#pragma unroll
    for (int i = 0; i < kTokens * kChunk / 8 / kThreads; ++i) {
      const int seg = tid + i * kThreads, row = seg / (kChunk / 8), c8 = (seg % (kChunk / 8)) * 8;
      const bool ok = t0 + row < n && f + c8 < out;  // out % 8 == 0: a segment is wholly in or out
      const T* src = ok ? dym + (t0 + row) * ldy + f + c8 : dy;
      cp_async16(dst + row * kDyPitch + c8, src, ok ? 16 : 0);
    }
    cp_async_commit();
  };
  auto load_b = [&](int step, int buf) {  // T(s B) of the chunk's features, transposed: [R][64]
    const int64_t f = fb0 + static_cast<int64_t>(step) * kChunk;
    T* dst = b_s + buf * R * kDyPitch;
    for (int i = tid; i < kChunk * R; i += kThreads) {
      const int fr = i / R, j = i % R;
      const float v = f + fr < out ? scale * bm[(f + fr) * R + j] : 0.0f;
      dst[j * kDyPitch + fr] = from_f32<T>(v);
    }
  };

  load_dy(0, 0);
  // xa's tile, transposed (the dB products' B operand): thread = token.
  for (int row = tid; row < kTokens; row += kThreads) {
    const bool ok = t0 + row < n;
    const T* src = xa + (t0 + row) * ldxa + mb.col[m];
#pragma unroll
    for (int j = 0; j < R; ++j) xa_s[j * kXaPitch + row] = ok ? src[j] : from_f32<T>(0.0f);
  }
  load_b(0, 0);

  float acc[2][NT][4] = {};  // dxa: this warp's tokens [32 warp, + 32) by the rank
  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    if (step + 1 < steps) {
      load_dy(step + 1, buf ^ 1);
      load_b(step + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* d = dy_s + buf * kTokens * kDyPitch;
    const T* bs = b_s + buf * R * kDyPitch;
    // dxa over this chunk's 64 features.
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      uint32_t bf[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) ldsm_x2(bf[nt], bs + (nt * 8 + mj) * kDyPitch + ks * 16 + (mi % 2) * 8);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        uint32_t af[4];
        ldsm_x4(af, d + (warp * 32 + mt * 16 + (mi % 2) * 8 + mj) * kDyPitch + ks * 16 + (mi / 2) * 8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[mt][nt], af, bf[nt][0], bf[nt][1]);
      }
    }
    // dB over this CTA's tokens for the chunk's features: tile = 16 features x 8 ranks, K = kTokens.
    const int64_t f = fb0 + static_cast<int64_t>(step) * kChunk;
#pragma unroll
    for (int k = 0; k < kDbPerWarp; ++k) {
      const int tile = warp + k * kWarps;
      if (tile >= kDbTiles) break;
      const int ft = tile % (kChunk / 16), nt = tile / (kChunk / 16);
      float c[4] = {};
#pragma unroll 4
      for (int ks = 0; ks < kTokens / 16; ++ks) {
        uint32_t af[4], bf[2];  // A = dy^T: the chunk's features are its rows
        ldsm_x4_trans(af, d + (ks * 16 + (mi / 2) * 8 + mj) * kDyPitch + ft * 16 + (mi % 2) * 8);
        ldsm_x2(bf, xa_s + (nt * 8 + mj) * kXaPitch + ks * 16 + (mi % 2) * 8);
        mma16816<T>(c, af, bf[0], bf[1]);
      }
      float* part = work + mb.db_part[m] + (tblock * out + f + ft * 16) * R + nt * 8 + 2 * t;
      if (f + ft * 16 + g < out) *reinterpret_cast<float2*>(part + g * R) = make_float2(c[0], c[1]);
      if (f + ft * 16 + g + 8 < out) *reinterpret_cast<float2*>(part + (g + 8) * R) = make_float2(c[2], c[3]);
    }
    __syncthreads();  // the buffers are refilled next step
  }
  // This feature block's share of dxa for the CTA's tokens.
  float* part = work + mb.dxa_part[m] + fblock * n * R;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const int64_t row = t0 + warp * 32 + mt * 16 + g;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float* p = part + row * R + nt * 8 + 2 * t;
      if (row < n) *reinterpret_cast<float2*>(p) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      if (row + 8 < n) *reinterpret_cast<float2*>(p + 8 * R) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
}

// Sums the partials in a fixed order, four consecutive rank columns an item: dxa (the first count n R / 4
// items) over the member's feature blocks, rounded to T; dB (the rest) over the token blocks, times s_m,
// float32 (added to what dB holds with `accumulate`). With kSplit > 1, kSplit consecutive threads share an
// item: thread s adds partials s, s + kSplit, ..., then the group adds its kSplit sums in a fixed tree
// (shuffles). That is for calls with few items (o's and down's, one member of 32 feature blocks): with one
// thread an item, down's, beside the dequantization ahead, took 27 us against its product's 18 (H100, 7B
// shape, r 16); eight times the loads in flight take it to 10. Calls with many items keep one thread an item,
// whose loads a warp coalesces (split, q|k|v's and gate|up's took twice their 5-6 us).
template <typename T, int kSplit>
static __global__ void lora_grad_finish(Members mb, int R, int64_t n, int64_t tblocks, const float* __restrict__ work,
                                        T* __restrict__ dxa, int64_t ranks, bool accumulate) {
  static_assert(kSplit >= 1 && 16 % kSplit == 0, "a group of threads lies in one warp");
  const int s = static_cast<int>(threadIdx.x % kSplit);
  const unsigned group = ((1u << kSplit) - 1u) << (threadIdx.x % 32 - s);  // this group's lanes
  const int64_t per_member = n * R / 4, dxa_items = static_cast<int64_t>(mb.count) * per_member;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x / kSplit;
  // The group's sum of its kSplit shares, the same in every lane.
  auto group_sum = [&](float4 v) {
#pragma unroll
    for (int o = kSplit / 2; o > 0; o /= 2) {
      v.x += __shfl_xor_sync(group, v.x, o, kSplit), v.y += __shfl_xor_sync(group, v.y, o, kSplit);
      v.z += __shfl_xor_sync(group, v.z, o, kSplit), v.w += __shfl_xor_sync(group, v.w, o, kSplit);
    }
    return v;
  };
  // Every lane of a group takes the same items and leaves at the same one, as the shuffles need.
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kSplit;; i += stride) {
    if (i < dxa_items) {
      const int m = static_cast<int>(i / per_member);
      const int64_t e = (i - m * per_member) * 4, row = e / R, j = e - row * R;
      const float* p = work + mb.dxa_part[m] + e;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int64_t fb = s; fb < mb.fblocks[m]; fb += kSplit) {
        const float4 w = *reinterpret_cast<const float4*>(p + fb * n * R);
        v.x += w.x, v.y += w.y, v.z += w.z, v.w += w.w;
      }
      v = group_sum(v);
      if (s == 0) {
        T* o = dxa + row * ranks + mb.col[m] + j;
        o[0] = from_f32<T>(v.x), o[1] = from_f32<T>(v.y), o[2] = from_f32<T>(v.z), o[3] = from_f32<T>(v.w);
      }
      continue;
    }
    int64_t k = (i - dxa_items) * 4;
    int m = 0;
    while (m < mb.count && k >= mb.out[m] * R) k -= mb.out[m] * R, ++m;
    if (m == mb.count) return;
    const float* p = work + mb.db_part[m] + k;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int64_t tb = s; tb < tblocks; tb += kSplit) {
      const float4 w = *reinterpret_cast<const float4*>(p + tb * mb.out[m] * R);
      v.x += w.x, v.y += w.y, v.z += w.z, v.w += w.w;
    }
    v = group_sum(v);
    if (s != 0) continue;
    const float sc = mb.scale[m];
    float4* o = reinterpret_cast<float4*>(mb.db[m] + k);
    float4 r = make_float4(sc * v.x, sc * v.y, sc * v.z, sc * v.w);
    if (accumulate) {  // a later token slice: onto the previous slices' sum
      const float4 before = *o;
      r.x += before.x, r.y += before.y, r.z += before.z, r.w += before.w;
    }
    *o = r;
  }
}

// Finish calls with fewer items than kSplitBelow split each item's sum over kFinishSplit threads.
constexpr int64_t kSplitBelow = 65536;
constexpr int kFinishSplit = 8;

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename T, int R>
size_t smem_bytes() {
  return sizeof(T) * (2 * kTokens * kDyPitch + R * kXaPitch + 2 * R * kDyPitch);
}

// How many CTAs of the kernel the current device holds at once (kernels/mma.cuh; raises its shared-memory
// limit, which its launches need, on the first call for a device).
template <typename T, int R>
int64_t grad_slots() {
  return resident_ctas(reinterpret_cast<const void*>(lora_grad_kernel<T, R>), kThreads, smem_bytes<T, R>());
}

template <typename T, int R>
void launch(const Members& mb, const at::Tensor& dy, const at::Tensor& xa, int64_t n, int chunks, int64_t ctas,
            at::Tensor& work, cudaStream_t stream) {
  const size_t smem = smem_bytes<T, R>();
  auto* kernel = lora_grad_kernel<T, R>;
  kernel<<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(
      mb, static_cast<const T*>(dy.data_ptr()), dy.stride(0), static_cast<const T*>(xa.data_ptr()), xa.stride(0), n,
      chunks, work.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool lora_grad_supported(const at::Tensor& dy, const at::Tensor& xa, const std::vector<LoraGradMember>& members) {
  if (!dy.is_cuda() || dy.dim() != 2 || xa.dim() != 2 || xa.device() != dy.device()) return false;
  if (dy.scalar_type() != at::kBFloat16 && dy.scalar_type() != at::kHalf) return false;
  if (xa.scalar_type() != dy.scalar_type() || xa.size(0) != dy.size(0)) return false;
  if (dy.stride(1) != 1 || dy.stride(0) % 8 != 0 || dy.stride(0) < dy.size(1) || !aligned16(dy)) return false;
  if (xa.stride(1) != 1 || xa.stride(0) < xa.size(1)) return false;
  if (members.empty() || members.size() > static_cast<size_t>(kMaxLoraGradMembers)) return false;
  const int64_t r = members[0].b.defined() && members[0].b.dim() == 2 ? members[0].b.size(1) : 0;
  if (r != 8 && r != 16) return false;  // the partial sums grow with the rank: see the top of this file
  for (const auto& m : members) {
    if (!m.b.defined() || m.b.dim() != 2 || m.b.size(1) != r || m.b.scalar_type() != at::kFloat ||
        !m.b.is_contiguous() || m.b.device() != dy.device())
      return false;
    if (m.offset < 0 || m.offset % 8 != 0 || m.b.size(0) % 8 != 0 || m.offset + m.b.size(0) > dy.size(1)) return false;
    if (m.col < 0 || m.col + r > xa.size(1)) return false;
  }
  return true;
}

std::pair<at::Tensor, std::vector<at::Tensor>> lora_grad_cuda(const at::Tensor& dy, const at::Tensor& xa,
                                                              const std::vector<LoraGradMember>& members) {
  TORCH_CHECK(lora_grad_supported(dy, xa, members),
              "lora_grad_cuda: unsupported arguments (see lora_grad_supported in kernels/ops.h)");
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t n = dy.size(0), ranks = xa.size(1), R = members[0].b.size(1);
  // Columns no member owns (none when every adapted member is listed) are 0.
  at::Tensor dxa = static_cast<int64_t>(members.size()) * R == ranks ? at::empty({n, ranks}, dy.options())
                                                                      : at::zeros({n, ranks}, dy.options());
  std::vector<at::Tensor> db;
  for (const auto& m : members) db.push_back(at::empty({m.b.size(0), R}, dy.options().dtype(at::kFloat)));
  if (n == 0) {
    for (auto& d : db) d.zero_();
    return {dxa, db};
  }
  // Token slices of at most kSlice, so the partial sums' workspace stays bounded (about a quarter of the
  // slice's dy) at long sequences; each slice's dB sums are added to the previous slices' in order.
  constexpr int64_t kSlice = 32 * kTokens;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool bf16 = dy.scalar_type() == at::kBFloat16;
  const int64_t slots = bf16 ? (R == 8 ? grad_slots<__nv_bfloat16, 8>() : grad_slots<__nv_bfloat16, 16>())
                             : (R == 8 ? grad_slots<__half, 8>() : grad_slots<__half, 16>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t s0 = 0; s0 < n; s0 += kSlice) {
    const int64_t len = std::min(kSlice, n - s0);
    // Feature blocks of `chunks` x 64 per CTA: the fewest chunks a CTA (the shortest kernel) whose grid
    // still fits in one wave of resident CTAs (a second, partial wave would leave SMs idle at the end).
    const int64_t tblocks = ceil_div(len, kTokens);
    auto ctas_for = [&](int64_t chunks) {
      int64_t c = 0;
      for (const auto& m : members) c += tblocks * ceil_div(m.b.size(0), chunks * kChunk);
      return c;
    };
    int64_t most = 1;  // a member's chunks
    for (const auto& m : members) most = std::max(most, ceil_div(m.b.size(0), int64_t{kChunk}));
    int64_t chunks = std::max<int64_t>(1, ctas_for(1) / slots);
    while (chunks < most && ctas_for(chunks) > slots) ++chunks;
    Members mb{};
    mb.count = static_cast<int>(members.size());
    int64_t cta = 0, floats = 0;
    for (size_t k = 0; k < members.size(); ++k) {
      const LoraGradMember& m = members[k];
      mb.b[k] = m.b.const_data_ptr<float>();
      mb.offset[k] = m.offset, mb.out[k] = m.b.size(0), mb.col[k] = m.col;
      mb.scale[k] = static_cast<float>(m.scale);
      mb.fblocks[k] = ceil_div(m.b.size(0), int64_t{chunks} * kChunk);
      mb.first_cta[k] = cta;
      cta += tblocks * mb.fblocks[k];
      mb.dxa_part[k] = floats;
      floats += mb.fblocks[k] * len * R;
      mb.db_part[k] = floats;
      floats += tblocks * mb.out[k] * R;
      mb.db[k] = db[k].data_ptr<float>();
    }
    mb.first_cta[members.size()] = cta;
    at::Tensor work = at::empty({floats}, dy.options().dtype(at::kFloat));
    const at::Tensor dys = dy.narrow(0, s0, len), xas = xa.narrow(0, s0, len);
    auto go = [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      if (R == 8) launch<T, 8>(mb, dys, xas, len, static_cast<int>(chunks), cta, work, stream);
      else launch<T, 16>(mb, dys, xas, len, static_cast<int>(chunks), cta, work, stream);
      int64_t items = static_cast<int64_t>(mb.count) * len * R / 4;  // four columns each
      for (size_t k = 0; k < members.size(); ++k) items += mb.out[k] * R / 4;
      // Few items (o's and down's at 2048 tokens: ~25K): several threads an item (see lora_grad_finish).
      const bool split = items < kSplitBelow;
      const unsigned blocks =
          static_cast<unsigned>(std::min<int64_t>(ceil_div(items * (split ? kFinishSplit : 1), 256), 8 * sms));
      auto* finish = split ? lora_grad_finish<T, kFinishSplit> : lora_grad_finish<T, 1>;
      finish<<<blocks, 256, 0, stream>>>(mb, static_cast<int>(R), len, tblocks, work.data_ptr<float>(),
                                         static_cast<T*>(dxa.data_ptr()) + s0 * ranks, ranks,
                                         /*accumulate=*/s0 > 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (bf16) go(static_cast<__nv_bfloat16*>(nullptr));
    else go(static_cast<__half*>(nullptr));
  }
  return {dxa, db};
}

}  // namespace qlora::kernels
