// Writes to a decoder layer's weights queued on another CUDA stream, which the layer's readers wait for.
// The optimizer (train/optim.h) queues a step's update of the adapters layer by layer on a stream of its own,
// where it runs beside the next step's forward instead of between the two steps: the forward waits for layer
// i's update just before layer i (LlamaForCausalLMImpl::hidden_states), not for the whole update before layer 0.
//
// Versions: a deferred write leaves its weights' version counters as they were until a reader has waited for it;
// the wait moves them. So whatever caches a product of the weights by their versions (the adapters' casts and the
// block-diagonal B operand made ahead, fused.cpp) takes a weight as changed only once the stream that reads it
// has waited for the change, and never reads one half-written.
//
// Readers outside a forward (a checkpoint's save, the optimizer's state) call await_all_layer_writes() first.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#endif

namespace qlora::model {

#ifdef QLORA_WITH_CUDA
// Registers a write of `written` (weights of decoder layer `layer`) that is complete when `done` is. A write
// registered for a layer that still has one pending supersedes it: `done` must come after the earlier one's
// (the optimizer queues every update on one stream).
void defer_layer_write(int64_t layer, at::cuda::CUDAEvent done, std::vector<at::Tensor> written);
#endif

// The current stream waits for the pending writes of layers first..last; their weights' versions move, and
// the adapters' casts that changed are made again on that stream.
void await_layer_writes(int64_t first, int64_t last);
void await_all_layer_writes();

// Whether any write is pending (tests).
bool layer_writes_pending();

// The decoder layer a parameter belongs to by its Hugging Face name ("model.layers.N. ..."), or -1.
int64_t decoder_layer_of(const std::string& name);

}  // namespace qlora::model
