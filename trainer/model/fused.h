// The fused path of a Llama layer: the projections that read the same input computed as one group.
//
//   q|k|v   one dequantized [(nq + 2 nk) D, H] weight and one GEMM, which accumulates onto the LoRA
//           branches written into the packed output first (one x A^T GEMM for the group's adapters), then
//           RoPE and the split into q, k, v in one kernel (rope_split);
//   gate|up one [2 I, H] GEMM likewise, then SwiGLU reads the packed halves (swiglu_packed);
//   o, down the same group machinery with one member.
// The adapters' B products ride on the base GEMM: folded into its K dimension when the producer of x left
// room for x A^T (RMSNorm before q|k|v and gate|up, SwiGLU before down), else written into the output first
// for the base GEMM to accumulate onto.
// Backward mirrors it: the LoRA input gradient of the whole group first, then one dequantize and one GEMM
// accumulating the base input gradient onto it; adapter gradients produced in float32 directly, one dxa and
// one dA GEMM per group. fused.cpp spells out each GEMM.
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

#include <memory>
#include <tuple>
#include <vector>

#include "trainer/model/linear.h"

namespace qlora::model {

enum class FusedMode { Auto, On, Off };
void set_fused_mode(FusedMode mode);
FusedMode fused_mode();
// Casts the adapters that changed since their last use into the compute dtype now, instead of at the next
// forward's first group. The trainer calls it right after the optimizer step, where the copy queues behind the
// update while the GPU is still busy, instead of on the CPU's path at the start of the next step.
void refresh_adapter_casts();

// Dequantization of the next groups ahead on a second CUDA stream, overlapping the kernels before their GEMMs
// (fused.cpp's DequantAheadQueue). The block scheduler serves a pending grid of a higher-priority stream
// first; between grids of equal priority, the one queued first. So:
//   Low (the default): the step's kernels on a stream one priority level above the default (StepStream),
//        the dequantization on a default-priority one: its blocks take only the SMs the step leaves free;
//   Even: both at the default priority, the step on the caller's stream (the default until 2026-11-26: a
//        small kernel of the step then waited behind a whole dequantization grid queued before it);
//   High: the dequantization one level above the step's stream (for A/B);
//   Off: each group dequantized in its turn, on the caller's stream.
enum class DequantAhead { Off, Low, Even, High };
void set_dequant_ahead(DequantAhead mode);
DequantAhead dequant_ahead_mode();
// How many groups the work ahead covers (default 2; each holds one more group's weights). With one, the step
// still waited ~25 us for the dequantization before q|k|v's and gate|up's GEMMs at the 7B shape.
void set_dequant_ahead_depth(int groups);

// While one lives, the CUDA work this thread queues on `device` goes to the step's stream (Low and High
// above; otherwise, on the CPU and when nested, it changes nothing). That stream first waits for the work
// queued on the caller's stream, and the caller's stream waits for the step's work when this ends, so code
// outside sees one ordered stream. The trainer's step and `qlora bench`'s run under one; the backward runs
// on it too (autograd runs a node's backward on its forward's stream).
class StepStream {
 public:
  explicit StepStream(at::Device device);
  ~StepStream();
  StepStream(const StepStream&) = delete;
  StepStream& operator=(const StepStream&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Joins the work queued ahead to the streams that asked for it and drops it (the next requests dequantize in
// their turn until the queue is ahead again). Around a CUDA graph's capture: work queued before the capture
// cannot be waited for inside it, and a capture cannot end with the side stream's work unjoined (the work a
// backward queues ahead for the next step's first groups).
void settle_dequant_ahead();

// How many dequantizations were taken from the work done ahead since the process started (tests).
int64_t dequant_ahead_hits();

// Whether groups fold their adapters into the base GEMM where x's producer left room (default on; off is
// for A/B measurements: `qlora bench --fold off`).
void set_fold_adapters(bool on);
bool fold_adapters();

// Whether a group's backward forms dxa and the dB's in one pass over dy on CUDA (kernels/lora_grad.cu,
// where it supports the shapes; default on) or with cuBLAS (dy bd, then a GEMM per dB: `qlora bench
// --lora-grad cublas`, for A/B).
void set_lora_grad_kernel(bool on);

// Whether LoRA dropout on CUDA draws its masks from counters (kernels/lora_dropout.cu: a group's members
// dropped in one pass, 1 bit an element kept for the backward; default on) or runs ATen's dropout, a byte mask
// kept per adapter (`qlora bench --lora-dropout-masks aten`, for A/B).
void set_counter_dropout(bool on);

// Whether, with masks by counters, a group's dropped members take x A^T and dA from kernels that apply the
// keep bits to x as it loads (kernels/lora_dropout_mm.cu, where they take the shapes; default on) or from
// dropped copies of x written and read by cuBLAS (`qlora bench --lora-dropout-mm copies`, for A/B).
void set_dropout_mm_kernels(bool on);

// Whether, with masks by counters, the backward forms a group's input gradient through its dropped members'
// masks in one kernel (kernels/lora_dropout_mm.cu's dx, where it takes the shapes; default on) or writes each
// member's dxa_i A_i by cuBLAS and sums them through the masks in a second pass (`qlora bench
// --lora-dropout-dx two-pass`, for A/B).
void set_dropout_dx_kernel(bool on);

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
// spare: the number of columns right of each of x's rows that the producer of x left for this group (x is
// then the first columns of a wider buffer: RMSNorm's and SwiGLU's `spare`, with_spare_columns). When it
// covers the group's adapters, x A^T is written there and the adapters fold into the base GEMM's K
// dimension: y = [x | x A^T] [W | s B]^T, one GEMM, no pass of their own over y. The caller promises that
// nothing else reads or writes those columns.
at::Tensor fused_projections(const std::vector<const Linear*>& group, const at::Tensor& x,
                             bool output_needed = true, int64_t spare = 0);

// The spare columns a producer of this group's input should leave (adapter ranks rounded up to 8, so rows
// stay 16-byte aligned), or 0 when the fused path would not apply to an input of like's dtype and device, or
// there is nothing to fold.
int64_t adapter_columns(const std::vector<const Linear*>& group, const at::Tensor& like);

// One projection: through the fused path when it applies, else the module's own forward (which computes
// the output whatever output_needed says).
at::Tensor project(Linear& l, const at::Tensor& x, bool output_needed = true, int64_t spare = 0);

// x's values in the first columns of a new buffer with `spare` more columns a row (differentiable; x itself
// when spare is 0): for producers without a kernel that writes that layout (the CPU composites).
at::Tensor with_spare_columns(const at::Tensor& x, int64_t spare);

// LoRA dropout on an adapter's input, training mode (the per-projection modules of trainer/lora): on CUDA
// outside a graph capture its mask comes from counters, as the groups drop their members' inputs
// (kernels/lora_dropout.h), and is kept as 1 bit an element; the modules and the groups then drop the same
// elements from the same generator state. Elsewhere ATen's dropout.
at::Tensor lora_dropout(const at::Tensor& x, double p);

// How many group forwards ran folded since the process started (tests check the path is taken).
int64_t folded_group_calls();
// How many of LoRA dropout's masked products (x A^T in a forward, dA in a backward) ran by the kernels of
// set_dropout_mm_kernels since the process started (tests).
int64_t dropout_mm_calls();
// How many backwards formed dx by set_dropout_dx_kernel's kernel since the process started (tests).
int64_t dropout_dx_calls();

// RoPE on the packed q|k|v output [B, T, (nq + 2 nk) D] with cos/sin [B, T, D]; returns q [B, T, nq, D],
// k [B, T, nk, D] (rotated) and v [B, T, nk, D], each contiguous. Differentiable.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_split(const at::Tensor& qkv, const at::Tensor& cos,
                                                          const at::Tensor& sin, int64_t nq, int64_t nk, int64_t d);

// silu(gate) * up on the packed gate|up output [..., 2 I] -> [..., I], leaving `spare` columns right of
// each row for the next group (see fused_projections). Differentiable.
at::Tensor swiglu_packed(const at::Tensor& gu, int64_t spare = 0);

}  // namespace qlora::model
