// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The low-rank operations every method is built from, on views:
///
///     shrink       T  = X Vᵀ            (n × w)   X: n × in,  V: w × in
///     expand       Y += α T Uᵀ          (n × out) U: out × w
///     project_back G  = dY U            (n × w)   dY: n × out
///     grad_expand  dU (+)= α dYᵀ T      (out × w)
///     grad_shrink  dV (+)= α Gᵀ X       (w × in)
///     input_grad   dX (+)= α G V        (n × in)
///     rank_update  W += α U V           (out × in)  (merge / unmerge)
///
/// Shapes are checked by LOWRANK_ASSERT only: these are the inner layer, called after the public
/// entry points have validated their arguments. None allocates except base_product (when its
/// GemmWorkspace must grow: a copy of a few rows of X, O(rows · in), gemm_packed's blocks, at
/// most (gemm_mc + gemm_nc) · gemm_kc, or gemm_stream_rows' packed rows of X and, for a batch of
/// several passes read once per group of rows (detail::grouped_rows), its partial sums,
/// out · min(rows, blocking::stream_group_rows)), rank_update (V in strips, O(r · in)), input_grad from
/// blocking::band_rows rows on (the same) and grad_shrink from blocking::band_width rows of dV on
/// (Gᵀ and a block of X in strips, O(w · n + n · band_cols)); the last two keep them in their
/// GemmWorkspace when given one; and base_input_grad (dX (+)= dY W) past blocking::sweep_ab_rows
/// rows (gemm_packed_ab's blocks, in its GemmWorkspace when given one). Aliasing: the destination
/// of each operation must not overlap any of its sources.

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "gemm.hpp"
#include "kernels.hpp"

namespace lowrank::core {

/// Y = X Wᵀ (the dense base product, PyTorch's `F.linear`). One row against a row-major W read
/// from memory (more than blocking::stream_aliased_bytes), and up to 4 such rows with 16
/// registers: gemm_dot_streams (4–8 rows of W side by side, each prefetching across the 4 KiB
/// pages the hardware prefetcher stops at; blocking::dot_streams_tile). Otherwise
/// gemm_stream_rows streams W (once per 4W rows on AVX-512, 3W with 16 registers; W: SIMD width;
/// a batch of several passes against a W read from memory, in double on AVX-512 and in either
/// type on AVX2: once per up to blocking::stream_group_rows rows, by blocks of k, and on AVX2
/// past stream_max_rows too, as for up to 192 rows against a W of 2 MiB or more in L3:
/// detail::grouped_rows) for every batch of 2 rows or more on AVX-512, and from 3W/2 + 1 rows in
/// float (4 from a W of more than 16 MiB; W in double) up to `blocking::stream_batch_vectors<T>` ·
/// W rows with 256-bit vectors (`blocking::stream_min_rows`, `stream_min_rows_large`, `stream_max_rows`); otherwise
/// from 2 to stream_weight_rows rows the dot kernel streams it once. One row of a W in cache:
/// gemv_rows (W row after row, one sequential stream) for a W of rows of 1–8 KiB and 2–8 MiB in all
/// (blocking::gemv_one_stream), otherwise Eigen's GEMV (a Zen 4 VM, the GEMV alone, 15
/// alternating rounds, time over Eigen's: 4 rows of W per tile, as gemm_dot takes one row, 0.90
/// at 1024² (W in L3), 1.08 at 2048²; 8 rows 0.98 / 1.05: neither ahead at every size; for W from
/// memory see blocking::dot_streams_tile). Beyond stream_weight_rows rows (16
/// registers only), gemm_packed (packing both operands into (gemm_mc + gemm_nc) × gemm_kc blocks,
/// BLIS-style). The copies and packed blocks live in `ws`, which grows as needed (no allocation
/// once it has grown to the shape).
template <class T, class Arch = xsimd::default_arch>
void base_product(MatrixView<const T> x, MatrixView<const T> w, MatrixView<T> y, GemmWorkspace<T>& ws) {
    LOWRANK_ASSERT(x.cols == w.cols && y.rows == x.rows && y.cols == w.rows);
    if (y.empty()) return;
    // The transposed product, the batch along the vectors (no reductions over k, W never copied,
    // read once per pass of blocking::stream_block_vectors vectors of rows of X). m × 4096², float,
    // kernel alone, ms: AVX-512 with the tiles of blocking::stream_tile, m = 2 / 4 / 8 / 16: 2.3 /
    // 2.5 / 3.0 / 3.6 against gemm_dot's 3.9 / 4.2 / 4.1–4.3 (m = 2, 4) and the former
    // one-row-per-lane tiles (m = 8, 16: 4.1–4.3); one row stays on Eigen's GEMV (1.96 vs 2.28). An
    // AVX2 build on the same machine (bench_core's forward, r = 16): n = 16 5.8–7.0 vs gemm_dot's
    // 8.1–10.1, n = 32 (two passes over W) 11.1–12.4 vs 15.2–17.8. The batches it takes, and the
    // measurements that set them: blocking::stream_min_rows (stream_min_rows_large for a W read
    // from memory), stream_max_rows.
    const bool from_memory = detail::rows_from_memory<T>(w.rows, w.cols);
    constexpr Index dot_rows = blocking::wide_register_file<Arch> ? 1 : blocking::dot_streams_max_rows;
    if (from_memory && x.rows <= dot_rows) {
        gemm_dot_streams<T, Arch>(x.rows, w.rows, x.cols, T(1), x.data, x.ld, w.data, w.ld, y.data, y.ld, false);
        return;
    }
    const Index stream_from = from_memory ? blocking::stream_min_rows_large<T, Arch> : blocking::stream_min_rows<T, Arch>;
    const bool grouped = detail::grouped_rows<T, Arch>(x.rows, w.rows, w.ld);  // any batch from stream_from on
    if (x.rows >= stream_from && (x.rows <= blocking::stream_max_rows<T, Arch> || grouped)) {
        gemm_stream_rows<T, Arch>(x.rows, w.rows, x.cols, T(1), x.data, x.ld, w.data, w.ld, y.data, y.ld, false, ws);
        return;
    }
    if (x.rows >= 2 && x.rows <= blocking::stream_weight_rows) {
        // Few rows: dot products that read each row of W from memory exactly once (GEMM
        // libraries re-pack W for every call; at small n that traffic dominates). The tiles re-read
        // X from L2 for every group of rows of W, so X is first copied into rows aligned to 64
        // bytes with a stride that is an odd multiple of 32 bytes: a vector load that straddles
        // two cache lines costs two (a dot tile in L1, k = 1024: 72 GFLOP/s with 32-byte-aligned
        // rows, 38–48 with rows 16 bytes off, as from a 16-byte-aligned allocation or a block of
        // columns), and rows 4 KiB apart share L1 sets. For aligned X (Eigen's own matrices) the
        // copy changes nothing measurable (16 × 4096 × 4096: 10.86 vs 10.82 ms); it costs
        // 2·n·in bytes of traffic against W's out·in.
        const Index ld = detail::padded_ld<T, Arch>(x.cols);
        T* xs = GemmWorkspace<T>::reserve(ws.a, x.rows * ld);
        for (Index i = 0; i < x.rows; ++i) std::copy_n(x.row(i), x.cols, xs + i * ld);
        gemm_dot<T, Arch>(x.rows, w.rows, x.cols, T(1), xs, ld, w.data, w.ld, y.data, y.ld, false);
        return;
    }
    if (x.rows == 1) {
        if (blocking::gemv_one_stream(w.rows, w.cols, Index(sizeof(T))))
            gemv_rows<T, Arch>(w.rows, w.cols, T(1), x.data, w.data, w.ld, y.data, false);
        else
            eigen_map(y).noalias() = eigen_map(x) * eigen_map(w).transpose();
        return;
    }
    gemm_packed<T, Arch>(x.rows, w.rows, x.cols, T(1), x.data, x.ld, w.data, w.ld, y.data, y.ld, false, ws);
}

/// The same with buffers of its own (allocated for this call).
template <class T, class Arch = xsimd::default_arch>
void base_product(MatrixView<const T> x, MatrixView<const T> w, MatrixView<T> y) {
    GemmWorkspace<T> ws;
    base_product<T, Arch>(x, w, y, ws);
}

/// dX (+)= dY W (the base part of the input gradient; W row-major out × in, read along its rows).
/// One row: Eigen's GEMV (W streamed once at the read bandwidth). Up to blocking::sweep_ab_rows
/// rows: gemm_bcast_sweep (W read once, in blocks of rows, no copy). More: gemm_packed_ab (BLIS
/// blocks, B packed from W's rows; its buffers in `ws`). Against Eigen's product, see
/// blocking::sweep_ab_rows.
template <class T, class Arch = xsimd::default_arch>
void base_input_grad(MatrixView<const T> dy, MatrixView<const T> w, MatrixView<T> dx, bool accumulate,
                     GemmWorkspace<T>& ws) {
    LOWRANK_ASSERT(dy.cols == w.rows && dx.rows == dy.rows && dx.cols == w.cols);
    if (dx.empty()) return;
    if (dy.rows == 1) {
        if (accumulate)
            eigen_map(dx).noalias() += eigen_map(dy) * eigen_map(w);
        else
            eigen_map(dx).noalias() = eigen_map(dy) * eigen_map(w);
        return;
    }
    if (dy.rows <= blocking::sweep_ab_rows)
        gemm_bcast_sweep<T, Arch>(dy.rows, w.cols, w.rows, T(1), dy.data, dy.ld, w.data, w.ld, dx.data, dx.ld,
                                  accumulate);
    else
        gemm_packed_ab<T, Arch>(dy.rows, w.cols, w.rows, T(1), dy.data, dy.ld, w.data, w.ld, dx.data, dx.ld,
                                accumulate, ws);
}

/// The same with buffers of its own (allocated for this call when gemm_packed_ab runs).
template <class T, class Arch = xsimd::default_arch>
void base_input_grad(MatrixView<const T> dy, MatrixView<const T> w, MatrixView<T> dx, bool accumulate) {
    GemmWorkspace<T> ws;
    base_input_grad<T, Arch>(dy, w, dx, accumulate, ws);
}

/// T = X Vᵀ. From 8 to 16 rows against a V of 32 rows or more on AVX-512
/// (blocking::stream_shrink), gemm_stream_rows' transposed product (V read once, row after row,
/// X grouped along k in passes of a 32 KiB stack buffer). With few rows (or any rows against a V
/// of half a vector of rows or fewer: blocking::packed_shrink), dot products along the input
/// features (gemm_dot: V read once, X once per block of its rows). With many rows, V is
/// transposed block by block into the 32 KiB stack buffer and the broadcast kernel runs over all
/// rows of X for each block (more FMAs per load; the copy costs w · in moves once per call,
/// amortised over the rows), the last w mod W outputs by dot products. With `accumulate`, T +=
/// X Vᵀ (a sum over blocks of the input features: lora_backward_delta).
template <class T, class Arch = xsimd::default_arch>
void shrink(MatrixView<const T> x, MatrixView<const T> v, MatrixView<T> t, bool accumulate = false) noexcept {
    LOWRANK_ASSERT(x.cols == v.cols && t.rows == x.rows && t.cols == v.rows);
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index n = x.rows, in = x.cols;
    Index w = v.rows;
    constexpr Index pack_elems = 32 * 1024 / Index(sizeof(T));
    alignas(64) std::array<T, pack_elems> packed;  // X grouped along k, or a block of Vᵀ (below)
    if (blocking::stream_shrink<Arch>(n, w)) {
        gemm_stream_rows_passes<T, Arch>(n, w, in, T(1), x.data, x.ld, v.data, v.ld, t.data, t.ld, accumulate,
                                         packed.data(), pack_elems);
        return;
    }
    if (!blocking::packed_shrink(n, w, W) || in == 0) {
        gemm_dot<T, Arch>(n, w, in, T(1), x.data, x.ld, v.data, v.ld, t.data, t.ld, accumulate);
        return;
    }
    // A rank that is not a multiple of W: its last w mod W outputs by dot products. In the
    // broadcast kernel a part of a vector costs a whole one (a zero-padded copy of the panel, or
    // AVX2's half vectors), so rank 17 cost more than rank 32. Alone, float, AVX-512, same run
    // (µs), in = 4096, n = 8: r = 17 54.7 → 12.1, 24 31.8 → 17.4, 65 127 → 60.0; n = 128: r = 17
    // 319 → 160, 24 279 → 224, 40 347 → 294; double, n = 8, r = 9 58.5 → 14.0 (n = 128, r = 28:
    // 465 → 519, the one shape measured slower).
    if (const Index rem = w % W; rem != 0 && w > rem) {
        w -= rem;
        gemm_dot<T, Arch>(n, rem, in, T(1), x.data, x.ld, v.row(w), v.ld, t.data + w, t.ld, accumulate);
    }
    const Index kb = std::max<Index>(1, pack_elems / w);
    for (Index p0 = 0; p0 < in; p0 += kb) {  // Vᵀ block: kc × w, row-major
        const Index kc = std::min(kb, in - p0);
        detail::transpose<T, Arch>(w, kc, v.data + p0, v.ld, packed.data(), w);
        gemm_bcast<T, Arch>(n, w, kc, T(1), x.data + p0, x.ld, 1, packed.data(), w, t.data, t.ld,
                            accumulate || p0 > 0);
    }
}

/// Y (+)= α T Uᵀ. U is stored out × w (PyTorch's `B`), so each block of its rows is transposed
/// into a stack buffer of 32 KiB (16 KiB of it up to 64 rows of T) and the broadcast kernel runs
/// over all rows of T for that block: U is read once per call whatever n is. The smaller blocks
/// for few rows keep a block of Uᵀ and the rows of Y it updates in L1 together (n = 16, r = 16:
/// 15 + 16 KiB, against 29 + 29 KiB in 32 KiB blocks); expand alone, float, 4096 outputs, medians
/// of 201, 32 → 16 KiB (µs): AVX-512 n = 16, r = 16 22.6 → 19.3 (1024 outputs 5.4 → 4.85), r = 8
/// 12.8 → 11.3, r = 64 76.5 → 63.5, n = 32 35.5 → 31.5, n = 64 60.1 → 59.4; AVX2 n = 16 29.5 →
/// 28.1–28.4, r = 64 102 → 94, n = 64 91.0 → 87.2; at n = 128 equal on AVX-512 (121–125 vs
/// 123) and 3–5% slower on AVX2 (182 → 187–191), which keeps 32 KiB there.
template <class T, class Arch = xsimd::default_arch>
void expand(MatrixView<const T> t, MatrixView<const T> u, MatrixView<T> y, T alpha = T(1),
            bool accumulate = true) noexcept {
    LOWRANK_ASSERT(t.cols == u.cols && y.rows == t.rows && y.cols == u.rows);
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr Index pack_elems = 32 * 1024 / Index(sizeof(T));
    const Index block_elems = t.rows <= 64 ? pack_elems / 2 : pack_elems;
    const Index max_w = block_elems / W;  // width of one pass: at least one vector of outputs
    const Index w = t.cols, out = u.rows;
    if (y.empty()) return;
    if (w == 0) {
        if (!accumulate)
            for (Index i = 0; i < y.rows; ++i) std::fill_n(y.row(i), y.cols, T(0));
        return;
    }
    if (blocking::narrow_dot(t.rows, w)) {  // too few rows to amortise a transposed copy
        gemm_dot_narrow<T, Arch>(t.rows, out, w, alpha, t.data, t.ld, u.data, u.ld, y.data, y.ld,
                                 accumulate);
        return;
    }
    alignas(64) std::array<T, pack_elems> packed;  // Uᵀ block: wc × ob, row-major, leading dimension ld
    for (Index p0 = 0; p0 < w; p0 += max_w) {
        const Index wc = std::min(max_w, w - p0);
        // The widest block whose padded rows fit, then blocks of equal width: ld an odd number of
        // vectors, so that the wc rows of a tile's panel fall in different L1 sets (at ld = 1024
        // floats they shared one with the rows of Y: expand alone, n = 16, r = 8, 1024², 2.59–2.63 →
        // 2.44–2.47 µs).
        const Index cap = std::max(W, (block_elems / wc / W - 1) / 2 * 2 * W + W);
        const Index blocks = (out + cap - 1) / cap;
        const Index ob = std::min(cap, ((out + blocks - 1) / blocks + W - 1) / W * W);
        const Index ld = (ob / W) % 2 == 0 ? ob + W : ob;
        for (Index o0 = 0; o0 < out; o0 += ob) {
            const Index obb = std::min(ob, out - o0);
            detail::transpose<T, Arch>(obb, wc, u.row(o0) + p0, u.ld, packed.data(), ld);
            gemm_bcast<T, Arch>(t.rows, obb, wc, alpha, t.data + p0, t.ld, 1, packed.data(), ld,
                                y.data + o0, y.ld, accumulate || p0 > 0);
        }
    }
}

namespace detail {

/// The blocks of the narrow paths below: calls f(o0, count, buffer, ld) for consecutive blocks
/// [o0, o0 + count) of n columns, count ≤ ld, with a 32 KiB stack buffer that holds a `rows` × ld
/// block; ld is an odd number of vectors (the block's rows then fall in different L1 sets), at
/// least one. The widest such block, not expand's blocks of equal width: with those, the backward
/// at n = 128, 1024², took 1.10× as long (r = 8: 95 → 106 µs, r = 16: 153 → 169; bench_lora).
template <class T, class Arch, class F>
void narrow_blocks(Index n, Index rows, F&& f) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr Index elems = 32 * 1024 / Index(sizeof(T));
    alignas(64) std::array<T, elems> buffer;
    const Index vectors = elems / std::max<Index>(rows, 1) / W;
    const Index ld = std::max<Index>(1, vectors % 2 == 0 ? vectors - 1 : vectors) * W;
    for (Index o0 = 0; o0 < n; o0 += ld) f(o0, std::min(ld, n - o0), buffer.data(), ld);
}

/// Whether project_back and grad_expand take the last rem = w mod W columns of a rank w out of
/// the broadcast kernel: when there is a partial vector past a full one, unless it is exactly half
/// an AVX-512 vector (gemm_bcast runs that on AVX2's vectors, no lane wasted: r = 24, float,
/// n = 1, out = 4096, project_back 6.2 µs so, 11.1 split, in two runs).
template <class T, class Arch>
[[nodiscard]] constexpr bool split_rank_tail(Index w, Index rem) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    return rem != 0 && w > rem && !(blocking::wide_register_file<Arch> && 2 * rem == W);
}

/// G = dY U by dot products along the outputs: Uᵀ copied block by block into a 32 KiB stack
/// buffer, gemm_dot reducing each row of dY against it.
template <class T, class Arch>
void project_back_dots(MatrixView<const T> dy, MatrixView<const T> u, MatrixView<T> g) noexcept {
    const Index w = u.cols;
    narrow_blocks<T, Arch>(u.rows, w, [&](Index p0, Index kc, T* packed, Index ld) {  // Uᵀ block: w × kc
        transpose<T, Arch>(kc, w, u.row(p0), u.ld, packed, ld);
        gemm_dot<T, Arch>(dy.rows, w, kc, T(1), dy.data + p0, dy.ld, packed, ld, g.data, g.ld, p0 > 0);
    });
}

/// dU (+)= α dYᵀ T as dUᵀ = α Tᵀ dY, block by block of outputs in a 32 KiB stack buffer (the
/// broadcast kernel along the outputs), transposed into dU (when accumulating, dU's block is
/// transposed in first).
template <class T, class Arch>
void grad_expand_transposed(MatrixView<const T> dy, MatrixView<const T> t, MatrixView<T> du, T alpha,
                            bool accumulate) noexcept {
    const Index w = t.cols;
    narrow_blocks<T, Arch>(dy.cols, w, [&](Index o0, Index oc, T* block, Index ld) {  // dUᵀ block: w × oc
        if (accumulate) transpose<T, Arch>(oc, w, du.row(o0), du.ld, block, ld);
        gemm_bcast<T, Arch>(w, oc, dy.rows, alpha, t.data, 1, t.ld, dy.data + o0, dy.ld, block, ld, accumulate);
        transpose<T, Arch>(w, oc, block, ld, du.row(o0), du.ld);
    });
}

}  // namespace detail

/// G = dY U (the gradient reaching the transformed shrink output). For a U of half a vector of
/// columns or fewer (rank 8 in float on AVX-512) and from blocking::narrow_project_rows rows of dY
/// on, dot products along the outputs (detail::project_back_dots, as the shrink does: the
/// broadcast kernel on U in place runs half-empty vectors). Otherwise the broadcast kernel, and
/// for a rank past one vector that is not a multiple of one, its last w mod W columns by dot
/// products (detail::split_rank_tail): a part of a vector costs the broadcast kernel a whole one
/// (and a zero-padded copy of U's columns, row by row). Alone, float, AVX-512, out = 4096, old and
/// new alternating, two runs (µs), r = 17: n = 1 24.1–32.4 → 5.9–7.9, n = 16 47.3–61.7 →
/// 20.4–22.5, n = 128 240–271 → 143–157 (r = 16: 2.6–3.2, 12.2–15.5, 98.5–119).
template <class T, class Arch = xsimd::default_arch>
void project_back(MatrixView<const T> dy, MatrixView<const T> u, MatrixView<T> g) noexcept {
    LOWRANK_ASSERT(dy.cols == u.rows && g.rows == dy.rows && g.cols == u.cols);
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index out = u.rows;
    Index w = u.cols;
    if (w > 0 && out > 0) {
        if (blocking::narrow_project(dy.rows, w, W)) {
            detail::project_back_dots<T, Arch>(dy, u, g);
            return;
        }
        if (const Index rem = w % W; detail::split_rank_tail<T, Arch>(w, rem)) {
            w -= rem;
            detail::project_back_dots<T, Arch>(dy, u.block(0, w, out, rem), g.block(0, w, g.rows, rem));
        }
    }
    gemm_bcast<T, Arch>(dy.rows, w, dy.cols, T(1), dy.data, dy.ld, 1, u.data, u.ld, g.data, g.ld, false);
}

/// dU (+)= α dYᵀ T. For a T of half a vector of columns or fewer from blocking::narrow_grad_rows
/// rows on, and of exactly one vector of columns from blocking::narrow_grad_rows_full<Arch> rows on,
/// along the outputs (detail::grad_expand_transposed); otherwise the broadcast kernel on dU in
/// place, and for a rank past one vector that is not a multiple of one, its last w mod W columns
/// along the outputs (a part of a vector costs the broadcast kernel a whole one). Same runs as
/// project_back, r = 17: n = 1 18.7–18.9 → 5.3–6.0, n = 16 46.5–64.2 → 26.6–29.8, n = 128
/// 391–455 → 212–239 µs (r = 16: 2.2–3.1, 22.0–27.2, 141–189).
template <class T, class Arch = xsimd::default_arch>
void grad_expand(MatrixView<const T> dy, MatrixView<const T> t, MatrixView<T> du, T alpha,
                 bool accumulate) noexcept {
    LOWRANK_ASSERT(dy.rows == t.rows && du.rows == dy.cols && du.cols == t.cols);
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index out = dy.cols;
    Index w = t.cols;
    if (w > 0 && out > 0) {
        if (blocking::narrow_grad<Arch>(dy.rows, w, W)) {
            detail::grad_expand_transposed<T, Arch>(dy, t, du, alpha, accumulate);
            return;
        }
        if (const Index rem = w % W; detail::split_rank_tail<T, Arch>(w, rem)) {
            w -= rem;
            detail::grad_expand_transposed<T, Arch>(dy, t.block(0, w, t.rows, rem), du.block(0, w, out, rem), alpha,
                                                    accumulate);
        }
    }
    gemm_bcast<T, Arch>(dy.cols, w, dy.rows, alpha, dy.data, 1, dy.ld, t.data, t.ld, du.data, du.ld, accumulate);
}

namespace detail {

/// C (+)= α U B for U with `depth` columns (row i at u + i·ldu) and B (depth × C's columns) in
/// strips: C in bands of blocking::sweep_mr rows across its full width, each tile reading its
/// panel of B as one contiguous run; PF: expand_sweep's prefetch of C ahead of the tiles. Out of
/// line (see gemm_block_panel): inlined into grad_shrink's loop over blocks of X, GCC 12 ran its
/// tiles 1.45× slower (grad_shrink, w = 64, n = 128, 4096²).
template <class T, class Arch, int PF = 0>
LOWRANK_NOINLINE void band_sweep(MatrixView<T> c, const T* u, Index ldu, Index depth, const StripPanel<T>& panel,
                                 T alpha, bool accumulate) {
    row_tiles<int(blocking::sweep_mr<Arch>)>(c.rows, [&](Index i, auto mr) {
        constexpr int MR = decltype(mr)::value;
        T* rows[MR];
        LOWRANK_UNROLL for (int q = 0; q < MR; ++q) rows[q] = c.row(i + q);
        expand_rows<MR, T, Arch, PF>(rows, 0, c.cols, depth, u + i * ldu, ldu, panel, alpha, accumulate);
    });
}

/// C (+)= α U V for a short shared dimension r ≤ blocking::short_k (U: m × r, V: r × cols, both
/// row-major): V is first copied into cache-line strips (r·cols values, in `strips`, grown as
/// needed) and C is swept in bands of blocking::sweep_mr rows across its full width, each tile
/// reading its panel of V as one contiguous run (a few sequential streams through C), rather than
/// the broadcast kernel on V in place, whose tiles read r rows of V a row length apart (at
/// lengths of a power of two, all in one L1 set). The merge and, for many rows, the input gradient.
template <class T, class Arch, int PF = 0>
void band_product(MatrixView<T> c, MatrixView<const T> u, MatrixView<const T> v, T alpha, bool accumulate,
                  std::vector<T, xsimd::aligned_allocator<T, 64>>& strips) {
    const Index r = u.cols;
    T* packed = GemmWorkspace<T>::reserve(strips, strip_rows<T>(r, c.cols) * strip_width<T>);
    pack_strips<T>(r, c.cols, v.data, v.ld, 1, packed);
    band_sweep<T, Arch, PF>(c, u.data, u.ld, r, StripPanel<T>(packed, r), alpha, accumulate);
}

}  // namespace detail

/// dV (+)= α Gᵀ X. From blocking::band_width rows of dV on (and up to blocking::band_depth rows of
/// X), Gᵀ is transposed once (ws.a) and X is copied block by block (blocking::band_cols columns
/// of all its rows, ws.b) into cache-line strips, each swept by bands of rows of dV: the
/// broadcast kernel on X in place reads n rows of X a row length apart per tile (at lengths of a
/// power of two, all in one L1 set). Same run, float, µs, in place → strips: w = 64, in = 4096:
/// n = 16 231 → 155, 32 402 → 299, 128 1681 → 1125; in = 1024, n = 128: 339 → 228. At w = 8
/// and 16 the two are within ±10% of each other (X is re-read per band either way), so narrow
/// factors keep the copy-free kernel.
template <class T, class Arch = xsimd::default_arch>
void grad_shrink(MatrixView<const T> g, MatrixView<const T> x, MatrixView<T> dv, T alpha, bool accumulate,
                 GemmWorkspace<T>& ws) {
    LOWRANK_ASSERT(g.rows == x.rows && dv.rows == g.cols && dv.cols == x.cols);
    const Index n = g.rows, w = g.cols, in = x.cols;
    if (w < blocking::band_width || n <= 1 || n > blocking::band_depth || in == 0) {
        gemm_bcast<T, Arch>(w, in, n, alpha, g.data, 1, g.ld, x.data, x.ld, dv.data, dv.ld, accumulate);
        return;
    }
    T* gt = GemmWorkspace<T>::reserve(ws.a, w * n);  // Gᵀ, w × n
    detail::transpose<T, Arch>(n, w, g.data, g.ld, gt, n);
    const Index cb = std::min(blocking::band_cols, in);
    T* strips = GemmWorkspace<T>::reserve(ws.b, strip_rows<T>(n, cb) * strip_width<T>);
    for (Index c0 = 0; c0 < in; c0 += cb) {
        const Index cw = std::min(cb, in - c0);
        pack_strips<T>(n, cw, x.data + c0, x.ld, 1, strips);
        detail::band_sweep<T, Arch>(dv.block(0, c0, w, cw), gt, n, n, detail::StripPanel<T>(strips, n), alpha,
                                    accumulate);
    }
}

/// The same with buffers of its own (allocated for this call when the strips are used).
template <class T, class Arch = xsimd::default_arch>
void grad_shrink(MatrixView<const T> g, MatrixView<const T> x, MatrixView<T> dv, T alpha, bool accumulate) {
    GemmWorkspace<T> ws;
    grad_shrink<T, Arch>(g, x, dv, alpha, accumulate, ws);
}

/// dX (+)= α G V. From blocking::band_rows rows of G on (and r ≤ blocking::short_k), the band
/// product on V in strips (kept in `ws.b`); below, the broadcast kernel on V in place, which
/// needs no copy. Same run, float, µs, in place → strips: n = 128, in = 4096, r = 16 346 → 242,
/// r = 64 1095 → 899; n = 32, r = 16 92.9 → 69.0; n = 16, in = 4096: r = 8 18.0 → 22.2,
/// r = 64 154 → 177 (the copy not amortised).
template <class T, class Arch = xsimd::default_arch>
void input_grad(MatrixView<const T> g, MatrixView<const T> v, MatrixView<T> dx, T alpha, bool accumulate,
                GemmWorkspace<T>& ws) {
    LOWRANK_ASSERT(g.cols == v.rows && dx.rows == g.rows && dx.cols == v.cols);
    if (g.rows >= blocking::band_rows && g.cols > 0 && g.cols <= blocking::short_k && !dx.empty()) {
        detail::band_product<T, Arch>(dx, g, v, alpha, accumulate, ws.b);
        return;
    }
    gemm_bcast<T, Arch>(g.rows, v.cols, g.cols, alpha, g.data, g.ld, 1, v.data, v.ld, dx.data,
                        dx.ld, accumulate);
}

/// The same with buffers of its own (allocated for this call when the band product is used).
template <class T, class Arch = xsimd::default_arch>
void input_grad(MatrixView<const T> g, MatrixView<const T> v, MatrixView<T> dx, T alpha, bool accumulate) {
    GemmWorkspace<T> ws;
    input_grad<T, Arch>(g, v, dx, alpha, accumulate, ws);
}

/// The backward of t = V x for one row x (in values, V: w × in) given g (w values, the gradient
/// reaching t): t = V x, dV = α g xᵀ and, if dx is not null, dx (+)= α Vᵀ g, in one sweep over
/// V: each block of blocking::row_backward_rows rows of V is read once, its rows of dV written
/// once, and dx (in values) read and written once per block. shrink, grad_shrink and input_grad
/// read V twice between them (t is formed before g exists upstream; dx needs g): for one row of
/// the LoRA backward, where each call streams a whole factor for few flops, that second read of A
/// was a fifth of the traffic (A read twice, B once, dA and dB written).
template <class T, class Arch = xsimd::default_arch>
void shrink_row_backward(const T* x, MatrixView<const T> v, const T* g, T alpha, T* t, MatrixView<T> dv, T* dx,
                         bool accumulate_dx) noexcept {
    LOWRANK_ASSERT(dv.rows == v.rows && dv.cols == v.cols);
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    const Index w = v.rows, in = v.cols;
    if (w == 0) {
        if (dx && !accumulate_dx) std::fill_n(dx, in, T(0));
        return;
    }
    const auto sweep = [&](auto with_dx) {
        constexpr bool DX = decltype(with_dx)::value;
        detail::row_tiles<blocking::row_backward_rows>(w, [&](Index j0, auto rows) {
            constexpr int R = decltype(rows)::value;
            const bool acc = accumulate_dx || j0 > 0;  // dx holds the blocks before this one
            const T* vr[R];
            T* dr[R];
            T gj[R];
            batch gb[R], dot[R];
            LOWRANK_UNROLL for (int q = 0; q < R; ++q) {
                vr[q] = v.row(j0 + q);
                dr[q] = dv.row(j0 + q);
                gj[q] = alpha * g[j0 + q];
                gb[q] = batch(gj[q]);
                dot[q] = batch(T(0));
            }
            Index c = 0;
            for (; c + W <= in; c += W) {
                const batch xv = batch::load_unaligned(x + c);
                batch d(T(0));
                if constexpr (DX)
                    if (acc) d = batch::load_unaligned(dx + c);
                LOWRANK_UNROLL for (int q = 0; q < R; ++q) {
                    const batch a = batch::load_unaligned(vr[q] + c);
                    dot[q] = xsimd::fma(a, xv, dot[q]);
                    (gb[q] * xv).store_unaligned(dr[q] + c);
                    if constexpr (DX) d = xsimd::fma(gb[q], a, d);
                }
                if constexpr (DX) d.store_unaligned(dx + c);
            }
            T tail[R] = {};
            for (; c < in; ++c) {
                T d = DX && acc ? dx[c] : T(0);
                LOWRANK_UNROLL for (int q = 0; q < R; ++q) {  // fused as the vectors are, in both sweeps
                    tail[q] = std::fma(vr[q][c], x[c], tail[q]);
                    dr[q][c] = gj[q] * x[c];
                    if constexpr (DX) d = std::fma(gj[q], vr[q][c], d);
                }
                if constexpr (DX) dx[c] = d;
            }
            LOWRANK_UNROLL for (int q = 0; q < R; ++q) t[j0 + q] = xsimd::hadd(dot[q]) + tail[q];
        });
    };
    if (dx)
        sweep(std::true_type());
    else
        sweep(std::false_type());
}

/// W += α U V (merge with α = s, unmerge with α = −s). ΔW is formed tile by tile in registers and
/// added to W in one read-modify-write pass; nothing of size out × in is allocated. For r ≤
/// blocking::short_k, the band product (V in strips, r·in values): merge at 4096², float, same
/// run: r = 16 18.9 → 8.5 ms, r = 64 53.1 → 30.3 ms against the broadcast kernel on V in place.
/// Each element of W takes one rounding (an FMA of α·(U V)ᵢⱼ, whose sum over r is formed the same
/// way for either sign of α), so merge then unmerge returns W within u(2|W| + |ΔW|).
template <class T, class Arch = xsimd::default_arch>
void rank_update(MatrixView<T> w, MatrixView<const T> u, MatrixView<const T> v, T alpha) {
    LOWRANK_ASSERT(u.cols == v.rows && w.rows == u.rows && w.cols == v.cols);
    const Index r = u.cols;
    if (w.empty() || r == 0) return;
    if (r > blocking::short_k) {
        gemm_bcast<T, Arch>(w.rows, w.cols, r, alpha, u.data, u.ld, 1, v.data, v.ld, w.data, w.ld, true);
        return;
    }
    std::vector<T, xsimd::aligned_allocator<T, 64>> strips;
    detail::band_product<T, Arch, blocking::update_prefetch_tiles>(w, u, v, alpha, true, strips);
}

}  // namespace lowrank::core
