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

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
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
  virtual std::string backend() const = 0;

  // Sums the contiguous `t` over all ranks in place (queued on the current stream on CUDA); every rank ends
  // with the same values.
  virtual void all_reduce_sum(at::Tensor& t) = 0;
  // Rank `root`'s `t` into every rank's `t`.
  virtual void broadcast(at::Tensor& t, int64_t root) = 0;
  // Returns once every rank has called it.
  virtual void barrier() = 0;

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

}  // namespace qlora::dist
