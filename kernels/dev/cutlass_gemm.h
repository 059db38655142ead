// Kernel lab: the CUTLASS GEMM configurations of kernels/dev/cutlass_gemm.cuh for the 7B step's base GEMMs, to
// time against cuBLAS (kernels/dev/cutlass_gemm_bench.cpp). Each variant is one object file
// (kernels/dev/CMakeLists.txt compiles cutlass_gemm.cu once per variant), called through this table.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace qlora::lab {

// D [m, n] = A [m, k] op(B) + beta D, bf16, row-major with leading dimensions (elements); kernels/dev/
// cutlass_gemm.cuh says what op(B) is.
struct CutlassGemmArgs {
  int m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  int64_t ldd;
  float beta;
};

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
