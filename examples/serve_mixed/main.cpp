// Serving several LoRA adapters in one batch: every row (one request's token) names its own adapter,
// or none (idx = −1), and the whole batch goes through one call of the mixed-batch kernel
//
//     lowrank::mixed(X, W, bank, idx, Y)    // Y[t] = X[t] Wᵀ + s_k (X[t] A_kᵀ) B_kᵀ, k = idx[t]
//
// which streams each adapter's factors once per batch however its rows are scattered (Punica's
// BGMV, on the CPU). The result is checked against per-row evaluation (each row alone through
// `lowrank::forward` with its own adapter, and through `add_delta` after one base product) and
// against a dense double-precision computation; the program exits with status 1 on a mismatch.
//
// The adapters are PEFT folders:
//   - the real adapter shipped in tests/data/peft/opencalm1b-qkv-r1-f16 (written by PEFT for
//     cyberagent/open-calm-1b, rank 1, F16; Apache-2.0, see the SOURCE.txt and LICENSE there);
//   - three more for the same model that this program writes with lowrank's PEFT writer into a
//     temporary folder (ranks 8, 16 with rsLoRA, 4; stored as F32, BF16, F16) and reads back.
// The layer served is gpt_neox.layers.0.attention.query_key_value (6144 × 2048); its base weight
// is not part of an adapter, so it is a seeded random matrix here.
//
// Usage: serve_mixed [path/to/opencalm1b-qkv-r1-f16]
#include <lowrank/compose.hpp>
#include <lowrank/io/peft.hpp>
#include <lowrank/lora.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using lowrank::Index;
using lowrank::Matrix;
using lowrank::safetensors::Dtype;

const std::string served_module = "gpt_neox.layers.0.attention.query_key_value";

Matrix<float> random_matrix(Index rows, Index cols, double sigma, std::uint64_t seed) {
    lowrank::Random rng(seed);
    Matrix<float> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = float(sigma * rng.normal());
    return m;
}

/// Smallest wall time of `reps` runs of f, in milliseconds.
double time_ms(int reps, const std::function<void()>& f) {
    double best = std::numeric_limits<double>::infinity();
    for (int i = 0; i < reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        const auto t1 = std::chrono::steady_clock::now();
        best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    return best;
}

fs::path find_fixture(int argc, char** argv) {
    if (argc > 1) return argv[1];
    const fs::path repo = fs::path(__FILE__).parent_path().parent_path().parent_path();
    for (const fs::path& p : {repo / "tests/data/peft/opencalm1b-qkv-r1-f16",
                              repo.parent_path() / "shared/fixtures/peft/opencalm1b-qkv-r1-f16",
                              fs::path("tests/data/peft/opencalm1b-qkv-r1-f16")})
        if (fs::exists(p / "adapter_config.json")) return p;
    return {};
}

/// A temporary folder removed when the program leaves main (also on an exception).
struct TempDir {
    fs::path path;
    TempDir() {
        path = fs::temp_directory_path() / ("lowrank_serve_mixed_" + std::to_string(::getpid()));
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

/// A made-up "tenant" adapter for open-calm-1b's first two query_key_value layers, as a PEFT
/// adapter built in code: A as PEFT initialises it, B nonzero as after training.
lowrank::peft::Adapter<float> tenant_adapter(Index rank, double alpha, bool rslora, std::uint64_t seed,
                                             Index out, Index in) {
    lowrank::peft::Adapter<float> adapter;
    adapter.config.r = rank;
    adapter.config.lora_alpha = alpha;
    adapter.config.use_rslora = rslora;
    adapter.config.json = {{"base_model_name_or_path", "cyberagent/open-calm-1b"},
                           {"task_type", "CAUSAL_LM"},
                           {"target_modules", {"query_key_value"}}};
    for (int layer = 0; layer < 2; ++layer) {
        lowrank::Lora<float> lora(out, in, {.rank = rank, .alpha = alpha, .rslora = rslora,
                                            .seed = seed + std::uint64_t(layer)});
        lora.B() = random_matrix(out, rank, 0.02, seed + 100 + std::uint64_t(layer));
        adapter.add("gpt_neox.layers." + std::to_string(layer) + ".attention.query_key_value",
                    std::move(lora));
    }
    return adapter;
}

/// Largest |loaded − written| / (u·|written| + tiny) over a factor, u the storage's unit roundoff
/// (round to nearest), tiny the half-spacing of F16 subnormals; ≤ 1 when the file round trip only
/// rounded to the storage type.
double round_trip_ratio(const Matrix<float>& written, const Matrix<float>& loaded, Dtype dtype) {
    const double unit = dtype == Dtype::F32 ? 0.0 : dtype == Dtype::F16 ? 0x1p-11 : 0x1p-8;
    const double tiny = dtype == Dtype::F16 ? 0x1p-25 : 0.0;
    double worst = 0;
    for (Index i = 0; i < written.rows(); ++i)
        for (Index j = 0; j < written.cols(); ++j) {
            const double err = std::abs(double(loaded(i, j)) - double(written(i, j)));
            const double allowed = unit * std::abs(double(written(i, j))) + tiny;
            worst = std::max(worst, allowed > 0 ? err / allowed : (err > 0 ? INFINITY : 0.0));
        }
    return worst;
}

}  // namespace

int main(int argc, char** argv) try {
    int failures = 0;
    const fs::path fixture = find_fixture(argc, argv);
    if (fixture.empty()) {
        std::fprintf(stderr, "serve_mixed: cannot find the PEFT fixture opencalm1b-qkv-r1-f16; pass its "
                             "folder as the first argument\n");
        return 2;
    }

    // --- adapters from PEFT folders ---------------------------------------------------------------
    const auto t_load0 = std::chrono::steady_clock::now();
    const auto calm = lowrank::peft::load<float>(fixture);
    const lowrank::Lora<float>& calm_lora = calm.modules.at(served_module).lora;
    const Index out = calm_lora.out_features(), in = calm_lora.in_features();

    TempDir tmp;
    struct Written {
        const char* name;
        Index rank;
        double alpha;
        bool rslora;
        Dtype dtype;
    };
    const Written specs[] = {{"tenant-a", 8, 16, false, Dtype::F32},
                             {"tenant-b", 16, 16, true, Dtype::BF16},
                             {"tenant-c", 4, 8, false, Dtype::F16}};
    std::vector<lowrank::peft::Adapter<float>> tenants;
    std::vector<double> trip;
    for (std::size_t k = 0; k < std::size(specs); ++k) {
        const Written& sp = specs[k];
        const auto written = tenant_adapter(sp.rank, sp.alpha, sp.rslora, 1000 * (k + 1), out, in);
        lowrank::peft::save(written, tmp.path / sp.name, {.dtype = sp.dtype});
        tenants.push_back(lowrank::peft::load<float>(tmp.path / sp.name));
        const auto& before = written.modules.at(served_module).lora;
        const auto& after = tenants.back().modules.at(served_module).lora;
        trip.push_back(std::max(round_trip_ratio(before.A(), after.A(), sp.dtype),
                                round_trip_ratio(before.B(), after.B(), sp.dtype)));
        if (after.scale() != before.scale() || after.rank() != before.rank() || trip.back() > 1) {
            std::printf("MISMATCH: %s changed in the PEFT round trip (scale %g -> %g, rank %lld -> %lld, "
                        "factor error %.3g x the storage rounding)\n",
                        sp.name, double(before.scale()), double(after.scale()), (long long)before.rank(),
                        (long long)after.rank(), trip.back());
            ++failures;
        }
    }
    const double load_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_load0).count();

    // The bank: adapter k of the batch is bank[k].
    std::vector<const lowrank::Lora<float>*> bank = {&calm_lora};
    std::vector<std::string> names = {"opencalm1b fixture"};
    std::vector<std::string> sources = {std::string("PEFT file, ") +
                                        std::string(lowrank::safetensors::dtype_name(
                                            calm.modules.at(served_module).dtype))};
    for (std::size_t k = 0; k < tenants.size(); ++k) {
        bank.push_back(&tenants[k].modules.at(served_module).lora);
        names.push_back(specs[k].name);
        sources.push_back(std::string("written + read back, ") +
                          std::string(lowrank::safetensors::dtype_name(specs[k].dtype)));
    }
    const Index K = Index(bank.size());

    std::printf("Layer %s: W %lld x %lld (seeded random base weight), %lld adapters loaded from PEFT folders "
                "in %.0f ms\n", served_module.c_str(), (long long)out, (long long)in, (long long)K, load_ms);
    std::printf("  fixture: %s (%zu modules)\n", fixture.string().c_str(), calm.modules.size());
    std::printf("  written: %s/{tenant-a,tenant-b,tenant-c} (2 modules each; removed at exit)\n",
                tmp.path.string().c_str());

    // --- one batch of rows for several adapters ---------------------------------------------------
    const Index n = 64;
    const Matrix<float> W = random_matrix(out, in, 1.0 / std::sqrt(double(in)), 1);
    const Matrix<float> X = random_matrix(n, in, 1.0, 2);
    std::vector<int> idx(static_cast<std::size_t>(n));
    {
        lowrank::Random rng(3);
        for (int& k : idx) k = rng.uniform() < 0.2 ? -1 : int(rng.uniform(0, double(K)));
    }
    std::vector<Index> rows_of(static_cast<std::size_t>(K + 1), 0);  // [0]: no adapter
    for (const int k : idx) ++rows_of[std::size_t(k + 1)];

    // Mixed-batch kernel: one call for the whole batch.
    Matrix<float> Y_mixed;
    lowrank::MixedWorkspace<float> ws;
    lowrank::mixed(X, W, bank, idx, Y_mixed, ws);
    const double mixed_ms = time_ms(5, [&] { lowrank::mixed(X, W, bank, idx, Y_mixed, ws); });

    // Per-row evaluation: each row alone with its own adapter (lowrank::forward), or the base
    // product alone for rows without one.
    Matrix<float> Y_rows(n, out);
    lowrank::Workspace<float> lws;
    auto per_row = [&] {
        for (Index t = 0; t < n; ++t) {
            const int k = idx[std::size_t(t)];
            if (k < 0)
                Y_rows.row(t).noalias() = X.row(t) * W.transpose();
            else
                lowrank::forward(X.row(t), W, *bank[std::size_t(k)], Y_rows.row(t), lws);
        }
    };
    per_row();
    const double rows_ms = time_ms(2, per_row);

    // The adapter part alone, for a host that runs its own base GEMM: one mixed_delta call vs one
    // add_delta per row, both onto the same base product.
    const Matrix<float> Y_base = X * W.transpose();
    Matrix<float> D_mixed = Y_base, D_rows = Y_base;
    const double delta_mixed_ms = time_ms(5, [&] {
        D_mixed = Y_base;
        lowrank::mixed_delta(X, bank, idx, D_mixed, ws);
    });
    const double delta_rows_ms = time_ms(5, [&] {
        D_rows = Y_base;
        for (Index t = 0; t < n; ++t)
            if (const int k = idx[std::size_t(t)]; k >= 0)
                lowrank::add_delta(X.row(t), *bank[std::size_t(k)], D_rows.row(t), lws);
    });

    // --- checks ------------------------------------------------------------------------------------
    // Dense double reference per row, with the entrywise rounding bound of the float computation:
    // a length-in dot product for the base, a length-in shrink, the scale, a length-r expand and the
    // final addition, each within (length)·u of the sum of absolute products (u = 2⁻²⁴), times 2.
    const double u = std::numeric_limits<float>::epsilon() / 2;
    const Eigen::MatrixXd Xd = X.cast<double>(), Wd = W.cast<double>();
    const Eigen::MatrixXd absX = Xd.cwiseAbs();
    Eigen::MatrixXd want = Xd * Wd.transpose();
    Eigen::MatrixXd bound = (absX * Wd.cwiseAbs().transpose()) * (2.0 * double(in + 2) * u);
    for (Index t = 0; t < n; ++t) {
        const int k = idx[std::size_t(t)];
        if (k < 0) continue;
        const lowrank::Lora<float>& a = *bank[std::size_t(k)];
        const Eigen::MatrixXd Ad = a.A().cast<double>(), Bd = a.B().cast<double>();
        const double s = a.scale();
        want.row(t) += s * (Xd.row(t) * Ad.transpose()) * Bd.transpose();
        bound.row(t) += (2.0 * double(in + a.rank() + 4) * u * s) *
                        ((absX.row(t) * Ad.cwiseAbs().transpose()) * Bd.cwiseAbs().transpose());
    }
    auto ratio_to_bound = [&](const Matrix<float>& Y, const Eigen::MatrixXd& scale) {
        double worst = 0;
        for (Index t = 0; t < n; ++t)
            for (Index j = 0; j < out; ++j)
                worst = std::max(worst, std::abs(double(Y(t, j)) - want(t, j)) / scale(t, j));
        return Y.allFinite() ? worst : INFINITY;
    };
    const double mixed_vs_ref = ratio_to_bound(Y_mixed, bound);
    const double rows_vs_ref = ratio_to_bound(Y_rows, bound);
    const double dmixed_vs_ref = ratio_to_bound(D_mixed, bound);
    const double drows_vs_ref = ratio_to_bound(D_rows, bound);
    // Two float results each within `bound` of the reference differ by at most 2·bound.
    auto pair_ratio = [&](const Matrix<float>& Y1, const Matrix<float>& Y2) {
        double worst = 0;
        for (Index t = 0; t < n; ++t)
            for (Index j = 0; j < out; ++j)
                worst = std::max(worst, std::abs(double(Y1(t, j)) - double(Y2(t, j))) / (2 * bound(t, j)));
        return worst;
    };
    const double max_diff = double((Y_mixed - Y_rows).cwiseAbs().maxCoeff());
    const double max_diff_delta = double((D_mixed - D_rows).cwiseAbs().maxCoeff());
    const double max_adapter_effect = [&] {
        double m = 0;
        for (Index t = 0; t < n; ++t)
            if (idx[std::size_t(t)] >= 0) m = std::max(m, double((Y_mixed.row(t) - Y_base.row(t)).norm()));
        return m;
    }();
    // Rows without an adapter must be the base product alone.
    bool base_rows_ok = true;
    for (Index t = 0; t < n; ++t)
        if (idx[std::size_t(t)] < 0 && !(D_mixed.row(t) - Y_base.row(t)).isZero(0)) base_rows_ok = false;

    // --- report ------------------------------------------------------------------------------------
    std::printf("\nAdapters in the bank (idx = position):\n");
    for (Index k = 0; k < K; ++k) {
        const auto& a = *bank[std::size_t(k)];
        std::printf("  idx %2lld  %-19s rank %2lld  scale %7.4f%s  %-28s rows in the batch: %3lld\n", (long long)k,
                    names[std::size_t(k)].c_str(), (long long)a.rank(), double(a.scale()),
                    a.config().rslora ? " rsLoRA" : "       ", ("(" + sources[std::size_t(k)] + ")").c_str(),
                    (long long)rows_of[std::size_t(k + 1)]);
    }
    std::printf("  idx -1  %-78s rows in the batch: %3lld\n", "(no adapter: the base product alone)",
                (long long)rows_of[0]);
    for (std::size_t k = 0; k < tenants.size(); ++k)
        std::printf("  PEFT round trip of %s (%s): factors within %.2f x the storage rounding, scale and rank kept\n",
                    specs[k].name, std::string(lowrank::safetensors::dtype_name(specs[k].dtype)).c_str(), trip[k]);
    std::printf("  idx per row: ");
    for (const int k : idx) std::printf("%d ", k);
    std::printf("\n");

    std::printf("\nBatch of %lld rows x %lld features -> %lld outputs\n", (long long)n, (long long)in, (long long)out);
    std::printf("  %-64s %9.2f ms\n", "mixed(X, W, bank, idx, Y): base product + every adapter", mixed_ms);
    std::printf("  %-64s %9.2f ms\n", "per row: forward(X.row(t), W, adapter of t) (base alone if -1)", rows_ms);
    std::printf("  %-64s %9.2f ms\n", "adapter part only: mixed_delta(X, bank, idx, Y)", delta_mixed_ms);
    std::printf("  %-64s %9.2f ms\n", "adapter part only: add_delta per row", delta_rows_ms);
    std::printf("  (wall time, best of a few runs, one thread; the machine may be shared)\n");

    std::printf("\nChecks (largest |adapter effect| on a row: %.3g):\n", max_adapter_effect);
    auto line = [&](const char* what, double value, double ratio) {
        const bool ok = ratio <= 1;
        failures += ok ? 0 : 1;
        std::printf("  %-48s %10.3e   (%.1e of its bound)  %s\n", what, value, ratio, ok ? "ok" : "MISMATCH");
    };
    line("max |mixed - per-row forward|", max_diff, pair_ratio(Y_mixed, Y_rows));
    line("max |mixed_delta - per-row add_delta|", max_diff_delta, pair_ratio(D_mixed, D_rows));
    line("max |mixed - dense double|", double((Y_mixed.cast<double>() - want).cwiseAbs().maxCoeff()), mixed_vs_ref);
    line("max |per-row forward - dense double|", double((Y_rows.cast<double>() - want).cwiseAbs().maxCoeff()),
         rows_vs_ref);
    line("max |base + mixed_delta - dense double|", double((D_mixed.cast<double>() - want).cwiseAbs().maxCoeff()),
         dmixed_vs_ref);
    line("max |base + per-row add_delta - dense double|",
         double((D_rows.cast<double>() - want).cwiseAbs().maxCoeff()), drows_vs_ref);
    if (!base_rows_ok) {
        std::printf("  MISMATCH: mixed_delta changed a row with idx = -1\n");
        ++failures;
    } else {
        std::printf("  rows with idx = -1 left exactly as the base product by mixed_delta: ok\n");
    }

    if (failures) {
        std::printf("FAILED: %d mismatches\n", failures);
        return 1;
    }
    std::printf("all checks passed\n");
    return 0;
} catch (const std::exception& e) {
    std::fprintf(stderr, "serve_mixed: %s\n", e.what());
    return 1;
}
