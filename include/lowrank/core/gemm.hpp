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
/// The micro-kernel is the broadcast tile of the other kernels (blocking::mr rows × 2 vectors,
/// 12 accumulators) reading both operands as contiguous packed streams. The block sizes and
/// where they come from are in `blocking` (gemm_mc, gemm_kc, gemm_nc).

#include <algorithm>
#include <vector>

#include "kernels.hpp"
#include "parallel.hpp"

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

/// The micro-kernel: C[0..rows, 0..cols) (+)= α · (packed A micro-panel) · (packed B micro-panel)
/// over kc steps; a full MR × NR tile is written straight from the registers, an edge tile
/// through a small buffer.
template <int MR, int NV, class T, class Arch>
LOWRANK_TILE_INLINE void gemm_micro(Index kc, const T* ap, const T* bp, T* c, Index ldc, Index rows, Index cols,
                                    T alpha, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size, NR = NV * W;
    batch acc[MR][NV];
    bcast_accumulate<MR, NV, NV, T, Arch>(kc, [&](int i, Index p) { return ap[p * MR + i]; }, bp, NR, 0, acc);
    const batch al(alpha);
    if (rows == MR && cols == NR) {
        LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
            LOWRANK_UNROLL for (int v = 0; v < NV; ++v) {
                T* dst = c + i * ldc + v * W;
                const batch r = accumulate ? xsimd::fma(al, acc[i][v], batch::load_unaligned(dst)) : al * acc[i][v];
                r.store_unaligned(dst);
            }
        return;
    }
    alignas(64) T tile[MR * NR];
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) (al * acc[i][v]).store_aligned(tile + i * NR + v * W);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) c[i * ldc + j] = (accumulate ? c[i * ldc + j] : T(0)) + tile[i * NR + j];
}

}  // namespace detail

/// Scratch of gemm_packed: the packed blocks of A and B (reused across calls by a caller that
/// keeps it; at most (gemm_mc + gemm_nc) · gemm_kc values).
template <class T>
struct GemmWorkspace {
    std::vector<T, xsimd::aligned_allocator<T, 64>> a, b;
};

/// C (+)= α A Bᵀ: C m × n (ldc), A m × k (lda), B n × k (ldb), all row-major. With `accumulate ==
/// false` C is overwritten (it may hold garbage on entry); k = 0 then sets it to zero.
/// Cost: 2·m·n·k flops; A is packed ⌈n / gemm_nc⌉ times, B once.
template <class T, class Arch = xsimd::default_arch>
void gemm_packed(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                 Index ldc, bool accumulate, GemmWorkspace<T>& ws) {
    constexpr int MR = int(blocking::mr), NV = 2;
    constexpr Index W = xsimd::batch<T, Arch>::size, NR = NV * W;
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        if (!accumulate)
            for (Index i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, T(0));
        return;
    }
    const Index kc_max = std::min(blocking::gemm_kc, k);
    const Index mc_max = std::min((m + MR - 1) / MR * MR, blocking::gemm_mc / MR * MR);
    const Index nc_max = std::min((n + NR - 1) / NR * NR, std::max(NR, blocking::gemm_nc / NR * NR));
    ws.a.resize(static_cast<std::size_t>(mc_max * kc_max));
    ws.b.resize(static_cast<std::size_t>(nc_max * kc_max));
    T* ap = ws.a.data();
    T* bp = ws.b.data();
    for (Index jc = 0; jc < n; jc += nc_max) {
        const Index nc = std::min(nc_max, n - jc);
        for (Index pc = 0; pc < k; pc += kc_max) {
            const Index kc = std::min(kc_max, k - pc);
            const bool acc = accumulate || pc > 0;
            detail::pack_gemm_b<NV, T, Arch>(nc, kc, b + jc * ldb + pc, ldb, bp);
            for (Index ic = 0; ic < m; ic += mc_max) {
                const Index mc = std::min(mc_max, m - ic);
                detail::pack_gemm_a<MR, T>(mc, kc, a + ic * lda + pc, lda, ap);
                for (Index jr = 0; jr < nc; jr += NR) {
                    const T* bj = bp + jr * kc;
                    const Index cols = std::min(NR, nc - jr);
                    for (Index ir = 0; ir < mc; ir += MR)
                        detail::gemm_micro<MR, NV, T, Arch>(kc, ap + ir * kc, bj, c + (ic + ir) * ldc + jc + jr, ldc,
                                                            std::min<Index>(MR, mc - ir), cols, alpha, acc);
                }
            }
        }
    }
}

}  // namespace lowrank::core
