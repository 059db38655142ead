// Kernel lab: LoRA dropout's masked products and input gradient (kernels/lora_dropout_mm.cu) alone on an idle
// GPU, against what they replace (the dropped copies and one cuBLAS GEMM per member; for dx each member's
// product by cuBLAS, then the masked sum) and against cuBLAS's unmasked product of the same shapes (the floor the
// step's dropout-0 path pays), at a 2048-token step's group shapes.
//
//   qlora_dropout_mm_bench [iterations]
//
// Prints one row per shape: microseconds a call of each (median over `iterations`, default 30, batches of 10
// calls queued back to back), and each kernel's largest difference from the copies' result relative to its
// largest element (bf16 rounding: ~4e-3; the tests check the kernels exactly, this guards the timed runs).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "kernels/ops.h"

namespace {

double median_us(int iterations, const std::function<void()>& f) {
  // Calls queued back to back between two events (the host's launch latency hidden, as in a step), the time
  // per call; the median over `iterations` such batches.
  constexpr int kBatch = 10;
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int i = 0; i < 3; ++i) f();
  std::vector<double> t;
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  for (int i = 0; i < iterations; ++i) {
    cudaEventRecord(a, stream);
    for (int k = 0; k < kBatch; ++k) f();
    cudaEventRecord(b, stream);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms * 1e3 / kBatch);
  }
  cudaEventDestroy(a), cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  using namespace qlora::kernels;
  const int iterations = argc > 1 ? std::atoi(argv[1]) : 30;
  const at::Device dev(at::kCUDA, 0);
  const auto opt = at::TensorOptions(dev).dtype(at::kBFloat16);
  struct Shape {
    const char* name;
    int64_t in, members;
  };
  std::printf("%-10s %4s %8s | %9s %9s %9s %9s | %9s %9s %9s | %9s %9s %9s | %8s %8s %8s\n", "group", "r", "in",
              "bits", "xa", "copies+mm", "mm x A^T", "dA", "apply+mm", "mm dA", "dx", "mm+sum", "mm dx", "xa err",
              "dA err", "dx err");
  for (int64_t r : {16, 64}) {
    for (const Shape& s : {Shape{"q|k|v", 4096, 3}, Shape{"gate|up", 4096, 2}, Shape{"o", 4096, 1},
                           Shape{"down", 11008, 1}}) {
      const int64_t n = 2048, M = s.members, ranks = M * r;
      const at::Tensor x = at::randn({n, s.in}, opt), a = at::randn({ranks, s.in}, opt) * 0.02;
      const at::Tensor dxa = at::randn({n, ranks}, opt);
      at::Tensor xa = at::empty({n, ranks}, opt);
      std::vector<DropoutDraw> draws;
      std::vector<DropoutMmMember> mm;
      std::vector<double> p;
      for (int64_t m = 0; m < M; ++m) {
        draws.push_back({0.1, 1234, 4 * static_cast<uint64_t>(m)});
        mm.push_back({a.narrow(0, m * r, r), m * r, 0.1});
        p.push_back(0.1);
      }
      const at::Tensor mask = lora_dropout_draw_cuda(x, draws);
      // The kernels' results against the copies' (the same masks).
      lora_dropout_xa_cuda(x, mask, mm, xa);
      const at::Tensor xa_k = xa.to(at::kFloat);
      const at::Tensor h = lora_dropout_apply_cuda(x, mask, p);
      const std::vector<at::Tensor> da = lora_dropout_da_cuda(x, mask, dxa, mm, r);
      double xa_err = 0, da_err = 0;
      const at::Tensor products = at::empty({M, n, s.in}, opt);
      auto two_pass_dx = [&] {
        for (int64_t m = 0; m < M; ++m) {
          at::Tensor out = products[m];
          at::mm_out(out, dxa.narrow(1, m * r, r), a.narrow(0, m * r, r));
        }
        return lora_dropout_bwd_cuda(products, mask, p);
      };
      const at::Tensor dx_ref = two_pass_dx().to(at::kFloat);
      const double dx_err =
          ((lora_dropout_dx_cuda(dxa, mask, mm, r).to(at::kFloat) - dx_ref).abs().max() / dx_ref.abs().max())
              .item<double>();
      for (int64_t m = 0; m < M; ++m) {
        const at::Tensor ref = at::mm(h[m], a.narrow(0, m * r, r).t()).to(at::kFloat);
        xa_err = std::max(xa_err, ((xa_k.narrow(1, m * r, r) - ref).abs().max() / ref.abs().max()).item<double>());
        const at::Tensor dref = at::mm(dxa.narrow(1, m * r, r).t(), h[m], at::kFloat);
        da_err = std::max(da_err, ((da[m] - dref).abs().max() / dref.abs().max()).item<double>());
      }
      const double bits = median_us(iterations, [&] { lora_dropout_draw_cuda(x, draws); });
      const double xa_us = median_us(iterations, [&] { lora_dropout_xa_cuda(x, mask, mm, xa); });
      const double copies = median_us(iterations, [&] {
        const at::Tensor h = lora_dropout_fwd_cuda(x, draws).first;
        for (int64_t m = 0; m < M; ++m) {
          at::Tensor out = xa.narrow(1, m * r, r);
          at::mm_out(out, h[m], a.narrow(0, m * r, r).t());
        }
      });
      const double mm_xa = median_us(iterations, [&] { at::mm_out(xa, x, a.t()); });
      const double da_us = median_us(iterations, [&] { lora_dropout_da_cuda(x, mask, dxa, mm, r); });
      const double apply = median_us(iterations, [&] {
        const at::Tensor h = lora_dropout_apply_cuda(x, mask, p);
        for (int64_t m = 0; m < M; ++m) at::mm(dxa.narrow(1, m * r, r).t(), h[m], at::kFloat);
      });
      const double mm_da = median_us(iterations, [&] { at::mm(dxa.t(), x, at::kFloat); });
      const double dx_us = median_us(iterations, [&] { lora_dropout_dx_cuda(dxa, mask, mm, r); });
      const double two_pass = median_us(iterations, [&] { two_pass_dx(); });
      const double mm_dx = median_us(iterations, [&] { at::mm(dxa, a); });
      std::printf("%-10s %4ld %8ld | %9.1f %9.1f %9.1f %9.1f | %9.1f %9.1f %9.1f | %9.1f %9.1f %9.1f | %8.1e %8.1e "
                  "%8.1e\n",
                  s.name, static_cast<long>(r), static_cast<long>(s.in), bits, xa_us, copies, mm_xa, da_us, apply,
                  mm_da, dx_us, two_pass, mm_dx, xa_err, da_err, dx_err);
    }
  }
  return 0;
}
