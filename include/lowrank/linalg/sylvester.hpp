// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The Sylvester equation `P X + X Q = C` for symmetric P and Q (in practice positive
/// semidefinite Gram matrices such as BᵀB and AAᵀ), solved through two symmetric
/// eigendecompositions:
///
///     P = U Λ Uᵀ,  Q = V M Vᵀ   ⇒   X = U [ (Uᵀ C V)_ij / (λ_i + μ_j) ] Vᵀ
///
/// The Sylvester operator X ↦ P X + X Q is itself symmetric, with eigenvectors u_i v_jᵀ and
/// eigenvalues λ_i + μ_j, so this is exact (no complex arithmetic, unlike the general
/// Bartels–Stewart or eigenvector methods) and the treatment of a singular operator is the natural
/// one: terms whose denominator |λ_i + μ_j| is below a threshold are dropped, which gives the
/// minimum-norm least-squares solution (the pseudo-inverse of the operator applied to C).
///
/// For a positive semidefinite pair the denominators are ≥ 0 and the solution is unique whenever
/// one of P, Q is positive definite.
///
/// Used by LoRA-Pro (lora_pro.hpp) to choose the free r × r matrix of its gradient correction.

#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../core/args.hpp"

namespace lowrank::linalg {

/// Options of `solve_sylvester_symmetric`.
struct SylvesterOptions {
    /// Relative threshold: a term is dropped when |λ_i + μ_j| ≤ rcond · (max|λ| + max|μ|).
    /// Negative (the default) means (m + n) · ε of the working precision — the size of the
    /// absolute error of computed eigenvalues, below which a denominator is indistinguishable
    /// from zero.
    double rcond = -1.0;
};

/// What `solve_sylvester_symmetric` found about the operator.
struct SylvesterInfo {
    Index dropped = 0;               ///< terms treated as singular (0: the solution is unique)
    double min_denominator = 0;      ///< min |λ_i + μ_j| over all terms (0 when X is empty)
    double max_denominator = 0;      ///< max |λ_i + μ_j|
    double threshold = 0;            ///< the absolute threshold that was applied
    /// max/min denominator of the kept terms: the condition number of the (restricted) operator.
    [[nodiscard]] double condition() const noexcept {
        return min_denominator > 0 ? max_denominator / min_denominator
                                   : std::numeric_limits<double>::infinity();
    }
};

/// Solves `P X + X Q = C`: P m × m, Q n × n (symmetric; only their lower triangles are read),
/// C and X m × n. All share one scalar type (float or double), which is the working precision.
/// A plain-matrix X is resized; X may alias C (the result is formed in a temporary).
///
/// Terms with |λ_i + μ_j| ≤ threshold (see `SylvesterOptions`) are set to zero: X is then the
/// minimum-norm least-squares solution, and `info.dropped` says how many terms that concerned.
///
/// Throws `lowrank::error` when P or Q is not square, C is not m × n, an input has a non-finite
/// entry, or an eigendecomposition fails to converge.
/// Cost: two symmetric eigendecompositions (≈ 9m³ + 9n³ flops) and four products (2mn(m + n)).
template <class DP, class DQ, class DC, Destination DX>
SylvesterInfo solve_sylvester_symmetric(const Eigen::MatrixBase<DP>& P, const Eigen::MatrixBase<DQ>& Q,
                                        const Eigen::MatrixBase<DC>& C, DX&& X,
                                        const SylvesterOptions& opts = {}) {
    using T = typename DP::Scalar;
    static_assert(Real<T>, "solve_sylvester_symmetric: the scalar type must be float or double");
    static_assert(std::is_same_v<T, typename DQ::Scalar> && std::is_same_v<T, typename DC::Scalar> &&
                      std::is_same_v<T, typename std::remove_cvref_t<DX>::Scalar>,
                  "solve_sylvester_symmetric: P, Q, C and X must share one scalar type");
    const char* fn = "lowrank::linalg::solve_sylvester_symmetric";
    const Index m = P.rows(), n = Q.rows();
    lowrank::detail::check_shape(fn, "P", P.derived(), m, m);
    lowrank::detail::check_shape(fn, "Q", Q.derived(), n, n);
    lowrank::detail::check_shape(fn, "C", C.derived(), m, n);
    if (!P.allFinite()) lowrank::detail::fail(fn, ": P (", lowrank::detail::shape_of(P), ") has a non-finite entry");
    if (!Q.allFinite()) lowrank::detail::fail(fn, ": Q (", lowrank::detail::shape_of(Q), ") has a non-finite entry");
    if (!C.allFinite()) lowrank::detail::fail(fn, ": C (", lowrank::detail::shape_of(C), ") has a non-finite entry");
    if (!std::isfinite(opts.rcond)) lowrank::detail::fail(fn, ": rcond must be finite, got ", opts.rcond);

    using Dense = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    SylvesterInfo info;
    if (m == 0 || n == 0) {
        if constexpr (lowrank::detail::is_plain_v<std::remove_cvref_t<DX>>) X.derived().resize(m, n);
        lowrank::detail::check_shape(fn, "X", X, m, n);
        return info;
    }
    Eigen::SelfAdjointEigenSolver<Dense> ep(Dense(P.derived()), Eigen::ComputeEigenvectors);
    Eigen::SelfAdjointEigenSolver<Dense> eq(Dense(Q.derived()), Eigen::ComputeEigenvectors);
    if (ep.info() != Eigen::Success || eq.info() != Eigen::Success)
        lowrank::detail::fail(fn, ": the symmetric eigendecomposition of ",
                     ep.info() != Eigen::Success ? "P" : "Q", " did not converge");
    const auto& lambda = ep.eigenvalues();
    const auto& mu = eq.eigenvalues();
    const double scale = double(lambda.cwiseAbs().maxCoeff()) + double(mu.cwiseAbs().maxCoeff());
    const double rcond =
        opts.rcond >= 0 ? opts.rcond : double(m + n) * double(std::numeric_limits<T>::epsilon());
    info.threshold = rcond * scale;

    // F = Uᵀ C V, divided termwise by λ_i + μ_j; X = U F Vᵀ.
    Dense F = ep.eigenvectors().transpose() * C.derived() * eq.eigenvectors();
    info.min_denominator = std::numeric_limits<double>::infinity();
    for (Index j = 0; j < n; ++j)
        for (Index i = 0; i < m; ++i) {
            const double d = double(lambda(i)) + double(mu(j));
            const double ad = std::abs(d);
            info.min_denominator = std::min(info.min_denominator, ad);
            info.max_denominator = std::max(info.max_denominator, ad);
            if (ad <= info.threshold) {
                F(i, j) = T(0);
                ++info.dropped;
            } else {
                F(i, j) = T(double(F(i, j)) / d);
            }
        }
    Dense result = ep.eigenvectors() * F * eq.eigenvectors().transpose();
    if constexpr (lowrank::detail::is_plain_v<std::remove_cvref_t<DX>>) X.derived().resize(m, n);
    lowrank::detail::check_shape(fn, "X", X, m, n);
    X = result;
    return info;
}

}  // namespace lowrank::linalg
