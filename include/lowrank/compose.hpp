// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Token-masked adapter composition (TARA) and mixed-adapter batches (Punica's BGMV / SGMV).
///
/// **Masked composition** (TARA: Token-Aware LoRA for Composable Personalization in Diffusion
/// Models, 2025). Adapters k = 1…K (A_k: r_k × in, B_k: out × r_k, scale s_k; ranks may differ)
/// act on the token rows of X (n × in), each only where its mask M (K × n, binary or soft) says:
///
///     Y[t] = X[t] Wᵀ + Σ_k M[k,t] · s_k · (X[t] A_kᵀ) B_kᵀ
///
/// - `lora.masked(m)` / `masked(term, m)`: a term whose output row t is multiplied by m[t]; it
///   composes with unmasked adapters and other terms in expressions:
///   `linear(X, W + l1.masked(M.row(0)) + l2.masked(M.row(1)) + l3)`.
/// - `token_masks(ids, {rare_1, rare_2, …})`: M from a prompt's token ids (every occurrence of
///   each adapter's rare-token id sequence, all its sub-tokens; an absent sequence is a zero row).
/// - `masked_forward`, `masked_delta`, `masked_backward`: the same sum for a list of LoRA adapters
///   and a K × n mask matrix, running each adapter only on its nonzero-mask rows (gathered), with
///   gradients of every A_k, B_k and of X.
/// - `alignment_loss`: TARA's key-alignment objective for one masked K projection.
///
/// Each adapter keeps its own scale s_k (TARA's public inference code drops alpha / r at
/// composition, so composed adapters come out weaker than trained; not so here).
///
/// **Mixed batches**: row t uses at most one adapter idx[t] (−1: none) — one-hot masks, the way
/// serving systems batch requests for different adapters:
///
///     Y[t] = X[t] Wᵀ + s_k (X[t] A_kᵀ) B_kᵀ,   k = idx[t]
///
/// `mixed` (per-row index, BGMV) and `mixed_segments` (rows grouped in segments, SGMV) run each
/// adapter once on its rows (core/gathered.hpp): each adapter's factors are streamed once per call
/// however its rows are scattered, rows with no adapter cost only the base product, and nothing is
/// allocated per row (pass a `MixedWorkspace` to allocate nothing at all in steady state).
/// `mixed_backward` / `mixed_segments_backward` train several adapters in one batch.
///
/// Adapter lists are any range of `const Lora<T>*`, `Lora<T>` or `std::reference_wrapper<Lora<T>>`
/// (a `std::vector`, `std::array`, `std::span`, …), or, for the forward functions, an
/// `AdapterBank<T>`: the adapters copied once into the layout the kernels read (for serving). Every argument is checked before anything is
/// written: on a `lowrank::error` the outputs are untouched.
///
/// Example:
/// \code
///   lowrank::Matrix<float> M = lowrank::token_masks(ids, {sks_ids, zwx_ids});   // 2 × n
///   lowrank::Matrix<float> K = lowrank::linear(E, W_k + dog.masked(M.row(0)) + cat.masked(M.row(1)));
///   std::vector<const lowrank::Lora<float>*> bank = {&a, &b, &c};
///   lowrank::mixed(X, W, bank, idx, Y);          // idx[t] ∈ {−1, 0, 1, 2}
/// \endcode

#include <algorithm>
#include <cmath>
#include <concepts>
#include <functional>
#include <ranges>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/args.hpp"
#include "core/gathered.hpp"
#include "core/terms.hpp"
#include "expr/expr.hpp"
#include "lora.hpp"

namespace lowrank {

namespace detail {

/// A strided vector of mask values (a view, never owning).
template <class T>
struct MaskRef {
    const T* data = nullptr;
    Index size = 0;
    Index stride = 1;
    [[nodiscard]] T operator[](Index t) const noexcept { return data[t * stride]; }
};

template <class T>
[[nodiscard]] MaskRef<T> mask_ref(std::span<const T> m) noexcept {
    return {m.data(), Index(m.size()), 1};
}

template <class T, class D>
[[nodiscard]] MaskRef<T> mask_ref(const char* fn, const Eigen::DenseBase<D>& m) {
    static_assert(RowMajorDense<D>,
                  "lowrank: a mask needs direct memory access (a vector, a row or column of a "
                  "matrix, a Map); evaluate the expression into a lowrank::Vector first");
    static_assert(std::same_as<typename D::Scalar, T>,
                  "lowrank: the mask must have the scalar type of the adapter");
    const D& d = m.derived();
    if (d.rows() != 1 && d.cols() != 1)
        fail(fn, ": the mask must be a vector (one weight per token), got ", shape_of(d));
    return {d.data(), Index(d.size()), d.size() > 1 ? Index(d.innerStride()) : Index(1)};
}

template <class T>
void check_mask(const char* fn, MaskRef<T> m, Index n) {
    if (m.size != n)
        fail(fn, ": the mask has length ", m.size, " but the input has ", n,
             " rows (one mask entry per token)");
    for (Index t = 0; t < n; ++t)
        if (!std::isfinite(double(m[t])))
            fail(fn, ": mask entry ", t, " must be finite, got ", double(m[t]));
}

}  // namespace detail

// =================================================================================================
// Masked terms
// =================================================================================================

/// A term whose output is multiplied per token by a mask: row t of φ(X Vᵀ) is scaled by m[t]
/// (TARA's token-aware adapter, binary or soft masks). Built by `lora.masked(m)` or
/// `masked(term, m)`; any `LowRankTerm` can be masked (LoRA, LoRA-XS cores, rank-one edits,
/// `0.5 * lora`, …).
///
/// A light value (`stored_by_value`): it holds the term as expressions do (light terms by value,
/// owning ones such as `Lora` by address) and the mask **by address** — the mask (a vector, a row
/// of a K × n mask matrix, a Map of a host buffer, a `std::span`) must outlive the expression, as
/// W does. A temporary owning mask (`lora.masked(Vector<float>::Ones(n).eval())`) does not compile.
/// Not mergeable into W (the mask depends on the token). Cost per evaluation: the term's own plus
/// n·w multiplications; `validate` checks that the mask has one finite entry per row of X.
template <LowRankTerm Term>
class MaskedTerm {
public:
    using scalar = typename Term::scalar;
    static constexpr bool stored_by_value = true;

    /// Mask from a span of n weights.
    MaskedTerm(const Term& term, std::span<const scalar> mask)
        : term_(detail::hold(term)), mask_(detail::mask_ref(mask)) {}
    /// Mask from an Eigen vector with direct access (a Vector, `M.row(k)`, `M.col(k)`, a Map).
    template <class D>
    MaskedTerm(const Term& term, const Eigen::DenseBase<D>& mask)
        : term_(detail::hold(term)), mask_(detail::mask_ref<scalar>("lowrank::masked", mask)) {}
    /// A temporary mask would dangle.
    template <class S, int R, int C, int O, int MR, int MC>
    MaskedTerm(const Term&, Eigen::Matrix<S, R, C, O, MR, MC>&&) = delete;
    MaskedTerm(const Term&, std::vector<scalar>&&) = delete;

    [[nodiscard]] const Term& term() const noexcept { return term_.get(); }
    /// The mask length n and its entries.
    [[nodiscard]] Index mask_size() const noexcept { return mask_.size; }
    [[nodiscard]] scalar mask(Index t) const noexcept { return mask_[t]; }

    // --- the core's term protocol ---------------------------------------------------------------
    [[nodiscard]] Index in_features() const { return term().in_features(); }
    [[nodiscard]] Index out_features() const { return term().out_features(); }
    [[nodiscard]] Index width() const { return term().width(); }
    [[nodiscard]] MatrixView<const scalar> shrink_factor() const { return term().shrink_factor(); }
    [[nodiscard]] MatrixView<const scalar> expand_factor() const { return term().expand_factor(); }
    /// φ_masked(t)[i] = m[row0 + i] · φ(t)[i].
    void transform(MatrixView<scalar> t, Index row0) const {
        term().transform(t, row0);
        for (Index i = 0; i < t.rows; ++i) {
            scalar* row = t.row(i);
            const scalar mi = mask_[row0 + i];
            for (Index j = 0; j < t.cols; ++j) row[j] *= mi;
        }
    }
    /// The term's own checks, then: the mask has exactly n finite entries.
    void validate(const char* fn, Index n, Index in, Index out) const {
        term().validate(fn, n, in, out);
        detail::check_mask(fn, mask_, n);
    }

private:
    detail::TermHolder<Term> term_;
    detail::MaskRef<scalar> mask_;
};

/// `term` with its output multiplied per token by `mask` (length n): see `MaskedTerm`.
/// Equivalent to `term.masked(mask)` for a `Lora`.
template <LowRankTerm Term, class M>
    requires std::constructible_from<MaskedTerm<Term>, const Term&, M>
[[nodiscard]] MaskedTerm<Term> masked(const Term& term, M&& mask) {
    return MaskedTerm<Term>(term, std::forward<M>(mask));
}
/// A temporary owning term would dangle (light terms are copied and are fine).
template <class Term, class M>
    requires(LowRankTerm<Term> && !LightTerm<Term> && !std::is_lvalue_reference_v<Term>)
MaskedTerm<Term> masked(Term&& term, M&& mask) = delete;

// =================================================================================================
// Masks from token ids
// =================================================================================================

namespace detail {
template <class A, class B>
[[nodiscard]] constexpr bool same_id(A a, B b) noexcept {
    if constexpr (std::integral<A> && std::integral<B>)
        return std::cmp_equal(a, b);
    else
        return a == b;
}
}  // namespace detail

/// The positions of every occurrence of `sequence` in `token_ids` — all of its sub-token positions,
/// increasing, each once (overlapping occurrences are merged). An absent sequence gives an empty
/// list. Throws `lowrank::error` for an empty sequence. Cost: O(n · |sequence|).
template <std::ranges::random_access_range Ids, std::ranges::random_access_range Seq>
[[nodiscard]] std::vector<Index> token_positions(const Ids& token_ids, const Seq& sequence) {
    const Index n = Index(std::ranges::size(token_ids)), len = Index(std::ranges::size(sequence));
    if (len == 0) detail::fail("lowrank::token_positions: the token sequence is empty");
    const auto ids = std::ranges::begin(token_ids);
    const auto seq = std::ranges::begin(sequence);
    std::vector<Index> positions;
    Index covered = 0;  // positions below this are already listed
    for (Index s = 0; s + len <= n; ++s) {
        bool match = true;
        for (Index j = 0; j < len && match; ++j) match = detail::same_id(ids[s + j], seq[j]);
        if (!match) continue;
        for (Index p = std::max(s, covered); p < s + len; ++p) positions.push_back(p);
        covered = s + len;
    }
    return positions;
}

/// TARA's token masks: a K × n matrix with M[k, t] = 1 iff position t lies inside an occurrence of
/// the id sequence `rare_sequences[k]` (every occurrence, all of its sub-tokens; the class word
/// that follows is not included), else 0. A sequence that does not occur gives a zero row.
/// `rare_sequences` is any range of id ranges, or a braced list: `token_masks(ids, {{49408}, {4, 5}})`.
/// Throws `lowrank::error` naming the sequence if one is empty.
template <Real T = float, std::ranges::random_access_range Ids,
          class Seqs = std::vector<std::vector<std::ranges::range_value_t<Ids>>>>
[[nodiscard]] Matrix<T> token_masks(const Ids& token_ids, const Seqs& rare_sequences) {
    const Index n = Index(std::ranges::size(token_ids));
    const Index K = Index(std::ranges::size(rare_sequences));
    Matrix<T> masks = Matrix<T>::Zero(K, n);
    Index k = 0;
    for (const auto& seq : rare_sequences) {
        if (std::ranges::size(seq) == 0)
            detail::fail("lowrank::token_masks: rare sequence ", k, " is empty");
        for (const Index t : token_positions(token_ids, seq)) masks(k, t) = T(1);
        ++k;
    }
    return masks;
}

// =================================================================================================
// Adapter lists, workspaces, checks
// =================================================================================================

/// Reusable scratch for the mixed and masked functions: with the same workspace passed every
/// step, a training or serving loop allocates nothing in steady state.
template <Real T>
class MixedWorkspace {
public:
    core::GatherWorkspace<T> gather;
    std::vector<core::GatheredFactors<T>> factors;
    std::vector<MatrixView<T>> dv, du;
    core::GemmWorkspace<T> base;  ///< the base product's buffers
};

namespace detail {

/// One adapter of a list checked against the out × in weight it is applied to (`against` names
/// that weight in the message): shapes, factors not resized, a finite scale.
template <Real T>
void check_adapter(const char* fn, const Lora<T>& a, Index k, Index in, Index out, const char* against) {
    if (a.in_features() != in || a.out_features() != out)
        fail(fn, ": adapter ", k, " is for a ", a.out_features(), " x ", a.in_features(), " weight (B ",
             shape_of(a.B()), ", A ", shape_of(a.A()), "), but ", against, " is ", out, " x ", in);
    a.validate(fn, 0, in, out);
    check_finite(fn, "adapter scale", a.scale());
}

}  // namespace detail

template <Real T>
class AdapterBank;

namespace detail {
/// What AdapterBank's range constructor takes: anything but a bank (which is copied). A named
/// concept rather than a requires-clause naming the class: clang 14 does not match an
/// out-of-line definition whose requires-clause names the class being defined.
template <class Adapters, class T>
concept not_adapter_bank = !std::same_as<std::remove_cvref_t<Adapters>, AdapterBank<T>>;
}  // namespace detail

/// Adapters laid out once for serving mixed batches: each adapter's Aᵀ (in × r, rows padded to
/// 64 bytes: the shrink kernel reads it as one sequential stream and broadcasts X against it),
/// its Bᵀ in cache-line strips (r × out, `core::pack_strips`: the expand kernel reads it as one
/// sequential stream too) and its scale, copied from the `Lora`s. `mixed`, `mixed_delta`,
/// `mixed_segments` and the masked functions take a bank wherever they take a list of adapters,
/// and then skip the per-call transposes of B (the bank is the analogue of a pre-packed weight:
/// pack at load, reuse every call). A snapshot: training the `Lora`s later does not change it
/// (call `update`); the backward functions take the `Lora`s themselves. Memory: r·out₆₄ + in·r₆₄
/// values per adapter (out₆₄, r₆₄: out and r rounded up to 64 bytes).
///
/// \code
///   lowrank::AdapterBank<float> bank(adapters);     // once, at load
///   lowrank::mixed(X, W, bank, idx, Y, ws);          // every batch
/// \endcode
template <Real T>
class AdapterBank {
public:
    AdapterBank() = default;
    /// From a range of `Lora<T>` (objects, pointers or reference_wrappers), all for one out × in
    /// weight; an empty range gives an empty bank (every row must then use no adapter).
    template <detail::not_adapter_bank<T> Adapters>
    explicit AdapterBank(const Adapters& adapters);

    [[nodiscard]] Index size() const noexcept { return Index(entries_.size()); }
    [[nodiscard]] Index in_features() const noexcept { return in_; }
    [[nodiscard]] Index out_features() const noexcept { return out_; }
    [[nodiscard]] Index rank(Index k) const { return entry(k).rank; }
    [[nodiscard]] T scale(Index k) const { return entry(k).scale; }
    /// Replaces adapter k by a new copy of `lora` (same weight shape; the rank may change).
    void update(Index k, const Lora<T>& lora) {
        (void)entry(k);  // range check
        detail::check_adapter("lowrank::AdapterBank::update", lora, k, in_, out_, "the bank's weight");
        entries_[std::size_t(k)] = prepare(lora);
    }
    /// The kernels' view of adapter k (valid until the bank is changed or destroyed).
    [[nodiscard]] core::GatheredFactors<T> factors(Index k) const {
        const Entry& e = entry(k);
        const Index r = e.rank;
        return {MatrixView<const T>{nullptr, r, in_, 0}, MatrixView<const T>{nullptr, out_, r, 0}, e.scale,
                MatrixView<const T>{e.bt.data(), e.bt.rows(), e.bt.cols(), e.bt.cols()},
                MatrixView<const T>{e.at.data(), in_, r, e.at.cols()}};
    }

private:
    struct Entry {
        Matrix<T> at;  // in × (r rounded up to 64 bytes): Aᵀ in the first r columns, zeros after
        Matrix<T> bt;  // Bᵀ in strips: core::strip_rows<T>(r, out) × core::strip_width<T>
        Index rank = 0;
        T scale = T(1);
    };

    [[nodiscard]] const Entry& entry(Index k) const {
        if (k < 0 || k >= size())
            detail::fail("lowrank::AdapterBank: adapter ", k, " is out of range for a bank of ", size());
        return entries_[std::size_t(k)];
    }
    [[nodiscard]] Entry prepare(const Lora<T>& a) const {
        constexpr Index line = 64 / Index(sizeof(T));
        Entry e{Matrix<T>::Zero(in_, (a.rank() + line - 1) / line * line),
                Matrix<T>(core::strip_rows<T>(a.rank(), out_), core::strip_width<T>), a.rank(), a.scale()};
        e.at.leftCols(a.rank()) = a.A().transpose();
        core::pack_strips<T>(a.expand_factor(), view_mut(e.bt));
        return e;
    }

    Index in_ = 0, out_ = 0;
    std::vector<Entry> entries_;
};

namespace detail {

template <class T>
[[nodiscard]] const T* adapter_address(const T* a) noexcept { return a; }
template <class T>
[[nodiscard]] const T* adapter_address(T* a) noexcept { return a; }
template <class T>
[[nodiscard]] const T* adapter_address(const T& a) noexcept { return &a; }
template <class T>
[[nodiscard]] const T* adapter_address(std::reference_wrapper<T> a) noexcept { return &a.get(); }

template <class Adapters>
using adapter_type = std::remove_cvref_t<
    decltype(*adapter_address(*std::ranges::begin(std::declval<const Adapters&>())))>;

/// Checks every adapter against an out × in weight and fills `factors` (A, B, s per adapter).
template <Real T, class Adapters>
void collect_adapters(const char* fn, const Adapters& adapters, Index in, Index out,
                      std::vector<core::GatheredFactors<T>>& factors) {
    static_assert(std::same_as<adapter_type<Adapters>, Lora<T>>,
                  "lowrank: adapters must be a range of Lora<T> (objects, pointers or "
                  "reference_wrappers) with the scalar type of X");
    factors.clear();
    Index k = 0;
    for (const auto& item : adapters) {
        const Lora<T>* a = adapter_address(item);
        if (!a) fail(fn, ": adapter ", k, " is a null pointer");
        check_adapter(fn, *a, k, in, out, "W");
        factors.push_back({a->shrink_factor(), a->expand_factor(), a->scale()});
        ++k;
    }
}

/// The same for a bank: its shapes checked once, its layout used as is.
template <Real T>
void collect_adapters(const char* fn, const AdapterBank<T>& bank, Index in, Index out,
                      std::vector<core::GatheredFactors<T>>& factors) {
    if (bank.size() > 0 && (bank.in_features() != in || bank.out_features() != out))
        fail(fn, ": the adapter bank holds adapters for a ", bank.out_features(), " x ",
             bank.in_features(), " weight, but W is ", out, " x ", in);
    factors.clear();
    for (Index k = 0; k < bank.size(); ++k) factors.push_back(bank.factors(k));
}

template <class Idx>
concept IndexRange = std::ranges::contiguous_range<Idx> &&
                     std::signed_integral<std::ranges::range_value_t<Idx>>;

template <IndexRange Idx>
[[nodiscard]] auto index_span(const Idx& idx) {
    using I = std::ranges::range_value_t<Idx>;
    return std::span<const I>(std::ranges::data(idx), std::ranges::size(idx));
}

/// idx has n entries, each in [−1, K).
template <class I>
void check_row_adapters(const char* fn, std::span<const I> idx, Index n, Index K) {
    if (Index(idx.size()) != n)
        fail(fn, ": idx has ", idx.size(), " entries, expected one per row of X (", n, ")");
    for (std::size_t t = 0; t < idx.size(); ++t)
        if (idx[t] < -1 || idx[t] >= K)
            fail(fn, ": idx[", t, "] = ", static_cast<long long>(idx[t]), " is out of range [-1, ",
                 K, ") for ", K, " adapters");
}

/// S + 1 offsets 0 = seg[0] ≤ … ≤ seg[S] = n and S adapter indices in [−1, K).
template <class I>
void check_segments(const char* fn, std::span<const Index> seg, std::span<const I> adapter,
                    Index n, Index K) {
    if (seg.size() != adapter.size() + 1)
        fail(fn, ": segments has ", seg.size(), " offsets for ", adapter.size(),
             " segment adapters, expected ", adapter.size() + 1);
    if (seg.front() != 0 || seg.back() != n)
        fail(fn, ": segments must run from 0 to the ", n, " rows of X, got ", seg.front(), " .. ",
             seg.back());
    for (std::size_t s = 0; s + 1 < seg.size(); ++s)
        if (seg[s + 1] < seg[s])
            fail(fn, ": segment offsets must be nondecreasing, got segments[", s, "] = ", seg[s],
                 " > segments[", s + 1, "] = ", seg[s + 1]);
    for (std::size_t s = 0; s < adapter.size(); ++s)
        if (adapter[s] < -1 || adapter[s] >= K)
            fail(fn, ": segment_adapter[", s, "] = ", static_cast<long long>(adapter[s]),
                 " is out of range [-1, ", K, ") for ", K, " adapters");
}

/// Resizes the gradients to the adapters' shapes and returns views of them.
template <Real T, class Adapters>
void prepare_grads(const Adapters& adapters, std::vector<LoraGrad<T>>& grads,
                   MixedWorkspace<T>& ws) {
    static_assert(!std::same_as<Adapters, AdapterBank<T>>,
                  "lowrank: an AdapterBank is a read-only snapshot for serving; train the Lora "
                  "adapters themselves (pass the list of Lora<T>)");
    grads.resize(std::ranges::size(adapters));
    ws.dv.clear();
    ws.du.clear();
    std::size_t k = 0;
    for (const auto& item : adapters) {
        const Lora<T>& a = *adapter_address(item);
        grads[k].A.resize(a.rank(), a.in_features());
        grads[k].B.resize(a.out_features(), a.rank());
        ws.dv.push_back(view_mut(grads[k].A));
        ws.du.push_back(view_mut(grads[k].B));
        ++k;
    }
}

/// The rows where mask row k is nonzero, as a row set with per-row weights: the whole batch in
/// place when every entry is nonzero, else a gathered list (in ws).
template <class T>
[[nodiscard]] core::RowSet mask_rows(MatrixView<const T> masks, Index k, Index* rows, T* weights,
                                     const T** weights_out) {
    const T* m = masks.row(k);
    const Index n = masks.cols;
    Index count = 0;
    for (Index t = 0; t < n; ++t) count += m[t] != T(0);
    if (count == n) {
        *weights_out = m;
        return {nullptr, 0, n};
    }
    Index c = 0;
    for (Index t = 0; t < n; ++t)
        if (m[t] != T(0)) {
            rows[c] = t;
            weights[c] = m[t];
            ++c;
        }
    *weights_out = weights;
    return {rows, 0, count};
}

template <class T>
void check_mask_matrix(const char* fn, MatrixView<const T> masks, Index K, Index n) {
    if (masks.rows != K || masks.cols != n)
        fail(fn, ": masks is ", masks.rows, " x ", masks.cols, ", expected ", K, " x ", n,
             " (one row per adapter, one column per row of X)");
    for (Index k = 0; k < K; ++k)
        for (Index t = 0; t < n; ++t)
            if (!std::isfinite(double(masks(k, t))))
                fail(fn, ": masks(", k, ", ", t, ") must be finite, got ", double(masks(k, t)));
}

}  // namespace detail

template <Real T>
template <detail::not_adapter_bank<T> Adapters>
AdapterBank<T>::AdapterBank(const Adapters& adapters) {
    static_assert(std::same_as<detail::adapter_type<Adapters>, Lora<T>>,
                  "lowrank: AdapterBank<T> is built from a range of Lora<T> (objects, pointers or "
                  "reference_wrappers)");
    const char* fn = "lowrank::AdapterBank";
    Index k = 0;
    for (const auto& item : adapters) {
        const Lora<T>* a = detail::adapter_address(item);
        if (!a) detail::fail(fn, ": adapter ", k, " is a null pointer");
        if (k == 0) {
            in_ = a->in_features();
            out_ = a->out_features();
        }
        detail::check_adapter(fn, *a, k, in_, out_, "the bank's weight");
        ++k;
    }
    entries_.reserve(std::size_t(k));  // every adapter checked before anything is copied
    for (const auto& item : adapters) entries_.push_back(prepare(*detail::adapter_address(item)));
}

// =================================================================================================
// Mixed batches: per-row adapter index (BGMV)
// =================================================================================================

/// Y += s_k (X[t] A_kᵀ) B_kᵀ for every row t with k = idx[t] ≥ 0: the adapter part of a mixed
/// batch, for hosts that run their own base GEMM. X: n × in; Y: n × out (already shaped; rows with
/// idx[t] = −1 are not touched); idx: n signed integers in [−1, K). Adapters may have different
/// ranks; each must be for an out × in weight. Cost: Σ_k 2·m_k·r_k·(in + out) flops (m_k: rows of
/// adapter k); each adapter's factors are read once.
template <class DX, class Adapters, detail::IndexRange Idx, Destination DY>
void mixed_delta(const Eigen::MatrixBase<DX>& X, const Adapters& adapters, const Idx& idx, DY&& Y,
                 MixedWorkspace<typename DX::Scalar>& ws) {
    using T = typename DX::Scalar;
    const char* fn = "lowrank::mixed_delta";
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    const auto ids = detail::index_span(idx);
    const Index out = Y.cols();
    detail::collect_adapters<T>(fn, adapters, x.cols, out, ws.factors);
    detail::check_row_adapters(fn, ids, x.rows, Index(ws.factors.size()));
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, out, false);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    core::bgmv<T>(x, y, std::span<const core::GatheredFactors<T>>(ws.factors), ids, ws.gather);
}
template <class DX, class Adapters, detail::IndexRange Idx, Destination DY>
void mixed_delta(const Eigen::MatrixBase<DX>& X, const Adapters& adapters, const Idx& idx, DY&& Y) {
    MixedWorkspace<typename DX::Scalar> ws;
    mixed_delta(X, adapters, idx, std::forward<DY>(Y), ws);
}

/// Y = X Wᵀ + s_k (X[t] A_kᵀ) B_kᵀ per row, k = idx[t] (−1: the base alone) — Punica's BGMV on the
/// CPU. X: n × in, W: out × in, Y: n × out (a plain Matrix is resized; must not overlap X or W).
/// Cost: 2·n·out·in + Σ_k 2·m_k·r_k·(in + out) flops.
template <class DX, class DW, class Adapters, detail::IndexRange Idx, Destination DY>
void mixed(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Adapters& adapters,
           const Idx& idx, DY&& Y, MixedWorkspace<typename DX::Scalar>& ws) {
    using T = typename DX::Scalar;
    const char* fn = "lowrank::mixed";
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    const auto w = detail::input_view(fn, "W", W, -1, x.cols);
    const auto ids = detail::index_span(idx);
    detail::collect_adapters<T>(fn, adapters, w.cols, w.rows, ws.factors);
    detail::check_row_adapters(fn, ids, x.rows, Index(ws.factors.size()));
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, w.rows, true);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    detail::check_no_overlap(fn, "Y", y, "W", w);
    core::base_product<T>(x, w, y, ws.base);
    core::bgmv<T>(x, y, std::span<const core::GatheredFactors<T>>(ws.factors), ids, ws.gather);
}
template <class DX, class DW, class Adapters, detail::IndexRange Idx, Destination DY>
void mixed(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W, const Adapters& adapters,
           const Idx& idx, DY&& Y) {
    MixedWorkspace<typename DX::Scalar> ws;
    mixed(X, W, adapters, idx, std::forward<DY>(Y), ws);
}

/// Backward of `mixed` for an upstream gradient dY (n × out):
///
///     grads[k].A = s_k G_kᵀ X_k,  grads[k].B = s_k dY_kᵀ (X_k A_kᵀ),  G_k = dY_k B_k,
///     dX = dY W + Σ_k scatter(s_k G_k A_k)
///
/// where X_k, dY_k are the rows with idx[t] = k. `grads` is resized to K and overwritten (zero
/// gradients for an adapter with no rows); dX (n × in) is overwritten (a plain Matrix is resized).
/// Cost: 2·n·out·in + Σ_k 2·m_k·r_k·(2·in + 2·out + in) flops.
template <class DX, class DW, class Adapters, detail::IndexRange Idx, class DdY, Destination DdX>
void mixed_backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                    const Adapters& adapters, const Idx& idx, const Eigen::MatrixBase<DdY>& dY,
                    std::vector<LoraGrad<typename DX::Scalar>>& grads, DdX&& dX) {
    using T = typename DX::Scalar;
    const char* fn = "lowrank::mixed_backward";
    MixedWorkspace<T> ws;
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    const auto w = detail::input_view(fn, "W", W, -1, x.cols);
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, w.rows);
    const auto ids = detail::index_span(idx);
    detail::collect_adapters<T>(fn, adapters, w.cols, w.rows, ws.factors);
    detail::check_row_adapters(fn, ids, x.rows, Index(ws.factors.size()));
    auto dx = detail::output_view(fn, "dX", std::forward<DdX>(dX), x.rows, w.cols, true);
    detail::check_no_overlap(fn, "dX", dx, "X", x);
    detail::check_no_overlap(fn, "dX", dx, "dY", dy);
    detail::check_no_overlap(fn, "dX", dx, "W", w);
    detail::prepare_grads<T>(adapters, grads, ws);
    core::base_input_grad<T>(dy, w, dx, false, ws.base);
    core::bgmv_backward<T>(x, dy, std::span<const core::GatheredFactors<T>>(ws.factors), ids,
                           std::span<const MatrixView<T>>(ws.dv),
                           std::span<const MatrixView<T>>(ws.du), &dx, ws.gather);
}
/// Backward of `mixed` without the input gradient (W is only shape-checked).
template <class DX, class DW, class Adapters, detail::IndexRange Idx, class DdY>
void mixed_backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                    const Adapters& adapters, const Idx& idx, const Eigen::MatrixBase<DdY>& dY,
                    std::vector<LoraGrad<typename DX::Scalar>>& grads) {
    using T = typename DX::Scalar;
    const char* fn = "lowrank::mixed_backward";
    MixedWorkspace<T> ws;
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    detail::check_shape(fn, "W", W.derived(), -1, x.cols);
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, W.rows());
    const auto ids = detail::index_span(idx);
    detail::collect_adapters<T>(fn, adapters, x.cols, dy.cols, ws.factors);
    detail::check_row_adapters(fn, ids, x.rows, Index(ws.factors.size()));
    detail::prepare_grads<T>(adapters, grads, ws);
    core::bgmv_backward<T>(x, dy, std::span<const core::GatheredFactors<T>>(ws.factors), ids,
                           std::span<const MatrixView<T>>(ws.dv),
                           std::span<const MatrixView<T>>(ws.du), nullptr, ws.gather);
}

// =================================================================================================
// Mixed batches: pre-grouped segments (SGMV)
// =================================================================================================

/// Y = X Wᵀ + per segment s: rows [segments[s], segments[s+1]) use adapter segment_adapter[s]
/// (−1: none) — Punica's SGMV, for rows already grouped by adapter. `segments`: S + 1
/// nondecreasing offsets from 0 to n; `segment_adapter`: S signed integers in [−1, K). Segments are
/// used in place (no gather); an adapter named by several segments is read once per segment.
template <class DX, class DW, class Adapters, detail::IndexRange Seg, detail::IndexRange Idx,
          Destination DY>
void mixed_segments(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                    const Adapters& adapters, const Seg& segments, const Idx& segment_adapter,
                    DY&& Y, MixedWorkspace<typename DX::Scalar>& ws) {
    using T = typename DX::Scalar;
    static_assert(std::same_as<std::ranges::range_value_t<Seg>, Index>,
                  "lowrank::mixed_segments: segment offsets are lowrank::Index (std::ptrdiff_t)");
    const char* fn = "lowrank::mixed_segments";
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    const auto w = detail::input_view(fn, "W", W, -1, x.cols);
    const std::span<const Index> seg(std::ranges::data(segments), std::ranges::size(segments));
    const auto ids = detail::index_span(segment_adapter);
    detail::collect_adapters<T>(fn, adapters, w.cols, w.rows, ws.factors);
    detail::check_segments(fn, seg, ids, x.rows, Index(ws.factors.size()));
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, w.rows, true);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    detail::check_no_overlap(fn, "Y", y, "W", w);
    core::base_product<T>(x, w, y, ws.base);
    core::sgmv<T>(x, y, std::span<const core::GatheredFactors<T>>(ws.factors), seg, ids, ws.gather);
}
template <class DX, class DW, class Adapters, detail::IndexRange Seg, detail::IndexRange Idx,
          Destination DY>
void mixed_segments(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                    const Adapters& adapters, const Seg& segments, const Idx& segment_adapter,
                    DY&& Y) {
    MixedWorkspace<typename DX::Scalar> ws;
    mixed_segments(X, W, adapters, segments, segment_adapter, std::forward<DY>(Y), ws);
}

/// Backward of `mixed_segments`: `grads` resized to K and overwritten (an adapter's gradient sums
/// over all its segments), dX = dY W + Σ_s s_k (dY_s B_k) A_k overwritten.
template <class DX, class DW, class Adapters, detail::IndexRange Seg, detail::IndexRange Idx,
          class DdY, Destination DdX>
void mixed_segments_backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                             const Adapters& adapters, const Seg& segments,
                             const Idx& segment_adapter, const Eigen::MatrixBase<DdY>& dY,
                             std::vector<LoraGrad<typename DX::Scalar>>& grads, DdX&& dX) {
    using T = typename DX::Scalar;
    static_assert(std::same_as<std::ranges::range_value_t<Seg>, Index>,
                  "lowrank::mixed_segments_backward: segment offsets are lowrank::Index");
    const char* fn = "lowrank::mixed_segments_backward";
    MixedWorkspace<T> ws;
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    const auto w = detail::input_view(fn, "W", W, -1, x.cols);
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, w.rows);
    const std::span<const Index> seg(std::ranges::data(segments), std::ranges::size(segments));
    const auto ids = detail::index_span(segment_adapter);
    detail::collect_adapters<T>(fn, adapters, w.cols, w.rows, ws.factors);
    detail::check_segments(fn, seg, ids, x.rows, Index(ws.factors.size()));
    auto dx = detail::output_view(fn, "dX", std::forward<DdX>(dX), x.rows, w.cols, true);
    detail::check_no_overlap(fn, "dX", dx, "X", x);
    detail::check_no_overlap(fn, "dX", dx, "dY", dy);
    detail::check_no_overlap(fn, "dX", dx, "W", w);
    detail::prepare_grads<T>(adapters, grads, ws);
    core::base_input_grad<T>(dy, w, dx, false, ws.base);
    core::sgmv_backward<T>(x, dy, std::span<const core::GatheredFactors<T>>(ws.factors), seg, ids,
                           std::span<const MatrixView<T>>(ws.dv),
                           std::span<const MatrixView<T>>(ws.du), &dx, ws.gather);
}

// =================================================================================================
// Masked composition of a list of adapters (TARA), forward and backward
// =================================================================================================

/// Y += Σ_k M[k,t] · s_k · (X[t] A_kᵀ) B_kᵀ: the masked adapters' part. M: K × n (row-major,
/// binary or soft, finite); each adapter runs only on the rows where its mask is nonzero (all rows
/// in place when none is zero). Y (n × out) must have its shape. Cost: Σ_k 2·m_k·r_k·(in + out)
/// flops, m_k = nonzeros of row k of M.
template <class DX, class Adapters, class DM, Destination DY>
void masked_delta(const Eigen::MatrixBase<DX>& X, const Adapters& adapters,
                  const Eigen::MatrixBase<DM>& M, DY&& Y, MixedWorkspace<typename DX::Scalar>& ws) {
    using T = typename DX::Scalar;
    const char* fn = "lowrank::masked_delta";
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    const Index out = Y.cols();
    detail::collect_adapters<T>(fn, adapters, x.cols, out, ws.factors);
    const Index K = Index(ws.factors.size());
    const auto masks = detail::input_view(fn, "masks", M, -1, -1);
    detail::check_mask_matrix(fn, masks, K, x.rows);
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, out, false);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    detail::check_no_overlap(fn, "Y", y, "masks", masks);
    Index* rows = ws.gather.indices(x.rows);
    T* weights = ws.gather.weights(x.rows);
    for (Index k = 0; k < K; ++k) {
        const T* wk = nullptr;
        const core::RowSet set = detail::mask_rows(masks, k, rows, weights, &wk);
        core::gathered_apply<T>(x, y, ws.factors[std::size_t(k)], set, wk, ws.gather);
    }
}
template <class DX, class Adapters, class DM, Destination DY>
void masked_delta(const Eigen::MatrixBase<DX>& X, const Adapters& adapters,
                  const Eigen::MatrixBase<DM>& M, DY&& Y) {
    MixedWorkspace<typename DX::Scalar> ws;
    masked_delta(X, adapters, M, std::forward<DY>(Y), ws);
}

/// Y = X Wᵀ + Σ_k M[k,t] · s_k · (X[t] A_kᵀ) B_kᵀ (TARA's composed layer). X: n × in, W: out × in,
/// M: K × n, Y: n × out (a plain Matrix is resized; must not overlap X, W or M).
template <class DX, class DW, class Adapters, class DM, Destination DY>
void masked_forward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                    const Adapters& adapters, const Eigen::MatrixBase<DM>& M, DY&& Y) {
    using T = typename DX::Scalar;
    const char* fn = "lowrank::masked_forward";
    MixedWorkspace<T> ws;
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    const auto w = detail::input_view(fn, "W", W, -1, x.cols);
    detail::collect_adapters<T>(fn, adapters, w.cols, w.rows, ws.factors);
    const Index K = Index(ws.factors.size());
    const auto masks = detail::input_view(fn, "masks", M, -1, -1);
    detail::check_mask_matrix(fn, masks, K, x.rows);
    auto y = detail::output_view(fn, "Y", std::forward<DY>(Y), x.rows, w.rows, true);
    detail::check_no_overlap(fn, "Y", y, "X", x);
    detail::check_no_overlap(fn, "Y", y, "W", w);
    detail::check_no_overlap(fn, "Y", y, "masks", masks);
    core::base_product<T>(x, w, y);
    Index* rows = ws.gather.indices(x.rows);
    T* weights = ws.gather.weights(x.rows);
    for (Index k = 0; k < K; ++k) {
        const T* wk = nullptr;
        const core::RowSet set = detail::mask_rows(masks, k, rows, weights, &wk);
        core::gathered_apply<T>(x, y, ws.factors[std::size_t(k)], set, wk, ws.gather);
    }
}

namespace detail {
template <class T>
void masked_backward_impl(const char* fn, MatrixView<const T> x, MatrixView<const T> dy,
                          MatrixView<const T> masks, MixedWorkspace<T>& ws, MatrixView<T>* dx) {
    const Index K = Index(ws.factors.size());
    Index* rows = ws.gather.indices(x.rows);
    T* weights = ws.gather.weights(x.rows);
    (void)fn;
    for (Index k = 0; k < K; ++k) {
        const T* wk = nullptr;
        const core::RowSet set = mask_rows(masks, k, rows, weights, &wk);
        const auto kk = std::size_t(k);
        core::gathered_backward<T>(x, dy, ws.factors[kk], set, wk, ws.dv[kk], ws.du[kk], dx, false,
                                   ws.gather);
    }
}
}  // namespace detail

/// Backward of `masked_forward` (and of `linear(X, W + l1.masked(m1) + …)` for LoRA terms) for
/// an upstream gradient dY (n × out), with D_k = diag(M[k, ·]):
///
///     grads[k].A = s_k (D_k dY B_k)ᵀ X,   grads[k].B = s_k dYᵀ D_k (X A_kᵀ),
///     dX = dY W + Σ_k s_k (D_k dY B_k) A_k
///
/// `grads` is resized to K and overwritten; dX (n × in) is overwritten (a plain Matrix is resized).
/// Rows where M[k, t] = 0 cost nothing for adapter k.
template <class DX, class DW, class Adapters, class DM, class DdY, Destination DdX>
void masked_backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                     const Adapters& adapters, const Eigen::MatrixBase<DM>& M,
                     const Eigen::MatrixBase<DdY>& dY,
                     std::vector<LoraGrad<typename DX::Scalar>>& grads, DdX&& dX) {
    using T = typename DX::Scalar;
    const char* fn = "lowrank::masked_backward";
    MixedWorkspace<T> ws;
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    const auto w = detail::input_view(fn, "W", W, -1, x.cols);
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, w.rows);
    detail::collect_adapters<T>(fn, adapters, w.cols, w.rows, ws.factors);
    const auto masks = detail::input_view(fn, "masks", M, -1, -1);
    detail::check_mask_matrix(fn, masks, Index(ws.factors.size()), x.rows);
    auto dx = detail::output_view(fn, "dX", std::forward<DdX>(dX), x.rows, w.cols, true);
    detail::check_no_overlap(fn, "dX", dx, "X", x);
    detail::check_no_overlap(fn, "dX", dx, "dY", dy);
    detail::check_no_overlap(fn, "dX", dx, "W", w);
    detail::check_no_overlap(fn, "dX", dx, "masks", masks);
    detail::prepare_grads<T>(adapters, grads, ws);
    core::base_input_grad<T>(dy, w, dx, false, ws.base);
    detail::masked_backward_impl<T>(fn, x, dy, masks, ws, &dx);
}
/// Backward of `masked_forward` without the input gradient (W is only shape-checked).
template <class DX, class DW, class Adapters, class DM, class DdY>
void masked_backward(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                     const Adapters& adapters, const Eigen::MatrixBase<DM>& M,
                     const Eigen::MatrixBase<DdY>& dY,
                     std::vector<LoraGrad<typename DX::Scalar>>& grads) {
    using T = typename DX::Scalar;
    const char* fn = "lowrank::masked_backward";
    MixedWorkspace<T> ws;
    const auto x = detail::input_view(fn, "X", X, -1, -1);
    detail::check_shape(fn, "W", W.derived(), -1, x.cols);
    const auto dy = detail::input_view(fn, "dY", dY, x.rows, W.rows());
    detail::collect_adapters<T>(fn, adapters, x.cols, dy.cols, ws.factors);
    const auto masks = detail::input_view(fn, "masks", M, -1, -1);
    detail::check_mask_matrix(fn, masks, Index(ws.factors.size()), x.rows);
    detail::prepare_grads<T>(adapters, grads, ws);
    detail::masked_backward_impl<T>(fn, x, dy, masks, ws, nullptr);
}

// =================================================================================================
// TARA's key-alignment loss
// =================================================================================================

/// TARA's alignment objective for one masked K projection (as published in its training code):
///
///     L = mean_{i, c} | K_total[rare_i, c] − K_base[class_i, c] |        (L1 over P pairs × out)
///     K_base  = X Wᵀ + b                                                  (frozen)
///     K_total = K_base + diag(m) · s (X Aᵀ) Bᵀ                            (the masked adapter)
///
/// so each rare-token row of the adapted keys is pulled towards the base key of the class word.
/// The bias cancels in the difference and is not needed. `rare` and `classes` are row indices of X
/// (e.g. from `token_positions`), paired element-wise; a single class position is paired with every
/// rare position. `mask` is the adapter's mask (length n; TARA's is 1 on the rare positions).
///
/// With `grad` given, fills grad->A (r × in) and grad->B (out × r) with the (sub)gradient, using
/// sign(0) = 0 at zero residuals: with S = sign(R) / (P · out) and T' = s · diag(m_rare) X_rare Aᵀ,
///
///     grad.B = Sᵀ T',   grad.A = s (diag(m_rare) S B)ᵀ X_rare
///
/// Throws `lowrank::error` for empty or mismatched position lists, positions outside [0, n), a mask
/// of the wrong length, or shapes that disagree. Cost: 2·P·out·in + 2·P·r·(in + out) flops
/// (twice with the gradient).
template <class DX, class DW, Real T, class DM>
[[nodiscard]] T alignment_loss(const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
                               const Lora<T>& lora, const Eigen::DenseBase<DM>& mask,
                               std::span<const Index> rare, std::span<const Index> classes,
                               LoraGrad<T>* grad = nullptr) {
    const char* fn = "lowrank::alignment_loss";
    const auto x = detail::input_view(fn, "X", X, -1, lora.in_features());
    const auto w = detail::input_view(fn, "W", W, lora.out_features(), lora.in_features());
    lora.validate(fn, x.rows, w.cols, w.rows);
    const auto m = detail::mask_ref<T>(fn, mask);
    detail::check_mask(fn, m, x.rows);
    const Index P = Index(rare.size()), n = x.rows, in = w.cols, out = w.rows, r = lora.rank();
    if (P == 0) detail::fail(fn, ": no rare positions (the mean over an empty set is undefined)");
    if (Index(classes.size()) != P && classes.size() != 1)
        detail::fail(fn, ": ", classes.size(), " class positions for ", P,
                     " rare positions (expected as many, or one)");
    for (const Index t : rare)
        if (t < 0 || t >= n) detail::fail(fn, ": rare position ", t, " is outside [0, ", n, ")");
    for (const Index t : classes)
        if (t < 0 || t >= n) detail::fail(fn, ": class position ", t, " is outside [0, ", n, ")");

    const auto X_rows = eigen_map(x);
    Matrix<T> x_rare(P, in), x_diff(P, in);
    for (Index i = 0; i < P; ++i) {
        const Index c = classes.size() == 1 ? classes[0] : classes[std::size_t(i)];
        x_rare.row(i) = X_rows.row(rare[std::size_t(i)]);
        x_diff.row(i) = x_rare.row(i) - X_rows.row(c);
    }
    // R = (X_rare − X_class) Wᵀ + diag(s m_rare) (X_rare Aᵀ) Bᵀ
    Matrix<T> residual(P, out), t(P, r);
    core::base_product<T>(view(x_diff), w, view_mut(residual));
    core::shrink<T>(view(x_rare), lora.shrink_factor(), view_mut(t));
    for (Index i = 0; i < P; ++i) t.row(i) *= lora.scale() * m[rare[std::size_t(i)]];
    core::expand<T>(view(t), lora.expand_factor(), view_mut(residual), T(1), true);

    const double count = double(P) * double(out);
    double total = 0;
    for (Index i = 0; i < P; ++i)
        for (Index c = 0; c < out; ++c) total += std::abs(double(residual(i, c)));
    if (grad) {
        Matrix<T> sign(P, out), g(P, r);
        for (Index i = 0; i < P; ++i)
            for (Index c = 0; c < out; ++c) {
                const T v = residual(i, c);
                sign(i, c) = T((v > T(0)) - (v < T(0)) ) / T(count);
            }
        grad->A.resize(r, in);
        grad->B.resize(out, r);
        core::grad_expand<T>(view(sign), view(t), view_mut(grad->B), T(1), false);  // Sᵀ T'
        core::project_back<T>(view(sign), lora.expand_factor(), view_mut(g));       // S B
        for (Index i = 0; i < P; ++i) g.row(i) *= lora.scale() * m[rare[std::size_t(i)]];
        core::grad_shrink<T>(view(g), view(x_rare), view_mut(grad->A), T(1), false);
    }
    return T(total / count);
}

}  // namespace lowrank
