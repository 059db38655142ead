// LoraLinear, PEFT initialisation, apply / merge / count. See lora.h for the layout and precision.
#include "trainer/lora/lora.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include <cmath>
#include <unordered_set>

#include "trainer/core/error.h"
#include "trainer/model/fused.h"

namespace qlora::lora {

namespace {

const std::vector<std::string> kProjectionKinds = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"};

// A leaf module holding one parameter "weight", so the parameter is named "<slot>.lora_A.weight".
std::shared_ptr<torch::nn::Module> holder(const at::Tensor& w, at::Tensor* out) {
  auto m = std::make_shared<torch::nn::Module>();
  *out = m->register_parameter("weight", w, /*requires_grad=*/true);
  return m;
}

}  // namespace

double LoraOptions::scaling() const {
  return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

LoraOptions LoraOptions::from(const LoraConfig& cfg) {
  return LoraOptions{cfg.r, cfg.alpha, cfg.dropout, cfg.rslora};
}

std::pair<at::Tensor, at::Tensor> peft_init(int64_t r, int64_t in, int64_t out, at::Generator& gen) {
  // torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5)) for w [r, in] (fan_in = in), with the same
  // double-precision steps, so that the bound (and hence every draw) is bit-identical to PyTorch's.
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1.0 + a * a));
  const double std_ = gain / std::sqrt(static_cast<double>(in));
  const double bound = std::sqrt(3.0) * std_;
  at::Tensor lora_a = at::empty({r, in}, at::kFloat);
  lora_a.uniform_(-bound, bound, gen);
  return {lora_a, at::zeros({out, r}, at::kFloat)};
}

LoraLinear::LoraLinear(std::shared_ptr<model::Linear> base, const LoraOptions& opts, at::Tensor lora_a,
                       at::Tensor lora_b)
    : opts_(opts), scaling_(opts.scaling()) {
  TORCH_CHECK(base, "LoraLinear needs a base");
  TORCH_CHECK(opts.r >= 1, "LoRA rank must be >= 1");
  TORCH_CHECK(opts.dropout >= 0.0 && opts.dropout < 1.0, "LoRA dropout must be in [0, 1)");
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(0) == opts.r && lora_a.size(1) == base->in_features(),
              "lora_A must be [r, in] = [", opts.r, ", ", base->in_features(), "], got ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == base->out_features() && lora_b.size(1) == opts.r,
              "lora_B must be [out, r] = [", base->out_features(), ", ", opts.r, "], got ", lora_b.sizes());
  TORCH_CHECK(lora_a.scalar_type() == at::kFloat && lora_b.scalar_type() == at::kFloat,
              "LoRA A and B are float32 master weights");
  base_ = register_module("base_layer", std::move(base));
  register_module("lora_A", holder(lora_a.contiguous(), &a_));
  register_module("lora_B", holder(lora_b.contiguous(), &b_));
}

at::Tensor LoraLinear::forward(const at::Tensor& x) {
  at::Tensor y = base_->forward(x);
  const auto dt = y.scalar_type();
  at::Tensor h = x.to(dt);
  if (opts_.dropout > 0.0 && is_training()) h = model::lora_dropout(h, opts_.dropout);
  if (y.is_cuda()) {
    // One GEMM adds the branch into the base output: y + (h A^T)(s B)^T, with the scaling folded into
    // the [out, r] matrix instead of a pass over [..., out]. Rounds differently from PEFT's
    // `y + B(A(h)) * s` (within bf16 tolerance); the CPU path below keeps PEFT's order exactly.
    at::Tensor ha = at::linear(h, a_.to(dt));                                       // [..., r]
    at::Tensor out = at::addmm(y.reshape({-1, y.size(-1)}), ha.reshape({-1, ha.size(-1)}), (b_ * scaling_).to(dt).t());
    return out.view(y.sizes());
  }
  at::Tensor delta = at::linear(at::linear(h, a_.to(dt)), b_.to(dt));  // [..., r] -> [..., out]
  return y + delta * scaling_;
}

at::Tensor LoraLinear::effective_weight(at::ScalarType dtype) const {
  at::NoGradGuard no_grad;
  at::Tensor w = base_->effective_weight(at::kFloat);
  w = w + at::matmul(b_.detach(), a_.detach()).to(w.device()) * scaling_;  // [out, in]
  return w.to(dtype);
}

bool targets(const std::vector<std::string>& target_modules, const std::string& name) {
  for (const auto& t : target_modules) {
    if (t.empty()) continue;
    if (name == t) return true;
    if (name.size() > t.size() && name.compare(name.size() - t.size(), t.size(), t) == 0 &&
        name[name.size() - t.size() - 1] == '.')
      return true;
  }
  return false;
}

std::vector<at::Tensor> apply_lora(model::LlamaForCausalLMImpl& model, const LoraConfig& cfg, uint64_t seed) {
  QLORA_REQUIRE(cfg.r >= 1, "lora.r: must be >= 1, got {}", cfg.r);
  QLORA_REQUIRE(cfg.alpha > 0.0, "lora.alpha: must be > 0, got {}", cfg.alpha);
  QLORA_REQUIRE(cfg.dropout >= 0.0 && cfg.dropout < 1.0, "lora.dropout: must be in [0, 1), got {}", cfg.dropout);
  QLORA_REQUIRE(!cfg.target_modules.empty(), "lora.target_modules: must name at least one of {}",
                fmt::join(kProjectionKinds, ", "));

  auto slots = model.projections();
  for (const auto& t : cfg.target_modules) {
    bool hit = false;
    for (const auto& s : slots) hit = hit || targets({t}, s.name);
    if (!hit) {
      std::string hint = nearest(t, kProjectionKinds);
      fail("lora.target_modules: '{}' matches no projection of the model (projections are {}){}", t,
           fmt::join(kProjectionKinds, ", "), hint.empty() ? "" : fmt::format("; did you mean '{}'?", hint));
    }
  }
  for (auto& s : slots) {
    if (targets(cfg.target_modules, s.name) && std::dynamic_pointer_cast<LoraLinear>(s.get()))
      fail("{}: already has a LoRA adapter", s.name);
  }

  for (auto& p : model.parameters()) p.set_requires_grad(false);
  const LoraOptions opts = LoraOptions::from(cfg);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<at::Tensor> params;
  for (auto& s : slots) {
    if (!targets(cfg.target_modules, s.name)) continue;
    auto base = s.get();
    auto [a, b] = peft_init(opts.r, base->in_features(), base->out_features(), gen);
    auto lora = std::make_shared<LoraLinear>(base, opts, a.to(model.device()), b.to(model.device()));
    params.push_back(lora->lora_a());
    params.push_back(lora->lora_b());
    s.set(std::move(lora));
  }
  return params;
}

std::vector<std::pair<std::string, std::shared_ptr<LoraLinear>>> lora_modules(model::LlamaForCausalLMImpl& model) {
  std::vector<std::pair<std::string, std::shared_ptr<LoraLinear>>> out;
  for (auto& s : model.projections()) {
    if (auto l = std::dynamic_pointer_cast<LoraLinear>(s.get())) out.emplace_back(s.name, l);
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> lora_named_parameters(model::LlamaForCausalLMImpl& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [name, l] : lora_modules(model)) {
    out.emplace_back(name + ".lora_A.weight", l->lora_a());
    out.emplace_back(name + ".lora_B.weight", l->lora_b());
  }
  return out;
}

TrainableSummary trainable_summary(torch::nn::Module& model) {
  TrainableSummary s;
  std::unordered_set<const void*> seen;
  for (const auto& p : model.parameters()) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    s.total += p.numel();
    if (p.requires_grad()) s.trainable += p.numel();
  }
  for (const auto& m : model.modules(/*include_self=*/true)) {
    if (auto q = std::dynamic_pointer_cast<model::Quant4Linear>(m)) s.total += q->out_features() * q->in_features();
  }
  s.percent = s.total > 0 ? 100.0 * static_cast<double>(s.trainable) / static_cast<double>(s.total) : 0.0;
  return s;
}

namespace {
// 1234567 -> "1,234,567" (PEFT's "{:,}"), independent of the process locale.
std::string grouped(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return v < 0 ? "-" + out : out;
}
}  // namespace

std::string format_summary(const TrainableSummary& s) {
  return fmt::format("trainable params: {} || all params: {} || trainable%: {:.4f}", grouped(s.trainable),
                     grouped(s.total), s.percent);
}

int64_t merge_lora(model::LlamaForCausalLMImpl& model) {
  int64_t n = 0;
  const auto dtype = model.dtype();
  for (auto& s : model.projections()) {
    auto l = std::dynamic_pointer_cast<LoraLinear>(s.get());
    if (!l) continue;
    s.set(std::make_shared<model::DenseLinear>(l->effective_weight(dtype), /*trainable=*/false));
    ++n;
  }
  return n;
}

}  // namespace qlora::lora
