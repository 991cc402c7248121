// SPDX-License-Identifier: Apache-2.0
// Gram-matrix Cholesky solves: residuals against the Gram matrix formed independently in double,
// acceptance of badly scaled orthogonal factors, rejection of rank-deficient ones, and caching.

#include <lowrank/linalg/cholesky.hpp>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::random_matrix;
using lowrank::test::to_double;

namespace {
constexpr double u_double = std::numeric_limits<double>::epsilon() / 2;
}

TEMPLATE_TEST_CASE("Gram solves: G X = B to the backward error of Cholesky", "[cholesky]", float, double) {
    using T = TestType;
    const Index m = GENERATE(1, 5, 40);
    const Index r = GENERATE(1, 3, 5);
    if (r > m) return;
    CAPTURE(m, r);
    const Matrix<T> F = random_matrix<T>(m, r, 1 + m);  // columns independent with probability 1
    const Matrix<double> f = to_double(F);
    const Matrix<double> G = f.transpose() * f, Gt = f * f.transpose();
    const Matrix<double> rhs = random_matrix<double>(r, 4, 2);
    const auto chol = linalg::GramCholesky::of(F, linalg::GramSide::columns);
    REQUIRE(chol.size() == r);
    // Backward stability of Cholesky (Higham, Thm. 10.4): (G + ΔG) x = b with
    // |ΔG| ≤ c · r · u · |L||Lᵀ|, so ‖G x − b‖ ≤ c · r · u · ‖|L||Lᵀ|‖ · ‖x‖ (c = 4 also covers
    // the rounding of forming G in double).
    const Matrix<double> L = chol.matrixL();
    const double lnorm = (L.cwiseAbs() * L.transpose().cwiseAbs()).norm();
    const Matrix<double> x = chol.solve_left(rhs);
    REQUIRE((G * x - rhs).norm() <= 4 * double(r + m) * u_double * lnorm * x.norm() + 1e-300);
    const Matrix<double> y = chol.solve_right(rhs.transpose());
    REQUIRE((y * G - rhs.transpose()).norm() <= 4 * double(r + m) * u_double * lnorm * y.norm() + 1e-300);

    // The row Gram matrix of Fᵀ (r × m) is the same G.
    const Matrix<T> Ft = F.transpose();
    const auto chol_rows = linalg::GramCholesky::of(Ft, linalg::GramSide::rows);
    REQUIRE((chol_rows.matrixL() - L).cwiseAbs().maxCoeff() <= 4 * double(m) * u_double * L.cwiseAbs().maxCoeff());
    (void)Gt;
}

TEST_CASE("orthogonal factors with very different row norms are not singular", "[cholesky]") {
    // A = diag(1, 1e-7, 1e-12) Vᵀ with orthonormal rows V: a LoRA-XS A with a steep spectrum.
    Matrix<double> V = Matrix<double>::Zero(3, 6);
    V(0, 0) = V(1, 2) = V(2, 5) = 1;
    Matrix<double> A = V;
    A.row(1) *= 1e-7;
    A.row(2) *= 1e-12;
    const auto chol = linalg::GramCholesky::of(A, linalg::GramSide::rows);
    const Matrix<double> x = chol.solve_left(Matrix<double>::Identity(3, 3));
    REQUIRE(x(0, 0) == 1.0);
    REQUIRE(std::abs(x(1, 1) / 1e14 - 1) <= 4 * u_double);
    REQUIRE(std::abs(x(2, 2) / 1e24 - 1) <= 4 * u_double);
}

TEST_CASE("rank-deficient, empty and non-finite factors raise lowrank::error", "[cholesky][errors]") {
    using Catch::Contains;
    Matrix<double> B = random_matrix<double>(10, 3, 5);
    B.col(2) = 0.25 * B.col(0) - 2.0 * B.col(1);  // dependent column
    REQUIRE_THROWS_WITH(linalg::GramCholesky::of(B, linalg::GramSide::columns, "lowrank::test_fn", "B"),
                        Contains("lowrank::test_fn") && Contains("Gram matrix of B (10 x 3)") &&
                            Contains("singular"));
    Matrix<float> zero_col = random_matrix<float>(10, 3, 6);
    zero_col.col(1).setZero();
    REQUIRE_THROWS_WITH(linalg::GramCholesky::of(zero_col, linalg::GramSide::columns), Contains("singular"));
    REQUIRE_THROWS_WITH(linalg::GramCholesky::of(Matrix<double>(4, 0), linalg::GramSide::columns),
                        Contains("empty"));
    Matrix<double> nan = random_matrix<double>(3, 3, 7);
    nan(1, 1) = std::numeric_limits<double>::quiet_NaN();
    REQUIRE_THROWS_WITH(linalg::GramCholesky::of(nan, linalg::GramSide::rows), Contains("non-finite"));
    REQUIRE_THROWS_WITH(linalg::GramCholesky::of_matrix(Matrix<double>(2, 3)),
                        Contains("G is 2 x 3") && Contains("square"));
    REQUIRE_THROWS_WITH(linalg::GramCholesky::of_matrix(Matrix<double>::Identity(2, 2) * -1.0),
                        Contains("singular"));
}

TEST_CASE("CachedGramCholesky refactors only when the key changes", "[cholesky]") {
    const Matrix<double> F1 = random_matrix<double>(8, 3, 1), F2 = random_matrix<double>(8, 3, 2);
    linalg::CachedGramCholesky cache;
    const Matrix<double> rhs = Matrix<double>::Identity(3, 3);
    const Matrix<double> x1 = cache.get(1, F1, linalg::GramSide::columns).solve_left(rhs);
    REQUIRE(cache.factorizations() == 1);
    const Matrix<double> again = cache.get(1, F1, linalg::GramSide::columns).solve_left(rhs);
    REQUIRE(cache.factorizations() == 1);
    REQUIRE(again == x1);
    const Matrix<double> x2 = cache.get(2, F2, linalg::GramSide::columns).solve_left(rhs);
    REQUIRE(cache.factorizations() == 2);
    REQUIRE(x2 != x1);
    // A failed factorisation leaves nothing cached under the failing key.
    Matrix<double> bad = F1;
    bad.col(1) = bad.col(0);
    REQUIRE_THROWS_AS(cache.get(3, bad, linalg::GramSide::columns), lowrank::error);
    REQUIRE_THROWS_AS(cache.get(3, bad, linalg::GramSide::columns), lowrank::error);
    cache.get(2, F2, linalg::GramSide::columns);
    REQUIRE(cache.factorizations() == 3);
}
