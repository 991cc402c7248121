// SPDX-License-Identifier: Apache-2.0
// The performance issue's targets, each beside Eigen and OpenBLAS on the same data in one binary:
//
// - fused LoRA forward Y = X Wᵀ + s (X Aᵀ) Bᵀ (`lowrank::forward`): n ∈ {1, 16, 32, 128},
//   in = out = d ∈ {1024, 4096}, r ∈ {8, 16, 64}; Eigen as users write it, OpenBLAS as three
//   cblas_sgemm calls (cblas_sgemv at n = 1);
// - merge W += s B A (`lowrank::merge`) at 4096², r ∈ {16, 64}; Eigen and one cblas_sgemm;
// - `lowrank::Threads{t}`, t ∈ {1, 2}, for the forward at n ∈ {16, 128} and for merge (wall time,
//   `real_time` in the JSON: the 2-thread speedup is the ratio of the two rows; `cpu_time` is the
//   process's CPU time there, so cpu / real tells whether the threads really ran at once);
//   OpenBLAS with 1 and 2 threads at n = 128 for comparison;
// - double vs float forward at a compute-bound shape (n = 128, r = 16, d ∈ {1024, 4096}); the float
//   rows are those of the forward grid;
// - the forward from a `PackedWeight` (a row-major copy of W in memory advised for transparent huge
//   pages), and from the benchmark's own such copy (`forward_huge`, lowrank and OpenBLAS): the
//   other rows read W from Eigen's allocation, in 4 KiB pages where THP is in `madvise` mode.
//
// Single-thread rows are timed in thread CPU time (Google Benchmark's cpu_time; the machine is
// shared). OpenBLAS is held to one thread except in the explicitly threaded rows. Every row carries
// the counters bench/run.py needs for the roofline: `flops` and `bytes` per call (the arithmetic and
// the compulsory traffic: every operand read once, every output written once, W read and written
// by merge), `working_set` (distinct bytes touched, to pick the bandwidth level), `rmw` (1 when the
// traffic is an in-place update), `threads` and `elem_bytes`. GFLOP/s and GB/s are printed too.
// The adapter part alone and the backward are in bench_lora (run.py reads those rows from there).
//
//   bench_core --benchmark_min_time=0.05 --benchmark_filter=forward

#include <lowrank/core/memory.hpp>
#include <lowrank/expr/expr.hpp>
#include <lowrank/lora.hpp>

#include <benchmark/benchmark.h>

#ifdef LOWRANK_BENCH_OPENBLAS
#include <cblas.h>
#endif

#include <map>
#include <memory>
#include <random>
#include <set>
#include <tuple>
#include <vector>

namespace {

using lowrank::Index;
using lowrank::Matrix;

// ---- shared data: one W per (type, shape), built once, so every implementation sees the same ----

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<T> dist(T(-1), T(1));
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
    return m;
}

/// A cached random matrix; `seed` tells apart the operands of the same shape (W, X, merge target).
template <class T>
Matrix<T>& shared_matrix(Index rows, Index cols, unsigned seed) {
    static std::map<std::tuple<Index, Index, unsigned>, std::unique_ptr<Matrix<T>>> cache;
    auto& slot = cache[{rows, cols, seed}];
    if (!slot) slot = std::make_unique<Matrix<T>>(random_matrix<T>(rows, cols, seed));
    return *slot;
}

template <class T>
const lowrank::Lora<T>& shared_lora(Index d, Index r) {
    static std::map<std::pair<Index, Index>, std::unique_ptr<lowrank::Lora<T>>> cache;
    auto& slot = cache[{d, r}];
    if (!slot) {
        slot = std::make_unique<lowrank::Lora<T>>(d, d, lowrank::LoraConfig{.rank = r, .alpha = 16, .seed = 1});
        slot->B() = random_matrix<T>(d, r, 3);  // PEFT initialises B to zero; a trained B is not
    }
    return *slot;
}

/// The same values as shared_matrix(rows, cols, seed), copied into memory advised for transparent
/// huge pages before the copy writes it (core::HugePageAllocator).
template <class T>
Eigen::Map<const Matrix<T>> huge_page_matrix(Index rows, Index cols, unsigned seed) {
    using Storage = std::vector<T, lowrank::core::HugePageAllocator<T>>;
    static std::map<std::tuple<Index, Index, unsigned>, std::unique_ptr<Storage>> cache;
    auto& slot = cache[{rows, cols, seed}];
    if (!slot) {
        const Matrix<T>& m = shared_matrix<T>(rows, cols, seed);
        slot = std::make_unique<Storage>(m.data(), m.data() + m.size());
    }
    return {slot->data(), rows, cols};
}

enum : unsigned { seed_w = 1, seed_x = 2, seed_merge = 4 };

// ---- counters -----------------------------------------------------------------------------------

template <class T>
void roofline_counters(benchmark::State& state, double flops, double bytes, double working_set,
                       bool rmw, int threads) {
    using benchmark::Counter;
    state.counters["flops"] = flops;
    state.counters["bytes"] = bytes;
    state.counters["working_set"] = working_set;
    state.counters["rmw"] = rmw ? 1 : 0;
    state.counters["threads"] = threads;
    state.counters["elem_bytes"] = double(sizeof(T));
    state.counters["GFLOP/s"] = Counter(flops, Counter::kIsIterationInvariantRate, Counter::kIs1000);
    state.counters["GB/s"] = Counter(bytes, Counter::kIsIterationInvariantRate, Counter::kIs1000);
}

/// Forward: 2·n·out·in + 2·n·r·(in + out) flops; W, A, B and X read once, Y written once.
template <class T>
void forward_counters(benchmark::State& state, Index n, Index d, Index r, int threads) {
    const double bytes = double(sizeof(T)) * (double(d) * d + 2.0 * r * d + 2.0 * n * d);
    roofline_counters<T>(state, 2.0 * n * d * d + 4.0 * n * r * d, bytes, bytes, false, threads);
}

/// Merge: 2·r·out·in flops; W read and written (working set: W), A and B read once.
template <class T>
void merge_counters(benchmark::State& state, Index d, Index r, int threads) {
    const double w = double(sizeof(T)) * double(d) * d, factors = double(sizeof(T)) * 2.0 * r * d;
    roofline_counters<T>(state, 2.0 * r * d * d, 2.0 * w + factors, w + factors, true, threads);
}

// ---- OpenBLAS, float and double through one spelling ----------------------------------------------

#ifdef LOWRANK_BENCH_OPENBLAS
/// C (n × m, row-major) = alpha · A · Bᵀ + beta · C, A: n × k, B: m × k, both row-major.
void gemm_nt(Index n, Index m, Index k, float alpha, const float* a, const float* b, float beta,
             float* c) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(m), int(k), alpha, a, int(k), b,
                int(k), beta, c, int(m));
}
void gemm_nt(Index n, Index m, Index k, double alpha, const double* a, const double* b, double beta,
             double* c) {
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(m), int(k), alpha, a, int(k), b,
                int(k), beta, c, int(m));
}
/// y (m) = alpha · A x + beta · y, A: m × k row-major.
void gemv(Index m, Index k, float alpha, const float* a, const float* x, float beta, float* y) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, int(m), int(k), alpha, a, int(k), x, 1, beta, y, 1);
}
void gemv(Index m, Index k, double alpha, const double* a, const double* x, double beta, double* y) {
    cblas_dgemv(CblasRowMajor, CblasNoTrans, int(m), int(k), alpha, a, int(k), x, 1, beta, y, 1);
}

/// Y = X Wᵀ + s (X Aᵀ) Bᵀ in three BLAS calls (GEMV at one row), T: n × r scratch.
template <class T>
void openblas_forward(const Matrix<T>& X, const Eigen::Map<const Matrix<T>>& W, const lowrank::Lora<T>& lora,
                      Matrix<T>& Tm, Matrix<T>& Y) {
    const Index n = X.rows(), in = X.cols(), out = W.rows(), r = lora.rank();
    if (n == 1) {
        gemv(out, in, T(1), W.data(), X.data(), T(0), Y.data());
        gemv(r, in, T(1), lora.A().data(), X.data(), T(0), Tm.data());
        gemv(out, r, lora.scale(), lora.B().data(), Tm.data(), T(1), Y.data());
    } else {
        gemm_nt(n, out, in, T(1), X.data(), W.data(), T(0), Y.data());
        gemm_nt(n, r, in, T(1), X.data(), lora.A().data(), T(0), Tm.data());
        gemm_nt(n, out, r, lora.scale(), Tm.data(), lora.B().data(), T(1), Y.data());
    }
}
#endif

// ---- fused forward --------------------------------------------------------------------------------

/// Where a forward row's W sits: Eigen's allocation, or a copy in memory advised for huge pages.
enum class Pages { plain, huge };

/// The data of one forward shape (state.range: n, d, r): W d × d, X n × d, a rank-r adapter.
template <class T>
struct ForwardCase {
    Index n, d, r;
    Eigen::Map<const Matrix<T>> W;
    const Matrix<T>& X;
    const lowrank::Lora<T>& lora;
    explicit ForwardCase(const benchmark::State& state, Pages pages = Pages::plain)
        : n(state.range(0)), d(state.range(1)), r(state.range(2)), W(weight(d, pages)),
          X(shared_matrix<T>(n, d, seed_x)), lora(shared_lora<T>(d, r)) {}

private:
    static Eigen::Map<const Matrix<T>> weight(Index d, Pages pages) {
        if (pages == Pages::huge) return huge_page_matrix<T>(d, d, seed_w);
        const Matrix<T>& w = shared_matrix<T>(d, d, seed_w);
        return {w.data(), d, d};
    }
};

/// The timed loop of one forward shape: `body(Y)` computes Y (n × d) each iteration.
template <class T, class F>
void run_forward(benchmark::State& state, const ForwardCase<T>& fc, int threads, F&& body) {
    Matrix<T> Y(fc.n, fc.d);
    for (auto _ : state) {
        body(Y);
        benchmark::DoNotOptimize(Y.data());
        benchmark::ClobberMemory();
    }
    forward_counters<T>(state, fc.n, fc.d, fc.r, threads);
}

template <class T>
void forward_lowrank(benchmark::State& state, int threads, Pages pages = Pages::plain) {
    const ForwardCase<T> fc(state, pages);
    lowrank::Workspace<T> ws;
    run_forward<T>(state, fc, threads,
                   [&](Matrix<T>& Y) { lowrank::forward(fc.X, fc.W, fc.lora, Y, ws, lowrank::Threads{threads}); });
}

/// The same forward from a PackedWeight (copied once, outside the timed loop).
template <class T>
void forward_packed(benchmark::State& state) {
    const ForwardCase<T> fc(state);
    const lowrank::PackedWeight<T> packed(fc.W);
    lowrank::Workspace<T> ws;
    run_forward<T>(state, fc, 1, [&](Matrix<T>& Y) { Y = lowrank::linear(fc.X, packed + fc.lora, ws); });
}

template <class T>
void forward_eigen(benchmark::State& state) {
    const ForwardCase<T> fc(state);
    const T s = fc.lora.scale();
    run_forward<T>(state, fc, 1, [&](Matrix<T>& Y) {
        Y.noalias() = fc.X * fc.W.transpose();
        Y.noalias() += s * (fc.X * fc.lora.A().transpose()) * fc.lora.B().transpose();
    });
}

#ifdef LOWRANK_BENCH_OPENBLAS
template <class T>
void forward_openblas(benchmark::State& state, int threads, Pages pages = Pages::plain) {
    const ForwardCase<T> fc(state, pages);
    Matrix<T> Tm(fc.n, fc.r), Y(fc.n, fc.d);
    // The baseline's calls are checked once per shape against the Eigen expression (relative
    // Frobenius error; a length-d float dot product is good to ~d·2⁻²⁴ ≈ 2.4e-4 at d = 4096).
    openblas_set_num_threads(1);
    static std::set<std::tuple<Index, Index, Index>> checked;
    if (checked.insert({fc.n, fc.d, fc.r}).second) {
        openblas_forward(fc.X, fc.W, fc.lora, Tm, Y);
        const Matrix<T> reference = fc.X * fc.W.transpose() +
                                    fc.lora.scale() * (fc.X * fc.lora.A().transpose()) * fc.lora.B().transpose();
        if ((Y - reference).norm() > T(1e-3) * reference.norm()) {
            state.SkipWithError("OpenBLAS forward disagrees with the Eigen expression");
            return;
        }
    }
    openblas_set_num_threads(threads);
    run_forward<T>(state, fc, threads, [&](Matrix<T>& Yb) { openblas_forward(fc.X, fc.W, fc.lora, Tm, Yb); });
    openblas_set_num_threads(1);
}
#endif

void BM_forward_lowrank(benchmark::State& state) { forward_lowrank<float>(state, 1); }
void BM_forward_eigen(benchmark::State& state) { forward_eigen<float>(state); }
void BM_forward_packed_lowrank(benchmark::State& state) { forward_packed<float>(state); }
void BM_forward_huge_lowrank(benchmark::State& state) { forward_lowrank<float>(state, 1, Pages::huge); }

void BM_forward_f64_lowrank(benchmark::State& state) { forward_lowrank<double>(state, 1); }
void BM_forward_f64_eigen(benchmark::State& state) { forward_eigen<double>(state); }

void BM_forward_threads_lowrank(benchmark::State& state) {
    forward_lowrank<float>(state, int(state.range(3)));
}

// ---- merge ----------------------------------------------------------------------------------------
// W grows by s·B A per call (values stay far from overflow for any run length used here).

void merge_lowrank(benchmark::State& state, int threads) {
    const Index d = state.range(0), r = state.range(1);
    auto& W = shared_matrix<float>(d, d, seed_merge);
    const auto& lora = shared_lora<float>(d, r);
    for (auto _ : state) {
        lowrank::merge(W, lora, 1.f, lowrank::Threads{threads});
        benchmark::DoNotOptimize(W.data());
        benchmark::ClobberMemory();
    }
    merge_counters<float>(state, d, r, threads);
}

void BM_merge_lowrank(benchmark::State& state) { merge_lowrank(state, 1); }
void BM_merge_threads_lowrank(benchmark::State& state) { merge_lowrank(state, int(state.range(2))); }

void BM_merge_eigen(benchmark::State& state) {
    const Index d = state.range(0), r = state.range(1);
    auto& W = shared_matrix<float>(d, d, seed_merge);
    const auto& lora = shared_lora<float>(d, r);
    const float s = lora.scale();
    for (auto _ : state) {
        W.noalias() += s * lora.B() * lora.A();
        benchmark::DoNotOptimize(W.data());
        benchmark::ClobberMemory();
    }
    merge_counters<float>(state, d, r, 1);
}

#ifdef LOWRANK_BENCH_OPENBLAS
void BM_forward_openblas(benchmark::State& state) { forward_openblas<float>(state, 1); }
void BM_forward_f64_openblas(benchmark::State& state) { forward_openblas<double>(state, 1); }
void BM_forward_huge_openblas(benchmark::State& state) { forward_openblas<float>(state, 1, Pages::huge); }
void BM_forward_threads_openblas(benchmark::State& state) {
    forward_openblas<float>(state, int(state.range(3)));
}

void BM_merge_openblas(benchmark::State& state) {
    const Index d = state.range(0), r = state.range(1);
    auto& W = shared_matrix<float>(d, d, seed_merge);
    const auto& lora = shared_lora<float>(d, r);
    openblas_set_num_threads(1);
    for (auto _ : state) {
        // W (d × d) += s · B (d × r) · A (r × d)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(d), int(d), int(r), lora.scale(),
                    lora.B().data(), int(r), lora.A().data(), int(d), 1.f, W.data(), int(d));
        benchmark::DoNotOptimize(W.data());
        benchmark::ClobberMemory();
    }
    merge_counters<float>(state, d, r, 1);
}
#endif  // LOWRANK_BENCH_OPENBLAS

// ---- argument grids -------------------------------------------------------------------------------

void forward_grid(benchmark::internal::Benchmark* b) {
    b->ArgNames({"n", "d", "r"});
    for (int d : {1024, 4096})
        for (int r : {8, 16, 64}) {
            for (int n : {1, 16, 32, 128}) b->Args({n, d, r});
            if (r == 16)  // the batches of a few decoding sequences, and batches between the
                          // stream tiles' powers of two (gemm_stream_rows' 5 × 5 tiles), at one rank
                for (int n : {2, 4, 8, 10, 20, 40}) b->Args({n, d, r});
        }
}

void packed_grid(benchmark::internal::Benchmark* b) {
    b->ArgNames({"n", "d", "r"});
    for (int d : {1024, 4096})
        for (int n : {1, 16, 32, 128}) b->Args({n, d, 16});
}

void f64_grid(benchmark::internal::Benchmark* b) {
    b->ArgNames({"n", "d", "r"});
    for (int d : {1024, 4096}) b->Args({128, d, 16});
}

void forward_threads_grid(benchmark::internal::Benchmark* b) {
    b->ArgNames({"n", "d", "r", "t"});
    for (int n : {16, 128})
        for (int t : {1, 2}) b->Args({n, 4096, 16, t});
    b->UseRealTime()->MeasureProcessCPUTime();
}

[[maybe_unused]] void openblas_threads_grid(benchmark::internal::Benchmark* b) {
    b->ArgNames({"n", "d", "r", "t"});
    for (int t : {1, 2}) b->Args({128, 4096, 16, t});
    b->UseRealTime()->MeasureProcessCPUTime();
}

void merge_grid(benchmark::internal::Benchmark* b) {
    b->ArgNames({"d", "r"});
    for (int r : {16, 64}) b->Args({4096, r});
}

void merge_threads_grid(benchmark::internal::Benchmark* b) {
    b->ArgNames({"d", "r", "t"});
    for (int t : {1, 2}) b->Args({4096, 16, t});
    b->UseRealTime()->MeasureProcessCPUTime();
}

}  // namespace

BENCHMARK(BM_forward_lowrank)->Apply(forward_grid);
BENCHMARK(BM_forward_eigen)->Apply(forward_grid);
BENCHMARK(BM_forward_packed_lowrank)->Apply(packed_grid);
BENCHMARK(BM_forward_huge_lowrank)->Apply(packed_grid);
BENCHMARK(BM_merge_lowrank)->Apply(merge_grid);
BENCHMARK(BM_merge_eigen)->Apply(merge_grid);
BENCHMARK(BM_forward_threads_lowrank)->Apply(forward_threads_grid);
BENCHMARK(BM_merge_threads_lowrank)->Apply(merge_threads_grid);
BENCHMARK(BM_forward_f64_lowrank)->Apply(f64_grid);
BENCHMARK(BM_forward_f64_eigen)->Apply(f64_grid);
#ifdef LOWRANK_BENCH_OPENBLAS
BENCHMARK(BM_forward_openblas)->Apply(forward_grid);
BENCHMARK(BM_merge_openblas)->Apply(merge_grid);
BENCHMARK(BM_forward_threads_openblas)->Apply(openblas_threads_grid);
BENCHMARK(BM_forward_f64_openblas)->Apply(f64_grid);
BENCHMARK(BM_forward_huge_openblas)->Apply(packed_grid);
#endif
