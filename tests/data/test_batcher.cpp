// Batcher determinism and cursor save/restore, collation (padding by position), padding-free collation,
// packing, the eval split.
#include <gtest/gtest.h>

#include <set>

#include "datasets/batcher.h"
#include "datasets/dataset.h"
#include "tests/data/data_fixtures.h"

namespace qlora::data {
namespace {

using test::config;
using test::reference;
using test::tokenizer;

DataConfig mixed_config() {
  const auto& set = reference()["sets"]["mixed"];
  DataConfig cfg = config();
  cfg.train_file = set["file"];
  cfg.system_prompt = set["system_prompt"];
  return cfg;
}

void expect_same(const Batch& a, const Batch& b) {
  EXPECT_TRUE(at::equal(a.input_ids, b.input_ids));
  EXPECT_TRUE(at::equal(a.labels, b.labels));
  EXPECT_TRUE(at::equal(a.attention_mask, b.attention_mask));
  EXPECT_TRUE(at::equal(a.position_ids, b.position_ids));
  EXPECT_EQ(a.tokens, b.tokens);
}

TEST(Collate, PadsByPositionAndCountsLossTokens) {
  Dataset d = Dataset::load(mixed_config(), tokenizer(), mixed_config().train_file);
  std::vector<const Example*> rows = {&d.at(0), &d.at(1), &d.at(5)};
  const int32_t pad = tokenizer().eos_id();  // pad = eos: padding must still be masked by position
  Batch b = collate(rows, pad);
  int64_t T = 0, tokens = 0;
  for (auto* r : rows) T = std::max<int64_t>(T, r->ids.size()), tokens += r->trained_tokens();
  ASSERT_EQ(b.input_ids.sizes(), (at::IntArrayRef{3, T}));
  EXPECT_EQ(b.input_ids.scalar_type(), at::kLong);
  EXPECT_EQ(b.labels.scalar_type(), at::kLong);
  EXPECT_EQ(b.attention_mask.scalar_type(), at::kBool);
  EXPECT_EQ(b.position_ids.scalar_type(), at::kLong);
  EXPECT_EQ(b.tokens, tokens);
  EXPECT_EQ(b.labels.ne(kIgnore).sum().item<int64_t>(), tokens);
  for (int64_t i = 0; i < 3; ++i) {
    const Example& r = *rows[i];
    int64_t n = r.ids.size();
    for (int64_t t = 0; t < T; ++t) {
      EXPECT_EQ(b.attention_mask[i][t].item<bool>(), t < n);
      EXPECT_EQ(b.position_ids[i][t].item<int64_t>(), t);
      EXPECT_EQ(b.input_ids[i][t].item<int64_t>(), t < n ? r.ids[t] : pad);
      EXPECT_EQ(b.labels[i][t].item<int64_t>(), t < n ? r.labels[t] : kIgnore);
    }
  }
}

// collate_flat: the rows end to end in one row, each row and each example packed in it restarting the
// positions, no padding, the same labelled tokens as the padded batch (each row's first label carries no
// loss there either: the loss predicts labels[t + 1] from position t).
TEST(Collate, PaddingFreeRowsEndToEnd) {
  Dataset d = Dataset::load(mixed_config(), tokenizer(), mixed_config().train_file);
  int64_t L = 0;
  for (const auto& e : d.examples()) L = std::max<int64_t>(L, e.ids.size());
  const std::vector<Example> packed = pack(d.examples(), 2 * L);
  ASSERT_GT(packed[0].segment_starts.size(), 1u);
  std::vector<const Example*> rows = {&d.at(0), &packed[0], &d.at(5)};
  const Batch padded = collate(rows, 2), flat = collate_flat(rows);
  std::vector<int64_t> starts;  // every example's start in the flat row
  std::vector<int32_t> ids, labels;
  for (const Example* r : rows) {
    const auto offset = static_cast<int64_t>(ids.size());
    if (r->segment_starts.empty()) starts.push_back(offset);
    for (int32_t s : r->segment_starts) starts.push_back(offset + s);
    ids.insert(ids.end(), r->ids.begin(), r->ids.end());
    labels.insert(labels.end(), r->labels.begin(), r->labels.end());
    EXPECT_EQ(r->labels[0], kIgnore);
  }
  const auto total = static_cast<int64_t>(ids.size());
  ASSERT_EQ(flat.input_ids.sizes(), (at::IntArrayRef{1, total}));
  EXPECT_TRUE(flat.attention_mask.all().item<bool>());
  EXPECT_EQ(flat.tokens, padded.tokens);
  for (int64_t t = 0, s = 0; t < total; ++t) {
    if (s + 1 < static_cast<int64_t>(starts.size()) && starts[s + 1] == t) ++s;
    EXPECT_EQ(flat.input_ids[0][t].item<int64_t>(), ids[t]) << t;
    EXPECT_EQ(flat.labels[0][t].item<int64_t>(), labels[t]) << t;
    EXPECT_EQ(flat.position_ids[0][t].item<int64_t>(), t - starts[s]) << t;
  }
  // A batcher set padding-free gives its batches so.
  BatcherOptions o;
  o.micro_batch_size = 3, o.shuffle = false, o.padding_free = true;
  Batcher b(d, o);
  expect_same(b.next(), collate_flat({&d.at(0), &d.at(1), &d.at(2)}));
}

TEST(Batcher, SeededShuffleIsDeterministicAndCoversEachEpoch) {
  Dataset d = Dataset::load(mixed_config(), tokenizer(), mixed_config().train_file);
  BatcherOptions o{.micro_batch_size = 5, .shuffle = true, .seed = 7, .pad_value = 2};
  Batcher a(d, o), b(d, o);
  EXPECT_EQ(a.batches_per_epoch(), 3);  // 12 rows: 5 + 5 + 2
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    std::vector<int64_t> order = a.order(epoch);
    EXPECT_EQ(std::set<int64_t>(order.begin(), order.end()).size(), 12u);
    int64_t pos = 0;
    for (int64_t k = 0; k < 3; ++k) {
      Batch x = a.next(), y = b.next();
      expect_same(x, y);
      std::vector<const Example*> rows;
      for (int64_t i = pos; i < std::min<int64_t>(pos + 5, 12); ++i) rows.push_back(&d.at(order[i]));
      expect_same(x, collate(rows, 2));
      pos += rows.size();
    }
    EXPECT_EQ(a.state(), (Batcher::State{epoch + 1, 0}));
  }
  EXPECT_NE(a.order(0), a.order(1));  // reshuffled each epoch
  o.seed = 8;
  EXPECT_NE(Batcher(d, o).order(0), a.order(0));
  o.shuffle = false;
  std::vector<int64_t> ident(12);
  for (int64_t i = 0; i < 12; ++i) ident[i] = i;
  EXPECT_EQ(Batcher(d, o).order(3), ident);
}

TEST(Batcher, RestoreMidEpochGivesTheSameBatches) {
  Dataset d = Dataset::load(mixed_config(), tokenizer(), mixed_config().train_file);
  BatcherOptions o{.micro_batch_size = 4, .shuffle = true, .seed = 3, .pad_value = 2};
  for (int64_t stop : {1, 2, 3, 4}) {  // mid-epoch, at the epoch boundary, into the next epoch
    Batcher run(d, o);
    for (int64_t i = 0; i < stop; ++i) run.next();
    Batcher::State saved = run.state();
    std::vector<Batch> expect;
    for (int i = 0; i < 5; ++i) expect.push_back(run.next());
    Batcher resumed(d, o);
    resumed.restore(saved);
    for (int i = 0; i < 5; ++i) expect_same(resumed.next(), expect[i]);
  }
  Batcher b(d, o);
  EXPECT_THROW_MSG(b.restore({0, 12}), "position 12", "12 rows");
  EXPECT_THROW_MSG(b.restore({-1, 0}), "epoch -1");
}

TEST(Packing, RowsHoldWholeExamplesInOrder) {
  Dataset d = Dataset::load(mixed_config(), tokenizer(), mixed_config().train_file);
  int64_t L = 0;
  for (const auto& e : d.examples()) L = std::max<int64_t>(L, e.ids.size());
  L += 20;  // every example fits; most rows hold several
  std::vector<Example> rows = pack(d.examples(), L);
  ASSERT_LT(rows.size(), d.examples().size());
  std::vector<int32_t> all_ids, all_labels, packed_ids, packed_labels;
  for (const auto& e : d.examples()) {
    all_ids.insert(all_ids.end(), e.ids.begin(), e.ids.end());
    all_labels.insert(all_labels.end(), e.labels.begin(), e.labels.end());
  }
  size_t next_example = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    const Example& row = rows[r];
    EXPECT_LE(static_cast<int64_t>(row.ids.size()), L);
    ASSERT_FALSE(row.segment_starts.empty());
    EXPECT_EQ(row.segment_starts[0], 0);
    for (size_t s = 0; s < row.segment_starts.size(); ++s) {
      const Example& src = d.at(next_example++);
      int32_t b = row.segment_starts[s];
      EXPECT_EQ(std::vector<int32_t>(row.ids.begin() + b, row.ids.begin() + b + src.ids.size()), src.ids);
      EXPECT_EQ(row.labels[b], kIgnore);
    }
    // Greedy: the next row's first example did not fit here.
    if (r + 1 < rows.size()) {
      EXPECT_GT(row.ids.size() + d.at(next_example).ids.size(), static_cast<size_t>(L));
    }
    packed_ids.insert(packed_ids.end(), row.ids.begin(), row.ids.end());
    packed_labels.insert(packed_labels.end(), row.labels.begin(), row.labels.end());
  }
  EXPECT_EQ(next_example, d.examples().size());
  EXPECT_EQ(packed_ids, all_ids);
  EXPECT_EQ(packed_labels, all_labels);  // every example's first label was already masked
  // Positions restart at each packed example; the whole row is attended (no padding inside).
  Batch b = collate({&rows[0]}, 2);
  for (size_t s = 0; s < rows[0].segment_starts.size(); ++s)
    EXPECT_EQ(b.position_ids[0][rows[0].segment_starts[s]].item<int64_t>(), 0);
  EXPECT_EQ(b.position_ids.eq(0).sum().item<int64_t>(), static_cast<int64_t>(rows[0].segment_starts.size()));

  DataConfig cfg = mixed_config();
  cfg.packing = true;
  cfg.max_seq_len = L;
  DataSplits s = load_datasets(cfg, tokenizer());
  EXPECT_EQ(s.train.size(), static_cast<int64_t>(rows.size()));
  EXPECT_EQ(s.train.stats().examples, d.size());
  EXPECT_EQ(s.train.stats().rows, static_cast<int64_t>(rows.size()));
  EXPECT_EQ(s.train.stats().trained_tokens, d.stats().trained_tokens);
  EXPECT_FALSE(s.eval.has_value());
}

TEST(Split, EvalFractionIsSeededDisjointAndComplete) {
  DataConfig cfg = mixed_config();
  Dataset full = Dataset::load(cfg, tokenizer(), cfg.train_file);
  cfg.eval_fraction = 0.25;
  DataSplits s = load_datasets(cfg, tokenizer());
  ASSERT_TRUE(s.eval.has_value());
  EXPECT_EQ(s.eval->size(), 3);
  EXPECT_EQ(s.train.size(), 9);
  std::vector<int64_t> ev = eval_indices(12, 0.25, cfg.seed);
  size_t ti = 0, ei = 0;
  for (int64_t i = 0; i < 12; ++i) {  // each example lands in exactly one split, in file order
    bool is_eval = std::find(ev.begin(), ev.end(), i) != ev.end();
    const Example& got = is_eval ? s.eval->at(ei++) : s.train.at(ti++);
    EXPECT_EQ(got.ids, full.at(i).ids);
  }
  EXPECT_EQ(eval_indices(12, 0.25, cfg.seed), ev);
  EXPECT_NE(eval_indices(12, 0.25, cfg.seed + 1), ev);
  EXPECT_EQ(eval_indices(12, 0.0, 1).size(), 0u);
  EXPECT_EQ(eval_indices(3, 0.01, 1).size(), 1u);  // at least one
  EXPECT_EQ(eval_indices(2, 0.5, 1).size(), 1u);   // at most n - 1

  // An eval file wins over the fraction.
  DataConfig c2 = mixed_config();
  c2.eval_file = reference()["sets"]["text"]["file"];
  c2.eval_fraction = 0.25;
  DataSplits s2 = load_datasets(c2, tokenizer());
  EXPECT_EQ(s2.train.size(), 12);
  ASSERT_TRUE(s2.eval.has_value());
  EXPECT_EQ(s2.eval->size(), 8);

  DataConfig c3 = mixed_config();
  c3.eval_fraction = 0.75;
  EXPECT_THROW_MSG(load_datasets(c3, tokenizer()), "data.eval_fraction", "[0, 0.5]");
  DataConfig c4 = mixed_config();
  c4.train_file = "";
  EXPECT_THROW_MSG(load_datasets(c4, tokenizer()), "data.train_file");
}

TEST(Permutation, IsAPermutationAndStable) {
  auto p = seeded_permutation(1000, 42);
  std::set<int64_t> s(p.begin(), p.end());
  EXPECT_EQ(s.size(), 1000u);
  EXPECT_EQ(*s.begin(), 0);
  EXPECT_EQ(*s.rbegin(), 999);
  EXPECT_EQ(seeded_permutation(1000, 42), p);
  EXPECT_NE(seeded_permutation(1000, 43), p);
  EXPECT_TRUE(seeded_permutation(0, 1).empty());
}

}  // namespace
}  // namespace qlora::data
