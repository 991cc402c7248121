// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Hugging Face PEFT LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors`.
///
/// Loading gives one `lowrank::Lora<T>` per adapted module, with PEFT's scale:
///
///     s = alpha / r      (alpha / √r when `use_rslora`)
///
/// where r is read from the factor shapes (`lora_A.weight` r × in, `lora_B.weight` out × r) and
/// checked against the config (`r`, or the first matching `rank_pattern` key), and alpha is
/// `lora_alpha` or the first matching `alpha_pattern` key. Pattern keys follow PEFT's
/// `get_pattern_key`: in the config's order, the first key K for which the module name (without
/// the `base_model.model.` prefix) matches the regular expression `(.*\.)?(K)$` from its start
/// wins; failing that, a key equal to the name. Keys are interpreted with ECMAScript syntax, which
/// agrees with Python's `re` on the usual subset (`.`, `*`, `+`, `?`, `|`, `[...]`, `\d`, `{m,n}`);
/// they are limited to 256 bytes and modest repetition counts (see `detail::check_pattern`).
///
/// Keys in the file are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (PEFT's
/// adapter name, "default", is not part of saved keys). `fan_in_fan_out` (GPT-2's Conv1D, base
/// weight stored in × out) is recorded per module: the factors keep their shapes and the forward
/// delta `s (X Aᵀ) Bᵀ` is unchanged; only a merge adds ΔWᵀ (see `merge`).
///
/// What is refused with a `lowrank::error` naming the feature (each changes the math, so a plain
/// LoRA would be silently wrong): DoRA (`use_dora`, `lora_magnitude_vector` tensors), `lora_bias`
/// (`lora_B.bias`), embedding adapters (`lora_embedding_A/B`), convolution adapters (4-D factors),
/// QA-LoRA (`use_qalora`), aLoRA (`alora_invocation_tokens`), `layer_replication`,
/// `target_parameters`, `arrow_config`, peft_type other than "LORA", raw state dicts whose keys
/// still hold an adapter name (`lora_A.default.weight`), and unknown per-module `lora_*` tensors
/// unless `LoadOptions::allow_extra_tensors` is set.
///
/// What is reported and kept but not interpreted: tensors that are not LoRA factors
/// (`modules_to_save` copies such as classifier heads, trainable biases with `bias` ≠ "none",
/// trainable-token deltas) are kept as raw bytes in `Adapter::other_tensors` (by full name) and
/// written back unchanged by `save` — they are full replacement weights of the base model, not
/// deltas, and lowrank applies none of them. Config settings that matter to the base model rather
/// than to the adapter (`modules_to_save`, `bias`, non-default `init_lora_weights`, unrecognised
/// keys with a non-empty value) are described in `Adapter::notes`.
///
/// Extra per-module tensors. Methods whose adapter is LoRA plus a small extra tensor per module
/// (LoRA-XS and LoRA-SB: ΔW = s·B R A with an r × r core R) save it as
/// `base_model.model.<module>.lora_R.weight` (`core_tensor_suffix`), beside `lora_A.weight` and
/// `lora_B.weight`. Such tensors are read into `Module::extra` (keyed by suffix) when
/// `LoadOptions::allow_extra_tensors` is set, and written from it by `save`. PEFT itself does not
/// know them: it loads the A and B factors and warns about the unexpected key, so such a folder is
/// not a plain LoRA to PEFT.
///
/// Saving writes what PEFT's `PeftModel.from_pretrained` loads: the same key names, F32 tensors by
/// default, `{"format": "pt"}` metadata, and a config with `peft_type`, `r`, `lora_alpha`,
/// `use_rslora`, `rank_pattern`, `alpha_pattern`, `target_modules`, `fan_in_fan_out` (and the other
/// keys of a loaded config, kept as they were). If the config's r / alpha / patterns already give
/// every module its rank and alpha they are kept; otherwise r and lora_alpha become the most common
/// values and the patterns list the other modules by their full (regex-escaped) names.
///
/// Example:
/// \code
///   auto adapter = lowrank::peft::load<float>("my-adapter/");
///   for (const auto& [name, module] : adapter.modules)
///       std::cout << name << ": rank " << module.lora.rank() << ", scale " << module.lora.scale() << "\n";
///   lowrank::add_delta(X, adapter.modules.at("model.layers.0.self_attn.q_proj").lora, Y);
///   lowrank::peft::save(adapter, "copy/");
/// \endcode

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/args.hpp"
#include "../lora.hpp"
#include "safetensors.hpp"

namespace lowrank::peft {

/// PEFT's prefix of every saved key.
inline constexpr std::string_view key_prefix = "base_model.model.";
/// Suffix of the r × r core of LoRA-XS / LoRA-SB adapters: `<prefix><module>.lora_R.weight`.
inline constexpr std::string_view core_tensor_suffix = "lora_R.weight";
/// Largest adapter_config.json accepted.
inline constexpr std::uintmax_t max_config_bytes = 16u << 20;

/// The adapter_config.json fields lowrank interprets (the whole document is kept in `json`).
struct Config {
    Index r = 8;                 ///< PEFT's default
    double lora_alpha = 8;       ///< PEFT's default
    bool use_rslora = false;
    bool fan_in_fan_out = false;
    std::vector<std::pair<std::string, Index>> rank_pattern;    ///< in file order
    std::vector<std::pair<std::string, double>> alpha_pattern;  ///< in file order
    /// The document as read (key order kept), or empty for an adapter built in code.
    nlohmann::ordered_json json = nlohmann::ordered_json::object();
};

/// A tensor kept as stored (dtype, shape, little-endian bytes).
struct RawTensor {
    safetensors::Dtype dtype = safetensors::Dtype::F32;
    std::vector<std::uint64_t> shape;
    std::vector<std::byte> bytes;
};

/// One adapted module.
template <Real T>
struct Module {
    Lora<T> lora;                       ///< A r × in, B out × r, scale from alpha and r
    bool fan_in_fan_out = false;        ///< base weight stored in × out (GPT-2 Conv1D)
    std::string rank_pattern_key;       ///< the rank_pattern key that applied ("" if none)
    std::string alpha_pattern_key;      ///< the alpha_pattern key that applied ("" if none)
    safetensors::Dtype dtype = safetensors::Dtype::F32;  ///< storage dtype of lora_A in the file
    std::map<std::string, Matrix<T>> extra;  ///< extra tensors by suffix, e.g. "lora_R.weight"
};

/// A loaded (or built) PEFT LoRA adapter.
template <Real T>
struct Adapter {
    Config config;
    /// Adapted modules by name without `base_model.model.` (the name PEFT's patterns match).
    std::map<std::string, Module<T>> modules;
    /// The file's tensors that are not LoRA factors, by full name: kept as stored, not applied,
    /// written back by `save`.
    std::map<std::string, RawTensor> other_tensors;
    /// The safetensors `__metadata__`.
    std::map<std::string, std::string, std::less<>> metadata;
    /// What was seen and deliberately not applied (one line each).
    std::vector<std::string> notes;

    /// Adds (or replaces) a module.
    Module<T>& add(const std::string& name, Lora<T> lora, bool fan_in_fan_out = false) {
        modules.insert_or_assign(name, Module<T>{std::move(lora), fan_in_fan_out, {}, {}, safetensors::Dtype::F32, {}});
        return modules.at(name);
    }
};

struct LoadOptions {
    /// Read unknown per-module `lora_*` tensors (such as `lora_R.weight`) into `Module::extra`
    /// instead of refusing the adapter.
    bool allow_extra_tensors = false;
    /// How to read the safetensors file.
    safetensors::ReadMode read_mode = safetensors::ReadMode::buffered;
};

struct SaveOptions {
    /// Storage dtype of every tensor (F32 is PEFT's default; F16, BF16, F64 also work).
    safetensors::Dtype dtype = safetensors::Dtype::F32;
};

namespace detail {
using lowrank::detail::fail;
using safetensors::detail::quote_name;

/// Rejects pattern keys that could make std::regex (a recursive engine) exhaust time or stack, or
/// overflow while it reads a number: longer than 256 bytes, a back-reference (`\1`; libstdc++ reads
/// its digits into a `long` unchecked), a `{m,n}` count of more than 6 digits, or counts that
/// multiply to more than 4096 / (length of the key).
inline void check_pattern(const std::string& where, const std::string& key) {
    if (key.size() > 256) fail(where, ": pattern key ", quote_name(key), " is longer than 256 bytes");
    const auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
    double expansion = 1;
    for (std::size_t i = 0; i < key.size(); ++i) {
        if (key[i] == '\\') {
            if (i + 1 < key.size() && is_digit(key[i + 1]))
                fail(where, ": pattern key ", quote_name(key), " has a back-reference or octal escape (not supported)");
            ++i;
            continue;
        }
        if (key[i] != '{') continue;
        double largest = 0;  // {m}, {m,}, {m,n}: the larger of m and n
        std::size_t j = i + 1;
        while (j < key.size() && (is_digit(key[j]) || key[j] == ',')) {
            const std::size_t start = j;
            double count = 0;
            for (; j < key.size() && is_digit(key[j]); ++j) count = count * 10 + (key[j] - '0');
            if (j - start > 6)
                fail(where, ": pattern key ", quote_name(key), " has a repetition count of more than 6 digits");
            largest = std::max(largest, count);
            if (j < key.size() && key[j] == ',') ++j;
        }
        expansion *= largest + 1;
        i = j - 1;
    }
    if (expansion * double(key.size()) > 4096)
        fail(where, ": pattern key ", quote_name(key), " has repetition counts too large to match safely");
}

/// A compiled pattern key.
struct Pattern {
    std::string key;
    std::regex regex;
};

/// Compiles PEFT's `(.*\.)?(KEY)$` for each key (matched against the whole name).
inline std::vector<Pattern> compile_patterns(const std::string& where, const char* field,
                                             const std::vector<std::string>& keys) {
    std::vector<Pattern> out;
    out.reserve(keys.size());
    for (const auto& key : keys) {
        check_pattern(where + ": " + field, key);
        try {
            auto flags = std::regex::ECMAScript;
#if defined(__GLIBCXX__)
            flags |= std::regex_constants::__polynomial;  // libstdc++: no backtracking blow-up
#endif
            out.push_back({key, std::regex("(.*\\.)?(" + key + ")", flags)});
        } catch (const std::regex_error& e) {
            fail(where, ": ", field, " key ", quote_name(key), " is not a valid regular expression (",
                 e.what(), ")");
        }
    }
    return out;
}

/// PEFT's get_pattern_key: the first key whose pattern matches, else a key equal to the name.
inline const std::string* match(const std::vector<Pattern>& patterns, const std::string& module) {
    for (const auto& p : patterns)
        if (std::regex_match(module, p.regex)) return &p.key;
    for (const auto& p : patterns)
        if (p.key == module) return &p.key;
    return nullptr;
}

/// Whether a config value is "set": not null, false, "", [] or {}.
template <class Json>
bool truthy(const Json& v) {
    if (v.is_null()) return false;
    if (v.is_boolean()) return v.template get<bool>();
    if (v.is_string()) return !v.template get_ref<const std::string&>().empty();
    if (v.is_object() || v.is_array()) return !v.empty();
    return true;
}

template <class Json>
bool read_bool(const std::string& where, const Json& doc, const char* key) {
    const auto it = doc.find(key);
    if (it == doc.end() || it->is_null()) return false;
    if (!it->is_boolean()) fail(where, ": '", key, "' must be true or false, got ", it->type_name());
    return it->template get<bool>();
}

/// A positive integer rank from JSON (PEFT writes ints; an integral float is accepted).
template <class Json>
Index read_rank(const std::string& where, const Json& v, const std::string& what) {
    double d = 0;
    if (v.is_number_unsigned()) {
        const auto u = v.template get<std::uint64_t>();
        if (u < 1 || u > (1u << 30)) fail(where, ": ", what, " must be in [1, 2^30], got ", u);
        return static_cast<Index>(u);
    }
    if (v.is_number_float()) d = v.template get<double>();
    else fail(where, ": ", what, " must be a positive integer, got ", v.type_name());
    if (!(d >= 1 && d <= double(1u << 30)) || d != std::floor(d))
        fail(where, ": ", what, " must be a positive integer, got ", d);
    return static_cast<Index>(d);
}

template <class Json>
double read_alpha(const std::string& where, const Json& v, const std::string& what) {
    if (!v.is_number()) fail(where, ": ", what, " must be a number, got ", v.type_name());
    const double d = v.template get<double>();
    if (!std::isfinite(d)) fail(where, ": ", what, " must be finite, got ", d);
    return d;
}

/// Parses and checks adapter_config.json (see the file comment for what is refused).
inline Config parse_config(std::string_view text, const std::string& where, std::vector<std::string>& notes) {
    Config c;
    c.json = safetensors::detail::parse_json_strict(text, where, 32, 1u << 20);
    const auto& doc = c.json;
    if (!doc.is_object()) fail(where, ": the config is not a JSON object");

    const auto pt = doc.find("peft_type");
    if (pt == doc.end() || !pt->is_string())
        fail(where, ": 'peft_type' is missing or not a string (expected \"LORA\")");
    if (pt->template get_ref<const std::string&>() != "LORA")
        fail(where, ": peft_type ", quote_name(pt->template get_ref<const std::string&>()),
             " is not supported (only \"LORA\")");

    // Features that change the math of the adapter.
    if (read_bool(where, doc, "use_dora"))
        fail(where, ": DoRA (use_dora: true, weight-decomposed LoRA) is not supported");
    if (read_bool(where, doc, "lora_bias"))
        fail(where, ": lora_bias (a trainable bias on lora_B) is not supported");
    if (read_bool(where, doc, "use_qalora"))
        fail(where, ": QA-LoRA (use_qalora: true) is not supported");
    for (const char* key : {"alora_invocation_tokens", "layer_replication", "target_parameters", "arrow_config"}) {
        const auto it = doc.find(key);
        if (it != doc.end() && truthy(*it)) fail(where, ": '", key, "' is set; this PEFT feature is not supported");
    }

    if (const auto it = doc.find("r"); it != doc.end() && !it->is_null()) c.r = read_rank(where, *it, "'r'");
    if (const auto it = doc.find("lora_alpha"); it != doc.end() && !it->is_null())
        c.lora_alpha = read_alpha(where, *it, "'lora_alpha'");
    c.use_rslora = read_bool(where, doc, "use_rslora");
    c.fan_in_fan_out = read_bool(where, doc, "fan_in_fan_out");
    if (const auto it = doc.find("rank_pattern"); it != doc.end() && !it->is_null()) {
        if (!it->is_object()) fail(where, ": 'rank_pattern' must be an object, got ", it->type_name());
        for (const auto& [key, value] : it->items())
            c.rank_pattern.emplace_back(key, read_rank(where, value, "rank_pattern[" + quote_name(key) + "]"));
    }
    if (const auto it = doc.find("alpha_pattern"); it != doc.end() && !it->is_null()) {
        if (!it->is_object()) fail(where, ": 'alpha_pattern' must be an object, got ", it->type_name());
        for (const auto& [key, value] : it->items())
            c.alpha_pattern.emplace_back(key, read_alpha(where, value, "alpha_pattern[" + quote_name(key) + "]"));
    }

    // Settings about the base model rather than the adapter: reported.
    if (const auto it = doc.find("modules_to_save"); it != doc.end() && truthy(*it))
        notes.push_back("config: modules_to_save is set; those modules' saved weights are full replacements "
                        "of base weights (kept in other_tensors, not applied)");
    if (const auto it = doc.find("bias"); it != doc.end() && it->is_string() &&
                                          it->template get_ref<const std::string&>() != "none")
        notes.push_back("config: bias = " + quote_name(it->template get_ref<const std::string&>()) +
                        "; trained base biases are kept in other_tensors, not applied");
    if (const auto it = doc.find("init_lora_weights");
        it != doc.end() && it->is_string() && it->template get_ref<const std::string&>() != "gaussian")
        notes.push_back("config: init_lora_weights = " + quote_name(it->template get_ref<const std::string&>()) +
                        "; methods such as PiSSA/OLoRA modify the base weights, which this file does not hold");
    if (const auto it = doc.find("trainable_token_indices"); it != doc.end() && truthy(*it))
        notes.push_back("config: trainable_token_indices is set; the token deltas are kept in other_tensors, not applied");
    static constexpr std::string_view known[] = {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config",
        "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
        "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "megatron_config",
        "megatron_core", "modules_to_save", "peft_type", "peft_version", "qalora_group_size", "r",
        "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_qalora", "use_rslora",
        "trainable_token_indices", "ensure_weight_tying", "alora_invocation_tokens", "layer_replication",
        "target_parameters", "arrow_config", "lora_ga_config", "runtime_config"};
    for (const auto& [key, value] : doc.items())
        if (std::find(std::begin(known), std::end(known), key) == std::end(known) && truthy(value))
            notes.push_back("config: unrecognised key " + quote_name(key) + " is set and was ignored");
    return c;
}

/// "a.b" → "a\.b": a module name as a regex matching only itself.
inline std::string regex_escape(const std::string& s) {
    std::string out;
    for (char ch : s) {
        if (std::string_view("\\^$.|?*+()[]{}").find(ch) != std::string_view::npos) out += '\\';
        out += ch;
    }
    return out;
}

/// JSON number for alpha: an integer when it is one (as PEFT writes it).
inline nlohmann::ordered_json alpha_json(double a) {
    if (a == std::floor(a) && std::fabs(a) < 9e15) return static_cast<std::int64_t>(a);
    return a;
}

inline std::string read_text_file(const std::filesystem::path& path, const std::string& where, std::uintmax_t limit) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) fail(where, ": ", path.string(), " is missing or not a regular file");
    const auto size = std::filesystem::file_size(path, ec);
    if (ec) fail(where, ": cannot read the size of ", path.string());
    if (size > limit) fail(where, ": ", path.string(), " has ", size, " bytes (limit ", limit, ")");
    std::string text(static_cast<std::size_t>(size), '\0');
    std::ifstream in(path, std::ios::binary);
    in.read(text.data(), static_cast<std::streamsize>(size));
    if (!in || static_cast<std::uintmax_t>(in.gcount()) != size) fail(where, ": cannot read ", path.string());
    return text;
}

}  // namespace detail

/// The rank and alpha PEFT gives module `name` (without `base_model.model.`) under `config`,
/// with the pattern keys that applied ("" when none did).
struct Resolved {
    Index r;
    double alpha;
    std::string rank_key;
    std::string alpha_key;
};
[[nodiscard]] inline Resolved resolve(const Config& config, const std::string& name) {
    const std::string where = "lowrank::peft::resolve";
    std::vector<std::string> rk, ak;
    for (const auto& p : config.rank_pattern) rk.push_back(p.first);
    for (const auto& p : config.alpha_pattern) ak.push_back(p.first);
    const auto rp = detail::compile_patterns(where, "rank_pattern", rk);
    const auto ap = detail::compile_patterns(where, "alpha_pattern", ak);
    Resolved out{config.r, config.lora_alpha, {}, {}};
    if (const auto* k = detail::match(rp, name)) {
        out.rank_key = *k;
        for (const auto& p : config.rank_pattern) if (p.first == *k) { out.r = p.second; break; }
    }
    if (const auto* k = detail::match(ap, name)) {
        out.alpha_key = *k;
        for (const auto& p : config.alpha_pattern) if (p.first == *k) { out.alpha = p.second; break; }
    }
    return out;
}

/// Parses adapter_config.json text (throws `lowrank::error`; see the file comment).
[[nodiscard]] inline Config parse_config(std::string_view text) {
    std::vector<std::string> notes;
    return detail::parse_config(text, "lowrank::peft::parse_config", notes);
}

/// Loads an adapter from the text of adapter_config.json and an opened safetensors file.
template <Real T>
[[nodiscard]] Adapter<T> load(std::string_view config_text, const safetensors::File& file,
                              const LoadOptions& options = {}, const std::string& where = "lowrank::peft::load") {
    using detail::fail;
    using safetensors::detail::quote_name;
    Adapter<T> adapter;
    adapter.config = detail::parse_config(config_text, where + ": adapter_config.json", adapter.notes);
    const Config& config = adapter.config;
    adapter.metadata = file.metadata();

    // Sort the tensors into modules: <prefix><module>.lora_<...>.
    struct Parts {
        std::string a, b;  // full tensor names
        std::vector<std::pair<std::string, std::string>> extra;  // suffix, full name
    };
    std::map<std::string, Parts> parts;
    for (const auto& t : file.tensors()) {
        const std::string& full = t.name;
        const auto at = full.rfind(".lora_");
        if (at == std::string::npos || full.compare(0, 5, "lora_") == 0) {
            if (full.compare(0, 5, "lora_") == 0)
                fail(where, ": tensor ", quote_name(full), " has no module name before 'lora_'");
            const auto raw = file.raw(full);
            adapter.other_tensors.emplace(full, RawTensor{t.dtype, t.shape, {raw.begin(), raw.end()}});
            continue;
        }
        if (at > 4096)
            fail(where, ": tensor ", quote_name(full), " has a module name longer than 4096 bytes");
        std::string module = full.substr(0, at);
        const std::string suffix = full.substr(at + 1);
        if (module.compare(0, key_prefix.size(), key_prefix) == 0) module.erase(0, key_prefix.size());
        if (module.empty()) fail(where, ": tensor ", quote_name(full), " has an empty module name");
        const std::string tn = "tensor " + quote_name(full);
        if (suffix.find("lora_magnitude_vector") == 0)
            fail(where, ": ", tn, ": DoRA (lora_magnitude_vector) is not supported");
        if (suffix.find("lora_embedding_") == 0)
            fail(where, ": ", tn, ": embedding adapters (lora_embedding_A/B) are not supported");
        if (suffix == "lora_B.bias" || suffix == "lora_A.bias")
            fail(where, ": ", tn, ": lora_bias (a bias on the LoRA factors) is not supported");
        auto& p = parts[module];
        if (suffix == "lora_A.weight" || suffix == "lora_B.weight") {
            std::string& slot = suffix[5] == 'A' ? p.a : p.b;
            if (!slot.empty())
                fail(where, ": module ", quote_name(module), " has two ", suffix, " tensors: ",
                     quote_name(slot), " and ", quote_name(full));
            slot = full;
        } else if (suffix.compare(0, 7, "lora_A.") == 0 || suffix.compare(0, 7, "lora_B.") == 0) {
            fail(where, ": ", tn, " is not a PEFT-saved key (expected '.lora_A.weight' / '.lora_B.weight'; "
                 "a raw state_dict keeps the adapter name, as in 'lora_A.default.weight')");
        } else {
            p.extra.emplace_back(suffix, full);
        }
    }

    std::vector<std::string> rk, ak;
    for (const auto& p : config.rank_pattern) rk.push_back(p.first);
    for (const auto& p : config.alpha_pattern) ak.push_back(p.first);
    const auto rank_patterns = detail::compile_patterns(where, "rank_pattern", rk);
    const auto alpha_patterns = detail::compile_patterns(where, "alpha_pattern", ak);

    for (auto& [module, p] : parts) {
        const std::string mn = "module " + quote_name(module);
        if (p.a.empty() || p.b.empty()) {
            if (p.a.empty() && p.b.empty())  // only extras: not an adapted module
                fail(where, ": ", mn, " has tensors ", quote_name(p.extra.front().second),
                     "… but no lora_A.weight / lora_B.weight");
            fail(where, ": ", mn, " has ", p.a.empty() ? "lora_B.weight but no lora_A.weight"
                                                        : "lora_A.weight but no lora_B.weight");
        }
        if (!p.extra.empty() && !options.allow_extra_tensors)
            fail(where, ": ", mn, " has a tensor ", quote_name(p.extra.front().second),
                 " that is not part of a plain LoRA adapter (set LoadOptions::allow_extra_tensors to "
                 "read it into Module::extra)");
        const auto& ta = file.info(p.a);
        const auto& tb = file.info(p.b);
        for (const auto* t : {&ta, &tb}) {
            if (t->shape.size() == 4)
                fail(where, ": ", mn, ": convolution adapters (4-D ", quote_name(t->name), ") are not supported");
            if (t->shape.size() != 2)
                fail(where, ": ", mn, ": ", quote_name(t->name), " has ", t->shape.size(),
                     " dimensions, expected 2");
            if (!safetensors::is_convertible(t->dtype))
                fail(where, ": ", mn, ": ", quote_name(t->name), " has dtype ", safetensors::dtype_name(t->dtype),
                     " (F16, BF16, F32 or F64 expected)");
        }
        const auto r = static_cast<Index>(ta.shape[0]);
        const auto in = static_cast<Index>(ta.shape[1]);
        const auto out = static_cast<Index>(tb.shape[0]);
        if (static_cast<Index>(tb.shape[1]) != r)
            fail(where, ": ", mn, ": lora_A is ", r, " x ", in, " (rank ", r, ") but lora_B is ",
                 tb.shape[0], " x ", tb.shape[1], "; expected ", out, " x ", r);
        const std::string* rkey = detail::match(rank_patterns, module);
        Index want_r = config.r;
        if (rkey)
            for (const auto& kv : config.rank_pattern) if (kv.first == *rkey) { want_r = kv.second; break; }
        if (r != want_r)
            fail(where, ": ", mn, ": the factors have rank ", r, " (lora_A is ", r, " x ", in,
                 ") but the config gives r = ", want_r,
                 rkey ? " (rank_pattern key " + quote_name(*rkey) + ")" : std::string(" ('r')"));
        const std::string* akey = detail::match(alpha_patterns, module);
        double alpha = config.lora_alpha;
        if (akey)
            for (const auto& kv : config.alpha_pattern) if (kv.first == *akey) { alpha = kv.second; break; }
        try {
            Module<T> m{Lora<T>::from_factors(file.matrix<T>(p.a), file.matrix<T>(p.b), alpha, config.use_rslora),
                        config.fan_in_fan_out, rkey ? *rkey : std::string(), akey ? *akey : std::string(),
                        ta.dtype, {}};
            for (const auto& [suffix, full] : p.extra) m.extra.emplace(suffix, file.matrix<T>(full));
            adapter.modules.emplace(module, std::move(m));
        } catch (const lowrank::error& e) {
            fail(where, ": ", mn, ": ", e.what());
        }
    }
    if (adapter.modules.empty()) fail(where, ": the file has no LoRA factors (no '.lora_A.weight' tensors)");
    if (!adapter.other_tensors.empty())
        adapter.notes.push_back("file: " + std::to_string(adapter.other_tensors.size()) +
                                " tensor(s) that are not LoRA factors (e.g. " +
                                quote_name(adapter.other_tensors.begin()->first) +
                                ") are kept in other_tensors and not applied");
    return adapter;
}

/// Loads an adapter from the two files' contents in memory (for fuzzing and embedded use).
template <Real T>
[[nodiscard]] Adapter<T> load_from_memory(std::string_view config_text, std::span<const std::byte> safetensors_bytes,
                                          const LoadOptions& options = {}) {
    const auto file = safetensors::File::parse(safetensors_bytes, "lowrank::peft::load_from_memory: adapter_model.safetensors");
    return load<T>(config_text, file, options, "lowrank::peft::load_from_memory");
}

/// Loads the PEFT adapter folder `dir` (adapter_config.json + adapter_model.safetensors).
/// Throws `lowrank::error` for missing files, malformed files, rank mismatches and unsupported
/// features. Cost: one pass over the file; memory: the factors in T.
template <Real T>
[[nodiscard]] Adapter<T> load(const std::filesystem::path& dir, const LoadOptions& options = {}) {
    const std::string where = "lowrank::peft::load(" + dir.string() + ")";
    const std::string text = detail::read_text_file(dir / "adapter_config.json", where, max_config_bytes);
    const auto file = safetensors::File::open(dir / "adapter_model.safetensors", options.read_mode);
    return load<T>(text, file, options, where);
}

/// The adapter_config.json lowrank writes for `adapter` (see the file comment).
template <Real T>
[[nodiscard]] nlohmann::ordered_json config_json(const Adapter<T>& adapter) {
    using detail::fail;
    const char* fn = "lowrank::peft::save";
    if (adapter.modules.empty()) fail(fn, ": the adapter has no modules");
    const auto& first = adapter.modules.begin()->second;
    const bool rslora = first.lora.config().rslora;
    const bool fifo = first.fan_in_fan_out;
    for (const auto& [name, m] : adapter.modules) {
        if (m.lora.config().rslora != rslora)
            fail(fn, ": modules differ in rsLoRA (", name, "); a PEFT config has one use_rslora");
        if (m.fan_in_fan_out != fifo)
            fail(fn, ": modules differ in fan_in_fan_out (", name, "); a PEFT config has one flag");
    }
    nlohmann::ordered_json doc = adapter.config.json.is_object() ? adapter.config.json : nlohmann::ordered_json::object();
    Config cfg = adapter.config;
    cfg.use_rslora = rslora;

    // Keep r / lora_alpha / patterns if they already reproduce every module, else rebuild them.
    bool reproduces = true;
    for (const auto& [name, m] : adapter.modules) {
        if (!reproduces) break;
        const auto res = resolve(cfg, name);
        reproduces = res.r == m.lora.rank() && res.alpha == m.lora.config().alpha;
    }
    if (!reproduces) {
        std::map<Index, int> rank_count;
        std::map<double, int> alpha_count;
        for (const auto& [name, m] : adapter.modules) {
            ++rank_count[m.lora.rank()];
            ++alpha_count[m.lora.config().alpha];
        }
        cfg.r = std::max_element(rank_count.begin(), rank_count.end(),
                                 [](auto& a, auto& b) { return a.second < b.second; })->first;
        cfg.lora_alpha = std::max_element(alpha_count.begin(), alpha_count.end(),
                                          [](auto& a, auto& b) { return a.second < b.second; })->first;
        cfg.rank_pattern.clear();
        cfg.alpha_pattern.clear();
        for (const auto& [name, m] : adapter.modules) {
            if (m.lora.rank() != cfg.r) cfg.rank_pattern.emplace_back(detail::regex_escape(name), m.lora.rank());
            if (m.lora.config().alpha != cfg.lora_alpha)
                cfg.alpha_pattern.emplace_back(detail::regex_escape(name), m.lora.config().alpha);
        }
    }
    auto set = [&](const char* key, nlohmann::ordered_json value) { doc[key] = std::move(value); };
    auto set_default = [&](const char* key, nlohmann::ordered_json value) {
        if (!doc.contains(key)) doc[key] = std::move(value);
    };
    set("peft_type", "LORA");
    set_default("base_model_name_or_path", nullptr);
    set_default("task_type", nullptr);
    set("r", cfg.r);
    set("lora_alpha", detail::alpha_json(cfg.lora_alpha));
    set_default("lora_dropout", 0.0);
    set("use_rslora", rslora);
    nlohmann::ordered_json rp = nlohmann::ordered_json::object(), ap = nlohmann::ordered_json::object();
    for (const auto& [k, v] : cfg.rank_pattern) rp[k] = v;
    for (const auto& [k, v] : cfg.alpha_pattern) ap[k] = detail::alpha_json(v);
    set("rank_pattern", rp);
    set("alpha_pattern", ap);
    set("fan_in_fan_out", fifo);
    // target_modules: keep a list that covers every module (PEFT: equal, or a "."-suffix);
    // otherwise list the modules by full name.
    bool covered = false;
    if (const auto it = doc.find("target_modules"); it != doc.end() && it->is_array()) {
        covered = true;
        for (const auto& [name, m] : adapter.modules) {
            bool hit = false;
            for (const auto& t : *it) {
                if (!t.is_string()) continue;
                const auto& s = t.template get_ref<const std::string&>();
                hit = hit || name == s ||
                      (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0 &&
                       name[name.size() - s.size() - 1] == '.');
            }
            covered = covered && hit;
        }
    }
    if (!covered) {
        nlohmann::ordered_json tm = nlohmann::ordered_json::array();
        for (const auto& [name, m] : adapter.modules) tm.push_back(name);
        set("target_modules", tm);
    }
    set_default("bias", "none");
    set_default("modules_to_save", nullptr);
    set_default("init_lora_weights", true);
    set_default("inference_mode", true);
    set_default("use_dora", false);
    set_default("layers_to_transform", nullptr);
    set_default("layers_pattern", nullptr);
    set_default("revision", nullptr);
    return doc;
}

/// The adapter_model.safetensors lowrank writes for `adapter`.
template <Real T>
[[nodiscard]] safetensors::Writer tensors_writer(const Adapter<T>& adapter, const SaveOptions& options = {}) {
    safetensors::Writer w;
    for (const auto& [name, m] : adapter.modules) {
        const std::string base = std::string(key_prefix) + name + ".";
        w.add(base + "lora_A.weight", m.lora.A(), options.dtype);
        w.add(base + "lora_B.weight", m.lora.B(), options.dtype);
        for (const auto& [suffix, value] : m.extra) {
            if (suffix.compare(0, 5, "lora_") != 0 || suffix == "lora_A.weight" || suffix == "lora_B.weight")
                lowrank::detail::fail("lowrank::peft::save: module ", name, ": extra tensor suffix '", suffix,
                                      "' must start with 'lora_' and not be a factor");
            w.add(base + suffix, value, options.dtype);
        }
    }
    for (const auto& [name, raw] : adapter.other_tensors) {
        if (w.contains(name))
            lowrank::detail::fail("lowrank::peft::save: other tensor '", name, "' collides with a LoRA tensor name");
        w.add_raw(name, raw.dtype, raw.shape, raw.bytes);
    }
    w.set_metadata("format", "pt");
    return w;
}

/// Writes `adapter` as a PEFT folder `dir` (created if needed): adapter_config.json and
/// adapter_model.safetensors. Throws `lowrank::error` if the modules cannot share one config
/// (mixed rsLoRA or fan_in_fan_out) or on I/O failure.
template <Real T>
void save(const Adapter<T>& adapter, const std::filesystem::path& dir, const SaveOptions& options = {}) {
    const auto config = config_json(adapter);
    const auto writer = tensors_writer(adapter, options);
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) lowrank::detail::fail("lowrank::peft::save: cannot create ", dir.string(), ": ", ec.message());
    writer.write(dir / "adapter_model.safetensors");
    std::string text;
    try {
        text = config.dump(2);
    } catch (const nlohmann::json::exception& e) {
        lowrank::detail::fail("lowrank::peft::save: cannot encode the config: ", e.what());
    }
    std::ofstream out(dir / "adapter_config.json", std::ios::binary | std::ios::trunc);
    out << text << "\n";
    if (!out) lowrank::detail::fail("lowrank::peft::save: cannot write ", (dir / "adapter_config.json").string());
}

/// W += weight · s · ΔW in the base layer's stored orientation: W is out × in (nn.Linear), or
/// in × out for a `fan_in_fan_out` module (GPT-2 Conv1D), which receives ΔWᵀ = Aᵀ Bᵀ.
/// Cost: 2·out·in·r flops; nothing of size out × in is allocated.
template <Real T, Destination DW>
void merge(DW&& W, const Module<T>& module, std::type_identity_t<T> weight = T(1)) {
    const char* fn = "lowrank::peft::merge";
    const auto& lora = module.lora;
    lora.validate(fn, 0, lora.in_features(), lora.out_features());
    if (!module.fan_in_fan_out) {
        auto w = lowrank::detail::output_view(fn, "W", std::forward<DW>(W), lora.out_features(), lora.in_features(), false);
        core::rank_update<T>(w, view(lora.B()), view(lora.A()), weight * lora.scale());
    } else {
        auto w = lowrank::detail::output_view(fn, "W", std::forward<DW>(W), lora.in_features(), lora.out_features(), false);
        const Matrix<T> at = lora.A().transpose(), bt = lora.B().transpose();
        core::rank_update<T>(w, view(at), view(bt), weight * lora.scale());
    }
}

}  // namespace lowrank::peft
