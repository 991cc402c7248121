// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The packed GEMM of large batches, in the style of BLIS: C (+)= α A Bᵀ for a row-major A
/// (m × k, e.g. a batch X) and a row-major B (n × k, e.g. a weight W in nn.Linear layout).
///
///     for each block of nc columns of C (nc rows of B):
///       for each pass of kc over k:
///         pack B's block into micro-panels of nr = 2 vectors of columns (kc × nr each, L1-sized)
///         for each block of mc rows of C:
///           pack A's block into micro-panels of mr rows (kc × mr each; the block L2-sized)
///           for each micro-panel of B, for each micro-panel of A: the mr × nr micro-kernel
///
/// The micro-kernel is the broadcast tile of the other kernels (blocking::gemm_mr<Arch> rows × 2
/// vectors: 12 accumulators on 16 registers, 24 on AVX-512's 32) reading both operands as
/// contiguous packed streams. The block sizes and where they come from are in `blocking`
/// (gemm_mc, gemm_kc, gemm_nc).

#include <algorithm>
#include <vector>

#include "kernels.hpp"

namespace lowrank::core {

namespace detail {

/// Packs rows [0, mc) × columns [0, kc) of a row-major A (lda) into ⌈mc / MR⌉ micro-panels of
/// kc × MR values, dst[p·MR + i] = A(i0 + i, p); rows past mc are zero.
template <int MR, class T>
void pack_gemm_a(Index mc, Index kc, const T* a, Index lda, T* dst) noexcept {
    for (Index i0 = 0; i0 < mc; i0 += MR, dst += kc * MR) {
        const Index rows = std::min<Index>(MR, mc - i0);
        const T* src[MR];
        for (int i = 0; i < MR; ++i) src[i] = a + (i0 + std::min<Index>(i, rows - 1)) * lda;
        if (rows == MR) {
            for (Index p = 0; p < kc; ++p)
                LOWRANK_UNROLL for (int i = 0; i < MR; ++i) dst[p * MR + i] = src[i][p];
        } else {
            for (Index p = 0; p < kc; ++p)
                for (int i = 0; i < MR; ++i) dst[p * MR + i] = i < rows ? src[i][p] : T(0);
        }
    }
}

/// Packs rows [0, nc) × columns [0, kc) of a row-major B (ldb) as ⌈nc / NR⌉ micro-panels of Bᵀ,
/// kc × NR values each, dst[p·NR + j] = B(j0 + j, p) (NR = NV vectors); columns of Bᵀ past nc
/// are zero. Full W × W blocks go through transpose_tile.
template <int NV, class T, class Arch>
void pack_gemm_b(Index nc, Index kc, const T* b, Index ldb, T* dst) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size, NR = NV * W;
    const Index kv = kc / W * W;
    for (Index j0 = 0; j0 < nc; j0 += NR, dst += kc * NR) {
        const Index cols = std::min<Index>(NR, nc - j0);
        Index jj = 0;
        for (; jj + W <= cols; jj += W) {
            const T* src = b + (j0 + jj) * ldb;
            for (Index p = 0; p < kv; p += W) transpose_tile<T, Arch>(src + p, ldb, dst + p * NR + jj, NR);
            for (Index p = kv; p < kc; ++p)
                for (Index j = 0; j < W; ++j) dst[p * NR + jj + j] = src[j * ldb + p];
        }
        for (Index p = 0; p < kc; ++p)
            for (Index j = jj; j < NR; ++j) dst[p * NR + j] = j < cols ? b[(j0 + j) * ldb + p] : T(0);
    }
}

/// Packs rows [0, kc) × columns [0, nc) of a row-major B (k × n, ldb: a product A B, not A Bᵀ)
/// as ⌈nc / NR⌉ micro-panels of kc × NR values, dst[p·NR + j] = B(p, j0 + j) (NR = NV vectors):
/// a copy, row after row of B (each row's nc values read as one run), into the panels side by
/// side; columns past nc are zero.
template <int NV, class T, class Arch>
void pack_gemm_b_rows(Index nc, Index kc, const T* b, Index ldb, T* dst) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size, NR = NV * W;
    const Index full = nc / NR * NR;
    for (Index p = 0; p < kc; ++p) {
        const T* src = b + p * ldb;
        T* out = dst + p * NR;
        Index j0 = 0;
        for (; j0 < full; j0 += NR, out += kc * NR)
            LOWRANK_UNROLL for (int v = 0; v < NV; ++v)
                batch::load_unaligned(src + j0 + v * W).store_aligned(out + v * W);
        if (j0 < nc)
            for (Index j = 0; j < NR; ++j) out[j] = j0 + j < nc ? src[j0 + j] : T(0);
    }
}

/// The micro-kernel: C[0..MR, 0..cols) (+)= α · A · B over kc steps, A a packed micro-panel (row
/// i of step p at ap[p·lda + i], lda ≥ MR: the last rows of a block take a tile of exactly their
/// count), B a packed micro-panel of NV contiguous vectors (step p at bp + p·ldb); only the first
/// `cols` columns of C are written.
template <int MR, int NV, class T, class Arch>
LOWRANK_TILE_INLINE void gemm_micro(Index kc, const T* ap, Index lda, const T* bp, Index ldb, T* c, Index ldc,
                                    Index cols, T alpha, bool accumulate) noexcept {
    xsimd::batch<T, Arch> acc[MR][NV];
    bcast_accumulate<MR, NV, NV, T, Arch>(kc, [&](int i, Index p) { return ap[p * lda + i]; }, bp, ldb, 0, acc);
    store_tile<MR, NV, T, Arch>(acc, [&](int i) { return c + i * ldc; }, alpha, accumulate, cols);
}

/// All mc rows of a packed block of A (micro-panels of blocking::gemm_mr<Arch> rows, kc steps
/// each) against one packed panel of B `width` columns wide (step p at bp + p·ldb), in tiles of
/// NV vectors. Out of line: inlined into gemm_packed, GCC 12 spilled one of the micro-kernel's
/// two panel vectors to the stack (forward n = 128, 1024², r = 16: 3.4 → 5.1 ms).
template <int NV, class T, class Arch>
LOWRANK_NOINLINE void gemm_block_panel(Index mc, Index kc, const T* ap, const T* bp, Index ldb, Index width, T* c,
                                       Index ldc, T alpha, bool accumulate) noexcept {
    constexpr Index NR = NV * xsimd::batch<T, Arch>::size;
    constexpr int MR = int(blocking::gemm_mr<Arch>);
    for (Index j = 0; j < width; j += NR)
        row_tiles<MR>(mc, [&](Index ir, auto mr) {
            constexpr int R = decltype(mr)::value;
            gemm_micro<R, NV, T, Arch>(kc, ap + ir * kc, MR, bp + j, ldb, c + ir * ldc + j, ldc,
                                       std::min(NR, width - j), alpha, accumulate);
        });
}

}  // namespace detail

/// Scratch of gemm_packed: the packed blocks of A and B (reused across calls by a caller that
/// keeps it; at most (gemm_mc + gemm_nc) · gemm_kc values).
template <class T>
struct GemmWorkspace {
    std::vector<T, xsimd::aligned_allocator<T, 64>> a, b;
    /// Makes `v` hold at least `count` values; never shrinks (a buffer that alternates between
    /// two sizes is neither reallocated nor refilled).
    static T* reserve(std::vector<T, xsimd::aligned_allocator<T, 64>>& v, Index count) {
        if (v.size() < static_cast<std::size_t>(count)) v.resize(static_cast<std::size_t>(count));
        return v.data();
    }
};

namespace detail {

/// gemm_packed (B_ROWS = false: B n × k, the product A Bᵀ) and gemm_packed_ab (B_ROWS = true: B
/// k × n, the product A B): the same blocks and micro-kernel, B's blocks packed by transposing
/// (pack_gemm_b) or by copying its rows (pack_gemm_b_rows).
template <bool B_ROWS, class T, class Arch>
void gemm_packed_blocks(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                        Index ldc, bool accumulate, GemmWorkspace<T>& ws) {
    constexpr int MR = int(blocking::gemm_mr<Arch>);
    constexpr Index NR = 2 * xsimd::batch<T, Arch>::size;
    if (trivial_product(m, n, k, c, ldc, accumulate)) return;
    const Index kc_max = std::min(blocking::gemm_kc, k);
    const Index mc_max = std::min((m + MR - 1) / MR * MR, blocking::gemm_mc<T> / MR * MR);
    const Index nc_max = std::min((n + NR - 1) / NR * NR, std::max(NR, blocking::gemm_nc<T> / NR * NR));
    T* ap = GemmWorkspace<T>::reserve(ws.a, mc_max * kc_max);
    T* bp = GemmWorkspace<T>::reserve(ws.b, nc_max * kc_max);
    for (Index jc = 0; jc < n; jc += nc_max) {
        const Index nc = std::min(nc_max, n - jc);
        for (Index pc = 0; pc < k; pc += kc_max) {
            const Index kc = std::min(kc_max, k - pc);
            const bool acc = accumulate || pc > 0;
            if constexpr (B_ROWS)
                pack_gemm_b_rows<2, T, Arch>(nc, kc, b + pc * ldb + jc, ldb, bp);
            else
                pack_gemm_b<2, T, Arch>(nc, kc, b + jc * ldb + pc, ldb, bp);
            for (Index ic = 0; ic < m; ic += mc_max) {
                const Index mc = std::min(mc_max, m - ic);
                pack_gemm_a<MR, T>(mc, kc, a + ic * lda + pc, lda, ap);
                for (Index jr = 0; jr < nc; jr += NR)
                    gemm_block_panel<2, T, Arch>(mc, kc, ap, bp + jr * kc, NR, std::min(NR, nc - jr),
                                                 c + ic * ldc + jc + jr, ldc, alpha, acc);
            }
        }
    }
}

}  // namespace detail

/// C (+)= α A Bᵀ: C m × n (ldc), A m × k (lda), B n × k (ldb), all row-major. With `accumulate ==
/// false` C is overwritten (it may hold garbage on entry); k = 0 then sets it to zero.
/// Cost: 2·m·n·k flops; A is packed ⌈n / gemm_nc⌉ times, B once.
template <class T, class Arch = xsimd::default_arch>
void gemm_packed(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                 Index ldc, bool accumulate, GemmWorkspace<T>& ws) {
    detail::gemm_packed_blocks<false, T, Arch>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate, ws);
}

/// C (+)= α A B: C m × n (ldc), A m × k (lda), B k × n (ldb), all row-major (the input gradient dY
/// W of a weight in nn.Linear layout). gemm_packed with B's blocks packed from its rows. Same
/// arguments and cost.
template <class T, class Arch = xsimd::default_arch>
void gemm_packed_ab(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                    Index ldc, bool accumulate, GemmWorkspace<T>& ws) {
    detail::gemm_packed_blocks<true, T, Arch>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate, ws);
}

/// C (+)= α A B for a few rows of A (m × k, lda) against a large row-major B (k × n, ldb): the
/// input gradient dY W of a small batch (blocking::sweep_ab_rows). B is read once, in blocks of
/// blocking::sweep_kc consecutive rows (one run of memory when its rows are contiguous), each
/// swept across its full width in tiles of blocking::sweep_mr rows of C × expand_nv vectors (8 × 3
/// with 32 registers, 6 × 2 with 16): for each tile of columns, every tile of rows of C runs
/// against the block's strip of B while it is in L1, C read and written once per block of B. No
/// copy of either operand. The last n mod W columns: gemm_bcast.
template <class T, class Arch = xsimd::default_arch>
void gemm_bcast_sweep(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                      Index ldc, bool accumulate) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr int MR = int(blocking::sweep_mr<Arch>), NV = detail::expand_nv<MR>;
    if (detail::trivial_product(m, n, k, c, ldc, accumulate)) return;
    const Index n_full = n / W * W;
    for (Index pc = 0; pc < k; pc += blocking::sweep_kc) {
        const Index kc = std::min(blocking::sweep_kc, k - pc);
        const bool acc = accumulate || pc > 0;
        const auto columns = [&](Index j, auto nv) {  // one tile of columns, all rows of C
            constexpr int V = decltype(nv)::value;
            detail::row_tiles<MR>(m, [&](Index i, auto mr) {
                detail::bcast_tile<decltype(mr)::value, V, T, Arch>(kc, alpha, a + i * lda + pc, lda, 1,
                                                                    b + pc * ldb + j, ldb, c + i * ldc + j, ldc, acc,
                                                                    V * W);
            });
        };
        Index j = 0;
        for (; j + NV * W <= n_full; j += NV * W) columns(j, std::integral_constant<int, NV>());
        for (; j < n_full; j += W) columns(j, std::integral_constant<int, 1>());
    }
    if (n_full < n)
        gemm_bcast<T, Arch>(m, n - n_full, k, alpha, a, lda, 1, b + n_full, ldb, c + n_full, ldc, accumulate);
}

namespace detail {

/// The G values at p repeated across a vector: G = 1 is a broadcast (on AVX-512 folded into the
/// FMA); G = 2, 4 (AVX-512 only) one 8-, 16- or 32-byte broadcast load.
template <Index G, class T, class Arch>
LOWRANK_TILE_INLINE xsimd::batch<T, Arch> broadcast_group(const T* p) noexcept {
    if constexpr (G == 1) {
        return xsimd::batch<T, Arch>(*p);
    } else {
#if XSIMD_WITH_AVX512F
        static_assert(std::is_base_of_v<xsimd::avx512f, Arch>, "broadcast_group: groups need AVX-512");
        constexpr Index bytes = G * Index(sizeof(T));
        __m512 v;
        if constexpr (bytes == 32) {
            v = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(p))));
        } else if constexpr (bytes == 16) {
            v = _mm512_broadcast_f32x4(_mm_loadu_ps(reinterpret_cast<const float*>(p)));
        } else {
            static_assert(bytes == 8, "broadcast_group: 8, 16 or 32 bytes");
            double d;
            std::memcpy(&d, p, 8);
            v = _mm512_castpd_ps(_mm512_set1_pd(d));
        }
        if constexpr (std::is_same_v<T, float>)
            return v;
        else
            return _mm512_castps_pd(v);
#else
        static_assert(G == 1, "broadcast_group: groups need AVX-512");
        return {};
#endif
    }
}

/// One tile of gemm_stream_rows: MR rows of B (row i at b + i·ldb) over `groups` groups of G
/// steps of k, then `rem` < G steps more. A is packed as groups of NV vectors (ag: group q at
/// ag + q·NV·W), lane r·G + g of vector v holding A(v·R + r, q·G + g) (R = W / G rows of A per
/// vector); each group of G values of a row of B is broadcast to the R lane groups, so acc[i][v]
/// lane r·G + g sums B(i, p) · A(v·R + r, p) over the steps p ≡ g (mod G). B's rows are read once,
/// sequentially; with AHEAD > 0, each cache line of them first prefetches the line AHEAD lines
/// further along the same row into L1 (the G = 2, 8 × 2 tile at m = 16, 4096², whose MR rows are
/// a power-of-two stride apart: 1.13× the former tile's time without it, 0.96–0.97× with it into
/// L2, 0.94–0.95× of that into L1; see blocking::stream_tile); with FAR > 0, into L2 the line FAR
/// bytes further along (a B read from memory: blocking::stream_far_rows); given `next` (P = const
/// T*), into L2 the line at the same place of row i of `next` (ldb apart: the next tile's rows, in
/// stream_rows_grouped: X Wᵀ alone, m = 128, 4096², double, 6 × 4 tiles, 0.95× the time without).
template <int MR, int NV, Index G, Index AHEAD, class T, class Arch, Index FAR = 0, class P = std::nullptr_t>
LOWRANK_TILE_INLINE void stream_rows_tile(Index groups, Index rem, const T* b, Index ldb, const T* ag,
                                          xsimd::batch<T, Arch> (&acc)[MR][NV], P next = nullptr) noexcept {
    constexpr bool NEXT = !std::is_same_v<P, std::nullptr_t>;
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = batch(T(0));
    auto step = [&](const T* bq, Index ldq, const T* aq) {
        batch x[NV];
        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) x[v] = batch::load_aligned(aq + v * W);
        LOWRANK_UNROLL for (int i = 0; i < MR; ++i) {
            const batch bi = broadcast_group<G, T, Arch>(bq + i * ldq);
            LOWRANK_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = xsimd::fma(bi, x[v], acc[i][v]);
        }
    };
    Index q = 0;
    if constexpr (AHEAD > 0 || FAR > 0 || NEXT) {
        constexpr Index L = 64 / (G * Index(sizeof(T)));  // groups per cache line of a row
        for (; q + (AHEAD + 1) * L <= groups; q += L) {
            if constexpr (NEXT)
                LOWRANK_UNROLL for (int i = 0; i < MR; ++i) LOWRANK_PREFETCH_L2(next + i * ldb + q * G);
            if constexpr (AHEAD > 0)
                LOWRANK_UNROLL for (int i = 0; i < MR; ++i) LOWRANK_PREFETCH_L1(b + i * ldb + (q + AHEAD * L) * G);
            if constexpr (FAR > 0)
                LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
                    LOWRANK_PREFETCH_L2(reinterpret_cast<const char*>(b + i * ldb + q * G) + FAR);
            LOWRANK_UNROLL for (Index l = 0; l < L; ++l) step(b + (q + l) * G, ldb, ag + (q + l) * NV * W);
        }
    }
    for (; q < groups; ++q) step(b + q * G, ldb, ag + q * NV * W);
    if constexpr (G > 1) {
        if (rem > 0) {
            alignas(64) T tail[MR][G] = {};
            for (int i = 0; i < MR; ++i)
                for (Index g = 0; g < rem; ++g) tail[i][g] = b[i * ldb + groups * G + g];
            step(&tail[0][0], G, ag + groups * NV * W);
        }
    } else {
        (void)rem;
    }
}

/// Values of A that stream_rows_block packs for k steps with the stream_tile `Tile`.
template <class Tile, class T, class Arch>
[[nodiscard]] constexpr Index stream_packed_size(Index k) noexcept {
    return (k + Tile::g - 1) / Tile::g * Tile::nv * Index(xsimd::batch<T, Arch>::size);
}

/// Whether n rows of B, ldb values apart, span more than blocking::stream_aliased_bytes, so that
/// they are read from memory, not L3, between calls.
template <class T>
[[nodiscard]] constexpr bool rows_from_memory(Index n, Index ldb) noexcept {
    return n * ldb * Index(sizeof(T)) > blocking::stream_aliased_bytes;
}

/// Whether gemm_stream_rows takes a batch of m rows (more than one pass) against the n rows of B,
/// ldb values apart, through stream_rows_grouped (blocking::stream_grouped): B read from memory,
/// or with 16 registers a B in L3 (blocking::stream_group_l3_bytes) against a batch past
/// blocking::stream_max_rows (which would go to gemm_packed) of up to stream_group_l3_rows rows.
template <class T, class Arch>
[[nodiscard]] constexpr bool grouped_rows(Index m, Index n, Index ldb) noexcept {
    if constexpr (!blocking::stream_grouped<T, Arch>) {
        return false;
    } else {
        if (rows_from_memory<T>(n, ldb)) return true;
        return !blocking::wide_register_file<Arch> && m > blocking::stream_max_rows<T, Arch> &&
               m <= blocking::stream_group_l3_rows && n * ldb * Index(sizeof(T)) >= blocking::stream_group_l3_bytes;
    }
}

/// Whether the n rows of B, ldb values apart, stream from memory into L1 sets they share
/// (blocking::stream_tiles::two_aliased).
template <class T>
[[nodiscard]] constexpr bool aliased_rows(Index n, Index ldb) noexcept {
    return ldb * Index(sizeof(T)) % blocking::l1_set_span == 0 && rows_from_memory<T>(n, ldb);
}

/// Calls f(tile) with the blocking::stream_tile of a block of m ≤ 4W rows of A against B's n rows,
/// ldb values apart (up to 4 rows against a B read from memory: blocking::stream_tiles::few_far).
/// Against a B read from memory every tile but few_far, five_halves and those of 5–6 rows on
/// AVX-512, and every one but the 3 × 4 (four) with 16 registers, is taken as stream_tiles::near
/// (its rows of B prefetching into L1, not into L2).
template <class T, class Arch, class F>
void with_stream_tile(Index m, Index n, Index ldb, F&& f) {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    using tiles = blocking::stream_tiles<Arch>;
    const bool from_memory = rows_from_memory<T>(n, ldb);
    const auto near = [&](auto tile) {
        using t = decltype(tile);
        return from_memory ? f(typename tiles::template near<t>()) : f(t());
    };
    if constexpr (blocking::wide_register_file<Arch>) {  // 24–25 accumulators: not instantiated below
        using few = typename tiles::template few_far<T>;
        if (m <= few::nv * W / few::g && from_memory) return f(few());
        if (m > 3 * W) return near(typename tiles::four());
        if (m > 2 * W && 2 * m <= 5 * W) return f(typename tiles::five_halves());
        if (m > 2 * W) return near(typename tiles::three());
        // Five or three vectors, or one of W/8 rows, where the range's tile below would leave
        // lanes empty; two of W/8 rows (float), where it would broadcast once per FMA
        // (blocking::stream_tile).
        if (m > W && 4 * m <= 5 * W) return near(typename tiles::five_quarters());
        if (m > W && 2 * m <= 3 * W) return near(typename tiles::three_halves());
        if constexpr (sizeof(T) == 4) {  // groups of 8 steps: 32 bytes of float (64 of double)
            if (8 * m > 3 * W && 4 * m <= 3 * W && from_memory) {  // 7–12 rows
                if (2 * m > W) return near(typename tiles::three_quarters());
                return near(typename tiles::half());
            }
            if (2 * m > W && 8 * m <= 5 * W) return f(typename tiles::five_eighths());
        }
        if (2 * m > W && 4 * m <= 3 * W) return f(typename tiles::three_quarters());
        if constexpr (sizeof(T) == 4) {
            if (4 * m > W && 8 * m <= 3 * W) return f(typename tiles::three_eighths());
            if (8 * m <= W) return f(typename tiles::eighth());
            if (4 * m <= W) return f(typename tiles::two_eighths());
        }
    }
    if (m > 3 * W)  // 16 registers: 12 accumulators, 4 loads and 3 broadcasts per step
        f(typename tiles::four());
    else if (m > 2 * W)  // 12 accumulators, 3 loads and 4 broadcasts per step
        near(typename tiles::three());
    else if (m <= W / 4)
        near(typename tiles::quarter());
    else if (m <= W / 2)
        near(typename tiles::half());
    else if (m <= W)
        near(typename tiles::one());
    else if (aliased_rows<T>(n, ldb))
        near(typename tiles::two_aliased());
    else
        near(typename tiles::two());
}

#if XSIMD_WITH_AVX512F
/// Transposes C × C chunks of 64 / C bytes (C = 4: 16-byte chunks, C = 8: 8-byte chunks) held in
/// C registers: on entry r[c] holds chunks 0..C of row c, on return r[c] holds chunk c of rows
/// 0..C. Moves bits only (the chunks may hold floats or doubles).
template <int C>
LOWRANK_TILE_INLINE void transpose_chunks(__m512 (&r)[C]) noexcept {
    if constexpr (C == 4) {
        const __m512 t0 = _mm512_shuffle_f32x4(r[0], r[1], 0x44), t1 = _mm512_shuffle_f32x4(r[0], r[1], 0xEE);
        const __m512 t2 = _mm512_shuffle_f32x4(r[2], r[3], 0x44), t3 = _mm512_shuffle_f32x4(r[2], r[3], 0xEE);
        r[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
        r[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
        r[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
        r[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
    } else {
        static_assert(C == 8, "transpose_chunks: 4 or 8 chunks");
        __m512d e[8], o[4], q[4];
        // Pairs of rows interleaved: lane L of e[2p] holds chunk 2L of rows 2p, 2p + 1; of e[2p + 1], chunk 2L + 1.
        for (int p = 0; p < 4; ++p) {
            e[2 * p] = _mm512_unpacklo_pd(_mm512_castps_pd(r[2 * p]), _mm512_castps_pd(r[2 * p + 1]));
            e[2 * p + 1] = _mm512_unpackhi_pd(_mm512_castps_pd(r[2 * p]), _mm512_castps_pd(r[2 * p + 1]));
        }
        for (int h = 0; h < 2; ++h) {  // h = 0: the even chunks, 1: the odd ones
            o[0] = _mm512_shuffle_f64x2(e[h], e[2 + h], 0x44);  // lanes 0, 1 of pairs 0 and 1
            o[1] = _mm512_shuffle_f64x2(e[h], e[2 + h], 0xEE);  // lanes 2, 3
            o[2] = _mm512_shuffle_f64x2(e[4 + h], e[6 + h], 0x44);
            o[3] = _mm512_shuffle_f64x2(e[4 + h], e[6 + h], 0xEE);
            q[0] = _mm512_shuffle_f64x2(o[0], o[2], 0x88);  // lane 0 of the four pairs: chunk h
            q[1] = _mm512_shuffle_f64x2(o[0], o[2], 0xDD);  // lane 1: chunk 2 + h
            q[2] = _mm512_shuffle_f64x2(o[1], o[3], 0x88);  // chunk 4 + h
            q[3] = _mm512_shuffle_f64x2(o[1], o[3], 0xDD);  // chunk 6 + h
            for (int l = 0; l < 4; ++l) r[2 * l + h] = _mm512_castpd_ps(q[l]);
        }
    }
}
#endif

/// Packs A (m × k) for the stream tiles of G > 1 steps per lane group: ag[q·ld + i·G + g] =
/// A(i, q·G + g), zero past row m and past step k (ld ≥ m·G values per group). A copy of G-value
/// chunks, transposed. On AVX-512, chunks of 16 bytes (float G = 4, double G = 2) or 8 bytes (float
/// G = 2) go C rows × C chunks at a time through registers (C = 64 / chunk bytes; missing rows as
/// zero rows, so whole 64-byte lines are stored); the groups past the last C and the k tail, row by
/// row. Row by row alone (the former copy: one chunk at a time along each row, after zeroing all
/// of ag) packed 16 × 4096 floats at 14 GB/s, 15 µs of the 34 µs of a shrink X Vᵀ (X 16 × 4096,
/// V 16 × 4096) on the stream kernel, this Zen 4 VM; in registers, without the zeroing pass, 5 µs.
template <Index G, class T, class Arch>
void pack_groups(Index m, Index k, const T* a, Index lda, T* ag, Index ld) noexcept {
    const Index groups = k / G, rem = k % G, stored = (k + G - 1) / G;
    Index q0 = 0, rows = 0;  // groups [0, q0) done for rows [0, rows), zero rows included
#if XSIMD_WITH_AVX512F
    constexpr Index bytes = G * Index(sizeof(T));
    if constexpr (std::is_base_of_v<xsimd::avx512f, Arch> && (bytes == 16 || bytes == 8)) {
        constexpr int C = int(64 / bytes);
        q0 = groups / C * C;
        rows = (m + C - 1) / C * C;
        LOWRANK_ASSERT(rows * G <= ld);
        for (Index i = 0; i < m; i += C) {
            for (Index q = 0; q < q0; q += C) {
                __m512 r[C];
                LOWRANK_UNROLL for (int c = 0; c < C; ++c)
                    r[c] = i + c < m ? _mm512_loadu_ps(a + (i + c) * lda + q * G) : _mm512_setzero_ps();
                transpose_chunks<C>(r);
                LOWRANK_UNROLL for (int c = 0; c < C; ++c) _mm512_storeu_ps(ag + (q + c) * ld + i * G, r[c]);
            }
        }
    }
#endif
    for (Index q = 0; q < q0; ++q) std::fill(ag + q * ld + rows * G, ag + (q + 1) * ld, T(0));
    std::fill(ag + q0 * ld, ag + stored * ld, T(0));
    for (Index i = 0; i < m; ++i) {
        const T* src = a + i * lda;
        T* dst = ag + i * G;
        for (Index q = q0; q < groups; ++q)
            LOWRANK_UNROLL for (Index g = 0; g < G; ++g) dst[q * ld + g] = src[q * G + g];
        for (Index g = 0; g < rem; ++g) dst[groups * ld + g] = src[groups * G + g];
    }
}

/// Calls f(i0, rows) for consecutive parts of m rows, ⌈m / W⌉ vectors, in as few parts of at most
/// `per` vectors as allow, the vectors shared evenly among them (e.g. 6 = 3 + 3, not 4 + 2: the
/// 3-vector stream tile runs as fast per row as the 4-vector one, the 2-vector one slower); every
/// part but the last starts and ends on a whole vector.
template <class F>
void split_vectors(Index m, Index W, Index per, F&& f) {
    const Index vectors = (m + W - 1) / W, parts = (vectors + per - 1) / per;
    for (Index p = 0, i0 = 0; p < parts; ++p) {
        const Index rows = std::min(m - i0, (vectors / parts + (p < vectors % parts ? 1 : 0)) * W);
        f(i0, rows);
        i0 += rows;
    }
}

/// Packs rows [0, m) of A over k steps for the stream tiles of G steps per lane group, ld values
/// per group (ag, zero past row m): A transposed (G = 1), or pack_groups.
template <Index G, class T, class Arch>
void pack_stream_rows(Index m, Index k, const T* a, Index lda, T* ag, Index ld) noexcept {
    if constexpr (G == 1) {
        transpose<T, Arch>(m, k, a, lda, ag, ld);
        for (Index p = 0; p < k; ++p) std::fill(ag + p * ld + m, ag + (p + 1) * ld, T(0));
    } else {
        pack_groups<G, T, Arch>(m, k, a, lda, ag, ld);
    }
}

/// C[i, j] (+)= α · (the sums of row i of A in the tile's row j of B) for the m rows of A of a
/// stream tile (acc: M rows of B × NV vectors, lane group i of G lanes holding row i of A; row i
/// of C at c + i·ldc, its M columns from c on): the tile's sums go through the stack, row i of A
/// being values [i·G, i·G + G) of each row's NV·W.
template <int M, int NV, Index G, class T, class Arch>
LOWRANK_TILE_INLINE void store_stream_tile(const xsimd::batch<T, Arch> (&acc)[M][NV], Index m, T* c, Index ldc,
                                           T alpha, bool accumulate) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size, ld = NV * W;
    alignas(64) std::array<T, std::size_t(M * ld)> sum;
    LOWRANK_UNROLL for (int j = 0; j < M; ++j)
        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) acc[j][v].store_aligned(sum.data() + j * ld + v * W);
    for (Index i = 0; i < m; ++i)
        LOWRANK_UNROLL for (int j = 0; j < M; ++j) {
            T s = sum[std::size_t(j * ld + i * G)];
            LOWRANK_UNROLL for (Index g = 1; g < G; ++g) s += sum[std::size_t(j * ld + i * G + g)];
            T& dst = c[i * ldc + j];
            dst = (accumulate ? dst : T(0)) + alpha * s;
        }
}

/// gemm_stream_rows for one block of m ≤ NV·W / G rows of A, with tiles of MR rows of B; A is
/// packed into `ag` (stream_packed_size values, 64-byte aligned). FAR: see stream_rows_tile.
template <int MR, int NV, Index G, Index AHEAD, class T, class Arch, Index FAR = 0>
void stream_rows_block(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                       Index ldc, bool accumulate, T* ag) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index ld = NV * batch::size;  // values of one group of packed A
    const Index groups = k / G, rem = k % G;
    pack_stream_rows<G, T, Arch>(m, k, a, lda, ag, ld);
    row_tiles<MR>(n, [&](Index j0, auto mr) {
        constexpr int M = decltype(mr)::value;
        batch acc[M][NV];
        stream_rows_tile<M, NV, G, AHEAD, T, Arch, FAR>(groups, rem, b + j0 * ldb, ldb, ag, acc);
        store_stream_tile<M, NV, G, T, Arch>(acc, m, c + j0, ldc, alpha, accumulate);
    });
}

/// gemm_stream_rows for up to blocking::stream_group_rows<T> rows of A in blocks of up to NB
/// vectors (the stream_tile `Tile`: MR rows of B × NB vectors), with B read from memory
/// once for all of them, not once per block: k goes in blocks of kc steps (blocking::stream_group_kc:
/// the packed rows of A, all blocks, fill blocking::stream_group_bytes); for each, every block of
/// rows of A is packed (into ws.a, one after the other), and each tile of MR rows of B runs
/// against all of them in turn, its kc values of B read from memory by the first block (which
/// prefetches the next tile's into L2) and from cache by the others. The sums of every block of k
/// but the last wait in ws.b (Cᵀ, n × the packed rows); the last adds them into C.
template <class Tile, class T, class Arch>
void stream_rows_grouped_on(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                            Index ldc, bool accumulate, GemmWorkspace<T>& ws) {
    using batch = xsimd::batch<T, Arch>;
    constexpr int MR = Tile::mr, NB = Tile::nv;
    static_assert(Tile::g == 1, "stream_rows_grouped: one row of A per lane");
    constexpr Index W = batch::size, max_blocks = blocking::stream_group_rows<T> / W;
    LOWRANK_ASSERT(m <= blocking::stream_group_rows<T>);
    if (trivial_product(m, n, k, c, ldc, accumulate)) return;
    // Block q: rows [first[q], first[q + 1]) of A, packed from lane first[q] on (whole vectors
    // before the last block).
    Index first[max_blocks + 1], blocks = 0;
    split_vectors(m, W, NB, [&](Index i0, Index) { first[blocks++] = i0; });
    first[blocks] = m;
    const auto vectors = [&](Index q) { return (first[q + 1] - first[q] + W - 1) / W; };
    const Index lanes = (m + W - 1) / W * W;
    const Index kc_max = std::min(k, blocking::stream_group_kc<T>(lanes));
    T* ag = GemmWorkspace<T>::reserve(ws.a, kc_max * lanes);
    T* part = k > kc_max ? GemmWorkspace<T>::reserve(ws.b, n * lanes) : nullptr;
    for (Index p0 = 0; p0 < k; p0 += kc_max) {
        const Index kc = std::min(kc_max, k - p0);
        const bool first_k = p0 == 0, last_k = p0 + kc == k;
        for (Index q = 0; q < blocks; ++q)
            pack_stream_rows<1, T, Arch>(first[q + 1] - first[q], kc, a + first[q] * lda + p0, lda, ag + kc * first[q],
                                         vectors(q) * W);
        row_tiles<MR>(n, [&](Index j0, auto mr) {
            constexpr int M = decltype(mr)::value;
            const T* bt = b + j0 * ldb + p0;
            for (Index q = 0; q < blocks; ++q) dispatch_rows<NB>(vectors(q), [&](auto vecs) {
                constexpr int NV = decltype(vecs)::value;
                const T* aq = ag + kc * first[q];
                batch acc[M][NV];
                bool done = false;
                if constexpr (M == MR)
                    if (q == 0 && j0 + 2 * MR <= n) {
                        stream_rows_tile<M, NV, 1, 0, T, Arch, 0, const T*>(kc, 0, bt, ldb, aq, acc, bt + MR * ldb);
                        done = true;
                    }
                if (!done) stream_rows_tile<M, NV, 1, 0, T, Arch>(kc, 0, bt, ldb, aq, acc);
                const auto partial = [&](int j, int v) { return part + (j0 + j) * lanes + first[q] + v * W; };
                if (!first_k)
                    LOWRANK_UNROLL for (int j = 0; j < M; ++j)
                        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) acc[j][v] += batch::load_aligned(partial(j, v));
                if (!last_k) {
                    LOWRANK_UNROLL for (int j = 0; j < M; ++j)
                        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) acc[j][v].store_aligned(partial(j, v));
                    return;
                }
                store_stream_tile<M, NV, 1, T, Arch>(acc, first[q + 1] - first[q], c + first[q] * ldc + j0, ldc, alpha,
                                                     accumulate);
            });
        });
    }
}

/// stream_rows_grouped_on with blocking::stream_tiles::three (8 × 3) with 32 registers. With 16,
/// the 3 × 4 tile (four: blocks of up to 4 vectors of rows, as split_vectors shares them) where a
/// block gets 4 vectors, otherwise the 4 × 3 (three: blocks of up to 3), whose tiles on blocks of
/// 3 and 2 vectors hold 12 and 8 accumulators against the 3 × 4's 9 and 6. AVX2 build, X Wᵀ
/// alone, 4096², 4 alternating rounds, medians of 7, ms, four for all / three for all / this:
/// float m = 40 (5 vectors: 3 + 2) 13.6–13.8 / 12.9–13.2 / 12.9–13.1, 48 (3 + 3) 15.1–15.3 /
/// 14.4–14.6 / 14.4–14.6, 56 (4 + 3) 17.2–17.5 / 18.0–18.2 / 17.1–17.5, 64 19.6–19.8 / 19.9–20.1
/// / 19.2–19.6; double m = 40 (10 vectors: 4 + 3 + 3, four) 26.4–27.8 / 26.8–28.5 (noise).
template <class T, class Arch>
void stream_rows_grouped(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                         Index ldc, bool accumulate, GemmWorkspace<T>& ws) {
    using tiles = blocking::stream_tiles<Arch>;
    using three = typename tiles::three;
    if constexpr (!blocking::wide_register_file<Arch>) {
        using four = typename tiles::four;
        constexpr Index W = xsimd::batch<T, Arch>::size;
        Index largest = 0;  // rows of the largest block of up to four::nv vectors (the first)
        split_vectors(m, W, four::nv, [&](Index, Index rows) { largest = std::max(largest, rows); });
        if (largest > (four::nv - 1) * W) {
            stream_rows_grouped_on<four, T, Arch>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate, ws);
            return;
        }
    }
    stream_rows_grouped_on<three, T, Arch>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate, ws);
}

}  // namespace detail

/// C (+)= α A Bᵀ for a batch of rows of A against a large row-major B (a weight in nn.Linear
/// layout, n × k): the product is computed as its transpose, Cᵀ = B Aᵀ, with the batch along the
/// vectors, in blocks of at most blocking::stream_block_vectors vectors of rows of A. B is never
/// copied: tiles of MR rows of it run over all of k, so B is read from memory once per block, row
/// after row, and there are no horizontal reductions over k. A is copied once per block (into
/// ws.a, zero-padded) and re-read from L1/L2 by every tile.
///
/// On AVX-512 a vector holds R = W / G rows of A × G consecutive steps of k (G = 8, 4, 2 or 1, by
/// the block's rows): each group of G values of a row of B is one broadcast load that serves NV
/// vectors, i.e. NV·R rows of A, with all lanes in use from R rows; the G partial sums of a lane
/// group are added once, at the end of a tile. Tiles (MR rows of B × NV vectors), float, m rows:
/// m ≤ 2: G = 8, 8 × 1; m ≤ 4: G = 8, 8 × 2; m ≤ 6: G = 8, 8 × 3; m ≤ 8: G = 4, 8 × 2; m ≤ 10:
/// G = 8, 5 × 5; m ≤ 12: G = 4, 8 × 3; m ≤ 16: G = 2, 8 × 2 (10 loads per 16 FMAs, against 13
/// per 12 with one row of A per lane; each row of B prefetching 8 lines ahead of its reads); m ≤
/// 20: G = 4, 5 × 5; m ≤ 24: G = 2, 8 × 3; m ≤ 32: G = 1, 12 × 2 (8 × 2 prefetching like m ≤ 16
/// when B is large and its rows share L1 sets: blocking::stream_tiles::two_aliased); m ≤ 40: G =
/// 2, 5 × 5; m ≤ 48: G = 1, 8 × 3; m ≤ 64: G = 1, 6 × 4 (see blocking::stream_block_vectors); m ≤
/// 4 against a B read from memory: groups of 16 bytes, 8 × 1 (blocking::stream_tiles::few_far),
/// float and double. Double: the same by fractions of W (8 lanes), but no groups of 8 (m ≤ 2: G =
/// 4, 8 × 1; no 5 × 5 tile of 5 rows). Elsewhere (16 registers) G = 1 with 6 × 1, 6 × 2, past 2W
/// rows 4 × 3 and past 3W rows 3 × 4 tiles (4 vectors against a B read from memory, or in double:
/// blocking::stream_block_vectors). A batch of more than one block against a B read from memory, where
/// blocking::stream_grouped (double on AVX-512, either type on AVX2), and on AVX2 up to 192 rows
/// against a B in L3 (detail::grouped_rows): detail::stream_rows_grouped, B read once per
/// blocking::stream_group_rows rows (its partial sums, n × those rows, in ws.b).
/// Same arguments as gemm_packed.
template <class T, class Arch = xsimd::default_arch>
void gemm_stream_rows(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                      Index ldc, bool accumulate, GemmWorkspace<T>& ws) {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index NB = blocking::stream_block_vectors<T, Arch>(detail::rows_from_memory<T>(n, ldb));
    if (const Index vectors = (m + W - 1) / W; vectors > NB) {
        if constexpr (blocking::stream_grouped<T, Arch>) {
            if (detail::grouped_rows<T, Arch>(m, n, ldb)) {  // one read of B per group of rows
                detail::split_vectors(m, W, blocking::stream_group_rows<T> / W, [&](Index i0, Index rows) {
                    detail::stream_rows_grouped<T, Arch>(rows, n, k, alpha, a + i0 * lda, lda, b, ldb, c + i0 * ldc,
                                                         ldc, accumulate, ws);
                });
                return;
            }
        }
        // As few passes over B as blocks of NB vectors of rows allow (detail::split_vectors).
        detail::split_vectors(m, W, NB, [&](Index i0, Index rows) {
            gemm_stream_rows<T, Arch>(rows, n, k, alpha, a + i0 * lda, lda, b, ldb, c + i0 * ldc, ldc, accumulate, ws);
        });
        return;
    }
    if (detail::trivial_product(m, n, k, c, ldc, accumulate)) return;
    detail::with_stream_tile<T, Arch>(m, n, ldb, [&](auto tile) {
        using t = decltype(tile);
        T* ag = GemmWorkspace<T>::reserve(ws.a, detail::stream_packed_size<t, T, Arch>(k));
        constexpr bool far_tile =
            t::far && t::nv * Index(xsimd::batch<T, Arch>::size) / t::g <= 2 * blocking::stream_far_rows;
        if constexpr (far_tile) {  // instantiated only for tiles that can hold so few rows
            if (m <= blocking::stream_far_rows && detail::rows_from_memory<T>(n, ldb)) {
                detail::stream_rows_block<t::mr, t::nv, t::g, t::ahead, T, Arch, blocking::far_prefetch_bytes>(
                    m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate, ag);
                return;
            }
        }
        detail::stream_rows_block<t::mr, t::nv, t::g, t::ahead, T, Arch>(m, n, k, alpha, a, lda, b, ldb, c, ldc,
                                                                      accumulate, ag);
    });
}

/// gemm_stream_rows for one block of m ≤ 2W rows of A, over k in passes whose packed A fits the
/// `size` values at `buffer` (64-byte aligned; at least 4W, one group of steps of the widest
/// tile): for a caller with no workspace (shrink, on a 32 KiB stack buffer). Each pass adds its
/// sums to the last one's in C; B is still read once.
template <class T, class Arch = xsimd::default_arch>
void gemm_stream_rows_passes(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb,
                             T* c, Index ldc, bool accumulate, T* buffer, Index size) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    LOWRANK_ASSERT(m <= 2 * W);
    if (detail::trivial_product(m, n, k, c, ldc, accumulate)) return;
    detail::with_stream_tile<T, Arch>(m, n, ldb, [&](auto tile) {
        using t = decltype(tile);
        const Index kc_max = size / (t::nv * W) * t::g;  // steps of k whose packed A fits
        LOWRANK_ASSERT(kc_max > 0);
        for (Index p0 = 0; p0 < k; p0 += kc_max)
            detail::stream_rows_block<t::mr, t::nv, t::g, t::ahead, T, Arch>(
                m, n, std::min(kc_max, k - p0), alpha, a + p0, lda, b + p0, ldb, c, ldc, accumulate || p0 > 0,
                buffer);
    });
}

}  // namespace lowrank::core
