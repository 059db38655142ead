// The fused path of a Llama layer: the projections that read the same input computed as one group.
//
//   q|k|v   one dequantized [(nq + 2 nk) D, H] weight and one GEMM, which accumulates onto the LoRA
//           branches written into the packed output first (one x A^T GEMM for the group's adapters), then
//           RoPE and the split into q, k, v in one kernel (rope_split);
//   gate|up one [2 I, H] GEMM likewise, then SwiGLU reads the packed halves (swiglu_packed);
//   o, down the same group machinery with one member.
// Backward mirrors it: the LoRA input gradient of the whole group first, then one dequantize and one GEMM
// accumulating the base input gradient onto it; adapter gradients produced in float32 directly, one dA GEMM
// per group. fused.cpp spells out each GEMM.
//
// Numerics: the same math as the per-projection modules (LoraLinear over Quant4Linear); rounding differs
// within the compute dtype (the base GEMM adds onto the rounded LoRA branch, whose scaling its own GEMM
// applies; adapter gradients accumulate in float32 instead of being rounded to the compute dtype first).
// RoPE and SwiGLU are bit-identical to the composite.
//
// Applies when every member is a frozen 4-bit base (optionally with LoRA) computing in the input's dtype;
// otherwise the callers use the modules as before. Mode: Auto = on CUDA tensors only (the CPU path stays
// the bit-exact reference that CI compares with transformers/PEFT); On also on the CPU (tests); Off never.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "trainer/model/linear.h"

namespace qlora::model {

enum class FusedMode { Auto, On, Off };
void set_fused_mode(FusedMode mode);
FusedMode fused_mode();

// While one lives (on this thread), a group's forward keeps its dequantized weights for its backward instead
// of dequantizing them again there. For a checkpointed layer's recomputation, whose backward follows at
// once: it saves one dequantization per group and step for one layer's bf16 weights held meanwhile (about
// 0.4 GB at the 7B shape). Outside a recomputation it would hold every layer's weights until backward.
class KeepDequantizedWeights {
 public:
  KeepDequantizedWeights();
  ~KeepDequantizedWeights();
  KeepDequantizedWeights(const KeepDequantizedWeights&) = delete;
  KeepDequantizedWeights& operator=(const KeepDequantizedWeights&) = delete;

 private:
  bool previous_;
};

// The group's outputs side by side: x [..., in] -> [..., sum of out], or an undefined tensor when the
// fused path does not apply to this group and input (then call each member's forward).
// output_needed = false: only the gradient path is wanted (a recomputation whose caller kept what the output
// fed): the forward skips the dequantization, the base GEMM and the B products, and the returned tensor's
// values are unspecified; its backward is exactly the one of the full forward.
at::Tensor fused_projections(const std::vector<const Linear*>& group, const at::Tensor& x,
                             bool output_needed = true);

// One projection: through the fused path when it applies, else the module's own forward (which computes
// the output whatever output_needed says).
at::Tensor project(Linear& l, const at::Tensor& x, bool output_needed = true);

// RoPE on the packed q|k|v output [B, T, (nq + 2 nk) D] with cos/sin [B, T, D]; returns q [B, T, nq, D],
// k [B, T, nk, D] (rotated) and v [B, T, nk, D], each contiguous. Differentiable.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_split(const at::Tensor& qkv, const at::Tensor& cos,
                                                          const at::Tensor& sin, int64_t nq, int64_t nk, int64_t d);

// silu(gate) * up on the packed gate|up output [..., 2 I] -> [..., I]. Differentiable.
at::Tensor swiglu_packed(const at::Tensor& gu);

}  // namespace qlora::model
