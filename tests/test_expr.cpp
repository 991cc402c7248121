// SPDX-License-Identifier: Apache-2.0
// Expression types: results equal the free functions, sums of weighted adapters, dense merges,
// workspaces, user-defined terms, and the lifetime rules (checked at compile time).

#include <lowrank/expr/expr.hpp>
#include <lowrank/lora.hpp>

#include "lora_support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::max_abs;
using lowrank::test::naive_product;
using lowrank::test::random_lora;
using lowrank::test::random_matrix;
using lowrank::test::to_double;

namespace {

template <class T>
Lora<T> make_lora() {
    return Lora<T>(4, 4, {.rank = 1});
}

/// A user-defined term outside the library: φ(T) = −T, i.e. ΔW = −U V. The evaluator needs no
/// change to run it.
template <class T>
struct NegatedProduct {
    using scalar = T;
    static constexpr bool stored_by_value = false;
    Matrix<T> U, V;
    Index in_features() const { return V.cols(); }
    Index out_features() const { return U.rows(); }
    Index width() const { return V.rows(); }
    MatrixView<const T> shrink_factor() const { return view(V); }
    MatrixView<const T> expand_factor() const { return view(U); }
    void transform(MatrixView<T> t, Index) const {
        for (Index i = 0; i < t.rows; ++i)
            for (Index j = 0; j < t.cols; ++j) t(i, j) = -t(i, j);
    }
    void validate(const char* fn, Index, Index in, Index out) const {
        if (in != in_features() || out != out_features()) detail::fail(fn, ": bad NegatedProduct");
    }
    void merge_into(MatrixView<T> w, T alpha) const { core::rank_update<T>(w, view(U), view(V), -alpha); }
};

template <class L, class R>
concept Addable = requires(L&& l, R&& r) { std::forward<L>(l) + std::forward<R>(r); };
template <class S, class R>
concept Scalable = requires(S s, R&& r) { s * std::forward<R>(r); };

}  // namespace

// Lifetime rules, at compile time: expressions never hold a temporary owning object.
static_assert(Addable<const Matrix<float>&, const Lora<float>&>, "W + lora builds an expression");
static_assert(!Addable<const Matrix<float>&, Lora<float>&&>, "W + make_lora() must not compile");
static_assert(!Addable<Matrix<float>&&, const Lora<float>&>, "make_W() + lora must not compile");
static_assert(!Scalable<double, Lora<float>&&>, "2 * make_lora() must not compile");
static_assert(Scalable<double, const Lora<float>&>, "2 * lora builds a weighted term");
static_assert(!Addable<const Matrix<double>&, const Lora<float>&>,
              "mixing float and double does not compile");
static_assert(Addable<Eigen::Map<const Matrix<float>>, const Lora<float>&>,
              "a Map of live memory may be a temporary");
static_assert(LowRankTerm<Lora<float>> && MergeableTerm<Lora<double>>, "Lora is a core term");
static_assert(Addable<const PackedWeight<float>&, const Lora<float>&>, "a PackedWeight is a base");
static_assert(!Addable<PackedWeight<float>, const Lora<float>&>, "a temporary PackedWeight would dangle");

TEMPLATE_TEST_CASE("linear(X, W + lora) equals forward, and sums of weighted adapters their sum",
                   "[expr]", float, double) {
    using T = TestType;
    const Index n = GENERATE(0, 1, 17), out = 23, in = 19;
    const Lora<T> l1 = random_lora<T>(out, in, 4, 8, 1), l2 = random_lora<T>(out, in, 2, 3, 2),
                  l3 = random_lora<T>(out, in, 7, 1, 3);
    const Matrix<T> X = random_matrix<T>(n, in, 4), W = random_matrix<T>(out, in, 5);

    Matrix<T> Yf;
    forward(X, W, l1, Yf);
    const Matrix<T> Ye = linear(X, W + l1);
    REQUIRE(Ye == Yf);  // the same kernels in the same order: bit-identical

    const Matrix<T> Ysum = linear(X, W + l1 + 0.5 * l2 + l3 * -2);
    auto delta = [&](const Lora<T>& l) {
        return Matrix<double>(double(l.scale()) *
                              naive_product(naive_product(to_double(X), to_double(l.A()).transpose()),
                                            to_double(l.B()).transpose()));
    };
    const Matrix<double> want = naive_product(to_double(X), to_double(W).transpose()) + delta(l1) +
                                0.5 * delta(l2) - 2 * delta(l3);
    const double scale_of_terms = 1 + max_abs(want);
    REQUIRE(max_abs(to_double(Ysum) - want) <= 16 * eps<T>() * in * scale_of_terms);

    // Into a Map over a host buffer.
    std::vector<T> host(std::size_t(n * out));
    Eigen::Map<Matrix<T>> Ym(host.data(), n, out);
    Ym = linear(X, W + l1 + 0.5 * l2 + l3 * -2);
    REQUIRE(Matrix<T>(Ym) == Ysum);
}

TEMPLATE_TEST_CASE("a PackedWeight base gives the row-major W's product", "[expr][packed]", float, double) {
    using T = TestType;
    // out = 37 and 300 (one block of outputs per thread, or several); n from one row (the GEMV)
    // through the stream kernel's batches to gemm_packed's (70 rows: past stream_max_rows on AVX2).
    const Index n = GENERATE(0, 1, 5, 33, 70), out = GENERATE(37, 300), in = 29;
    const int threads = GENERATE(1, 2);
    CAPTURE(n, out, threads);
    const Lora<T> l1 = random_lora<T>(out, in, 4, 8, 11), l2 = random_lora<T>(out, in, 2, 3, 12);
    const Matrix<T> X = random_matrix<T>(n, in, 13), W = random_matrix<T>(out, in, 14);
    const PackedWeight<T> packed(W);
    REQUIRE(packed.rows() == out);
    REQUIRE(packed.cols() == in);
    Workspace<T> ws;
    const Matrix<T> Yp = linear(X, packed + l1 + 0.5 * l2, ws, Threads{threads});
    const Matrix<double> want = naive_product(to_double(X), to_double(W).transpose()) +
                                double(l1.scale()) * naive_product(naive_product(to_double(X), to_double(l1.A()).transpose()),
                                                                   to_double(l1.B()).transpose()) +
                                0.5 * double(l2.scale()) * naive_product(naive_product(to_double(X), to_double(l2.A()).transpose()),
                                                                         to_double(l2.B()).transpose());
    REQUIRE(Yp.rows() == n);
    REQUIRE(Yp.cols() == out);
    REQUIRE(max_abs(to_double(Yp) - want) <= 16 * eps<T>() * in * (1 + max_abs(want)));
    const Matrix<T> Yd = linear(X, W + l1 + 0.5 * l2);
    REQUIRE(max_abs(to_double(Yp) - to_double(Yd)) <= 32 * eps<T>() * in * (1 + max_abs(want)));

    // X's width is checked against the packed W.
    const Matrix<T> bad = random_matrix<T>(3, in + 1, 15);
    REQUIRE_THROWS_AS(Matrix<T>(linear(bad, packed + l1)), lowrank::error);
    // dense(packed + …) is the merged weight, into a new matrix (the copy itself is const).
    const Matrix<T> merged = dense(packed + l1 + 0.5 * l2);
    const Matrix<double> merged_want = to_double(W) + double(l1.scale()) * naive_product(to_double(l1.B()), to_double(l1.A())) +
                                       0.5 * double(l2.scale()) * naive_product(to_double(l2.B()), to_double(l2.A()));
    REQUIRE(max_abs(to_double(merged) - merged_want) <= 16 * eps<T>() * (1 + max_abs(merged_want)));
    REQUIRE(merged == Matrix<T>(dense(W + l1 + 0.5 * l2)));
}

TEMPLATE_TEST_CASE("a PackedWeight copies W from any layout to the same row-major values", "[expr][packed]",
                   float, double) {
    using T = TestType;
    const Index n = 7, out = 19, in = 23;
    const Lora<T> l1 = random_lora<T>(out, in, 3, 6, 21);
    const Matrix<T> X = random_matrix<T>(n, in, 22), W = random_matrix<T>(out, in, 23);
    const PackedWeight<T> from_rows(W);
    const auto copy = from_rows.view();
    REQUIRE(copy.rows == out);
    REQUIRE(copy.cols == in);
    REQUIRE(copy.ld == in);
    REQUIRE(copy.data != W.data());
    for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j) REQUIRE(copy(i, j) == W(i, j));
    const Matrix<T> want = linear(X, from_rows + l1);
    // Column-major storage, a block of a larger matrix (strided rows), and expressions without
    // memory of their own (evaluated first): the same values, so exactly the same product.
    const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> Wc = W;
    Matrix<T> big = Matrix<T>::Zero(out + 3, in + 5);
    big.block(2, 4, out, in) = W;
    const Matrix<T> half = W / T(2);
    const PackedWeight<T> from_cols(Wc), from_block(big.block(2, 4, out, in)), from_expr(half * T(2)),
        from_transposed(Wc.transpose().transpose());
    REQUIRE(Matrix<T>(linear(X, from_cols + l1)) == want);
    REQUIRE(Matrix<T>(linear(X, from_block + l1)) == want);
    REQUIRE(Matrix<T>(linear(X, from_expr + l1)) == want);
    REQUIRE(Matrix<T>(linear(X, from_transposed + l1)) == want);
    // A packed W of the wrong width is caught.
    const PackedWeight<T> wide(Matrix<T>(random_matrix<T>(out, in + 1, 24)));
    REQUIRE_THROWS_AS(Matrix<T>(linear(X, wide + l1)), lowrank::error);
}

TEMPLATE_TEST_CASE("dense(W + terms) is the merged weight", "[expr]", float, double) {
    using T = TestType;
    const Index out = 21, in = 18;
    const Lora<T> l1 = random_lora<T>(out, in, 3, 6, 7), l2 = random_lora<T>(out, in, 5, 2, 8);
    const Matrix<T> W = random_matrix<T>(out, in, 9);
    const Matrix<T> Wd = dense(W + l1 + 0.25 * l2);
    Matrix<T> Wm = W;
    merge(Wm, l1);
    merge(Wm, l2, T(0.25));
    REQUIRE(Wd == Wm);

    // In place: dense(W + lora) assigned to W itself is a merge.
    Matrix<T> Wi = W;
    Wi = dense(Wi + l1);
    Matrix<T> Wj = W;
    merge(Wj, l1);
    REQUIRE(Wi == Wj);

    // Linear in the weight: dense(W + 2·l) − W = 2 (dense(W + l) − W) up to rounding.
    const Matrix<T> W2 = dense(W + 2 * l1), W1 = dense(W + l1);
    const Matrix<double> d2 = to_double(W2) - to_double(W), d1 = to_double(W1) - to_double(W);
    REQUIRE((d2 - 2 * d1).cwiseAbs().maxCoeff() <= 8 * eps<T>() * (1 + to_double(W).cwiseAbs().maxCoeff() + d2.cwiseAbs().maxCoeff()));
}

TEMPLATE_TEST_CASE("a user-defined term plugs into expressions", "[expr]", float, double) {
    using T = TestType;
    const Index n = 9, out = 12, in = 10;
    NegatedProduct<T> neg{random_matrix<T>(out, 3, 1), random_matrix<T>(3, in, 2)};
    const Lora<T> lora = random_lora<T>(out, in, 2, 2, 3);
    const Matrix<T> X = random_matrix<T>(n, in, 4), W = random_matrix<T>(out, in, 5);
    const Matrix<T> Y = linear(X, W + neg + lora);
    const Matrix<double> want =
        naive_product(to_double(X), to_double(W).transpose()) -
        naive_product(naive_product(to_double(X), to_double(neg.V).transpose()), to_double(neg.U).transpose()) +
        double(lora.scale()) *
            naive_product(naive_product(to_double(X), to_double(lora.A()).transpose()), to_double(lora.B()).transpose());
    REQUIRE((to_double(Y) - want).cwiseAbs().maxCoeff() <= 16 * eps<T>() * in * (1 + want.cwiseAbs().maxCoeff()));
    const Matrix<T> Wd = dense(W + neg);
    REQUIRE((to_double(Wd) - (to_double(W) - to_double(neg.U) * to_double(neg.V))).cwiseAbs().maxCoeff() <=
            16 * eps<T>());
}

TEST_CASE("a supplied workspace stops allocating after the first call", "[expr]") {
    const Index n = 32, out = 40, in = 30;
    const Lora<float> l1 = random_lora<float>(out, in, 4, 8, 1), l2 = random_lora<float>(out, in, 6, 8, 2);
    const Matrix<float> X = random_matrix<float>(n, in, 3), W = random_matrix<float>(out, in, 4);
    Workspace<float> ws;
    Matrix<float> Y(n, out);
    Y = linear(X, W + l1 + l2, ws);
    const auto cap = ws.capacity();
    REQUIRE(cap >= std::size_t(n * 10));
    const float* before = Y.data();
    for (int i = 0; i < 3; ++i) Y = linear(X, W + l1 + l2, ws);
    REQUIRE(ws.capacity() == cap);
    REQUIRE(Y.data() == before);  // the destination is written in place, not reallocated
    const Matrix<float> Ynows = linear(X, W + l1 + l2);
    REQUIRE(Ynows == Y);
}

TEST_CASE("expressions validate their terms against X and W", "[expr][errors]") {
    using Catch::Contains;
    const Lora<float> lora(8, 6, {.rank = 2});
    const Matrix<float> W(8, 6), Wbad(8, 7), X(4, 6), Xbad(4, 5);
    REQUIRE_THROWS_WITH(Matrix<float>(linear(Xbad, W + lora)),
                        Contains("lowrank::linear") && Contains("X is 4 x 5"));
    REQUIRE_THROWS_WITH(Matrix<float>(linear(Matrix<float>(4, 7), Wbad + lora)),
                        Contains("lowrank::linear") && Contains("applied to a 8 x 7 weight"));
    REQUIRE_THROWS_WITH(Matrix<float>(dense(Wbad + lora)), Contains("lowrank::dense"));
    REQUIRE_THROWS_WITH(Matrix<float>(linear(X, W + lora * NAN)), Contains("term weight must be finite"));
    Matrix<float> Ywrong = Matrix<float>::Zero(8, 8);
    REQUIRE_THROWS_WITH(Ywrong.topRows(3) = linear(X, W + lora), Contains("Y is 3 x 8"));
}

namespace {
/// A per-token term: φ multiplies row t of the batch by (t + 1), so a wrong row offset in a
/// split batch changes the result.
template <class T>
struct RowNumbered {
    using scalar = T;
    static constexpr bool stored_by_value = false;
    Matrix<T> U, V;
    Index in_features() const { return V.cols(); }
    Index out_features() const { return U.rows(); }
    Index width() const { return V.rows(); }
    MatrixView<const T> shrink_factor() const { return view(V); }
    MatrixView<const T> expand_factor() const { return view(U); }
    void transform(MatrixView<T> t, Index row0) const {
        for (Index i = 0; i < t.rows; ++i)
            for (Index j = 0; j < t.cols; ++j) t(i, j) *= T(row0 + i + 1);
    }
    void validate(const char*, Index, Index, Index) const {}
};
}  // namespace

TEMPLATE_TEST_CASE("threads: split batches give the single-thread result", "[expr][threads]", float,
                   double) {
    using T = TestType;
    const Index n = GENERATE(1, 5, 32, 33, 150), out = 300, in = 70;
    const int threads = GENERATE(2, 3);
    CAPTURE(n, threads);
    const Lora<T> lora = random_lora<T>(out, in, 6, 8, 1);
    const RowNumbered<T> numbered{random_matrix<T>(out, 3, 2), random_matrix<T>(3, in, 3)};
    const Matrix<T> X = random_matrix<T>(n, in, 4), W = random_matrix<T>(out, in, 5);
    Workspace<T> ws;
    const Matrix<T> one = linear(X, W + lora + numbered, ws);
    const Matrix<T> many = linear(X, W + lora + numbered, ws, Threads{threads});
    // Splitting output features keeps every kernel decision (bit-identical); splitting rows may
    // pick other kernels for the smaller blocks, so it agrees to rounding.
    const double tol = 16 * eps<T>() * in * (1 + n) * (1 + max_abs(to_double(one)));
    REQUIRE(max_abs(to_double(many) - to_double(one)) <= tol);
    if (n <= core::blocking::stream_weight_rows) REQUIRE(many == one);

    Matrix<T> Y1 = random_matrix<T>(n, out, 6), Y2 = Y1;
    add_delta(X, lora, Y1, ws);
    add_delta(X, lora, Y2, ws, Threads{threads});
    REQUIRE(max_abs(to_double(Y2) - to_double(Y1)) <= tol);

    Matrix<T> F1, F2;
    forward(X, W, lora, F1, ws);
    forward(X, W, lora, F2, ws, Threads{threads});
    REQUIRE(max_abs(to_double(F2) - to_double(F1)) <= tol);

    Matrix<T> W1 = W, W2 = W;
    merge(W1, lora, T(0.5));
    merge(W2, lora, T(0.5), Threads{threads});
    REQUIRE(W1 == W2);  // bands of rows, same arithmetic per element
    unmerge(W2, lora, T(0.5), Threads{threads});
    unmerge(W1, lora, T(0.5));
    REQUIRE(W1 == W2);
}

TEST_CASE("parallel_for covers the range once and rethrows a chunk's exception", "[threads]") {
    std::vector<int> hits(1000, 0);
    core::parallel_for(Threads{4}, 1000, 10, 8, [&](Index b, Index e) {
        for (Index i = b; i < e; ++i) ++hits[std::size_t(i)];
    });
    REQUIRE(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
    REQUIRE_THROWS_AS(core::parallel_for(Threads{2}, 100, 10, 1,
                                         [](Index b, Index) {
                                             if (b == 0) throw lowrank::error("chunk 0");
                                         }),
                      lowrank::error);
}
