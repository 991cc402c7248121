// SPDX-License-Identifier: Apache-2.0
// The LoRA-SB pipeline: gradient accumulation against naive sums, the update approximation, the
// end-to-end initialisation against an independent (Jacobi) SVD, the optimal core gradient against
// projectors built from QR (s B g_R* A = P_B G P_A) and against closed forms, caching of the Gram
// factorisations, bad input, and what from_update gives on a flat spectrum.

#include <lowrank/lora_sb.hpp>
#include <lowrank/testing/gradcheck.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::naive_product;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

namespace {

/// Orthogonal projector onto the column space of F (full column rank), via Householder QR.
Matrix<double> projector(const Matrix<double>& F) {
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(F);
    const Eigen::MatrixXd Q = qr.householderQ() * Eigen::MatrixXd::Identity(F.rows(), F.cols());
    return Q * Q.transpose();
}

/// The rank-r truncation of M by Jacobi SVD (an algorithm independent of the library's BDCSVD).
Matrix<double> jacobi_truncation(const Matrix<double>& M, Index r) {
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(M, Eigen::ComputeThinU | Eigen::ComputeThinV);
    return svd.matrixU().leftCols(r) * svd.singularValues().head(r).asDiagonal() *
           svd.matrixV().leftCols(r).transpose();
}

Matrix<double> gaussian(Index rows, Index cols, std::uint64_t seed) {
    Random rng(seed);
    Matrix<double> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = rng.normal();
    return m;
}

}  // namespace

TEMPLATE_TEST_CASE("GradientAccumulator: mean over batches of dYᵀ X and of full gradients",
                   "[lora_sb][accumulate]", float, double) {
    using T = TestType;
    const Index out = 9, in = 13;
    GradientAccumulator<T> acc(out, in);
    Matrix<double> want = Matrix<double>::Zero(out, in), abs_sum = Matrix<double>::Zero(out, in);
    Index batches = 0;
    for (std::uint64_t b = 0; b < 3; ++b) {
        const Index n = 5 + Index(b) * 7;
        const Matrix<T> X = random_matrix<T>(n, in, 10 + b), dY = random_matrix<T>(n, out, 20 + b);
        acc.add_linear(X, dY);
        want += naive_product(to_double(dY).transpose(), to_double(X));
        abs_sum += naive_product(to_double(dY).transpose().cwiseAbs(), to_double(X).cwiseAbs());
        ++batches;
    }
    // One batch given as two chunks of tokens (batches = 0, then 1).
    const Matrix<T> X = random_matrix<T>(8, in, 30), dY = random_matrix<T>(8, out, 31);
    acc.add_linear(X.topRows(3), dY.topRows(3), 0);
    acc.add_linear(X.bottomRows(5), dY.bottomRows(5), 1);
    want += naive_product(to_double(dY).transpose(), to_double(X));
    abs_sum += naive_product(to_double(dY).transpose().cwiseAbs(), to_double(X).cwiseAbs());
    ++batches;
    // And one full gradient.
    const Matrix<T> G = random_matrix<T>(out, in, 40);
    acc.add_gradient(G);
    want += to_double(G);
    abs_sum += to_double(G).cwiseAbs();
    ++batches;
    REQUIRE(acc.batches() == batches);
    // Each entry is one running sum of k = 5 + 12 + 19 + 8 + 1 = 45 terms: bound c (k + 2) u Σ|terms|.
    const Matrix<double> bound = 2 * 47 * eps<T>() * abs_sum / double(batches) +
                                 Matrix<double>::Constant(out, in, std::numeric_limits<double>::min());
    require_within(acc.gradient(), want / double(batches), bound + eps<T>() * (want / double(batches)).cwiseAbs(),
                   "mean gradient");
    acc.reset();
    REQUIRE(acc.batches() == 0);
    REQUIRE(acc.sum().isZero(0));
}

TEST_CASE("approximate_update: −η sign(G) and −η G", "[lora_sb][update]") {
    Matrix<double> G(2, 3);
    G << 0.5, -2.0, 0.0, -1e-30, 3.0, 7.0;
    const Matrix<double> s = approximate_update(G, 0.01);
    Matrix<double> want(2, 3);
    want << -0.01, 0.01, 0.0, 0.01, -0.01, -0.01;
    REQUIRE(s == want);
    const Matrix<double> raw = approximate_update(G, 0.5, UpdateRule::raw);
    REQUIRE(raw == -0.5 * G);
    const Matrix<float> sf = approximate_update(G.cast<float>(), 0.25);
    REQUIRE(sf == (want * 25).cast<float>());
}

TEST_CASE("lora_sb_init: s B R A is the best rank-r approximation of −η sign(G)", "[lora_sb][init]") {
    const Index out = 14, in = 11, r = 3;
    GradientAccumulator<double> acc(out, in);
    Matrix<double> G = Matrix<double>::Zero(out, in);
    for (std::uint64_t b = 0; b < 4; ++b) {
        const Matrix<double> X = random_matrix<double>(6, in, 50 + b), dY = random_matrix<double>(6, out, 60 + b);
        acc.add_linear(X, dY);
        G += naive_product(dY.transpose(), X);
    }
    G /= 4;
    const double lr = 2e-4;
    const auto xs = lora_sb_init(acc, lr, {.rank = r, .alpha = 1});
    Matrix<double> dW(out, in);
    for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j) dW(i, j) = G(i, j) > 0 ? -lr : lr;  // no exact zeros here
    const Matrix<double> want = jacobi_truncation(dW, r);
    const Matrix<double> got = double(xs.scale()) * xs.B() * xs.R() * xs.A();
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(dW);
    const Eigen::VectorXd sv = svd.singularValues();
    const double gap = sv(r - 1) - sv(r);
    INFO("singular values " << sv.transpose() << ", gap " << gap);
    REQUIRE((got - want).cwiseAbs().maxCoeff() <= 64 * 14 * eps<double>() * sv(0) * (1 + 4 * sv(0) / gap));
    // The raw rule gives the truncation of −η G.
    const auto raw = lora_sb_init(acc, lr, {.rank = r, .alpha = 1}, UpdateRule::raw);
    const Matrix<double> want_raw = jacobi_truncation(-lr * G, r);
    Eigen::JacobiSVD<Eigen::MatrixXd> svd_raw(-lr * G);
    const Eigen::VectorXd svr = svd_raw.singularValues();
    REQUIRE((double(raw.scale()) * raw.B() * raw.R() * raw.A() - want_raw).cwiseAbs().maxCoeff() <=
            64 * 14 * eps<double>() * svr(0) * (1 + 4 * svr(0) / (svr(r - 1) - svr(r))));
}

TEMPLATE_TEST_CASE("optimal core gradient: s B g_R* A = P_B G P_A", "[lora_sb][optimal]", float, double) {
    using T = TestType;
    const Index out = 23, in = 17, r = 4;
    const auto xs = LoraXS<T>::from_factors(random_matrix<T>(out, r, 1), random_matrix<T>(r, in, 2),
                                            random_matrix<T>(r, r, 3), 3.0);
    const Matrix<T> G = random_matrix<T>(out, in, 4);
    const Matrix<T> g_R = core_gradient(xs, G);
    const Matrix<double> b = to_double(xs.B()), a = to_double(xs.A()), g = to_double(G);
    const double s = double(xs.scale()), u = eps<T>();
    // core_gradient = s Bᵀ G Aᵀ.
    const Matrix<double> g_ref = s * naive_product(naive_product(b.transpose(), g), a.transpose());
    const Matrix<double> g_abs = s * naive_product(naive_product(b.transpose().cwiseAbs(), g.cwiseAbs()), a.transpose().cwiseAbs());
    require_within(g_R, g_ref, (2 * double(out + in + 4) * u * g_abs).array() + std::numeric_limits<double>::min(), "g_R");

    OptimalCoreGradient<T> solver;
    const Matrix<T> g_star = solver(xs, g_R);
    const Matrix<double> lhs = s * b * to_double(g_star) * a;
    const Matrix<double> rhs = projector(b) * g * projector(a.transpose());
    // Error: g_R's rounding (relative c (out + in) u) amplified by the Gram solves: ≤ κ(B) κ(A).
    Eigen::JacobiSVD<Eigen::MatrixXd> sb(b), sa(a);
    const double kappa = (sb.singularValues()(0) / sb.singularValues()(r - 1)) *
                         (sa.singularValues()(0) / sa.singularValues()(r - 1));
    const double tol = 4 * double(out + in + r) * u * kappa * g.norm();
    CAPTURE(kappa, tol);
    REQUIRE((lhs - rhs).cwiseAbs().maxCoeff() <= tol);
    // The factorisations are cached: a second call with the same adapter does not refactor.
    REQUIRE(solver.factorizations() == 2);
    const Matrix<T> again = solver(xs, g_R);
    REQUIRE(again == g_star);
    REQUIRE(solver.factorizations() == 2);
    auto copy = xs;  // same factors, same id
    copy.R().setZero();
    (void)solver(copy, g_R);
    REQUIRE(solver.factorizations() == 2);
    const auto other = LoraXS<T>::from_factors(xs.B(), xs.A(), xs.R(), 3.0);  // new id
    (void)solver(other, g_R);
    REQUIRE(solver.factorizations() == 4);
    REQUIRE(optimal_core_gradient(xs, g_R) == g_star);
}

TEST_CASE("optimal core gradient: closed forms for LoRA-XS and LoRA-SB factors", "[lora_sb][optimal]") {
    const Matrix<double> W = random_matrix<double>(20, 16, 7);
    const Matrix<double> g_R = random_matrix<double>(5, 5, 8);
    // LoRA-XS: BᵀB = I, AAᵀ = diag(σ²): g_R* = g_R diag(1/σ²) / s².
    const auto xs = LoraXS<double>::from_weight(W, {.rank = 5, .alpha = 10});
    const double s = xs.scale();
    const Matrix<double> g_star = optimal_core_gradient(xs, g_R);
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(W);
    for (Index i = 0; i < 5; ++i)
        for (Index j = 0; j < 5; ++j) {
            const double sigma = svd.singularValues()(j);
            const double want = g_R(i, j) / (s * s * sigma * sigma);
            REQUIRE(std::abs(g_star(i, j) - want) <= 1e-12 * std::abs(want) + 1e-13 * g_R.cwiseAbs().maxCoeff() / (s * s * sigma * sigma));
        }
    // LoRA-SB with s = 1 (alpha = r): orthonormal B and Aᵀ, so g_R* = g_R.
    const auto sb = LoraXS<double>::from_update(W, {.rank = 5, .alpha = 5});
    REQUIRE((optimal_core_gradient(sb, g_R) - g_R).cwiseAbs().maxCoeff() <= 64 * 20 * eps<double>() * g_R.cwiseAbs().maxCoeff());
}

TEST_CASE("core_gradient is the gradient of ⟨G, s B R A⟩ and matches backward", "[lora_sb][gradcheck]") {
    const Index out = 7, in = 6, r = 3;
    const auto xs = LoraXS<double>::from_factors(random_matrix<double>(out, r, 1), random_matrix<double>(r, in, 2),
                                                 random_matrix<double>(r, r, 3), 2.0);
    const Matrix<double> G = random_matrix<double>(out, in, 4);
    auto loss = [&](const Matrix<double>& R) {
        return (G.array() * (xs.scale() * xs.B() * R * xs.A()).array()).sum();
    };
    const auto res = testing::check_gradient(loss, xs.R(), core_gradient(xs, G));
    INFO(res.message());
    REQUIRE(res.ok);
    // backward's grad.R is core_gradient of the full-weight gradient dYᵀ X.
    const Matrix<double> X = random_matrix<double>(5, in, 5), dY = random_matrix<double>(5, out, 6),
                         W = random_matrix<double>(out, in, 7);
    LoraXSGrad<double> grad;
    backward(X, W, xs, dY, grad);
    const Matrix<double> via_full = core_gradient(xs, dY.transpose() * X);
    REQUIRE((grad.R - via_full).cwiseAbs().maxCoeff() <= 64 * 16 * eps<double>() * via_full.cwiseAbs().maxCoeff() + 1e-300);
}

TEST_CASE("from_update on a flat spectrum: randomised SVDs vs the exact truncation", "[lora_sb][flat]") {
    // −η sign(G) of a Gaussian G: a sign matrix, whose spectrum is flat (Marchenko–Pastur), the
    // case where the reference codes' randomised SVDs are least faithful.
    const Index n = 600, r = 16;
    const Matrix<double> dW = approximate_update(gaussian(n, n, 77), 1e-3);
    const auto exact = linalg::truncated_svd(dW, r);
    const Matrix<double> Mr = exact.reconstruct();
    const double optimal = (dW - Mr).norm();
    INFO("sigma_1 = " << exact.S(0) << ", sigma_16 = " << exact.S(r - 1));
    struct Variant {
        const char* name;
        linalg::SVDOptions svd;
    };
    const Variant variants[] = {
        {"exact (SVDMethod::exact)", {.method = linalg::SVDMethod::exact}},
        {"library default above 512: randomized p = 10, q = 4", {}},
        {"like the LoRA-XS code: p = 10, q = 10", {.method = linalg::SVDMethod::randomized, .oversampling = 10, .power_iterations = 10}},
        {"like LoRA-SB's code: p = 0, q = 2", {.method = linalg::SVDMethod::randomized, .oversampling = 0, .power_iterations = 2}},
        {"no power iteration: p = 10, q = 0", {.method = linalg::SVDMethod::randomized, .oversampling = 10, .power_iterations = 0}},
    };
    for (const auto& v : variants) {
        const auto xs = LoraXS<double>::from_update(dW, {.rank = r, .alpha = double(r), .svd = v.svd});
        const Matrix<double> delta = xs.B() * xs.R() * xs.A();  // s = 1
        const double residual = (dW - delta).norm();
        const double rel_diff = (delta - Mr).norm() / Mr.norm();
        const double captured = (dW.squaredNorm() - residual * residual) / (dW.squaredNorm() - optimal * optimal);
        WARN(v.name << ": ||s B R A - dW_r||_F / ||dW_r||_F = " << rel_diff
                    << ", residual / optimal - 1 = " << residual / optimal - 1
                    << ", share of the optimal rank-r energy captured = " << captured);
        REQUIRE(residual >= optimal * (1 - 1e-12));
        if (v.svd.method == linalg::SVDMethod::exact) REQUIRE(rel_diff <= 1e-12);
    }
}

TEST_CASE("bad LoRA-SB arguments raise lowrank::error", "[lora_sb][errors]") {
    using Catch::Contains;
    SECTION("accumulator shapes and counts") {
        REQUIRE_THROWS_WITH(GradientAccumulator<float>(0, 3), Contains("GradientAccumulator") && Contains("0 x 3"));
        GradientAccumulator<float> acc(4, 3);
        REQUIRE_THROWS_WITH(acc.gradient(), Contains("gradient: no batch"));
        REQUIRE_THROWS_WITH(acc.add_gradient(Matrix<float>::Zero(3, 4)),
                            Contains("add_gradient") && Contains("G is 3 x 4") && Contains("expected 4 x 3"));
        const Matrix<float> X53 = Matrix<float>::Zero(5, 3), dY44 = Matrix<float>::Zero(4, 4),
                            dY54 = Matrix<float>::Zero(5, 4);
        REQUIRE_THROWS_WITH(acc.add_linear(X53, dY44),
                            Contains("add_linear") && Contains("dY is 4 x 4") && Contains("expected 5 x 4"));
        REQUIRE_THROWS_WITH(acc.add_linear(X53, dY54, -1),
                            Contains("batches must be >= 0"));
        Matrix<float> nan = Matrix<float>::Zero(4, 3);
        nan(0, 0) = NAN;
        REQUIRE_THROWS_WITH(acc.add_gradient(nan), Contains("non-finite"));
        REQUIRE(acc.batches() == 0);
        REQUIRE(acc.sum().isZero(0));
    }
    SECTION("update approximation: zero, non-finite, bad learning rate") {
        REQUIRE_THROWS_WITH(approximate_update(Matrix<double>::Zero(3, 2), 1e-3),
                            Contains("lowrank::approximate_update") && Contains("G (3 x 2) is zero"));
        Matrix<double> G = Matrix<double>::Ones(3, 2);
        REQUIRE_THROWS_WITH(approximate_update(G, 0.0), Contains("learning rate must be finite and > 0"));
        REQUIRE_THROWS_WITH(approximate_update(G, NAN), Contains("learning rate"));
        G(1, 1) = INFINITY;
        REQUIRE_THROWS_WITH(approximate_update(G, 1e-3), Contains("non-finite"));
        GradientAccumulator<double> acc(3, 2);
        acc.add_gradient(Matrix<double>::Zero(3, 2));
        REQUIRE_THROWS_WITH(lora_sb_init(acc, 1e-3, {.rank = 1}), Contains("is zero"));
    }
    SECTION("optimal gradient: wrong shape, rank-deficient factors") {
        Matrix<double> B = random_matrix<double>(8, 3, 1);
        B.col(2) = B.col(0);
        const auto xs = LoraXS<double>::from_factors(B, random_matrix<double>(3, 6, 2), Matrix<double>::Zero(3, 3), 3);
        REQUIRE_THROWS_WITH(optimal_core_gradient(xs, Matrix<double>::Zero(3, 2)),
                            Contains("lowrank::OptimalCoreGradient") && Contains("g_R is 3 x 2"));
        REQUIRE_THROWS_WITH(optimal_core_gradient(xs, Matrix<double>::Zero(3, 3)),
                            Contains("lowrank::OptimalCoreGradient") && Contains("Gram matrix of B (8 x 3)") &&
                                Contains("singular"));
        REQUIRE_THROWS_WITH(core_gradient(xs, Matrix<double>::Zero(6, 8)),
                            Contains("lowrank::core_gradient") && Contains("G is 6 x 8") && Contains("expected 8 x 6"));
    }
}
