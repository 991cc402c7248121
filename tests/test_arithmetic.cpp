// SPDX-License-Identifier: Apache-2.0
// Adapter arithmetic: concat against the dense weighted sum (scales and rsLoRA applied once),
// compress against the truncated Jacobi SVD of the dense sum in double (Eckart–Young optimum,
// singular values, scale conventions), the no-out×in path for Σr > min(out, in), and bad input.
// Then compress's two routes (Gram/CholeskyQR and the Householder fallback) against the dense sum
// decomposed in long double, on well-conditioned, rank-deficient and ill-conditioned stacks, with
// bounds from the arithmetic of each step.

#include <lowrank/arithmetic.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <limits>
#include <vector>

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

namespace {

using LMatrix = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;
using LVector = Eigen::Matrix<long double, Eigen::Dynamic, 1>;

/// rows × cols with orthonormal columns: Q of the Householder QR of a seeded random matrix.
Matrix<double> orthonormal(Index rows, Index cols, std::uint64_t seed) {
    const Eigen::MatrixXd g = random_matrix<double>(rows, cols, seed);
    const Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
    return Eigen::MatrixXd(qr.householderQ()).leftCols(cols);
}

/// A rows × cols matrix of rank min(rows, cols) whose singular values are log-spaced from 1 down
/// to `lowest`, with random singular vectors.
Matrix<double> graded(Index rows, Index cols, double lowest, std::uint64_t seed) {
    const Index p = std::min(rows, cols);
    Eigen::VectorXd s(p);
    for (Index i = 0; i < p; ++i) s(i) = p == 1 ? 1.0 : std::pow(lowest, double(i) / double(p - 1));
    return orthonormal(rows, p, seed) * s.asDiagonal() * orthonormal(cols, p, seed + 1).transpose();
}

template <class T>
Lora<T> lora_of(const Matrix<double>& B, const Matrix<double>& A, double alpha, bool rslora) {
    return Lora<T>::from_factors(A.cast<T>().eval(), B.cast<T>().eval(), alpha, rslora);
}

/// The sum compress reads — each weight as `WeightedTerm` stores it (in T), each adapter's own
/// scale — formed and decomposed (Jacobi SVD) in long double, independently of the code under
/// test. On x86-64 long double has u_ref = 2⁻⁶⁴, so the reference's own error is negligible next
/// to double's; where long double is double, the u_ref terms of the bounds double them.
template <class T>
struct DenseReference {
    LMatrix sum;
    LVector sv;
    LMatrix U, V;
    double factors = 0;  ///< ‖B_st‖_F ‖A_st‖_F, w_i s_i folded into A
    Index m = 0;

    explicit DenseReference(std::span<const WeightedTerm<Lora<T>>> terms) {
        const Index out = terms[0].term().out_features(), in = terms[0].term().in_features();
        sum = LMatrix::Zero(out, in);
        double b2 = 0, a2 = 0;
        for (const auto& t : terms) {
            const long double ws = (long double)(t.weight()) * (long double)(t.term().scale());
            const LMatrix B = t.term().B().template cast<long double>();
            const LMatrix A = t.term().A().template cast<long double>();
            sum += ws * (B * A);
            b2 += double(B.squaredNorm());
            a2 += double(ws * ws * A.squaredNorm());
            m += t.term().rank();
        }
        factors = std::sqrt(b2 * a2);
        const Eigen::JacobiSVD<LMatrix> svd(sum, Eigen::ComputeThinU | Eigen::ComputeThinV);
        sv = svd.singularValues();
        U = svd.matrixU();
        V = svd.matrixV();
    }
    /// The optimal rank-k approximation (Eckart–Young).
    [[nodiscard]] LMatrix best(Index k) const {
        return U.leftCols(k) * sv.head(k).asDiagonal() * V.leftCols(k).transpose();
    }
};

/// Singular values of s · B A (B: out × k, A: k × in) in long double, from the thin QRs of B and
/// Aᵀ (an independent route: Householder in long double, then Jacobi on k × k).
template <class T>
LVector singular_values(const Lora<T>& l) {
    const LMatrix B = l.B().template cast<long double>(), At = l.A().transpose().template cast<long double>();
    const Eigen::HouseholderQR<LMatrix> qb(B), qa(At);
    const Index k = l.rank();
    const LMatrix rb = qb.matrixQR().topRows(k).template triangularView<Eigen::Upper>();
    const LMatrix ra = qa.matrixQR().topRows(k).template triangularView<Eigen::Upper>();
    return Eigen::JacobiSVD<LMatrix>((long double)(l.scale()) * rb * ra.transpose()).singularValues();
}

/// Checks rank-k compressions of the reference's sum (the default balanced split with s = 1, and
/// the orthonormal-B split) against its truncated SVD. The bounds, from the arithmetic:
/// - the result's factors are rounded to T once, at the end: with the balanced split and s = 1,
///   ‖B‖_F² = ‖A‖_F² = Σ_{j≤k} σ_j, so rounding moves B A by at most
///   rounding = (2 u_T + u_T²) ‖B‖_F ‖A‖_F ≤ 2.01 u_T Σ_{j≤k} σ_j;
/// - everything before that runs in double (stacking with w_i s_i folded in, the Gram or
///   Householder QRs, the m × m SVD, the products with the m × k coefficients) and is backward
///   stable: the computed result is the exact truncation of ΔW + E with
///   ‖E‖_F ≤ c (out + in + m) u_double ‖B_st‖_F ‖A_st‖_F, c = 1 (first-order; the errors measured
///   on every stack here stay below a third of it), and the reference adds the same with u_ref;
/// - singular values are perfectly conditioned (Weyl): |σ̂_j − σ_j| ≤ ‖E‖₂ + rounding;
/// - the truncation itself moves, to first order, by ‖E‖ (1 + 2 σ_k / (σ_k − σ_{k+1})) (each kept
///   pair j mixes with the dropped ones by ‖E‖ / (σ_j − σ_{k+1}), weighted by σ_j); when σ_k is
///   zero (k ≥ rank ΔW) there is nothing to separate and the factor is 3;
/// - with the orthonormal-B split, BᵀB = I up to the rounding of B (2.01 u_T) and the
///   orthonormality of Q in double ((out + m) u_double: Householder, or CholeskyQR2, whose second
///   pass makes it independent of κ(B)).
template <class T>
void require_optimal(const DenseReference<T>& ref, const Lora<T>& balanced, const Lora<T>& orth_b,
                     Index k) {
    const Index out = ref.sum.rows(), in = ref.sum.cols();
    const double u = eps<T>(), u_double = eps<double>();
    const double u_ref = std::numeric_limits<long double>::epsilon() / 2;
    REQUIRE(balanced.rank() == k);
    REQUIRE(balanced.scale() == T(1));
    const double sigma_1 = double(ref.sv(0)), sigma_k = double(ref.sv(k - 1));
    const double sigma_next = k < ref.sv.size() ? double(ref.sv(k)) : 0.0;
    const double rounding = 2.01 * u * double(ref.sv.head(k).sum());
    const double backward = double(out + in + ref.m) * (u_double + u_ref) * ref.factors;
    const double gap_factor = sigma_k > 1e-12 * sigma_1 ? 1 + 2 * sigma_k / (sigma_k - sigma_next) : 3.0;
    CAPTURE(out, in, ref.m, k, sigma_1, sigma_k, sigma_next, ref.factors, rounding, backward, gap_factor);

    const LMatrix got = balanced.B().template cast<long double>() * balanced.A().template cast<long double>();
    const double product_error = double((got - ref.best(k)).norm());
    CAPTURE(product_error, product_error / (rounding + backward * gap_factor));
    REQUIRE(product_error <= rounding + backward * gap_factor);

    const LVector sv = singular_values(balanced);
    double sv_error = 0;
    for (Index j = 0; j < k; ++j) sv_error = std::max(sv_error, double(std::abs(sv(j) - ref.sv(j))));
    CAPTURE(sv_error, sv_error / (rounding + backward));
    REQUIRE(sv_error <= rounding + backward);

    // The orthonormal-B split: the same product, B with orthonormal columns.
    REQUIRE(orth_b.rank() == k);
    const LMatrix got_o = orth_b.B().template cast<long double>() * orth_b.A().template cast<long double>();
    const double rounding_o = 2.01 * u * double(ref.sv.head(k).norm()) * std::sqrt(double(k));
    REQUIRE(double((got_o - ref.best(k)).norm()) <= rounding_o + backward * gap_factor);
    const LMatrix Bo = orth_b.B().template cast<long double>();
    const double orthonormality = double((Bo.transpose() * Bo - LMatrix::Identity(k, k)).cwiseAbs().maxCoeff());
    CAPTURE(orthonormality, orthonormality / (2.01 * u + double(out + ref.m) * (u_double + u_ref)));
    REQUIRE(orthonormality <= 2.01 * u + double(out + ref.m) * (u_double + u_ref));
}

/// Both splits of one compression, and what the routine did.
template <class T>
struct Compressed {
    Lora<T> balanced, orth_b;
    detail::CompressInfo info;
};
template <class T>
Compressed<T> compress_both(std::span<const WeightedTerm<Lora<T>>> terms, Index k) {
    detail::CompressInfo info, info_o;
    Lora<T> b = detail::compress_terms<T>("test", terms, k, {}, detail::CompressRoute::automatic, &info);
    Lora<T> o = detail::compress_terms<T>("test", terms, k, {.split = FactorSplit::orthonormal_b},
                                          detail::CompressRoute::automatic, &info_o);
    REQUIRE(info.route == info_o.route);
    return {std::move(b), std::move(o), info};
}

}  // namespace

TEMPLATE_TEST_CASE("compress: well-conditioned sums take the Gram route and are the dense truncated SVD",
                   "[arithmetic][compress]", float, double) {
    using T = TestType;
    const auto [out, in] = GENERATE(std::pair<Index, Index>{60, 45}, std::pair<Index, Index>{45, 60},
                                    std::pair<Index, Index>{300, 200});
    CAPTURE(out, in);
    const Lora<T> a = lora_of<T>(random_matrix<double>(out, 4, 31), random_matrix<double>(4, in, 32), 8, false);
    const Lora<T> b = lora_of<T>(random_matrix<double>(out, 5, 33), random_matrix<double>(5, in, 34), 4, true);
    const Lora<T> c = lora_of<T>(random_matrix<double>(out, 3, 35), random_matrix<double>(3, in, 36), 2, false);
    const std::vector<WeightedTerm<Lora<T>>> terms{T(0.7) * a, T(-0.3) * b, T(1.5) * c};
    const DenseReference<T> ref(terms);
    for (const Index k : {1, 4, 8, 12}) {
        const Compressed<T> r = compress_both<T>(terms, k);
        // Float factors: the Gram matrices in double are orthonormalising to u_float in one pass;
        // double factors always take the second (CholeskyQR2) pass.
        CHECK(r.info.route == detail::CompressRoute::gram);
        CHECK(r.info.passes_b == (std::is_same_v<T, float> ? 1 : 2));
        CHECK(r.info.passes_a == (std::is_same_v<T, float> ? 1 : 2));
        require_optimal(ref, r.balanced, r.orth_b, k);
        // The public entry point is this route.
        const Lora<T> pub = compress(k, T(0.7) * a, T(-0.3) * b, T(1.5) * c);
        REQUIRE(pub.A() == r.balanced.A());
        REQUIRE(pub.B() == r.balanced.B());
    }
}

TEMPLATE_TEST_CASE("compress: rank-deficient stacks (an adapter twice, a zero B) fall back to Householder",
                   "[arithmetic][compress]", float, double) {
    using T = TestType;
    const auto [out, in] = GENERATE(std::pair<Index, Index>{60, 45}, std::pair<Index, Index>{45, 60});
    CAPTURE(out, in);
    const Lora<T> a = lora_of<T>(random_matrix<double>(out, 4, 41), random_matrix<double>(4, in, 42), 8, false);
    const Lora<T> b = lora_of<T>(random_matrix<double>(out, 5, 43), random_matrix<double>(5, in, 44), 4, true);
    const Lora<T> zero_b = lora_of<T>(Matrix<double>::Zero(out, 3), random_matrix<double>(3, in, 45), 3, false);
    // m = 16, rank ΔW = 9: a's columns twice in B (0.6 a − 0.25 a), and three zero columns.
    const std::vector<WeightedTerm<Lora<T>>> terms{T(0.6) * a, T(1) * b, T(-0.25) * a, T(2) * zero_b};
    const DenseReference<T> ref(terms);
    REQUIRE(double(ref.sv(9)) <= 1e-15 * double(ref.sv(0)));  // the construction is rank 9
    // k = 12 > rank: σ_10..12 = 0, the result is ΔW itself and B must still be orthonormal.
    for (const Index k : {1, 4, 9, 12}) {
        const Compressed<T> r = compress_both<T>(terms, k);
        CHECK(r.info.route == detail::CompressRoute::householder);
        require_optimal(ref, r.balanced, r.orth_b, k);
    }
    // A lone adapter with B = 0 (PEFT's initialisation): ΔW = 0 exactly; B is still orthonormal
    // with the orthonormal-B split, and A is zero.
    const Lora<T> zero = compress(zero_b, 2);
    REQUIRE(zero.B().isZero(0));
    REQUIRE(zero.A().isZero(0));
    const Lora<T> zero_o = compress(zero_b, 2, {.split = FactorSplit::orthonormal_b});
    REQUIRE(zero_o.A().isZero(0));
    const Matrix<double> Bz = to_double(zero_o.B());
    REQUIRE((Bz.transpose() * Bz - Matrix<double>::Identity(2, 2)).cwiseAbs().maxCoeff() <= 2.01 * eps<T>() + 8 * eps<double>());
}

TEMPLATE_TEST_CASE("compress: ill-conditioned factors match the dense truncated SVD on either route",
                   "[arithmetic][compress]", float, double) {
    using T = TestType;
    const auto [out, in] = GENERATE(std::pair<Index, Index>{60, 45}, std::pair<Index, Index>{300, 200});
    // Every factor has singular values log-spaced from 1 down to `lowest`: κ(B_st), κ(A_st) ≥ 1/lowest.
    // 1e-2: the Gram route in one pass for float; 1e-4: Gram, with a second pass for float too;
    // 1e-6: κ(G) ≈ 1e12 or more, near or beyond what the route accepts (either route is fine).
    const double lowest = GENERATE(1e-2, 1e-4, 1e-6);
    CAPTURE(out, in, lowest);
    const std::uint64_t seed = 50 + std::uint64_t(-std::log10(lowest));
    const Lora<T> a = lora_of<T>(graded(out, 6, lowest, seed), graded(6, in, lowest, seed + 10), 6, false);
    const Lora<T> b = lora_of<T>(graded(out, 6, lowest, seed + 20), graded(6, in, lowest, seed + 30), 6, false);
    const Lora<T> c = lora_of<T>(graded(out, 4, lowest, seed + 40), graded(4, in, lowest, seed + 50), 4, false);
    const std::vector<WeightedTerm<Lora<T>>> terms{T(0.7) * a, T(-0.4) * b, T(1.2) * c};
    const DenseReference<T> ref(terms);
    for (const Index k : {1, 2, 4, 8}) {
        const Compressed<T> r = compress_both<T>(terms, k);
        CAPTURE(int(r.info.route), r.info.passes_b, r.info.passes_a);
        if (lowest >= 1e-4) CHECK(r.info.route == detail::CompressRoute::gram);
        if (r.info.route == detail::CompressRoute::gram) {
            if constexpr (std::is_same_v<T, float>) {
                if (lowest == 1e-2) CHECK(r.info.passes_b + r.info.passes_a == 2);
                if (lowest == 1e-4) CHECK(r.info.passes_b + r.info.passes_a >= 3);
            } else {
                CHECK(r.info.passes_b + r.info.passes_a == 4);
            }
        }
        require_optimal(ref, r.balanced, r.orth_b, k);
    }
}

TEMPLATE_TEST_CASE("compress: a nearly cancelling pair (ΔW ≪ ‖B‖‖A‖) takes the Gram route and stays accurate",
                   "[arithmetic][compress]", float, double) {
    using T = TestType;
    // a − a' with a' = a perturbed by 1e-4: κ(B_st), κ(A_st) ≈ 1e4 and ΔW ≈ 1e-4 ‖B‖‖A‖, so the
    // kept singular vectors lean on the directions R_B and R_A scale down: the basis products
    // must go through the same Q₁ = F R₁⁻¹ the second Gram pass saw (an orthonormal B would
    // otherwise lose about m u ‖B‖‖A‖ / σ_k), and the error stays relative to ‖B‖‖A‖.
    const Index out = 60, in = 45;
    const Matrix<double> B1 = random_matrix<double>(out, 4, 61), A1 = random_matrix<double>(4, in, 62);
    const Matrix<double> B2 = B1 + 1e-4 * random_matrix<double>(out, 4, 63);
    const Matrix<double> A2 = A1 + 1e-4 * random_matrix<double>(4, in, 64);
    const Lora<T> a = lora_of<T>(B1, A1, 4, false), a2 = lora_of<T>(B2, A2, 4, false);
    const Lora<T> c = lora_of<T>(random_matrix<double>(out, 4, 65), random_matrix<double>(4, in, 66), 4, false);
    const std::vector<WeightedTerm<Lora<T>>> terms{T(1) * a, T(-1) * a2, T(1e-4) * c};
    const DenseReference<T> ref(terms);
    for (const Index k : {1, 4, 8}) {
        const Compressed<T> r = compress_both<T>(terms, k);
        CAPTURE(int(r.info.route), r.info.passes_b, r.info.passes_a);
        CHECK(r.info.route == detail::CompressRoute::gram);
        CHECK(r.info.passes_b + r.info.passes_a == 4);
        require_optimal(ref, r.balanced, r.orth_b, k);
    }
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
    Lora<float> nan_a = b, inf_b = b;
    nan_a.A()(1, 2) = std::numeric_limits<float>::quiet_NaN();
    inf_b.B()(7, 0) = -std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_WITH(compress(nan_a, 2), Contains("lowrank::compress") && Contains("not finite"));
    REQUIRE_THROWS_WITH(compress(2, a, inf_b), Contains("lowrank::compress") && Contains("not finite"));
    REQUIRE_THROWS_WITH(concat(nan_a), Contains("lowrank::concat") && Contains("not finite"));
}
