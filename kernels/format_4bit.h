// The NF4 / FP4 4-bit formats and bnb's nested 8-bit scale format, defined once for host and device.
//
// Everything here reproduces what bitsandbytes 0.50.2 produces on the CPU, bit for bit
// (shared/INTEROP.md section 1; docs/kernels.md lists where bnb's CPU and CUDA paths differ):
//   - codebooks: 16 float32 values per type, index = 4-bit code;
//   - quantize: x_s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1) for full blocks, but
//     clamp(x / max(absmax, 1e-38), -1, 1) (true division) for the partial last block, whose stored
//     absmax is also the clamped one; code = number of sorted-codebook midpoints strictly below x_s
//     (a tie goes to the lower code), mapped back through the sort order for FP4;
//   - packing: byte j = (code[2j] << 4) | code[2j+1]: the even flat index in the high nibble;
//   - nested (double-quant) scales: (absmax - mean) quantized with the 256-entry dynamic map in blocks
//     of 256 through bnb's 65536-bin lookup table (an approximation of nearest that bnb's CPU library
//     uses; reproducing it is what makes the codes byte-identical).
// All arithmetic that must round like the reference goes through mul_rn/add_rn/div_rn, so nvcc cannot
// contract it into FMAs (which round once instead of twice).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__
#else
#define QLORA_HD
#endif

namespace qlora::fmt4 {

enum class Code : int { NF4 = 0, FP4 = 1 };

constexpr int kCodes = 16;
constexpr int64_t kMinBlock = 32;
constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kDefaultBlock = 64;
constexpr int64_t kNestedBlock = 256;  // block size of the double-quantized scales
constexpr int kDynamicCodes = 256;     // entries of bnb's signed dynamic 8-bit map
constexpr int kLutSize = 65536;        // bins of bnb's CPU 8-bit quantization lookup table

// Power of two in [32, 4096], the sizes bitsandbytes 0.50 accepts.
QLORA_HD constexpr bool valid_blocksize(int64_t b) {
  return b >= kMinBlock && b <= kMaxBlock && (b & (b - 1)) == 0;
}

// NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA paper), exactly bnb's float32 values.
QLORA_HD constexpr float nf4_value(int i) {
  constexpr float t[kCodes] = {-1.0f,
                               -0.6961928009986877f,
                               -0.5250730514526367f,
                               -0.39491748809814453f,
                               -0.28444138169288635f,
                               -0.18477343022823334f,
                               -0.09105003625154495f,
                               0.0f,
                               0.07958029955625534f,
                               0.16093020141124725f,
                               0.24611230194568634f,
                               0.33791524171829224f,
                               0.44070982933044434f,
                               0.5626170039176941f,
                               0.7229568362236023f,
                               1.0f};
  return t[i];
}

// FP4 (E2M1, bias 2): bit 3 is the sign; magnitudes of codes 0..7 over 12, rounded to float32 once
// (bnb builds its table the same way: torch float32 division by the max). Code 8 is +0.0, not -0.0: bnb
// writes it as the Python int `-0`, which is 0; 0.0f - m gives +0.0 for m = 0 and -m otherwise, so the
// quant_map and every dequantized zero match bnb's bits.
QLORA_HD constexpr float fp4_value(int i) {
  constexpr float mag[8] = {0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f};
  return (i & 8) ? 0.0f - mag[i & 7] / 12.0f : mag[i & 7] / 12.0f;
}

QLORA_HD constexpr float code_value(Code c, int i) { return c == Code::NF4 ? nf4_value(i) : fp4_value(i); }

// Codes in ascending value order (a stable sort: code 0 before code 8, both zero, as torch.argsort gives).
// FP4's order is packed into one 64-bit constant, nibble r = code of rank r, so device code needs no
// table in memory for it.
constexpr uint64_t kFp4Order = 0x3254761809EFCDABull;  // ranks 0..15: 11,10,13,12,15,14,9,0,8,1,6,7,4,5,2,3
QLORA_HD constexpr int sorted_code(Code c, int rank) {
  return c == Code::NF4 ? rank : static_cast<int>((kFp4Order >> (4 * rank)) & 0xF);
}

// Midpoint between sorted ranks i and i+1, float32 as bnb computes it: (a + b) / 2.
QLORA_HD constexpr float midpoint(Code c, int i) {
  return (code_value(c, sorted_code(c, i)) + code_value(c, sorted_code(c, i + 1))) / 2.0f;
}

namespace detail {
constexpr bool sorted_ok(Code c) {
  for (int i = 0; i + 1 < kCodes; ++i)
    if (!(code_value(c, sorted_code(c, i)) <= code_value(c, sorted_code(c, i + 1)))) return false;
  return true;
}
constexpr bool permutation_ok(Code c) {
  int seen = 0;
  for (int i = 0; i < kCodes; ++i) seen |= 1 << sorted_code(c, i);
  return seen == 0xFFFF;
}
}  // namespace detail
static_assert(detail::sorted_ok(Code::NF4) && detail::sorted_ok(Code::FP4), "sort order must ascend");
static_assert(detail::permutation_ok(Code::NF4) && detail::permutation_ok(Code::FP4), "order is a permutation");
static_assert(nf4_value(7) == 0.0f && nf4_value(0) == -1.0f && nf4_value(15) == 1.0f, "NF4 table");
static_assert(fp4_value(3) == 1.0f && fp4_value(11) == -1.0f, "FP4 max code is 0b011");
static_assert(__builtin_bit_cast(uint32_t, fp4_value(8)) == 0u, "FP4 code 8 is +0.0, as bnb's table");
static_assert(sorted_code(Code::FP4, 0) == 11 && sorted_code(Code::FP4, 7) == 0 &&
                  sorted_code(Code::FP4, 8) == 8 && sorted_code(Code::FP4, 15) == 3, "FP4 order");
static_assert(midpoint(Code::FP4, 14) > 0.83f && midpoint(Code::FP4, 14) < 0.84f, "FP4 top threshold");
static_assert(valid_blocksize(64) && !valid_blocksize(48) && !valid_blocksize(16) && !valid_blocksize(8192),
              "block sizes");

// Rounding-exact arithmetic (no contraction into FMA on the device).
QLORA_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
QLORA_HD inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
QLORA_HD inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
QLORA_HD inline float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// The smallest divisor bnb uses for a block's scale (an all-zero block then quantizes 0 * 1e38 = 0).
constexpr float kMinAbsmax = 1e-38f;

// Scaled value -> 4-bit code: the number of sorted midpoints strictly below x (identical to
// torch.bucketize(x, midpoints, right=False)), mapped back to a code. Fifteen compares against
// compile-time constants: no table lookups, no branches.
QLORA_HD inline int encode(Code c, float x) {
  int r = 0;
#ifdef __CUDACC__  // host compilers other than nvcc's front end do not know the pragma
#pragma unroll
#endif
  for (int i = 0; i < kCodes - 1; ++i) r += x > midpoint(c, i) ? 1 : 0;
  return sorted_code(c, r);
}

// Packing of two codes into one byte (even flat index in the high nibble).
QLORA_HD constexpr uint8_t pack(int even, int odd) { return static_cast<uint8_t>((even << 4) | odd); }
QLORA_HD constexpr int hi_nibble(uint8_t b) { return b >> 4; }
QLORA_HD constexpr int lo_nibble(uint8_t b) { return b & 0xF; }

// bnb's 8-bit lookup index of a normalised value: uint16((clamp(v) + 1) * 0.5 * 65535 + 0.5).
QLORA_HD inline int lut_index(float v) {
  v = clamp_unit(v);
  return static_cast<int>(static_cast<uint16_t>(add_rn(mul_rn(mul_rn(add_rn(v, 1.0f), 0.5f), 65535.0f), 0.5f)));
}

}  // namespace qlora::fmt4
