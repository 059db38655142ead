// The base projections' GEMMs through CUTLASS (kernels/cutlass_gemm.cuh), in builds that have CUTLASS's
// headers (QLORA_WITH_CUTLASS; kernels/CMakeLists.txt); elsewhere the op declines and the caller runs cuBLAS.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "kernels/ops.h"

#ifdef QLORA_WITH_CUTLASS
#include "kernels/cutlass_gemm.cuh"
#endif

namespace qlora::kernels {

bool cutlass_gemm_available() {
#ifdef QLORA_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

bool cutlass_gemm_cuda(const at::Tensor& a, const at::Tensor& b, bool b_n_major, const at::Tensor& d, double beta) {
#ifndef QLORA_WITH_CUTLASS
  (void)a, (void)b, (void)b_n_major, (void)d, (void)beta;
  return false;
#else
  for (const at::Tensor* t : {&a, &b, &d}) {
    if (!t->is_cuda() || t->scalar_type() != at::kBFloat16 || t->dim() != 2 || t->stride(1) != 1) return false;
    // TMA: 16-byte aligned rows.
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0 || t->stride(0) % 8 != 0) return false;
  }
  const int64_t m = a.size(0), k = a.size(1), n = d.size(1);
  if (d.size(0) != m || b.size(b_n_major ? 0 : 1) != k || b.size(b_n_major ? 1 : 0) != n) return false;
  if (m == 0 || n == 0 || k == 0 || k % 8 != 0 || n % 8 != 0 || m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) {
    return false;
  }
  const cutlass_gemm::Args p{static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), a.data_ptr(),
                             a.stride(0), b.data_ptr(), b.stride(0), d.data_ptr(), d.stride(0),
                             static_cast<float>(beta)};
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](void* workspace, size_t* bytes) {
    using Forward = cutlass_gemm::Gemm<0, false>;
    using Backward = cutlass_gemm::Gemm<0, true>;
    return b_n_major ? Backward::run(p, sms, workspace, bytes, stream) : Forward::run(p, sms, workspace, bytes, stream);
  };
  size_t bytes = 0;
  if (run(nullptr, &bytes) != 0) return false;
  const at::Tensor workspace = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))}, a.options().dtype(at::kByte));
  const int rc = run(workspace.data_ptr(), nullptr);
  TORCH_CHECK(rc == 0, "cutlass_gemm_cuda: the GEMM failed to start (", rc, ") for ", m, "x", n, "x", k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
#endif
}

}  // namespace qlora::kernels
