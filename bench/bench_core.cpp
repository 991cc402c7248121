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
//   other rows read W from Eigen's allocation, in 4 KiB pages where THP is in `madvise` mode;
// - the layer's backward with the input gradient (`lowrank::backward` with W: dX = dY W + s G A,
//   dA, dB; G = dY B), n ∈ {1, 16, 32, 128}, d ∈ {1024, 4096}, r = 16: the base product dY W is
//   most of it. Eigen as users write it, OpenBLAS as six cblas_sgemm calls (cblas_sgemv for dY W
//   at n = 1).
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

enum : unsigned { seed_w = 1, seed_x = 2, seed_merge = 4, seed_dy = 5 };

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

/// Layer backward: 2·n·out·in (dY W) + 2·n·r·(3 in + 2 out) flops (the adapter's five products,
/// X Aᵀ included); W, X, dY, A and B read once, dX, dA and dB written once.
template <class T>
void layer_backward_counters(benchmark::State& state, Index n, Index d, Index r) {
    const double e = double(sizeof(T));
    const double bytes = e * (double(d) * d + 2.0 * n * d + 2.0 * r * d) + e * (double(n) * d + 2.0 * r * d);
    roofline_counters<T>(state, 2.0 * n * d * d + 10.0 * n * r * d, bytes, bytes, false, 1);
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
/// C (n × m) = alpha · op(A) · B + beta · C for a row-major B (k × m): op(A) = A (n × k) or, with
/// `at`, Aᵀ for a row-major A of k × n.
void gemm_xn(bool at, Index n, Index m, Index k, float alpha, const float* a, const float* b, float beta,
             float* c) {
    cblas_sgemm(CblasRowMajor, at ? CblasTrans : CblasNoTrans, CblasNoTrans, int(n), int(m), int(k), alpha, a,
                at ? int(n) : int(k), b, int(m), beta, c, int(m));
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

// ---- layer backward with the input gradient ----------------------------------------------------

/// The data of one layer-backward shape (state.range: n, d, r): the forward's W, X and adapter, and
/// dY (n × d).
struct BackwardCase {
    Index n, d, r;
    const Matrix<float>& W;
    const Matrix<float>& X;
    const Matrix<float>& dY;
    const lowrank::Lora<float>& lora;
    explicit BackwardCase(const benchmark::State& state)
        : n(state.range(0)), d(state.range(1)), r(state.range(2)), W(shared_matrix<float>(d, d, seed_w)),
          X(shared_matrix<float>(n, d, seed_x)), dY(shared_matrix<float>(n, d, seed_dy)),
          lora(shared_lora<float>(d, r)) {}
};

/// The timed loop: `body(grad, dX)` computes the gradients each iteration.
template <class F>
void run_layer_backward(benchmark::State& state, const BackwardCase& bc, F&& body) {
    lowrank::LoraGrad<float> grad(bc.lora);
    Matrix<float> dX(bc.n, bc.d);
    for (auto _ : state) {
        body(grad, dX);
        benchmark::DoNotOptimize(dX.data());
        benchmark::DoNotOptimize(grad.A.data());
        benchmark::ClobberMemory();
    }
    layer_backward_counters<float>(state, bc.n, bc.d, bc.r);
}

void BM_layer_backward_lowrank(benchmark::State& state) {
    const BackwardCase bc(state);
    lowrank::Workspace<float> ws;
    run_layer_backward(state, bc, [&](lowrank::LoraGrad<float>& grad, Matrix<float>& dX) {
        lowrank::backward(bc.X, bc.W, bc.lora, bc.dY, grad, dX, ws);
    });
}

void BM_layer_backward_eigen(benchmark::State& state) {
    const BackwardCase bc(state);
    const float s = bc.lora.scale();
    const auto& A = bc.lora.A();
    const auto& B = bc.lora.B();
    Matrix<float> T(bc.n, bc.r), G(bc.n, bc.r);
    run_layer_backward(state, bc, [&](lowrank::LoraGrad<float>& grad, Matrix<float>& dX) {
        T.noalias() = bc.X * A.transpose();
        G.noalias() = bc.dY * B;
        grad.B.noalias() = s * bc.dY.transpose() * T;
        grad.A.noalias() = s * G.transpose() * bc.X;
        dX.noalias() = bc.dY * bc.W;
        dX.noalias() += s * G * A;
    });
}

#ifdef LOWRANK_BENCH_OPENBLAS
/// dX = dY W + s G A, dA = s Gᵀ X, dB = s dYᵀ T in BLAS calls (T = X Aᵀ, G = dY B).
void openblas_layer_backward(const BackwardCase& bc, Matrix<float>& T, Matrix<float>& G,
                             lowrank::LoraGrad<float>& grad, Matrix<float>& dX) {
    const Index n = bc.n, d = bc.d, r = bc.r;
    const float s = bc.lora.scale();
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasTrans, int(d), int(d), 1.0f, bc.W.data(), int(d), bc.dY.data(), 1, 0.0f,
                    dX.data(), 1);
    else
        gemm_xn(false, n, d, d, 1.0f, bc.dY.data(), bc.W.data(), 0.0f, dX.data());
    gemm_nt(n, r, d, 1.0f, bc.X.data(), bc.lora.A().data(), 0.0f, T.data());
    gemm_xn(false, n, r, d, 1.0f, bc.dY.data(), bc.lora.B().data(), 0.0f, G.data());
    gemm_xn(true, d, r, n, s, bc.dY.data(), T.data(), 0.0f, grad.B.data());
    gemm_xn(true, r, d, n, s, G.data(), bc.X.data(), 0.0f, grad.A.data());
    gemm_xn(false, n, d, r, s, G.data(), bc.lora.A().data(), 1.0f, dX.data());
}

void BM_layer_backward_openblas(benchmark::State& state) {
    const BackwardCase bc(state);
    Matrix<float> T(bc.n, bc.r), G(bc.n, bc.r);
    openblas_set_num_threads(1);
    static std::set<std::tuple<Index, Index, Index>> checked;
    if (checked.insert({bc.n, bc.d, bc.r}).second) {  // once per shape, against Eigen's formulas
        lowrank::LoraGrad<float> grad(bc.lora);
        Matrix<float> dX(bc.n, bc.d);
        openblas_layer_backward(bc, T, G, grad, dX);
        const float s = bc.lora.scale();
        const Matrix<float> g = bc.dY * bc.lora.B();
        const Matrix<float> dx = bc.dY * bc.W + s * g * bc.lora.A();
        const Matrix<float> da = s * g.transpose() * bc.X;
        const Matrix<float> db = s * bc.dY.transpose() * (bc.X * bc.lora.A().transpose());
        if ((dX - dx).norm() > 1e-3f * dx.norm() || (grad.A - da).norm() > 1e-3f * da.norm() ||
            (grad.B - db).norm() > 1e-3f * db.norm()) {
            state.SkipWithError("OpenBLAS backward disagrees with the Eigen expressions");
            return;
        }
    }
    run_layer_backward(state, bc, [&](lowrank::LoraGrad<float>& grad, Matrix<float>& dX) {
        openblas_layer_backward(bc, T, G, grad, dX);
    });
}
#endif

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

void layer_backward_grid(benchmark::internal::Benchmark* b) {
    b->ArgNames({"n", "d", "r"});
    for (int d : {1024, 4096})
        for (int n : {1, 16, 32, 128}) b->Args({n, d, 16});
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
BENCHMARK(BM_layer_backward_lowrank)->Apply(layer_backward_grid);
BENCHMARK(BM_layer_backward_eigen)->Apply(layer_backward_grid);
#ifdef LOWRANK_BENCH_OPENBLAS
BENCHMARK(BM_layer_backward_openblas)->Apply(layer_backward_grid);
BENCHMARK(BM_forward_openblas)->Apply(forward_grid);
BENCHMARK(BM_merge_openblas)->Apply(merge_grid);
BENCHMARK(BM_forward_threads_openblas)->Apply(openblas_threads_grid);
BENCHMARK(BM_forward_f64_openblas)->Apply(f64_grid);
BENCHMARK(BM_forward_huge_openblas)->Apply(packed_grid);
#endif
