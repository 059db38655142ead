// AdamW + lr schedule + global-norm clipping against torch.optim.AdamW (foreach=False), transformers'
// get_{cosine,linear,constant}_schedule_with_warmup and torch.nn.utils.clip_grad_norm_
// (tests/train/make_train_fixtures.py: fresh random parameters and per-step gradients every run), and
// warmup steps from a ratio against transformers' TrainingArguments.get_warmup_steps.
//
// Expected bit-exact, not merely close: our optimizer runs the same ATen element-wise ops in the same
// order as torch's _single_tensor_adam on the same LibTorch build, and IEEE element-wise arithmetic
// (mul, lerp, addcmul, sqrt, div, addcdiv) is deterministic whatever the vectorisation. The clipping norm
// is a reduction, but over the same tensor with the same kernel. Any reordering (e.g. weight decay after
// the update, eps inside the sqrt, bias correction applied to the moments) shows up as a difference
// of at least one ulp, which a tolerance would hide.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <sstream>

#include "tests/test_util.h"
#include "trainer/core/fs.h"
#include "trainer/io/safetensors.h"
#include "trainer/train/optim.h"

namespace qlora::train {
namespace {

using json = nlohmann::json;

const json& spec() {
  static json j = json::parse(read_file(test::data_dir() / "train" / "optim.json"));
  return j;
}

at::Tensor fixture(const std::string& name) {
  static auto f = st::File::open(test::data_dir() / "train" / "optim.safetensors");
  return f->tensor(name).clone();
}

Schedule schedule(const std::string& s) {
  if (s == "cosine") return Schedule::Cosine;
  if (s == "linear") return Schedule::Linear;
  return Schedule::Constant;
}

constexpr int kParams = 3, kSteps = 3;

std::string diff(const at::Tensor& a, const at::Tensor& b) {
  std::ostringstream s;
  s << std::scientific << "max abs diff " << (a - b).abs().max().item<double>() << ", rel err " << test::rel_err(a, b);
  return s.str();
}

TEST(AdamW, ThreeStepsBitIdenticalToTorch) {
  std::cout << "fixture seed " << spec()["seed"] << "\n";
  for (const auto& c : spec()["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    NamedTensors params;
    for (int i = 0; i < kParams; ++i)
      params.emplace_back("p" + std::to_string(i), fixture("init." + std::to_string(i)).set_requires_grad(true));
    AdamW opt(params, AdamWOptions{c["lr"], 0.9, 0.999, 1e-8, c["weight_decay"]});
    const double max_norm = c["max_norm"];
    for (int k = 0; k < kSteps; ++k) {
      SCOPED_TRACE("step " + std::to_string(k));
      for (int i = 0; i < kParams; ++i)
        params[i].second.mutable_grad() = fixture("grad." + std::to_string(k) + "." + std::to_string(i));
      if (max_norm > 0) {
        const double norm = clip_grad_norm(params, max_norm).item<double>();
        EXPECT_EQ(static_cast<float>(norm), fixture(name + ".norm." + std::to_string(k)).item<float>());
      }
      // The lr the Python run used at this step: base lr x the schedule's multiplier, one double multiply.
      const double lr =
          c["lr"].get<double>() * lr_multiplier(schedule(c["schedule"]), k, c["warmup"], c["total"]);
      EXPECT_EQ(lr, c["lrs"][k].get<double>());
      opt.step(lr);
      opt.zero_grad();
      for (int i = 0; i < kParams; ++i) {
        at::Tensor want = fixture(name + ".param." + std::to_string(k) + "." + std::to_string(i));
        EXPECT_TRUE(at::equal(params[i].second, want)) << "param " << i << ": " << diff(params[i].second, want);
      }
    }
    EXPECT_EQ(opt.steps(), kSteps);
    NamedTensors state = opt.state();
    for (int i = 0; i < kParams; ++i) {
      for (const char* m : {"exp_avg", "exp_avg_sq"}) {
        at::Tensor got;
        for (auto& [n, t] : state)
          if (n == "p" + std::to_string(i) + "." + m) got = t;
        ASSERT_TRUE(got.defined()) << m;
        at::Tensor want = fixture(name + "." + m + "." + std::to_string(i));
        EXPECT_TRUE(at::equal(got, want)) << m << " " << i << ": " << diff(got, want);
      }
    }
  }
}

TEST(AdamW, ClippingScalesOnlyAboveMaxNorm) {
  // Step 0's gradients are far above max_norm 1 and step 1's far below (see the fixture's GRAD_SCALES):
  // clipping must bring the first to norm ~1 and leave the second untouched.
  for (int k : {0, 1}) {
    NamedTensors params;
    std::vector<at::Tensor> before;
    for (int i = 0; i < kParams; ++i) {
      params.emplace_back("p", fixture("init." + std::to_string(i)).set_requires_grad(true));
      before.push_back(fixture("grad." + std::to_string(k) + "." + std::to_string(i)));
      params.back().second.mutable_grad() = before.back().clone();
    }
    const double norm = clip_grad_norm(params, 1.0).item<double>();
    double sq = 0;
    for (auto& [n, p] : params) sq += p.grad().to(at::kDouble).pow(2).sum().item<double>();
    if (k == 0) {
      EXPECT_GT(norm, 1.0);
      EXPECT_NEAR(std::sqrt(sq), 1.0, 1e-5);  // 1 / (1 + 1e-6 / norm) in float32: within a few ulp of 1
    } else {
      EXPECT_LT(norm, 1.0);
      for (int i = 0; i < kParams; ++i) EXPECT_TRUE(at::equal(params[i].second.grad(), before[i]));
    }
  }
}

// A step with skip = 1 (the trainer's verdict on non-finite gradients, read on the device by the fused
// CUDA kernel) leaves parameters, moments and the step count exactly as they were: the run continues as
// if that step had not been taken. Against a twin optimizer that never saw it, bit for bit.
void check_skip(at::Device dev) {
  auto make = [&] {
    NamedTensors params;
    for (int i = 0; i < kParams; ++i)
      params.emplace_back("p" + std::to_string(i), fixture("init." + std::to_string(i)).to(dev).set_requires_grad(true));
    return params;
  };
  NamedTensors a = make(), b = make();
  AdamW oa(a, AdamWOptions{1e-2, 0.9, 0.999, 1e-8, 0.01}), ob(b, AdamWOptions{1e-2, 0.9, 0.999, 1e-8, 0.01});
  auto set_grads = [&](NamedTensors& ps, int k, bool poison) {
    for (int i = 0; i < kParams; ++i) {
      at::Tensor g = fixture("grad." + std::to_string(k) + "." + std::to_string(i)).to(dev);
      if (poison) g.view(-1)[0] = std::nan("");
      ps[i].second.mutable_grad() = g;
    }
  };
  const at::Tensor zero = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(dev)), one = zero + 1;
  set_grads(a, 0, false), set_grads(b, 0, false);
  oa.step(1e-2, zero), ob.step(1e-2);
  set_grads(a, 1, true);  // only a sees the poisoned step, and skips it
  oa.step(1e-2, one);
  oa.zero_grad(), ob.zero_grad();
  set_grads(a, 2, false), set_grads(b, 2, false);
  const int64_t version = a[0].second._version();
  oa.step(1e-2, zero), ob.step(1e-2);
  // An update moves the version counters: how cached casts of the parameters notice (fused.cpp).
  EXPECT_GT(a[0].second._version(), version) << dev;
  EXPECT_EQ(oa.steps(), 2);
  EXPECT_EQ(ob.steps(), 2);
  for (int i = 0; i < kParams; ++i) EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << dev << " param " << i;
  NamedTensors sa = oa.state(), sb = ob.state();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) EXPECT_TRUE(at::equal(sa[i].second, sb[i].second)) << dev << " " << sa[i].first;
  // And the step did count for nothing: the twin that saw only steps 0 and 2 moved the parameters.
  EXPECT_FALSE(at::equal(a[0].second.cpu(), fixture("init.0")));
}

TEST(AdamW, SkippedStepChangesNothing) { check_skip(at::kCPU); }

TEST(AdamW, SkippedStepChangesNothingFusedGpu) {
  QLORA_SKIP_WITHOUT_CUDA();
  check_skip(at::Device(at::kCUDA, 0));
}

TEST(Schedule, MultipliersEqualTransformers) {
  // Same double-precision formula and operation order as transformers' lr_lambda: exact equality.
  int n = 0;
  for (const auto& m : spec()["multipliers"]) {
    const std::string s = m["schedule"];
    const int64_t total = m["total"], warmup = m["warmup"];
    SCOPED_TRACE(s + " total " + std::to_string(total) + " warmup " + std::to_string(warmup));
    const auto& values = m["values"];
    for (size_t k = 0; k < values.size(); ++k) {
      EXPECT_EQ(lr_multiplier(schedule(s), static_cast<int64_t>(k), warmup, total), values[k].get<double>())
          << "step " << k;
      ++n;
    }
  }
  EXPECT_GT(n, 100);
}

TEST(Schedule, WarmupStepsFromRatioEqualTransformers) {
  for (const auto& w : spec()["warmup"]) {
    TrainConfig t;
    t.warmup_steps = 0;
    t.warmup_ratio = w["ratio"];
    EXPECT_EQ(warmup_steps(t, w["total"]), w["steps"].get<int64_t>())
        << "total " << w["total"] << " ratio " << w["ratio"];
  }
  // An explicit step count wins over the ratio.
  TrainConfig t;
  t.warmup_steps = 5;
  t.warmup_ratio = 0.5;
  EXPECT_EQ(warmup_steps(t, 100), 5);
}

}  // namespace
}  // namespace qlora::train
