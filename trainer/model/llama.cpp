#include "trainer/model/llama.h"

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "kernels/ops.h"
#endif

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>

#include <ATen/SDPBackend.h>

#include <atomic>
#include <cmath>
#include <optional>

#include "trainer/core/error.h"
#include "trainer/model/fused.h"

namespace qlora::model {

// ---------------------------------------------------------------------------------------------------
// RoPE: HF's initialisation per rope type, in float32 (transformers.modeling_rope_utils).

at::Tensor rope_inv_freq(const LlamaArch& arch, int64_t seq_len, at::Device device) {
  const auto& r = arch.rope;
  const int64_t dim = arch.head_dim;
  auto exponents = at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong).device(device)).to(at::kFloat) / dim;
  at::Tensor inv_freq;
  if (r.type == RopeType::Dynamic) {
    // NTK-aware scaling for sequences longer than max_position_embeddings. HF computes the new base
    // as a float32 tensor (its seq_len is a tensor there); do the same so the tables match bit for bit.
    auto opts = at::TensorOptions().dtype(at::kLong).device(device);
    at::Tensor s = at::maximum(at::scalar_tensor(seq_len, opts), at::scalar_tensor(arch.max_position_embeddings, opts));
    at::Tensor base = r.theta * at::pow((r.factor * s / arch.max_position_embeddings) - (r.factor - 1),
                                        static_cast<double>(dim) / (dim - 2));
    inv_freq = 1.0 / at::pow(base, exponents);
  } else {
    inv_freq = 1.0 / at::pow(r.theta, exponents);
  }
  if (r.type == RopeType::Linear) {
    inv_freq = inv_freq / r.factor;
  } else if (r.type == RopeType::Llama3) {
    double old_ctx = static_cast<double>(r.original_max_position_embeddings);
    double low_wavelen = old_ctx / r.low_freq_factor;
    double high_wavelen = old_ctx / r.high_freq_factor;
    at::Tensor wavelen = 2 * M_PI / inv_freq;
    at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq);
    at::Tensor smooth = (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    at::Tensor smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
    at::Tensor medium = at::logical_not(wavelen < high_wavelen) * at::logical_not(wavelen > low_wavelen);
    inv_freq = at::where(medium, smoothed, scaled);
  }
  return inv_freq;
}

namespace {
// cos/sin [B, T, D] of position_ids [B, T] for inv_freq [D/2], as HF computes them.
Rope rope_of(const at::Tensor& inv_freq, const at::Tensor& position_ids, at::ScalarType dtype) {
  const int64_t b = position_ids.size(0);
  // HF: (inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)
  at::Tensor inv = inv_freq.view({1, -1, 1}).expand({b, -1, 1});
  at::Tensor pos = position_ids.unsqueeze(1).to(at::kFloat);
  at::Tensor freqs = at::matmul(inv, pos).transpose(1, 2);  // [B, T, D/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);              // [B, T, D]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}
}  // namespace

Rope rope_tables(const LlamaArch& arch, const at::Tensor& position_ids, at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  int64_t seq_len = arch.rope.type == RopeType::Dynamic ? position_ids.max().item<int64_t>() + 1 : 0;
  return rope_of(rope_inv_freq(arch, seq_len, position_ids.device()), position_ids, dtype);
}

namespace {

at::Tensor rotate_half(const at::Tensor& x) {
  int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

}  // namespace

at::Tensor apply_rope(const at::Tensor& x, const Rope& rope) {
  at::Tensor c = rope.cos.unsqueeze(1), s = rope.sin.unsqueeze(1);
  return x * c + rotate_half(x) * s;
}

namespace {

// [B, nkv, S, D] -> [B, nkv * rep, S, D]; head h reads kv head h / rep (HF's repeat_kv).
at::Tensor repeat_kv(const at::Tensor& x, int64_t rep) {
  if (rep == 1) return x;
  auto sz = x.sizes();
  return x.unsqueeze(2).expand({sz[0], sz[1], rep, sz[2], sz[3]}).reshape({sz[0], sz[1] * rep, sz[2], sz[3]});
}

}  // namespace

// ---------------------------------------------------------------------------------------------------

RMSNormImpl::RMSNormImpl(at::Tensor w, double eps_, bool trainable) : eps(eps_) {
  weight = register_parameter("weight", std::move(w), trainable);
}

#ifdef QLORA_WITH_CUDA
namespace {
// The backward the three norm functions below share. From the saved (x, w, rstd), the gradient of the
// norm's output dy and that of a residual use of x, dres (either may be undefined): x's gradient, the norm's
// plus dres summed in the backward kernel (bit for bit autograd's sum of the two), and for method full w's,
// the sum over rows of dy * normed (normed rounded to T) from the saved rstd.
struct NormGrads {
  at::Tensor dx, dw;
};
NormGrads norm_backward(const torch::autograd::variable_list& saved, const at::Tensor& dres, const at::Tensor& dy,
                        bool need_dx, bool need_dw) {
  const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
  const at::Tensor dr = dres.defined() ? dres.contiguous() : at::Tensor();
  if (!dy.defined()) return {dr, at::Tensor()};
  const at::Tensor g = dy.contiguous();
  NormGrads out;
  if (need_dx) out.dx = kernels::rmsnorm_bwd_cuda(g, x, w.contiguous(), rstd, dr);
  if (need_dw) {
    const int64_t h = x.size(-1);
    at::Tensor normed = (x.reshape({-1, h}).to(at::kFloat) * rstd.unsqueeze(1)).to(x.scalar_type());
    out.dw = (g.reshape({-1, h}).to(at::kFloat) * normed.to(at::kFloat)).sum(0).to(w.scalar_type());
  }
  return out;
}

// The fused RMSNorm kernels (kernels/rmsnorm.cu) as an autograd function: the same math as the composite
// below, one launch each way. Saves x and the per-row rstd.
struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps, int64_t spare) {
    at::Tensor xc = x.contiguous();
    auto [y, rstd] = kernels::rmsnorm_fwd_cuda(xc, w.contiguous(), eps, spare);
    ctx->save_for_backward({xc, w, rstd});
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    auto [dx, dw] = norm_backward(ctx->get_saved_variables(), at::Tensor(), grad[0], ctx->needs_input_grad(0),
                                  ctx->needs_input_grad(1));
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

// s = a + b and y = RMSNorm(s) in one kernel (kernels/rmsnorm.cu), the gradient of s from both of its uses
// (the residual stream, ds, and the norm) summed in the norm's backward kernel: bit for bit the add, the
// norm and autograd's sum of the two gradients (norm_backward). Saves s and the per-row rstd.
struct AddRMSNormFunction : public torch::autograd::Function<AddRMSNormFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a,
                                                const at::Tensor& b, const at::Tensor& w, double eps, int64_t spare) {
    auto [s, y, rstd] = kernels::add_rmsnorm_fwd_cuda(a.contiguous(), b.contiguous(), w.contiguous(), eps, spare);
    ctx->save_for_backward({s, w, rstd});
    return {s, y};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    auto [d, dw] = norm_backward(ctx->get_saved_variables(), grad[0], grad[1], true, ctx->needs_input_grad(2));
    return {d, d, dw, at::Tensor(), at::Tensor()};
  }
};

// (r, RMSNorm(x)) where r stands for x in a residual sum whose value was kept (GradientOnlyAdd in a
// recomputation): r's values are unspecified, and the gradient reaching x through it is summed in the
// norm's backward kernel (norm_backward).
struct ResidualRMSNormFunction : public torch::autograd::Function<ResidualRMSNormFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& w, double eps, int64_t spare) {
    const at::Tensor xc = x.contiguous();
    auto [y, rstd] = kernels::rmsnorm_fwd_cuda(xc, w.contiguous(), eps, spare);
    ctx->save_for_backward({xc, w, rstd});
    return {at::empty_like(xc), y};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    auto [d, dw] = norm_backward(ctx->get_saved_variables(), grad[0], grad[1], true, ctx->needs_input_grad(1));
    return {d, dw, at::Tensor(), at::Tensor()};
  }
};
}  // namespace
#endif

at::Tensor RMSNormImpl::forward(const at::Tensor& x, int64_t spare) {
#ifdef QLORA_WITH_CUDA
  if (x.is_cuda() && weight.scalar_type() == x.scalar_type()) return RMSNormFunction::apply(x, weight, eps, spare);
#endif
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return with_spare_columns(weight * h.to(x.scalar_type()), spare);
}

std::pair<at::Tensor, at::Tensor> RMSNormImpl::add_forward(const at::Tensor& a, const at::Tensor& b, int64_t spare) {
#ifdef QLORA_WITH_CUDA
  if (a.is_cuda() && weight.scalar_type() == a.scalar_type() && b.sizes() == a.sizes() &&
      b.scalar_type() == a.scalar_type()) {
    auto out = AddRMSNormFunction::apply(a, b, weight, eps, spare);
    return {out[0], out[1]};
  }
#endif
  at::Tensor s = a + b;
  return {s, forward(s, spare)};
}

std::pair<at::Tensor, at::Tensor> RMSNormImpl::residual_forward(const at::Tensor& x, int64_t spare) {
#ifdef QLORA_WITH_CUDA
  if (x.is_cuda() && weight.scalar_type() == x.scalar_type()) {
    auto out = ResidualRMSNormFunction::apply(x, weight, eps, spare);
    return {out[0], out[1]};
  }
#endif
  return {x, forward(x, spare)};
}

AttentionImpl::AttentionImpl(const LlamaArch& arch, std::shared_ptr<Linear> q, std::shared_ptr<Linear> k,
                             std::shared_ptr<Linear> v, std::shared_ptr<Linear> o)
    : num_heads(arch.num_heads), num_kv_heads(arch.num_kv_heads), head_dim(arch.head_dim) {
  q_proj = register_module("q_proj", std::move(q));
  k_proj = register_module("k_proj", std::move(k));
  v_proj = register_module("v_proj", std::move(v));
  o_proj = register_module("o_proj", std::move(o));
}

int64_t AttentionImpl::input_spare(const at::Tensor& like) const {
  return adapter_columns({q_proj.get(), k_proj.get(), v_proj.get()}, like);
}

// ---------------------------------------------------------------------------------------------------
// Attention kept from a checkpointed forward (selective mode): the attention's output and log-sum-exp, so
// that the recomputation runs only the attention's backward, not its forward again (~0.1 ms a layer at the
// 7B shape and 2048 tokens, ~2% of a checkpointed step) for 8 KB a token a layer at hidden 4096. Where SDPA
// itself would run cuDNN's flash attention on the plain causal attention (the H100's choice), and where
// packed or padded rows attend by segments through flash attention's variable-length kernels; their
// forward and backward are called here as autograd would call them. Elsewhere the recomputation runs SDPA
// again.

namespace {

std::atomic<bool> g_keep_attention{true};
std::atomic<bool> g_grouped_attention{true};
std::atomic<int64_t> g_grouped_attention_uses{0};
std::atomic<int64_t> g_kept_attention_uses{0};

// One layer's kept attention: the outputs of at::_scaled_dot_product_cudnn_attention, or of
// at::_flash_attention_forward by segments (rng_state and unused in philox_seed and philox_offset), that its
// backward reads.
struct KeptAttention : torch::CustomClassHolder {
  at::Tensor out, lse, cum_q, cum_k, philox_seed, philox_offset;
  int64_t max_q = 0, max_k = 0;
  bool by_segments = false;
  void clear() { out = lse = cum_q = cum_k = philox_seed = philox_offset = at::Tensor(); }
};

// Set while a checkpointed forward runs the attention branch (fill it) or while its recomputation does
// (take from it); one attention call a layer.
thread_local KeptAttention* t_attention_to_keep = nullptr;
thread_local KeptAttention* t_attention_kept = nullptr;

#ifdef QLORA_WITH_CUDA
// Whether SDPA would run plain causal attention (no mask, no dropout) on cuDNN for these inputs; k and v may be
// grouped (fewer heads than q, each serving q.size(1) / k.size(1) query heads: SDPA's enable_gqa).
bool cudnn_causal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  return q.is_cuda() && at::_fused_sdp_choice(q, k, v, {}, 0.0, /*is_causal=*/true, scale,
                                              /*enable_gqa=*/q.size(1) != k.size(1)) ==
                            static_cast<int64_t>(at::SDPBackend::cudnn_attention);
}

// The checkpointed forward's attention, in training mode (the log-sum-exp computed) as SDPA runs it with
// autograd on.
at::Tensor keep_cudnn_causal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                             KeptAttention& kept) {
  auto [out, lse, cum_q, cum_k, max_q, max_k, seed, offset, debug] = at::_scaled_dot_product_cudnn_attention(
      q, k, v, {}, /*compute_log_sumexp=*/true, 0.0, /*is_causal=*/true, /*return_debug_mask=*/false, scale);
  kept.out = out, kept.lse = lse, kept.cum_q = cum_q, kept.cum_k = cum_k;
  kept.max_q = max_q.expect_int(), kept.max_k = max_k.expect_int();
  kept.philox_seed = seed, kept.philox_offset = offset;
  return out;
}

// The recomputation's attention node: the kept output as its value, and as its gradient the backward autograd
// would call for the forward that made it (cuDNN's for SDPA's plain causal attention, flash attention's
// variable-length one by segments). q, k, v are the recomputed ones: the same bits as the forward's (the same
// kernels on the same inputs), so the kept output and log-sum-exp belong to them.
struct KeptAttentionNode : public torch::autograd::Function<KeptAttentionNode> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, KeptAttention* kept) {
    TORCH_INTERNAL_ASSERT(kept->out.defined() && (kept->by_segments ? kept->out.sizes() == q.sizes()
                                                                    : kept->out.size(2) == q.size(2)),
                          "kept attention of another shape");
    at::Tensor out = std::move(kept->out);
    ctx->save_for_backward({q, k, v, out, kept->lse, kept->cum_q, kept->cum_k, kept->philox_seed, kept->philox_offset});
    ctx->saved_data["max_q"] = kept->max_q;
    ctx->saved_data["max_k"] = kept->max_k;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["by_segments"] = kept->by_segments;
    kept->clear();  // the node holds them now, and frees them after its backward
    g_kept_attention_uses.fetch_add(1, std::memory_order_relaxed);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const auto s = ctx->get_saved_variables();  // q, k, v, out, lse, cum_q, cum_k, seed / rng, offset / unused
    const int64_t max_q = ctx->saved_data["max_q"].toInt(), max_k = ctx->saved_data["max_k"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    auto [dq, dk, dv] = ctx->saved_data["by_segments"].toBool()
                            ? at::_flash_attention_backward(grad[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], max_q,
                                                            max_k, 0.0, /*is_causal=*/true, s[7], s[8], scale)
                            : at::_scaled_dot_product_cudnn_attention_backward(
                                  grad[0], s[0], s[1], s[2], s[3], s[4], s[7], s[8], /*attn_bias=*/at::Tensor(), s[5],
                                  s[6], max_q, max_k, 0.0, /*is_causal=*/true, scale);
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};
#endif

// Plain causal attention (no mask, no past, more than one token): kept or taken when a checkpointed layer
// asks for it and cuDNN runs it, else SDPA. k and v [B, nkv, S, D] may be grouped (nkv < n, see cudnn_causal).
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
#ifdef QLORA_WITH_CUDA
  if (t_attention_kept && t_attention_kept->out.defined() && !t_attention_kept->by_segments) {
    return KeptAttentionNode::apply(q, k, v, scale, t_attention_kept);
  }
  if (t_attention_to_keep && g_keep_attention.load() && cudnn_causal(q, k, v, scale)) {
    return keep_cudnn_causal(q, k, v, scale, *t_attention_to_keep);
  }
#endif
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, scale,
                                         /*enable_gqa=*/q.size(1) != k.size(1));
}

// Causal attention within each segment of q, k, v [N, heads, D] (the tokens of every row end to end; the
// segment i spans offsets[i] .. offsets[i + 1], none longer than `longest`) through flash attention's
// variable-length kernels: kept or taken when a checkpointed layer asks for it, as causal_attention.
at::Tensor segment_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& offsets,
                             int64_t longest, double scale) {
  const auto flash = [&] {
    return at::_flash_attention_forward(q, k, v, offsets, offsets, longest, longest, 0.0, /*is_causal=*/true,
                                        /*return_debug_mask=*/false, scale);
  };
#ifdef QLORA_WITH_CUDA
  if (t_attention_kept && t_attention_kept->out.defined() && t_attention_kept->by_segments) {
    return KeptAttentionNode::apply(q, k, v, scale, t_attention_kept);
  }
  if (t_attention_to_keep && g_keep_attention.load()) {
    auto [out, lse, rng_state, unused, debug] = flash();
    KeptAttention& kept = *t_attention_to_keep;
    kept.out = out, kept.lse = lse, kept.cum_q = kept.cum_k = offsets, kept.max_q = kept.max_k = longest;
    kept.philox_seed = rng_state, kept.philox_offset = unused, kept.by_segments = true;
    return out;
  }
#endif
  return std::get<0>(flash());
}

// Sets a thread-local slot for its lifetime.
class SlotGuard {
 public:
  SlotGuard(KeptAttention*& slot, KeptAttention* value) : slot_(slot), previous_(slot) { slot_ = value; }
  ~SlotGuard() { slot_ = previous_; }
  SlotGuard(const SlotGuard&) = delete;
  SlotGuard& operator=(const SlotGuard&) = delete;

 private:
  KeptAttention*& slot_;
  KeptAttention* previous_;
};

}  // namespace

void set_keep_attention(bool on) { g_keep_attention.store(on); }
void set_grouped_attention(bool on) { g_grouped_attention.store(on); }
int64_t grouped_attention_uses() { return g_grouped_attention_uses.load(std::memory_order_relaxed); }
int64_t kept_attention_uses() { return g_kept_attention_uses.load(std::memory_order_relaxed); }

at::Tensor AttentionImpl::forward(const at::Tensor& x, const Rope& rope, const AttentionMask& mask, at::Tensor* cache_k,
                                  at::Tensor* cache_v, bool output_needed, int64_t spare) {
  const int64_t b = x.size(0), t = x.size(1);
  at::Tensor q, k, v;  // [B, n, T, D]
  if (at::Tensor qkv = fused_projections({q_proj.get(), k_proj.get(), v_proj.get()}, x, true, spare);
      qkv.defined()) {
    std::tie(q, k, v) = rope_split(qkv, rope.cos, rope.sin, num_heads, num_kv_heads, head_dim);  // [B, T, n, D]
    q = q.transpose(1, 2), k = k.transpose(1, 2), v = v.transpose(1, 2);
  } else {
    q = apply_rope(q_proj->forward(x).view({b, t, num_heads, head_dim}).transpose(1, 2), rope);
    k = apply_rope(k_proj->forward(x).view({b, t, num_kv_heads, head_dim}).transpose(1, 2), rope);
    v = v_proj->forward(x).view({b, t, num_kv_heads, head_dim}).transpose(1, 2);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  at::Tensor out;  // [B, T, n D]
  if (mask.offsets.defined()) {
    TORCH_CHECK(!cache_k, "attention by segments takes no cache");
    // Every segment causal within itself, the tokens as one sequence [B T, n, D] (the fused path's q, k, v
    // are [B, T, n, D] underneath: these are views), grouped k and v as they are (flash attention maps the
    // query heads onto them). Flash attention's backward runs through autograd, or through the kept node when a
    // selective recomputation took the forward's output (segment_attention).
    const auto tokens = [&](const at::Tensor& y) { return y.transpose(1, 2).reshape({b * t, y.size(1), head_dim}); };
    out = segment_attention(tokens(q), tokens(k), tokens(v), mask.offsets, mask.longest, scale);
    return project(*o_proj, out.view({b, t, num_heads * head_dim}), output_needed);
  }
  if (cache_k) {
    if (cache_k->defined()) {
      k = at::cat({*cache_k, k}, 2);
      v = at::cat({*cache_v, v}, 2);
    }
    *cache_k = k;
    *cache_v = v;
  }
  const int64_t rep = num_heads / num_kv_heads;
  // Grouped k and v (Llama 3: 8 for 32 query heads) go to cuDNN as they are, which maps the query heads onto
  // them: no copy of k and v for every query head each way, nor those copies kept for the backward (~1 GB at
  // the Llama-3-8B shape and 2048 tokens without checkpointing). Elsewhere (CPU, a mask) as HF's repeat_kv.
  bool grouped = false;
#ifdef QLORA_WITH_CUDA
  grouped = rep > 1 && !mask.dense.defined() && t > 1 && g_grouped_attention.load() && cudnn_causal(q, k, v, scale);
#endif
  if (grouped) {
    g_grouped_attention_uses.fetch_add(1, std::memory_order_relaxed);
  } else {
    k = repeat_kv(k, rep);
    v = repeat_kv(v, rep);
  }
  if (mask.dense.defined()) {
    out = at::scaled_dot_product_attention(q, k, v, mask.dense, 0.0, /*is_causal=*/false, scale);
  } else {
    // No padding and no past: plain causal, which lets SDPA pick flash attention on the GPU.
    out = t > 1 ? causal_attention(q, k, v, scale) : at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale);
  }
  out = out.transpose(1, 2).reshape({b, t, num_heads * head_dim});
  return project(*o_proj, out, output_needed);
}

MLPImpl::MLPImpl(std::shared_ptr<Linear> gate, std::shared_ptr<Linear> up, std::shared_ptr<Linear> down) {
  gate_proj = register_module("gate_proj", std::move(gate));
  up_proj = register_module("up_proj", std::move(up));
  down_proj = register_module("down_proj", std::move(down));
}

#ifdef QLORA_WITH_CUDA
namespace {
// silu(g) * u through the fused kernels (kernels/swiglu.cu): bit-identical to the composite below.
struct SwiGLUFunction : public torch::autograd::Function<SwiGLUFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& g, const at::Tensor& u) {
    at::Tensor gc = g.contiguous(), uc = u.contiguous();
    ctx->save_for_backward({gc, uc});
    return kernels::swiglu_fwd_cuda(gc, uc);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    auto [dg, du] = kernels::swiglu_bwd_cuda(grad[0].contiguous(), saved[0], saved[1]);
    return {dg, du};
  }
};
}  // namespace
#endif

int64_t MLPImpl::input_spare(const at::Tensor& like) const {
  return adapter_columns({gate_proj.get(), up_proj.get()}, like);
}

at::Tensor MLPImpl::forward(const at::Tensor& x, bool output_needed, int64_t spare) {
  if (at::Tensor gu = fused_projections({gate_proj.get(), up_proj.get()}, x, true, spare); gu.defined()) {
    // down's x A^T folds only where its output is computed.
    const int64_t down_spare = output_needed ? adapter_columns({down_proj.get()}, gu) : 0;
    return project(*down_proj, swiglu_packed(gu, down_spare), output_needed, down_spare);
  }
  at::Tensor g = gate_proj->forward(x), u = up_proj->forward(x);
#ifdef QLORA_WITH_CUDA
  if (g.is_cuda() && g.scalar_type() == u.scalar_type()) return down_proj->forward(SwiGLUFunction::apply(g, u));
#endif
  return down_proj->forward(at::silu(g) * u);
}

namespace {
// a + b for autograd only: the backward of an add, the forward's values unspecified (not computed). For a
// recomputation whose sum was kept from the forward.
struct GradientOnlyAdd : public torch::autograd::Function<GradientOnlyAdd> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& a, const at::Tensor& b) {
    return at::empty_like(a);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grad) {
    return {grad[0], grad[0]};
  }
};
}  // namespace

DecoderLayerImpl::DecoderLayerImpl(Attention attn, MLP mlp_, RMSNorm input_norm, RMSNorm post_norm)
    : self_attn(register_module("self_attn", std::move(attn))),
      mlp(register_module("mlp", std::move(mlp_))),
      input_layernorm(register_module("input_layernorm", std::move(input_norm))),
      post_attention_layernorm(register_module("post_attention_layernorm", std::move(post_norm))) {}

at::Tensor DecoderLayerImpl::forward(const at::Tensor& x, const Rope& rope, const AttentionMask& mask,
                                     at::Tensor* cache_k, at::Tensor* cache_v) {
  auto [h, m] = forward_pending(x, at::Tensor(), rope, mask, cache_k, cache_v);
  return h + m;
}

std::pair<at::Tensor, at::Tensor> DecoderLayerImpl::forward_pending(const at::Tensor& x_in, const at::Tensor& pending,
                                                                    const Rope& rope, const AttentionMask& mask,
                                                                    at::Tensor* cache_k, at::Tensor* cache_v) {
  // Each residual add fused into the norm that reads its sum: x = x_in + pending into the input norm,
  // h = x + attention_branch(x) into the MLP's.
  const int64_t spare_qkv = self_attn->input_spare(x_in);
  at::Tensor x = x_in, normed;
  if (pending.defined()) std::tie(x, normed) = input_layernorm->add_forward(x_in, pending, spare_qkv);
  else normed = input_layernorm->forward(x_in, spare_qkv);
  const at::Tensor a = self_attn->forward(normed, rope, mask, cache_k, cache_v, true, spare_qkv);
  const int64_t spare_mlp = mlp->input_spare(x);
  auto [h, normed_h] = post_attention_layernorm->add_forward(x, a, spare_mlp);
  return {h, mlp->forward(normed_h, true, spare_mlp)};
}

at::Tensor DecoderLayerImpl::attention_branch(const at::Tensor& x, const Rope& rope, const AttentionMask& mask,
                                              at::Tensor* cache_k, at::Tensor* cache_v) {
  const int64_t spare = self_attn->input_spare(x);
  return self_attn->forward(input_layernorm->forward(x, spare), rope, mask, cache_k, cache_v, true, spare);
}

at::Tensor DecoderLayerImpl::attention_gradient_path(const at::Tensor& x, const Rope& rope, const AttentionMask& mask) {
  const int64_t spare = self_attn->input_spare(x);
  auto [r, normed] = input_layernorm->residual_forward(x, spare);
  return GradientOnlyAdd::apply(r, self_attn->forward(normed, rope, mask, nullptr, nullptr, false, spare));
}

at::Tensor DecoderLayerImpl::mlp_gradient_path(const at::Tensor& h) {
  const int64_t spare = mlp->input_spare(h);
  auto [r, normed] = post_attention_layernorm->residual_forward(h, spare);
  return GradientOnlyAdd::apply(r, mlp->forward(normed, false, spare));
}

// ---------------------------------------------------------------------------------------------------
// Gradient checkpointing: the layer runs without autograd in forward and is recomputed in backward.
// Parameter gradients accumulate through the nested backward (PyTorch's reentrant checkpoint design),
// so the Function itself returns only the input gradient. The RNG state of the layer's device is
// replayed so dropout draws the same masks in the recomputation.
//
// Selective mode keeps the mid-layer residual h = x + attention_branch(x) as well, and the attention's output where
// cuDNN or flash attention by segments computes it (causal_attention, segment_attention), and recomputes the two
// branches one after the other, MLP first: each branch's last projection (o_proj, down_proj) is then needed for its
// gradient only, so its GEMMs are skipped (output_needed = false), and only one branch's activations live at a time.
// Each branch replays the RNG state its forward started from. The residual adds stay in the recomputed graph as
// GradientOnlyAdd, so every gradient is accumulated in the order of the graph without checkpointing (the same bits on
// the CPU, where RMSNorm's composite reads its input three times; on the GPU the residual's gradient is summed in the
// norm's backward kernel, as the fused add + norm of the forward does).

namespace {

// The mask travels inside a struct: a bare at::Tensor argument would count as an autograd input, and an
// undefined one (plain causal attention) is rejected as such.
struct MaskArg {
  AttentionMask mask;
};

// Whether the layer draws random numbers in training: LoRA dropout on one of its projections.
bool draws_random(const DecoderLayerImpl& layer) {
  const auto& a = *layer.self_attn;
  const auto& m = *layer.mlp;
  for (const auto* l : {&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj}) {
    const auto lr = (*l)->low_rank();
    if (lr && lr->dropout > 0.0) return true;
  }
  return false;
}

// The RNG state of x's device, to be replayed by the recomputation; none while a CUDA graph is being captured,
// where the generator's state cannot be read or set (a graph replays the offsets it captured instead). A layer
// that draws random numbers cannot be captured then: its recomputation would draw other masks.
at::Tensor rng_state(const at::Tensor& x, const DecoderLayerImpl& layer) {
#ifdef QLORA_WITH_CUDA
  if (x.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    QLORA_REQUIRE(!draws_random(layer), "a checkpointed layer with LoRA dropout cannot be captured in a CUDA graph "
                  "(its recomputation replays the generator's state): set lora.dropout to 0 or turn off checkpointing");
    return {};
  }
#else
  (void)layer;
#endif
  return at::globalContext().defaultGenerator(x.device()).get_state();
}

void set_rng_state(const at::Tensor& x, const c10::IValue& state) {
  if (!state.isTensor() || !state.toTensor().defined()) return;  // none taken (rng_state)
  at::Generator gen = at::globalContext().defaultGenerator(x.device());
  gen.set_state(state.toTensor());
}

struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::Tensor x,
                                                DecoderLayerImpl* layer, const Rope& rope, const MaskArg& m,
                                                bool keep_residual, bool input_grad) {
    const AttentionMask& mask = m.mask;
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    ctx->saved_data["input_grad"] = input_grad;
    ctx->saved_data["cos"] = rope.cos;
    ctx->saved_data["sin"] = rope.sin;
    ctx->saved_data["mask"] = mask.dense;
    ctx->saved_data["offsets"] = mask.offsets;
    ctx->saved_data["longest"] = mask.longest;
    ctx->saved_data["rng"] = rng_state(x, *layer);
    at::NoGradGuard no_grad;
    if (!keep_residual) {
      ctx->save_for_backward({x});
      return {layer->forward(x, rope, mask)};
    }
    // DecoderLayerImpl::forward's steps, with the RNG state between the halves taken for the recomputation,
    // and the attention's output kept where it can be (causal_attention, segment_attention).
    const int64_t spare = layer->mlp->input_spare(x);
    auto kept = c10::make_intrusive<KeptAttention>();
    at::Tensor attention;
    {
      SlotGuard keep(t_attention_to_keep, kept.get());
      attention = layer->attention_branch(x, rope, mask);
    }
    ctx->saved_data["attention"] = c10::IValue::make_capsule(kept);
    auto [h, normed] = layer->post_attention_layernorm->add_forward(x, attention, spare);
    ctx->saved_data["rng_mlp"] = rng_state(x, *layer);
    ctx->save_for_backward({x, h});
    return {h + layer->mlp->forward(normed, true, spare)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();  // x, and h when selective
    const at::Tensor& x = saved[0];
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    Rope rope{ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor()};
    const auto tensor = [&](const char* key) {
      return ctx->saved_data[key].toOptional<at::Tensor>().value_or(at::Tensor());
    };
    const AttentionMask mask{tensor("mask"), tensor("offsets"), ctx->saved_data["longest"].toInt()};
    const at::Tensor rng_now = rng_state(x, *layer);
    at::Tensor dx;
    {
      at::AutoGradMode enable(true);
      KeepDequantizedWeights keep;  // each backward below follows its recomputation at once
      // The first layer's input, the frozen embedding's output, was made to want a gradient only so that this
      // backward runs: its recomputation then computes none (the q|k|v and norm input gradients).
      const bool input_grad = ctx->saved_data["input_grad"].toBool();
      at::Tensor xd = x.detach().requires_grad_(input_grad);
      // A path without adapters (and an input that wants no gradient) has nothing to give back.
      auto backward_from = [](const at::Tensor& out, const at::Tensor& grad) {
        if (out.requires_grad()) torch::autograd::backward({out}, {grad});
      };
      if (saved.size() == 1) {
        set_rng_state(x, ctx->saved_data["rng"]);
        backward_from(layer->forward(xd, rope, mask), grad_out[0]);
        dx = xd.grad();
      } else {
        set_rng_state(x, ctx->saved_data["rng_mlp"]);
        at::Tensor hd = saved[1].detach().requires_grad_(true);
        torch::autograd::backward({layer->mlp_gradient_path(hd)}, {grad_out[0]});
        set_rng_state(x, ctx->saved_data["rng"]);
        const auto kept = c10::static_intrusive_pointer_cast<KeptAttention>(ctx->saved_data["attention"].toCapsule());
        {
          SlotGuard take(t_attention_kept, kept.get());
          backward_from(layer->attention_gradient_path(xd, rope, mask), hd.grad());
        }
        kept->clear();  // taken by the recomputation's node; else (nothing kept, or not taken) freed here
        dx = xd.grad();
      }
    }
    set_rng_state(x, rng_now);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------

LlamaForCausalLMImpl::LlamaForCausalLMImpl(LlamaArch arch, at::Tensor embed, std::vector<DecoderLayer> layers_in,
                                           RMSNorm norm_in, at::Tensor head, bool trainable_embeddings)
    : arch_(std::move(arch)) {
  // HF nesting: "model.embed_tokens", "model.layers.N", "model.norm", "lm_head".
  // (torch::nn names may not contain dots, so each level is a module.)
  auto inner = register_module("model", std::make_shared<torch::nn::Module>());
  auto embed_mod = inner->register_module("embed_tokens", std::make_shared<torch::nn::Module>());
  embed_tokens = embed_mod->register_parameter("weight", std::move(embed), trainable_embeddings);
  layers = inner->register_module("layers", torch::nn::ModuleList());
  for (auto& l : layers_in) layers->push_back(l);
  layer_list = std::move(layers_in);
  norm = inner->register_module("norm", std::move(norm_in));
  if (arch_.tie_word_embeddings) {
    lm_head = embed_tokens;
  } else {
    TORCH_CHECK(head.defined(), "untied model needs lm_head");
    auto head_mod = register_module("lm_head", std::make_shared<torch::nn::Module>());
    lm_head = head_mod->register_parameter("weight", std::move(head), trainable_embeddings);
  }
}

at::Tensor to_device(const at::Tensor& t, at::Device device) {
  if (!t.defined() || t.device() == device) return t;
  if (device.is_cuda() && t.is_cpu()) return t.pin_memory().to(device, /*non_blocking=*/true);
  return t.to(device);
}

at::Tensor build_attention_mask(const at::Tensor& attention_mask, const at::Tensor& position_ids, int64_t batch,
                                int64_t t, int64_t past, at::Device device) {
  const int64_t s = past + t;
  // The two questions below are answered where the tensors live: on the CPU (the trainer's batches) without
  // waiting for the GPU.
  bool padded = attention_mask.defined() && !attention_mask.to(at::kBool).all().item<bool>();
  // Packed rows: a position id of 0 after the first token starts a new example.
  at::Tensor segments;
  if (position_ids.defined() && past == 0 && t > 1 &&
      (position_ids.slice(1, 1) == 0).any().item<bool>()) {
    segments = (to_device(position_ids, device) == 0).cumsum(-1);  // [B, T]
  }
  if (!padded && !segments.defined() && (past == 0 || t == 1)) return {};  // plain causal
  auto opts = at::TensorOptions().device(device);
  // Query i (absolute position past + i) sees keys j <= past + i.
  at::Tensor qpos = at::arange(past, s, opts.dtype(at::kLong)).view({t, 1});
  at::Tensor kpos = at::arange(0, s, opts.dtype(at::kLong)).view({1, s});
  at::Tensor mask = (kpos <= qpos).view({1, 1, t, s}).expand({batch, 1, t, s});
  if (padded) {
    TORCH_CHECK(attention_mask.size(0) == batch && attention_mask.size(1) == s,
                "attention_mask must be [B, past + T]");
    at::Tensor keys = to_device(attention_mask, device).to(at::kBool).view({batch, 1, 1, s});
    // A query whose every key is padding (a fully padded row) would make softmax NaN: let it see
    // itself. Its output is never used (its labels are masked), but NaNs would poison the batch.
    at::Tensor self = (kpos == qpos).view({1, 1, t, s});
    mask = at::logical_and(mask, at::logical_or(keys, self));
  }
  if (segments.defined()) {
    mask = at::logical_and(mask, (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1));
  }
  return mask.contiguous();
}

namespace {

std::atomic<bool> g_segment_attention{true};

// The segments of right-padded rows (attention_mask [B, T], undefined: no padding) whose examples start where
// position_ids [B, T] restart at 0, the B T tokens taken as one sequence: where each segment starts, then
// B T, and the longest. Nothing when a row's mask is not real tokens then padding. CPU tensors.
std::optional<std::pair<std::vector<int32_t>, int64_t>> row_segments(const at::Tensor& attention_mask,
                                                                    const at::Tensor& position_ids, int64_t batch,
                                                                    int64_t t) {
  const at::Tensor m = attention_mask.defined() ? attention_mask.to(at::kBool).contiguous() : at::Tensor();
  const at::Tensor p = position_ids.defined() ? position_ids.to(at::kLong).contiguous() : at::Tensor();
  const std::vector<int64_t> shape{batch, t};
  if ((m.defined() && m.sizes() != shape) || (p.defined() && p.sizes() != shape)) return std::nullopt;
  const bool* real_token = m.defined() ? m.const_data_ptr<bool>() : nullptr;
  const int64_t* pos = p.defined() ? p.const_data_ptr<int64_t>() : nullptr;
  std::vector<int32_t> starts;
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t row = r * t;
    int64_t real = t;
    if (real_token) {
      real = 0;
      while (real < t && real_token[row + real]) ++real;
      for (int64_t i = real; i < t; ++i)
        if (real_token[row + i]) return std::nullopt;  // not right-padded
    }
    for (int64_t i = 0; i < real; ++i)
      if (i == 0 || (pos && pos[row + i] == 0)) starts.push_back(static_cast<int32_t>(row + i));
    if (real < t) starts.push_back(static_cast<int32_t>(row + real));  // the padding: a segment of its own
  }
  starts.push_back(static_cast<int32_t>(batch * t));
  int64_t longest = 0;
  for (size_t i = 1; i < starts.size(); ++i) longest = std::max<int64_t>(longest, starts[i] - starts[i - 1]);
  return std::pair{std::move(starts), longest};
}

}  // namespace

void set_segment_attention(bool on) { g_segment_attention.store(on); }

AttentionMask attention_layout(const at::Tensor& attention_mask, const at::Tensor& position_ids, int64_t batch,
                               int64_t t, int64_t past, at::Device device, at::ScalarType dtype, int64_t head_dim) {
  const bool on_host = (!attention_mask.defined() || attention_mask.is_cpu()) &&
                       (!position_ids.defined() || position_ids.is_cpu());
  const bool flash = device.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf) && head_dim % 8 == 0 &&
                     head_dim <= 256;
  if (g_segment_attention.load() && flash && on_host && past == 0 && t > 1 && batch * t < (int64_t{1} << 31)) {
    if (auto segments = row_segments(attention_mask, position_ids, batch, t)) {
      auto& [starts, longest] = *segments;
      const auto n = static_cast<int64_t>(starts.size());
      if (n - 1 == batch && longest == t) return {};  // one whole example a row: plain causal
      const at::Tensor offsets = at::from_blob(starts.data(), {n}, at::kInt).clone();
      return {at::Tensor(), to_device(offsets, device), longest};
    }
  }
  return {build_attention_mask(attention_mask, position_ids, batch, t, past, device), {}, 0};
}

at::Tensor LlamaForCausalLMImpl::hidden_states(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                                               const at::Tensor& position_ids, KVCache* cache) {
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be [B, T]");
  const int64_t b = input_ids.size(0), t = input_ids.size(1);
  const int64_t past = cache ? cache->length() : 0;
  at::Tensor x = at::embedding(embed_tokens, to_device(input_ids, device()));
  Rope rope = this->rope(position_ids, b, t, past, x.scalar_type());
  const AttentionMask mask =
      cache ? AttentionMask{build_attention_mask(attention_mask, position_ids, b, t, past, device()), {}, 0}
            : attention_layout(attention_mask, position_ids, b, t, past, device(), x.scalar_type(), arch_.head_dim);
  if (cache && cache->k.empty()) {
    cache->k.resize(layer_list.size());
    cache->v.resize(layer_list.size());
  }
  const int64_t recomputed = at::GradMode::is_enabled() && !cache ? recomputed_layers() : 0;
  const bool input_grad = x.requires_grad();  // the embedding's output: only when it is trained
  if (recomputed > 0 && !x.requires_grad()) {
    // The reentrant checkpoint only runs its backward when its input needs a gradient.
    x = x.detach().requires_grad_(true);
  }
  // The residual stream is x + pending: a layer that is not recomputed hands on its MLP output unadded, for
  // the next norm to add in its kernel (forward_pending); a checkpointed layer takes and gives whole inputs.
  at::Tensor pending;
  for (size_t i = 0; i < layer_list.size(); ++i) {
    if (static_cast<int64_t>(i) < recomputed) {
      x = CheckpointedLayer::apply(x, layer_list[i].get(), rope, MaskArg{mask},
                                   checkpointing_ == Checkpointing::Selective, i > 0 || input_grad)[0];
    } else {
      std::tie(x, pending) = layer_list[i]->forward_pending(x, pending, rope, mask, cache ? &cache->k[i] : nullptr,
                                                            cache ? &cache->v[i] : nullptr);
    }
  }
  return pending.defined() ? norm->add_forward(x, pending).second : norm->forward(x);
}

int64_t LlamaForCausalLMImpl::recomputed_layers() const {
  const auto n = static_cast<int64_t>(layer_list.size());
  if (checkpointing_ == Checkpointing::Off) return 0;
  return checkpointing_layers_ < 0 ? n : std::min(checkpointing_layers_, n);
}

Rope LlamaForCausalLMImpl::rope(const at::Tensor& position_ids, int64_t batch, int64_t t, int64_t past,
                                at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  // Positions on the device: their largest is not known without a wait; the per-forward computation.
  if (position_ids.defined() && !position_ids.is_cpu()) return rope_tables(arch_, position_ids, dtype);
  const int64_t needed =
      position_ids.defined() ? (position_ids.numel() > 0 ? position_ids.max().item<int64_t>() + 1 : 1) : past + t;
  // Dynamic RoPE scales inv_freq for max(sequence, max_position_embeddings): one table per such length.
  const int64_t scaling =
      arch_.rope.type == RopeType::Dynamic ? std::max<int64_t>(needed, arch_.max_position_embeddings) : 0;
  RopeTable& tab = rope_table_;
  if (!tab.cos.defined() || tab.cos.scalar_type() != dtype || tab.cos.device() != device() || tab.scaling != scaling ||
      tab.cos.size(0) < needed) {
    // rope_tables' math on positions 0..L-1, with inv_freq scaled for `needed` (not L). L rounded up so that
    // generation rarely rebuilds.
    const int64_t rows = (std::max<int64_t>(needed, tab.cos.defined() ? tab.cos.size(0) : 0) + 255) / 256 * 256;
    const at::Tensor positions = at::arange(rows, at::TensorOptions().dtype(at::kLong).device(device())).unsqueeze(0);
    const Rope all = rope_of(rope_inv_freq(arch_, needed, device()), positions, dtype);
    tab = RopeTable{all.cos[0], all.sin[0], scaling};
  }
  const int64_t d = tab.cos.size(1);
  if (!position_ids.defined()) {
    return {tab.cos.narrow(0, past, t).unsqueeze(0).expand({batch, t, d}),
            tab.sin.narrow(0, past, t).unsqueeze(0).expand({batch, t, d})};
  }
  TORCH_CHECK(position_ids.dim() == 2 && position_ids.size(0) == batch && position_ids.size(1) == t,
              "position_ids must be [B, T] = [", batch, ", ", t, "], got ", position_ids.sizes());
  TORCH_CHECK(position_ids.numel() == 0 || position_ids.min().item<int64_t>() >= 0, "position_ids must be >= 0");
  const at::Tensor idx = to_device(position_ids.reshape(-1), device());
  return {tab.cos.index_select(0, idx).view({batch, t, d}), tab.sin.index_select(0, idx).view({batch, t, d})};
}

at::Tensor LlamaForCausalLMImpl::lm_logits(const at::Tensor& hidden) const { return at::matmul(hidden, lm_head.t()); }

at::Tensor LlamaForCausalLMImpl::forward(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                                         const at::Tensor& position_ids, KVCache* cache) {
  return lm_logits(hidden_states(input_ids, attention_mask, position_ids, cache));
}

std::vector<ProjectionSlot> LlamaForCausalLMImpl::projections() {
  std::vector<ProjectionSlot> out;
  for (size_t i = 0; i < layer_list.size(); ++i) {
    auto layer = layer_list[i];
    auto attn = layer->self_attn;
    auto mlp = layer->mlp;
    auto add = [&](const char* kind, const char* parent, std::shared_ptr<torch::nn::Module> holder,
                   std::shared_ptr<Linear>* field) {
      out.push_back(ProjectionSlot{
          fmt::format("model.layers.{}.{}.{}", i, parent, kind), kind, static_cast<int64_t>(i),
          [field] { return *field; },
          [holder, field, kind = std::string(kind)](std::shared_ptr<Linear> m) {
            holder->replace_module(kind, m);
            *field = std::move(m);
          }});
    };
    add("q_proj", "self_attn", attn.ptr(), &attn->q_proj);
    add("k_proj", "self_attn", attn.ptr(), &attn->k_proj);
    add("v_proj", "self_attn", attn.ptr(), &attn->v_proj);
    add("o_proj", "self_attn", attn.ptr(), &attn->o_proj);
    add("gate_proj", "mlp", mlp.ptr(), &mlp->gate_proj);
    add("up_proj", "mlp", mlp.ptr(), &mlp->up_proj);
    add("down_proj", "mlp", mlp.ptr(), &mlp->down_proj);
  }
  return out;
}

}  // namespace qlora::model
