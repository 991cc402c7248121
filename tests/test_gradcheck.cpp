// SPDX-License-Identifier: Apache-2.0
// The public gradient checker: it passes correct gradients, and it catches wrong ones (a sign, a
// transpose, a missing factor), reporting the worst entry.

#include <lowrank/testing/gradcheck.hpp>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::random_matrix;

TEST_CASE("check_gradient passes exact gradients and names the worst wrong entry", "[gradcheck]") {
    const Matrix<double> A = random_matrix<double>(3, 4, 1);
    const Matrix<double> M = random_matrix<double>(3, 4, 2);
    // f(A) = Σ sin(A) ⊙ M + ½‖A‖², ∇f = cos(A) ⊙ M + A.
    auto f = [&](const Matrix<double>& x) {
        return (x.array().sin() * M.array()).sum() + 0.5 * x.squaredNorm();
    };
    const Matrix<double> grad = (A.array().cos() * M.array()).matrix() + A;
    const auto ok = testing::check_gradient(f, A, grad);
    INFO(ok.message());
    REQUIRE(ok.ok);
    REQUIRE(ok.entries == 12);
    REQUIRE(ok.max_abs_error < 1e-8);

    Matrix<double> wrong = grad;
    wrong(2, 1) = -wrong(2, 1);  // a sign error in one entry
    const auto bad = testing::check_gradient(f, A, wrong);
    REQUIRE_FALSE(bad.ok);
    REQUIRE(bad.worst_row == 2);
    REQUIRE(bad.worst_col == 1);
    REQUIRE(bad.message().find("FAILED") != std::string::npos);

    const auto scaled = testing::check_gradient(f, A, Matrix<double>(grad * (1 + 1e-3)));
    REQUIRE_FALSE(scaled.ok);  // a 0.1% factor error is far above the 1e-5 tolerance

    Matrix<double> nan_grad = grad;
    nan_grad(0, 0) = NAN;
    REQUIRE_FALSE(testing::check_gradient(f, A, nan_grad).ok);
    REQUIRE_THROWS_AS(testing::check_gradient(f, A, Matrix<double>(4, 3)), lowrank::error);
}

TEST_CASE("check_vjp checks a matrix function's backward", "[gradcheck]") {
    const Matrix<double> X = random_matrix<double>(5, 3, 3), B = random_matrix<double>(3, 4, 4);
    const Matrix<double> dY = random_matrix<double>(5, 4, 5);
    auto F = [&](const Matrix<double>& x) { return Matrix<double>(x * B); };
    REQUIRE(testing::check_vjp(F, X, dY, Matrix<double>(dY * B.transpose())).ok);
    // The classic mistake: dY·B instead of dY·Bᵀ has the wrong shape here, so use a square case.
    const Matrix<double> S = random_matrix<double>(3, 3, 6), dZ = random_matrix<double>(5, 3, 7);
    auto G = [&](const Matrix<double>& x) { return Matrix<double>(x * S); };
    REQUIRE(testing::check_vjp(G, X, dZ, Matrix<double>(dZ * S.transpose())).ok);
    REQUIRE_FALSE(testing::check_vjp(G, X, dZ, Matrix<double>(dZ * S)).ok);
}
