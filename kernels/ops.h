// The exported CUDA ops (qlora_kernels). Same signatures and bit-identical results as the CPU reference
// ops in trainer/quant/ops.h (which documents the shapes); every op checks dtype, device, contiguity,
// shape and parameters, launches on the current stream and checks the launch.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/format_4bit.h"

namespace qlora::kernels {

std::pair<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& x, fmt4::Code code, int64_t blocksize);
std::pair<at::Tensor, at::Tensor> quantize_nested_cuda(const at::Tensor& absmax, float offset, const at::Tensor& lut);
at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                                const at::Tensor& nested_code, float offset, fmt4::Code code, int64_t blocksize,
                                int64_t n, at::ScalarType out, const at::Tensor& into = {});
// Whether dequantize_4bit_cuda can write a non-contiguous `into` directly: 2-D [rows, cols] with cols % 8 == 0,
// rows stride(0) >= cols elements apart (a multiple of 8), 2-byte elements, 16-byte aligned.
bool pitched_ok(const at::Tensor& into);

// RMSNorm (kernels/rmsnorm.cu): x [..., H], w [H], same dtype (bf16 / fp16 / fp32), contiguous.
// Forward returns (y shaped like x, rstd float32 [rows]); y's rows lie H + spare apart in a buffer whose
// last `spare` columns of each row are left unwritten for the caller. Backward returns dx like x (no
// weight gradient), plus residual_grad (like x) when given: the gradient of a residual stream whose value
// the norm read.
std::pair<at::Tensor, at::Tensor> rmsnorm_fwd_cuda(const at::Tensor& x, const at::Tensor& w, double eps,
                                                   int64_t spare = 0);
at::Tensor rmsnorm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                            const at::Tensor& residual_grad = {});
// The residual add fused in front: s = a + b (rounded as the composite's add), then RMSNorm(s). Returns
// (s, y, rstd); a and b alike, contiguous. Its backward is rmsnorm_bwd_cuda(dy, s, w, rstd, ds).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_fwd_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                    const at::Tensor& w, double eps, int64_t spare = 0);

// SwiGLU gate (kernels/swiglu.cu): silu(g) * u and its backward (dg, du); g, u, dy same shape and dtype.
at::Tensor swiglu_fwd_cuda(const at::Tensor& g, const at::Tensor& u);
std::pair<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u);
// The same on a packed gate|up [..., 2I] (contiguous): forward -> [..., I] (rows I + spare apart, the
// spare columns left unwritten, as RMSNorm's); backward -> dgu [..., 2I].
at::Tensor swiglu_packed_fwd_cuda(const at::Tensor& gu, int64_t spare = 0);
at::Tensor swiglu_packed_bwd_cuda(const at::Tensor& dy, const at::Tensor& gu);

// RoPE of the packed q|k|v projection output, split (kernels/rope.cu): y [..., (nq + 2 nk) d] and
// cos/sin [rows, d] (rows = the leading dims of y), all contiguous and one dtype -> q [..., nq, d] and
// k [..., nk, d] rotated, v [..., nk, d]; backward takes dq, dk, dv ([..., heads, d]) and returns
// dy [..., (nq + 2 nk) d].
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_split_fwd_cuda(const at::Tensor& y, const at::Tensor& cos,
                                                                   const at::Tensor& sin, int64_t nq, int64_t nk,
                                                                   int64_t d);
at::Tensor rope_split_bwd_cuda(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cos,
                               const at::Tensor& sin);

// A projection group's LoRA B's as one block-diagonal matrix (kernels/lora.cu): out [total, ranks] (rows
// of contiguous elements, any row stride; bf16 / fp16 / fp32) gets scale * B (float32 [rows, rank],
// contiguous) at (offset, col) for each member, zeros elsewhere. At most kMaxBlockDiagMembers members.
constexpr int kMaxBlockDiagMembers = 8;
struct BlockDiagMember {
  at::Tensor b;
  int64_t offset = 0, col = 0;
  double scale = 1.0;
};
void lora_block_diag_cuda(const at::Tensor& out, const std::vector<BlockDiagMember>& members);

// The backward's two products of a projection group's output gradient with its adapters in one pass over dy
// (kernels/lora_grad.cu): for each member m (columns [offset, offset + out) of dy, [col, col + R) of xa):
// dxa[:, col + j] = dy_m T(scale B)[:, j] (T = dy's dtype; bd's operand, block_diag_kernel's rounding) and
// dB_m = scale dy_m^T xa_m in float32. dy [n, total] and xa [n, ranks] in bfloat16 or float16 with contiguous
// rows (any row stride: xa may be the spare columns of a wider buffer); returns dxa [n, ranks] contiguous
// and each member's dB [out, R]. Deterministic. lora_grad_supported says whether the arguments fit: every
// B float32 [out, R] contiguous with the same R, 8 or 16, out and offset multiples of 8, dy's
// rows 16-byte aligned, at most kMaxLoraGradMembers members.
constexpr int kMaxLoraGradMembers = 8;
struct LoraGradMember {
  at::Tensor b;
  int64_t offset = 0, col = 0;
  double scale = 1.0;
};
bool lora_grad_supported(const at::Tensor& dy, const at::Tensor& xa, const std::vector<LoraGradMember>& members);
std::pair<at::Tensor, std::vector<at::Tensor>> lora_grad_cuda(const at::Tensor& dy, const at::Tensor& xa,
                                                              const std::vector<LoraGradMember>& members);

// LoRA dropout with its keep decisions drawn from counters (kernels/lora_dropout.h defines them) and kept as
// one bit an element, for up to kMaxDropoutMembers adapters reading one input (kernels/lora_dropout.cu). A
// draw is the CUDA generator's (seed, offset) after philox_cuda_state(4) and the member's p in [0, 1).
// Forward: x [n, in] (bf16 / fp16 / fp32, rows contiguous, any row stride) -> (h [M, n, in], member m's
// dropped copy of x in row block m; mask uint8 [M, n, ceil(in / 8)], bit e of byte c: column 8 c + e kept).
// Apply: the same copies from x and the mask, nothing drawn. Backward: g [M, n, in] contiguous -> dx [n, in] =
// sum over m of g_m's kept elements / (1 - p_m), summed in float32 and rounded once.
constexpr int kMaxDropoutMembers = 8;
struct DropoutDraw {
  double p = 0.0;
  uint64_t seed = 0, offset = 0;
};
std::pair<at::Tensor, at::Tensor> lora_dropout_fwd_cuda(const at::Tensor& x, const std::vector<DropoutDraw>& draws);
// The forward's keep bits alone (the same mask as lora_dropout_fwd_cuda's), for the products below.
at::Tensor lora_dropout_draw_cuda(const at::Tensor& x, const std::vector<DropoutDraw>& draws);
at::Tensor lora_dropout_apply_cuda(const at::Tensor& x, const at::Tensor& mask, const std::vector<double>& p);
at::Tensor lora_dropout_bwd_cuda(const at::Tensor& g, const at::Tensor& mask, const std::vector<double>& p);

// The adapters' products with the dropped copies of x without the copies (kernels/lora_dropout_mm.cu): the
// keep bits (mask [M, n, in / 8] as above, row block m for member m) applied to x's tiles as they load.
//   xa: out[:, col_m, col_m + R) = T((keep_m * x) A_m^T / (1 - p_m)), member m's A [R, in] (rows of one
//       tensor a common stride apart, as a group's concatenated A);
//   dA: returns float32 [R, in] per member = dxa[:, col_m, col_m + R)^T (keep_m * x) / (1 - p_m).
// Products and sums in float32, one rounding; deterministic. lora_dropout_mm_supported says whether they take
// the arguments: x bf16 / fp16 with 16-byte aligned contiguous rows, in a positive multiple of 64, 1 to
// kMaxDropoutMm members of one rank 8, 16, 32 or 64; given dxa (dA's), dxa like x's dtype with 16-byte aligned
// contiguous rows and every col_m % 8 == 0 inside it.
constexpr int kMaxDropoutMm = kMaxDropoutMembers;
struct DropoutMmMember {
  at::Tensor a;  // xa and dx only
  int64_t col = 0;
  double p = 0.0;
};
bool lora_dropout_mm_supported(const at::Tensor& x, const std::vector<DropoutMmMember>& members, int64_t rank,
                               const at::Tensor& dxa = {});
void lora_dropout_xa_cuda(const at::Tensor& x, const at::Tensor& mask, const std::vector<DropoutMmMember>& members,
                          const at::Tensor& out);
std::vector<at::Tensor> lora_dropout_da_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& dxa,
                                             const std::vector<DropoutMmMember>& members, int64_t rank);
// The backward's input gradient through the same masks, each member's product never written:
//   dx: returns [n, in] of dxa's dtype = sum over m of keep_m * (dxa[:, col_m, col_m + R) A_m) / (1 - p_m),
//       the products in float32, each masked and scaled, summed in member order and rounded once.
// lora_dropout_dx_supported: dxa bf16 / fp16 [n, ranks] with 16-byte aligned contiguous rows; 1 to
// kMaxDropoutMm members of one rank 8, 16, 32 or 64 at columns col_m % 8 == 0 inside dxa; their A's [R, in] of
// dxa's dtype, 16-byte aligned rows a common stride apart, in a positive multiple of 64.
bool lora_dropout_dx_supported(const at::Tensor& dxa, const std::vector<DropoutMmMember>& members, int64_t rank);
at::Tensor lora_dropout_dx_cuda(const at::Tensor& dxa, const at::Tensor& mask,
                                const std::vector<DropoutMmMember>& members, int64_t rank);

// Token cross-entropy and its gradient in one pass (kernels/cross_entropy.cu): logits [rows, V]
// contiguous (bf16 / fp16 / fp32), targets int64 [rows] in [0, V) -> float32 [rows] of lse - logit[target]
// (float32 math); the logits are overwritten with softmax(row) - onehot(target), rounded to their dtype.
// The CPU reference is the composite in ChunkedLmLoss (trainer/train/trainer.cpp).
at::Tensor cross_entropy_fwd_bwd_cuda(at::Tensor& logits, const at::Tensor& targets);

}  // namespace qlora::kernels
