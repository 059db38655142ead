// LoRA dropout's keep decisions, drawn from counters (kernels/lora_dropout.cu): the same (seed, offset,
// row, column) always gives the same decision, whatever the tensor's layout and whichever kernel draws it,
// so the per-projection modules and the fused groups drop the same elements, and a checkpointed layer's
// recomputation, which restores the generator's state, draws its forward's masks again.
//
// Definition (host and device, so tests recompute it on the CPU): a draw is the CUDA generator's (seed,
// offset) after `philox_cuda_state(4)`; the offset is a multiple of 4. Element (row, col) of that draw takes
// the 16-bit half col % 8 (low half first) of the four words of PyTorch's Philox4x32-10 engine
// `at::Philox4_32(seed, row, (offset / 4 << 32) + col / 8)` (key = seed, counter = {col / 8, offset / 4,
// row}), and is kept when that half is at least `dropout_threshold(p)` = round(p 2^16): probability 1 - p to
// within 2^-17 (16 bits an element halve the engine's work against 32, which bounded the kernels).
// A kept element becomes x / (1 - p) computed in float32 and rounded to x's dtype (as ATen's dropout
// scales), a dropped one 0.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>

#include <cmath>
#include <cstdint>

namespace qlora::kernels {

// The keep bits of columns 8 block .. 8 block + 7 of `row` in the draw at `offset` (bit e: column 8 block + e).
C10_HOST_DEVICE inline uint32_t dropout_keep_bits(uint64_t seed, uint64_t offset, uint64_t row, uint64_t block,
                                                  uint32_t threshold) {
  at::Philox4_32 engine(seed, row, ((offset / 4) << 32) + block);
  uint32_t bits = 0;
  for (int w = 0; w < 4; ++w) {
    const uint32_t word = engine();
    bits |= static_cast<uint32_t>((word & 0xffffu) >= threshold) << (2 * w);
    bits |= static_cast<uint32_t>((word >> 16) >= threshold) << (2 * w + 1);
  }
  return bits;
}

// Halves below this are dropped: round(p 2^16), p in [0, 1).
inline uint32_t dropout_threshold(double p) {
  const double t = std::nearbyint(p * 65536.0);
  return t >= 65535.0 ? 65535u : static_cast<uint32_t>(t);
}

}  // namespace qlora::kernels
