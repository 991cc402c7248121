// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Solves with the small r × r Gram matrices of low-rank factors, by Cholesky (never explicit
/// inverses):
///
///     G = Fᵀ F  (`GramSide::columns`, F: m × r, e.g. LoRA's B: out × r)
///     G = F Fᵀ  (`GramSide::rows`,    F: r × m, e.g. LoRA's A: r × in)
///
///     solve_left(X)  = G⁻¹ X      solve_right(X) = X G⁻¹
///
/// The Gram matrix is accumulated and factored in double whatever T is (forming it costs
/// m · r² flops, the factorisation r³/3, each solve r² per right-hand side column), so a float
/// factor loses no more than its own rounding. `CachedGramCholesky` refactors only when the key
/// identifying the factor changes (LoraXS's `factor_id()`), so a training loop whose factors are
/// frozen factors once.
///
/// Throws `lowrank::error` when G is not numerically positive definite (the factor is
/// rank-deficient, to working precision), naming the function and the factor's shape.

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../core/error.hpp"
#include "../core/view.hpp"

namespace lowrank::linalg {

/// Which Gram matrix of a factor F to form.
enum class GramSide {
    columns,  ///< G = Fᵀ F (Gram matrix of F's columns)
    rows,     ///< G = F Fᵀ (Gram matrix of F's rows)
};

/// Cholesky factorisation of an r × r symmetric positive definite (Gram) matrix, in double.
class GramCholesky {
public:
    using DMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;

    GramCholesky() = default;

    /// Factors G = Fᵀ F or F Fᵀ. `fn` and `arg` name the caller and the factor in errors.
    /// Throws if F has no columns/rows, non-finite entries, or G is numerically singular.
    template <class D>
    [[nodiscard]] static GramCholesky of(const Eigen::MatrixBase<D>& F, GramSide side,
                                         const char* fn = "lowrank::linalg::GramCholesky",
                                         const char* arg = "F") {
        const DMatrix f = F.template cast<double>();
        if (!f.allFinite())
            lowrank::detail::fail(fn, ": ", arg, " (", lowrank::detail::shape_of(F),
                                  ") has non-finite entries");
        DMatrix gram;
        if (side == GramSide::columns)
            gram.noalias() = f.transpose() * f;
        else
            gram.noalias() = f * f.transpose();
        GramCholesky c;
        c.factor(gram, fn, arg, lowrank::detail::shape_of(F),
                 side == GramSide::columns ? f.rows() : f.cols());
        return c;
    }

    /// Factors a given symmetric positive definite matrix G (r × r).
    template <class D>
    [[nodiscard]] static GramCholesky of_matrix(const Eigen::MatrixBase<D>& G,
                                                const char* fn = "lowrank::linalg::GramCholesky",
                                                const char* arg = "G") {
        if (G.rows() != G.cols())
            lowrank::detail::fail(fn, ": ", arg, " is ", lowrank::detail::shape_of(G),
                                  ", expected a square matrix");
        const DMatrix gram = G.template cast<double>();
        if (!gram.allFinite())
            lowrank::detail::fail(fn, ": ", arg, " (", lowrank::detail::shape_of(G),
                                  ") has non-finite entries");
        GramCholesky c;
        c.factor(gram, fn, arg, lowrank::detail::shape_of(G), 1);
        return c;
    }

    /// r (0 before the first factorisation).
    [[nodiscard]] Index size() const noexcept { return size_; }

    /// G⁻¹ X (X: r × k), in double.
    template <class D>
    [[nodiscard]] DMatrix solve_left(const Eigen::MatrixBase<D>& X) const {
        LOWRANK_ASSERT(X.rows() == size_);
        return llt_.solve(X.template cast<double>());
    }
    /// X G⁻¹ (X: k × r), in double (G is symmetric: X G⁻¹ = (G⁻¹ Xᵀ)ᵀ).
    template <class D>
    [[nodiscard]] DMatrix solve_right(const Eigen::MatrixBase<D>& X) const {
        LOWRANK_ASSERT(X.cols() == size_);
        return llt_.solve(X.template cast<double>().transpose()).transpose();
    }
    /// The lower Cholesky factor L (G = L Lᵀ).
    [[nodiscard]] DMatrix matrixL() const { return llt_.matrixL(); }

private:
    // Singular to working precision: a pivot L_kk² ≤ c · m · ε · G_kk, i.e. the k-th column of
    // F is, up to the rounding of the m-term dot products that formed G (≤ m ε |F|ᵀ|F|), a
    // combination of the previous ones (c = 8). The test is relative to each G_kk, so a factor
    // with orthogonal columns of very different norms (LoRA-XS's A = S_r V_rᵀ) is accepted.
    void factor(const DMatrix& gram, const char* fn, const char* arg, lowrank::detail::shape shp,
                Index dot_length) {
        size_ = gram.rows();
        if (size_ == 0)
            lowrank::detail::fail(fn, ": ", arg, " is ", shp, "; its Gram matrix is empty");
        llt_.compute(gram);
        const double c = 8.0 * double(std::max<Index>(dot_length, 1)) *
                         std::numeric_limits<double>::epsilon();
        bool ok = llt_.info() == Eigen::Success;
        if (ok) {
            const DMatrix L = llt_.matrixL();
            for (Index k = 0; k < size_ && ok; ++k)
                ok = L(k, k) * L(k, k) > c * gram(k, k) && gram(k, k) > 0;
        }
        if (!ok)
            lowrank::detail::fail(fn, ": the Gram matrix of ", arg, " (", shp,
                                  ") is singular to working precision (", arg,
                                  " is rank-deficient)");
    }

    Eigen::LLT<DMatrix> llt_;
    Index size_ = 0;
};

/// A `GramCholesky` that refactors only when the key of the factor changes.
class CachedGramCholesky {
public:
    /// The factorisation of F's Gram matrix, refactored only if `key` differs from the last call's
    /// (or on the first call). The caller guarantees that equal keys mean equal factors.
    template <class D>
    const GramCholesky& get(std::uint64_t key, const Eigen::MatrixBase<D>& F, GramSide side,
                            const char* fn = "lowrank::linalg::CachedGramCholesky",
                            const char* arg = "F") {
        if (!valid_ || key != key_) {
            valid_ = false;  // stays invalid if the factorisation throws
            chol_ = GramCholesky::of(F, side, fn, arg);
            key_ = key;
            valid_ = true;
            ++factorizations_;
        }
        return chol_;
    }
    /// How many factorisations have been computed (for tests and diagnostics).
    [[nodiscard]] std::uint64_t factorizations() const noexcept { return factorizations_; }
    /// Forgets the cached factorisation.
    void reset() noexcept { valid_ = false; }

private:
    GramCholesky chol_;
    std::uint64_t key_ = 0;
    std::uint64_t factorizations_ = 0;
    bool valid_ = false;
};

}  // namespace lowrank::linalg
