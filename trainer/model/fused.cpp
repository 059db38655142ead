// The fused projection groups, RoPE split and packed SwiGLU; see fused.h for what and why.
#include "trainer/model/fused.h"

#include "trainer/model/llama.h"

#ifdef QLORA_WITH_CUDA
#include "kernels/ops.h"
#endif

#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>

namespace qlora::model {

namespace {

std::atomic<FusedMode> g_mode{FusedMode::Auto};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Everything about one call of a group that is not a tensor autograd tracks. Lives in the graph node
// (as a capsule), so the frozen weights it references stay valid until backward has run.
struct GroupState : torch::CustomClassHolder {
  struct Member {
    quant::Quantized4bit weight;  // frozen [out, in]
    int64_t out = 0, offset = 0;  // columns [offset, offset + out) of the packed output
    int lora = -1;                // index of its (A, B) pair in the tensor list, -1 if not adapted
    double scaling = 0.0, dropout = 0.0;
  };
  std::vector<Member> members;
  int64_t in = 0, total = 0;
};

// The group's weights dequantized one under the other: [total, in] in `dtype`.
at::Tensor dequantize_group(const GroupState& s, at::ScalarType dtype, at::Device device) {
  at::Tensor w = at::empty({s.total, s.in}, at::TensorOptions().dtype(dtype).device(device));
  for (const auto& m : s.members) quant::dequantize_4bit_into(m.weight, w.narrow(0, m.offset, m.out));
  return w;
}

// a @ b with a float32 result (the adapters' gradients): cuBLAS accumulates in float32 and writes it
// without a round trip through the compute dtype; elsewhere the product is cast.
at::Tensor mm_float(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cuda() && a.scalar_type() != at::kFloat) return at::mm(a, b, at::kFloat);
  return at::mm(a, b).to(at::kFloat);
}

struct ProjectionGroupFunction : public torch::autograd::Function<ProjectionGroupFunction> {
  // x [..., in]; lora = A0, B0, A1, B1, ... for the adapted members in order (float32).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList lora,
                            const c10::intrusive_ptr<GroupState>& st) {
    const auto dt = x.scalar_type();
    const at::Tensor x2 = x.reshape({-1, st->in}).contiguous();  // [n, in]
    const int64_t n = x2.size(0);
    auto out_sizes = x.sizes().vec();
    out_sizes.back() = st->total;
    at::Tensor y = at::empty(out_sizes, x.options());
    at::Tensor y2 = y.view({n, st->total});
    {
      const at::Tensor w = dequantize_group(*st, dt, x.device());  // freed at the end of this scope
      at::mm_out(y2, x2, w.t());
    }
    variable_list saved{x2};
    for (const auto& m : st->members) {
      if (m.lora < 0) continue;
      const at::Tensor a = lora[2 * m.lora].to(dt), b = lora[2 * m.lora + 1].to(dt);  // [r, in], [out, r]
      at::Tensor h = x2, mask;
      if (m.dropout > 0.0) std::tie(h, mask) = at::native_dropout(x2, m.dropout, /*train=*/true);
      const at::Tensor xa = at::mm(h, a.t());                                    // [n, r]
      y2.narrow(1, m.offset, m.out).addmm_(xa, b.t(), /*beta=*/1.0, /*alpha=*/m.scaling);
      saved.insert(saved.end(), {xa, mask, a, b});
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto st = c10::static_intrusive_pointer_cast<GroupState>(ctx->saved_data["state"].toCapsule());
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x2 = saved[0];
    const at::Tensor dy = grad[0].reshape({-1, st->total}).contiguous();  // [n, total]
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor w = dequantize_group(*st, dy.scalar_type(), dy.device());
      dx = at::mm(dy, w);  // [n, in]
    }
    int64_t lora_count = 0;
    for (const auto& m : st->members) lora_count += m.lora >= 0;
    variable_list grads(1 + 2 * lora_count + 1);  // x, each A and B, and the (non-tensor) state
    size_t k = 1;
    for (const auto& m : st->members) {
      if (m.lora < 0) continue;
      const at::Tensor &xa = saved[k], &mask = saved[k + 1], &a = saved[k + 2], &b = saved[k + 3];
      k += 4;
      const double keep_scale = m.dropout > 0.0 ? 1.0 / (1.0 - m.dropout) : 1.0;
      const at::Tensor dyi = dy.narrow(1, m.offset, m.out);  // [n, out]
      const at::Tensor dxa = at::mm(dyi, b).mul_(m.scaling);  // [n, r]: gradient of xa
      if (ctx->needs_input_grad(1 + 2 * m.lora)) {
        const at::Tensor h = mask.defined() ? at::native_dropout_backward(x2, mask, keep_scale) : x2;
        grads[1 + 2 * m.lora] = mm_float(dxa.t(), h);  // [r, in]
      }
      if (ctx->needs_input_grad(2 + 2 * m.lora)) grads[2 + 2 * m.lora] = mm_float(dyi.t(), xa).mul_(m.scaling);
      if (dx.defined()) {
        if (mask.defined()) dx.add_(at::native_dropout_backward(at::mm(dxa, a), mask, keep_scale));
        else dx.addmm_(dxa, a);
      }
    }
    if (dx.defined()) {
      auto x_sizes = grad[0].sizes().vec();  // x's shape: the output's with `in` for the last dimension
      x_sizes.back() = st->in;
      grads[0] = dx.view(x_sizes);
    }
    return grads;
  }
};

bool applies(const at::Tensor& x) {
  switch (g_mode.load()) {
    case FusedMode::Off: return false;
    case FusedMode::On: return true;
    case FusedMode::Auto: return x.is_cuda();
  }
  return false;
}

#ifdef QLORA_WITH_CUDA
struct RopeSplitFunction : public torch::autograd::Function<RopeSplitFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& cos,
                               const at::Tensor& sin, int64_t nq, int64_t nk, int64_t d) {
    const at::Tensor c = cos.contiguous(), s = sin.contiguous();
    auto [q, k, v] = kernels::rope_split_fwd_cuda(qkv.contiguous(), c, s, nq, nk, d);
    ctx->save_for_backward({c, s});
    ctx->saved_data["q_sizes"] = q.sizes().vec();
    ctx->saved_data["kv_sizes"] = k.sizes().vec();
    return {q, k, v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    for (size_t i = 0; i < 3; ++i) {
      if (grad[i].defined()) {
        grad[i] = grad[i].contiguous();
      } else {  // an output nobody used (never the case in a Llama layer) contributes nothing
        grad[i] = at::zeros(ctx->saved_data[i == 0 ? "q_sizes" : "kv_sizes"].toIntVector(), saved[0].options());
      }
    }
    const at::Tensor dy = kernels::rope_split_bwd_cuda(grad[0], grad[1], grad[2], saved[0], saved[1]);
    return {dy, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct SwiGLUPackedFunction : public torch::autograd::Function<SwiGLUPackedFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gu) {
    const at::Tensor c = gu.contiguous();
    ctx->save_for_backward({c});
    return kernels::swiglu_packed_fwd_cuda(c);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {kernels::swiglu_packed_bwd_cuda(grad[0].contiguous(), ctx->get_saved_variables()[0])};
  }
};
#endif

}  // namespace

void set_fused_mode(FusedMode mode) { g_mode.store(mode); }
FusedMode fused_mode() { return g_mode.load(); }

at::Tensor fused_projections(const std::vector<const Linear*>& group, const at::Tensor& x) {
  if (group.empty() || !x.defined() || x.dim() < 1 || !applies(x)) return {};
  auto st = c10::make_intrusive<GroupState>();
  st->in = x.size(-1);
  std::vector<at::Tensor> lora;
  int next_lora = 0;
  for (const Linear* l : group) {
    const Quant4Linear* base = l ? l->frozen_4bit() : nullptr;
    if (!base || base->in_features() != st->in || base->compute_dtype() != x.scalar_type() ||
        base->quantized().device() != x.device())
      return {};
    GroupState::Member m;
    m.weight = base->quantized();
    m.out = base->out_features();
    m.offset = st->total;
    st->total += m.out;
    if (auto lr = l->low_rank()) {
      if (lr->a.device() != x.device() || lr->a.scalar_type() != at::kFloat || lr->b.scalar_type() != at::kFloat)
        return {};
      m.lora = next_lora++;
      m.scaling = lr->scaling;
      m.dropout = lr->dropout;
      lora.push_back(lr->a);
      lora.push_back(lr->b);
    }
    st->members.push_back(std::move(m));
  }
  // As a TensorList (not the vector) so that autograd sees the adapters as inputs.
  return ProjectionGroupFunction::apply(x, at::TensorList(lora), st);
}

at::Tensor project(Linear& l, const at::Tensor& x) {
  if (at::Tensor y = fused_projections({&l}, x); y.defined()) return y;
  return l.forward(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_split(const at::Tensor& qkv, const at::Tensor& cos,
                                                          const at::Tensor& sin, int64_t nq, int64_t nk, int64_t d) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(-1) == (nq + 2 * nk) * d, "rope_split: qkv must be [B, T, (nq + 2 nk) D]");
#ifdef QLORA_WITH_CUDA
  if (qkv.is_cuda() && cos.scalar_type() == qkv.scalar_type()) {
    auto out = RopeSplitFunction::apply(qkv, cos, sin, nq, nk, d);
    return {out[0], out[1], out[2]};
  }
#endif
  // The modules' composite ([B, n, T, D] layout), returned in [B, T, n, D].
  const at::Tensor heads = qkv.view({qkv.size(0), qkv.size(1), nq + 2 * nk, d});
  const Rope rope{cos, sin};
  auto rotated = [&](int64_t first, int64_t n) {
    return apply_rope(heads.narrow(2, first, n).transpose(1, 2), rope).transpose(1, 2).contiguous();
  };
  return {rotated(0, nq), rotated(nq, nk), heads.narrow(2, nq + nk, nk).contiguous()};
}

at::Tensor swiglu_packed(const at::Tensor& gu) {
  TORCH_CHECK(gu.dim() >= 1 && gu.size(-1) % 2 == 0, "swiglu_packed: the last dimension must be gate | up");
#ifdef QLORA_WITH_CUDA
  if (gu.is_cuda()) return SwiGLUPackedFunction::apply(gu);
#endif
  const int64_t i = gu.size(-1) / 2;
  return at::silu(gu.narrow(-1, 0, i)) * gu.narrow(-1, i, i);
}

}  // namespace qlora::model
