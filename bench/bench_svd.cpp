// SPDX-License-Identifier: Apache-2.0
// Exact (Eigen BDCSVD, the obvious implementation) vs randomised truncated SVD (HMT) of an N × N
// float matrix to rank r = 16, N = 1024 and 4096. Beside the time, counters report the accuracy
// of the randomised rank-r approximation M̃_r against the exact M_r (computed once per size by the
// exact benchmark and cached):
//   rel_err       ‖M̃_r − M_r‖_F / ‖M_r‖_F
//   excess        ‖M − M̃_r‖_F / ‖M − M_r‖_F − 1   (0 = Eckart–Young optimal)
//   sigma_r_err   |σ̃_r − σ_r| / σ_r
// The test matrix has a power-law spectrum σ_k = 1/(1 + k) over N/4 components (slow decay, like
// pretrained weights), M = P diag(σ) Qᵀ with Gaussian P, Q scaled by 1/√N.
// The exact 4096² SVD takes tens of seconds: it runs once (Iterations(1)).

#include <lowrank/linalg/svd.hpp>

#include <Eigen/QR>

#include <benchmark/benchmark.h>

#include <map>

namespace {

using lowrank::Index;
using Mat = lowrank::Matrix<float>;
constexpr Index rank = 16;

const Mat& test_matrix(Index n) {
    static std::map<Index, Mat> cache;
    auto it = cache.find(n);
    if (it != cache.end()) return it->second;
    const Index k = n / 4;
    lowrank::Random rng(1234);
    Mat P(n, k), Q(n, k);
    const double scale = 1.0 / std::sqrt(double(n));
    for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < k; ++j) P(i, j) = float(scale * rng.normal());
    for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < k; ++j) Q(i, j) = float(scale * rng.normal());
    Eigen::VectorXf sigma(k);
    for (Index j = 0; j < k; ++j) sigma(j) = float(1.0 / (1.0 + double(j)));
    Mat M = P * sigma.asDiagonal() * Q.transpose();
    return cache.emplace(n, std::move(M)).first->second;
}

const lowrank::linalg::TruncatedSVD<float>& exact_result(Index n) {
    static std::map<Index, lowrank::linalg::TruncatedSVD<float>> cache;
    auto it = cache.find(n);
    if (it == cache.end()) it = cache.emplace(n, lowrank::linalg::truncated_svd(test_matrix(n), rank)).first;
    return it->second;
}

/// The accuracy counters of `got` against the exact truncation (in double, O(n² r)).
void accuracy(benchmark::State& state, const lowrank::linalg::TruncatedSVD<float>& got, Index n) {
    const auto& ex = exact_result(n);
    const Eigen::MatrixXd M = test_matrix(n).cast<double>();
    const Eigen::MatrixXd U = got.U.cast<double>(), V = got.V.cast<double>();
    const Eigen::MatrixXd Ue = ex.U.cast<double>(), Ve = ex.V.cast<double>();
    const Eigen::VectorXd S = got.S.cast<double>(), Se = ex.S.cast<double>();
    // ‖U S Vᵀ − Ue Se Veᵀ‖_F = ‖[U S, −Ue Se] [V, Ve]ᵀ‖_F = ‖R_L R_Rᵀ‖_F (thin QRs).
    Eigen::MatrixXd L(n, 2 * rank), R(n, 2 * rank);
    L << U * S.asDiagonal(), -(Ue * Se.asDiagonal());
    R << V, Ve;
    const Eigen::HouseholderQR<Eigen::MatrixXd> ql(L), qr(R);
    const Eigen::MatrixXd rl = ql.matrixQR().topRows(2 * rank).triangularView<Eigen::Upper>();
    const Eigen::MatrixXd rr = qr.matrixQR().topRows(2 * rank).triangularView<Eigen::Upper>();
    const double m2 = M.squaredNorm();
    const double res2 = m2 - 2 * (S.asDiagonal() * (U.transpose() * (M * V))).trace() + S.squaredNorm();
    const double opt2 = m2 - Se.squaredNorm();
    state.counters["rel_err"] = (rl * rr.transpose()).norm() / Se.norm();
    state.counters["excess"] = std::sqrt(std::max(res2, 0.0) / opt2) - 1;
    state.counters["sigma_r_err"] = std::abs(S(rank - 1) - Se(rank - 1)) / Se(rank - 1);
}

void BM_svd_exact(benchmark::State& state) {
    const Index n = state.range(0);
    const Mat& M = test_matrix(n);
    lowrank::linalg::TruncatedSVD<float> res;
    for (auto _ : state) {
        res = lowrank::linalg::truncated_svd(M, rank);
        benchmark::DoNotOptimize(res.S.data());
    }
    state.counters["rel_err"] = 0;
    state.counters["excess"] = 0;
    state.counters["sigma_r_err"] = 0;
}

void BM_svd_randomized(benchmark::State& state) {
    const Index n = state.range(0), q = state.range(1);
    const Mat& M = test_matrix(n);
    const lowrank::linalg::SVDOptions opts{.oversampling = 10, .power_iterations = q, .seed = 7};
    lowrank::linalg::TruncatedSVD<float> res;
    for (auto _ : state) {
        res = lowrank::linalg::randomized_svd(M, rank, opts);
        benchmark::DoNotOptimize(res.S.data());
    }
    const double l = double(rank + 10);
    state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(2 * q + 2) * double(n) * double(n) * l,
                                                   benchmark::Counter::kIsIterationInvariantRate,
                                                   benchmark::Counter::kIs1000);
    accuracy(state, res, n);
}

}  // namespace

BENCHMARK(BM_svd_exact)->Arg(1024)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_svd_exact)->Arg(4096)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_svd_randomized)
    ->ArgsProduct({{1024, 4096}, {0, 2, 4, 10}})
    ->ArgNames({"n", "q"})
    ->Unit(benchmark::kMillisecond);
