// SPDX-License-Identifier: Apache-2.0
// LoRA-XS / LoRA-SB adapters: initialisations against matrices of known spectrum, forward,
// backward and merge against dense double-precision formulas, finite-difference checks of the
// gradient of R, expression use, and bad input.

#include <lowrank/expr/expr.hpp>
#include <lowrank/lora_xs.hpp>
#include <lowrank/testing/gradcheck.hpp>

#include <Eigen/QR>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::max_abs;
using lowrank::test::naive_product;
using lowrank::test::product_bound;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

namespace {

Matrix<double> orthonormal_columns(Index rows, Index cols, std::uint64_t seed) {
    Random rng(seed);
    Eigen::MatrixXd g(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) g(i, j) = rng.normal();
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
    return qr.householderQ() * Eigen::MatrixXd::Identity(rows, cols);
}

/// M = Q₁ diag(σ) Q₂ᵀ, σ_i = 0.7^i (relative gaps of 30%).
struct Known {
    Matrix<double> M, Q1, Q2;
    Eigen::VectorXd sigma;
    Matrix<double> top(Index r) const {
        return Q1.leftCols(r) * sigma.head(r).asDiagonal() * Q2.leftCols(r).transpose();
    }
};
Known known(Index out, Index in, std::uint64_t seed) {
    Known k;
    const Index p = std::min(out, in);
    k.sigma.resize(p);
    for (Index i = 0; i < p; ++i) k.sigma(i) = 2.0 * std::pow(0.7, double(i));
    k.Q1 = orthonormal_columns(out, p, seed);
    k.Q2 = orthonormal_columns(in, p, seed + 1);
    k.M = k.Q1 * k.sigma.asDiagonal() * k.Q2.transpose();
    return k;
}

/// Bound on the rounding of a chain of products M₁ M₂ … M_k in precision u: first order,
/// c · (Σ inner dimensions + k) · u · |M₁||M₂|…|M_k| with c = 2.
Matrix<double> chain_bound(std::initializer_list<Matrix<double>> factors, double u, double scale = 1) {
    Matrix<double> abs_prod;
    double dims = 0;
    bool first = true;
    for (const auto& f : factors) {
        if (first) {
            abs_prod = f.cwiseAbs();
            first = false;
        } else {
            dims += double(f.rows());
            abs_prod = naive_product(abs_prod, f.cwiseAbs());
        }
    }
    Matrix<double> b = 2 * (dims + double(factors.size()) + 2) * u * std::abs(scale) * abs_prod;
    b.array() += std::numeric_limits<double>::min();
    return b;
}

template <class T>
LoraXS<T> random_xs(Index out, Index in, Index r, double alpha, bool rslora, std::uint64_t seed) {
    return LoraXS<T>::from_factors(random_matrix<T>(out, r, seed), random_matrix<T>(r, in, seed + 1),
                                   random_matrix<T>(r, r, seed + 2), alpha, rslora);
}

// The SVD's backward error ‖E‖₂ ≤ c · n · u · σ₁ (c = 16, as in test_svd.cpp).
constexpr double c_svd = 16;

}  // namespace

TEMPLATE_TEST_CASE("from_weight: B = U_r, A = S_r V_rᵀ, R ~ N(0, σ²), W_eff ≈ W", "[lora_xs][init]",
                   float, double) {
    using T = TestType;
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{1, 1, 1},
                                       std::tuple<Index, Index, Index>{30, 20, 4},
                                       std::tuple<Index, Index, Index>{16, 40, 16});
    CAPTURE(out, in, r);
    const Known k = known(out, in, 3);
    const Matrix<T> W = k.M.template cast<T>();
    const auto xs = LoraXS<T>::from_weight(W, {.rank = r, .alpha = 16, .seed = 5});
    REQUIRE(xs.rank() == r);
    REQUIRE(xs.scale() == T(16.0 / double(r)));
    const Matrix<double> B = to_double(xs.B()), A = to_double(xs.A()), R = to_double(xs.R());
    const double u = eps<T>(), n = double(std::max(out, in));
    const double pert = c_svd * n * u * k.sigma(0);
    const double gap = r < k.sigma.size() ? k.sigma(r - 1) - k.sigma(r) : k.sigma(r - 1);
    // B has orthonormal columns spanning the top-r left singular subspace.
    REQUIRE((B.transpose() * B - Matrix<double>::Identity(r, r)).cwiseAbs().maxCoeff() <= c_svd * n * u);
    const Matrix<double> PB = k.Q1.leftCols(r) * k.Q1.leftCols(r).transpose();
    REQUIRE((B * B.transpose() - PB).cwiseAbs().maxCoeff() <= 2 * pert / gap + c_svd * n * u);
    // A = Bᵀ W (the LoRA-XS definition), and its rows are orthogonal with norms σ_i.
    require_within(A, naive_product(B.transpose(), k.M),
                   product_bound(B.transpose().cwiseAbs(), k.M.cwiseAbs(), u) +
                       Matrix<double>::Constant(r, in, 4 * pert),
                   "A = B^T W");
    const Matrix<double> AAt = A * A.transpose();
    for (Index i = 0; i < r; ++i) {
        REQUIRE(std::abs(std::sqrt(AAt(i, i)) - k.sigma(i)) <= pert + 2 * n * u * k.sigma(0));
        for (Index j = 0; j < r; ++j)
            if (i != j) REQUIRE(std::abs(AAt(i, j)) <= 4 * pert * k.sigma(0));
    }
    // B A is the best rank-r approximation W_r.
    REQUIRE((B * A - k.top(r)).cwiseAbs().maxCoeff() <= pert * (1 + 4 * k.sigma(0) / gap) + c_svd * n * u);
    // R: the seeded stream of N(0, σ²), σ = 1e-5 (values from the specified generator).
    Random rng(5);
    for (Index i = 0; i < r; ++i)
        for (Index j = 0; j < r; ++j) REQUIRE(xs.R()(i, j) == T(1e-5 * rng.normal()));
    REQUIRE(R.cwiseAbs().maxCoeff() <= 6e-5);
    // W_eff = W + s B R A differs from W by O(σ): |ΔW| ≤ s · |B||R||A|.
    Matrix<T> Weff = W;
    merge(Weff, xs);
    const Matrix<double> bound = double(xs.scale()) * naive_product(naive_product(B.cwiseAbs(), R.cwiseAbs()), A.cwiseAbs());
    REQUIRE(((to_double(Weff) - k.M).cwiseAbs() - bound - 2 * u * k.M.cwiseAbs()).maxCoeff() <= 4 * n * u * bound.maxCoeff() + 1e-300);
    // Same seed, same adapter.
    const auto again = LoraXS<T>::from_weight(W, {.rank = r, .alpha = 16, .seed = 5});
    REQUIRE(again.B() == xs.B());
    REQUIRE(again.A() == xs.A());
    REQUIRE(again.R() == xs.R());
    REQUIRE(again.factor_id() != xs.factor_id());
}

TEST_CASE("from_weight: the moments of R match N(0, σ²)", "[lora_xs][init]") {
    const Known k = known(60, 50, 9);
    const auto xs = LoraXS<double>::from_weight(k.M, {.rank = 40, .sigma = 0.3, .seed = 2});
    const Matrix<double>& R = xs.R();
    const double n = double(R.size()), sigma = 0.3;
    REQUIRE(std::abs(R.mean()) <= 5 * sigma / std::sqrt(n));
    const double var = (R.array() - R.mean()).square().sum() / (n - 1);
    REQUIRE(std::abs(var / (sigma * sigma) - 1) <= 5 * std::sqrt(2 / n));
}

TEMPLATE_TEST_CASE("from_update: s B R A is the best rank-r approximation of dW", "[lora_xs][init]",
                   float, double) {
    using T = TestType;
    const bool rslora = GENERATE(false, true);
    const Index out = 25, in = 35, r = 5;
    const Known k = known(out, in, 13);
    const Matrix<T> dW = (1e-3 * k.M).template cast<T>();
    const auto xs = LoraXS<T>::from_update(dW, {.rank = r, .alpha = 4, .rslora = rslora});
    const double s = rslora ? 4 / std::sqrt(5.0) : 4 / 5.0;
    REQUIRE(double(xs.scale()) == double(T(s)));
    const Matrix<double> B = to_double(xs.B()), A = to_double(xs.A()), R = to_double(xs.R());
    const double u = eps<T>(), n = 35;
    const double sig1 = 1e-3 * k.sigma(0), pert = c_svd * n * u * sig1;
    const double gap = 1e-3 * (k.sigma(r - 1) - k.sigma(r));
    // Orthonormal B and Aᵀ, diagonal R = σ / s.
    REQUIRE((B.transpose() * B - Matrix<double>::Identity(r, r)).cwiseAbs().maxCoeff() <= c_svd * n * u);
    REQUIRE((A * A.transpose() - Matrix<double>::Identity(r, r)).cwiseAbs().maxCoeff() <= c_svd * n * u);
    for (Index i = 0; i < r; ++i)
        for (Index j = 0; j < r; ++j) {
            if (i != j)
                REQUIRE(R(i, j) == 0);
            else
                REQUIRE(std::abs(R(i, i) * s - 1e-3 * k.sigma(i)) <= pert + 2 * u * 1e-3 * k.sigma(i));
        }
    // s B R A = dW_r, and the residual is the Eckart–Young optimum.
    const Matrix<double> delta = s * B * R * A;
    REQUIRE((delta - 1e-3 * k.top(r)).cwiseAbs().maxCoeff() <= pert * (1 + 4 * sig1 / gap) + c_svd * n * u * sig1);
    const double optimal = 1e-3 * std::sqrt(k.sigma.tail(k.sigma.size() - r).squaredNorm());
    REQUIRE(std::abs((1e-3 * k.M - delta).norm() - optimal) <= c_svd * n * u * sig1 * std::sqrt(2.0 * double(r)) * (1 + 4 * sig1 / gap));
}

TEMPLATE_TEST_CASE("forward and add_delta equal the dense formula", "[lora_xs][forward]", float, double) {
    using T = TestType;
    const Index n = GENERATE(0, 1, 9, 33);
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{1, 1, 1},
                                       std::tuple<Index, Index, Index>{19, 13, 4},
                                       std::tuple<Index, Index, Index>{24, 40, 17});
    CAPTURE(n, out, in, r);
    const auto xs = random_xs<T>(out, in, r, 3, false, 1);
    const Matrix<T> X = random_matrix<T>(n, in, 2), W = random_matrix<T>(out, in, 3);
    const Matrix<double> x = to_double(X), w = to_double(W), a = to_double(xs.A()),
                         b = to_double(xs.B()), R = to_double(xs.R());
    const double s = double(xs.scale()), u = eps<T>();
    const Matrix<double> delta = s * naive_product(naive_product(naive_product(x, a.transpose()), R.transpose()), b.transpose());
    const Matrix<double> delta_bound = chain_bound({x, a.transpose(), R.transpose(), b.transpose()}, u, s);
    const Matrix<double> base = naive_product(x, w.transpose());
    Matrix<T> Y;
    forward(X, W, xs, Y);
    require_within(Y, base + delta,
                   product_bound(x.cwiseAbs(), w.transpose().cwiseAbs(), u) + delta_bound +
                       2 * u * (base + delta).cwiseAbs(),
                   "forward");
    Matrix<T> Yd = random_matrix<T>(n, out, 4);
    const Matrix<double> Y0 = to_double(Yd);
    add_delta(X, xs, Yd);
    require_within(Yd, Y0 + delta, delta_bound + 2 * u * (Y0 + delta).cwiseAbs(), "add_delta");
    // As a term of an expression, beside a LoRA: equals the two deltas added.
    Lora<T> lora(out, in, {.rank = 1, .alpha = 2, .seed = 8});
    lora.B() = random_matrix<T>(out, 1, 9);
    const Matrix<T> Ye = linear(X, W + xs + 0.5 * lora);
    Matrix<T> Yref;
    forward(X, W, xs, Yref);
    const Matrix<double> lora_delta = 0.5 * double(lora.scale()) *
                                      naive_product(naive_product(x, to_double(lora.A()).transpose()),
                                                    to_double(lora.B()).transpose());
    require_within(Ye, base + delta + lora_delta,
                   product_bound(x.cwiseAbs(), w.transpose().cwiseAbs(), u) + delta_bound +
                       chain_bound({x, to_double(lora.A()).transpose(), to_double(lora.B()).transpose()}, u, 0.5 * double(lora.scale())) +
                       4 * u * (base + delta + lora_delta).cwiseAbs(),
                   "linear(X, W + xs + 0.5 * lora)");
}

TEMPLATE_TEST_CASE("backward equals the dense formulas", "[lora_xs][backward]", float, double) {
    using T = TestType;
    const Index n = GENERATE(0, 1, 8, 29);
    const Index r = GENERATE(1, 5);
    const Index out = 21, in = 15;
    CAPTURE(n, r);
    const auto xs = random_xs<T>(out, in, r, 7, true, 11);
    const Matrix<T> X = random_matrix<T>(n, in, 12), W = random_matrix<T>(out, in, 13),
                    dY = random_matrix<T>(n, out, 14);
    const Matrix<double> x = to_double(X), w = to_double(W), dy = to_double(dY), a = to_double(xs.A()),
                         b = to_double(xs.B()), R = to_double(xs.R());
    const double s = double(xs.scale()), u = eps<T>();
    // dR = s Bᵀ dYᵀ X Aᵀ (the full gradient dYᵀ X projected), dX = dY W + s dY B R A.
    const Matrix<double> dR = s * naive_product(naive_product(naive_product(b.transpose(), dy.transpose()), x), a.transpose());
    const Matrix<double> dX = naive_product(dy, w) + s * naive_product(naive_product(naive_product(dy, b), R), a);
    const Matrix<double> dR_bound = chain_bound({b.transpose(), dy.transpose(), x, a.transpose()}, u, s);
    const Matrix<double> dX_bound = product_bound(dy.cwiseAbs(), w.cwiseAbs(), u) +
                                    chain_bound({dy, b, R, a}, u, s) + 2 * u * dX.cwiseAbs();
    LoraXSGrad<T> grad;
    Matrix<T> dXc;
    backward(X, W, xs, dY, grad, dXc);
    require_within(grad.R, dR, dR_bound, "dR");
    require_within(dXc, dX, dX_bound, "dX");
    LoraXSGrad<T> g2;
    backward(X, W, xs, dY, g2);
    REQUIRE(g2.R == grad.R);
    LoraXSGrad<T> g3;
    Matrix<T> dXa;
    backward_delta(X, xs, dY, g3, dXa);
    REQUIRE(g3.R == grad.R);
    const Matrix<double> dXa_ref = s * naive_product(naive_product(naive_product(dy, b), R), a);
    require_within(dXa, dXa_ref, chain_bound({dy, b, R, a}, u, s) + 2 * u * dXa_ref.cwiseAbs(), "dXa");
    // The forms with a workspace (one shared by all four, grown by the first) give the same values.
    Workspace<T> ws;
    LoraXSGrad<T> gw;
    Matrix<T> dXw, dXaw;
    backward(X, W, xs, dY, gw, dXw, ws);
    REQUIRE(gw.R == grad.R);
    REQUIRE(dXw == dXc);
    gw.R.setZero();
    backward(X, W, xs, dY, gw, ws);
    REQUIRE(gw.R == grad.R);
    gw.R.setZero();
    backward_delta(X, xs, dY, gw, dXaw, ws);
    REQUIRE(gw.R == grad.R);
    REQUIRE(dXaw == dXa);
    gw.R.setZero();
    backward_delta(X, xs, dY, gw, ws);
    REQUIRE(gw.R == grad.R);
}

TEST_CASE("LoRA-XS gradients of R and X pass the finite-difference check (double)", "[lora_xs][gradcheck]") {
    const Index n = 6, out = 8, in = 7, r = 3;
    const auto xs = random_xs<double>(out, in, r, 5, false, 21);
    const Matrix<double> X = random_matrix<double>(n, in, 22), W = random_matrix<double>(out, in, 23),
                         dY = random_matrix<double>(n, out, 24);
    LoraXSGrad<double> grad;
    Matrix<double> dX;
    backward(X, W, xs, dY, grad, dX);
    auto y_of_R = [&](const Matrix<double>& R) {
        auto l = xs;
        l.R() = R;
        Matrix<double> Y;
        forward(X, W, l, Y);
        return Y;
    };
    auto y_of_X = [&](const Matrix<double>& Xv) {
        Matrix<double> Y;
        forward(Xv, W, xs, Y);
        return Y;
    };
    const auto rR = testing::check_vjp(y_of_R, xs.R(), dY, grad.R);
    const auto rX = testing::check_vjp(y_of_X, X, dY, dX);
    INFO(rR.message() << "\n" << rX.message());
    REQUIRE(rR.ok);
    REQUIRE(rX.ok);
    // A wrong gradient fails the same check (the check can fail).
    const Matrix<double> wrong = grad.R.transpose();
    REQUIRE_FALSE(testing::check_vjp(y_of_R, xs.R(), dY, wrong).ok);
}

TEMPLATE_TEST_CASE("merge equals W + s B R A; unmerge returns W; dense(W + xs) = merge", "[lora_xs][merge]",
                   float, double) {
    using T = TestType;
    const auto xs = random_xs<T>(37, 29, 6, 12, false, 41);
    const Matrix<T> W0 = random_matrix<T>(37, 29, 42);
    const double s = double(xs.scale()), u = eps<T>();
    const Matrix<double> b = to_double(xs.B()), R = to_double(xs.R()), a = to_double(xs.A());
    const Matrix<double> dW = s * naive_product(naive_product(b, R), a);
    const Matrix<double> dW_err = chain_bound({b, R, a}, u, s);
    Matrix<T> W = W0;
    merge(W, xs);
    require_within(W, to_double(W0) + dW, dW_err + 2 * u * (to_double(W0) + dW).cwiseAbs(), "merged");
    const Matrix<T> Wd = dense(W0 + xs);
    REQUIRE(Wd == W);
    unmerge(W, xs);
    require_within(W, to_double(W0),
                   1.01 * u * (2 * to_double(W0).cwiseAbs() + dW.cwiseAbs() + dW_err).array() +
                       std::numeric_limits<double>::min(),
                   "round trip");
    Matrix<T> Wh = W0;
    merge(Wh, xs, T(-0.5));
    require_within(Wh, to_double(W0) - 0.5 * dW, 0.5 * dW_err + 2 * u * (to_double(W0) - 0.5 * dW).cwiseAbs(),
                   "weighted merge");
}

TEST_CASE("bad LoRA-XS arguments raise lowrank::error naming the function and shapes", "[lora_xs][errors]") {
    using Catch::Contains;
    const Matrix<float> W = random_matrix<float>(6, 5, 1), X(3, 5), dY(3, 6);
    SECTION("rank out of range") {
        REQUIRE_THROWS_WITH(LoraXS<float>::from_weight(W, {.rank = 6}),
                            Contains("lowrank::LoraXS::from_weight") && Contains("rank 6 is out of range") &&
                                Contains("6 x 5"));
        REQUIRE_THROWS_WITH(LoraXS<float>::from_update(W, {.rank = 0}),
                            Contains("lowrank::LoraXS::from_update") && Contains("rank 0"));
    }
    SECTION("non-finite entries, alpha or sigma") {
        Matrix<float> bad = W;
        bad(4, 1) = INFINITY;
        REQUIRE_THROWS_WITH(LoraXS<float>::from_weight(bad, {.rank = 2}),
                            Contains("from_weight") && Contains("W (6 x 5) has a non-finite entry at (4, 1)"));
        REQUIRE_THROWS_WITH(LoraXS<float>::from_update(bad, {.rank = 2}),
                            Contains("from_update") && Contains("dW (6 x 5) has a non-finite entry"));
        REQUIRE_THROWS_WITH(LoraXS<float>::from_weight(W, {.rank = 2, .alpha = NAN}), Contains("alpha must be finite"));
        REQUIRE_THROWS_WITH(LoraXS<float>::from_weight(W, {.rank = 2, .sigma = -1}), Contains("sigma must be finite and >= 0"));
        REQUIRE_THROWS_WITH(LoraXS<float>::from_update(W, {.rank = 2, .alpha = 0}), Contains("alpha must be non-zero"));
    }
    SECTION("inconsistent factors") {
        REQUIRE_THROWS_WITH(LoraXS<float>::from_factors(Matrix<float>(6, 2), Matrix<float>(3, 5), Matrix<float>(2, 2), 1),
                            Contains("from_factors") && Contains("B is 6 x 2, A is 3 x 5 and R is 2 x 2"));
    }
    auto xs = LoraXS<float>::from_weight(W, {.rank = 2});
    SECTION("X, W, dY of the wrong shape") {
        Matrix<float> Y;
        REQUIRE_THROWS_WITH(forward(Matrix<float>(3, 4), W, xs, Y),
                            Contains("lowrank::forward") && Contains("X is 3 x 4") && Contains("expected any x 5"));
        REQUIRE_THROWS_WITH(forward(X, Matrix<float>(5, 5), xs, Y), Contains("W is 5 x 5"));
        LoraXSGrad<float> g;
        Matrix<float> dX;
        REQUIRE_THROWS_WITH(backward(X, W, xs, Matrix<float>(3, 5), g, dX),
                            Contains("lowrank::backward") && Contains("dY is 3 x 5") && Contains("expected 3 x 6"));
        Matrix<float> Ybig = Matrix<float>::Constant(4, 6, 2.f);
        REQUIRE_THROWS_WITH(add_delta(X, xs, Ybig), Contains("lowrank::add_delta") && Contains("Y is 4 x 6"));
        REQUIRE(Ybig.isConstant(2.f));
        Matrix<float> Wt(5, 6);
        REQUIRE_THROWS_WITH(merge(Wt, xs), Contains("lowrank::merge") && Contains("W is 5 x 6"));
    }
    SECTION("a resized core") {
        xs.R().resize(3, 3);
        Matrix<float> Y;
        REQUIRE_THROWS_WITH(forward(X, W, xs, Y), Contains("core was resized") && Contains("R is 3 x 3"));
    }
}

#if __has_include(<lowrank/compose.hpp>)
#include <lowrank/compose.hpp>

TEST_CASE("a masked LoRA-XS term scales each token's delta by its mask", "[lora_xs][masked]") {
    const Index n = 5, out = 9, in = 7, r = 3;
    const auto xs = random_xs<double>(out, in, r, 4, false, 51);
    const Matrix<double> X = random_matrix<double>(n, in, 52), W = random_matrix<double>(out, in, 53);
    Vector<double> mask(n);
    mask << 1, 0, 0.5, -2, 1;
    const Matrix<double> Y = linear(X, W + xs.masked(mask));
    const Matrix<double> delta = double(xs.scale()) * X * xs.A().transpose() * xs.R().transpose() * xs.B().transpose();
    const Matrix<double> want = X * W.transpose() + mask.asDiagonal() * delta;
    REQUIRE((Y - want).cwiseAbs().maxCoeff() <= 64 * 16 * eps<double>() * (1 + want.cwiseAbs().maxCoeff()));
}
#endif
