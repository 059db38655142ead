// Data parallelism across processes: one process a GPU (or several CPU processes), each training on its own
// share of every step's micro-batches, the gradients summed over all of them before the update, so every
// process holds the same weights and takes the same step.
//
// The processes find each other through c10d's TCPStore (rank 0 serves it at MASTER_ADDR:MASTER_PORT). On
// CUDA the sums run through c10d's ProcessGroupNCCL; on the CPU through the store itself (LibTorch ships no
// Gloo headers): each rank posts its tensor and every rank adds all of them in rank order, so all ranks get
// the same bits. That is meant for the small models the CPU path serves, not for bandwidth.
//
// The launchers' environments (what `torchrun --no-python` and SLURM's srun set):
//   torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
//   SLURM:    srun's SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, with MASTER_ADDR and MASTER_PORT exported
//             by the job script (e.g. MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1));
//             a process the batch script starts without srun (no job step) runs alone
// torchrun's variables win where both are set; without either, the process runs alone (world 1).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Stream.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace qlora::dist {

struct Env {
  int64_t rank = 0;
  int64_t world = 1;
  int64_t local_rank = 0;  // the process's index on its node: its GPU
  std::string master_addr;
  int port = 0;
  std::string launcher = "none";  // torchrun | slurm | none
  // torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE): every
  // rank joins it as a client, under the prefix of the agent's restart attempt (as torch's env:// does).
  bool agent_store = false;
  std::string store_prefix;
};

// Reads the launcher's variables through `get` (std::getenv by default). Throws qlora::Error naming the
// variable that is missing or malformed (a rank outside the world, a port outside 1-65535, ...).
Env env_from(const std::function<const char*(const char*)>& get = {});

class Group {
 public:
  Group(int64_t rank, int64_t world) : rank_(rank), world_(world) {}
  virtual ~Group() = default;
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  int64_t rank() const { return rank_; }
  int64_t world() const { return world_; }
  int64_t nodes() const { return nodes_; }  // hosts the ranks run on (their host names, told at the start)
  virtual std::string backend() const = 0;

  // Sums the contiguous `t` over all ranks in place (queued on the current stream on CUDA); every rank ends
  // with the same values.
  virtual void all_reduce_sum(at::Tensor& t) = 0;
  // The same, started: the returned call makes the current stream (the host, on the CPU) wait for the sum.
  // Ranks must start their sums in the same order (NCCL pairs them by order).
  virtual std::function<void()> start_all_reduce_sum(at::Tensor& t) {
    all_reduce_sum(t);
    return [] {};
  }
  // Rank `root`'s `t` into every rank's `t`.
  virtual void broadcast(at::Tensor& t, int64_t root) = 0;
  // Returns once every rank has called it.
  virtual void barrier() = 0;

 protected:
  int64_t nodes_ = 1;  // set by the backends' constructors, through their store

 private:
  int64_t rank_, world_;
};

struct JoinOptions {
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};  // to find the other ranks, and per store wait
};

// Joins the group `env` describes for tensors on `device` (NCCL for CUDA, the store for the CPU); nullptr
// when env.world == 1. A CUDA device must be the one this rank uses (cuda:local_rank, set current).
std::unique_ptr<Group> join(const Env& env, at::Device device, const JoinOptions& opts = {});

// Sums the tensors over the group through one flat float32 buffer: one collective for many small tensors
// (a model's adapters). Undefined entries must not occur; all share one device.
void all_reduce_sum(Group& g, const std::vector<at::Tensor>& tensors);
// Rank root's values of the tensors into every rank's, through one flat buffer likewise.
void broadcast(Group& g, const std::vector<at::Tensor>& tensors, int64_t root);

// GradSync's bucket size for `g`: QLORA_DIST_BUCKET_KB KiB from the environment (the tests use tiny buckets to
// have many), else 25 MiB (DDP's) where the ranks span several hosts, and one bucket for all on one host: there
// (two H200s over NVLink, the 7B step) the sums started during the backward cost more than they hid (0.966x /
// 0.967x of twice one GPU's speed against 0.980x / 0.975x with one sum after it, and likewise in a second call;
// docs/performance.md), the step being bound by the card's power and memory, which the sums' kernels share.
// Throws qlora::Error on a malformed value.
int64_t bucket_bytes(const Group& g);

// The gradients of `params` summed over the group, starting while the backward still runs, as PyTorch's DDP
// does (with one bucket, as bucket_bytes gives on one host, the sum starts with the backward's last gradient). The
// tensors go into buckets of about `bucket_bytes` of float32 in reverse order (a model's last layers, whose
// gradients are final first, in the first bucket). In a backward after arm(), a bucket's sum starts once every
// tensor of it has its gradient accumulated (a hook on each tensor), buckets in a fixed order on every rank;
// finish() starts those left (a tensor without a gradient adds zeros), makes the current stream wait for all
// of them and writes the sums back into the gradients. Each tensor's gradient must be accumulated at most once
// in the armed backward (what a reentrant checkpoint or a reused weight would break is checked). The CUDA
// stream current at arm() is where the buckets are formed and the sums waited for: the step's.
class GradSync {
 public:
  GradSync(Group& g, std::vector<at::Tensor> params, int64_t bucket_bytes);
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  // The next backward is the step's last on this rank. `extra` (float32, one element, e.g. the loss sum) is
  // summed with the last bucket.
  void arm(const at::Tensor& extra);
  // Returns `extra` summed over the ranks; `unarmed_extra` stands for it when no backward was armed.
  at::Tensor finish(const at::Tensor& unarmed_extra);
  int64_t buckets() const { return static_cast<int64_t>(buckets_.size()); }
  // Buckets whose sums have started since arm() (before finish(): those the backward started).
  int64_t started() const { return static_cast<int64_t>(next_); }

 private:
  struct Hook;
  void ready(size_t param);  // from a tensor's hook
  void start(size_t bucket);

  Group& group_;
  std::vector<at::Tensor> params_;
  std::vector<std::vector<size_t>> buckets_;  // indices into params_
  std::vector<size_t> bucket_of_;
  std::vector<char> is_ready_;
  std::vector<size_t> pending_;  // per bucket, tensors not yet ready
  std::vector<at::Tensor> flat_;
  std::vector<std::function<void()>> waits_;
  size_t next_ = 0;  // the next bucket to start
  bool armed_ = false;
  at::Tensor extra_;
  std::optional<c10::Stream> stream_;
};

}  // namespace qlora::dist
