// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Gathered low-rank kernels: several adapters in one batch, each acting on its own rows.
///
///     gathered_apply     Y[ρ_i] += α · w_i · (X[ρ_i] Vᵀ) Uᵀ        one adapter, rows ρ, weights w
///     gathered_backward  dU, dV and dX[ρ_i] of the same
///     bgmv               Y[t] += α_k (X[t] V_kᵀ) U_kᵀ, k = idx[t]   (Punica's BGMV; −1: no adapter)
///     sgmv               the same for rows already grouped in segments      (Punica's SGMV)
///
/// How the work is laid out: the rows of one adapter are used where they are (no copies of X or
/// Y): two kernels tuned for few rows run on them through row pointers — `gathered_shrink`
/// (2 × 6 dot tiles) into an m × w scratch, and `gathered_expand` (U transposed block by block
/// into an L1 buffer with SIMD tile transposes, then 6-row × 2-vector tiles that add into Y's
/// rows). With the factors laid out ahead (an AdapterBank: Vᵀ and Uᵀ),
/// `gathered_shrink_transposed` (6-row × 2-vector broadcast tiles over one sequential stream of
/// Vᵀ) and `gathered_expand_strips` (the same expand tiles over Uᵀ in cache-line strips, also one
/// sequential stream, no transposes) take their place.
/// So each adapter's factors are streamed from memory once per call however its rows are
/// scattered (every pass over V or block of U serves all m rows), a row with no adapter is never
/// touched, and nothing is allocated per row: the scratch comes from a `GatherWorkspace`, which a
/// caller reuses across calls.
///
/// Everything here is method-agnostic: an adapter is a pair of factor views and a scale
/// (`GatheredFactors`); per-row weights make masked (TARA) and soft-masked terms the same kernel.
/// Arguments are checked by the public entry points (compose.hpp); here only LOWRANK_ASSERT.
/// Every kernel has a plain scalar reference (`…_ref`) that the tests hold it against.

#include <algorithm>
#include <array>
#include <cstring>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.hpp"
#include "terms.hpp"

namespace lowrank::core {

/// One adapter as the gathered kernels see it: ΔY = α (X Vᵀ) Uᵀ.
template <class T>
struct GatheredFactors {
    MatrixView<const T> v;     ///< shrink factor, w × in (LoRA's A); shape only (data null) when vt is set
    MatrixView<const T> u;     ///< expand factor, out × w (LoRA's B); shape only (data null) when ut is set
    T alpha = T(1);            ///< scale (LoRA's s)
    /// Optional Uᵀ in cache-line strips (see `pack_strips`), laid out ahead: the forward reads it
    /// instead of U.
    MatrixView<const T> ut_strips{};
    /// Optional Vᵀ (in × w), laid out ahead with a leading dimension ≥ w rounded up to 64 bytes
    /// (the padding readable): the forward's shrink reads it instead of V.
    MatrixView<const T> vt{};
};

/// A set of batch rows: an explicit list `rows[0..count)`, or (rows == nullptr) the contiguous
/// range [first, first + count).
struct RowSet {
    const Index* rows = nullptr;
    Index first = 0;
    Index count = 0;

    [[nodiscard]] Index operator[](Index i) const noexcept { return rows ? rows[i] : first + i; }
    [[nodiscard]] bool contiguous() const noexcept { return rows == nullptr; }
};

/// Uᵀ[j, o] read from its strip layout `us` (w rows).
template <class T>
[[nodiscard]] T strip_at(MatrixView<const T> us, Index w, Index j, Index o) noexcept {
    return us(o / strip_width<T> * w + j, o % strip_width<T>);
}

/// Writes Uᵀ (U: out × w) into `dst` (strip_rows<T>(w, out) × strip_width<T>, leading dimension
/// strip_width<T>) in strips; padding columns are set to zero.
template <class T>
void pack_strips(MatrixView<const T> u, MatrixView<T> dst) noexcept {
    LOWRANK_ASSERT(dst.cols == strip_width<T> && dst.ld == strip_width<T> && dst.rows == strip_rows<T>(u.cols, u.rows));
    pack_strips<T>(u.cols, u.rows, u.data, 1, u.ld, dst.data);  // Uᵀ(j, o) = u[o·ld + j]
}

/// Reusable scratch of the gathered kernels: values (gathered rows, shrink outputs) and indices
/// (the grouping of rows by adapter). Allocates only when a call needs more than it holds.
template <class T>
class GatherWorkspace {
public:
    /// An uninitialised rows × cols block of values (valid until the next call that uses it).
    [[nodiscard]] MatrixView<T> matrix(Index rows, Index cols) { return values_.matrix(rows, cols); }
    /// `count` uninitialised indices.
    [[nodiscard]] Index* indices(Index count) {
        if (index_.size() < static_cast<std::size_t>(count)) index_.resize(static_cast<std::size_t>(count));
        return index_.data();
    }
    /// Buffers of the core products that keep some (V in strips for input_grad).
    [[nodiscard]] GemmWorkspace<T>& gemm() noexcept { return values_.gemm(); }
    /// `count` uninitialised per-row weights.
    [[nodiscard]] T* weights(Index count) {
        if (weight_.size() < static_cast<std::size_t>(count)) weight_.resize(static_cast<std::size_t>(count));
        return weight_.data();
    }

private:
    Workspace<T> values_;
    std::vector<Index> index_;
    std::vector<T> weight_;
};

// ------------------------------------------------------------------------------------------------
// Kernels for a few rows: shrink (dot form) and expand (packed Uᵀ, SIMD transposes)
// ------------------------------------------------------------------------------------------------

namespace detail {

/// One tile of gathered_shrink: T[0..MR, 0..NR) (+)= X[0..MR) · V[0..NR)ᵀ over kc (kv vectorised),
/// the MR rows of X given by pointers (they may be scattered rows of a batch). The MR rows of X
/// are held in registers; the NR rows of V are read as memory operands.
template <int MR, int NR, class T, class Arch>
inline void narrow_dot_tile(Index kc, Index kv, const T* const* x, const T* v, Index ldv, T* t,
                            Index ldt, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    batch acc[MR][NR];
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = batch(T(0));
    for (Index p = 0; p < kv; p += W) {
        batch xv[MR];
        LOWRANK_UNROLL for (int i = 0; i < MR; ++i) xv[i] = batch::load_unaligned(x[i] + p);
        LOWRANK_UNROLL for (int j = 0; j < NR; ++j) {
            const batch vv = batch::load_unaligned(v + j * ldv + p);
            LOWRANK_UNROLL for (int i = 0; i < MR; ++i) acc[i][j] = xsimd::fma(xv[i], vv, acc[i][j]);
        }
    }
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int j = 0; j < NR; ++j) {
            T s = xsimd::hadd(acc[i][j]);
            for (Index p = kv; p < kc; ++p) s += x[i][p] * v[j * ldv + p];  // k tail
            T& dst = t[i * ldt + j];
            dst = accumulate ? dst + s : s;
        }
}

template <int MR, class T, class Arch>
inline void narrow_dot_cols(Index j0, Index nr, Index kc, Index kv, const T* const* x, const T* v,
                            Index ldv, T* t, Index ldt, bool acc) noexcept {
    const T* vj = v + j0 * ldv;
    T* tj = t + j0;
    switch (nr) {
        case 1: narrow_dot_tile<MR, 1, T, Arch>(kc, kv, x, vj, ldv, tj, ldt, acc); break;
        case 2: narrow_dot_tile<MR, 2, T, Arch>(kc, kv, x, vj, ldv, tj, ldt, acc); break;
        case 3: narrow_dot_tile<MR, 3, T, Arch>(kc, kv, x, vj, ldv, tj, ldt, acc); break;
        case 4: narrow_dot_tile<MR, 4, T, Arch>(kc, kv, x, vj, ldv, tj, ldt, acc); break;
        case 5: narrow_dot_tile<MR, 5, T, Arch>(kc, kv, x, vj, ldv, tj, ldt, acc); break;
        default: narrow_dot_tile<MR, 6, T, Arch>(kc, kv, x, vj, ldv, tj, ldt, acc); break;
    }
}

/// packed[j][o] = u[o0 + o][p0 + j] for o < ob, j < wc (packed: wc × ob with leading dim ldp).
/// Out of line: inlined into gathered_expand beside the packed expand sweeps, GCC 12 spilled the
/// eight rows of each transpose tile to the stack (masked n = 77, 1–2 rows per adapter, out = 1280,
/// where the transposes are most of the work: 12.3–13.9 → 15.1–17.4 µs; out of line 12.3–13.0).
template <class T, class Arch>
LOWRANK_NOINLINE void pack_transposed(MatrixView<const T> u, Index o0, Index ob, Index p0, Index wc, T* packed,
                                      Index ldp) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index ov = ob / W * W, jv = wc / W * W;
    for (Index o = 0; o < ov; o += W) {
        const T* src = u.row(o0 + o) + p0;
        for (Index j = 0; j < jv; j += W) transpose_tile<T, Arch>(src + j, u.ld, packed + j * ldp + o, ldp);
        LOWRANK_UNROLL for (Index i = 0; i < W; ++i)
            for (Index j = jv; j < wc; ++j) packed[j * ldp + o + i] = src[i * u.ld + j];
    }
    for (Index o = ov; o < ob; ++o) {
        const T* src = u.row(o0 + o) + p0;
        for (Index j = 0; j < wc; ++j) packed[j * ldp + o] = src[j];
    }
}

/// The shrinks' shapes with nothing to multiply: T (m × w, over k input features) is empty, or
/// k = 0 and T is set to zero. Returns whether T is done.
template <class T>
[[nodiscard]] bool shrink_trivial(Index k, MatrixView<T> t) noexcept {
    if (t.rows == 0 || t.cols == 0) return true;
    if (k != 0) return false;
    for (Index i = 0; i < t.rows; ++i) std::fill_n(t.row(i), t.cols, T(0));
    return true;
}

}  // namespace detail

/// T = X[ρ] Vᵀ for a few rows ρ of X (read in place, wherever they are): T is m × w
/// (m = rows.count), X n × in, V w × in.
/// Tiles of 2 rows of X × 6 rows of V (12 accumulators; X in registers, V streamed as memory
/// operands) over passes of 4 KiB of each row, so a pass of V is read from memory once and then
/// from L1/L2 by every pair of rows. Reference: gemm_dot_ref on the selected rows, alpha = 1.
template <class T, class Arch = xsimd::default_arch>
void gathered_shrink(MatrixView<const T> x, RowSet rows, MatrixView<const T> v, MatrixView<T> t) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr Index NR = 6;
    LOWRANK_ASSERT(x.cols == v.cols && t.rows == rows.count && t.cols == v.rows);
    const Index m = rows.count, w = v.rows, k = x.cols;
    if (detail::shrink_trivial(k, t)) return;
    constexpr Index kc_max = 4096 / Index(sizeof(T));
    for (Index pc = 0; pc < k; pc += kc_max) {
        const Index kc = std::min(kc_max, k - pc), kv = kc / W * W;
        const bool acc = pc > 0;
        for (Index j = 0; j < w; j += NR) {
            const Index nr = std::min(NR, w - j);
            Index i = 0;
            for (; i + 2 <= m; i += 2) {
                const T* xr[2] = {x.row(rows[i]) + pc, x.row(rows[i + 1]) + pc};
                detail::narrow_dot_cols<2, T, Arch>(j, nr, kc, kv, xr, v.data + pc, v.ld, t.row(i), t.ld, acc);
            }
            if (i < m) {
                const T* xr[1] = {x.row(rows[i]) + pc};
                detail::narrow_dot_cols<1, T, Arch>(j, nr, kc, kv, xr, v.data + pc, v.ld, t.row(i), t.ld, acc);
            }
        }
    }
}

namespace detail {

/// One tile of gathered_shrink_transposed: T[0..MR, 0..valid) (+)= X[0..MR) · Vᵀ[0..kc, 0..valid)
/// (valid ≤ NV·W; the loads read NV full vectors of each row of Vᵀ, so its padding must be
/// readable). Each element of X is broadcast against NV vectors of a row of Vᵀ (bcast_accumulate).
template <int MR, int NV, class T, class Arch>
LOWRANK_TILE_INLINE void shrink_bcast_tile(Index kc, const T* const* x, const T* vt, Index ldv, T* t, Index ldt, Index valid,
                              bool accumulate) noexcept {
    xsimd::batch<T, Arch> acc[MR][NV];
    bcast_accumulate<MR, NV, NV, T, Arch>(kc, [&](int i, Index p) { return x[i][p]; }, vt, ldv, 0, acc);
    store_tile<MR, NV, T, Arch>(acc, [&](int i) { return t + i * ldt; }, T(1), accumulate, valid);
}

/// Rows [i0, i0 + MR) of gathered_shrink_transposed over one pass of k and one block of ≤ 2W columns.
template <int MR, class T, class Arch>
inline void shrink_bcast_rows(MatrixView<const T> x, RowSet rows, Index i0, Index pc, Index kc, const T* vt,
                              Index ldv, T* t, Index ldt, Index valid, bool accumulate) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const T* xr[MR];
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i) xr[i] = x.row(rows[i0 + i]) + pc;
    if (valid > W)
        shrink_bcast_tile<MR, 2, T, Arch>(kc, xr, vt, ldv, t + i0 * ldt, ldt, valid, accumulate);
    else
        shrink_bcast_tile<MR, 1, T, Arch>(kc, xr, vt, ldv, t + i0 * ldt, ldt, valid, accumulate);
}

}  // namespace detail

/// gathered_shrink with Vᵀ given (vt: in × w, e.g. laid out once by an AdapterBank, with a
/// leading dimension ≥ w rounded up to the SIMD width and that padding readable):
/// T = X[ρ] · vt (= X[ρ] Vᵀ).
/// Tiles of 6 rows × 2 vectors of T (12 accumulators) broadcast X against rows of Vᵀ, which are
/// read in one sequential stream per pass of blocking::kc over k (a pass of Vᵀ stays in L1 for
/// every tile of rows); the last 1–5 rows take one narrower tile. Against gathered_shrink's dot
/// tiles: no horizontal sums, and V is not read as w strided rows (mixed n = 64, 8 adapters,
/// r = 16, 4096², float: the shrink ~190 → ~120 µs in a prototype, same run).
template <class T, class Arch = xsimd::default_arch>
void gathered_shrink_transposed(MatrixView<const T> x, RowSet rows, MatrixView<const T> vt, MatrixView<T> t) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr int MR = 6;
    LOWRANK_ASSERT(x.cols == vt.rows && t.rows == rows.count && t.cols == vt.cols);
    LOWRANK_ASSERT(vt.rows == 0 || vt.ld >= (vt.cols + W - 1) / W * W);
    const Index m = rows.count, w = vt.cols, k = x.cols;
    if (detail::shrink_trivial(k, t)) return;
    for (Index pc = 0; pc < k; pc += blocking::kc) {
        const Index kc = std::min(blocking::kc, k - pc);
        const bool acc = pc > 0;
        for (Index j = 0; j < w; j += 2 * W) {
            const Index valid = std::min(2 * W, w - j);
            const T* vj = vt.data + pc * vt.ld + j;
            T* tj = t.data + j;
            detail::row_tiles<MR>(m, [&](Index i, auto mr) {
                detail::shrink_bcast_rows<decltype(mr)::value, T, Arch>(x, rows, i, pc, kc, vj, vt.ld, tj, t.ld,
                                                                        valid, acc);
            });
        }
    }
}

namespace detail {

/// The expands' shapes with nothing to multiply: no rows or no outputs, or w = 0 (Y's rows are
/// then zeroed unless accumulating). Returns whether Y is done.
template <class T>
[[nodiscard]] bool expand_trivial(Index w, MatrixView<T> y, RowSet rows, bool accumulate) noexcept {
    if (rows.count == 0 || y.cols == 0) return true;
    if (w != 0) return false;
    if (!accumulate)
        for (Index i = 0; i < rows.count; ++i) std::fill_n(y.row(rows[i]), y.cols, T(0));
    return true;
}

/// The MR rows ρ_{i0 + q} of Y, as row pointers for expand_sweep.
template <int MR, class T>
struct RowPointers {
    T* at[MR];
    RowPointers(MatrixView<T> y, RowSet rows, Index i0) noexcept {
        LOWRANK_UNROLL for (int q = 0; q < MR; ++q) at[q] = y.row(rows[i0 + q]);
    }
};

}  // namespace detail

/// Y[ρ_i] (+)= α T[i] Uᵀ for a few rows ρ of Y (written in place; T: m × w with m = rows.count,
/// U: out × w, Y: n × out). Blocks of U are transposed into a 16 KiB L1 buffer with SIMD W × W
/// transposes (a padded leading dimension), and tiles of blocking::sweep_mr rows × 2 or 3 vectors
/// of outputs (detail::expand_nv) sweep all m rows over each block: U is read once per call, each
/// selected row of Y read and written once per block of w. Rows must be distinct. Reference:
/// gemm_bcast_ref on Uᵀ, row by row.
template <class T, class Arch = xsimd::default_arch>
void gathered_expand(MatrixView<const T> t, MatrixView<const T> u, MatrixView<T> y, RowSet rows, T alpha,
                     bool accumulate) noexcept {
    LOWRANK_ASSERT(t.cols == u.cols && rows.count == t.rows && y.cols == u.rows);
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr Index pack_elems = 16 * 1024 / Index(sizeof(T));
    const Index m = rows.count, w = t.cols, out = u.rows;
    if (detail::expand_trivial(w, y, rows, accumulate)) return;
    alignas(64) std::array<T, pack_elems> buffer;
    const Index max_w = std::max<Index>(1, pack_elems / (4 * W) - 1);  // at least 4 vectors of outputs
    for (Index p0 = 0; p0 < w; p0 += max_w) {
        const Index wc = std::min(max_w, w - p0);
        const bool acc = accumulate || p0 > 0;
        // Widest block of outputs whose (padded) panel fits 16 KiB.
        Index ob = std::max<Index>(W, (pack_elems / wc) / W * W);
        while (ob > W && detail::padded_ld<T, Arch>(ob) * wc > pack_elems) ob -= W;
        const Index ldp = detail::padded_ld<T, Arch>(ob);
        for (Index o0 = 0; o0 < out; o0 += ob) {
            const Index o1 = std::min(out, o0 + ob);
            detail::pack_transposed<T, Arch>(u, o0, o1 - o0, p0, wc, buffer.data(), ldp);
            const detail::PackedPanel<T> panel{buffer.data(), o0, ldp};
            detail::row_tiles<int(blocking::sweep_mr<Arch>)>(m, [&](Index i, auto mr) {
                constexpr int MR = decltype(mr)::value;
                detail::expand_rows<MR, T, Arch>(detail::RowPointers<MR, T>(y, rows, i).at, o0, o1, wc,
                                                 t.data + i * t.ld + p0, t.ld, panel, alpha, acc);
            });
        }
    }
}

/// gathered_expand with Uᵀ given in strips (`us`: strip_rows<T>(w, out) × strip_width<T>, see
/// pack_strips; e.g. laid out once by an AdapterBank): no transposes, each tile reads its panel
/// of Uᵀ (w × its columns) as one contiguous run. Outputs are swept in blocks whose strips fill
/// up to 16 KiB, so every tile of rows after the first reads them from L1.
template <class T, class Arch = xsimd::default_arch>
void gathered_expand_strips(MatrixView<const T> t, MatrixView<const T> us, MatrixView<T> y, RowSet rows,
                            T alpha, bool accumulate) noexcept {
    constexpr Index S = strip_width<T>;
    const Index m = rows.count, w = t.cols, out = y.cols;
    LOWRANK_ASSERT(rows.count == t.rows && us.cols == S && us.ld == S && us.rows == strip_rows<T>(w, out));
    if (detail::expand_trivial(w, y, rows, accumulate)) return;
    const detail::StripPanel<T> panel(us.data, w);
    const Index ob = std::max<Index>(S, 16 * 1024 / Index(sizeof(T)) / w / S * S);
    for (Index o0 = 0; o0 < out; o0 += ob) {
        const Index o1 = std::min(out, o0 + ob);
        detail::row_tiles<int(blocking::sweep_mr<Arch>)>(m, [&](Index i, auto mr) {
            constexpr int MR = decltype(mr)::value;
            detail::expand_rows<MR, T, Arch>(detail::RowPointers<MR, T>(y, rows, i).at, o0, o1, w,
                                             t.data + i * t.ld, t.ld, panel, alpha, accumulate);
        });
    }
}

// ------------------------------------------------------------------------------------------------
// Row movement
// ------------------------------------------------------------------------------------------------

/// dst[i] = src[rows[i]] for i < rows.count (dst: rows.count × src.cols).
template <class T>
void gather_rows(MatrixView<const T> src, RowSet rows, MatrixView<T> dst) noexcept {
    LOWRANK_ASSERT(dst.rows == rows.count && dst.cols == src.cols);
    for (Index i = 0; i < rows.count; ++i) std::memcpy(dst.row(i), src.row(rows[i]), sizeof(T) * std::size_t(src.cols));
}

/// Reference for scatter_add_rows.
template <class T>
void scatter_add_rows_ref(MatrixView<const T> src, RowSet rows, MatrixView<T> dst) noexcept {
    for (Index i = 0; i < rows.count; ++i) {
        T* d = dst.row(rows[i]);
        const T* s = src.row(i);
        for (Index j = 0; j < src.cols; ++j) d[j] += s[j];
    }
}

/// dst[rows[i]] += src[i] (src: rows.count × dst.cols). Rows must be distinct.
template <class T, class Arch = xsimd::default_arch>
void scatter_add_rows(MatrixView<const T> src, RowSet rows, MatrixView<T> dst) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    LOWRANK_ASSERT(src.rows == rows.count && src.cols == dst.cols);
    const Index c = src.cols, cv = c / W * W;
    for (Index i = 0; i < rows.count; ++i) {
        T* d = dst.row(rows[i]);
        const T* s = src.row(i);
        Index j = 0;
        for (; j < cv; j += W)
            (batch::load_unaligned(d + j) + batch::load_unaligned(s + j)).store_unaligned(d + j);
        for (; j < c; ++j) d[j] += s[j];
    }
}

/// t[i, :] *= weights[i].
template <class T>
void scale_rows(MatrixView<T> t, const T* weights) noexcept {
    for (Index i = 0; i < t.rows; ++i) {
        T* row = t.row(i);
        const T wi = weights[i];
        for (Index j = 0; j < t.cols; ++j) row[j] *= wi;
    }
}

/// Groups the rows by adapter (a stable counting sort, O(n + K)): on return the rows of adapter k
/// are order[offsets[k] .. offsets[k+1]), in increasing order; rows with idx < 0 are left out.
/// `order` holds at least n entries, `offsets` K + 1. Every idx[t] must be < K.
template <class I>
Index group_rows(std::span<const I> idx, Index n_adapters, Index* order, Index* offsets) noexcept {
    std::fill_n(offsets, n_adapters + 1, Index(0));
    for (const I k : idx)
        if (k >= 0) ++offsets[Index(k) + 1];
    for (Index k = 0; k < n_adapters; ++k) offsets[k + 1] += offsets[k];
    // offsets[k] is now the start of group k; advance a cursor per group, then shift back.
    for (Index t = 0; t < Index(idx.size()); ++t) {
        const I k = idx[std::size_t(t)];
        if (k >= 0) order[offsets[Index(k)]++] = t;
    }
    for (Index k = n_adapters; k > 0; --k) offsets[k] = offsets[k - 1];
    offsets[0] = 0;
    return offsets[n_adapters];
}

// ------------------------------------------------------------------------------------------------
// One adapter on a set of rows
// ------------------------------------------------------------------------------------------------

/// Y[ρ_i] += α · w_i · (X[ρ_i] Vᵀ) Uᵀ for the rows ρ of `rows` (w_i = 1 when `weights` is null;
/// `weights[i]` belongs to the i-th row of the set). Rows must be distinct.
/// X's rows are shrunk in place by `gathered_shrink` into an m × w scratch, the weights folded in,
/// and `gathered_expand` adds the result to Y's rows in place. Cost: 2·m·w·(in + out) flops; V and
/// U are each read once from memory (m = rows.count), X's and Y's selected rows once each.
template <class T, class Arch = xsimd::default_arch>
void gathered_apply(MatrixView<const T> x, MatrixView<T> y, const GatheredFactors<T>& f, RowSet rows,
                    const T* weights, GatherWorkspace<T>& ws) {
    const Index m = rows.count, w = f.v.rows;
    LOWRANK_ASSERT(f.v.cols == x.cols && f.u.rows == y.cols && f.u.cols == w);
    if (m == 0) return;
    const auto t = ws.matrix(m, w);
    if (f.vt.data)
        gathered_shrink_transposed<T, Arch>(x, rows, f.vt, t);
    else
        gathered_shrink<T, Arch>(x, rows, f.v, t);
    if (weights) scale_rows(t, weights);
    if (f.ut_strips.data) {
        gathered_expand_strips<T, Arch>(t, f.ut_strips, y, rows, f.alpha, true);
        return;
    }
    if (blocking::narrow_dot(m, w)) {
        // A row or two (TARA's masked tokens): each reduced against U in place (a haddp per W
        // outputs) rather than U transposed block by block for them, the rule of `expand`. Masked
        // n = 77, 3 adapters on 2 / 1 / 2 rows, in = 768, out = 1280, float: 12.4–13.0 → 9.5–9.6 µs;
        // mixed, 8 adapters of r = 16 on 1 / 2 rows each, 4096²: 109 → 67–70 / 133 → 106–111 µs.
        for (Index i = 0; i < m; ++i)
            gemm_dot_narrow<T, Arch>(1, y.cols, w, f.alpha, t.row(i), t.ld, f.u.data, f.u.ld, y.row(rows[i]), y.ld,
                                     true);
        return;
    }
    gathered_expand<T, Arch>(t, f.u, y, rows, f.alpha, true);
}

/// Reference for gathered_apply: per row, plain loops.
template <class T>
void gathered_apply_ref(MatrixView<const T> x, MatrixView<T> y, const GatheredFactors<T>& f,
                        RowSet rows, const T* weights) {
    std::vector<T> t(std::size_t(f.v.rows));
    for (Index i = 0; i < rows.count; ++i) {
        const T* xr = x.row(rows[i]);
        for (Index j = 0; j < f.v.rows; ++j) {
            T acc(0);
            for (Index p = 0; p < x.cols; ++p) acc += xr[p] * (f.vt.data ? f.vt(p, j) : f.v(j, p));
            t[std::size_t(j)] = weights ? acc * weights[i] : acc;
        }
        T* yr = y.row(rows[i]);
        for (Index o = 0; o < y.cols; ++o) {
            T acc(0);
            for (Index j = 0; j < f.v.rows; ++j) acc += t[std::size_t(j)] * (f.ut_strips.data ? strip_at(f.ut_strips, f.v.rows, j, o) : f.u(o, j));
            yr[o] += f.alpha * acc;
        }
    }
}

/// Backward of gathered_apply for an upstream gradient dY (n × out):
///
///     T' = diag(w) X_ρ Vᵀ,  G' = diag(w) dY_ρ U,
///     dU (+)= α dY_ρᵀ T',   dV (+)= α G'ᵀ X_ρ,   dX[ρ_i] += α G'_i V   (if dx is given)
///
/// With `accumulate == false` dU and dV are overwritten (zero for an empty row set).
/// Cost: 4·m·w·(in + out) flops (+ 2·m·w·in for dX).
template <class T, class Arch = xsimd::default_arch>
void gathered_backward(MatrixView<const T> x, MatrixView<const T> dy, const GatheredFactors<T>& f,
                       RowSet rows, const T* weights, MatrixView<T> dv, MatrixView<T> du,
                       MatrixView<T>* dx, bool accumulate, GatherWorkspace<T>& ws) {
    const Index m = rows.count, in = x.cols, out = dy.cols, w = f.v.rows;
    LOWRANK_ASSERT(dv.rows == w && dv.cols == in && du.rows == out && du.cols == w);
    if (m == 0) {
        if (!accumulate) {
            eigen_map(dv).setZero();
            eigen_map(du).setZero();
        }
        return;
    }
    const bool gather = !rows.contiguous();
    const Index ld_in = detail::padded_ld<T, Arch>(in), ld_w = detail::padded_ld<T, Arch>(w),
                ld_out = detail::padded_ld<T, Arch>(out);
    const auto buf = ws.matrix(m, 2 * ld_w + (gather ? 2 * ld_in + ld_out : 0));
    const auto t = buf.block(0, 0, m, w), g = buf.block(0, ld_w, m, w);
    MatrixView<const T> xs, dys;
    MatrixView<T> dxg;
    if (gather) {
        const Index c0 = 2 * ld_w;
        const auto xg = buf.block(0, c0, m, in), dyg = buf.block(0, c0 + ld_in, m, out);
        dxg = buf.block(0, c0 + ld_in + ld_out, m, in);
        gather_rows<T>(x, rows, xg);
        gather_rows<T>(dy, rows, dyg);
        xs = xg;
        dys = dyg;
    } else {
        xs = x.middle_rows(rows.first, m);
        dys = dy.middle_rows(rows.first, m);
    }
    shrink<T, Arch>(xs, f.v, t);
    project_back<T, Arch>(dys, f.u, g);
    if (weights) {
        scale_rows(t, weights);
        scale_rows(g, weights);
    }
    grad_expand<T, Arch>(dys, t, du, f.alpha, accumulate);
    grad_shrink<T, Arch>(g, xs, dv, f.alpha, accumulate, ws.gemm());
    if (dx) {
        if (gather) {
            input_grad<T, Arch>(g, f.v, dxg, f.alpha, false, ws.gemm());
            scatter_add_rows<T, Arch>(dxg, rows, *dx);
        } else {
            input_grad<T, Arch>(g, f.v, dx->middle_rows(rows.first, m), f.alpha, true, ws.gemm());
        }
    }
}

/// Reference for gathered_backward: per row, plain loops.
template <class T>
void gathered_backward_ref(MatrixView<const T> x, MatrixView<const T> dy,
                           const GatheredFactors<T>& f, RowSet rows, const T* weights,
                           MatrixView<T> dv, MatrixView<T> du, MatrixView<T>* dx, bool accumulate) {
    const Index in = x.cols, out = dy.cols, w = f.v.rows;
    if (!accumulate) {
        for (Index j = 0; j < w; ++j) std::fill_n(dv.row(j), in, T(0));
        for (Index o = 0; o < out; ++o) std::fill_n(du.row(o), w, T(0));
    }
    std::vector<T> t(static_cast<std::size_t>(w)), g(static_cast<std::size_t>(w));
    for (Index i = 0; i < rows.count; ++i) {
        const T* xr = x.row(rows[i]);
        const T* dyr = dy.row(rows[i]);
        const T wi = weights ? weights[i] : T(1);
        for (Index j = 0; j < w; ++j) {
            T tj(0), gj(0);
            for (Index p = 0; p < in; ++p) tj += xr[p] * f.v(j, p);
            for (Index o = 0; o < out; ++o) gj += dyr[o] * f.u(o, j);
            t[std::size_t(j)] = wi * tj;
            g[std::size_t(j)] = wi * gj;
        }
        for (Index o = 0; o < out; ++o)
            for (Index j = 0; j < w; ++j) du(o, j) += f.alpha * dyr[o] * t[std::size_t(j)];
        for (Index j = 0; j < w; ++j)
            for (Index p = 0; p < in; ++p) dv(j, p) += f.alpha * g[std::size_t(j)] * xr[p];
        if (dx) {
            T* dxr = dx->row(rows[i]);
            for (Index p = 0; p < in; ++p) {
                T acc(0);
                for (Index j = 0; j < w; ++j) acc += g[std::size_t(j)] * f.v(j, p);
                dxr[p] += f.alpha * acc;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Many adapters: per-row index (BGMV) and segments (SGMV)
// ------------------------------------------------------------------------------------------------

/// BGMV: Y[t] += α_k (X[t] V_kᵀ) U_kᵀ with k = idx[t] (idx[t] < 0: row t untouched).
/// Rows are grouped by adapter first (counting sort), then each adapter runs once on its rows.
/// Every idx[t] must be < factors.size(). Cost: Σ_k 2·m_k·w_k·(in + out) flops + O(n + K).
template <class T, class Arch = xsimd::default_arch, class I>
void bgmv(MatrixView<const T> x, MatrixView<T> y, std::span<const GatheredFactors<T>> factors,
          std::span<const I> idx, GatherWorkspace<T>& ws) {
    LOWRANK_ASSERT(Index(idx.size()) == x.rows && y.rows == x.rows);
    const Index n_adapters = Index(factors.size());
    Index* order = ws.indices(x.rows + n_adapters + 1);
    Index* offsets = order + x.rows;
    group_rows<I>(idx, n_adapters, order, offsets);
    for (Index k = 0; k < n_adapters; ++k) {
        const Index m = offsets[k + 1] - offsets[k];
        if (m == 0) continue;
        const Index* rows = order + offsets[k];
        // A group whose rows happen to be consecutive is used in place.
        const RowSet set = rows[m - 1] - rows[0] == m - 1 ? RowSet{nullptr, rows[0], m}
                                                         : RowSet{rows, 0, m};
        gathered_apply<T, Arch>(x, y, factors[std::size_t(k)], set, nullptr, ws);
    }
}

/// Reference for bgmv: the naive per-row loop.
template <class T, class I>
void bgmv_ref(MatrixView<const T> x, MatrixView<T> y, std::span<const GatheredFactors<T>> factors,
              std::span<const I> idx) {
    for (Index t = 0; t < x.rows; ++t) {
        const I k = idx[std::size_t(t)];
        if (k < 0) continue;
        const Index row = t;
        gathered_apply_ref<T>(x, y, factors[std::size_t(k)], RowSet{&row, 0, 1}, nullptr);
    }
}

/// SGMV: rows [seg[s], seg[s+1]) use adapter `segment_adapter[s]` (< 0: none). `seg` holds
/// S + 1 nondecreasing offsets. Segments are used in place; an adapter named by several segments
/// is streamed once per segment.
template <class T, class Arch = xsimd::default_arch, class I>
void sgmv(MatrixView<const T> x, MatrixView<T> y, std::span<const GatheredFactors<T>> factors,
          std::span<const Index> seg, std::span<const I> segment_adapter, GatherWorkspace<T>& ws) {
    LOWRANK_ASSERT(seg.size() == segment_adapter.size() + 1);
    for (std::size_t s = 0; s < segment_adapter.size(); ++s) {
        const I k = segment_adapter[s];
        if (k < 0) continue;
        gathered_apply<T, Arch>(x, y, factors[std::size_t(k)], RowSet{nullptr, seg[s], seg[s + 1] - seg[s]},
                                nullptr, ws);
    }
}

/// Backward of bgmv: dV_k and dU_k (overwritten; zero for an adapter with no rows) and, if dx is
/// given, dX[t] += α_k (dY[t] U_k) V_k.
template <class T, class Arch = xsimd::default_arch, class I>
void bgmv_backward(MatrixView<const T> x, MatrixView<const T> dy,
                   std::span<const GatheredFactors<T>> factors, std::span<const I> idx,
                   std::span<const MatrixView<T>> dv, std::span<const MatrixView<T>> du,
                   MatrixView<T>* dx, GatherWorkspace<T>& ws) {
    const Index n_adapters = Index(factors.size());
    Index* order = ws.indices(x.rows + n_adapters + 1);
    Index* offsets = order + x.rows;
    group_rows<I>(idx, n_adapters, order, offsets);
    for (Index k = 0; k < n_adapters; ++k) {
        const Index m = offsets[k + 1] - offsets[k];
        const Index* rows = order + offsets[k];
        const RowSet set = m > 0 && rows[m - 1] - rows[0] == m - 1 ? RowSet{nullptr, rows[0], m}
                                                                  : RowSet{rows, 0, m};
        const auto kk = std::size_t(k);
        gathered_backward<T, Arch>(x, dy, factors[kk], set, nullptr, dv[kk], du[kk], dx, false, ws);
    }
}

/// Backward of sgmv: gradients accumulate over the segments of each adapter (overwritten first).
template <class T, class Arch = xsimd::default_arch, class I>
void sgmv_backward(MatrixView<const T> x, MatrixView<const T> dy,
                   std::span<const GatheredFactors<T>> factors, std::span<const Index> seg,
                   std::span<const I> segment_adapter, std::span<const MatrixView<T>> dv,
                   std::span<const MatrixView<T>> du, MatrixView<T>* dx, GatherWorkspace<T>& ws) {
    for (std::size_t k = 0; k < factors.size(); ++k) {
        eigen_map(dv[k]).setZero();
        eigen_map(du[k]).setZero();
    }
    for (std::size_t s = 0; s < segment_adapter.size(); ++s) {
        const I k = segment_adapter[s];
        if (k < 0) continue;
        const auto kk = std::size_t(k);
        gathered_backward<T, Arch>(x, dy, factors[kk], RowSet{nullptr, seg[s], seg[s + 1] - seg[s]},
                                   nullptr, dv[kk], du[kk], dx, true, ws);
    }
}

}  // namespace lowrank::core
