// Batcher and collation: see batcher.h.
#include "datasets/batcher.h"

#include <algorithm>

#include "trainer/core/error.h"

namespace qlora::data {

Batch collate(const std::vector<const Example*>& rows, int32_t pad_value) {
  TORCH_CHECK(!rows.empty(), "collate: no rows");
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t T = 0;
  for (const Example* r : rows) T = std::max<int64_t>(T, static_cast<int64_t>(r->ids.size()));
  at::Tensor ids = at::full({B, T}, pad_value, at::kLong);
  at::Tensor labels = at::full({B, T}, kIgnore, at::kLong);
  at::Tensor mask = at::zeros({B, T}, at::kBool);
  at::Tensor pos = at::empty({B, T}, at::kLong);
  auto pi = ids.accessor<int64_t, 2>();
  auto pl = labels.accessor<int64_t, 2>();
  auto pm = mask.accessor<bool, 2>();
  auto pp = pos.accessor<int64_t, 2>();
  Batch b;
  for (int64_t i = 0; i < B; ++i) {
    const Example& r = *rows[static_cast<size_t>(i)];
    TORCH_CHECK(r.ids.size() == r.labels.size(), "collate: ids and labels differ in length");
    size_t seg = 0;
    int64_t start = 0;
    for (int64_t t = 0; t < T; ++t) {
      while (seg < r.segment_starts.size() && r.segment_starts[seg] == t) start = t, ++seg;
      pp[i][t] = t - start;
      if (t < static_cast<int64_t>(r.ids.size())) {
        pi[i][t] = r.ids[static_cast<size_t>(t)];
        pl[i][t] = r.labels[static_cast<size_t>(t)];
        pm[i][t] = true;
        b.tokens += r.labels[static_cast<size_t>(t)] != kIgnore;
      }
    }
  }
  b.input_ids = ids;
  b.labels = labels;
  b.attention_mask = mask;
  b.position_ids = pos;
  return b;
}

Batch collate_flat(const std::vector<const Example*>& rows) {
  TORCH_CHECK(!rows.empty(), "collate_flat: no rows");
  Example flat;
  for (const Example* r : rows) {
    TORCH_CHECK(r->ids.size() == r->labels.size(), "collate_flat: ids and labels differ in length");
    const auto offset = static_cast<int32_t>(flat.ids.size());
    flat.segment_starts.push_back(offset);
    for (int32_t s : r->segment_starts)
      if (s > 0) flat.segment_starts.push_back(offset + s);
    flat.ids.insert(flat.ids.end(), r->ids.begin(), r->ids.end());
    flat.labels.insert(flat.labels.end(), r->labels.begin(), r->labels.end());
    if (offset < static_cast<int32_t>(flat.labels.size())) flat.labels[static_cast<size_t>(offset)] = kIgnore;
  }
  return collate({&flat}, /*pad_value=*/0);  // nothing to pad
}

Batcher::Batcher(const Dataset& data, BatcherOptions opts) : data_(&data), opts_(opts) {
  QLORA_REQUIRE(opts_.micro_batch_size >= 1, "train.micro_batch_size must be at least 1, got {}",
                opts_.micro_batch_size);
  QLORA_REQUIRE(data.size() > 0, "the batcher got an empty dataset");
}

int64_t Batcher::batches_per_epoch() const {
  return (data_->size() + opts_.micro_batch_size - 1) / opts_.micro_batch_size;
}

std::vector<int64_t> Batcher::order(int64_t epoch) const {
  if (opts_.shuffle) return seeded_permutation(data_->size(), static_cast<uint64_t>(opts_.seed + epoch));
  std::vector<int64_t> p(static_cast<size_t>(data_->size()));
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<int64_t>(i);
  return p;
}

void Batcher::restore(State s) {
  QLORA_REQUIRE(s.epoch >= 0 && s.position >= 0 && s.position < data_->size(),
                "data cursor (epoch {}, position {}) does not fit a dataset of {} rows: was the checkpoint "
                "made with other data or data settings?", s.epoch, s.position, data_->size());
  state_ = s;
}

Batch Batcher::next() {
  if (order_epoch_ != state_.epoch) {
    order_ = order(state_.epoch);
    order_epoch_ = state_.epoch;
  }
  const int64_t n = data_->size();
  const int64_t end = std::min(n, state_.position + opts_.micro_batch_size);
  std::vector<const Example*> rows;
  for (int64_t i = state_.position; i < end; ++i) rows.push_back(&data_->at(order_[static_cast<size_t>(i)]));
  state_.position = end;
  if (state_.position == n) state_ = {state_.epoch + 1, 0};
  return opts_.padding_free ? collate_flat(rows) : collate(rows, opts_.pad_value);
}

}  // namespace qlora::data
