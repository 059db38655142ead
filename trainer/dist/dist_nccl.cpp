// The CUDA group: c10d's ProcessGroupNCCL for the sums and broadcasts (queued on the current stream: the host
// does not wait), the store for the barrier. Built only where nccl.h was found (trainer/dist/CMakeLists.txt).
#ifndef USE_C10D_NCCL  // what ProcessGroupNCCL.hpp needs; Torch's CMake config defines it for a CUDA build
#define USE_C10D_NCCL
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "trainer/dist/dist.h"
#include "trainer/dist/store_rounds.h"

namespace qlora::dist {

namespace {

class NcclGroup final : public Group {
 public:
  NcclGroup(c10::intrusive_ptr<c10d::Store> store, int64_t rank, int64_t world, at::Device device,
            std::chrono::milliseconds timeout)
      : Group(rank, world), device_(device), rounds_(store, rank, world) {
    nodes_ = rounds_.count_hosts();
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    // Its keys apart from the barrier's.
    auto own = c10::make_intrusive<c10d::PrefixStore>("nccl", store);
    pg_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(own, static_cast<int>(rank), static_cast<int>(world), opts);
  }
  ~NcclGroup() override {
    try {
      pg_->shutdown();
    } catch (...) {  // a destructor does not throw; the process is ending anyway
    }
    rounds_.depart(std::chrono::seconds(60));
  }
  std::string backend() const override { return "nccl"; }

  void all_reduce_sum(at::Tensor& t) override {
    check(t);
    std::vector<at::Tensor> v{t};
    pg_->allreduce(v)->wait();  // the current stream waits for the sum, the host does not
  }

  std::function<void()> start_all_reduce_sum(at::Tensor& t) override {
    check(t);
    std::vector<at::Tensor> v{t};
    c10::intrusive_ptr<c10d::Work> work = pg_->allreduce(v);
    return [work] { work->wait(); };
  }

  void broadcast(at::Tensor& t, int64_t root) override {
    check(t);
    std::vector<at::Tensor> v{t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    pg_->broadcast(v, o)->wait();
  }

  void barrier() override { rounds_.exchange({}, /*want_all=*/false); }

 private:
  void check(const at::Tensor& t) const {
    TORCH_CHECK(t.device() == device_ && t.is_contiguous(), "dist: the NCCL group takes contiguous tensors on ",
                device_.str(), ", got ", t.device().str());
  }

  at::Device device_;
  StoreRounds rounds_;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg_;
};

}  // namespace

std::unique_ptr<Group> make_nccl_group(c10::intrusive_ptr<c10d::Store> store, int64_t rank, int64_t world,
                                       at::Device device, std::chrono::milliseconds timeout) {
  return std::make_unique<NcclGroup>(std::move(store), rank, world, device, timeout);
}

}  // namespace qlora::dist
