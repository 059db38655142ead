#include "trainer/model/layer_writes.h"

#include <cctype>
#include <limits>
#include <map>
#include <mutex>
#include <string>

#include "trainer/model/fused.h"

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace qlora::model {

namespace {

#ifdef QLORA_WITH_CUDA
struct Pending {
  at::cuda::CUDAEvent done;
  std::vector<at::Tensor> written;
};

std::mutex g_mutex;
std::map<int64_t, Pending> g_pending;  // by layer
#endif

}  // namespace

#ifdef QLORA_WITH_CUDA
void defer_layer_write(int64_t layer, at::cuda::CUDAEvent done, std::vector<at::Tensor> written) {
  TORCH_CHECK(!written.empty(), "defer_layer_write: nothing written");
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_pending.find(layer);
  if (it == g_pending.end()) {
    g_pending.emplace(layer, Pending{std::move(done), std::move(written)});
    return;
  }
  // The earlier write's weights still need their versions moved; the new event covers both writes.
  it->second.done = std::move(done);
  it->second.written.insert(it->second.written.end(), written.begin(), written.end());
}
#endif

void await_layer_writes(int64_t first, int64_t last) {
#ifdef QLORA_WITH_CUDA
  std::vector<Pending> taken;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_pending.lower_bound(first); it != g_pending.end() && it->first <= last;) {
      taken.push_back(std::move(it->second));
      it = g_pending.erase(it);
    }
  }
  if (taken.empty()) return;
  for (auto& p : taken) {
    p.done.block(c10::cuda::getCurrentCUDAStream(p.written.front().device().index()));
    for (auto& t : p.written) t.unsafeGetTensorImpl()->bump_version();
  }
  refresh_adapter_casts();
#else
  (void)first, (void)last;
#endif
}

void await_all_layer_writes() {
  await_layer_writes(std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
}

bool layer_writes_pending() {
#ifdef QLORA_WITH_CUDA
  std::lock_guard<std::mutex> lock(g_mutex);
  return !g_pending.empty();
#else
  return false;
#endif
}

int64_t decoder_layer_of(const std::string& name) {
  static const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return -1;
  size_t i = prefix.size(), end = i;
  while (end < name.size() && std::isdigit(static_cast<unsigned char>(name[end]))) ++end;
  if (end == i || end >= name.size() || name[end] != '.' || end - i > 9) return -1;
  return std::stoll(name.substr(i, end - i));
}

}  // namespace qlora::model
