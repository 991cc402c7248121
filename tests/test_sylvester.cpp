// SPDX-License-Identifier: Apache-2.0
// Sylvester equation P X + X Q = C for symmetric (positive semidefinite) pairs: residual, the dense
// Kronecker solve in double, singular operators (minimum-norm solution), bad arguments.

#include <lowrank/linalg/sylvester.hpp>

#include <Eigen/Dense>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::random_matrix;

namespace {

using Dense = Eigen::MatrixXd;

/// vec (column-major) of the solution of (I ⊗ P + Qᵀ ⊗ I) vec(X) = vec(C), minimum norm.
Dense kronecker_solve(const Dense& P, const Dense& Q, const Dense& C) {
    const Index m = P.rows(), n = Q.rows();
    Dense K = Dense::Zero(m * n, m * n);
    for (Index j = 0; j < n; ++j)
        for (Index i = 0; i < m; ++i) {
            const Index row = j * m + i;  // (P X)_ij = Σ_k P_ik X_kj,  (X Q)_ij = Σ_l X_il Q_lj
            for (Index k = 0; k < m; ++k) K(row, j * m + k) += P(i, k);
            for (Index l = 0; l < n; ++l) K(row, l * m + i) += Q(l, j);
        }
    const Eigen::VectorXd c = Eigen::Map<const Eigen::VectorXd>(C.data(), m * n);
    Eigen::CompleteOrthogonalDecomposition<Dense> cod(K);
    cod.setThreshold(1e-12);
    const Eigen::VectorXd x = cod.solve(c);
    return Eigen::Map<const Dense>(x.data(), m, n);
}

/// A random symmetric positive definite matrix MᵀM / k + shift·I.
template <class T>
Matrix<T> random_spd(Index n, std::uint64_t seed, double shift) {
    const Matrix<double> M = random_matrix<double>(n + 2, n, seed);
    Matrix<double> S = M.transpose() * M / double(n + 2);
    S.diagonal().array() += shift;
    return S.cast<T>();
}

}  // namespace

TEMPLATE_TEST_CASE("solve_sylvester_symmetric: residual and the dense Kronecker solve",
                   "[sylvester]", float, double) {
    using T = TestType;
    const auto [m, n] = GENERATE(std::pair<Index, Index>{1, 1}, std::pair<Index, Index>{3, 5},
                                 std::pair<Index, Index>{8, 8}, std::pair<Index, Index>{16, 4},
                                 std::pair<Index, Index>{2, 17});
    CAPTURE(m, n);
    const Matrix<T> P = random_spd<T>(m, 10 + m, 0.05), Q = random_spd<T>(n, 20 + n, 0.1);
    const Matrix<T> C = random_matrix<T>(m, n, 30);
    Matrix<T> X;
    const auto info = linalg::solve_sylvester_symmetric(P, Q, C, X);
    REQUIRE(X.rows() == m);
    REQUIRE(X.cols() == n);
    REQUIRE(info.dropped == 0);

    const Dense p = P.template cast<double>(), q = Q.template cast<double>(),
                c = C.template cast<double>(), x = X.template cast<double>();
    const Dense want = kronecker_solve(p, q, c);
    // Normwise bounds of a solve through orthogonal similarity transforms: the eigenvectors are
    // orthogonal to ≈ (size)·u and the eigenvalues accurate to ≈ (size)·u·‖·‖ (backward error
    // (‖P‖ + ‖Q‖)·‖X‖·u), and the rotated C carries an absolute error ≈ (size)·u·‖C‖ that the
    // termwise division turns into a residual of the same size. So the residual is
    // ≲ c_res·(m + n)·u·((‖P‖ + ‖Q‖)·‖X‖ + ‖C‖) and the forward error that residual divided by
    // the smallest eigenvalue min(λ_i + μ_j) of the operator. c_res = 16 covers the four products
    // and the two decompositions.
    constexpr double c_res = 16;
    const double u = eps<T>();
    const double norm_op = p.norm() + q.norm();
    const Dense residual = p * x + x * q - c;
    const double res_bound = c_res * double(m + n) * u * (norm_op * want.norm() + c.norm());
    INFO("residual " << residual.norm() << " bound " << res_bound << ", condition "
                     << info.condition());
    REQUIRE(residual.norm() <= res_bound);
    const double forward = res_bound / info.min_denominator;
    INFO("forward error " << (x - want).norm() << " bound " << forward);
    REQUIRE((x - want).norm() <= forward);
    REQUIRE(info.condition() >= 1.0);
}

TEST_CASE("solve_sylvester_symmetric: singular operators give the minimum-norm solution",
          "[sylvester]") {
    SECTION("P = 0, Q positive definite: X = C Q⁻¹, nothing dropped") {
        const Matrix<double> P = Matrix<double>::Zero(3, 3), Q = random_spd<double>(4, 5, 0.5);
        const Matrix<double> C = random_matrix<double>(3, 4, 6);
        Matrix<double> X;
        const auto info = linalg::solve_sylvester_symmetric(P, Q, C, X);
        REQUIRE(info.dropped == 0);
        const Matrix<double> want = C * Q.inverse();
        REQUIRE((X - want).norm() <= 1e-13 * want.norm());
    }
    SECTION("both semidefinite with a shared null direction: one dropped term, the pseudo-inverse") {
        Matrix<double> P = Matrix<double>::Zero(2, 2), Q = Matrix<double>::Zero(3, 3);
        P(0, 0) = 1.5;                 // P = diag(1.5, 0)
        Q(1, 1) = 2.0;                 // Q = diag(0, 2, 0.7)
        Q(2, 2) = 0.7;
        const Matrix<double> C = random_matrix<double>(2, 3, 8);
        Matrix<double> X;
        const auto info = linalg::solve_sylvester_symmetric(P, Q, C, X);
        REQUIRE(info.dropped == 1);    // λ = 0 with μ = 0
        REQUIRE(info.min_denominator == 0.0);
        const Dense want = kronecker_solve(P.cast<double>(), Q.cast<double>(), C.cast<double>());
        REQUIRE((X.cast<double>() - want).norm() <= 1e-14 * want.norm());
        REQUIRE(X(1, 0) == 0.0);
    }
    SECTION("all zero: X = 0") {
        Matrix<float> X;
        const auto info = linalg::solve_sylvester_symmetric(
            Matrix<float>::Zero(2, 2), Matrix<float>::Zero(2, 2), random_matrix<float>(2, 2, 9), X);
        REQUIRE(info.dropped == 4);
        REQUIRE(X.isZero(0));
    }
    SECTION("X may alias C; column-major inputs are fine (Eigen arithmetic)") {
        const Dense P = random_spd<double>(3, 1, 0.2), Q = random_spd<double>(3, 2, 0.2);
        Dense C = random_matrix<double>(3, 3, 3);
        const Dense want = kronecker_solve(P, Q, C);
        (void)linalg::solve_sylvester_symmetric(P, Q, C, C);
        REQUIRE((C - want).norm() <= 1e-12 * want.norm());
    }
}

TEST_CASE("solve_sylvester_symmetric: bad arguments raise lowrank::error", "[sylvester][errors]") {
    using Catch::Matchers::Contains;
    const Matrix<double> P = random_spd<double>(3, 1, 0.1), Q = random_spd<double>(2, 2, 0.1);
    const Matrix<double> C = random_matrix<double>(3, 2, 3);
    Matrix<double> X;
    REQUIRE_THROWS_WITH(linalg::solve_sylvester_symmetric(Matrix<double>(3, 2), Q, C, X),
                        Contains("lowrank::linalg::solve_sylvester_symmetric") &&
                            Contains("P is 3 x 2, expected 3 x 3"));
    REQUIRE_THROWS_WITH(linalg::solve_sylvester_symmetric(P, Q, Matrix<double>(2, 3), X),
                        Contains("C is 2 x 3, expected 3 x 2"));
    Matrix<double> bad = Q;
    bad(1, 0) = NAN;
    REQUIRE_THROWS_WITH(linalg::solve_sylvester_symmetric(P, bad, C, X),
                        Contains("Q (2 x 2) has a non-finite entry"));
    Matrix<double> Xfixed(3, 2);
    REQUIRE_THROWS_WITH(linalg::solve_sylvester_symmetric(P, Q, C, Xfixed.leftCols(1)),
                        Contains("X is 3 x 1, expected 3 x 2"));
    REQUIRE_THROWS_AS(linalg::solve_sylvester_symmetric(P, Q, C, X, {.rcond = NAN}), lowrank::error);
}
