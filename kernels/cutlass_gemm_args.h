// The arguments of the CUTLASS GEMMs (kernels/cutlass_gemm.cuh), in a header that host C++ can include.
#pragma once

#include <cstdint>

namespace qlora::kernels::cutlass_gemm {

// D [m, n] = A [m, k] op(B) + beta D, bf16, row-major with leading dimensions (elements).
struct Args {
  int m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  int64_t ldd;
  float beta;
};

}  // namespace qlora::kernels::cutlass_gemm
