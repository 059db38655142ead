// Op: dequantize a 4-bit weight (NF4 / FP4, plain or double-quantized scales) to float32, bfloat16 or
// float16 on the GPU. Kernels live in dequantize_4bit.cuh (the lab, kernels/dev/dequant_bench.cu, checks
// and times every variant); this op launches the promoted variants for the aligned bulk, v11 for 2-byte
// outputs (coalesced 4-byte loads and 16-byte evict-first stores, four words in flight per thread, the
// CTA's scales decoded once with no dependent global load) and v3 for float32, and v1 for the tail. Variants tried and
// dropped are in kernels/dev/NOTES.md. A 2-D `into` whose rows lie further apart than its width (the
// first columns of a wider matrix) takes v11's pitched variant.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/convert.cuh"
#include "kernels/dequantize_4bit.cuh"
#include "kernels/ops.h"

namespace qlora::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T, fmt4::Code C>
static void launch_dequant(const dequant::Args& a, T* out, bool aligned, cudaStream_t stream) {
  const int64_t words = aligned ? a.n / 8 : 0;  // 4-byte words of 8 codes
  const unsigned grid = static_cast<unsigned>(ceil_div(words, dequant::kSpanThreads * dequant::kIlp));
  if (a.pitch != 0) {  // the op checked: 2-byte T, aligned, cols % 8 == 0, so the words cover every element
    if constexpr (sizeof(T) == 2) {
      dequant::dequant_span_v9<T, C, dequant::kIlp, /*Streaming=*/true, /*Pitched=*/true>
          <<<grid, dequant::kSpanThreads, 0, stream>>>(a, words, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }
  if (words > 0) {
    if constexpr (sizeof(T) == 2) {
      dequant::dequant_span_v9<T, C, dequant::kIlp, /*Streaming=*/true>
          <<<grid, dequant::kSpanThreads, 0, stream>>>(a, words, out);
    } else {  // float32: 32-byte stores per word want fewer words in flight (lab: v3 ahead of v4..v9)
      dequant::dequant_v3<T, C><<<ceil_div(words, kThreads), kThreads, 0, stream>>>(a, words, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t first = words * 8;
  if (first < a.n) {
    dequant::dequant_v1<T, C><<<ceil_div(a.n - first, kThreads), kThreads, 0, stream>>>(a, first, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_cuda(const at::Tensor& t, at::ScalarType dt, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), "dequantize_4bit_cuda: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "dequantize_4bit_cuda: ", name, " must be on ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, "dequantize_4bit_cuda: ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "dequantize_4bit_cuda: ", name, " must be contiguous");
}

}  // namespace

bool pitched_ok(const at::Tensor& into) {
  return into.dim() == 2 && into.element_size() == 2 && into.stride(1) == 1 && into.size(1) % 8 == 0 &&
         into.size(1) > 0 && into.size(1) < (int64_t{1} << 30) && into.stride(0) >= into.size(1) &&
         into.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(into.data_ptr()) % 16 == 0;
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                                const at::Tensor& nested_code, float offset, fmt4::Code code, int64_t blocksize,
                                int64_t n, at::ScalarType out, const at::Tensor& into) {
  TORCH_CHECK(packed.defined() && packed.is_cuda(), "dequantize_4bit_cuda: packed must be a CUDA tensor");
  check_cuda(packed, at::kByte, "packed", packed);
  TORCH_CHECK(fmt4::valid_blocksize(blocksize), "dequantize_4bit_cuda: unsupported block size ", blocksize,
              " (expected a power of two in [32, 4096])");
  TORCH_CHECK(code == fmt4::Code::NF4 || code == fmt4::Code::FP4, "dequantize_4bit_cuda: unknown code");
  TORCH_CHECK(n > 0 && packed.numel() == (n + 1) / 2, "dequantize_4bit_cuda: packed has ", packed.numel(),
              " bytes, expected ", (n + 1) / 2, " for n = ", n);
  TORCH_CHECK(out == at::kFloat || out == at::kBFloat16 || out == at::kHalf,
              "dequantize_4bit_cuda: output dtype must be float32, bfloat16 or float16, got ", out);
  const int64_t blocks = ceil_div(n, blocksize);
  const bool dq = nested_absmax.defined();
  check_cuda(absmax, dq ? at::kByte : at::kFloat, "absmax", packed);
  TORCH_CHECK(absmax.numel() == blocks, "dequantize_4bit_cuda: absmax has ", absmax.numel(), " entries, expected ",
              blocks);
  if (dq) {
    check_cuda(nested_absmax, at::kFloat, "nested_absmax", packed);
    check_cuda(nested_code, at::kFloat, "nested_code", packed);
    TORCH_CHECK(nested_absmax.numel() == ceil_div(blocks, fmt4::kNestedBlock),
                "dequantize_4bit_cuda: nested_absmax has the wrong size");
    TORCH_CHECK(nested_code.numel() == fmt4::kDynamicCodes, "dequantize_4bit_cuda: nested_code must have 256 entries");
  }

  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor y;
  int64_t cols = 0, pitch = 0;
  if (into.defined() && !into.is_contiguous()) {
    TORCH_CHECK(into.is_cuda() && into.device() == packed.device() && into.scalar_type() == out,
                "dequantize_4bit_cuda: into must be ", out, " on ", packed.device());
    TORCH_CHECK(pitched_ok(into) && into.numel() == n, "dequantize_4bit_cuda: a non-contiguous into must be 2-D with ",
                n, " elements, 2-byte elements, a width that is a multiple of 8, rows 16-byte aligned and "
                "further apart than its width; got sizes ", into.sizes(), ", strides ", into.strides());
    cols = into.size(1), pitch = into.stride(0);
    y = into;
  } else if (into.defined()) {
    check_cuda(into, out, "into", packed);
    TORCH_CHECK(into.numel() == n, "dequantize_4bit_cuda: into has ", into.numel(), " elements, expected ", n);
    y = into;
  } else {
    y = at::empty({n}, packed.options().dtype(out));
  }
  dequant::Args a{packed.const_data_ptr<uint8_t>(),
                  dq ? nullptr : absmax.const_data_ptr<float>(),
                  dq ? absmax.const_data_ptr<uint8_t>() : nullptr,
                  dq ? nested_absmax.const_data_ptr<float>() : nullptr,
                  dq ? nested_code.const_data_ptr<float>() : nullptr,
                  offset,
                  __builtin_ctzll(static_cast<unsigned long long>(blocksize)),
                  n,
                  cols,
                  pitch};
  // The vector path needs 4-byte aligned codes and a 16-byte aligned output (true for fresh allocations,
  // not for every view).
  const bool aligned = reinterpret_cast<uintptr_t>(a.packed) % 4 == 0 && reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0;
  TORCH_CHECK(pitch == 0 || aligned, "dequantize_4bit_cuda: a pitched into needs 4-byte aligned codes");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    if (code == fmt4::Code::NF4) launch_dequant<T, fmt4::Code::NF4>(a, o, aligned, stream);
    else launch_dequant<T, fmt4::Code::FP4>(a, o, aligned, stream);
  };
  if (out == at::kFloat) go(y.data_ptr<float>());
  else if (out == at::kBFloat16) go(reinterpret_cast<__nv_bfloat16*>(y.data_ptr()));
  else go(reinterpret_cast<__half*>(y.data_ptr()));
  return y;
}

}  // namespace qlora::kernels
