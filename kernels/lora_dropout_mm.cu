// Op: the two products of LoRA dropout's masked inputs with the adapters, the keep bits applied to x's tiles
// as they load (kernels/lora_dropout.h defines the bits), so no dropped copy of x is written or read:
//   xa   xa_m = (keep_m * x) A_m^T / (1 - p_m)          [n, R] per member, rounded to T (the forward's x A^T)
//   dA   dA_m = dxa_m^T (keep_m * x) / (1 - p_m)        [R, in] per member, float32 (the backward's)
// for up to kMaxDropoutMm members of one rank R reading one x (a fused group's dropped members: q, k and v
// read one x with masks of their own). Before, one pass wrote every member's copy of x and each member's
// GEMM read its copy: for a group of k members 2k + 1 passes over x in each direction, where these read x
// from memory once (docs/performance.md item 27).
//
// Both are split over the long dimension (x's columns for xa, its rows for dA) so that a 2048-token step
// fills the GPU; each CTA writes float32 partial sums and a second kernel adds them in a fixed order
// (deterministic), scales by 1 / (1 - p_m) and rounds. Tensor cores (mma.sync m16n8k16, float32
// accumulation) multiply; x's fragments are masked in registers (an AND with the member's bits). A CTA serves
// one member; the members' CTAs of one tile run side by side and read x's tile through L2. That timed as fast
// as all members in one CTA (x's tile loaded once into shared memory, every warp multiplying every member) or
// faster, and builds a third of the kernels. Either way the time grows with the members' total rank (at q|k|v's
// three of rank 64, 2-3x cuBLAS's unmasked product of the same shape, whose time does not): item 27 lists what
// was tried. The sums differ from the copies' GEMMs in the scale's place (applied to the float32 sum, not to
// each element before rounding) and the order of the float32 additions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "kernels/convert.cuh"
#include "kernels/mma.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Tile sizes, pipeline depth and the splits' cap: 4 warps, 2 stages, 4 or 16 splits and two m16 tiles a warp
// timed the same or slower in kernels/dev/dropout_mm_bench.cpp (H100).
constexpr int kStages = 3;  // cp.async pipeline depth
constexpr int kK = 64;      // the reduced dimension's step through shared memory
constexpr int kPitch = kK + 8;  // elements; the padding spreads ldmatrix rows over the banks

struct Members {
  const void* a[kMaxDropoutMm];  // xa: A_m's rows [R, in] (T), row stride lda
  float* da[kMaxDropoutMm];      // dA: the member's [R, in] float32 output
  int64_t col[kMaxDropoutMm];    // the member's first column in xa's out or in dxa
  float scale[kMaxDropoutMm];    // 1 / (1 - p_m)
  int count;
};

// 8 bytes global -> shared (the mask rows); `bytes` 0 writes zeros.
__device__ __forceinline__ void cp_async8(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}

// A 32-bit fragment register's two 16-bit halves kept or zeroed: bit 0 of lo / hi for the low / high half.
__device__ __forceinline__ uint32_t keep_halves(uint32_t lo, uint32_t hi) {
  return (lo & 1u) * 0x0000ffffu | (hi & 1u) * 0xffff0000u;
}

// `steps` steps through a kStages-deep cp.async pipeline: load(step, buf) issues a step's copies into stage
// buffer buf, compute(buf) consumes a stage once its copies have landed; kStages - 1 steps are in flight.
template <typename Load, typename Compute>
__device__ __forceinline__ void pipeline(int steps, Load&& load, Compute&& compute) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();  // empty groups too: they keep the wait counts uniform
  }
  for (int step = 0; step < steps; ++step) {
    if (step + kStages - 1 < steps) load(step + kStages - 1, (step + kStages - 1) % kStages);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();
    compute(step % kStages);
    __syncthreads();  // this buffer is refilled next
  }
  cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------------------
// xa: a CTA takes kXaRows rows of x (16 a warp) by a range of its columns for one member (the members of a row
// tile and split are neighbours in the grid, so they read x's tile from L2 after the first). Per stage: x's
// [kXaRows, 64] tile, the member's mask bytes for it ([kXaRows, 8]) and A's [R, 64] slice.
constexpr int kXaRows = kWarps * 16;

template <typename T, int R>
struct XaSmem {
  static constexpr int x = kXaRows * kPitch;  // elements
  static constexpr int a = R * kPitch;        // elements
  static constexpr int mask = kXaRows * 8;    // bytes
  static constexpr size_t stage = sizeof(T) * (x + a) + mask;
  static constexpr size_t bytes = kStages * stage;
};

template <typename T, int R>
static __global__ void __launch_bounds__(kThreads)
    dropout_xa_kernel(const T* __restrict__ x, int64_t ldx, int64_t n, int64_t in, const uint8_t* __restrict__ mask,
                      Members mb, int64_t lda, int steps_per_split, int64_t row_tiles, float* __restrict__ work) {
  using S = XaSmem<T, R>;
  constexpr int NT = R / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const int m = static_cast<int>(blockIdx.x % mb.count);
  const int64_t rest = blockIdx.x / mb.count, tile = rest % row_tiles, split = rest / row_tiles;
  const int64_t r0 = tile * kXaRows, blocks = in / 8;
  const int64_t steps_all = in / kK, s0 = split * steps_per_split;
  const int steps = static_cast<int>(std::min<int64_t>(steps_per_split, steps_all - s0));
  const T* am = static_cast<const T*>(mb.a[m]);
  const uint8_t* mm = mask + m * n * blocks;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int mi = lane / 8, mj = lane % 8;

  auto load = [&](int step, int buf) {
    T* xs = reinterpret_cast<T*>(smem + buf * S::stage);
    T* as = xs + S::x;
    uint8_t* ms = reinterpret_cast<uint8_t*>(as + S::a);
    const int64_t c0 = (s0 + step) * kK;
    for (int i = tid; i < kXaRows * (kK / 8); i += kThreads) {
      const int row = i / (kK / 8), c8 = (i % (kK / 8)) * 8;
      const bool ok = r0 + row < n;
      cp_async16(xs + row * kPitch + c8, ok ? x + (r0 + row) * ldx + c0 + c8 : x, ok ? 16 : 0);
    }
    for (int i = tid; i < R * (kK / 8); i += kThreads) {
      const int row = i / (kK / 8), c8 = (i % (kK / 8)) * 8;
      cp_async16(as + row * kPitch + c8, am + row * lda + c0 + c8, 16);
    }
    for (int row = tid; row < kXaRows; row += kThreads) {
      const bool ok = r0 + row < n;
      cp_async8(ms + row * 8, ok ? mm + (r0 + row) * blocks + c0 / 8 : mm, ok ? 8 : 0);
    }
  };

  float acc[NT][4] = {};
  pipeline(steps, load, [&](int buf) {
    const T* xs = reinterpret_cast<const T*>(smem + buf * S::stage);
    const T* as = xs + S::x;
    const uint8_t* ms = reinterpret_cast<const uint8_t*>(as + S::a);
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks) {
      uint32_t af[4];  // rows g / g + 8 of the warp's 16, columns 2t, 2t + 1 (+ 8)
      ldsm_x4(af, xs + (warp * 16 + (mi % 2) * 8 + mj) * kPitch + ks * 16 + (mi / 2) * 8);
      // Bytes 2 ks and 2 ks + 1 of rows g and g + 8: columns 16 ks .. 16 ks + 15.
      const uint32_t lo = *reinterpret_cast<const uint16_t*>(ms + (warp * 16 + g) * 8 + 2 * ks);
      const uint32_t hi = *reinterpret_cast<const uint16_t*>(ms + (warp * 16 + g + 8) * 8 + 2 * ks);
      af[0] &= keep_halves(lo >> (2 * t), lo >> (2 * t + 1));
      af[1] &= keep_halves(hi >> (2 * t), hi >> (2 * t + 1));
      af[2] &= keep_halves(lo >> (8 + 2 * t), lo >> (9 + 2 * t));
      af[3] &= keep_halves(hi >> (8 + 2 * t), hi >> (9 + 2 * t));
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        if constexpr (NT % 2 == 0) {
          uint32_t bf[4];  // n tiles nt and nt + 1: A's rows, k halves
          ldsm_x4(bf, as + ((nt + mi / 2) * 8 + mj) * kPitch + ks * 16 + (mi % 2) * 8);
          mma16816<T>(acc[nt], af, bf[0], bf[1]);
          mma16816<T>(acc[nt + 1], af, bf[2], bf[3]);
        } else {
          uint32_t bf[2];
          ldsm_x2(bf, as + (nt * 8 + mj) * kPitch + ks * 16 + (mi % 2) * 8);
          mma16816<T>(acc[nt], af, bf[0], bf[1]);
        }
      }
    }
  });
  // Partial sums [split, n, M R].
  const int64_t W = static_cast<int64_t>(mb.count) * R, row = r0 + warp * 16 + g;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float* p = work + (split * n + row) * W + m * R + nt * 8 + 2 * t;
    if (row < n) *reinterpret_cast<float2*>(p) = make_float2(acc[nt][0], acc[nt][1]);
    if (row + 8 < n) *reinterpret_cast<float2*>(p + 8 * W) = make_float2(acc[nt][2], acc[nt][3]);
  }
}

// The splits' partial sums of 4 consecutive floats, added in split order; the loads are issued 4 splits at a
// time (a loop of one dependent load a split left each thread waiting on L2 `splits` times in a row).
__device__ __forceinline__ float4 sum_splits(const float4* __restrict__ p, int64_t stride, int64_t splits) {
  float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  auto add = [&](const float4& v) { s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w; };
  int64_t k = 0;
  for (; k + 4 <= splits; k += 4) {
    const float4 v0 = p[k * stride], v1 = p[(k + 1) * stride], v2 = p[(k + 2) * stride], v3 = p[(k + 3) * stride];
    add(v0), add(v1), add(v2), add(v3);
  }
  for (; k < splits; ++k) add(p[k * stride]);
  return s;
}

// xa_m[row, j] = T(scale_m * sum over splits), into out (member m's columns at out + col_m, row stride ldo);
// four columns a thread (R % 8 == 0).
template <typename T>
static __global__ void dropout_xa_finish(const float* __restrict__ work, int64_t splits, int64_t n, int R,
                                         Members mb, T* __restrict__ out, int64_t ldo) {
  const int64_t W = static_cast<int64_t>(mb.count) * R, quads = n * W / 4;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < quads;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = 4 * i / W, c = 4 * i % W;
    const int m = static_cast<int>(c / R);
    const float4 s = sum_splits(reinterpret_cast<const float4*>(work) + i, quads, splits);
    const float sc = mb.scale[m];
    T* o = out + row * ldo + mb.col[m] + c % R;
    o[0] = from_f32<T>(s.x * sc), o[1] = from_f32<T>(s.y * sc), o[2] = from_f32<T>(s.z * sc);
    o[3] = from_f32<T>(s.w * sc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// dA: a CTA takes kDaCols columns of x (16 a warp) by a range of its rows for one member (neighbours in the
// grid, as in xa); C^T[f, j] = sum_t h_m[t, f] dxa_m[t, j] with A = h^T (x's tile through ldmatrix.trans)
// and B = dxa (trans too). Per stage: x's [64, kDaCols] tile, the member's mask bytes for it
// ([64, kDaCols / 8]) and its dxa's [64, R] rows.
constexpr int kDaCols = kWarps * 16;
constexpr int kDaXPitch = kDaCols + 8;

template <typename T, int R>
struct DaSmem {
  static constexpr int dpitch = R + 8;
  static constexpr int x = kK * kDaXPitch;      // elements
  static constexpr int d = kK * dpitch;         // elements
  static constexpr int mask = kK * (kDaCols / 8);  // bytes
  static constexpr size_t stage = sizeof(T) * (x + d) + mask;
  static constexpr size_t bytes = kStages * stage;
};

template <typename T, int R>
static __global__ void __launch_bounds__(kThreads)
    dropout_da_kernel(const T* __restrict__ x, int64_t ldx, int64_t n, int64_t in, const uint8_t* __restrict__ mask,
                      const T* __restrict__ dxa, int64_t ldd, Members mb, int steps_per_split, int64_t col_tiles,
                      float* __restrict__ work) {
  using S = DaSmem<T, R>;
  constexpr int NT = R / 8;
  constexpr int DP = S::dpitch;
  constexpr int MB = kDaCols / 8;  // mask bytes a row of the tile
  extern __shared__ __align__(16) unsigned char smem[];
  const int m = static_cast<int>(blockIdx.x % mb.count);
  const int64_t rest = blockIdx.x / mb.count, tile = rest % col_tiles, split = rest / col_tiles;
  const int64_t f0 = tile * kDaCols, blocks = in / 8;
  const int64_t steps_all = (n + kK - 1) / kK, s0 = split * steps_per_split;
  const int steps = static_cast<int>(std::min<int64_t>(steps_per_split, steps_all - s0));
  const T* dm = dxa + mb.col[m];
  const uint8_t* mm = mask + m * n * blocks;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int mi = lane / 8, mj = lane % 8;

  auto load = [&](int step, int buf) {
    T* xs = reinterpret_cast<T*>(smem + buf * S::stage);
    T* ds = xs + S::x;
    uint8_t* ms = reinterpret_cast<uint8_t*>(ds + S::d);
    const int64_t t0 = (s0 + step) * kK;
    for (int i = tid; i < kK * (kDaCols / 8); i += kThreads) {
      const int row = i / (kDaCols / 8), c8 = (i % (kDaCols / 8)) * 8;
      const bool ok = t0 + row < n && f0 + c8 < in;
      cp_async16(xs + row * kDaXPitch + c8, ok ? x + (t0 + row) * ldx + f0 + c8 : x, ok ? 16 : 0);
    }
    for (int i = tid; i < kK * (R / 8); i += kThreads) {
      const int row = i / (R / 8), c8 = (i % (R / 8)) * 8;
      const bool ok = t0 + row < n;
      cp_async16(ds + row * DP + c8, ok ? dm + (t0 + row) * ldd + c8 : dxa, ok ? 16 : 0);
    }
    for (int i = tid; i < kK * (MB / 8); i += kThreads) {  // 8 bytes a copy
      const int row = i / (MB / 8), b8 = (i % (MB / 8)) * 8;
      const bool ok = t0 + row < n && f0 / 8 + b8 < blocks;
      cp_async8(ms + row * MB + b8, ok ? mm + (t0 + row) * blocks + f0 / 8 + b8 : mm, ok ? 8 : 0);
    }
  };

  float acc[NT][4] = {};  // C^T: this warp's 16 features by the member's R
  pipeline(steps, load, [&](int buf) {
    const T* xs = reinterpret_cast<const T*>(smem + buf * S::stage);
    const T* ds = xs + S::x;
    const uint8_t* ms = reinterpret_cast<const uint8_t*>(ds + S::d);
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks) {
      uint32_t af[4];  // h^T: features g / g + 8 of the warp's 16, tokens 2t, 2t + 1 (+ 8)
      ldsm_x4_trans(af, xs + (ks * 16 + (mi / 2) * 8 + mj) * kDaXPitch + warp * 16 + (mi % 2) * 8);
      // Mask bytes 2 warp, 2 warp + 1 (features +0..7, +8..15) of tokens 2t, 2t + 1, 2t + 8, 2t + 9.
      const uint8_t* mrow = ms + (ks * 16 + 2 * t) * MB + 2 * warp;
      const uint32_t v0 = *reinterpret_cast<const uint16_t*>(mrow);
      const uint32_t v1 = *reinterpret_cast<const uint16_t*>(mrow + MB);
      const uint32_t v8 = *reinterpret_cast<const uint16_t*>(mrow + 8 * MB);
      const uint32_t v9 = *reinterpret_cast<const uint16_t*>(mrow + 9 * MB);
      af[0] &= keep_halves(v0 >> g, v1 >> g);
      af[1] &= keep_halves(v0 >> (8 + g), v1 >> (8 + g));
      af[2] &= keep_halves(v8 >> g, v9 >> g);
      af[3] &= keep_halves(v8 >> (8 + g), v9 >> (8 + g));
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        uint32_t bf[4];  // dxa's tokens (k) by ranks nt, nt + 1 (n), transposed; for one n tile (R = 8) lanes
                         // 16-31 repeat 0-15 (x2.trans has no helper)
        const int n8 = NT % 2 == 0 ? nt + mi / 2 : nt;
        ldsm_x4_trans(bf, ds + (ks * 16 + (mi % 2) * 8 + mj) * DP + n8 * 8);
        mma16816<T>(acc[nt], af, bf[0], bf[1]);
        if constexpr (NT % 2 == 0) mma16816<T>(acc[nt + 1], af, bf[2], bf[3]);
      }
    }
  });
  // Partial sums [split, M R, in]: thread holds features g, g + 8 by ranks 2t, 2t + 1.
  const int64_t W = static_cast<int64_t>(mb.count) * R, f = f0 + warp * 16 + g;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float* p = work + (split * W + m * R + nt * 8 + 2 * t) * in + f;
    if (f < in) p[0] = acc[nt][0], p[in] = acc[nt][1];
    if (f + 8 < in) p[8] = acc[nt][2], p[in + 8] = acc[nt][3];
  }
}

// dA_m[j, f] = scale_m * sum over splits, float32; four features a thread (in % 64 == 0).
static __global__ void dropout_da_finish(const float* __restrict__ work, int64_t splits, int64_t in, int R,
                                         Members mb) {
  const int64_t per_member = static_cast<int64_t>(R) * in / 4, quads = mb.count * per_member;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < quads;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int m = static_cast<int>(i / per_member);
    const float4 s = sum_splits(reinterpret_cast<const float4*>(work) + i, quads, splits);
    const float sc = mb.scale[m];
    reinterpret_cast<float4*>(mb.da[m])[i - m * per_member] = make_float4(sc * s.x, sc * s.y, sc * s.z, sc * s.w);
  }
}

// ---------------------------------------------------------------------------------------------------------
// dx: a CTA forms 128 x 128 tiles of dx (8 warps, 4 x 2, each 32 rows by 64 columns), persistent over the
// tiles gridDim.x apart from its first, its pipeline running on from one tile's members into the next's. A
// step brings one member's operands for the tile: dxa's [128, R] rows (A operand), A_m's [R, 128] slab as
// stored (the B operand, through ldmatrix.trans) and the mask bytes [128, 16]. The member's product is formed
// in float32, its dropped elements skipped, the rest scaled and added to the tile's sum in member order; after
// the last member the sum is rounded and leaves through shared memory in 16-byte row segments (stored straight
// from the fragments, 4 bytes a thread and 8 rows an instruction, each instruction half-filling its 32-byte
// sectors, it ran at half the speed). Rank 8 is padded to the MMA's k of 16 with zeros.
constexpr int kDxRows = 128, kDxCols = 128;

template <typename T, int R>
struct DxSmem {
  static constexpr int k = R < 16 ? 16 : R;
  static constexpr int dpitch = k + 8;               // elements
  static constexpr int apitch = kDxCols + 8;         // elements
  static constexpr int d = kDxRows * dpitch;         // elements
  static constexpr int a = k * apitch;               // elements
  static constexpr int mask = kDxRows * (kDxCols / 8);  // bytes
  static constexpr size_t stage = sizeof(T) * (d + a) + mask;
  static constexpr int opitch = kDxCols + 8;  // elements: the output tile's rows
  static constexpr size_t bytes = kStages * stage + sizeof(T) * kDxRows * opitch;
};

template <typename T, int R>
static __global__ void __launch_bounds__(kThreads)
    dropout_dx_kernel(const T* __restrict__ dxa, int64_t ldd, const uint8_t* __restrict__ mask, Members mb,
                      int64_t lda, int64_t n, int64_t in, int64_t col_tiles, int64_t tiles, T* __restrict__ dx) {
  using S = DxSmem<T, R>;
  constexpr int K = S::k;
  extern __shared__ __align__(16) unsigned char smem[];
  const int count = mb.count;
  const int64_t mine = tiles > blockIdx.x ? ceil_div(tiles - blockIdx.x, gridDim.x) : 0;
  const int steps = static_cast<int>(mine * count);
  const int64_t blocks = in / 8;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int mi = lane / 8, mj = lane % 8;
  const int wr = warp / 2, wc = warp % 2;  // the warp's rows [32 wr, + 32) and columns [64 wc, + 64) of a tile
  struct Origin {
    int64_t r0, c0;
  };
  auto origin = [&](int step) {  // the step's tile's first row and column
    const int64_t tile = blockIdx.x + static_cast<int64_t>(step / count) * gridDim.x;
    return Origin{tile / col_tiles * kDxRows, tile % col_tiles * kDxCols};
  };
  if constexpr (K != R) {  // the padding of rank 8: dxa's columns and A's rows 8..15, zero in every stage
    for (int s = 0; s < kStages; ++s) {
      T* ds = reinterpret_cast<T*>(smem + s * S::stage);
      T* as = ds + S::d;
      for (int i = tid; i < kDxRows * (K - R); i += kThreads)
        ds[i / (K - R) * S::dpitch + R + i % (K - R)] = from_f32<T>(0.0f);
      for (int i = tid; i < (K - R) * S::apitch; i += kThreads) as[R * S::apitch + i] = from_f32<T>(0.0f);
    }
  }

  auto load = [&](int step, int buf) {
    const int m = step % count;
    const auto [r0, c0] = origin(step);
    T* ds = reinterpret_cast<T*>(smem + buf * S::stage);
    T* as = ds + S::d;
    uint8_t* ms = reinterpret_cast<uint8_t*>(as + S::a);
    for (int i = tid; i < kDxRows * (R / 8); i += kThreads) {
      const int row = i / (R / 8), c8 = (i % (R / 8)) * 8;
      const bool ok = r0 + row < n;
      cp_async16(ds + row * S::dpitch + c8, ok ? dxa + (r0 + row) * ldd + mb.col[m] + c8 : dxa, ok ? 16 : 0);
    }
    const T* am = static_cast<const T*>(mb.a[m]);
    for (int i = tid; i < R * (kDxCols / 8); i += kThreads) {
      const int k = i / (kDxCols / 8), c8 = (i % (kDxCols / 8)) * 8;
      const bool ok = c0 + c8 < in;
      cp_async16(as + k * S::apitch + c8, ok ? am + k * lda + c0 + c8 : am, ok ? 16 : 0);
    }
    const uint8_t* mm = mask + m * n * blocks;
    for (int i = tid; i < kDxRows * 2; i += kThreads) {  // two 8-byte halves a row (in % 64 == 0)
      const int row = i / 2, h = i % 2;
      const bool ok = r0 + row < n && c0 + 64 * h < in;
      cp_async8(ms + row * 16 + 8 * h, ok ? mm + (r0 + row) * blocks + c0 / 8 + 8 * h : mm, ok ? 8 : 0);
    }
  };

  float total[2][8][4] = {};  // the tile's sum: this warp's rows g (+ 8) of m16 tile mt, columns of n8 tile nt
  int step = 0;
  pipeline(steps, load, [&](int buf) {
    const int m = step % count;
    const T* ds = reinterpret_cast<const T*>(smem + buf * S::stage);
    const T* as = ds + S::d;
    const uint8_t* ms = reinterpret_cast<const uint8_t*>(as + S::a);
    float acc[2][8][4] = {};
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      uint32_t bf[8][2];  // n8 tiles 2 np and 2 np + 1 from one x4.trans: k rows +0 / +8, n columns +0 / +8
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t r[4];
        ldsm_x4_trans(r, as + (ks * 16 + (mi % 2) * 8 + mj) * S::apitch + wc * 64 + np * 16 + (mi / 2) * 8);
        bf[2 * np][0] = r[0], bf[2 * np][1] = r[1], bf[2 * np + 1][0] = r[2], bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        uint32_t af[4];
        ldsm_x4(af, ds + (wr * 32 + mt * 16 + (mi % 2) * 8 + mj) * S::dpitch + ks * 16 + (mi / 2) * 8);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mma16816<T>(acc[mt][nt], af, bf[nt][0], bf[nt][1]);
      }
    }
    const float scale = mb.scale[m];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // The mask bytes of this row's 64 columns: byte nt holds columns 8 nt .. 8 nt + 7 (bit e: + e).
        const uint2 kb = *reinterpret_cast<const uint2*>(ms + (wr * 32 + mt * 16 + g + 8 * half) * 16 + wc * 8);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const uint32_t byte = (nt < 4 ? kb.x >> (8 * nt) : kb.y >> (8 * (nt - 4))) >> (2 * t);
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if ((byte >> e) & 1u) total[mt][nt][2 * half + e] += __fmul_rn(acc[mt][nt][2 * half + e], scale);
        }
      }
    }
    if (m == count - 1) {  // the tile's last member: round and store, start the next tile's sum
      T* out = reinterpret_cast<T*>(smem + kStages * S::stage);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          T* o = out + (wr * 32 + mt * 16 + g + 8 * half) * S::opitch + wc * 64 + 2 * t;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            Pack<T, 2> v;
            v.v[0] = from_f32<T>(total[mt][nt][2 * half]), v.v[1] = from_f32<T>(total[mt][nt][2 * half + 1]);
            *reinterpret_cast<Pack<T, 2>*>(o + nt * 8) = v;
            total[mt][nt][2 * half] = 0.0f, total[mt][nt][2 * half + 1] = 0.0f;
          }
        }
      }
      __syncthreads();
      const auto [r0, c0] = origin(step);
      for (int i = tid; i < kDxRows * (kDxCols / 8); i += kThreads) {
        const int row = i / (kDxCols / 8), c8 = (i % (kDxCols / 8)) * 8;
        if (r0 + row < n && c0 + c8 < in)  // in % 64 == 0: a segment is wholly in or out
          *reinterpret_cast<Pack<T, 8>*>(dx + (r0 + row) * in + c0 + c8) =
              *reinterpret_cast<const Pack<T, 8>*>(out + row * S::opitch + c8);
      }
    }
    ++step;
  });
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

// Splits of `steps` so that tiles x splits fills the resident CTAs once, at most kMaxSplits (each split adds
// a partial product of the output's size to write and add up again); returns steps per split.
constexpr int64_t kMaxSplits = 8;
int steps_per_split(int64_t steps, int64_t tiles, int64_t slots) {
  const int64_t splits =
      std::clamp<int64_t>(slots / std::max<int64_t>(tiles, 1), 1, std::min(kMaxSplits, std::max<int64_t>(steps, 1)));
  return static_cast<int>(ceil_div(std::max<int64_t>(steps, 1), splits));
}

// Calls f(T*, R) with R a compile-time constant for the supported element types and ranks.
template <typename F>
void dispatch_mm(c10::ScalarType s, int64_t r, F&& f) {
  auto by_r = [&](auto* tag) {
    if (r == 8) f(tag, std::integral_constant<int, 8>{});
    else if (r == 16) f(tag, std::integral_constant<int, 16>{});
    else if (r == 32) f(tag, std::integral_constant<int, 32>{});
    else f(tag, std::integral_constant<int, 64>{});
  };
  if (s == at::kBFloat16) by_r(static_cast<__nv_bfloat16*>(nullptr));
  else by_r(static_cast<__half*>(nullptr));
}

bool rows_aligned(const at::Tensor& t) {  // 16-byte rows: cp.async's 16-byte copies
  return t.dim() == 2 && t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) % 8 == 0) &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The keep bits of `members` members for an [n, in] input on `device`: contiguous uint8 [members, n, in / 8].
void check_mask(const at::Tensor& mask, int64_t members, int64_t n, int64_t in, at::Device device, const char* op) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.device() == device && mask.is_contiguous() &&
                  mask.sizes() == at::IntArrayRef({members, n, in / 8}),
              op, ": mask must be contiguous uint8 [", members, ", ", n, ", ", in / 8, "], got ", mask.sizes());
}

void check_common(const at::Tensor& x, const at::Tensor& mask, int64_t members, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              op, ": x must be a 2-D bfloat16 / float16 CUDA tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(rows_aligned(x) && x.size(1) % kK == 0, op,
              ": x needs contiguous 16-byte aligned rows and a multiple of ", kK, " columns, got ", x.sizes(),
              " strides ", x.strides());
  TORCH_CHECK(members >= 1 && members <= kMaxDropoutMm, op, ": 1 to ", kMaxDropoutMm, " members, got ", members);
  check_mask(mask, members, x.size(0), x.size(1), x.device(), op);
}

float keep_scale(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  return static_cast<float>(1.0 / (1.0 - p));
}

bool rank_ok(int64_t r) { return r == 8 || r == 16 || r == 32 || r == 64; }

}  // namespace

bool lora_dropout_mm_supported(const at::Tensor& x, const std::vector<DropoutMmMember>& members, int64_t rank,
                               const at::Tensor& dxa) {
  const auto count = static_cast<int64_t>(members.size());
  if (!x.is_cuda() || x.dim() != 2 || (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) ||
      !rows_aligned(x) || x.size(1) <= 0 || x.size(1) % kK != 0 || count < 1 || count > kMaxDropoutMm ||
      !rank_ok(rank))
    return false;
  if (!dxa.defined()) return true;
  if (dxa.scalar_type() != x.scalar_type() || dxa.device() != x.device() || !rows_aligned(dxa) ||
      dxa.size(0) != x.size(0))
    return false;
  for (const auto& m : members)
    if (m.col < 0 || m.col % 8 != 0 || m.col + rank > dxa.size(1)) return false;
  return true;
}

void lora_dropout_xa_cuda(const at::Tensor& x, const at::Tensor& mask, const std::vector<DropoutMmMember>& members,
                          const at::Tensor& out) {
  constexpr const char* op = "lora_dropout_xa";
  const int64_t M = static_cast<int64_t>(members.size());
  check_common(x, mask, M, op);
  const int64_t n = x.size(0), in = x.size(1);
  const at::Tensor& a0 = members[0].a;
  TORCH_CHECK(a0.defined() && a0.dim() == 2 && rank_ok(a0.size(0)), op, ": A must be [R, in] with R 8, 16, 32 or 64");
  const int64_t R = a0.size(0), lda = a0.stride(0);
  Members mb{};
  mb.count = static_cast<int>(M);
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor& a = members[m].a;
    TORCH_CHECK(a.scalar_type() == x.scalar_type() && a.device() == x.device() && a.dim() == 2 && a.size(0) == R &&
                    a.size(1) == in && rows_aligned(a) && a.stride(0) == lda,
                op, ": member ", m, "'s A must be ", x.scalar_type(), " [", R, ", ", in,
                "] with 16-byte rows a common stride apart, got ", a.sizes());
    TORCH_CHECK(members[m].col >= 0 && members[m].col + R <= out.size(1), op, ": member ", m, "'s columns [",
                members[m].col, ", ", members[m].col + R, ") outside out ", out.sizes());
    mb.a[m] = a.const_data_ptr();
    mb.col[m] = members[m].col;
    mb.scale[m] = keep_scale(members[m].p, op);
  }
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.device() == x.device() && out.dim() == 2 &&
                  out.size(0) == n && out.stride(1) == 1,
              op, ": out must be ", x.scalar_type(), " [", n, ", >= ", R, "] with contiguous rows, got ", out.sizes());
  if (n == 0) return;
  if (in == 0) {  // empty sums
    for (int64_t m = 0; m < M; ++m) out.narrow(1, members[m].col, R).zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t ldo = n > 1 ? out.stride(0) : out.size(1), ldx = n > 1 ? x.stride(0) : in;
  dispatch_mm(x.scalar_type(), R, [&](auto* tag, auto rc) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int Rc = decltype(rc)::value;
    auto* kernel = dropout_xa_kernel<T, Rc>;
    const size_t smem = XaSmem<T, Rc>::bytes;
    const int64_t tiles = ceil_div(n, kXaRows), steps = in / kK;
    const int per =
        steps_per_split(steps, tiles * M, resident_ctas(reinterpret_cast<const void*>(kernel), kThreads, smem));
    const int64_t splits = ceil_div(steps, per);
    at::Tensor work = at::empty({splits, n, M * R}, x.options().dtype(at::kFloat));
    kernel<<<static_cast<unsigned>(M * tiles * splits), kThreads, smem, stream>>>(
        static_cast<const T*>(x.const_data_ptr()), ldx, n, in, mask.const_data_ptr<uint8_t>(), mb, lda, per, tiles,
        work.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t quads = n * M * R / 4;
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    dropout_xa_finish<T><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(quads, 256), 8 * sms)), 256, 0, stream>>>(
        work.const_data_ptr<float>(), splits, n, static_cast<int>(R), mb, static_cast<T*>(out.data_ptr()), ldo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<at::Tensor> lora_dropout_da_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& dxa,
                                             const std::vector<DropoutMmMember>& members, int64_t rank) {
  constexpr const char* op = "lora_dropout_da";
  const int64_t M = static_cast<int64_t>(members.size());
  check_common(x, mask, M, op);
  TORCH_CHECK(rank_ok(rank), op, ": rank must be 8, 16, 32 or 64, got ", rank);
  const int64_t n = x.size(0), in = x.size(1), R = rank;
  TORCH_CHECK(dxa.scalar_type() == x.scalar_type() && dxa.device() == x.device() && dxa.dim() == 2 &&
                  dxa.size(0) == n && rows_aligned(dxa),
              op, ": dxa must be ", x.scalar_type(), " [", n, ", ranks] with 16-byte aligned rows, got ", dxa.sizes(),
              " strides ", dxa.strides());
  Members mb{};
  mb.count = static_cast<int>(M);
  std::vector<at::Tensor> da;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t col = members[m].col;
    TORCH_CHECK(col >= 0 && col % 8 == 0 && col + R <= dxa.size(1), op, ": member ", m, "'s columns [", col, ", ",
                col + R, ") must start at a multiple of 8 inside dxa ", dxa.sizes());
    mb.col[m] = col;
    mb.scale[m] = keep_scale(members[m].p, op);
    da.push_back(at::empty({R, in}, x.options().dtype(at::kFloat)));
    mb.da[m] = da.back().data_ptr<float>();
  }
  if (n == 0 || in == 0) {  // empty sums, or nothing to sum into
    for (auto& d : da) d.zero_();
    return da;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t ldx = n > 1 ? x.stride(0) : in, ldd = n > 1 ? dxa.stride(0) : dxa.size(1);
  dispatch_mm(x.scalar_type(), R, [&](auto* tag, auto rc) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int Rc = decltype(rc)::value;
    auto* kernel = dropout_da_kernel<T, Rc>;
    const size_t smem = DaSmem<T, Rc>::bytes;
    const int64_t tiles = ceil_div(in, kDaCols), steps = ceil_div(n, kK);
    const int per =
        steps_per_split(steps, tiles * M, resident_ctas(reinterpret_cast<const void*>(kernel), kThreads, smem));
    const int64_t splits = ceil_div(steps, per);
    at::Tensor work = at::empty({splits, M * R, in}, x.options().dtype(at::kFloat));
    kernel<<<static_cast<unsigned>(M * tiles * splits), kThreads, smem, stream>>>(
        static_cast<const T*>(x.const_data_ptr()), ldx, n, in, mask.const_data_ptr<uint8_t>(),
        static_cast<const T*>(dxa.const_data_ptr()), ldd, mb, per, tiles, work.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t quads = M * R * in / 4;
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    dropout_da_finish<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(quads, 256), 8 * sms)), 256, 0, stream>>>(
        work.const_data_ptr<float>(), splits, in, static_cast<int>(R), mb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return da;
}

bool lora_dropout_dx_supported(const at::Tensor& dxa, const std::vector<DropoutMmMember>& members, int64_t rank) {
  const auto count = static_cast<int64_t>(members.size());
  if (!dxa.is_cuda() || dxa.dim() != 2 || (dxa.scalar_type() != at::kBFloat16 && dxa.scalar_type() != at::kHalf) ||
      !rows_aligned(dxa) || count < 1 || count > kMaxDropoutMm || !rank_ok(rank))
    return false;
  const at::Tensor& a0 = members[0].a;
  if (!a0.defined() || a0.dim() != 2 || a0.size(1) <= 0 || a0.size(1) % kK != 0) return false;
  for (const auto& m : members) {
    const at::Tensor& a = m.a;
    if (!a.defined() || a.scalar_type() != dxa.scalar_type() || a.device() != dxa.device() || a.dim() != 2 ||
        a.size(0) != rank || a.size(1) != a0.size(1) || !rows_aligned(a) || a.stride(0) != a0.stride(0) ||
        m.col < 0 || m.col % 8 != 0 || m.col + rank > dxa.size(1))
      return false;
  }
  return true;
}

at::Tensor lora_dropout_dx_cuda(const at::Tensor& dxa, const at::Tensor& mask,
                                const std::vector<DropoutMmMember>& members, int64_t rank) {
  constexpr const char* op = "lora_dropout_dx";
  const int64_t M = static_cast<int64_t>(members.size());
  TORCH_CHECK(lora_dropout_dx_supported(dxa, members, rank), op,
              ": takes dxa bf16 / fp16 [n, ranks] with 16-byte aligned rows, 1 to ", kMaxDropoutMm,
              " members of one rank 8, 16, 32 or 64 at columns a multiple of 8 inside it, and their A's [rank, in] "
              "of dxa's dtype with 16-byte rows a common stride apart, in a positive multiple of ",
              kK, "; got dxa ", dxa.sizes(), " strides ", dxa.strides(), ", ", M, " members, rank ", rank);
  const int64_t n = dxa.size(0), in = members[0].a.size(1), R = rank, lda = members[0].a.stride(0);
  check_mask(mask, M, n, in, dxa.device(), op);
  Members mb{};
  mb.count = static_cast<int>(M);
  for (int64_t m = 0; m < M; ++m) {
    mb.a[m] = members[m].a.const_data_ptr();
    mb.col[m] = members[m].col;
    mb.scale[m] = keep_scale(members[m].p, op);
  }
  at::Tensor dx = at::empty({n, in}, dxa.options());
  if (n == 0) return dx;
  const c10::cuda::CUDAGuard guard(dxa.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t ldd = n > 1 ? dxa.stride(0) : dxa.size(1);
  dispatch_mm(dxa.scalar_type(), R, [&](auto* tag, auto rc) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int Rc = decltype(rc)::value;
    auto* kernel = dropout_dx_kernel<T, Rc>;
    const size_t smem = DxSmem<T, Rc>::bytes;
    const int64_t col_tiles = ceil_div(in, kDxCols), tiles = ceil_div(n, kDxRows) * col_tiles;
    const int64_t grid = std::min(tiles, resident_ctas(reinterpret_cast<const void*>(kernel), kThreads, smem));
    kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(
        static_cast<const T*>(dxa.const_data_ptr()), ldd, mask.const_data_ptr<uint8_t>(), mb, lda, n, in, col_tiles,
        tiles, static_cast<T*>(dx.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace qlora::kernels
