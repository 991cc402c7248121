// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// LoRA-SB (Ponkshe, Singhal et al., "Initialization using Update Approximation is a Silver Bullet
/// for Extremely Efficient Low-Rank Fine-Tuning", 2024) as separate pieces on top of `LoraXS`:
///
/// 1. `GradientAccumulator<T>`: G = (1/N) Σ_b ∇_W(mean loss_b) over N batches, fed either the
///    full-weight gradient of a batch or the (X, dY) pair of a linear layer, in which case
///    dYᵀ X is accumulated into G directly (the host never forms it).
/// 2. `approximate_update(G, lr, rule)`: the first optimiser step, −η · sign(G) (the first AdamW
///    step is sign-like; the paper's choice), or the raw gradient step −η · G. A caller-supplied
///    update skips this step.
/// 3. `LoraXS<T>::from_update(dW, cfg)` (lora_xs.hpp): B = U_r, A = V_rᵀ, R = S_r / s.
///    `lora_sb_init` chains 2 and 3.
/// 4. The optimal core gradient (the paper's scaling theorem): with g_R = s Bᵀ G_W Aᵀ the gradient
///    autograd gives R,
///
///        g_R* = (1/s²) (BᵀB)⁻¹ g_R (AAᵀ)⁻¹,   so that   s · B g_R* A = P_B G_W P_A
///
///    (P_B = B (BᵀB)⁻¹ Bᵀ, P_A = Aᵀ (AAᵀ)⁻¹ A): the low-rank step that best approximates the full
///    step. With orthonormal B, A and s = 1 (LoRA-SB's init) it is g_R itself; for LoRA-XS's
///    A = S_r V_rᵀ it is a real correction. Computed with r × r Cholesky solves of the Gram
///    matrices (linalg/cholesky.hpp), refactored only when the frozen factors change.

#include <cmath>
#include <cstdint>

#include "core/args.hpp"
#include "core/ops.hpp"
#include "linalg/cholesky.hpp"
#include "lora_xs.hpp"

namespace lowrank {

/// Accumulates the full-weight gradient of a linear layer over batches:
///
///     G = (1/N) Σ_b G_b,   G_b = ∇_W (mean loss over batch b)
///
/// so that `gradient()` is the mean of the per-batch mean-loss gradients (LoRA-SB, step 1).
/// Storage: one out × in matrix of T.
template <Real T>
class GradientAccumulator {
public:
    /// An empty accumulator for an out × in weight (out, in ≥ 1).
    GradientAccumulator(Index out_features, Index in_features) {
        if (out_features < 1 || in_features < 1)
            detail::fail("lowrank::GradientAccumulator: the weight must be at least 1 x 1, got ",
                         out_features, " x ", in_features);
        sum_.setZero(out_features, in_features);
    }

    /// Adds one batch's full-weight gradient G_b (out × in). `batches` is how many batches this
    /// call completes (1; 0 for a partial sum such as one chunk of a batch's tokens).
    /// Throws for a wrong shape, non-finite entries, or batches < 0.
    template <class D>
    void add_gradient(const Eigen::MatrixBase<D>& G, Index batches = 1) {
        const char* fn = "lowrank::GradientAccumulator::add_gradient";
        detail::check_shape(fn, "G", G.derived(), sum_.rows(), sum_.cols());
        check_batches(fn, batches);
        const Matrix<T> g = G.template cast<T>();
        if (!g.allFinite()) detail::fail(fn, ": G (", detail::shape_of(G), ") has non-finite entries");
        sum_ += g;
        batches_ += batches;
    }

    /// Adds dYᵀ X (out × in) for a linear layer Y = X Wᵀ, X: n × in and dY: n × out, where dY is
    /// the gradient of the batch's loss as the host computed it (for a mean loss, already divided
    /// by the batch size). Accumulated by the core's `grad_expand` straight into the sum: nothing
    /// of size out × in is formed besides the accumulator. Cost 2 · n · out · in flops.
    /// `batches` as in `add_gradient`. Throws for wrong shapes or batches < 0.
    template <class DX, class DdY>
    void add_linear(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DdY>& dY,
                    Index batches = 1) {
        const char* fn = "lowrank::GradientAccumulator::add_linear";
        const auto x = detail::input_view(fn, "X", X, -1, sum_.cols());
        const auto dy = detail::input_view(fn, "dY", dY, x.rows, sum_.rows());
        check_batches(fn, batches);
        core::grad_expand<T>(dy, x, view_mut(sum_), T(1), true);
        batches_ += batches;
    }

    /// Number of completed batches N.
    [[nodiscard]] Index batches() const noexcept { return batches_; }
    /// Σ_b G_b (out × in), without the 1/N.
    [[nodiscard]] const Matrix<T>& sum() const noexcept { return sum_; }
    /// G = Σ_b G_b / N. Throws if no batch has been completed.
    [[nodiscard]] Matrix<T> gradient() const {
        if (batches_ == 0)
            detail::fail("lowrank::GradientAccumulator::gradient: no batch has been added");
        return sum_ / static_cast<T>(batches_);
    }
    /// Empties the accumulator.
    void reset() {
        sum_.setZero();
        batches_ = 0;
    }

private:
    static void check_batches(const char* fn, Index batches) {
        if (batches < 0) detail::fail(fn, ": batches must be >= 0, got ", batches);
    }
    Matrix<T> sum_;
    Index batches_ = 0;
};

/// How the first optimiser step is approximated from the accumulated gradient.
enum class UpdateRule {
    sign,  ///< ΔW = −η · sign(G) (entries of G equal to zero give 0; LoRA-SB's choice)
    raw,   ///< ΔW = −η · G
};

/// The approximate first update ΔW (out × in) from the gradient G: −η sign(G) or −η G.
/// Throws for non-finite entries of G, a zero G (no direction to initialise from), or a learning
/// rate η that is not finite and > 0.
template <class D>
[[nodiscard]] Matrix<typename D::Scalar> approximate_update(const Eigen::MatrixBase<D>& G, double lr,
                                                            UpdateRule rule = UpdateRule::sign) {
    using T = typename D::Scalar;
    static_assert(Real<T>, "lowrank::approximate_update: G must hold float or double");
    const char* fn = "lowrank::approximate_update";
    if (!(lr > 0) || !std::isfinite(lr))
        detail::fail(fn, ": the learning rate must be finite and > 0, got ", lr);
    const Matrix<T> g = G;
    if (!g.allFinite()) detail::fail(fn, ": G (", detail::shape_of(g), ") has non-finite entries");
    if (g.size() == 0 || (g.array() == T(0)).all())
        detail::fail(fn, ": G (", detail::shape_of(g), ") is zero; there is no update to approximate");
    const T eta = static_cast<T>(lr);
    if (rule == UpdateRule::raw) return -eta * g;
    return g.unaryExpr([eta](T v) { return v > 0 ? -eta : (v < 0 ? eta : T(0)); });
}

/// LoRA-SB initialisation from accumulated gradients: `LoraXS::from_update` of
/// `approximate_update(grad.gradient(), lr, rule)`.
template <Real T>
[[nodiscard]] LoraXS<T> lora_sb_init(const GradientAccumulator<T>& grad, double lr,
                                     const LoraXSConfig& cfg, UpdateRule rule = UpdateRule::sign) {
    return LoraXS<T>::from_update(approximate_update(grad.gradient(), lr, rule), cfg);
}

/// g_R = s · Bᵀ G Aᵀ (r × r): the gradient of R for a full-weight gradient G (out × in) —
/// what `backward` returns when G = dYᵀ X. Cost 2 · r · out · in + 2 · r² · in flops.
template <Real T, class DG>
[[nodiscard]] Matrix<T> core_gradient(const LoraXS<T>& xs, const Eigen::MatrixBase<DG>& G) {
    const char* fn = "lowrank::core_gradient";
    detail::check_shape(fn, "G", G.derived(), xs.out_features(), xs.in_features());
    xs.validate(fn, 0, xs.in_features(), xs.out_features());
    const Matrix<T> BtG = xs.B().transpose() * G.template cast<T>();
    return xs.scale() * (BtG * xs.A().transpose());
}

/// The optimal core gradient of LoRA-SB's scaling theorem,
///
///     g_R* = (1/s²) (BᵀB)⁻¹ g_R (AAᵀ)⁻¹,   s · B g_R* A = P_B G P_A,
///
/// for a LoRA-XS / LoRA-SB adapter. Keeps the Cholesky factors of BᵀB and AAᵀ and refactors them
/// only when the adapter's frozen factors change (`LoraXS::factor_id()`). Cost per call:
/// O(r³) after the first (O((out + in) r²) for the Gram matrices when refactoring).
template <Real T>
class OptimalCoreGradient {
public:
    /// g_R* (r × r) for the gradient g_R (r × r) of `xs`'s core. Throws for a wrong shape,
    /// a zero or non-finite scale, or a rank-deficient B or A.
    template <class DG>
    [[nodiscard]] Matrix<T> operator()(const LoraXS<T>& xs, const Eigen::MatrixBase<DG>& g_R) {
        const char* fn = "lowrank::OptimalCoreGradient";
        const Index r = xs.rank();
        detail::check_shape(fn, "g_R", g_R.derived(), r, r);
        xs.validate(fn, 0, xs.in_features(), xs.out_features());
        const double s = double(xs.scale());
        if (s == 0 || !std::isfinite(s)) detail::fail(fn, ": the adapter's scale must be non-zero");
        const auto& gb = gram_B_.get(xs.factor_id(), xs.B(), linalg::GramSide::columns, fn, "B");
        const auto& ga = gram_A_.get(xs.factor_id(), xs.A(), linalg::GramSide::rows, fn, "A");
        // (BᵀB)⁻¹ g_R (AAᵀ)⁻¹ / s², in double.
        const auto left = gb.solve_left(g_R.template cast<double>());
        return (ga.solve_right(left) / (s * s)).template cast<T>();
    }
    /// Factorisations computed so far (B's and A's), for tests.
    [[nodiscard]] std::uint64_t factorizations() const noexcept {
        return gram_B_.factorizations() + gram_A_.factorizations();
    }

private:
    linalg::CachedGramCholesky gram_B_;
    linalg::CachedGramCholesky gram_A_;
};

/// One-shot g_R* (factors the Gram matrices on every call; keep an `OptimalCoreGradient` in a
/// training loop instead).
template <Real T, class DG>
[[nodiscard]] Matrix<T> optimal_core_gradient(const LoraXS<T>& xs, const Eigen::MatrixBase<DG>& g_R) {
    OptimalCoreGradient<T> solver;
    return solver(xs, g_R);
}

}  // namespace lowrank
