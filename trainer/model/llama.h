// The Llama decoder in LibTorch, numerically the model of Hugging Face's LlamaForCausalLM:
//   RMSNorm computed in float32 then cast back; RoPE in HF's rotate_half convention with cos/sin
//   computed in float32; grouped-query attention through at::scaled_dot_product_attention; SwiGLU MLP;
//   lm_head tied to the embeddings or not.
// On CUDA, projections over a frozen 4-bit base run as fused groups (q|k|v, gate|up; fused.h): the same
// math in fewer, larger kernels; the CPU keeps the per-projection modules as the exact reference.
// Module and parameter names are HF's ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"),
// so named_parameters() is a Hugging Face state dict.
//
// Shapes: B batch, T new tokens, S = past + T keys, H hidden, V vocab, nh / nkv heads, D head_dim.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "trainer/config/config.h"
#include "trainer/model/hf_config.h"
#include "trainer/model/linear.h"

namespace qlora::model {

// Keys and values of every layer for incremental decoding.
struct KVCache {
  std::vector<at::Tensor> k, v;  // per layer: [B, nkv, S, D]
  int64_t length() const { return k.empty() || !k[0].defined() ? 0 : k[0].size(2); }
};

// cos/sin tables for a batch: [B, T, D] each, in the compute dtype.
struct Rope {
  at::Tensor cos, sin;
};

// Which keys each query of a forward sees (attention_layout builds it). Plain causal when nothing is defined;
// else a dense bool mask [B, 1, T, S] (true = attend); or, for rows of packed and right-padded examples,
// their segments: the [B T] tokens taken as one sequence cut at offsets (int32 [segments + 1] on the device:
// every example, and every row's padding, is a segment), each attended causally within itself by flash
// attention's variable-length form, with no mask built. longest: the longest segment.
struct AttentionMask {
  at::Tensor dense;
  at::Tensor offsets;
  int64_t longest = 0;
  bool plain() const { return !dense.defined() && !offsets.defined(); }
};

// inv_freq [D/2] float32, HF's rope initialisation for `type`; seq_len matters only for dynamic NTK.
at::Tensor rope_inv_freq(const LlamaArch& arch, int64_t seq_len, at::Device device);
// cos/sin for position_ids [B, T] (int64), cast to dtype, on position_ids' device (HF's computation; the
// model's rope() gives the same values from cached tables).
Rope rope_tables(const LlamaArch& arch, const at::Tensor& position_ids, at::ScalarType dtype);
// HF's x * cos + rotate_half(x) * sin on x [B, n, T, D] (the composite that rope_split's kernel replaces).
at::Tensor apply_rope(const at::Tensor& x, const Rope& rope);

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(at::Tensor weight, double eps, bool trainable);
  // x [..., H]; spare: columns left right of each output row for the next projection group (fused.h).
  at::Tensor forward(const at::Tensor& x, int64_t spare = 0);
  // (s, forward(s, spare)) with s = a + b: a residual add and the norm that reads its sum, one kernel each
  // way on the GPU (the same values as the add, then forward).
  std::pair<at::Tensor, at::Tensor> add_forward(const at::Tensor& a, const at::Tensor& b, int64_t spare = 0);
  // (r, forward(x, spare)) where r stands for x in a residual sum whose value was kept (a recomputation's
  // GradientOnlyAdd): on the GPU r's values are unspecified and the gradient through it is summed in the
  // norm's backward kernel; elsewhere r is x.
  std::pair<at::Tensor, at::Tensor> residual_forward(const at::Tensor& x, int64_t spare = 0);
  at::Tensor weight;  // [H]
  double eps;
};
TORCH_MODULE(RMSNorm);

class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const LlamaArch& arch, std::shared_ptr<Linear> q, std::shared_ptr<Linear> k,
                std::shared_ptr<Linear> v, std::shared_ptr<Linear> o);
  // x [B, T, H]; mask: AttentionMask (segments only without a cache);
  // cache slots (k, v) are extended in place when given. output_needed: see DecoderLayerImpl. spare: the
  // columns x's producer left for q|k|v's adapters (input_spare; fused.h).
  at::Tensor forward(const at::Tensor& x, const Rope& rope, const AttentionMask& mask, at::Tensor* cache_k,
                     at::Tensor* cache_v, bool output_needed = true, int64_t spare = 0);
  // The spare columns the input's producer should leave for q|k|v (like: an input's dtype and device).
  int64_t input_spare(const at::Tensor& like) const;
  std::shared_ptr<Linear> q_proj, k_proj, v_proj, o_proj;
  int64_t num_heads, num_kv_heads, head_dim;
};
TORCH_MODULE(Attention);

class MLPImpl : public torch::nn::Module {
 public:
  MLPImpl(std::shared_ptr<Linear> gate, std::shared_ptr<Linear> up, std::shared_ptr<Linear> down);
  // down(silu(gate(x)) * up(x)); output_needed: see DecoderLayerImpl; spare: as AttentionImpl's.
  at::Tensor forward(const at::Tensor& x, bool output_needed = true, int64_t spare = 0);
  int64_t input_spare(const at::Tensor& like) const;
  std::shared_ptr<Linear> gate_proj, up_proj, down_proj;
};
TORCH_MODULE(MLP);

class DecoderLayerImpl : public torch::nn::Module {
 public:
  DecoderLayerImpl(Attention attn, MLP mlp, RMSNorm input_norm, RMSNorm post_norm);
  // h + mlp(post_attention_layernorm(h)) with h = x + attention_branch(x).
  at::Tensor forward(const at::Tensor& x, const Rope& rope, const AttentionMask& mask, at::Tensor* cache_k = nullptr,
                     at::Tensor* cache_v = nullptr);
  // The same on the input x + pending (pending undefined: x), returning the output unadded as (h, mlp
  // output): each residual add then happens inside the norm that reads its sum (one kernel on the GPU), the
  // next layer's or the final one.
  std::pair<at::Tensor, at::Tensor> forward_pending(const at::Tensor& x, const at::Tensor& pending, const Rope& rope,
                                                    const AttentionMask& mask, at::Tensor* cache_k = nullptr,
                                                    at::Tensor* cache_v = nullptr);
  // The attention residual branch: self_attn(input_layernorm(x)).
  at::Tensor attention_branch(const at::Tensor& x, const Rope& rope, const AttentionMask& mask,
                              at::Tensor* cache_k = nullptr, at::Tensor* cache_v = nullptr);
  // x + attention_branch(x) and h + mlp(post_attention_layernorm(h)) for their gradients only: a
  // recomputation whose sums were kept from the forward. The values are unspecified; the last projection
  // (o_proj, down_proj) skips its GEMMs where the fused path applies (fused.h's output_needed) and, on the
  // GPU, the residual's gradient is summed in the norm's backward kernel. The gradient path is exact.
  at::Tensor attention_gradient_path(const at::Tensor& x, const Rope& rope, const AttentionMask& mask);
  at::Tensor mlp_gradient_path(const at::Tensor& h);
  Attention self_attn = nullptr;
  MLP mlp = nullptr;
  RMSNorm input_layernorm = nullptr, post_attention_layernorm = nullptr;
};
TORCH_MODULE(DecoderLayer);

// The seven projections by HF name, for the stages that wrap or export them.
struct ProjectionSlot {
  std::string name;  // "model.layers.3.mlp.down_proj"
  std::string kind;  // "down_proj"
  int64_t layer;
  std::function<std::shared_ptr<Linear>()> get;
  std::function<void(std::shared_ptr<Linear>)> set;
};

class LlamaForCausalLMImpl : public torch::nn::Module {
 public:
  LlamaForCausalLMImpl(LlamaArch arch, at::Tensor embed, std::vector<DecoderLayer> layers, RMSNorm norm,
                       at::Tensor lm_head /* undefined when tied */, bool trainable_embeddings);

  // input_ids [B, T] int64; attention_mask [B, S] bool/int (1 = real token; undefined = all real);
  // position_ids [B, T] (undefined = past..past+T-1). Returns logits [B, T, V] in the compute dtype.
  // The inputs may be on the CPU: they are copied to the model's device without waiting for it, and what
  // the forward must know of the mask and positions is read from the CPU copies (a training step then
  // never waits for the GPU before its end).
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {},
                     const at::Tensor& position_ids = {}, KVCache* cache = nullptr);
  // The final normed hidden states [B, T, H] (what lm_head reads); used by chunked losses.
  at::Tensor hidden_states(const at::Tensor& input_ids, const at::Tensor& attention_mask = {},
                           const at::Tensor& position_ids = {}, KVCache* cache = nullptr);
  // hidden [.., H] -> logits [.., V]
  at::Tensor lm_logits(const at::Tensor& hidden) const;

  std::vector<ProjectionSlot> projections();
  const LlamaArch& arch() const { return arch_; }
  at::Device device() const { return embed_tokens.device(); }
  at::ScalarType dtype() const { return embed_tokens.scalar_type(); }

  // Per-layer activation recomputation in backward (gradient checkpointing; config.h says what each
  // mode keeps), in the first `layers` decoder layers (-1: all); the others keep their activations.
  void set_gradient_checkpointing(Checkpointing mode, int64_t layers = -1) {
    checkpointing_ = mode;
    checkpointing_layers_ = layers;
  }
  Checkpointing gradient_checkpointing() const { return checkpointing_; }
  // How many decoder layers recompute in a training forward.
  int64_t recomputed_layers() const;

  // cos/sin [B, T, D] in `dtype` for a forward of T tokens after `past` cached ones: at position_ids
  // [B, T] (on the CPU or the model's device) or, undefined, at past..past+T-1. The same values as
  // rope_tables, bit for bit, gathered from tables of positions 0..L-1 kept across forwards (a dozen ops
  // at the start of every forward before, on the CPU's critical path; every token in generation).
  Rope rope(const at::Tensor& position_ids, int64_t batch, int64_t t, int64_t past, at::ScalarType dtype);

  at::Tensor embed_tokens;  // [V, H]
  torch::nn::ModuleList layers = nullptr;
  std::vector<DecoderLayer> layer_list;
  RMSNorm norm = nullptr;
  at::Tensor lm_head;       // [V, H]; aliases embed_tokens when tied

 private:
  LlamaArch arch_;
  Checkpointing checkpointing_ = Checkpointing::Off;
  int64_t checkpointing_layers_ = -1;
  struct RopeTable {
    at::Tensor cos, sin;     // [L, D] for positions 0..L-1, in their dtype on the model's device
    int64_t scaling = -1;    // dynamic RoPE: the sequence length its inv_freq was scaled for (else 0)
  } rope_table_;
};
TORCH_MODULE(LlamaForCausalLM);

// Selective checkpointing keeps each layer's attention output and log-sum-exp where SDPA runs cuDNN's flash attention
// (plain causal, on the GPU) and where rows attend by segments (flash attention's variable-length kernels), so the
// recomputation skips the attention's forward: 8 KB a token a layer more at hidden 4096 (config.h's Checkpointing). On
// by default; off recomputes it (`qlora bench --keep-attention off`). kept_attention_uses counts the recomputations
// that took a kept output.
void set_keep_attention(bool on);
int64_t kept_attention_uses();

// Grouped-query attention (fewer k/v heads than query heads, Llama 3) hands the grouped k and v to cuDNN where SDPA
// runs it (plain causal, on the GPU), which maps the query heads onto them; elsewhere k and v are repeated to every
// query head first, as HF's repeat_kv. On by default; off repeats them everywhere (`qlora bench --grouped-attention
// off`). grouped_attention_uses counts the attention calls that took the grouped k and v.
void set_grouped_attention(bool on);
int64_t grouped_attention_uses();

// `t` on `device`; a CPU tensor bound for CUDA goes through pinned memory asynchronously, so the copy
// does not wait for the work already queued on the GPU.
at::Tensor to_device(const at::Tensor& t, at::Device device);

// Builds the bool attention mask [B, 1, T, S] on `device` (causal within the new tokens, all past keys
// visible, padded keys hidden; with packed rows, whose position_ids restart at 0 for every example, each
// example sees only itself) or an undefined tensor when plain causal attention is exact. The mask and
// positions may be on the CPU (then nothing waits for the GPU) or on `device`.
at::Tensor build_attention_mask(const at::Tensor& attention_mask, const at::Tensor& position_ids, int64_t batch,
                                int64_t t, int64_t past, at::Device device);

// The AttentionMask of a forward: segments where they apply (the mask and positions on the CPU, describing
// right-padded rows of one or more examples each; no past; a CUDA device, 16-bit compute and a head size
// flash attention takes: a multiple of 8 up to 256; set_segment_attention on), else build_attention_mask's
// dense mask, or plain causal.
AttentionMask attention_layout(const at::Tensor& attention_mask, const at::Tensor& position_ids, int64_t batch,
                               int64_t t, int64_t past, at::Device device, at::ScalarType dtype, int64_t head_dim);
// Whether attention_layout may give segments (default on; off: the dense mask, for A/B and tests).
void set_segment_attention(bool on);

}  // namespace qlora::model
