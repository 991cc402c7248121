// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Rank-one key-locked edits: ROME's permanent rank-one update (Meng et al. 2022) and Perfusion's
/// gated rank-one edit (Tewel, Gal, Chechik, Atzmon, SIGGRAPH 2023, arXiv 2305.01644), for one
/// concept or several concepts sharing the input statistics C.
///
/// Shapes (PyTorch layout): W is out × in, token encodings are rows of E (n × in), outputs rows of
/// H (n × out). C is the uncentred second moment of encodings (`SecondMoment`, with its ridge).
///
/// **ROME** (Meng et al. 2022, eq. 2):
///
///     W' = W + (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)
///
/// so that W' k* = v* and W' e = W e whenever k*ᵀC⁻¹e = 0. `rome_edit` returns it as a rank-one
/// term (`RomeEdit`): `linear(E, W + edit)` applies it unmerged, `dense(W + edit)` or `merge` merge it.
///
/// **Perfusion** (Tewel et al. 2023, eqs. 5–8), for concepts c = 1…K with target inputs i*_c,
/// target outputs o*_c and gates (β_c, τ_c):
///
///     s_c(e) = eᵀC⁻¹i*_c / (i*_cᵀC⁻¹i*_c)                            (1 at e = i*_c)
///     e⊥     = e − Σ_c p_c(e) i*_c                                   (C⁻¹-orthogonal to every i*_c)
///     h(e)   = W e⊥ + Σ_c σ((s_c(e) − β_c)/τ_c) o*_c                 σ = logistic
///
/// with the exact joint projection p(e) = (MᵀC⁻¹M)⁻¹ MᵀC⁻¹ e, M = [i*_1 … i*_K] (the default), or
/// the approximate p_c(e) = s_c(e) (exact only when the i*_c are mutually C⁻¹-orthogonal).
/// For one concept the two coincide. Replacing σ(·) by s(e) gives ROME's W'e with v* = o*
/// (`rome_limit()`).
///
/// **How it runs on the core.** W e⊥ = W e − Σ_c p_c(e) W i*_c, so the edit is the base product
/// plus one term of width 2K: shrink rows [P ; A] (P: the K projection rows, A: the K gate rows
/// a_c = C⁻¹i*_c / energy_c), per-row transform [p, s] ↦ [−p, σ((s − β)/τ)], expand columns
/// [W i*_1 … W i*_K, o*_1 … o*_K]. C⁻¹i*_c and W i*_c are computed once at construction (and
/// after each change of i*), so a forward costs 4·n·K·(in + out) flops on top of X Wᵀ, and no
/// in × in or out × in matrix is formed per call. Changing β or τ (`set_gate`, `with_gate`)
/// recomputes nothing.
///
/// Example (one concept in a cross-attention layer, key and value projections):
/// \code
///   lowrank::SecondMoment<float> C = lowrank::SecondMoment<float>::load("clip_l.lrsm");
///   auto key   = lowrank::KeyLockedEdit<float>::key(W_K, C, i_dog);     // o* = W_K i_dog, locked
///   auto value = lowrank::KeyLockedEdit<float>::value(W_V, C, i_dog);   // o* trainable
///   lowrank::Matrix<float> K = lowrank::linear(E, W_K + key);
///   lowrank::Matrix<float> V = lowrank::linear(E, W_V + value.with_gate(0.6, 0.15) + lora);
///   lowrank::KeyLockedGrad<float> g;
///   lowrank::Matrix<float> dE;
///   lowrank::backward(E, W_V, value, dV, g, dE);     // g.target_output: ∂L/∂o*, dE: ∂L/∂E
/// \endcode

#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "core/args.hpp"
#include "core/terms.hpp"
#include "linalg/second_moment.hpp"

namespace lowrank {

// ============================================================================================
// ROME
// ============================================================================================

/// ROME's rank-one update ΔW = U V with U = v* − W k* (out × 1) and V = (C⁻¹k*)ᵀ/(k*ᵀC⁻¹k*)
/// (1 × in), as a mergeable term of width 1 (φ = identity). Build it with `rome_edit`.
template <Real T>
class RomeEdit {
public:
    using scalar = T;

    /// A rank-one term U V from its factors: U out × 1, V 1 × in (throws on other shapes or
    /// non-finite entries). `rome_edit` computes them.
    template <class DU, class DV>
    [[nodiscard]] static RomeEdit from_factors(const Eigen::MatrixBase<DU>& U,
                                               const Eigen::MatrixBase<DV>& V) {
        const char* fn = "lowrank::RomeEdit::from_factors";
        if (U.cols() != 1 || V.rows() != 1 || U.rows() < 1 || V.cols() < 1)
            detail::fail(fn, ": U is ", detail::shape_of(U), " and V is ", detail::shape_of(V),
                         "; expected U out x 1 and V 1 x in");
        RomeEdit edit;
        edit.U_ = U.template cast<T>();
        edit.V_ = V.template cast<T>();
        if (!edit.U_.allFinite() || !edit.V_.allFinite())
            detail::fail(fn, ": U or V has a non-finite entry");
        return edit;
    }

    /// U (out × 1): v* − W k*.
    [[nodiscard]] const Matrix<T>& residual() const noexcept { return U_; }
    /// V (1 × in): (C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*).
    [[nodiscard]] const Matrix<T>& key_direction() const noexcept { return V_; }

    // --- the core's term protocol (LowRankTerm, MergeableTerm) -----------------------------------
    [[nodiscard]] Index in_features() const noexcept { return V_.cols(); }
    [[nodiscard]] Index out_features() const noexcept { return U_.rows(); }
    [[nodiscard]] Index width() const noexcept { return 1; }
    [[nodiscard]] MatrixView<const T> shrink_factor() const noexcept { return view(V_); }
    [[nodiscard]] MatrixView<const T> expand_factor() const noexcept { return view(U_); }
    void transform(MatrixView<T> /*t*/, Index /*row0*/) const noexcept {}
    void validate(const char* fn, Index /*n*/, Index in, Index out) const {
        if (V_.cols() != in || U_.rows() != out)
            detail::fail(fn, ": ROME edit for a ", U_.rows(), " x ", V_.cols(),
                         " weight applied to a ", out, " x ", in, " weight");
    }
    /// W += alpha · U V.
    void merge_into(MatrixView<T> w, T alpha) const {
        core::rank_update<T>(w, view(U_), view(V_), alpha);
    }

private:
    Matrix<T> U_;
    Matrix<T> V_;
};

namespace detail {

/// Any vector-shaped Eigen object (n × 1 or 1 × n) of `size` entries, as a double vector.
template <class D>
[[nodiscard]] Vector<double> vector_arg(const char* fn, const char* arg,
                                        const Eigen::MatrixBase<D>& v, Index size) {
    if (!((v.rows() == 1 || v.cols() == 1) && Index(v.size()) == size))
        fail(fn, ": ", arg, " is ", shape_of(v), ", expected a vector of ", size, " entries");
    Vector<double> out(size);
    for (Index i = 0; i < size; ++i)
        out(i) = static_cast<double>(v.cols() == 1 ? v(i, 0) : v(0, i));
    if (!out.allFinite()) fail(fn, ": ", arg, " has a non-finite entry");
    return out;
}

/// W x in double for a row-major W (out × in) view: one dot product per row, no copy of W.
template <class T>
[[nodiscard]] Vector<double> weight_times(MatrixView<const T> w, const Vector<double>& x) {
    Vector<double> y(w.rows);
    for (Index r = 0; r < w.rows; ++r) {
        const T* row = w.row(r);
        double acc = 0;
        for (Index j = 0; j < w.cols; ++j) acc += double(row[j]) * x(j);
        y(r) = acc;
    }
    return y;
}

}  // namespace detail

namespace detail {
/// ROME's factors from the solved C⁻¹k* (`k_whitened`), k* and v*, all in double.
template <Real T>
[[nodiscard]] RomeEdit<T> make_rome(const char* fn, MatrixView<const T> w,
                                    const Vector<double>& k_whitened, const Vector<double>& k,
                                    const Vector<double>& v) {
    const double energy = k.dot(k_whitened);
    if (!(energy > 0) || !std::isfinite(energy))
        fail(fn, ": k*ᵀC⁻¹k* = ", energy, " is not positive");
    const Vector<double> residual = v - weight_times<T>(w, k);
    return RomeEdit<T>::from_factors(residual, (k_whitened / energy).transpose());
}
}  // namespace detail

/// ROME's edit of W (out × in) with the statistics C (their ridge, if any, is used): the key k*
/// (in entries) is mapped to the value v* (out entries). Vectors may be row or column vectors.
/// Cost: one solve with the cached Cholesky factor of C (2·in²) and W k* (2·out·in).
/// Throws `lowrank::error` on shape mismatches, a zero or non-finite k*, or a singular C.
template <class DW, Real T, class DK, class DV>
    requires std::same_as<typename DW::Scalar, T>
[[nodiscard]] RomeEdit<T> rome_edit(const Eigen::MatrixBase<DW>& W, const SecondMoment<T>& C,
                                    const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v) {
    const char* fn = "lowrank::rome_edit";
    const auto w = detail::input_view(fn, "W", W, -1, C.in_features());
    const Vector<double> kd = detail::vector_arg(fn, "k", k, w.cols);
    const Vector<double> vd = detail::vector_arg(fn, "v", v, w.rows);
    if (kd.isZero(0)) detail::fail(fn, ": k (", detail::shape_of(k), ") is zero");
    const Vector<double> kw = C.solve(kd);
    return detail::make_rome<T>(fn, w, kw, kd, vd);
}

/// ROME's edit with C given as a dense symmetric positive definite matrix (in × in).
/// Throws `lowrank::error` if C is singular to working precision (suggesting a ridge).
template <class DW, class DC, class DK, class DV>
    requires Real<typename DW::Scalar>
[[nodiscard]] RomeEdit<typename DW::Scalar> rome_edit(const Eigen::MatrixBase<DW>& W,
                                                      const Eigen::MatrixBase<DC>& C,
                                                      const Eigen::MatrixBase<DK>& k,
                                                      const Eigen::MatrixBase<DV>& v) {
    const char* fn = "lowrank::rome_edit";
    const auto w = detail::input_view(fn, "W", W, -1, -1);
    detail::check_shape(fn, "C", C.derived(), w.cols, w.cols);
    const Vector<double> kd = detail::vector_arg(fn, "k", k, w.cols);
    const Vector<double> vd = detail::vector_arg(fn, "v", v, w.rows);
    if (kd.isZero(0)) detail::fail(fn, ": k (", detail::shape_of(k), ") is zero");
    Eigen::MatrixXd c = C.derived().template cast<double>();
    if (!c.allFinite()) detail::fail(fn, ": C has a non-finite entry");
    const auto f = detail::checked_cholesky(fn, "C", std::move(c),
                                            "add a ridge C + lambda I with lambda > 0");
    const Vector<double> kw = f.solve(Eigen::VectorXd(kd));
    return detail::make_rome<typename DW::Scalar>(fn, w, kw, kd, vd);
}

/// W += weight · ΔW of a ROME edit (one read-modify-write pass over W, nothing out × in allocated).
template <Real T, Destination DW>
void merge(DW&& W, const RomeEdit<T>& edit, std::type_identity_t<T> weight = T(1)) {
    const char* fn = "lowrank::merge";
    detail::check_finite(fn, "weight", weight);
    auto w = detail::output_view(fn, "W", std::forward<DW>(W), edit.out_features(),
                                 edit.in_features(), false);
    edit.merge_into(w, weight);
}

// ============================================================================================
// Perfusion
// ============================================================================================

/// A sigmoid gate σ((s − β)/τ): β finite, τ > 0.
struct Gate {
    double beta = 0.7;
    double tau = 0.15;
};
/// Perfusion's training gate (β, τ) = (0.75, 0.1).
inline constexpr Gate perfusion_training_gate{0.75, 0.1};
/// Perfusion's single-concept inference default (0.7, 0.15).
inline constexpr Gate perfusion_inference_gate{0.7, 0.15};
/// Perfusion's multi-concept inference default (0.6, 0.15).
inline constexpr Gate perfusion_multi_concept_gate{0.6, 0.15};

/// How several concepts remove their directions from e (see the file header).
enum class Orthogonalization {
    exact,        ///< e⊥ = (I − M(MᵀC⁻¹M)⁻¹MᵀC⁻¹) e: C⁻¹-orthogonal to every i*_c (default)
    approximate,  ///< e⊥ ≈ e − Σ_c s_c(e) i*_c: exact only for mutually C⁻¹-orthogonal i*_c
};

/// Gradients of a gated edit with K concepts (plain matrices, resized by `backward`).
template <Real T>
struct KeyLockedGrad {
    Matrix<T> target_output;  ///< K × out: row c is ∂L/∂o*_c
    Matrix<T> target_input;   ///< K × in: row c is ∂L/∂i*_c (only if requested, else empty)
    Vector<T> beta;           ///< K: ∂L/∂β_c (only if requested, else empty)
    Vector<T> tau;            ///< K: ∂L/∂τ_c (only if requested, else empty)
};

/// What `backward` computes beyond ∂L/∂o* and ∂L/∂E.
template <Real T>
struct KeyLockedBackwardOptions {
    bool gate = false;          ///< ∂L/∂β and ∂L/∂τ
    bool target_input = false;  ///< ∂L/∂i* (through C⁻¹i*, the energy, the projection and W i*)
    /// The statistics the edit was built with; required when `target_input` is set.
    const SecondMoment<T>* statistics = nullptr;
};

namespace detail {

inline void check_gate(const char* fn, const Gate& g, Index concept_index) {
    if (!std::isfinite(g.beta))
        fail(fn, ": beta of concept ", concept_index, " must be finite, got ", g.beta);
    if (!(g.tau > 0) || !std::isfinite(g.tau))
        fail(fn, ": tau of concept ", concept_index, " must be finite and > 0, got ", g.tau);
}

template <class T>
[[nodiscard]] inline T logistic(T x) noexcept {
    if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
    const T e = std::exp(x);
    return e / (T(1) + e);
}

/// The shared state of K gated rank-one edits: concept targets (double master copies), the
/// precomputed whitened targets C⁻¹i*_c, energies, the K × K Gram inverse (exact mode), and the
/// term factors V = [P ; A] (2K × in) and U = [W M, O] (out × 2K) in T.
template <Real T>
class GatedEdits {
public:
    GatedEdits() = default;

    /// Builds (or rebuilds) everything from inputs I (K × in) and outputs O (K × out).
    void build(const char* fn, MatrixView<const T> w, const SecondMoment<T>& C,
               const Matrix<double>& inputs, const Matrix<double>& outputs,
               std::vector<Gate> gates, Orthogonalization ortho) {
        const Index K = inputs.rows(), in = w.cols, out = w.rows;
        if (K < 1) fail(fn, ": at least one concept is needed");
        if (C.in_features() != in)
            fail(fn, ": the statistics C are ", C.in_features(), " x ", C.in_features(),
                 " but W is ", out, " x ", in);
        LOWRANK_ASSERT(inputs.cols() == in && outputs.rows() == K && outputs.cols() == out);
        for (Index c = 0; c < K; ++c) {
            if (inputs.row(c).isZero(0))
                fail(fn, ": the target input i* of concept ", c, " is zero");
            check_gate(fn, gates[std::size_t(c)], c);
        }
        const Matrix<double> whitened_t = C.solve(inputs.transpose());  // in × K: C⁻¹ i*_c
        Vector<double> energy(K);
        for (Index c = 0; c < K; ++c) {
            energy(c) = inputs.row(c).dot(whitened_t.col(c));
            if (!(energy(c) > 0) || !std::isfinite(energy(c)))
                fail(fn, ": the energy i*ᵀC⁻¹i* of concept ", c, " is ", energy(c),
                     " (not positive)");
        }
        Matrix<double> gram_inv = Matrix<double>::Zero(K, K);
        Matrix<double> projection(K, in);  // P: rows of (MᵀC⁻¹M)⁻¹MᵀC⁻¹ or the gate rows
        Matrix<double> gate_rows(K, in);   // A: rows C⁻¹i*_c / energy_c
        for (Index c = 0; c < K; ++c) gate_rows.row(c) = whitened_t.col(c).transpose() / energy(c);
        if (ortho == Orthogonalization::exact) {
            Eigen::MatrixXd gram = inputs * whitened_t;  // MᵀC⁻¹M, K × K
            gram = (0.5 * (gram + gram.transpose())).eval();
            const auto f = checked_cholesky(
                fn, "the Gram matrix MᵀC⁻¹M of the concepts' target inputs",
                gram, "the target inputs i* are (nearly) linearly dependent; use one concept per "
                      "direction or the approximate orthogonalisation");
            gram_inv = Eigen::MatrixXd(f.solve(Eigen::MatrixXd::Identity(K, K)));
            projection = Eigen::MatrixXd(f.solve(Eigen::MatrixXd(whitened_t.transpose())));
        } else {
            projection = gate_rows;
        }
        Matrix<double> u(out, 2 * K);
        for (Index c = 0; c < K; ++c) {
            u.col(c) = weight_times<T>(w, inputs.row(c).transpose());
            u.col(K + c) = outputs.row(c).transpose();
        }
        Matrix<double> v(2 * K, in);
        v.topRows(K) = projection;
        v.bottomRows(K) = gate_rows;

        // Everything computed: commit (a failure above leaves *this unchanged).
        inputs_ = inputs;
        outputs_ = outputs;
        whitened_ = whitened_t.transpose();
        energy_ = energy;
        gram_inv_ = gram_inv;
        ortho_ = ortho;
        U_ = u.template cast<T>();
        V_ = v.template cast<T>();
        set_gates(fn, gates);
    }

    void set_gates(const char* fn, const std::vector<Gate>& gates) {
        if (Index(gates.size()) != concepts())
            fail(fn, ": ", gates.size(), " gates given for ", concepts(), " concepts");
        for (std::size_t c = 0; c < gates.size(); ++c) check_gate(fn, gates[c], Index(c));
        gates_ = gates;
        beta_.resize(gates.size());
        tau_.resize(gates.size());
        for (std::size_t c = 0; c < gates.size(); ++c) {
            beta_[c] = T(gates[c].beta);
            tau_[c] = T(gates[c].tau);
        }
    }

    /// o*_c ← o (out entries); only the expand column changes.
    void set_output(Index c, const Vector<double>& o) {
        outputs_.row(c) = o.transpose();
        U_.col(concepts() + c) = o.template cast<T>();
    }

    [[nodiscard]] Index concepts() const noexcept { return inputs_.rows(); }
    [[nodiscard]] Index in_features() const noexcept { return V_.cols(); }
    [[nodiscard]] Index out_features() const noexcept { return U_.rows(); }
    [[nodiscard]] Orthogonalization orthogonalization() const noexcept { return ortho_; }
    [[nodiscard]] const Matrix<double>& inputs() const noexcept { return inputs_; }
    [[nodiscard]] const Matrix<double>& outputs() const noexcept { return outputs_; }
    [[nodiscard]] const Matrix<double>& whitened() const noexcept { return whitened_; }
    [[nodiscard]] const Vector<double>& energy() const noexcept { return energy_; }
    [[nodiscard]] const Matrix<double>& gram_inverse() const noexcept { return gram_inv_; }
    [[nodiscard]] const std::vector<Gate>& gates() const noexcept { return gates_; }
    [[nodiscard]] const std::vector<T>& betas() const noexcept { return beta_; }
    [[nodiscard]] const std::vector<T>& taus() const noexcept { return tau_; }
    [[nodiscard]] const Matrix<T>& shrink_matrix() const noexcept { return V_; }
    [[nodiscard]] const Matrix<T>& expand_matrix() const noexcept { return U_; }

    /// [p, s] ↦ [−p, σ((s − β)/τ)] (or [−p, s] with the linear ROME gate), per row.
    static void apply_gate(MatrixView<T> t, Index K, const T* beta, const T* tau,
                           bool linear) noexcept {
        for (Index i = 0; i < t.rows; ++i) {
            T* row = t.row(i);
            for (Index c = 0; c < K; ++c) row[c] = -row[c];
            if (!linear)
                for (Index c = 0; c < K; ++c)
                    row[K + c] = logistic((row[K + c] - beta[c]) / tau[c]);
        }
    }

    void validate(const char* fn, Index in, Index out) const {
        const Index K = concepts();
        if (K < 1) fail(fn, ": the key-locked edit is empty (default-constructed or moved from)");
        if (V_.rows() != 2 * K || U_.cols() != 2 * K || Index(beta_.size()) != K)
            fail(fn, ": the key-locked edit's factors are inconsistent");
        if (in_features() != in || out_features() != out)
            fail(fn, ": key-locked edit for a ", out_features(), " x ", in_features(),
                 " weight applied to a ", out, " x ", in, " weight");
    }

private:
    Matrix<double> inputs_, outputs_, whitened_, gram_inv_;
    Vector<double> energy_;
    Orthogonalization ortho_ = Orthogonalization::exact;
    std::vector<Gate> gates_;
    std::vector<T> beta_, tau_;
    Matrix<T> V_, U_;
};

/// A gated edit as the core sees it: the shared state plus the gates to use for this call.
template <Real T>
struct GatedRef {
    const GatedEdits<T>* edits;
    const T* beta;
    const T* tau;
    bool linear;
};

}  // namespace detail

/// A gated edit with β, τ (or the linear ROME gate) chosen for this call: a light term (held by
/// value in expressions) referring to its edit, which must outlive it. Nothing is recomputed.
template <Real T>
class KeyLockedEditView {
public:
    using scalar = T;
    static constexpr bool stored_by_value = true;

    KeyLockedEditView(const detail::GatedEdits<T>& edits, std::vector<T> beta, std::vector<T> tau,
                      bool linear)
        : edits_(&edits), beta_(std::move(beta)), tau_(std::move(tau)), linear_(linear) {}

    [[nodiscard]] detail::GatedRef<T> gated() const noexcept {
        return {edits_, beta_.data(), tau_.data(), linear_};
    }

    [[nodiscard]] Index in_features() const noexcept { return edits_->in_features(); }
    [[nodiscard]] Index out_features() const noexcept { return edits_->out_features(); }
    [[nodiscard]] Index width() const noexcept { return 2 * edits_->concepts(); }
    [[nodiscard]] MatrixView<const T> shrink_factor() const noexcept {
        return view(edits_->shrink_matrix());
    }
    [[nodiscard]] MatrixView<const T> expand_factor() const noexcept {
        return view(edits_->expand_matrix());
    }
    void transform(MatrixView<T> t, Index /*row0*/) const noexcept {
        detail::GatedEdits<T>::apply_gate(t, edits_->concepts(), beta_.data(), tau_.data(), linear_);
    }
    void validate(const char* fn, Index /*n*/, Index in, Index out) const {
        edits_->validate(fn, in, out);
        if (Index(beta_.size()) != edits_->concepts())
            detail::fail(fn, ": gate view for ", beta_.size(), " concepts used with an edit of ",
                         edits_->concepts(), " concepts");
    }

private:
    const detail::GatedEdits<T>* edits_;
    std::vector<T> beta_, tau_;
    bool linear_;
};

/// Perfusion's gated rank-one edit for one concept (Tewel et al. 2023, eqs. 5–8):
///
///     h(e) = W e⊥ + σ((s(e) − β)/τ) o*,   s(e) = eᵀC⁻¹i* / (i*ᵀC⁻¹i*),   e⊥ = e − s(e) i*
///
/// A term of width 2 (`linear(E, W + edit)`, mixable with LoRA terms). Build it with `key`
/// (o* = W_K i_super, locked) or `value` (o* trainable, initialised to W_V i_super); i* starts at
/// i_super and follows `update_target_input` (EMA). The edit keeps no reference to W or C: calls
/// that change i* take them again (and must be given the same ones).
template <Real T>
class KeyLockedEdit {
public:
    using scalar = T;

    /// Key path (locked): i* = i_super, o* = W_K i_super, fixed. W_K: out × in; i_super: in
    /// entries. Cost: one solve with C's cached factor and W_K i_super.
    template <class DW, class DI>
        requires std::same_as<typename DW::Scalar, T>
    [[nodiscard]] static KeyLockedEdit key(const Eigen::MatrixBase<DW>& W_K,
                                           const SecondMoment<T>& C,
                                           const Eigen::MatrixBase<DI>& i_super,
                                           Gate gate = perfusion_inference_gate) {
        return make("lowrank::KeyLockedEdit::key", W_K, C, i_super, nullptr, gate, true);
    }

    /// Value path: i* = i_super, o* = W_V i_super initially, trainable (`set_target_output`).
    template <class DW, class DI>
        requires std::same_as<typename DW::Scalar, T>
    [[nodiscard]] static KeyLockedEdit value(const Eigen::MatrixBase<DW>& W_V,
                                             const SecondMoment<T>& C,
                                             const Eigen::MatrixBase<DI>& i_super,
                                             Gate gate = perfusion_inference_gate) {
        return make("lowrank::KeyLockedEdit::value", W_V, C, i_super, nullptr, gate, false);
    }

    /// Explicit targets i* (in entries) and o* (out entries); `locked` forbids changing o*.
    template <class DW, class DI, class DO>
        requires std::same_as<typename DW::Scalar, T>
    [[nodiscard]] static KeyLockedEdit from_targets(const Eigen::MatrixBase<DW>& W,
                                                    const SecondMoment<T>& C,
                                                    const Eigen::MatrixBase<DI>& i_star,
                                                    const Eigen::MatrixBase<DO>& o_star,
                                                    Gate gate = perfusion_inference_gate,
                                                    bool locked = false) {
        const char* fn = "lowrank::KeyLockedEdit::from_targets";
        const auto w = detail::input_view(fn, "W", W, -1, -1);
        const Vector<double> o = detail::vector_arg(fn, "o_star", o_star, w.rows);
        return make(fn, W, C, i_star, &o, gate, locked);
    }

    [[nodiscard]] bool is_key_locked() const noexcept { return locked_; }
    [[nodiscard]] Index in_features() const noexcept { return edits_.in_features(); }
    [[nodiscard]] Index out_features() const noexcept { return edits_.out_features(); }
    /// i* (in entries), double master copy.
    [[nodiscard]] Vector<double> target_input() const { return edits_.inputs().row(0).transpose(); }
    /// o* (out entries), double master copy.
    [[nodiscard]] Vector<double> target_output() const { return edits_.outputs().row(0).transpose(); }
    /// i*ᵀC⁻¹i*.
    [[nodiscard]] double energy() const { return edits_.energy()(0); }
    [[nodiscard]] Gate gate() const { return edits_.gates()[0]; }

    /// Changes β and τ (finite β, τ > 0) for all later calls; recomputes nothing.
    void set_gate(Gate gate) { edits_.set_gates("lowrank::KeyLockedEdit::set_gate", {gate}); }

    /// The same edit with β, τ for one call (a light term): `linear(E, W + edit.with_gate(.6, .15))`.
    [[nodiscard]] KeyLockedEditView<T> with_gate(double beta, double tau) const {
        detail::check_gate("lowrank::KeyLockedEdit::with_gate", {beta, tau}, 0);
        return {edits_, {T(beta)}, {T(tau)}, false};
    }
    /// The edit with the gate replaced by s(e): exactly ROME's W' = W + (o* − W i*)(C⁻¹i*)ᵀ/energy.
    [[nodiscard]] KeyLockedEditView<T> rome_limit() const {
        return {edits_, edits_.betas(), edits_.taus(), true};
    }

    /// o* ← o (out entries): the value path's training step. Cost O(out).
    /// Throws for a key-locked edit (its o* = W_K i_super is fixed) or a wrong size.
    template <class DO>
    void set_target_output(const Eigen::MatrixBase<DO>& o) {
        const char* fn = "lowrank::KeyLockedEdit::set_target_output";
        if (locked_)
            detail::fail(fn, ": this is a key-locked edit; its target output o* = W_K i_super is "
                             "fixed (use KeyLockedEdit::value for a trainable o*)");
        edits_.set_output(0, detail::vector_arg(fn, "o", o, out_features()));
    }

    /// i* ← i (in entries), recomputing C⁻¹i* and W i* (one solve, one product with W).
    /// W and C must be the ones the edit was built with. Strong guarantee on error.
    template <class DI, class DW>
        requires std::same_as<typename DW::Scalar, T>
    void set_target_input(const Eigen::MatrixBase<DI>& i, const Eigen::MatrixBase<DW>& W,
                          const SecondMoment<T>& C) {
        const char* fn = "lowrank::KeyLockedEdit::set_target_input";
        rebuild(fn, W, C, detail::vector_arg(fn, "i", i, in_features()));
    }

    /// Perfusion's EMA of the target input: i* ← decay · i* + (1 − decay) · e, e the current
    /// encoding of the concept token (in entries); decay ∈ [0, 1], 0.99 in the paper. Recomputes
    /// C⁻¹i* and W i* (W and C: the ones the edit was built with).
    template <class DE, class DW>
        requires std::same_as<typename DW::Scalar, T>
    void update_target_input(const Eigen::MatrixBase<DE>& e, const Eigen::MatrixBase<DW>& W,
                             const SecondMoment<T>& C, double decay = 0.99) {
        const char* fn = "lowrank::KeyLockedEdit::update_target_input";
        if (!(decay >= 0 && decay <= 1)) detail::fail(fn, ": decay must be in [0, 1], got ", decay);
        const Vector<double> ed = detail::vector_arg(fn, "e", e, in_features());
        rebuild(fn, W, C, (decay * target_input() + (1 - decay) * ed).eval());
    }

    [[nodiscard]] detail::GatedRef<T> gated() const noexcept {
        return {&edits_, edits_.betas().data(), edits_.taus().data(), false};
    }
    /// The concept state (for `KeyLockedEditSet`).
    [[nodiscard]] const detail::GatedEdits<T>& edits() const noexcept { return edits_; }

    // --- the core's term protocol (LowRankTerm) -------------------------------------------------
    [[nodiscard]] Index width() const noexcept { return 2; }
    [[nodiscard]] MatrixView<const T> shrink_factor() const noexcept {
        return view(edits_.shrink_matrix());
    }
    [[nodiscard]] MatrixView<const T> expand_factor() const noexcept {
        return view(edits_.expand_matrix());
    }
    void transform(MatrixView<T> t, Index /*row0*/) const noexcept {
        detail::GatedEdits<T>::apply_gate(t, 1, edits_.betas().data(), edits_.taus().data(), false);
    }
    void validate(const char* fn, Index /*n*/, Index in, Index out) const {
        edits_.validate(fn, in, out);
    }

private:
    template <class DW, class DI>
    [[nodiscard]] static KeyLockedEdit make(const char* fn, const Eigen::MatrixBase<DW>& W,
                                            const SecondMoment<T>& C,
                                            const Eigen::MatrixBase<DI>& i_super,
                                            const Vector<double>* o_star, Gate gate, bool locked) {
        const auto w = detail::input_view(fn, "W", W, -1, C.in_features());
        const Vector<double> i = detail::vector_arg(fn, "i_super", i_super, w.cols);
        if (i.isZero(0)) detail::fail(fn, ": the target input i* (i_super) is zero");
        KeyLockedEdit edit;
        edit.locked_ = locked;
        const Vector<double> o = o_star ? *o_star : detail::weight_times<T>(w, i);
        edit.edits_.build(fn, w, C, i.transpose(), o.transpose(), {gate},
                          Orthogonalization::exact);
        return edit;
    }

    template <class DW>
    void rebuild(const char* fn, const Eigen::MatrixBase<DW>& W, const SecondMoment<T>& C,
                 const Vector<double>& i) {
        const auto w = detail::input_view(fn, "W", W, out_features(), in_features());
        edits_.build(fn, w, C, i.transpose(), edits_.outputs(), edits_.gates(),
                     Orthogonalization::exact);
    }

    detail::GatedEdits<T> edits_;
    bool locked_ = false;
};

/// Several concepts sharing one C, applied jointly (Perfusion §4.3): one term of width 2K with
/// per-concept gates. The exact orthogonalisation (default) removes span{i*_c} C⁻¹-orthogonally;
/// the approximate one subtracts Σ_c s_c(e) i*_c. The set copies each concept's i*, o*, gate and
/// lock at construction (later changes to the single edits are not seen).
template <Real T>
class KeyLockedEditSet {
public:
    using scalar = T;

    /// Joins `concepts` (built for this W and C). Cost: K solves with C's factor, K products with
    /// W, a K × K Cholesky. Throws if the concepts' shapes differ from W's, or (exact mode) their
    /// target inputs are linearly dependent.
    template <class DW>
        requires std::same_as<typename DW::Scalar, T>
    KeyLockedEditSet(const Eigen::MatrixBase<DW>& W, const SecondMoment<T>& C,
                     std::span<const KeyLockedEdit<T>* const> concepts,
                     Orthogonalization ortho = Orthogonalization::exact) {
        init(W, C, concepts, ortho);
    }
    template <class DW>
        requires std::same_as<typename DW::Scalar, T>
    KeyLockedEditSet(const Eigen::MatrixBase<DW>& W, const SecondMoment<T>& C,
                     std::initializer_list<std::reference_wrapper<const KeyLockedEdit<T>>> concepts,
                     Orthogonalization ortho = Orthogonalization::exact) {
        std::vector<const KeyLockedEdit<T>*> ptrs;
        for (const auto& c : concepts) ptrs.push_back(&c.get());
        init(W, C, std::span<const KeyLockedEdit<T>* const>(ptrs), ortho);
    }

    [[nodiscard]] Index concepts() const noexcept { return edits_.concepts(); }
    [[nodiscard]] Index in_features() const noexcept { return edits_.in_features(); }
    [[nodiscard]] Index out_features() const noexcept { return edits_.out_features(); }
    [[nodiscard]] Orthogonalization orthogonalization() const noexcept {
        return edits_.orthogonalization();
    }
    [[nodiscard]] Vector<double> target_input(Index c) const {
        check_index("lowrank::KeyLockedEditSet::target_input", c);
        return edits_.inputs().row(c).transpose();
    }
    [[nodiscard]] Vector<double> target_output(Index c) const {
        check_index("lowrank::KeyLockedEditSet::target_output", c);
        return edits_.outputs().row(c).transpose();
    }
    [[nodiscard]] Gate gate(Index c) const {
        check_index("lowrank::KeyLockedEditSet::gate", c);
        return edits_.gates()[std::size_t(c)];
    }

    /// Changes concept c's β and τ for later calls; recomputes nothing.
    void set_gate(Index c, Gate gate) {
        const char* fn = "lowrank::KeyLockedEditSet::set_gate";
        check_index(fn, c);
        auto gates = edits_.gates();
        gates[std::size_t(c)] = gate;
        edits_.set_gates(fn, gates);
    }
    /// The set with per-concept gates for one call (a light term; `gates.size()` = K).
    [[nodiscard]] KeyLockedEditView<T> with_gates(std::span<const Gate> gates) const {
        const char* fn = "lowrank::KeyLockedEditSet::with_gates";
        if (Index(gates.size()) != concepts())
            detail::fail(fn, ": ", gates.size(), " gates given for ", concepts(), " concepts");
        std::vector<T> beta, tau;
        for (std::size_t c = 0; c < gates.size(); ++c) {
            detail::check_gate(fn, gates[c], Index(c));
            beta.push_back(T(gates[c].beta));
            tau.push_back(T(gates[c].tau));
        }
        return {edits_, std::move(beta), std::move(tau), false};
    }
    [[nodiscard]] KeyLockedEditView<T> with_gates(std::initializer_list<Gate> gates) const {
        return with_gates(std::span<const Gate>(gates.begin(), gates.size()));
    }
    /// Every gate replaced by s_c(e) (the multi-concept analogue of ROME).
    [[nodiscard]] KeyLockedEditView<T> rome_limit() const {
        return {edits_, edits_.betas(), edits_.taus(), true};
    }

    /// o*_c ← o (out entries). Throws for a key-locked concept.
    template <class DO>
    void set_target_output(Index c, const Eigen::MatrixBase<DO>& o) {
        const char* fn = "lowrank::KeyLockedEditSet::set_target_output";
        check_index(fn, c);
        if (locked_[std::size_t(c)])
            detail::fail(fn, ": concept ", c, " is key-locked; its target output is fixed");
        edits_.set_output(c, detail::vector_arg(fn, "o", o, out_features()));
    }

    [[nodiscard]] detail::GatedRef<T> gated() const noexcept {
        return {&edits_, edits_.betas().data(), edits_.taus().data(), false};
    }

    // --- the core's term protocol (LowRankTerm) -------------------------------------------------
    [[nodiscard]] Index width() const noexcept { return 2 * concepts(); }
    [[nodiscard]] MatrixView<const T> shrink_factor() const noexcept {
        return view(edits_.shrink_matrix());
    }
    [[nodiscard]] MatrixView<const T> expand_factor() const noexcept {
        return view(edits_.expand_matrix());
    }
    void transform(MatrixView<T> t, Index /*row0*/) const noexcept {
        detail::GatedEdits<T>::apply_gate(t, concepts(), edits_.betas().data(),
                                          edits_.taus().data(), false);
    }
    void validate(const char* fn, Index /*n*/, Index in, Index out) const {
        edits_.validate(fn, in, out);
    }

private:
    void check_index(const char* fn, Index c) const {
        if (c < 0 || c >= concepts())
            detail::fail(fn, ": concept index ", c, " out of range [0, ", concepts(), ")");
    }

    template <class DW>
    void init(const Eigen::MatrixBase<DW>& W, const SecondMoment<T>& C,
              std::span<const KeyLockedEdit<T>* const> concepts, Orthogonalization ortho) {
        const char* fn = "lowrank::KeyLockedEditSet";
        const auto w = detail::input_view(fn, "W", W, -1, C.in_features());
        const Index K = Index(concepts.size());
        if (K < 1) detail::fail(fn, ": at least one concept is needed");
        Matrix<double> inputs(K, w.cols), outputs(K, w.rows);
        std::vector<Gate> gates;
        for (Index c = 0; c < K; ++c) {
            const KeyLockedEdit<T>* e = concepts[std::size_t(c)];
            if (!e) detail::fail(fn, ": concept ", c, " is a null pointer");
            if (e->in_features() != w.cols || e->out_features() != w.rows)
                detail::fail(fn, ": concept ", c, " edits a ", e->out_features(), " x ",
                             e->in_features(), " weight but W is ", detail::shape_of(W));
            inputs.row(c) = e->target_input().transpose();
            outputs.row(c) = e->target_output().transpose();
            gates.push_back(e->gate());
            locked_.push_back(e->is_key_locked());
        }
        edits_.build(fn, w, C, inputs, outputs, std::move(gates), ortho);
    }

    detail::GatedEdits<T> edits_;
    std::vector<bool> locked_;
};

namespace detail {

template <class E>
concept GatedEdit = requires(const E& e) {
    { e.gated() };
};

/// ∂L/∂o*, ∂L/∂E and optionally ∂L/∂β, ∂L/∂τ, ∂L/∂i* of L = Σ dY ⊙ H, on validated views.
template <Real T>
void gated_backward(GatedRef<T> ref, MatrixView<const T> x, MatrixView<const T> w,
                    MatrixView<const T> dy, KeyLockedGrad<T>& grad, MatrixView<T>* dx,
                    const KeyLockedBackwardOptions<T>& opts) {
    const GatedEdits<T>& ed = *ref.edits;
    const Index n = x.rows, K = ed.concepts(), in = x.cols, out = w.rows;
    const MatrixView<const T> V = view(ed.shrink_matrix()), U = view(ed.expand_matrix());

    Matrix<T> raw(n, 2 * K), gated(n, 2 * K), back(n, 2 * K), dt(n, 2 * K);
    core::shrink<T>(x, V, view_mut(raw));  // [p, s]
    gated = raw;
    GatedEdits<T>::apply_gate(view_mut(gated), K, ref.beta, ref.tau, ref.linear);  // [−p, σ]
    core::project_back<T>(dy, U, view_mut(back));  // [q, r] = dY [W M, O]
    // Gradient reaching the shrink outputs: ∂/∂p = −q; ∂/∂s = r σ'/τ (r for the linear gate).
    for (Index t = 0; t < n; ++t)
        for (Index c = 0; c < K; ++c) {
            dt(t, c) = -back(t, c);
            const T sig = gated(t, K + c);
            dt(t, K + c) = ref.linear ? back(t, K + c)
                                      : back(t, K + c) * sig * (T(1) - sig) / ref.tau[c];
        }

    // ∂L/∂o*_c = Σ_t σ_tc dY_t.
    Matrix<T> d_out(out, K);
    if (n > 0)
        core::grad_expand<T>(dy, view(gated).block(0, K, n, K), view_mut(d_out), T(1), false);
    else
        d_out.setZero();
    grad.target_output = d_out.transpose();

    // ∂L/∂E = dY W + [∂p, ∂s] [P ; A].
    if (dx) {
        core::base_input_grad<T>(dy, w, *dx, false);
        if (n > 0) core::input_grad<T>(view(dt), V, *dx, T(1), true);
    }

    if (opts.gate) {
        grad.beta.resize(K);
        grad.tau.resize(K);
        for (Index c = 0; c < K; ++c) {
            double db = 0, dtau = 0;
            if (!ref.linear)
                for (Index t = 0; t < n; ++t) {
                    db -= double(dt(t, K + c));
                    dtau -= double(dt(t, K + c)) * (double(raw(t, K + c)) - double(ref.beta[c]));
                }
            grad.beta(c) = T(db);
            grad.tau(c) = T(dtau / double(ref.tau[c]));
        }
    } else {
        grad.beta.resize(0);
        grad.tau.resize(0);
    }

    if (opts.target_input) {
        const SecondMoment<T>& C = *opts.statistics;
        // dV = [∂p, ∂s]ᵀ E (2K × in): ∂L/∂P (rows 0..K) and ∂L/∂A (rows K..2K).
        Matrix<T> dv = Matrix<T>::Zero(2 * K, in);
        // ∂L/∂(W i*_c) = −Σ_t p_tc dY_t (out × K).
        Matrix<T> dwi = Matrix<T>::Zero(out, K);
        if (n > 0) {
            core::grad_shrink<T>(view(dt), x, view_mut(dv), T(1), false);
            core::grad_expand<T>(dy, view(gated).block(0, 0, n, K), view_mut(dwi), T(1), false);
        }
        const Matrix<double> dvd = dv.template cast<double>();
        Matrix<double> d_gate_rows = dvd.bottomRows(K);  // ∂L/∂a_c
        if (ed.orthogonalization() == Orthogonalization::approximate)
            d_gate_rows += dvd.topRows(K);  // P = A
        // a_c = C⁻¹i_c / (i_cᵀC⁻¹i_c):  ∂L/∂i_c = C⁻¹g/E − 2 (C⁻¹i_c)(C⁻¹i_c · g)/E².
        const Matrix<double> solved = C.solve(d_gate_rows.transpose());  // in × K
        Matrix<double> di(K, in);
        for (Index c = 0; c < K; ++c) {
            const double e = ed.energy()(c);
            const auto wc = ed.whitened().row(c);
            di.row(c) = solved.col(c).transpose() / e -
                        (2.0 * wc.dot(d_gate_rows.row(c)) / (e * e)) * wc;
        }
        if (ed.orthogonalization() == Orthogonalization::exact) {
            // P = G⁻¹ Nᵀ with N = C⁻¹M, G = MᵀC⁻¹M; with F = C⁻¹ (∂L/∂P)ᵀ and H = G⁻¹ MᵀF G⁻¹:
            //     ∂L/∂M = F G⁻¹ − N (H + Hᵀ).
            const Matrix<double> F = C.solve(dvd.topRows(K).transpose());  // in × K
            const Matrix<double>& Gi = ed.gram_inverse();
            const Matrix<double> H = Gi * (ed.inputs() * F) * Gi;
            const Matrix<double> dM = F * Gi - ed.whitened().transpose() * (H + H.transpose());
            di += dM.transpose();
        }
        // Through W i*_c: Wᵀ ∂L/∂(W i*_c), one pass over W.
        const Matrix<double> dwid = dwi.template cast<double>();
        for (Index r = 0; r < out; ++r) {
            const T* row = w.row(r);
            for (Index c = 0; c < K; ++c) {
                const double g = dwid(r, c);
                if (g == 0) continue;
                for (Index j = 0; j < in; ++j) di(c, j) += g * double(row[j]);
            }
        }
        grad.target_input = di.template cast<T>();
    } else {
        grad.target_input.resize(0, 0);
    }
}

/// E, W and dY of `backward` as views, each checked against the edit, and the options against W
/// (both overloads; throws `lowrank::error` naming `fn`).
template <class DE, class DW, class Edit, class DdY>
[[nodiscard]] auto backward_inputs(const char* fn, const Eigen::MatrixBase<DE>& E,
                                   const Eigen::MatrixBase<DW>& W, const Edit& edit,
                                   const Eigen::MatrixBase<DdY>& dY,
                                   const KeyLockedBackwardOptions<typename Edit::scalar>& opts) {
    const auto x = input_view(fn, "E", E, -1, edit.in_features());
    const auto w = input_view(fn, "W", W, edit.out_features(), edit.in_features());
    const auto dy = input_view(fn, "dY", dY, x.rows, edit.out_features());
    edit.validate(fn, x.rows, w.cols, w.rows);
    if (opts.target_input && !opts.statistics)
        fail(fn, ": the gradient with respect to i* needs the statistics C "
                 "(KeyLockedBackwardOptions::statistics)");
    if (opts.target_input && opts.statistics->in_features() != w.cols)
        fail(fn, ": the statistics C are ", opts.statistics->in_features(), " x ",
             opts.statistics->in_features(), " but W is ", shape_of(W));
    return std::tuple{x, w, dy};
}

}  // namespace detail

/// H = E Wᵀ + the gated edit's contribution (a `KeyLockedEdit`, `KeyLockedEditSet` or a view with
/// other gates). E: n × in, W: out × in, H: n × out (a plain Matrix is resized). Same as
/// `linear(E, W + edit)`. Cost: 2·n·out·in + 4·n·K·(in + out) flops.
template <class DE, class DW, class Edit, Destination DH>
    requires detail::GatedEdit<Edit> && LowRankTerm<Edit>
void forward(const Eigen::MatrixBase<DE>& E, const Eigen::MatrixBase<DW>& W, const Edit& edit,
             DH&& H) {
    using T = typename Edit::scalar;
    const char* fn = "lowrank::forward";
    const auto x = detail::input_view(fn, "E", E, -1, edit.in_features());
    const auto w = detail::input_view(fn, "W", W, edit.out_features(), edit.in_features());
    edit.validate(fn, x.rows, w.cols, w.rows);
    auto h = detail::output_view(fn, "H", std::forward<DH>(H), x.rows, w.rows, true);
    detail::check_no_overlap(fn, "H", h, "E", x);
    detail::check_no_overlap(fn, "H", h, "W", w);
    core::base_product<T>(x, w, h);
    Matrix<T> scratch(x.rows, edit.width());
    core::apply_terms<T>(x, h, view_mut(scratch), edit);
}

/// Backward of `forward(E, W, edit, H)` for the upstream gradient dY (n × out), L = Σ dY ⊙ H:
///
///     grad.target_output (K × out) = ∂L/∂o*_c = Σ_t σ_tc dY_t
///     dE (n × in) = dY W + ∂L/∂p · P + ∂L/∂s · A   (through the orthogonalisation and the gate)
///     grad.beta, grad.tau (K) if `opts.gate`
///     grad.target_input (K × in) if `opts.target_input` (needs `opts.statistics` = C)
///
/// W and C are constants. The gate used is the edit's (or the view's). For a key-locked edit
/// ∂L/∂o* is computed but o* cannot be changed. Cost: 2·n·out·in + O(n·K·(in + out)) flops, plus
/// K solves with C's factor and one pass over W for ∂L/∂i*.
template <class DE, class DW, class Edit, class DdY, Destination DdE>
    requires detail::GatedEdit<Edit> && LowRankTerm<Edit>
void backward(const Eigen::MatrixBase<DE>& E, const Eigen::MatrixBase<DW>& W, const Edit& edit,
              const Eigen::MatrixBase<DdY>& dY, KeyLockedGrad<typename Edit::scalar>& grad,
              DdE&& dE, const KeyLockedBackwardOptions<typename Edit::scalar>& opts = {}) {
    const char* fn = "lowrank::backward";
    const auto [x, w, dy] = detail::backward_inputs(fn, E, W, edit, dY, opts);
    auto dx = detail::output_view(fn, "dE", std::forward<DdE>(dE), x.rows, w.cols, true);
    detail::check_no_overlap(fn, "dE", dx, "E", x);
    detail::check_no_overlap(fn, "dE", dx, "dY", dy);
    detail::check_no_overlap(fn, "dE", dx, "W", w);
    detail::gated_backward<typename Edit::scalar>(edit.gated(), x, w, dy, grad, &dx, opts);
}

/// Backward without ∂L/∂E.
template <class DE, class DW, class Edit, class DdY>
    requires detail::GatedEdit<Edit> && LowRankTerm<Edit>
void backward(const Eigen::MatrixBase<DE>& E, const Eigen::MatrixBase<DW>& W, const Edit& edit,
              const Eigen::MatrixBase<DdY>& dY, KeyLockedGrad<typename Edit::scalar>& grad,
              const KeyLockedBackwardOptions<typename Edit::scalar>& opts = {}) {
    const char* fn = "lowrank::backward";
    const auto [x, w, dy] = detail::backward_inputs(fn, E, W, edit, dY, opts);
    detail::gated_backward<typename Edit::scalar>(edit.gated(), x, w, dy, grad, nullptr, opts);
}

}  // namespace lowrank
