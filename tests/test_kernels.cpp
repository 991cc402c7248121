// SPDX-License-Identifier: Apache-2.0
// The SIMD kernels and the core operations against their scalar references and against naive
// double-precision products, over shapes that hit every edge: empty, one row, SIMD width ± 1,
// more than one k-block, strided row blocks, and for every compiled architecture.

#include <lowrank/core/ops.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <limits>
#include <set>
#include <vector>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::naive_product;
using lowrank::test::product_bound;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

using lowrank::test::KernelCases;
using lowrank::test::Strided;

TEMPLATE_LIST_TEST_CASE("gemm_bcast matches the scalar reference and the exact product", "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // m and n cross the row bands (6 rows, or 8 with AVX-512's 32 registers at a short k; the
    // rows below the last full band in wider tiles of their own) and the column tiles of 4, 3, 2
    // and 1 vectors before the zero-padded tail. k = 8 (m = 7, 8 on 16 registers) and 24 (m = 13,
    // 17) sweep B in column blocks of blocking::band_block_tiles tiles, each by every band (a
    // short k with m ≤ k), n = 300 over more than one block. k = 8 and 16 run the full bands at
    // a depth fixed at compile time; with alpha = 1 and accumulating, their whole tiles start from C.
    // A read transposed at a short k below m (m = 10, 13, 100) runs each band from a copy of its
    // panel (detail::bcast_band_packed, at a run-time depth, k = 8 and 16 included), the rows
    // below the last full band too.
    const Index m = GENERATE(0, 1, 3, 5, 6, 7, 8, 10, 13, 17, 100);  // leaving 1–7 rows below the full bands
    const Index n = GENERATE_COPY(Index(1), W - 1, W, W + 1, 2 * W + 3, 4 * W, 5 * W + 1, Index(300));
    const Index k = GENERATE(0, 1, 3, 8, 16, 24, 300);
    const bool transposed_a = GENERATE(false, true);
    const bool accumulate = GENERATE(false, true);
    const T alpha = GENERATE(T(-0.75), T(1));
    if (n <= 0) return;
    CAPTURE(m, n, k, transposed_a, accumulate, alpha);

    // A is m × k logically; stored either as m × k or as k × m (read transposed).
    Strided<T> a_store(transposed_a ? k : m, transposed_a ? m : k, 11);
    Strided<T> b(k, n, 12);
    Strided<T> c(m, n, 13);
    Strided<T> c_ref(m, n, 13);
    const auto av = a_store.view();
    const Index rsa = transposed_a ? 1 : av.ld, csa = transposed_a ? av.ld : 1;

    const Matrix<double> a = transposed_a ? Matrix<double>(a_store.value().transpose())
                                          : a_store.value();
    const Matrix<double> c0 = c.value();
    Matrix<double> want = alpha * naive_product(a, b.value());
    if (accumulate) want += c0;
    Matrix<double> bound = product_bound(a.cwiseAbs(), b.value().cwiseAbs(), eps<T>(), alpha);
    if (accumulate) bound += 2 * eps<T>() * c0.cwiseAbs();

    auto cv = c.view();
    core::gemm_bcast<T, Arch>(m, n, k, alpha, av.data, rsa, csa, b.view().data, b.view().ld,
                              cv.data, cv.ld, accumulate);
    auto crv = c_ref.view();
    core::gemm_bcast_ref<T>(m, n, k, alpha, av.data, rsa, csa, b.view().data, b.view().ld,
                            crv.data, crv.ld, accumulate);
    require_within(c.value(), want, bound, "simd vs exact");
    require_within(c_ref.value(), want, bound, "scalar reference vs exact");
    REQUIRE(c.border_intact());  // nothing written outside the destination block
}

TEMPLATE_LIST_TEST_CASE("gemm_bcast's one-row and outer-product paths match the exact product over several blocks",
                        "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // One row of C (detail::row_product: B in groups of 4 rows, then 1–3 single rows, over 4 KiB
    // blocks of columns and a tail shorter than a vector), and k = 1 with rows wider than 4
    // vectors (detail::outer_rows), m = 1 and more rows.
    const Index block = 4096 / Index(sizeof(T));
    const Index n = GENERATE_COPY(4 * W + 1, block, block + 1, 2 * block + W + 3);
    const Index k = GENERATE(Index(1), Index(2), Index(4), Index(7), Index(9), core::blocking::short_k);
    const Index m = GENERATE(Index(1), Index(3));
    const bool transposed_a = GENERATE(false, true);
    const bool accumulate = GENERATE(false, true);
    if (m > 1 && k > 1) return;  // more rows and k > 1: the band tiles (the test above)
    CAPTURE(m, n, k, transposed_a, accumulate);
    Strided<T> a_store(transposed_a ? k : m, transposed_a ? m : k, 21);
    Strided<T> b(k, n, 22);
    Strided<T> c(m, n, 23);
    const auto av = a_store.view();
    const Index rsa = transposed_a ? 1 : av.ld, csa = transposed_a ? av.ld : 1;
    const T alpha = T(1.25);
    const Matrix<double> a = transposed_a ? Matrix<double>(a_store.value().transpose()) : a_store.value();
    const Matrix<double> c0 = c.value();
    Matrix<double> want = alpha * naive_product(a, b.value());
    if (accumulate) want += c0;
    Matrix<double> bound = product_bound(a.cwiseAbs(), b.value().cwiseAbs(), eps<T>(), alpha);
    if (accumulate) bound += 2 * eps<T>() * c0.cwiseAbs();
    auto cv = c.view();
    core::gemm_bcast<T, Arch>(m, n, k, alpha, av.data, rsa, csa, b.view().data, b.view().ld, cv.data, cv.ld,
                              accumulate);
    require_within(c.value(), want, bound, "simd vs exact");
    REQUIRE(c.border_intact());
}

TEMPLATE_LIST_TEST_CASE("gemm_dot matches the scalar reference and the exact product", "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // B in blocks of 8 rows (AVX-512; 4 otherwise), then 4, then 1, each against tiles of 3 rows
    // of A: n = 3, 5, 6, 8, 9, 12, 13, 15 reach every block width and its tail, m = 2, 4, 5, 7, 11,
    // 16 leave one or two rows of A; k = 1100 takes two passes of dot_kc = 1024, except at m = 1
    // (blocks of 4 over all of k).
    const Index m = GENERATE(0, 1, 2, 3, 4, 5, 6, 7, 11, 16);
    const Index n = GENERATE(1, 3, 4, 5, 6, 8, 9, 12, 13, 15);
    const Index k = GENERATE_COPY(Index(0), Index(1), W - 1, W, W + 1, Index(77), Index(1100));
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, n, k, accumulate);

    Strided<T> a(m, k, 21), b(n, k, 22), c(m, n, 23), c_ref(m, n, 23);
    const T alpha = T(1.25);
    const Matrix<double> c0 = c.value();
    Matrix<double> want = alpha * naive_product(a.value(), b.value().transpose());
    if (accumulate) want += c0;
    Matrix<double> bound =
        product_bound(a.value().cwiseAbs(), b.value().transpose().cwiseAbs(), eps<T>(), alpha);
    if (accumulate) bound += 2 * eps<T>() * c0.cwiseAbs();

    auto av = a.view(), bv = b.view(), cv = c.view(), crv = c_ref.view();
    core::gemm_dot<T, Arch>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, cv.data, cv.ld,
                            accumulate);
    core::gemm_dot_ref<T>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, crv.data, crv.ld,
                          accumulate);
    require_within(c.value(), want, bound, "simd vs exact");
    require_within(c_ref.value(), want, bound, "scalar reference vs exact");
}

TEMPLATE_LIST_TEST_CASE("the block transpose is exact, tails included", "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // Edges of every tile size below W (AVX-512 hands its edges to AVX's 8 × 8 float tiles and
    // those to SSE2's 4 × 4): sides of 2, 4, 5, 8, 12 values beside the W-multiples and their ± 1.
    const Index rows = GENERATE_COPY(Index(1), Index(4), Index(5), Index(8), Index(12), W - 1 > 0 ? W - 1 : Index(1),
                                     W, 2 * W + 3);
    const Index cols = GENERATE_COPY(Index(1), Index(2), Index(8), Index(13), W, W + 1, 3 * W);
    CAPTURE(rows, cols);
    Strided<T> src(rows, cols, 51);
    const Index ldd = rows + 3;
    std::vector<T> dst(std::size_t(cols * ldd), T(-7));
    const auto sv = src.view();
    core::detail::transpose<T, Arch>(rows, cols, sv.data, sv.ld, dst.data(), ldd);
    for (Index j = 0; j < cols; ++j) {
        for (Index i = 0; i < rows; ++i) REQUIRE(dst[std::size_t(j * ldd + i)] == sv(i, j));
        for (Index i = rows; i < ldd; ++i) REQUIRE(dst[std::size_t(j * ldd + i)] == T(-7));  // padding untouched
    }
}

/// α A Bᵀ (+ C0 when accumulating), exact in double, and the bound on the error of its evaluation
/// in T: the kernels' C (+)= α A Bᵀ tests compare against both.
template <class T>
std::pair<Matrix<double>, Matrix<double>> expected_abt(const Matrix<double>& a, const Matrix<double>& b,
                                                       const Matrix<double>& c0, T alpha, bool accumulate) {
    Matrix<double> want = alpha * naive_product(a, b.transpose());
    Matrix<double> bound = product_bound(a.cwiseAbs(), b.transpose().cwiseAbs(), eps<T>(), alpha);
    if (accumulate) {
        want += c0;
        bound += 2 * eps<T>() * c0.cwiseAbs();
    }
    return {want, bound};
}

TEMPLATE_LIST_TEST_CASE("gemm_dot_narrow matches the exact product, strided and contiguous", "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    // k = 8 in float on AVX-512 is the two-rows-per-vector kernel (blocks of 16 rows of B, the rest
    // on AVX2), with B contiguous (one load per two rows) or strided (two); k = 1, 2 or 4 vectors
    // (2, 4, 8, 16, 32 for the widths 2 to 16) the unrolled dot products; other k, the haddp path
    // with a k tail (masked on AVX and AVX-512 — double on AVX-512 keeps tails of 1–3: k = 9, 11 —
    // scalar on SSE); half a vector on AVX (k = 4 float, 2 double) the SSE path.
    const Index m = GENERATE(1, 2, 3, 5);
    const Index n = GENERATE(1, 15, 16, 17, 40);
    const Index k = GENERATE(1, 2, 3, 4, 7, 8, 9, 11, 12, 16, 20, 32);
    const bool accumulate = GENERATE(false, true);
    const bool contiguous = GENERATE(false, true);
    CAPTURE(m, n, k, accumulate, contiguous);

    Strided<T> a(m, k, 24), bs(n, k, 25), c(m, n, 26);
    Matrix<T> bc = bs.value().template cast<T>();
    const T alpha = T(-0.75);
    const Matrix<double> c0 = c.value();
    auto [want, bound] = expected_abt<T>(a.value(), bs.value(), c0, alpha, accumulate);
    auto av = a.view(), bv = bs.view(), cv = c.view();
    const T* b = contiguous ? bc.data() : bv.data;
    const Index ldb = contiguous ? k : bv.ld;
    core::gemm_dot_narrow<T, Arch>(m, n, k, alpha, av.data, av.ld, b, ldb, cv.data, cv.ld, accumulate);
    require_within(c.value(), want, bound, "simd vs exact");
}

TEMPLATE_LIST_TEST_CASE("gemv_rows matches the exact product, tails included", "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // k: below one vector, around one and four (the unrolled step), and long with a tail; B's rows
    // are strided (Strided pads them), y is one row of C.
    const Index n = GENERATE(0, 1, 2, 7);
    const Index k = GENERATE_COPY(Index(0), Index(1), W - 1, W, W + 1, 4 * W - 1, 4 * W, 4 * W + 1, Index(1003));
    const bool accumulate = GENERATE(false, true);
    CAPTURE(n, k, accumulate);

    Strided<T> a(1, k, 24), b(n, k, 25), c(1, n, 26);
    const T alpha = T(-0.75);
    const auto [want, bound] = expected_abt<T>(a.value(), b.value(), c.value(), alpha, accumulate);
    auto av = a.view(), bv = b.view(), cv = c.view();
    core::gemv_rows<T, Arch>(n, k, alpha, av.data, bv.data, bv.ld, cv.data, accumulate);
    require_within(c.value(), want, bound, "gemv_rows vs exact");
    REQUIRE(c.border_intact());
}

TEMPLATE_LIST_TEST_CASE("gemm_dot_streams matches the exact product, tails included", "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // m: every count of rows of A it takes; n: around one tile of rows of B and two; k: around one
    // vector and one step of two, and long with a tail. All three operands strided.
    const Index m = GENERATE(range(Index(1), core::blocking::dot_streams_max_rows + 1));
    const Index rows = core::blocking::dot_streams_tile(m);
    const Index n = GENERATE_COPY(Index(0), Index(1), rows - 1, rows, rows + 1, 2 * rows + 3);
    const Index k = GENERATE_COPY(Index(0), Index(1), W - 1, W, W + 1, 2 * W - 1, 2 * W, 2 * W + 1, 3 * W, Index(1003));
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, n, k, accumulate);

    Strided<T> a(m, k, 27), b(n, k, 28), c(m, n, 29);
    const T alpha = T(-0.75);
    const auto [want, bound] = expected_abt<T>(a.value(), b.value(), c.value(), alpha, accumulate);
    auto av = a.view(), bv = b.view(), cv = c.view();
    core::gemm_dot_streams<T, Arch>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, cv.data, cv.ld, accumulate);
    require_within(c.value(), want, bound, "gemm_dot_streams vs exact");
    REQUIRE(c.border_intact());
}

TEMPLATE_TEST_CASE("load_first reads t values, zeros the other lanes and reads nothing past them", "[kernels]", float,
                   double) {
    using T = TestType;
    // The t values end where a page without access begins: a read past them faults.
    const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(mem != MAP_FAILED);
    REQUIRE(mprotect(static_cast<char*>(mem) + page, page, PROT_NONE) == 0);
    T* const end = reinterpret_cast<T*>(static_cast<char*>(mem) + page);
    int paths = 0;
    xsimd::supported_architectures::for_each([&](auto arch) {
        using Arch = decltype(arch);
        if constexpr (core::detail::has_masked_load<Arch>) {
            constexpr Index W = xsimd::batch<T, Arch>::size;
            CAPTURE(Arch::name());
            for (Index t = 1; t < W; ++t) {
                CAPTURE(t);
                T* p = end - t;
                p[-1] = std::numeric_limits<T>::quiet_NaN();  // before them: must not show up either
                for (Index l = 0; l < t; ++l) p[l] = T(l + 1) / T(3);
                alignas(64) std::array<T, W> out;
                core::detail::load_first<T, Arch>(p, t).store_aligned(out.data());
                for (Index l = 0; l < W; ++l) REQUIRE(out[l] == (l < t ? T(l + 1) / T(3) : T(0)));
            }
            ++paths;
        }
    });
    munmap(mem, 2 * page);
#if XSIMD_WITH_AVX
    REQUIRE(paths > 0);
#else
    static_cast<void>(paths);  // an SSE-only build: no masked loads
#endif
}

TEMPLATE_LIST_TEST_CASE("gemm_stream_rows matches the exact product", "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // m: both ends of each tile shape's range of rows (on AVX-512: up to W/8, 3W/8 and 5W/8 in
    // float, W/4, W/2, 3W/4, W, 5W/4, 3W/2, 2W, 5W/2, 3W and 4W rows), partly filled vectors,
    // several passes (16 registers: 2W + 3 and 3W one pass of the 3-vector tile, 3W + 1 = 2 + 2
    // vectors, 4W + 1 = 3 + 2; AVX-512: 4W + 1 = 3 + 2 and 9W + 5 = 4 + 3 + 3); n around the 5-,
    // 6-, 8- and 12-row tiles of B (tails of every size 1..11 come from
    // n = 13, 23, 37); k with no full vector and a long one, and every remainder modulo the groups
    // of 2, 4 and 8 steps (6, 7, 515).
    const std::set<Index> rows{1,         2,         3,         W / 4,     W / 4 + 1, 3 * W / 8, 3 * W / 8 + 1,
                               W / 2,     W / 2 + 1, 5 * W / 8, 5 * W / 8 + 1, 3 * W / 4, 3 * W / 4 + 1,
                               W - 1,     W,         W + 1,     5 * W / 4, 5 * W / 4 + 1, 3 * W / 2,
                               3 * W / 2 + 1, 2 * W, 2 * W + 3, 5 * W / 2, 5 * W / 2 + 1, 3 * W,
                               3 * W + 1, 4 * W, 4 * W + 1, 9 * W + 5};
    const Index m = GENERATE_REF(from_range(std::vector<Index>(rows.begin(), rows.end())));
    const Index n = GENERATE(1, 11, 12, 13, 23, 37, 300);
    const Index k = GENERATE(0, 1, 6, 7, 77, 515);
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, n, k, accumulate);

    Strided<T> a(m, k, 51), b(n, k, 52), c(m, n, 53);
    const T alpha = T(0.75);
    const auto [want, bound] = expected_abt<T>(a.value(), b.value(), c.value(), alpha, accumulate);
    auto av = a.view(), bv = b.view(), cv = c.view();
    core::GemmWorkspace<T> ws;
    // stale scratch (a previous call's) must not leak into the sums: every value read is written
    ws.a.assign(std::size_t((k + 1) * 2 * W), std::numeric_limits<T>::quiet_NaN());
    core::gemm_stream_rows<T, Arch>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, cv.data, cv.ld, accumulate, ws);
    require_within(c.value(), want, bound, "stream rows vs exact");
    REQUIRE(c.border_intact());  // nothing written around C
}

TEMPLATE_LIST_TEST_CASE("gemm_stream_rows matches the exact product on a large B whose rows share L1 sets",
                        "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // B's rows a multiple of blocking::l1_set_span bytes apart (one span) and B past
    // blocking::stream_aliased_bytes: the rows 3W/2 + 1 to 2W of A take the two_aliased tile on
    // AVX-512, W + 1 to 3W/2 the three_halves one, 1 to 4 the few_far one (all 8 rows of B, the
    // prefetching loop over all but the last lines of each row). k = ld − 5 ends each row in a
    // partly used line (and, for few_far, in a partial group of steps); n = 4100 leaves 4 rows of
    // B to the tail tile.
    const Index ld = core::blocking::l1_set_span / Index(sizeof(T));
    const Index n = core::blocking::stream_aliased_bytes / core::blocking::l1_set_span + 4;
    const Index m = GENERATE(Index(1), Index(2), Index(3), Index(4), W + 1, 3 * W / 2, 3 * W / 2 + 1, 2 * W - 1, 2 * W);
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, accumulate);
    REQUIRE(core::detail::aliased_rows<T>(n, ld));

    const Index k = ld - 5;
    Strided<T> a(m, k, 71), b(n, k, 72), c(m, n, 73);
    const T alpha = T(-1.25);
    const auto [want, bound] = expected_abt<T>(a.value(), b.value(), c.value(), alpha, accumulate);
    auto av = a.view(), bv = b.view(), cv = c.view();
    REQUIRE(bv.ld == ld);
    core::GemmWorkspace<T> ws;
    core::gemm_stream_rows<T, Arch>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, cv.data, cv.ld, accumulate, ws);
    require_within(c.value(), want, bound, "stream rows (aliased rows of B) vs exact");
    REQUIRE(c.border_intact());
}

TEMPLATE_LIST_TEST_CASE("gemm_stream_rows matches the exact product on a large B read once for groups of blocks",
                        "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    using blk = core::blocking;
    // B past blocking::stream_aliased_bytes (few long rows, k values used of each), and more rows
    // of A than one block of the stream tiles holds: where blocking::stream_grouped (double on
    // AVX-512, both types on AVX2), detail::stream_rows_grouped. 4W + 1 rows: two blocks of 3 + 2
    // vectors (the 4 × 3 tile with 16 registers) and k in two blocks of stream_group_kc (1024 and
    // the rest); 9W + 5: blocks of 3, 3, 2, 2 vectors on AVX-512, 4, 3, 3 on the 3 × 4 tile with 16
    // registers; stream_group_rows + W + 3: two groups of rows (e.g. 33 + 33 vectors, each 11
    // blocks of 3, in double on AVX-512) and k in four blocks of 496–504 and a tail, so that
    // partial sums are stored, reloaded and stored again. n = 37 leaves 5 rows of B to the tail
    // tile (1 with 4-row tiles, 1 with 3-row ones). Elsewhere the passes of one block each.
    const Index n = 37, k = 2041;
    const Index ldb = blk::stream_aliased_bytes / (n * Index(sizeof(T))) + 64;
    constexpr bool grouped = blk::stream_grouped<T, Arch>;
    const Index m = grouped ? GENERATE(4 * W + 1, 9 * W + 5, blk::stream_group_rows<T> + W + 3) : 4 * W + 1;
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, n, k, accumulate);
    REQUIRE(core::detail::rows_from_memory<T>(n, ldb));
    if (grouped && m > blk::stream_group_rows<T>)
        REQUIRE(3 * blk::stream_group_kc<T>(blk::stream_group_rows<T> / 2 + W) < k);

    const Matrix<T> wide = random_matrix<T>(n, ldb, 82);  // B: its first k columns
    const MatrixView<const T> bv = view(wide).block(0, 0, n, k);
    Strided<T> a(m, k, 81), c(m, n, 83);
    const T alpha = T(0.625);
    const Matrix<double> b = wide.leftCols(k).template cast<double>();
    const auto [want, bound] = expected_abt<T>(a.value(), b, c.value(), alpha, accumulate);
    auto av = a.view(), cv = c.view();
    core::GemmWorkspace<T> ws;
    ws.b.assign(std::size_t(n * (m + W)), std::numeric_limits<T>::quiet_NaN());  // stale partial sums
    core::gemm_stream_rows<T, Arch>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, cv.data, cv.ld, accumulate, ws);
    require_within(c.value(), want, bound, "stream rows (grouped) vs exact");
    REQUIRE(c.border_intact());
}

/// base_product of an n × in X against a row-major out × in W (both strided), into a strided Y,
/// against the exact product; seeds seed, seed + 1, seed + 2.
template <class T, class Arch>
void check_base_product(Index n, Index out, Index in, std::uint64_t seed, const char* what) {
    Strided<T> x(n, in, seed), w(out, in, seed + 1), y(n, out, seed + 2);
    const auto [want, bound] = expected_abt<T>(x.value(), w.value(), y.value(), T(1), false);
    core::GemmWorkspace<T> ws;
    core::base_product<T, Arch>(x.view(), MatrixView<const T>(w.view()), y.view(), ws);
    require_within(y.value(), want, bound, what);
    REQUIRE(y.border_intact());
}

TEMPLATE_LIST_TEST_CASE("base_product matches the exact product on each of its paths", "[kernels][ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // n: one row (Eigen's GEMV), the ends of gemm_stream_rows' range (blocking::stream_min_rows,
    // stream_max_rows: on AVX2 3W/2 + 1 rows in float to 8W and W in double to 4W, in passes of up
    // to 3W rows (4W + 1 = 3 + 2 vectors); every batch from 2 rows on AVX-512, in passes of up to 4W
    // rows: 8W + 1 takes three passes of 3, 3 and 3 vectors) and of gemm_dot's
    // (stream_weight_rows: 32, 33), then gemm_packed where it remains (past one block of
    // gemm_mc<T> rows at 150).
    constexpr Index first = core::blocking::stream_min_rows<T, Arch>;
    constexpr Index last = std::min(core::blocking::stream_max_rows<T, Arch>, Index(150));
    const std::set<Index> rows{1,     2,     3,     W / 4 + 1,   W - 1,     W,         3 * W / 2, 3 * W / 2 + 1,
                               2 * W, 2 * W + 1, 4 * W, 4 * W + 1, 8 * W, 8 * W + 1, 32, 33, 150,
                               first - 1, first, last, last + 1};
    const Index n = GENERATE_REF(from_range(std::vector<Index>(rows.begin(), rows.end())));
    const Index out = GENERATE(13, 37);
    const Index in = GENERATE(7, 77);
    CAPTURE(n, out, in);

    check_base_product<T, Arch>(n, out, in, 61, "base_product vs exact");
}

TEMPLATE_LIST_TEST_CASE("base_product matches the exact product for a W read from memory",
                        "[kernels][ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    // W of more than blocking::stream_aliased_bytes: one row gemm_dot_streams, and up to
    // dot_streams_max_rows with 16 registers; then from stream_min_rows_large rows on (2 on
    // AVX-512) gemm_stream_rows, with its few_far tile up to 4 rows (AVX-512) and its far prefetch
    // up to stream_far_rows (the three_quarters tile of double's 3W/4 rows on AVX-512); most tiles
    // take blocking::stream_tiles::near, which prefetches into L1 instead (float's 3W/8 + 1 to 3W/4
    // rows and the 5W/4, 3W/2, 2W, 5W/2 + 1 and 3W + 1 rows here on AVX-512; with 16 registers all
    // but the 3 × 4 tile of 3W + 1 rows, one block of 4 vectors); below it gemm_dot; rows a little
    // over 4 KiB apart (in float). With 16 registers, also past stream_max_rows (the grouped
    // passes, not gemm_packed).
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr Index first = core::blocking::stream_min_rows_large<T, Arch>;
    constexpr Index far = core::blocking::stream_far_rows;
    const Index in = 1024 + 3;
    const Index out = core::blocking::stream_aliased_bytes / (in * Index(sizeof(T))) + 5;
    std::set<Index> rows{1,         2,         3,     4,     5,         first - 1, first, first + 1, 3 * W / 8 + 1,
                         W / 2,     W / 2 + 1, 5 * W / 8, 3 * W / 4, 5 * W / 4, far,   far + 1,   3 * W / 2,
                         2 * W,     5 * W / 2 + 1, 3 * W + 1};
    // a batch past stream_max_rows: on AVX2 the stream kernel's groups of passes (stream_grouped)
    if constexpr (core::blocking::stream_grouped<T, Arch> && !core::blocking::wide_register_file<Arch>)
        rows.insert(core::blocking::stream_max_rows<T, Arch> + 1);
    const Index n = GENERATE_REF(from_range(std::vector<Index>(rows.begin(), rows.end())));
    CAPTURE(n, out, in);
    check_base_product<T, Arch>(n, out, in, 71, "base_product, large W");
}

TEMPLATE_LIST_TEST_CASE("base_product matches the exact product for a W in L3 past the stream kernel's passes",
                        "[kernels][ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    using blk = core::blocking;
    // A W of at least blocking::stream_group_l3_bytes that is not read from memory: with 16
    // registers a batch past stream_max_rows goes to the grouped stream kernel up to
    // stream_group_l3_rows rows and to gemm_packed past them; with 32, the stream passes or
    // gemm_packed as before. The routing rule itself on explicit shapes first.
    const Index in = 515;
    const Index out = blk::stream_group_l3_bytes / (in * Index(sizeof(T))) + 3;
    REQUIRE_FALSE(core::detail::rows_from_memory<T>(out, in));
    constexpr bool l3_grouped = blk::stream_grouped<T, Arch> && !blk::wide_register_file<Arch>;
    REQUIRE(core::detail::grouped_rows<T, Arch>(blk::stream_group_l3_rows, out, in) == l3_grouped);
    REQUIRE_FALSE(core::detail::grouped_rows<T, Arch>(blk::stream_group_l3_rows + 1, out, in));
    REQUIRE_FALSE(core::detail::grouped_rows<T, Arch>(blk::stream_group_l3_rows, out / 2, in));  // W below 2 MiB
    const Index batches[] = {std::min(blk::stream_max_rows<T, Arch>, Index(150)) + 1, blk::stream_group_l3_rows,
                             blk::stream_group_l3_rows + 1};
    const Index n = batches[GENERATE(0, 1, 2)];
    CAPTURE(n, out, in);
    check_base_product<T, Arch>(n, out, in, 75, "base_product, W in L3");
}

TEMPLATE_LIST_TEST_CASE("base_product of one row matches the exact product on both GEMV paths",
                        "[kernels][ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    // W of blocking::gemv_weight_bytes_min and a little more (rows of 1001 values: gemv_rows, a
    // masked tail), and one row short of it (Eigen's GEMV).
    const Index in = 1001;
    const Index first = core::blocking::gemv_weight_bytes_min / (in * Index(sizeof(T))) + 1;
    const Index out = GENERATE_COPY(first - 1, first, first + 3);
    CAPTURE(out, in, core::blocking::gemv_one_stream(out, in, Index(sizeof(T))));
    REQUIRE(core::blocking::gemv_one_stream(out, in, Index(sizeof(T))) == (out >= first));
    check_base_product<T, Arch>(1, out, in, 74, "base_product, one row");
}

TEMPLATE_LIST_TEST_CASE("shrink matches the exact product on each of its paths", "[kernels][ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    // n and w at the ends of blocking::stream_shrink's range (8–16 rows, a rank from 32; on
    // AVX-512 only) and just outside it; in past one pass of the 32 KiB buffer of packed X (512
    // steps in groups of 4, 256 in double from 9 rows, 1024 in float at 8 rows) with a remainder
    // modulo the groups of 2 and 4 steps.
    const Index n = GENERATE(7, 8, 12, 16, 17);
    const Index w = GENERATE(16, 31, 32, 35, 64);
    const Index in = GENERATE(5, 130, 1030);
    const bool accumulate = GENERATE(false, true);  // T += X Vᵀ (the backward's blocks of columns)
    CAPTURE(n, w, in, accumulate);

    Strided<T> x(n, in, 71), v(w, in, 72), t(n, w, 73);
    const auto [want, bound] = expected_abt<T>(x.value(), v.value(), t.value(), T(1), accumulate);
    core::shrink<T, Arch>(x.view(), v.view(), t.view(), accumulate);
    require_within(t.value(), want, bound, "shrink vs exact");
    REQUIRE(t.border_intact());
}

TEMPLATE_LIST_TEST_CASE("gemm_packed matches the scalar reference and the exact product",
                        "[kernels][packed]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // Edges of every block: m around the 6- and 12-row micro-panels (16 and 32 registers) and past
    // gemm_mc<T> (144 in float, 72 in double), n around the 2-vector micro-panels and past
    // gemm_nc<T> (1024 in float, 512 in double), k around the SIMD width (the packing transposes'
    // tails) and past gemm_kc (384).
    const Index m = GENERATE(1, 3, 5, 6, 7, 12, 13, 25, 150);
    const Index n = GENERATE_COPY(Index(1), 2 * W - 1, 2 * W, 2 * W + 1, Index(37), Index(1030));
    const Index k = GENERATE_COPY(Index(0), Index(1), W - 1, W + 1, Index(77), Index(400));
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, n, k, accumulate);
    if (m * n * k > 4'000'000) return;  // the naive double product of the largest shapes

    Strided<T> a(m, k, 41), b(n, k, 42), c(m, n, 43), c_ref(m, n, 43);
    const T alpha = T(-0.625);
    const auto [want, bound] = expected_abt<T>(a.value(), b.value(), c.value(), alpha, accumulate);
    auto av = a.view(), bv = b.view(), cv = c.view(), crv = c_ref.view();
    core::GemmWorkspace<T> ws;
    core::gemm_packed<T, Arch>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, cv.data, cv.ld, accumulate, ws);
    core::gemm_dot_ref<T>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, crv.data, crv.ld, accumulate);
    require_within(c.value(), want, bound, "packed vs exact");
    require_within(c_ref.value(), want, bound, "scalar reference vs exact");

    // Strided<T> surrounds C with a border: the micro-kernel's edge tiles must not write past C.
    REQUIRE(c.border_intact());
}

/// α A B (+ C0 when accumulating) for a row-major B (k × n), exact in double, and the bound on the
/// error of its evaluation in T (the A B kernels: gemm_packed_ab, gemm_bcast_sweep).
template <class T>
std::pair<Matrix<double>, Matrix<double>> expected_ab(const Matrix<double>& a, const Matrix<double>& b,
                                                      const Matrix<double>& c0, T alpha, bool accumulate) {
    return expected_abt<T>(a, Matrix<double>(b.transpose()), c0, alpha, accumulate);
}

TEMPLATE_LIST_TEST_CASE("gemm_packed_ab matches the exact product A B", "[kernels][packed]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // The blocks of gemm_packed with B (k × n) packed from its rows: m around the micro-panels and
    // past gemm_mc<T>, n around the 2-vector panels (the copy's partial last panel) and past
    // gemm_nc<T>, k past gemm_kc.
    const Index m = GENERATE(1, 5, 12, 13, 150);
    const Index n = GENERATE_COPY(Index(1), 2 * W - 1, 2 * W + 1, Index(1030));
    const Index k = GENERATE(Index(0), Index(1), Index(77), Index(400));
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, n, k, accumulate);
    if (m * n * k > 4'000'000) return;

    Strided<T> a(m, k, 141), b(k, n, 142), c(m, n, 143);
    const T alpha = T(-0.625);
    const auto [want, bound] = expected_ab<T>(a.value(), b.value(), c.value(), alpha, accumulate);
    auto av = a.view(), bv = b.view(), cv = c.view();
    core::GemmWorkspace<T> ws;
    core::gemm_packed_ab<T, Arch>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, cv.data, cv.ld, accumulate, ws);
    require_within(c.value(), want, bound, "packed A B vs exact");
    REQUIRE(c.border_intact());
}

TEMPLATE_LIST_TEST_CASE("gemm_bcast_sweep matches the exact product A B", "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    constexpr Index MR = core::blocking::sweep_mr<Arch>, KC = core::blocking::sweep_kc;
    // Rows around the tiles of sweep_mr<Arch> rows (the last tile of fewer), columns in tiles of
    // expand_nv vectors, then of one vector, then the n mod W tail by gemm_bcast; k around the
    // blocks of sweep_kc rows of B (a partial last block, and a second block that adds to C).
    const Index m = GENERATE_COPY(Index(1), Index(2), MR - 1, MR, MR + 3, Index(core::blocking::sweep_ab_rows));
    const Index n = GENERATE_COPY(W - 1, W, 3 * W, 4 * W + 5, 7 * W + 1);
    const Index k = GENERATE_COPY(Index(0), Index(1), KC - 1, KC, 2 * KC + 7);
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, n, k, accumulate);

    Strided<T> a(m, k, 151), b(k, n, 152), c(m, n, 153);
    const T alpha = T(0.75);
    const auto [want, bound] = expected_ab<T>(a.value(), b.value(), c.value(), alpha, accumulate);
    auto av = a.view(), bv = b.view(), cv = c.view();
    core::gemm_bcast_sweep<T, Arch>(m, n, k, alpha, av.data, av.ld, bv.data, bv.ld, cv.data, cv.ld, accumulate);
    require_within(c.value(), want, bound, "sweep A B vs exact");
    REQUIRE(c.border_intact());
}

TEMPLATE_LIST_TEST_CASE("base_input_grad matches dY W on each of its paths", "[kernels][ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    // One row (Eigen's GEMV), 2 and sweep_ab_rows rows (gemm_bcast_sweep), one more (gemm_packed_ab);
    // out and in off the SIMD width; with and without a workspace kept across calls.
    const Index sweep = core::blocking::sweep_ab_rows;
    const Index n = GENERATE_COPY(Index(1), Index(2), sweep, sweep + 1);
    const bool accumulate = GENERATE(false, true);
    const Index out = 75, in = 133;
    CAPTURE(n, accumulate);
    Strided<T> dy(n, out, 161), w(out, in, 162), dx(n, in, 163), dx2(n, in, 163);
    const auto [want, bound] = expected_ab<T>(dy.value(), w.value(), dx.value(), T(1), accumulate);
    core::GemmWorkspace<T> ws;
    core::base_input_grad<T, Arch>(dy.view(), MatrixView<const T>(w.view()), dx.view(), accumulate, ws);
    require_within(dx.value(), want, bound, "base_input_grad vs exact");
    REQUIRE(dx.border_intact());
    core::base_input_grad<T, Arch>(dy.view(), MatrixView<const T>(w.view()), dx2.view(), accumulate);
    require_within(dx2.value(), want, bound, "base_input_grad (own buffers) vs exact");
    REQUIRE(dx2.border_intact());
}

TEMPLATE_LIST_TEST_CASE("core operations equal their dense formulas", "[ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index n = GENERATE_COPY(0, 1, 7, 12, 33);
    const Index in = GENERATE_COPY(Index(1), W + 1, Index(130));
    const Index out = GENERATE(Index(1), W - 1 > 0 ? W - 1 : Index(2), Index(70));
    // w = 2W + 3: a rank with a partial vector (shrink's last w mod W outputs by dot products).
    const Index w = GENERATE_COPY(Index(1), Index(3), Index(16), 2 * W + 3);
    CAPTURE(n, in, out, w);
    const double u = eps<T>();

    Strided<T> x(n, in, 31), v(w, in, 32), uf(out, w, 33), y(n, out, 34), dy(n, out, 35);
    Strided<T> t(n, w, 36), g(n, w, 37), du(out, w, 38), dv(w, in, 39), dx(n, in, 40);
    const Matrix<double> X = x.value(), V = v.value(), U = uf.value(), Y0 = y.value(),
                         dY = dy.value();

    SECTION("shrink T = X Vᵀ") {
        core::shrink<T, Arch>(x.view(), v.view(), t.view());
        require_within(t.value(), naive_product(X, V.transpose()),
                       product_bound(X.cwiseAbs(), V.transpose().cwiseAbs(), u), "shrink");
    }
    SECTION("expand Y += α T Uᵀ") {
        const Matrix<double> T0 = t.value();
        core::expand<T, Arch>(t.view(), uf.view(), y.view(), T(0.5));
        Matrix<double> bound = product_bound(T0.cwiseAbs(), U.transpose().cwiseAbs(), u, 0.5);
        bound += 2 * u * Y0.cwiseAbs();
        require_within(y.value(), Y0 + 0.5 * naive_product(T0, U.transpose()), bound, "expand");
    }
    SECTION("project_back G = dY U") {
        core::project_back<T, Arch>(dy.view(), uf.view(), g.view());
        require_within(g.value(), naive_product(dY, U),
                       product_bound(dY.cwiseAbs(), U.cwiseAbs(), u), "project_back");
    }
    SECTION("grad_expand dU = α dYᵀ T") {
        const Matrix<double> T0 = t.value();
        core::grad_expand<T, Arch>(dy.view(), t.view(), du.view(), T(2), false);
        require_within(du.value(), 2 * naive_product(dY.transpose(), T0),
                       product_bound(dY.transpose().cwiseAbs(), T0.cwiseAbs(), u, 2),
                       "grad_expand");
    }
    SECTION("grad_shrink dV += α Gᵀ X") {
        const Matrix<double> G0 = g.value(), dV0 = dv.value();
        core::grad_shrink<T, Arch>(g.view(), x.view(), dv.view(), T(-1), true);
        Matrix<double> bound = product_bound(G0.transpose().cwiseAbs(), X.cwiseAbs(), u);
        bound += 2 * u * dV0.cwiseAbs();
        require_within(dv.value(), dV0 - naive_product(G0.transpose(), X), bound, "grad_shrink");
    }
    SECTION("input_grad dX = α G V") {
        const Matrix<double> G0 = g.value();
        core::input_grad<T, Arch>(g.view(), v.view(), dx.view(), T(3), false);
        require_within(dx.value(), 3 * naive_product(G0, V),
                       product_bound(G0.cwiseAbs(), V.cwiseAbs(), u, 3), "input_grad");
        // Accumulating, with a kept workspace (from blocking::band_rows rows: V in its strips).
        const Matrix<double> dX0 = dx.value();
        core::GemmWorkspace<T> ws;
        core::input_grad<T, Arch>(g.view(), v.view(), dx.view(), T(-0.5), true, ws);
        Matrix<double> bound = product_bound(G0.cwiseAbs(), V.cwiseAbs(), u, 0.5);
        bound += 2 * u * dX0.cwiseAbs();
        require_within(dx.value(), dX0 - 0.5 * naive_product(G0, V), bound, "input_grad, accumulating");
    }
}

TEMPLATE_LIST_TEST_CASE("shrink equals its dense formula on each side of blocking::packed_shrink",
                        "[ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // Ranks of half a vector + 1, 3/4 of one (dot products at every n), one lane short of a vector
    // (the broadcast kernel from packed_shrink_rows_part_vector rows on), exactly one, and past
    // one with a partial vector (its last w mod W outputs by dot products); n on each side of the
    // row thresholds (8, 64 and, for a rank of one vector, 192).
    const Index w = GENERATE_COPY(W / 2 + 1, 3 * W / 4, W - 1, W, W + 1, 2 * W + 3);
    const Index n = GENERATE(Index(7), Index(8), Index(31), Index(32), Index(63), Index(64), Index(70),
                             Index(191), Index(192));
    const Index in = GENERATE_COPY(W + 1, Index(130));
    const bool accumulate = GENERATE(false, true);
    CAPTURE(n, w, in, accumulate, core::blocking::packed_shrink(n, w, W));
    Strided<T> x(n, in, 51), v(w, in, 52), t(n, w, 53);
    const auto [want, bound] = expected_abt<T>(x.value(), v.value(), t.value(), T(1), accumulate);
    core::shrink<T, Arch>(x.view(), v.view(), t.view(), accumulate);
    require_within(t.value(), want, bound, "shrink");
    REQUIRE(t.border_intact());  // nothing written around T
}

TEMPLATE_LIST_TEST_CASE("grad_shrink with wide factors (Gᵀ and X in strips) equals its dense formula",
                        "[ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // w from blocking::band_width on; in across blocking::band_cols (several blocks, a tail
    // block, a tail column); n = 1, rows past a 6-row band, and a depth past one packed piece of
    // Gᵀ (expand_depth: 256 values in float, 128 in double).
    const Index n = GENERATE(1, 7, 40, 300);
    const Index in = GENERATE_COPY(W + 1, Index(130), Index(600));
    const Index w = GENERATE(32, 45);
    const bool accumulate = GENERATE(false, true);
    CAPTURE(n, in, w, accumulate);
    const double u = eps<T>();
    core::GemmWorkspace<T> ws;
    for (int round = 0; round < 2; ++round) {  // the second round reuses the grown workspace
        Strided<T> x(n, in, 51 + round), g(n, w, 52 + round), dv(w, in, 53 + round);
        const Matrix<double> X = x.value(), G0 = g.value(), dV0 = dv.value();
        core::grad_shrink<T, Arch>(g.view(), x.view(), dv.view(), T(0.75), accumulate, ws);
        Matrix<double> want = 0.75 * naive_product(G0.transpose(), X);
        Matrix<double> bound = product_bound(G0.transpose().cwiseAbs(), X.cwiseAbs(), u, 0.75);
        if (accumulate) {
            want += dV0;
            bound += 2 * u * dV0.cwiseAbs();
        }
        require_within(dv.value(), want, bound, "grad_shrink, wide");
        REQUIRE(dv.border_intact());  // nothing written around dV
    }
}

TEMPLATE_LIST_TEST_CASE("expand handles widths beyond one packing pass", "[ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    const Index n = 5, out = 37, w = 1500;  // w > 32 KiB / sizeof(T) / W: several passes over w
    const Matrix<T> t = random_matrix<T>(n, w, 1), U = random_matrix<T>(out, w, 2);
    Matrix<T> y = random_matrix<T>(n, out, 3);
    const Matrix<double> Y0 = to_double(y);
    core::expand<T, Arch>(view(t), view(U), view_mut(y));
    Matrix<double> bound =
        product_bound(to_double(t).cwiseAbs(), to_double(U).transpose().cwiseAbs(), eps<T>());
    bound += 2 * eps<T>() * Y0.cwiseAbs();
    require_within(y, Y0 + naive_product(to_double(t), to_double(U).transpose()), bound,
                   "wide expand");
}

TEMPLATE_LIST_TEST_CASE("narrow project_back and grad_expand equal their dense formulas over several blocks",
                        "[ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // Ranks of half a vector or less take the blocked narrow paths (Uᵀ, or dUᵀ, in 32 KiB stack
    // blocks); out = 9000 spans several blocks at every such rank, out = 70 one; n from below to
    // above the row thresholds; w = W/2 + 1 stays on the broadcast kernel, w = W takes dU's path
    // from 16 rows on.
    const Index w = GENERATE_COPY(Index(1), std::max<Index>(1, W / 2), W / 2 + 1, W);
    const Index out = GENERATE(70, 9000);
    const Index n = GENERATE(1, 2, 8, 20);
    const bool accumulate = GENERATE(false, true);
    CAPTURE(w, out, n, accumulate);
    const double u = eps<T>();
    Strided<T> dy(n, out, 61), uf(out, w, 62), t(n, w, 63), g(n, w, 64), du(out, w, 65);
    const Matrix<double> dY = dy.value(), U = uf.value(), Tm = t.value(), dU0 = du.value();
    core::project_back<T, Arch>(dy.view(), uf.view(), g.view());
    require_within(g.value(), naive_product(dY, U), product_bound(dY.cwiseAbs(), U.cwiseAbs(), u), "project_back");
    core::grad_expand<T, Arch>(dy.view(), t.view(), du.view(), T(-1.5), accumulate);
    Matrix<double> want = -1.5 * naive_product(dY.transpose(), Tm);
    Matrix<double> bound = product_bound(dY.transpose().cwiseAbs(), Tm.cwiseAbs(), u, -1.5);
    if (accumulate) {
        want += dU0;
        bound += 2 * u * dU0.cwiseAbs();
    }
    require_within(du.value(), want, bound, "grad_expand");
}

TEMPLATE_LIST_TEST_CASE("rank_update: merge then unmerge returns W within u(2|W| + |ΔW|)", "[ops]",
                        KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    // in = 13, 17, 130: strips of 64 bytes with a 1-vector tile and scalar columns left over;
    // r = 130 > blocking::short_k takes the blocked broadcast kernel instead of the strips; in =
    // 300 gives rows of more than update_prefetch_tiles + 1 full tiles (prefetching W ahead).
    const Index out = GENERATE(1, 9, 65), in = GENERATE(1, 13, 17, 130, 300), r = GENERATE(1, 4, 64, 130);
    CAPTURE(out, in, r);
    Matrix<T> w = random_matrix<T>(out, in, 5);
    const Matrix<T> w0 = w;
    const Matrix<T> U = random_matrix<T>(out, r, 6), V = random_matrix<T>(r, in, 7);
    const T s = T(1.7);
    core::rank_update<T, Arch>(view_mut(w), view(U), view(V), s);
    const Matrix<double> dW = s * naive_product(to_double(U), to_double(V));
    require_within(w, to_double(w0) + dW,
                   product_bound(to_double(U).cwiseAbs(), to_double(V).cwiseAbs(), eps<T>(), s) +
                       2 * eps<T>() * to_double(w0).cwiseAbs(),
                   "merged");
    core::rank_update<T, Arch>(view_mut(w), view(U), view(V), -s);
    // The documented round-trip bound (first order in u; the factor 1.01 covers the O(u²) term).
    // |ΔW| is the rounded ΔW's magnitude: bounded by the exact one plus its product error.
    const Matrix<double> dW_abs =
        dW.cwiseAbs() +
        product_bound(to_double(U).cwiseAbs(), to_double(V).cwiseAbs(), eps<T>(), s);
    const Matrix<double> bound =
        1.01 * eps<T>() * (2 * to_double(w0).cwiseAbs() + dW_abs).array() +
        std::numeric_limits<double>::min();
    require_within(w, to_double(w0), bound, "round trip");
}

TEMPLATE_LIST_TEST_CASE("rank_update at every row count of a band and its tail", "[ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    // The band sweep takes blocking::sweep_mr rows at a time (6, or 8 on AVX-512) and the rows
    // left as one tile of their count: 1 to 17 rows cover every tail after zero, one and two bands.
    const Index out = GENERATE(range(1, 18));
    const Index in = 37, r = 5;
    CAPTURE(out);
    Matrix<T> w = random_matrix<T>(out, in, 8);
    const Matrix<T> w0 = w;
    const Matrix<T> U = random_matrix<T>(out, r, 9), V = random_matrix<T>(r, in, 10);
    core::rank_update<T, Arch>(view_mut(w), view(U), view(V), T(-0.6));
    require_within(w, to_double(w0) - 0.6 * naive_product(to_double(U), to_double(V)),
                   product_bound(to_double(U).cwiseAbs(), to_double(V).cwiseAbs(), eps<T>(), 0.6) +
                       2 * eps<T>() * to_double(w0).cwiseAbs(),
                   "rank_update");
}

TEST_CASE("kernels are no-ops on empty shapes", "[kernels]") {
    Matrix<float> c = Matrix<float>::Constant(2, 3, 7.f);
    const Matrix<float> a(2, 0), b(0, 3);
    core::gemm_bcast<float>(0, 3, 0, 1.f, a.data(), 0, 1, b.data(), 3, c.data(), 3, false);
    REQUIRE((c.array() == 7.f).all());
    core::gemm_bcast<float>(2, 3, 0, 1.f, a.data(), 0, 1, b.data(), 3, c.data(), 3, true);
    REQUIRE((c.array() == 7.f).all());
    core::gemm_bcast<float>(2, 3, 0, 1.f, a.data(), 0, 1, b.data(), 3, c.data(), 3, false);
    REQUIRE((c.array() == 0.f).all());  // k = 0 without accumulate: C = 0 · (empty sum)
}

TEMPLATE_LIST_TEST_CASE("shrink_row_backward equals its dense formulas", "[ops]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // Ranks around the blocks of 4 rows of V (and none), inputs around the vector width (tails).
    const Index w = GENERATE(Index(0), Index(1), Index(4), Index(5), Index(7), Index(11));
    const Index in = GENERATE_COPY(W - 1, W + 1, 3 * W + 2);
    const bool accumulate = GENERATE(false, true);
    CAPTURE(w, in, accumulate);
    Strided<T> x(1, in, 61), v(w, in, 62), g(1, w, 63), t(1, w, 64), dv(w, in, 65), dx(1, in, 66);
    const Matrix<double> X = x.value(), V = v.value(), G = g.value(), dX0 = dx.value();
    const double u = eps<T>(), alpha = -0.75;
    core::shrink_row_backward<T, Arch>(x.view().data, v.view(), g.view().data, T(alpha), t.view().data, dv.view(),
                                       dx.view().data, accumulate);
    require_within(t.value(), naive_product(X, V.transpose()),
                   product_bound(X.cwiseAbs(), V.transpose().cwiseAbs(), u), "t = x Vᵀ");
    // α g is rounded once, then its product with x once (and the reference, in double, twice
    // more: for T = double it is no more exact than the result): within 4u.
    require_within(dv.value(), alpha * naive_product(G.transpose(), X),
                   4 * u * std::abs(alpha) * naive_product(G.transpose().cwiseAbs(), X.cwiseAbs()), "dV = α gᵀ x");
    const Matrix<double> dX = (accumulate ? dX0 : Matrix<double>::Zero(1, in)) + alpha * naive_product(G, V);
    Matrix<double> bound = product_bound(G.cwiseAbs(), V.cwiseAbs(), 2 * u, std::abs(alpha));
    if (accumulate) bound += 2 * u * dX0.cwiseAbs();
    require_within(dx.value(), dX, bound, "dx (+)= α g V");
    REQUIRE((t.border_intact() && dv.border_intact() && dx.border_intact()));

    // Without dx: the same t and dV, bit for bit.
    Strided<T> t2(1, w, 67), dv2(w, in, 68);
    core::shrink_row_backward<T, Arch>(x.view().data, v.view(), g.view().data, T(alpha), t2.view().data, dv2.view(),
                                       nullptr, accumulate);
    REQUIRE(t2.value() == t.value());
    REQUIRE(dv2.value() == dv.value());
}

TEMPLATE_LIST_TEST_CASE("gemm_bcast with rows of a quarter or half a vector, contiguous, equals its dense formula",
                        "[kernels]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // One row of C against a contiguous B (R = W / n rows of B per vector, k not a multiple of 4R:
    // the sums' tail and the rows' tail), and outer products into a contiguous C (m rows, R per
    // vector, a tail of rows), with A's values a stride apart.
    const Index n = GENERATE_COPY(W / 2, W / 4);
    const bool one_row = GENERATE(true, false);
    const Index len = GENERATE(Index(1), Index(2), Index(3), Index(5), Index(8), Index(9), Index(131), Index(301));
    const Index stride = GENERATE(Index(1), Index(3));
    const bool accumulate = GENERATE(false, true);
    if (n < 1 || (!one_row && len < 2)) return;
    const Index m = one_row ? 1 : len, k = one_row ? len : 1;
    CAPTURE(n, m, k, stride, accumulate);
    const Matrix<double> A = random_matrix<double>(m, k, 71), B = random_matrix<double>(k, n, 72),
                         C0 = random_matrix<double>(m, n, 73);
    // A(i, p) at a[i·rsa + p·csa]; B and C contiguous, with guard values past C's end.
    const Index rsa = one_row ? 1 : stride, csa = one_row ? stride : 1;
    std::vector<T> a(std::size_t(m * rsa + k * csa), T(0)), b(std::size_t(k * n)), c(std::size_t(m * n + W), T(7));
    for (Index i = 0; i < m; ++i)
        for (Index p = 0; p < k; ++p) a[std::size_t(i * rsa + p * csa)] = T(A(i, p));
    for (Index p = 0; p < k; ++p)
        for (Index j = 0; j < n; ++j) b[std::size_t(p * n + j)] = T(B(p, j));
    for (Index i = 0; i < m; ++i)
        for (Index j = 0; j < n; ++j) c[std::size_t(i * n + j)] = T(C0(i, j));
    const T alpha = T(-0.75);
    core::gemm_bcast<T, Arch>(m, n, k, alpha, a.data(), rsa, csa, b.data(), n, c.data(), n, accumulate);
    Matrix<double> got(m, n);
    for (Index i = 0; i < m; ++i)
        for (Index j = 0; j < n; ++j) got(i, j) = double(c[std::size_t(i * n + j)]);
    const Matrix<double> Ad = to_double(Matrix<T>(A.cast<T>())), Bd = to_double(Matrix<T>(B.cast<T>())),
                         Cd = to_double(Matrix<T>(C0.cast<T>()));
    Matrix<double> want = double(alpha) * naive_product(Ad, Bd);
    Matrix<double> bound = product_bound(Ad.cwiseAbs(), Bd.cwiseAbs(), eps<T>(), double(alpha));
    if (accumulate) {
        want += Cd;
        bound += 2 * eps<T>() * Cd.cwiseAbs();
    }
    require_within(got, want, bound, "gemm_bcast, rows of a part of a vector");
    for (Index g = m * n; g < m * n + W; ++g) REQUIRE(c[std::size_t(g)] == T(7));  // nothing past C
}
