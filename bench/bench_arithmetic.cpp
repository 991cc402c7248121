// SPDX-License-Identifier: Apache-2.0
// Re-compressing a weighted sum of adapters to rank k: lowrank::compress (Gram matrices of the
// stacked factors in double, Cholesky, SVD of the Σr × Σr core; never forms out × in) vs the
// dense route PEFT takes (form Σ w_i s_i B_i A_i as an out × in matrix, full SVD with Eigen's
// BDCSVD, truncate), and vs compress's own Householder fallback (QRs of the stacks in double, the
// route rank-deficient or very ill-conditioned stacks take), forced through the detail entry point.
// 4 adapters of r = 16 → k = 16, float, N × N weights (N = 1024, 4096). The dense route at 4096²
// takes many seconds and runs once (Iterations(1)). For reference, the same comparison in
// PyTorch (single thread) was measured at about 6.9 s dense and 6 ms factor-space.
// Counter `rel_diff` of the factor routes: ‖ΔW_k(compress) − ΔW_k(dense)‖_F / ‖ΔW_k(dense)‖_F,
// computed in factor space after the timed loop (the dense route is float: its own rounding,
// ~1e-6, dominates).

#include <lowrank/arithmetic.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <benchmark/benchmark.h>

#include <map>
#include <vector>

namespace {

using lowrank::Index;
using lowrank::Lora;
using Mat = lowrank::Matrix<float>;
constexpr Index n_adapters = 4, rank = 16, k = 16;
constexpr float weights[n_adapters] = {0.4f, -0.3f, 0.2f, 0.1f};

const std::vector<Lora<float>>& adapters(Index n) {
    static std::map<Index, std::vector<Lora<float>>> cache;
    auto it = cache.find(n);
    if (it != cache.end()) return it->second;
    std::vector<Lora<float>> list;
    for (Index i = 0; i < n_adapters; ++i) {
        Lora<float> a(n, n, {.rank = rank, .alpha = 32, .rslora = i % 2 == 1, .seed = std::uint64_t(10 + i)});
        lowrank::Random rng(100 + std::uint64_t(i));
        for (Index p = 0; p < n; ++p)
            for (Index q = 0; q < rank; ++q) a.B()(p, q) = float(rng.uniform(-0.05, 0.05));
        list.push_back(std::move(a));
    }
    return cache.emplace(n, std::move(list)).first->second;
}

std::vector<lowrank::WeightedTerm<Lora<float>>> terms(Index n) {
    const auto& list = adapters(n);
    std::vector<lowrank::WeightedTerm<Lora<float>>> t;
    for (Index i = 0; i < n_adapters; ++i) t.push_back(weights[i] * list[std::size_t(i)]);
    return t;
}

/// The dense route: ΔW = Σ w_i s_i B_i A_i (out × in), BDCSVD, truncation. Returns (U_k, S_k, V_k).
struct Dense {
    Eigen::MatrixXf U, V;
    Eigen::VectorXf S;
};
Dense dense_route(Index n) {
    const auto& list = adapters(n);
    Mat delta = Mat::Zero(n, n);
    for (Index i = 0; i < n_adapters; ++i) {
        const auto& a = list[std::size_t(i)];
        delta.noalias() += (weights[i] * a.scale()) * a.B() * a.A();
    }
    Eigen::BDCSVD<Eigen::MatrixXf> svd(delta, Eigen::ComputeThinU | Eigen::ComputeThinV);
    return {svd.matrixU().leftCols(k), svd.matrixV().leftCols(k), svd.singularValues().head(k)};
}

const Dense& dense_result(Index n) {
    static std::map<Index, Dense> cache;
    auto it = cache.find(n);
    if (it == cache.end()) it = cache.emplace(n, dense_route(n)).first;
    return it->second;
}

/// ‖B A − U S Vᵀ‖_F / ‖S‖ = ‖[B, −U S] [Aᵀ, V]ᵀ‖_F / ‖S‖ = ‖R_L R_Rᵀ‖_F / ‖S‖ with R_L, R_R from
/// thin QRs (the result's scale is 1), in double, never forming N × N.
double rel_diff(const Lora<float>& result, const Dense& d) {
    const Index n = result.out_features();
    Eigen::MatrixXd L(n, 2 * k), R(n, 2 * k);
    L << result.B().cast<double>(), -(d.U.cast<double>() * d.S.cast<double>().asDiagonal());
    R << result.A().transpose().cast<double>(), d.V.cast<double>();
    const Eigen::HouseholderQR<Eigen::MatrixXd> ql(L), qr(R);
    const Eigen::MatrixXd rl = ql.matrixQR().topRows(2 * k).triangularView<Eigen::Upper>();
    const Eigen::MatrixXd rr = qr.matrixQR().topRows(2 * k).triangularView<Eigen::Upper>();
    return (rl * rr.transpose()).norm() / d.S.cast<double>().norm();
}

void BM_compress_factor_space(benchmark::State& state) {
    const Index n = state.range(0);
    const auto t = terms(n);
    const std::span<const lowrank::WeightedTerm<Lora<float>>> span(t);
    Lora<float> result(n, n, {.rank = k});
    for (auto _ : state) {
        result = lowrank::compress<float>(span, k);
        benchmark::DoNotOptimize(result.A().data());
    }
    lowrank::detail::CompressInfo info;
    (void)lowrank::detail::compress_terms<float>("bench", span, k, {}, lowrank::detail::CompressRoute::automatic, &info);
    state.counters["gram_route"] = info.route == lowrank::detail::CompressRoute::gram ? 1 : 0;
    state.counters["rel_diff"] = rel_diff(result, dense_result(n));
    // Flops of the Gram route with one pass per side (float, well-conditioned): the two Gram
    // matrices (n m (m + 1) each, one triangle) and the two products with the m × k coefficients.
    const double m = double(n_adapters * rank), nd = double(n);
    state.counters["GFLOP/s"] = benchmark::Counter(2 * nd * m * (m + 1) + 2 * (2 * nd * m * double(k)),
                                                   benchmark::Counter::kIsIterationInvariantRate,
                                                   benchmark::Counter::kIs1000);
}

void BM_compress_householder_route(benchmark::State& state) {
    const Index n = state.range(0);
    const auto t = terms(n);
    const std::span<const lowrank::WeightedTerm<Lora<float>>> span(t);
    Lora<float> result(n, n, {.rank = k});
    for (auto _ : state) {
        result = lowrank::detail::compress_terms<float>("bench", span, k, {},
                                                        lowrank::detail::CompressRoute::householder);
        benchmark::DoNotOptimize(result.A().data());
    }
    state.counters["rel_diff"] = rel_diff(result, dense_result(n));
    // Householder QRs of both stacks (2 m² (n − m/3) each) and the applications of Q to k columns.
    const double m = double(n_adapters * rank), nd = double(n);
    state.counters["GFLOP/s"] = benchmark::Counter(
        2 * (2 * m * m * (nd - m / 3)) + 2 * (4 * nd * m * double(k)),
        benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_compress_dense_route(benchmark::State& state) {
    const Index n = state.range(0);
    for (auto _ : state) {
        Dense d = dense_route(n);
        benchmark::DoNotOptimize(d.S.data());
    }
    state.counters["rel_diff"] = 0;
}

void BM_concat(benchmark::State& state) {
    const Index n = state.range(0);
    const auto t = terms(n);
    const std::span<const lowrank::WeightedTerm<Lora<float>>> span(t);
    for (auto _ : state) {
        Lora<float> cat = lowrank::concat<float>(span);
        benchmark::DoNotOptimize(cat.A().data());
    }
}

}  // namespace

BENCHMARK(BM_compress_factor_space)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_compress_householder_route)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_compress_dense_route)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_concat)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
