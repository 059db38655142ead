// Kernel lab: the CUTLASS GEMM configurations of kernels/cutlass_gemm.cuh for the 7B step's base GEMMs, to time
// against cuBLAS (kernels/dev/cutlass_gemm_bench.cpp). Each variant is one object file
// (kernels/dev/CMakeLists.txt compiles cutlass_gemm.cu once per variant), called through this table.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cutlass_gemm_args.h"

namespace qlora::lab {

using CutlassGemmArgs = kernels::cutlass_gemm::Args;

// Returns non-zero when the variant cannot run these arguments. With `workspace_bytes` set it only writes the
// workspace the call needs there; without, it runs the GEMM on `stream` with `workspace` (that many bytes).
using CutlassGemmFn = int (*)(const CutlassGemmArgs&, void* workspace, size_t* workspace_bytes,
                              cudaStream_t stream);

struct CutlassVariant {
  const char* name;
  bool n_major;
  CutlassGemmFn run;
};

// Every variant compiled in (the table in cutlass_gemm_variants.cpp).
const CutlassVariant* cutlass_variants(int* count);

}  // namespace qlora::lab
