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
///   space, never forming out × in:
///
///         B_st = Q_B R_B (Householder QR, out × m),   A_stᵀ = Q_A R_A (in × m)
///         C = s R_B R_Aᵀ (m × m, in double) = U_c Σ V_cᵀ (Jacobi SVD)
///         ΔW_k = (Q_B U_c,k) Σ_k (Q_A V_c,k)ᵀ
///
///   Cost O((out + in) m²) + O(m³) flops (Q is applied to the k needed columns, never formed).
///   Result convention: alpha = k and rsLoRA off (s = 1) unless `CompressOptions::alpha` says
///   otherwise, and the singular values are split evenly between the factors
///   (B = Q_B U_c,k √(Σ_k / s), A = √(Σ_k / s) (Q_A V_c,k)ᵀ, as PiSSA does), or put entirely in A
///   (`FactorSplit::orthonormal_b`: B has orthonormal columns). Sign rule: the largest-magnitude
///   entry of each row of A is positive.
///
/// PEFT's `add_weighted_adapter(combination_type="svd")` forms the dense out × in sum and runs a
/// full SVD (about 1000× slower at 4096², see bench/bench_arithmetic.cpp); "linear" mixing of the A's
/// and B's separately is not the weighted sum (it adds cross terms) and is not offered here.

#include <Eigen/QR>
#include <Eigen/SVD>

#include <cmath>
#include <optional>
#include <span>
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

/// The stacked factors of Σ w_i s_i B_i A_i: B (out × m) and Aᵀ (in × m), column-major (the
/// layout the QRs work in place on), weights and scales folded into A.
template <Real T>
struct Stacked {
    ColMajor<T> B;
    ColMajor<T> At;
};

template <Real T>
[[nodiscard]] Stacked<T> stack_adapters(const char* fn, std::span<const WeightedTerm<Lora<T>>> terms) {
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
    Stacked<T> st;
    st.B.resize(out, m);
    st.At.resize(in, m);
    Index col = 0;
    for (const auto& term : terms) {
        const Lora<T>& a = term.term();
        const double ws = double(term.weight()) * double(a.scale());  // w_i s_i, once
        st.B.middleCols(col, a.rank()) = a.B();
        // A row-major r × in block is, in memory, the column-major in × r block of Aᵀ.
        st.At.middleCols(col, a.rank()) =
            (a.A().transpose().template cast<double>() * ws).template cast<T>();
        col += a.rank();
    }
    if (!st.At.allFinite() || !st.B.allFinite()) fail(fn, ": the adapters' factors are not finite");
    return st;
}

/// Optimal rank-k approximation of s · B Atᵀ (B: out × m, At: in × m) in factor space.
/// B and At are overwritten (the QRs run in place on them).
template <Real T>
[[nodiscard]] Lora<T> compress_factors(const char* fn, ColMajor<T>& B, ColMajor<T>& At, double s,
                                       Index k, const CompressOptions& opts) {
    using CM = ColMajor<T>;
    using DM = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
    const Index out = B.rows(), in = At.rows(), m = B.cols();
    if (k < 1 || k > std::min({out, in, m}))
        fail(fn, ": rank k = ", k, " is out of range [1, min(out, in, sum of ranks)] = [1, ",
             std::min({out, in, m}), "] for ", out, " x ", in, " adapters of total rank ", m);
    const double alpha = opts.alpha.value_or(double(k));
    if (!(alpha > 0) || !std::isfinite(alpha))
        fail(fn, ": the result's alpha must be finite and > 0, got ", alpha);
    const double s_out = lora_scale(alpha, k, opts.rslora);

    // Thin QR of both stacks: B = Q_B R_B, Aᵀ = Q_A R_A (R_B: p_B × m, R_A: p_A × m).
    const Eigen::HouseholderQR<Eigen::Ref<CM>> qr_b(B);
    const Eigen::HouseholderQR<Eigen::Ref<CM>> qr_a(At);
    const Index pb = std::min(out, m), pa = std::min(in, m);
    const DM rb = qr_b.matrixQR().topRows(pb).template triangularView<Eigen::Upper>().toDenseMatrix()
                      .template cast<double>();
    const DM ra = qr_a.matrixQR().topRows(pa).template triangularView<Eigen::Upper>().toDenseMatrix()
                      .template cast<double>();
    const DM core = s * (rb * ra.transpose());  // p_B × p_A
    const Eigen::JacobiSVD<DM> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);

    // Split Σ_k / s_out between the factors.
    Eigen::VectorXd left(k), right(k);
    for (Index j = 0; j < k; ++j) {
        const double sv = svd.singularValues()(j) / s_out;
        left(j) = opts.split == FactorSplit::balanced ? std::sqrt(sv) : 1.0;
        right(j) = opts.split == FactorSplit::balanced ? std::sqrt(sv) : sv;
    }
    // Q_B [U_c,k diag(left); 0] and Q_A [V_c,k diag(right); 0], applying the reflections only.
    CM bk = CM::Zero(out, k), akt = CM::Zero(in, k);
    bk.topRows(pb) = (svd.matrixU().leftCols(k) * left.asDiagonal()).template cast<T>();
    akt.topRows(pa) = (svd.matrixV().leftCols(k) * right.asDiagonal()).template cast<T>();
    bk.applyOnTheLeft(qr_b.householderQ());
    akt.applyOnTheLeft(qr_a.householderQ());
    // Sign rule: largest-magnitude entry of each row of A positive.
    for (Index j = 0; j < k; ++j) {
        Index best = 0;
        for (Index i = 1; i < in; ++i)
            if (std::abs(akt(i, j)) > std::abs(akt(best, j))) best = i;
        if (akt(best, j) < 0) {
            akt.col(j) = -akt.col(j);
            bk.col(j) = -bk.col(j);
        }
    }
    const Matrix<T> A_out = akt.transpose();
    const Matrix<T> B_out = bk;
    return Lora<T>::from_factors(A_out, B_out, alpha, opts.rslora);
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
    detail::Stacked<T> st = detail::stack_adapters<T>(fn, terms);
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
    const char* fn = "lowrank::compress";
    sum.validate(fn, 0, sum.in_features(), sum.out_features());
    detail::ColMajor<T> B = sum.B(), At = sum.A().transpose();
    return detail::compress_factors<T>(fn, B, At, double(sum.scale()), k, opts);
}

/// The optimal rank-k approximation of Σ_i w_i s_i B_i A_i (any Σ r_i, also above min(out, in)).
template <Real T>
[[nodiscard]] Lora<T> compress(std::span<const WeightedTerm<Lora<T>>> terms, Index k,
                               const CompressOptions& opts = {}) {
    const char* fn = "lowrank::compress";
    detail::Stacked<T> st = detail::stack_adapters<T>(fn, terms);
    return detail::compress_factors<T>(fn, st.B, st.At, 1.0, k, opts);
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
