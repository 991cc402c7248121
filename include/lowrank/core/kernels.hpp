// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The two SIMD GEMM micro-kernel families every low-rank operation reduces to, each with the plain
/// scalar reference it is tested against.
///
/// - `gemm_bcast`: `C (+)= alpha · A · B` with B row-major. Vectorised along the columns of B and C;
///   each element of A is broadcast. A has arbitrary row and column strides, so the same kernel
///   computes `A·B` (A row-major) and `Aᵀ·B` (A read transposed) without copying A.
/// - `gemm_dot`: `C (+)= alpha · A · Bᵀ` with both A and B contiguous along the shared dimension
///   k. Vectorised along k with one accumulator per output; used when k is long (the shrink
///   `X Vᵀ` reduces over the input features).
///
/// Both are templates on `Arch` (an xsimd architecture tag, default: what the compiler flags
/// enable). Neither allocates; both are `noexcept`, and rely on their callers' argument checks.
///
/// Aliasing: C must not overlap A or B.

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "view.hpp"

/// Full unrolling of a micro-tile's loops over its compile-time sizes (rows, vectors, lanes).
/// Without it GCC 12 keeps the accumulator arrays in memory: at -O3 it stores every accumulator
/// to the stack after each FMA (one store per FMA caps a tile at ~1/3 of the FMA peak on this
/// machine), at -O2 it loads and stores them. The fully unrolled loops let it keep them in registers.
#if defined(__clang__)
#define LOWRANK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LOWRANK_UNROLL _Pragma("GCC unroll 16")
#else
#define LOWRANK_UNROLL
#endif

/// - LOWRANK_TILE_INLINE: a micro-tile inlined into its sweep whatever the inliner's size budget:
///   a sweep that calls its tile per 16 steps of w pays a call, a frame and the tile's address
///   set-up each time (the rank-16 merge of a 1024² weight: 5.28 M instructions with the tiles
///   called, 4.96 M inlined).
/// - LOWRANK_NOINLINE: a function kept out of line: the loops it holds are register-allocated on
///   their own, not as part of a larger caller (see gemm_block_panel).
/// - LOWRANK_FLATTEN: every call in the function inlined into it (so that arguments it passes as
///   constants reach the callee's loops; see detail::bcast_band_packed).
/// - LOWRANK_PREFETCH_L1(ptr), LOWRANK_PREFETCH_L2(ptr): a software prefetch of the cache line at
///   `ptr` into L1 or L2 (prefetcht0, prefetcht1 on x86; nothing elsewhere).
/// - LOWRANK_PREFETCH_W(ptr): a prefetch of the line at `ptr` into L1 with the intent to write it
///   (prefetchw where the target has it, e.g. -march=native on AMD Zen; prefetcht0 otherwise).
/// - LOWRANK_IN_REGISTER(v): an empty asm statement that takes the batch v in a vector register
///   and may change it, so the compiler keeps the one load that filled it instead of folding it
///   into each FMA that reads v as a memory operand (x86 with GCC or Clang; nothing elsewhere).
#if defined(__GNUC__) || defined(__clang__)
#define LOWRANK_TILE_INLINE [[gnu::always_inline]] inline
#define LOWRANK_NOINLINE [[gnu::noinline]]
#define LOWRANK_FLATTEN [[gnu::flatten]]
#define LOWRANK_PREFETCH_L1(ptr) __builtin_prefetch((ptr), 0, 3)
#define LOWRANK_PREFETCH_L2(ptr) __builtin_prefetch((ptr), 0, 2)
#define LOWRANK_PREFETCH_W(ptr) __builtin_prefetch((ptr), 1, 3)
#if defined(__x86_64__) || defined(__i386__)
#define LOWRANK_IN_REGISTER(v) __asm__("" : "+v"((v).data))
#else
#define LOWRANK_IN_REGISTER(v) ((void)(v))
#endif
#else
#define LOWRANK_IN_REGISTER(v) ((void)(v))
#define LOWRANK_TILE_INLINE inline
#define LOWRANK_NOINLINE
#define LOWRANK_FLATTEN
#define LOWRANK_PREFETCH_L1(ptr) ((void)(ptr))
#define LOWRANK_PREFETCH_L2(ptr) ((void)(ptr))
#define LOWRANK_PREFETCH_W(ptr) ((void)(ptr))
#endif

namespace lowrank::core {

/// Blocking parameters, in one place.
/// - `mr`: rows of C per micro-tile of gemm_bcast. 6 rows × 2 vectors = 12 accumulators leaves 4 of
///   AVX2's 16 vector registers for the two B loads and the broadcast (the BLIS Haswell shape).
/// - `kc`: depth of one pass over k. A kc × (2 vectors) panel of B is 8 KiB in float at kc = 256 on
///   AVX2, so it stays in a 32 KiB L1 while the micro-tiles of one column block run over it.
/// - `mc`: rows of C per block (16 micro-tiles): C is swept in mc-row bands so that the rows of A
///   a band broadcasts stay in L1/L2 and C is touched in short, prefetchable column strips.
/// - `short_k`: up to this depth C is swept in mr-row bands across its full width. Merge W += s B A
///   at 4096², float (bench_lora, medians): r = 8: 23.7 ms in 96 × 512 blocks → 6.7 ms in bands
///   (Eigen 8.8 ms); r = 64: 56.4 ms with short_k = 32 (blocks) → 41.0 ms with 128 (bands).
/// - `update_prefetch_tiles`: rank_update (merge) prefetches W, for writing, this many tiles (of
///   6 rows × 2 vectors) ahead of the one it updates. Its 6 row streams through a W in memory
///   outran the hardware prefetcher: merge alone, 4096², float, this AVX-512 VM, 3 alternating
///   rounds (ms), none → 2, 4, 8 tiles ahead: r = 16 4.5–4.8 → 3.5–3.8, 3.4–3.9, 3.2–5.1; r = 64
///   12.1–12.8 → 11.9–12.3, 11.9–12.5, 12.0–12.5. A read prefetch (prefetcht0) 4 tiles ahead
///   3.8–5.3, into L2 (prefetcht1) 4.5–5.0: the write intent matters. The tiles alone, with W hot
///   in L2, run at 180 GFLOP/s (73% of the FMA peak; a 6 × 2 loop from L1 with nothing else 205).
///   A Zen 4 VM (AVX-512 on 256-bit units, probe 133.7 GFLOP/s with 8 chains, 125 with 16), r =
///   16, float, both variants in one process, 7–21 alternating rounds, each order once: 8, 16
///   tiles ahead 0.97–1.03× the time of 4, 32 1.05–1.09×, none 1.1×; streaming stores for W
///   1.4–2.1×. Tiles 4 × 4 1.18–1.21×, 12 × 2 1.47–1.66×, 6 × 4 0.92–0.95× with W in L2 but
///   1.15–1.20× at 4096²; a first step that multiplies (no zeroed accumulators) and a step loop
///   unrolled 4 times: within ±4% (the slot bias); depth 16 unrolled in full: GCC spilled, slower.
///   The sweep's tiles ran at ~97 GFLOP/s with W in L2 (64 × 1024, the copy of V taken out), as
///   an isolated 8 × 2 loop of depth 16 with C read and written from L2 did (97.6; 106 with the
///   depth fixed at compile time): 73–80% of the 8-chain peak, so merge at 4096² (7.1–7.3 ms, W
///   from memory at ~19 GB/s) stays under 80% of its compute bound on that VM.
/// - `band_rows`: from this many rows of G on, input_grad (dX = α G V) copies V into strips and
///   runs the band product (see ops.hpp: the copy is amortised from about 32 rows at in = 4096).
/// - `band_width`, `band_depth`, `band_cols`: grad_shrink (dV = α Gᵀ X) copies X into strips, in
///   blocks of band_cols columns (n × 256 values: 128 KiB at n = 128 in float), for factors of at
///   least band_width rows and batches of at most band_depth rows (the depth of one sweep); see
///   ops.hpp for the measurements (band_cols = 256 was within 5% of one block of all of in).
/// - `nc`: columns of C per block, chosen so a kc × nc block of B (512 KiB in float) stays in L2.
/// - `dot_mr` × `dot_nr<Arch>`: outputs per micro-tile of gemm_dot. 16 registers: 3 × 4 (12
///   accumulators, 7 loads per 12 FMAs). 32 registers (AVX-512): 3 × 8, 24 accumulators (GCC 12
///   spilled a row of A of the 3 × 4 tile to the stack there). Shrink X Vᵀ alone, w = 8, float,
///   this AVX-512 VM, same run (µs), 3 × 4 → 3 × 8: n = 16, in = 1024: 3.48 → 1.98, in = 4096:
///   13.4 → 7.9; 2 × 8, 4 × 4 and 4 × 8 tiles were 10–40% slower than 3 × 8. GCC 12 folds each
///   load of B into the MR FMAs that read it (3 + 24 loads per 24 FMAs); from MR = 2 rows on the
///   tile holds it in a register (LOWRANK_IN_REGISTER) and loads it once. gemm_dot runs B in blocks
///   of dot_nr rows, each against all rows of A; B used to be streamed 4 rows at a time over all
///   of k against 2-row tiles of A whenever it had more rows than A, and otherwise swept by rows of
///   A in the outer loop (all of B's rows in a pass per tile of A). Shrink alone, float, this Zen 5
///   VM, both builds in one process, 15–41 alternating bursts, medians, new / former time: n = 16
///   rows: in = 1024, w = 8 / 16 0.74 / 0.75, in = 4096 0.80 / 0.71 (the register alone: 0.78–0.90;
///   the block order alone on top 0.83–0.95); fewer rows than B (the former streaming path): n =
///   4 / 12, in = 4096, w = 16 0.66; n = 2, in = 1024, w = 16 0.90, in = 4096, w = 64 0.99; B of
///   64 MiB (4096 rows of 4096), n = 2 / 16 1.03 / 0.99 (±5–10% spread); the AVX2 build 0.87–1.05.
///   The register for MR = 2 against MR = 3 only: n = 2 / 5 / 8, in = 4096, 0.98 / 0.90 / 0.96.
///   One row of A (a GEMV) runs over all of k in one pass, by blocks of dot_nr rows of B as the
///   others (until a Sapphire Rapids VM, blocks of 4: on the Zen 5 VM blocks of 8 in passes of
///   dot_kc took 1.06–1.15× its time at w = 64, 0.75–0.91× at w = 8 and 16). This VM, shrink of
///   one row alone, old and new headers alternating in 3 rounds (µs), 4 → 8 rows per block: in =
///   4096, w = 8 / 16 / 64 1.22–1.28 → 1.02–1.03, 2.47–2.50 → 2.01–2.02, 10.0–10.3 → 7.7–9.1; in =
///   1024 0.22 → 0.19–0.20, 0.55–0.57 → 0.47–0.52, 2.28–2.39 → 1.92–2.17. Each
///   tile's 24 sums reduced by haddp in place of 24 single reductions: 1.01–1.07× slower.
/// - `narrow_dot(n, w)`: whether `expand` reduces with `gemm_dot_narrow` rather than transposing
///   U into a buffer for the broadcast kernel. The transposed copy costs ~0.6 instructions per
///   element of U once (AVX tiles); the narrow kernel a haddp reduction per 8 outputs and row.
///   Callgrind instruction counts at in = out = 1024 (narrow vs transposed, thousands): n = 1,
///   w = 8: 16 vs 24; n = 4, w = 8: 44 vs 38; n = 4, w = 64: 176 vs 207; n = 8, w = 64: 425 vs 397.
/// - `packed_shrink(n, w, lanes)`: whether `shrink` transposes V into a buffer and uses the
///   broadcast kernel instead of gemm_dot (which needs a reduction per output and pass): from n = 8
///   rows on (n = 16, w = 16: 178 vs 254 thousand instructions), except for w ≤ lanes / 2 (half a
///   vector of outputs or less: rank 8 in float on AVX-512, where the broadcast kernel's vectors
///   run half empty). Shrink alone, float, this AVX-512 VM, same run, broadcast vs gemm_dot with
///   3 × 8 tiles (µs): w = 8, in = 1024: n = 32 6.6 vs 3.6, n = 128 22.9 vs 13.7; in = 4096: n = 32
///   29.3 vs 17.8, n = 128 131 vs 70; w = 16 stays broadcast from n = 8 (n = 16: 4.5 vs 4.1 and
///   18.4 vs 18.8, n = 128: 24.8 vs 30.7 and 103 vs 161; w = 32 and 64 from n = 16: 0.5–0.86×;
///   at n = 8 the two are within 0.86–1.18× of each other for w = 16–64).
///   `packed_shrink_rows_one_vector`: for a rank of one vector or less, gemm_dot below this many
///   rows (a later run, same harness, µs, broadcast vs gemm_dot, w = 16, AVX-512: in = 4096: n = 16
///   28.8 vs 18.7 and 37.8 vs 25.6 (two runs), n = 32 53.9 vs 55.1, n = 64 88.2 vs 107, n = 128 154
///   vs 219; in = 1024, n = 16 7.0 vs 4.6, n = 64 20.5 vs 24.6). On AVX2 (w = 8, one vector there)
///   gemm_dot stays faster at n = 64 too (72.1 vs 57.0); left at 32 for both. Since gemm_dot holds
///   each vector of V in a register and runs V in blocks (dot_nr), this Zen 5 VM, both paths in
///   one process, gemm_dot / broadcast time: w = 16, in = 4096: n = 32 0.82, 64 0.99, 128 0.93,
///   192 1.16, 256 0.97–1.17 (two runs); in = 1024: n = 128 0.87, 256 0.95–0.98; the AVX2 build,
///   w = 8: n = 32 / 64 / 128 / 192 / 256 0.71 / 0.84 / 0.80–0.83 / 0.83 / 0.84. Now 192 for both
///   (129–191 not measured).
///   `packed_shrink_rows_part_vector`: a rank between half a vector and one (9–15 in float on
///   AVX-512) pays a whole vector per tile in the broadcast kernel (a zero-padded copy of the
///   panel) but only its w lanes in dot products; the broadcast kernel from this many rows on, and
///   only above 3/4 of a vector. Same run, in = 4096, float, broadcast vs gemm_dot (µs): n = 32:
///   w = 9 57.9 vs 20.3, 12 58.4 vs 29.3, 15 52.1 vs 40.8; n = 64: 97.7 vs 53.2, 101 vs 71.5, 79.8
///   vs 85.0; n = 128: 140 vs 90.3, 144 vs 130, 141 vs 173; double, n = 128, w = 7: 176 vs 212.
/// - `stream_shrink<Arch>(n, w)`: whether `shrink` (T = X Vᵀ) runs as gemm_stream_rows' transposed
///   product, in passes of a 32 KiB stack buffer (gemm_stream_rows_passes): from
///   `stream_shrink_rows_min` to `stream_shrink_rows_max` rows of X against a V of at least
///   `stream_shrink_rank` rows, on AVX-512. V is read once, row after row, against X grouped in
///   vectors (no reductions over k), where the paths above re-read V (dots: once per 3 rows of X)
///   or transpose it. Alone, this 2-core Zen 4 VM, medians of 21 × 200 calls (µs), former path
///   vs one pass over all of k vs passes of 512 steps, in = 4096: n = 8, w = 32: 62.3 / 48.9 /
///   48.8; n = 16: w = 32 85.9 / 66.7 / 71.2, w = 64 165 / 106 / 114, w = 128 394 / 183 / 205;
///   in = 1024: n = 8, w = 32 15.5 / 12.6 / 12.5; n = 16, w = 64 37.7 / 25.7 / 27.2. Outside
///   that range no gain: n = 4, w = 64 43.4 vs 42.5 (one pass); n = 24, w = 64 207 vs 266; n =
///   32, w = 32 125 vs 148; n = 16, w = 17 38.8 vs 40.7 and w = 24 equal. Double alike (n = 8,
///   w = 32: 85.3 vs 57.6; n = 16, w = 64: 317 vs 241; n = 4: slower). The AVX2 build's stream
///   kernel (6-row tiles, one row of X per lane) was faster at some of these shapes and slower at
///   others (n = 12, w = 32: 59.6 vs 67.6; n = 16, w = 64: 166 vs 106): left as it was.
/// - `sweep_mr<Arch>`: rows of the expand tiles in the band sweeps (detail::band_sweep: the merge,
///   the band product of input_grad, grad_shrink's strips) and in the gathered expands of mixed
///   batches, 2-vector tiles (3 for 8 rows: detail::expand_nv): 6 on 16 registers, 8 on AVX-512
///   (measured below with 2-vector tiles, 16 accumulators; 12 rows × 2 spilled: 93 against 153
///   GFLOP/s). The band sweep alone, float, one
///   binary, 3 alternating rounds, medians (µs), 6 → 8: merge 1024², r = 16 181–195 → 166–190,
///   4096², r = 64 10.9–12.3 → 10.5–11.5 ms (r = 16 equal, 3.1–3.5 ms); 16 × 4096 rows at depth 64
///   (input_grad) 43.2–45.3 → 37.2–37.9; 128 × 4096 equal; a 64 × 256 block of dV at depth 128
///   19.2–20.4 → 18.0–21.6. bench_lora, old and new binaries alternating in 6 rounds, medians:
///   merge 4096², r = 8 3.34 → 2.59 ms, r = 16 3.33 → 3.02, r = 64 10.9 → 10.3; the backward
///   rows that sweep bands 0.97–1.15× (within this VM's noise). gathered_expand_strips, m
///   scattered rows of Y, out = 4096, w = 16 / 64, 3 alternating rounds (µs): m = 8 5.7–5.8 →
///   5.2–5.3 / 25.6–26.0 → 20.3–21.1, m = 16 11.8–12.0 → 10.4–10.6, m = 64 44.0–45.4 → 43.2–44.0
///   / 196–201 → 172–174 (m = 6: one tile either way, equal).
/// - `band_mr<Arch>` × `band_nv<Arch>`: gemm_bcast's tile for a short k (≤ short_k) over a full
///   band of rows. AVX-512: 8 rows × 3 vectors (24 accumulators; 11 loads per 24 FMAs, against 8
///   per 12 for 6 × 2), so a C of 8 rows (the backward's dA = Gᵀ X and dUᵀ = Tᵀ dY at rank 8) is
///   one band and B is read once, not twice (bands of 6 + 2). Each alone, µs, same run, old →
///   new: dA, n = 128, 4096, r = 8 158 → 66, r = 16 238 → 132; dUᵀ r = 8 109 → 73, r = 16 173 → 121.
///   4 vectors are tiled 2 + 2, not 3 + 1 (dU at rank 64). The R < band_mr rows below
///   the last full band (or all of a shorter C) take their own band of R-row tiles as wide as the
///   registers allow (detail::partial_band_nv: 4 vectors, 3 for one row), not the 6-row path's
///   2-vector tiles: on 16 registers, rank 8 is a band of 6 and one of 2, whose 2 × 2 tiles made
///   the AVX2 build's factor gradients 2.2–2.4× as slow as the AVX-512 build's. Alone, float,
///   old and new alternating in one process (µs): AVX2 build, n = 128, 4096, r = 8: dUᵀ 167 →
///   130, dA 174 → 141; dX = G A at n = 1 (one row), 4096: r = 16 4.8 → 3.9, r = 64 64.7 → 36.0
///   (AVX-512: 27.9 → 16.3). One row keeps 3 vectors: 4 measured slower at r = 8, 4096 (1.34 vs
///   0.97 µs, 1.05 for 2). bench_lora's backward, old and new builds alternating in 3–7 rounds,
///   AVX2 build: n = 128, r = 8: 1024 186 → 142, 4096 684 → 586; n = 16, 1024, r = 8 22.0 → 17.3;
///   AVX-512 build: 0.84–1.04 (noise ±5%), n = 1, 4096, r = 64 97.7 → 82.2.
/// - `band_block_tiles`: a short k with m ≤ k rows of C (the factor gradients Gᵀ X and Tᵀ dY,
///   where B is the batch and the larger operand) sweeps B in column blocks of this many tiles,
///   every band over one block before the next, so bands after the first find it in cache. Alone,
///   n = 128, 4096, same process, without → with (µs): AVX-512 r = 16 dA 92.9 → 89.6, 99.6 → 94.6;
///   AVX2 r = 8 dA 141 → 133. 1, 2, 4 or 16 tiles within 3% of each other.
/// - `narrow_project_rows`, `narrow_grad_rows` (tested by `narrow_project(n, w, lanes)`,
///   `narrow_grad<Arch>(n, w, lanes)`): from this many rows of dY on, the backward's G = dY U
///   and dU = α dYᵀ T with a rank of half a vector or less (8 in float on AVX-512) leave the
///   broadcast kernel on U / dU in place (half-empty vectors): G by dot products against Uᵀ, dU
///   as dUᵀ = α Tᵀ dY along the outputs, transposed. Each alone, w = 8, float, this AVX-512 VM,
///   same run, in place vs narrow paths (µs), out = 1024: G: n = 4 0.94 vs 1.23, n = 8 1.80 vs
///   1.65, n = 16 3.08 vs 2.57, n = 128 22.9 vs 16.2; dU: n = 1 0.36 vs 0.65, n = 2 1.02 vs 0.89,
///   n = 16 5.52 vs 2.57, n = 128 53.3 vs 21.7 (out = 4096 alike: n = 128 105 vs 66 and 225 vs 98).
///   `narrow_grad_rows_full`: the same for dU at a rank of one vector (16 in float on AVX-512),
///   whose in-place tiles are one vector wide (7 loads per 6 FMAs): out = 1024, n = 8 2.70 vs 3.18,
///   n = 16 5.92 vs 5.22, n = 128 53.7 vs 35.5; out = 4096, n = 16 23.9 vs 22.0, n = 128 233 vs
///   148. G at that rank stays in place (dot products 1.2–2.6× slower), as do both at rank 32.
///   Since the broadcast kernel copies dYᵀ's panel on AVX-512 (detail::bcast_band_packed), 24 rows
///   there, not 16 (16 registers: still 16):
///   same harness, one process, in place vs along the outputs (µs), out = 4096: n = 16 19.5–21.0
///   vs 23.0–24.6, n = 24 39.1 vs 37.9, n = 32 37.8 vs 36.3; out = 1024: n = 24 7.25 vs 7.33, n =
///   32 9.31 vs 8.85.
/// - `backward_split_bytes`, `backward_block_bytes` (`backward_cols`): the LoRA backward (n > 1)
///   forms T = Xa Aᵀ, dA = s Gᵀ Xa and s G A by blocks of columns of backward_block_bytes of Xa
///   once Xa has backward_split_bytes, G = dY B first: each block, read from memory by the shrink,
///   is in L2 for the other two (Xa read once, not twice; dY is still read twice, by G and dB).
///   Below, one block in the former order (T, G, dB, dA, dX): in that order, with Xa, dY and dX
///   all in L2 (n = 128, 1024), the new one ran 1.03–1.12× as long. The five products alone,
///   float, this AVX-512 VM, one harness, medians of 3 (µs), whole → blocks of 512 / 1024 / 2048
///   columns: n = 128, 4096, r = 16 837–844 → 808–822 / 763–770 / 766–777; n = 64 390–398 →
///   368–378 / 359–371 / 363–384; n = 256 1914–1981 → 1761–1805 / 1766–1778 / 1859–1940; n =
///   128, 2048 (1 MiB) 372–395 → 381–394 / 361–387 / 365–395 (noise). bench_lora's backward, old
///   and new binaries alternating 3 rounds, new / old medians: n = 128, 4096: r = 8 0.94, 16 0.87
///   (827–923 → 770–805 µs), 64 0.91; the shapes below the split 0.96–1.03.
/// - `stream_weight_rows`: up to this many rows, the base product X Wᵀ runs on gemm_dot with W
///   streamed once (the small-batch regime, memory bound on W); beyond, on gemm_packed. Same run,
///   d = 4096 (1024), ms, gemm_dot vs gemm_packed: n = 16 12.5 vs 14.8 (0.70 vs 0.80), n = 24
///   and 32 within 2% of each other, n = 48 33.3 vs 29.6 (1.95 vs 1.75).
/// - `gemv_row_bytes_min/max`, `gemv_weight_bytes_min/max`: one row of X against a row-major W
///   of rows from 1 to 8 KiB, 2 to 8 MiB in all (more than L2, within what this VM's L3 returns
///   fastest), runs gemv_rows: W row after row, one sequential stream. Eigen's GEMV reads 8 rows
///   side by side, 8 streams. The probe's best stream count for a hot read is 1 at 4 and 8 MiB,
///   4 at 16 MiB and more. GEMV alone, a Zen 4 VM (AVX-512 on 256-bit units), 9 alternating
///   rounds, Eigen's time over gemv_rows' (AVX-512 build / AVX2 build), out × in: float 1024²
///   1.15–1.16 / 1.04–1.09, 1000² 1.18 / 0.98, 1024 × 2048 1.15 / 0.98, 2048 × 512 1.08 / 1.09,
///   4096 × 512 1.12 / 1.05, 4096 × 256 1.26 / 1.20, 768² 1.05 / 0.98; double 1024² 1.16 / 1.04,
///   512 × 1024 1.13 / 1.01, 1024 × 512 1.16 / 1.02, 4096 × 128 1.21 / 1.25. Outside the ranges:
///   W in L2 (512² float) 0.98 / 0.84, (1024 × 128 double) 1.00 / 0.90; 9–16 MiB (1536², 2048²,
///   4096 × 1024) 0.96–1.01 / 1.01–1.24; from memory (32 to 256 MiB) 0.77–0.93 / 0.68–1.16; rows
///   of 16 KiB (1024 × 4096) 0.78 / 0.68; rows of 64 values 0.88 / 0.79 (a reduction per row).
/// - `dot_streams_tile(m)`, `dot_streams_max_rows`, `far_prefetch_bytes`: one row of X against a
///   row-major W read from memory (more than stream_aliased_bytes), and up to dot_streams_max_rows
///   rows with 16 registers, run gemm_dot_streams: dot_streams_tile(1) = 8 rows of W side by side,
///   each prefetching into L2 the line 2 KiB ahead of the ones it reads. The hardware prefetcher
///   stops at every 4 KiB page (8 rows × 2 KiB keeps 16 KiB in flight across them). GEMV alone, a
///   Zen 4 VM (AVX-512 on 256-bit units, THP in madvise mode), float, 15 alternating rounds,
///   medians (ms), out × in, Eigen's GEMV (8 rows side by side, no software prefetch) / gemv_rows /
///   8 rows without prefetch / 8 rows with it 512 B, 1 KiB, 2 KiB ahead: 4096² 2.60 / 3.19 / 2.61 /
///   2.43, 2.25, 2.14; 11008 × 4096 7.54 / 10.3 / 7.20 / 6.41, 6.28, 6.37; 4096 × 11008 8.30 / 10.5
///   / 8.61 / 8.10, 7.49, 7.56; 2048 × 8192 2.61 / 2.45 / 2.70 / 2.51, 2.24, 2.28 (4 KiB ahead:
///   2.28 at 4096², worse; 4 rows: 2.39–2.46, 16 rows: 2.61–2.85; prefetcht0 instead of L2: 3.40).
///   W in L3 (1024², 2048²) loses by the prefetch (0.049 → 0.057–0.060 ms at 1024²): below
///   stream_aliased_bytes nothing changes. W in advised (2 MiB) pages, 4096²: Eigen 2.23, 8 rows
///   with 1 KiB ahead 1.86. One sum per row (8 chains) ran as fast as two (1.93 vs 1.92 ms); one
///   row at 4096², same VM, later (ms): float 1.83 against Eigen's 2.36, double 4.35 against 5.25.
///   With 2–4 rows of X a tile of 8 rows of W (8 × m sums) lost to gemm_stream_rows' `few_far` tile
///   on AVX-512 (one harness, 15 alternating rounds, medians (ms), 4096²: float m = 2 / 3 / 4 2.26
///   / 2.56 / 3.00 against 2.27 / 2.25 / 2.30, double 5.13 / 5.37 / 6.09 against 4.79 / 4.95 /
///   4.81; X in place with its rows 16 KiB apart or 32 bytes off that: the same times), so
///   base_product sends them there. With 16 registers (an AVX2 build, -march=x86-64-v3, same VM)
///   the stream tiles have no groups, and these dots with fewer rows of W per tile won: 4096²,
///   float, 9–11 rounds (ms), m = 2 / 3 / 4: the former paths (gemm_dot for 2–3 rows, the 6 × 1
///   stream tile for 4) 3.87–3.93 / 4.87 / 3.92, the dots with 4, 5, 6, 8 rows of W: m = 2 2.69,
///   2.55, 2.40, 2.51; m = 3 (3, 4, 5 rows) 4.01, 2.72, 2.37; m = 4 (3, 4, 5 rows) 3.28, 2.82–2.87,
///   2.94; double, the former paths 8.26 / 9.88 / 5.48, dots 5.36 / 5.10 / 5.66 (left on the dots
///   at m = 4 for one rule); m = 5–8 stay on the stream tiles (3 rows of W × 5 rows of X 3.51
///   against 4.12; 6 and 8 rows of X slower than the stream tile). Hence dot_streams_tile(m) = 8,
///   6, 5, 4 rows of W for m = 1–4 (up to 16 sums). `far_prefetch_bytes_one_row`: for one row of X
///   (the GEMV) 1 KiB ahead, and the step's two vectors of X loaded once for the 8 rows of W rather
///   than by each row's FMAs: this Sapphire Rapids VM (probe 29.4 GB/s from L3 at 64 MiB), 4096²,
///   float, one harness alternating the variants, medians of 9 × 11 calls, GB/s: advised (2 MiB)
///   pages, as a PackedWeight's: 27.6–27.8 → 28.2–28.8 (2 KiB ahead with the loads hoisted 28.0–28.3,
///   1.5 KiB 28.2–28.6); 4 KiB pages 26.7 → 27.6; the AVX2 build 27.6 → 28.2 and 26.8 → 27.2.
/// - `stream_far_rows`: gemm_stream_rows with at most this many rows of X against a W read from
///   memory gives its tiles the same prefetch (into L2, far_prefetch_bytes ahead). With few rows
///   a tile does few FMAs per line of W and waits on memory; from 13 rows on (float) it is
///   compute-bound and the prefetches cost time. X Wᵀ alone, one process, with / without, 21
///   alternating rounds, medians: 4096², AVX-512, float m = 2 / 3 / 4 / 6 / 8 / 10 / 12 0.93 / 0.94
///   / 0.96 / 0.78 / 0.85 / 0.94 / 0.95, m = 13 / 14 / 16 1.06 / 1.05 / 1.06, 20 / 24 / 32 1.01 /
///   1.02 / 1.03; double m = 2 / 4 / 6 / 8 / 10 / 12 0.92 / 0.95 / 0.79 / 0.80 / 0.94 / 0.94, 16 /
///   24 1.05 / 1.02; 11008 × 4096 float m = 2 / 4 / 8 / 12 / 16 0.91 / 0.96 / 0.84 / 0.94 / 1.06;
///   4096 × 11008 1.05 / 0.94 / 0.84 / 0.99 / 1.07. AVX2 build (-march=x86-64-v3), 4096²: float m
///   = 4 / 6 / 8 0.90 / 0.90 / 0.89, 12 / 16 / 24 / 32 1.01 / 1.02 / 0.95 / 1.02; double m = 4 / 8
///   / 12 / 16 0.85 / 0.83 / 0.80 / 0.88 (left at 12 rows for every type and build).
/// - `dot_kc`: depth of one pass of gemm_dot over k (a dot_kc-long stripe of 64 rows of V is
///   256 KiB in float, an L2-sized share; a block of dot_nr rows 32 KiB, within L1). Shrink alone,
///   n = 16, w = 8 and 16, in = 1024 and 4096, this Zen 5 VM: 512 1.13–1.19× and 2048 0.99–1.24×
///   the time of 1024 (each pass reduces and stores every tile's sums).
/// - `stream_tile<MR, NV, G, AHEAD>`: a tile of gemm_stream_rows (the small-batch X Wᵀ, the batch
///   along the vectors): MR rows of W × NV vectors, each vector R = W / G rows of X × G steps of k;
///   AHEAD > 0: each row of W prefetches (into L1) the line AHEAD lines ahead of the one it reads.
///   `stream_tiles<Arch>` holds the one for each range of rows. 16 registers: 6 × 1, 6 × 2 or (2W
///   + 1 to 3W rows) 4 × 3, G = 1. 32 registers (AVX-512), up to W/4, W/2, W, 2W rows: G = 4, 8 ×
///   1 (double; float: G = 8, 8 × 2, below); G = 4, 8 × 2; G = 2, 8 × 2 (AHEAD = 8, the others
///   none); G = 1, 12 × 2. W/4 + 1 to W/2 rows (7–8 in float, 3–4 in double) took G = 2, 8 × 1
///   until a Zen 4 VM (probe 132 GFLOP/s: AVX-512 on 256-bit units) ran its 8 broadcasts per 8
///   FMAs well below the peak; G = 4, 8 × 2 does the same FMAs with 8 broadcasts per 16. X Wᵀ
///   alone, both tiles in one process, 9 alternating rounds, each order once (the slot a tile
///   sits in moved the ratio up to 0.94),
///   new / former time: float m = 8 at 256² / 1024² / 4096² 0.82 and 0.81 / 0.76 and 0.76 / 0.94
///   and 0.94, m = 7 at 1024² 0.77 / 0.76; double m = 3 / 4 at 256² 0.79 / 0.79, 1024² 0.78 /
///   0.78, 4096² 0.97 / 0.98; shrink X Vᵀ, n = 8, w = 32 / 64, in = 1024 and 4096: 0.74–0.76. In
///   float, 3–4 rows likewise take G = 8, 8 × 2 (`two_eighths`, 8 broadcasts per 16 FMAs) before
///   quarter's G = 4, 8 × 1 (per 8), same harness: m = 3 / 4 at 256² 0.87 and 0.87 / 0.89 and
///   0.89, 1024² 0.81 and 0.80 / 0.81 and 0.81, 4096² 1.02 and 0.95 / 1.01 and 0.97 (there W's
///   stream from memory sets the time). On the Zen 5 VM (full-width AVX-512, probe 233 GFLOP/s)
///   G = 8, 8 × 2 for m = 3, 4 had been 0.96 / 1.02 (below). One row of X per vector (G = W, no
///   broadcasts: W's values are a plain load), 8 × 2, for m ≤ 2, this Zen 4 VM, same harness:
///   float at 256² / 1024² 1.32 and 1.32 / 1.25 and 1.17, double 1.57 and 1.41 / 1.36 and 1.15
///   (the lane sums, a whole vector per output, cost more than the broadcasts saved). G = 4,
///   6 × 4 for 13–16 rows, this Zen 4 VM, same harness: m = 16, 256² 1.05 / 0.95, 1024² 1.01 /
///   0.99, 4096² 0.98 / 0.96, no change. Up to W/2 rows (8 in float) the tiles were G = 4
///   and G = 2, 12 × 1 without prefetch (measurements below); 8 rows of W with it instead, X Wᵀ
///   alone, float, 5–9 rounds, one shape per process, time over 12 × 1: m = 4 / 6 / 8 at 1024²
///   0.85–0.88 / 0.86 / 0.86, 4096² 0.88–0.89 / 0.85 / 0.87, 2048² 1.02 / — / 1.04–1.06; m = 2
///   0.99–1.01; 4096 rows × 11008 (rows not 4 KiB apart) m = 4 1.00, m = 8 0.93; 8 × 1024 × 4096
///   0.74; shrink-like products (W = 32 or 64 rows, hot) 0.95–1.00; double, m = 2 / 4 at 4096² 0.82
///   / 0.76, m = 3 / 4 at 2048² / 1024² 1.03. The tile of W/2 + 1 to W rows (9–16 in float) was G =
///   4, 6 × 4 prefetching the next tile's rows into L2 (the measurements below, Zen 4); this Zen 5
///   VM, bench_core's forward at n = 16, old and new builds alternating in 7 rounds, one shape per
///   process, medians: 1024², r = 8 / 16 / 64 188 / 196 / 215 → 178 / 184 / 207 µs; 4096² 3.42 /
///   3.71 / 3.81 → 3.20 / 3.41 / 3.36 ms; bench_lora, n = 16, r = 64 (the shrink runs on it):
///   add_delta 1024 29.4 → 26.6 µs, 4096 123 → 119; backward 1024 75.7 → 65.2, 4096 291 → 259.
///   (4096², r = 16, 11 rounds: 3.42 → 2.97 ms.) Its alternatives, the kernel alone, m = 16, 1024²
///   / 4096², one m per process, time over the former tile's (the kernel's 4096² runs vary ±10%
///   from process to process, W's physical pages with them): G = 2, 12 × 2 0.89 / 0.97; with the
///   next-tile prefetch 1.00 / 1.10; G = 4, 6 × 4 with AHEAD = 8 0.97 / 1.10; G = 2, 8 × 2 with
///   AHEAD = 0, 4, 8, 16, 32 lines 0.91, 0.92, 0.92, 0.92, 0.93 / 1.13, 0.96, 1.09, 1.04, 1.00 (15
///   rounds more at 4096²: AHEAD = 4 0.96, 8 0.97), those prefetches into L2; into L1 instead
///   (prefetcht0), times over those into L2: the kernel alone, m = 16, 4096², 15 rounds: 0.94
///   (AHEAD = 8), 0.95 (4), m = 12 0.98, 1024² 1.00; bench_core's forward n = 16, 4096², r = 8 / 16
///   / 64, 9–11 rounds: 0.94–0.96 / 0.97–0.99 / 0.96; bench_lora n = 16, r = 64, 11 rounds:
///   backward 4096 0.89, 1024 0.93, add_delta 0.99. AHEAD = 8 on the other tiles, into L2 / into
///   L1, time over none: m = 4 and 8 (12 × 1) at 1024² 1.14–1.20 / 1.11–1.19 (at 4096² 0.87 / 0.93
///   for m = 8, 1.01 for m = 4); m = 32 1.00–1.01 / 0.99 at 4096², 1.09 at 1024²; m = 128 0.99–1.12
///   / 1.00–1.01 (m = 48 into L1 1.01): left off (m ≤ 8: the 8-row tiles with it, above). Zen 4
///   (the former VM), m × 4096 × 4096, float, one harness alternating the variants 30–40 times,
///   medians (ms; the former 12-row, G = 1 tiles for all m in brackets): m = 2–4: G = 4, 12 × 1:
///   2.3–2.7 (gemm_dot 3.8–4.9); m = 8: G = 2, 12 × 1: 2.8–2.9 (4.1–4.3), G = 4, 12 × 2: 3.1–3.2; m
///   = 16: G = 4, 6 × 4 with prefetch 3.56–3.62, without 3.86–3.88, G = 2, 12 × 2 3.5–3.9
///   (4.1–4.3); m = 32: G = 1, 12 × 2 6.4–6.6, G = 2, 6 × 4 6.4–6.6, G = 4, 3 × 8 10.1 (its 8
///   vectors of X per group come from L2: 1 load per 3 FMAs). 16 and 24-row tiles of G = 1 were
///   slower (4.7 and 8.7–12.6 ms at m = 16: GCC 12 runs out of registers for the rows' offsets).
///   A tile does NV / G FMAs per value of W whatever m is, so m that leaves lanes of its range's
///   tile empty takes a tile that fills them: `eighth` (float, m ≤ 2: G = 8, one vector, 1/8
///   against the quarter tile's 1/4), `three_eighths` (float, m ≤ 6: G = 8, 3 vectors, 3/8 against
///   1/2), `three_quarters` (m ≤ 3W/4: G = 4, 3 vectors, 3/4 against 1), `three_halves` (m ≤
///   3W/2: G = 2, 3 vectors, 3/2 against 2); all 8 rows of W (with AHEAD = 8 until the Zen 4
///   runs at the end of this entry). X Wᵀ alone, this Zen 5 VM, both builds in one process, 7–21
///   alternating bursts, medians, new / former time, float: m = 2 at 256² – 2048² 0.79–0.89 (the
///   other link order 1.13–1.22 former / new); m = 5 / 6 at 1024² 0.78 / 0.79; m = 9 / 10 / 12 at
///   1024² 0.81 / 0.82 / 0.82, m = 12 at 4096² 0.85; m = 17 / 20 / 24 at 1024² 0.77–0.78, 20 at
///   2048² 0.67, 24 at 4096² 0.75; double, m = 5 / 6 at 1024² 0.90 / 0.84, 6 at 4096² 1.02.
///   Shrink on it (n = 9–12, w = 32 / 64, in = 4096) 0.82–0.84, n = 12, in = 1024 0.87. Tiles
///   that only trade loads for FMAs gained nothing: G = 8 for m = 3, 4 (2 vectors) 0.96 / 1.02,
///   for m = 7, 8 (6 × 4) 0.96–1.04. On the Zen 5 VM, G = 2 for 2W + 1 to 5W/2 rows (4 × 5) and
///   3W + 1 to 7W/2 (3 × 7), float, m = 36 / 40 / 52 / 56 at 1024², 40 at 4096², took 1.09 / 1.18
///   / 1.26 / 1.16, 1.18× as long as the G = 1 tiles; so did the 8-row tiles as 4-row ones (m = 2 /
///   4: 1.06–1.18 / 1.16–1.32). With 5 rows of W, five vectors win on a Zen 4 VM (probe 134
///   GFLOP/s): `five_eighths` (float, W/2 + 1 to 5W/8 rows: G = 8, 5 × 5, against three_quarters'
///   3/4 per value of W, 5/8), `five_quarters` (W + 1 to 5W/4: G = 4, against three_halves' 3/2,
///   5/4) and `five_halves` (2W + 1 to 5W/2: G = 2, against three's 3, 5/2); 25 accumulators, 5
///   loads and 5 broadcasts per 25 FMAs; no L1 prefetch (the far one up to stream_far_rows). X Wᵀ
///   alone (base_product), old and new binaries alternating in 5–7 rounds, medians, new / old time
///   (each order once at 4096²): float 4096², m = 9 / 10 0.90–0.91, 17 / 18 / 20 0.86–0.88, 33 /
///   36 / 40 0.85; 1024² m = 9 / 10 0.87, 17 / 20 0.85, 33 / 40 0.84; 11008 × 4096 m = 10 / 18 / 36
///   0.90 / 0.87 / 0.86; 4096 × 11008 0.95 / 0.88 / 0.84; double 4096² m = 9 / 10 0.86, 17 / 20
///   0.87, 1024² 0.84–0.85; the rows next to these ranges 0.98–1.01. Shrink (gemm_stream_rows_passes,
///   n = 9 / 10, in = 4096, w = 32 and 64) 0.90–0.91, in = 1024, w = 64 0.86–0.90. Other tiles at
///   those rows, X Wᵀ alone, one process, 9 rounds (ms), float 4096²: m = 10, the former 8 × 3
///   4.18, G = 8, 5 × 5 3.75, 4 × 5 4.66, 4 × 6 5.24 (with the far prefetch; without it 4.32 / 5.21
///   for 5 × 5 / 4 × 5); m = 20: G = 2, 8 × 3 8.01, G = 4, 5 × 5 7.20, 4 × 5 9.09, 4 × 6 9.86; m =
///   36: G = 1, 8 × 3 14.5, G = 2, 5 × 5 12.2, 6 × 5 12.8. Not timed on a Zen 5 VM.
///   No prefetch (AHEAD = 0, was 8) in the tiles of up to W/2 rows and the three-vector ones (up to
///   3W/2 rows): a Zen 4 VM (probe 133.7 GFLOP/s), X Wᵀ alone, both in one process, 7–15
///   alternating rounds, each link order once, new / former time: 4096², float m = 3 0.87–0.95, 4
///   0.88–0.95, 6 0.84–0.91, 8 0.92–0.99, 12 0.91–0.93, 20 0.97–0.98, double m = 2 0.99–1.03, 4
///   0.88–0.91; 11008 rows × 4096 m = 2 0.91–0.93, 3 0.90–0.94, 4 0.77–0.94, 8 0.87–0.95; 1024² m
///   = 3 0.89–0.94, 4 0.93–0.94, 6 0.92–0.95, 8 0.97–0.98; shrink (V in L2), n = 8 / 12, w = 64
///   0.98–1.01. bench_core's forward, r = 16, old and new binaries alternating in 7 rounds: n = 2 /
///   4 / 8 at 1024² 0.89 / 0.93 / 0.98, at 4096² 0.90 / 0.86 / 0.87. The 8 × 2, G = 2 tile (9–16
///   rows) keeps AHEAD = 8: without, 1024² 0.98–1.00, 4096² 0.95–1.03, 11008 × 4096 0.91–0.98 on
///   this Zen 4, against 1.13× at 4096² on the Zen 5 VM (above). The small tiles without prefetch
///   have not been timed on a Zen 5 VM.
/// - `stream_tiles<Arch>::two_aliased`, `l1_set_span`, `stream_aliased_bytes`: the tile of W + 1
///   to 2W rows (17–32 in float) when W's rows are a multiple of l1_set_span bytes apart (the
///   span of one way of L1: 64 sets × 64 bytes; the 12 rows of the 12 × 2 tile then share one set
///   of a 12-way L1, against every line of packed X that passes through it) and W is larger than
///   stream_aliased_bytes (read from memory, not L3, between calls): G = 1, 8 × 2 with AHEAD = 8.
///   X Wᵀ alone, float, this Zen 5 VM, 12 × 2 and 8 × 2 alternating in 5–7 rounds, one shape per
///   process, time over 12 × 2: m = 17 / 20 / 24 / 28 / 32 at 4096² 0.98–1.04 / 0.94 / 0.88–0.91
///   / 0.89 / 0.91–0.93; at 2048² (16 MiB) 0.77 / 1.09 / 0.98 / 1.02 / 0.97–1.00 and at 1024²
///   0.82 / 1.05 / 1.03 / 1.06 / 0.98–1.03 (noisier; left on 12 × 2); m = 32, 3072² 0.98; rows
///   not aliased: 4096 rows × 11008 1.08 (slower), 11008 rows × 4096 0.89. Double (W + 1 to 2W:
///   9–16 rows), 5 rounds: m = 9 / 12 / 16 at 2048² (32 MiB) 0.85 / 0.75 / 0.74, 4096² 0.82 /
///   0.96 / 0.99. bench_core's forward, n = 32, 4096², r = 8 / 16 / 64, 7 rounds: 0.90 / 0.90 /
///   0.93.
/// - `stream_tiles<Arch>::few_far<T>`: up to 4 rows of X against a W read from memory (more than
///   stream_aliased_bytes; base_product sends one row to gemm_dot_streams), on AVX-512: 8 rows of W
///   × 1 vector, groups of 16 bytes (G = 4 in float, 2 in double: 4 rows of X per vector), with
///   stream_far_rows' prefetch; 8 broadcasts per 8 FMAs, but each row of W read 16 bytes per step.
///   X Wᵀ alone, a Zen 4 VM, one harness, 7–15 alternating rounds, medians (ms), float m = 2 / 3 /
///   4 against the former tiles (G = 8, 8 × 1 for 2 rows, 8 × 2 for 3–4): 11008 × 4096 6.32 / 6.37
///   / 6.38 against 6.94 / 7.89 / 7.87, 4096 × 11008 6.51 / 6.52 / 6.45 against 8.14 / 8.35 / 8.25;
///   4096², against gemm_dot_streams for 2–4 rows: see dot_streams_tile. Double, 11008 × 4096,
///   against G = 4, 8 × 2 (the former tile of 3–4 rows): 12.8 / 13.1 / 13.0 against 15.8 / 15.8 /
///   15.9. Other tiles at 4096², float, m = 4 (ms): 12 or 4 rows of W × 1 vector 3.00 / 2.99
///   against 2.30, without the prefetch 2.92; G = 8, 8 × 3 2.58; m = 5–8 stay on their tiles (8 × 3
///   of G = 8 for 5–6 rows: 2.45; m = 7–8: G = 4, 8 × 2 3.01–3.06, G = 8, 6 × 4 3.03, 7 × 4 3.09, 8
///   × 4 3.48). bench_core's forward, 4096², r = 16, old and new binaries alternating in 9 rounds,
///   each order once, new / old: n = 4 0.85 / 0.83, n = 2 0.97 / 0.97; the dots' time at n = 4
///   changes from one process to the next (2.55–3.09 ms over four such runs; the new tile
///   2.52–2.69), so shorter runs gave 0.92–1.01.
/// - `stream_tiles<Arch>::near<Tile>`: Tile against a W read from memory (more than
///   stream_aliased_bytes), each row of W prefetching (into L1) the line 8 lines ahead, without
///   stream_far_rows' prefetch into L2 (the tiles' `far`). First for float on AVX-512's 3W/8 + 1 to
///   W/2 and W/2 + 1 to 3W/4 rows of X (7–8, 9–12: the 8 × 2 and 8 × 3 tiles of G = 4); the former
///   half and five_eighths / three_quarters tiles took the far prefetch and none into L1 (Zen 4 and
///   Zen 5 measurements above). This Sapphire Rapids VM (probe 235 GFLOP/s, 29 GB/s from L3), X Wᵀ
///   alone, 4096², old and new headers alternating in 5 rounds, medians (ms): m = 7 2.78 → 2.71, 8
///   2.79 → 2.71, 9 3.54 → 3.26, 10 3.35 → 3.06, 12 3.42 → 3.10; one harness, 7–15 rounds, the 8 ×
///   3 tile with it against the former: m = 9 / 10 / 11 / 12 3.10 / 2.97 / 3.02 / 3.00 against 3.36
///   / 3.18 / 3.40 / 3.25; with both prefetches 3.35–3.49 (slower than either). W in L3 (1024²)
///   keeps the former tiles (there the L1 prefetch took 1.05× as long). Then every tile against a W
///   from memory but few_far, five_halves and those of 5–6 rows (float's three_eighths, within 1%;
///   double's three_quarters, within ±3%). Same VM, each tile alone (stream_rows_block), 4096²,
///   variants alternating in 5–7 rounds, medians (ms), without → with: float m = 20 (five_quarters)
///   4.72 → 4.14, 24 (three_halves) 5.21 → 4.89, 48 (three) 8.74 → 8.47, 64 (four) 11.56 →
///   11.10, 32 (two, rows not 4 KiB apart: 4100²) 6.95 → 6.60; double m = 10 9.03 (with the far
///   prefetch) → 8.88, 12 9.26 (far) → 8.58, 24 11.28 → 9.97, 32 13.60 → 12.77, 7 / 8 (one, far) 9.22
///   / 9.11 → 8.92 / 8.79; five_halves (float m = 40) 7.56 → 7.99, left off. AVX2 build
///   (-march=x86-64-v3), float: m = 8 (6 × 1) 3.91 → 3.79, 12 / 16 (6 × 2) 5.51 / 5.65 → 5.30 /
///   5.35, 24 (4 × 3) 8.64 → 8.14. X Wᵀ alone (base_product), old and new headers alternating:
///   float, 9 rounds, m = 64 / 128 0.975 / 0.988 the old time (3 rounds: m = 20 / 24 / 48 0.89 /
///   0.94 / 0.96); double, 5 rounds, m = 10 / 12 / 24 / 32 0.79 / 0.96 / 0.86 / 0.94. bench_core's
///   forward, 4096², old and new binaries alternating in 5 rounds: n = 20 0.96, n = 128 0.96–0.99 (r
///   = 8, 16, 64), n = 16 0.99, the rows whose path did not change 0.99–1.05; AVX2 build, n = 8 /
///   10 / 16 / 20 / 128 0.97 / 0.98 / 0.99 / 0.98 / 1.00 (unchanged rows 1.02–1.04); with 16
///   registers then also two_aliased (the 6 × 2 tile of W + 1 to 2W rows whose W rows share L1
///   sets): AVX2 build, n = 10 / 16, 4096², 5 alternating rounds, 0.96 / 0.99.
/// - `stream_block_vectors<T, Arch>`, `stream_batch_vectors<T>`: gemm_stream_rows takes up to 4 vectors
///   of rows of X per pass over W with 32 registers (tiles 8 × 3 and 6 × 4, G = 1: 24
///   accumulators, 3 or 4 loads and 8 or 6 broadcasts per step), 3 with 16 (4 × 3: 12
///   accumulators, 3 loads and 4 broadcasts per step; 2 vectors, 6 × 2 tiles, until the Sapphire
///   Rapids VM below: AVX2 build, X Wᵀ alone, old and new binaries alternating twice, medians of
///   15 × 10 calls, new / old time, float 4096²: m = 17 / 20 / 24 (one pass instead of two) 0.80–
///   0.86, 40 (3 + 2 vectors, not 2 + 2 + 1) 0.87–0.90, 56 0.92–0.93, 32 / 48 / 64 0.98–1.02;
///   1024²: m = 17–24 0.83–0.85, 40 0.92–0.94, 48 / 64 0.96–0.99; double, m = 9 / 12: 4096²
///   0.61–0.65, 1024² 0.73–0.75, m = 16 equal); with 16 registers 4 vectors against a W read
///   from memory, and in double (3 × 4: 12 accumulators, 4 loads and 3 broadcasts per step, the
///   broadcasts held while the loads pass one at a time), where 4 vectors of float against a W
///   from memory had gone to the grouped passes as blocks of 2 + 2 (4 × 2 tiles, 8 accumulators):
///   AVX2 build, this VM, X Wᵀ alone, old and new headers alternating in 3–5 rounds, new / old
///   time, float 4096² m = 25 / 32 0.92–0.98 / 0.88–0.97, double 4096² m = 13 / 16 0.92–0.96 /
///   0.94–1.01, 1024² m = 16 / 32 0.92–0.93 / 0.97; float 1024² (W in L3) m = 25 / 32 took 1.03×
///   as long and keeps 3 vectors; bench_core's forward, n = 32, 4096², r = 8 / 16 / 64, 5
///   alternating rounds: 0.90 / 0.90 / 0.92. The 3 × 4 tile takes no prefetch (as
///   stream_tiles::near it took 1.05× as long: float m = 32, 4096², 5 rounds). A batch of more
///   vectors goes in as few passes as that allows, its vectors shared evenly. With 32 registers
///   base_product streams W for every batch of 2 rows or more: X Wᵀ alone, float, this 2-core
///   Zen 4 VM (probe 121–134 GFLOP/s), medians of 9, ms, former stream kernel (2-vector passes) /
///   4-vector passes / gemm_packed: d = 1024: m = 48 1.22 / 0.92 / 1.15, 64 1.34 / 1.22 / 1.53,
///   128 3.53 / 2.42 / 2.67, 256 6.16 / 4.79 / 5.14, 512 12.0 / 9.78 / 10.7, 2048 — / 41.6 / 47.3;
///   d = 4096: m = 64 21.7 / 20.0 / 28.7, 128 47.8 / 39.5 / 49.6, 256 102 / 79.1 / 93.5, 512
///   — / 160 / 181; X 128 × 32768 against W 1024 × 32768 80.0 vs 99.9 (X's packed block, 8 MiB,
///   streams from L3 as W does); double, 1024: m = 64 2.89 / 2.61 / 3.18, 256 11.4 / 10.6 / 12.0.
///   m = 33 (3 vectors, one row in the third) 0.92 vs 0.83 by gemm_packed, kept for one rule. The
///   Zen 5 VM (probe 250 GFLOP/s), same three, medians of 3 × 15 (1024) or 3 × 5 (4096) calls, ms:
///   d = 1024: m = 48 0.73 / 0.60 / 1.31, 96 1.79 / 1.21 / 1.35, 128 1.36 / 1.35 / 1.46, 512 5.50 /
///   5.37 / 5.48; d = 4096: m = 64 15.7 / 14.0 / 18.5, 128 30.9 / 26.7 / 26.2, 256 56.0 / 54.5 /
///   50.3 (gemm_packed 8% ahead there, 14% behind on Zen 4); double, 1024: m = 256 5.51 / 5.11 /
///   5.59. With 16 registers (AVX2) the stream kernel keeps shorter passes and base_product takes
///   it up to `stream_batch_vectors<T>` vectors, gemm_packed beyond: 4 (32 rows of float, 16 of
///   double) until a 2-core Sapphire Rapids VM (probe 262 GFLOP/s fp32 with AVX-512, 30 GB/s from
///   L3), where an AVX2 build ran float batches past 32 rows by the stream kernel faster: X Wᵀ
///   alone, two binaries alternating twice, medians of 15 × 10 calls, stream / gemm_packed time:
///   4096², m = 33 / 40 / 48 / 64 / 96 / 128 0.85–0.89 / 0.73–0.78 / 0.71–0.72 / 0.73–0.78 /
///   0.79–0.88 / 0.82–0.95; 1024², m = 33 / 40 / 64 / 128 / 256 0.97 / 0.84–0.85 / 0.86–0.88 /
///   0.96–0.97 / 1.02. Float now takes 8 vectors (64 rows): at 64 rows the Zen 4 VM also ran the
///   stream kernel 15–23% faster, but the Zen 5 one ran 32 rows by it 1.19× as long per row as
///   128 by gemm_packed (not measured since at 65–128). Double stays at 4: there, with its W read
///   from memory once per pass of 2 vectors (8 rows), the stream kernel lost to gemm_dot (m = 17:
///   1.10–1.29) and gemm_packed (m = 33 / 64 / 128: 1.01–1.17 / 1.09 / 1.30) at 4096², though not
///   at 1024², where W stays in L2 (m = 33 / 64: 0.87 / 0.87).
/// - `stream_grouped<T, Arch>`, `stream_group_bytes`, `stream_group_kc_min`, `_max`,
///   `stream_group_rows<T>`: a batch of more than one pass against a W read from memory (more than
///   stream_aliased_bytes), in double with 32 registers and in either type with 16 (256-bit
///   vectors), goes through detail::stream_rows_grouped: W read once for up to stream_group_rows
///   rows (512 in double), not once per pass (of 4 vectors, 32 rows of double, with 32 registers),
///   by blocks of k whose packed rows of X, all passes', fill 1 MiB of L2 (at least 256 and at most
///   1024 steps; 256 steps set the row cap), each tile of rows of W (stream_tiles::three, 8 × 3,
///   with 32 registers; with 16, four, 3 × 4, where a block gets 4 vectors, else three, 4 × 3:
///   detail::stream_rows_grouped) running against every block of rows in turn (on AVX-512 6 × 4
///   and 12 × 2 ran 3–6% slower; with 16 registers the 3 × 4 tile's blocks of 4 vectors against
///   the 4 × 3's of 3, AVX2 build, X Wᵀ alone, 5 alternating rounds, new / old time: float 4096² m
///   = 64 / 128 0.98 / 0.99, 1024² m = 128 1.00; double 4096² m = 32 / 64 0.98 / 0.96; m = 40,
///   5 vectors as 3 + 2, 1.05 against the 4 × 3). With 16 registers base_product also takes a batch past
///   stream_max_rows there rather than to gemm_packed. Sapphire
///   Rapids VM (probe 268 GFLOP/s fp32, 134 fp64; 29.5 GB/s from L3, 17 from memory), X Wᵀ alone,
///   4096², double, medians of 3, old / new binaries alternating twice, ms: m = 40 21.9–22.3 →
///   17.7–18.7, 128 55.9–59.6 → 49.4–51.6, 256 111–112 → 100–101, 600 270–275 → 234–237; k in
///   blocks of 512 against 1024 at m = 128: within 2%; all of k in one block: 1.9× slower (the
///   packed rows, 4 MiB, no longer in L2). On AVX-512 float stays on its passes (two at m = 128,
///   W read twice): the same structure ran it 0.96–1.06× their time (m = 80–256, 4096² and
///   1024²); double at 1024² (W in L3) 1.03×. An AVX2 build (-march=x86-64-v3) on the same VM, 4096², medians of
///   5–7, ms, passes (or gemm_packed) → grouped: double m = 13 20.2 → 16.1, 16 19.3 → 15.9, 24
///   23.8 → 19.2, 48 45.5 (gemm_packed) → 33.4–34.0, 128 102.2 (gemm_packed) → 85.7–86.9; float
///   m = 28 / 32 / 40 / 48 / 64 12.6 / 12.0 / 15.3 / 17.1 / 22.8 → 12.1 / 12.2 / 14.7 / 15.7 /
///   22.3, 128 48.8 (gemm_packed) → 44.9.
/// - `stream_group_l3_bytes`, `stream_group_l3_rows`: with 16 registers, also a W of at least 2
///   MiB (past this VM's L2) that stays in L3, for a batch past stream_max_rows of up to 192 rows,
///   which went to gemm_packed (packing all of W every call). AVX2 build, X Wᵀ alone, medians of
///   3 × 11–41, grouped / gemm_packed time: double 512² (2 MiB) m = 64 / 128 / 192 / 256 0.87 /
///   0.91 / 0.96 / 1.01, 1024² m = 48 / 64 / 96 / 128 / 192 / 256 0.77 / 0.85 / 0.85 / 0.89 /
///   0.93 / 0.98; float 1024² m = 64 / 96 / 128 / 192 / 256 0.87–0.90 / 0.91 / 0.97 / 0.96–0.98
///   / 1.05, 1536² m = 128 / 192 / 256 0.95 / 0.95 / 0.99, 2048² 0.94 / 0.93 / 1.01, but 768²
///   (2.25 MiB) m = 128 / 192 1.01 / 1.00 and a W in L2 (512², 1 MiB) m = 128 / 192 1.04. Not
///   for the batches up to stream_max_rows, whose passes were faster (float 1024², m = 32 / 64:
///   grouped 1.13 / 1.04–1.06× the passes' time).
/// - `stream_min_rows<T, Arch>`, `stream_max_rows<T, Arch>`: the batches (rows of X) for which
///   base_product streams W through gemm_stream_rows. 32 registers: 2 rows and more. 16 registers:
///   up to stream_batch_vectors<T> · W (see above), and none with 128-bit vectors. With
///   16 the tiles hold one row of X per lane (G = 1), so a batch short of a vector leaves lanes
///   empty while gemm_dot does fewer FMAs: 3W/2 + 1 rows in float (13), W in double (4). AVX2
///   build (-march=x86-64-v3), X Wᵀ alone, 1024², both in one process, gemm_dot / stream time:
///   float m = 3 / 4 / 6 / 8 / 10 / 12 / 16 0.34 / 0.55 / 0.63 / 0.89–0.91 / 0.77 / 0.94 / 1.17,
///   m = 4 at 4096² 0.91; double m = 2 / 3 / 4 / 6 / 8 0.64 / 0.66 / 1.13 / 1.01 / 1.21. SSE (4
///   float lanes): n = 16 takes two passes of 8 rows, 21.8–22.2 ms against gemm_dot's 13.9–14.4
///   at 4096².
/// - `stream_min_rows_large<T, Arch>`: stream_min_rows for a W of more than stream_aliased_bytes
///   (read from memory between calls): 4 rows in float with 16 registers. AVX2 build on a Zen 4
///   VM, X Wᵀ alone, both in one process, each link order once, gemm_dot / stream time: 4096², m =
///   2 / 4 / 8 / 12 0.93–0.98 / 1.35–1.38 / 1.68 / 1.62–1.64, against 1024² m = 3 / 4 / 8 / 12
///   0.39 / 0.57–0.59 / 0.94–0.97 / 0.89–0.90: the dot kernel keeps pace with a W in L3, not with
///   one from memory. The m = 4 ratio at 4096² on an earlier VM (above) was 0.91.
/// - `row_backward_rows`: rows of V per block of shrink_row_backward (the one-row LoRA backward's
///   sweep over A: t = A x, dA = α g xᵀ, dx += α Aᵀ g), each block reading and writing dx once.
///   bench_lora's backward, n = 1, float, this Zen 5 VM, 4 rows against 1, 2 and 8 in 3
///   alternating rounds (ratios of medians, 1 / 2 / 8 over 4): 4096, r = 64 1.17 / 1.09 / 1.19,
///   r = 16 1.13 / 1.03 / 1.38; 1024, r = 8 0.96 / 0.97 / 1.33 (8 rows: 16 streams of A and dA a
///   row length apart, most of them in one L1 set).
/// - `sweep_kc`, `sweep_ab_rows`: the input gradient dY W (base_input_grad) of up to
///   sweep_ab_rows rows runs gemm_bcast_sweep, W read in blocks of sweep_kc rows; more rows,
///   gemm_packed_ab (gemm_packed with W's blocks copied from its rows); one row, Eigen's GEMV. Until
///   then all of it was Eigen's product, which re-packs W for every call (at n = 16, 4096², float,
///   5× the memory bound). This Sapphire Rapids VM, the product alone, one harness, medians of 5
///   (4096²) or 21 (1024²) calls, ms, Eigen / gemm_packed_ab / gemm_bcast_sweep: float 4096², n = 2
///   9.36 / 5.78 / 3.33, 8 9.71 / 6.44 / 3.25, 16 11.9 / 7.82 / 4.38, 32 15.9 / 10.4 / 7.81, 48 18.8
///   / 13.3 / 11.4, 64 21.5 / 16.1 / 16.2, 128 34.8 / 27.8 / 34.9; 1024², n = 16 0.668 / 0.439 /
///   0.267, 32 0.859 / 0.593 / 0.486, 64 1.18 / 0.922 / 0.924, 128 1.85 / 1.57 / 1.70; the AVX2 build
///   (float, 4096²), n = 16 14.4 / 11.6 / 8.15, 32 19.9 / 17.1 / 15.8, 64 32.0 / 28.1 / 29.7, 128 52.9
///   / 50.2 / 62.8; double (AVX-512, 4096²), n = 2 38.0 / 16.2 / 7.97, 16 38.5 / 23.3 / 15.5, 64 61.4
///   / 40.9 / 47.0, 128 83.0 / 69.0 / 88.6. The sweep's blocks of 16 / 32 / 64 rows (n = 16, 4096²,
///   float): 5.1–5.5 / 5.0–5.4 / 6.1–9.9 ms (n = 32: 9.9 / 8.2–8.6 / 8.5–10.0); 128–1024 rows
///   (strips of W far down its columns) 10–16 ms. Software prefetch of W into L2, ahead along the
///   rows or of the next block in either order, took 1.1–1.6× as long.
/// - `gemm_kc`, `gemm_mc`, `gemm_nc`: the blocks of gemm_packed (BLIS loop order). A kc × 16
///   micro-panel of packed Bᵀ is 24 KiB in float at kc = 384 (L1: 32 KiB), an mc × kc block of
///   packed A 216 KiB (L2: 512 KiB), a kc × nc block of B 1.5 MiB (L3). X Wᵀ with X 128 × 4096,
///   W 4096², float, medians of 9 interleaved runs (ms; OpenBLAS 67.6 in the same run): kc 256 /
///   384 / 512 with nc = 1024: 72.6 / 65.3 / 70.6; nc = 768: 69.3 / 73.6 / 71.6; an earlier run
///   57–58 ms for all three at nc = 1024 (OpenBLAS 56.1) and 65–79 ms at nc = 4096, whose 4 MiB
///   block of B does not stay in this VM's share of L3. `gemm_mc<T>` keeps the block of A at the
///   same bytes for every T (72 rows in double): X Wᵀ alone, X 128 × d, double, medians of 15–25
///   interleaved calls (ms), mc 144 → 72: d = 1024 3.51 → 3.22, 4.00 → 3.48, 3.47 → 3.19, 4.01 →
///   3.77 (four runs), 4096 56.0 → 55.4, 53.9 → 53.6, 54.0 → 53.6; kc 192 or 256 instead were in
///   between (float at mc = 72: 0.99–1.05× its time at 144, so float keeps 144). `gemm_nc<T>`
///   likewise keeps the block of B at the same bytes (512 rows in double): same harness, double at
///   mc = 72, nc 1024 → 512 (ms): d = 1024 3.42 → 3.17, 3.94 → 3.48; 4096 63.8 → 60.0, 64.6 → 60.7
///   (kc 192 or 256 with it: within 3%; float at nc = 512: 1.08–1.12× slower at 1024, 1.00 at 4096).
///   The harness alternates configurations call by call (W comes back from L3, as a model's
///   next layer's would); bench_core's fused forward, which repeats one W, shows 1.00–1.02× for
///   both changes (n = 128, double, 4 alternating rounds).
struct blocking {
    /// Whether Arch has 32 vector registers (AVX-512) rather than 16 (AVX2, SSE).
    template <class Arch>
    static constexpr bool wide_register_file =
#if XSIMD_WITH_AVX512F
        std::is_base_of_v<xsimd::avx512f, Arch>;
#else
        false;
#endif
    /// `gemm_mr<Arch>`: rows of the packed GEMM's micro-kernel (gemm_packed; × 2 vectors of
    /// columns). 6 on 16 registers (mr above). With AVX-512's 32: 12 rows × 2 vectors =
    /// 24 accumulators + 2 panel vectors + 1 broadcast (BLIS's Skylake-X sgemm kernel is the
    /// same 24-accumulator shape, 32 × 12), twice the FMAs per load of B. bench_core's forward,
    /// n = 128, r = 16, float, this AVX-512 VM, 6 × 2 → 12 × 2, ms: 4096² 42–50 → 26.4–27.0 (the
    /// strip layout a PackedWeight then had, 72–76 → 23.6–23.9).
    template <class Arch>
    static constexpr Index gemm_mr = wide_register_file<Arch> ? 12 : 6;
    static constexpr Index mr = 6;
    template <class Arch>
    static constexpr Index sweep_mr = wide_register_file<Arch> ? 8 : mr;
    template <class Arch>
    static constexpr Index band_mr = wide_register_file<Arch> ? 8 : mr;
    template <class Arch>
    static constexpr Index band_nv = wide_register_file<Arch> ? 3 : 2;
    static constexpr Index mc = 96;
    static constexpr Index short_k = 128;
    static constexpr int update_prefetch_tiles = 4;
    static constexpr Index band_rows = 32;
    static constexpr Index band_block_tiles = 4;
    static constexpr Index band_width = 32;
    static constexpr Index band_depth = 1024;
    static constexpr Index band_cols = 256;
    static constexpr Index kc = 256;
    static constexpr Index nc_bytes = 512 * 1024;
    static constexpr Index dot_mr = 3;
    template <class Arch>
    static constexpr Index dot_nr = wide_register_file<Arch> ? 8 : 4;
    static constexpr Index dot_kc = 1024;
    static constexpr Index gemv_row_bytes_min = 1024;
    static constexpr Index gemv_row_bytes_max = 8192;
    static constexpr Index gemv_weight_bytes_min = Index(2) << 20;
    static constexpr Index gemv_weight_bytes_max = Index(8) << 20;
    static constexpr Index dot_streams_max_rows = 4;
    [[nodiscard]] static constexpr Index dot_streams_tile(Index rows) noexcept {
        return rows <= 1 ? 8 : rows == 2 ? 6 : rows == 3 ? 5 : 4;
    }
    static constexpr Index far_prefetch_bytes = 2048;
    static constexpr Index far_prefetch_bytes_one_row = 1024;
    static constexpr Index stream_far_rows = 12;
    /// Whether one row against a row-major W of rows × cols values of `size` bytes runs gemv_rows.
    [[nodiscard]] static constexpr bool gemv_one_stream(Index rows, Index cols, Index size) noexcept {
        const Index row = cols * size, all = rows * row;
        return row >= gemv_row_bytes_min && row <= gemv_row_bytes_max && all >= gemv_weight_bytes_min &&
               all <= gemv_weight_bytes_max;
    }
    static constexpr Index stream_weight_rows = 32;
    template <class T>
    static constexpr Index stream_batch_vectors = sizeof(T) == 4 ? 8 : 4;
    template <class T, class Arch>
    static constexpr Index stream_min_rows = wide_register_file<Arch> ? 2
                                             : sizeof(T) == 4           ? 3 * xsimd::batch<T, Arch>::size / 2 + 1
                                                                        : xsimd::batch<T, Arch>::size;
    template <class T, class Arch>
    static constexpr Index stream_min_rows_large = sizeof(T) == 4 && !wide_register_file<Arch>
                                                       ? 4
                                                       : stream_min_rows<T, Arch>;
    template <class T, class Arch>
    static constexpr Index stream_max_rows = wide_register_file<Arch> ? std::numeric_limits<Index>::max()
                                             : sizeof(xsimd::batch<T, Arch>) >= 32
                                                 ? stream_batch_vectors<T> * xsimd::batch<T, Arch>::size
                                                 : 0;
    static constexpr Index packed_shrink_rows_one_vector = 192;
    static constexpr Index packed_shrink_rows_part_vector = 64;
    static constexpr Index narrow_project_rows = 8;
    static constexpr Index narrow_grad_rows = 2;
    template <class Arch>
    static constexpr Index narrow_grad_rows_full = wide_register_file<Arch> ? 24 : 16;
    static constexpr Index backward_block_bytes = Index(512) << 10;
    static constexpr Index backward_split_bytes = Index(1) << 20;
    /// Columns per block of lora_backward_delta's pass over Xa (n rows of `size`-byte values, in
    /// columns): all of in below backward_split_bytes of Xa, otherwise backward_block_bytes of it,
    /// at least 256 columns.
    [[nodiscard]] static constexpr Index backward_cols(Index n, Index in, Index size) noexcept {
        if (n * in * size < backward_split_bytes) return in;  // also n = 0: no division below
        return std::min(in, std::max<Index>(256, backward_block_bytes / (n * size) / 64 * 64));
    }
    template <int MR, int NV, Index G, Index AHEAD = 0, bool FAR = true>
    struct stream_tile {
        static constexpr int mr = MR, nv = NV;
        static constexpr Index g = G, ahead = AHEAD;
        static constexpr bool far = FAR;  // takes stream_far_rows' prefetch (into L2) where it applies
    };
    /// The stream_tile of gemm_stream_rows for a block of up to W/4, W/2, W, 2W, 3W and 4W rows of
    /// X (W: Arch's lanes of T; the last two with 32 registers only), and with 32 registers for W/8
    /// (float), W/4 (float: two_eighths, ahead of quarter), 3W/8 (float), 5W/8 (float), 3W/4, 5W/4,
    /// 3W/2 and 5W/2 rows: eighth, three_eighths, the five_ and three_ tiles fill one, three or
    /// five vectors where the tile of the next range up would leave lanes empty; two_eighths does
    /// quarter's FMAs with half its broadcasts.
    template <class Arch>
    struct stream_tiles {
        using eighth = stream_tile<8, 1, 8>;  // G = 8: float only (32-byte groups)
        using two_eighths = stream_tile<8, 2, 8>;
        using three_eighths = stream_tile<8, 3, 8>;
        using three_quarters = stream_tile<8, 3, 4>;
        using three_halves = stream_tile<8, 3, 2>;
        using quarter = std::conditional_t<wide_register_file<Arch>, stream_tile<8, 1, 4>, stream_tile<6, 1, 1>>;
        using half = std::conditional_t<wide_register_file<Arch>, stream_tile<8, 2, 4>, stream_tile<6, 1, 1>>;
        using one = std::conditional_t<wide_register_file<Arch>, stream_tile<8, 2, 2, 8>, stream_tile<6, 1, 1>>;
        using two = std::conditional_t<wide_register_file<Arch>, stream_tile<12, 2, 1>, stream_tile<6, 2, 1>>;
        using two_aliased = std::conditional_t<wide_register_file<Arch>, stream_tile<8, 2, 1, 8>, two>;
        using three = std::conditional_t<wide_register_file<Arch>, stream_tile<8, 3, 1>, stream_tile<4, 3, 1>>;
        using four = std::conditional_t<wide_register_file<Arch>, stream_tile<6, 4, 1>, stream_tile<3, 4, 1>>;
        using five_eighths = stream_tile<5, 5, 8>;  // 32 registers only (25 accumulators); float
        using five_quarters = stream_tile<5, 5, 4>;
        using five_halves = stream_tile<5, 5, 2>;
        template <class T>
        using few_far = stream_tile<8, 1, 16 / Index(sizeof(T))>;
        /// Tile against a W read from memory: each row of W prefetching into L1 the line 8 lines
        /// ahead, no prefetch into L2.
        template <class Tile>
        using near = stream_tile<Tile::mr, Tile::nv, Tile::g, 8, false>;
    };
    /// Vectors of rows of X per block of gemm_stream_rows (see the entry above).
    template <class T, class Arch>
    [[nodiscard]] static constexpr Index stream_block_vectors(bool w_from_memory) noexcept {
        return wide_register_file<Arch> || w_from_memory || sizeof(T) == 8 ? 4 : 3;
    }
    static constexpr Index l1_set_span = 4096;
    static constexpr Index stream_aliased_bytes = Index(16) << 20;
    static constexpr int row_backward_rows = 4;
    template <class T, class Arch>
    static constexpr bool stream_grouped =
        sizeof(xsimd::batch<T, Arch>) >= 32 && (sizeof(T) == 8 || !wide_register_file<Arch>);
    static constexpr Index stream_group_bytes = Index(1) << 20;
    static constexpr Index stream_group_l3_bytes = Index(2) << 20;
    static constexpr Index stream_group_l3_rows = 192;
    static constexpr Index stream_group_kc_min = 256;
    static constexpr Index stream_group_kc_max = 1024;
    template <class T>
    static constexpr Index stream_group_rows = stream_group_bytes / (stream_group_kc_min * Index(sizeof(T)));
    /// Steps of k per block of stream_rows_grouped for `lanes` packed rows of A: as many whole
    /// cache lines of them as fill stream_group_bytes, within [stream_group_kc_min, _max].
    template <class T>
    [[nodiscard]] static constexpr Index stream_group_kc(Index lanes) noexcept {
        constexpr Index line = 64 / Index(sizeof(T));
        const Index kc = stream_group_bytes / (std::max<Index>(lanes, 1) * Index(sizeof(T))) / line * line;
        return std::clamp(kc, stream_group_kc_min, stream_group_kc_max);
    }
    static constexpr Index sweep_kc = 32;
    static constexpr Index sweep_ab_rows = 48;
    static constexpr Index gemm_kc = 384;
    template <class T>
    static constexpr Index gemm_mc = 144 * 4 / Index(sizeof(T));
    template <class T>
    static constexpr Index gemm_nc = 1024 * 4 / Index(sizeof(T));
    [[nodiscard]] static constexpr bool narrow_dot(Index n, Index w) noexcept { return n <= 2 || 10 * n <= w; }
    /// A rank w of half a vector of `lanes` or less (8 in float on AVX-512): the broadcast
    /// kernel's vectors along it would run half empty.
    [[nodiscard]] static constexpr bool half_vector(Index w, Index lanes) noexcept { return 2 * w <= lanes; }
    [[nodiscard]] static constexpr bool packed_shrink(Index n, Index w, Index lanes) noexcept {
        if (half_vector(w, lanes) || w > 1024) return false;
        if (w < lanes) return 4 * w > 3 * lanes && n >= packed_shrink_rows_part_vector;
        return n >= (w == lanes ? packed_shrink_rows_one_vector : 8);
    }
    template <class Arch>
    [[nodiscard]] static constexpr bool stream_shrink(Index n, Index w) noexcept {
        return wide_register_file<Arch> && n >= stream_shrink_rows_min && n <= stream_shrink_rows_max &&
               w >= stream_shrink_rank;
    }
    static constexpr Index stream_shrink_rows_min = 8;
    static constexpr Index stream_shrink_rows_max = 16;
    static constexpr Index stream_shrink_rank = 32;
    [[nodiscard]] static constexpr bool narrow_project(Index n, Index w, Index lanes) noexcept {
        return half_vector(w, lanes) && n >= narrow_project_rows;
    }
    template <class Arch>
    [[nodiscard]] static constexpr bool narrow_grad(Index n, Index w, Index lanes) noexcept {
        return (half_vector(w, lanes) && n >= narrow_grad_rows) ||
               (w == lanes && n >= narrow_grad_rows_full<Arch>);
    }
};

/// Uᵀ in strips one cache line wide, the layout `gathered_expand_strips` reads: for a w × out
/// matrix Uᵀ (U: out × w), strip s holds columns [s·S, s·S + S) of all w rows, row after row
/// (S = strip_width<T>: 64 bytes of T), and the strips follow each other. It is stored as a
/// ⌈out / S⌉·w × S row-major matrix (row s·w + j = row j of strip s); the last strip's columns
/// past `out` are padding, never read. An expand tile's panel (w rows × its columns) is then one
/// contiguous run, and a sweep over the outputs reads Uᵀ as a single sequential stream instead
/// of w interleaved rows (mixed n = 64, 8 adapters, r = 16, 4096², float: the expand
/// 158 → 132 µs, same run; everything L2-resident: 52 → 66 GFLOP/s).
template <class T>
inline constexpr Index strip_width = 64 / Index(sizeof(T));

/// Rows of the strip layout of a w × out Uᵀ.
template <class T>
[[nodiscard]] constexpr Index strip_rows(Index w, Index out) noexcept {
    return (out + strip_width<T> - 1) / strip_width<T> * w;
}

/// Writes a w × n matrix B, B(j, o) = b[j·rsb + o·csb], into `dst` (strip_rows<T>(w, n) ×
/// strip_width<T> values) in strips; padding columns are set to zero.
template <class T>
void pack_strips(Index w, Index n, const T* b, Index rsb, Index csb, T* dst) noexcept {
    constexpr Index S = strip_width<T>;
    if (csb == 1) {  // rows of B contiguous: each full strip row is a copy of S values
        const Index full = n / S;
        for (Index s = 0; s < full; ++s)
            for (Index j = 0; j < w; ++j) std::copy_n(b + j * rsb + s * S, S, dst + (s * w + j) * S);
        if (full * S == n) return;
        b += full * S;
        dst += full * w * S;
        n -= full * S;
    }
    for (Index s = 0; s * S < n; ++s)
        for (Index j = 0; j < w; ++j) {
            T* d = dst + (s * w + j) * S;
            for (Index c = 0; c < S; ++c) d[c] = s * S + c < n ? b[j * rsb + (s * S + c) * csb] : T(0);
        }
}

// ------------------------------------------------------------------------------------------------
// Scalar references. Plain loops, double-checked by tests against naive double-precision products.
// ------------------------------------------------------------------------------------------------

/// Reference for gemm_bcast: C[i,j] = (accumulate ? C[i,j] : 0) + alpha Σ_p A(i,p) B[p,j],
/// with A(i,p) = a[i*rsa + p*csa].
template <class T>
void gemm_bcast_ref(Index m, Index n, Index k, T alpha, const T* a, Index rsa, Index csa,
                    const T* b, Index ldb, T* c, Index ldc, bool accumulate) noexcept {
    for (Index i = 0; i < m; ++i)
        for (Index j = 0; j < n; ++j) {
            T acc(0);
            for (Index p = 0; p < k; ++p) acc += a[i * rsa + p * csa] * b[p * ldb + j];
            c[i * ldc + j] = (accumulate ? c[i * ldc + j] : T(0)) + alpha * acc;
        }
}

/// Reference for gemm_dot: C[i,j] = (accumulate ? C[i,j] : 0) + alpha Σ_p A[i,p] B[j,p].
template <class T>
void gemm_dot_ref(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb,
                  T* c, Index ldc, bool accumulate) noexcept {
    for (Index i = 0; i < m; ++i)
        for (Index j = 0; j < n; ++j) {
            T acc(0);
            for (Index p = 0; p < k; ++p) acc += a[i * lda + p] * b[j * ldb + p];
            c[i * ldc + j] = (accumulate ? c[i * ldc + j] : T(0)) + alpha * acc;
        }
}

namespace detail {

/// A leading dimension ≥ cols whose row stride in bytes is an odd multiple of the vector size (at
/// least 32 bytes): rows of a scratch block then fall in different L1 sets (a power-of-two stride,
/// e.g. 4096 floats, maps every row of a tile to the same set and slows the micro-kernels by up to
/// 4x on the AVX2 machine), and a full-width load from a row start aligned to the vector size
/// stays within one cache line (an odd multiple of 32 bytes puts every other row of a 64-byte
/// AVX-512 load across two lines).
template <class T, class Arch = xsimd::default_arch>
[[nodiscard]] constexpr Index padded_ld(Index cols) noexcept {
    constexpr Index chunk = std::max<Index>(32, Index(sizeof(xsimd::batch<T, Arch>))) / Index(sizeof(T));
    Index ld = (std::max<Index>(cols, 1) + chunk - 1) / chunk * chunk;
    if ((ld / chunk) % 2 == 0) ld += chunk;
    return ld;
}

#if XSIMD_WITH_AVX
/// 8 × 8 float transpose in AVX registers (the shuffle network of the classic 8 × 8 transpose:
/// 24 shuffles instead of 64 scalar moves).
LOWRANK_TILE_INLINE void transpose_8x8(const float* src, Index lds, float* dst, Index ldd) noexcept {
    __m256 r[8], s[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
        s[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        s[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(s[i], s[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(s[i], s[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(s[i + 1], s[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(s[i + 1], s[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

/// 4 × 4 double transpose in AVX registers.
LOWRANK_TILE_INLINE void transpose_4x4(const double* src, Index lds, double* dst, Index ldd) noexcept {
    __m256d r[4], s[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm256_loadu_pd(src + i * lds);
    s[0] = _mm256_unpacklo_pd(r[0], r[1]);
    s[1] = _mm256_unpackhi_pd(r[0], r[1]);
    s[2] = _mm256_unpacklo_pd(r[2], r[3]);
    s[3] = _mm256_unpackhi_pd(r[2], r[3]);
    _mm256_storeu_pd(dst + 0 * ldd, _mm256_permute2f128_pd(s[0], s[2], 0x20));
    _mm256_storeu_pd(dst + 1 * ldd, _mm256_permute2f128_pd(s[1], s[3], 0x20));
    _mm256_storeu_pd(dst + 2 * ldd, _mm256_permute2f128_pd(s[0], s[2], 0x31));
    _mm256_storeu_pd(dst + 3 * ldd, _mm256_permute2f128_pd(s[1], s[3], 0x31));
}
#endif

#if XSIMD_WITH_AVX512F
/// 16 × 16 float transpose in AVX-512 registers: unpacks of 32- and 64-bit elements within each
/// 128-bit lane (rows 4q…4q + 3 of column c of every lane in one vector), then two exchanges of
/// 128-bit lanes, 4 and 8 vectors apart: 64 shuffles, against 96 for the four AVX 8 × 8 tiles it
/// replaces (with twice the loads and stores). Alone, a 256 × 16 block: 340–460 → 281–287 ns;
/// 1024 × 16 2.28–2.36 → 1.64–1.65 µs; 128 × 64 830–849 → 670–685 ns (this AVX-512 VM).
LOWRANK_TILE_INLINE void transpose_512(const float* src, Index lds, float* dst, Index ldd) noexcept {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    const auto lo64 = [](__m512 a, __m512 b) {
        return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    const auto hi64 = [](__m512 a, __m512 b) {
        return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    for (int i = 0; i < 16; i += 4) {  // r[i + c]: rows i…i + 3 of column c of each 128-bit lane
        r[i] = lo64(t[i], t[i + 2]);
        r[i + 1] = hi64(t[i], t[i + 2]);
        r[i + 2] = lo64(t[i + 1], t[i + 3]);
        r[i + 3] = hi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // lanes 0, 2 (0x88) and 1, 3 (0xdd) of rows 0–7, then 8–15
        t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
        t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
        t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
        t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    }
    for (int c = 0; c < 4; ++c) {  // column c of lane l is row 4l + c of the result
        _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88));
        _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd));
        _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88));
        _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd));
    }
}

/// 8 × 8 double transpose in AVX-512 registers, the same steps (24 shuffles against 32).
LOWRANK_TILE_INLINE void transpose_512(const double* src, Index lds, double* dst, Index ldd) noexcept {
    __m512d r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_pd(src + i * lds);
    for (int i = 0; i < 8; i += 2) {  // t[i + c]: rows i, i + 1 of column c of each 128-bit lane
        t[i] = _mm512_unpacklo_pd(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_pd(r[i], r[i + 1]);
    }
    for (int c = 0; c < 2; ++c) {
        r[c] = _mm512_shuffle_f64x2(t[c], t[2 + c], 0x88);
        r[2 + c] = _mm512_shuffle_f64x2(t[c], t[2 + c], 0xdd);
        r[4 + c] = _mm512_shuffle_f64x2(t[4 + c], t[6 + c], 0x88);
        r[6 + c] = _mm512_shuffle_f64x2(t[4 + c], t[6 + c], 0xdd);
    }
    for (int c = 0; c < 2; ++c) {  // column c of lane l is row 2l + c of the result
        _mm512_storeu_pd(dst + c * ldd, _mm512_shuffle_f64x2(r[c], r[4 + c], 0x88));
        _mm512_storeu_pd(dst + (4 + c) * ldd, _mm512_shuffle_f64x2(r[c], r[4 + c], 0xdd));
        _mm512_storeu_pd(dst + (2 + c) * ldd, _mm512_shuffle_f64x2(r[2 + c], r[6 + c], 0x88));
        _mm512_storeu_pd(dst + (6 + c) * ldd, _mm512_shuffle_f64x2(r[2 + c], r[6 + c], 0xdd));
    }
}
#endif

/// W × W transpose of a tile: dst[j][i] = src[i][j]. In registers on AVX-512, AVX and SSE2
/// (xsimd's avx512f is not an avx: without its own tiles it fell through to the scalar loop,
/// 16 × 16 moves per tile, half the time of a mixed batch, 8 adapters, n = 64, 4096², float);
/// scalar otherwise.
template <class T, class Arch>
LOWRANK_TILE_INLINE void transpose_tile(const T* src, Index lds, T* dst, Index ldd) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
#if XSIMD_WITH_AVX512F
    if constexpr (std::is_base_of_v<xsimd::avx512f, Arch>) {
        static_assert(W * Index(sizeof(T)) == 64, "transpose_tile: AVX-512 tiles are 16 x 16 float, 8 x 8 double");
        transpose_512(src, lds, dst, ldd);
        return;
    }
#endif
#if XSIMD_WITH_AVX
    if constexpr (std::is_base_of_v<xsimd::avx, Arch> && std::is_same_v<T, float>) {
        static_assert(W == 8, "transpose_tile: AVX float tiles are 8 x 8");
        transpose_8x8(src, lds, dst, ldd);
        return;
    } else if constexpr (std::is_base_of_v<xsimd::avx, Arch> && std::is_same_v<T, double>) {
        static_assert(W == 4, "transpose_tile: AVX double tiles are 4 x 4");
        transpose_4x4(src, lds, dst, ldd);
        return;
    }
#endif
#if XSIMD_WITH_SSE2
    if constexpr (std::is_base_of_v<xsimd::sse2, Arch> && std::is_same_v<T, float>) {
        static_assert(W == 4, "transpose_tile: SSE float tiles are 4 x 4");
        __m128 r0 = _mm_loadu_ps(src), r1 = _mm_loadu_ps(src + lds), r2 = _mm_loadu_ps(src + 2 * lds),
               r3 = _mm_loadu_ps(src + 3 * lds);
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        _mm_storeu_ps(dst, r0);
        _mm_storeu_ps(dst + ldd, r1);
        _mm_storeu_ps(dst + 2 * ldd, r2);
        _mm_storeu_ps(dst + 3 * ldd, r3);
        return;
    } else if constexpr (std::is_base_of_v<xsimd::sse2, Arch> && std::is_same_v<T, double>) {
        static_assert(W == 2, "transpose_tile: SSE double tiles are 2 x 2");
        const __m128d r0 = _mm_loadu_pd(src), r1 = _mm_loadu_pd(src + lds);
        _mm_storeu_pd(dst, _mm_unpacklo_pd(r0, r1));
        _mm_storeu_pd(dst + ldd, _mm_unpackhi_pd(r0, r1));
        return;
    }
#endif
    LOWRANK_UNROLL for (Index i = 0; i < W; ++i)
        LOWRANK_UNROLL for (Index j = 0; j < W; ++j) dst[j * ldd + i] = src[i * lds + j];
}

/// Calls f(std::integral_constant<int, rem>()) for a row count 1 ≤ rem ≤ MR: the last rows of a
/// sweep take one tile of exactly their count.
template <int MR, class F>
inline void dispatch_rows(Index rem, F&& f) {
    if constexpr (MR > 0) {
        if (rem == MR)
            f(std::integral_constant<int, MR>());
        else
            dispatch_rows<MR - 1>(rem, std::forward<F>(f));
    }
}

/// Covers rows [0, m) with tiles: f(i, std::integral_constant<int, MR>()) for every full tile of
/// MR rows starting at i, then f(i, std::integral_constant<int, m − i>()) once for the rows left.
template <int MR, class F>
inline void row_tiles(Index m, F&& f) {
    Index i = 0;
    for (; i + MR <= m; i += MR) f(i, std::integral_constant<int, MR>());
    if (i < m) dispatch_rows<MR - 1>(m - i, [&](auto mr) { f(i, mr); });
}

/// The loop of every broadcast tile: sum[i][v] = Σ_{p < steps} a(i, p) ·
/// (vector v of row p of the panel) for MR rows and NV vectors, each a(i, p) broadcast against NV
/// vectors. Row p starts at panel + p·ldp; its vectors come in runs of RV contiguous ones, each
/// run `jump` past the previous (RV = NV: all contiguous). With fewer than 8 accumulators (narrow
/// tiles) U independent sets of them take alternate p, so that at least 8 FMAs are in flight
/// (latency 4 × 2 pipes), and are summed at the end. K > 0: the depth is K, fixed at compile time
/// (`steps` ignored). FromSum: the sums start from the values in `sum` instead of zero.
template <int MR, int NV, int RV, class T, class Arch, int K = 0, bool FromSum = false, class A>
inline void bcast_accumulate(Index steps, A&& a, const T* panel, Index ldp, Index jump,
                             xsimd::batch<T, Arch> (&sum)[MR][NV]) noexcept {
    if constexpr (K > 0) steps = K;
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    constexpr int U = MR * NV >= 8 ? 1 : (MR * NV >= 4 ? 2 : 4);
    // On AVX-512, for 2 vectors and up to 10 rows (the registers hold MR broadcasts, 2·MR
    // accumulators and a panel vector): a step's MR broadcasts first, then each panel vector
    // against all of them. In the other order (both panel vectors, then each broadcast against
    // them) GCC 12 compiled the 8 × 2 expand tile of the band sweeps with one panel vector stored
    // to the stack and re-read by 8 of the 16 FMAs, every step (the 12 × 2 GEMM tile does not fit
    // this order and was compiled clean in the other). Same sums in the same order either way.
    constexpr bool broadcasts_first =
        blocking::wide_register_file<Arch> && NV == 2 && MR >= 4 && MR * (NV + 1) + 1 <= 32;
    batch acc[U][MR][NV];
    LOWRANK_UNROLL for (int u = 0; u < U; ++u)
        LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
            LOWRANK_UNROLL for (int v = 0; v < NV; ++v) acc[u][i][v] = FromSum && u == 0 ? sum[i][v] : batch(T(0));
    auto step = [&](Index p, auto& s) {
        if constexpr (broadcasts_first) {
            batch ai[MR];
            LOWRANK_UNROLL for (int i = 0; i < MR; ++i) ai[i] = batch(a(i, p));
            LOWRANK_UNROLL for (int v = 0; v < NV; ++v) {
                const batch b = batch::load_unaligned(panel + p * ldp + (v / RV) * jump + (v % RV) * W);
                LOWRANK_UNROLL for (int i = 0; i < MR; ++i) s[i][v] = xsimd::fma(ai[i], b, s[i][v]);
            }
        } else {
            batch b[NV];
            LOWRANK_UNROLL for (int v = 0; v < NV; ++v)
                b[v] = batch::load_unaligned(panel + p * ldp + (v / RV) * jump + (v % RV) * W);
            LOWRANK_UNROLL for (int i = 0; i < MR; ++i) {
                const batch ai(a(i, p));
                LOWRANK_UNROLL for (int v = 0; v < NV; ++v) s[i][v] = xsimd::fma(ai, b[v], s[i][v]);
            }
        }
    };
    Index p = 0;
    for (; p + U <= steps; p += U)
        LOWRANK_UNROLL for (int u = 0; u < U; ++u) step(p + u, acc[u]);
    for (; p < steps; ++p) step(p, acc[0]);
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) {
            sum[i][v] = acc[0][i][v];
            LOWRANK_UNROLL for (int u = 1; u < U; ++u) sum[i][v] += acc[u][i][v];
        }
}

/// Writes an MR × NV tile of sums: C (+)= α · sum, row i of the tile starting at row(i) (what every
/// broadcast tile ends with: gemm_bcast's, the expand and shrink tiles, the packed GEMM's).
template <int MR, int NV, class T, class Arch, class Row>
LOWRANK_TILE_INLINE void store_tile(const xsimd::batch<T, Arch> (&sum)[MR][NV], Row&& row, T alpha,
                                    bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    const batch al(alpha);
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) {
            T* dst = row(i) + v * W;
            const batch r = accumulate ? xsimd::fma(al, sum[i][v], batch::load_unaligned(dst)) : al * sum[i][v];
            r.store_unaligned(dst);
        }
}

/// The same for a tile of which only the first `valid` columns exist (a partial last vector goes
/// through a small buffer).
template <int MR, int NV, class T, class Arch, class Row>
LOWRANK_TILE_INLINE void store_tile(const xsimd::batch<T, Arch> (&sum)[MR][NV], Row&& row, T alpha,
                                    bool accumulate, Index valid) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    if (valid == NV * W) return store_tile<MR, NV, T, Arch>(sum, row, alpha, accumulate);
    const batch al(alpha);
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV && v * W < valid; ++v) {
            T* dst = row(i) + v * W;
            alignas(64) std::array<T, W> tmp;
            (al * sum[i][v]).store_aligned(tmp.data());
            const Index n = std::min<Index>(W, valid - v * W);
            for (Index j = 0; j < n; ++j) dst[j] = (accumulate ? dst[j] : T(0)) + tmp[j];
        }
}

/// One micro-tile of gemm_bcast: rows [0, MR) of C, NV vectors of columns, over kc steps of k
/// (K > 0: K steps, fixed at compile time). Stores only the first `ncols` columns. At a fixed depth,
/// a whole tile added to C with alpha = 1 starts its sums from C and stores them as they are.
template <int MR, int NV, class T, class Arch, int K = 0>
LOWRANK_TILE_INLINE void bcast_tile(Index kc, T alpha, const T* a, Index rsa, Index csa, const T* b, Index ldb,
                                    T* c, Index ldc, bool accumulate, Index ncols) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    batch acc[MR][NV];
    const auto a_ip = [&](int i, Index p) { return a[i * rsa + p * csa]; };
    if constexpr (K > 0) {
        if (accumulate && alpha == T(1) && ncols == NV * W) {
            LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
                LOWRANK_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = batch::load_unaligned(c + i * ldc + v * W);
            bcast_accumulate<MR, NV, NV, T, Arch, K, true>(kc, a_ip, b, ldb, 0, acc);
            LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
                LOWRANK_UNROLL for (int v = 0; v < NV; ++v) acc[i][v].store_unaligned(c + i * ldc + v * W);
            return;
        }
    }
    bcast_accumulate<MR, NV, NV, T, Arch, K>(kc, a_ip, b, ldb, 0, acc);
    store_tile<MR, NV, T, Arch>(acc, [&](int i) { return c + i * ldc; }, alpha, accumulate, ncols);
}

/// C[0..m, 0..NV·W) (+)= α a bᵀ, an outer product (k = 1): the NV vectors of α b stay in registers
/// and C is written row after row. Callgrind, float, against the 6-row tiles: 4096 × 16 (dB of a
/// one-row batch) 115 k → 37 k instructions, 16 × 4096 (its dA) 84 k → 28 k.
template <int NV, class T, class Arch>
void outer_block(Index m, T alpha, const T* a, Index rsa, const T* b, T* c, Index ldc, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    batch bv[NV];
    LOWRANK_UNROLL for (int v = 0; v < NV; ++v) bv[v] = batch(alpha) * batch::load_unaligned(b + v * W);
    for (Index i = 0; i < m; ++i) {
        const batch ai(a[i * rsa]);
        T* ci = c + i * ldc;
        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) {
            const batch r = accumulate ? xsimd::fma(ai, bv[v], batch::load_unaligned(ci + v * W)) : ai * bv[v];
            r.store_unaligned(ci + v * W);
        }
    }
}

/// C (+)= α a bᵀ (k = 1) for rows wider than 4 vectors (the factor gradient dA = α Gᵀ X of a
/// one-row batch): row after row, b re-read from L1, so C is written as one sequential stream.
/// outer_block's column blocks wrote down all m rows before moving right: m streams a row length
/// apart (one L1 set at a power-of-two length).
template <class T, class Arch>
void outer_rows(Index m, Index n, T alpha, const T* a, Index rsa, const T* b, T* c, Index ldc,
                bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    const Index nv = n / W * W;
    for (Index i = 0; i < m; ++i) {
        const T ai = alpha * a[i * rsa];
        const batch av(ai);
        T* ci = c + i * ldc;
        for (Index j = 0; j < nv; j += W) {
            const batch bv = batch::load_unaligned(b + j);
            const batch r = accumulate ? xsimd::fma(av, bv, batch::load_unaligned(ci + j)) : av * bv;
            r.store_unaligned(ci + j);
        }
        for (Index j = nv; j < n; ++j) ci[j] = (accumulate ? ci[j] : T(0)) + ai * b[j];
    }
}

/// c[0..n) (+)= α Σ_p a[p·csa] B[p, 0..n) (B k × n, row-major): a C of one row (dX = α G A of a
/// one-row batch). The band tiles would read all k rows of B side by side for each few vectors of
/// c (k streams a row length apart: one L1 set at a power-of-two length) into 3 sums, a chain of
/// k dependent FMAs each (latency bound). Here B is read 4 rows at a time, each row sequentially,
/// into the sums of a block of columns held in a 4 KiB buffer; each block's sums are then added
/// to c once (α applied once, one rounding into c, as in the tiles).
template <class T, class Arch>
void row_product(Index n, Index k, T alpha, const T* a, Index csa, const T* b, Index ldb, T* c,
                 bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size, CB = 4096 / Index(sizeof(T));
    alignas(64) std::array<T, CB> sum;
    for (Index j0 = 0; j0 < n; j0 += CB) {
        const Index nb = std::min(CB, n - j0), nv = nb / W * W;
        const T* bj = b + j0;
        T* s = sum.data();
        // Rows [p, p + G) of B into the sums (the first group sets them).
        const auto rows = [&](Index p, auto group) {
            constexpr int G = decltype(group)::value;
            batch ap[G];
            const T* bp[G];
            LOWRANK_UNROLL for (int g = 0; g < G; ++g) {
                ap[g] = batch(a[(p + g) * csa]);
                bp[g] = bj + (p + g) * ldb;
            }
            for (Index j = 0; j < nv; j += W) {
                batch acc = p == 0 ? batch(T(0)) : batch::load_aligned(s + j);
                LOWRANK_UNROLL for (int g = 0; g < G; ++g)
                    acc = xsimd::fma(ap[g], batch::load_unaligned(bp[g] + j), acc);
                acc.store_aligned(s + j);
            }
            for (Index j = nv; j < nb; ++j) {
                T acc = p == 0 ? T(0) : s[j];
                for (int g = 0; g < G; ++g) acc += a[(p + g) * csa] * bp[g][j];
                s[j] = acc;
            }
        };
        Index p = 0;
        for (; p + 4 <= k; p += 4) rows(p, std::integral_constant<int, 4>());
        for (; p < k; ++p) rows(p, std::integral_constant<int, 1>());
        const batch al(alpha);
        T* cj = c + j0;
        for (Index j = 0; j < nv; j += W) {
            const batch v = batch::load_aligned(s + j);
            (accumulate ? xsimd::fma(al, v, batch::load_unaligned(cj + j)) : al * v).store_unaligned(cj + j);
        }
        for (Index j = nv; j < nb; ++j) cj[j] = (accumulate ? cj[j] : T(0)) + alpha * s[j];
    }
}

/// All m rows of a column block: tiles of blocking::mr rows, then one tile of the rows left.
template <int NV, class T, class Arch>
inline void bcast_rows(Index m, Index kc, T alpha, const T* a, Index rsa, Index csa, const T* b,
                       Index ldb, T* c, Index ldc, bool accumulate, Index ncols) noexcept {
    row_tiles<int(blocking::mr)>(m, [&](Index i, auto mr) {
        bcast_tile<decltype(mr)::value, NV, T, Arch>(kc, alpha, a + i * rsa, rsa, csa, b, ldb, c + i * ldc, ldc,
                                                      accumulate, ncols);
    });
}

/// Rows [0, R) of C over its whole vectors [j, jend): tiles of NV vectors (NV + 1 vectors as
/// 2 + 2 ... rather than NV + 1), then of 2, then of 1.
template <int R, int NV, class T, class Arch, int K = 0>
inline void bcast_band(Index j, Index jend, Index kc, T alpha, const T* a, Index rsa, Index csa, const T* b,
                       Index ldb, T* c, Index ldc, bool accumulate) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index vectors = (jend - j) / W;
    const Index wide = NV > 2 && vectors == NV + 1 ? 0 : vectors / NV;
    for (Index t = 0; t < wide; ++t, j += NV * W)
        bcast_tile<R, NV, T, Arch, K>(kc, alpha, a, rsa, csa, b + j, ldb, c + j, ldc, accumulate, NV * W);
    if constexpr (NV > 2)
        for (; j + 2 * W <= jend; j += 2 * W)
            bcast_tile<R, 2, T, Arch, K>(kc, alpha, a, rsa, csa, b + j, ldb, c + j, ldc, accumulate, 2 * W);
    if constexpr (NV > 1)
        for (; j < jend; j += W)
            bcast_tile<R, 1, T, Arch, K>(kc, alpha, a, rsa, csa, b + j, ldb, c + j, ldc, accumulate, W);
}

/// bcast_band for A read down its columns, A(i, p) = a[i + p·csa] with a long stride csa (dYᵀ in
/// dU = α dYᵀ T: each step broadcasts from another row of dY, 4 or 16 KiB apart at 1024 or 4096
/// outputs, all in one L1 set): the band's R × kc panel is first copied into contiguous values
/// and the tiles broadcast from the copy, at strides known at compile time: flattened, so that the
/// band is inlined with them (GCC 12 otherwise called the one out-of-line bcast_band it shares with
/// A in place, run-time strides: 1.27× the time, n = 16, 4096 outputs, r = 16). kc ≤ short_k.
/// dU = α dYᵀ T alone, float, this AVX-512 VM, one process, A in place → copied (µs): 4096
/// outputs, n = 16: r = 64 64.9–66.0 → 58.4–58.5, r = 32 37.3 → 33.4–33.9, r = 16 24.4–24.7 →
/// 19.5–21.0; n = 128, r = 64 636–648 → 581–591; inside the backward's phases, old and new builds
/// alternating: n = 32, r = 64 136 → 119, n = 64, r = 32 150 → 135, n = 128 equal (r = 32, 64). The
/// AVX2 build's 6-row bands copy 6 values per step, not one vector: there dU at r = 16 (2 vectors)
/// took 1.33–1.46× as long (n = 16–128, 4096), though 0.80× at r = 64: left on A in place.
/// The depth stays a run-time value: fixed at 8 (gemm_bcast's fixed-depth bands), the flattened
/// band took 1.4× as long (see there).
template <int R, int NV, class T, class Arch>
LOWRANK_NOINLINE LOWRANK_FLATTEN void bcast_band_packed(Index j, Index jend, Index kc, T alpha, const T* a,
                                                        Index csa, const T* b, Index ldb, T* c, Index ldc,
                                                        bool accumulate) noexcept {
    alignas(64) std::array<T, R * blocking::short_k> panel;
    for (Index p = 0; p < kc; ++p)
        LOWRANK_UNROLL for (int q = 0; q < R; ++q) panel[p * R + q] = a[q + p * csa];
    bcast_band<R, NV, T, Arch>(j, jend, kc, alpha, panel.data(), 1, R, b, ldb, c, ldc, accumulate);
}

/// Vectors per tile of a band of R < band_mr rows (the rows left below the last full band of a
/// short k, or all of a C of fewer rows): as many as the registers hold beside the R · NV
/// accumulators, NV loads and one broadcast, at most 4; 3 for a single row. See
/// blocking::band_mr for the measurements.
template <class Arch, int R>
inline constexpr int partial_band_nv =
    R == 1 ? 3 : std::min(4, ((blocking::wide_register_file<Arch> ? 32 : 16) - 1) / (R + 1));

/// The GEMMs' cases with nothing to multiply: an empty C (m × n), or k = 0, where C (+)= a sum
/// of nothing (C = 0 unless accumulating). Returns whether the product is done.
template <class T>
[[nodiscard]] bool trivial_product(Index m, Index n, Index k, T* c, Index ldc, bool accumulate) noexcept {
    if (m <= 0 || n <= 0) return true;
    if (k > 0) return false;
    if (!accumulate)
        for (Index i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, T(0));
    return true;
}

/// Rows of R = W / n values (R = 2 or 4: rank 8 or 4 in float on AVX-512) in a contiguous matrix:
/// a vector holds R consecutive rows, so no lane idles. `expand(a, rs)` is the vector whose lanes
/// of row q hold a[q·rs] (q < R): one broadcast per row, merged by lane masks.
template <int R, class T, class Arch>
struct FlatRows {
    using batch = xsimd::batch<T, Arch>;
    static constexpr Index W = batch::size;
    xsimd::batch_bool<T, Arch> from[R - 1];  // from[q − 1]: the lanes of rows q and after
    explicit FlatRows(Index n) noexcept {
        alignas(64) std::array<T, std::size_t(W)> lane;
        for (Index l = 0; l < W; ++l) lane[std::size_t(l)] = T(l);
        const batch idx = batch::load_aligned(lane.data());
        for (int q = 1; q < R; ++q) from[q - 1] = idx >= batch(T(q * n));
    }
    [[nodiscard]] batch expand(const T* a, Index rs) const noexcept {
        batch e(a[0]);
        LOWRANK_UNROLL for (int q = 1; q < R; ++q) e = xsimd::select(from[q - 1], batch(a[q * rs]), e);
        return e;
    }
};

/// c[0..n) (+)= α Σ_p a[p·csa] B[p, 0..n) for B k × n contiguous (ldb = n) with n = W / R: R rows
/// of B per vector in 4 independent sums, folded at the end (the one-row G = dY B at rank 8, which
/// ran on AVX2's half vectors: row_product's chain of dependent FMAs through its buffer up to
/// blocking::short_k rows of B, the band tiles beyond).
template <int R, class T, class Arch>
void row_product_flat(Index n, Index k, T alpha, const T* a, Index csa, const T* b, T* c, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    const FlatRows<R, T, Arch> rows(n);
    const Index steps = k / R;  // vectors of R rows
    batch acc[4] = {batch(T(0)), batch(T(0)), batch(T(0)), batch(T(0))};
    Index s = 0;
    const auto step = [&](Index v, batch& sum) {  // rows [v·R, v·R + R) of B: its vector v
        sum = xsimd::fma(rows.expand(a + v * R * csa, csa), batch::load_unaligned(b + v * W), sum);
    };
    for (; s + 4 <= steps; s += 4) LOWRANK_UNROLL for (int u = 0; u < 4; ++u) step(s + u, acc[u]);
    for (; s < steps; ++s) step(s, acc[0]);
    alignas(64) std::array<T, std::size_t(W)> sum;
    ((acc[0] + acc[1]) + (acc[2] + acc[3])).store_aligned(sum.data());
    for (Index j = 0; j < n; ++j) {
        T v = sum[std::size_t(j)];
        for (int q = 1; q < R; ++q) v += sum[std::size_t(q * n + j)];
        for (Index p = steps * R; p < k; ++p) v += a[p * csa] * b[p * n + j];
        c[j] = (accumulate ? c[j] : T(0)) + alpha * v;
    }
}

/// C (+)= α a bᵀ (k = 1) for C m × n contiguous (ldc = n) with n = W / R: R rows of C per vector
/// (the one-row dB = s dYᵀ T at rank 8, whose rows outer_block wrote as half vectors).
template <int R, class T, class Arch>
void outer_flat(Index m, Index n, T alpha, const T* a, Index rsa, const T* b, T* c, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    const FlatRows<R, T, Arch> rows(n);
    alignas(64) std::array<T, std::size_t(W)> tiled;  // α b, R times
    for (Index l = 0; l < W; ++l) tiled[std::size_t(l)] = alpha * b[l % n];
    const batch bb = batch::load_aligned(tiled.data());
    Index i = 0;
    for (; i + R <= m; i += R) {
        const batch e = rows.expand(a + i * rsa, rsa);
        T* dst = c + i * n;
        (accumulate ? xsimd::fma(e, bb, batch::load_unaligned(dst)) : e * bb).store_unaligned(dst);
    }
    for (; i < m; ++i)
        for (Index j = 0; j < n; ++j) {
            T& dst = c[i * n + j];
            dst = accumulate ? std::fma(a[i * rsa], tiled[std::size_t(j)], dst) : a[i * rsa] * tiled[std::size_t(j)];
        }
}

}  // namespace detail

/// `C (+)= alpha · A · B`. C is m × n (row-major, ldc), B is k × n (row-major, ldb), and
/// A(i, p) = a[i*rsa + p*csa] (rsa = lda, csa = 1 for a row-major A; rsa = 1, csa = lda to read
/// a row-major k × m matrix as Aᵀ). With `accumulate == false` C is overwritten (and may hold
/// garbage on entry). k = 0 sets C to zero (or leaves it when accumulating).
/// Cost: 2·m·n·k flops; B is read ⌈m / 6⌉ times per column block (⌈m / 8⌉ at a short k on
/// AVX-512: blocking::band_mr), from cache when it fits.
template <class T, class Arch = xsimd::default_arch>
void gemm_bcast(Index m, Index n, Index k, T alpha, const T* a, Index rsa, Index csa, const T* b,
                Index ldb, T* c, Index ldc, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    if (m <= 0 || n <= 0) return;
    // Rows of a quarter or half a vector in a contiguous B or C: R rows per vector.
    if (2 * n <= W && 4 * n >= W && W % n == 0 && k >= 1) {
        const bool one_row = m == 1 && ldb == n, outer = k == 1 && ldc == n && m > 1;
        if (one_row || outer) {
            const auto run = [&](auto r) {
                constexpr int R = decltype(r)::value;
                if (one_row)
                    detail::row_product_flat<R, T, Arch>(n, k, alpha, a, csa, b, c, accumulate);
                else
                    detail::outer_flat<R, T, Arch>(m, n, alpha, a, rsa, b, c, accumulate);
            };
            if (2 * n == W)
                run(std::integral_constant<int, 2>());
            else
                run(std::integral_constant<int, 4>());
            return;
        }
    }
#if XSIMD_WITH_AVX512F && XSIMD_WITH_FMA3_AVX2
    if constexpr (std::is_base_of_v<xsimd::avx512f, Arch>) {
        // A column tail of at most half an AVX-512 vector (all of C at rank 8 in float: the shrink
        // X Vᵀ from a transposed V, project_back dY B) runs on AVX2's vectors: below it would take
        // the zero-padded tail copy of B, row by row, with half of every FMA on padding.
        // bench_lora, n = 16, 4096², r = 8, this AVX-512 VM, same run: see commit a3a524c.
        if (const Index rem = n % W; rem != 0 && rem <= W / 2) {
            n -= rem;
            gemm_bcast<T, xsimd::fma3<xsimd::avx2>>(m, rem, k, alpha, a, rsa, csa, b + n, ldb, c + n, ldc,
                                                   accumulate);
            if (n == 0) return;
        }
    }
#endif
    if (detail::trivial_product(m, n, k, c, ldc, accumulate)) return;
    if (k == 1 && n > 4 * W) {  // a wide outer product (dA of a one-row batch)
        detail::outer_rows<T, Arch>(m, n, alpha, a, rsa, b, c, ldc, accumulate);
        return;
    }
    if (k == 1) {  // an outer product of at most 4 vectors of columns (dB of a one-row batch)
        Index j = 0;
        for (; j + 4 * W <= n; j += 4 * W)
            detail::outer_block<4, T, Arch>(m, alpha, a, rsa, b + j, c + j, ldc, accumulate);
        if (j + 2 * W <= n) {
            detail::outer_block<2, T, Arch>(m, alpha, a, rsa, b + j, c + j, ldc, accumulate);
            j += 2 * W;
        }
        if (j + W <= n) {
            detail::outer_block<1, T, Arch>(m, alpha, a, rsa, b + j, c + j, ldc, accumulate);
            j += W;
        }
        for (Index i = 0; i < m && j < n; ++i)
            for (Index jj = j; jj < n; ++jj) {
                T& dst = c[i * ldc + jj];
                dst = (accumulate ? dst : T(0)) + alpha * (a[i * rsa] * b[jj]);
            }
        return;
    }
    if (m == 1 && k <= blocking::short_k) {  // one row of C against a few rows of B
        detail::row_product<T, Arch>(n, k, alpha, a, csa, b, ldb, c, accumulate);
        return;
    }
    // A short k (a rank-r update) makes C's read-modify-write the cost: sweep C row band by row
    // band across its full width (a few sequential streams the prefetcher follows) instead of in
    // mc × nc blocks of column strips (one page per row per strip).
    const bool short_k = k <= blocking::short_k;
    constexpr int BR = int(blocking::band_mr<Arch>), BV = int(blocking::band_nv<Arch>);
    // A short k and no more rows of C than B has (the factor gradients Gᵀ X, Tᵀ dY: B is the
    // batch): column blocks of a few tiles, each swept by every band while it is in cache.
    const bool b_major = short_k && m > BR && k >= m;
    const Index nc = b_major ? blocking::band_block_tiles * BV * W
                   : short_k ? std::max<Index>(n, 1)
                             : std::max<Index>(2 * W, (blocking::nc_bytes / Index(sizeof(T)) /
                                                       blocking::kc) / (2 * W) * (2 * W));
    const Index mc = short_k ? BR : blocking::mc;
    // A read down its columns (rsa = 1) a row of it or more apart (csa > BR), as dYᵀ in dU = α dYᵀ T:
    // each band's panel of A is first copied into contiguous values (detail::bcast_band_packed).
    // AVX-512 only: with 16 registers a band is 6 rows, whose copy is not one vector move per step
    // (see there).
    const bool pack_a = blocking::wide_register_file<Arch> && short_k && !b_major && rsa == 1 && csa > BR;
    // The last < W columns read B through a zero-padded copy, so full-width loads stay in bounds.
    alignas(64) std::array<T, blocking::kc * W> tail_panel;
    const Index n_full = n / W * W;
    for (Index pc = 0; pc < k; pc += blocking::kc) {
        const Index kc = std::min(blocking::kc, k - pc);
        const bool acc = accumulate || pc > 0;
        const T* a_p = a + pc * csa;
        const T* b_p = b + pc * ldb;
        for (Index jc = 0; jc < n_full; jc += nc) {
            const Index jend = std::min(n_full, jc + nc);
            for (Index ic = 0; ic < m; ic += mc) {
                const Index mb = std::min(mc, m - ic);
                const T* a_i = a_p + ic * rsa;
                T* c_i = c + ic * ldc;
                Index j = jc;
                if (short_k) {  // bands of a short k: see blocking::band_mr and partial_band_nv
                    detail::dispatch_rows<BR>(mb, [&](auto mr) {
                        constexpr int R = decltype(mr)::value;
                        constexpr int NV = R == BR ? BV : detail::partial_band_nv<Arch, R>;
                        // Full bands at a depth of 8 or 16 (rank 8 / 16: the expand; a batch of 8 / 16
                        // rows: the factor gradients) run at a depth fixed at compile time, their
                        // tiles from C when alpha = 1 (the expand of apply_terms; no final
                        // multiply-add). Expand alone, float, this Zen 4 VM, two alternating runs
                        // of 15 (µs): n = 16, 1024, r = 8 5.02–5.04 → 3.91–3.92 (the fixed depth
                        // alone 4.06–4.14), r = 16 7.88–7.94 → 7.23–7.32; n = 128, 4096, r = 8
                        // 112–113 → 98–99, r = 16 190–193 → 180–185; r = 64 (a depth of 64 fixed
                        // too, and tiles from C at a runtime depth: 0.97–1.02, left out) unchanged.
                        // bench_lora, 5 alternating rounds, new / old: add_delta r = 8 0.94–0.95, r
                        // = 16 0.97–0.99, r = 64 0.99–1.01; backward 0.95–1.03 (its noise). AVX-512
                        // only: the AVX2 build's backward at r = 16 took 1.02–1.06× as long, in
                        // both orders of the two binaries. Not for a band from the copy of A's
                        // panel (pack_a): dU = α dYᵀ T at rank one vector, a batch of 8 rows (depth
                        // 8), this Sapphire Rapids VM, alone, 3 rounds (µs): float 4096 outputs
                        // 19.5–19.8 → 13.2–13.8, 1024 4.8–6.7 → 3.4–3.5; double at rank 8, 4096
                        // 20.4–20.6 → 14.3–14.9; depth 16 and double at rank 16 unchanged.
                        const bool fixed_depth = R == BR && blocking::wide_register_file<Arch> && !pack_a;
                        const auto band = [&](auto depth) {  // depth 0: kc at run time
                            constexpr int K = decltype(depth)::value;
                            if constexpr (K == 0)
                                if (pack_a) {
                                    detail::bcast_band_packed<R, NV, T, Arch>(j, jend, kc, alpha, a_i, csa, b_p, ldb,
                                                                              c_i, ldc, acc);
                                    return;
                                }
                            detail::bcast_band<R, NV, T, Arch, K>(j, jend, kc, alpha, a_i, rsa, csa, b_p, ldb, c_i, ldc,
                                                                  acc);
                        };
                        if (fixed_depth && kc == 8)
                            band(std::integral_constant<int, 8>());
                        else if (fixed_depth && kc == 16)
                            band(std::integral_constant<int, 16>());
                        else
                            band(std::integral_constant<int, 0>());
                    });
                    continue;
                }
                for (; j + 2 * W <= jend; j += 2 * W)
                    detail::bcast_rows<2, T, Arch>(mb, kc, alpha, a_i, rsa, csa, b_p + j, ldb,
                                                   c_i + j, ldc, acc, 2 * W);
                if (j < jend)
                    detail::bcast_rows<1, T, Arch>(mb, kc, alpha, a_i, rsa, csa, b_p + j, ldb,
                                                   c_i + j, ldc, acc, W);
            }
        }
        if (n_full < n) {
            const Index rem = n - n_full;
            for (Index p = 0; p < kc; ++p) {
                T* dst = tail_panel.data() + p * W;
                std::copy_n(b_p + p * ldb + n_full, rem, dst);
                std::fill(dst + rem, dst + W, T(0));
            }
            detail::bcast_rows<1, T, Arch>(m, kc, alpha, a_p, rsa, csa, tail_panel.data(), W,
                                           c + n_full, ldc, acc, rem);
        }
    }
}

namespace detail {

/// One micro-tile of gemm_dot: MR rows of A against NR rows of B, over kc (a multiple of W).
template <int MR, int NR, class T, class Arch>
inline void dot_tile(Index kc, const T* a, Index lda, const T* b, Index ldb, T out[MR][NR]) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    batch acc[MR][NR];
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = batch(T(0));
    for (Index p = 0; p < kc; p += W) {
        batch av[MR];
        LOWRANK_UNROLL for (int i = 0; i < MR; ++i) av[i] = batch::load_unaligned(a + i * lda + p);
        LOWRANK_UNROLL for (int j = 0; j < NR; ++j) {
            batch bv = batch::load_unaligned(b + j * ldb + p);
            if constexpr (MR >= 2) LOWRANK_IN_REGISTER(bv);
            LOWRANK_UNROLL for (int i = 0; i < MR; ++i) acc[i][j] = xsimd::fma(av[i], bv, acc[i][j]);
        }
    }
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int j = 0; j < NR; ++j) out[i][j] = xsimd::hadd(acc[i][j]);
}

template <int MR, int NR, class T, class Arch>
inline void dot_block(Index kc, Index kv, T alpha, const T* a, Index lda, const T* b, Index ldb,
                      T* c, Index ldc, bool accumulate) noexcept {
    T out[MR][NR];
    dot_tile<MR, NR, T, Arch>(kv, a, lda, b, ldb, out);
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int j = 0; j < NR; ++j) {
            T s = out[i][j];
            for (Index p = kv; p < kc; ++p) s += a[i * lda + p] * b[j * ldb + p];  // k tail
            T& dst = c[i * ldc + j];
            dst = (accumulate ? dst : T(0)) + alpha * s;
        }
}

}  // namespace detail

/// `C (+)= alpha · A · Bᵀ`: C is m × n, A is m × k and B is n × k, both row-major (contiguous
/// along k). With `accumulate == false` C is overwritten. Cost: 2·m·n·k flops. Over k in passes
/// of dot_kc; within a pass, B in blocks of dot_nr rows, each against every row of A before the
/// next: the block stays in L1 over the tiles, so B is read once and A once per block. One row
/// of A takes blocks of 4 over all of k (see dot_nr).
template <class T, class Arch = xsimd::default_arch>
void gemm_dot(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb,
              T* c, Index ldc, bool accumulate) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr int MR = int(blocking::dot_mr), NR = int(blocking::dot_nr<Arch>);
    if (detail::trivial_product(m, n, k, c, ldc, accumulate)) return;
    const Index depth = m == 1 ? k : blocking::dot_kc;
    for (Index pc = 0; pc < k; pc += depth) {
        const Index kc = std::min(depth, k - pc);
        const Index kv = kc / W * W;  // vectorised part of this pass; the rest is a scalar tail
        const bool acc = accumulate || pc > 0;
        Index j = 0;
        auto block = [&](auto nr) {  // rows [j, j + nr) of B against all rows of A
            detail::row_tiles<MR>(m, [&](Index i, auto mr) {
                detail::dot_block<decltype(mr)::value, decltype(nr)::value, T, Arch>(
                    kc, kv, alpha, a + i * lda + pc, lda, b + j * ldb + pc, ldb, c + i * ldc + j, ldc, acc);
            });
        };
        for (; j + NR <= n; j += NR) block(std::integral_constant<int, NR>());
        for (; j + 4 <= n; j += 4) block(std::integral_constant<int, 4>());
        for (; j < n; ++j) block(std::integral_constant<int, 1>());
    }
}

namespace detail {

/// The architecture whose (smaller) transpose_tile takes the edges of a transpose on Arch: AVX's
/// for AVX-512, SSE2's for AVX; void where the edges are scalar.
template <class Arch>
struct transpose_edge {
    using type = void;
};
#if XSIMD_WITH_AVX512F
template <class Arch>
    requires std::is_base_of_v<xsimd::avx512f, Arch>
struct transpose_edge<Arch> {
    using type = xsimd::avx;
};
#endif
#if XSIMD_WITH_AVX
template <class Arch>
    requires(std::is_base_of_v<xsimd::avx, Arch>)
struct transpose_edge<Arch> {
    using type = xsimd::sse2;
};
#endif

/// dst (cols × rows, leading dimension ldd) = srcᵀ, src rows × cols (leading dimension lds).
/// Full W × W tiles go through transpose_tile (in registers: 24 shuffles per 8 × 8 float tile on AVX
/// instead of 64 scalar moves); the edges through the tiles of the next narrower
/// architecture (transpose_edge), down to scalar moves. Without that, a side shorter than one
/// AVX-512 vector (rank 8 in float) was transposed entirely by scalar moves: the expand of
/// add_delta, n = 16, r = 8, 1024², spent 57% of its time there.
template <class T, class Arch>
inline void transpose(Index rows, Index cols, const T* src, Index lds, T* dst, Index ldd) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index rv = rows / W * W, cv = cols / W * W;
    for (Index i0 = 0; i0 < rv; i0 += W)
        for (Index j0 = 0; j0 < cv; j0 += W)
            transpose_tile<T, Arch>(src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd);
    using Edge = typename transpose_edge<Arch>::type;
    if constexpr (!std::is_void_v<Edge>) {
        if (cv < cols) transpose<T, Edge>(rv, cols - cv, src + cv, lds, dst + cv * ldd, ldd);  // right of the tiles
        if (rv < rows) transpose<T, Edge>(rows - rv, cols, src + rv * lds, lds, dst + rv, ldd);  // below them
    } else {
        for (Index i = 0; i < rows; ++i) {  // the columns past the tiles, and the rows past them
            const T* s = src + i * lds;
            for (Index j = i < rv ? cv : 0; j < cols; ++j) dst[j * ldd + i] = s[j];
        }
    }
}

/// The W horizontal sums of W vectors as one vector: lane j = the sum of acc[j]'s lanes
/// (xsimd::haddp). xsimd 8.1's haddp is wrong for float on AVX-512 (it returns the sums of rows
/// 4, 5, 2, 3 in lanes 2–5 and of 12, 13, 10, 11 in lanes 10–13), so there each vector is first
/// folded to 8 lanes (its two halves added) and AVX's haddp sums two groups of 8.
template <class T, class Arch>
inline xsimd::batch<T, Arch> haddp(const xsimd::batch<T, Arch>* acc) noexcept {
#if XSIMD_WITH_AVX512F
    if constexpr (std::is_same_v<T, float> && std::is_base_of_v<xsimd::avx512f, Arch>) {
        using half = xsimd::batch<float, xsimd::avx>;
        const auto fold = [](__m512 v) {
            return half(_mm256_add_ps(_mm512_castps512_ps256(v),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
        };
        half lo[8], hi[8];
        LOWRANK_UNROLL for (int j = 0; j < 8; ++j) {
            lo[j] = fold(acc[j]);
            hi[j] = fold(acc[j + 8]);
        }
        const __m256d l = _mm256_castps_pd(xsimd::haddp(lo)), h = _mm256_castps_pd(xsimd::haddp(hi));
        return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_zextpd256_pd512(l), h, 1));
    }
#endif
    return xsimd::haddp(acc);
}

/// Whether Arch has masked loads (AVX, AVX-512; not SSE): see load_first.
template <class Arch>
inline constexpr bool has_masked_load =
#if XSIMD_WITH_AVX512F
    std::is_base_of_v<xsimd::avx512f, Arch> ||
#endif
#if XSIMD_WITH_AVX
    std::is_base_of_v<xsimd::avx, Arch> ||
#endif
    false;

/// The t values at p (0 < t < W) in lanes [0, t) of a vector, the other lanes zero, by one
/// masked load: nothing past p + t is read.
template <class T, class Arch>
    requires has_masked_load<Arch>
inline xsimd::batch<T, Arch> load_first(const T* p, Index t) noexcept {
#if XSIMD_WITH_AVX512F
    if constexpr (std::is_base_of_v<xsimd::avx512f, Arch>) {
        const auto mask = (1u << t) - 1u;
        if constexpr (std::is_same_v<T, float>)
            return _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), p);
        else
            return _mm512_maskz_loadu_pd(static_cast<__mmask8>(mask), p);
    } else
#endif
    {
#if XSIMD_WITH_AVX  // (else has_masked_load holds for no Arch: nothing instantiates this)
        // 8 lanes of all ones, then 8 of zeros: 8 lanes read from 8 − t (float) or 8 − 2t
        // (double: two per value) are t values' worth of ones, then zeros.
        alignas(64) static constexpr std::int32_t ones_then_zeros[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                                         0,  0,  0,  0,  0,  0,  0,  0};
        const __m256i mask = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(ones_then_zeros + 8 - t * Index(sizeof(T) / 4)));
        if constexpr (std::is_same_v<T, float>)
            return _mm256_maskload_ps(p, mask);
        else
            return _mm256_maskload_pd(p, mask);
#else
        static_cast<void>(p);
        static_cast<void>(t);
#endif
    }
}

/// One row of A against W consecutive rows of B (W = SIMD width): W dot products of length k,
/// reduced together by `haddp` into one vector of W outputs.
///
/// KV > 0 fixes k = KV · W at compile time (a rank of one, two or four whole vectors): the KV
/// vectors of A are held in registers and each row of B gets its KV multiply-adds in turn, no
/// loop over k and no tail. Against the runtime loop, the expand of a one-row batch, out = 4096,
/// alone, µs: AVX2 build r = 8 4.0–5.7 → 2.3, r = 16 4.2–6.1 → 2.9, r = 32 5.6–7.7 → 4.8 (r = 64
/// within 3%); AVX-512 build r = 32 4.9–5.8 → 4.8–5.0 (its r = 8 and 16 take dot_narrow_avx512).
/// A runtime k loops over the vectors of A outside the rows of B: one load of A per W
/// multiply-adds. The two orders do not swap: the runtime loop at a fixed depth of four AVX-512
/// vectors keeps all 16 row addresses live and GCC 12 spilled them (add_delta, n = 1, 1024², r =
/// 64: 4.8–4.9 → 5.2–5.3 µs); rows outside in chunks of four vectors at a runtime depth, AVX2,
/// out = 1024: k = 24 1.34 → 1.72, 64 2.70 → 3.19, 128 5.85 → 6.49 µs.
template <int KV, class T, class Arch>
inline xsimd::batch<T, Arch> dot_row_against_w_rows(Index k, const T* a, const T* b, Index ldb) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    const Index kv = KV > 0 ? KV * W : k / W * W;
    batch acc[W];
    if constexpr (KV > 0) {
        batch av[KV];
        LOWRANK_UNROLL for (int v = 0; v < KV; ++v) av[v] = batch::load_unaligned(a + v * W);
        LOWRANK_UNROLL for (Index j = 0; j < W; ++j) {
            acc[j] = av[0] * batch::load_unaligned(b + j * ldb);
            LOWRANK_UNROLL for (int v = 1; v < KV; ++v)
                acc[j] = xsimd::fma(av[v], batch::load_unaligned(b + j * ldb + v * W), acc[j]);
        }
    } else {
        LOWRANK_UNROLL for (Index j = 0; j < W; ++j) acc[j] = batch(T(0));
        for (Index p = 0; p < kv; p += W) {
            const batch av = batch::load_unaligned(a + p);
            LOWRANK_UNROLL for (Index j = 0; j < W; ++j)
                acc[j] = xsimd::fma(av, batch::load_unaligned(b + j * ldb + p), acc[j]);
        }
    }
    // k tail, t < W steps: with masked loads one more step, the lanes past t zero in both
    // operands; on SSE, t products per output in scalar, added after the reduction (its W stores
    // reloaded as one vector: a store-forwarding stall per W outputs). AVX2 path, one row against
    // 4096 rows of B, float, µs, scalar → masked: k = 4 9.2 → 4.5, 5 10.0 → 4.2, 12 10.8 → 4.3,
    // 20 11.0 → 4.8, 36 11.5 → 6.6; any k < 8 costs the same 4.0–4.2 (k = 8, one full step: 2.2).
    const Index t = KV > 0 ? 0 : k - kv;
    if constexpr (has_masked_load<Arch>) {
        if (t > 0) {
            const batch av = load_first<T, Arch>(a + kv, t);
            LOWRANK_UNROLL for (Index j = 0; j < W; ++j)
                acc[j] = xsimd::fma(av, load_first<T, Arch>(b + j * ldb + kv, t), acc[j]);
        }
    }
    batch sums = detail::haddp<T, Arch>(acc);
    if constexpr (!has_masked_load<Arch>) {
        if (t > 0) {
            alignas(64) std::array<T, W> tail{};
            LOWRANK_UNROLL for (Index j = 0; j < W; ++j)
                for (Index p = kv; p < k; ++p) tail[j] += a[p] * b[j * ldb + p];
            sums += batch::load_aligned(tail.data());
        }
    }
    return sums;
}

#if XSIMD_WITH_AVX512F
/// gemm_dot_narrow for k = K = 8 or 16 in float on AVX-512 (rank 8 or 16), 16 rows of B (outputs)
/// at a time, without horizontal adds. K = 8: each vector holds two rows of B, multiplied by row i
/// of A broadcast to both halves; K = 16: each row of B is a vector, and the products of rows
/// 2v and 2v + 1 are first folded into one vector laid out the same way (their 128-bit lanes 0 + 1
/// and 2 + 3 added). The 8 vectors of 16 outputs × 8 partial sums are then summed in three levels
/// of shuffles and adds across pairs of vectors (over 128-bit lanes, then within them) and put in
/// output order by one permutation: per 16 outputs and row of A, K = 8: 8 loads, 8 multiplies and
/// 22 shuffles and adds, where the AVX2 path ran two haddp (7 horizontal adds each). Rows of B
/// past the last full 16 are left to the caller.
template <int K>
void dot_narrow_avx512(Index m, Index n16, float alpha, const float* a, Index lda, const float* b, Index ldb,
                       float* c, Index ldc, bool accumulate) noexcept {
    static_assert(K == 8 || K == 16, "dot_narrow_avx512: rank 8 or 16");
    // h lane 4q + r holds output 4r + q (see below): gather lane o from lane 4 (o % 4) + o / 4.
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 scale = _mm512_set1_ps(alpha);
    // Adds 128-bit lanes 0 + 1 and 2 + 3 of x (into lanes 0, 1 of the result) and of y (lanes 2, 3).
    const auto fold = [](__m512 x, __m512 y) {
        return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
    };
    for (Index j = 0; j < n16; j += 16) {
        const float* bj = b + j * ldb;
        __m512 pairs[K == 8 ? 8 : 1];  // K = 8: pairs[v] = rows 2v, 2v + 1 of the block
        if constexpr (K == 8) {
            if (ldb == 8) {
                LOWRANK_UNROLL for (int v = 0; v < 8; ++v) pairs[v] = _mm512_loadu_ps(bj + 16 * v);
            } else {
                LOWRANK_UNROLL for (int v = 0; v < 8; ++v)
                    pairs[v] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(bj + 2 * v * ldb)),
                                                  _mm256_loadu_ps(bj + (2 * v + 1) * ldb), 1);
            }
        }
        for (Index i = 0; i < m; ++i) {
            const float* ai = a + i * lda;
            __m512 p[8];  // p[v]: 128-bit lanes 0, 1 for output 2v, lanes 2, 3 for output 2v + 1
            if constexpr (K == 8) {
                const __m512 x = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(
                    reinterpret_cast<const double*>(ai))));
                LOWRANK_UNROLL for (int v = 0; v < 8; ++v) p[v] = _mm512_mul_ps(pairs[v], x);
            } else {
                const __m512 x = _mm512_loadu_ps(ai);
                LOWRANK_UNROLL for (int v = 0; v < 8; ++v)
                    p[v] = fold(_mm512_mul_ps(_mm512_loadu_ps(bj + 2 * v * ldb), x),
                                _mm512_mul_ps(_mm512_loadu_ps(bj + (2 * v + 1) * ldb), x));
            }
            // s[u] lane q: 4 partials of output 4u + q.
            __m512 s[4];
            LOWRANK_UNROLL for (int u = 0; u < 4; ++u) s[u] = fold(p[2 * u], p[2 * u + 1]);
            // e[t] lane q: 2 partials of output 8t + q, then 2 of output 8t + 4 + q.
            __m512 e[2];
            LOWRANK_UNROLL for (int t = 0; t < 2; ++t)
                e[t] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * t], s[2 * t + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_ps(s[2 * t], s[2 * t + 1], _MM_SHUFFLE(3, 2, 3, 2)));
            // h lane q: outputs q, 4 + q, 8 + q, 12 + q.
            const __m512 h = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                           _mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
            const __m512 sums = _mm512_permutexvar_ps(order, h);
            float* dst = c + i * ldc + j;
            _mm512_storeu_ps(dst, accumulate ? _mm512_fmadd_ps(sums, scale, _mm512_loadu_ps(dst))
                                             : _mm512_mul_ps(sums, scale));
        }
    }
}
#endif

}  // namespace detail

/// `C (+)= alpha · A · Bᵀ` for a short shared dimension k (the expand `Y += T Uᵀ`, k = rank):
/// each group of W rows of B stays in L1 while every row of A is reduced against it, and the W
/// dot products are summed together by `haddp`, so B is read once from memory, needs no
/// transposed copy, and C is written a vector at a time. Best when m is small; for larger m the
/// broadcast kernel on a transposed copy of B amortises that copy and does fewer reductions.
template <class T, class Arch = xsimd::default_arch>
void gemm_dot_narrow(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b,
                     Index ldb, T* c, Index ldc, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
#if XSIMD_WITH_AVX512F && XSIMD_WITH_FMA3_AVX2
    if constexpr (std::is_base_of_v<xsimd::avx512f, Arch>) {
        // Rank 8 and 16 in float: the shuffle-tree kernel (add_delta, n = 1, r = 8: 1.23–1.27 →
        // 0.60–0.62 µs at 1024², 4.8–5.0 → 2.1–2.3 at 4096²; r = 16: 1.41–1.45 → 1.30–1.34 and
        // 5.3 → 4.4, against the haddp path).
        if constexpr (std::is_same_v<T, float>) {
            if ((k == 8 || k == 16) && n >= W) {
                const Index n16 = n / W * W;
                if (k == 8)
                    detail::dot_narrow_avx512<8>(m, n16, alpha, a, lda, b, ldb, c, ldc, accumulate);
                else
                    detail::dot_narrow_avx512<16>(m, n16, alpha, a, lda, b, ldb, c, ldc, accumulate);
                if (n16 < n)
                    gemm_dot_narrow<T, xsimd::fma3<xsimd::avx2>>(m, n - n16, k, alpha, a, lda, b + n16 * ldb, ldb,
                                                                c + n16, ldc, accumulate);
                return;
            }
        }
        // A depth shorter than a vector, or with a tail, runs AVX2's path (in double only when
        // AVX2's vectors divide it). One row against 4096 rows of B, µs, AVX-512 path with the
        // masked tail vs AVX2's, same binary: float k = 17 7.8 vs 5.9, 20 6.8 vs 5.7, 24 7.6 vs
        // 5.7, 40 10.0 vs 8.5, 52 11.9 vs 11.4 (two rows: 0.76–0.98×); double k = 12 6.2 vs 4.5,
        // 20 8.8 vs 7.1, but 11 7.7 vs 8.1, 13 7.1 vs 9.5 (9: 6.1 vs 4.6). Whole vectors stay on
        // AVX-512: alone, float, AVX2's path was faster (k = 64: 14.7 vs 12.3) but inside add_delta
        // (n = 1, 1024², r = 64) slower, 5.2–5.3 against 4.8–4.9 µs.
        if (k < W || (k % W != 0 && (std::is_same_v<T, float> || k % (W / 2) == 0))) {
            gemm_dot_narrow<T, xsimd::fma3<xsimd::avx2>>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
            return;
        }
    }
#endif
#if XSIMD_WITH_AVX
    if constexpr (std::is_base_of_v<xsimd::avx, Arch>) {
        // Half a vector (rank 4 in float): one whole SSE vector beats AVX's masked step (which
        // costs about two full ones). One row against 4096 rows of B, float, µs: 2.0 vs 4.1.
        if (k == W / 2) {
            gemm_dot_narrow<T, xsimd::sse2>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
            return;
        }
    }
#endif
    const Index n_full = n / W * W;
    const batch scale(alpha);
    // kv: k in whole vectors when it is 1, 2 or 4 of them (dot_row_against_w_rows unrolled), else 0.
    const auto sweep = [&](auto kv) {
        constexpr int KV = decltype(kv)::value;
        for (Index j = 0; j < n_full; j += W)
            for (Index i = 0; i < m; ++i) {
                T* dst = c + i * ldc + j;
                batch r = detail::dot_row_against_w_rows<KV, T, Arch>(k, a + i * lda, b + j * ldb, ldb) * scale;
                if (accumulate) r += batch::load_unaligned(dst);
                r.store_unaligned(dst);
            }
    };
    if (k == W)
        sweep(std::integral_constant<int, 1>{});
    else if (k == 2 * W)
        sweep(std::integral_constant<int, 2>{});
    else if (k == 4 * W)
        sweep(std::integral_constant<int, 4>{});
    else
        sweep(std::integral_constant<int, 0>{});
    if (n_full < n)
        gemm_dot<T, Arch>(m, n - n_full, k, alpha, a, lda, b + n_full * ldb, ldb, c + n_full, ldc,
                          accumulate);
}

/// `y[j] (+)= alpha · Σ_p a[p] B[j, p]` for j < n: one row a (k values) against the n rows of B
/// (row-major, ldb), a GEMV. Row after row of B, each swept over all of k with four independent
/// sums and reduced once, so a contiguous B is read as one sequential stream and a stays in L1
/// (see blocking::gemv_one_stream for where that beats Eigen's eight rows side by side). The last
/// k mod W values by a masked load (a scalar loop on SSE). With `accumulate == false` y is
/// overwritten.
template <class T, class Arch = xsimd::default_arch>
void gemv_rows(Index n, Index k, T alpha, const T* a, const T* b, Index ldb, T* y, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    const Index k4 = k / (4 * W) * (4 * W), kv = k / W * W;
    for (Index j = 0; j < n; ++j) {
        const T* bj = b + j * ldb;
        batch s[4] = {batch(T(0)), batch(T(0)), batch(T(0)), batch(T(0))};
        Index p = 0;
        for (; p < k4; p += 4 * W)
            LOWRANK_UNROLL for (int u = 0; u < 4; ++u)
                s[u] = xsimd::fma(batch::load_unaligned(bj + p + u * W), batch::load_unaligned(a + p + u * W), s[u]);
        for (; p < kv; p += W) s[0] = xsimd::fma(batch::load_unaligned(bj + p), batch::load_unaligned(a + p), s[0]);
        T tail = T(0);
        if constexpr (detail::has_masked_load<Arch>) {
            if (p < k)
                s[1] = xsimd::fma(detail::load_first<T, Arch>(bj + p, k - p), detail::load_first<T, Arch>(a + p, k - p),
                                  s[1]);
        } else {
            for (Index q = p; q < k; ++q) tail += bj[q] * a[q];
        }
        const T dot = alpha * (xsimd::hadd((s[0] + s[1]) + (s[2] + s[3])) + tail);
        y[j] = accumulate ? y[j] + dot : dot;
    }
}

namespace detail {

/// gemm_dot_streams for MA rows of A: tiles of blocking::dot_streams_tile(MA) rows of B.
template <int MA, class T, class Arch>
void dot_streams_block(Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c, Index ldc,
                       bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    constexpr int lines = int(std::max<Index>(1, 2 * W * Index(sizeof(T)) / 64));  // per row of B and step
    constexpr Index ahead = MA == 1 ? blocking::far_prefetch_bytes_one_row : blocking::far_prefetch_bytes;
    const Index k2 = k / (2 * W) * (2 * W), kv = k / W * W;
    row_tiles<int(blocking::dot_streams_tile(MA))>(n, [&](Index j, auto rows) {
        constexpr int R = decltype(rows)::value;
        // The step's 2·MA vectors of A loaded once for all R rows of B where the registers hold
        // them beside the R·MA sums (one row of A; see blocking::far_prefetch_bytes_one_row),
        // otherwise by each row's FMAs.
        constexpr bool hoist = R * MA + 2 * MA + 2 <= (blocking::wide_register_file<Arch> ? 32 : 16);
        const T* bj = b + j * ldb;
        batch s[R][MA];
        LOWRANK_UNROLL for (int r = 0; r < R; ++r)
            LOWRANK_UNROLL for (int i = 0; i < MA; ++i) s[r][i] = batch(T(0));
        for (Index p = 0; p < k2; p += 2 * W) {
            batch av[hoist ? MA : 1][2];
            if constexpr (hoist)
                LOWRANK_UNROLL for (int i = 0; i < MA; ++i) {
                    av[i][0] = batch::load_unaligned(a + i * lda + p);
                    av[i][1] = batch::load_unaligned(a + i * lda + p + W);
                }
            LOWRANK_UNROLL for (int r = 0; r < R; ++r) {
                const T* br = bj + r * ldb + p;
                LOWRANK_UNROLL for (int l = 0; l < lines; ++l)
                    LOWRANK_PREFETCH_L2(reinterpret_cast<const char*>(br) + ahead + 64 * l);
                const batch b0 = batch::load_unaligned(br), b1 = batch::load_unaligned(br + W);
                LOWRANK_UNROLL for (int i = 0; i < MA; ++i) {
                    if constexpr (hoist) {
                        s[r][i] = xsimd::fma(b1, av[i][1], xsimd::fma(b0, av[i][0], s[r][i]));
                    } else {
                        const T* ai = a + i * lda + p;
                        s[r][i] = xsimd::fma(b1, batch::load_unaligned(ai + W),
                                             xsimd::fma(b0, batch::load_unaligned(ai), s[r][i]));
                    }
                }
            }
        }
        if (k2 < kv)
            LOWRANK_UNROLL for (int r = 0; r < R; ++r) {
                const batch b0 = batch::load_unaligned(bj + r * ldb + k2);
                LOWRANK_UNROLL for (int i = 0; i < MA; ++i)
                    s[r][i] = xsimd::fma(b0, batch::load_unaligned(a + i * lda + k2), s[r][i]);
            }
        LOWRANK_UNROLL for (int r = 0; r < R; ++r) {
            const T* br = bj + r * ldb;
            LOWRANK_UNROLL for (int i = 0; i < MA; ++i) {
                const T* ai = a + i * lda;
                T tail = T(0);
                if constexpr (has_masked_load<Arch>) {
                    if (kv < k)
                        s[r][i] = xsimd::fma(load_first<T, Arch>(br + kv, k - kv), load_first<T, Arch>(ai + kv, k - kv),
                                             s[r][i]);
                } else {
                    for (Index q = kv; q < k; ++q) tail += br[q] * ai[q];
                }
                const T dot = alpha * (xsimd::hadd(s[r][i]) + tail);
                T& dst = c[i * ldc + j + r];
                dst = accumulate ? dst + dot : dot;
            }
        }
    });
}

}  // namespace detail

/// `C (+)= alpha · A · Bᵀ` for m ≤ blocking::dot_streams_max_rows rows of A (a GEMV, or a batch
/// of a few rows) against a row-major B read from memory: blocking::dot_streams_tile(m) rows of B
/// side by side (that many sequential streams), each dotted with every row of A over all of k
/// (two vectors per step, one sum per output, reduced once), and each prefetching into L2 the
/// line blocking::far_prefetch_bytes ahead of the ones it reads: the hardware prefetcher stops at
/// every 4 KiB page, the software prefetch runs on across them. The last k mod W values by a
/// masked load (a scalar loop on SSE). Same arguments as gemm_dot.
template <class T, class Arch = xsimd::default_arch>
void gemm_dot_streams(Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b, Index ldb, T* c,
                      Index ldc, bool accumulate) noexcept {
    LOWRANK_ASSERT(m <= blocking::dot_streams_max_rows);
    if (m <= 0 || n <= 0) return;
    detail::dispatch_rows<int(blocking::dot_streams_max_rows)>(m, [&](auto ma) {
        detail::dot_streams_block<decltype(ma)::value, T, Arch>(n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
    });
}

namespace detail {

/// Tiles of the expand sweeps: blocking::sweep_mr rows × 2 vectors of outputs. On 16 registers,
/// 6 rows = 12 accumulators (FMA latency 4 × 2 pipes needs ≥ 8 in flight), + 2 vectors of the
/// panel + 1 broadcast = 15 registers. Against 4 × 3 (both with the tail tiles unrolled),
/// same-binary runs of mixed n = 64, 8 adapters, r = 16, 4096², float (an AdapterBank), relative
/// to a fixed prototype in the same binary: 1.08 / 1.03 vs 1.23 / 1.17. The last 1–3 rows of a
/// sweep take 4 vectors instead (4–12 accumulators, same register budget): two panel loads per
/// broadcast rather than one halves the loads per FMA of these thin tiles (the rows of a mixed
/// batch per adapter leave such tails in most groups). 8 rows (sweep_mr with 32 registers only)
/// take 3 vectors: 24 accumulators + 3 panel vectors + 1 broadcast, 11 loads per 24 FMAs against
/// 10 per 16. This Sapphire Rapids VM, float, each alone, old and new headers alternating in 4
/// rounds, medians (µs): merge 4096², r = 64 15.7 → 14.2 ms, 1024², r = 64 892 → 826, r = 8 and
/// 16 unchanged (3.15 / 4.65 ms at 4096²); input_grad's band product n = 128, in = 4096, r = 64
/// 500 → 458 (r = 16 and n = 32 unchanged); grad_shrink's strips, w = 64, in = 4096, n = 128 /
/// 32 / 16 594 → 541, 120 → 110, 61.5 → 57.0.
template <int MR>
inline constexpr int expand_nv = MR >= 8 ? 3 : MR >= 4 ? 2 : 4;

/// Where the expand tiles find B (w × out): `at(c)` is column c's first row, `ld` the distance
/// between rows; columns come in runs of `run` contiguous ones, each run `jump` past the previous.
/// The sweeps start a tile of NV vectors at a multiple of NV·W past a run boundary, so a tile
/// lies within one run or starts one.
/// B packed (a transposed block of columns o0 .., padded ld): one run.
template <class T>
struct PackedPanel {
    static constexpr Index run = std::numeric_limits<Index>::max();
    const T* data;
    Index o0, ld;
    static constexpr Index jump = 0;
    [[nodiscard]] const T* at(Index c) const noexcept { return data + (c - o0); }
    [[nodiscard]] PackedPanel from_row(Index p) const noexcept { return {data + p * ld, o0, ld}; }
};

/// B in strips (pack_strips): runs of strip_width<T> columns, w rows each, one after the other.
template <class T>
struct StripPanel {
    static constexpr Index run = strip_width<T>, ld = run;
    const T* strips;
    Index jump;  // w · run
    StripPanel(const T* s, Index w) noexcept : strips(s), jump(w * run) {}
    [[nodiscard]] const T* at(Index c) const noexcept { return strips + c / run * jump + c % run; }
    /// The same strips from row p on.
    [[nodiscard]] StripPanel from_row(Index p) const noexcept {
        StripPanel r = *this;
        r.strips += p * run;
        return r;
    }
};

/// The left operand of the expand tiles, MR rows of T interleaved and scaled (tp[j·MR + i] =
/// α·t[i, j], written by expand_rows): a step's MR broadcasts come from one pointer at fixed
/// offsets and the store adds the sums as they are. In place, GCC 12 kept α and the rows' offsets
/// live across the loop of a 6 × 2 tile and, short of registers, read one of the two panel vectors
/// from memory in every FMA and the offsets from the stack: 19 loads per 12 FMAs instead of 8
/// (mixed n = 64, 8 adapters, r = 16, 4096², float, the bank's expand alone, interleaved in one
/// harness: 141 → 123 µs).
template <int MR, class T>
struct PackedOperand {
    const T* tp;
    [[nodiscard]] T at(int i, Index j) const noexcept { return tp[j * MR + i]; }
};

/// Writes an MR × NV tile of sums as they are: C (+)= sum (the operand was scaled ahead).
template <int MR, int NV, class T, class Arch, class Row>
LOWRANK_TILE_INLINE void store_sum(const xsimd::batch<T, Arch> (&sum)[MR][NV], Row&& row, bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
        LOWRANK_UNROLL for (int v = 0; v < NV; ++v) {
            T* dst = row(i) + v * W;
            (accumulate ? sum[i][v] + batch::load_unaligned(dst) : sum[i][v]).store_unaligned(dst);
        }
}

/// One expand tile: y_i[o .. o + NV·W) (+)= Σ_j a(i, j) · B[j, o .. o + NV·W) for the MR output
/// rows y_i (pointers: scattered rows of a batch, or rows of W), B read through `panel`, α T
/// through `a` (a PackedOperand). MR × NV accumulators stay in registers over all w rows of B; Y is read
/// and written once.
template <int MR, int NV, class T, class Arch, class Panel, class Operand>
LOWRANK_TILE_INLINE void expand_tile(Index w, const Operand& a, const Panel& panel, T* const* y, Index o,
                                     bool accumulate) noexcept {
    using batch = xsimd::batch<T, Arch>;
    constexpr Index W = batch::size;
    constexpr int RV = int(std::min<Index>(NV, std::max<Index>(1, Panel::run / W)));
    batch acc[MR][NV];
    bcast_accumulate<MR, NV, RV, T, Arch>(w, [&](int i, Index j) { return a.at(i, j); }, panel.at(o), panel.ld,
                                          panel.jump, acc);
    store_sum<MR, NV, T, Arch>(acc, [&](int i) { return y[i] + o; }, accumulate);
}

/// MR rows y_i (pointers) (+)= α t_i · B over columns [o0, o1) of Y (α t_i: row i of T, w values,
/// scaled, read through the PackedOperand `a`; B: w × out, read through `panel`, o0 at a run boundary of it):
/// expand_nv<MR>-vector tiles, then narrower ones, then the last columns one by one. With PF > 0,
/// each full tile first prefetches (for writing) the lines of Y that the tile PF tiles further on
/// will read and write: for a Y streamed from memory (see blocking::update_prefetch_tiles).
template <int MR, class T, class Arch, int PF = 0, class Panel, class Operand>
LOWRANK_TILE_INLINE void expand_sweep(T* const* y, Index o0, Index o1, Index w, const Operand& a, const Panel& panel,
                                      bool accumulate) noexcept {
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr int NV = expand_nv<MR>;
    static_assert(NV >= 2 && NV <= 4, "expand_sweep: the remainder takes one 2-vector and one 1-vector tile");
    Index o = o0;
    for (; o + NV * W <= o1; o += NV * W) {
        if constexpr (PF > 0)
            if (o + (PF + 1) * NV * W <= o1)
                LOWRANK_UNROLL for (int i = 0; i < MR; ++i)
                    LOWRANK_UNROLL for (int v = 0; v < NV; ++v) LOWRANK_PREFETCH_W(y[i] + o + (PF * NV + v) * W);
        expand_tile<MR, NV, T, Arch>(w, a, panel, y, o, accumulate);
    }
    if constexpr (NV > 2)
        if (o + 2 * W <= o1) {
            expand_tile<MR, 2, T, Arch>(w, a, panel, y, o, accumulate);
            o += 2 * W;
        }
    if (o + W <= o1) {
        expand_tile<MR, 1, T, Arch>(w, a, panel, y, o, accumulate);
        o += W;
    }
    for (; o < o1; ++o) {  // column tail
        const T* p = panel.at(o);
        LOWRANK_UNROLL for (int i = 0; i < MR; ++i) {
            T acc(0);
            for (Index j = 0; j < w; ++j) acc += a.at(i, j) * p[j * panel.ld];
            y[i][o] = accumulate ? y[i][o] + acc : acc;
        }
    }
}

/// Values of T per row in one packed operand of expand_rows (1 KiB: 6 rows of it are 6 KiB on the
/// stack).
template <class T>
inline constexpr Index expand_depth = 1024 / Index(sizeof(T));

/// expand_sweep for MR rows of T (row i at t + i·ldt, w values) scaled by α: T is packed
/// (PackedOperand) expand_depth values at a time, each piece a sweep over [o0, o1) that adds to
/// the previous one's (w = 0 still sets or keeps Y once); PF as in expand_sweep.
template <int MR, class T, class Arch, int PF = 0, class Panel>
LOWRANK_TILE_INLINE void expand_rows(T* const* y, Index o0, Index o1, Index w, const T* t, Index ldt,
                                     const Panel& panel, T alpha, bool accumulate) noexcept {
    constexpr Index D = expand_depth<T>;
    alignas(64) std::array<T, MR * D> tp;
    Index p0 = 0;
    do {
        const Index wc = std::min(D, w - p0);
        for (Index j = 0; j < wc; ++j)
            LOWRANK_UNROLL for (int i = 0; i < MR; ++i) tp[std::size_t(j * MR + i)] = alpha * t[i * ldt + p0 + j];
        expand_sweep<MR, T, Arch, PF>(y, o0, o1, wc, PackedOperand<MR, T>{tp.data()}, panel.from_row(p0),
                                      accumulate || p0 > 0);
        p0 += wc;
    } while (p0 < w);
}

}  // namespace detail

}  // namespace lowrank::core
