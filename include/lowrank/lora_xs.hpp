// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// LoRA-XS (Bałazy et al. 2024) and the LoRA-SB adapter form (Ponkshe, Singhal et al. 2024):
///
///     y = W x + s · B R (A x),   B: out × r and A: r × in frozen,  R: r × r trained,
///     s = alpha / r  (rsLoRA: alpha / √r)
///
/// r² trainable parameters per layer instead of r (in + out). `LoraXS<T>` owns B, A, R; the free
/// functions `forward`, `add_delta`, `backward`, `backward_delta`, `merge`, `unmerge` mirror
/// lora.hpp's, and a `LoraXS` is a term of the core (φ(T) = s · T Rᵀ), so
/// `lowrank::linear(X, W + xs + lora)` and `dense(W + xs)` work.
///
/// Initialisations:
/// - `LoraXS<T>::from_weight(W, cfg)` — LoRA-XS: truncated SVD W ≈ U_r S_r V_rᵀ,
///   B = U_r, A = S_r V_rᵀ (= B ᵀ W), R ~ N(0, σ²) with σ = 1e-5 by default, W unchanged.
/// - `LoraXS<T>::from_update(dW, cfg)` — LoRA-SB: B = U_r, A = V_rᵀ, R = S_r / s, so that
///   s · B R A is the best rank-r approximation of dW (Eckart–Young). The rest of the LoRA-SB
///   pipeline (gradient accumulation, update approximation, optimal core gradient) is in
///   lora_sb.hpp.
///
/// Both use `linalg::svd` with `cfg.svd` (exact up to min(out, in) = 512 by default, randomised
/// above; see linalg/svd.hpp for the accuracy trade-off) and its sign rule.
///
/// Example:
/// \code
///   auto xs = lowrank::LoraXS<float>::from_weight(W, {.rank = 16, .alpha = 16, .seed = 1});
///   lowrank::Matrix<float> Y = lowrank::linear(X, W + xs);
///   lowrank::LoraXSGrad<float> grad;
///   lowrank::backward(X, W, xs, dY, grad, dX);   // grad.R (r × r) and dX
///   xs.R() -= lr * grad.R;
/// \endcode

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/args.hpp"
#include "core/random.hpp"
#include "core/terms.hpp"
#include "linalg/svd.hpp"
#include "lora.hpp"

namespace lowrank {

template <LowRankTerm Term>
class MaskedTerm;  // compose.hpp: a term whose output is multiplied per token by a mask

/// Configuration of a LoRA-XS / LoRA-SB adapter.
struct LoraXSConfig {
    Index rank = 8;            ///< r, 1 ≤ r ≤ min(in, out)
    double alpha = 8.0;        ///< scale numerator; must be finite (LoRA-SB's code uses s = 1)
    bool rslora = false;       ///< s = alpha / √r instead of alpha / r
    double sigma = 1e-5;       ///< from_weight: standard deviation of R's entries (≥ 0, finite)
    std::uint64_t seed = 0;    ///< from_weight: seed of the `Random` stream drawing R (row-major)
    linalg::SVDOptions svd{};  ///< truncated SVD used by from_weight / from_update
};

namespace detail {
/// A process-wide unique id for each new set of frozen factors (0 is never returned).
[[nodiscard]] inline std::uint64_t next_factor_id() noexcept {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
}
}  // namespace detail

/// A LoRA-XS / LoRA-SB adapter for an out × in weight: frozen B (out × r), A (r × in), trainable
/// core R (r × r) and the scale s. ΔW = s · B R A.
template <Real T>
class LoraXS {
public:
    using scalar = T;

    /// An adapter with the given factors (rank r = R.rows()); `alpha` and `rslora` set s.
    /// Throws unless B is out × r, A is r × in, R is r × r with 1 ≤ r ≤ min(out, in), all
    /// entries finite and alpha finite.
    template <class DB, class DA, class DR>
    [[nodiscard]] static LoraXS from_factors(const Eigen::MatrixBase<DB>& B,
                                             const Eigen::MatrixBase<DA>& A,
                                             const Eigen::MatrixBase<DR>& R, double alpha,
                                             bool rslora = false) {
        const char* fn = "lowrank::LoraXS::from_factors";
        const Index r = R.rows();
        if (R.cols() != r || A.rows() != r || B.cols() != r)
            detail::fail(fn, ": B is ", detail::shape_of(B), ", A is ", detail::shape_of(A),
                         " and R is ", detail::shape_of(R),
                         "; expected B out x r, A r x in and R r x r");
        LoraXS xs(fn, B.rows(), A.cols(), {.rank = r, .alpha = alpha, .rslora = rslora});
        xs.B_ = B.template cast<T>();
        xs.A_ = A.template cast<T>();
        xs.R_ = R.template cast<T>();
        if (!xs.B_.allFinite() || !xs.A_.allFinite() || !xs.R_.allFinite())
            detail::fail(fn, ": the factors have non-finite entries");
        return xs;
    }

    /// LoRA-XS initialisation from the pretrained weight W (out × in): W ≈ U_r S_r V_rᵀ,
    /// B = U_r, A = S_r V_rᵀ, R ~ N(0, cfg.sigma²) drawn row by row from `Random(cfg.seed)`.
    /// W itself is not modified (the initial ΔW = s B R A is O(σ)). Cost: one truncated SVD.
    /// Throws for a rank outside [1, min(out, in)], non-finite W, alpha or sigma, sigma < 0.
    template <class DW>
    [[nodiscard]] static LoraXS from_weight(const Eigen::MatrixBase<DW>& W, const LoraXSConfig& cfg) {
        const char* fn = "lowrank::LoraXS::from_weight";
        LoraXS xs(fn, W.rows(), W.cols(), cfg);
        if (!(cfg.sigma >= 0) || !std::isfinite(cfg.sigma))
            detail::fail(fn, ": sigma must be finite and >= 0, got ", cfg.sigma);
        const auto svd = decompose(fn, "W", W, cfg);
        xs.B_ = svd.U;
        xs.A_ = svd.S.asDiagonal() * svd.V.transpose();
        Random rng(cfg.seed);
        for (Index i = 0; i < cfg.rank; ++i)
            for (Index j = 0; j < cfg.rank; ++j) xs.R_(i, j) = static_cast<T>(cfg.sigma * rng.normal());
        return xs;
    }

    /// LoRA-SB initialisation from an (approximate) first update dW (out × in): dW ≈ U_r S_r V_rᵀ,
    /// B = U_r, A = V_rᵀ, R = diag(S_r) / s, so s · B R A = U_r S_r V_rᵀ, the best rank-r
    /// approximation of dW in every unitarily invariant norm (Eckart–Young–Mirsky).
    /// Throws for a rank outside [1, min(out, in)], non-finite dW or alpha, or alpha = 0.
    template <class DW>
    [[nodiscard]] static LoraXS from_update(const Eigen::MatrixBase<DW>& dW, const LoraXSConfig& cfg) {
        const char* fn = "lowrank::LoraXS::from_update";
        LoraXS xs(fn, dW.rows(), dW.cols(), cfg);
        const double s = lora_scale(cfg.alpha, cfg.rank, cfg.rslora);
        if (s == 0) detail::fail(fn, ": alpha must be non-zero (R = S_r / s)");
        const auto svd = decompose(fn, "dW", dW, cfg);
        xs.B_ = svd.U;
        xs.A_ = svd.V.transpose();
        xs.R_.setZero();
        for (Index i = 0; i < cfg.rank; ++i) xs.R_(i, i) = static_cast<T>(double(svd.S(i)) / s);
        return xs;
    }

    /// B: out × r, frozen (read-only; build a new adapter to change it).
    [[nodiscard]] const Matrix<T>& B() const noexcept { return B_; }
    /// A: r × in, frozen.
    [[nodiscard]] const Matrix<T>& A() const noexcept { return A_; }
    /// R: r × r, the trainable core; may be modified in place, its shape must not change.
    [[nodiscard]] Matrix<T>& R() noexcept { return R_; }
    [[nodiscard]] const Matrix<T>& R() const noexcept { return R_; }

    [[nodiscard]] T scale() const noexcept { return scale_; }
    [[nodiscard]] Index rank() const noexcept { return rank_; }
    [[nodiscard]] Index in_features() const noexcept { return A_.cols(); }
    [[nodiscard]] Index out_features() const noexcept { return B_.rows(); }
    [[nodiscard]] double alpha() const noexcept { return alpha_; }
    [[nodiscard]] bool rslora() const noexcept { return rslora_; }
    /// Identifies the frozen factors (B, A): equal ids mean equal factors (copies share the id;
    /// every construction draws a new one). Used to cache Gram factorisations (lora_sb.hpp).
    [[nodiscard]] std::uint64_t factor_id() const noexcept { return factor_id_; }

    /// Changes alpha (and so s) without touching the factors.
    void set_alpha(double alpha) {
        detail::check_finite("lowrank::LoraXS::set_alpha", "alpha", alpha);
        alpha_ = alpha;
        scale_ = static_cast<T>(lora_scale(alpha, rank_, rslora_));
    }

    /// This adapter with its output multiplied per token by `mask` (length n), as a term for
    /// expressions: `linear(X, W + xs1.masked(m1) + xs2.masked(m2))`. The mask is held by address.
    /// Needs `#include <lowrank/compose.hpp>` (see `MaskedTerm` there).
    template <class M>
    [[nodiscard]] auto masked(M&& mask) const& {
        return MaskedTerm<LoraXS>(*this, std::forward<M>(mask));
    }
    /// A temporary adapter would dangle.
    template <class M>
    void masked(M&&) const&& = delete;

    // --- the core's term protocol (LowRankTerm, MergeableTerm) -----------------------------------
    [[nodiscard]] Index width() const noexcept { return rank_; }
    [[nodiscard]] MatrixView<const T> shrink_factor() const noexcept { return view(A_); }
    [[nodiscard]] MatrixView<const T> expand_factor() const noexcept { return view(B_); }
    /// φ(T) = s · T Rᵀ, row by row (each row t ← s R t). Cost 2 · n · r² flops.
    void transform(MatrixView<T> t, Index /*row0*/) const {
        const Index r = rank_;
        Vector<T> row_copy(r);
        for (Index i = 0; i < t.rows; ++i) {
            Eigen::Map<Vector<T>> row(t.row(i), r);
            row_copy = row;
            row.noalias() = scale_ * (R_ * row_copy);
        }
    }
    /// Throws unless the factors are consistent and match an n × in input and out outputs.
    void validate(const char* fn, Index /*n*/, Index in, Index out) const {
        if (A_.rows() != rank_ || B_.cols() != rank_ || R_.rows() != rank_ || R_.cols() != rank_)
            detail::fail(fn, ": the adapter's core was resized: R is ", detail::shape_of(R_),
                         " for rank ", rank_);
        if (A_.cols() != in || B_.rows() != out)
            detail::fail(fn, ": LoRA-XS adapter for a ", B_.rows(), " x ", A_.cols(),
                         " weight (B ", detail::shape_of(B_), ", A ", detail::shape_of(A_),
                         ") applied to a ", out, " x ", in, " weight");
    }
    /// W += alpha · s · B R A (forms B R, out × r, then one rank-r update of W).
    void merge_into(MatrixView<T> w, T alpha) const {
        const Matrix<T> BR = B_ * R_;
        core::rank_update<T>(w, view(BR), view(A_), alpha * scale_);
    }

private:
    LoraXS(const char* fn, Index out, Index in, const LoraXSConfig& cfg)
        : rank_(cfg.rank), alpha_(cfg.alpha), rslora_(cfg.rslora),
          factor_id_(detail::next_factor_id()) {
        detail::check_lora_config(fn, out, in,
                                  {.rank = cfg.rank, .alpha = cfg.alpha, .rslora = cfg.rslora});
        scale_ = static_cast<T>(lora_scale(cfg.alpha, cfg.rank, cfg.rslora));
        B_.setZero(out, cfg.rank);
        A_.setZero(cfg.rank, in);
        R_.setZero(cfg.rank, cfg.rank);
    }

    template <class D>
    static linalg::TruncatedSVD<T> decompose(const char* fn, const char* arg,
                                             const Eigen::MatrixBase<D>& M,
                                             const LoraXSConfig& cfg) {
        const Matrix<T> m = M.template cast<T>();
        if (!m.allFinite())
            for (Index i = 0; i < m.rows(); ++i)
                for (Index j = 0; j < m.cols(); ++j)
                    if (!std::isfinite(double(m(i, j))))
                        detail::fail(fn, ": ", arg, " (", detail::shape_of(m),
                                     ") has a non-finite entry at (", i, ", ", j, ")");
        return linalg::svd(m, cfg.rank, cfg.svd);
    }

    Index rank_;
    double alpha_;
    bool rslora_;
    std::uint64_t factor_id_;
    T scale_ = T(1);
    Matrix<T> B_;
    Matrix<T> A_;
    Matrix<T> R_;
};

/// The gradient of a LoRA-XS adapter: `R` (r × r), resized by the backward functions. B and A are
/// frozen and get none.
template <Real T>
struct LoraXSGrad {
    Matrix<T> R;
    LoraXSGrad() = default;
    /// A zero gradient of `xs`'s shape.
    explicit LoraXSGrad(const LoraXS<T>& xs) : R(Matrix<T>::Zero(xs.rank(), xs.rank())) {}
};

namespace detail {

/// Y += s (Xa Aᵀ) Rᵀ Bᵀ on validated views.
template <class T>
void lora_xs_add_delta(MatrixView<const T> xa, const LoraXS<T>& xs, MatrixView<T> y,
                       Workspace<T>& ws) {
    if (xa.rows == 0) return;
    core::apply_terms<T>(xa, y, ws.matrix(xa.rows, xs.rank()), xs);
}

/// grad.R = s Gᵀ T with T = Xa Aᵀ, G = dY B; and (if dxa) dXa (+)= s (G R) A.
template <class T>
void lora_xs_backward_delta(MatrixView<const T> xa, const LoraXS<T>& xs, MatrixView<const T> dy,
                            LoraXSGrad<T>& grad, MatrixView<T>* dxa, bool accumulate_dx,
                            Workspace<T>& ws) {
    const Index n = xa.rows, r = xs.rank();
    grad.R.resize(r, r);
    const T s = xs.scale();
    auto scratch = ws.matrix(n, 3 * r);
    const auto t = scratch.block(0, 0, n, r);       // T = Xa Aᵀ
    const auto g = scratch.block(0, r, n, r);       // G = dY B
    const auto gr = scratch.block(0, 2 * r, n, r);  // G R
    core::shrink<T>(xa, xs.shrink_factor(), t);
    core::project_back<T>(dy, xs.expand_factor(), g);
    core::grad_shrink<T>(g, t, view_mut(grad.R), s, false, ws.gemm());  // dR = s Gᵀ T
    if (dxa) {
        core::input_grad<T>(g, view(xs.R()), gr, T(1), false);               // G R
        core::input_grad<T>(gr, xs.shrink_factor(), *dxa, s, accumulate_dx, ws.gemm());  // s (G R) A
    }
}

template <Real T, Destination DW>
void lora_xs_merge(const char* fn, DW&& W, const LoraXS<T>& xs, T signed_weight) {
    xs.validate(fn, 0, xs.in_features(), xs.out_features());
    check_finite(fn, "weight", signed_weight);
    auto w = output_view(fn, "W", std::forward<DW>(W), xs.out_features(), xs.in_features(), false);
    check_no_overlap(fn, "W", w, "A", xs.shrink_factor());
    check_no_overlap(fn, "W", w, "B", xs.expand_factor());
    check_no_overlap(fn, "W", w, "R", view(xs.R()));
    xs.merge_into(w, signed_weight);
}

}  // namespace detail

/// Y = X Wᵀ + s (X Aᵀ) Rᵀ Bᵀ. X: n × in, W: out × in, Y: n × out (a plain Matrix is resized).
/// Y must not overlap X or W. Cost: 2·n·out·in + 2·n·r·(in + out + r) flops.
template <class DX, class DW, Real T, Destination DY>
void forward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const LoraXS<T>& xs,
             DY&& Y, Workspace<T>& ws) {
    const char* fn = "lowrank::forward";
    const auto x = detail::input_view(fn, "X", X, -1, xs.in_features());
    const auto w = detail::input_view(fn, "W", W, xs.out_features(), xs.in_features());
    xs.validate(fn, x.rows, w.cols, w.rows);
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, w.rows, true);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    detail::check_no_overlap(fn, "Y", y, "W", w);
    core::base_product<T>(x, w, y, ws.gemm());
    detail::lora_xs_add_delta<T>(x, xs, y, ws);
}
template <class DX, class DW, Real T, Destination DY>
void forward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const LoraXS<T>& xs,
             DY&& Y) {
    Workspace<T> ws;
    forward(X, W, xs, std::forward<DY>(Y), ws);
}

/// Y += s (X Aᵀ) Rᵀ Bᵀ: the adapter part alone. Y (n × out) must have its shape and not overlap X.
template <class DX, Real T, Destination DY>
void add_delta(const Eigen::MatrixBase<DX>& X, const LoraXS<T>& xs, DY&& Y, Workspace<T>& ws) {
    const char* fn = "lowrank::add_delta";
    const auto x = detail::input_view(fn, "X", X, -1, xs.in_features());
    xs.validate(fn, x.rows, xs.in_features(), xs.out_features());
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, xs.out_features(), false);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    detail::lora_xs_add_delta<T>(x, xs, y, ws);
}
template <class DX, Real T, Destination DY>
void add_delta(const Eigen::MatrixBase<DX>& X, const LoraXS<T>& xs, DY&& Y) {
    Workspace<T> ws;
    add_delta(X, xs, std::forward<DY>(Y), ws);
}

/// Backward of `forward(X, W, xs, Y)` for an upstream gradient dY (n × out):
///
///     T = X Aᵀ,  G = dY B,  grad.R = s Gᵀ T,  dX = dY W + s (G R) A
///
/// (grad.R = s Bᵀ (dYᵀ X) Aᵀ: the full-weight gradient projected onto the frozen factors, never
/// formed). grad.R and dX are overwritten (plain matrices are resized). With `ws` (every form
/// below takes one), the scratch is reused across calls, as for LoRA's backward.
/// Cost: 2·n·r·(2·in + out + 2·r) + 2·n·out·in flops.
template <class DX, class DW, Real T, class DdY, Destination DdX>
void backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const LoraXS<T>& xs,
              const Eigen::MatrixBase<DdY>& dY, LoraXSGrad<T>& grad, DdX&& dX, Workspace<T>& ws) {
    const char* fn = "lowrank::backward";
    const auto x = detail::input_view(fn, "X", X, -1, xs.in_features());
    const auto w = detail::input_view(fn, "W", W, xs.out_features(), xs.in_features());
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, xs.out_features());
    xs.validate(fn, x.rows, w.cols, w.rows);
    auto dx = detail::output_view(fn, "dX", std::forward<DdX>(dX), x.rows, w.cols, true);
    detail::check_no_overlap(fn, "dX", dx, "X", x);
    detail::check_no_overlap(fn, "dX", dx, "dY", dy);
    detail::check_no_overlap(fn, "dX", dx, "W", w);
    core::base_input_grad<T>(dy, w, dx, false, ws.gemm());
    detail::lora_xs_backward_delta<T>(x, xs, dy, grad, &dx, true, ws);
}
template <class DX, class DW, Real T, class DdY, Destination DdX>
void backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const LoraXS<T>& xs,
              const Eigen::MatrixBase<DdY>& dY, LoraXSGrad<T>& grad, DdX&& dX) {
    Workspace<T> ws;
    backward(X, W, xs, dY, grad, std::forward<DdX>(dX), ws);
}

/// Backward without the input gradient: grad.R only (W is only shape-checked).
template <class DX, class DW, Real T, class DdY>
void backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const LoraXS<T>& xs,
              const Eigen::MatrixBase<DdY>& dY, LoraXSGrad<T>& grad, Workspace<T>& ws) {
    const char* fn = "lowrank::backward";
    const auto x = detail::input_view(fn, "X", X, -1, xs.in_features());
    detail::check_shape(fn, "W", W.derived(), xs.out_features(), xs.in_features());
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, xs.out_features());
    xs.validate(fn, x.rows, xs.in_features(), xs.out_features());
    detail::lora_xs_backward_delta<T>(x, xs, dy, grad, nullptr, false, ws);
}
template <class DX, class DW, Real T, class DdY>
void backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const LoraXS<T>& xs,
              const Eigen::MatrixBase<DdY>& dY, LoraXSGrad<T>& grad) {
    Workspace<T> ws;
    backward(X, W, xs, dY, grad, ws);
}

/// Backward of the adapter branch alone (of `add_delta(Xa, xs, Y)`): grad.R and
/// dXa = s (dY B R) A, both overwritten.
template <class DXa, Real T, class DdY, Destination DdXa>
void backward_delta(const Eigen::MatrixBase<DXa>& Xa, const LoraXS<T>& xs,
                    const Eigen::MatrixBase<DdY>& dY, LoraXSGrad<T>& grad, DdXa&& dXa,
                    Workspace<T>& ws) {
    const char* fn = "lowrank::backward_delta";
    const auto xa = detail::input_view(fn, "Xa", Xa, -1, xs.in_features());
    const auto dy = detail::input_view(fn, "dY", dY, xa.rows, xs.out_features());
    xs.validate(fn, xa.rows, xs.in_features(), xs.out_features());
    auto dxa = detail::output_view(fn, "dXa", std::forward<DdXa>(dXa), xa.rows, xs.in_features(), true);
    detail::check_no_overlap(fn, "dXa", dxa, "Xa", xa);
    detail::check_no_overlap(fn, "dXa", dxa, "dY", dy);
    detail::lora_xs_backward_delta<T>(xa, xs, dy, grad, &dxa, false, ws);
}
template <class DXa, Real T, class DdY, Destination DdXa>
void backward_delta(const Eigen::MatrixBase<DXa>& Xa, const LoraXS<T>& xs,
                    const Eigen::MatrixBase<DdY>& dY, LoraXSGrad<T>& grad, DdXa&& dXa) {
    Workspace<T> ws;
    backward_delta(Xa, xs, dY, grad, std::forward<DdXa>(dXa), ws);
}
/// Backward of the adapter branch alone, without dXa.
template <class DXa, Real T, class DdY>
void backward_delta(const Eigen::MatrixBase<DXa>& Xa, const LoraXS<T>& xs,
                    const Eigen::MatrixBase<DdY>& dY, LoraXSGrad<T>& grad,
                    Workspace<T>& ws) {
    const char* fn = "lowrank::backward_delta";
    const auto xa = detail::input_view(fn, "Xa", Xa, -1, xs.in_features());
    const auto dy = detail::input_view(fn, "dY", dY, xa.rows, xs.out_features());
    xs.validate(fn, xa.rows, xs.in_features(), xs.out_features());
    detail::lora_xs_backward_delta<T>(xa, xs, dy, grad, nullptr, false, ws);
}
template <class DXa, Real T, class DdY>
void backward_delta(const Eigen::MatrixBase<DXa>& Xa, const LoraXS<T>& xs,
                    const Eigen::MatrixBase<DdY>& dY, LoraXSGrad<T>& grad) {
    Workspace<T> ws;
    backward_delta(Xa, xs, dY, grad, ws);
}

/// W += weight · s · B R A, one read-modify-write pass over W after forming B R (out × r).
/// Round trip with `unmerge`: as for LoRA (lora.hpp), both add the identically rounded ΔW with
/// opposite signs, so |W' − W| ≤ u (2|W| + |ΔW|) entrywise to first order.
template <Real T, Destination DW>
void merge(DW&& W, const LoraXS<T>& xs, std::type_identity_t<T> weight = T(1)) {
    detail::lora_xs_merge("lowrank::merge", std::forward<DW>(W), xs, weight);
}

/// W −= weight · s · B R A: the inverse of `merge`, up to the bound stated there.
template <Real T, Destination DW>
void unmerge(DW&& W, const LoraXS<T>& xs, std::type_identity_t<T> weight = T(1)) {
    detail::lora_xs_merge("lowrank::unmerge", std::forward<DW>(W), xs, -weight);
}

}  // namespace lowrank
