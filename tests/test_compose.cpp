// SPDX-License-Identifier: Apache-2.0
// Token-masked composition (TARA) and mixed-adapter batches: results against dense double formulas
// Y[t] = X[t] Wᵀ + Σ_k M[k,t] s_k X[t] A_kᵀ B_kᵀ, mixed batches against each row run with its own
// adapter, finite-difference gradient checks, the alignment loss against its definition, and every
// class of bad input (with the destination left untouched).

#include <lowrank/compose.hpp>
#include <lowrank/testing/gradcheck.hpp>

#include <array>
#include <functional>
#include <numeric>

#include "alloc_count.hpp"
#include "lora_support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::max_abs;
using lowrank::test::naive_product;
using lowrank::test::product_bound;
using lowrank::test::random_lora;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

namespace {

/// diag(m) s (X Aᵀ) Bᵀ exactly, and a bound on its computed error: the shrink's error propagates
/// through |B|, the expand adds its own, the scale and mask multiplications one rounding each.
template <class T>
std::pair<Matrix<double>, Matrix<double>> exact_masked_delta(const Matrix<T>& X, const Lora<T>& lora,
                                                             const Matrix<double>& mask_row) {
    const Matrix<double> x = to_double(X), a = to_double(lora.A()), b = to_double(lora.B());
    const double s = double(lora.scale()), u = eps<T>();
    Matrix<double> t = naive_product(x, a.transpose());
    Matrix<double> t_err = product_bound(x.cwiseAbs(), a.transpose().cwiseAbs(), u);
    for (Index i = 0; i < t.rows(); ++i) {
        const double m = mask_row(0, i);
        t.row(i) *= s * m;
        t_err.row(i) = t_err.row(i) * std::abs(s * m) + 3 * u * t.row(i).cwiseAbs();
    }
    const Matrix<double> delta = naive_product(t, b.transpose());
    Matrix<double> bound = naive_product(t_err, b.transpose().cwiseAbs()) +
                           product_bound(t.cwiseAbs() + t_err, b.transpose().cwiseAbs(), u);
    bound.array() += 3 * u * delta.cwiseAbs().array();
    return {delta, bound};
}

template <class T>
Matrix<double> base_bound(const Matrix<T>& X, const Matrix<T>& W) {
    return product_bound(to_double(X).cwiseAbs(), to_double(W).transpose().cwiseAbs(), eps<T>());
}

template <class Term, class M>
concept Maskable = requires(Term&& t, M&& m) { std::forward<Term>(t).masked(std::forward<M>(m)); };
template <class Term, class M>
concept FreeMaskable = requires(Term&& t, M&& m) { lowrank::masked(std::forward<Term>(t), std::forward<M>(m)); };

}  // namespace

// Lifetime rules at compile time: neither the adapter nor the mask may be a temporary.
static_assert(Maskable<const Lora<float>&, const Vector<float>&>);
static_assert(Maskable<const Lora<float>&, std::span<const float>>);
static_assert(!Maskable<Lora<float>, const Vector<float>&>, "a temporary adapter would dangle");
static_assert(!Maskable<const Lora<float>&, Vector<float>>, "a temporary mask would dangle");
static_assert(!Maskable<const Lora<float>&, std::vector<float>>, "a temporary mask would dangle");
static_assert(FreeMaskable<const Lora<float>&, const Vector<float>&>);
static_assert(!FreeMaskable<Lora<float>, const Vector<float>&>, "a temporary adapter would dangle");
static_assert(LowRankTerm<MaskedTerm<Lora<double>>> && LightTerm<MaskedTerm<Lora<double>>>);
static_assert(!MergeableTerm<MaskedTerm<Lora<double>>>, "a per-token mask has no weight-space form");

TEST_CASE("token_masks marks every occurrence of each rare sequence, all its sub-tokens",
          "[compose][masks]") {
    // A CLIP-like prompt: <bos> a photo of sks1 sks2 dog and zwx cat , sks1 sks2 dog <eos>
    const std::vector<int> ids = {49406, 320, 1125, 539, 901, 902, 1929, 537, 777, 2368, 267, 901,
                                  902, 1929, 49407};
    const Matrix<float> M = token_masks(ids, {{901, 902}, {777}, {555}, {902}});
    REQUIRE(M.rows() == 4);
    REQUIRE(M.cols() == 15);
    Matrix<float> want = Matrix<float>::Zero(4, 15);
    want(0, 4) = want(0, 5) = want(0, 11) = want(0, 12) = 1;  // both occurrences, both sub-tokens
    want(1, 8) = 1;                                            // not the class word after it
    // row 2: the sequence is absent, a zero row (not an error)
    want(3, 5) = want(3, 12) = 1;
    REQUIRE(M == want);

    // Overlapping occurrences are merged; other id types and scalar types work.
    const std::vector<std::int64_t> rep = {5, 5, 5, 1};
    const Matrix<double> Mr = token_masks<double>(rep, std::vector<std::vector<std::int64_t>>{{5, 5}});
    REQUIRE(Mr == (Matrix<double>(1, 4) << 1, 1, 1, 0).finished());
    REQUIRE(token_positions(ids, std::vector<int>{1929}) == std::vector<Index>{6, 13});
    REQUIRE(token_positions(ids, std::vector<int>{1, 2, 3}).empty());

    REQUIRE_THROWS_WITH(token_masks(ids, {{901}, {}}),
                        Catch::Contains("lowrank::token_masks") && Catch::Contains("rare sequence 1 is empty"));
}

TEMPLATE_TEST_CASE("masked terms in expressions equal the dense formula", "[compose][masked]", float,
                   double) {
    using T = TestType;
    const Index n = GENERATE(1, 9, 40), in = 23, out = 17;
    CAPTURE(n);
    const Lora<T> l0 = random_lora<T>(out, in, 2, 4, 1), l1 = random_lora<T>(out, in, 5, 8, 2),
                  l2 = random_lora<T>(out, in, 1, 3, 3), plain = random_lora<T>(out, in, 3, 6, 4);
    const Matrix<T> X = random_matrix<T>(n, in, 5), W = random_matrix<T>(out, in, 6);
    // Binary, soft (with zeros and negative weights) and a mask on every token.
    Matrix<T> M(3, n);
    for (Index t = 0; t < n; ++t) {
        M(0, t) = T(t % 3 == 1);
        M(1, t) = t % 4 == 0 ? T(0) : T(0.25 * double(t % 5) - 0.4);
        M(2, t) = T(1);
    }
    const Matrix<double> base = naive_product(to_double(X), to_double(W).transpose());
    Matrix<double> want = base, bound = base_bound(X, W);
    int k = 0;
    for (const Lora<T>* l : {&l0, &l1, &l2}) {
        const auto [d, b] = exact_masked_delta(X, *l, to_double(M.row(k++)));
        want += d;
        bound += b;
    }
    SECTION("expression with three masked adapters and an unmasked one") {
        const auto [d, b] = exact_masked_delta(X, plain, Matrix<double>::Ones(1, n));
        const Matrix<T> Y = linear(X, W + l0.masked(M.row(0)) + l1.masked(M.row(1)) +
                                          masked(l2, M.row(2)) + plain);
        require_within(Y, want + d, bound + b + 2 * eps<T>() * (want + d).cwiseAbs(), "linear");
    }
    SECTION("masked_forward and masked_delta (gathered nonzero rows)") {
        const std::array<const Lora<T>*, 3> bank = {&l0, &l1, &l2};
        Matrix<T> Y;
        masked_forward(X, W, bank, M, Y);
        require_within(Y, want, bound + 2 * eps<T>() * want.cwiseAbs(), "masked_forward");
        Matrix<T> Yd = X * W.transpose();
        masked_delta(X, bank, M, Yd);
        require_within(Yd, want, bound + 4 * eps<T>() * want.cwiseAbs(), "masked_delta");
    }
    SECTION("a mask from a span, a column of a column-major matrix, a weighted term") {
        const std::vector<T> m0(M.row(0).data(), M.row(0).data() + n);
        const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> Mt = M.transpose();  // column-major
        const Matrix<T> Y = linear(X, W + l0.masked(std::span<const T>(m0)) + l1.masked(Mt.col(1)) +
                                          masked(2.0 * l2, M.row(2)));
        const auto [d, b] = exact_masked_delta(X, l2, to_double(M.row(2)));
        require_within(Y, want + d, bound + 2 * b + 2 * eps<T>() * (want + d).cwiseAbs(),
                       "span / column / weighted");
    }
}

TEMPLATE_TEST_CASE("all-zero masks give exactly the base product", "[compose][masked]", float, double) {
    using T = TestType;
    const Index n = 7, in = 12, out = 10;
    const Lora<T> l0 = random_lora<T>(out, in, 2, 4, 11), l1 = random_lora<T>(out, in, 3, 4, 12);
    const Matrix<T> X = random_matrix<T>(n, in, 13), W = random_matrix<T>(out, in, 14);
    const Matrix<T> zero = Matrix<T>::Zero(2, n);
    // The library's own base product (what linear and masked_forward run before the terms).
    Matrix<T> base(n, out);
    core::base_product<T>(view(X), view(W), view_mut(base));
    require_within(base, naive_product(to_double(X), to_double(W).transpose()),
                   base_bound(X, W), "base product");
    const Matrix<T> Y = linear(X, W + l0.masked(zero.row(0)) + l1.masked(zero.row(1)));
    REQUIRE(Y == base);
    const std::vector<Lora<T>> bank = {l0, l1};
    Matrix<T> Y2;
    masked_forward(X, W, bank, zero, Y2);
    REQUIRE(Y2 == base);
    std::vector<LoraGrad<T>> grads;
    masked_backward(X, W, bank, zero, random_matrix<T>(n, out, 15), grads);
    REQUIRE(grads.size() == 2);
    REQUIRE(grads[0].A.isZero(0));
    REQUIRE(grads[1].B.isZero(0));
}

TEMPLATE_TEST_CASE("a mixed batch equals each row run with its own adapter", "[compose][mixed]",
                   float, double) {
    using T = TestType;
    const Index n = GENERATE(1, 13, 64), in = 37, out = 29;
    CAPTURE(n);
    const std::vector<Lora<T>> adapters = {random_lora<T>(out, in, 4, 8, 21),
                                           random_lora<T>(out, in, 1, 2, 22),
                                           random_lora<T>(out, in, 16, 16, 23)};
    std::vector<std::reference_wrapper<const Lora<T>>> refs(adapters.begin(), adapters.end());
    const Matrix<T> X = random_matrix<T>(n, in, 24), W = random_matrix<T>(out, in, 25);
    std::vector<int> idx(static_cast<std::size_t>(n));
    for (Index t = 0; t < n; ++t) idx[std::size_t(t)] = int((t * 5 + 1) % 4) - 1;

    Matrix<double> want(n, out), bound(n, out);
    Matrix<T> per_row(n, out);
    for (Index t = 0; t < n; ++t) {
        const Matrix<T> xt = X.row(t);
        const int k = idx[std::size_t(t)];
        const Matrix<double> base = naive_product(to_double(xt), to_double(W).transpose());
        want.row(t) = base;
        bound.row(t) = base_bound(xt, W);
        Matrix<T> yt;
        if (k >= 0) {
            const auto [d, b] = exact_masked_delta(xt, adapters[std::size_t(k)], Matrix<double>::Ones(1, 1));
            want.row(t) += d;
            bound.row(t) += b;
            forward(xt, W, adapters[std::size_t(k)], yt);
        } else {
            yt = xt * W.transpose();
        }
        per_row.row(t) = yt;
    }
    bound += 2 * eps<T>() * want.cwiseAbs();
    require_within(per_row, want, bound, "per-row forward (the reference itself)");

    Matrix<T> Y;
    mixed(X, W, refs, idx, Y);
    require_within(Y, want, bound, "mixed");
    require_within(Y, to_double(per_row), 2 * bound, "mixed vs per-row forward");

    // The same through an AdapterBank (Bᵀ laid out once): a snapshot of the adapters.
    std::vector<Lora<T>> copies = adapters;
    AdapterBank<T> bank(copies);
    copies[0].B().setZero();  // later changes to the Loras do not reach the bank
    REQUIRE(bank.size() == 3);
    REQUIRE(bank.rank(2) == 16);
    REQUIRE(bank.scale(1) == adapters[1].scale());
    Matrix<T> Yb;
    mixed(X, W, bank, idx, Yb);
    require_within(Yb, want, bound, "mixed with an AdapterBank");
    Matrix<T> one_hot = Matrix<T>::Zero(3, n);  // the same batch as masks, through the bank
    for (Index t = 0; t < n; ++t)
        if (idx[std::size_t(t)] >= 0) one_hot(idx[std::size_t(t)], t) = T(1);
    masked_forward(X, W, bank, one_hot, Yb);
    require_within(Yb, want, bound, "masked_forward with an AdapterBank");

    // Adapter part only, with a reused workspace, into a block of a larger buffer.
    MixedWorkspace<T> ws;
    Matrix<T> big = Matrix<T>::Constant(n + 2, out, T(5));
    big.middleRows(1, n) = X * W.transpose();
    const Matrix<T> before = big;
    mixed_delta(X, adapters, idx, big.middleRows(1, n), ws);
    require_within(big.middleRows(1, n), want, 2 * bound, "mixed_delta");
    for (Index t = 0; t < n; ++t)  // rows without an adapter are not touched at all
        if (idx[std::size_t(t)] < 0) REQUIRE(big.row(t + 1) == before.row(t + 1));
    REQUIRE(big.row(0).isConstant(T(5)));
    REQUIRE(big.row(n + 1).isConstant(T(5)));
    Matrix<T> big_b = before;
    mixed_delta(X, bank, idx, big_b.middleRows(1, n), ws);
    require_within(big_b.middleRows(1, n), want, 2 * bound, "mixed_delta with an AdapterBank");
    for (Index t = 0; t < n; ++t)
        if (idx[std::size_t(t)] < 0) REQUIRE(big_b.row(t + 1) == before.row(t + 1));
    // update(k) re-copies one adapter: with the zeroed B, adapter 0's rows get the base alone.
    bank.update(0, copies[0]);
    mixed(X, W, bank, idx, Yb);
    for (Index t = 0; t < n; ++t) {
        const int k = idx[std::size_t(t)];
        const Matrix<T> xt = X.row(t);
        if (k == 0)
            require_within(Yb.row(t), naive_product(to_double(xt), to_double(W).transpose()), base_bound(xt, W),
                           "updated adapter");
        else
            require_within(Yb.row(t), want.row(t), bound.row(t), "other adapters after update");
    }
    bank.update(0, adapters[0]);

    // Segmented form on the rows sorted by adapter.
    std::vector<Index> perm(static_cast<std::size_t>(n));
    std::iota(perm.begin(), perm.end(), Index(0));
    std::stable_sort(perm.begin(), perm.end(),
                     [&](Index a, Index b) { return idx[std::size_t(a)] < idx[std::size_t(b)]; });
    Matrix<T> Xs(n, in);
    Matrix<double> want_s(n, out), bound_s(n, out);
    std::vector<Index> seg = {0};
    std::vector<int> seg_adapter;
    for (Index i = 0; i < n; ++i) {
        const Index t = perm[std::size_t(i)];
        Xs.row(i) = X.row(t);
        want_s.row(i) = want.row(t);
        bound_s.row(i) = bound.row(t);
        const int k = idx[std::size_t(t)];
        if (seg_adapter.empty() || seg_adapter.back() != k) {
            if (i > 0) seg.push_back(i);
            seg_adapter.push_back(k);
        }
    }
    seg.push_back(n);
    Matrix<T> Ys;
    mixed_segments(Xs, W, adapters, seg, seg_adapter, Ys);
    require_within(Ys, want_s, bound_s, "mixed_segments");
    mixed_segments(Xs, W, bank, seg, seg_adapter, Ys);
    require_within(Ys, want_s, bound_s, "mixed_segments with an AdapterBank");
}

TEST_CASE("masked and mixed backward pass the finite-difference check (double)", "[compose][gradcheck]") {
    const Index n = 8, in = 6, out = 5;
    std::vector<Lora<double>> adapters = {random_lora<double>(out, in, 2, 4, 31),
                                          random_lora<double>(out, in, 3, 2, 32),
                                          random_lora<double>(out, in, 1, 1, 33)};
    const Matrix<double> X = random_matrix<double>(n, in, 34), W = random_matrix<double>(out, in, 35),
                         dY = random_matrix<double>(n, out, 36);
    Matrix<double> M(3, n);
    for (Index t = 0; t < n; ++t) {
        M(0, t) = double(t % 2);
        M(1, t) = 0.3 * double(t) - 1.0;  // soft, every entry nonzero
        M(2, t) = t == 3 ? 1.0 : 0.0;
    }
    const std::vector<int> idx = {0, 2, -1, 1, 0, 0, 2, -1};
    const std::vector<Index> seg = {0, 3, 3, 6, 8};
    const std::vector<int> seg_adapter = {1, 0, 1, 2};  // adapter 1 in two segments

    using Forward = std::function<Matrix<double>(const Matrix<double>&, const std::vector<Lora<double>>&)>;
    auto check_all = [&](const char* what, const Forward& f, const std::vector<LoraGrad<double>>& grads,
                         const Matrix<double>& dX) {
        INFO(what);
        for (std::size_t k = 0; k < adapters.size(); ++k) {
            auto y_of_A = [&](const Matrix<double>& A) {
                auto copy = adapters;
                copy[k].A() = A;
                return f(X, copy);
            };
            auto y_of_B = [&](const Matrix<double>& B) {
                auto copy = adapters;
                copy[k].B() = B;
                return f(X, copy);
            };
            const auto rA = testing::check_vjp(y_of_A, adapters[k].A(), dY, grads[k].A);
            const auto rB = testing::check_vjp(y_of_B, adapters[k].B(), dY, grads[k].B);
            INFO("adapter " << k << ": " << rA.message() << "\n" << rB.message());
            REQUIRE(rA.ok);
            REQUIRE(rB.ok);
        }
        const auto rX = testing::check_vjp([&](const Matrix<double>& x) { return f(x, adapters); }, X,
                                           dY, dX);
        INFO(rX.message());
        REQUIRE(rX.ok);
    };

    SECTION("masked") {
        std::vector<LoraGrad<double>> grads, grads2;
        Matrix<double> dX;
        masked_backward(X, W, adapters, M, dY, grads, dX);
        masked_backward(X, W, adapters, M, dY, grads2);
        REQUIRE(grads2[1].A == grads[1].A);
        check_all("masked", [&](const Matrix<double>& x, const std::vector<Lora<double>>& a) {
            Matrix<double> Y;
            masked_forward(x, W, a, M, Y);
            return Y;
        }, grads, dX);
        // The expression path is the same function.
        check_all("masked expression", [&](const Matrix<double>& x, const std::vector<Lora<double>>& a) {
            return Matrix<double>(linear(x, W + a[0].masked(M.row(0)) + a[1].masked(M.row(1)) +
                                                a[2].masked(M.row(2))));
        }, grads, dX);
    }
    SECTION("mixed") {
        std::vector<LoraGrad<double>> grads, grads2;
        Matrix<double> dX;
        mixed_backward(X, W, adapters, idx, dY, grads, dX);
        mixed_backward(X, W, adapters, idx, dY, grads2);
        REQUIRE(grads2[2].B == grads[2].B);
        check_all("mixed", [&](const Matrix<double>& x, const std::vector<Lora<double>>& a) {
            Matrix<double> Y;
            mixed(x, W, a, idx, Y);
            return Y;
        }, grads, dX);
    }
    SECTION("segments") {
        std::vector<LoraGrad<double>> grads;
        Matrix<double> dX;
        mixed_segments_backward(X, W, adapters, seg, seg_adapter, dY, grads, dX);
        check_all("segments", [&](const Matrix<double>& x, const std::vector<Lora<double>>& a) {
            Matrix<double> Y;
            mixed_segments(x, W, a, seg, seg_adapter, Y);
            return Y;
        }, grads, dX);
    }
}

TEST_CASE("TARA's alignment loss and its gradient", "[compose][align]") {
    const Index n = 9, in = 7, out = 6, r = 3;
    Lora<double> lora = random_lora<double>(out, in, r, 6, 41);
    const Matrix<double> X = random_matrix<double>(n, in, 42), W = random_matrix<double>(out, in, 43);
    const std::vector<Index> rare = {3, 4}, cls = {5};
    Vector<double> mask = Vector<double>::Zero(n);
    mask(3) = mask(4) = 1.0;

    // The definition: K_total with the masked adapter, K_base without, mean |difference|.
    auto reference = [&](const Lora<double>& l) {
        const Matrix<double> base = naive_product(X, W.transpose());
        const Matrix<double> delta =
            l.scale() * naive_product(naive_product(X, l.A().transpose()), l.B().transpose());
        double total = 0, smallest = 1e300;
        for (const Index t : rare)
            for (Index c = 0; c < out; ++c) {
                const double res = base(t, c) + mask(t) * delta(t, c) - base(cls[0], c);
                total += std::abs(res);
                smallest = std::min(smallest, std::abs(res));
            }
        return std::pair{total / double(rare.size() * out), smallest};
    };
    LoraGrad<double> grad;
    const double L = alignment_loss(X, W, lora, mask, rare, cls, &grad);
    const auto [want, smallest] = reference(lora);
    REQUIRE(std::abs(L - want) <= 64 * eps<double>() * (1 + want) * double(in + r));
    REQUIRE(smallest > 1e-3);  // away from the kinks, so finite differences see the gradient
    REQUIRE(alignment_loss(X, W, lora, mask, rare, cls) == L);

    auto loss_of_A = [&](const Matrix<double>& A) {
        Lora<double> l = lora;
        l.A() = A;
        return alignment_loss(X, W, l, mask, rare, cls);
    };
    auto loss_of_B = [&](const Matrix<double>& B) {
        Lora<double> l = lora;
        l.B() = B;
        return alignment_loss(X, W, l, mask, rare, cls);
    };
    const auto rA = testing::check_gradient(loss_of_A, lora.A(), grad.A);
    const auto rB = testing::check_gradient(loss_of_B, lora.B(), grad.B);
    INFO(rA.message() << "\n" << rB.message());
    REQUIRE(rA.ok);
    REQUIRE(rB.ok);

    // Pairing element-wise with as many class positions; a zero mask leaves only the base gap,
    // whose gradient is zero.
    const std::vector<Index> cls2 = {5, 6};
    const double L2 = alignment_loss(X, W, lora, mask, rare, cls2, &grad);
    const Matrix<double> base = naive_product(X, W.transpose());
    const Matrix<double> delta = lora.scale() * naive_product(naive_product(X, lora.A().transpose()),
                                                              lora.B().transpose());
    double total = 0;
    for (std::size_t i = 0; i < 2; ++i)
        for (Index c = 0; c < out; ++c)
            total += std::abs(base(rare[i], c) + delta(rare[i], c) - base(cls2[i], c));
    REQUIRE(std::abs(L2 - total / double(2 * out)) <= 64 * eps<double>() * (1 + L2) * double(in + r));
    const Vector<double> zero = Vector<double>::Zero(n);
    (void)alignment_loss(X, W, lora, zero, rare, cls, &grad);
    REQUIRE(grad.A.isZero(0));
    REQUIRE(grad.B.isZero(0));
}

TEST_CASE("bad input raises lowrank::error and writes nothing", "[compose][errors]") {
    using Catch::Contains;
    const Index n = 4, in = 5, out = 6;
    const Lora<float> a = random_lora<float>(out, in, 2, 2, 51), b = random_lora<float>(out, in, 3, 2, 52);
    const Lora<float> wrong = random_lora<float>(out, in + 1, 2, 2, 53);
    const Matrix<float> X = random_matrix<float>(n, in, 54), W = random_matrix<float>(out, in, 55);
    const std::vector<const Lora<float>*> bank = {&a, &b};
    Matrix<float> Y = Matrix<float>::Constant(n, out, 3.f);
    auto untouched = [&] { REQUIRE(Y.isConstant(3.f)); };

    SECTION("mask length differs from n") {
        const Vector<float> m = Vector<float>::Ones(n + 1);
        REQUIRE_THROWS_WITH(Y = linear(X, W + a.masked(m)),
                            Contains("lowrank::linear") && Contains("mask has length 5") &&
                                Contains("input has 4 rows"));
        const Matrix<float> M = Matrix<float>::Ones(2, n + 1);
        REQUIRE_THROWS_WITH(masked_forward(X, W, bank, M, Y),
                            Contains("lowrank::masked_forward") && Contains("masks is 2 x 5") &&
                                Contains("expected 2 x 4"));
        REQUIRE_THROWS_WITH(masked_delta(X, bank, Matrix<float>::Ones(3, n).eval(), Y),
                            Contains("lowrank::masked_delta") && Contains("masks is 3 x 4"));
        untouched();
    }
    SECTION("non-finite or non-vector masks") {
        Vector<float> m = Vector<float>::Ones(n);
        m(2) = NAN;
        REQUIRE_THROWS_WITH(Y = linear(X, W + a.masked(m)), Contains("mask entry 2 must be finite"));
        const Matrix<float> M2 = Matrix<float>::Ones(2, n);
        REQUIRE_THROWS_WITH(a.masked(M2), Contains("lowrank::masked") && Contains("must be a vector") &&
                                              Contains("2 x 4"));
        untouched();
    }
    SECTION("adapter index out of range") {
        const std::vector<int> idx = {0, 1, 2, -1};
        REQUIRE_THROWS_WITH(mixed(X, W, bank, idx, Y),
                            Contains("lowrank::mixed") && Contains("idx[2] = 2 is out of range [-1, 2)"));
        const std::vector<int> neg = {0, -2, 1, 1};
        REQUIRE_THROWS_WITH(mixed_delta(X, bank, neg, Y), Contains("idx[1] = -2"));
        const std::vector<int> short_idx = {0, 1};
        REQUIRE_THROWS_WITH(mixed(X, W, bank, short_idx, Y),
                            Contains("idx has 2 entries") && Contains("(4)"));
        std::vector<LoraGrad<float>> g;
        Matrix<float> dX = Matrix<float>::Constant(n, in, 3.f);
        REQUIRE_THROWS_WITH(mixed_backward(X, W, bank, idx, Y, g, dX), Contains("lowrank::mixed_backward"));
        REQUIRE(dX.isConstant(3.f));
        REQUIRE(g.empty());
        untouched();
    }
    SECTION("segments that do not cover the batch") {
        const std::vector<Index> seg = {0, 2, 3};
        const std::vector<int> sa = {0, 1};
        REQUIRE_THROWS_WITH(mixed_segments(X, W, bank, seg, sa, Y),
                            Contains("lowrank::mixed_segments") && Contains("from 0 to the 4 rows"));
        const std::vector<Index> bad = {0, 3, 2, 4}, seg4 = {0, 2, 4};
        REQUIRE_THROWS_WITH(mixed_segments(X, W, bank, bad, std::vector<int>{0, 1, 0}, Y),
                            Contains("nondecreasing"));
        REQUIRE_THROWS_WITH(mixed_segments(X, W, bank, seg4, std::vector<int>{0, 5}, Y),
                            Contains("segment_adapter[1] = 5"));
        untouched();
    }
    SECTION("adapters whose shapes disagree with W") {
        const std::vector<const Lora<float>*> mixed_bank = {&a, &wrong};
        const std::vector<int> idx = {0, 0, 1, -1};
        REQUIRE_THROWS_WITH(mixed(X, W, mixed_bank, idx, Y),
                            Contains("lowrank::mixed") && Contains("adapter 1 is for a 6 x 6 weight") &&
                                Contains("W is 6 x 5"));
        REQUIRE_THROWS_WITH(masked_forward(X, W, mixed_bank, Matrix<float>::Ones(2, n).eval(), Y),
                            Contains("lowrank::masked_forward") && Contains("adapter 1"));
        const Vector<float> ones = Vector<float>::Ones(n);
        REQUIRE_THROWS_WITH(Y = linear(X, W + wrong.masked(ones)), Contains("lowrank::linear"));
        const std::vector<const Lora<float>*> with_null = {&a, nullptr};
        REQUIRE_THROWS_WITH(mixed(X, W, with_null, idx, Y), Contains("adapter 1 is a null pointer"));
        // Banks: adapters that disagree with each other, or a bank that disagrees with W.
        REQUIRE_THROWS_WITH(AdapterBank<float>(mixed_bank),
                            Contains("lowrank::AdapterBank") && Contains("adapter 1 is for a 6 x 6 weight"));
        REQUIRE_THROWS_WITH(AdapterBank<float>(with_null), Contains("adapter 1 is a null pointer"));
        const std::vector<const Lora<float>*> only_wrong = {&wrong};
        const AdapterBank<float> wrong_bank(only_wrong);
        REQUIRE_THROWS_WITH(mixed(X, W, wrong_bank, std::vector<int>{0, 0, -1, -1}, Y),
                            Contains("lowrank::mixed") && Contains("bank holds adapters for a 6 x 6 weight") &&
                                Contains("W is 6 x 5"));
        AdapterBank<float> good(bank);
        REQUIRE_THROWS_WITH(good.update(2, a), Contains("adapter 2 is out of range for a bank of 2"));
        REQUIRE_THROWS_WITH(good.update(0, wrong), Contains("AdapterBank::update") && Contains("6 x 6"));
        untouched();
    }
    SECTION("alignment loss arguments") {
        const Vector<float> m = Vector<float>::Ones(n);
        const std::vector<Index> rare = {1, 2}, cls = {3, 0, 1}, outside = {1, 4}, none;
        REQUIRE_THROWS_WITH(alignment_loss(X, W, a, m, rare, cls),
                            Contains("lowrank::alignment_loss") && Contains("3 class positions for 2"));
        REQUIRE_THROWS_WITH(alignment_loss(X, W, a, m, outside, rare), Contains("rare position 4 is outside [0, 4)"));
        REQUIRE_THROWS_WITH(alignment_loss(X, W, a, m, none, cls), Contains("no rare positions"));
        REQUIRE_THROWS_WITH(alignment_loss(X, W, a, Vector<float>::Ones(3).eval(), rare, rare),
                            Contains("mask has length 3"));
    }
}

#ifdef LOWRANK_TEST_COUNT_ALLOCATIONS
TEMPLATE_TEST_CASE("mixed and mixed_segments with a MixedWorkspace allocate nothing in steady state",
                   "[compose][mixed][workspace]", float, double) {
    using T = TestType;
    // 5 rows: the base product's aligned copy of X; 40 rows: the packed GEMM's blocks.
    const Index n = GENERATE(5, 40), out = 70, in = 50;
    CAPTURE(n);
    const Lora<T> a = random_lora<T>(out, in, 4, 8, 41), b = random_lora<T>(out, in, 3, 6, 42);
    const Matrix<T> X = random_matrix<T>(n, in, 43), W = random_matrix<T>(out, in, 44);
    const std::vector<const Lora<T>*> adapters{&a, &b};
    std::vector<int> idx(static_cast<std::size_t>(n)), seg_ids{1, 0};
    const std::vector<Index> seg{0, n / 2, n};
    for (Index t = 0; t < n; ++t) idx[std::size_t(t)] = int(t % 3) - 1;  // none, a, b
    Matrix<T> Y(n, out), Ys(n, out);
    MixedWorkspace<T> ws;
    auto step = [&] {
        mixed(X, W, adapters, idx, Y, ws);
        mixed_segments(X, W, adapters, seg, seg_ids, Ys, ws);
    };
    step();  // the workspace grows here
    const Matrix<T> Y1 = Y, Ys1 = Ys;
    REQUIRE(allocations_in(step) == 0);
    REQUIRE(Y == Y1);
    REQUIRE(Ys == Ys1);
}
#endif
