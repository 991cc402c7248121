// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Truncated singular value decompositions of an out × in matrix M to rank r:
///
///     M ≈ U_r diag(S_r) V_rᵀ,   U_r: out × r,  S_r: r (descending),  V_r: in × r
///
/// - `truncated_svd`: exact (Eigen's divide-and-conquer BDCSVD of the whole matrix, then
///   truncation). Cost O(out · in · min(out, in)); the reference, and the right choice up to a
///   few hundred rows or when the spectrum is flat.
/// - `randomized_svd`: Halko, Martinsson, Tropp, "Finding structure with randomness" (SIAM Review
///   2011), Algorithm 4.4 (randomised subspace iteration) followed by Algorithm 5.1 (direct SVD of
///   the small projected matrix). With l = r + p columns (p = oversampling) and q power
///   iterations, orthonormalised between iterations:
///
///         Y = M Ω (Ω: in × l Gaussian), Q = orth(Y);  q times: Q̃ = orth(Mᵀ Q), Q = orth(M Q̃)
///         C = Qᵀ M (l × in) = Ũ Σ Ṽᵀ,  U = Q Ũ
///
///   Cost 2 (2q + 2) · out · in · l flops in matrix products plus O((out + in) l²).
///   Accuracy: the error of the rank-l range decays like (σ_{l+1}/σ_r)^(2q+1); where the spectrum
///   has a gap after r it agrees with the exact truncated SVD to rounding, where it is flat
///   (σ_{r+1} ≈ σ_r) the subspace is ill-determined and the result can differ from the exact one
///   noticeably while its residual ‖M − M̃_r‖_F stays close to the optimal one (Eckart–Young).
///   `bench/bench_svd.cpp` reports both the time and this accuracy.
///
/// Sign rule (both): SVD factors are defined up to the sign of each singular pair; the returned
/// pairs are flipped so that the largest-magnitude entry of each row of V_rᵀ (column of V_r) is
/// positive (the first such entry on ties). Results are then reproducible across calls and
/// algorithms whenever the singular values are distinct.
///
/// Input: any Eigen matrix expression of float or double (row- or column-major: it is read
/// through `Eigen::Ref`, copying only if it has no compatible direct access). Throws
/// `lowrank::error` for a rank outside [1, min(out, in)], non-finite entries, or bad options.

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../core/error.hpp"
#include "../core/random.hpp"
#include "../core/view.hpp"

namespace lowrank::linalg {

/// A rank-r truncated SVD: M ≈ U diag(S) Vᵀ.
template <Real T>
struct TruncatedSVD {
    Matrix<T> U;  ///< out × r, orthonormal columns
    Vector<T> S;  ///< r singular values, descending, ≥ 0
    Matrix<T> V;  ///< in × r, orthonormal columns (V_rᵀ is `V.transpose()`)

    [[nodiscard]] Index rank() const noexcept { return S.size(); }
    /// U diag(S) Vᵀ (out × in): forms the dense matrix, for tests and small sizes.
    [[nodiscard]] Matrix<T> reconstruct() const { return U * S.asDiagonal() * V.transpose(); }
};

/// Which algorithm `svd` uses.
enum class SVDMethod {
    automatic,   ///< exact when min(out, in) ≤ `exact_limit`, else randomised
    exact,       ///< `truncated_svd`
    randomized,  ///< `randomized_svd`
};

/// Options of `randomized_svd` and of the dispatching `svd`.
struct SVDOptions {
    SVDMethod method = SVDMethod::automatic;
    Index oversampling = 10;      ///< p ≥ 0: extra columns of the sketch (l = r + p, capped)
    Index power_iterations = 4;   ///< q ≥ 0 (the LoRA-XS code uses 10, torch.svd_lowrank 2)
    std::uint64_t seed = 0;       ///< seed of the Gaussian test matrix (lowrank::Random)
    Index exact_limit = 512;      ///< automatic: exact SVD up to this min(out, in)
};

namespace detail {

template <class T>
using ColMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

/// M read once through a Ref (no copy for row-major inputs with direct access).
template <class T>
using InputRef = Eigen::Ref<const Matrix<T>, 0, Eigen::OuterStride<>>;

/// Throws unless 1 ≤ r ≤ min(out, in).
inline void check_svd_rank(const char* fn, Index out, Index in, Index r) {
    if (r < 1 || r > std::min(out, in))
        lowrank::detail::fail(fn, ": rank ", r, " is out of range [1, min(out, in)] for a ", out,
                              " x ", in, " matrix");
}

/// Throws unless every entry of M is finite, naming the first bad one.
template <class T>
void check_all_finite(const char* fn, const char* arg, const InputRef<T>& M) {
    if (M.allFinite()) return;
    const Index out = M.rows(), in = M.cols();
    for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j)
            if (!std::isfinite(static_cast<double>(M(i, j))))
                lowrank::detail::fail(fn, ": ", arg, " (", lowrank::detail::shape_of(M),
                                      ") has a non-finite entry at (", i, ", ", j, ")");
}

/// The sign rule: flips each pair (U(:, k), V(:, k)) so that V's largest-magnitude entry in
/// column k (first on ties) is positive.
template <class MU, class MV>
void fix_signs(MU& U, MV& V) {
    for (Index k = 0; k < V.cols(); ++k) {
        Index best = 0;
        for (Index i = 1; i < V.rows(); ++i)
            if (std::abs(V(i, k)) > std::abs(V(best, k))) best = i;
        if (V.rows() > 0 && V(best, k) < 0) {
            V.col(k) = -V.col(k);
            U.col(k) = -U.col(k);
        }
    }
}

/// Thin orthonormal basis of the columns of Y (m × l, m ≥ l) by Householder QR, in place.
template <class T>
void orthonormalize(ColMatrix<T>& Y) {
    const Index m = Y.rows(), l = Y.cols();
    Eigen::HouseholderQR<ColMatrix<T>> qr(Y);
    Y = qr.householderQ() * ColMatrix<T>::Identity(m, l);
}

}  // namespace detail

/// Exact rank-r truncated SVD (BDCSVD of the full matrix, truncated, signs fixed).
/// M: out × in, 1 ≤ r ≤ min(out, in), finite entries. Cost O(out · in · min(out, in)).
template <class D>
[[nodiscard]] TruncatedSVD<typename D::Scalar> truncated_svd(const Eigen::MatrixBase<D>& M, Index r) {
    using T = typename D::Scalar;
    static_assert(Real<T>, "lowrank::linalg::truncated_svd: M must hold float or double");
    const char* fn = "lowrank::linalg::truncated_svd";
    detail::check_svd_rank(fn, M.rows(), M.cols(), r);
    const detail::InputRef<T> m(M.derived());
    detail::check_all_finite<T>(fn, "M", m);
    Eigen::BDCSVD<detail::ColMatrix<T>> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
    if (svd.info() != Eigen::Success)
        lowrank::detail::fail("lowrank::linalg::truncated_svd: the SVD of a ",
                              lowrank::detail::shape_of(M), " matrix did not converge");
    TruncatedSVD<T> out;
    out.U = svd.matrixU().leftCols(r);
    out.S = svd.singularValues().head(r);
    out.V = svd.matrixV().leftCols(r);
    detail::fix_signs(out.U, out.V);
    return out;
}

/// Randomised rank-r truncated SVD (HMT 2011, Alg. 4.4 + 5.1; see the file comment), with
/// oversampling p = `opts.oversampling` (l = min(r + p, min(out, in))) and q =
/// `opts.power_iterations`, the Gaussian test matrix drawn from `Random(opts.seed)`.
/// Throws for r outside [1, min(out, in)], non-finite entries, or negative p or q.
template <class D>
[[nodiscard]] TruncatedSVD<typename D::Scalar> randomized_svd(const Eigen::MatrixBase<D>& M, Index r,
                                                              const SVDOptions& opts = {}) {
    using T = typename D::Scalar;
    static_assert(Real<T>, "lowrank::linalg::randomized_svd: M must hold float or double");
    using CM = detail::ColMatrix<T>;
    const char* fn = "lowrank::linalg::randomized_svd";
    detail::check_svd_rank(fn, M.rows(), M.cols(), r);
    if (opts.oversampling < 0)
        lowrank::detail::fail(fn, ": oversampling must be >= 0, got ", opts.oversampling);
    if (opts.power_iterations < 0)
        lowrank::detail::fail(fn, ": power_iterations must be >= 0, got ", opts.power_iterations);
    // One evaluation of M, read many times (an expression would be re-evaluated per product).
    const detail::InputRef<T> m(M.derived());
    detail::check_all_finite<T>(fn, "M", m);
    const Index out = m.rows(), in = m.cols();
    const Index l = std::min(r + opts.oversampling, std::min(out, in));

    CM omega(in, l);  // Gaussian test matrix, drawn column by column
    Random rng(opts.seed);
    for (Index j = 0; j < l; ++j)
        for (Index i = 0; i < in; ++i) omega(i, j) = static_cast<T>(rng.normal());

    CM Q = m * omega;  // out × l: a sample of the range of M
    detail::orthonormalize(Q);
    for (Index it = 0; it < opts.power_iterations; ++it) {
        CM Qt = m.transpose() * Q;  // in × l: range of Mᵀ
        detail::orthonormalize(Qt);
        Q.noalias() = m * Qt;
        detail::orthonormalize(Q);
    }
    // C = Qᵀ M (l × in); its SVD gives M ≈ Q Ũ Σ Ṽᵀ. The SVD is taken of Cᵀ (in × l, tall).
    const CM Ct = m.transpose() * Q;
    Eigen::BDCSVD<CM> svd(Ct, Eigen::ComputeThinU | Eigen::ComputeThinV);
    if (svd.info() != Eigen::Success)
        lowrank::detail::fail(fn, ": the SVD of the ", l, " x ", in,
                              " projected matrix did not converge");
    TruncatedSVD<T> res;
    // Cᵀ = Ṽ Σ Ũᵀ, so Cᵀ's left vectors are V and its right vectors Ũ.
    res.V = svd.matrixU().leftCols(r);
    res.S = svd.singularValues().head(r);
    res.U = Q * svd.matrixV().leftCols(r);
    detail::fix_signs(res.U, res.V);
    return res;
}

/// Rank-r truncated SVD with the algorithm chosen by `opts.method` (automatic: exact when
/// min(out, in) ≤ `opts.exact_limit`, randomised above).
template <class D>
[[nodiscard]] TruncatedSVD<typename D::Scalar> svd(const Eigen::MatrixBase<D>& M, Index r,
                                                   const SVDOptions& opts = {}) {
    const bool exact = opts.method == SVDMethod::exact ||
                       (opts.method == SVDMethod::automatic &&
                        std::min(M.rows(), M.cols()) <= opts.exact_limit);
    return exact ? truncated_svd(M, r) : randomized_svd(M, r, opts);
}

}  // namespace lowrank::linalg
