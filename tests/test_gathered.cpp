// SPDX-License-Identifier: Apache-2.0
// The gathered kernels (core/gathered.hpp) against their scalar references and against naive
// double-precision products: the few-row shrink and expand (SIMD transposes, tails, several
// passes), row gathering and scatter-add, grouping by adapter, one adapter on a row set (with and
// without per-row weights), BGMV / SGMV and their backward, for SSE2 and the build's default arch.

#include <lowrank/core/gathered.hpp>

#include <numeric>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::naive_product;
using lowrank::test::product_bound;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

using lowrank::test::DoubleDefault;
using lowrank::test::DoubleSse2;
using lowrank::test::FloatDefault;
using lowrank::test::FloatSse2;
using lowrank::test::KernelCases;
using lowrank::test::Strided;

namespace {

/// Exact α diag(w) (X Vᵀ) Uᵀ and a bound on its computed error (the shrink's error propagates
/// through |U|, plus the expand's own), as in test_lora.
struct Delta {
    Matrix<double> value, bound;
};
Delta exact_delta(const Matrix<double>& x, const Matrix<double>& v, const Matrix<double>& u,
                  double alpha, const std::vector<double>& weights, double u_round) {
    Matrix<double> t = naive_product(x, v.transpose());
    Matrix<double> t_err = product_bound(x.cwiseAbs(), v.transpose().cwiseAbs(), u_round);
    for (Index i = 0; i < t.rows(); ++i) {
        const double wi = weights.empty() ? 1.0 : weights[std::size_t(i)];
        t.row(i) *= wi;
        t_err.row(i) = t_err.row(i) * std::abs(wi) + 2 * u_round * t.row(i).cwiseAbs();
    }
    Delta d;
    d.value = alpha * naive_product(t, u.transpose());
    const Matrix<double> abs_t = t.cwiseAbs() + t_err;
    d.bound = std::abs(alpha) * (naive_product(t_err, u.transpose().cwiseAbs()) +
                                 product_bound(abs_t, u.transpose().cwiseAbs(), u_round));
    d.bound.array() += 3 * u_round * d.value.cwiseAbs().array();
    return d;
}

/// Exact gradients of α diag(w) (X Vᵀ) Uᵀ for upstream dY (rows already selected) and bounds on
/// their computed errors: each is a product of two computed intermediates, so the absolute-value
/// products with γ of the longer reduction bound the error (as in test_lora's backward test).
struct Grads {
    Matrix<double> du, dv, dx, du_bound, dv_bound, dx_bound;
};
Grads exact_grads(const Matrix<double>& x, const Matrix<double>& dy, const Matrix<double>& v,
                  const Matrix<double>& u, double a, const std::vector<double>& weights, double uu) {
    Matrix<double> tw = naive_product(x, v.transpose()), gw = naive_product(dy, u);
    Matrix<double> abs_t = naive_product(x.cwiseAbs(), v.transpose().cwiseAbs());
    Matrix<double> abs_g = naive_product(dy.cwiseAbs(), u.cwiseAbs());
    for (Index i = 0; i < x.rows(); ++i) {
        const double wi = weights.empty() ? 1.0 : weights[std::size_t(i)];
        tw.row(i) *= wi;
        gw.row(i) *= wi;
        abs_t.row(i) *= std::abs(wi);
        abs_g.row(i) *= std::abs(wi);
    }
    const double in = double(x.cols()), out = double(dy.cols());
    Grads g;
    g.du = a * naive_product(dy.transpose(), tw);
    g.dv = a * naive_product(gw.transpose(), x);
    g.dx = a * naive_product(gw, v);
    g.du_bound = 2 * product_bound(dy.transpose().cwiseAbs(), abs_t, uu, a) +
                 product_bound(dy.transpose().cwiseAbs(), abs_t, (in + 2) * uu, a);
    g.dv_bound = 2 * product_bound(abs_g.transpose(), x.cwiseAbs(), uu, a) +
                 product_bound(abs_g.transpose(), x.cwiseAbs(), (out + 2) * uu, a);
    g.dx_bound = 2 * product_bound(abs_g, v.cwiseAbs(), uu, a) +
                 product_bound(abs_g, v.cwiseAbs(), (out + 2) * uu, a);
    return g;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("gathered_shrink matches gemm_dot_ref and the exact product", "[gathered]",
                        KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index m = GENERATE(0, 1, 2, 3, 5, 8, 13);  // 3 and the odd ones: a 3-row tile
    const Index w = GENERATE(1, 5, 6, 7, 16);
    // 1100 > 4 KiB / sizeof(T): several passes over k in both precisions.
    const Index k = GENERATE_COPY(Index(0), Index(1), W - 1, W + 1, Index(77), Index(1100));
    CAPTURE(m, w, k);
    // The m rows used are scattered over a larger batch (every other row, reversed) or contiguous.
    const bool scattered = GENERATE(false, true);
    CAPTURE(scattered);
    Strided<T> batch(2 * m + 1, k, 1), v(w, k, 2), t(m, w, 3), t_ref(m, w, 3);
    std::vector<Index> rows(static_cast<std::size_t>(m));
    for (Index i = 0; i < m; ++i) rows[std::size_t(i)] = scattered ? 2 * (m - 1 - i) + 1 : i + 1;
    const core::RowSet set = scattered ? core::RowSet{rows.data(), 0, m} : core::RowSet{nullptr, 1, m};
    Strided<T> x(m, k, 0);
    for (Index i = 0; i < m; ++i) x.storage.row(1 + i).segment(2, k) = batch.storage.row(1 + rows[std::size_t(i)]).segment(2, k);
    const Matrix<double> want = naive_product(x.value(), v.value().transpose());
    const Matrix<double> bound =
        product_bound(x.value().cwiseAbs(), v.value().transpose().cwiseAbs(), eps<T>());
    core::gathered_shrink<T, Arch>(batch.view(), set, v.view(), t.view());
    auto xv = x.view(), vv = v.view(), rv = t_ref.view();
    core::gemm_dot_ref<T>(m, w, k, T(1), xv.data, xv.ld, vv.data, vv.ld, rv.data, rv.ld, false);
    require_within(t.value(), want, bound, "simd vs exact");
    require_within(t_ref.value(), want, bound, "scalar reference vs exact");
    REQUIRE(t.border_intact());  // nothing written outside the destination block

    // The same with Vᵀ given (an AdapterBank's layout): k × w inside a wider block whose padding
    // columns hold large values (read by the full-vector loads, never used), and T accumulated
    // over several passes of k starting from garbage in T.
    const Index ldv = (w + W - 1) / W * W + 1;
    Matrix<T> vt_storage = Matrix<T>::Constant(k + 1, ldv, T(1e30));
    vt_storage.block(0, 0, k, w) = v.storage.block(1, 2, w, k).transpose();
    const MatrixView<const T> vt{vt_storage.data(), k, w, ldv};
    Strided<T> t2(m, w, 3);
    core::gathered_shrink_transposed<T, Arch>(batch.view(), set, vt, t2.view());
    require_within(t2.value(), want, bound, "simd (Vᵀ given) vs exact");
    REQUIRE(t2.border_intact());
}

TEMPLATE_LIST_TEST_CASE("gathered_expand matches gemm_bcast_ref on Uᵀ and the exact product", "[gathered]",
                        KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    // Every tail tile of a band of 6 or 8 rows (1-7 rows), and tails after a full band (8, 11).
    const Index m = GENERATE(0, 1, 2, 3, 4, 5, 6, 7, 8, 11);
    // 300 exceeds one packing pass over w for every precision and architecture.
    const Index w = GENERATE(1, 3, 16, 300);
    // 7W + 5: a 4-vector tile (the 1–3-row tails), then one 2-vector and one 1-vector tile, then
    // 5 scalar columns, within one block of outputs.
    const Index out = GENERATE_COPY(Index(1), W - 1 > 0 ? W - 1 : Index(2), W + 1, Index(37), 7 * W + 5, Index(600));
    const bool accumulate = GENERATE(false, true);
    CAPTURE(m, w, out, accumulate);
    // The m rows written are scattered over a larger batch (every other row, reversed) or contiguous;
    // the rows in between must keep their values.
    const bool scattered = GENERATE(false, true);
    CAPTURE(scattered);
    const Index n = 2 * m + 1;
    std::vector<Index> rows(static_cast<std::size_t>(m));
    for (Index i = 0; i < m; ++i) rows[std::size_t(i)] = scattered ? 2 * (m - 1 - i) + 1 : i + 1;
    const core::RowSet set = scattered ? core::RowSet{rows.data(), 0, m} : core::RowSet{nullptr, 1, m};
    Strided<T> t(m, w, 11), u(out, w, 12), y(n, out, 13), y_ref(m, out, 0);
    const T alpha = T(-0.75);
    const Matrix<double> y0 = y.value();
    // Exact values and error bounds of the selected rows, in the order of the set.
    Matrix<double> want = alpha * naive_product(t.value(), u.value().transpose());
    Matrix<double> bound = product_bound(t.value().cwiseAbs(), u.value().transpose().cwiseAbs(),
                                         eps<T>(), alpha);
    for (Index i = 0; i < m; ++i) {
        const Index r = rows[std::size_t(i)];
        if (accumulate) {
            want.row(i) += y0.row(r);
            bound.row(i) += 2 * eps<T>() * y0.row(r).cwiseAbs();
        }
        y_ref.storage.row(1 + i).segment(2, out) = y.storage.row(1 + r).segment(2, out);
    }
    core::gathered_expand<T, Arch>(t.view(), u.view(), y.view(), set, alpha, accumulate);
    const Matrix<T> ut = u.storage.block(1, 2, out, w).transpose();
    auto tv = t.view(), rv = y_ref.view();
    core::gemm_bcast_ref<T>(m, out, w, alpha, tv.data, tv.ld, 1, ut.data(), out, rv.data, rv.ld,
                            accumulate);
    Matrix<double> got(m, out);
    for (Index i = 0; i < m; ++i) got.row(i) = y.value().row(rows[std::size_t(i)]);
    require_within(got, want, bound, "simd vs exact");
    require_within(y_ref.value(), want, bound, "scalar reference vs exact");
    const Matrix<T> fresh = random_matrix<T>(n + 3, out + 5, 13);
    Matrix<T> outside = y.storage;  // y began as `fresh`: only the selected rows' blocks may differ
    for (const Index r : rows) outside.row(1 + r).segment(2, out) = fresh.row(1 + r).segment(2, out);
    REQUIRE(outside == fresh);

    // The same with Uᵀ in strips (an AdapterBank's layout). The padding past `out` in the last
    // strip is overwritten with 1e30: a tile that read it would put it into Y.
    constexpr Index S = core::strip_width<T>;
    Matrix<T> strips(core::strip_rows<T>(w, out), S);
    core::pack_strips<T>(u.view(), view_mut(strips));
    for (Index j = 0; j < w; ++j)
        for (Index o = out; o % S != 0; ++o) strips((o / S) * w + j, o % S) = T(1e30);
    Matrix<T> unpacked(w, out);  // the layout itself, element by element
    for (Index j = 0; j < w; ++j)
        for (Index o = 0; o < out; ++o) unpacked(j, o) = core::strip_at<T>(view(strips), w, j, o);
    REQUIRE(unpacked == u.storage.block(1, 2, out, w).transpose());
    Strided<T> y2(n, out, 13);
    core::gathered_expand_strips<T, Arch>(t.view(), view(strips), y2.view(), set, alpha, accumulate);
    for (Index i = 0; i < m; ++i) got.row(i) = y2.value().row(rows[std::size_t(i)]);
    require_within(got, want, bound, "Uᵀ in strips vs exact");
    Matrix<T> outside2 = y2.storage;
    for (const Index r : rows) outside2.row(1 + r).segment(2, out) = fresh.row(1 + r).segment(2, out);
    REQUIRE(outside2 == fresh);
}

TEMPLATE_LIST_TEST_CASE("the packing transpose is exact, tails included", "[gathered]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    constexpr Index W = xsimd::batch<T, Arch>::size;
    const Index out = GENERATE_COPY(Index(1), W, 3 * W + 1), w = GENERATE_COPY(Index(1), W, 2 * W + 3);
    CAPTURE(out, w);
    Strided<T> u(out + 4, w + 2, 21);
    const Index o0 = 2, p0 = 1, ldp = out + 3;
    std::vector<T> packed(std::size_t(w * ldp), T(-9));
    core::detail::pack_transposed<T, Arch>(u.view(), o0, out, p0, w, packed.data(), ldp);
    const Matrix<double> src = u.value();
    for (Index j = 0; j < w; ++j) {
        for (Index o = 0; o < out; ++o) REQUIRE(double(packed[std::size_t(j * ldp + o)]) == src(o0 + o, p0 + j));
        for (Index o = out; o < ldp; ++o) REQUIRE(packed[std::size_t(j * ldp + o)] == T(-9));
    }
}

TEMPLATE_TEST_CASE("row movement and grouping", "[gathered]", FloatSse2, FloatDefault, DoubleDefault) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    const Index cols = GENERATE(1, 9, 33);
    CAPTURE(cols);
    Strided<T> src(4, cols, 31), dst(7, cols, 32), dst_ref(7, cols, 32);
    const Index rows[] = {5, 0, 3, 6};
    const core::RowSet set{rows, 0, 4};
    core::scatter_add_rows<T, Arch>(src.view(), set, dst.view());
    core::scatter_add_rows_ref<T>(src.view(), set, dst_ref.view());
    REQUIRE(dst.storage == dst_ref.storage);
    Matrix<double> want = Strided<T>(7, cols, 32).value();
    for (Index i = 0; i < 4; ++i) want.row(rows[i]) += src.value().row(i);
    require_within(dst.value(), want, 2 * eps<T>() * want.cwiseAbs(), "scatter_add");

    Strided<T> gathered(4, cols, 33);
    core::gather_rows<T>(dst.view(), set, gathered.view());
    for (Index i = 0; i < 4; ++i) REQUIRE(gathered.value().row(i) == dst.value().row(rows[i]));

    const std::vector<int> idx = {2, -1, 0, 2, 2, -1, 0, 1, 3};
    std::vector<Index> order(idx.size()), offsets(5);
    const Index grouped = core::group_rows<int>(idx, 4, order.data(), offsets.data());
    REQUIRE(grouped == 7);
    REQUIRE(offsets == std::vector<Index>{0, 2, 3, 6, 7});
    REQUIRE(std::vector<Index>(order.begin(), order.begin() + 7) == std::vector<Index>{2, 6, 7, 0, 3, 4, 8});
}

TEMPLATE_LIST_TEST_CASE("gathered_apply and its backward equal the references and dense formulas",
                        "[gathered]", KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    const Index n = 11, in = GENERATE(3, 130), out = GENERATE(5, 70), w = GENERATE(1, 7);
    const bool contiguous = GENERATE(false, true);
    const bool weighted = GENERATE(false, true);
    const Index m = GENERATE(2, 5);  // 2: each row reduced against U in place (blocking::narrow_dot)
    CAPTURE(in, out, w, contiguous, weighted, m);
    Strided<T> x(n, in, 41), v(w, in, 42), u(out, w, 43), y(n, out, 44), y_ref(n, out, 44),
        dy(n, out, 45);
    const std::vector<Index> scattered = {9, 2, 4, 0, 7};
    const core::RowSet rows = contiguous ? core::RowSet{nullptr, 3, m} : core::RowSet{scattered.data(), 0, m};
    const std::vector<T> wts = {T(1), T(0.5), T(-2), T(0.25), T(3)};
    const T* weights = weighted ? wts.data() : nullptr;
    const core::GatheredFactors<T> f{v.view(), u.view(), T(1.5)};
    core::GatherWorkspace<T> ws;

    Matrix<double> x_rows(m, in), dy_rows(m, out);
    for (Index i = 0; i < m; ++i) {
        x_rows.row(i) = x.value().row(rows[i]);
        dy_rows.row(i) = dy.value().row(rows[i]);
    }
    std::vector<double> wd;
    if (weighted) wd.assign(wts.begin(), wts.begin() + m);
    const Delta d = exact_delta(x_rows, v.value(), u.value(), 1.5, wd, eps<T>());

    core::gathered_apply<T, Arch>(x.view(), y.view(), f, rows, weights, ws);
    core::gathered_apply_ref<T>(x.view(), y_ref.view(), f, rows, weights);
    const Matrix<double> y0 = Strided<T>(n, out, 44).value();
    Matrix<double> want = y0, bound = Matrix<double>::Constant(n, out, std::numeric_limits<double>::min());
    for (Index i = 0; i < m; ++i) {
        want.row(rows[i]) += d.value.row(i);
        bound.row(rows[i]) += d.bound.row(i);
    }
    bound += 2 * eps<T>() * want.cwiseAbs();
    require_within(y.value(), want, bound, "gathered_apply vs exact");
    require_within(y_ref.value(), want, bound, "reference vs exact");

    // Backward: T' = diag(w) X_ρ Vᵀ, G' = diag(w) dY_ρ U; dU = α dY_ρᵀ T', dV = α G'ᵀ X_ρ,
    // dX[ρ] += α G' V.
    const double uu = eps<T>();
    const Grads g = exact_grads(x_rows, dy_rows, v.value(), u.value(), 1.5, wd, uu);
    const Matrix<double>& du_want = g.du;
    const Matrix<double>& dv_want = g.dv;
    const Matrix<double>& du_bound = g.du_bound;
    const Matrix<double>& dv_bound = g.dv_bound;
    const Matrix<double>& dxr = g.dx;
    const Matrix<double>& dxr_bound = g.dx_bound;

    Strided<T> dv(w, in, 46), du(out, w, 47), dx(n, in, 48), dv_r(w, in, 46), du_r(out, w, 47),
        dx_r(n, in, 48);
    auto dxv = dx.view(), dxv_r = dx_r.view();
    core::gathered_backward<T, Arch>(x.view(), dy.view(), f, rows, weights, dv.view(), du.view(),
                                     &dxv, false, ws);
    core::gathered_backward_ref<T>(x.view(), dy.view(), f, rows, weights, dv_r.view(), du_r.view(),
                                   &dxv_r, false);
    const Matrix<double> dx0 = Strided<T>(n, in, 48).value();
    Matrix<double> dx_want = dx0, dx_bound = 2 * uu * dx0.cwiseAbs();
    dx_bound.array() += std::numeric_limits<double>::min();
    for (Index i = 0; i < m; ++i) {
        dx_want.row(rows[i]) += dxr.row(i);
        dx_bound.row(rows[i]) += dxr_bound.row(i) + 2 * uu * dx_want.row(rows[i]).cwiseAbs();
    }
    require_within(du.value(), du_want, du_bound, "dU");
    require_within(dv.value(), dv_want, dv_bound, "dV");
    require_within(dx.value(), dx_want, dx_bound, "dX");
    require_within(du_r.value(), du_want, du_bound, "dU reference");
    require_within(dv_r.value(), dv_want, dv_bound, "dV reference");
    require_within(dx_r.value(), dx_want, dx_bound, "dX reference");
}

TEMPLATE_LIST_TEST_CASE("bgmv and sgmv equal each row run with its own adapter", "[gathered]",
                        KernelCases) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    const Index n = GENERATE(1, 17), in = 45, out = 38;
    CAPTURE(n);
    const Index ranks[] = {3, 1, 8};
    std::vector<Matrix<T>> V, U;
    std::vector<core::GatheredFactors<T>> f;
    for (int k = 0; k < 3; ++k) {
        V.push_back(random_matrix<T>(ranks[k], in, 50 + k));
        U.push_back(random_matrix<T>(out, ranks[k], 60 + k));
    }
    for (int k = 0; k < 3; ++k) f.push_back({view(V[k]), view(U[k]), T(0.5 + k)});
    std::vector<int> idx(static_cast<std::size_t>(n));
    for (Index t = 0; t < n; ++t) idx[std::size_t(t)] = int((t * 7 + 2) % 4) - 1;  // −1, 0, 1, 2
    const Matrix<T> X = random_matrix<T>(n, in, 70);
    const Matrix<T> Y0 = random_matrix<T>(n, out, 71);
    Matrix<T> Y = Y0, Y_ref = Y0;
    core::GatherWorkspace<T> ws;
    core::bgmv<T, Arch>(view(X), view_mut(Y), std::span<const core::GatheredFactors<T>>(f),
                        std::span<const int>(idx), ws);
    core::bgmv_ref<T>(view(X), view_mut(Y_ref), std::span<const core::GatheredFactors<T>>(f),
                      std::span<const int>(idx));
    Matrix<double> want = to_double(Y0), bound = 2 * eps<T>() * to_double(Y0).cwiseAbs();
    bound.array() += std::numeric_limits<double>::min();
    for (Index t = 0; t < n; ++t) {
        const int k = idx[std::size_t(t)];
        if (k < 0) continue;
        const Delta d = exact_delta(to_double(X.row(t)), to_double(V[k]), to_double(U[k]),
                                    0.5 + k, {}, eps<T>());
        want.row(t) += d.value;
        bound.row(t) += d.bound + 2 * eps<T>() * (to_double(Y0.row(t)) + d.value).cwiseAbs();
    }
    require_within(Y, want, bound, "bgmv");
    require_within(Y_ref, want, bound, "bgmv_ref");
    for (Index t = 0; t < n; ++t)
        if (idx[std::size_t(t)] < 0) REQUIRE(Y.row(t) == Y0.row(t));  // untouched rows

    // The same batch sorted into segments (SGMV) gives the same rows.
    std::vector<Index> perm(static_cast<std::size_t>(n));
    std::iota(perm.begin(), perm.end(), Index(0));
    std::stable_sort(perm.begin(), perm.end(), [&](Index a, Index b) { return idx[std::size_t(a)] < idx[std::size_t(b)]; });
    Matrix<T> Xs(n, in), Ys(n, out);
    for (Index i = 0; i < n; ++i) {
        Xs.row(i) = X.row(perm[std::size_t(i)]);
        Ys.row(i) = Y0.row(perm[std::size_t(i)]);
    }
    std::vector<Index> seg = {0};
    std::vector<int> seg_adapter;
    for (Index i = 0; i < n; ++i) {
        const int k = idx[std::size_t(perm[std::size_t(i)])];
        if (seg_adapter.empty() || seg_adapter.back() != k) {
            if (i > 0) seg.push_back(i);
            seg_adapter.push_back(k);
        }
    }
    seg.push_back(n);
    core::sgmv<T, Arch>(view(Xs), view_mut(Ys), std::span<const core::GatheredFactors<T>>(f),
                        std::span<const Index>(seg), std::span<const int>(seg_adapter), ws);
    Matrix<double> want_s(n, out), bound_s(n, out);
    for (Index i = 0; i < n; ++i) {
        want_s.row(i) = want.row(perm[std::size_t(i)]);
        bound_s.row(i) = bound.row(perm[std::size_t(i)]);
    }
    require_within(Ys, want_s, bound_s, "sgmv");
}

TEMPLATE_TEST_CASE("bgmv_backward equals the per-row reference", "[gathered]", FloatDefault,
                   DoubleDefault, DoubleSse2) {
    using T = typename TestType::scalar;
    using Arch = typename TestType::arch;
    const Index n = 19, in = 33, out = 26;
    const Index ranks[] = {2, 5, 4};
    std::vector<Matrix<T>> V, U;
    std::vector<core::GatheredFactors<T>> f;
    for (int k = 0; k < 3; ++k) {
        V.push_back(random_matrix<T>(ranks[k], in, 80 + k));
        U.push_back(random_matrix<T>(out, ranks[k], 90 + k));
    }
    for (int k = 0; k < 3; ++k) f.push_back({view(V[k]), view(U[k]), T(2 - k)});
    std::vector<long> idx(static_cast<std::size_t>(n));
    for (Index t = 0; t < n; ++t) idx[std::size_t(t)] = long((t * 5) % 3);  // adapter 2 has rows too
    idx[4] = -1;
    const Matrix<T> X = random_matrix<T>(n, in, 100), dY = random_matrix<T>(n, out, 101);
    std::vector<Matrix<T>> dV, dU, dV_r, dU_r;
    std::vector<MatrixView<T>> dvv, duv;
    for (int k = 0; k < 3; ++k) {
        dV.push_back(Matrix<T>::Constant(ranks[k], in, T(7)));
        dU.push_back(Matrix<T>::Constant(out, ranks[k], T(7)));
        dV_r.push_back(Matrix<T>::Zero(ranks[k], in));
        dU_r.push_back(Matrix<T>::Zero(out, ranks[k]));
    }
    for (int k = 0; k < 3; ++k) {
        dvv.push_back(view_mut(dV[k]));
        duv.push_back(view_mut(dU[k]));
    }
    Matrix<T> dX = Matrix<T>::Zero(n, in), dX_r = Matrix<T>::Zero(n, in);
    auto dxv = view_mut(dX), dxv_r = view_mut(dX_r);
    core::GatherWorkspace<T> ws;
    core::bgmv_backward<T, Arch>(view(X), view(dY), std::span<const core::GatheredFactors<T>>(f),
                                 std::span<const long>(idx), std::span<const MatrixView<T>>(dvv),
                                 std::span<const MatrixView<T>>(duv), &dxv, ws);
    for (Index t = 0; t < n; ++t) {
        const long k = idx[std::size_t(t)];
        if (k < 0) continue;
        const Index row = t;
        core::gathered_backward_ref<T>(view(X), view(dY), f[std::size_t(k)], core::RowSet{&row, 0, 1},
                                       nullptr, view_mut(dV_r[k]), view_mut(dU_r[k]), &dxv_r, true);
    }
    Matrix<double> dx_want = Matrix<double>::Zero(n, in), dx_bound = Matrix<double>::Zero(n, in);
    dx_bound.array() += std::numeric_limits<double>::min();
    for (int k = 0; k < 3; ++k) {
        std::vector<Index> rows;
        for (Index t = 0; t < n; ++t)
            if (idx[std::size_t(t)] == k) rows.push_back(t);
        Matrix<double> xk(Index(rows.size()), in), dyk(Index(rows.size()), out);
        for (std::size_t i = 0; i < rows.size(); ++i) {
            xk.row(Index(i)) = to_double(X.row(rows[i]));
            dyk.row(Index(i)) = to_double(dY.row(rows[i]));
        }
        const Grads g = exact_grads(xk, dyk, to_double(V[k]), to_double(U[k]), 2.0 - k, {}, eps<T>());
        require_within(dU[k], g.du, g.du_bound, "dU");
        require_within(dV[k], g.dv, g.dv_bound, "dV");
        require_within(dU_r[k], g.du, g.du_bound, "dU reference");
        require_within(dV_r[k], g.dv, g.dv_bound, "dV reference");
        for (std::size_t i = 0; i < rows.size(); ++i) {
            dx_want.row(rows[i]) = g.dx.row(Index(i));
            dx_bound.row(rows[i]) += g.dx_bound.row(Index(i));
        }
    }
    require_within(dX, dx_want, dx_bound, "dX");
    require_within(dX_r, dx_want, dx_bound, "dX reference");
    REQUIRE(dX.row(4).isZero(0));
}
