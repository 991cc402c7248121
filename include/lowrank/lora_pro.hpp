// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// LoRA-Pro (Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025,
/// arXiv 2407.18242): the gradient correction that makes a LoRA step the closest possible low-rank
/// step to full fine-tuning, and the AdamW optimiser built on it (two modes).
///
/// With `W = W0 + s·B A` (A r × in, B out × r) and the full gradient `G = ∂L/∂W` (never formed),
/// the ordinary LoRA gradients are `gA = s·Bᵀ G`, `gB = s·G Aᵀ`. A step (dA, dB) changes W by
/// `s(B dA + dB A)`; LoRA-Pro picks (g_A, g_B) so that this "equivalent gradient" is the matrix of
/// that form closest to G in Frobenius norm (paper, Theorem 2.1):
///
///     P = (BᵀB + δI)⁻¹,  Q = (AAᵀ + δI)⁻¹                                  (r × r)
///     g_A = (1/s²) P gA + X A
///     g_B = (1/s²) (I − B P Bᵀ) gB Q − B X                                 (any r × r X)
///     g̃   = s B g_A + s g_B A = P_B G + (I − P_B) G P_A                    (independent of X)
///
/// The equivalent gradient has rank ≤ 2r and is kept in factored form. X is free; by default it is
/// the X that keeps (g_A, g_B) closest to (gA, gB) (paper, Theorem 2.2), a Sylvester equation in
/// the two r × r Gram matrices solved by `linalg::solve_sylvester_symmetric`.
///
/// Example:
/// \code
///   lowrank::Lora<float> lora(out, in, {.rank = 16, .alpha = 32});
///   lowrank::pro::AdamW<float> opt(lora, {.lr = 1e-4, .mode = lowrank::pro::Mode::full});
///   for (...) {
///       lowrank::backward(X, W, lora, dY, grad);   // grad.A, grad.B: ordinary LoRA gradients
///       opt.step(lora, grad.A, grad.B);            // corrected step
///   }
///   opt.save("optimizer.lrpro");                   // resume later with opt.load(...)
/// \endcode
///
/// Data parallel: average gA and gB across workers first; the correction and the (replicated)
/// full-mode moments are then local.

#include <xsimd/xsimd.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "core/args.hpp"
#include "core/kernels.hpp"
#include "core/ops.hpp"
#include "linalg/sylvester.hpp"
#include "lora.hpp"

namespace lowrank::pro {

/// The choice of the free r × r matrix X of the correction.
enum class XChoice : std::uint32_t {
    /// The X that minimises ‖g_A − gA‖² + ‖g_B − gB‖² (paper, Theorem 2.2): the solution of
    ///     (BᵀB) X + X (AAᵀ) = (1/s²)(δ P (Bᵀ gB) Q − P gA Aᵀ) + (gA Aᵀ − Bᵀ gB).
    /// When gA and gB come from the same G, gA Aᵀ = Bᵀ gB, and with δ → 0 this is the authors'
    /// equation (BᵀB) X + X (AAᵀ) = −(1/s²) P gA Aᵀ; the extra terms make X the exact minimiser for
    /// any δ and any pair of gradients. Minimum-norm X when the operator is singular (A and B both
    /// rank-deficient, e.g. both zero).
    sylvester = 0,
    /// The authors' older alternative X = −(1/(2s²)) P (Bᵀ gB) (AAᵀ).
    symmetry = 1,
    /// X = 0.
    zero = 2,
};

/// Options of the correction.
struct AdjustOptions {
    /// δ ≥ 0, applied exactly as (BᵀB + δI) and (AAᵀ + δI). With PEFT's B = 0, P = δ⁻¹ I: δ is
    /// then real damping, and δ = 0 is only valid while both factors have full rank r.
    double damping = 1e-8;
    XChoice x = XChoice::sylvester;
};

/// The corrected gradients and the X used.
template <Real T>
struct Adjusted {
    Matrix<T> A;  ///< g_A, r × in
    Matrix<T> B;  ///< g_B, out × r
    Matrix<T> X;  ///< r × r
};

/// The equivalent gradient g̃ = left · right, rank ≤ 2r:
///     left  = [ s·B  |  s·g_B⁰ ]   (out × 2r),     right = [ g_A⁰ ; A ]   (2r × in)
/// where g⁰ are the X = 0 parts of the closed form (g̃ does not depend on X).
template <Real T>
struct EquivalentGradient {
    Matrix<T> left;
    Matrix<T> right;
    /// The dense out × in matrix (2·out·in·2r flops, one pass over the result).
    [[nodiscard]] Matrix<T> dense() const {
        Matrix<T> e = Matrix<T>::Zero(left.rows(), right.cols());
        core::rank_update<T>(view_mut(e), view(left), view(right), T(1));
        return e;
    }
};

namespace detail {

using lowrank::detail::fail;
using lowrank::detail::shape_of;
using Dbl = Matrix<double>;

template <class D>
void check_all_finite(const char* fn, const char* arg, const Eigen::MatrixBase<D>& m) {
    for (Index i = 0; i < m.rows(); ++i)
        for (Index j = 0; j < m.cols(); ++j)
            if (!std::isfinite(double(m(i, j))))
                fail(fn, ": ", arg, " (", shape_of(m), ") has a non-finite entry at (", i, ", ", j,
                     "): ", double(m(i, j)));
}

inline void check_adjust_options(const char* fn, const AdjustOptions& opts) {
    if (!(opts.damping >= 0) || !std::isfinite(opts.damping))
        fail(fn, ": damping must be finite and >= 0, got ", opts.damping);
    if (opts.x != XChoice::sylvester && opts.x != XChoice::symmetry && opts.x != XChoice::zero)
        fail(fn, ": unknown XChoice ", std::uint32_t(opts.x));
}

/// Every check of `adjust`: the adapter, the gradients' shapes and values, the options.
template <Real T, class DA, class DB>
void check_adjust_args(const char* fn, const Lora<T>& lora, const Eigen::MatrixBase<DA>& gA,
                       const Eigen::MatrixBase<DB>& gB, const AdjustOptions& opts) {
    static_assert(std::is_same_v<typename DA::Scalar, T> && std::is_same_v<typename DB::Scalar, T>,
                  "lowrank::pro: the gradients must have the adapter's scalar type");
    lora.validate(fn, 0, lora.in_features(), lora.out_features());
    lowrank::detail::check_shape(fn, "gA", gA.derived(), lora.rank(), lora.in_features());
    lowrank::detail::check_shape(fn, "gB", gB.derived(), lora.out_features(), lora.rank());
    check_adjust_options(fn, opts);
    if (!(lora.scale() != T(0)) || !std::isfinite(double(lora.scale())))
        fail(fn, ": the adapter's scale must be finite and nonzero, got ", double(lora.scale()));
    check_all_finite(fn, "gA", gA);
    check_all_finite(fn, "gB", gB);
    check_all_finite(fn, "A", lora.A());
    check_all_finite(fn, "B", lora.B());
}

/// The r × r algebra of the closed form, in double whatever T is (all of it is thin: the largest
/// products are out × r × r and r × r × in).
struct Solve {
    Dbl a, b;        // A (r × in), B (out × r)
    Dbl gtB, aat;    // BᵀB, AAᵀ
    Dbl P, Q;        // (BᵀB + δI)⁻¹, (AAᵀ + δI)⁻¹
    Dbl gA0, gB0;    // the X = 0 parts of g_A and g_B
    double s = 1;
};

template <class M>  // a template so that only the TUs that call it instantiate Eigen's LLT
M spd_inverse(const char* fn, const char* what, const M& gram, double damping) {
    const Index r = gram.rows();
    Dbl damped = gram;
    damped.diagonal().array() += damping;
    Eigen::LLT<Dbl> llt(damped);
    if (llt.info() != Eigen::Success)
        fail(fn, ": ", what, " + damping·I (", r, " x ", r, ", damping ", damping,
             ") is singular; the factor does not have full rank ", r, ", use damping > 0");
    const Dbl inv = llt.solve(Dbl::Identity(r, r));
    if (!inv.allFinite())
        fail(fn, ": ", what, " + damping·I is numerically singular (damping ", damping, ")");
    return inv;
}

/// g⁰_A = (1/s²) P gA,  g⁰_B = (1/s²)(gB Q − B (P (Bᵀ gB) Q)); fills everything but X.
template <Real T, class DA, class DB>
Solve solve_closed_form(const char* fn, const Lora<T>& lora, const Eigen::MatrixBase<DA>& gA,
                        const Eigen::MatrixBase<DB>& gB, double damping, Dbl* K_out, Dbl* L_out) {
    Solve sv;
    sv.s = double(lora.scale());
    sv.a = lora.A().template cast<double>();
    sv.b = lora.B().template cast<double>();
    const Dbl ga = gA.template cast<double>();
    const Dbl gb = gB.template cast<double>();
    sv.gtB.noalias() = sv.b.transpose() * sv.b;
    sv.aat.noalias() = sv.a * sv.a.transpose();
    sv.P = spd_inverse(fn, "BᵀB", sv.gtB, damping);
    sv.Q = spd_inverse(fn, "AAᵀ", sv.aat, damping);
    const double inv_s2 = 1.0 / (sv.s * sv.s);
    Dbl K = sv.b.transpose() * gb;  // Bᵀ gB (r × r)
    sv.gA0.noalias() = inv_s2 * (sv.P * ga);
    const Dbl PKQ = sv.P * K * sv.Q;
    sv.gB0.noalias() = gb * sv.Q;
    sv.gB0.noalias() -= sv.b * PKQ;
    sv.gB0 *= inv_s2;
    if (L_out) L_out->noalias() = ga * sv.a.transpose();  // gA Aᵀ (r × r)
    if (K_out) *K_out = std::move(K);
    return sv;
}

/// The X of `choice` (see XChoice) from the closed-form pieces.
template <class M>  // a template so that only the TUs that call it instantiate the Sylvester solver
M choose_x(const char* fn, const Solve& sv, const M& K, const M& L, XChoice choice,
                    double damping) {
    const Index r = sv.P.rows();
    const double inv_s2 = 1.0 / (sv.s * sv.s);
    switch (choice) {
        case XChoice::zero: return Dbl::Zero(r, r);
        case XChoice::symmetry: return (-0.5 * inv_s2) * (sv.P * K * sv.aat);
        case XChoice::sylvester: {
            Dbl C = inv_s2 * (damping * (sv.P * K * sv.Q) - sv.P * L) + (L - K);
            Dbl X(r, r);
            (void)linalg::solve_sylvester_symmetric(sv.gtB, sv.aat, C, X);
            return X;
        }
    }
    fail(fn, ": unknown XChoice");
}

}  // namespace detail

/// The LoRA-Pro correction of the ordinary LoRA gradients gA (r × in) and gB (out × r) of `lora`:
/// returns g_A, g_B and the X used (see the file comment and `XChoice`).
///
/// Works from the first step with PEFT's B = 0 (then g_A = 0, X = 0, g_B = (1/s²) gB Q) and for
/// r = 1. The r × r algebra and the thin products are done in double and rounded to T once.
/// Throws `lowrank::error` (naming `lowrank::pro::adjust`, the argument and the shapes) for
/// gradients of the wrong shape or with non-finite entries, damping < 0, a zero scale, or a
/// singular BᵀB + δI / AAᵀ + δI (possible only with δ = 0).
/// Cost: ≈ 2·r²·(3·in + 4·out) flops plus O(r³).
template <Real T, class DA, class DB>
[[nodiscard]] Adjusted<T> adjust(const Lora<T>& lora, const Eigen::MatrixBase<DA>& gA,
                                 const Eigen::MatrixBase<DB>& gB, const AdjustOptions& opts = {}) {
    const char* fn = "lowrank::pro::adjust";
    detail::check_adjust_args(fn, lora, gA, gB, opts);
    detail::Dbl K, L;
    const detail::Solve sv = detail::solve_closed_form(fn, lora, gA, gB, opts.damping, &K, &L);
    const detail::Dbl X = detail::choose_x(fn, sv, K, L, opts.x, opts.damping);
    Adjusted<T> out;
    out.A = (sv.gA0 + X * sv.a).template cast<T>();
    out.B = (sv.gB0 - sv.b * X).template cast<T>();
    out.X = X.template cast<T>();
    return out;
}

/// The equivalent gradient g̃ = s·B g_A + s·g_B A = P_B G + (I − P_B) G P_A of the corrected
/// gradients, in factored form (rank ≤ 2r; `.dense()` forms the out × in matrix). With δ > 0 the
/// "projectors" are the damped P_B = B (BᵀB + δI)⁻¹ Bᵀ and P_A = Aᵀ (AAᵀ + δI)⁻¹ A.
/// Same arguments and errors as `adjust` (the X choice is irrelevant here).
template <Real T, class DA, class DB>
[[nodiscard]] EquivalentGradient<T> equivalent_gradient(const Lora<T>& lora,
                                                        const Eigen::MatrixBase<DA>& gA,
                                                        const Eigen::MatrixBase<DB>& gB,
                                                        const AdjustOptions& opts = {}) {
    const char* fn = "lowrank::pro::equivalent_gradient";
    detail::check_adjust_args(fn, lora, gA, gB, opts);
    const detail::Solve sv =
        detail::solve_closed_form(fn, lora, gA, gB, opts.damping, nullptr, nullptr);
    const Index r = lora.rank();
    EquivalentGradient<T> eg;
    eg.left.resize(lora.out_features(), 2 * r);
    eg.left.leftCols(r) = (sv.s * sv.b).template cast<T>();
    eg.left.rightCols(r) = (sv.s * sv.gB0).template cast<T>();
    eg.right.resize(2 * r, lora.in_features());
    eg.right.topRows(r) = sv.gA0.template cast<T>();
    eg.right.bottomRows(r) = lora.A();
    return eg;
}

/// The equivalent gradient as a dense out × in matrix written into `E` (a plain matrix is
/// resized; a Map / block must already be out × in).
template <Real T, class DA, class DB, Destination DE>
void equivalent_gradient(const Lora<T>& lora, const Eigen::MatrixBase<DA>& gA,
                         const Eigen::MatrixBase<DB>& gB, DE&& E, const AdjustOptions& opts = {}) {
    const char* fn = "lowrank::pro::equivalent_gradient";
    const EquivalentGradient<T> eg = equivalent_gradient(lora, gA, gB, opts);
    auto e = lowrank::detail::output_view(fn, "E", std::forward<DE>(E), lora.out_features(),
                                          lora.in_features(), true);
    for (Index i = 0; i < e.rows; ++i) std::fill_n(e.row(i), e.cols, T(0));
    core::rank_update<T>(e, view(eg.left), view(eg.right), T(1));
}

// ================================================================================================
// The optimiser
// ================================================================================================

/// How AdamW uses the correction.
enum class Mode : std::uint32_t {
    /// Correct (gA, gB) → (g_A, g_B), then an ordinary AdamW step on A and B with r × (in + out)
    /// moments. Cheap: the correction is the only extra work.
    efficient = 0,
    /// The authors' current method: Adam moments m, v (out × in each) of the equivalent gradient E;
    /// the Adam direction U = m̂ / (√v̂ + ε) is mapped back through the correction,
    /// (s·Bᵀ U, s·U Aᵀ) → (d_A, d_B), and A −= lr·d_A, B −= lr·d_B. The step is one streaming pass
    /// over m and v (E and U are never formed).
    full = 1,
};

/// How weight decay is applied.
enum class WeightDecay : std::uint32_t {
    /// AdamW's decoupled decay on the trained factors: A, B ×= (1 − lr·wd).
    decoupled = 0,
    /// The authors' older code: decay of the whole weight W = W0 + s·B A, i.e. A, B ×= √(1 − lr·wd)
    /// and W0 ×= (1 − lr·wd). The base weight must then be passed to `step`.
    whole_weight = 1,
};

/// Hyperparameters of `AdamW`. Defaults are PyTorch's AdamW except weight_decay = 0.
struct AdamWOptions {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.0;
    Mode mode = Mode::efficient;
    AdjustOptions adjust{};
    /// Bias correction uses 1 − β^(t + offset) at step t (t = 1 first). 0 is standard Adam; the
    /// authors' code uses 1 (their first updates are ≈ 0.74× standard Adam's).
    int bias_correction_offset = 0;
    WeightDecay decay = WeightDecay::decoupled;
};

/// Per-adapter optimiser state. Efficient mode uses mA, vA (r × in) and mB, vB (out × r); full
/// mode uses m, v (out × in). The others are empty.
template <Real T>
struct AdapterState {
    std::int64_t step = 0;  ///< steps taken (t of the last step)
    Matrix<T> mA, vA, mB, vB;
    Matrix<T> m, v;
};

namespace detail {

/// Per-step constants of the Adam update U = (m · inv_bc1) / (√v · inv_sqrt_bc2 + ε).
template <class T>
struct AdamCoefficients {
    T beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_sqrt_bc2, eps;
};

template <class T>
AdamCoefficients<T> adam_coefficients(const AdamWOptions& o, std::int64_t t) {
    const double tt = double(t) + double(o.bias_correction_offset);
    const double bc1 = 1.0 - std::pow(o.beta1, tt);
    const double bc2 = 1.0 - std::pow(o.beta2, tt);
    return {T(o.beta1), T(1.0 - o.beta1), T(o.beta2), T(1.0 - o.beta2), T(1.0 / bc1),
            T(1.0 / std::sqrt(bc2)), T(o.eps)};
}

/// Scalar reference of the moment update on one row segment; `g` holds E on entry and U on exit:
///     m = β1 m + (1 − β1) e,  v = β2 v + (1 − β2) e²,  u = (m · c1) / (√v · c2 + ε).
template <class T>
void adam_row_ref(Index n, T* m, T* v, T* g, const AdamCoefficients<T>& c) noexcept {
    for (Index j = 0; j < n; ++j) {
        const T e = g[j];
        const T mj = c.beta1 * m[j] + c.one_minus_beta1 * e;
        const T vj = c.beta2 * v[j] + c.one_minus_beta2 * (e * e);
        m[j] = mj;
        v[j] = vj;
        g[j] = (mj * c.inv_bc1) / (std::sqrt(vj) * c.inv_sqrt_bc2 + c.eps);
    }
}

/// SIMD version of `adam_row_ref` (same operations; FMA contraction may differ in the last bit).
template <class T, class Arch = xsimd::default_arch>
void adam_row(Index n, T* m, T* v, T* g, const AdamCoefficients<T>& c) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    const batch b1(c.beta1), ob1(c.one_minus_beta1), b2(c.beta2), ob2(c.one_minus_beta2),
        ib1(c.inv_bc1), isb2(c.inv_sqrt_bc2), eps(c.eps);
    Index j = 0;
    for (; j + W <= n; j += W) {
        const batch e = batch::load_unaligned(g + j);
        const batch mj = xsimd::fma(ob1, e, b1 * batch::load_unaligned(m + j));
        const batch vj = xsimd::fma(ob2, e * e, b2 * batch::load_unaligned(v + j));
        mj.store_unaligned(m + j);
        vj.store_unaligned(v + j);
        ((mj * ib1) / xsimd::fma(xsimd::sqrt(vj), isb2, eps)).store_unaligned(g + j);
    }
    adam_row_ref(n - j, m + j, v + j, g + j, c);
}

/// Tile of the streaming pass: `pass_rows` rows of m and v at a time (two micro-tile heights of
/// gemm_bcast; 12 rather than 6 halves the L2 traffic of `right`, A and the Bᵀ U accumulator per
/// element, ≈ 15% faster at 4096², r = 16 on AVX2), `pass_bytes` of scratch for the E / U tile so
/// that it stays in L1.
inline constexpr Index pass_rows = 12;
inline constexpr Index pass_bytes = 24 * 1024;

/// The streaming full-mode pass. For each pass_rows × C tile of the out × in state:
///     E_tile = left[rows] · right[:, cols]              (gemm_bcast, k = 2r, into L1 scratch)
///     m, v updated, E_tile overwritten by U_tile          (adam_row)
///     btu[:, cols]  += B[rows]ᵀ · U_tile                 (gemm_bcast, k = rows)
///     uat[rows, :] (+)= U_tile · A[:, cols]ᵀ             (gemm_dot, k = C)
/// so m and v are read and written once and nothing out × in besides them is touched.
/// btu (r × in) and uat (out × r) are overwritten. Cost: 2·out·in·4r flops + ≈ 10·out·in.
template <class T, class Arch = xsimd::default_arch>
void full_pass(MatrixView<T> m, MatrixView<T> v, MatrixView<const T> left,
               MatrixView<const T> right, MatrixView<const T> b, MatrixView<const T> a,
               const AdamCoefficients<T>& c, MatrixView<T> btu, MatrixView<T> uat,
               std::vector<T>& scratch, bool use_simd = true) {
    const Index out = m.rows, in = m.cols, r = a.rows, k2 = left.cols;
    LOWRANK_ASSERT(v.rows == out && v.cols == in && left.rows == out && right.rows == k2 &&
                   right.cols == in && b.rows == out && b.cols == r && a.cols == in &&
                   btu.rows == r && btu.cols == in && uat.rows == out && uat.cols == r);
    const Index C = std::max<Index>(64, pass_bytes / (pass_rows * Index(sizeof(T))));
    scratch.resize(std::size_t(pass_rows * C));
    T* tile = scratch.data();
    for (Index i = 0; i < r; ++i) std::fill_n(btu.row(i), in, T(0));
    for (Index i0 = 0; i0 < out; i0 += pass_rows) {
        const Index rb = std::min(pass_rows, out - i0);
        for (Index j0 = 0; j0 < in; j0 += C) {
            const Index cb = std::min(C, in - j0);
            core::gemm_bcast<T, Arch>(rb, cb, k2, T(1), left.row(i0), left.ld, 1, right.data + j0,
                                      right.ld, tile, C, false);
            for (Index i = 0; i < rb; ++i) {
                if (use_simd)
                    adam_row<T, Arch>(cb, m.row(i0 + i) + j0, v.row(i0 + i) + j0, tile + i * C, c);
                else
                    adam_row_ref<T>(cb, m.row(i0 + i) + j0, v.row(i0 + i) + j0, tile + i * C, c);
            }
            core::gemm_bcast<T, Arch>(r, cb, rb, T(1), b.row(i0), 1, b.ld, tile, C, btu.data + j0,
                                      btu.ld, true);
            core::gemm_dot<T, Arch>(rb, r, cb, T(1), tile, C, a.data + j0, a.ld, uat.row(i0),
                                    uat.ld, j0 > 0);
        }
    }
}

inline void check_adamw_options(const char* fn, const AdamWOptions& o) {
    auto finite_nonneg = [&](const char* name, double x) {
        if (!std::isfinite(x) || !(x >= 0)) fail(fn, ": ", name, " must be finite and >= 0, got ", x);
    };
    finite_nonneg("lr", o.lr);
    finite_nonneg("eps", o.eps);
    finite_nonneg("weight_decay", o.weight_decay);
    if (!(o.beta1 >= 0 && o.beta1 < 1)) fail(fn, ": beta1 must be in [0, 1), got ", o.beta1);
    if (!(o.beta2 >= 0 && o.beta2 < 1)) fail(fn, ": beta2 must be in [0, 1), got ", o.beta2);
    if (o.mode != Mode::efficient && o.mode != Mode::full)
        fail(fn, ": unknown Mode ", std::uint32_t(o.mode));
    if (o.decay != WeightDecay::decoupled && o.decay != WeightDecay::whole_weight)
        fail(fn, ": unknown WeightDecay ", std::uint32_t(o.decay));
    if (o.bias_correction_offset < 0 || o.bias_correction_offset > 1000000)
        fail(fn, ": bias_correction_offset must be in [0, 1e6], got ", o.bias_correction_offset);
    if (!(o.lr * o.weight_decay <= 1))
        fail(fn, ": lr * weight_decay must be <= 1 (decay factor 1 - lr*wd >= 0), got ",
             o.lr * o.weight_decay);
    if (!(o.eps > 0))
        fail(fn, ": eps must be > 0 (with PEFT's B = 0 the first corrected g_A is exactly 0, and "
             "m / (sqrt(v) + eps) would be 0 / 0), got ", o.eps);
    check_adjust_options(fn, o.adjust);
}

/// One Adam update of a parameter p from its gradient g and moments m, v (elementwise):
/// p −= lr · (m̂ / (√v̂ + ε)). Decay is applied by the caller.
template <class T>
void adam_update(Matrix<T>& p, const Matrix<T>& g, Matrix<T>& m, Matrix<T>& v,
                 const AdamCoefficients<T>& c, T lr) {
    auto ma = m.array();
    auto va = v.array();
    const auto ga = g.array();
    ma = c.beta1 * ma + c.one_minus_beta1 * ga;
    va = c.beta2 * va + c.one_minus_beta2 * ga.square();
    p.array() -= lr * ((ma * c.inv_bc1) / (va.sqrt() * c.inv_sqrt_bc2 + c.eps));
}

// --- binary state file --------------------------------------------------------------------------

inline constexpr char state_magic[8] = {'L', 'R', 'P', 'R', 'O', 'A', 'W', '1'};
inline constexpr std::uint32_t state_version = 1;
inline constexpr std::uint32_t endian_marker = 0x01020304u;
inline constexpr std::size_t state_header_bytes = 8 + 4 * 7 + 8 * 6 + 8;  // magic through N
inline constexpr std::size_t state_adapter_bytes = 8 * 4;

/// FNV-1a 64 over everything written, to detect corruption.
struct Fnv {
    std::uint64_t h = 0xcbf29ce484222325ULL;
    void add(const void* p, std::size_t n) {
        const auto* c = static_cast<const unsigned char*>(p);
        for (std::size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 0x100000001b3ULL;
    }
};

class StateWriter {
public:
    explicit StateWriter(const std::string& path) : path_(path), os_(path, std::ios::binary) {
        if (!os_) fail("lowrank::pro::AdamW::save: cannot open '", path, "' for writing");
    }
    void bytes(const void* p, std::size_t n) {
        hash_.add(p, n);
        os_.write(static_cast<const char*>(p), std::streamsize(n));
    }
    template <class V>
    void value(V x) {
        bytes(&x, sizeof x);
    }
    void finish() {
        const std::uint64_t h = hash_.h;
        os_.write(reinterpret_cast<const char*>(&h), sizeof h);
        os_.flush();
        if (!os_) fail("lowrank::pro::AdamW::save: writing '", path_, "' failed");
    }

private:
    std::string path_;
    std::ofstream os_;
    Fnv hash_;
};

class StateReader {
public:
    StateReader(const std::string& path, const char* fn)
        : path_(path), fn_(fn), is_(path, std::ios::binary) {
        if (!is_) fail(fn, ": cannot open '", path, "'");
        is_.seekg(0, std::ios::end);
        const auto end = is_.tellg();
        if (end < 0) fail(fn, ": cannot determine the size of '", path, "'");
        size_ = std::uint64_t(end);
        is_.seekg(0, std::ios::beg);
    }
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
    void bytes(void* p, std::size_t n, const char* what) {
        if (pos_ + n > size_)
            fail(fn_, ": '", path_, "' is truncated (reading ", what, " at byte ", pos_, ")");
        is_.read(static_cast<char*>(p), std::streamsize(n));
        if (!is_) fail(fn_, ": reading ", what, " from '", path_, "' failed");
        hash_.add(p, n);
        pos_ += n;
    }
    template <class V>
    V value(const char* what) {
        V x;
        bytes(&x, sizeof x, what);
        return x;
    }
    void check_hash() {
        const std::uint64_t want = hash_.h;
        std::uint64_t got = 0;
        if (pos_ + sizeof got != size_)
            fail(fn_, ": '", path_, "' has ", size_, " bytes, expected ", pos_ + sizeof got);
        is_.read(reinterpret_cast<char*>(&got), sizeof got);
        if (!is_ || got != want)
            fail(fn_, ": '", path_, "' is corrupt (checksum mismatch)");
    }

private:
    std::string path_;
    const char* fn_;
    std::ifstream is_;
    std::uint64_t size_ = 0, pos_ = 0;
    Fnv hash_;
};

}  // namespace detail

/// AdamW with the LoRA-Pro correction, over one or many adapters (e.g. all layers of a model).
///
/// The adapters are registered at construction (by address; they must outlive the optimiser and
/// keep their shapes) and each has its own state and step count. `step(lora, gA, gB)` takes the
/// ordinary LoRA gradients of one adapter (from `lowrank::backward`, or the caller's own); the
/// batch form takes one `LoraGrad` per adapter, in registration order.
///
/// Per step (t = the adapter's step count after increment, τ = t + bias_correction_offset,
/// bc1 = 1 − β1^τ, bc2 = 1 − β2^τ):
/// - efficient: (d_A, d_B) = adjust(gA, gB); for p ∈ {A, B}: m = β1 m + (1 − β1) d,
///   v = β2 v + (1 − β2) d², p −= lr · (m / bc1) / (√(v / bc2) + ε).
/// - full: E = left · right (the equivalent gradient, never formed); m, v as above on E (out × in);
///   U = (m / bc1) / (√(v / bc2) + ε); (d_A, d_B) = adjust(s·Bᵀ U, s·U Aᵀ); A −= lr·d_A, B −= lr·d_B.
///   Cost: one read and one write of m and v, 8r flops per element of W.
/// Weight decay first (see `WeightDecay`), with the factors as they were before the step.
///
/// State files (`save` / `load`), native little-endian, all integers unsigned unless noted:
///     "LRPROAW1" | u32 0x01020304 | u32 version = 1 | u32 sizeof(T) | u32 mode | u32 decay |
///     u32 x choice | i32 bias_correction_offset | f64 lr, beta1, beta2, eps, weight_decay, damping |
///     u64 N | N × (u64 out, u64 in, u64 r, i64 step) |
///     N × moments (efficient: mA r·in, vA r·in, mB out·r, vB out·r; full: m out·in, v out·in;
///     row-major values of T) | u64 FNV-1a-64 of all preceding bytes.
/// `load` checks every field (magic, marker, version, scalar size, enum values, hyperparameter
/// ranges, N and every shape against the registered adapters, the exact file size, finite moments
/// with v ≥ 0, the checksum) before changing anything, and restores the hyperparameters too.
template <Real T>
class AdamW {
public:
    /// An optimiser over `adapters` (none may be null or repeated).
    explicit AdamW(std::vector<Lora<T>*> adapters, const AdamWOptions& opts = {})
        : adapters_(std::move(adapters)), opts_(opts) {
        const char* fn = "lowrank::pro::AdamW";
        detail::check_adamw_options(fn, opts_);
        for (std::size_t i = 0; i < adapters_.size(); ++i) {
            if (!adapters_[i]) detail::fail(fn, ": adapter ", i, " is null");
            for (std::size_t j = 0; j < i; ++j)
                if (adapters_[j] == adapters_[i])
                    detail::fail(fn, ": adapter ", i, " is registered twice (also at ", j, ")");
        }
        reset_states();
    }
    /// An optimiser over one adapter.
    explicit AdamW(Lora<T>& adapter, const AdamWOptions& opts = {})
        : AdamW(std::vector<Lora<T>*>{&adapter}, opts) {}

    [[nodiscard]] const AdamWOptions& options() const noexcept { return opts_; }
    /// Changes the learning rate (for schedules). Throws unless finite, ≥ 0 and lr·wd ≤ 1.
    void set_lr(double lr) {
        AdamWOptions o = opts_;
        o.lr = lr;
        detail::check_adamw_options("lowrank::pro::AdamW::set_lr", o);
        opts_ = o;
    }
    [[nodiscard]] std::size_t size() const noexcept { return adapters_.size(); }
    [[nodiscard]] const AdapterState<T>& state(std::size_t i) const { return states_.at(i); }
    /// The index of a registered adapter; throws if it is not registered.
    [[nodiscard]] std::size_t index_of(const Lora<T>& lora) const {
        for (std::size_t i = 0; i < adapters_.size(); ++i)
            if (adapters_[i] == &lora) return i;
        detail::fail("lowrank::pro::AdamW: the adapter (", lora.out_features(), " x ",
                     lora.in_features(), ", rank ", lora.rank(),
                     ") is not registered with this optimiser");
    }

    /// One step of `lora` from its ordinary gradients gA (r × in), gB (out × r).
    /// Throws `lowrank::error` (and changes nothing) for an unregistered adapter, bad gradients
    /// (see `adjust`), or WeightDecay::whole_weight with weight_decay > 0 (use the overload with W).
    template <class DA, class DB>
    void step(Lora<T>& lora, const Eigen::MatrixBase<DA>& gA, const Eigen::MatrixBase<DB>& gB) {
        const char* fn = "lowrank::pro::AdamW::step";
        const std::size_t i = index_of(lora);
        detail::check_adjust_args(fn, lora, gA, gB, opts_.adjust);
        check_state_shape(fn, i);
        check_base_needed(fn, false);
        step_one(i, gA, gB, nullptr);
    }
    /// One step, with the base weight W (out × in) for WeightDecay::whole_weight (W ×= 1 − lr·wd;
    /// with decoupled decay W is only shape-checked).
    template <class DA, class DB, Destination DW>
    void step(Lora<T>& lora, const Eigen::MatrixBase<DA>& gA, const Eigen::MatrixBase<DB>& gB,
              DW&& W) {
        const char* fn = "lowrank::pro::AdamW::step";
        const std::size_t i = index_of(lora);
        detail::check_adjust_args(fn, lora, gA, gB, opts_.adjust);
        check_state_shape(fn, i);
        auto w = lowrank::detail::output_view(fn, "W", std::forward<DW>(W), lora.out_features(),
                                              lora.in_features(), false);
        step_one(i, gA, gB, &w);
    }
    /// One step of every adapter: grads[i] belongs to adapter i. All arguments are checked before
    /// anything changes. `bases` (empty, or one view per adapter) are the base weights for
    /// WeightDecay::whole_weight.
    void step(std::span<const LoraGrad<T>> grads, std::span<const MatrixView<T>> bases = {}) {
        const char* fn = "lowrank::pro::AdamW::step";
        if (grads.size() != adapters_.size())
            detail::fail(fn, ": ", grads.size(), " gradients for ", adapters_.size(), " adapters");
        if (!bases.empty() && bases.size() != adapters_.size())
            detail::fail(fn, ": ", bases.size(), " base weights for ", adapters_.size(), " adapters");
        check_base_needed(fn, !bases.empty());
        for (std::size_t i = 0; i < adapters_.size(); ++i) {
            detail::check_adjust_args(fn, *adapters_[i], grads[i].A, grads[i].B, opts_.adjust);
            check_state_shape(fn, i);
            if (!bases.empty() && (bases[i].rows != adapters_[i]->out_features() ||
                                   bases[i].cols != adapters_[i]->in_features()))
                detail::fail(fn, ": W of adapter ", i, " is ", bases[i].rows, " x ", bases[i].cols,
                             ", expected ", adapters_[i]->out_features(), " x ",
                             adapters_[i]->in_features());
        }
        for (std::size_t i = 0; i < adapters_.size(); ++i) {
            MatrixView<T> w = bases.empty() ? MatrixView<T>{} : bases[i];
            step_one(i, grads[i].A, grads[i].B, bases.empty() ? nullptr : &w);
        }
    }

    /// Writes hyperparameters, step counts and moments to `path` (format in the class comment).
    void save(const std::string& path) const {
        detail::StateWriter w(path);
        w.bytes(detail::state_magic, 8);
        w.value(detail::endian_marker);
        w.value(detail::state_version);
        w.value(std::uint32_t(sizeof(T)));
        w.value(std::uint32_t(opts_.mode));
        w.value(std::uint32_t(opts_.decay));
        w.value(std::uint32_t(opts_.adjust.x));
        w.value(std::int32_t(opts_.bias_correction_offset));
        for (double x : {opts_.lr, opts_.beta1, opts_.beta2, opts_.eps, opts_.weight_decay,
                         opts_.adjust.damping})
            w.value(x);
        w.value(std::uint64_t(adapters_.size()));
        for (std::size_t i = 0; i < adapters_.size(); ++i) {
            w.value(std::uint64_t(adapters_[i]->out_features()));
            w.value(std::uint64_t(adapters_[i]->in_features()));
            w.value(std::uint64_t(adapters_[i]->rank()));
            w.value(std::int64_t(states_[i].step));
        }
        for (const auto& st : states_)
            for (const Matrix<T>* mat : moments(const_cast<AdapterState<T>&>(st), opts_.mode))
                w.bytes(mat->data(), std::size_t(mat->size()) * sizeof(T));
        w.finish();
    }

    /// Restores what `save` wrote, into an optimiser over adapters of the same shapes in the same
    /// order. Validates everything first; on any error throws `lowrank::error` and changes nothing.
    void load(const std::string& path) {
        const char* fn = "lowrank::pro::AdamW::load";
        detail::StateReader rd(path, fn);
        char magic[8];
        rd.bytes(magic, 8, "the magic");
        if (std::memcmp(magic, detail::state_magic, 8) != 0)
            detail::fail(fn, ": '", path, "' is not a LoRA-Pro AdamW state file (bad magic)");
        if (rd.value<std::uint32_t>("the byte-order marker") != detail::endian_marker)
            detail::fail(fn, ": '", path, "' was written with another byte order");
        const auto version = rd.value<std::uint32_t>("the version");
        if (version != detail::state_version)
            detail::fail(fn, ": '", path, "' has format version ", version, ", expected ",
                         detail::state_version);
        const auto scalar = rd.value<std::uint32_t>("the scalar size");
        if (scalar != sizeof(T))
            detail::fail(fn, ": '", path, "' holds ", scalar, "-byte scalars, this optimiser ",
                         sizeof(T), "-byte ones");
        AdamWOptions o;
        o.mode = Mode(rd.value<std::uint32_t>("the mode"));
        o.decay = WeightDecay(rd.value<std::uint32_t>("the decay mode"));
        o.adjust.x = XChoice(rd.value<std::uint32_t>("the X choice"));
        o.bias_correction_offset = rd.value<std::int32_t>("the bias-correction offset");
        o.lr = rd.value<double>("lr");
        o.beta1 = rd.value<double>("beta1");
        o.beta2 = rd.value<double>("beta2");
        o.eps = rd.value<double>("eps");
        o.weight_decay = rd.value<double>("weight_decay");
        o.adjust.damping = rd.value<double>("damping");
        detail::check_adamw_options(fn, o);
        const auto n = rd.value<std::uint64_t>("the adapter count");
        if (n != adapters_.size())
            detail::fail(fn, ": '", path, "' holds ", n, " adapters, this optimiser has ",
                         adapters_.size());
        std::vector<AdapterState<T>> fresh(adapters_.size());
        std::uint64_t payload = 0;
        for (std::size_t i = 0; i < adapters_.size(); ++i) {
            const auto out = rd.value<std::uint64_t>("an adapter shape");
            const auto in = rd.value<std::uint64_t>("an adapter shape");
            const auto r = rd.value<std::uint64_t>("an adapter shape");
            const auto t = rd.value<std::int64_t>("a step count");
            const Lora<T>& l = *adapters_[i];
            if (out != std::uint64_t(l.out_features()) || in != std::uint64_t(l.in_features()) ||
                r != std::uint64_t(l.rank()))
                detail::fail(fn, ": adapter ", i, " in '", path, "' is ", out, " x ", in,
                             " rank ", r, ", the registered one ", l.out_features(), " x ",
                             l.in_features(), " rank ", l.rank());
            if (t < 0) detail::fail(fn, ": adapter ", i, " has a negative step count ", t);
            fresh[i].step = t;
            const std::uint64_t elems = o.mode == Mode::full ? 2 * out * in : 2 * r * (in + out);
            payload += elems * sizeof(T);
        }
        // Shapes are the registered ones, so this size (and every allocation below) is bounded by
        // the adapters in memory, not by the file; the file must match it exactly.
        const std::uint64_t expected = detail::state_header_bytes +
                                       adapters_.size() * detail::state_adapter_bytes + payload + 8;
        if (rd.size() != expected)
            detail::fail(fn, ": '", path, "' has ", rd.size(), " bytes, expected ", expected);
        for (std::size_t i = 0; i < adapters_.size(); ++i) {
            allocate(fresh[i], *adapters_[i], o.mode);
            const auto mats = moments(fresh[i], o.mode);
            for (std::size_t k = 0; k < mats.size(); ++k) {
                Matrix<T>* mat = mats[k];
                rd.bytes(mat->data(), std::size_t(mat->size()) * sizeof(T), "the moments");
                if (!mat->allFinite())
                    detail::fail(fn, ": adapter ", i, " has non-finite moments in '", path, "'");
                if (k % 2 == 1 && (mat->array() < T(0)).any())
                    detail::fail(fn, ": adapter ", i, " has negative second moments in '", path, "'");
            }
        }
        rd.check_hash();
        opts_ = o;
        states_ = std::move(fresh);
    }

private:
    std::vector<Lora<T>*> adapters_;
    AdamWOptions opts_;
    std::vector<AdapterState<T>> states_;
    // Reused buffers of the full step.
    std::vector<T> scratch_;
    Matrix<T> btu_, uat_;

    static void allocate(AdapterState<T>& st, const Lora<T>& l, Mode mode) {
        const Index r = l.rank(), in = l.in_features(), out = l.out_features();
        if (mode == Mode::full) {
            st.m.setZero(out, in);
            st.v.setZero(out, in);
        } else {
            st.mA.setZero(r, in);
            st.vA.setZero(r, in);
            st.mB.setZero(out, r);
            st.vB.setZero(out, r);
        }
    }
    void reset_states() {
        states_.assign(adapters_.size(), AdapterState<T>{});
        for (std::size_t i = 0; i < adapters_.size(); ++i)
            allocate(states_[i], *adapters_[i], opts_.mode);
    }
    /// The moment matrices of a state in file order (first moments at even positions).
    static std::vector<Matrix<T>*> moments(AdapterState<T>& st, Mode mode) {
        if (mode == Mode::full) return {&st.m, &st.v};
        return {&st.mA, &st.vA, &st.mB, &st.vB};
    }
    /// Throws if adapter i's factors no longer have the shapes its state was allocated for.
    void check_state_shape(const char* fn, std::size_t i) const {
        const Lora<T>& l = *adapters_[i];
        const AdapterState<T>& st = states_[i];
        const bool ok = opts_.mode == Mode::full
                            ? st.m.rows() == l.out_features() && st.m.cols() == l.in_features()
                            : st.mA.rows() == l.rank() && st.mA.cols() == l.in_features() &&
                                  st.mB.rows() == l.out_features() && st.mB.cols() == l.rank();
        if (!ok)
            detail::fail(fn, ": adapter ", i, " is now ", l.out_features(), " x ", l.in_features(),
                         " rank ", l.rank(), ", not the shape it was registered with");
    }
    void check_base_needed(const char* fn, bool have_base) const {
        if (opts_.decay == WeightDecay::whole_weight && opts_.weight_decay > 0 && !have_base)
            detail::fail(fn, ": WeightDecay::whole_weight decays the base weight too; pass W "
                         "(step(lora, gA, gB, W))");
    }

    /// Arguments already checked.
    template <class DA, class DB>
    void step_one(std::size_t i, const Eigen::MatrixBase<DA>& gA, const Eigen::MatrixBase<DB>& gB,
                  MatrixView<T>* base) {
        Lora<T>& lora = *adapters_[i];
        AdapterState<T>& st = states_[i];
        const char* fn = "lowrank::pro::AdamW::step";
        const T lr = T(opts_.lr);
        Adjusted<T> d;
        if (opts_.mode == Mode::efficient) {
            d = adjust(lora, gA, gB, opts_.adjust);
        } else {
            const EquivalentGradient<T> eg = equivalent_gradient(lora, gA, gB, opts_.adjust);
            btu_.resize(lora.rank(), lora.in_features());
            uat_.resize(lora.out_features(), lora.rank());
            const auto c = detail::adam_coefficients<T>(opts_, st.step + 1);
            detail::full_pass<T>(view_mut(st.m), view_mut(st.v), view(eg.left), view(eg.right),
                                 view(lora.B()), view(lora.A()), c, view_mut(btu_), view_mut(uat_),
                                 scratch_);
            const T s = lora.scale();
            btu_ *= s;
            uat_ *= s;
            if (!btu_.allFinite() || !uat_.allFinite())
                detail::fail(fn, ": the full-mode update direction overflowed (the moments m, v "
                             "of this adapter were already updated; its factors were not)");
            d = adjust(lora, btu_, uat_, opts_.adjust);
        }
        ++st.step;
        apply_decay(lora, base);
        if (opts_.mode == Mode::efficient) {
            const auto c = detail::adam_coefficients<T>(opts_, st.step);
            detail::adam_update(lora.A(), d.A, st.mA, st.vA, c, lr);
            detail::adam_update(lora.B(), d.B, st.mB, st.vB, c, lr);
        } else {
            lora.A() -= lr * d.A;
            lora.B() -= lr * d.B;
        }
    }

    void apply_decay(Lora<T>& lora, MatrixView<T>* base) const {
        const double f = 1.0 - opts_.lr * opts_.weight_decay;
        if (opts_.weight_decay == 0) return;
        if (opts_.decay == WeightDecay::decoupled) {
            lora.A() *= T(f);
            lora.B() *= T(f);
        } else {
            const T root = T(std::sqrt(f));
            lora.A() *= root;
            lora.B() *= root;
            if (base && !base->empty()) eigen_map(*base) *= T(f);
        }
    }
};

}  // namespace lowrank::pro
