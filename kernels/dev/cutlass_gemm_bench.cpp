// Kernel lab: the 7B step's base GEMMs at 2048 tokens, cuBLAS (through ATen, as the step calls it) against
// CUTLASS 3 Hopper variants (kernels/dev/cutlass_gemm.cu), alone on an idle GPU.
//
//   qlora_cutlass_gemm_bench [rounds]
//
// The forward y = x W^T (beta 0) and the backward dx += dy W (beta 1, onto dx as the step accumulates) per
// projection group, operands rotating over copies larger than L2. Prints microseconds a call (median over
// `rounds`, default 15, of short bursts after an idle GPU; median_us says why), TFLOP/s, and each variant's
// largest difference from cuBLAS's result relative to the largest element (bf16 rounding of two float32 sums).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#include "kernels/dev/cutlass_gemm.h"

namespace {

// Times every candidate of one shape in rounds: each round runs each candidate once as a burst of kBatch calls
// queued back to back between two events, after the GPU has idled kIdleMs. Sustained back-to-back GEMMs draw
// the card to its power limit and clock it down (the same cuBLAS GEMM ran at 576 TFLOP/s sustained and 750 in
// bursts on an H100), while in a step the GEMMs alternate with memory-bound kernels: bursts are the closer
// model, and interleaving the candidates gives each the same thermal state. Returns each candidate's median
// microseconds a call.
std::vector<double> median_us(int rounds, const std::vector<std::function<void()>>& candidates) {
  constexpr int kBatch = 5, kIdleMs = 20;
  auto stream = at::cuda::getCurrentCUDAStream();
  for (const auto& f : candidates) f();
  std::vector<std::vector<double>> t(candidates.size());
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  for (int i = 0; i < rounds; ++i) {
    for (size_t c = 0; c < candidates.size(); ++c) {
      cudaStreamSynchronize(stream);
      std::this_thread::sleep_for(std::chrono::milliseconds(kIdleMs));
      candidates[c]();  // one untimed call: the clocks up
      cudaEventRecord(a, stream);
      for (int k = 0; k < kBatch; ++k) candidates[c]();
      cudaEventRecord(b, stream);
      cudaEventSynchronize(b);
      float ms = 0;
      cudaEventElapsedTime(&ms, a, b);
      t[c].push_back(ms * 1e3 / kBatch);
    }
  }
  cudaEventDestroy(a), cudaEventDestroy(b);
  std::vector<double> out;
  for (auto& v : t) {
    std::sort(v.begin(), v.end());
    out.push_back(v[v.size() / 2]);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  using qlora::lab::CutlassGemmArgs;
  using qlora::lab::CutlassGemmFn;
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  const auto opt = at::TensorOptions(at::Device(at::kCUDA, 0)).dtype(at::kBFloat16);
  int nvariants = 0;
  const qlora::lab::CutlassVariant* variants = qlora::lab::cutlass_variants(&nvariants);
  struct Shape {
    const char* name;
    int64_t out, in;
  };
  constexpr int64_t kTokens = 2048;
  constexpr int kCopies = 4;
  auto stream = at::cuda::getCurrentCUDAStream();
  std::printf("%-8s %-4s %-28s %9s %7s %9s %9s\n", "group", "pass", "kernel", "us", "TFLOP/s", "vs cuBLAS",
              "rel diff");
  for (const Shape& s : {Shape{"q|k|v", 12288, 4096}, Shape{"o", 4096, 4096}, Shape{"gate|up", 22016, 4096},
                         Shape{"down", 4096, 11008}, Shape{"lm_head", 32000, 4096}}) {
    for (const bool backward : {false, true}) {
      if (backward && s.out == 32000) continue;
      // forward: D [T, out] = x [T, in] W^T; backward: D [T, in] += dy [T, out] W [out, in].
      const int64_t k = backward ? s.out : s.in, n = backward ? s.in : s.out;
      std::vector<at::Tensor> A, W, D;
      for (int c = 0; c < kCopies; ++c) {
        A.push_back(at::randn({kTokens, k}, opt));
        W.push_back(at::randn({s.out, s.in}, opt) * 0.02);
        D.push_back(at::randn({kTokens, n}, opt));
      }
      const double flop = 2.0 * kTokens * s.out * s.in;
      const float beta = backward ? 1.0f : 0.0f;
      int turn = 0;
      auto cublas = [&](int c) {
        if (backward) {
          D[c].addmm_(A[c], W[c]);
        } else {
          at::mm_out(D[c], A[c], W[c].t());
        }
      };
      // The reference result for the variants' check, from the same D's values (beta 1 adds onto them).
      const at::Tensor d0 = D[0].clone();
      cublas(0);
      const at::Tensor ref = D[0].to(at::kFloat);
      const double scale = ref.abs().max().item<double>();
      std::vector<std::function<void()>> candidates{[&] { cublas(turn = (turn + 1) % kCopies); }};
      std::vector<const char*> names{"cuBLAS (at::mm)"};
      std::vector<double> diffs{0};
      std::vector<at::Tensor> workspaces;
      for (int v = 0; v < nvariants; ++v) {
        if (variants[v].n_major != backward) continue;
        auto args = [&, n, k](int c) {
          return CutlassGemmArgs{static_cast<int>(kTokens), static_cast<int>(n), static_cast<int>(k),
                                 A[c].data_ptr(), k, W[c].data_ptr(), s.in, D[c].data_ptr(), n, beta};
        };
        size_t bytes = 0;
        if (variants[v].run(args(0), nullptr, &bytes, stream) != 0) {
          std::printf("%-8s %-4s %-28s %9s\n", s.name, backward ? "dx" : "fwd", variants[v].name, "n/a");
          continue;
        }
        workspaces.push_back(at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))}, opt.dtype(at::kByte)));
        void* ws = workspaces.back().data_ptr();
        D[0].copy_(d0);
        const int rc = variants[v].run(args(0), ws, nullptr, stream);
        diffs.push_back(rc == 0 ? (D[0].to(at::kFloat) - ref).abs().max().item<double>() / scale : -1);
        names.push_back(variants[v].name);
        const CutlassGemmFn run = variants[v].run;
        candidates.push_back([&turn, args, run, ws, stream] {
          turn = (turn + 1) % kCopies;
          run(args(turn), ws, nullptr, stream);
        });
      }
      const std::vector<double> us = median_us(rounds, candidates);
      for (size_t c = 0; c < candidates.size(); ++c) {
        std::printf("%-8s %-4s %-28s %9.1f %7.0f %9.3f %9.2e%s\n", s.name, backward ? "dx" : "fwd", names[c],
                    us[c], flop / us[c] / 1e6, us[0] / us[c], diffs[c], diffs[c] < 0 ? "  (failed to run)" : "");
      }
    }
  }
  return 0;
}
