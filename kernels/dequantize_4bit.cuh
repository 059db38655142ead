// Device code of the 4-bit dequantize op: the kernel variants, shared by the op (dequantize_4bit.cu, which
// launches the promoted one) and the kernel lab (dev/dequant_bench.cu, which checks and times them all).
//
// out[i] = code[nibble_i] * scale[i / blocksize] in float32, rounded once to T (bf16 / fp16 / fp32);
// with double quantization scale[b] = nested_code[q[b]] * nested_absmax[b / 256] + offset (two float32
// roundings, as the CPU reference). Indices are int64 (a 70B layer's weights exceed 2^31 nibbles).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/format_4bit.h"

namespace qlora::kernels::dequant {

// Raw pointers of one launch. Exactly one of absmax / qabsmax is set.
struct Args {
  const uint8_t* packed;   // [(n+1)/2]
  const float* absmax;     // [blocks] (plain scales) or nullptr
  const uint8_t* qabsmax;  // [blocks] (double-quantized scales) or nullptr
  const float* nested;     // [ceil(blocks/256)]
  const float* ncode;      // [256]
  float offset;
  int log2_block;          // blocksize = 1 << log2_block
  int64_t n;
  // Pitched output (the span kernels' Pitched variant): the weight's rows of `cols` elements land `pitch`
  // elements apart, e.g. in the first columns of a wider matrix. cols % 8 == 0 (a word never straddles rows).
  int64_t cols = 0, pitch = 0;
};

__device__ __forceinline__ float scale_of(const Args& a, int64_t b) {
  if (a.qabsmax)
    return fmt4::add_rn(fmt4::mul_rn(__ldg(a.ncode + __ldg(a.qabsmax + b)), __ldg(a.nested + (b >> 8))), a.offset);
  return __ldg(a.absmax + b);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <fmt4::Code C>
__device__ __forceinline__ void load_table(float* table) {
  if (threadIdx.x < fmt4::kCodes) table[threadIdx.x] = fmt4::code_value(C, threadIdx.x);
  __syncthreads();
}

// Eight values (16 or 32 bytes) to out with 16-byte stores; out must be 16-byte aligned. Streaming: the
// stores are marked evict-first (st.global.cs), for output that is not read again soon from L2.
template <typename T, bool Streaming = false>
__device__ __forceinline__ void store8(T* out, const float (&f)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = make_float4(f[0], f[1], f[2], f[3]), b = make_float4(f[4], f[5], f[6], f[7]);
    if constexpr (Streaming) {
      __stcs(reinterpret_cast<float4*>(out), a);
      __stcs(reinterpret_cast<float4*>(out) + 1, b);
    } else {
      reinterpret_cast<float4*>(out)[0] = a;
      reinterpret_cast<float4*>(out)[1] = b;
    }
  } else {
    union { uint4 u; T h[8]; } p;
#pragma unroll
    for (int j = 0; j < 8; ++j) p.h[j] = from_float<T>(f[j]);
    if constexpr (Streaming) __stcs(reinterpret_cast<uint4*>(out), p.u);
    else *reinterpret_cast<uint4*>(out) = p.u;
  }
}

// Decodes one 32-bit word of packed codes (bytes in memory order) into eight scaled floats.
__device__ __forceinline__ void decode_word(uint32_t w, const float* table, float s, float (&f)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte = (w >> (8 * j)) & 0xFF;
    f[2 * j] = fmt4::mul_rn(table[byte >> 4], s);
    f[2 * j + 1] = fmt4::mul_rn(table[byte & 0xF], s);
  }
}

// v1: one thread per element, byte loads. The simple baseline; also the op's path for the tail (n % 32)
// and for unaligned pointers. Elements [first, n).
template <typename T, fmt4::Code C>
static __global__ void dequant_v1(Args a, int64_t first, T* __restrict__ out) {
  __shared__ float table[fmt4::kCodes];
  load_table<C>(table);
  const int64_t i = first + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.n) return;
  const uint8_t byte = __ldg(a.packed + (i >> 1));
  const int nib = (i & 1) ? fmt4::lo_nibble(byte) : fmt4::hi_nibble(byte);
  out[i] = from_float<T>(fmt4::mul_rn(table[nib], scale_of(a, i >> a.log2_block)));
}

// v2: one 16-byte load per thread (32 codes, all in one quantization block since blocksize >= 32 is a
// power of two), one scale, 32 outputs written with 16-byte stores. Covers elements [0, 32 * chunks).
template <typename T, fmt4::Code C>
static __global__ void dequant_v2(Args a, int64_t chunks, T* __restrict__ out) {
  __shared__ float table[fmt4::kCodes];
  load_table<C>(table);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= chunks) return;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(a.packed) + t);
  const float s = scale_of(a, (t * 32) >> a.log2_block);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  T* o = out + t * 32;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    float f[8];
    decode_word(words[w], table, s, f);
    store8<T>(o + 8 * w, f);
  }
}

// v3: one 4-byte load per thread (8 codes), one 16-byte store for 2-byte T: fully coalesced stores at the
// price of narrower loads. Covers elements [0, 8 * words).
template <typename T, fmt4::Code C>
static __global__ void dequant_v3(Args a, int64_t words, T* __restrict__ out) {
  __shared__ float table[fmt4::kCodes];
  load_table<C>(table);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= words) return;
  const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(a.packed) + t);
  float f[8];
  decode_word(w, table, scale_of(a, (t * 8) >> a.log2_block), f);
  store8<T>(out + t * 8, f);
}

// v4: v3's layout (one 4-byte word of codes in, one 16-byte store of 8 bf16 out: both coalesced across the
// warp) with kIlp words per thread, strided by the block size so each of the thread's accesses is still
// coalesced; every load and scale is issued before the first decode, so kIlp times the bytes are in flight
// per thread. Covers elements [0, 8 * words).
constexpr int kIlp = 4;
template <typename T, fmt4::Code C>
static __global__ void dequant_v4(Args a, int64_t words, T* __restrict__ out) {
  __shared__ float table[fmt4::kCodes];
  load_table<C>(table);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * kIlp + threadIdx.x;
  uint32_t w[kIlp];
  float s[kIlp];
#pragma unroll
  for (int k = 0; k < kIlp; ++k) {
    const int64_t t = base + static_cast<int64_t>(k) * blockDim.x;
    if (t < words) {
      w[k] = __ldg(reinterpret_cast<const uint32_t*>(a.packed) + t);
      s[k] = scale_of(a, (t * 8) >> a.log2_block);
    }
  }
#pragma unroll
  for (int k = 0; k < kIlp; ++k) {
    const int64_t t = base + static_cast<int64_t>(k) * blockDim.x;
    if (t < words) {
      float f[8];
      decode_word(w[k], table, s[k], f);
      store8<T>(out + t * 8, f);
    }
  }
}

// The span kernels (v7-v11; v7 and v8 were dropped, kernels/dev/NOTES.md has their figures). A CTA of
// kSpanThreads threads covers a span of kSpanThreads * ILP words (8192 elements for ILP 4), which starts
// block-aligned for every block size up to 4096 and so holds span / blocksize scales (256 at most, for
// block size 32); the CTA decodes each of them once into shared memory instead of each thread decoding
// one per word (eight times per 64-element block) on the path to that word's store.
constexpr int kSpanThreads = 256;  // launch the span kernels with exactly this many threads

// v9: no dependent global load at all. Every load a CTA needs is issued up front: its code words, the raw
// scale inputs of its span (uint8 code + nested float32, or the float32 scale) and, with double
// quantization, the 256-entry map into shared memory; the map lookups then read shared memory.
// v10 = v9 with ILP 8; v11 = v9 with evict-first (streaming) stores (the op's kernel for 2-byte outputs).
// Pitched: element e goes to out[(e / a.cols) * a.pitch + e % a.cols] (one 64-bit division per thread for
// the span's first row, then a 32-bit one per word).
template <typename T, fmt4::Code C, int ILP, bool Streaming = false, bool Pitched = false>
static __global__ void dequant_span_v9(Args a, int64_t words, T* __restrict__ out) {
  static_assert(ILP % 4 == 0, "a span holds at most ILP / 4 scales per thread");
  constexpr int kPer = ILP / 4;
  __shared__ float table[fmt4::kCodes];
  __shared__ float map[256];
  __shared__ float scales[kSpanThreads * ILP * 8 / 32];
  const int64_t first_word = static_cast<int64_t>(blockIdx.x) * kSpanThreads * ILP;
  const int64_t base = first_word + threadIdx.x;
  uint32_t w[ILP];
#pragma unroll
  for (int k = 0; k < ILP; ++k) {
    const int64_t t = base + static_cast<int64_t>(k) * kSpanThreads;
    if (t < words) w[k] = __ldg(reinterpret_cast<const uint32_t*>(a.packed) + t);
  }
  const int64_t first_block = (first_word * 8) >> a.log2_block;
  const int64_t last_word = (first_word + kSpanThreads * ILP < words ? first_word + kSpanThreads * ILP : words) - 1;
  const int count = static_cast<int>(((last_word * 8) >> a.log2_block) - first_block + 1);
  float raw[kPer];    // the float32 scale, or the nested scale
  uint8_t qcode[kPer];  // the scale's uint8 code (double quantization)
#pragma unroll
  for (int p = 0; p < kPer; ++p) {
    const int i = threadIdx.x + p * kSpanThreads;
    if (i < count) {
      const int64_t b = first_block + i;
      if (a.qabsmax) {
        qcode[p] = __ldg(a.qabsmax + b);
        raw[p] = __ldg(a.nested + (b >> 8));
      } else {
        raw[p] = __ldg(a.absmax + b);
      }
    }
  }
  if (a.qabsmax) map[threadIdx.x] = __ldg(a.ncode + threadIdx.x);  // kSpanThreads == 256 entries
  if (threadIdx.x < fmt4::kCodes) table[threadIdx.x] = fmt4::code_value(C, threadIdx.x);
  __syncthreads();
#pragma unroll
  for (int p = 0; p < kPer; ++p) {
    const int i = threadIdx.x + p * kSpanThreads;
    if (i < count) scales[i] = a.qabsmax ? fmt4::add_rn(fmt4::mul_rn(map[qcode[p]], raw[p]), a.offset) : raw[p];
  }
  __syncthreads();
  int64_t row0 = 0;
  uint32_t col0 = 0;
  if constexpr (Pitched) {
    row0 = first_word * 8 / a.cols;
    col0 = static_cast<uint32_t>(first_word * 8 - row0 * a.cols);
  }
#pragma unroll
  for (int k = 0; k < ILP; ++k) {
    const int64_t t = base + static_cast<int64_t>(k) * kSpanThreads;
    if (t < words) {
      float f[8];
      decode_word(w[k], table, scales[((t * 8) >> a.log2_block) - first_block], f);
      int64_t at = t * 8;
      if constexpr (Pitched) {  // the span's offset (< 8192 + cols) fits 32 bits
        const uint32_t e = col0 + static_cast<uint32_t>((t - first_word) * 8), cols = static_cast<uint32_t>(a.cols);
        const uint32_t r = e / cols;
        at = (row0 + r) * a.pitch + (e - r * cols);
      }
      store8<T, Streaming>(out + at, f);
    }
  }
}

}  // namespace qlora::kernels::dequant
