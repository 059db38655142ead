// Config parsing, overrides, validation, dumping, diffing and hashing, all driven by ONE field table:
// for_each_field() lists every key with a reference to its field and its numeric range, so adding a
// field is one line there (plus its default in config.h). Parsing looks keys up in it, to_yaml and the
// hash walk it in order, validate() range-checks through it.
//
// Invariants: to_yaml(cfg) parses back to a Config == cfg (doubles are written in shortest round-trip
// form); config_hash depends only on the values of non-resume-neutral keys, in table order.
// Errors carry a location prefix: "<file>:<line>: " for keys read from YAML, "--set <override>: " for
// overrides, "<file>: " for defaults that fail validation, nothing when validate() is called directly.
#include "trainer/config/config.h"

#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <charconv>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <type_traits>
#include <utility>

#include "trainer/core/error.h"
#include "trainer/core/fs.h"

namespace qlora {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Allowed values of a numeric field; checked in validate() so overrides can fix a bad file value.
struct Range {
  double lo = -kInf, hi = kInf;
  bool lo_open = false, hi_open = false;  // open: the bound itself is excluded
};
constexpr Range at_least(double lo) { return {lo, kInf, false, false}; }
constexpr Range above(double lo) { return {lo, kInf, true, false}; }
constexpr Range in_closed(double lo, double hi) { return {lo, hi, false, false}; }
constexpr Range in_half_open(double lo, double hi) { return {lo, hi, false, true}; }
constexpr Range any() { return {}; }

// THE field table. C is Config or const Config; v(key, field&, range) is called once per key, in the
// order to_yaml writes them. A section is the part of the key before the dot.
template <class C, class V>
void for_each_field(C& c, V&& v) {
  v("method", c.method, any());

  v("model.path", c.model.path, any());
  v("model.tokenizer", c.model.tokenizer, any());
  v("model.dtype", c.model.dtype, any());
  v("model.device", c.model.device, any());
  v("model.gradient_checkpointing", c.model.gradient_checkpointing, any());
  v("model.gradient_checkpointing_layers", c.model.gradient_checkpointing_layers, at_least(-1));

  v("quant.type", c.quant.type, any());
  v("quant.block_size", c.quant.block_size, in_closed(32, 4096));  // + power of two, in validate()
  v("quant.double_quant", c.quant.double_quant, any());

  v("lora.r", c.lora.r, at_least(1));
  v("lora.alpha", c.lora.alpha, above(0));
  v("lora.dropout", c.lora.dropout, in_half_open(0, 1));
  v("lora.rslora", c.lora.rslora, any());
  v("lora.target_modules", c.lora.target_modules, any());

  v("data.train_file", c.data.train_file, any());
  v("data.eval_file", c.data.eval_file, any());
  v("data.format", c.data.format, any());
  v("data.system_prompt", c.data.system_prompt, any());
  v("data.max_seq_len", c.data.max_seq_len, at_least(8));
  v("data.train_on_prompt", c.data.train_on_prompt, any());
  v("data.packing", c.data.packing, any());
  v("data.padding_free", c.data.padding_free, any());
  v("data.eval_fraction", c.data.eval_fraction, in_closed(0, 0.5));
  v("data.shuffle", c.data.shuffle, any());
  v("data.seed", c.data.seed, at_least(0));
  v("data.skip_bad_records", c.data.skip_bad_records, any());

  v("train.epochs", c.train.epochs, at_least(1));
  v("train.max_steps", c.train.max_steps, at_least(-1));  // -1 or 0: use epochs
  v("train.micro_batch_size", c.train.micro_batch_size, at_least(1));
  v("train.grad_accum", c.train.grad_accum, at_least(1));
  v("train.lr", c.train.lr, above(0));
  v("train.schedule", c.train.schedule, any());
  v("train.warmup_steps", c.train.warmup_steps, at_least(0));
  v("train.warmup_ratio", c.train.warmup_ratio, in_half_open(0, 1));
  v("train.weight_decay", c.train.weight_decay, at_least(0));
  v("train.adam_beta1", c.train.adam_beta1, in_half_open(0, 1));
  v("train.adam_beta2", c.train.adam_beta2, in_half_open(0, 1));
  v("train.adam_eps", c.train.adam_eps, above(0));
  v("train.max_grad_norm", c.train.max_grad_norm, any());  // <= 0 disables clipping
  v("train.seed", c.train.seed, at_least(0));
  v("train.log_every", c.train.log_every, at_least(1));
  v("train.eval_every", c.train.eval_every, at_least(0));
  v("train.max_nonfinite_steps", c.train.max_nonfinite_steps, at_least(1));

  v("checkpoint.every", c.checkpoint.every, at_least(0));
  v("checkpoint.keep_last", c.checkpoint.keep_last, at_least(1));
  v("checkpoint.resume", c.checkpoint.resume, any());
  v("checkpoint.force_resume", c.checkpoint.force_resume, any());

  v("output.dir", c.output.dir, any());
  v("output.export_adapter", c.output.export_adapter, any());
  v("output.export_merged", c.output.export_merged, any());
  v("output.merged_dtype", c.output.merged_dtype, any());
}

// ---- enum spellings: the first spelling of each value is canonical, later ones are aliases ----------

template <class E>
struct Spelling {
  E value;
  const char* name;
};

template <class E>
struct Spellings;
template <>
struct Spellings<Method> {
  static constexpr Spelling<Method> list[] = {
      {Method::QLoRA, "qlora"}, {Method::LoRA, "lora"}, {Method::Full, "full"}};
};
template <>
struct Spellings<QuantType> {
  static constexpr Spelling<QuantType> list[] = {{QuantType::NF4, "nf4"}, {QuantType::FP4, "fp4"}};
};
template <>
struct Spellings<DType> {
  static constexpr Spelling<DType> list[] = {{DType::Auto, "auto"},         {DType::BFloat16, "bfloat16"},
                                             {DType::Float16, "float16"},   {DType::Float32, "float32"},
                                             {DType::BFloat16, "bf16"},     {DType::Float16, "fp16"},
                                             {DType::Float32, "fp32"}};
};
template <>
struct Spellings<Device> {
  static constexpr Spelling<Device> list[] = {
      {Device::Auto, "auto"}, {Device::CPU, "cpu"}, {Device::CUDA, "cuda"}};
};
template <>
struct Spellings<DataFormat> {
  static constexpr Spelling<DataFormat> list[] = {{DataFormat::Auto, "auto"},
                                                  {DataFormat::Text, "text"},
                                                  {DataFormat::Guanaco, "guanaco"},
                                                  {DataFormat::Messages, "messages"},
                                                  {DataFormat::Alpaca, "alpaca"}};
};
template <>
struct Spellings<Schedule> {
  static constexpr Spelling<Schedule> list[] = {
      {Schedule::Constant, "constant"}, {Schedule::Linear, "linear"}, {Schedule::Cosine, "cosine"}};
};

template <>
struct Spellings<Checkpointing> {
  // true / false: the boolean this key was (and what Hugging Face's gradient_checkpointing is).
  static constexpr Spelling<Checkpointing> list[] = {
      {Checkpointing::Off, "off"},         {Checkpointing::Selective, "selective"}, {Checkpointing::Full, "full"},
      {Checkpointing::Selective, "true"},  {Checkpointing::Selective, "True"},      {Checkpointing::Off, "false"},
      {Checkpointing::Off, "False"}};
};

template <class E>
std::string enum_name(E v) {
  for (const auto& s : Spellings<E>::list)
    if (s.value == v) return s.name;
  // Only reachable through a cast of an out-of-range integer: an internal error, not bad input.
  throw std::logic_error("config: enum value without a spelling");
}

// "auto, bfloat16, float16, float32": the canonical spellings (aliases are accepted but not listed).
template <class E>
std::string enum_choices(std::vector<std::string>* names = nullptr) {
  std::vector<std::string> all;
  std::string out;
  std::set<int> seen;
  for (const auto& s : Spellings<E>::list) {
    all.push_back(s.name);
    if (!seen.insert(static_cast<int>(s.value)).second) continue;
    if (!out.empty()) out += ", ";
    out += s.name;
  }
  if (names) *names = all;
  return out;
}

// ---- scalar text <-> values ---------------------------------------------------------------------------

template <class T>
constexpr bool is_enum_field = std::is_enum_v<T>;

// Shortest text that parses back to the same double; always with a '.' or exponent so YAML readers
// other than ours (PyYAML) see a float, not an int or a string ("1e-08" is a string to YAML 1.1).
std::string format_double(double d) {
  std::string s = fmt::format("{}", d);
  if (s.find_first_of("eE") != std::string::npos) {
    if (s.find('.') == std::string::npos) s.insert(s.find_first_of("eE"), ".0");
  } else if (s.find('.') == std::string::npos && s.find_first_of("in") == std::string::npos) {
    s += ".0";
  }
  return s;
}

// YAML double-quoted string (a superset of JSON escapes); UTF-8 bytes pass through.
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (ch < 0x20 || ch == 0x7f) out += fmt::format("\\x{:02x}", ch);
        else out += static_cast<char>(ch);
    }
  }
  return out + "\"";
}

// The value as YAML text (for to_yaml) or as plain canonical text (for hashing, diffs and messages).
template <class T>
std::string value_text(const T& v, bool yaml) {
  if constexpr (std::is_same_v<T, std::string>) {
    return yaml ? quote(v) : v;
  } else if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return std::to_string(v);
  } else if constexpr (std::is_same_v<T, double>) {
    return format_double(v);
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + (yaml ? quote(v[i]) : v[i]);
    return out + "]";
  } else {
    static_assert(is_enum_field<T>, "config field of unsupported type");
    // Quoted where a YAML 1.1 reader (PyYAML) would take the bare word for a boolean ("off").
    static const std::set<std::string> kYaml11Bools = {"y", "n", "yes", "no", "on", "off", "true", "false"};
    const std::string name = enum_name(v);
    return yaml && kYaml11Bools.count(name) ? quote(name) : name;
  }
}

// How a node reads in "expected X, got Y".
std::string describe(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null: return "nothing (null)";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Scalar: return "'" + n.Scalar() + "'";
    default: return "an undefined value";
  }
}

// Sets `field` from node `n`; errors read "<where><key>: expected ..., got ...".
template <class T>
void assign(T& field, const YAML::Node& n, const std::string& key, const std::string& where) {
  auto bad = [&](const std::string& expected) { fail("{}{}: expected {}, got {}", where, key, expected, describe(n)); };
  if constexpr (std::is_same_v<T, std::string>) {
    if (n.IsNull()) field.clear();  // `eval_file:` with nothing means ""
    else if (n.IsScalar()) field = n.Scalar();
    else bad("a string");
  } else if constexpr (std::is_same_v<T, bool>) {
    bool b = false;
    if (!n.IsScalar() || !YAML::convert<bool>::decode(n, b)) bad("true or false");
    field = b;
  } else if constexpr (std::is_same_v<T, int64_t>) {
    if (!n.IsScalar()) bad("an integer");
    std::string s = n.Scalar();
    const char* b = s.data() + (!s.empty() && s[0] == '+' ? 1 : 0);
    const char* e = s.data() + s.size();
    int64_t x = 0;
    auto [p, ec] = std::from_chars(b, e, x);
    if (ec == std::errc::result_out_of_range) bad("an integer in the 64-bit range");
    if (ec != std::errc() || p != e || b == e) bad("an integer");
    field = x;
  } else if constexpr (std::is_same_v<T, double>) {
    if (!n.IsScalar()) bad("a number");
    std::string s = n.Scalar();
    // YAML's spellings of infinity and NaN (from_chars knows only "inf"/"nan").
    std::string lower;
    for (char ch : s) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (lower == ".inf" || lower == "+.inf" || lower == "-.inf" || lower == ".nan") bad("a finite number");
    const char* b = s.data() + (!s.empty() && s[0] == '+' ? 1 : 0);
    const char* e = s.data() + s.size();
    double x = 0;
    auto [p, ec] = std::from_chars(b, e, x, std::chars_format::general);
    if (ec != std::errc() || p != e || b == e) bad("a number");
    if (!std::isfinite(x)) bad("a finite number");
    field = x;
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    if (!n.IsSequence()) bad("a list of strings, e.g. [q_proj, v_proj]");
    std::vector<std::string> out;
    for (const auto& item : n) {
      if (!item.IsScalar()) fail("{}{}: expected a list of strings, got an item that is {}", where, key, describe(item));
      out.push_back(item.Scalar());
    }
    field = std::move(out);
  } else {
    static_assert(is_enum_field<T>, "config field of unsupported type");
    std::vector<std::string> names;
    std::string choices = enum_choices<T>(&names);
    if (!n.IsScalar()) bad("one of " + choices);
    for (const auto& s : Spellings<T>::list) {
      if (n.Scalar() == s.name) {
        field = s.value;
        return;
      }
    }
    std::string hint = nearest(n.Scalar(), names);
    fail("{}{}: expected one of {}, got '{}'{}", where, key, choices, n.Scalar(),
         hint.empty() ? "" : fmt::format(" (did you mean '{}'?)", hint));
  }
}

// ---- key table helpers --------------------------------------------------------------------------------

const std::vector<std::string>& all_keys() {
  static const std::vector<std::string> keys = [] {
    std::vector<std::string> k;
    Config c;
    for_each_field(c, [&](const char* key, auto&, Range) { k.emplace_back(key); });
    return k;
  }();
  return keys;
}

std::string section_of(const std::string& key) {
  auto dot = key.find('.');
  return dot == std::string::npos ? "" : key.substr(0, dot);
}

// Section names in table order ("model", "quant", ...); "method" is a top-level key, not a section.
const std::vector<std::string>& all_sections() {
  static const std::vector<std::string> sections = [] {
    std::vector<std::string> s;
    for (const auto& k : all_keys()) {
      std::string sec = section_of(k);
      if (!sec.empty() && (s.empty() || s.back() != sec)) s.push_back(sec);
    }
    return s;
  }();
  return sections;
}

bool is_key(const std::string& key) {
  for (const auto& k : all_keys())
    if (k == key) return true;
  return false;
}

// " (did you mean 'train.lr'?)" for an unknown full key: the nearest key of the same section first
// (compared by their short names), then the nearest key anywhere; else the section's valid keys.
std::string unknown_key_hint(const std::string& key) {
  std::string sec = section_of(key);
  std::string name = key.substr(sec.size() + 1);
  // The right key in the wrong section (lora.lr -> train.lr) beats a near miss in this one (lora.r).
  for (const auto& k : all_keys())
    if (!section_of(k).empty() && k.substr(section_of(k).size() + 1) == name)
      return fmt::format(" (did you mean '{}'?)", k);
  std::vector<std::string> names;
  for (const auto& k : all_keys())
    if (section_of(k) == sec) names.push_back(k.substr(sec.size() + 1));
  std::string near = nearest(name, names);
  if (!near.empty()) return fmt::format(" (did you mean '{}.{}'?)", sec, near);
  near = nearest(key, all_keys());
  if (!near.empty()) return fmt::format(" (did you mean '{}'?)", near);
  if (names.empty()) return fmt::format(" (valid sections: {})", fmt::join(all_sections(), ", "));
  return fmt::format(" (valid keys in {}: {})", sec, fmt::join(names, ", "));
}

std::string unknown_section_hint(const std::string& name) {
  for (const auto& k : all_keys())  // a field written at the top level, e.g. `lr: 1e-4`
    if (!section_of(k).empty() && k.substr(section_of(k).size() + 1) == name)
      return fmt::format(" (did you mean '{}'? keys go inside their section)", k);
  std::vector<std::string> tops = all_sections();
  tops.push_back("method");
  std::string near = nearest(name, tops);
  if (!near.empty()) return fmt::format(" (did you mean '{}'?)", near);
  return fmt::format(" (valid: method, {})", fmt::join(all_sections(), ", "));
}

// Sets the field named `key` (known to exist) from node `n`.
void assign_key(Config& cfg, const std::string& key, const YAML::Node& n, const std::string& where) {
  for_each_field(cfg, [&](const char* k, auto& field, Range) {
    if (key == k) assign(field, n, key, where);
  });
}

bool is_string_key(const std::string& key) {
  bool is_str = false;
  Config c;
  for_each_field(c, [&](const char* k, auto& field, Range) {
    if (key == k) is_str = std::is_same_v<std::decay_t<decltype(field)>, std::string>;
  });
  return is_str;
}

std::string line_of(const std::string& origin, const YAML::Node& n) {
  const YAML::Mark m = n.Mark();
  if (m.is_null()) return origin + ": ";
  return fmt::format("{}:{}: ", origin, m.line + 1);
}

// Where each key got its value ("configs/x.yaml:12: ", "--set train.lr=0: "), for validation messages.
using Locations = std::map<std::string, std::string>;

void apply_yaml(Config& cfg, const YAML::Node& root, const std::string& origin, Locations& loc) {
  if (!root || root.IsNull()) return;  // an empty file: all defaults
  if (!root.IsMap())
    fail("{}expected a mapping of sections (method:, model:, train:, ...) at the top level, got {}",
         line_of(origin, root), describe(root));
  std::map<std::string, std::string> first_seen;  // key -> "line N", to reject duplicates
  auto check_duplicate = [&](const std::string& key, const YAML::Node& at) {
    std::string here = line_of(origin, at);
    auto [it, inserted] = first_seen.emplace(key, here);
    if (!inserted) fail("{}duplicate key '{}' (first set at {})", here, key, it->second.substr(0, it->second.size() - 2));
  };
  for (const auto& top : root) {
    const YAML::Node& k = top.first;
    if (!k.IsScalar()) fail("{}expected a section name, got {}", line_of(origin, k), describe(k));
    const std::string name = k.Scalar();
    if (name == "method") {
      check_duplicate(name, k);
      assign_key(cfg, name, top.second, line_of(origin, top.second));
      loc[name] = line_of(origin, top.second);
      continue;
    }
    bool known = false;
    for (const auto& s : all_sections()) known = known || s == name;
    if (!known) fail("{}unknown section '{}'{}", line_of(origin, k), name, unknown_section_hint(name));
    check_duplicate(name, k);
    const YAML::Node& body = top.second;
    if (body.IsNull()) continue;  // `lora:` with nothing under it: all defaults
    if (!body.IsMap())
      fail("{}{}: expected a mapping of {}.* keys, got {}", line_of(origin, body), name, name, describe(body));
    for (const auto& kv : body) {
      if (!kv.first.IsScalar())
        fail("{}{}: expected a key name, got {}", line_of(origin, kv.first), name, describe(kv.first));
      const std::string key = name + "." + kv.first.Scalar();
      if (!is_key(key)) fail("{}unknown key '{}'{}", line_of(origin, kv.first), key, unknown_key_hint(key));
      check_duplicate(key, kv.first);
      std::string where = line_of(origin, kv.second);
      assign_key(cfg, key, kv.second, where);
      loc[key] = where;
    }
  }
}

void apply_override(Config& cfg, const std::string& o, Locations& loc) {
  const std::string where = fmt::format("--set {}: ", o);
  auto eq = o.find('=');
  if (eq == std::string::npos || eq == 0)
    fail("--set '{}': expected section.key=value, e.g. train.lr=1e-4", o);
  std::string key = o.substr(0, eq);
  while (!key.empty() && key.back() == ' ') key.pop_back();
  while (!key.empty() && key.front() == ' ') key.erase(0, 1);
  const std::string value = o.substr(eq + 1);
  if (!is_key(key)) {
    bool is_section = false;
    for (const auto& s : all_sections()) is_section = is_section || s == key;
    if (is_section) fail("{}'{}' is a section; set one key at a time: --set {}.<key>=<value>", where, key, key);
    std::string hint = key.find('.') == std::string::npos ? unknown_section_hint(key) : unknown_key_hint(key);
    fail("{}unknown key '{}'{}", where, key, hint);
  }
  YAML::Node n;
  // Strings verbatim, so a system prompt with '#' or ': ' survives; quote it to get YAML parsing.
  if (is_string_key(key) && !(value.starts_with('"') || value.starts_with('\''))) {
    n = YAML::Node(value);
  } else {
    try {
      n = YAML::Load(value);
    } catch (const YAML::Exception& e) {
      fail("{}cannot read the value '{}' as YAML: {}", where, value, e.msg);
    }
  }
  assign_key(cfg, key, n, where);
  loc[key] = where;
}

// Ranges and cross-field rules. `where(key)` gives the location prefix for a key's message.
void validate_impl(const Config& cfg, const std::function<std::string(const std::string&)>& where) {
  // Ranges, from the table.
  for_each_field(cfg, [&](const char* key, const auto& field, Range r) {
    using T = std::decay_t<decltype(field)>;
    if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, double>) {
      const double x = static_cast<double>(field);
      const bool lo_ok = r.lo_open ? x > r.lo : x >= r.lo;
      const bool hi_ok = r.hi_open ? x < r.hi : x <= r.hi;
      if (lo_ok && hi_ok) return;
      std::string want;
      if (r.hi == kInf) want = fmt::format("{} {}", r.lo_open ? ">" : ">=", r.lo);
      else if (r.lo == -kInf) want = fmt::format("{} {}", r.hi_open ? "<" : "<=", r.hi);
      else want = fmt::format("in {}{}, {}{}", r.lo_open ? "(" : "[", r.lo, r.hi, r.hi_open ? ")" : "]");
      fail("{}{}: must be {}, got {}", where(key), key, want, value_text(field, false));
    }
  });

  auto require_set = [&](const std::string& key, const std::string& value, const char* what) {
    QLORA_REQUIRE(!value.empty(), "{}{}: must be set: {}", where(key), key, what);
  };
  require_set("model.path", cfg.model.path, "a Hugging Face model directory (config.json + *.safetensors)");
  require_set("data.train_file", cfg.data.train_file, "a JSONL or JSON file of training records");
  require_set("output.dir", cfg.output.dir, "the directory for checkpoints, exports and metrics");
  require_set("checkpoint.resume", cfg.checkpoint.resume, "none, auto or a checkpoint directory");

  const int64_t bs = cfg.quant.block_size;
  QLORA_REQUIRE((bs & (bs - 1)) == 0, "{}quant.block_size: must be a power of two in [32, 4096], got {}",
                where("quant.block_size"), bs);

  // The seven projections of a Llama decoder layer: what LoRA can wrap (lm_head and embeddings stay out).
  static const std::vector<std::string> kProjections = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"};
  const auto& tm = cfg.lora.target_modules;
  const std::string tm_where = where("lora.target_modules");
  QLORA_REQUIRE(!tm.empty(), "{}lora.target_modules: must name at least one of {}", tm_where,
                fmt::join(kProjections, ", "));
  std::set<std::string> seen;
  for (const auto& m : tm) {
    bool ok = false;
    for (const auto& p : kProjections) ok = ok || p == m;
    if (!ok) {
      std::string hint = nearest(m, kProjections);
      fail("{}lora.target_modules: '{}' is not one of {}{}", tm_where, m, fmt::join(kProjections, ", "),
           hint.empty() ? "" : fmt::format(" (did you mean '{}'?)", hint));
    }
    QLORA_REQUIRE(seen.insert(m).second, "{}lora.target_modules: '{}' is listed twice", tm_where, m);
  }

  QLORA_REQUIRE(cfg.output.merged_dtype != DType::Auto,
                "{}output.merged_dtype: must be one of bfloat16, float16, float32, got auto",
                where("output.merged_dtype"));

  // Two ways to get eval data would silently pick one.
  QLORA_REQUIRE(cfg.data.eval_file.empty() || cfg.data.eval_fraction == 0.0,
                "{}data.eval_fraction: must be 0 when data.eval_file is set (got {}); use one or the other",
                where("data.eval_fraction"), value_text(cfg.data.eval_fraction, false));
  const bool has_eval = !cfg.data.eval_file.empty() || cfg.data.eval_fraction > 0.0;
  QLORA_REQUIRE(cfg.train.eval_every == 0 || has_eval,
                "{}train.eval_every: is {} but there is no eval data (set data.eval_file or data.eval_fraction)",
                where("train.eval_every"), cfg.train.eval_every);
}

}  // namespace

// ---- public API -----------------------------------------------------------------------------------------

std::string to_string(Method v) { return enum_name(v); }
std::string to_string(QuantType v) { return enum_name(v); }
std::string to_string(DType v) { return enum_name(v); }
std::string to_string(Device v) { return enum_name(v); }
std::string to_string(DataFormat v) { return enum_name(v); }
std::string to_string(Schedule v) { return enum_name(v); }
std::string to_string(Checkpointing v) { return enum_name(v); }

void validate(const Config& cfg) {
  validate_impl(cfg, [](const std::string&) { return std::string(); });
}

Config parse_config(const std::string& yaml, const std::string& origin, const std::vector<std::string>& overrides) {
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(yaml);
  } catch (const YAML::ParserException& e) {
    if (e.mark.is_null()) fail("{}: YAML syntax error: {}", origin, e.msg);
    fail("{}:{}: YAML syntax error: {}", origin, e.mark.line + 1, e.msg);
  } catch (const YAML::Exception& e) {
    fail("{}: cannot read YAML: {}", origin, e.msg);
  }
  QLORA_REQUIRE(docs.size() <= 1, "{}: expected one YAML document, found {} (separated by '---')", origin,
                docs.size());
  Config cfg;
  Locations loc;
  try {
    if (!docs.empty()) apply_yaml(cfg, docs[0], origin, loc);
  } catch (const YAML::Exception& e) {  // e.g. a bad alias; yaml-cpp reports it lazily
    fail("{}:{}: cannot read YAML: {}", origin, e.mark.line + 1, e.msg);
  }
  for (const auto& o : overrides) apply_override(cfg, o, loc);
  validate_impl(cfg, [&](const std::string& key) {
    auto it = loc.find(key);
    return it != loc.end() ? it->second : origin + ": ";
  });
  return cfg;
}

Config load_config(const std::filesystem::path& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  QLORA_REQUIRE(std::filesystem::exists(path, ec), "config file '{}' does not exist", path.string());
  QLORA_REQUIRE(!std::filesystem::is_directory(path, ec), "config file '{}' is a directory, expected a YAML file",
                path.string());
  return parse_config(read_file(path), path.string(), overrides);
}

std::string to_yaml(const Config& cfg) {
  std::string out =
      "# Resolved qlora config: every field, defaults included. `train --config <this file>` reruns it.\n";
  std::string section;
  for_each_field(cfg, [&](const char* key, const auto& field, Range) {
    const std::string k = key;
    const std::string sec = section_of(k);
    if (sec.empty()) {
      out += fmt::format("{}: {}\n", k, value_text(field, true));
      return;
    }
    if (sec != section) out += fmt::format("\n{}:\n", sec), section = sec;
    out += fmt::format("  {}: {}\n", k.substr(sec.size() + 1), value_text(field, true));
  });
  return out;
}

bool is_resume_neutral(const std::string& key) {
  // model.gradient_checkpointing(_layers) changes memory, not results: a resume may switch it to fit.
  static const std::set<std::string> kNeutral = {"checkpoint.resume",    "checkpoint.force_resume",
                                                 "checkpoint.keep_last", "checkpoint.every",
                                                 "train.log_every",      "model.gradient_checkpointing",
                                                 "model.gradient_checkpointing_layers"};
  return kNeutral.count(key) > 0 || key.starts_with("output.");
}

std::string config_hash(const Config& cfg) {
  // FNV-1a 64 over "key=value\n" lines: stable across builds and platforms (no std::hash).
  uint64_t h = 0xcbf29ce484222325ull;
  for_each_field(cfg, [&](const char* key, const auto& field, Range) {
    if (is_resume_neutral(key)) return;
    // Quoted (YAML) text, so no string value can imitate a line boundary.
    for (unsigned char ch : fmt::format("{}={}\n", key, value_text(field, true))) {
      h ^= ch;
      h *= 0x100000001b3ull;
    }
  });
  return fmt::format("{:016x}", h);
}

std::vector<std::string> config_diff(const Config& a, const Config& b) {
  std::vector<std::string> diff;
  for (const auto& key : all_keys())
    if (!is_resume_neutral(key) && config_value(a, key) != config_value(b, key)) diff.push_back(key);
  return diff;
}

std::vector<std::string> config_keys() { return all_keys(); }

std::string config_value(const Config& cfg, const std::string& key) {
  std::optional<std::string> text;
  for_each_field(cfg, [&](const char* k, const auto& field, Range) {
    if (key == k) text = value_text(field, false);
  });
  if (!text) fail("unknown config key '{}'{}", key, key.find('.') == std::string::npos ? "" : unknown_key_hint(key));
  return *text;
}

void save_config(const Config& cfg, const std::filesystem::path& file) {
  if (file.has_parent_path()) std::filesystem::create_directories(file.parent_path());
  write_file_atomic(file, to_yaml(cfg));
}

}  // namespace qlora
