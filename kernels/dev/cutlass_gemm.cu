// One CUTLASS GEMM variant of the lab (kernels/dev/cutlass_gemm.cuh), chosen at compile time by QLORA_CFG (the
// header's configurations) and QLORA_N_MAJOR (0: B is [N, K], the forward's weight; 1: B is [K, N], the
// backward's). The function is named qlora_cutlass_gemm_<cfg>_<n_major>.
#include "kernels/dev/cutlass_gemm.cuh"
#include "kernels/dev/cutlass_gemm.h"

#ifndef QLORA_CFG
#error "QLORA_CFG must be defined (kernels/dev/CMakeLists.txt)"
#endif

#define QLORA_NAME2(cfg, n) qlora_cutlass_gemm_##cfg##_##n
#define QLORA_NAME(cfg, n) QLORA_NAME2(cfg, n)

namespace qlora::lab {

int QLORA_NAME(QLORA_CFG, QLORA_N_MAJOR)(const CutlassGemmArgs& p, void* workspace, size_t* workspace_bytes,
                                        cudaStream_t stream) {
  static const int sm_count = [] {
    int device = 0, count = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    return count;
  }();
  using G = cutlass_gemm::Gemm<QLORA_CFG, QLORA_N_MAJOR != 0>;
  return G::run(p, sm_count, workspace, workspace_bytes, stream);
}

}  // namespace qlora::lab
