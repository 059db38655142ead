// CPU reference of the 4-bit ops (see ops.h for shapes, kernels/format_4bit.h for the exact semantics).
// Parallel over quantization blocks with at::parallel_for; each block is independent, so the result does
// not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "trainer/quant/ops.h"

namespace qlora::quant {
namespace {

using fmt4::Code;

void check_flat(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <typename T, Code C>
void quantize_blocks(const T* x, int64_t n, int64_t bs, uint8_t* packed, float* absmax) {
  const int64_t blocks = (n + bs - 1) / bs;
  // ~16K elements per task: enough work to amortise the scheduling.
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs, end = std::min(start + bs, n);
      float m = 0.0f;
      for (int64_t i = start; i < end; ++i) m = std::max(m, std::fabs(static_cast<float>(x[i])));
      const bool partial = end - start < bs;
      const float am = std::max(m, fmt4::kMinAbsmax);
      absmax[b] = partial ? am : m;  // bnb stores the clamped value only for the partial last block
      const float r = 1.0f / am;
      auto scaled = [&](int64_t i) -> float {
        if (i >= n) return 0.0f;  // odd n: the last low nibble quantizes 0.0
        float v = static_cast<float>(x[i]);
        return fmt4::clamp_unit(partial ? fmt4::div_rn(v, am) : fmt4::mul_rn(v, r));
      };
      for (int64_t i = start; i < end; i += 2)
        packed[i / 2] = fmt4::pack(fmt4::encode(C, scaled(i)), fmt4::encode(C, scaled(i + 1)));
    }
  });
}

template <typename T>
void dequantize_blocks(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* nested,
                       const float* ncode, float offset, Code c, int64_t bs, int64_t n, T* out) {
  float table[fmt4::kCodes];
  for (int i = 0; i < fmt4::kCodes; ++i) table[i] = fmt4::code_value(c, i);
  const int64_t blocks = (n + bs - 1) / bs;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float s = qabsmax ? fmt4::add_rn(fmt4::mul_rn(ncode[qabsmax[b]], nested[b / fmt4::kNestedBlock]), offset)
                              : absmax[b];
      const int64_t end = std::min((b + 1) * bs, n);
      for (int64_t i = b * bs; i < end; ++i) {
        const uint8_t byte = packed[i >> 1];
        const int nib = (i & 1) ? fmt4::lo_nibble(byte) : fmt4::hi_nibble(byte);
        out[i] = static_cast<T>(table[nib] * s);
      }
    }
  });
}

}  // namespace

std::pair<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& x, Code code, int64_t blocksize) {
  TORCH_CHECK(x.defined() && x.device().is_cpu(), "quantize_4bit_cpu: x must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "quantize_4bit_cpu: x must be contiguous");
  TORCH_CHECK(fmt4::valid_blocksize(blocksize), "quantize_4bit_cpu: unsupported block size ", blocksize);
  const int64_t n = x.numel();
  TORCH_CHECK(n > 0, "quantize_4bit_cpu: empty input");
  auto packed = at::empty({(n + 1) / 2}, x.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_4bit_cpu", [&] {
    TORCH_CHECK(x.scalar_type() != at::kDouble, "quantize_4bit_cpu: float64 input is not supported");
    if (code == Code::NF4)
      quantize_blocks<scalar_t, Code::NF4>(x.const_data_ptr<scalar_t>(), n, blocksize, packed.data_ptr<uint8_t>(),
                                           absmax.data_ptr<float>());
    else
      quantize_blocks<scalar_t, Code::FP4>(x.const_data_ptr<scalar_t>(), n, blocksize, packed.data_ptr<uint8_t>(),
                                           absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

std::pair<at::Tensor, at::Tensor> quantize_nested_cpu(const at::Tensor& absmax, float offset, const at::Tensor& lut) {
  check_flat(absmax, at::kFloat, "quantize_nested_cpu: absmax");
  check_flat(lut, at::kByte, "quantize_nested_cpu: lut");
  TORCH_CHECK(lut.numel() == fmt4::kLutSize, "quantize_nested_cpu: lut must have 65536 entries");
  const int64_t n = absmax.numel(), bs = fmt4::kNestedBlock, blocks = (n + bs - 1) / bs;
  auto q = at::empty({n}, absmax.options().dtype(at::kByte));
  auto nested = at::empty({blocks}, absmax.options());
  const float* a = absmax.const_data_ptr<float>();
  const uint8_t* table = lut.const_data_ptr<uint8_t>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* np = nested.data_ptr<float>();
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs, end = std::min(start + bs, n);
      float m = 0.0f;
      for (int64_t i = start; i < end; ++i) m = std::max(m, std::fabs(a[i] - offset));
      np[b] = m;
      if (m == 0.0f) {  // bnb writes code 0 for an all-zero block
        std::fill(qp + start, qp + end, uint8_t{0});
        continue;
      }
      const float inv = 1.0f / m;
      for (int64_t i = start; i < end; ++i) qp[i] = table[fmt4::lut_index(fmt4::mul_rn(a[i] - offset, inv))];
    }
  });
  return {q, nested};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                               const at::Tensor& nested_code, float offset, Code code, int64_t blocksize, int64_t n,
                               at::ScalarType out, const at::Tensor& into) {
  TORCH_CHECK(fmt4::valid_blocksize(blocksize), "dequantize_4bit_cpu: unsupported block size ", blocksize);
  TORCH_CHECK(n > 0, "dequantize_4bit_cpu: n must be positive");
  check_flat(packed, at::kByte, "dequantize_4bit_cpu: packed");
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "dequantize_4bit_cpu: packed has ", packed.numel(), " bytes, expected ",
              (n + 1) / 2);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const bool dq = nested_absmax.defined();
  check_flat(absmax, dq ? at::kByte : at::kFloat, "dequantize_4bit_cpu: absmax");
  TORCH_CHECK(absmax.numel() == blocks, "dequantize_4bit_cpu: absmax has ", absmax.numel(), " entries, expected ",
              blocks);
  if (dq) {
    check_flat(nested_absmax, at::kFloat, "dequantize_4bit_cpu: nested_absmax");
    check_flat(nested_code, at::kFloat, "dequantize_4bit_cpu: nested_code");
    TORCH_CHECK(nested_absmax.numel() == (blocks + fmt4::kNestedBlock - 1) / fmt4::kNestedBlock,
                "dequantize_4bit_cpu: nested_absmax has the wrong size");
    TORCH_CHECK(nested_code.numel() == fmt4::kDynamicCodes, "dequantize_4bit_cpu: nested_code must have 256 entries");
  }
  at::Tensor y;
  if (into.defined()) {
    TORCH_CHECK(into.scalar_type() == out && into.is_contiguous() && into.numel() == n && into.is_cpu(),
                "dequantize_4bit_cpu: into must be a contiguous CPU tensor of ", n, " elements of ", out);
    y = into;
  } else {
    y = at::empty({n}, packed.options().dtype(out));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out, "dequantize_4bit_cpu", [&] {
    TORCH_CHECK(out != at::kDouble, "dequantize_4bit_cpu: float64 output is not supported");
    dequantize_blocks<scalar_t>(packed.const_data_ptr<uint8_t>(), dq ? nullptr : absmax.const_data_ptr<float>(),
                                dq ? absmax.const_data_ptr<uint8_t>() : nullptr,
                                dq ? nested_absmax.const_data_ptr<float>() : nullptr,
                                dq ? nested_code.const_data_ptr<float>() : nullptr, offset, code, blocksize, n,
                                y.data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor build_nested_lut(const at::Tensor& code) {
  TORCH_CHECK(code.numel() == fmt4::kDynamicCodes && code.scalar_type() == at::kFloat,
              "build_nested_lut: code must be float32 [256]");
  auto c = code.to(at::kCPU).contiguous();
  const float* v = c.const_data_ptr<float>();
  float mid[fmt4::kDynamicCodes - 1];
  for (int i = 0; i + 1 < fmt4::kDynamicCodes; ++i) mid[i] = 0.5f * (v[i] + v[i + 1]);
  auto lut = at::empty({fmt4::kLutSize}, at::kByte);
  uint8_t* l = lut.data_ptr<uint8_t>();
  int k = 0;
  for (int i = 0; i < fmt4::kLutSize; ++i) {
    // The bin's value exactly as bnb's build_quantize_lut computes it (float32, no FMA).
    const float val = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(fmt4::kLutSize - 1);
    while (k < fmt4::kDynamicCodes - 1 && mid[k] < val) ++k;
    l[i] = static_cast<uint8_t>(k);
  }
  return lut;
}

}  // namespace qlora::quant
