// CUTLASS 3 Hopper GEMMs (TMA loads, warp-specialized WGMMA) for the base projections (a lab): bf16 operands and
// output, float32 accumulation, D = A op(B) + beta D, every matrix row-major with a leading dimension:
//   k_major (the forward, y = x W^T):  A [M, K], B [N, K] (the weight as stored), D [M, N]
//   n_major (the backward, dx += dy W): A [M, K], B [K, N] (the weight as stored), D [M, N]
// Included by the lab's kernels/dev/cutlass_gemm.cu, which instantiates one a file; compile with NDEBUG (a
// device assert is a call, which serializes the WGMMA pipeline: ptxas C7510).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "kernels/dev/cutlass_gemm.h"

namespace qlora::lab::cutlass_gemm {

// The configurations the lab compares (kernels/dev/cutlass_gemm_bench.cpp):
//   0 cooperative 128x256x64, cluster 2x1, persistent tiles
//   1 cooperative 128x256x64, cluster 2x1, stream-K
//   2 ping-pong   128x128x64, cluster 2x1, persistent tiles
//   3 cooperative 256x128x64, cluster 1x2, persistent tiles
template <int Cfg>
struct Config {
  using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using Scheduler = cutlass::gemm::PersistentScheduler;
};
template <>
struct Config<1> : Config<0> {
  using Scheduler = cutlass::gemm::StreamKScheduler;
};
template <>
struct Config<2> : Config<0> {
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};
template <>
struct Config<3> : Config<0> {
  using Tile = cute::Shape<cute::_256, cute::_128, cute::_64>;
  using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
};

template <int Cfg, bool NMajor>
struct Gemm {
  using C = Config<Cfg>;
  using Element = cutlass::bfloat16_t;
  static constexpr int kAlign = 8;  // elements: 16 bytes
  using LayoutA = cutlass::layout::RowMajor;
  // B as CUTLASS sees it, [K, N]: row-major is N-major (the weight as stored for dx), column-major is [N, K]
  // row-major, K-major (the weight as stored for the forward).
  using LayoutB = std::conditional_t<NMajor, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
  using LayoutD = cutlass::layout::RowMajor;
  using EpilogueOp = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename C::Tile, typename C::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutD, kAlign, Element, LayoutD,
      kAlign, typename C::Epilogue>::CollectiveOp;
  using MainloopOp = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      typename C::Tile, typename C::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename EpilogueOp::SharedStorage))>,
      typename C::Mainloop>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, MainloopOp, EpilogueOp,
                                                      typename C::Scheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Device::Arguments arguments(const CutlassGemmArgs& p, int sm_count) {
    typename Kernel::StrideA sa{};
    typename Kernel::StrideB sb{};
    typename Kernel::StrideC sc{};
    typename Kernel::StrideD sd{};
    cute::get<0>(sa) = p.lda;  // (M, K, L): (lda, 1, 0)
    if constexpr (NMajor) {
      cute::get<1>(sb) = p.ldb;  // (N, K, L): (1, ldb, 0)
    } else {
      cute::get<0>(sb) = p.ldb;  // (N, K, L): (ldb, 1, 0)
    }
    cute::get<0>(sc) = p.ldd;
    cute::get<0>(sd) = p.ldd;
    auto* d = static_cast<Element*>(p.d);
    typename Device::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                    {p.m, p.n, p.k, 1},
                                    {static_cast<const Element*>(p.a), sa, static_cast<const Element*>(p.b), sb},
                                    {{}, d, sc, d, sd}};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = p.beta;
    cudaGetDevice(&args.hw_info.device_id);
    args.hw_info.sm_count = sm_count;
    return args;
  }

  // Non-zero when this GEMM cannot run `p`. With `workspace_bytes` set it writes the workspace the call needs
  // there and runs nothing; without, it runs on `stream` with `workspace` (that many bytes).
  static int run(const CutlassGemmArgs& p, int sm_count, void* workspace, size_t* workspace_bytes,
                 cudaStream_t stream) {
    const auto args = arguments(p, sm_count);
    Device gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (workspace_bytes != nullptr) {
      *workspace_bytes = Device::get_workspace_size(args);
      return 0;
    }
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 2;
    return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 3;
  }
};

}  // namespace qlora::lab::cutlass_gemm
