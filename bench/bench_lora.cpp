// SPDX-License-Identifier: Apache-2.0
// LoRA forward, adapter part (add_delta), backward and merge, each beside the plain Eigen
// expression users write today, on the same data in the same binary. Counters: GFLOP/s and the
// bytes the operation must move at least (GB/s).
//
// Shapes (foundation issue): n ∈ {1, 16, 128}, in = out ∈ {1024, 4096}, r ∈ {8, 16, 64}. Beside
// them, BM_odd_rank_add_delta_*: one and two rows at ranks that are not a whole number of SIMD
// vectors (4, 12, 20, 24, 40), whose expand ends in a partial vector of the rank.

#include <lowrank/lora.hpp>

#include <benchmark/benchmark.h>

namespace {

using lowrank::Index;
using lowrank::Matrix;

struct Problem {
    Index n, d, r;
    Matrix<float> X, W, Y, dY, dX;
    lowrank::Lora<float> lora;
    Problem(Index n_, Index d_, Index r_)
        : n(n_), d(d_), r(r_), X(Matrix<float>::Random(n_, d_)), W(Matrix<float>::Random(d_, d_)),
          Y(Matrix<float>::Random(n_, d_)), dY(Matrix<float>::Random(n_, d_)), dX(n_, d_),
          lora(d_, d_, {.rank = r_, .alpha = 16, .seed = 1}) {
        lora.B().setRandom();
    }
};

void shape_args(benchmark::internal::Benchmark* b) {
    for (int d : {1024, 4096})
        for (int r : {8, 16, 64})
            for (int n : {1, 16, 128}) b->Args({n, d, r});
}

/// Rates of flops and bytes per call; of the bytes, `write_bytes` are written without being read
/// (fresh outputs) and `rmw_bytes` read and written in place (counted twice), as plain values, so
/// that bench/run.py can also charge each class at the probe's bandwidth for it.
void set_counters(benchmark::State& state, double flops, double bytes, double write_bytes = 0,
                  double rmw_bytes = 0) {
    state.counters["GFLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate,
                                                   benchmark::Counter::kIs1000);
    state.counters["GB/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate,
                                                benchmark::Counter::kIs1000);
    state.counters["write_bytes"] = write_bytes;
    state.counters["rmw_bytes"] = rmw_bytes;
}

/// Adapter part: flops 2·n·r·(in + out); bytes: A and B once, X once, Y read and written.
void adapter_counters(benchmark::State& state, const Problem& p) {
    set_counters(state, 2.0 * p.n * p.r * (2.0 * p.d), 4.0 * (2.0 * p.r * p.d + p.n * p.d + 2.0 * p.n * p.d),
                 0.0, 4.0 * 2.0 * p.n * p.d);
}

void BM_add_delta_lowrank(benchmark::State& state) {
    Problem p(state.range(0), state.range(1), state.range(2));
    lowrank::Workspace<float> ws;
    for (auto _ : state) {
        lowrank::add_delta(p.X, p.lora, p.Y, ws);
        benchmark::DoNotOptimize(p.Y.data());
        benchmark::ClobberMemory();
    }
    adapter_counters(state, p);
}

void BM_add_delta_eigen(benchmark::State& state) {
    Problem p(state.range(0), state.range(1), state.range(2));
    const float s = p.lora.scale();
    const auto& A = p.lora.A();
    const auto& B = p.lora.B();
    for (auto _ : state) {
        p.Y.noalias() += s * (p.X * A.transpose()) * B.transpose();
        benchmark::DoNotOptimize(p.Y.data());
        benchmark::ClobberMemory();
    }
    adapter_counters(state, p);
}

/// Forward: flops 2·n·d² + adapter; bytes: W once plus the adapter's traffic.
void forward_counters(benchmark::State& state, const Problem& p) {
    set_counters(state, 2.0 * p.n * p.d * p.d + 4.0 * p.n * p.r * p.d,
                 4.0 * (double(p.d) * p.d + 2.0 * p.r * p.d + 2.0 * p.n * p.d), 4.0 * p.n * p.d);  // Y written
}

void BM_forward_lowrank(benchmark::State& state) {
    Problem p(state.range(0), state.range(1), state.range(2));
    lowrank::Workspace<float> ws;
    for (auto _ : state) {
        lowrank::forward(p.X, p.W, p.lora, p.Y, ws);
        benchmark::DoNotOptimize(p.Y.data());
        benchmark::ClobberMemory();
    }
    forward_counters(state, p);
}

void BM_forward_eigen(benchmark::State& state) {
    Problem p(state.range(0), state.range(1), state.range(2));
    const float s = p.lora.scale();
    const auto& A = p.lora.A();
    const auto& B = p.lora.B();
    for (auto _ : state) {
        p.Y.noalias() = p.X * p.W.transpose();
        p.Y.noalias() += s * (p.X * A.transpose()) * B.transpose();
        benchmark::DoNotOptimize(p.Y.data());
        benchmark::ClobberMemory();
    }
    forward_counters(state, p);
}

/// Backward of the adapter part (dA, dB, and s·G·A into dX, all three written, not read): flops
/// 2·n·r·(3 in + 2 out), the five products T = X Aᵀ, G = dY B, dB = s dYᵀ T, dA = s Gᵀ X, dX =
/// s G A. T is not an input of the call, so both implementations form it (it is the cheapest way
/// to dB: s (dYᵀ X) Aᵀ would cost 2·out·in·n).
void backward_counters(benchmark::State& state, const Problem& p) {
    set_counters(state, 2.0 * p.n * p.r * 5.0 * p.d, 4.0 * (4.0 * p.r * p.d + 3.0 * p.n * p.d),
                 4.0 * (2.0 * p.r * p.d + p.n * p.d));  // dA, dB and dX written
}

void BM_backward_delta_lowrank(benchmark::State& state) {
    Problem p(state.range(0), state.range(1), state.range(2));
    lowrank::LoraGrad<float> grad(p.lora);
    lowrank::Workspace<float> ws;
    for (auto _ : state) {
        lowrank::backward_delta(p.X, p.lora, p.dY, grad, p.dX, ws);
        benchmark::DoNotOptimize(grad.A.data());
        benchmark::ClobberMemory();
    }
    backward_counters(state, p);
}

void BM_backward_delta_eigen(benchmark::State& state) {
    Problem p(state.range(0), state.range(1), state.range(2));
    lowrank::LoraGrad<float> grad(p.lora);
    const float s = p.lora.scale();
    const auto& A = p.lora.A();
    const auto& B = p.lora.B();
    Matrix<float> T(p.n, p.r), G(p.n, p.r);
    for (auto _ : state) {
        T.noalias() = p.X * A.transpose();
        G.noalias() = p.dY * B;
        grad.B.noalias() = s * p.dY.transpose() * T;
        grad.A.noalias() = s * G.transpose() * p.X;
        p.dX.noalias() = s * G * A;
        benchmark::DoNotOptimize(grad.A.data());
        benchmark::ClobberMemory();
    }
    backward_counters(state, p);
}

/// Merge W += s B A: flops 2·r·d²; bytes: W read and written.
void BM_merge_lowrank(benchmark::State& state) {
    Problem p(1, state.range(1), state.range(2));
    for (auto _ : state) {
        lowrank::merge(p.W, p.lora);
        benchmark::DoNotOptimize(p.W.data());
        benchmark::ClobberMemory();
    }
    set_counters(state, 2.0 * p.r * p.d * p.d, 8.0 * p.d * p.d, 0.0, 8.0 * p.d * p.d);
}

void BM_merge_eigen(benchmark::State& state) {
    Problem p(1, state.range(1), state.range(2));
    const float s = p.lora.scale();
    for (auto _ : state) {
        p.W.noalias() += s * p.lora.B() * p.lora.A();
        benchmark::DoNotOptimize(p.W.data());
        benchmark::ClobberMemory();
    }
    set_counters(state, 2.0 * p.r * p.d * p.d, 8.0 * p.d * p.d, 0.0, 8.0 * p.d * p.d);
}

void odd_rank_args(benchmark::internal::Benchmark* b) {
    for (int r : {4, 12, 20, 24, 40})
        for (int n : {1, 2}) b->Args({n, 4096, r});
}

void merge_args(benchmark::internal::Benchmark* b) {
    for (int d : {1024, 4096})
        for (int r : {8, 16, 64}) b->Args({1, d, r});
}

}  // namespace

BENCHMARK(BM_add_delta_lowrank)->Apply(shape_args);
BENCHMARK(BM_add_delta_eigen)->Apply(shape_args);
BENCHMARK(BM_forward_lowrank)->Apply(shape_args);
BENCHMARK(BM_forward_eigen)->Apply(shape_args);
BENCHMARK(BM_backward_delta_lowrank)->Apply(shape_args);
BENCHMARK(BM_backward_delta_eigen)->Apply(shape_args);
BENCHMARK(BM_merge_lowrank)->Apply(merge_args);
BENCHMARK(BM_merge_eigen)->Apply(merge_args);
BENCHMARK(BM_add_delta_lowrank)->Name("BM_odd_rank_add_delta_lowrank")->Apply(odd_rank_args);
BENCHMARK(BM_add_delta_eigen)->Name("BM_odd_rank_add_delta_eigen")->Apply(odd_rank_args);
