// SPDX-License-Identifier: Apache-2.0
// Mixed-adapter batches (BGMV) and token-masked composition (TARA), adapter part only, against the
// ways users do it today in the same binary: a per-adapter loop over gathered rows in plain Eigen
// (PEFT's mixed batches), the naive per-row loop (vLLM's CPU path), and for masks the dense
// "run every adapter on every token, then multiply by the mask".
//
// Every benchmark reports bytes/s over the compulsory traffic (adapter factors + X + read and
// write of Y) and `roofline` = that rate / the rate of `BM_stream_roofline`, which moves the same
// number of bytes (reads the factors, X and Y, writes Y) with a plain vectorised loop: the memory
// roofline measured on the spot. With all data L3-resident (as here: ~7 MB) it is the L3 bandwidth.
//
//   bench_compose --benchmark_min_time=0.05

#include <lowrank/compose.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <ctime>
#include <random>

using namespace lowrank;

namespace {

Matrix<float> random_matrix(Index rows, Index cols, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> dist(-1.f, 1.f);
    Matrix<float> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
    return m;
}

struct MixedCase {
    Index n = 64, K = 8, r = 16, in = 4096, out = 4096;
    std::vector<Lora<float>> adapters;
    std::vector<int> idx;
    Matrix<float> X, Y;
    MixedCase() {
        for (Index k = 0; k < K; ++k) {
            adapters.emplace_back(out, in, LoraConfig{.rank = r, .alpha = 32, .seed = std::uint64_t(k)});
            adapters.back().B() = random_matrix(out, r, unsigned(100 + k));
        }
        std::mt19937 gen(7);
        for (Index t = 0; t < n; ++t) idx.push_back(int(gen() % std::uint32_t(K)));  // scattered rows
        X = random_matrix(n, in, 1);
        Y = random_matrix(n, out, 2);
    }
    /// Compulsory traffic: every adapter's A and B, X once, Y read and written once.
    [[nodiscard]] double bytes() const {
        return double(sizeof(float)) * double(K * r * (in + out) + n * in + 2 * n * out);
    }
    [[nodiscard]] double flops() const { return 2.0 * double(n) * double(r) * double(in + out); }
};

MixedCase& mixed_case() {
    static MixedCase c;
    return c;
}

double stream_rate = 0;  // bytes/s of BM_stream_roofline (it runs first)

void report(benchmark::State& state, double bytes, double flops) {
    state.counters["GB/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["GFLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["bytes"] = bytes;
}

/// `roofline`: the rate over BM_stream_roofline's (measured in this run); `of_30GBps`: over the
/// single-thread L3 bandwidth quoted for this machine in the issue (30 GB/s).
void add_roofline(benchmark::State& state, double bytes, double seconds) {
    if (seconds <= 0) return;
    const double rate = bytes * double(state.iterations()) / seconds;
    if (stream_rate > 0) state.counters["roofline"] = rate / stream_rate;
    state.counters["of_30GBps"] = rate / 30e9;
}

/// CPU time of this thread (the machine is shared: wall time would count other processes).
double thread_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

template <class F>
void timed(benchmark::State& state, double bytes, double flops, F&& body) {
    double seconds = 0;
    for (auto _ : state) {
        const double t0 = thread_seconds();
        body();
        benchmark::ClobberMemory();
        seconds += thread_seconds() - t0;
    }
    report(state, bytes, flops);
    add_roofline(state, bytes, seconds);
}

// ---- the roofline: the same bytes with a plain streaming loop ---------------------------------

void BM_stream_roofline(benchmark::State& state) {
    MixedCase& c = mixed_case();
    double seconds = 0;
    float sink = 0;
    for (auto _ : state) {
        const double t0 = thread_seconds();
        float acc = 0;
        for (const auto& a : c.adapters) acc += a.A().sum() + a.B().sum();  // read the factors
        c.Y.array() += c.X.leftCols(c.out).array() * 1e-30f;                // read X, Y; write Y
        sink += acc;
        benchmark::ClobberMemory();
        seconds += thread_seconds() - t0;
    }
    benchmark::DoNotOptimize(sink);
    stream_rate = c.bytes() * double(state.iterations()) / seconds;
    report(state, c.bytes(), 0);
}

// ---- mixed batch: n = 64, 8 adapters, r = 16, in = out = 4096 ---------------------------------

void BM_mixed_lowrank(benchmark::State& state) {
    MixedCase& c = mixed_case();
    MixedWorkspace<float> ws;
    timed(state, c.bytes(), c.flops(), [&] { mixed_delta(c.X, c.adapters, c.idx, c.Y, ws); });
}

/// PEFT's way: for each adapter, gather its rows, two GEMMs, scatter-add.
/// The same with the adapters laid out once in an AdapterBank (Bᵀ pre-transposed), as a server
/// holding its adapters would: the bank is built outside the timed loop.
void BM_mixed_lowrank_bank(benchmark::State& state) {
    MixedCase& c = mixed_case();
    MixedWorkspace<float> ws;
    const AdapterBank<float> bank(c.adapters);
    timed(state, c.bytes(), c.flops(), [&] { mixed_delta(c.X, bank, c.idx, c.Y, ws); });
}

void BM_mixed_eigen_gather(benchmark::State& state) {
    MixedCase& c = mixed_case();
    std::vector<std::vector<Index>> rows(std::size_t(c.K));
    for (Index t = 0; t < c.n; ++t) rows[std::size_t(c.idx[std::size_t(t)])].push_back(t);
    timed(state, c.bytes(), c.flops(), [&] {
        for (Index k = 0; k < c.K; ++k) {
            const auto& rk = rows[std::size_t(k)];
            if (rk.empty()) continue;
            const Lora<float>& a = c.adapters[std::size_t(k)];
            const Matrix<float> xg = c.X(rk, Eigen::all);
            const Matrix<float> t = xg * a.A().transpose();
            c.Y(rk, Eigen::all) += a.scale() * (t * a.B().transpose());
        }
    });
}

/// vLLM's CPU way: each row with its own adapter, one GEMV pair per row.
void BM_mixed_per_row(benchmark::State& state) {
    MixedCase& c = mixed_case();
    Eigen::Matrix<float, 1, Eigen::Dynamic> t(c.r);
    timed(state, c.bytes(), c.flops(), [&] {
        for (Index row = 0; row < c.n; ++row) {
            const Lora<float>& a = c.adapters[std::size_t(c.idx[std::size_t(row)])];
            t.noalias() = c.X.row(row) * a.A().transpose();
            c.Y.row(row).noalias() += a.scale() * (t * a.B().transpose());
        }
    });
}

// ---- TARA: n = 77 tokens, 3 masked adapters, in = 768, out = 320 / 1280 -------------------------

struct MaskedCase {
    Index n = 77, K = 3, r = 16, in = 768, out;
    std::vector<Lora<float>> adapters;
    Matrix<float> X, W, Y, M;
    explicit MaskedCase(Index out_features) : out(out_features) {
        for (Index k = 0; k < K; ++k) {
            adapters.emplace_back(out, in, LoraConfig{.rank = r, .alpha = 16, .seed = std::uint64_t(k)});
            adapters.back().B() = random_matrix(out, r, unsigned(200 + k));
        }
        X = random_matrix(n, in, 3);
        W = random_matrix(out, in, 4);
        Y = random_matrix(n, out, 5);
        // A prompt "… sks1 sks2 dog and zwx cat with qrt1 qrt2 hat …": 2, 1 and 2 rare sub-tokens.
        std::vector<int> ids(std::size_t(n), 320);
        ids[5] = 901, ids[6] = 902, ids[9] = 777, ids[13] = 903, ids[14] = 904;
        M = token_masks(ids, {{901, 902}, {777}, {903, 904}});
    }
    [[nodiscard]] double bytes() const {
        return double(sizeof(float)) * double(K * r * (in + out) + n * in + 2 * n * out);
    }
    /// Flops of the masked rows only (what a gathered evaluation needs).
    [[nodiscard]] double dense_flops() const {
        return 2.0 * double(r) * double(in + out) * double((M.array() != 0.f).count());
    }
};

MaskedCase& masked_case(Index out) {
    static MaskedCase c320(320), c1280(1280);
    return out == 320 ? c320 : c1280;
}

void BM_tara_lowrank_masked_delta(benchmark::State& state) {
    MaskedCase& c = masked_case(state.range(0));
    MixedWorkspace<float> ws;
    timed(state, c.bytes(), c.dense_flops(), [&] { masked_delta(c.X, c.adapters, c.M, c.Y, ws); });
}

/// The expression path (every token through every adapter, mask in the transform), adapter part:
/// measured as linear(X, W + masked…) minus nothing — it includes the base GEMM, see
/// BM_tara_eigen_layer for the matching baseline.
void BM_tara_lowrank_expression_layer(benchmark::State& state) {
    MaskedCase& c = masked_case(state.range(0));
    Workspace<float> ws;
    const auto& a = c.adapters;
    timed(state, c.bytes(), c.dense_flops(), [&] {
        c.Y = linear(c.X, c.W + a[0].masked(c.M.row(0)) + a[1].masked(c.M.row(1)) + a[2].masked(c.M.row(2)), ws);
    });
}

void BM_tara_eigen_layer(benchmark::State& state) {
    MaskedCase& c = masked_case(state.range(0));
    timed(state, c.bytes(), c.dense_flops(), [&] {
        c.Y.noalias() = c.X * c.W.transpose();
        for (Index k = 0; k < c.K; ++k) {
            const Lora<float>& a = c.adapters[std::size_t(k)];
            const Matrix<float> t = c.X * a.A().transpose();
            c.Y.noalias() += (a.scale() * c.M.row(k).transpose().asDiagonal() * t) * a.B().transpose();
        }
    });
}

/// TARA's own way: every adapter on every token, then the mask multiplies its output.
void BM_tara_eigen_dense(benchmark::State& state) {
    MaskedCase& c = masked_case(state.range(0));
    timed(state, c.bytes(), c.dense_flops(), [&] {
        for (Index k = 0; k < c.K; ++k) {
            const Lora<float>& a = c.adapters[std::size_t(k)];
            const Matrix<float> t = c.X * a.A().transpose();
            c.Y.noalias() += (a.scale() * c.M.row(k).transpose().asDiagonal() * t) * a.B().transpose();
        }
    });
}

void BM_tara_per_row(benchmark::State& state) {
    MaskedCase& c = masked_case(state.range(0));
    Eigen::Matrix<float, 1, Eigen::Dynamic> t(c.r);
    timed(state, c.bytes(), c.dense_flops(), [&] {
        for (Index k = 0; k < c.K; ++k) {
            const Lora<float>& a = c.adapters[std::size_t(k)];
            for (Index row = 0; row < c.n; ++row) {
                const float m = c.M(k, row);
                if (m == 0.f) continue;
                t.noalias() = c.X.row(row) * a.A().transpose();
                c.Y.row(row).noalias() += (m * a.scale()) * (t * a.B().transpose());
            }
        }
    });
}

}  // namespace

BENCHMARK(BM_stream_roofline);
BENCHMARK(BM_mixed_lowrank);
BENCHMARK(BM_mixed_lowrank_bank);
BENCHMARK(BM_mixed_eigen_gather);
BENCHMARK(BM_mixed_per_row);
BENCHMARK(BM_tara_lowrank_masked_delta)->Arg(320)->Arg(1280);
BENCHMARK(BM_tara_eigen_dense)->Arg(320)->Arg(1280);
BENCHMARK(BM_tara_per_row)->Arg(320)->Arg(1280);
BENCHMARK(BM_tara_lowrank_expression_layer)->Arg(320)->Arg(1280);
BENCHMARK(BM_tara_eigen_layer)->Arg(320)->Arg(1280);
