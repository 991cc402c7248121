// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Exact adapter arithmetic on LoRA adapters of the same out × in weight.
///
/// - `concat(w₁ * a₁, w₂ * a₂, …)`: the exact weighted sum ΔW = Σ_i w_i s_i B_i A_i as ONE LoRA
///   of rank m = Σ r_i: B = [B₁ … B_N] (out × m), A = [w₁ s₁ A₁; …; w_N s_N A_N] (m × in).
///   Scale convention of the result: alpha = m and rsLoRA off, so s = 1 — every weight and every
///   source scale (alpha / r or rsLoRA's alpha / √r, each applied exactly once) is folded into A.
///   Cost: copies of the factors. Needs m ≤ min(out, in) (a `Lora` cannot have a larger rank);
///   use `compress` on the list otherwise.
/// - `compress(sum, k)` / `compress({w₁ * a₁, …}, k)`: the optimal rank-k approximation of ΔW
///   (Eckart–Young: the truncated SVD of ΔW, in Frobenius and spectral norm) computed in factor
///   space, never forming out × in. With the stacks B = [B₁ … B_N] (out × m) and
///   A = [w₁ s₁ A₁; …] (m × in), ΔW = B A, and all arithmetic in double whatever T:
///
///         BᵀB = R_BᵀR_B,   A Aᵀ = R_AᵀR_A        (m × m Gram matrices, Cholesky: CholeskyQR)
///         C = R_B R_Aᵀ (m × m) = U_c Σ V_cᵀ
///         B_k = Q_B U_c,k,  A_kᵀ = Q_A V_c,k    (Q_B = B R_B⁻¹, Q_A = Aᵀ R_A⁻¹, never stored)
///
///   The factors are read in panels of ~96 KB converted to double (never a double copy of a
///   stack), once for the Gram matrices and once for the products B (R_B⁻¹ U_c,k) and
///   (V_c,kᵀ R_A⁻ᵀ) A. Cost: (out + in) m (m + 1) flops for the Gram matrices, 2 (out + in) m k
///   for the products, O(m³) for the core, all in SYRK/GEMM kernels: 4 ms (median; 3 ms best)
///   at 4096², m = 64, k = 16, float, on one core of the loaded 2-core test VM, 1.3 ms at 1024²
///   (bench/bench_arithmetic.cpp; the Householder-QR version it replaces took 9 and 5 ms).
///
///   Precision. A Gram matrix squares the condition number: accumulated in double, it leaves
///   Q₁ = B R₁⁻¹ orthonormal only to about (n + m) u_double κ(B)² (n = out; in for A). When that
///   exceeds T's unit roundoff — always for double factors; for float ones once κ(B)² >
///   u_float / ((n + m) u_double), about 360² at n = 4096 — a second pass factors the Gram matrix
///   of Q₁ = Q R₂ (CholeskyQR2: Yamamoto, Nakatsukasa, Yanagisawa and Fukaya, ETNA 44, 2015),
///   which makes Q orthonormal to about (n + m) u_double whatever κ(B); the products are then
///   formed from that same Q₁ (R = R₂ R₁, B_k = Q₁ (R₂⁻¹ U_c,k)). This route is taken while both
///   Gram matrices have an estimated (LAPACK-style, 1-norm) condition number ≤
///   1 / (16 (n + m) u_double), where CholeskyQR2 is reliable (κ(B) up to about 4e5 at
///   n = 4096). Otherwise — a rank-deficient stack (the same adapter twice, an adapter with
///   B = 0), m > min(out, in), or factors whose singular values spread further — Householder QRs
///   of the double stacks, B = Q_B R_B and Aᵀ = Q_A R_A, feed the same core, and Q is applied to
///   the k needed columns only (about 3× slower than the Gram route). Both routes are backward
///   stable in double: the result is the exact truncation of ΔW + E with ‖E‖_F ≲
///   (out + in + m) u_double ‖B‖_F ‖A‖_F, rounded to T once at the end (tests/test_arithmetic.cpp
///   holds both to that against a long-double dense SVD on well-conditioned, rank-deficient and
///   ill-conditioned stacks).
///
///   The core's SVD is one-sided Jacobi (Hestenes) on C V₀, V₀ the eigenvectors of CᵀC: V₀ is
///   accurate where the singular values are large and separated, so one or two sweeps (about
///   six for rank-deficient or strongly graded cores) make the columns orthogonal to √m u
///   relative to their norms, which keeps small singular values accurate. About 0.4 ms at
///   m = 64, where Eigen's two-sided JacobiSVD takes 2–4 ms (and was 4× less accurate against a
///   long-double reference) and BDCSVD 1.2 ms.
///
///   Result convention: alpha = k and rsLoRA off (s = 1) unless `CompressOptions::alpha` says
///   otherwise, and the singular values are split evenly between the factors
///   (B = Q_B U_c,k √(Σ_k / s), A = √(Σ_k / s) (Q_A V_c,k)ᵀ, as PiSSA does), or put entirely in A
///   (`FactorSplit::orthonormal_b`: B has orthonormal columns). Sign rule: the largest-magnitude
///   entry of each row of A is positive.
///
/// PEFT's `add_weighted_adapter(combination_type="svd")` forms the dense out × in sum and runs a
/// full SVD (about 1000× slower at 4096², see bench/bench_arithmetic.cpp); "linear" mixing of the A's
/// and B's separately is not the weighted sum (it adds cross terms) and is not offered here.

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "core/args.hpp"
#include "expr/expr.hpp"
#include "lora.hpp"

namespace lowrank {

/// How `compress` distributes the singular values between B and A.
enum class FactorSplit {
    balanced,       ///< B = Q U √(Σ/s), A = √(Σ/s) Vᵀ (PiSSA-like; trains well as a LoRA)
    orthonormal_b,  ///< B = Q U (orthonormal columns), A = (Σ/s) Vᵀ
};

/// Options of `compress`.
struct CompressOptions {
    std::optional<double> alpha{};        ///< alpha of the result (default: k, so s = 1); > 0
    bool rslora = false;                  ///< the result's scale is alpha / √k
    FactorSplit split = FactorSplit::balanced;
};

namespace detail {

template <Real T>
[[nodiscard]] const Lora<T>& adapter_of(const Lora<T>& lora) noexcept {
    return lora;
}
template <Real T>
[[nodiscard]] const Lora<T>& adapter_of(const WeightedTerm<Lora<T>>& term) noexcept {
    return term.term();
}
template <Real T>
[[nodiscard]] double weight_of(const Lora<T>&) noexcept {
    return 1.0;
}
template <Real T>
[[nodiscard]] double weight_of(const WeightedTerm<Lora<T>>& term) noexcept {
    return double(term.weight());
}

template <class T>
using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
using DMatrix = ColMajor<double>;

/// True when every entry is finite: x · 0 is 0 for finite x and NaN otherwise, and the sum is a
/// vectorised reduction (Eigen's allFinite() goes element by element: about 1 ms for the
/// factors of the 4096² benchmark, a quarter of the whole compression).
template <class D>
[[nodiscard]] bool all_finite(const Eigen::DenseBase<D>& m) {
    using S = typename D::Scalar;
    return std::isfinite((m.derived().array() * S(0)).sum());
}

/// The stacked factors of Σ w_i s_i B_i A_i: B (out × m) and Aᵀ (in × m), column-major (the
/// layout the QRs work in place on), weights and scales folded into A.
template <Real T>
struct Stacked {
    ColMajor<T> B;
    ColMajor<T> At;
};

/// Checks a list of weighted adapters (same weight shape, finite weights); returns m = Σ r_i.
template <Real T>
Index check_terms(const char* fn, std::span<const WeightedTerm<Lora<T>>> terms) {
    if (terms.empty()) fail(fn, ": no adapters given");
    const Index out = terms[0].term().out_features(), in = terms[0].term().in_features();
    Index m = 0;
    for (std::size_t i = 0; i < terms.size(); ++i) {
        const Lora<T>& a = terms[i].term();
        a.validate(fn, 0, a.in_features(), a.out_features());
        if (a.out_features() != out || a.in_features() != in)
            fail(fn, ": adapter ", i, " is for a ", a.out_features(), " x ", a.in_features(),
                 " weight (B ", shape_of(a.B()), ", A ", shape_of(a.A()), "), adapter 0 for a ",
                 out, " x ", in, " weight");
        const double w = double(terms[i].weight());
        if (!std::isfinite(w)) fail(fn, ": the weight of adapter ", i, " must be finite, got ", w);
        m += a.rank();
    }
    return m;
}

/// The stacks in S (T for `concat`, double for `compress`); w_i s_i is folded into A in double
/// and rounded to S once.
template <class S, Real T>
[[nodiscard]] Stacked<S> stack_adapters(const char* fn, std::span<const WeightedTerm<Lora<T>>> terms) {
    const Index m = check_terms<T>(fn, terms);
    const Index out = terms[0].term().out_features(), in = terms[0].term().in_features();
    Stacked<S> st;
    st.B.resize(out, m);
    st.At.resize(in, m);
    Index col = 0;
    for (const auto& term : terms) {
        const Lora<T>& a = term.term();
        const double ws = double(term.weight()) * double(a.scale());  // w_i s_i, once
        st.B.middleCols(col, a.rank()) = a.B().template cast<S>();
        // A row-major r × in block is, in memory, the column-major in × r block of Aᵀ.
        st.At.middleCols(col, a.rank()) =
            (a.A().transpose().template cast<double>() * ws).template cast<S>();
        col += a.rank();
    }
    if (!all_finite(st.At) || !all_finite(st.B)) fail(fn, ": the adapters' factors are not finite");
    return st;
}

/// Thin SVD of a small matrix: C (p × q) = U diag(S) Vᵀ, U: p × min, V: q × min, S descending.
struct SmallSVD {
    DMatrix U;
    Eigen::VectorXd S;
    DMatrix V;
};

/// (x, y) ← (c x − s y, s x + c y) on two columns of length n.
inline void rotate_columns(double* x, double* y, Index n, double c, double s) noexcept {
    for (Index i = 0; i < n; ++i) {
        const double xi = x[i], yi = y[i];
        x[i] = c * xi - s * yi;
        y[i] = s * xi + c * yi;
    }
}

/// SVD of a small dense matrix by one-sided Jacobi (Hestenes) on W = C V₀, V₀ the eigenvectors
/// of CᵀC (descending). V₀ already nearly diagonalises WᵀW where the singular values are large
/// and separated; the sweeps rotate column pairs until every pair is orthogonal to √p u relative
/// to the columns' norms (Demmel and Veselić's stopping rule, so small singular values keep their
/// relative accuracy), usually in one or two sweeps. Then σ_j = ‖w_j‖, u_j = w_j / σ_j, and the
/// columns of zero norm (rank-deficient C) are completed to an orthonormal U. Backward stable:
/// C = U Σ Vᵀ + E with ‖E‖ ≤ c p u ‖C‖. Falls back to Eigen's JacobiSVD if the sweeps do not
/// converge (not observed). (A template only so that the translation units that never call it do
/// not instantiate the eigensolver and JacobiSVD: Dense is always DMatrix.)
template <class Dense = DMatrix>
SmallSVD small_svd(const std::type_identity_t<Dense>& C) {
    if (C.rows() < C.cols()) {  // Jacobi on the columns needs p ≥ q: work on Cᵀ
        SmallSVD t = small_svd<Dense>(C.transpose());
        std::swap(t.U, t.V);
        return t;
    }
    const Index p = C.rows(), q = C.cols();
    DMatrix V, W;
    {
        DMatrix gram = DMatrix::Zero(q, q);
        gram.selfadjointView<Eigen::Lower>().rankUpdate(C.transpose());
        const Eigen::SelfAdjointEigenSolver<DMatrix> eig(gram);  // reads the lower triangle
        if (eig.info() == Eigen::Success)
            V = eig.eigenvectors().rowwise().reverse();
        else
            V = DMatrix::Identity(q, q);
    }
    W.noalias() = C * V;
    const double tol = std::sqrt(double(p)) * std::numeric_limits<double>::epsilon();
    Eigen::VectorXd norm2(q);
    constexpr int max_sweeps = 40;
    bool converged = false;
    for (int sweep = 0; sweep < max_sweeps && !converged; ++sweep) {
        converged = true;
        for (Index j = 0; j < q; ++j) norm2(j) = W.col(j).squaredNorm();
        for (Index i = 0; i + 1 < q; ++i)
            for (Index j = i + 1; j < q; ++j) {
                const double gij = W.col(i).dot(W.col(j));
                const double gii = norm2(i), gjj = norm2(j);
                if (!(std::abs(gij) > tol * std::sqrt(gii) * std::sqrt(gjj))) continue;
                converged = false;
                // The rotation that zeroes the (i, j) entry of WᵀW (Rutishauser's formulas).
                const double zeta = (gjj - gii) / (2 * gij);
                const double t = std::copysign(1.0, zeta) / (std::abs(zeta) + std::hypot(1.0, zeta));
                const double c = 1 / std::sqrt(1 + t * t), s = c * t;
                rotate_columns(W.col(i).data(), W.col(j).data(), p, c, s);
                rotate_columns(V.col(i).data(), V.col(j).data(), q, c, s);
                norm2(i) = std::max(gii - t * gij, 0.0);
                norm2(j) = gjj + t * gij;
            }
    }
    if (!converged) {
        const Eigen::JacobiSVD<DMatrix> svd(C, Eigen::ComputeThinU | Eigen::ComputeThinV);
        return {svd.matrixU(), svd.singularValues(), svd.matrixV()};
    }
    Eigen::VectorXd sigma(q);
    for (Index j = 0; j < q; ++j) sigma(j) = W.col(j).norm();
    std::vector<Index> order(static_cast<std::size_t>(q));
    std::iota(order.begin(), order.end(), Index(0));
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return sigma(a) > sigma(b); });
    SmallSVD out{DMatrix(p, q), Eigen::VectorXd(q), DMatrix(q, q)};
    // Columns below σ₁ u² carry nothing but rounding: treated as zero and completed below.
    const double zero = sigma(order[0]) * std::numeric_limits<double>::epsilon() *
                        std::numeric_limits<double>::epsilon();
    Index nonzero = 0;
    for (Index j = 0; j < q; ++j) {
        const Index src = order[static_cast<std::size_t>(j)];
        out.V.col(j) = V.col(src);
        if (sigma(src) > zero) {
            out.S(j) = sigma(src);
            out.U.col(j) = W.col(src) / sigma(src);
            ++nonzero;
        } else {
            out.S(j) = 0;
        }
    }
    if (nonzero < q) {  // an orthonormal completion of the nonzero columns of U
        if (nonzero == 0) {
            out.U = DMatrix::Identity(p, q);
        } else {
            const Eigen::HouseholderQR<DMatrix> qr(out.U.leftCols(nonzero));
            const DMatrix Q = qr.householderQ();
            out.U.rightCols(q - nonzero) = Q.middleCols(nonzero, q - nonzero);
        }
    }
    return out;
}

/// Which route `compress_terms` takes (tests force one and check which was taken).
enum class CompressRoute {
    automatic,    ///< Gram (CholeskyQR) when both Gram matrices are well enough conditioned
    gram,         ///< CholeskyQR without the conditioning test (still falls back if Cholesky fails)
    householder,  ///< Householder QRs of the stacks
};

/// What `compress_terms` did (for tests and diagnostics).
struct CompressInfo {
    CompressRoute route = CompressRoute::automatic;  ///< gram or householder
    int passes_b = 0;  ///< Gram passes over B (1 or 2; 0 on the Householder route)
    int passes_a = 0;  ///< Gram passes over Aᵀ
};

using DRowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Rows of the long dimension (out for B, in for A) the Gram route converts to double at a time:
/// about 96 KB of doubles per panel (192 rows at m = 64), so a panel stays in L2 and below
/// glibc's mmap threshold; the route never holds a double copy of a whole stack.
[[nodiscard]] inline Index panel_rows(Index m) noexcept {
    return std::clamp<Index>(Index(12288) / std::max<Index>(m, 1), 64, 1024);
}

/// The stacks of Σ w_i s_i B_i A_i, read in slices of the long dimension, in double:
/// B (out × m) and A (m × in), w_i s_i folded into A.
template <Real T>
class TermPanels {
public:
    TermPanels(std::span<const WeightedTerm<Lora<T>>> terms, Index m)
        : terms_(terms), b_(panel_rows(m), m), a_(m, panel_rows(m)) {}

    /// Rows [p0, p0 + len) of B: a len × m block (valid until the next call).
    [[nodiscard]] auto b_rows(Index p0, Index len) {
        Index col = 0;
        for (const auto& term : terms_) {
            const Lora<T>& a = term.term();
            b_.block(0, col, len, a.rank()) = a.B().middleRows(p0, len).template cast<double>();
            col += a.rank();
        }
        return b_.topRows(len);
    }
    /// Rows [p0, p0 + len) of Aᵀ: the transpose of A's columns [p0, p0 + len), len × m.
    [[nodiscard]] auto at_rows(Index p0, Index len) {
        Index row = 0;
        for (const auto& term : terms_) {
            const Lora<T>& a = term.term();
            const double ws = double(term.weight()) * double(a.scale());  // w_i s_i, once
            a_.block(row, 0, a.rank(), len) = a.A().middleCols(p0, len).template cast<double>() * ws;
            row += a.rank();
        }
        return a_.leftCols(len).transpose();
    }

private:
    std::span<const WeightedTerm<Lora<T>>> terms_;
    DRowMatrix b_;  // panel_rows(m) × m
    DRowMatrix a_;  // m × panel_rows(m)
};

/// The triangular factor of a tall n × m matrix F from its Gram matrix (CholeskyQR): F = Q R,
/// R = R₂ R₁ with FᵀF = R₁ᵀR₁ and, after a second pass, Q₁ᵀQ₁ = R₂ᵀR₂ for Q₁ = F R₁⁻¹.
/// Q is never stored; a product Q X is formed panel by panel as `basis(panel)` · `coefficients(X)`.
struct GramFactor {
    bool ok = false;
    DMatrix R1;  ///< m × m upper triangular
    DMatrix R2;  ///< m × m upper triangular (empty after one pass: R₂ = I)

    /// 1 or 2.
    [[nodiscard]] int passes() const noexcept { return R2.size() == 0 ? 1 : 2; }
    /// R = R₂ R₁.
    [[nodiscard]] DMatrix R() const {
        if (R2.size() == 0) return R1;
        return R2.triangularView<Eigen::Upper>() * R1;
    }
    /// Rows of F → the same rows of the basis Q X is formed from: F itself after one pass; after
    /// two, Q₁ = F R₁⁻¹ computed exactly as the second pass computed it, so that Q₁ R₂⁻¹ is
    /// orthonormal to working precision (CholeskyQR2) whatever κ(F).
    template <class Panel>
    void basis(Panel& panel) const {
        if (R2.size() != 0) R1.triangularView<Eigen::Upper>().solveInPlace<Eigen::OnTheRight>(panel);
    }
    /// The m × k coefficients of Q X in that basis: R₁⁻¹ X after one pass, R₂⁻¹ X after two.
    [[nodiscard]] DMatrix coefficients(DMatrix X) const {
        (R2.size() != 0 ? R2 : R1).triangularView<Eigen::Upper>().solveInPlace(X);
        return X;
    }
};

/// CholeskyQR of F (n × m), read by `rows(p0, len)` (a writable len × m block of F's rows, in
/// double). G = FᵀF is accumulated in double, so Q₁ = F R₁⁻¹ is orthonormal to about
/// (n + m) u_double κ(G). A second pass (CholeskyQR2) runs when that exceeds `u_target` (the
/// unit roundoff of the result's type): always for double factors, for float factors only when
/// κ(G) > u_float / ((n + m) u_double). Not ok when a Cholesky factorisation fails or, with
/// `check`, when κ(G) > 1 / (16 (n + m) u_double), where CholeskyQR2 is no longer reliable.
/// κ(G) is LAPACK-style estimated: 1 / rcond() estimates κ₁(G) ≥ κ₂(G) (G symmetric).
template <class Rows>
[[nodiscard]] GramFactor gram_factor(Index n, Index m, Rows&& rows, double u_target, bool check) {
    GramFactor f;
    if (m > n) return f;  // FᵀF is singular
    const Index step = panel_rows(m);
    DMatrix gram = DMatrix::Zero(m, m);
    for (Index p0 = 0; p0 < n; p0 += step) {
        const auto panel = rows(p0, std::min(step, n - p0));
        gram.selfadjointView<Eigen::Lower>().rankUpdate(panel.transpose());
    }
    Eigen::LLT<DMatrix, Eigen::Lower> llt(gram);
    if (llt.info() != Eigen::Success) return f;
    const double u = std::numeric_limits<double>::epsilon() / 2;
    const double rcond = llt.rcond();
    if (check && !(rcond >= 16 * double(n + m) * u)) return f;
    f.R1 = llt.matrixU();
    if (double(n + m) * u > u_target * rcond) {
        // Q₁ = F R₁⁻¹ (formed panel by panel, never stored) is orthonormal to about
        // (n + m) u κ(G) ≤ 1/16; the Cholesky factor R₂ of its Gram matrix makes
        // Q = Q₁ R₂⁻¹ orthonormal to about (n + m) u, with F = Q (R₂ R₁).
        gram.setZero();
        for (Index p0 = 0; p0 < n; p0 += step) {
            auto panel = rows(p0, std::min(step, n - p0));
            f.R1.triangularView<Eigen::Upper>().solveInPlace<Eigen::OnTheRight>(panel);
            gram.selfadjointView<Eigen::Lower>().rankUpdate(panel.transpose());
        }
        llt.compute(gram);
        if (llt.info() != Eigen::Success) return f;
        f.R2 = llt.matrixU();
    }
    f.ok = true;
    return f;
}

/// Splits Σ_k / s_out between the factors: U_c,k diag(left) and V_c,k diag(right).
inline void split_singular_values(const SmallSVD& svd, Index k, double s_out, FactorSplit split,
                                  DMatrix& left, DMatrix& right) {
    left = svd.U.leftCols(k);
    right = svd.V.leftCols(k);
    for (Index j = 0; j < k; ++j) {
        const double sv = svd.S(j) / s_out;
        left.col(j) *= split == FactorSplit::balanced ? std::sqrt(sv) : 1.0;
        right.col(j) *= split == FactorSplit::balanced ? std::sqrt(sv) : sv;
    }
}

/// Optimal rank-k approximation of Σ w_i s_i B_i A_i in factor space; see the file comment.
/// `route` forces a route (tests); `info`, if given, receives what was done.
template <Real T>
[[nodiscard]] Lora<T> compress_terms(const char* fn, std::span<const WeightedTerm<Lora<T>>> terms,
                                     Index k, const CompressOptions& opts,
                                     CompressRoute route = CompressRoute::automatic,
                                     CompressInfo* info = nullptr) {
    const Index m = check_terms<T>(fn, terms);
    const Index out = terms[0].term().out_features(), in = terms[0].term().in_features();
    for (const auto& term : terms)
        if (!all_finite(term.term().A()) || !all_finite(term.term().B()))
            fail(fn, ": the adapters' factors are not finite");
    if (k < 1 || k > std::min({out, in, m}))
        fail(fn, ": rank k = ", k, " is out of range [1, min(out, in, sum of ranks)] = [1, ",
             std::min({out, in, m}), "] for ", out, " x ", in, " adapters of total rank ", m);
    const double alpha = opts.alpha.value_or(double(k));
    if (!(alpha > 0) || !std::isfinite(alpha))
        fail(fn, ": the result's alpha must be finite and > 0, got ", alpha);
    const double s_out = lora_scale(alpha, k, opts.rslora);

    // The result, written in place: B (out × k) and A (k × in), row-major.
    Lora<T> result(out, in, {.rank = k, .alpha = alpha, .rslora = opts.rslora, .init = LoraInit::zeros});
    Matrix<T>& B_out = result.B();
    Matrix<T>& A_out = result.A();
    CompressInfo done{CompressRoute::householder, 0, 0};
    if (route != CompressRoute::householder) {
        const double u_target = std::numeric_limits<T>::epsilon() / 2;
        const bool check = route == CompressRoute::automatic;
        TermPanels<T> panels(terms, m);
        const auto b_rows = [&](Index p0, Index len) { return panels.b_rows(p0, len); };
        const auto at_rows = [&](Index p0, Index len) { return panels.at_rows(p0, len); };
        const GramFactor fb = gram_factor(out, m, b_rows, u_target, check);
        const GramFactor fa = fb.ok ? gram_factor(in, m, at_rows, u_target, check) : GramFactor{};
        if (fb.ok && fa.ok) {
            DMatrix left, right;
            split_singular_values(small_svd(fb.R() * fa.R().transpose()), k, s_out, opts.split,
                                  left, right);
            // B_k = Q_B U_c,k diag(left) and A_kᵀ = Q_A V_c,k diag(right), panel by panel.
            const DMatrix coef_b = fb.coefficients(left), coef_a = fa.coefficients(right);
            const Index step = panel_rows(m);
            for (Index p0 = 0; p0 < out; p0 += step) {
                const Index len = std::min(step, out - p0);
                auto panel = b_rows(p0, len);
                fb.basis(panel);
                B_out.middleRows(p0, len) = (panel * coef_b).template cast<T>();
            }
            for (Index p0 = 0; p0 < in; p0 += step) {
                const Index len = std::min(step, in - p0);
                auto panel = at_rows(p0, len);
                fa.basis(panel);
                A_out.middleCols(p0, len) = (panel * coef_a).transpose().template cast<T>();
            }
            done = {CompressRoute::gram, fb.passes(), fa.passes()};
        }
    }
    if (done.route == CompressRoute::householder) {
        Stacked<double> st = stack_adapters<double, T>(fn, terms);
        // Thin QR of both stacks: B = Q_B R_B, Aᵀ = Q_A R_A (R_B: p_B × m, R_A: p_A × m).
        const Eigen::HouseholderQR<Eigen::Ref<DMatrix>> qr_b(st.B);
        const Eigen::HouseholderQR<Eigen::Ref<DMatrix>> qr_a(st.At);
        const Index pb = std::min(out, m), pa = std::min(in, m);
        const DMatrix rb = qr_b.matrixQR().topRows(pb).triangularView<Eigen::Upper>();
        const DMatrix ra = qr_a.matrixQR().topRows(pa).triangularView<Eigen::Upper>();
        DMatrix left, right;
        split_singular_values(small_svd(rb * ra.transpose()), k, s_out, opts.split, left, right);
        // Q_B [U_c,k diag(left); 0] and Q_A [V_c,k diag(right); 0], applying the reflections only.
        DMatrix bk = DMatrix::Zero(out, k), akt = DMatrix::Zero(in, k);
        bk.topRows(pb) = left;
        akt.topRows(pa) = right;
        bk.applyOnTheLeft(qr_b.householderQ());
        akt.applyOnTheLeft(qr_a.householderQ());
        B_out = bk.template cast<T>();  // shapes unchanged: out × k and k × in
        A_out = akt.transpose().template cast<T>();
    }
    if (info) *info = done;
    if (!all_finite(A_out) || !all_finite(B_out))
        fail(fn, ": the compressed factors overflow ", std::is_same_v<T, float> ? "float" : "double");
    // Sign rule: largest-magnitude entry of each row of A positive (the first one on ties).
    for (Index j = 0; j < k; ++j) {
        Index best = 0;
        for (Index i = 1; i < in; ++i)
            if (std::abs(A_out(j, i)) > std::abs(A_out(j, best))) best = i;
        if (A_out(j, best) < 0) {
            A_out.row(j) = -A_out.row(j);
            B_out.col(j) = -B_out.col(j);
        }
    }
    return result;
}

template <Real T, class First, class... Rest>
[[nodiscard]] std::vector<WeightedTerm<Lora<T>>> collect_terms(const First& first, const Rest&... rest) {
    return {WeightedTerm<Lora<T>>(adapter_of<T>(first), static_cast<T>(weight_of<T>(first))),
            WeightedTerm<Lora<T>>(adapter_of<T>(rest), static_cast<T>(weight_of<T>(rest)))...};
}

template <class A>
struct adapter_scalar;
template <Real T>
struct adapter_scalar<Lora<T>> {
    using type = T;
};
template <Real T>
struct adapter_scalar<WeightedTerm<Lora<T>>> {
    using type = T;
};

}  // namespace detail

/// A `Lora<T>` or `weight * Lora<T>` (`WeightedTerm<Lora<T>>` from expr/expr.hpp).
template <class A>
concept WeightedLora = requires { typename detail::adapter_scalar<std::remove_cvref_t<A>>::type; };

/// The exact weighted sum Σ_i w_i s_i B_i A_i of adapters as one LoRA of rank Σ r_i, with s = 1
/// (alpha = Σ r_i, rsLoRA off); weights and source scales are folded into A (see the file
/// comment). Throws for adapters of different weight shapes, non-finite weights, or
/// Σ r_i > min(out, in).
template <Real T>
[[nodiscard]] Lora<T> concat(std::span<const WeightedTerm<Lora<T>>> terms) {
    const char* fn = "lowrank::concat";
    detail::Stacked<T> st = detail::stack_adapters<T, T>(fn, terms);
    const Index m = st.B.cols(), out = st.B.rows(), in = st.At.rows();
    if (m > std::min(out, in))
        detail::fail(fn, ": the sum of ranks ", m, " exceeds min(out, in) = ", std::min(out, in),
                     " for a ", out, " x ", in, " weight; compress the list to a lower rank instead");
    return Lora<T>::from_factors(st.At.transpose(), st.B, double(m), false);
}
/// `concat(w₁ * a₁, a₂, …)`: each argument a `Lora<T>` (weight 1) or `w * Lora<T>`.
template <WeightedLora First, WeightedLora... Rest>
[[nodiscard]] auto concat(const First& first, const Rest&... rest) {
    using T = typename detail::adapter_scalar<First>::type;
    static_assert((std::same_as<T, typename detail::adapter_scalar<Rest>::type> && ...),
                  "lowrank::concat: all adapters must have the same scalar type");
    const auto terms = detail::collect_terms<T>(first, rest...);
    return concat<T>(std::span<const WeightedTerm<Lora<T>>>(terms));
}

/// The optimal rank-k approximation of the adapter's ΔW = s B A, in factor space (see the file
/// comment for the algorithm, cost and the result's scale convention).
/// Throws for k outside [1, min(out, in, rank)] or a bad alpha in `opts`.
template <Real T>
[[nodiscard]] Lora<T> compress(const Lora<T>& sum, Index k, const CompressOptions& opts = {}) {
    const std::vector<WeightedTerm<Lora<T>>> terms{WeightedTerm<Lora<T>>(sum, T(1))};
    return detail::compress_terms<T>("lowrank::compress", terms, k, opts);
}

/// The optimal rank-k approximation of Σ_i w_i s_i B_i A_i (any Σ r_i, also above min(out, in)).
template <Real T>
[[nodiscard]] Lora<T> compress(std::span<const WeightedTerm<Lora<T>>> terms, Index k,
                               const CompressOptions& opts = {}) {
    return detail::compress_terms<T>("lowrank::compress", terms, k, opts);
}
/// `compress(k, w₁ * a₁, a₂, …)` with the default options.
template <WeightedLora First, WeightedLora... Rest>
[[nodiscard]] auto compress(Index k, const First& first, const Rest&... rest) {
    using T = typename detail::adapter_scalar<First>::type;
    static_assert((std::same_as<T, typename detail::adapter_scalar<Rest>::type> && ...),
                  "lowrank::compress: all adapters must have the same scalar type");
    const auto terms = detail::collect_terms<T>(first, rest...);
    return compress<T>(std::span<const WeightedTerm<Lora<T>>>(terms), k);
}

}  // namespace lowrank
