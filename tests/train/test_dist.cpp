// trainer/dist on its own, in one process: the launchers' environments read (and refused) as dist::env_from
// reads them, and three ranks as three threads joined through a TCPStore on the loopback interface (the CPU
// group): sums in rank order to the bit, broadcasts, barriers, and GradSync's buckets started from the
// backward's hooks in one order on every rank, with an error (not a partial sum) when a gradient is
// accumulated twice in the armed backward. The CLI's end-to-end runs are tests/train/test_distributed*.py.
#include <gtest/gtest.h>

#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <map>
#include <thread>

#include "tests/test_util.h"
#include "trainer/core/error.h"
#include "trainer/dist/dist.h"

namespace qlora::dist {
namespace {

Env env_of(const std::map<std::string, std::string>& vars) {
  return env_from([&](const char* k) -> const char* {
    auto it = vars.find(k);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

void expect_refused(const std::map<std::string, std::string>& vars, const std::string& names) {
  try {
    env_of(vars);
    ADD_FAILURE() << "accepted an environment that should name " << names;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(names), std::string::npos) << e.what();
  }
}

TEST(DistEnv, ReadsTheLaunchers) {
  const Env alone = env_of({});
  EXPECT_EQ(alone.world, 1);
  EXPECT_EQ(alone.launcher, "none");

  const Env t = env_of({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "node0"},
                        {"MASTER_PORT", "29500"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                        {"TORCHELASTIC_RESTART_COUNT", "2"}});
  EXPECT_EQ(t.launcher, "torchrun");
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.world, 8);
  EXPECT_EQ(t.local_rank, 1);
  EXPECT_EQ(t.master_addr, "node0");
  EXPECT_EQ(t.port, 29500);
  EXPECT_TRUE(t.agent_store);
  EXPECT_EQ(t.store_prefix, "/worker/attempt_2");  // what torch's env:// rendezvous uses under the agent

  const Env s = env_of({{"SLURM_PROCID", "5"}, {"SLURM_STEP_NUM_TASKS", "16"}, {"SLURM_NTASKS", "32"},
                        {"SLURM_LOCALID", "1"}, {"MASTER_ADDR", "n1"}, {"MASTER_PORT", "1234"}});
  EXPECT_EQ(s.launcher, "slurm");
  EXPECT_EQ(s.world, 16);  // the job step's tasks, not the allocation's
  EXPECT_EQ(s.rank, 5);
  EXPECT_EQ(s.local_rank, 1);
  EXPECT_FALSE(s.agent_store);

  // A batch script's own shell: no job step, so alone.
  EXPECT_EQ(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "0"}}).world, 1);
  // torchrun with one process needs no rendezvous.
  EXPECT_EQ(env_of({{"RANK", "0"}, {"WORLD_SIZE", "1"}}).world, 1);
}

TEST(DistEnv, RefusesWhatDoesNotAddUp) {
  expect_refused({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}, "MASTER_ADDR");
  expect_refused({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "h"}}, "MASTER_PORT");
  expect_refused({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}, "RANK=\"2\"");
  expect_refused({{"RANK", "x"}, {"WORLD_SIZE", "2"}}, "RANK=\"x\"");
  expect_refused({{"RANK", "0"}, {"WORLD_SIZE", "0"}}, "WORLD_SIZE=\"0\"");
  expect_refused({{"RANK", "1"}, {"WORLD_SIZE", "2"}}, "LOCAL_RANK is not set");
  expect_refused({{"WORLD_SIZE", "2"}}, "RANK is not set");
  expect_refused({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "h"},
                  {"MASTER_PORT", "70000"}},
                 "MASTER_PORT=\"70000\"");
  expect_refused({{"SLURM_STEP_NUM_TASKS", "2"}, {"SLURM_LOCALID", "0"}}, "SLURM_PROCID");
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t n = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n);
  ::close(fd);
  return ntohs(a.sin_port);
}

// Runs body(group) as `world` ranks, one thread each, joined on the loopback interface; rethrows the first
// failure.
void as_ranks(int world, const std::function<void(Group&)>& body) {
  const int port = free_port();
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        Env e;
        e.rank = r, e.world = world, e.local_rank = r, e.master_addr = "127.0.0.1", e.port = port;
        e.launcher = "test";
        JoinOptions o;
        o.timeout = std::chrono::seconds(60);
        const std::unique_ptr<Group> g = join(e, at::kCPU, o);
        ASSERT_TRUE(g);
        EXPECT_EQ(g->nodes(), 1);
        body(*g);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Rank r's values, the same on every call.
at::Tensor values(int64_t r, int64_t n, int64_t salt = 0) {
  return at::randn({n}, at::make_generator<at::CPUGeneratorImpl>(100 * r + salt));
}

TEST(DistStoreGroup, SumsInRankOrderBroadcastsAndWaits) {
  constexpr int kWorld = 3;
  at::Tensor expected = values(0, 1000).clone();
  for (int r = 1; r < kWorld; ++r) expected.add_(values(r, 1000));  // the left fold every rank must compute
  as_ranks(kWorld, [&](Group& g) {
    for (int round = 0; round < 5; ++round) {  // rounds reuse the store; earlier keys are dropped as they go
      at::Tensor t = values(g.rank(), 1000);
      g.all_reduce_sum(t);
      EXPECT_TRUE(test::same_bits(t, expected));
      g.barrier();
    }
    at::Tensor b = g.rank() == 1 ? values(7, 64) : at::zeros({64});
    g.broadcast(b, 1);
    EXPECT_TRUE(test::same_bits(b, values(7, 64)));
    // Many tensors through one flat buffer, one of them double (cast there and back).
    std::vector<at::Tensor> ts{values(g.rank(), 10, 1), values(g.rank(), 3, 2).to(at::kDouble)};
    all_reduce_sum(g, ts);
    at::Tensor sum0 = values(0, 10, 1) + values(1, 10, 1) + values(2, 10, 1);
    EXPECT_TRUE(test::same_bits(ts[0], sum0));
    EXPECT_EQ(ts[1].scalar_type(), at::kDouble);
  });
}

// A two-layer toy: y = (x W1^T) W2^T with W1 [4, 3], W2 [2, 4] as leaves; its gradients summed over the ranks by
// GradSync in buckets of one tensor each (16 bytes: every tensor its own bucket).
TEST(DistGradSync, StartsBucketsFromTheBackwardInOrder) {
  constexpr int kWorld = 2;
  auto weights = [] {
    return std::make_pair(values(9, 12).reshape({4, 3}).clone().requires_grad_(),
                          values(8, 8).reshape({2, 4}).clone().requires_grad_());
  };
  auto loss_of = [](int64_t r, const at::Tensor& w1, const at::Tensor& w2) {  // rank r's loss
    return at::matmul(at::matmul(values(r, 6, 3).reshape({2, 3}), w1.t()), w2.t()).sum();
  };
  auto alone = [&](int64_t r) {  // rank r's gradients and loss, without a group
    auto [w1, w2] = weights();
    const at::Tensor loss = loss_of(r, w1, w2);
    loss.backward();
    return std::make_tuple(w1.grad(), w2.grad(), loss.detach());
  };
  const auto [a1, a2, la] = alone(0);
  const auto [b1, b2, lb] = alone(1);
  as_ranks(kWorld, [&](Group& g) {
    auto [w1, w2] = weights();
    GradSync sync(g, {w1, w2}, /*bucket_bytes=*/16);  // every tensor its own bucket, w2's first
    EXPECT_EQ(sync.buckets(), 2);
    for (int step = 0; step < 3; ++step) {
      w1.mutable_grad() = at::Tensor(), w2.mutable_grad() = at::Tensor();
      const at::Tensor loss = loss_of(g.rank(), w1, w2);
      sync.arm(loss.detach());
      EXPECT_EQ(sync.started(), 0);
      loss.backward();
      EXPECT_EQ(sync.started(), 2);  // both from the backward's hooks, before finish()
      const at::Tensor total = sync.finish(at::zeros({}));
      EXPECT_TRUE(test::same_bits(w1.grad(), a1 + b1));
      EXPECT_TRUE(test::same_bits(w2.grad(), a2 + b2));
      EXPECT_TRUE(test::same_bits(total, la + lb));  // the extra rides with the last bucket
    }
    // A rank with nothing to give (no backward armed) adds zeros and the stand-in for its extra.
    w1.mutable_grad() = at::Tensor(), w2.mutable_grad() = at::Tensor();
    if (g.rank() == 0) {
      const at::Tensor loss = loss_of(0, w1, w2);
      sync.arm(at::full({}, 2.0));
      loss.backward();
    }
    const at::Tensor total = sync.finish(at::full({}, 5.0));
    EXPECT_EQ(total.item<double>(), 7.0);
    EXPECT_TRUE(test::same_bits(w1.grad(), a1 + at::zeros_like(a1)));
  });
}

TEST(DistGradSync, RefusesAGradientAccumulatedTwice) {
  as_ranks(2, [&](Group& g) {
    at::Tensor w = values(3, 4).requires_grad_();
    GradSync sync(g, {w}, /*bucket_bytes=*/1 << 20);
    sync.arm(at::zeros({}));
    // w's gradient accumulated by two backward passes while armed: the second accumulation throws in the hook.
    (w * 2).sum().backward();
    EXPECT_EQ(sync.started(), 1);
    EXPECT_THROW((w * 3).sum().backward(), c10::Error);
    sync.finish(at::zeros({}));  // the bucket started after the first; both ranks end the round alike
  });
}

}  // namespace
}  // namespace qlora::dist
