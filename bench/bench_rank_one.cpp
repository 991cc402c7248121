// SPDX-License-Identifier: Apache-2.0
// Perfusion's gated rank-one edits in a Stable-Diffusion-like cross-attention projection:
// n = 77 text tokens, in = 768 (CLIP-L), out ∈ {320, 640, 1280}, K ∈ {1, 2, 3, 4} concepts.
//
// - BM_base_eigen: the plain base product H = E Wᵀ (Eigen), the baseline.
// - BM_edit_lowrank: linear(E, W + edits) (base product + one term of width 2K through the core).
//   Manual timing with the thread's CPU clock (the machine may be shared): each iteration times
//   the base product and the edited forward back to back on the same data; the counter `ratio` =
//   Σ t(edited) / Σ t(base) is the overhead ratio (1 + edit cost / base cost), `extra_us` the
//   edit's time per call beyond the base product, `edit_GFLOP/s` its 4·n·K·(in + out) flops
//   over that time (noisy: a difference of two timings).
// - BM_edit_eigen_dense: the obvious Eigen implementation of the same math with the precomputed
//   factors (H = (E − (E Pᵀ) M) Wᵀ + σ(E Aᵀ) Oᵀ): it forms e⊥ (n × in) and runs the base
//   product on it.

#include <lowrank/expr/expr.hpp>
#include <lowrank/rank_one.hpp>

#include <benchmark/benchmark.h>

#include <ctime>
#include <memory>
#include <vector>

namespace {

using lowrank::Index;
using lowrank::Matrix;

constexpr Index n_tokens = 77, in_features = 768;

struct Problem {
    Index out, K;
    Matrix<float> E, W, H;
    lowrank::SecondMoment<float> C{in_features};
    std::vector<lowrank::KeyLockedEdit<float>> concepts;
    std::unique_ptr<lowrank::KeyLockedEditSet<float>> set;

    Problem(Index out_, Index K_)
        : out(out_), K(K_), E(Matrix<float>::Random(n_tokens, in_features)),
          W(Matrix<float>::Random(out_, in_features)), H(n_tokens, out_) {
        C.add(Matrix<float>::Random(4 * in_features, in_features));
        for (Index c = 0; c < K; ++c) {
            const Matrix<float> i_super = Matrix<float>::Random(1, in_features);
            concepts.push_back(lowrank::KeyLockedEdit<float>::value(W, C, i_super));
        }
        std::vector<const lowrank::KeyLockedEdit<float>*> ptrs;
        for (const auto& c : concepts) ptrs.push_back(&c);
        set = std::make_unique<lowrank::KeyLockedEditSet<float>>(W, C, ptrs);
        // Make some tokens the concept's own encoding so the gate is not trivially closed.
        for (Index c = 0; c < K; ++c)
            E.row(c) = concepts[std::size_t(c)].target_input().transpose().cast<float>();
    }
};

void shape_args(benchmark::internal::Benchmark* b) {
    for (int out : {320, 640, 1280})
        for (int K : {1, 2, 3, 4}) b->Args({out, K});
}

/// CPU time of the calling thread, in seconds: on a shared machine it is not inflated by the
/// time the thread waits for a core (wall time is).
double thread_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

void BM_base_eigen(benchmark::State& state) {
    Problem p(state.range(0), 1);
    for (auto _ : state) {
        p.H.noalias() = p.E * p.W.transpose();
        benchmark::DoNotOptimize(p.H.data());
        benchmark::ClobberMemory();
    }
    state.counters["GFLOP/s"] = benchmark::Counter(2.0 * n_tokens * in_features * double(p.out),
                                                   benchmark::Counter::kIsIterationInvariantRate,
                                                   benchmark::Counter::kIs1000);
}

template <class Edit>
void run_edit(benchmark::State& state, Problem& p, const Edit& edit) {
    lowrank::Workspace<float> ws;
    Matrix<float> Hbase(n_tokens, p.out);
    double t_base = 0, t_edit = 0;
    for (auto _ : state) {
        double t0 = thread_seconds();
        Hbase.noalias() = p.E * p.W.transpose();
        benchmark::DoNotOptimize(Hbase.data());
        benchmark::ClobberMemory();
        const double t1 = thread_seconds();
        p.H = lowrank::linear(p.E, p.W + edit, ws);
        benchmark::DoNotOptimize(p.H.data());
        benchmark::ClobberMemory();
        const double t = thread_seconds() - t1;
        t_base += t1 - t0;
        t_edit += t;
        state.SetIterationTime(t);
    }
    const double iters = double(state.iterations());
    state.counters["ratio"] = t_base > 0 ? t_edit / t_base : 0.0;
    // Time of the edit beyond the base product, and its 4·n·K·(in + out) flops at that time.
    const double extra = iters > 0 ? (t_edit - t_base) / iters : 0.0;
    state.counters["extra_us"] = 1e6 * extra;
    state.counters["edit_GFLOP/s"] =
        extra > 0 ? 1e-9 * 4.0 * n_tokens * double(p.K) * double(in_features + p.out) / extra : 0.0;
}

void BM_edit_lowrank(benchmark::State& state) {
    Problem p(state.range(0), state.range(1));
    if (p.K == 1)
        run_edit(state, p, p.concepts[0]);
    else
        run_edit(state, p, *p.set);
}

void BM_edit_eigen_dense(benchmark::State& state) {
    Problem p(state.range(0), state.range(1));
    const Index K = p.K;
    // The same precomputed factors the library uses (P, A: K × in; M = targets: K × in; O: K × out).
    const Matrix<float> V = lowrank::eigen_map(p.set->shrink_factor());  // [P ; A], 2K × in
    const Matrix<float> P = V.topRows(K), A = V.bottomRows(K);
    Matrix<float> M(K, in_features), O(K, p.out);
    for (Index c = 0; c < K; ++c) {
        M.row(c) = p.set->target_input(c).transpose().cast<float>();
        O.row(c) = p.set->target_output(c).transpose().cast<float>();
    }
    Eigen::Array<float, 1, Eigen::Dynamic> beta(K), tau(K);
    for (Index c = 0; c < K; ++c) {
        beta(c) = float(p.set->gate(c).beta);
        tau(c) = float(p.set->gate(c).tau);
    }
    Matrix<float> Eperp(n_tokens, in_features), S(n_tokens, K);
    for (auto _ : state) {
        Eperp.noalias() = p.E - (p.E * P.transpose()) * M;
        p.H.noalias() = Eperp * p.W.transpose();
        S.noalias() = p.E * A.transpose();
        S = (1.0f / (1.0f + (-((S.array().rowwise() - beta).rowwise() / tau)).exp())).matrix();
        p.H.noalias() += S * O;
        benchmark::DoNotOptimize(p.H.data());
        benchmark::ClobberMemory();
    }
}

}  // namespace

BENCHMARK(BM_base_eigen)->Apply([](benchmark::internal::Benchmark* b) {
    for (int out : {320, 640, 1280}) b->Args({out});
});
BENCHMARK(BM_edit_lowrank)->Apply(shape_args)->UseManualTime();
BENCHMARK(BM_edit_eigen_dense)->Apply(shape_args);
