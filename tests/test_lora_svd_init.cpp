// SPDX-License-Identifier: Apache-2.0
// PiSSA and OLoRA initialisations: closed forms on small matrices (worked by hand, as PEFT's
// formulas give them), the PEFT formulas re-implemented in the test on an independent Jacobi SVD
// and Householder QR in double, the effective weight after init, and bad input.

#include <lowrank/lora_svd_init.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

TEST_CASE("PiSSA and OLoRA closed forms", "[svd_init]") {
    SECTION("PiSSA: W = diag(-3, 1), r = 1, alpha = 2 (s = 2)") {
        Matrix<double> W(2, 2);
        W << -3, 0, 0, 1;
        const Lora<double> lora = pissa_init(W, {.rank = 1, .alpha = 2});
        // σ₁ = 3, u₁ = (−1, 0), v₁ = (1, 0) by the sign rule; S' = 3 / 2.
        REQUIRE(lora.scale() == 2);
        REQUIRE(lora.A()(0, 0) == std::sqrt(1.5));
        REQUIRE(lora.A()(0, 1) == 0);
        REQUIRE(lora.B()(0, 0) == -std::sqrt(1.5));
        REQUIRE(lora.B()(1, 0) == 0);
        Matrix<double> base(2, 2);
        base << 0, 0, 0, 1;
        REQUIRE((W - base).cwiseAbs().maxCoeff() <= 4 * eps<double>() * 3);
    }
    SECTION("OLoRA: W = [[3, 1], [4, 2]], r = 1, alpha = 1: LAPACK's signs") {
        Matrix<double> W(2, 2);
        W << 3, 1, 4, 2;
        const Lora<double> lora = olora_init(W, {.rank = 1, .alpha = 1});
        // torch.linalg.qr: Q[:, 0] = (−0.6, −0.8), R[0] = (−5, −2.2).
        const double u = eps<double>();
        REQUIRE(std::abs(lora.B()(0, 0) + 0.6) <= 4 * u);
        REQUIRE(std::abs(lora.B()(1, 0) + 0.8) <= 4 * u);
        REQUIRE(std::abs(lora.A()(0, 0) + 5) <= 4 * u * 5);
        REQUIRE(std::abs(lora.A()(0, 1) + 2.2) <= 8 * u * 2.2);
        // W_base = W − B A = [[0, −0.32], [0, 0.24]].
        REQUIRE(std::abs(W(0, 0)) <= 16 * u);
        REQUIRE(std::abs(W(1, 0)) <= 16 * u);
        REQUIRE(std::abs(W(0, 1) + 0.32) <= 16 * u);
        REQUIRE(std::abs(W(1, 1) - 0.24) <= 16 * u);
    }
}

TEMPLATE_TEST_CASE("PiSSA equals PEFT's formulas on an independent SVD; W_base + s B A = W",
                   "[svd_init][pissa]", float, double) {
    using T = TestType;
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{12, 9, 3},
                                       std::tuple<Index, Index, Index>{10, 24, 10},
                                       std::tuple<Index, Index, Index>{1, 1, 1});
    const bool rslora = GENERATE(false, true);
    CAPTURE(out, in, r, rslora);
    const Matrix<T> W0 = random_matrix<T>(out, in, 3 + out);
    Matrix<T> W = W0;
    const Lora<T> lora = pissa_init(W, {.rank = r, .alpha = 6, .rslora = rslora});
    const double s = rslora ? 6 / std::sqrt(double(r)) : 6 / double(r);
    REQUIRE(double(lora.scale()) == double(T(s)));

    // PEFT: A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)), W_base = W − s B A (Jacobi SVD here).
    const Matrix<double> w = to_double(W0);
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(w, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Eigen::VectorXd sv = svd.singularValues();
    const Eigen::VectorXd root = (sv.head(r) / s).cwiseSqrt();
    Matrix<double> A_ref = root.asDiagonal() * svd.matrixV().leftCols(r).transpose();
    Matrix<double> B_ref = svd.matrixU().leftCols(r) * root.asDiagonal();
    for (Index k = 0; k < r; ++k) {  // the library's sign rule, applied to the reference
        Index best = 0;
        for (Index j = 1; j < in; ++j)
            if (std::abs(A_ref(k, j)) > std::abs(A_ref(k, best))) best = j;
        if (A_ref(k, best) < 0) {
            A_ref.row(k) *= -1;
            B_ref.col(k) *= -1;
        }
    }
    const double u = eps<T>(), n = double(std::max(out, in));
    const double gap = r < std::min(out, in) ? sv(r - 1) - sv(r) : sv(r - 1);
    const double pert = 16 * n * u * sv(0);  // backward error of the SVD
    const double factor_tol = pert * (1 + 4 * sv(0) / gap) / std::sqrt(s * sv(r - 1)) + 16 * n * u * root(0);
    CAPTURE(gap, factor_tol);
    REQUIRE((to_double(lora.A()) - A_ref).cwiseAbs().maxCoeff() <= factor_tol);
    REQUIRE((to_double(lora.B()) - B_ref).cwiseAbs().maxCoeff() <= factor_tol);
    // W_base = W − W_r, and W_base + s B A = W to the rounding of the correction.
    const Matrix<double> Wr = svd.matrixU().leftCols(r) * sv.head(r).asDiagonal() * svd.matrixV().leftCols(r).transpose();
    REQUIRE((to_double(W) - (w - Wr)).cwiseAbs().maxCoeff() <= pert * (1 + 4 * sv(0) / gap) + 8 * n * u * sv(0));
    const Matrix<double> Weff = to_double(W) + s * to_double(lora.B()) * to_double(lora.A());
    require_within(Weff, w,
                   Matrix<double>::Constant(out, in, 4 * double(r + 2) * u * s * root.squaredNorm()) +
                       4 * u * w.cwiseAbs(),
                   "W_base + s B A");
}

TEMPLATE_TEST_CASE("OLoRA equals PEFT's formulas on an independent Householder QR", "[svd_init][olora]",
                   float, double) {
    using T = TestType;
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{12, 9, 3},
                                       std::tuple<Index, Index, Index>{7, 20, 7},
                                       std::tuple<Index, Index, Index>{30, 30, 30},
                                       std::tuple<Index, Index, Index>{1, 1, 1});
    CAPTURE(out, in, r);
    const Matrix<T> W0 = random_matrix<T>(out, in, 9 + in);
    Matrix<T> W = W0;
    const Lora<T> lora = olora_init(W, {.rank = r, .alpha = 4});
    const double s = 4 / double(r);
    const Matrix<double> w = to_double(W0);
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(w);
    const Index p = std::min(out, in);
    const Matrix<double> Q = qr.householderQ() * Eigen::MatrixXd::Identity(out, p);
    const Matrix<double> R = qr.matrixQR().topRows(p).triangularView<Eigen::Upper>();
    // Householder QR is backward stable: both computations are exact for W + E, ‖E‖ ≤ c n u ‖W‖_F,
    // and the first r columns of Q and rows of R move by at most κ(W[:, :r]) times that.
    const double u = eps<T>(), n = double(std::max(out, in));
    const Eigen::JacobiSVD<Eigen::MatrixXd> sv(w.leftCols(std::min(r, in)));
    const double cond = sv.singularValues()(0) / sv.singularValues()(sv.singularValues().size() - 1);
    const double tol = 64 * n * u * cond;
    CAPTURE(cond);
    REQUIRE((to_double(lora.B()) - Q.leftCols(r)).cwiseAbs().maxCoeff() <= tol);
    REQUIRE((to_double(lora.A()) - R.topRows(r)).cwiseAbs().maxCoeff() <= tol * w.norm());
    for (Index i = 0; i < r; ++i)
        for (Index j = 0; j < std::min(i, in); ++j) REQUIRE(lora.A()(i, j) == 0);
    const Matrix<double> B = to_double(lora.B());
    REQUIRE((B.transpose() * B - Matrix<double>::Identity(r, r)).cwiseAbs().maxCoeff() <= 16 * n * u);
    // W_base = W − s B A, and W_base + s B A = W (B A = the first r terms of Q R).
    const Matrix<double> BA = B * to_double(lora.A());
    require_within(W, w - s * BA, 4 * double(r + 2) * u * s * (B.cwiseAbs() * to_double(lora.A()).cwiseAbs()) +
                                      4 * u * (w - s * BA).cwiseAbs() + Matrix<double>::Constant(out, in, 1e-300),
                   "W_base");
    if (r == p && out <= in) REQUIRE((BA - w).cwiseAbs().maxCoeff() <= tol * w.norm());
}

TEST_CASE("bad PiSSA / OLoRA arguments raise lowrank::error", "[svd_init][errors]") {
    using Catch::Contains;
    Matrix<float> W = random_matrix<float>(6, 4, 1);
    const Matrix<float> W0 = W;
    REQUIRE_THROWS_WITH(pissa_init(W, {.rank = 5}),
                        Contains("lowrank::pissa_init") && Contains("rank 5 is out of range") && Contains("6 x 4"));
    REQUIRE_THROWS_WITH(olora_init(W, {.rank = 0}), Contains("lowrank::olora_init") && Contains("rank 0"));
    REQUIRE_THROWS_WITH(pissa_init(W, {.rank = 2, .alpha = -1}), Contains("pissa_init") && Contains("must be > 0"));
    REQUIRE_THROWS_WITH(olora_init(W, {.rank = 2, .alpha = INFINITY}), Contains("alpha must be finite"));
    W(3, 2) = NAN;
    REQUIRE_THROWS_WITH(pissa_init(W, {.rank = 2}), Contains("W (6 x 4) has a non-finite entry at (3, 2)"));
    REQUIRE_THROWS_WITH(olora_init(W, {.rank = 2}), Contains("olora_init") && Contains("non-finite entry at (3, 2)"));
    W(3, 2) = W0(3, 2);
    REQUIRE(W == W0);  // failed calls leave W untouched
}
