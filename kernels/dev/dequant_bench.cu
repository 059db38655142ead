// Kernel lab for the 4-bit dequantize op (STYLE.md, "A kernel lab"): every variant of
// kernels/dequantize_4bit.cuh (the production header; promoting a variant means pointing the op at it)
// run on one Llama-2-7B decoder layer's seven projection weights, launched one by one as the forward does:
//   v1  one thread per element, byte loads (baseline; the op's tail and unaligned path)
//   v2  one 16-byte load per thread, 32 outputs with 16-byte stores
//   v3  one 4-byte load per thread, 8 outputs with one 16-byte (bf16/fp16) store
//   v4  v3 with kIlp words in flight per thread
//   v9  the CTA's scales decoded once into shared memory, every global load issued up front (the map in
//       shared memory too); v10 = v9 with eight words in flight (v7, v8: see NOTES.md)
//   v11 v9 with evict-first (streaming) stores
// for NF4 with plain float32 scales and with double-quantized uint8 scales, to bfloat16 and float32.
//
// Check: every variant's output, poisoned with NaN first, is compared bit for bit against a host reference
// (format_4bit.h's code table, the same float32 product and the same round-to-nearest cast the CPU op
// uses) on the first and last 64 Ki elements of each projection and on 1 Mi random indices.
// Time: 3 warm-up layers, then the median of 15 layers, each preceded by an L2 flush (a 256 MB memset
// outside the timed region; H100 L2 is 50 MB), timed with cudaEvents. GB/s counts bytes read (packed
// codes and scales) plus bytes written; the ratio is against cudaMemcpy device-to-device (read + write)
// measured in the same run. One layer is 202M weights: 101 MB of codes, 404 MB of bf16 output.
//
// Build: ninja qlora_dequant_bench (QLORA_CUDA=ON). Run: build/kernels/dev/qlora_dequant_bench [iters].
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/dequantize_4bit.cuh"

namespace dq = qlora::kernels::dequant;
namespace fmt4 = qlora::fmt4;

#define CHECK_CUDA(x)                                                                            \
  do {                                                                                           \
    cudaError_t e_ = (x);                                                                        \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlock = 64;  // the QLoRA block size

// Llama-2-7B: hidden 4096, intermediate 11008; [out, in] of q, k, v, o, gate, up, down.
const int64_t kShapes[7][2] = {{4096, 4096}, {4096, 4096}, {4096, 4096}, {4096, 4096},
                               {11008, 4096}, {11008, 4096}, {4096, 11008}};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One projection's 4-bit weight on the device (and its host copy for the reference).
struct Weight {
  int64_t n = 0, blocks = 0;
  std::vector<uint8_t> h_packed, h_qabsmax;  // [(n+1)/2], [blocks]
  std::vector<float> h_absmax, h_nested;     // [blocks], [ceil(blocks/256)]
  uint8_t *packed = nullptr, *qabsmax = nullptr;
  float *absmax = nullptr, *nested = nullptr;
};

struct Layer {
  std::vector<Weight> w;
  std::vector<float> h_ncode;  // [256] ascending, like bnb's dynamic map
  float* ncode = nullptr;
  float offset = 0.031f;
  int64_t max_n = 0;
};

template <typename T>
T* dev_alloc(size_t count) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, count * sizeof(T)));
  return p;
}

Layer make_layer(std::mt19937_64& rng) {
  Layer L;
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.001f, 0.1f), unit(-1.0f, 1.0f);
  for (int i = 0; i < fmt4::kDynamicCodes; ++i) L.h_ncode.push_back(-1.0f + 2.0f * i / 255.0f);
  L.ncode = dev_alloc<float>(fmt4::kDynamicCodes);
  CHECK_CUDA(cudaMemcpy(L.ncode, L.h_ncode.data(), 256 * sizeof(float), cudaMemcpyHostToDevice));
  for (const auto& s : kShapes) {
    Weight w;
    w.n = s[0] * s[1];
    w.blocks = ceil_div(w.n, kBlock);
    w.h_packed.resize((w.n + 1) / 2);
    for (auto& b : w.h_packed) b = static_cast<uint8_t>(byte(rng));  // every code, never zeros
    w.h_absmax.resize(w.blocks);
    for (auto& a : w.h_absmax) a = scale(rng);
    w.h_qabsmax.resize(w.blocks);
    for (auto& q : w.h_qabsmax) q = static_cast<uint8_t>(byte(rng));
    w.h_nested.resize(ceil_div(w.blocks, fmt4::kNestedBlock));
    for (auto& v : w.h_nested) v = std::abs(unit(rng)) * 0.05f + 1e-3f;
    w.packed = dev_alloc<uint8_t>(w.h_packed.size());
    w.absmax = dev_alloc<float>(w.blocks);
    w.qabsmax = dev_alloc<uint8_t>(w.blocks);
    w.nested = dev_alloc<float>(w.h_nested.size());
    CHECK_CUDA(cudaMemcpy(w.packed, w.h_packed.data(), w.h_packed.size(), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(w.absmax, w.h_absmax.data(), w.blocks * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(w.qabsmax, w.h_qabsmax.data(), w.blocks, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(w.nested, w.h_nested.data(), w.h_nested.size() * 4, cudaMemcpyHostToDevice));
    L.max_n = std::max(L.max_n, w.n);
    L.w.push_back(std::move(w));
  }
  return L;
}

dq::Args args_of(const Layer& L, const Weight& w, bool double_quant) {
  return dq::Args{w.packed,
                  double_quant ? nullptr : w.absmax,
                  double_quant ? w.qabsmax : nullptr,
                  double_quant ? w.nested : nullptr,
                  double_quant ? L.ncode : nullptr,
                  L.offset,
                  __builtin_ctzll(static_cast<unsigned long long>(kBlock)),
                  w.n};
}

// Bytes one dequantization moves: codes + scales read, outputs written.
int64_t bytes_moved(const Weight& w, bool double_quant, size_t out_size) {
  const int64_t scales = double_quant ? w.blocks + 4 * static_cast<int64_t>(w.h_nested.size()) + 1024 : 4 * w.blocks;
  return static_cast<int64_t>(w.h_packed.size()) + scales + w.n * static_cast<int64_t>(out_size);
}

template <typename T>
void launch(int variant, const dq::Args& a, T* out, cudaStream_t s) {
  // All shapes here are multiples of 32 elements, so v2 / v3 need no tail.
  switch (variant) {
    case 1: dq::dequant_v1<T, fmt4::Code::NF4><<<ceil_div(a.n, kThreads), kThreads, 0, s>>>(a, 0, out); break;
    case 2: dq::dequant_v2<T, fmt4::Code::NF4><<<ceil_div(a.n / 32, kThreads), kThreads, 0, s>>>(a, a.n / 32, out); break;
    case 3: dq::dequant_v3<T, fmt4::Code::NF4><<<ceil_div(a.n / 8, kThreads), kThreads, 0, s>>>(a, a.n / 8, out); break;
    case 4:
      dq::dequant_v4<T, fmt4::Code::NF4><<<ceil_div(a.n / 8, kThreads * dq::kIlp), kThreads, 0, s>>>(a, a.n / 8, out);
      break;
    case 9:
      dq::dequant_span_v9<T, fmt4::Code::NF4, 4><<<ceil_div(a.n / 8, dq::kSpanThreads * 4), dq::kSpanThreads, 0, s>>>(
          a, a.n / 8, out);
      break;
    case 10:
      dq::dequant_span_v9<T, fmt4::Code::NF4, 8><<<ceil_div(a.n / 8, dq::kSpanThreads * 8), dq::kSpanThreads, 0, s>>>(
          a, a.n / 8, out);
      break;
    case 11:
      dq::dequant_span_v9<T, fmt4::Code::NF4, 4, true><<<ceil_div(a.n / 8, dq::kSpanThreads * 4), dq::kSpanThreads, 0, s>>>(
          a, a.n / 8, out);
      break;
  }
  CHECK_CUDA(cudaGetLastError());
}

// Host reference of one element, as the CPU op computes it (quant_cpu.cpp: dequantize_blocks).
float ref_value(const Layer& L, const Weight& w, bool double_quant, int64_t i) {
  const int64_t b = i / kBlock;
  const float s = double_quant
                      ? fmt4::add_rn(fmt4::mul_rn(L.h_ncode[w.h_qabsmax[b]], w.h_nested[b / fmt4::kNestedBlock]), L.offset)
                      : w.h_absmax[b];
  const uint8_t byte = w.h_packed[i >> 1];
  const int nib = (i & 1) ? fmt4::lo_nibble(byte) : fmt4::hi_nibble(byte);
  return fmt4::mul_rn(fmt4::nf4_value(nib), s);
}

// Host float -> T with round-to-nearest-even (the CPU op's static_cast<c10::BFloat16/Half>).
template <typename T>
T host_cast(float v);
template <>
__nv_bfloat16 host_cast<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
uint32_t bits_of(float v) {
  if constexpr (sizeof(T) == 4) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
  } else {
    const T h = host_cast<T>(v);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
  }
}

// Checks one variant on every projection; returns the number of mismatching sampled elements.
template <typename T>
int64_t check(int variant, const Layer& L, bool double_quant, T* out, std::mt19937_64& rng) {
  int64_t bad = 0;
  std::vector<T> host;
  for (const auto& w : L.w) {
    CHECK_CUDA(cudaMemset(out, 0xFF, w.n * sizeof(T)));  // NaN poison
    launch<T>(variant, args_of(L, w, double_quant), out, 0);
    CHECK_CUDA(cudaDeviceSynchronize());
    host.resize(w.n);
    CHECK_CUDA(cudaMemcpy(host.data(), out, w.n * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<int64_t> idx;
    for (int64_t i = 0; i < std::min<int64_t>(w.n, 65536); ++i) idx.push_back(i);
    for (int64_t i = std::max<int64_t>(0, w.n - 65536); i < w.n; ++i) idx.push_back(i);
    std::uniform_int_distribution<int64_t> pick(0, w.n - 1);
    for (int k = 0; k < (1 << 20); ++k) idx.push_back(pick(rng));
    for (int64_t i : idx) {
      uint32_t got = 0;
      std::memcpy(&got, &host[i], sizeof(T));
      const uint32_t want = bits_of<T>(ref_value(L, w, double_quant, i));
      if (got != want && bad++ < 3)
        std::fprintf(stderr, "  v%d mismatch at %lld: got 0x%x want 0x%x\n", variant, static_cast<long long>(i), got,
                     want);
    }
  }
  return bad;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Flusher {
  void* buf = nullptr;
  size_t size = 256ull << 20;
  Flusher() { CHECK_CUDA(cudaMalloc(&buf, size)); }
  void operator()(cudaStream_t s) { CHECK_CUDA(cudaMemsetAsync(buf, s == nullptr ? 1 : 2, size, s)); }
};

// Median milliseconds of one whole layer (seven launches), L2 flushed before each.
template <typename T>
float time_layer(int variant, const Layer& L, bool double_quant, T* out, int iters, Flusher& flush) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int it = -3; it < iters; ++it) {
    flush(0);
    CHECK_CUDA(cudaEventRecord(a));
    for (const auto& w : L.w) launch<T>(variant, args_of(L, w, double_quant), out, 0);
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    if (it >= 0) ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  return median(ms);
}

// Device-to-device copy bandwidth (read + write) on a 1 GiB buffer.
double memcpy_gbps(int iters) {
  const size_t bytes = 1ull << 30;
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, bytes));
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  CHECK_CUDA(cudaMemset(src, 0x5A, bytes));
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int it = -3; it < iters; ++it) {
    CHECK_CUDA(cudaEventRecord(a));
    CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    if (it >= 0) ms.push_back(t);
  }
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  return 2.0 * bytes / (median(ms) * 1e-3) / 1e9;
}

struct Row {
  std::string name;
  int64_t bad;
  float ms;
  double gbps;
};

template <typename T>
void run_dtype(const char* tname, const Layer& L, int iters, Flusher& flush, std::mt19937_64& rng,
               std::vector<Row>& rows) {
  T* out = dev_alloc<T>(L.max_n);
  for (bool double_quant : {false, true}) {
    int64_t bytes = 0;
    for (const auto& w : L.w) bytes += bytes_moved(w, double_quant, sizeof(T));
    for (int v : {1, 2, 3, 4, 9, 10, 11}) {
      const std::string name = "v" + std::to_string(v) + " nf4 " + (double_quant ? "dq   " : "plain") + " -> " + tname;
      const int64_t bad = check<T>(v, L, double_quant, out, rng);
      const float ms = time_layer<T>(v, L, double_quant, out, iters, flush);
      const double gbps = bytes / (ms * 1e-3) / 1e9;
      std::printf("%-26s check %s  %8.3f ms/layer  %7.1f GB/s\n", name.c_str(), bad ? "FAIL" : "ok  ", ms, gbps);
      rows.push_back({name, bad, ms, gbps});
    }
  }
  CHECK_CUDA(cudaFree(out));
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::max(1, std::atoi(argv[1])) : 15;
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, L2 %d MB; one Llama-2-7B layer (7 projections, block size %lld); median of %d\n",
              prop.name, prop.l2CacheSize >> 20, static_cast<long long>(kBlock), iters);
  std::mt19937_64 rng(std::random_device{}());
  const Layer L = make_layer(rng);
  Flusher flush;
  const double copy = memcpy_gbps(iters);
  std::printf("cudaMemcpy D2D: %.1f GB/s (read + write)\n", copy);
  std::vector<Row> rows;
  run_dtype<__nv_bfloat16>("bf16", L, iters, flush, rng, rows);
  run_dtype<float>("f32", L, iters, flush, rng, rows);

  std::printf("\n%-26s %-6s %10s %9s %8s\n", "variant", "check", "ms/layer", "GB/s", "vs copy");
  int64_t failures = 0;
  for (const auto& r : rows) {
    std::printf("%-26s %-6s %10.3f %9.1f %7.1f%%\n", r.name.c_str(), r.bad ? "FAIL" : "ok", r.ms, r.gbps,
                100.0 * r.gbps / copy);
    failures += r.bad;
  }
  std::printf("%-26s %-6s %10s %9.1f %7.1f%%\n", "cudaMemcpy D2D", "", "", copy, 100.0);
  return failures ? 1 : 0;
}
