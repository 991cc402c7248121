// SPDX-License-Identifier: Apache-2.0
// Truncated SVDs (exact and randomised) against matrices built with a known spectrum
// M = Q₁ diag(σ) Q₂ᵀ (Q₁, Q₂ orthonormal from QR of seeded Gaussians, in double): singular values,
// orthonormality, projectors, reconstruction, Eckart–Young optimality, the sign rule, and errors.

#include <lowrank/linalg/svd.hpp>

#include <Eigen/QR>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::random_matrix;
using lowrank::test::to_double;

namespace {

/// M = Q₁ diag(σ) Q₂ᵀ with known singular vectors, in double.
struct KnownSpectrum {
    Matrix<double> M, Q1, Q2;  // Q1: out × p, Q2: in × p, p = σ.size()
    Eigen::VectorXd sigma;
};

Matrix<double> orthonormal_columns(Index rows, Index cols, std::uint64_t seed) {
    Random rng(seed);
    Eigen::MatrixXd g(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) g(i, j) = rng.normal();
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
    return qr.householderQ() * Eigen::MatrixXd::Identity(rows, cols);
}

KnownSpectrum known_spectrum(Index out, Index in, const Eigen::VectorXd& sigma, std::uint64_t seed) {
    KnownSpectrum k;
    const Index p = sigma.size();
    k.sigma = sigma;
    k.Q1 = orthonormal_columns(out, p, seed);
    k.Q2 = orthonormal_columns(in, p, seed + 1);
    k.M = k.Q1 * sigma.asDiagonal() * k.Q2.transpose();
    return k;
}

/// σ_i = 0.8^i, a geometric spectrum with relative gaps of 20%.
Eigen::VectorXd geometric(Index p, double ratio = 0.8) {
    Eigen::VectorXd s(p);
    for (Index i = 0; i < p; ++i) s(i) = std::pow(ratio, double(i));
    return s;
}

// Backward stability of the SVD: the computed factors are an exact SVD of M + E with
// ‖E‖₂ ≤ c · n · u · ‖M‖₂ (n = max(out, in)), c = 16 for the bidiagonalisation and QR steps.
constexpr double c_svd = 16;

template <class T>
void check_against_known(const linalg::TruncatedSVD<T>& got, const KnownSpectrum& k, Index r,
                         double extra = 0) {
    const Index out = k.M.rows(), in = k.M.cols(), n = std::max(out, in);
    const double u = eps<T>(), s1 = k.sigma(0);
    const double pert = c_svd * double(n) * u * s1 + extra;  // ‖E‖₂
    const double gap = r < k.sigma.size() ? k.sigma(r - 1) - k.sigma(r) : k.sigma(r - 1);
    REQUIRE(got.U.rows() == out);
    REQUIRE(got.U.cols() == r);
    REQUIRE(got.V.rows() == in);
    REQUIRE(got.V.cols() == r);
    REQUIRE(got.S.size() == r);
    // Weyl: |σ̃_i − σ_i| ≤ ‖E‖₂.
    for (Index i = 0; i < r; ++i) REQUIRE(std::abs(double(got.S(i)) - k.sigma(i)) <= pert);
    for (Index i = 1; i < r; ++i) REQUIRE(got.S(i) <= got.S(i - 1));
    // Orthonormal columns to rounding.
    const Matrix<double> U = to_double(got.U), V = to_double(got.V);
    const double ortho = c_svd * double(n) * u;
    REQUIRE((U.transpose() * U - Matrix<double>::Identity(r, r)).cwiseAbs().maxCoeff() <= ortho);
    REQUIRE((V.transpose() * V - Matrix<double>::Identity(r, r)).cwiseAbs().maxCoeff() <= ortho);
    // Wedin: ‖sin Θ‖ ≤ ‖E‖ / gap for the projectors onto the top-r subspaces.
    const Matrix<double> PU = k.Q1.leftCols(r) * k.Q1.leftCols(r).transpose();
    const Matrix<double> PV = k.Q2.leftCols(r) * k.Q2.leftCols(r).transpose();
    const double proj = 2 * pert / gap + ortho;
    INFO("projector bound " << proj);
    REQUIRE((U * U.transpose() - PU).cwiseAbs().maxCoeff() <= proj);
    REQUIRE((V * V.transpose() - PV).cwiseAbs().maxCoeff() <= proj);
    // Reconstruction of M_r: ‖M̃_r − M_r‖ ≤ ‖E‖ + 2 σ₁ sin Θ.
    const Matrix<double> Mr = k.Q1.leftCols(r) * k.sigma.head(r).asDiagonal() *
                              k.Q2.leftCols(r).transpose();
    const Matrix<double> Mt = U * got.S.template cast<double>().asDiagonal() * V.transpose();
    REQUIRE((Mt - Mr).cwiseAbs().maxCoeff() <= pert * (1 + 4 * s1 / gap) + ortho * s1);
    // The sign rule.
    for (Index j = 0; j < r; ++j) {
        Index best = 0;
        for (Index i = 1; i < in; ++i)
            if (std::abs(V(i, j)) > std::abs(V(best, j))) best = i;
        REQUIRE(V(best, j) > 0);
    }
}

/// ‖M − U S Vᵀ‖_F, in double.
template <class T>
double residual(const Matrix<double>& M, const linalg::TruncatedSVD<T>& f) {
    return (M - to_double(f.U) * f.S.template cast<double>().asDiagonal() * to_double(f.V).transpose())
        .norm();
}

}  // namespace

TEMPLATE_TEST_CASE("exact truncated SVD recovers a known spectrum", "[svd][exact]", float, double) {
    using T = TestType;
    const auto [out, in] = GENERATE(std::pair<Index, Index>{1, 1}, std::pair<Index, Index>{7, 5},
                                    std::pair<Index, Index>{5, 7}, std::pair<Index, Index>{40, 33},
                                    std::pair<Index, Index>{17, 64});
    const Index p = std::min(out, in);
    const Index r = GENERATE(1, 3, 100);
    if (r > p && r != 100) return;
    const Index rank = std::min(r, p);
    CAPTURE(out, in, rank);
    const KnownSpectrum k = known_spectrum(out, in, geometric(p), 7 + out);
    const Matrix<T> M = k.M.template cast<T>();
    const auto got = linalg::truncated_svd(M, rank);
    check_against_known(got, k, rank);

    // Eckart–Young: the residual is the optimal √(Σ_{i>r} σ_i²), to rounding.
    const double optimal = std::sqrt(k.sigma.tail(p - rank).squaredNorm());
    const double n = double(std::max(out, in));
    REQUIRE(std::abs(residual(k.M, got) - optimal) <=
            c_svd * n * eps<T>() * k.sigma(0) * std::sqrt(double(p)) + n * eps<T>());
}

TEST_CASE("Eckart–Young: no random rank-r matrix beats the truncated SVD", "[svd][exact]") {
    const Index out = 30, in = 24, r = 4;
    const Matrix<double> M = random_matrix<double>(out, in, 3);
    const auto f = linalg::truncated_svd(M, r);
    const double best = residual(M, f);
    // The optimum is also √(‖M‖_F² − Σ_{i≤r} σ_i²).
    REQUIRE(std::abs(best * best - (M.squaredNorm() - f.S.squaredNorm())) <= 1e-12 * M.squaredNorm());
    for (std::uint64_t seed = 0; seed < 20; ++seed) {
        // A competitor: the truncated SVD perturbed, and a random rank-r product.
        const Matrix<double> X = random_matrix<double>(out, r, 100 + seed),
                             Y = random_matrix<double>(r, in, 200 + seed);
        const Matrix<double> near = f.reconstruct() + 1e-3 * X * Y;
        const auto near_r = linalg::truncated_svd(near, r);  // a rank-r matrix near the optimum
        REQUIRE((M - near_r.reconstruct()).norm() >= best - 1e-12);
        REQUIRE((M - X * Y).norm() >= best);
    }
}

TEMPLATE_TEST_CASE("randomised SVD: equals the exact one where the spectrum has a gap",
                   "[svd][randomized]", float, double) {
    using T = TestType;
    const Index out = 120, in = 90, r = 6;
    // σ₁..σ₆ in [1, 0.33], then a drop by 1e-4: with q = 2, the subspace error is of order
    // (σ₁₇/σ₆)^5, far below rounding.
    Eigen::VectorXd sigma(60);
    for (Index i = 0; i < 60; ++i) sigma(i) = i < r ? std::pow(0.8, double(i)) : 1e-4 * std::pow(0.9, double(i));
    const KnownSpectrum k = known_spectrum(out, in, sigma, 11);
    const Matrix<T> M = k.M.template cast<T>();
    const auto got = linalg::randomized_svd(M, r, {.oversampling = 10, .power_iterations = 2, .seed = 5});
    check_against_known(got, k, r);
    // Same seed, same result; the exact SVD agrees to the same bounds and the same signs.
    const auto again = linalg::randomized_svd(M, r, {.oversampling = 10, .power_iterations = 2, .seed = 5});
    REQUIRE(again.U == got.U);
    REQUIRE(again.S == got.S);
    REQUIRE(again.V == got.V);
    const auto exact = linalg::truncated_svd(M, r);
    const double tol = 4 * c_svd * double(out) * eps<T>() * (1 + 4 / (sigma(r - 1) - sigma(r)));
    REQUIRE((to_double(exact.V) - to_double(got.V)).cwiseAbs().maxCoeff() <= tol);
    REQUIRE((to_double(exact.U) - to_double(got.U)).cwiseAbs().maxCoeff() <= tol);
}

TEST_CASE("randomised SVD on a flat spectrum: near-optimal residual, within the HMT bound",
          "[svd][randomized]") {
    const Index out = 200, in = 150, r = 10, p = 10;
    // A slowly decaying spectrum, no gap: σ_i = 1 / (1 + i/20).
    Eigen::VectorXd sigma(150);
    for (Index i = 0; i < 150; ++i) sigma(i) = 1.0 / (1.0 + double(i) / 20.0);
    const KnownSpectrum k = known_spectrum(out, in, sigma, 21);
    const double optimal = std::sqrt(sigma.tail(150 - r).squaredNorm());
    for (Index q : {0, 1, 3}) {
        const auto got = linalg::randomized_svd(k.M, r, {.oversampling = p, .power_iterations = q, .seed = 9});
        const double res = residual(k.M, got);
        // HMT (2011) Thm. 10.5 for q = 0 bounds E‖(I − QQᵀ)M‖_F by √(1 + r/(p−1)) times the
        // optimal; the rank-r truncation of Q Qᵀ M adds at most the same again (Thm. 9.3 /
        // Gu 2015). A factor of 3 above 2·√(1 + r/(p−1)) allows for one unlucky draw of a fixed
        // seed (this test is deterministic).
        const double bound = 3 * 2 * std::sqrt(1 + double(r) / double(p - 1)) * optimal;
        CAPTURE(q, res, optimal);
        REQUIRE(res >= optimal * (1 - 1e-12));
        REQUIRE(res <= bound);
        if (q == 3) REQUIRE(res <= 1.01 * optimal);  // power iterations bring it close
    }
}

TEMPLATE_TEST_CASE("oversampling beyond min(out, in) is capped: the result is exact",
                   "[svd][randomized]", float, double) {
    using T = TestType;
    const KnownSpectrum k = known_spectrum(12, 9, geometric(9), 31);
    const Matrix<T> M = k.M.template cast<T>();
    const auto got = linalg::randomized_svd(M, 5, {.oversampling = 10, .power_iterations = 0});
    check_against_known(got, k, 5);
}

TEST_CASE("svd dispatches on the method; column-major and expression inputs are read correctly",
          "[svd]") {
    const KnownSpectrum k = known_spectrum(20, 16, geometric(16, 0.3), 41);  // fast decay: the randomised SVD is exact to rounding
    const Eigen::MatrixXd colmajor = k.M;
    const auto a = linalg::svd(k.M, 3);  // automatic: exact at this size
    const auto b = linalg::svd(colmajor, 3, {.method = linalg::SVDMethod::exact});
    const auto c = linalg::truncated_svd(0.5 * (k.M + k.M), 3);
    REQUIRE(a.U == b.U);
    REQUIRE(a.S == b.S);
    REQUIRE((a.V - c.V).cwiseAbs().maxCoeff() == 0);
    const auto d = linalg::svd(k.M, 3, {.method = linalg::SVDMethod::automatic, .exact_limit = 8});
    const auto e = linalg::randomized_svd(k.M, 3);
    REQUIRE(d.S == e.S);  // automatic above the limit is the randomised SVD with the same options
    check_against_known(d, k, 3);
}

TEST_CASE("bad SVD arguments raise lowrank::error", "[svd][errors]") {
    using Catch::Contains;
    const Matrix<double> M = random_matrix<double>(5, 4, 1);
    REQUIRE_THROWS_WITH(linalg::truncated_svd(M, 0),
                        Contains("lowrank::linalg::truncated_svd") && Contains("rank 0") && Contains("5 x 4"));
    REQUIRE_THROWS_WITH(linalg::randomized_svd(M, 5),
                        Contains("lowrank::linalg::randomized_svd") && Contains("rank 5 is out of range"));
    Matrix<double> bad = M;
    bad(2, 3) = std::numeric_limits<double>::quiet_NaN();
    REQUIRE_THROWS_WITH(linalg::truncated_svd(bad, 2),
                        Contains("M (5 x 4) has a non-finite entry at (2, 3)"));
    bad(2, 3) = std::numeric_limits<double>::infinity();
    REQUIRE_THROWS_WITH(linalg::randomized_svd(bad, 2), Contains("non-finite entry at (2, 3)"));
    REQUIRE_THROWS_WITH(linalg::randomized_svd(M, 2, {.oversampling = -1}),
                        Contains("oversampling must be >= 0"));
    REQUIRE_THROWS_WITH(linalg::randomized_svd(M, 2, {.power_iterations = -2}),
                        Contains("power_iterations must be >= 0"));
    REQUIRE_THROWS_AS(linalg::svd(Matrix<float>(0, 3), 1), lowrank::error);
}
