#include "trainer/dist/dist.h"

#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "trainer/core/error.h"
#include "trainer/dist/store_rounds.h"

namespace qlora::dist {

namespace {

int64_t parse_int(const char* var, const char* text, int64_t lo, int64_t hi) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text, &end, 10);
  QLORA_REQUIRE(errno == 0 && end != text && *end == '\0' && v >= lo && v <= hi,
                "environment variable {}={:?}: expected an integer from {} to {}", var, text, lo, hi);
  return v;
}

// The CPU group: every collective is one store round (store_rounds.h).
class StoreGroup final : public Group {
 public:
  StoreGroup(c10::intrusive_ptr<c10d::Store> store, int64_t rank, int64_t world)
      : Group(rank, world), rounds_(std::move(store), rank, world) {
    nodes_ = rounds_.count_hosts();
  }
  ~StoreGroup() override { rounds_.depart(std::chrono::seconds(60)); }
  std::string backend() const override { return "store (CPU)"; }

  void all_reduce_sum(at::Tensor& t) override {
    TORCH_CHECK(t.is_cpu() && t.is_contiguous(), "dist: the CPU group sums contiguous CPU tensors");
    const auto parts = rounds_.exchange(bytes_of(t), /*want_all=*/true);
    // In rank order on every rank: the same sum, to the bit, everywhere.
    at::Tensor sum;
    for (size_t r = 0; r < parts.size(); ++r) {
      at::Tensor part = tensor_of(parts[r], t, static_cast<int64_t>(r));
      sum = r == 0 ? part.clone() : sum.add_(part);
    }
    t.copy_(sum);
  }

  void broadcast(at::Tensor& t, int64_t root) override {
    TORCH_CHECK(t.is_cpu() && t.is_contiguous(), "dist: the CPU group broadcasts contiguous CPU tensors");
    const bool mine = root == rank();
    const auto parts = rounds_.exchange(mine ? bytes_of(t) : std::vector<uint8_t>{}, /*want_all=*/false, root);
    if (!mine) t.copy_(tensor_of(parts[0], t, root));
  }

  void barrier() override { rounds_.exchange({}, /*want_all=*/false, /*from=*/0); }

 private:
  static std::vector<uint8_t> bytes_of(const at::Tensor& t) {
    const auto* p = static_cast<const uint8_t*>(t.const_data_ptr());
    return std::vector<uint8_t>(p, p + t.nbytes());
  }
  static at::Tensor tensor_of(const std::vector<uint8_t>& b, const at::Tensor& like, int64_t from) {
    TORCH_CHECK(b.size() == like.nbytes(), "dist: rank ", from, " sent ", b.size(), " bytes, expected ",
                like.nbytes(), " (do all ranks run the same model and config?)");
    return at::from_blob(const_cast<uint8_t*>(b.data()), like.sizes(), like.options()).clone();
  }

  StoreRounds rounds_;
};

}  // namespace

#ifdef QLORA_WITH_NCCL
std::unique_ptr<Group> make_nccl_group(c10::intrusive_ptr<c10d::Store> store, int64_t rank, int64_t world,
                                       at::Device device, std::chrono::milliseconds timeout);
#endif

Env env_from(const std::function<const char*(const char*)>& get) {
  auto var = [&](const char* k) -> const char* {
    const char* v = get ? get(k) : std::getenv(k);
    return v && *v ? v : nullptr;
  };
  auto need = [&](const char* k, const char* why) -> const char* {
    const char* v = var(k);
    QLORA_REQUIRE(v, "environment variable {} is not set ({})", k, why);
    return v;
  };
  constexpr int64_t kMaxRanks = 1 << 20;
  Env e;
  if (var("RANK") || var("WORLD_SIZE")) {
    e.launcher = "torchrun";
    e.world = parse_int("WORLD_SIZE", need("WORLD_SIZE", "RANK is set: a torchrun-style launch"), 1, kMaxRanks);
    e.rank = parse_int("RANK", need("RANK", "WORLD_SIZE is set: a torchrun-style launch"), 0, e.world - 1);
    const char* local = var("LOCAL_RANK");
    e.local_rank = local ? parse_int("LOCAL_RANK", local, 0, e.world - 1) : (e.world == 1 ? 0 : -1);
    QLORA_REQUIRE(e.local_rank >= 0, "environment variable LOCAL_RANK is not set (WORLD_SIZE is {})", e.world);
    const char* agent = var("TORCHELASTIC_USE_AGENT_STORE");
    e.agent_store = agent && (std::strcmp(agent, "True") == 0 || std::strcmp(agent, "true") == 0 ||
                              std::strcmp(agent, "1") == 0);
    if (e.agent_store) {
      const char* attempt = var("TORCHELASTIC_RESTART_COUNT");
      e.store_prefix = fmt::format("/worker/attempt_{}", attempt ? attempt : "0");
    }
  } else if (var("SLURM_STEP_NUM_TASKS")) {
    // A task srun started. (A batch script's own shell has SLURM_PROCID 0 and the allocation's SLURM_NTASKS
    // too, but no job step: a process it starts directly runs alone.)
    e.launcher = "slurm";
    e.world = parse_int("SLURM_STEP_NUM_TASKS", var("SLURM_STEP_NUM_TASKS"), 1, kMaxRanks);
    e.rank = parse_int("SLURM_PROCID", need("SLURM_PROCID", "SLURM_STEP_NUM_TASKS is set"), 0, e.world - 1);
    e.local_rank = parse_int("SLURM_LOCALID", need("SLURM_LOCALID", "SLURM_STEP_NUM_TASKS is set"), 0, e.world - 1);
  }
  if (e.world > 1) {
    const std::string why = fmt::format("{} ranks ({}): where rank 0 serves the rendezvous", e.world, e.launcher);
    e.master_addr = need("MASTER_ADDR", why.c_str());
    e.port = static_cast<int>(parse_int("MASTER_PORT", need("MASTER_PORT", why.c_str()), 1, 65535));
  }
  return e;
}

std::unique_ptr<Group> join(const Env& env, at::Device device, const JoinOptions& opts) {
  if (env.world <= 1) return nullptr;
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.port);
  so.isServer = env.rank == 0 && !env.agent_store;
  so.numWorkers = static_cast<size_t>(env.world);
  so.waitWorkers = true;
  so.timeout = opts.timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    fail("rank {} of {} could not join the rendezvous at {}:{} ({}): {}", env.rank, env.world, env.master_addr,
         env.port, env.launcher, e.what());
  }
  if (!env.store_prefix.empty()) store = c10::make_intrusive<c10d::PrefixStore>(env.store_prefix, store);
  if (device.is_cuda()) {
#ifdef QLORA_WITH_NCCL
    return make_nccl_group(store, env.rank, env.world, device, opts.timeout);
#else
    fail("this build has no NCCL (nccl.h was not found when it was configured): it cannot train on several GPUs");
#endif
  }
  QLORA_REQUIRE(device.is_cpu(), "dist: no collective backend for device {}", device.str());
  return std::make_unique<StoreGroup>(store, env.rank, env.world);
}

namespace {
// One flat float32 buffer holding the tensors end to end, on their device.
at::Tensor flatten(const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(!tensors.empty(), "dist: nothing to reduce");
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.defined() && t.device() == tensors[0].device(), "dist: tensors must be defined, on one device");
    flat.push_back(t.detach().reshape(-1).to(at::kFloat));
  }
  return at::cat(flat);
}

void unflatten(const at::Tensor& flat, const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> dst, src;
  int64_t at_ = 0;
  for (const auto& t : tensors) {
    dst.push_back(t.detach());
    src.push_back(flat.narrow(0, at_, t.numel()).view(t.sizes()));
    at_ += t.numel();
  }
  at::NoGradGuard no_grad;
  at::_foreach_copy_(dst, src);  // one launch on the GPU, casting back where a tensor is not float32
}
}  // namespace

void all_reduce_sum(Group& g, const std::vector<at::Tensor>& tensors) {
  at::Tensor flat = flatten(tensors);
  g.all_reduce_sum(flat);
  unflatten(flat, tensors);
}

void broadcast(Group& g, const std::vector<at::Tensor>& tensors, int64_t root) {
  at::Tensor flat = flatten(tensors);
  g.broadcast(flat, root);
  unflatten(flat, tensors);
}

int64_t bucket_bytes(const Group& g) {
  const char* kb = std::getenv("QLORA_DIST_BUCKET_KB");
  if (kb && *kb) return parse_int("QLORA_DIST_BUCKET_KB", kb, 1, int64_t{1} << 30) << 10;
  return g.nodes() > 1 ? int64_t{25} << 20 : std::numeric_limits<int64_t>::max();
}

struct GradSync::Hook final : torch::autograd::PostAccumulateGradHook {
  Hook(GradSync* sync, size_t param) : sync(sync), param(param) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override { sync->ready(param); }
  GradSync* sync;
  size_t param;
};

GradSync::GradSync(Group& g, std::vector<at::Tensor> params, int64_t bucket_bytes)
    : group_(g), params_(std::move(params)) {
  TORCH_CHECK(!params_.empty(), "GradSync: no tensors");
  bucket_of_.resize(params_.size());
  int64_t bytes = bucket_bytes;  // the first tensor opens a bucket
  for (size_t k = params_.size(); k-- > 0;) {
    if (bytes >= bucket_bytes) buckets_.emplace_back(), bytes = 0;
    buckets_.back().push_back(k);
    bucket_of_[k] = buckets_.size() - 1;
    bytes += params_[k].numel() * static_cast<int64_t>(sizeof(float));
  }
  for (size_t k = 0; k < params_.size(); ++k)
    torch::autograd::impl::set_post_acc_grad_hooks(params_[k], std::make_unique<Hook>(this, k));
}

GradSync::~GradSync() {
  for (auto& p : params_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradSync::arm(const at::Tensor& extra) {
  TORCH_CHECK(!armed_, "GradSync: armed twice without finish()");
  armed_ = true;
  extra_ = extra.detach().to(params_[0].device(), at::kFloat).reshape({1});
  is_ready_.assign(params_.size(), 0);
  pending_.clear();
  for (const auto& b : buckets_) pending_.push_back(b.size());
  flat_.assign(buckets_.size(), at::Tensor());
  waits_.assign(buckets_.size(), {});
  next_ = 0;
  const at::Device d = params_[0].device();
  stream_.reset();
  if (!d.is_cpu()) stream_ = c10::impl::VirtualGuardImpl(d.type()).getStream(d);
}

void GradSync::ready(size_t k) {
  if (!armed_) return;  // an accumulation before the step's last backward
  TORCH_CHECK(!is_ready_[k], "GradSync: tensor ", k, " had its gradient accumulated twice in one armed backward ",
              "(a reused weight or a reentrant recomputation): its sum would have started on a partial gradient");
  is_ready_[k] = 1;
  if (--pending_[bucket_of_[k]] > 0) return;
  while (next_ < buckets_.size() && pending_[next_] == 0) start(next_++);
}

void GradSync::start(size_t b) {
  std::optional<c10::StreamGuard> on_step;
  if (stream_) {
    // The hook runs on the stream that accumulated the gradient (the autograd engine's choice): the step's
    // stream waits for that accumulation, and the bucket is formed and handed to the sum there.
    const c10::impl::VirtualGuardImpl impl(stream_->device_type());
    const c10::Stream now = impl.getStream(stream_->device());
    if (now != *stream_) {
      c10::Event accumulated(stream_->device_type());
      accumulated.record(now);
      accumulated.block(*stream_);
    }
    on_step.emplace(*stream_);
  }
  std::vector<at::Tensor> parts;
  for (size_t k : buckets_[b]) {
    const at::Tensor& g = params_[k].grad();
    parts.push_back(g.defined() ? g : at::zeros_like(params_[k], params_[k].options().dtype(at::kFloat)));
  }
  if (b + 1 == buckets_.size()) parts.push_back(extra_);
  flat_[b] = flatten(parts);
  waits_[b] = group_.start_all_reduce_sum(flat_[b]);
}

at::Tensor GradSync::finish(const at::Tensor& unarmed_extra) {
  if (!armed_) arm(unarmed_extra);  // no backward on this rank: its zeros, in the same order as the others'
  while (next_ < buckets_.size()) start(next_++);
  armed_ = false;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    waits_[b]();
    std::vector<at::Tensor> grads;
    for (size_t k : buckets_[b]) {
      at::Tensor& g = params_[k].mutable_grad();
      if (!g.defined()) g = at::empty_like(params_[k]);
      grads.push_back(g);
    }
    unflatten(flat_[b], grads);  // the gradients' part: the last bucket's extra stays at its end
  }
  const at::Tensor& last = flat_.back();
  at::Tensor extra = last.narrow(0, last.numel() - 1, 1).reshape({});
  flat_.clear();
  waits_.clear();
  return extra;
}

}  // namespace qlora::dist
