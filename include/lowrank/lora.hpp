// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// LoRA (Hu et al. 2021) and rsLoRA scaling (Kalajdzievski 2023), in PEFT's conventions.
///
///     y = W x + s · B (A x),   A: r × in,  B: out × r,  s = alpha / r  (rsLoRA: alpha / √r)
///
/// `Lora<T>` owns the factors; the free functions `forward`, `add_delta`, `backward`,
/// `backward_delta`, `merge` and `unmerge` apply it to host tensors (Eigen matrices, `Map`s of host
/// buffers, row blocks). A `Lora<T>` is also a term of the core (`LowRankTerm`), so it can be used
/// in expressions: `lowrank::linear(X, W + lora)`.
///
/// Example:
/// \code
///   lowrank::Lora<float> lora(out, in, {.rank = 8, .alpha = 16, .seed = 42});
///   lowrank::Matrix<float> Y;
///   lowrank::forward(X, W, lora, Y);                 // Y = X Wᵀ + s (X Aᵀ) Bᵀ
///   lowrank::LoraGrad<float> grad;
///   lowrank::backward(X, W, lora, dY, grad, dX);     // grad.A, grad.B, dX
///   lowrank::merge(W, lora);                          // W += s B A
/// \endcode

#include <cmath>
#include <cstdint>
#include <string>

#include "core/args.hpp"
#include "core/random.hpp"
#include "core/terms.hpp"

namespace lowrank {

template <LowRankTerm Term>
class MaskedTerm;  // compose.hpp: a term whose output is multiplied per token by a mask

/// How `Lora` draws its factors (PEFT's `init_lora_weights`).
enum class LoraInit {
    /// PEFT's default (`True`): A ~ U(−1/√in, 1/√in) (Kaiming-uniform with a = √5), B = 0.
    kaiming_uniform,
    /// PEFT's "gaussian": A ~ N(0, (1/r)²), B = 0.
    gaussian,
    /// A = 0 and B = 0 (for factors that will be loaded or set by the caller).
    zeros,
};

/// Configuration of a LoRA adapter. PEFT's defaults: r = 8, alpha = 8.
struct LoraConfig {
    Index rank = 8;          ///< r, 1 ≤ r ≤ min(in, out)
    double alpha = 8.0;      ///< lora_alpha; must be finite
    bool rslora = false;     ///< scale alpha / √r instead of alpha / r
    LoraInit init = LoraInit::kaiming_uniform;
    std::uint64_t seed = 0;  ///< seed of the `Random` stream that draws A (row by row)
};

/// The scale s of a configuration: alpha / r, or alpha / √r with rsLoRA (computed in double).
[[nodiscard]] inline double lora_scale(double alpha, Index rank, bool rslora) {
    return rslora ? alpha / std::sqrt(double(rank)) : alpha / double(rank);
}

namespace detail {
inline void check_lora_config(const char* fn, Index out, Index in, const LoraConfig& cfg) {
    if (out < 1 || in < 1) fail(fn, ": the weight must be at least 1 x 1, got out x in = ", out, " x ", in);
    if (cfg.rank < 1 || cfg.rank > std::min(in, out))
        fail(fn, ": rank ", cfg.rank, " is out of range [1, min(out, in)] for a ", out, " x ", in,
             " weight");
    check_finite(fn, "alpha", cfg.alpha);
}
}  // namespace detail

/// A LoRA adapter for an out × in weight: factors A (r × in), B (out × r) and the scale s.
template <Real T>
class Lora {
public:
    using scalar = T;

    /// Draws the factors as `cfg.init` says, reproducibly from `cfg.seed`.
    /// Throws `lowrank::error` for rank outside [1, min(out, in)] or a non-finite alpha.
    Lora(Index out_features, Index in_features, const LoraConfig& cfg = {})
        : config_(cfg) {
        detail::check_lora_config("lowrank::Lora", out_features, in_features, cfg);
        scale_ = static_cast<T>(lora_scale(cfg.alpha, cfg.rank, cfg.rslora));
        A_.setZero(cfg.rank, in_features);
        B_.setZero(out_features, cfg.rank);
        Random rng(cfg.seed);
        switch (cfg.init) {
            case LoraInit::kaiming_uniform: {
                const double bound = 1.0 / std::sqrt(double(in_features));
                for (Index i = 0; i < A_.rows(); ++i)
                    for (Index j = 0; j < A_.cols(); ++j) A_(i, j) = T(rng.uniform(-bound, bound));
                break;
            }
            case LoraInit::gaussian: {
                const double sigma = 1.0 / double(cfg.rank);
                for (Index i = 0; i < A_.rows(); ++i)
                    for (Index j = 0; j < A_.cols(); ++j) A_(i, j) = T(sigma * rng.normal());
                break;
            }
            case LoraInit::zeros: break;
        }
    }

    /// An adapter with the given factors (rank = A.rows()); `alpha` and `rslora` set the scale.
    /// Throws unless A is r × in and B is out × r with 1 ≤ r ≤ min(out, in), alpha finite.
    template <class DA, class DB>
    [[nodiscard]] static Lora from_factors(const Eigen::MatrixBase<DA>& A,
                                           const Eigen::MatrixBase<DB>& B, double alpha,
                                           bool rslora = false) {
        const char* fn = "lowrank::Lora::from_factors";
        if (B.cols() != A.rows())
            detail::fail(fn, ": A is ", detail::shape_of(A), " and B is ", detail::shape_of(B),
                         "; expected A r x in and B out x r");
        Lora lora(B.rows(), A.cols(),
                  {.rank = A.rows(), .alpha = alpha, .rslora = rslora, .init = LoraInit::zeros});
        lora.A_ = A.template cast<T>();
        lora.B_ = B.template cast<T>();
        return lora;
    }

    /// r × in. May be modified in place (an optimiser step); its shape must not change.
    [[nodiscard]] Matrix<T>& A() noexcept { return A_; }
    [[nodiscard]] const Matrix<T>& A() const noexcept { return A_; }
    /// out × r. May be modified in place; its shape must not change.
    [[nodiscard]] Matrix<T>& B() noexcept { return B_; }
    [[nodiscard]] const Matrix<T>& B() const noexcept { return B_; }

    [[nodiscard]] T scale() const noexcept { return scale_; }
    [[nodiscard]] Index rank() const noexcept { return config_.rank; }
    [[nodiscard]] Index in_features() const noexcept { return A_.cols(); }
    [[nodiscard]] Index out_features() const noexcept { return B_.rows(); }
    [[nodiscard]] const LoraConfig& config() const noexcept { return config_; }

    /// Changes alpha (and so the scale) without touching the factors.
    void set_alpha(double alpha) {
        detail::check_finite("lowrank::Lora::set_alpha", "alpha", alpha);
        config_.alpha = alpha;
        scale_ = static_cast<T>(lora_scale(alpha, config_.rank, config_.rslora));
    }

    /// This adapter with its output multiplied per token by `mask` (length n, binary or soft), as
    /// a term for expressions: `linear(X, W + l1.masked(m1) + l2.masked(m2))` (TARA). The mask is
    /// held by address. Needs `#include <lowrank/compose.hpp>` (see `MaskedTerm` there).
    template <class M, class Self = Lora>
        requires std::constructible_from<MaskedTerm<Self>, const Self&, M>
    [[nodiscard]] MaskedTerm<Self> masked(M&& mask) const& {
        return MaskedTerm<Self>(*this, std::forward<M>(mask));
    }
    /// A temporary adapter would dangle.
    template <class M>
    void masked(M&&) const&& = delete;

    // --- the core's term protocol (LowRankTerm, MergeableTerm) -----------------------------------
    [[nodiscard]] Index width() const noexcept { return config_.rank; }
    [[nodiscard]] MatrixView<const T> shrink_factor() const noexcept { return view(A_); }
    [[nodiscard]] MatrixView<const T> expand_factor() const noexcept { return view(B_); }
    /// φ(T) = s · T.
    void transform(MatrixView<T> t, Index /*row0*/) const noexcept {
        for (Index i = 0; i < t.rows; ++i) {
            T* row = t.row(i);
            for (Index j = 0; j < t.cols; ++j) row[j] *= scale_;
        }
    }
    /// Throws unless the factors are consistent and match an n × in input and out outputs.
    void validate(const char* fn, Index /*n*/, Index in, Index out) const {
        if (A_.rows() != config_.rank || B_.cols() != config_.rank || A_.cols() < 1 || B_.rows() < 1)
            detail::fail(fn, ": the adapter's factors were resized: A is ", detail::shape_of(A_),
                         " and B is ", detail::shape_of(B_), " for rank ", config_.rank);
        if (A_.cols() != in || B_.rows() != out)
            detail::fail(fn, ": adapter for a ", B_.rows(), " x ", A_.cols(),
                         " weight (B ", detail::shape_of(B_), ", A ", detail::shape_of(A_),
                         ") applied to a ", out, " x ", in, " weight");
    }
    /// W += alpha · s · B A.
    void merge_into(MatrixView<T> w, T alpha) const {
        core::rank_update<T>(w, view(B_), view(A_), alpha * scale_);
    }

private:
    LoraConfig config_;
    T scale_ = T(1);
    Matrix<T> A_;
    Matrix<T> B_;
};

/// Gradients of a LoRA adapter's factors: `A` (r × in) and `B` (out × r), resized by the backward
/// functions to the adapter's shapes.
template <Real T>
struct LoraGrad {
    Matrix<T> A;
    Matrix<T> B;
    LoraGrad() = default;
    /// Zero gradients of `lora`'s shapes.
    explicit LoraGrad(const Lora<T>& lora)
        : A(Matrix<T>::Zero(lora.rank(), lora.in_features())),
          B(Matrix<T>::Zero(lora.out_features(), lora.rank())) {}
};

/// The adapter branch's own input, for `forward(X, W, lora, Y, adapter_input(Xa))` (PEFT feeds
/// dropout(X) to the adapter while the base sees X).
template <class D>
struct AdapterInput {
    const Eigen::DenseBase<D>& x;
};
template <class D>
[[nodiscard]] AdapterInput<D> adapter_input(const Eigen::DenseBase<D>& x) {
    return {x};
}

namespace detail {

/// Y += s (Xa Aᵀ) Bᵀ on validated views.
template <class T>
void lora_add_delta(MatrixView<const T> xa, const Lora<T>& lora, MatrixView<T> y,
                    Workspace<T>& ws) {
    if (xa.rows == 0) return;
    core::apply_terms<T>(xa, y, ws.matrix(xa.rows, lora.rank()), lora);
}

/// grad.A, grad.B and (if dxa) dXa (+)= s G A, from Xa and dY. Returns nothing; all views checked.
template <class T>
void lora_backward_delta(MatrixView<const T> xa, const Lora<T>& lora, MatrixView<const T> dy,
                         LoraGrad<T>& grad, MatrixView<T>* dxa, bool accumulate_dx,
                         Workspace<T>& ws) {
    const Index n = xa.rows, r = lora.rank();
    grad.A.resize(r, lora.in_features());
    grad.B.resize(lora.out_features(), r);
    const T s = lora.scale();
    auto scratch = ws.matrix(n, 2 * r);
    const auto t = scratch.block(0, 0, n, r);  // T = Xa Aᵀ
    const auto g = scratch.block(0, r, n, r);  // G = dY B
    if (n == 1) {  // A read once for T, dA and dXa (core::shrink_row_backward)
        core::project_back<T>(dy, lora.expand_factor(), g);
        core::shrink_row_backward<T>(xa.data, lora.shrink_factor(), g.data, s, t.data, view_mut(grad.A),
                                     dxa ? dxa->data : nullptr, accumulate_dx);
        core::grad_expand<T>(dy, t, view_mut(grad.B), s, false);  // dB = s dYᵀ T
        return;
    }
    const Index in = xa.cols, cb = core::blocking::backward_cols(n, in, Index(sizeof(T)));
    const auto a = lora.shrink_factor();
    if (cb >= in) {
        core::shrink<T>(xa, a, t);
        core::project_back<T>(dy, lora.expand_factor(), g);
        core::grad_expand<T>(dy, t, view_mut(grad.B), s, false);  // dB = s dYᵀ T
        core::grad_shrink<T>(g, xa, view_mut(grad.A), s, false, ws.gemm());  // dA = s Gᵀ Xa
        if (dxa) core::input_grad<T>(g, a, *dxa, s, accumulate_dx, ws.gemm());  // s G A
        return;
    }
    // A larger Xa: T, dA and s G A by blocks of its columns, each block read from memory by the
    // first and from L2 by the other two (Xa read once, not twice; G formed first).
    core::project_back<T>(dy, lora.expand_factor(), g);
    const auto da = view_mut(grad.A);
    for (Index c0 = 0; c0 < in; c0 += cb) {
        const Index c = std::min(cb, in - c0);
        const auto xb = xa.block(0, c0, n, c);
        core::shrink<T>(xb, a.block(0, c0, r, c), t, c0 > 0);
        core::grad_shrink<T>(g, xb, da.block(0, c0, r, c), s, false, ws.gemm());
        if (dxa) core::input_grad<T>(g, a.block(0, c0, r, c), dxa->block(0, c0, n, c), s, accumulate_dx, ws.gemm());
    }
    core::grad_expand<T>(dy, t, view_mut(grad.B), s, false);  // dB = s dYᵀ T
}

}  // namespace detail

/// Y = X Wᵀ + s (X Aᵀ) Bᵀ. X: n × in, W: out × in, Y: n × out (a plain Matrix is resized).
/// Y must not overlap X or W. Cost: 2·n·out·in + 2·n·r·(in + out) flops. With `ws`, the n × r
/// scratch and the base product's packed blocks are reused across calls (none allocated once
/// `ws` has grown to the shapes); with `threads`, the work is split between that many threads
/// (the output features; see core/terms.hpp).
template <class DX, class DW, Real T, Destination DY>
void forward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Lora<T>& lora,
             DY&& Y, Workspace<T>& ws, Threads threads = {}) {
    const char* fn = "lowrank::forward";
    const auto x = detail::input_view(fn, "X", X, -1, lora.in_features());
    const auto w = detail::input_view(fn, "W", W, lora.out_features(), lora.in_features());
    lora.validate(fn, x.rows, w.cols, w.rows);
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, w.rows, true);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    detail::check_no_overlap(fn, "Y", y, "W", w);
    core::linear_terms<T>(x, w, y, ws, threads, lora);
}
template <class DX, class DW, Real T, Destination DY>
void forward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Lora<T>& lora,
             DY&& Y) {
    Workspace<T> ws;
    forward(X, W, lora, std::forward<DY>(Y), ws);
}

/// Y = X Wᵀ + s (Xa Aᵀ) Bᵀ: the base sees X, the adapter branch its own input Xa (e.g. dropout(X)).
template <class DX, class DW, Real T, Destination DY, class DXa>
void forward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Lora<T>& lora,
             DY&& Y, AdapterInput<DXa> Xa) {
    const char* fn = "lowrank::forward";
    const auto x = detail::input_view(fn, "X", X, -1, lora.in_features());
    const auto xa = detail::input_view(fn, "Xa", Xa.x, x.rows, lora.in_features());
    const auto w = detail::input_view(fn, "W", W, lora.out_features(), lora.in_features());
    lora.validate(fn, x.rows, w.cols, w.rows);
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, w.rows, true);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    detail::check_no_overlap(fn, "Y", y, "Xa", xa);
    detail::check_no_overlap(fn, "Y", y, "W", w);
    Workspace<T> ws;
    core::base_product<T>(x, w, y, ws.gemm());
    detail::lora_add_delta<T>(xa, lora, y, ws);
}

/// Y += s (X Aᵀ) Bᵀ: the adapter part alone, for hosts that run their own base GEMM.
/// Y (n × out) must already have its shape and must not overlap X. `ws` and `threads` as for
/// `forward`.
template <class DX, Real T, Destination DY>
void add_delta(const Eigen::MatrixBase<DX>& X, const Lora<T>& lora, DY&& Y, Workspace<T>& ws,
               Threads threads = {}) {
    const char* fn = "lowrank::add_delta";
    const auto x = detail::input_view(fn, "X", X, -1, lora.in_features());
    lora.validate(fn, x.rows, lora.in_features(), lora.out_features());
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, lora.out_features(), false);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    core::linear_terms<T>(x, MatrixView<const T>{}, y, ws, threads, lora);
}
template <class DX, Real T, Destination DY>
void add_delta(const Eigen::MatrixBase<DX>& X, const Lora<T>& lora, DY&& Y) {
    Workspace<T> ws;
    add_delta(X, lora, std::forward<DY>(Y), ws);
}

/// Backward of `forward(X, W, lora, Y)` for an upstream gradient dY (n × out):
///
///     T = X Aᵀ,  G = dY B,  grad.B = s dYᵀ T,  grad.A = s Gᵀ X,  dX = dY W + s G A
///
/// grad.A, grad.B and dX are overwritten (plain matrices are resized). W is only read for dX.
/// The full-weight gradient dYᵀ X is never formed. Cost: 2·n·r·(2·in + 2·out) + 2·n·out·in flops.
/// For one row (n = 1), A is read once for T, grad.A and dX together (core::shrink_row_backward),
/// so the adapter's factors are each read once and their gradients each written once. An X of 1 MiB
/// or more is read once for T, grad.A and dX, by blocks of its columns (core::blocking::
/// backward_cols); dY is read twice (G, then grad.B once T is complete). With `ws`
/// (every form below takes one), the n × 2r scratch and the products' copies are reused across
/// calls: none is allocated once `ws` has grown to the shapes and the gradients have theirs.
template <class DX, class DW, Real T, class DdY, Destination DdX>
void backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Lora<T>& lora,
              const Eigen::MatrixBase<DdY>& dY, LoraGrad<T>& grad, DdX&& dX, Workspace<T>& ws) {
    const char* fn = "lowrank::backward";
    const auto x = detail::input_view(fn, "X", X, -1, lora.in_features());
    const auto w = detail::input_view(fn, "W", W, lora.out_features(), lora.in_features());
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, lora.out_features());
    lora.validate(fn, x.rows, w.cols, w.rows);
    auto dx = detail::output_view(fn, "dX", std::forward<DdX>(dX), x.rows, w.cols, true);
    detail::check_no_overlap(fn, "dX", dx, "X", x);
    detail::check_no_overlap(fn, "dX", dx, "dY", dy);
    detail::check_no_overlap(fn, "dX", dx, "W", w);
    core::base_input_grad<T>(dy, w, dx, false, ws.gemm());
    detail::lora_backward_delta<T>(x, lora, dy, grad, &dx, true, ws);
}
template <class DX, class DW, Real T, class DdY, Destination DdX>
void backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Lora<T>& lora,
              const Eigen::MatrixBase<DdY>& dY, LoraGrad<T>& grad, DdX&& dX) {
    Workspace<T> ws;
    backward(X, W, lora, dY, grad, std::forward<DdX>(dX), ws);
}

/// Backward without the input gradient: grad.A and grad.B only (W is only shape-checked).
template <class DX, class DW, Real T, class DdY>
void backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Lora<T>& lora,
              const Eigen::MatrixBase<DdY>& dY, LoraGrad<T>& grad, Workspace<T>& ws) {
    const char* fn = "lowrank::backward";
    const auto x = detail::input_view(fn, "X", X, -1, lora.in_features());
    detail::check_shape(fn, "W", W.derived(), lora.out_features(), lora.in_features());
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, lora.out_features());
    lora.validate(fn, x.rows, lora.in_features(), lora.out_features());
    detail::lora_backward_delta<T>(x, lora, dy, grad, nullptr, false, ws);
}
template <class DX, class DW, Real T, class DdY>
void backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Lora<T>& lora,
              const Eigen::MatrixBase<DdY>& dY, LoraGrad<T>& grad) {
    Workspace<T> ws;
    backward(X, W, lora, dY, grad, ws);
}

/// Backward of the adapter branch alone (of `add_delta(Xa, lora, Y)`): grad.A, grad.B and
/// dXa = s (dY B) A, all overwritten. With adapter dropout the host adds dXa, masked and scaled by
/// its dropout, to its own base gradient dY W.
template <class DXa, Real T, class DdY, Destination DdXa>
void backward_delta(const Eigen::MatrixBase<DXa>& Xa, const Lora<T>& lora,
                    const Eigen::MatrixBase<DdY>& dY, LoraGrad<T>& grad, DdXa&& dXa,
                    Workspace<T>& ws) {
    const char* fn = "lowrank::backward_delta";
    const auto xa = detail::input_view(fn, "Xa", Xa, -1, lora.in_features());
    const auto dy = detail::input_view(fn, "dY", dY, xa.rows, lora.out_features());
    lora.validate(fn, xa.rows, lora.in_features(), lora.out_features());
    auto dxa = detail::output_view(fn, "dXa", std::forward<DdXa>(dXa), xa.rows,
                                   lora.in_features(), true);
    detail::check_no_overlap(fn, "dXa", dxa, "Xa", xa);
    detail::check_no_overlap(fn, "dXa", dxa, "dY", dy);
    detail::lora_backward_delta<T>(xa, lora, dy, grad, &dxa, false, ws);
}
template <class DXa, Real T, class DdY, Destination DdXa>
void backward_delta(const Eigen::MatrixBase<DXa>& Xa, const Lora<T>& lora,
                    const Eigen::MatrixBase<DdY>& dY, LoraGrad<T>& grad, DdXa&& dXa) {
    Workspace<T> ws;
    backward_delta(Xa, lora, dY, grad, std::forward<DdXa>(dXa), ws);
}
/// Backward of the adapter branch alone, without dXa.
template <class DXa, Real T, class DdY>
void backward_delta(const Eigen::MatrixBase<DXa>& Xa, const Lora<T>& lora,
                    const Eigen::MatrixBase<DdY>& dY, LoraGrad<T>& grad,
                    Workspace<T>& ws) {
    const char* fn = "lowrank::backward_delta";
    const auto xa = detail::input_view(fn, "Xa", Xa, -1, lora.in_features());
    const auto dy = detail::input_view(fn, "dY", dY, xa.rows, lora.out_features());
    lora.validate(fn, xa.rows, lora.in_features(), lora.out_features());
    detail::lora_backward_delta<T>(xa, lora, dy, grad, nullptr, false, ws);
}
template <class DXa, Real T, class DdY>
void backward_delta(const Eigen::MatrixBase<DXa>& Xa, const Lora<T>& lora,
                    const Eigen::MatrixBase<DdY>& dY, LoraGrad<T>& grad) {
    Workspace<T> ws;
    backward_delta(Xa, lora, dY, grad, ws);
}

namespace detail {
/// W += signed_weight · s · B A after checking W's shape, the weight and aliasing.
template <Real T, Destination DW>
void lora_merge(const char* fn, DW&& W, const Lora<T>& lora, T signed_weight, Threads threads) {
    lora.validate(fn, 0, lora.in_features(), lora.out_features());
    check_finite(fn, "weight", signed_weight);
    auto w = output_view(fn, "W", std::forward<DW>(W), lora.out_features(), lora.in_features(),
                         false);
    check_no_overlap(fn, "W", w, "A", lora.shrink_factor());
    check_no_overlap(fn, "W", w, "B", lora.expand_factor());
    // Rows of W are independent: each thread updates its band with the matching rows of B. The
    // bands start at multiples of the sweep's tile height, so each thread's tiles are the ones
    // one thread would use there (a 1-row tail tile sums in another order), and the result is
    // bit-identical.
    constexpr Index band = core::blocking::sweep_mr<xsimd::default_arch>;
    core::parallel_for(threads, w.rows, 64, band, [&](Index b, Index e) {
        core::rank_update<T>(w.middle_rows(b, e - b), lora.expand_factor().middle_rows(b, e - b),
                             lora.shrink_factor(), signed_weight * lora.scale());
    });
}
}  // namespace detail

/// W += weight · s · B A, in one read-modify-write pass over W (out × in); with `threads`, bands
/// of rows of W on that many threads (bit-identical to one thread).
///
/// Round trip: in precision u (2⁻²⁴ for float), `merge` then `unmerge` returns each entry within
///     |W'ᵢⱼ − Wᵢⱼ| ≤ u · (2 |Wᵢⱼ| + |ΔWᵢⱼ|)   (to first order in u, for r ≤ 256)
/// because both calls add the identically rounded ΔW with opposite signs, so only the two
/// roundings of the additions remain. To avoid even that, keep W unmerged (the unmerged forward
/// costs 2·n·r·(in + out) extra flops) or merge into a double copy.
template <Real T, Destination DW>
void merge(DW&& W, const Lora<T>& lora, std::type_identity_t<T> weight = T(1),
           Threads threads = {}) {
    detail::lora_merge("lowrank::merge", std::forward<DW>(W), lora, weight, threads);
}

/// W −= weight · s · B A: the inverse of `merge`, up to the bound stated there.
template <Real T, Destination DW>
void unmerge(DW&& W, const Lora<T>& lora, std::type_identity_t<T> weight = T(1),
             Threads threads = {}) {
    detail::lora_merge("lowrank::unmerge", std::forward<DW>(W), lora, -weight, threads);
}

}  // namespace lowrank
