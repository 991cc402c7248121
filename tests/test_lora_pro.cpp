// SPDX-License-Identifier: Apache-2.0
// LoRA-Pro: the closed-form correction against brute-force least squares and dense Kronecker
// solves in double, the projector form of the equivalent gradient, its independence of X, PEFT's
// B = 0 and r = 1; the streaming full-mode pass against a dense double computation with derived
// bounds; the optimiser's two modes against independent implementations; an end-to-end
// comparison with full fine-tuning and plain LoRA; state files; every bad argument.

#include <lowrank/lora_pro.hpp>
#include <lowrank/testing/gradcheck.hpp>

#include <Eigen/Dense>

#include <cstdio>
#include <filesystem>
#include <fstream>


#include "lora_support.hpp"

using namespace lowrank;
using namespace lowrank::pro;
using lowrank::test::eps;
using lowrank::test::naive_product;
using lowrank::test::product_bound;
using lowrank::test::random_lora;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;
using Catch::Matchers::Contains;

namespace {

using Dbl = Matrix<double>;
using Dense = Eigen::MatrixXd;

/// The ordinary LoRA gradients of a full gradient G: gA = s Bᵀ G, gB = s G Aᵀ (naive, double).
struct Grads {
    Dbl gA, gB;
};
template <class T>
Grads lora_grads(const Lora<T>& lora, const Dbl& G) {
    const double s = double(lora.scale());
    return {s * naive_product(to_double(lora.B()).transpose(), G),
            s * naive_product(G, to_double(lora.A()).transpose())};
}

Dbl inverse_of(Dbl M, double damping) {
    M.diagonal().array() += damping;
    return Dense(M).inverse();
}

/// The X = 0 closed form, written out with explicit inverses (independent of the library).
struct Closed {
    Dbl gA0, gB0, P, Q;
};
template <class T>
Closed closed_form(const Lora<T>& lora, const Dbl& gA, const Dbl& gB, double damping) {
    const Dbl a = to_double(lora.A()), b = to_double(lora.B());
    const double s = double(lora.scale());
    Closed c;
    c.P = inverse_of(b.transpose() * b, damping);
    c.Q = inverse_of(a * a.transpose(), damping);
    const Dbl I = Dbl::Identity(b.rows(), b.rows());
    c.gA0 = c.P * gA / (s * s);
    c.gB0 = (I - b * c.P * b.transpose()) * gB * c.Q / (s * s);
    return c;
}

/// The X minimising ‖g⁰_A + X A − gA‖² + ‖g⁰_B − B X − gB‖², by a dense least-squares solve over
/// the r² entries of X (column k·r + l is X = E_kl).
template <class T>
Dbl kronecker_x(const Lora<T>& lora, const Dbl& gA, const Dbl& gB, const Closed& c) {
    const Dbl a = to_double(lora.A()), b = to_double(lora.B());
    const Index r = a.rows(), in = a.cols(), out = b.rows();
    Dense M = Dense::Zero(r * in + out * r, r * r);
    Eigen::VectorXd rhs(r * in + out * r);
    for (Index k = 0; k < r; ++k)
        for (Index l = 0; l < r; ++l) {
            for (Index j = 0; j < in; ++j) M(k * in + j, k * r + l) = a(l, j);     // (E_kl A)_kj
            for (Index i = 0; i < out; ++i) M(r * in + i * r + l, k * r + l) = -b(i, k);  // −(B E_kl)_il
        }
    for (Index k = 0; k < r; ++k)
        for (Index j = 0; j < in; ++j) rhs(k * in + j) = gA(k, j) - c.gA0(k, j);
    for (Index i = 0; i < out; ++i)
        for (Index l = 0; l < r; ++l) rhs(r * in + i * r + l) = gB(i, l) - c.gB0(i, l);
    Eigen::CompleteOrthogonalDecomposition<Dense> cod(M);
    const Eigen::VectorXd x = cod.solve(rhs);
    Dbl X(r, r);
    for (Index k = 0; k < r; ++k)
        for (Index l = 0; l < r; ++l) X(k, l) = x(k * r + l);
    return X;
}

/// c·|x| entrywise, plus the smallest normal (so exact zeros compare with a zero bound).
Dbl rel_bound(const Dbl& x, double c) {
    Dbl b = c * x.cwiseAbs();
    b.array() += std::numeric_limits<double>::min();
    return b;
}

double cond(const Dbl& M) {
    Eigen::JacobiSVD<Dense> svd(M);
    const auto& sv = svd.singularValues();
    return sv(0) / sv(sv.size() - 1);
}

/// κ of the correction: it applies (BᵀB + δI)⁻¹ and (AAᵀ + δI)⁻¹, so relative perturbations are
/// amplified by at most the product of their condition numbers (times the projector's 1 + κ_B).
template <class T>
double correction_condition(const Lora<T>& lora, double damping) {
    const Dbl a = to_double(lora.A()), b = to_double(lora.B());
    Dbl bb = b.transpose() * b, aa = a * a.transpose();
    bb.diagonal().array() += damping;
    aa.diagonal().array() += damping;
    return (1 + cond(bb)) * cond(aa);
}

std::string temp_path(const char* name) {
    return test::unique_temp_path(std::string("test_lora_pro_") + name).string();
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// The correction
// ------------------------------------------------------------------------------------------------

TEST_CASE("the equivalent gradient is the least-squares fit of G (brute force, double)",
          "[lora_pro][closed_form]") {
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{6, 5, 2},
                                       std::tuple<Index, Index, Index>{7, 4, 1},
                                       std::tuple<Index, Index, Index>{5, 8, 3},
                                       std::tuple<Index, Index, Index>{4, 4, 4});
    CAPTURE(out, in, r);
    const Lora<double> lora = random_lora<double>(out, in, r, 2.0 * r, 11);
    const double s = lora.scale();
    const Dbl G = random_matrix<double>(out, in, 12);
    const Grads grads_ = lora_grads(lora, G);
    const Dbl &gA = grads_.gA, &gB = grads_.gB;
    const Dbl a = lora.A(), b = lora.B();

    // min over (g_A, g_B) of ‖s(B g_A + g_B A) − G‖: unknowns g_A (row-major, k·in + j) then
    // g_B (r·in + i·r + k); the fitted matrix is unique even though the minimiser is not.
    Dense M = Dense::Zero(out * in, r * in + out * r);
    for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j)
            for (Index k = 0; k < r; ++k) {
                M(i * in + j, k * in + j) = s * b(i, k);
                M(i * in + j, r * in + i * r + k) = s * a(k, j);
            }
    Eigen::VectorXd g(out * in);
    for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j) g(i * in + j) = G(i, j);
    Eigen::CompleteOrthogonalDecomposition<Dense> cod(M);
    cod.setThreshold(1e-10);
    const Eigen::VectorXd fit = M * cod.solve(g);
    Dbl want(out, in);
    for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j) want(i, j) = fit(i * in + j);

    // Normwise: the fitted values of a backward-stable least-squares solve are accurate to
    // ≈ (rows)·u·κ(M)·‖G‖; the closed form to ≈ κ_correction·(out + in)·u·‖G‖. c = 8.
    Eigen::JacobiSVD<Dense> svd(M);
    const auto& sv = svd.singularValues();
    Index rank = 0;
    while (rank < sv.size() && sv(rank) > 1e-10 * sv(0)) ++rank;
    REQUIRE(rank == r * (in + out) - r * r);  // the tangent space {B Y + Z A} has this dimension
    const double kappa = sv(0) / sv(rank - 1) + correction_condition(lora, 0.0);
    const double tol = 8 * double(out * in) * eps<double>() * kappa * G.norm();

    const AdjustOptions exact{.damping = 0.0};
    const Dbl E = equivalent_gradient(lora, gA, gB, exact).dense();
    INFO("equivalent gradient vs brute force: " << (E - want).norm() << " (tol " << tol << ")");
    REQUIRE((E - want).norm() <= tol);
    for (XChoice x : {XChoice::sylvester, XChoice::symmetry, XChoice::zero}) {
        const auto d = adjust(lora, gA, gB, {.damping = 0.0, .x = x});
        const Dbl step = s * (b * d.A + d.B * a);
        CAPTURE(int(x));
        REQUIRE((step - want).norm() <= tol);
    }
    // And the residual is orthogonal to the tangent space: the fit is not worse than G itself.
    REQUIRE((G - E).norm() <= G.norm());
}

TEST_CASE("corrected gradients are a stationary point of the fit (finite differences)",
          "[lora_pro][gradcheck]") {
    const Lora<double> lora = random_lora<double>(6, 7, 2, 4.0, 21);
    const double s = lora.scale();
    const Dbl G = random_matrix<double>(6, 7, 22);
    const Grads grads_ = lora_grads(lora, G);
    const Dbl &gA = grads_.gA, &gB = grads_.gB;
    const auto d = adjust(lora, gA, gB, {.damping = 0.0});
    const Dbl a = lora.A(), b = lora.B();
    const testing::GradCheckOptions tight{.step = 1e-6, .rtol = 1e-6, .atol = 1e-7};
    // f(g_A) = ½‖s(B g_A + g_B A) − G‖² has zero gradient at the optimum, and likewise in g_B.
    auto fit_a = [&](const Dbl& ga) { return 0.5 * (s * (b * ga + d.B * a) - G).squaredNorm(); };
    auto fit_b = [&](const Dbl& gb) { return 0.5 * (s * (b * d.A + gb * a) - G).squaredNorm(); };
    const auto ra = testing::check_gradient(fit_a, d.A, Dbl::Zero(2, 7), tight);
    INFO(ra.message());
    REQUIRE(ra.ok);
    const auto rb = testing::check_gradient(fit_b, d.B, Dbl::Zero(6, 2), tight);
    INFO(rb.message());
    REQUIRE(rb.ok);
    // The Sylvester X is a stationary point of the distance to the ordinary gradients (any δ).
    for (double damping : {0.0, 1e-8, 0.3}) {
        const auto dd = adjust(lora, gA, gB, {.damping = damping});
        const Closed c = closed_form(lora, gA, gB, damping);
        auto dist = [&](const Dbl& X) {
            return 0.5 * ((c.gA0 + X * a - gA).squaredNorm() + (c.gB0 - b * X - gB).squaredNorm());
        };
        const auto rx = testing::check_gradient(dist, dd.X, Dbl::Zero(2, 2), tight);
        INFO("damping " << damping << ": " << rx.message());
        REQUIRE(rx.ok);
    }
    // The check can fail: X = 0 is not stationary.
    const auto dz = adjust(lora, gA, gB, {.damping = 0.0, .x = XChoice::zero});
    const Closed c0 = closed_form(lora, gA, gB, 0.0);
    auto dist0 = [&](const Dbl& X) {
        return 0.5 * ((c0.gA0 + X * a - gA).squaredNorm() + (c0.gB0 - b * X - gB).squaredNorm());
    };
    REQUIRE_FALSE(testing::check_gradient(dist0, dz.X, Dbl::Zero(2, 2), tight).ok);
}

TEST_CASE("the equivalent gradient equals P_B G + (I − P_B) G P_A", "[lora_pro][closed_form]") {
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{9, 6, 2},
                                       std::tuple<Index, Index, Index>{5, 12, 1},
                                       std::tuple<Index, Index, Index>{8, 8, 5});
    const double damping = GENERATE(0.0, 1e-8, 0.25);
    CAPTURE(out, in, r, damping);
    const Lora<double> lora = random_lora<double>(out, in, r, 8.0, 31);
    const Dbl G = random_matrix<double>(out, in, 32);
    const Grads grads_ = lora_grads(lora, G);
    const Dbl &gA = grads_.gA, &gB = grads_.gB;
    const Dbl a = lora.A(), b = lora.B();
    Dbl PB, PA;
    if (damping == 0) {  // orthogonal projectors from SVD bases (independent of any inverse)
        Eigen::JacobiSVD<Dense> sb(Dense(b), Eigen::ComputeThinU), sa(Dense(a.transpose()), Eigen::ComputeThinU);
        PB = sb.matrixU() * sb.matrixU().transpose();
        PA = sa.matrixU() * sa.matrixU().transpose();
    } else {  // the damped "projectors" B (BᵀB + δI)⁻¹ Bᵀ and Aᵀ (AAᵀ + δI)⁻¹ A
        PB = b * inverse_of(b.transpose() * b, damping) * b.transpose();
        PA = a.transpose() * inverse_of(a * a.transpose(), damping) * a;
    }
    const Dbl I = Dbl::Identity(out, out);
    const Dbl want = PB * G + (I - PB) * G * PA;
    const Dbl E = equivalent_gradient(lora, gA, gB, {.damping = damping}).dense();
    const double tol = 8 * double(out + in) * eps<double>() * correction_condition(lora, damping) * G.norm();
    INFO("error " << (E - want).norm() << " tol " << tol);
    REQUIRE((E - want).norm() <= tol);
    // Factored form: out × 2r times 2r × in.
    const auto eg = equivalent_gradient(lora, gA, gB, {.damping = damping});
    REQUIRE(eg.left.rows() == out);
    REQUIRE(eg.left.cols() == 2 * r);
    REQUIRE(eg.right.rows() == 2 * r);
    REQUIRE(eg.right.cols() == in);
    Dbl E2;
    equivalent_gradient(lora, gA, gB, E2, {.damping = damping});
    REQUIRE(E2 == E);
}

TEST_CASE("the Sylvester X minimises the distance to the ordinary gradients (Kronecker solve)",
          "[lora_pro][x]") {
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{7, 5, 2},
                                       std::tuple<Index, Index, Index>{6, 9, 3},
                                       std::tuple<Index, Index, Index>{4, 3, 1});
    const double damping = GENERATE(0.0, 1e-8, 0.5);
    CAPTURE(out, in, r, damping);
    const Lora<double> lora = random_lora<double>(out, in, r, 4.0, 41);
    const Dbl G = random_matrix<double>(out, in, 42);
    const Grads grads_ = lora_grads(lora, G);
    const Dbl &gA = grads_.gA, &gB = grads_.gB;
    const Closed c = closed_form(lora, gA, gB, damping);
    const Dbl want = kronecker_x(lora, gA, gB, c);
    const auto d = adjust(lora, gA, gB, {.damping = damping});
    const double tol = 8 * double(out + in) * eps<double>() * correction_condition(lora, damping) *
                       (want.norm() + c.gA0.norm() + c.gB0.norm());
    INFO("X error " << (d.X - want).norm() << " tol " << tol);
    REQUIRE((d.X - want).norm() <= tol);
    // The closed form with that X, written out independently.
    const Dbl a = lora.A(), b = lora.B();
    REQUIRE((d.A - (c.gA0 + want * a)).norm() <= tol * (1 + a.norm()));
    REQUIRE((d.B - (c.gB0 - b * want)).norm() <= tol * (1 + b.norm()));
    // No other choice is closer.
    auto distance = [&](const Adjusted<double>& x) {
        return (x.A - gA).squaredNorm() + (x.B - gB).squaredNorm();
    };
    for (XChoice x : {XChoice::symmetry, XChoice::zero})
        REQUIRE(distance(d) <= distance(adjust(lora, gA, gB, {.damping = damping, .x = x})) * (1 + 1e-12));
    // "symmetry" is the authors' formula −(1/(2s²)) P (Bᵀ gB) (AAᵀ).
    const double s = lora.scale();
    const Dbl Xsym = -0.5 / (s * s) * c.P * (b.transpose() * gB) * (a * a.transpose());
    const auto dsym = adjust(lora, gA, gB, {.damping = damping, .x = XChoice::symmetry});
    REQUIRE((dsym.X - Xsym).norm() <= tol * (1 + Xsym.norm()));
}

TEMPLATE_TEST_CASE("the equivalent gradient does not depend on X; float rounds the double result",
                   "[lora_pro][x]", float, double) {
    using T = TestType;
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{12, 10, 3},
                                       std::tuple<Index, Index, Index>{3, 17, 1},
                                       std::tuple<Index, Index, Index>{33, 20, 8});
    CAPTURE(out, in, r);
    const Lora<T> lora = random_lora<T>(out, in, r, 16.0, 51);
    const Matrix<T> G = random_matrix<T>(out, in, 52);
    const Matrix<T> gA = (lora.scale() * (lora.B().transpose() * G)).eval();
    const Matrix<T> gB = (lora.scale() * (G * lora.A().transpose())).eval();
    // The same scale exactly (s·r / r is exact in double for a float s).
    const Lora<double> lora_d = Lora<double>::from_factors(to_double(lora.A()), to_double(lora.B()),
                                                           double(lora.scale()) * double(r));
    const Dbl want = equivalent_gradient(lora_d, to_double(gA), to_double(gB)).dense();
    const Dbl a = to_double(lora.A()), b = to_double(lora.B());
    const double s = double(lora.scale());
    // Everything inside adjust is double and rounded to T once, so each output entry is within
    // u_T·|entry| of the double result (plus the double-precision error of the solve, and the
    // rounding of the products below: γ_r|B||g_A| + γ_r|g_B||A|).
    const double kappa = correction_condition(lora, 1e-8);
    for (XChoice x : {XChoice::sylvester, XChoice::symmetry, XChoice::zero}) {
        CAPTURE(int(x));
        const auto d = adjust(lora, gA, gB, {.x = x});
        const auto dd = adjust(lora_d, to_double(gA), to_double(gB), {.x = x});
        const Dbl slack = Dbl::Constant(r, in, 16 * double(out + in) * eps<double>() * kappa *
                                                  (dd.A.norm() + 1));
        require_within(d.A, dd.A, (eps<T>() * dd.A.cwiseAbs() + slack).eval(), "g_A vs double");
        const Dbl slackB = Dbl::Constant(out, r, 16 * double(out + in) * eps<double>() * kappa *
                                                     (dd.B.norm() + 1));
        require_within(d.B, dd.B, (eps<T>() * dd.B.cwiseAbs() + slackB).eval(), "g_B vs double");
        // s(B g_A + g_B A) from each X agrees with the X-free equivalent gradient.
        const Dbl ga = to_double(d.A), gb = to_double(d.B);
        const Dbl step = s * (naive_product(b, ga) + naive_product(gb, a));
        const Dbl bound =
            s * (product_bound(b.cwiseAbs(), (ga.cwiseAbs() + eps<T>() * dd.A.cwiseAbs()).eval(), eps<T>()) +
                 product_bound((gb.cwiseAbs() + eps<T>() * dd.B.cwiseAbs()).eval(), a.cwiseAbs(), eps<T>())) +
            Dbl::Constant(out, in, 64 * double(out + in) * eps<T>() * kappa * want.norm());
        require_within(step, want, bound, "s(B g_A + g_B A) vs equivalent gradient");
    }
}

TEMPLATE_TEST_CASE("PEFT's zero B and rank 1 work from step 1 without special cases",
                   "[lora_pro][init]", float, double) {
    using T = TestType;
    const Index r = GENERATE(1, 3);
    CAPTURE(r);
    Lora<T> lora(10, 8, {.rank = r, .alpha = 2.0 * r, .seed = 61});  // B = 0
    REQUIRE(lora.B().isZero(0));
    const Matrix<T> X = random_matrix<T>(5, 8, 62), W = random_matrix<T>(10, 8, 63),
                    dY = random_matrix<T>(5, 10, 64);
    LoraGrad<T> grad;
    backward(X, W, lora, dY, grad);
    REQUIRE(grad.A.isZero(0));  // gA = s Bᵀ G = 0
    for (XChoice x : {XChoice::sylvester, XChoice::symmetry, XChoice::zero}) {
        const auto d = adjust(lora, grad.A, grad.B, {.x = x});
        REQUIRE(d.A.allFinite());
        REQUIRE(d.B.allFinite());
        REQUIRE(d.A.isZero(0));
        REQUIRE(d.X.isZero(0));
        // g_B = (1/s²) gB (AAᵀ + δI)⁻¹, computed independently in double.
        const double s = double(lora.scale());
        const Dbl a = to_double(lora.A());
        const Dbl want = to_double(grad.B) * inverse_of(a * a.transpose(), 1e-8) / (s * s);
        const double kappa = correction_condition(lora, 1e-8);
        require_within(d.B, want,
                       (eps<T>() * want.cwiseAbs() +
                        Dbl::Constant(10, r, 16 * 18 * eps<double>() * kappa * want.norm()))
                           .eval(),
                       "g_B at B = 0");
    }
    // Both optimiser modes take a finite first step; in full mode A does not move (d_A = 0).
    for (Mode mode : {Mode::efficient, Mode::full}) {
        Lora<T> l = lora;
        AdamW<T> opt(l, {.lr = 1e-2, .mode = mode});
        opt.step(l, grad.A, grad.B);
        REQUIRE(l.A().allFinite());
        REQUIRE(l.B().allFinite());
        REQUIRE_FALSE(l.B().isZero(0));
        REQUIRE(l.A() == lora.A());
        opt.step(l, grad.A, grad.B);  // second step: B ≠ 0 now, but BᵀB ≪ δ is possible
        REQUIRE(l.A().allFinite());
        REQUIRE(l.B().allFinite());
    }
}

// ------------------------------------------------------------------------------------------------
// The streaming full-mode pass
// ------------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("the streaming full pass equals the dense double computation",
                   "[lora_pro][full]", float, double) {
    using T = TestType;
    const Index out = GENERATE(1, 7, 13);
    const Index in = GENERATE(1, 9, 300, 1030);
    const Index r = GENERATE(1, 3);
    const bool simd = GENERATE(true, false);
    CAPTURE(out, in, r, simd);
    const Matrix<T> left = random_matrix<T>(out, 2 * r, 71), right = random_matrix<T>(2 * r, in, 72);
    const Matrix<T> B = random_matrix<T>(out, r, 73), A = random_matrix<T>(r, in, 74);
    Matrix<T> m = (T(0.1) * random_matrix<T>(out, in, 75)).eval();
    Matrix<T> v = (T(0.01) * random_matrix<T>(out, in, 76).cwiseAbs()).eval();
    const Dbl m0 = to_double(m), v0 = to_double(v);
    const AdamWOptions o{.beta1 = 0.9, .beta2 = 0.99, .eps = 1e-6};
    const auto c = pro::detail::adam_coefficients<T>(o, 3);
    Matrix<T> btu(r, in), uat(out, r);
    std::vector<T> scratch;
    pro::detail::full_pass<T>(view_mut(m), view_mut(v), view(left), view(right), view(B), view(A), c,
                              view_mut(btu), view_mut(uat), scratch, simd);

    const double u = eps<T>();
    const double b1 = c.beta1, ob1 = c.one_minus_beta1, b2 = c.beta2, ob2 = c.one_minus_beta2,
                 ib1 = c.inv_bc1, isb2 = c.inv_sqrt_bc2, ep = c.eps;
    const Dbl L = to_double(left), R = to_double(right), b = to_double(B), a = to_double(A);
    const Dbl E = naive_product(L, R);
    const Dbl errE = product_bound(L.cwiseAbs(), R.cwiseAbs(), u);
    Dbl mw(out, in), vw(out, in), U(out, in), errM(out, in), errV(out, in), errU(out, in);
    for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j) {
            const double e = E(i, j), de = errE(i, j);
            mw(i, j) = b1 * m0(i, j) + ob1 * e;
            vw(i, j) = b2 * v0(i, j) + ob2 * e * e;
            // Two products and a sum (3u each term), plus the propagated error of E.
            errM(i, j) = ob1 * de + 3 * u * (std::abs(b1 * m0(i, j)) + std::abs(ob1 * e));
            errV(i, j) = ob2 * (2 * std::abs(e) * de + de * de) + 4 * u * (b2 * v0(i, j) + ob2 * e * e);
            const double D = std::sqrt(vw(i, j)) * isb2 + ep;
            U(i, j) = mw(i, j) * ib1 / D;
            // First-order sensitivity of U = m·c1 / (√v·c2 + ε) (with v at the low end of its
            // interval), plus 6u for the multiply, sqrt, multiply-add and divide.
            const double v_lo = std::max(vw(i, j) - errV(i, j), 1e-300);
            errU(i, j) = ib1 / D * errM(i, j) +
                         std::abs(U(i, j)) * isb2 / (2 * std::sqrt(v_lo) * (std::sqrt(v_lo) * isb2 + ep)) * errV(i, j) +
                         6 * u * std::abs(U(i, j));
        }
    require_within(m, mw, errM, "m");
    require_within(v, vw, errV, "v");
    const Dbl bt = b.transpose();
    const Dbl Uabs = U.cwiseAbs() + errU;
    require_within(btu, naive_product(bt, U),
                   (naive_product(bt.cwiseAbs(), errU) + product_bound(bt.cwiseAbs(), Uabs, u)).eval(),
                   "B^T U");
    const Dbl at = a.transpose();
    require_within(uat, naive_product(U, at),
                   (naive_product(errU, at.cwiseAbs()) + product_bound(Uabs, at.cwiseAbs(), u)).eval(),
                   "U A^T");
}

TEMPLATE_TEST_CASE("SIMD and scalar Adam row kernels agree, tails included", "[lora_pro][full]",
                   float, double) {
    using T = TestType;
    const Index n = GENERATE(0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 33);
    const auto c = pro::detail::adam_coefficients<T>(AdamWOptions{}, 2);
    Matrix<T> m1 = random_matrix<T>(1, n, 1), v1 = random_matrix<T>(1, n, 2).cwiseAbs(),
              g1 = random_matrix<T>(1, n, 3);
    Matrix<T> m2 = m1, v2 = v1, g2 = g1;
    pro::detail::adam_row<T>(n, m1.data(), v1.data(), g1.data(), c);
    pro::detail::adam_row_ref<T>(n, m2.data(), v2.data(), g2.data(), c);
    // Each result is a handful of roundings away from the other (FMA vs separate multiply-add):
    // m, v within 2u of their magnitude, u within 8u.
    const double u = eps<T>();
    require_within(m1, to_double(m2), rel_bound(to_double(m2), 2 * u), "m");
    require_within(v1, to_double(v2), rel_bound(to_double(v2), 2 * u), "v");
    require_within(g1, to_double(g2), rel_bound(to_double(g2), 8 * u), "u");
}

// ------------------------------------------------------------------------------------------------
// The optimiser
// ------------------------------------------------------------------------------------------------

namespace {

/// The full-mode step written out densely in double: E, m, v, U as out × in matrices, the
/// correction with explicit inverses and the Kronecker X.
struct DenseFull {
    Dbl A, B, m, v;
    double s;
    std::int64_t t = 0;
    void step(const Dbl& G, const AdamWOptions& o) {
        const Lora<double> lora = Lora<double>::from_factors(A, B, s * double(A.rows()));
        const Grads grads_ = lora_grads(lora, G);
        const Dbl &gA = grads_.gA, &gB = grads_.gB;
        const Closed c = closed_form(lora, gA, gB, o.adjust.damping);
        const Dbl E = s * (B * c.gA0 + c.gB0 * A);
        ++t;
        const double bc1 = 1 - std::pow(o.beta1, double(t)), bc2 = 1 - std::pow(o.beta2, double(t));
        m = o.beta1 * m + (1 - o.beta1) * E;
        v = o.beta2 * v + (1 - o.beta2) * E.cwiseProduct(E);
        const Dbl U = ((m / bc1).array() / ((v / bc2).array().sqrt() + o.eps)).matrix();
        const Dbl ga = s * B.transpose() * U, gb = s * U * A.transpose();
        const Closed cu = closed_form(lora, ga, gb, o.adjust.damping);
        const Dbl X = kronecker_x(lora, ga, gb, cu);
        const Dbl dA = cu.gA0 + X * A, dB = cu.gB0 - B * X;
        A = A - o.lr * dA;
        B = B - o.lr * dB;
    }
};

}  // namespace

TEMPLATE_TEST_CASE("full mode equals the dense implementation of the same step",
                   "[lora_pro][adamw][full]", float, double) {
    using T = TestType;
    const Index out = 20, in = 30, r = 3;
    Lora<T> lora = random_lora<T>(out, in, r, 6.0, 81);
    DenseFull ref{to_double(lora.A()), to_double(lora.B()), Dbl::Zero(out, in), Dbl::Zero(out, in),
                  double(lora.scale())};
    const AdamWOptions o{.lr = 1e-2, .mode = Mode::full};
    AdamW<T> opt(lora, o);
    for (int t = 0; t < 3; ++t) {
        const Dbl G = random_matrix<double>(out, in, 82 + t);
        const Dbl Gt = to_double(G.cast<T>());
        const Grads grads_ = lora_grads(lora, Gt);
        const Dbl &gA = grads_.gA, &gB = grads_.gB;
        ref.step(Gt, o);
        opt.step(lora, Matrix<T>(gA.cast<T>()), Matrix<T>(gB.cast<T>()));
        // Normwise: the correction amplifies relative rounding by κ; each step adds the rounding
        // of the gradients and of one pass (γ_{4r} per element), so c = 16·(t + 1)·(in + out)·u·κ.
        const double kappa = correction_condition(lora, o.adjust.damping);
        const double tol = 16 * (t + 1) * double(in + out) * eps<T>() * kappa;
        CAPTURE(t, kappa);
        const auto& st = opt.state(0);
        REQUIRE(st.step == t + 1);
        INFO("A " << (to_double(lora.A()) - ref.A).norm() / ref.A.norm() << " m "
                  << (to_double(st.m) - ref.m).norm() / ref.m.norm());
        REQUIRE((to_double(lora.A()) - ref.A).norm() <= tol * ref.A.norm());
        REQUIRE((to_double(lora.B()) - ref.B).norm() <= tol * ref.B.norm());
        REQUIRE((to_double(st.m) - ref.m).norm() <= tol * ref.m.norm());
        REQUIRE((to_double(st.v) - ref.v).norm() <= tol * ref.v.norm());
    }
    // The step did something: A moved by more than the tolerance.
    REQUIRE((to_double(lora.A()) - to_double(random_lora<T>(out, in, r, 6.0, 81).A())).norm() > 1e-3);
}

TEMPLATE_TEST_CASE("efficient mode equals adjust, then plain AdamW (with the authors' variants)",
                   "[lora_pro][adamw][efficient]", float, double) {
    using T = TestType;
    const int offset = GENERATE(0, 1);
    const WeightDecay decay = GENERATE(WeightDecay::decoupled, WeightDecay::whole_weight);
    const double wd = GENERATE(0.0, 0.1);
    CAPTURE(offset, int(decay), wd);
    const Index out = 11, in = 9, r = 2;
    Lora<T> lora = random_lora<T>(out, in, r, 4.0, 91);
    Matrix<T> W = random_matrix<T>(out, in, 92);
    const AdamWOptions o{.lr = 0.05, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = wd,
                         .bias_correction_offset = offset, .decay = decay};
    AdamW<T> opt(lora, o);
    // Reference moments in double from the same corrected gradients, with propagated bounds.
    Dbl mA = Dbl::Zero(r, in), vA = mA, mB = Dbl::Zero(out, r), vB = mB;
    Dbl emA = mA, evA = mA, emB = mB, evB = mB;  // error bounds of the T moments
    const double u = eps<T>();
    for (int t = 1; t <= 3; ++t) {
        const Dbl G = random_matrix<double>(out, in, 93 + t);
        LoraGrad<T> g;
        const auto gd = lora_grads(lora, G);
        g.A = gd.gA.template cast<T>();
        g.B = gd.gB.template cast<T>();
        const auto d = adjust(lora, g.A, g.B, o.adjust);  // the correction at the current factors
        const Dbl A0 = to_double(lora.A()), B0 = to_double(lora.B()), W0 = to_double(W);
        opt.step(lora, g.A, g.B, W);
        const double tau = t + offset;
        const double bc1 = 1 - std::pow(o.beta1, tau), bc2 = 1 - std::pow(o.beta2, tau);
        const double f = 1 - o.lr * wd;
        const double pf = decay == WeightDecay::decoupled ? f : std::sqrt(f);
        auto update = [&](const Dbl& p0, const Dbl& gr, Dbl& m, Dbl& v, Dbl& em, Dbl& ev,
                          const Matrix<T>& got, const char* what) {
            const double b1 = T(o.beta1), b2 = T(o.beta2), ob1 = T(1 - o.beta1), ob2 = T(1 - o.beta2);
            Dbl want(p0.rows(), p0.cols()), bound(p0.rows(), p0.cols());
            for (Index i = 0; i < p0.rows(); ++i)
                for (Index j = 0; j < p0.cols(); ++j) {
                    const double gij = gr(i, j);
                    em(i, j) = b1 * em(i, j) + 3 * u * (std::abs(b1 * m(i, j)) + std::abs(ob1 * gij));
                    ev(i, j) = b2 * ev(i, j) + 4 * u * (b2 * v(i, j) + ob2 * gij * gij);
                    m(i, j) = b1 * m(i, j) + ob1 * gij;
                    v(i, j) = b2 * v(i, j) + ob2 * gij * gij;
                    const double D = std::sqrt(v(i, j) / bc2) + T(o.eps);
                    const double U = m(i, j) / bc1 / D;
                    const double v_lo = std::max(v(i, j) - ev(i, j), 1e-300);
                    const double eU = em(i, j) / bc1 / D +
                                      std::abs(U) / (2 * std::sqrt(v_lo * bc2) * D) * ev(i, j) +
                                      8 * u * std::abs(U);
                    const double p = double(T(pf)) * p0(i, j);
                    want(i, j) = p - double(T(o.lr)) * U;
                    bound(i, j) = 3 * u * (std::abs(p) + std::abs(want(i, j))) + double(T(o.lr)) * eU +
                                  1e-300;
                }
            require_within(got, want, bound, what);
        };
        update(A0, to_double(d.A), mA, vA, emA, evA, lora.A(), "A");
        update(B0, to_double(d.B), mB, vB, emB, evB, lora.B(), "B");
        // The base weight decays only with whole-weight decay.
        const double wf = decay == WeightDecay::whole_weight ? double(T(f)) : 1.0;
        require_within(W, (wf * W0).eval(), rel_bound(W0, u), "W");
    }
    REQUIRE(opt.state(0).step == 3);
}

TEST_CASE("batch step over several adapters equals one step each", "[lora_pro][adamw]") {
    Lora<float> l1 = random_lora<float>(8, 6, 2, 4, 101), l2 = random_lora<float>(5, 7, 1, 2, 102);
    Lora<float> k1 = l1, k2 = l2;
    for (Mode mode : {Mode::efficient, Mode::full}) {
        AdamW<float> batch({&l1, &l2}, {.mode = mode});
        AdamW<float> one({&k1, &k2}, {.mode = mode});
        std::vector<LoraGrad<float>> grads(2);
        grads[0].A = random_matrix<float>(2, 6, 103);
        grads[0].B = random_matrix<float>(8, 2, 104);
        grads[1].A = random_matrix<float>(1, 7, 105);
        grads[1].B = random_matrix<float>(5, 1, 106);
        batch.step(std::span<const LoraGrad<float>>(grads));
        one.step(k2, grads[1].A, grads[1].B);  // order does not matter: states are independent
        one.step(k1, grads[0].A, grads[0].B);
        REQUIRE(l1.A() == k1.A());
        REQUIRE(l1.B() == k1.B());
        REQUIRE(l2.A() == k2.A());
        REQUIRE(l2.B() == k2.B());
    }
}

// ------------------------------------------------------------------------------------------------
// End to end: a least-squares problem whose optimum needs a full-rank update
// ------------------------------------------------------------------------------------------------

TEST_CASE("LoRA-Pro tracks full fine-tuning more closely than LoRA", "[lora_pro][e2e]") {
    const Index n = 64, in = 16, out = 12, r = 2, steps = 300;
    const double lr = 1e-2;
    const Dbl X = random_matrix<double>(n, in, 111);
    const Dbl W0 = random_matrix<double>(out, in, 112);
    const Dbl Wstar = W0 + 0.5 * random_matrix<double>(out, in, 113);  // full-rank change
    const Dbl Y = naive_product(X, Wstar.transpose());
    auto loss_of = [&](const Dbl& Yhat) { return 0.5 / double(n) * (Yhat - Y).squaredNorm(); };

    // Full fine-tuning: Adam on W with G = dYᵀ X.
    std::vector<double> full, lora_curve, pro_curve;
    {
        Dbl W = W0, m = Dbl::Zero(out, in), v = m;
        for (Index t = 1; t <= steps; ++t) {
            const Dbl Yhat = X * W.transpose();
            full.push_back(loss_of(Yhat));
            const Dbl G = (Yhat - Y).transpose() * X / double(n);
            m = 0.9 * m + 0.1 * G;
            v = 0.999 * v + 0.001 * G.cwiseProduct(G);
            const double bc1 = 1 - std::pow(0.9, double(t)), bc2 = 1 - std::pow(0.999, double(t));
            W.array() -= lr * (m / bc1).array() / ((v / bc2).array().sqrt() + 1e-8);
        }
    }
    const LoraConfig cfg{.rank = r, .alpha = double(r), .seed = 114};
    // Plain LoRA: Adam on A and B with the ordinary gradients.
    {
        Lora<double> lora(out, in, cfg);
        Dbl mA = Dbl::Zero(r, in), vA = mA, mB = Dbl::Zero(out, r), vB = mB;
        LoraGrad<double> g;
        Dbl Yhat;
        for (Index t = 1; t <= steps; ++t) {
            forward(X, W0, lora, Yhat);
            lora_curve.push_back(loss_of(Yhat));
            const Dbl dY = (Yhat - Y) / double(n);
            backward(X, W0, lora, dY, g);
            const double bc1 = 1 - std::pow(0.9, double(t)), bc2 = 1 - std::pow(0.999, double(t));
            auto adam = [&](Dbl& p, const Dbl& gr, Dbl& m, Dbl& v) {
                m = 0.9 * m + 0.1 * gr;
                v = 0.999 * v + 0.001 * gr.cwiseProduct(gr);
                p.array() -= lr * (m / bc1).array() / ((v / bc2).array().sqrt() + 1e-8);
            };
            adam(lora.A(), g.A, mA, vA);
            adam(lora.B(), g.B, mB, vB);
        }
    }
    // LoRA-Pro, full mode (the authors' method), same rank, initialisation, lr and steps.
    double pro_efficient_final = 0;
    for (Mode mode : {Mode::full, Mode::efficient}) {
        Lora<double> lora(out, in, cfg);
        AdamW<double> opt(lora, {.lr = lr, .mode = mode});
        LoraGrad<double> g;
        Dbl Yhat;
        std::vector<double> curve;
        for (Index t = 1; t <= steps; ++t) {
            forward(X, W0, lora, Yhat);
            curve.push_back(loss_of(Yhat));
            backward(X, W0, lora, Dbl((Yhat - Y) / double(n)), g);
            opt.step(lora, g.A, g.B);
        }
        if (mode == Mode::full) pro_curve = curve;
        else pro_efficient_final = curve.back();
    }
    // Distance of a curve to full fine-tuning's: mean |L(t) − L_full(t)| over the run.
    auto gap = [&](const std::vector<double>& c) {
        double s = 0;
        for (std::size_t t = 0; t < c.size(); ++t) s += std::abs(c[t] - full[t]);
        return s / double(c.size());
    };
    const double gap_lora = gap(lora_curve), gap_pro = gap(pro_curve);
    const std::size_t early = 20;
    WARN("losses (rank " << r << ", " << out << " x " << in << ", initial " << full.front()
                         << "): at step " << early << ": full fine-tuning " << full[early]
                         << ", LoRA " << lora_curve[early] << ", LoRA-Pro " << pro_curve[early]
                         << "; after " << steps << " steps: full fine-tuning " << full.back()
                         << ", LoRA " << lora_curve.back() << ", LoRA-Pro (full mode) "
                         << pro_curve.back() << ", LoRA-Pro (efficient mode) "
                         << pro_efficient_final << "; mean |L - L_full|: LoRA " << gap_lora
                         << ", LoRA-Pro " << gap_pro);
    REQUIRE(gap_pro < gap_lora);
    // Pointwise: LoRA-Pro's loss is never above LoRA's (both stay above full fine-tuning, whose
    // optimum needs a full-rank change; both end at the best rank-r loss).
    for (std::size_t t = 0; t < pro_curve.size(); ++t) {
        CAPTURE(t);
        REQUIRE(pro_curve[t] >= full[t]);
        REQUIRE(pro_curve[t] <= lora_curve[t] * (1 + 1e-9));
    }
    REQUIRE(pro_curve[early] < 0.8 * lora_curve[early]);
    REQUIRE(pro_curve.back() < full.front());
}

// ------------------------------------------------------------------------------------------------
// State files
// ------------------------------------------------------------------------------------------------

TEST_CASE("save / load resumes a run exactly, and rejects damaged files", "[lora_pro][io]") {
    const Mode mode = GENERATE(Mode::efficient, Mode::full);
    CAPTURE(int(mode));
    Lora<float> l1 = random_lora<float>(8, 6, 2, 4, 121), l2 = random_lora<float>(5, 7, 1, 2, 122);
    const AdamWOptions o{.lr = 3e-3, .weight_decay = 0.01, .mode = mode, .bias_correction_offset = 1};
    AdamW<float> opt({&l1, &l2}, o);
    std::vector<LoraGrad<float>> grads(2);
    auto draw = [&](std::uint64_t seed) {
        grads[0].A = random_matrix<float>(2, 6, seed);
        grads[0].B = random_matrix<float>(8, 2, seed + 1);
        grads[1].A = random_matrix<float>(1, 7, seed + 2);
        grads[1].B = random_matrix<float>(5, 1, seed + 3);
    };
    for (int t = 0; t < 2; ++t) {
        draw(130 + 10 * t);
        opt.step(std::span<const LoraGrad<float>>(grads));
    }
    const std::string path = temp_path("state");
    opt.save(path);

    // Resume in a "new process": copies of the factors, an optimiser with other options.
    Lora<float> c1 = l1, c2 = l2;
    AdamW<float> resumed({&c1, &c2}, {.lr = 1.0});
    resumed.load(path);
    REQUIRE(resumed.options().lr == o.lr);
    REQUIRE(resumed.options().mode == mode);
    REQUIRE(resumed.options().bias_correction_offset == 1);
    REQUIRE(resumed.state(0).step == 2);
    draw(200);
    opt.step(std::span<const LoraGrad<float>>(grads));
    resumed.step(std::span<const LoraGrad<float>>(grads));
    REQUIRE(c1.A() == l1.A());
    REQUIRE(c1.B() == l1.B());
    REQUIRE(c2.A() == l2.A());
    REQUIRE(c2.B() == l2.B());

    std::ifstream is(path, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(is)), std::istreambuf_iterator<char>());
    is.close();
    const std::string bad = temp_path("bad");
    auto write = [&](const std::string& content) {
        std::ofstream os(bad, std::ios::binary);
        os.write(content.data(), std::streamsize(content.size()));
    };
    const auto before = resumed.state(0).step;
    SECTION("truncated") {
        write(bytes.substr(0, bytes.size() - 9));
        REQUIRE_THROWS_WITH(resumed.load(bad), Contains("lowrank::pro::AdamW::load") && Contains("bytes, expected"));
        write(bytes.substr(0, 40));
        REQUIRE_THROWS_WITH(resumed.load(bad), Contains("truncated"));
    }
    SECTION("a flipped payload byte fails the checksum") {
        std::string c = bytes;
        c[c.size() - 20] ^= 0x01;
        write(c);
        REQUIRE_THROWS_WITH(resumed.load(bad), Contains("checksum"));
    }
    SECTION("bad magic, version, scalar size, enum") {
        std::string c = bytes;
        c[0] = 'X';
        write(c);
        REQUIRE_THROWS_WITH(resumed.load(bad), Contains("bad magic"));
        c = bytes;
        c[12] = 9;  // version
        write(c);
        REQUIRE_THROWS_WITH(resumed.load(bad), Contains("format version 9"));
        Lora<double> d1 = Lora<double>::from_factors(to_double(l1.A()), to_double(l1.B()), 4),
                     d2 = Lora<double>::from_factors(to_double(l2.A()), to_double(l2.B()), 2);
        AdamW<double> dbl({&d1, &d2});
        REQUIRE_THROWS_WITH(dbl.load(path), Contains("4-byte scalars"));
        c = bytes;
        c[20] = 7;  // mode
        write(c);
        REQUIRE_THROWS_WITH(resumed.load(bad), Contains("unknown Mode 7"));
    }
    SECTION("shapes and counts must match the registered adapters") {
        Lora<float> other = random_lora<float>(8, 5, 2, 4, 1);
        AdamW<float> wrong_shape({&other, &c2});
        REQUIRE_THROWS_WITH(wrong_shape.load(path), Contains("adapter 0") && Contains("8 x 6 rank 2") &&
                                                        Contains("8 x 5 rank 2"));
        AdamW<float> wrong_count(c1);
        REQUIRE_THROWS_WITH(wrong_count.load(path), Contains("holds 2 adapters, this optimiser has 1"));
    }
    SECTION("missing file") {
        REQUIRE_THROWS_WITH(resumed.load(bad + "_missing"), Contains("cannot open"));
    }
    REQUIRE(resumed.state(0).step == before);  // failed loads changed nothing
    std::remove(bad.c_str());
    std::remove(path.c_str());
}

// ------------------------------------------------------------------------------------------------
// Bad input
// ------------------------------------------------------------------------------------------------

TEST_CASE("bad arguments raise lowrank::error naming the function, argument and shapes",
          "[lora_pro][errors]") {
    Lora<float> lora = random_lora<float>(6, 5, 2, 4, 141);
    const Matrix<float> gA = random_matrix<float>(2, 5, 142), gB = random_matrix<float>(6, 2, 143);
    SECTION("mismatched gradient shapes") {
        REQUIRE_THROWS_WITH(adjust(lora, Matrix<float>(3, 5), gB),
                            Contains("lowrank::pro::adjust: gA is 3 x 5, expected 2 x 5"));
        REQUIRE_THROWS_WITH(adjust(lora, gA, Matrix<float>(6, 3)),
                            Contains("lowrank::pro::adjust: gB is 6 x 3, expected 6 x 2"));
        REQUIRE_THROWS_WITH(equivalent_gradient(lora, gA, Matrix<float>(5, 2)),
                            Contains("lowrank::pro::equivalent_gradient: gB is 5 x 2, expected 6 x 2"));
        AdamW<float> opt(lora);
        REQUIRE_THROWS_WITH(opt.step(lora, gA.transpose(), gB),
                            Contains("lowrank::pro::AdamW::step: gA is 5 x 2, expected 2 x 5"));
        Matrix<float> W(6, 4);
        REQUIRE_THROWS_WITH(opt.step(lora, gA, gB, W), Contains("W is 6 x 4, expected 6 x 5"));
    }
    SECTION("negative or non-finite damping; zero damping with a rank-deficient factor") {
        REQUIRE_THROWS_WITH(adjust(lora, gA, gB, {.damping = -1e-8}),
                            Contains("lowrank::pro::adjust: damping must be finite and >= 0"));
        REQUIRE_THROWS_AS(adjust(lora, gA, gB, {.damping = INFINITY}), lowrank::error);
        Lora<float> peft(6, 5, {.rank = 2});
        REQUIRE_THROWS_WITH(adjust(peft, gA, gB, {.damping = 0.0}),
                            Contains("BᵀB + damping·I (2 x 2, damping 0) is singular"));
        REQUIRE_THROWS_WITH(AdamW<float>(lora, {.adjust = {.damping = -1}}),
                            Contains("lowrank::pro::AdamW: damping must be finite and >= 0"));
    }
    SECTION("non-finite gradients") {
        Matrix<float> bad = gA;
        bad(1, 3) = NAN;
        REQUIRE_THROWS_WITH(adjust(lora, bad, gB),
                            Contains("lowrank::pro::adjust: gA (2 x 5) has a non-finite entry at (1, 3)"));
        Matrix<float> badB = gB;
        badB(5, 0) = INFINITY;
        AdamW<float> opt(lora, {.mode = Mode::full});
        const Matrix<float> A0 = lora.A();
        REQUIRE_THROWS_WITH(opt.step(lora, gA, badB), Contains("gB (6 x 2) has a non-finite entry at (5, 0)"));
        REQUIRE(lora.A() == A0);
        REQUIRE(opt.state(0).step == 0);
    }
    SECTION("optimiser misuse") {
        Lora<float> other = lora;
        AdamW<float> opt(lora);
        REQUIRE_THROWS_WITH(opt.step(other, gA, gB), Contains("is not registered with this optimiser"));
        REQUIRE_THROWS_WITH(AdamW<float>({&lora, &lora}), Contains("registered twice"));
        std::vector<LoraGrad<float>> none;
        REQUIRE_THROWS_WITH(opt.step(std::span<const LoraGrad<float>>(none)), Contains("0 gradients for 1 adapters"));
        AdamW<float> whole(lora, {.weight_decay = 0.1, .decay = WeightDecay::whole_weight});
        REQUIRE_THROWS_WITH(whole.step(lora, gA, gB), Contains("pass W"));
        REQUIRE_THROWS_WITH(AdamW<float>(lora, {.beta1 = 1.0}), Contains("beta1 must be in [0, 1)"));
        REQUIRE_THROWS_WITH(AdamW<float>(lora, {.lr = NAN}), Contains("lr must be finite"));
        REQUIRE_THROWS_WITH(AdamW<float>(lora, {.eps = 0}), Contains("eps must be > 0"));
        REQUIRE_THROWS_WITH(opt.set_lr(-1), Contains("lowrank::pro::AdamW::set_lr: lr"));
        Lora<float> grown = lora;
        AdamW<float> fixed(grown, {.mode = Mode::full});
        grown.A() = random_matrix<float>(2, 7, 1);
        grown.B() = random_matrix<float>(6, 2, 2);
        REQUIRE_THROWS_WITH(fixed.step(grown, random_matrix<float>(2, 7, 3), gB),
                            Contains("adapter 0 is now 6 x 7 rank 2, not the shape it was registered with"));
        Lora<float> zero_scale(6, 5, {.rank = 2, .alpha = 0});
        REQUIRE_THROWS_WITH(adjust(zero_scale, gA, gB), Contains("scale must be finite and nonzero"));
    }
}
