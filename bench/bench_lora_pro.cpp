// SPDX-License-Identifier: Apache-2.0
// LoRA-Pro full-mode step: the streaming pass (one read and one write of the out × in moments m
// and v; E and U never formed) against the straightforward dense implementation with Eigen
// (E, m, v, U as full matrices, GEMMs for E, Bᵀ U and U Aᵀ). Also the whole optimiser step (the
// pass plus the thin r × r correction before and after it).
//
// Counters: bytes/s counts the state traffic only — m and v read and written once, 4·out·in·sizeof(T)
// per step — for both implementations (the dense one moves more: E and U too); FLOP/s counts the
// 8r flops per element of W (E from the rank-2r factors, then Bᵀ U and U Aᵀ).

#include <benchmark/benchmark.h>

#include <lowrank/lora_pro.hpp>

#include <lowrank/core/random.hpp>

namespace {

using namespace lowrank;

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed) {
    Random rng(seed);
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = T(rng.uniform(-1.0, 1.0));
    return m;
}

constexpr Index kOut = 4096, kIn = 4096;

template <class T>
struct Problem {
    Index out, in, r;
    Matrix<T> left, right, B, A, m, v, btu, uat;
    pro::detail::AdamCoefficients<T> c;
    Problem(Index out_, Index in_, Index r_) : out(out_), in(in_), r(r_) {
        left = random_matrix<T>(out, 2 * r, 1);
        right = random_matrix<T>(2 * r, in, 2);
        B = random_matrix<T>(out, r, 3);
        A = random_matrix<T>(r, in, 4);
        m = Matrix<T>::Zero(out, in);
        v = Matrix<T>::Zero(out, in);
        btu.resize(r, in);
        uat.resize(out, r);
        c = pro::detail::adam_coefficients<T>(pro::AdamWOptions{}, 10);
    }
};

template <class T>
void set_counters(benchmark::State& state, Index out, Index in, Index r) {
    const double elems = double(out) * double(in);
    state.counters["bytes/s"] = benchmark::Counter(4 * elems * double(sizeof(T)),
                                                   benchmark::Counter::kIsIterationInvariantRate,
                                                   benchmark::Counter::kIs1024);
    state.counters["FLOP/s"] = benchmark::Counter(8 * double(r) * elems,
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

/// The library's streaming pass (what AdamW<T> full mode runs each step).
template <class T>
void BM_full_pass_streaming(benchmark::State& state) {
    const Index r = state.range(0);
    Problem<T> p(kOut, kIn, r);
    std::vector<T> scratch;
    for (auto _ : state) {
        pro::detail::full_pass<T>(view_mut(p.m), view_mut(p.v), view(p.left), view(p.right),
                                  view(p.B), view(p.A), p.c, view_mut(p.btu), view_mut(p.uat),
                                  scratch);
        benchmark::DoNotOptimize(p.btu.data());
        benchmark::DoNotOptimize(p.uat.data());
        benchmark::ClobberMemory();
    }
    set_counters<T>(state, p.out, p.in, r);
}

/// The baseline: the same step written the obvious way with Eigen (E and U materialised).
template <class T>
void BM_full_pass_dense_eigen(benchmark::State& state) {
    const Index r = state.range(0);
    Problem<T> p(kOut, kIn, r);
    Matrix<T> E(p.out, p.in), U(p.out, p.in);
    const auto& c = p.c;
    for (auto _ : state) {
        E.noalias() = p.left * p.right;
        p.m = c.beta1 * p.m + c.one_minus_beta1 * E;
        p.v = c.beta2 * p.v + c.one_minus_beta2 * E.cwiseProduct(E);
        U.array() = (p.m.array() * c.inv_bc1) / (p.v.array().sqrt() * c.inv_sqrt_bc2 + c.eps);
        p.btu.noalias() = p.B.transpose() * U;
        p.uat.noalias() = U * p.A.transpose();
        benchmark::DoNotOptimize(p.btu.data());
        benchmark::DoNotOptimize(p.uat.data());
        benchmark::ClobberMemory();
    }
    set_counters<T>(state, p.out, p.in, r);
}

/// The whole full-mode optimiser step: equivalent gradient, pass, correction, update.
template <class T>
void BM_adamw_full_step(benchmark::State& state) {
    const Index r = state.range(0);
    Lora<T> lora(kOut, kIn, {.rank = r, .alpha = double(2 * r), .seed = 5});
    lora.B() = random_matrix<T>(kOut, r, 6);
    const Matrix<T> gA = random_matrix<T>(r, kIn, 7), gB = random_matrix<T>(kOut, r, 8);
    pro::AdamW<T> opt(lora, {.lr = 1e-6, .mode = pro::Mode::full});
    for (auto _ : state) {
        opt.step(lora, gA, gB);
        benchmark::ClobberMemory();
    }
    set_counters<T>(state, kOut, kIn, r);
}

/// Efficient mode for comparison: correction + AdamW on the r × (in + out) factors only.
template <class T>
void BM_adamw_efficient_step(benchmark::State& state) {
    const Index r = state.range(0);
    Lora<T> lora(kOut, kIn, {.rank = r, .alpha = double(2 * r), .seed = 5});
    lora.B() = random_matrix<T>(kOut, r, 6);
    const Matrix<T> gA = random_matrix<T>(r, kIn, 7), gB = random_matrix<T>(kOut, r, 8);
    pro::AdamW<T> opt(lora, {.lr = 1e-6, .mode = pro::Mode::efficient});
    for (auto _ : state) {
        opt.step(lora, gA, gB);
        benchmark::ClobberMemory();
    }
}

}  // namespace

BENCHMARK(BM_full_pass_streaming<float>)->Arg(16)->Arg(4)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_full_pass_dense_eigen<float>)->Arg(16)->Arg(4)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_full_pass_streaming<double>)->Arg(16)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_full_pass_dense_eigen<double>)->Arg(16)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_adamw_full_step<float>)->Arg(16)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_adamw_efficient_step<float>)->Arg(16)->Unit(benchmark::kMillisecond);
