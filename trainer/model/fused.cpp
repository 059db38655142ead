// The fused projection groups, RoPE split and packed SwiGLU; see fused.h for what and why.
#include "trainer/model/fused.h"

#include "trainer/model/llama.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/ops.h"
#endif

#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

namespace qlora::model {

namespace {

std::atomic<FusedMode> g_mode{FusedMode::Auto};
std::atomic<bool> g_fold{true};
std::atomic<bool> g_lora_grad_kernel{true};
std::atomic<bool> g_counter_dropout{true};
std::atomic<bool> g_dropout_mm{true};
std::atomic<bool> g_dropout_dx{true};
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
  bool folded = false;        // forward ran the base GEMM on [x | xa] [W | s B]^T (kept weights are W_ext)
};

int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

std::atomic<int64_t> g_folded{0};
std::atomic<int64_t> g_dropout_mm_calls{0};
std::atomic<int64_t> g_dropout_dx_calls{0};

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

std::atomic<DequantAhead> g_ahead{DequantAhead::Low};
std::atomic<int64_t> g_ahead_hits{0};
std::atomic<int> g_ahead_depth{2};  // set_dequant_ahead_depth

void block_diag_into(const GroupState& s, at::TensorList lora, const at::Tensor& out);

// W_ext = [W | bd]: the block-diagonal s B of the group's adapters in the columns right of W's (see
// ProjectionGroupFunction). lora = A0, B0, A1, B1, ... (only the B's are read).
void block_diag_beside(const GroupState& s, at::TensorList lora, const at::Tensor& buf) {
  block_diag_into(s, lora, buf.narrow(1, s.in, s.ranks));
}

// The group's weights one under the other into the first `in` columns of buf [total, pitch] and, given its
// adapters (lora non-empty), bd beside them (block_diag_beside).
void dequantize_into(const GroupState& s, at::TensorList lora, const at::Tensor& buf) {
  for (const auto& m : s.members)
    quant::dequantize_4bit_into(m.weight, buf.narrow(0, m.offset, m.out).narrow(1, 0, s.in));
  if (!lora.empty()) block_diag_beside(s, lora, buf);
}

#ifdef QLORA_WITH_CUDA
// Dequantization ahead (the next groups; how many: set_dequant_ahead_depth), on a second stream: the
// dequantize kernels are bound by memory bandwidth, the GEMMs and attention by the tensor cores, so the next
// groups' weights are written while the kernels before their GEMMs run instead of between them. A cuBLAS GEMM
// fills every SM while it runs, so the overlap is in the gaps: the tail of a GEMM's last wave, the small and
// element-wise kernels. With the step on a stream of higher priority (StepStream) the dequantization takes
// only what the step's kernels leave (fused.h's DequantAhead; the figures are in docs/performance.md).
// Which group comes next is learned from the order of the requests: a step makes the same ones in the same
// order every time (forward, recomputation and backward are told apart by the phase in the key, since a
// group is dequantized in more than one of them). A wrong guess costs a wasted dequantization, never a wrong
// result: a request takes the buffer made ahead only when its key matches. The weights are frozen (nothing
// writes a Quantized4bit in place), so a buffer made ahead holds what the request would compute.
// Memory: as many groups' bf16 weights more as are ahead (at the 7B shape, two: at most gate|up's and
// down's, 270 MB).
// A request for W_ext = [W | bd] (the adapters' B's given) gets bd written ahead too, from the B's the
// request that taught the order had. The B's change in place (the optimizer): bd made ahead is used only
// when every B is the same tensor at the same version as when the work ahead was queued, else it is written
// again on the requesting stream. (The first group of a step is made ahead at the end of the previous
// backward, before the update, which the side stream may then read half done: that bd is never used.)
//
// Streams: the buffer is allocated on the requesting (current) stream, its owner; the side stream waits for
// that stream's queued work before writing it (the allocator may hand back memory that queued kernels still
// use), and the owner waits for the side stream's event before it uses or drops the buffer, so the
// allocator's stream bookkeeping stays that of a buffer used on its owner only. A request from another
// stream (an evaluation between steps, outside the step's stream) never takes it.
// The step's stream's priority (StepStream): one level above the default 0 (lower is higher in CUDA; PyTorch's
// pools offer 0 to -3).
constexpr int kStepPriority = -1;

class DequantAheadQueue {
 public:
  struct Key {
    const c10::TensorImpl* packed = nullptr;  // of the group's first member
    int64_t total = 0, in = 0, pitch = 0;
    at::ScalarType dtype = at::kBFloat16;
    int phase = 0;
    bool bd = false;  // W_ext: the block-diagonal s B beside W
    friend auto operator<=>(const Key&, const Key&) = default;
  };

  // lora: empty, or the group's A0, B0, ... for bd beside W (block_diag_beside).
  at::Tensor take(const GroupState& s, int64_t pitch, at::ScalarType dtype, at::Device device, int phase,
                  at::TensorList lora) {
    const bool with_bd = !lora.empty();
    const Key key{s.members[0].weight.packed.unsafeGetTensorImpl(), s.total, s.in, pitch, dtype, phase, with_bd};
    std::lock_guard<std::mutex> lock(mutex_);
    const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(device.index());
    at::Tensor buf;
    if (!pending_.empty()) {
      Pending& next = pending_.front();
      next.ready.block(next.owner);  // its writes finish before the owner uses or frees the buffer
      if (next.key == key && next.device == device && next.owner == main) {
        buf = next.buffer;
        g_ahead_hits.fetch_add(1, std::memory_order_relaxed);
        if (with_bd && !next.same_bs(s, lora)) block_diag_beside(s, lora, buf);
        pending_.pop_front();
      } else {  // off the learned order (or another stream): the work ahead is dropped
        for (Pending& p : pending_) p.ready.block(p.owner);
        pending_.clear();
      }
    }
    if (!buf.defined()) {
      buf = at::empty({s.total, pitch}, at::TensorOptions().dtype(dtype).device(device));
      dequantize_into(s, lora, buf);
    }
    // Learn: this request follows the previous one (built again only when the order changed).
    if (last_) {
      auto learned = successor_.find(*last_);
      if (learned == successor_.end() || learned->second.key != key || learned->second.device != device)
        successor_.insert_or_assign(*last_, Recipe::of(key, s, device, lora));
    }
    last_ = key;
    // Ahead: the requests that followed the last one queued (this one when none is) last time, until
    // g_ahead_depth are queued.
    Key from = pending_.empty() ? key : pending_.back().key;
    while (pending_.size() < static_cast<size_t>(g_ahead_depth.load())) {
      auto it = successor_.find(from);
      if (it == successor_.end()) break;
      const Recipe& r = it->second;
      auto members = r.members();
      auto bs = r.bs();
      if (!members || !bs) {
        successor_.erase(it);  // the model it came from is gone
        break;
      }
      GroupState g;  // what dequantize_into reads of a group
      g.members = *members, g.in = r.key.in, g.total = r.key.total, g.ranks = r.ranks;
      Pending p{r.key, r.device, *members, *bs, {},
                at::empty({r.key.total, r.key.pitch}, at::TensorOptions().dtype(r.key.dtype).device(r.device)),
                main, at::cuda::CUDAEvent()};
      for (const at::Tensor& b : p.bs) p.versions.push_back(b.defined() ? b._version() : 0);
      at::cuda::CUDAEvent queued;
      queued.record(main);
      const c10::cuda::CUDAStream side = side_stream(r.device);
      queued.block(side);
      {
        c10::cuda::CUDAStreamGuard on_side(side);
        dequantize_into(g, p.bs, p.buffer);  // p.bs is empty unless the request had bd
      }
      p.ready.record(side);
      from = r.key;
      pending_.push_back(std::move(p));
    }
    return buf;
  }

  // settle_dequant_ahead: each owner waits for its buffer's writes, then the buffers go.
  void settle() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Pending& p : pending_) p.ready.block(p.owner);
    pending_.clear();
  }

 private:
  // What dequantizing a group takes, without keeping its weights alive (weak references: the model may go).
  struct Recipe {
    Key key;
    at::Device device = at::kCPU;
    std::vector<GroupState::Member> shape;  // members without their tensors
    std::vector<std::vector<WeakTensor>> weak;  // packed, absmax, nested_absmax, nested_code, code
    std::vector<std::array<bool, 5>> had;       // which of them were defined
    std::vector<WeakTensor> b_weak;             // with bd: lora's entries (A0, B0, ...), the A's left empty
    int64_t ranks = 0;

    static Recipe of(const Key& key, const GroupState& s, at::Device device, at::TensorList lora) {
      Recipe r{key, device, {}, {}, {}, {}, s.ranks};
      for (size_t i = 0; i < lora.size(); ++i)
        r.b_weak.emplace_back(i % 2 == 1 ? lora[i].getIntrusivePtr() : at::Tensor().getIntrusivePtr());
      for (const auto& m : s.members) {
        GroupState::Member bare = m;
        const quant::Quantized4bit& q = m.weight;
        bare.weight = quant::Quantized4bit{};
        bare.weight.nested_offset = q.nested_offset, bare.weight.type = q.type, bare.weight.blocksize = q.blocksize;
        bare.weight.shape = q.shape, bare.weight.dtype = q.dtype;
        r.shape.push_back(std::move(bare));
        const at::Tensor* fields[5] = {&q.packed, &q.absmax, &q.nested_absmax, &q.nested_code, &q.code};
        std::vector<WeakTensor> w;
        std::array<bool, 5> had{};
        for (size_t f = 0; f < 5; ++f) {
          w.emplace_back(fields[f]->getIntrusivePtr());
          had[f] = fields[f]->defined();
        }
        r.weak.push_back(std::move(w));
        r.had.push_back(had);
      }
      return r;
    }
    // The members with their weights again, or nothing when a weight was freed.
    std::optional<std::vector<GroupState::Member>> members() const {
      std::vector<GroupState::Member> out = shape;
      for (size_t i = 0; i < out.size(); ++i) {
        quant::Quantized4bit& q = out[i].weight;
        at::Tensor* fields[5] = {&q.packed, &q.absmax, &q.nested_absmax, &q.nested_code, &q.code};
        for (size_t f = 0; f < 5; ++f) {
          if (!had[i][f]) continue;  // never defined (nested_* without double quantization)
          *fields[f] = at::Tensor(weak[i][f].lock());
          if (!fields[f]->defined()) return std::nullopt;
        }
      }
      return out;
    }
    // lora's B's again (A0, B0, ...), or nothing when one was freed.
    std::optional<std::vector<at::Tensor>> bs() const {
      std::vector<at::Tensor> out;
      for (size_t i = 0; i < b_weak.size(); ++i) {
        out.emplace_back(i % 2 == 1 ? at::Tensor(b_weak[i].lock()) : at::Tensor());
        if (i % 2 == 1 && !out.back().defined()) return std::nullopt;
      }
      return out;
    }
  };
  struct Pending {
    Key key;
    at::Device device;
    std::vector<GroupState::Member> members;  // their weights alive while the key's pointer names them
    std::vector<at::Tensor> bs;               // with bd: the B's it was written from (A0, B0, ...; A's empty)
    std::vector<int64_t> versions;            // their versions when it was queued
    at::Tensor buffer;
    c10::cuda::CUDAStream owner;  // the stream the buffer was allocated on
    at::cuda::CUDAEvent ready;

    // Whether bd was written from the request's B's as they are now (no update since it was queued).
    bool same_bs(const GroupState& s, at::TensorList lora) const {
      if (lora.size() != bs.size()) return false;
      for (const auto& m : s.members) {
        if (m.lora < 0) continue;
        const size_t i = 2 * static_cast<size_t>(m.lora) + 1;
        if (!bs[i].is_same(lora[i]) || bs[i]._version() != versions[i]) return false;
      }
      return true;
    }
  };

  // The default priority, or one level above the step's stream in the High mode (fused.h).
  c10::cuda::CUDAStream side_stream(at::Device device) {
    const int priority = g_ahead.load() == DequantAhead::High ? kStepPriority - 1 : 0;
    auto it = side_.find({device.index(), priority});
    if (it == side_.end()) {
      const c10::cuda::CUDAStream made = c10::cuda::getStreamFromPool(priority, device.index());
      it = side_.emplace(std::pair{device.index(), priority}, made).first;
    }
    return it->second;
  }

  std::mutex mutex_;
  std::deque<Pending> pending_;
  std::optional<Key> last_;
  std::map<Key, Recipe> successor_;
  std::map<std::pair<c10::DeviceIndex, int>, c10::cuda::CUDAStream> side_;
};

// One stream per device for every step, so what a step allocates (optimizer state, the adapters' casts)
// belongs to the stream the next steps use. Never destroyed, like the queue.
c10::cuda::CUDAStream step_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static auto* streams = new std::map<c10::DeviceIndex, c10::cuda::CUDAStream>;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams->find(device);
  if (it == streams->end()) it = streams->emplace(device, c10::cuda::getStreamFromPool(kStepPriority, device)).first;
  return it->second;
}

DequantAheadQueue& dequant_ahead() {
  // Never destroyed: its buffer and events would otherwise be freed after the CUDA runtime at exit.
  static auto* queue = new DequantAheadQueue;
  return *queue;
}
#endif

// The group's weights dequantized one under the other in `dtype`: the first `in` columns of a new
// [total, pitch] buffer (pitch 0: `in`, the plain [total, in] matrix); given the adapters (lora = A0, B0,
// ...), W_ext: their block-diagonal s B in the `ranks` columns after (block_diag_beside). phase tells apart
// the passes that dequantize the same group (forward, recomputation, backward) for the queue that works
// ahead on CUDA.
at::Tensor dequantize_group(const GroupState& s, at::ScalarType dtype, at::Device device, int64_t pitch = 0,
                            int phase = 0, at::TensorList lora = {}) {
  if (pitch == 0) pitch = s.in;
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda() && g_ahead.load() != DequantAhead::Off)
    return dequant_ahead().take(s, pitch, dtype, device, phase, lora);
#endif
  at::Tensor w = at::empty({s.total, pitch}, at::TensorOptions().dtype(dtype).device(device));
  dequantize_into(s, lora, w);
  return w;
}

// The phase of a forward's dequantization (see dequantize_group).
int forward_phase() { return 1 + (at::GradMode::is_enabled() ? 2 : 0) + (t_keep_weights ? 4 : 0); }

// The A's of a group in the compute dtype, one under the other ([ranks, in]: the x A^T GEMM's operand), cast
// when they change instead of at every use (about 13 launches a layer and pass at the 7B shape before), one
// _foreach_copy_ for all groups per optimizer step and none in a checkpointed layer's recomputation. (The B's
// go into the block-diagonal operand that block_diag_into builds from the float32 masters at each use.) An
// entry per group, keyed by its first A; it stays valid while every A is the same tensor (weak references, so
// a freed tensor's address cannot alias a new one) with the version counter it had when copied (an in-place
// update bumps it: the optimizer's, a checkpoint load's copy_).
class AdapterCasts {
 public:
  // as = A0, A1, ... (float32 [r_i, in]); returns their cast, one under the other.
  at::Tensor get(at::TensorList as, at::ScalarType dtype) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entry(as, dtype);
    if (stale(e, as)) refresh_all();  // after an update every adapter moved: all groups at once
    return e.a_cat;
  }

  // Re-copies every group whose adapters moved, now (refresh_adapter_casts).
  void refresh() {
    std::lock_guard<std::mutex> lock(mutex_);
    refresh_all();
  }

 private:
  struct Entry {
    std::vector<WeakTensor> src;
    std::vector<int64_t> versions;  // of src when last copied (-1: never)
    std::vector<at::Tensor> dst;    // row blocks of a_cat, shaped like src
    at::Tensor a_cat;
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
    if (dst.empty()) return;
    at::NoGradGuard no_grad;
    at::_foreach_copy_(dst, src);
    for (auto& [e, now] : copied)
      for (size_t i = 0; i < now.size(); ++i) e->versions[i] = now[i]._version();
  }

  Entry& entry(at::TensorList as, at::ScalarType dtype) {
    const std::pair<const c10::TensorImpl*, at::ScalarType> key{as[0].unsafeGetTensorImpl(), dtype};
    auto it = entries_.find(key);
    if (it != entries_.end() && same_tensors(it->second, as)) return it->second;
    // A new group (or one whose adapters were replaced): drop entries of freed adapters, then build.
    for (auto e = entries_.begin(); e != entries_.end();) e = e->second.src[0].expired() ? entries_.erase(e) : ++e;
    Entry e;
    int64_t ranks = 0;
    for (const auto& t : as) ranks += t.size(0);
    e.a_cat = at::empty({ranks, as[0].size(1)}, as[0].options().dtype(dtype));
    int64_t row = 0;
    for (const auto& t : as) {
      e.dst.push_back(e.a_cat.narrow(0, row, t.size(0)));
      row += t.size(0);
      e.src.emplace_back(WeakTensor(t.getIntrusivePtr()));
      e.versions.push_back(-1);  // copied on first use
    }
    return entries_.insert_or_assign(key, std::move(e)).first->second;
  }

  static bool same_tensors(const Entry& e, at::TensorList as) {
    if (e.src.size() != as.size()) return false;
    for (size_t i = 0; i < as.size(); ++i) {
      if (e.src[i].lock().get() != as[i].unsafeGetTensorImpl()) return false;
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

// alpha * a @ b with a float32 result (the adapters' gradients): cuBLAS accumulates in float32, scales in its
// epilogue and writes float32 without a round trip through the compute dtype; elsewhere the product is cast
// and scaled.
at::Tensor mm_float(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  if (a.is_cuda() && a.scalar_type() != at::kFloat) {
    if (alpha == 1.0) return at::mm(a, b, at::kFloat);
    at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
    // beta 0: `self` (one element of a, in the inputs' dtype as the op requires) is never read.
    return at::addmm_out(out, a.as_strided({1}, {1}), a, b, at::kFloat, /*beta=*/0.0, alpha);
  }
  at::Tensor out = at::mm(a, b).to(at::kFloat);
  return alpha == 1.0 ? out : out.mul_(alpha);
}

// out = alpha * a @ b, written without reading out (beta 0): into a column block of a wider matrix, whose
// row stride the GEMM takes as its leading dimension.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::addmm_out(out, out, a, b, /*beta=*/0.0, alpha);
}

// The group's B's as one block-diagonal matrix: out [total, ranks] gets s_i B_i in member i's rows and
// adapter columns, zeros elsewhere (so an unadapted member's rows are zero). lora = A0, B0, A1, B1, ...
void block_diag_into(const GroupState& s, at::TensorList lora, const at::Tensor& out) {
#ifdef QLORA_WITH_CUDA
  if (out.is_cuda() && s.members.size() <= static_cast<size_t>(kernels::kMaxBlockDiagMembers)) {
    std::vector<kernels::BlockDiagMember> blocks;
    for (const auto& m : s.members)
      if (m.lora >= 0) blocks.push_back({lora[2 * m.lora + 1].contiguous(), m.offset, m.col, m.scaling});
    kernels::lora_block_diag_cuda(out, blocks);
    return;
  }
#endif
  out.zero_();
  for (const auto& m : s.members)  // the kernel's math: the product in float32, then one rounding
    if (m.lora >= 0) out.narrow(0, m.offset, m.out).narrow(1, m.col, m.rank).copy_(lora[2 * m.lora + 1] * m.scaling);
}

// x [..., in] as rows [n, in] without a copy when its rows are contiguous elements any distance apart (the
// layout of a producer that left spare columns), else contiguous.
at::Tensor as_rows(const at::Tensor& x, int64_t in) {
  at::Tensor x2 = x.reshape({-1, in});
  if (x2.stride(1) != 1 || x2.stride(0) < in) x2 = x2.contiguous();
  return x2;
}

// LoRA dropout by counters (kernels/lora_dropout.h): on CUDA, outside a graph capture (a draw's seed and
// offset are read on the host; under capture ATen's dropout, which is graph-safe, runs instead). A group's
// members are dropped in one pass over x, and the masks are kept as 1 bit an element for the backward.
bool counter_dropout(const at::Tensor& x) {
#ifdef QLORA_WITH_CUDA
  const auto dt = x.scalar_type();
  return g_counter_dropout.load() && x.is_cuda() && (dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat) &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
#else
  (void)x;
  return false;
#endif
}

#ifdef QLORA_WITH_CUDA
// A group's dropped members as kernels/lora_dropout_mm.cu takes them, with their rows of a_cat.
std::vector<kernels::DropoutMmMember> dropped_members(const GroupState& st, const at::Tensor& a_cat) {
  std::vector<kernels::DropoutMmMember> mm;
  for (const auto& m : st.members)
    if (m.lora >= 0 && m.dropout > 0.0) mm.push_back({a_cat.narrow(0, m.col, m.rank), m.col, m.dropout});
  return mm;
}

// Whether the dropped members `mm` (each of rank `rank`) take their x A^T and, given dxa, dA from the kernels
// that mask x as it loads (kernels/lora_dropout_mm.cu) instead of from dropped copies of x.
bool dropout_mm(const at::Tensor& x2, const std::vector<kernels::DropoutMmMember>& mm, int64_t rank,
                const at::Tensor& dxa = {}) {
  return g_dropout_mm.load() && rank > 0 && kernels::lora_dropout_mm_supported(x2, mm, rank, dxa);
}

// The one rank of a group's dropped members, or 0 when they differ (or none is dropped).
int64_t dropped_rank(const GroupState& st) {
  int64_t r = -1;
  for (const auto& m : st.members) {
    if (m.lora < 0 || m.dropout == 0.0) continue;
    if (r >= 0 && r != m.rank) return 0;
    r = m.rank;
  }
  return std::max<int64_t>(r, 0);
}

// One draw of x's device's default generator, advanced as ATen's dropout advances it (so checkpointing's
// saved generator state replays it in a recomputation).
kernels::DropoutDraw draw_dropout(const at::Tensor& x, double p) {
  at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator(x.device().index());
  std::lock_guard<std::mutex> lock(gen.mutex());
  const at::PhiloxCudaState st = at::check_generator<at::CUDAGeneratorImpl>(gen)->philox_cuda_state(4);
  return {p, st.seed_.val, st.offset_.val};
}

// Dropout on one adapter's input (the per-projection modules), masks by counters: the groups' kernels with one
// member, so a module and a group member given the same draw drop the same elements.
struct CounterDropoutFunction : public torch::autograd::Function<CounterDropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p) {
    auto [h, mask] = kernels::lora_dropout_fwd_cuda(as_rows(x, x.size(-1)), {draw_dropout(x, p)});
    ctx->save_for_backward({mask});
    ctx->saved_data["p"] = p;
    return h.view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const at::Tensor g = grad[0].contiguous();
    const at::Tensor dx = kernels::lora_dropout_bwd_cuda(g.view({1, -1, g.size(-1)}), ctx->get_saved_variables()[0],
                                                         {ctx->saved_data["p"].toDouble()});
    return {dx.view(g.sizes()), at::Tensor()};
  }
};
#endif

// Whether the `spare` columns right of x2's rows can take the group's x A^T: x2's rows lie at least
// in + ranks apart and the buffer extends past the last row's spare columns.
bool can_fold(const GroupState& s, const at::Tensor& x2, int64_t spare) {
  if (!g_fold.load() || spare < s.ranks || s.ranks == 0 || s.in % 8 != 0 || x2.stride(0) < s.in + spare) return false;
  const int64_t end = x2.storage_offset() + (x2.size(0) - 1) * x2.stride(0) + s.in + s.ranks;
  return end * static_cast<int64_t>(x2.element_size()) <= static_cast<int64_t>(x2.storage().nbytes());
}

// The backward of the adapters' inputs under dropout by counters: dA_i = dxa_i^T h_i with x masked by the
// forward's keep bits as it loads (kernels/lora_dropout_mm.cu; else from the dropped copies of x made again from
// the bits, kernels/lora_dropout.cu), then dx = sum_i keep_i (dxa_i A_i) / (1 - p_i) over the dropped members,
// formed tile by tile through the masks by one kernel (lora_dropout_mm.cu's dx; else each product written to a
// buffer of the copies' size by cuBLAS and summed through its mask by one pass); a member without dropout adds
// dxa_i A_i as is. Returns dx (undefined unless need_dx); the A's gradients go into grads.
at::Tensor counter_dropout_backward(AutogradContext* ctx, const GroupState& st, const at::Tensor& x2,
                                    const at::Tensor& mask, const at::Tensor& dxa, const at::Tensor& a_cat,
                                    bool need_dx, variable_list& grads) {
#ifdef QLORA_WITH_CUDA
  const std::vector<kernels::DropoutMmMember> mm = dropped_members(st, a_cat);  // their A's: dx's kernel reads them
  std::vector<double> p;  // the dropped members'
  for (const auto& m : mm) p.push_back(m.p);
  bool need_da = false;
  for (const auto& m : st.members) need_da = need_da || (m.lora >= 0 && ctx->needs_input_grad(1 + 2 * m.lora));
  const int64_t n = x2.size(0), k = static_cast<int64_t>(p.size()), rank = dropped_rank(st);
  // The dropped members' dA from x and the bits in one pass (no copies), where the kernel takes the shapes.
  std::vector<at::Tensor> da;
  if (k > 0 && need_da && dropout_mm(x2, mm, rank, dxa)) {
    da = kernels::lora_dropout_da_cuda(x2, mask, dxa, mm, rank);
    g_dropout_mm_calls.fetch_add(1, std::memory_order_relaxed);
  }
  const bool dx_kernel = k > 0 && need_dx && g_dropout_dx.load() && kernels::lora_dropout_dx_supported(dxa, mm, rank);
  at::Tensor buf;  // the dropped copies (for dA without the kernel), then the dropped members' dxa_i A_i
  if (k > 0 && need_da && da.empty()) buf = kernels::lora_dropout_apply_cuda(x2, mask, p);
  else if (k > 0 && need_dx && !dx_kernel) buf = at::empty({k, n, st.in}, x2.options());
  int64_t d = 0;
  for (const auto& m : st.members) {
    if (m.lora < 0) continue;
    const int64_t i = m.dropout > 0.0 ? d++ : -1;
    if (!ctx->needs_input_grad(1 + 2 * m.lora)) continue;
    grads[1 + 2 * m.lora] = i < 0 ? mm_float(dxa.narrow(1, m.col, m.rank).t(), x2)
                            : !da.empty() ? da[i]
                                          : mm_float(dxa.narrow(1, m.col, m.rank).t(), buf[i]);
  }
  if (!need_dx) return {};
  at::Tensor dx;
  if (dx_kernel) {
    dx = kernels::lora_dropout_dx_cuda(dxa, mask, mm, rank);
    g_dropout_dx_calls.fetch_add(1, std::memory_order_relaxed);
  } else {
    d = 0;
    for (const auto& m : st.members) {
      if (m.lora < 0 || m.dropout == 0.0) continue;
      at::Tensor out = buf[d++];
      at::mm_out(out, dxa.narrow(1, m.col, m.rank), a_cat.narrow(0, m.col, m.rank));
    }
    dx = k > 0 ? kernels::lora_dropout_bwd_cuda(buf, mask, p) : at::zeros({n, st.in}, x2.options());
  }
  for (const auto& m : st.members)
    if (m.lora >= 0 && m.dropout == 0.0) dx.addmm_(dxa.narrow(1, m.col, m.rank), a_cat.narrow(0, m.col, m.rank));
  return dx;
#else
  (void)ctx, (void)st, (void)x2, (void)mask, (void)dxa, (void)a_cat, (void)need_dx, (void)grads;
  TORCH_CHECK(false, "dropout by counters needs the CUDA kernels");
#endif
}

// The LoRA branches ride on the base GEMM instead of costing passes over the activations of their own.
// With bd = the block-diagonal [s_0 B_0; s_1 B_1; ...] (block_diag_into) and a_cat = [A_0; A_1; ...]:
//   forward   xa = x a_cat^T            one GEMM for the group (x read once), [n, ranks];
//             folded (the producer of x left `spare` columns right of its rows, fused.h): xa is written
//             there and the base GEMM runs on the extended K: y = [x | xa] [W | bd]^T, W dequantized into
//             the first columns of a wider buffer whose last columns get bd, so the branches cost only the
//             extra K columns;
//             else y = xa bd^T, then y += x W^T (the base GEMM accumulating onto it, beta 1);
//   backward  dxa = dy bd (one GEMM for the group), dB_i = s_i dy_i^T xa_i, dA = dxa^T x (one GEMM, x read
//             once), dx = dxa a_cat, then dx += dy W (beta 1 again).
// With dropout each adapted member reads its own masked copy of x: its x A_i^T, dA_i and input gradient
// are then computed per member (the masks are drawn in the modules' order, so the same seed gives the same
// step as the per-projection path).
struct ProjectionGroupFunction : public torch::autograd::Function<ProjectionGroupFunction> {
  // x [..., in]; lora = A0, B0, A1, B1, ... for the adapted members in order (float32); spare: see fused.h.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList lora,
                            const c10::intrusive_ptr<GroupState>& st, int64_t spare) {
    const auto dt = x.scalar_type();
    // Detached: x may be a view (of a producer's wider buffer) whose spare columns are written below.
    const at::Tensor x2 = as_rows(x.detach(), st->in);  // [n, in]
    const int64_t n = x2.size(0);
    auto out_sizes = x.sizes().vec();
    out_sizes.back() = st->total;
    at::Tensor y = at::empty(out_sizes, x.options());
    at::Tensor y2 = y.view({n, st->total});
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    // Backward dequantizes the weights again, unless a recomputation asked to keep them.
    const bool compute_y = st->output_needed;
    if (st->ranks == 0) {  // no adapter: backward needs only the weights
      at::Tensor kept;
      if (compute_y) {
        const at::Tensor w = dequantize_group(*st, dt, x.device(), 0, forward_phase());
        at::mm_out(y2, x2, w.t());
        if (t_keep_weights) kept = w;
      }
      ctx->save_for_backward({kept});
      return y;
    }
    st->folded = compute_y && can_fold(*st, x2, spare);
    std::vector<at::Tensor> as;
    for (size_t i = 0; i < lora.size(); i += 2) as.push_back(lora[i]);
    const at::Tensor a_cat = adapter_casts().get(as, dt);  // [ranks, in]
    at::Tensor w, bd, kept;
    at::Tensor xa = st->folded ? x2.as_strided({n, st->ranks}, {x2.stride(0), 1}, x2.storage_offset() + st->in)
                               : at::empty({n, st->ranks}, x.options());
    // x A^T before the weights are asked for: it needs none of them, so it runs while the dequantization done
    // ahead finishes (the request makes the step's stream wait for that work; ~25 us a group before).
    if (!st->any_dropout) at::mm_out(xa, x2, a_cat.t());
    // Dropout by counters (CUDA): the dropped members' keep bits [dropped, n, in / 8], kept for the backward
    // (saved last), and their x A^T from x and the bits (kernels/lora_dropout_mm.cu), before the weights too;
    // where that kernel does not take the shapes, every dropped member's copy of x in one pass, [dropped, n,
    // in], multiplied below. Else ATen's dropout, a byte mask kept per member; its masks are drawn on
    // contiguous rows: it assigns its random numbers by layout, and the same seed must give the same masks
    // whether or not x's producer left spare columns (the modules' masks, and a recomputation's, where
    // down_proj's input has none).
    const bool counters = st->any_dropout && counter_dropout(x2);
    at::Tensor dropped, keep_bits, xc;
    bool masked_mm = false;  // the dropped members' x A^T made here
#ifdef QLORA_WITH_CUDA
    if (counters) {
      const std::vector<kernels::DropoutMmMember> mm = dropped_members(*st, a_cat);
      std::vector<kernels::DropoutDraw> draws;  // in the modules' order, as they would draw them
      for (const auto& m : mm) draws.push_back(draw_dropout(x2, m.p));
      masked_mm = !mm.empty() && dropout_mm(x2, mm, dropped_rank(*st));
      if (masked_mm) {
        keep_bits = kernels::lora_dropout_draw_cuda(x2, draws);
        kernels::lora_dropout_xa_cuda(x2, keep_bits, mm, xa);
        g_dropout_mm_calls.fetch_add(1, std::memory_order_relaxed);
      } else if (!draws.empty()) {
        std::tie(dropped, keep_bits) = kernels::lora_dropout_fwd_cuda(x2, draws);
      }
      ctx->saved_data["counter_dropout"] = true;
    }
#endif
    if (st->folded) {
      // W_ext = [W | bd]: rows 8-element aligned for the dequantize kernel's pitched stores.
      const at::Tensor buffer =
          dequantize_group(*st, dt, x.device(), round_up8(st->in + st->ranks), forward_phase(), lora);
      w = buffer.narrow(1, 0, st->in + st->ranks);
      if (t_keep_weights) kept = w, bd = buffer.narrow(1, st->in, st->ranks);  // else backward builds bd again
      g_folded.fetch_add(1, std::memory_order_relaxed);
    } else {
      bd = at::empty({st->total, st->ranks}, x.options());
      block_diag_into(*st, lora, bd);
      if (compute_y) {
        w = dequantize_group(*st, dt, x.device(), 0, forward_phase());
        if (t_keep_weights) kept = w;
      }
    }
    variable_list saved{kept, x2, xa, a_cat, bd};
    if (st->any_dropout && !counters) xc = x2.contiguous();
    int64_t d = 0;  // the next dropped copy
    for (const auto& m : st->members) {
      if (m.lora < 0) continue;
      at::Tensor mask;
      if (st->any_dropout && !(masked_mm && m.dropout > 0.0)) {  // (else its x A^T is made)
        at::Tensor h = counters ? x2 : xc;
        if (m.dropout > 0.0) {
          if (counters) h = dropped[d++];
          else std::tie(h, mask) = at::native_dropout(xc, m.dropout, /*train=*/true);
        }
        mm_into(xa.narrow(1, m.col, m.rank), h, a_cat.narrow(0, m.col, m.rank).t(), 1.0);
      }
      saved.insert(saved.end(), {lora[2 * m.lora + 1], mask});
    }
    if (counters) saved.push_back(keep_bits);
    if (st->folded) {
      at::mm_out(y2, x2.as_strided({n, st->in + st->ranks}, x2.strides(), x2.storage_offset()), w.t());
    } else if (compute_y) {
      at::mm_out(y2, xa, bd.t());
      y2.addmm_(x2, w.t());
    }
    ctx->save_for_backward(saved);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto st = c10::static_intrusive_pointer_cast<GroupState>(ctx->saved_data["state"].toCapsule());
    // The kept weights (or none), then with adapters x2, xa, a_cat, bd (undefined when folded without kept
    // weights) and (B, mask) per adapted member, in the order of their lora index: member m's B is
    // saved[5 + 2 m.lora], its mask the one after (ATen's dropout), and last, with dropout by counters, the
    // dropped members' keep bits.
    const auto saved = ctx->get_saved_variables();
    const at::Tensor dy = grad[0].reshape({-1, st->total}).contiguous();  // [n, total]
    const int64_t n = dy.size(0);
    const bool need_dx = ctx->needs_input_grad(0);
    int64_t lora_count = 0;
    for (const auto& m : st->members) lora_count += m.lora >= 0;
    variable_list grads(1 + 2 * lora_count + 2);  // x, each A and B, and the (non-tensor) state and spare
    at::Tensor dx;
    if (st->ranks > 0) {
      const at::Tensor &x2 = saved[1], &xa = saved[2], &a_cat = saved[3];
      at::Tensor dxa;              // gradient of xa, [n, ranks]
      std::vector<at::Tensor> db;  // the adapted members' dB, in order, when one kernel made them with dxa
#ifdef QLORA_WITH_CUDA
      if (g_lora_grad_kernel.load() && dy.is_cuda()) {  // dy read once for dxa and every dB
        std::vector<kernels::LoraGradMember> lg;
        for (const auto& m : st->members)
          if (m.lora >= 0) lg.push_back({saved[5 + 2 * m.lora], m.offset, m.col, m.scaling});
        if (kernels::lora_grad_supported(dy, xa, lg)) std::tie(dxa, db) = kernels::lora_grad_cuda(dy, xa, lg);
      }
#endif
      if (!dxa.defined()) {
        at::Tensor bd = saved[4];
        if (!bd.defined()) {  // folded: the operand went with the dequantized weights
          // Built here, not made ahead beside W as in the forward: the backward needs it before its first
          // GEMM, and requesting W_ext that early left the work ahead less time (slower: docs/performance.md).
          std::vector<at::Tensor> lora(2 * lora_count);
          for (const auto& m : st->members)
            if (m.lora >= 0) lora[2 * m.lora + 1] = saved[5 + 2 * m.lora];
          bd = at::empty({st->total, st->ranks}, dy.options());
          block_diag_into(*st, lora, bd);
        }
        dxa = at::mm(dy, bd);
      }
      bool need_da = false;
      size_t adapted = 0;
      for (const auto& m : st->members) {
        if (m.lora < 0) continue;
        if (ctx->needs_input_grad(2 + 2 * m.lora)) {
          grads[2 + 2 * m.lora] = !db.empty() ? db[adapted] : mm_float(dy.narrow(1, m.offset, m.out).t(),
                                                                       xa.narrow(1, m.col, m.rank), m.scaling);
        }
        ++adapted;
        need_da = need_da || ctx->needs_input_grad(1 + 2 * m.lora);
      }
      if (!st->any_dropout) {
        if (need_da) {
          const at::Tensor da = mm_float(dxa.t(), x2);  // [ranks, in]
          for (const auto& m : st->members)
            if (m.lora >= 0 && ctx->needs_input_grad(1 + 2 * m.lora)) grads[1 + 2 * m.lora] = da.narrow(0, m.col, m.rank);
        }
        if (need_dx) dx = at::mm(dxa, a_cat);  // [n, in]; the base GEMM below adds onto it
      } else if (ctx->saved_data.count("counter_dropout") > 0) {
        dx = counter_dropout_backward(ctx, *st, x2, saved.back(), dxa, a_cat, need_dx, grads);
      } else {
        if (need_dx) dx = at::zeros({n, st->in}, dy.options());
        for (const auto& m : st->members) {
          if (m.lora < 0) continue;
          const at::Tensor& mask = saved[6 + 2 * m.lora];
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
      at::Tensor w = saved[0];
      if (!w.defined()) w = dequantize_group(*st, dy.scalar_type(), dy.device(), 0, /*phase=*/0);
      else if (st->folded) w = w.narrow(1, 0, st->in);  // W_ext = [W | bd]
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
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gu, int64_t spare) {
    const at::Tensor c = gu.contiguous();
    ctx->save_for_backward({c});
    return kernels::swiglu_packed_fwd_cuda(c, spare);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {kernels::swiglu_packed_bwd_cuda(grad[0].contiguous(), ctx->get_saved_variables()[0]), at::Tensor()};
  }
};
#endif

}  // namespace

KeepDequantizedWeights::KeepDequantizedWeights() : previous_(t_keep_weights) { t_keep_weights = true; }
KeepDequantizedWeights::~KeepDequantizedWeights() { t_keep_weights = previous_; }

void set_fused_mode(FusedMode mode) { g_mode.store(mode); }
FusedMode fused_mode() { return g_mode.load(); }
void refresh_adapter_casts() { adapter_casts().refresh(); }
void set_dequant_ahead(DequantAhead mode) { g_ahead.store(mode); }
DequantAhead dequant_ahead_mode() { return g_ahead.load(); }
void set_dequant_ahead_depth(int groups) {
  TORCH_CHECK(groups >= 1, "set_dequant_ahead_depth: at least one group, got ", groups);
  g_ahead_depth.store(groups);
}
void settle_dequant_ahead() {
#ifdef QLORA_WITH_CUDA
  dequant_ahead().settle();
#endif
}
int64_t dequant_ahead_hits() { return g_ahead_hits.load(std::memory_order_relaxed); }
void set_fold_adapters(bool on) { g_fold.store(on); }
bool fold_adapters() { return g_fold.load(); }
void set_counter_dropout(bool on) { g_counter_dropout.store(on); }
void set_dropout_mm_kernels(bool on) { g_dropout_mm.store(on); }
void set_dropout_dx_kernel(bool on) { g_dropout_dx.store(on); }
void set_lora_grad_kernel(bool on) { g_lora_grad_kernel.store(on); }

#ifdef QLORA_WITH_CUDA
struct StepStream::Impl {
  c10::cuda::CUDAStream caller;
  std::optional<c10::cuda::CUDAStreamGuard> guard;
};
#else
struct StepStream::Impl {};
#endif

StepStream::StepStream(at::Device device) {
#ifdef QLORA_WITH_CUDA
  const DequantAhead mode = g_ahead.load();
  if (!device.is_cuda() || (mode != DequantAhead::Low && mode != DequantAhead::High)) return;
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device.index());
  const c10::cuda::CUDAStream step = step_stream(device.index());
  if (caller == step) return;  // nested
  at::cuda::CUDAEvent queued;
  queued.record(caller);
  queued.block(step);
  impl_.reset(new Impl{caller, std::nullopt});
  impl_->guard.emplace(step);
#else
  (void)device;
#endif
}

StepStream::~StepStream() {
#ifdef QLORA_WITH_CUDA
  if (!impl_) return;
  at::cuda::CUDAEvent done;
  done.record(c10::cuda::getCurrentCUDAStream(impl_->caller.device_index()));
  done.block(impl_->caller);
#endif
}

namespace {
// The group's state for inputs of `in` features in x's dtype on x's device, its adapters appended to lora;
// null when the fused path does not apply.
c10::intrusive_ptr<GroupState> group_state(const std::vector<const Linear*>& group, const at::Tensor& x, int64_t in,
                                           std::vector<at::Tensor>& lora) {
  if (group.empty() || !x.defined() || x.dim() < 1 || !applies(x)) return {};
  auto st = c10::make_intrusive<GroupState>();
  st->in = in;
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
  return st;
}
}  // namespace

int64_t adapter_columns(const std::vector<const Linear*>& group, const at::Tensor& like) {
  const Quant4Linear* first = group.empty() || !group[0] ? nullptr : group[0]->frozen_4bit();
  if (!first) return 0;
  std::vector<at::Tensor> lora;
  const auto st = group_state(group, like, first->in_features(), lora);
  if (!st || st->ranks == 0 || st->in % 8 != 0 || !g_fold.load()) return 0;
  return round_up8(st->ranks);
}

at::Tensor fused_projections(const std::vector<const Linear*>& group, const at::Tensor& x, bool output_needed,
                             int64_t spare) {
  if (!x.defined() || x.dim() < 1) return {};
  std::vector<at::Tensor> lora;
  auto st = group_state(group, x, x.size(-1), lora);
  if (!st) return {};
  st->output_needed = output_needed;
  // As a TensorList (not the vector) so that autograd sees the adapters as inputs.
  return ProjectionGroupFunction::apply(x, at::TensorList(lora), st, spare);
}

at::Tensor project(Linear& l, const at::Tensor& x, bool output_needed, int64_t spare) {
  if (at::Tensor y = fused_projections({&l}, x, output_needed, spare); y.defined()) return y;
  return l.forward(x);
}

at::Tensor lora_dropout(const at::Tensor& x, double p) {
#ifdef QLORA_WITH_CUDA
  if (p > 0.0 && x.dim() >= 1 && counter_dropout(x)) return CounterDropoutFunction::apply(x, p);
#endif
  return at::dropout(x, p, /*train=*/true);
}

at::Tensor with_spare_columns(const at::Tensor& x, int64_t spare) {
  if (spare <= 0 || !x.defined() || x.dim() < 1) return x;
  const int64_t in = x.size(-1), rows = in == 0 ? 0 : x.numel() / in;
  const at::Tensor buffer = at::empty({rows, in + spare}, x.options().requires_grad(false));
  at::Tensor out = buffer.narrow(1, 0, in);
  out.copy_(x.reshape({rows, in}));  // differentiable: the gradient flows back to x
  return out.view(x.sizes());
}

int64_t folded_group_calls() { return g_folded.load(std::memory_order_relaxed); }
int64_t dropout_mm_calls() { return g_dropout_mm_calls.load(std::memory_order_relaxed); }
int64_t dropout_dx_calls() { return g_dropout_dx_calls.load(std::memory_order_relaxed); }

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

at::Tensor swiglu_packed(const at::Tensor& gu, int64_t spare) {
  TORCH_CHECK(gu.dim() >= 1 && gu.size(-1) % 2 == 0, "swiglu_packed: the last dimension must be gate | up");
#ifdef QLORA_WITH_CUDA
  if (gu.is_cuda()) return SwiGLUPackedFunction::apply(gu, spare);
#endif
  const int64_t i = gu.size(-1) / 2;
  return with_spare_columns(at::silu(gu.narrow(-1, 0, i)) * gu.narrow(-1, i, i), spare);
}

}  // namespace qlora::model
