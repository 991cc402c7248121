// SPDX-License-Identifier: Apache-2.0
// Every SIMD architecture path compiled into this build computes the same products: each kernel
// family (broadcast GEMM, dot GEMM, narrow dot GEMM, the few-row shrink and expand of the
// gathered kernels) run for every architecture in xsimd::supported_architectures (all that the
// compiler flags enable: SSE2 only without -march, SSE2 … FMA3+AVX2 with -march=native on this
// machine, the AVX-512 ones on a machine and compiler that have them), float and double, on
// shapes with SIMD tails, each within the rounding bound of the exact (double) product, and every
// pair of paths within the sum of their bounds of each other.

#include <lowrank/core/gathered.hpp>
#include <lowrank/core/kernels.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "support.hpp"

using namespace lowrank;
using namespace lowrank::test;

namespace {

/// One kernel's result for one architecture.
struct PathResult {
    std::string arch;
    Matrix<double> value;
};

/// Runs `run(arch, out)` for every compiled architecture, checks each result within `bound` of
/// `want`, and every pair within the sum of their bounds (2 · bound) of each other.
template <class Run>
void check_all_paths(const Matrix<double>& want, const Matrix<double>& bound, Run&& run) {
    std::vector<PathResult> results;
    xsimd::supported_architectures::for_each([&](auto arch) {
        using Arch = decltype(arch);
        results.push_back({Arch::name(), run(Arch{})});
    });
    REQUIRE(!results.empty());
    for (const auto& r : results) {
        CAPTURE(r.arch);
        require_within(r.value, want, bound, "path vs exact");
    }
    const Matrix<double> pair_bound = 2 * bound;
    for (std::size_t i = 0; i < results.size(); ++i)
        for (std::size_t j = i + 1; j < results.size(); ++j) {
            CAPTURE(results[i].arch, results[j].arch);
            require_within(results[i].value, results[j].value, pair_bound, "path vs path");
        }
}

}  // namespace

TEMPLATE_TEST_CASE("every compiled architecture path of each kernel family agrees", "[arch]", float,
                   double) {
    using T = TestType;
    // Tails for every width up to AVX-512's 16 floats: 37 = 2·16 + 5, 23 = 16 + 7, k spans two
    // passes of the dot kernels' 4 KiB blocks for float (1100 > 1024); k = 8 is rank 8, shorter
    // than an AVX-512 float vector (gemm_dot_narrow hands it to AVX2's).
    const Index m = GENERATE(1, 7, 13), n = GENERATE(5, 37), k = GENERATE(3, 8, 23, 1100);
    CAPTURE(m, n, k);
    const T alpha = T(0.625);
    const Matrix<T> a = random_matrix<T>(m, k, 1), bt = random_matrix<T>(n, k, 2),
                    b = bt.transpose();
    const Matrix<double> ad = a.template cast<double>(), bd = b.template cast<double>();
    const Matrix<double> want = alpha * naive_product(ad, bd);
    const Matrix<double> bound = product_bound(ad.cwiseAbs(), bd.cwiseAbs(), eps<T>(), alpha);

    SECTION("gemm_bcast: C = alpha A B") {
        check_all_paths(want, bound, [&](auto arch) {
            using Arch = decltype(arch);
            Matrix<T> c(m, n);
            core::gemm_bcast<T, Arch>(m, n, k, alpha, a.data(), k, 1, b.data(), n, c.data(), n, false);
            return Matrix<double>(c.template cast<double>());
        });
    }
    SECTION("gemm_dot: C = alpha A (Bᵀ)ᵀ") {
        check_all_paths(want, bound, [&](auto arch) {
            using Arch = decltype(arch);
            Matrix<T> c(m, n);
            core::gemm_dot<T, Arch>(m, n, k, alpha, a.data(), k, bt.data(), k, c.data(), n, false);
            return Matrix<double>(c.template cast<double>());
        });
    }
    SECTION("gemm_dot_narrow") {
        check_all_paths(want, bound, [&](auto arch) {
            using Arch = decltype(arch);
            Matrix<T> c(m, n);
            core::gemm_dot_narrow<T, Arch>(m, n, k, alpha, a.data(), k, bt.data(), k, c.data(), n, false);
            return Matrix<double>(c.template cast<double>());
        });
    }
    SECTION("gemv_rows: one row of A against the rows of Bᵀ") {
        const Matrix<double> want_row = want.topRows(1), bound_row = bound.topRows(1);
        check_all_paths(want_row, bound_row, [&](auto arch) {
            using Arch = decltype(arch);
            Matrix<T> c(1, n);
            core::gemv_rows<T, Arch>(n, k, alpha, a.data(), bt.data(), k, c.data(), false);
            return Matrix<double>(c.template cast<double>());
        });
    }
    SECTION("gemm_dot_streams: up to dot_streams_max_rows rows of A against the rows of Bᵀ") {
        const Index rows = std::min(m, core::blocking::dot_streams_max_rows);
        const Matrix<double> want_rows = want.topRows(rows), bound_rows = bound.topRows(rows);
        check_all_paths(want_rows, bound_rows, [&](auto arch) {
            using Arch = decltype(arch);
            Matrix<T> c(rows, n);
            core::gemm_dot_streams<T, Arch>(rows, n, k, alpha, a.data(), k, bt.data(), k, c.data(), n, false);
            return Matrix<double>(c.template cast<double>());
        });
    }
    SECTION("gathered_shrink on scattered rows, gathered_expand into scattered rows") {
        // Rows m-1, …, 0 of a 2m-row batch at odd positions: T = X[ρ] (Bᵀ)ᵀ, then Y[ρ] = alpha T' U'ᵀ.
        Matrix<T> batch = random_matrix<T>(2 * m, k, 3);
        std::vector<Index> rows(static_cast<std::size_t>(m));
        for (Index i = 0; i < m; ++i) {
            rows[std::size_t(i)] = 2 * (m - 1 - i) + 1;
            batch.row(rows[std::size_t(i)]) = a.row(i);
        }
        const core::RowSet set{rows.data(), 0, m};
        const Matrix<double> shrink_want = naive_product(ad, bd);
        const Matrix<double> shrink_bound = product_bound(ad.cwiseAbs(), bd.cwiseAbs(), eps<T>());
        check_all_paths(shrink_want, shrink_bound, [&](auto arch) {
            using Arch = decltype(arch);
            Matrix<T> t(m, n);
            core::gathered_shrink<T, Arch>(view(batch), set, view(bt), view_mut(t));
            return Matrix<double>(t.template cast<double>());
        });
        // The same with Vᵀ given (an AdapterBank's layout: rows padded to 64 bytes with zeros).
        const Index ldv = (n + 15) / 16 * 16;
        Matrix<T> vt = Matrix<T>::Zero(k, ldv);
        vt.leftCols(n) = bt.transpose();
        check_all_paths(shrink_want, shrink_bound, [&](auto arch) {
            using Arch = decltype(arch);
            Matrix<T> t(m, n);
            core::gathered_shrink_transposed<T, Arch>(view(batch), set, MatrixView<const T>{vt.data(), k, n, ldv},
                                                      view_mut(t));
            return Matrix<double>(t.template cast<double>());
        });
        // Expand: T' = a (m × k) times U' = bt (n × k) transposed, into the scattered rows; U' as
        // stored, or U'ᵀ in strips (an AdapterBank's layout).
        Matrix<T> strips(core::strip_rows<T>(k, n), core::strip_width<T>);
        core::pack_strips<T>(view(bt), view_mut(strips));
        for (const bool given : {false, true}) {
            INFO("U'ᵀ in strips: " << given);
            check_all_paths(want, bound, [&](auto arch) {
                using Arch = decltype(arch);
                Matrix<T> y = Matrix<T>::Zero(2 * m, n);
                if (given)
                    core::gathered_expand_strips<T, Arch>(view(a), view(strips), view_mut(y), set, alpha, false);
                else
                    core::gathered_expand<T, Arch>(view(a), view(bt), view_mut(y), set, alpha, false);
                Matrix<double> got(m, n);
                for (Index i = 0; i < m; ++i) got.row(i) = y.row(rows[std::size_t(i)]).template cast<double>();
                return got;
            });
        }
    }
}

TEMPLATE_TEST_CASE("detail::haddp puts the sum of vector j in lane j on every architecture", "[arch]", float,
                   double) {
    // Small integers, so every sum is exact whatever the order: a lane that holds another vector's
    // sum (xsimd 8.1's AVX-512 float haddp swapped four pairs) differs by a multiple of W.
    using T = TestType;
    xsimd::supported_architectures::for_each([&](auto arch) {
        using Arch = decltype(arch);
        using batch = xsimd::batch<T, Arch>;
        constexpr Index W = batch::size;
        CAPTURE(Arch::name());
        batch acc[W];
        alignas(64) std::array<T, W> lanes{};
        for (Index j = 0; j < W; ++j) {
            for (Index l = 0; l < W; ++l) lanes[std::size_t(l)] = T(3 * j * W + (l * 7) % W);
            acc[j] = batch::load_aligned(lanes.data());
        }
        core::detail::haddp<T, Arch>(acc).store_aligned(lanes.data());
        for (Index j = 0; j < W; ++j) {
            T want = 0;
            for (Index l = 0; l < W; ++l) want += T(3 * j * W + (l * 7) % W);
            CAPTURE(j);
            REQUIRE(lanes[std::size_t(j)] == want);
        }
    });
}

TEMPLATE_TEST_CASE("detail::transpose moves every value to its transposed place on every architecture", "[arch]",
                   float, double) {
    // Distinct values (the source index), so a value moved to the wrong place, a lost one or a
    // write outside the transposed block (the padding of dst is checked) shows. Shapes: whole
    // AVX-512 tiles (16 × 16 float, 8 × 8 double), tiles with edges for each narrower path, and
    // sides shorter than one vector (rank 8 in float); strides past the block's width.
    using T = TestType;
    const Index rows = GENERATE(1, 8, 16, 19, 37, 64), cols = GENERATE(3, 8, 16, 23, 32);
    CAPTURE(rows, cols);
    const Index lds = cols + 5, ldd = rows + 3;
    std::vector<T> src(std::size_t(rows * lds));
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = T(i);
    xsimd::supported_architectures::for_each([&](auto arch) {
        using Arch = decltype(arch);
        CAPTURE(Arch::name());
        std::vector<T> dst(std::size_t(cols * ldd), T(-1));
        core::detail::transpose<T, Arch>(rows, cols, src.data(), lds, dst.data(), ldd);
        for (Index j = 0; j < cols; ++j)
            for (Index i = 0; i < ldd; ++i) {
                CAPTURE(i, j);
                REQUIRE(dst[std::size_t(j * ldd + i)] == (i < rows ? src[std::size_t(i * lds + j)] : T(-1)));
            }
    });
}
