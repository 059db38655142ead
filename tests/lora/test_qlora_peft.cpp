// QLoRA against PEFT: a tiny Llama quantized and serialized by transformers + bitsandbytes (NF4 + double
// quant, tests/quant/make_bnb_llama.py), loaded without re-quantizing, with a PEFT adapter (non-zero B)
// loaded on top: logits, loss and every lora_A / lora_B gradient against PEFT on bnb's own dequantization
// of the same weights in float32 (what training through the frozen 4-bit base computes). Run on both of
// our paths: the per-projection modules and the fused groups (fused.h; forced on for the CPU here, the
// default on CUDA), and on a GPU in float32 too.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/test_util.h"
#include "trainer/io/safetensors.h"
#include "trainer/lora/lora.h"
#include "trainer/lora/loss.h"
#include "trainer/lora/peft.h"
#include "trainer/model/fused.h"
#include "trainer/model/loader.h"

namespace qlora::lora {
namespace {

std::filesystem::path dir() { return test::data_dir() / "quant_bnb_llama"; }

at::Tensor valid_rows(const at::Tensor& logits, const at::Tensor& mask) { return logits.index({mask.to(at::kBool)}); }

void check_against_peft(at::Device dev, model::FusedMode mode, const char* what) {
  SCOPED_TRACE(what);
  const model::FusedMode saved = model::fused_mode();
  model::set_fused_mode(mode);
  auto ref = st::File::open(dir() / "nf4_dq_f32.ref.safetensors");
  const at::Tensor ids = ref->tensor("input_ids").clone(), mask = ref->tensor("attention_mask").clone(),
                   labels = ref->tensor("labels").clone();
  model::LoadOptions o;
  o.device = dev;
  o.quantize = true;  // the file is already 4-bit: loaded as is
  auto m = model::load_llama(dir() / "nf4_dq_f32", o);
  load_peft_adapter(*m, dir() / "nf4_dq_f32.adapter");
  m->train();  // dropout is 0
  at::Tensor logits = m->forward(ids.to(dev), mask.to(dev));
  at::Tensor loss = causal_lm_loss(logits, labels.to(dev));
  loss.backward();
  model::set_fused_mode(saved);

  // Tolerances as test_lora's (same float32 computation, summation order differs): logits 2e-5 relative;
  // the loss within 2 max|d logits| over labelled rows plus the mean's rounding; gradients 1e-4.
  const at::Tensor want = ref->tensor("peft_logits");
  const at::Tensor got = logits.detach().cpu();
  const double el = test::rel_err(valid_rows(got, mask), valid_rows(want, mask));
  at::Tensor lab = labels.slice(1, 1).ne(-100);
  const double dlogits =
      (got.slice(1, 0, -1).index({lab}) - want.slice(1, 0, -1).index({lab})).abs().max().item<double>();
  const double want_loss = ref->tensor("peft_loss").item<double>();
  const double dloss = std::abs(loss.item<double>() - want_loss);
  EXPECT_LT(el, 2e-5);
  EXPECT_LE(dloss, 2 * dlogits + 64 * std::ldexp(1.0, -24) * std::abs(want_loss));
  double worst = 0;
  int n = 0;
  for (const auto& [name, p] : lora_named_parameters(*m)) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(p.grad().defined());
    const double e = test::rel_err(p.grad().cpu(), ref->tensor("grad." + name));
    worst = std::max(worst, e);
    EXPECT_LT(e, 1e-4);
    ++n;
  }
  EXPECT_EQ(n, 2 * 7 * 2);
  std::printf("%s: logits rel err %.2e, loss diff %.2e, worst adapter-gradient rel err %.2e (%d)\n", what, el, dloss,
              worst, n);
}

TEST(QLoraPeft, PerProjectionModulesMatchPeftOnTheDequantizedBase) {
  check_against_peft(at::kCPU, model::FusedMode::Off, "cpu, modules");
}

TEST(QLoraPeft, FusedPathMatchesPeftOnTheDequantizedBase) {
  check_against_peft(at::kCPU, model::FusedMode::On, "cpu, fused");
}

TEST(QLoraPeft, GpuFloat32MatchesPeft) {
  QLORA_SKIP_WITHOUT_CUDA();
  check_against_peft(at::Device(at::kCUDA, 0), model::FusedMode::Auto, "cuda f32, fused");
  check_against_peft(at::Device(at::kCUDA, 0), model::FusedMode::Off, "cuda f32, modules");
}

}  // namespace
}  // namespace qlora::lora
