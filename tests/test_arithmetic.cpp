// SPDX-License-Identifier: Apache-2.0
// Adapter arithmetic: concat against the dense weighted sum (scales and rsLoRA applied once),
// compress against the truncated Jacobi SVD of the dense sum in double (Eckart–Young optimum,
// singular values, scale conventions), the no-out×in path for Σr > min(out, in), and bad input.

#include <lowrank/arithmetic.hpp>

#include <Eigen/SVD>

#include "lora_support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::naive_product;
using lowrank::test::random_lora;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

namespace {

/// w · s · B A in double, with s computed from the configuration in double (not the adapter's
/// rounded scale), and its absolute-value counterpart.
template <class T>
Matrix<double> dense_delta(const Lora<T>& l, double w) {
    const double s = l.config().rslora ? l.config().alpha / std::sqrt(double(l.rank()))
                                       : l.config().alpha / double(l.rank());
    return w * s * naive_product(to_double(l.B()), to_double(l.A()));
}
template <class T>
Matrix<double> abs_delta(const Lora<T>& l, double w) {
    return std::abs(w * double(l.scale())) * naive_product(to_double(l.B()).cwiseAbs(), to_double(l.A()).cwiseAbs());
}

}  // namespace

TEMPLATE_TEST_CASE("concat is the exact weighted sum with s = 1", "[arithmetic][concat]", float, double) {
    using T = TestType;
    const Index out = 20, in = 17;
    const Lora<T> a = random_lora<T>(out, in, 3, 16, false, 1);
    const Lora<T> b = random_lora<T>(out, in, 2, 8, true, 2);  // rsLoRA: s = 8 / √2
    const Lora<T> c = random_lora<T>(out, in, 1, 1, false, 3);
    const Lora<T> cat = concat(0.5 * a, b, -2 * c);
    REQUIRE(cat.rank() == 6);
    REQUIRE(cat.scale() == T(1));
    REQUIRE_FALSE(cat.config().rslora);
    const Matrix<double> want = dense_delta(a, 0.5) + dense_delta(b, 1) + dense_delta(c, -2);
    const Matrix<double> abs_want = abs_delta(a, 0.5) + abs_delta(b, 1) + abs_delta(c, -2);
    const double u = eps<T>();
    // Folding w s into A rounds once (u), the product B A adds c (m + 2) u.
    const Matrix<double> bound = 2 * (6 + 4) * u * abs_want + Matrix<double>::Constant(out, in, 1e-300);
    const Matrix<T> W = random_matrix<T>(out, in, 4);
    const Matrix<T> merged = dense(W + cat);
    require_within(merged, to_double(W) + want, bound + 2 * u * (to_double(W) + want).cwiseAbs(), "dense(W + concat)");
    // The same as the expression of the three terms (the scales are applied exactly once).
    const Matrix<T> via_expr = dense(W + 0.5 * a + b + -2 * c);
    require_within(via_expr, to_double(merged), 2 * bound + 4 * u * (to_double(W) + want).cwiseAbs(), "expr vs concat");
    // A span of terms and a single adapter.
    const std::vector<WeightedTerm<Lora<T>>> list{0.5 * a, 1 * b, -2 * c};
    const Lora<T> cat2 = concat<T>(list);
    REQUIRE(cat2.A() == cat.A());
    REQUIRE(cat2.B() == cat.B());
    const Lora<T> single = concat(b);
    REQUIRE(single.B() == b.B());
    require_within(to_double(single.A()), double(T(8 / std::sqrt(2.0))) * to_double(b.A()),
                   u * (8 / std::sqrt(2.0)) * to_double(b.A()).cwiseAbs() + Matrix<double>::Constant(2, in, 1e-300),
                   "single adapter");
}

TEMPLATE_TEST_CASE("compress is the truncated SVD of the dense sum, never forming it",
                   "[arithmetic][compress]", float, double) {
    using T = TestType;
    const auto [out, in] = GENERATE(std::pair<Index, Index>{40, 30}, std::pair<Index, Index>{12, 10},
                                    std::pair<Index, Index>{9, 50});
    const Index k = GENERATE(1, 3, 6);
    CAPTURE(out, in, k);
    // Three adapters of rank 4: Σr = 12 (> min(out, in) for the 12 × 10 and 9 × 50 cases).
    const Lora<T> a = random_lora<T>(out, in, 4, 8, false, 11);
    const Lora<T> b = random_lora<T>(out, in, 4, 4, true, 12);
    const Lora<T> c = random_lora<T>(out, in, 4, 2, false, 13);
    const Matrix<double> sum = dense_delta(a, 0.7) + dense_delta(b, -0.3) + dense_delta(c, 1.5);
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(sum, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Eigen::VectorXd sv = svd.singularValues();
    const Matrix<double> best = svd.matrixU().leftCols(k) * sv.head(k).asDiagonal() * svd.matrixV().leftCols(k).transpose();
    const Lora<T> comp = compress(k, 0.7 * a, -0.3 * b, 1.5 * c);
    REQUIRE(comp.rank() == k);
    REQUIRE(comp.scale() == T(1));  // default: alpha = k
    const Matrix<double> got = double(comp.scale()) * naive_product(to_double(comp.B()), to_double(comp.A()));
    // Backward error of the QRs and of folding weights and scales in: ‖E‖ ≤ c (out + in + m) u ‖|B||A|‖_F.
    const double u = eps<T>();
    const Matrix<double> abs_sum = abs_delta(a, 0.7) + abs_delta(b, -0.3) + abs_delta(c, 1.5);
    const double pert = 16 * double(out + in + 12) * u * abs_sum.norm();
    const double gap = sv(k - 1) - sv(k);
    CAPTURE(sv.transpose(), pert, gap);
    REQUIRE((got - best).cwiseAbs().maxCoeff() <= pert * (1 + 4 * sv(0) / gap));
    // Eckart–Young: the residual is the optimum √(Σ_{i>k} σ_i²).
    const double optimal = std::sqrt(sv.tail(sv.size() - k).squaredNorm());
    REQUIRE(std::abs((sum - got).norm() - optimal) <= 2 * pert * std::sqrt(2.0 * double(k)) * (1 + 4 * sv(0) / gap));
    // Balanced split: BᵀB = AAᵀ = diag(σ_k / s).
    const Matrix<double> BtB = to_double(comp.B()).transpose() * to_double(comp.B());
    const Matrix<double> AAt = to_double(comp.A()) * to_double(comp.A()).transpose();
    for (Index i = 0; i < k; ++i) {
        REQUIRE(std::abs(BtB(i, i) - sv(i)) <= pert * 2 + 16 * double(out + in) * u * sv(0));
        REQUIRE(std::abs(AAt(i, i) - sv(i)) <= pert * 2 + 16 * double(out + in) * u * sv(0));
    }
    // The sign rule: the largest-magnitude entry of each row of A is positive.
    for (Index i = 0; i < k; ++i) {
        Index best_j = 0;
        for (Index j = 1; j < in; ++j)
            if (std::abs(comp.A()(i, j)) > std::abs(comp.A()(i, best_j))) best_j = j;
        REQUIRE(comp.A()(i, best_j) > 0);
    }
    // From a concatenation, where it fits: the same result.
    if (12 <= std::min(out, in)) {
        const Lora<T> from_cat = compress(concat(0.7 * a, -0.3 * b, 1.5 * c), k);
        const Matrix<double> got2 = naive_product(to_double(from_cat.B()), to_double(from_cat.A()));
        REQUIRE((got2 - best).cwiseAbs().maxCoeff() <= pert * (1 + 4 * sv(0) / gap));
    }
}

TEMPLATE_TEST_CASE("compress: scale conventions and exact re-factorisation", "[arithmetic][compress]",
                   float, double) {
    using T = TestType;
    const Lora<T> a = random_lora<T>(25, 18, 5, 10, true, 21);
    const Matrix<double> delta = dense_delta(a, 1.0);
    const double u = eps<T>();
    const double pert = 16 * (25 + 18 + 5) * u * abs_delta(a, 1.0).norm();
    // k = rank: the same ΔW, whatever the result's alpha and split.
    const Lora<T> same = compress(a, 5);
    REQUIRE((naive_product(to_double(same.B()), to_double(same.A())) - delta).cwiseAbs().maxCoeff() <= pert);
    const Lora<T> rs = compress(a, 5, {.alpha = 3.0, .rslora = true, .split = FactorSplit::orthonormal_b});
    const double s = 3 / std::sqrt(5.0);
    REQUIRE(double(rs.scale()) == double(T(s)));
    REQUIRE(rs.config().rslora);
    REQUIRE((s * naive_product(to_double(rs.B()), to_double(rs.A())) - delta).cwiseAbs().maxCoeff() <= 2 * pert);
    const Matrix<double> B = to_double(rs.B());
    REQUIRE((B.transpose() * B - Matrix<double>::Identity(5, 5)).cwiseAbs().maxCoeff() <= 16 * 25 * u);
}

TEST_CASE("bad arithmetic arguments raise lowrank::error", "[arithmetic][errors]") {
    using Catch::Contains;
    const Lora<float> a = random_lora<float>(8, 6, 4, 4, false, 1);
    const Lora<float> b = random_lora<float>(8, 6, 3, 4, false, 2);
    const Lora<float> other = random_lora<float>(6, 8, 2, 4, false, 3);
    REQUIRE_THROWS_WITH(concat(a, b), Contains("lowrank::concat") && Contains("sum of ranks 7 exceeds min(out, in) = 6"));
    REQUIRE_THROWS_WITH(concat(a, other),
                        Contains("lowrank::concat") && Contains("adapter 1 is for a 6 x 8 weight") && Contains("8 x 6"));
    REQUIRE_THROWS_WITH(concat(std::numeric_limits<float>::quiet_NaN() * a), Contains("weight of adapter 0 must be finite"));
    REQUIRE_THROWS_WITH(compress(a, 0), Contains("lowrank::compress") && Contains("rank k = 0 is out of range"));
    REQUIRE_THROWS_WITH(compress(a, 5), Contains("rank k = 5") && Contains("[1, 4]"));
    REQUIRE_THROWS_WITH(compress(a, 2, {.alpha = 0.0}), Contains("alpha must be finite and > 0"));
    REQUIRE_THROWS_WITH(compress(2, a, other), Contains("lowrank::compress") && Contains("adapter 1"));
    REQUIRE_THROWS_WITH(concat<float>(std::span<const WeightedTerm<Lora<float>>>{}), Contains("no adapters"));
}
