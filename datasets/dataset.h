// Datasets: JSON/JSONL records in four formats -> tokenized, label-masked, truncated Examples; the eval
// split; packing.
//
// Files: ".jsonl" is one JSON object per line (blank lines ignored); ".json" is a JSON array of objects,
// or JSONL when its first non-space byte is not '['. Records (DataConfig::format, auto = per record):
//   text      {"text": "<s>[INST] u [/INST] a </s>..."}        pre-formatted Llama-2 chat (format_text)
//   guanaco   {"text": "### Human: u### Assistant: a..."}      converted to the Llama-2 template
//   messages  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
//             optional leading system message, then user/assistant alternating, ending with assistant
//   alpaca    {"instruction": i, "input": x (optional), "output": a}  user = i, or i + "\n\n" + x
// Auto-detection: "messages" -> messages; "instruction" + "output" -> alpaca; "text" containing
// "### Human:" -> guanaco; other "text" -> text. DataConfig::system_prompt applies to records that carry
// no system prompt of their own (not to "text", which is pre-formatted).
//
// Per record: a malformed line, a missing or mistyped field, an undetectable format, or a record without
// an answer is an error naming file and line (JSONL) or record index (JSON array); with
// skip_bad_records it is counted in stats().skipped instead. Examples longer than max_seq_len keep their
// first max_seq_len tokens (stats().truncated); one left with no loss-carrying token is dropped
// (stats().too_long). No usable example at all is an error that says why.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "datasets/chat_template.h"
#include "datasets/tokenizer.h"
#include "trainer/config/config.h"

namespace qlora::data {

struct DatasetStats {
  int64_t records = 0;         // non-blank lines / array elements read
  int64_t examples = 0;        // examples kept
  int64_t rows = 0;            // sequences after packing (== examples without packing)
  int64_t tokens = 0;          // ids over kept examples, after truncation
  int64_t trained_tokens = 0;  // of those, positions whose label carries loss
  int64_t truncated = 0;       // kept examples that lost their tail to max_seq_len
  int64_t too_long = 0;        // dropped: no loss-carrying token left within max_seq_len
  int64_t skipped = 0;         // bad records skipped (skip_bad_records)
};

// One line for the start-of-run log: "<name>: 1000 examples, 183442 tokens (61210 trained), ...".
std::string describe(const DatasetStats& s, const std::string& name);

class Dataset {
 public:
  // Reads and tokenizes `file` with cfg's format, system_prompt, max_seq_len, train_on_prompt and
  // skip_bad_records (not packing, not the split: see load_datasets).
  static Dataset load(const DataConfig& cfg, const Tokenizer& tok, const std::string& file);
  // Wraps examples (e.g. a split or a packing); stats are recomputed except the read-time counters.
  static Dataset from_examples(std::vector<Example> examples, DatasetStats read_stats);

  int64_t size() const { return static_cast<int64_t>(examples_.size()); }
  const Example& at(int64_t i) const;
  const std::vector<Example>& examples() const { return examples_; }
  const DatasetStats& stats() const { return stats_; }

 private:
  std::vector<Example> examples_;
  DatasetStats stats_;
};

// Greedy packing in order: examples are appended to the current row while they fit in max_seq_len,
// never split (each is at most max_seq_len after truncation). segment_starts records each start; the
// labels at those starts are kIgnore (nothing in the row may predict another example's first token).
std::vector<Example> pack(const std::vector<Example>& examples, int64_t max_seq_len);

// A permutation of [0, n) from a fixed, portable generator (SplitMix64 + Fisher-Yates with rejection
// sampling), so a seed means the same order on every platform and library version.
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);

// The indices of `n` records that go to eval under eval_fraction: round(n * fraction) of them (at least
// 1 when fraction > 0, at most n - 1), chosen by a seeded shuffle, returned ascending.
std::vector<int64_t> eval_indices(int64_t n, double fraction, int64_t seed);

struct DataSplits {
  Dataset train;
  std::optional<Dataset> eval;  // none when neither eval_file nor eval_fraction is set
};

// The training run's data: train_file, the eval set (eval_file, or eval_fraction split off train_file
// before packing), then packing of both when cfg.packing.
DataSplits load_datasets(const DataConfig& cfg, const Tokenizer& tok);

}  // namespace qlora::data
