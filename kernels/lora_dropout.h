// LoRA dropout's keep decisions, drawn from counters instead of stored (kernels/lora_dropout.cu): the same
// (seed, offset, row, column) always gives the same decision, so a backward or a recomputation draws its
// forward's mask again rather than keeping a byte per element (at the 7B shape and 2048 tokens that was
// ~2.2 GiB a step without checkpointing, and every pass over it cost as much as one over the activations).
//
// Definition (host and device, so tests recompute it on the CPU): a draw is the CUDA generator's (seed,
// offset) after `philox_cuda_state(4)`; the offset is a multiple of 4. Element (row, col) of that draw
// takes word col % 4 of PyTorch's Philox4x32-10 engine `at::Philox4_32(seed, row, (offset / 4 << 32) +
// col / 4)` (key = seed, counter = {col / 4, offset / 4, row}), and is kept when that word is at least
// `dropout_threshold(p)` = round(p 2^32): probability 1 - p to within 2^-32. A kept element becomes
// x / (1 - p) computed in float32 and rounded to x's dtype (as ATen's dropout scales), a dropped one 0.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>

#include <cmath>
#include <cstdint>

namespace qlora::kernels {

// Words 0-3 of one engine block: columns 4 block .. 4 block + 3 of `row` in the draw at `offset`.
C10_HOST_DEVICE inline void dropout_block(uint64_t seed, uint64_t offset, uint64_t row, uint64_t block,
                                          uint32_t (&words)[4]) {
  at::Philox4_32 engine(seed, row, ((offset / 4) << 32) + block);
  for (int i = 0; i < 4; ++i) words[i] = engine();
}

// Words below this are dropped: round(p 2^32), p in [0, 1).
inline uint32_t dropout_threshold(double p) {
  const double t = std::nearbyint(p * 4294967296.0);
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

}  // namespace qlora::kernels
