// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The term protocol and the fused evaluator: `Y += Σ_k φ_k(X V_kᵀ) U_kᵀ` for a list of terms.
///
/// A *term* is anything that satisfies `LowRankTerm`: it exposes a shrink factor V (w × in), an
/// expand factor U (out × w) and an in-place per-row transform φ of the n × w shrink output. The
/// core knows no method: LoRA, LoRA-XS cores, masked adapters and gated rank-one edits are all terms
/// defined in their own headers, and the evaluator below runs any list of them.

#include <concepts>
#include <cstddef>
#include <vector>

#include "ops.hpp"
#include "parallel.hpp"

namespace lowrank {

/// A reusable scratch buffer. Calls that take a `Workspace&` allocate only when it must grow, so a
/// training loop that passes the same workspace every step allocates nothing in steady state
/// (on one thread: a call given `Threads{k > 1}` starts threads and gives each its own buffers).
template <class T>
class Workspace {
public:
    /// An uninitialised rows × cols matrix view into the buffer (valid until the next call).
    [[nodiscard]] MatrixView<T> matrix(Index rows, Index cols) {
        const auto need = static_cast<std::size_t>(rows * cols);
        if (buffer_.size() < need) buffer_.resize(need);
        return {buffer_.data(), rows, cols, cols};
    }
    /// The core products' own buffers, kept apart from `matrix()` so that both can be in use at
    /// once: the base product's (packed blocks of X and W, or X's aligned copy) and the
    /// backward's (A, Gᵀ and blocks of X in strips; see input_grad and grad_shrink).
    [[nodiscard]] core::GemmWorkspace<T>& gemm() noexcept { return gemm_; }
    /// Elements currently held by `matrix()`'s buffer.
    [[nodiscard]] std::size_t capacity() const noexcept { return buffer_.size(); }

private:
    std::vector<T> buffer_;
    core::GemmWorkspace<T> gemm_;
};

/// What the core needs of a term `φ(X Vᵀ) Uᵀ`.
///
/// - `scalar`: float or double.
/// - `in_features()`, `out_features()`: the shape of the weight the term adds to (out × in).
/// - `width()`: w, the number of columns of the shrink output.
/// - `shrink_factor()`: V as a w × in view; `expand_factor()`: U as an out × w view.
/// - `transform(t, row0)`: φ applied in place to rows [row0, row0 + t.rows) of the n × w shrink
///   output (row0 lets per-token terms, such as masks, find their rows).
/// - `validate(fn, n, in, out)`: throws `lowrank::error` naming `fn` unless the term can act on an
///   n × in input producing n × out (called once per evaluation, before anything is written).
template <class Term>
concept LowRankTerm = requires(const Term& t, MatrixView<typename Term::scalar> block, Index row0,
                               const char* fn) {
    requires Real<typename Term::scalar>;
    { t.in_features() } -> std::convertible_to<Index>;
    { t.out_features() } -> std::convertible_to<Index>;
    { t.width() } -> std::convertible_to<Index>;
    { t.shrink_factor() } -> std::convertible_to<MatrixView<const typename Term::scalar>>;
    { t.expand_factor() } -> std::convertible_to<MatrixView<const typename Term::scalar>>;
    t.transform(block, row0);
    t.validate(fn, row0, row0, row0);
};

/// A term whose φ is linear and the same for every row, so that ΔW = U · M · V is a weight-space
/// matrix: `merge_into(W, α)` performs W += α ΔW.
template <class Term>
concept MergeableTerm = LowRankTerm<Term> &&
                        requires(const Term& t, MatrixView<typename Term::scalar> w,
                                 typename Term::scalar alpha) { t.merge_into(w, alpha); };

namespace core {

/// Σ_k width_k.
template <LowRankTerm... Terms>
[[nodiscard]] Index total_width(const Terms&... terms) noexcept {
    return (Index(0) + ... + Index(terms.width()));
}

/// Rows of X processed together: with several terms, a block of X small enough to stay in L2
/// between the terms' shrinks (so X comes from memory once); with one term, all rows at once.
template <class T>
[[nodiscard]] Index term_row_block(Index n, Index in, std::size_t n_terms) noexcept {
    if (n_terms <= 1) return n;
    const Index rows = (256 * 1024 / Index(sizeof(T))) / std::max<Index>(in, 1);
    return std::max<Index>(blocking::dot_mr, rows / blocking::dot_mr * blocking::dot_mr);
}

/// Y += Σ_k φ_k(X V_kᵀ) U_kᵀ over the terms, through `scratch` (at least min(n, row block) × Σw).
/// X and Y are rows [row_offset, row_offset + n) of the batch (per-token terms index by batch row).
/// Arguments must have been validated (see `validate_terms`).
template <class T, class Arch = xsimd::default_arch, LowRankTerm... Terms>
void apply_terms_at(MatrixView<const T> x, MatrixView<T> y, MatrixView<T> scratch, Index row_offset,
                    const Terms&... terms) {
    static_assert((std::same_as<typename Terms::scalar, T> && ...),
                  "apply_terms: every term must have the scalar type of X and Y");
    const Index n = x.rows;
    if (n == 0) return;
    const Index rb = term_row_block<T>(n, x.cols, sizeof...(Terms));
    for (Index r0 = 0; r0 < n; r0 += rb) {
        const Index nb = std::min(rb, n - r0);
        const auto xb = x.middle_rows(r0, nb);
        const auto yb = y.middle_rows(r0, nb);
        Index col = 0;
        auto run = [&](const auto& term) {
            const Index w = term.width();
            const auto t = scratch.block(0, col, nb, w);
            shrink<T, Arch>(xb, term.shrink_factor(), t);
            term.transform(t, row_offset + r0);
            expand<T, Arch>(t, term.expand_factor(), yb);
            col += w;
        };
        (run(terms), ...);
    }
}

/// Y += Σ_k φ_k(X V_kᵀ) U_kᵀ for a whole batch (rows 0…n−1).
template <class T, class Arch = xsimd::default_arch, LowRankTerm... Terms>
void apply_terms(MatrixView<const T> x, MatrixView<T> y, MatrixView<T> scratch,
                 const Terms&... terms) {
    apply_terms_at<T, Arch>(x, y, scratch, 0, terms...);
}

/// Rows of scratch `linear_terms` needs for an n-row batch.
template <class T, LowRankTerm... Terms>
[[nodiscard]] Index scratch_rows(Index n, Index in, Threads threads, const Terms&...) noexcept {
    if (threads.count > 1) return n;
    return std::min(n, term_row_block<T>(n, in, sizeof...(Terms)));
}

/// Y (=|+=) X Wᵀ + Σ_k φ_k(X V_kᵀ) U_kᵀ on up to `threads.count` threads. With an empty `w` the
/// base product is skipped and the terms are added to Y (the adapter part alone). The shrink
/// outputs (`scratch_rows(n, in, threads, terms…)` × Σw) and, on one thread, the base product's
/// packed blocks live in `ws`. With a base product the threads split the output features, so each
/// streams (or packs, into its own buffers) its share of W once; the adapter part alone splits
/// rows. (Split by rows, every thread packed all of W: n = 128, 4096², 2 threads 1.46×.)
template <class T, class Arch = xsimd::default_arch, LowRankTerm... Terms>
void linear_terms(MatrixView<const T> x, MatrixView<const T> w, MatrixView<T> y, Workspace<T>& ws,
                  Threads threads, const Terms&... terms) {
    const Index n = x.rows, out = y.cols;
    const bool base = w.rows > 0;
    if (n == 0 || out == 0) return;
    const MatrixView<T> scratch = ws.matrix(scratch_rows<T>(n, x.cols, threads, terms...), total_width(terms...));
    if (threads.count <= 1) {
        if (base) base_product<T, Arch>(x, w, y, ws.gemm());
        apply_terms_at<T, Arch>(x, y, scratch, 0, terms...);
        return;
    }
    if (base) {
        // Shrink and transform once on this thread (n × Σw: 2·n·Σw·in flops against the base
        // product's 2·n·out·in), then split the outputs.
        Index col = 0;
        auto prepare = [&](const auto& term) {
            const auto t = scratch.block(0, col, n, term.width());
            shrink<T, Arch>(x, term.shrink_factor(), t);
            term.transform(t, 0);
            col += term.width();
        };
        (prepare(terms), ...);
        // Blocks of outputs start on multiples of 16 columns: whole vectors, and whole cache lines
        // of a float Y whose rows start on one (two of a double Y), so no two threads write a line.
        parallel_for(threads, out, 256, 16, [&](Index b, Index e) {
            const auto yb = y.block(0, b, n, e - b);
            if (base) base_product<T, Arch>(x, w.middle_rows(b, e - b), yb);
            Index c = 0;
            auto run = [&](const auto& term) {
                const Index wd = term.width();
                expand<T, Arch>(MatrixView<const T>(scratch.block(0, c, n, wd)),
                                term.expand_factor().middle_rows(b, e - b), yb);
                c += wd;
            };
            (run(terms), ...);
        });
        return;
    }
    parallel_for(threads, n, 32, 1, [&](Index b, Index e) {
        const auto xb = x.middle_rows(b, e - b);
        const auto yb = y.middle_rows(b, e - b);
        if (base) base_product<T, Arch>(xb, w, yb);
        apply_terms_at<T, Arch>(xb, yb, scratch.middle_rows(b, e - b), b, terms...);
    });
}

}  // namespace core

/// Checks every term against an n × in input and an n × out output (throws `lowrank::error`).
template <LowRankTerm... Terms>
void validate_terms(const char* fn, Index n, Index in, Index out, const Terms&... terms) {
    (terms.validate(fn, n, in, out), ...);
}

}  // namespace lowrank
