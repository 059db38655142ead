// The table of the CUTLASS GEMM variants compiled from cutlass_gemm.cu (one object per variant).
#include "kernels/dev/cutlass_gemm.h"

namespace qlora::lab {

#define QLORA_DECLARE(cfg, n) \
  int qlora_cutlass_gemm_##cfg##_##n(const CutlassGemmArgs&, void*, size_t*, cudaStream_t);
QLORA_DECLARE(0, 0)
QLORA_DECLARE(1, 0)
QLORA_DECLARE(2, 0)
QLORA_DECLARE(3, 0)
QLORA_DECLARE(0, 1)
QLORA_DECLARE(1, 1)
QLORA_DECLARE(2, 1)
QLORA_DECLARE(3, 1)
#undef QLORA_DECLARE

const CutlassVariant* cutlass_variants(int* count) {
  static const CutlassVariant table[] = {
      {"coop 128x256 2x1", false, qlora_cutlass_gemm_0_0},
      {"coop 128x256 2x1", true, qlora_cutlass_gemm_0_1},
      {"coop 128x256 2x1 stream-K", false, qlora_cutlass_gemm_1_0},
      {"coop 128x256 2x1 stream-K", true, qlora_cutlass_gemm_1_1},
      {"pingpong 128x128 2x1", false, qlora_cutlass_gemm_2_0},
      {"pingpong 128x128 2x1", true, qlora_cutlass_gemm_2_1},
      {"coop 256x128 1x2", false, qlora_cutlass_gemm_3_0},
      {"coop 256x128 1x2", true, qlora_cutlass_gemm_3_1},
  };
  *count = sizeof(table) / sizeof(table[0]);
  return table;
}

}  // namespace qlora::lab
