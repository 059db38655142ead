// The fused projection groups, RoPE split and packed SwiGLU; see fused.h for what and why.
#include "trainer/model/fused.h"

#include "trainer/model/llama.h"

#ifdef QLORA_WITH_CUDA
#include "kernels/ops.h"
#endif

#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

namespace qlora::model {

namespace {

std::atomic<FusedMode> g_mode{FusedMode::Auto};
thread_local bool t_keep_weights = false;  // KeepDequantizedWeights

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Everything about one call of a group that is not a tensor autograd tracks. Lives in the graph node
// (as a capsule), so the frozen weights it references stay valid until backward has run.
struct GroupState : torch::CustomClassHolder {
  struct Member {
    quant::Quantized4bit weight;  // frozen [out, in]
    int64_t out = 0, offset = 0;  // columns [offset, offset + out) of the packed output
    int lora = -1;                // index of its (A, B) pair in the tensor list, -1 if not adapted
    int64_t rank = 0, col = 0;    // its adapter's columns [col, col + rank) of the packed x A^T
    double scaling = 0.0, dropout = 0.0;
  };
  std::vector<Member> members;
  int64_t in = 0, total = 0;
  int64_t ranks = 0;         // the adapted members' ranks summed: the width of the packed x A^T
  bool any_dropout = false;  // then each adapted member reads its own dropped-out copy of x
  bool output_needed = true;  // false: forward computes only what backward reads (fused.h)
};

// The group's weights dequantized one under the other: [total, in] in `dtype`.
at::Tensor dequantize_group(const GroupState& s, at::ScalarType dtype, at::Device device) {
  at::Tensor w = at::empty({s.total, s.in}, at::TensorOptions().dtype(dtype).device(device));
  for (const auto& m : s.members) quant::dequantize_4bit_into(m.weight, w.narrow(0, m.offset, m.out));
  return w;
}

// The adapters of a group in the compute dtype, cast when they change instead of at every use: the casts
// were about 13 launches a layer and pass at the 7B shape (a cat and a cast of the A's, a cast of each B),
// now one for all groups per optimizer step, and none in a checkpointed layer's recomputation. An entry per
// group, keyed by its first A; it stays valid while every adapter is the same tensor (weak references, so a
// freed tensor's address cannot alias a new one) with the version counter it had when copied (an in-place
// update bumps it: the optimizer's, a checkpoint load's copy_).
class AdapterCasts {
 public:
  struct Group {
    at::Tensor a_cat;            // [ranks, in]: the A's one under the other
    std::vector<at::Tensor> bs;  // per adapter [out, r]
  };

  // lora = A0, B0, A1, B1, ... (float32); the result's tensors are views of one buffer in `dtype`.
  Group get(at::TensorList lora, at::ScalarType dtype) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entry(lora, dtype);
    if (stale(e, lora)) refresh_all();  // after an update every adapter moved: all groups at once
    return e.views;
  }

 private:
  using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    std::vector<WeakTensor> src;
    std::vector<int64_t> versions;  // of src when last copied (-1: never)
    std::vector<at::Tensor> dst;    // views of one buffer, shaped like src
    Group views;
  };

  static bool stale(const Entry& e, at::TensorList now) {
    for (size_t i = 0; i < now.size(); ++i)
      if (e.versions[i] != now[i]._version()) return true;
    return false;
  }

  // Every entry whose adapters moved, re-copied in one _foreach_copy_ (casting): a launch per group filled
  // too little of the GPU (~15 us each for a few hundred thousand elements).
  void refresh_all() {
    std::vector<at::Tensor> dst, src;
    std::vector<std::pair<Entry*, std::vector<at::Tensor>>> copied;
    for (auto& [key, e] : entries_) {
      std::vector<at::Tensor> now;
      for (const auto& w : e.src) now.emplace_back(w.lock());
      bool alive = true;
      for (const auto& t : now) alive = alive && t.defined();
      if (!alive || !stale(e, now)) continue;
      dst.insert(dst.end(), e.dst.begin(), e.dst.end());
      src.insert(src.end(), now.begin(), now.end());
      copied.emplace_back(&e, std::move(now));
    }
    at::NoGradGuard no_grad;
    at::_foreach_copy_(dst, src);
    for (auto& [e, now] : copied)
      for (size_t i = 0; i < now.size(); ++i) e->versions[i] = now[i]._version();
  }

  Entry& entry(at::TensorList lora, at::ScalarType dtype) {
    const std::pair<const c10::TensorImpl*, at::ScalarType> key{lora[0].unsafeGetTensorImpl(), dtype};
    auto it = entries_.find(key);
    if (it != entries_.end() && same_tensors(it->second, lora)) return it->second;
    // A new group (or one whose adapters were replaced): drop entries of freed adapters, then build.
    for (auto e = entries_.begin(); e != entries_.end();) e = e->second.src[0].expired() ? entries_.erase(e) : ++e;
    Entry e;
    int64_t total = 0;
    for (const auto& t : lora) total += t.numel();
    at::Tensor buffer = at::empty({total}, lora[0].options().dtype(dtype));
    // The A's first, one under the other (so that they form a_cat), then each B.
    int64_t offset = 0;
    e.dst.resize(lora.size());
    for (size_t pass = 0; pass < 2; ++pass) {
      for (size_t i = pass; i < lora.size(); i += 2) {
        e.dst[i] = buffer.narrow(0, offset, lora[i].numel()).view(lora[i].sizes());
        offset += lora[i].numel();
      }
    }
    int64_t ranks = 0;
    for (size_t i = 0; i < lora.size(); i += 2) ranks += lora[i].size(0);
    e.views.a_cat = buffer.narrow(0, 0, ranks * lora[0].size(1)).view({ranks, lora[0].size(1)});
    for (size_t i = 1; i < lora.size(); i += 2) e.views.bs.push_back(e.dst[i]);
    for (const auto& t : lora) {
      e.src.emplace_back(WeakTensor(t.getIntrusivePtr()));
      e.versions.push_back(-1);  // copied on first use
    }
    return entries_.insert_or_assign(key, std::move(e)).first->second;
  }

  static bool same_tensors(const Entry& e, at::TensorList lora) {
    if (e.src.size() != lora.size()) return false;
    for (size_t i = 0; i < lora.size(); ++i) {
      if (e.src[i].lock().get() != lora[i].unsafeGetTensorImpl()) return false;
    }
    return true;
  }

  struct KeyHash {
    size_t operator()(const std::pair<const c10::TensorImpl*, at::ScalarType>& k) const {
      return std::hash<const void*>()(k.first) ^ static_cast<size_t>(k.second);
    }
  };
  std::mutex mutex_;
  std::unordered_map<std::pair<const c10::TensorImpl*, at::ScalarType>, Entry, KeyHash> entries_;
};

AdapterCasts& adapter_casts() {
  static AdapterCasts casts;
  return casts;
}

// a @ b with a float32 result (the adapters' gradients): cuBLAS accumulates in float32 and writes it
// without a round trip through the compute dtype; elsewhere the product is cast.
at::Tensor mm_float(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cuda() && a.scalar_type() != at::kFloat) return at::mm(a, b, at::kFloat);
  return at::mm(a, b).to(at::kFloat);
}

// out = alpha * a @ b, written without reading out (beta 0): into a column block of a wider matrix, whose
// row stride the GEMM takes as its leading dimension.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::addmm_out(out, out, a, b, /*beta=*/0.0, alpha);
}

// The LoRA branches ride on the base GEMM instead of costing passes over the activations of their own:
//   forward   xa = x [A_0; A_1; ...]^T  one GEMM for the group (x read once), [n, ranks];
//             y_i = s_i xa_i B_i^T      written into y's columns (write only, no read-modify-write);
//             y += x W^T                the base GEMM accumulates onto them (beta 1, free in its epilogue);
//   backward  dxa_i = s_i dy_i B_i, dB_i = s_i dy_i^T xa_i, dA = dxa^T x (one GEMM, x read once),
//             dx = dxa [A_0; A_1; ...]  then dx += dy W (beta 1 again).
// With dropout each adapted member reads its own masked copy of x: its x A_i^T, dA_i and input gradient
// are then computed per member (the masks are drawn in the modules' order, so the same seed gives the same
// step as the per-projection path).
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
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    // Backward dequantizes the weights again, unless a recomputation asked to keep them.
    const bool compute_y = st->output_needed;
    at::Tensor w, kept;
    if (compute_y) {
      w = dequantize_group(*st, dt, x.device());
      if (t_keep_weights) kept = w;
    }
    if (st->ranks == 0) {  // no adapter: backward needs only the weights
      if (compute_y) at::mm_out(y2, x2, w.t());
      ctx->save_for_backward({kept});
      return y;
    }
    const AdapterCasts::Group cast = adapter_casts().get(lora, dt);
    const at::Tensor& a_cat = cast.a_cat;  // [ranks, in]
    at::Tensor xa = at::empty({n, st->ranks}, x.options());
    if (!st->any_dropout) at::mm_out(xa, x2, a_cat.t());
    variable_list saved{kept, x2, xa, a_cat};
    for (const auto& m : st->members) {
      at::Tensor ym = y2.narrow(1, m.offset, m.out);
      if (m.lora < 0) {
        if (compute_y) ym.zero_();  // the base GEMM below accumulates onto y
        continue;
      }
      at::Tensor xam = xa.narrow(1, m.col, m.rank), mask;
      if (st->any_dropout) {
        at::Tensor h = x2;
        if (m.dropout > 0.0) std::tie(h, mask) = at::native_dropout(x2, m.dropout, /*train=*/true);
        mm_into(xam, h, a_cat.narrow(0, m.col, m.rank).t(), 1.0);
      }
      const at::Tensor& b = cast.bs[m.lora];  // [out, r]
      if (compute_y) mm_into(ym, xam, b.t(), m.scaling);
      saved.insert(saved.end(), {b, mask});
    }
    if (compute_y) y2.addmm_(x2, w.t());
    ctx->save_for_backward(saved);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto st = c10::static_intrusive_pointer_cast<GroupState>(ctx->saved_data["state"].toCapsule());
    // The kept weights (or none), then with adapters x2, xa, a_cat and (B, mask) per adapted member, in
    // the order of their lora index: member m's B is saved[4 + 2 m.lora], its mask the one after.
    const auto saved = ctx->get_saved_variables();
    const at::Tensor dy = grad[0].reshape({-1, st->total}).contiguous();  // [n, total]
    const int64_t n = dy.size(0);
    const bool need_dx = ctx->needs_input_grad(0);
    int64_t lora_count = 0;
    for (const auto& m : st->members) lora_count += m.lora >= 0;
    variable_list grads(1 + 2 * lora_count + 1);  // x, each A and B, and the (non-tensor) state
    at::Tensor dx;
    if (st->ranks > 0) {
      const at::Tensor &x2 = saved[1], &xa = saved[2], &a_cat = saved[3];
      at::Tensor dxa = at::empty({n, st->ranks}, dy.options());  // gradient of xa
      bool need_da = false;
      for (const auto& m : st->members) {
        if (m.lora < 0) continue;
        const at::Tensor& b = saved[4 + 2 * m.lora];
        const at::Tensor dym = dy.narrow(1, m.offset, m.out), xam = xa.narrow(1, m.col, m.rank);
        mm_into(dxa.narrow(1, m.col, m.rank), dym, b, m.scaling);
        if (ctx->needs_input_grad(2 + 2 * m.lora)) grads[2 + 2 * m.lora] = mm_float(dym.t(), xam).mul_(m.scaling);
        need_da = need_da || ctx->needs_input_grad(1 + 2 * m.lora);
      }
      if (!st->any_dropout) {
        if (need_da) {
          const at::Tensor da = mm_float(dxa.t(), x2);  // [ranks, in]
          for (const auto& m : st->members)
            if (m.lora >= 0 && ctx->needs_input_grad(1 + 2 * m.lora)) grads[1 + 2 * m.lora] = da.narrow(0, m.col, m.rank);
        }
        if (need_dx) dx = at::mm(dxa, a_cat);  // [n, in]; the base GEMM below adds onto it
      } else {
        if (need_dx) dx = at::zeros({n, st->in}, dy.options());
        for (const auto& m : st->members) {
          if (m.lora < 0) continue;
          const at::Tensor& mask = saved[5 + 2 * m.lora];
          const double keep_scale = m.dropout > 0.0 ? 1.0 / (1.0 - m.dropout) : 1.0;
          const at::Tensor dxam = dxa.narrow(1, m.col, m.rank), am = a_cat.narrow(0, m.col, m.rank);
          if (ctx->needs_input_grad(1 + 2 * m.lora)) {
            const at::Tensor h = mask.defined() ? at::native_dropout_backward(x2, mask, keep_scale) : x2;
            grads[1 + 2 * m.lora] = mm_float(dxam.t(), h);  // [r, in]
          }
          if (!need_dx) continue;
          if (mask.defined()) dx.add_(at::native_dropout_backward(at::mm(dxam, am), mask, keep_scale));
          else dx.addmm_(dxam, am);
        }
      }
    }
    if (need_dx) {
      const at::Tensor w = saved[0].defined() ? saved[0] : dequantize_group(*st, dy.scalar_type(), dy.device());
      if (dx.defined()) dx.addmm_(dy, w);
      else dx = at::mm(dy, w);
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

KeepDequantizedWeights::KeepDequantizedWeights() : previous_(t_keep_weights) { t_keep_weights = true; }
KeepDequantizedWeights::~KeepDequantizedWeights() { t_keep_weights = previous_; }

void set_fused_mode(FusedMode mode) { g_mode.store(mode); }
FusedMode fused_mode() { return g_mode.load(); }

at::Tensor fused_projections(const std::vector<const Linear*>& group, const at::Tensor& x, bool output_needed) {
  if (group.empty() || !x.defined() || x.dim() < 1 || !applies(x)) return {};
  auto st = c10::make_intrusive<GroupState>();
  st->in = x.size(-1);
  st->output_needed = output_needed;
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
      m.rank = lr->a.size(0);
      m.col = st->ranks;
      st->ranks += m.rank;
      m.scaling = lr->scaling;
      m.dropout = lr->dropout;
      st->any_dropout = st->any_dropout || m.dropout > 0.0;
      lora.push_back(lr->a);
      lora.push_back(lr->b);
    }
    st->members.push_back(std::move(m));
  }
  // As a TensorList (not the vector) so that autograd sees the adapters as inputs.
  return ProjectionGroupFunction::apply(x, at::TensorList(lora), st);
}

at::Tensor project(Linear& l, const at::Tensor& x, bool output_needed) {
  if (at::Tensor y = fused_projections({&l}, x, output_needed); y.defined()) return y;
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
