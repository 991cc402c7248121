// SPDX-License-Identifier: Apache-2.0
// PEFT adapter folders: the real files written by PEFT against values numpy computed from them
// (shapes, ranks, scales, the adapter delta on a fixed input, ΔW's first row and norm), configs
// written here for rsLoRA and rank / alpha patterns (scales worked out by hand from PEFT's rule),
// save → load round trips, and every refused feature or malformed input.

#include <lowrank/io/peft.hpp>

#include "io_support.hpp"
#include "support.hpp"

#include <cmath>
#include <set>

using namespace lowrank;
using Catch::Contains;
using lowrank::test::eps;
using lowrank::test::naive_product;
using lowrank::test::product_bound;
using lowrank::test::to_double;
namespace st = lowrank::safetensors;

namespace {

struct Factor {
    std::string module;  // without base_model.model.
    Index r, in, out;
};

/// adapter_model.safetensors bytes with random factors for `factors` (plus `extra` raw tensors).
std::vector<std::byte> adapter_bytes(const std::vector<Factor>& factors,
                                     const std::vector<std::pair<std::string, Matrix<float>>>& extra = {}) {
    st::Writer w;
    std::uint64_t seed = 1;
    for (const auto& f : factors) {
        w.add("base_model.model." + f.module + ".lora_A.weight", test::random_matrix<float>(f.r, f.in, seed++));
        w.add("base_model.model." + f.module + ".lora_B.weight", test::random_matrix<float>(f.out, f.r, seed++));
    }
    for (const auto& [name, m] : extra) w.add(name, m);
    w.set_metadata("format", "pt");
    return w.bytes();
}

template <class T>
peft::Adapter<T> load_mem(const std::string& config, const std::vector<std::byte>& bytes,
                          peft::LoadOptions options = {}) {
    return peft::load_from_memory<T>(config, bytes, options);
}

std::filesystem::path temp_dir(const std::string& name) {
    const auto dir = test::unique_temp_path("test_peft_" + name);
    std::filesystem::remove_all(dir);
    return dir;
}

Matrix<double> json_matrix(const nlohmann::json& j) {
    Matrix<double> m(Index(j.size()), Index(j[0].size()));
    for (Index i = 0; i < m.rows(); ++i)
        for (Index k = 0; k < m.cols(); ++k) m(i, k) = j[std::size_t(i)][std::size_t(k)].get<double>();
    return m;
}

}  // namespace

TEMPLATE_TEST_CASE("real PEFT adapters load with the shapes, ranks, scales and deltas numpy computed",
                   "[peft][fixtures]", float, double) {
    using T = TestType;
    for (const auto& name : test::peft_fixture_names()) {
        const auto dir = test::peft_fixture(name);
        if (!dir) {
            WARN("fixture " << name << " not found (no ../shared/fixtures beside this clone): skipped");
            continue;
        }
        INFO("fixture " << name);
        const auto expected = test::read_json(*dir / "EXPECTED.json");
        const auto adapter = peft::load<T>(*dir);
        REQUIRE(adapter.modules.size() == expected["adapted_module_count"].get<std::size_t>());
        for (const auto& e : expected["adapted_modules"]) {
            const auto module = e["module_without_prefix"].get<std::string>();
            INFO(module);
            REQUIRE(adapter.modules.count(module) == 1);
            const auto& m = adapter.modules.at(module);
            REQUIRE(m.lora.rank() == e["r"].get<Index>());
            REQUIRE(m.lora.in_features() == e["in_features"].get<Index>());
            REQUIRE(m.lora.out_features() == e["out_features"].get<Index>());
            REQUIRE(m.lora.config().alpha == e["lora_alpha"].get<double>());
            REQUIRE(m.lora.scale() == T(e["scale"].get<double>()));
            REQUIRE(m.fan_in_fan_out == e["fan_in_fan_out"].get<bool>());
            REQUIRE(st::dtype_name(m.dtype) == e["dtype"].get<std::string>());
            REQUIRE(m.rank_pattern_key == (e["rank_pattern_key"].is_null() ? "" : e["rank_pattern_key"].get<std::string>()));
        }
        std::set<std::string> other;
        for (const auto& [full, raw] : adapter.other_tensors) other.insert(full);
        REQUIRE(other == expected["non_lora_tensors"].get<std::set<std::string>>());
        for (const auto& t : expected["tensors"])  // kept as stored
            if (adapter.other_tensors.count(t["name"].get<std::string>())) {
                const auto& raw = adapter.other_tensors.at(t["name"].get<std::string>());
                REQUIRE(st::dtype_name(raw.dtype) == t["dtype"].get<std::string>());
                REQUIRE(raw.shape == t["shape"].get<std::vector<std::uint64_t>>());
                REQUIRE(raw.bytes.size() == t["data_offsets"][1].get<std::uint64_t>() - t["data_offsets"][0].get<std::uint64_t>());
            }

        for (const auto& sample : expected["samples"]) {
            const auto full = sample["module"].get<std::string>();
            const auto& m = adapter.modules.at(full.substr(peft::key_prefix.size()));
            const double s = sample["scale"].get<double>();
            // Y_delta = s X Aᵀ Bᵀ through the library, against numpy's. The factors are exact in
            // T (stored F16/BF16/F32); X rounds to T (u|X|), then the shrink (γ_in) and the expand
            // (γ_r) add their errors, propagated through |B| as in tests/test_lora.cpp.
            const Matrix<double> X = json_matrix(sample["X"]), want = json_matrix(sample["Y_delta"]);
            const Matrix<T> Xt = X.cast<T>();
            Matrix<T> Y = Matrix<T>::Zero(X.rows(), m.lora.out_features());
            add_delta(Xt, m.lora, Y);
            const Matrix<double> a = to_double(m.lora.A()), b = to_double(m.lora.B());
            const Matrix<double> abs_t = naive_product(X.cwiseAbs(), a.transpose().cwiseAbs());
            const Matrix<double> t_err = product_bound(X.cwiseAbs(), a.transpose().cwiseAbs(), eps<T>()) + eps<T>() * abs_t;
            Matrix<double> bound = s * (naive_product(t_err, b.transpose().cwiseAbs()) +
                                        product_bound(abs_t + t_err, b.transpose().cwiseAbs(), eps<T>()));
            bound.array() += 3 * eps<T>() * want.cwiseAbs().array();
            test::require_within(Y, want, bound, name + " Y_delta");

            // ΔW = s B A: first row and Frobenius norm (‖ΔW‖² = s² tr((A Aᵀ)(Bᵀ B)), in double).
            const Matrix<double> row0 = s * naive_product(b.topRows(1), a);
            const Matrix<double> want_row = json_matrix(nlohmann::json::array({sample["delta_W_first_row"]}));
            const Matrix<double> row_bound = product_bound(b.topRows(1).cwiseAbs(), a.cwiseAbs(), eps<double>(), s);
            test::require_within(row0, want_row, row_bound, name + " delta_W first row");
            // The trace's error is at most γ · tr(|A||A|ᵀ |B|ᵀ|B|) with γ = 2(in + out + r + 2)u (both
            // sides computed in double), and √ halves relative errors.
            const double tr = (naive_product(a, a.transpose()) * naive_product(b.transpose(), b)).trace();
            const double abs_tr = (naive_product(a.cwiseAbs(), a.transpose().cwiseAbs()) *
                                   naive_product(b.transpose().cwiseAbs(), b.cwiseAbs())).trace();
            const double frob = s * std::sqrt(tr);
            const double want_frob = sample["delta_W_frobenius_norm"].get<double>();
            const double gamma = 2.0 * double(a.cols() + b.rows() + a.rows() + 2) * eps<double>();
            REQUIRE(std::abs(frob - want_frob) <= s * gamma * abs_tr / (2 * std::sqrt(tr)) + 4 * eps<double>() * want_frob);

            if (sample.contains("stored_orientation_delta_first_row")) {
                // fan_in_fan_out: a merge adds ΔWᵀ to the stored in × out Conv1D weight.
                REQUIRE(m.fan_in_fan_out);
                Matrix<T> W = Matrix<T>::Zero(m.lora.in_features(), m.lora.out_features());
                peft::merge(W, m);
                const Matrix<double> want_stored =
                    json_matrix(nlohmann::json::array({sample["stored_orientation_delta_first_row"]}));
                const Matrix<double> stored_bound =
                    product_bound(a.leftCols(1).transpose().cwiseAbs(), b.transpose().cwiseAbs(), eps<T>(), s);
                test::require_within(W.topRows(1), want_stored, stored_bound, name + " stored-orientation row");
                REQUIRE_THROWS_WITH(peft::merge(Matrix<T>(m.lora.out_features(), m.lora.in_features()), m),
                                    Contains("lowrank::peft::merge") && Contains("expected 768 x 2304"));
            }
        }
    }
}

TEMPLATE_TEST_CASE("real PEFT adapters survive save then load bit for bit", "[peft][fixtures][roundtrip]",
                   float, double) {
    using T = TestType;
    for (const auto& name : test::peft_fixture_names()) {
        const auto dir = test::peft_fixture(name);
        if (!dir) {
            WARN("fixture " << name << " not found: skipped");
            continue;
        }
        INFO("fixture " << name);
        const auto adapter = peft::load<T>(*dir);
        const auto out = temp_dir(name);
        peft::save(adapter, out);
        const auto again = peft::load<T>(out);
        REQUIRE(again.modules.size() == adapter.modules.size());
        for (const auto& [module, m] : adapter.modules) {
            const auto& n = again.modules.at(module);
            REQUIRE(n.lora.A() == m.lora.A());  // F16/BF16/F32 values are exact in F32
            REQUIRE(n.lora.B() == m.lora.B());
            REQUIRE(n.lora.scale() == m.lora.scale());
            REQUIRE(n.fan_in_fan_out == m.fan_in_fan_out);
            REQUIRE(n.dtype == st::Dtype::F32);
        }
        // Non-LoRA tensors (modules_to_save heads) are written back byte for byte.
        REQUIRE(again.other_tensors.size() == adapter.other_tensors.size());
        const st::File original = st::File::open(*dir / "adapter_model.safetensors");
        const st::File written = st::File::open(out / "adapter_model.safetensors");
        for (const auto& [full, raw] : adapter.other_tensors) {
            const auto a = original.raw(full), b = written.raw(full);
            REQUIRE(std::equal(a.begin(), a.end(), b.begin(), b.end()));
        }
        // The config kept the file's own fields (task, base model) and PEFT's keys.
        const auto cfg = test::read_json(out / "adapter_config.json");
        const auto orig = test::read_json(*dir / "adapter_config.json");
        REQUIRE(cfg["base_model_name_or_path"] == orig["base_model_name_or_path"]);
        REQUIRE(cfg["target_modules"] == orig["target_modules"]);
        REQUIRE(cfg["r"] == orig["r"]);
        REQUIRE(cfg["lora_alpha"] == orig["lora_alpha"]);
        std::filesystem::remove_all(out);
    }
}

TEMPLATE_TEST_CASE("rsLoRA, rank_pattern and alpha_pattern follow PEFT's matching rule", "[peft][patterns]",
                   float, double) {
    using T = TestType;
    const std::vector<Factor> factors = {{"model.layers.0.self_attn.q_proj", 4, 16, 12},
                                         {"model.layers.0.self_attn.v_proj", 2, 16, 12},
                                         {"model.layers.1.self_attn.q_proj", 4, 16, 12},
                                         {"model.layers.10.self_attn.q_proj", 8, 16, 12},
                                         {"model.layers.1.mlp.up_proj", 1, 16, 20}};
    const auto bytes = adapter_bytes(factors);
    // PEFT: in order, the first key K with re.match(r"(.*\.)?(K)$", name) wins.
    //  - "v_proj" matches ...v_proj (dotted suffix);
    //  - "layers\.10\..*" matches layers.10 only ("layers.1" would be a prefix match, not anchored);
    //  - "up_proj|down_proj" is one group: matches ...up_proj;
    //  - "proj" matches nothing (not a dotted suffix).
    const std::string config = R"({
        "peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": true,
        "rank_pattern": {"proj": 99, "v_proj": 2, "layers\\.10\\..*": 8, "up_proj|down_proj": 1},
        "alpha_pattern": {"model.layers.1.self_attn.q_proj": 9, "q_proj": 32, "up_proj": 3.5}
    })";
    const auto adapter = load_mem<T>(config, bytes);
    REQUIRE(adapter.modules.size() == 5);
    struct Want {
        const char* module;
        Index r;
        double alpha;
        const char* rank_key;
        const char* alpha_key;
    };
    // rsLoRA scale alpha / √r, worked out by hand.
    const Want wants[] = {{"model.layers.0.self_attn.q_proj", 4, 32, "", "q_proj"},            // 32/2 = 16
                          {"model.layers.0.self_attn.v_proj", 2, 16, "v_proj", ""},            // 16/√2
                          {"model.layers.1.self_attn.q_proj", 4, 9, "", "model.layers.1.self_attn.q_proj"},  // 9/2
                          {"model.layers.10.self_attn.q_proj", 8, 32, "layers\\.10\\..*", "q_proj"},  // 32/√8
                          {"model.layers.1.mlp.up_proj", 1, 3.5, "up_proj|down_proj", "up_proj"}};  // 3.5
    const double scales[] = {16.0, 16.0 / std::sqrt(2.0), 4.5, 32.0 / std::sqrt(8.0), 3.5};
    for (std::size_t i = 0; i < 5; ++i) {
        INFO(wants[i].module);
        const auto& m = adapter.modules.at(wants[i].module);
        REQUIRE(m.lora.rank() == wants[i].r);
        REQUIRE(m.lora.config().alpha == wants[i].alpha);
        REQUIRE(m.lora.config().rslora);
        REQUIRE(m.lora.scale() == T(scales[i]));
        REQUIRE(m.rank_pattern_key == wants[i].rank_key);
        REQUIRE(m.alpha_pattern_key == wants[i].alpha_key);
    }
    const auto res = peft::resolve(adapter.config, "model.layers.3.self_attn.q_proj");
    REQUIRE(res.r == 4);
    REQUIRE(res.alpha == 32);
    REQUIRE(res.alpha_key == "q_proj");

    SECTION("first match wins, in the config's order") {
        // "q_proj" precedes the exact name, so PEFT gives every q_proj alpha 32, layers.1 included.
        const std::string reordered = R"({"peft_type": "LORA", "r": 4, "lora_alpha": 16,
            "rank_pattern": {"v_proj": 2, "layers\\.10\\..*": 8, "up_proj": 1},
            "alpha_pattern": {"q_proj": 32, "model.layers.1.self_attn.q_proj": 9}})";
        const auto a = load_mem<T>(reordered, bytes);
        REQUIRE(a.modules.at("model.layers.1.self_attn.q_proj").lora.config().alpha == 32);
        REQUIRE(a.modules.at("model.layers.1.self_attn.q_proj").lora.scale() == T(8));  // 32 / 4
    }
    SECTION("saved and loaded again: same ranks, alphas and scales; PEFT's config keys") {
        const auto out = temp_dir("patterns");
        peft::save(adapter, out);
        const auto again = peft::load<T>(out);
        for (const auto& [name, m] : adapter.modules) {
            REQUIRE(again.modules.at(name).lora.rank() == m.lora.rank());
            REQUIRE(again.modules.at(name).lora.scale() == m.lora.scale());
            REQUIRE(again.modules.at(name).lora.A() == m.lora.A());
        }
        const auto cfg = test::read_json(out / "adapter_config.json");
        REQUIRE(cfg["peft_type"] == "LORA");
        REQUIRE(cfg["use_rslora"] == true);
        REQUIRE(cfg["rank_pattern"].size() == 4);  // kept: it reproduces every module
        std::filesystem::remove_all(out);
    }
}

TEMPLATE_TEST_CASE("an adapter built in code is saved with PEFT's keys and loads back", "[peft][roundtrip]",
                   float, double) {
    using T = TestType;
    peft::Adapter<T> adapter;
    adapter.add("encoder.layer.0.attention.query", Lora<T>(12, 10, {.rank = 4, .alpha = 8, .seed = 1}));
    adapter.add("encoder.layer.0.attention.value", Lora<T>(12, 10, {.rank = 4, .alpha = 8, .seed = 2}));
    adapter.add("encoder.layer.1.attention.query", Lora<T>(12, 10, {.rank = 2, .alpha = 5, .seed = 3}));
    for (auto& [name, m] : adapter.modules) m.lora.B() = test::random_matrix<T>(12, m.lora.rank(), 9);
    const auto dtype = GENERATE(st::Dtype::F32, st::Dtype::F64, st::Dtype::BF16);
    const auto out = temp_dir("built");
    peft::save(adapter, out, {.dtype = dtype});

    const st::File file = st::File::open(out / "adapter_model.safetensors");
    REQUIRE(file.metadata().at("format") == "pt");
    REQUIRE(file.tensors().size() == 6);
    REQUIRE(file.info("base_model.model.encoder.layer.1.attention.query.lora_A.weight").shape ==
            std::vector<std::uint64_t>{2, 10});
    REQUIRE(file.info("base_model.model.encoder.layer.1.attention.query.lora_B.weight").dtype == dtype);
    const auto cfg = test::read_json(out / "adapter_config.json");
    REQUIRE(cfg["peft_type"] == "LORA");
    REQUIRE(cfg["r"] == 4);
    REQUIRE(cfg["lora_alpha"] == 8);
    REQUIRE(cfg["lora_alpha"].is_number_integer());
    REQUIRE(cfg["use_rslora"] == false);
    REQUIRE(cfg["fan_in_fan_out"] == false);
    REQUIRE(cfg["rank_pattern"] == nlohmann::json{{"encoder\\.layer\\.1\\.attention\\.query", 2}});
    REQUIRE(cfg["alpha_pattern"] == nlohmann::json{{"encoder\\.layer\\.1\\.attention\\.query", 5}});
    REQUIRE(cfg["target_modules"].size() == 3);
    for (const char* key : {"bias", "task_type", "lora_dropout", "modules_to_save", "init_lora_weights", "use_dora"})
        REQUIRE(cfg.contains(key));

    const auto again = peft::load<T>(out);
    for (const auto& [name, m] : adapter.modules) {
        const auto& n = again.modules.at(name);
        REQUIRE(n.lora.rank() == m.lora.rank());
        REQUIRE(n.lora.scale() == m.lora.scale());
        if (dtype == st::Dtype::BF16) {
            // Half an ulp of bfloat16 per element.
            REQUIRE(((n.lora.A() - m.lora.A()).cwiseAbs().array() <= m.lora.A().cwiseAbs().array() * T(0x1p-8)).all());
        } else if (dtype == st::Dtype::F32) {
            REQUIRE(n.lora.A() == m.lora.A().template cast<float>().template cast<T>());
        } else {
            REQUIRE(n.lora.A() == m.lora.A());  // F64 holds float and double exactly
        }
    }
    std::filesystem::remove_all(out);

    SECTION("modules that cannot share one config are refused") {
        adapter.add("x", Lora<T>(4, 4, {.rank = 1, .rslora = true}));
        REQUIRE_THROWS_WITH(peft::save(adapter, out), Contains("rsLoRA"));
        adapter.add("x", Lora<T>(4, 4, {.rank = 1}), true);
        REQUIRE_THROWS_WITH(peft::save(adapter, out), Contains("fan_in_fan_out"));
        REQUIRE_THROWS_WITH(peft::save(peft::Adapter<T>{}, out), Contains("no modules"));
    }
}

TEMPLATE_TEST_CASE("extra per-module tensors (a LoRA-XS core) are refused by default, read and written on request",
                   "[peft][extra]", float, double) {
    using T = TestType;
    const Matrix<float> R = test::random_matrix<float>(2, 2, 5);
    const auto bytes = adapter_bytes({{"m.q", 2, 6, 5}}, {{"base_model.model.m.q.lora_R.weight", R}});
    const std::string config = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4})";
    REQUIRE_THROWS_WITH(load_mem<T>(config, bytes),
                        Contains("lora_R.weight") && Contains("allow_extra_tensors"));
    const auto adapter = load_mem<T>(config, bytes, {.allow_extra_tensors = true});
    const auto& m = adapter.modules.at("m.q");
    REQUIRE(m.extra.at(std::string(peft::core_tensor_suffix)) == R.cast<T>());
    const auto out = temp_dir("extra");
    peft::save(adapter, out);
    const auto again = peft::load<T>(out, {.allow_extra_tensors = true});
    REQUIRE(again.modules.at("m.q").extra.at("lora_R.weight") == R.cast<T>());
    std::filesystem::remove_all(out);
}

TEST_CASE("features that change the math are refused with an error naming them", "[peft][errors]") {
    const auto bytes = adapter_bytes({{"m.q", 2, 6, 5}});
    const std::string base = R"("peft_type": "LORA", "r": 2, "lora_alpha": 4)";
    auto with = [&](const std::string& extra) { return "{" + base + ", " + extra + "}"; };
    SECTION("DoRA") {
        REQUIRE_THROWS_WITH(load_mem<float>(with(R"("use_dora": true)"), bytes), Contains("DoRA") && Contains("use_dora"));
        const auto dora = adapter_bytes({{"m.q", 2, 6, 5}}, {{"base_model.model.m.q.lora_magnitude_vector", Matrix<float>::Ones(1, 5)}});
        REQUIRE_THROWS_WITH(load_mem<float>("{" + base + "}", dora), Contains("DoRA (lora_magnitude_vector)"));
    }
    SECTION("lora_bias") {
        REQUIRE_THROWS_WITH(load_mem<float>(with(R"("lora_bias": true)"), bytes), Contains("lora_bias"));
        const auto biased = adapter_bytes({{"m.q", 2, 6, 5}}, {{"base_model.model.m.q.lora_B.bias", Matrix<float>::Ones(1, 5)}});
        REQUIRE_THROWS_WITH(load_mem<float>("{" + base + "}", biased), Contains("lora_bias") && Contains("m.q.lora_B.bias"));
    }
    SECTION("embedding and convolution adapters") {
        const auto emb = adapter_bytes({}, {{"base_model.model.embed.lora_embedding_A", Matrix<float>::Ones(2, 5)}});
        REQUIRE_THROWS_WITH(load_mem<float>("{" + base + "}", emb), Contains("embedding adapters"));
        st::Writer w;
        const std::vector<float> a(2 * 3 * 3 * 3, 0.5f), b(4 * 2, 0.5f);
        w.add_tensor<float>("base_model.model.conv.lora_A.weight", {2, 3, 3, 3}, std::span<const float>(a));
        w.add_tensor<float>("base_model.model.conv.lora_B.weight", {4, 2, 1, 1}, std::span<const float>(b));
        REQUIRE_THROWS_WITH(load_mem<float>("{" + base + "}", w.bytes()), Contains("convolution adapters"));
    }
    SECTION("other PEFT features and types") {
        REQUIRE_THROWS_WITH(load_mem<float>(with(R"("use_qalora": true)"), bytes), Contains("QA-LoRA"));
        REQUIRE_THROWS_WITH(load_mem<float>(with(R"("alora_invocation_tokens": [1, 2])"), bytes),
                            Contains("alora_invocation_tokens"));
        REQUIRE_THROWS_WITH(load_mem<float>(with(R"("layer_replication": [[0, 2]])"), bytes), Contains("layer_replication"));
        REQUIRE_THROWS_WITH(load_mem<float>(with(R"("target_parameters": ["experts.w1"])"), bytes),
                            Contains("target_parameters"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "ADALORA", "r": 2})", bytes),
                            Contains("peft_type 'ADALORA' is not supported"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"r": 2})", bytes), Contains("'peft_type' is missing"));
    }
    SECTION("raw state dicts that keep the adapter name") {
        const auto raw = adapter_bytes({}, {{"base_model.model.m.q.lora_A.default.weight", Matrix<float>::Ones(2, 6)}});
        REQUIRE_THROWS_WITH(load_mem<float>("{" + base + "}", raw), Contains("adapter name"));
    }
    SECTION("null or false settings are fine, and base-model settings are reported") {
        const auto a = load_mem<float>(with(R"("use_dora": false, "lora_bias": null, "use_rslora": null,
            "modules_to_save": ["classifier"], "bias": "all", "future_feature": {"x": 1}, "other": null)"), bytes);
        REQUIRE(a.modules.size() == 1);
        REQUIRE(a.notes.size() == 3);
        REQUIRE_THAT(a.notes[0], Contains("modules_to_save"));
        REQUIRE_THAT(a.notes[1], Contains("bias = 'all'"));
        REQUIRE_THAT(a.notes[2], Contains("unrecognised key 'future_feature'"));
    }
}

TEST_CASE("inconsistent or malformed adapters raise lowrank::error naming the module", "[peft][errors]") {
    const auto bytes = adapter_bytes({{"m.q", 2, 6, 5}, {"m.v", 2, 6, 5}});
    const std::string ok = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4})";
    REQUIRE(load_mem<double>(ok, bytes).modules.size() == 2);
    SECTION("rank from the shapes differs from the config") {
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 8})", bytes),
                            Contains("module 'm.q'") && Contains("rank 2") && Contains("r = 8 ('r')"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "rank_pattern": {"v": 3}})", bytes),
                            Contains("module 'm.v'") && Contains("r = 3 (rank_pattern key 'v')"));
    }
    SECTION("factors that do not fit together") {
        st::Writer w;
        w.add("base_model.model.m.q.lora_A.weight", Matrix<float>::Ones(2, 6));
        w.add("base_model.model.m.q.lora_B.weight", Matrix<float>::Ones(5, 3));
        REQUIRE_THROWS_WITH(load_mem<float>(ok, w.bytes()), Contains("lora_A is 2 x 6") && Contains("lora_B is 5 x 3"));
        st::Writer only_a;
        only_a.add("base_model.model.m.q.lora_A.weight", Matrix<float>::Ones(2, 6));
        REQUIRE_THROWS_WITH(load_mem<float>(ok, only_a.bytes()), Contains("lora_A.weight but no lora_B.weight"));
        st::Writer big_rank;  // r > min(in, out): Lora refuses it, with the module named
        big_rank.add("base_model.model.m.q.lora_A.weight", Matrix<float>::Ones(2, 1));
        big_rank.add("base_model.model.m.q.lora_B.weight", Matrix<float>::Ones(5, 2));
        REQUIRE_THROWS_WITH(load_mem<float>(ok, big_rank.bytes()), Contains("module 'm.q'") && Contains("rank 2"));
        st::Writer none;
        none.add("base_model.model.score.weight", Matrix<float>::Ones(2, 6));
        REQUIRE_THROWS_WITH(load_mem<float>(ok, none.bytes()), Contains("no LoRA factors"));
    }
    SECTION("malformed configs") {
        REQUIRE_THROWS_WITH(load_mem<float>("{", bytes), Contains("malformed JSON"));
        REQUIRE_THROWS_WITH(load_mem<float>("[]", bytes), Contains("not a JSON object"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 0})", bytes), Contains("'r' must be in [1, 2^30]"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": "2"})", bytes), Contains("'r' must be a positive integer"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2.5})", bytes), Contains("positive integer, got 2.5"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "lora_alpha": "x"})", bytes),
                            Contains("'lora_alpha' must be a number"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "use_rslora": 1})", bytes),
                            Contains("'use_rslora' must be true or false"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "rank_pattern": []})", bytes),
                            Contains("'rank_pattern' must be an object"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "r": 2})", bytes), Contains("duplicate key 'r'"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "rank_pattern": {"(": 2}})", bytes),
                            Contains("rank_pattern key '('") && Contains("not a valid regular expression"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "alpha_pattern": {"a{999}{999}": 2}})", bytes),
                            Contains("repetition counts too large"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "alpha_pattern": {")" + std::string(300, 'a') + R"(": 2}})", bytes),
                            Contains("longer than 256 bytes"));
        // Numbers std::regex would read into a long unchecked (found by fuzz_peft_config).
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "alpha_pattern": {"q\\99999999999999999999": 2}})", bytes),
                            Contains("back-reference"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "rank_pattern": {"q{0000000000000000000000001}": 2}})", bytes),
                            Contains("more than 6 digits"));
        REQUIRE_THROWS_WITH(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "rank_pattern": {"q{1,2}{3,9999999}": 2}})", bytes),
                            Contains("more than 6 digits"));
        // Escaped module names with digits, and modest counts, still load.
        REQUIRE_NOTHROW(load_mem<float>(R"({"peft_type": "LORA", "r": 2, "rank_pattern": {"layers\\.0\\.self_attn\\.q_proj": 2, "v_pr{1}oj": 1}})", bytes));
    }
    SECTION("missing files") {
        REQUIRE_THROWS_WITH(peft::load<float>(temp_dir("missing")), Contains("adapter_config.json") && Contains("missing"));
    }
}

TEST_CASE("fuzzing seeds and every config the fuzzers ever crashed on are read without a crash",
          "[peft][fuzz]") {
    auto inputs = test::files_under(test::source_root() / "fuzz" / "corpus" / "peft_config");
    const auto regressions = test::files_under(test::source_root() / "tests" / "data" / "fuzz_regressions" / "peft_config");
    inputs.insert(inputs.end(), regressions.begin(), regressions.end());
    if (inputs.empty()) WARN("no fuzz corpus found");
    // The fuzz target's fixed adapter: the same modules as fuzz/fuzz_peft_config.cpp.
    const auto bytes = adapter_bytes({{"model.layers.0.self_attn.q_proj", 2, 4, 3},
                                      {"model.layers.0.self_attn.v_proj", 1, 4, 3},
                                      {"model.layers.1.mlp.down_proj", 2, 5, 4}});
    for (const auto& path : inputs) {
        INFO(path.string());
        const auto raw = test::read_bytes(path);
        const std::string text(reinterpret_cast<const char*>(raw.data()), raw.size());
        try {
            const auto a = load_mem<double>(text, bytes);
            REQUIRE(a.modules.size() == 3);
        } catch (const lowrank::error& e) {
            REQUIRE(std::string(e.what()).find("lowrank::peft") != std::string::npos);
        }
    }
}
