// SPDX-License-Identifier: Apache-2.0
// LoRA: initialisation, forward, adapter-only delta, backward, merge / unmerge, against dense
// double-precision formulas and finite differences; and every bad argument.

#include <lowrank/expr/expr.hpp>
#include <lowrank/lora.hpp>
#include <lowrank/testing/gradcheck.hpp>

#include "alloc_count.hpp"
#include "lora_support.hpp"

#include <vector>


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

/// The exact delta s (X Aᵀ) Bᵀ and a bound on its computed error: the shrink's error γ_in |X||A|ᵀ
/// propagates through |B| and adds to the expand's own γ_r |T||B|ᵀ.
template <class T>
std::pair<Matrix<double>, Matrix<double>> exact_delta(const Matrix<T>& X, const Lora<T>& lora) {
    const Matrix<double> x = to_double(X), a = to_double(lora.A()), b = to_double(lora.B());
    const double s = double(lora.scale());
    const Matrix<double> t = naive_product(x, a.transpose());
    const Matrix<double> delta = s * naive_product(t, b.transpose());
    const Matrix<double> t_err = product_bound(x.cwiseAbs(), a.transpose().cwiseAbs(), eps<T>());
    const Matrix<double> abs_t = t.cwiseAbs() + t_err;
    Matrix<double> bound = std::abs(s) * (naive_product(t_err, b.transpose().cwiseAbs()) +
                                          product_bound(abs_t, b.transpose().cwiseAbs(), eps<T>()));
    bound.array() += 3 * eps<T>() * delta.cwiseAbs().array();  // the scale's rounding
    return {delta, bound};
}

}  // namespace

TEST_CASE("the random stream is the specified xoshiro256** seeded by SplitMix64", "[lora][init]") {
    // Reference values from an independent Python implementation of both published algorithms.
    Random rng(42);
    REQUIRE(rng.next() == 0x15780b2e0c2ec716ULL);
    REQUIRE(rng.next() == 0x6104d9866d113a7eULL);
    REQUIRE(rng.next() == 0xae17533239e499a1ULL);
    Random u(0);
    REQUIRE(u.uniform() == 0.6012629994179048);
    REQUIRE(u.uniform() == 0.7477740925472398);
}

TEMPLATE_TEST_CASE("PEFT initialisations: shapes, scale, distribution, reproducibility",
                   "[lora][init]", float, double) {
    using T = TestType;
    SECTION("default: A ~ U(±1/√in), B = 0, s = alpha / r; values fixed by the seed") {
        Lora<T> lora(3, 4, {.rank = 2, .alpha = 16, .seed = 7});
        REQUIRE(lora.rank() == 2);
        REQUIRE(lora.A().rows() == 2);
        REQUIRE(lora.A().cols() == 4);
        REQUIRE(lora.B().rows() == 3);
        REQUIRE(lora.B().cols() == 2);
        REQUIRE(lora.B().isZero(0));
        REQUIRE(lora.scale() == T(8));
        // First values of stream 7 mapped to U(−1/2, 1/2), computed independently in Python.
        const double want[] = {0.2005764821796896, -0.22124877052621572, 0.3396274618764198,
                               0.4810977250149351, 0.49086027883306826, 0.372773938745132,
                               -0.43924792050718386, -0.3955642107571884};
        for (int i = 0; i < 8; ++i) REQUIRE(lora.A()(i / 4, i % 4) == T(want[i]));
    }
    SECTION("rsLoRA scale alpha / √r") {
        Lora<T> lora(64, 64, {.rank = 16, .alpha = 8, .rslora = true});
        REQUIRE(lora.scale() == T(2));
    }
    SECTION("Kaiming-uniform moments over many draws") {
        const Index in = 400, r = 50;
        Lora<T> lora(60, in, {.rank = r, .seed = 3});
        const double bound = 1 / std::sqrt(double(in));
        const Matrix<double> a = to_double(lora.A());
        REQUIRE(a.cwiseAbs().maxCoeff() <= bound);
        const double n = double(a.size()), var = bound * bound / 3;
        // Mean and variance within 5 standard errors of U(−b, b)'s (a fixed seed: deterministic).
        REQUIRE(std::abs(a.mean()) <= 5 * std::sqrt(var / n));
        const double sample_var = (a.array() - a.mean()).square().sum() / (n - 1);
        REQUIRE(std::abs(sample_var - var) <= 5 * std::sqrt(bound * bound * bound * bound / 45 * 4 / n));
    }
    SECTION("gaussian: A ~ N(0, 1/r²)") {
        const Index in = 500, r = 40;
        Lora<T> lora(50, in, {.rank = r, .init = LoraInit::gaussian, .seed = 11});
        const Matrix<double> a = to_double(lora.A());
        const double n = double(a.size()), sigma = 1.0 / r;
        REQUIRE(std::abs(a.mean()) <= 5 * sigma / std::sqrt(n));
        const double sample_var = (a.array() - a.mean()).square().sum() / (n - 1);
        REQUIRE(std::abs(sample_var / (sigma * sigma) - 1) <= 5 * std::sqrt(2 / n));
        REQUIRE(lora.B().isZero(0));
    }
    SECTION("same seed, same factors; another seed, other factors") {
        Lora<T> a(20, 30, {.rank = 4, .seed = 5}), b(20, 30, {.rank = 4, .seed = 5}),
            c(20, 30, {.rank = 4, .seed = 6});
        REQUIRE(a.A() == b.A());
        REQUIRE(a.A() != c.A());
    }
}

TEMPLATE_TEST_CASE("forward and add_delta equal the dense formula", "[lora][forward]", float,
                   double) {
    using T = TestType;
    const Index n = GENERATE(0, 1, 7, 40);
    const auto [out, in] = GENERATE(std::pair<Index, Index>{1, 1}, std::pair<Index, Index>{9, 17},
                                    std::pair<Index, Index>{33, 20});
    const Index r = GENERATE(1, 2, 8);
    if (r > std::min(in, out)) return;
    CAPTURE(n, out, in, r);
    const Lora<T> lora = random_lora<T>(out, in, r, 16, false, 1);
    const Matrix<T> X = random_matrix<T>(n, in, 2), W = random_matrix<T>(out, in, 3);
    const auto [delta, delta_bound] = exact_delta(X, lora);
    const Matrix<double> base = naive_product(to_double(X), to_double(W).transpose());
    const Matrix<double> base_bound =
        product_bound(to_double(X).cwiseAbs(), to_double(W).transpose().cwiseAbs(), eps<T>());

    Matrix<T> Y;
    forward(X, W, lora, Y);
    require_within(Y, base + delta, base_bound + delta_bound + 2 * eps<T>() * (base + delta).cwiseAbs(),
                   "forward");

    Matrix<T> Yd = random_matrix<T>(n, out, 4);
    const Matrix<double> Y0 = to_double(Yd);
    add_delta(X, lora, Yd);
    require_within(Yd, Y0 + delta, delta_bound + 2 * eps<T>() * (Y0 + delta).cwiseAbs(),
                   "add_delta");
}

TEMPLATE_TEST_CASE("forward into row blocks and host buffers; separate adapter input",
                   "[lora][forward]", float, double) {
    using T = TestType;
    const Index n = 6, out = 11, in = 13, r = 3;
    const Lora<T> lora = random_lora<T>(out, in, r, 6, true, 9);
    const Matrix<T> X = random_matrix<T>(n, in, 1), W = random_matrix<T>(out, in, 2);
    Matrix<T> Yfull;
    forward(X, W, lora, Yfull);

    // Rows 2..4 of X into rows 1..3 of a larger output buffer (explicit leading dimension).
    std::vector<T> host(8 * 20, T(-7));
    Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> big(host.data(), 8, out, Eigen::OuterStride<>(20));
    forward(X.middleRows(2, 3), W, lora, big.middleRows(1, 3));
    // Same rows, same kernels, a plain destination: bit-identical. (The full 6-row call may pick
    // other kernels — they depend on the row count — so it agrees only to rounding.)
    Matrix<T> Ysub;
    forward(Matrix<T>(X.middleRows(2, 3)), W, lora, Ysub);
    REQUIRE(big.middleRows(1, 3) == Ysub);
    REQUIRE(max_abs(to_double(Ysub) - to_double(Yfull.middleRows(2, 3))) <=
            8 * eps<T>() * in * (1 + max_abs(to_double(Yfull))));
    REQUIRE(big.row(0).isConstant(T(-7)));
    REQUIRE(big.row(4).isConstant(T(-7)));
    for (Index i = 0; i < 8; ++i)
        for (Index j = out; j < 20; ++j) REQUIRE(host[i * 20 + j] == T(-7));

    // The adapter branch on its own input: equals base(X) + delta(Xa).
    const Matrix<T> Xa = random_matrix<T>(n, in, 5);
    Matrix<T> Ysplit, Ybase = X * W.transpose();
    forward(X, W, lora, Ysplit, adapter_input(Xa));
    add_delta(Xa, lora, Ybase);
    REQUIRE(max_abs(to_double(Ysplit) - to_double(Ybase)) <=
            8 * eps<T>() * (1 + max_abs(to_double(Ybase))) * in);
}

namespace {

/// backward, backward without dX and backward_delta against the dense formulas in double, with
/// bounds from the absolute-value products.
template <class T>
void check_backward(Index n, Index out, Index in, Index r) {
    CAPTURE(n, out, in, r);
    const Lora<T> lora = random_lora<T>(out, in, r, 4, false, 21);
    const Matrix<T> X = random_matrix<T>(n, in, 22), W = random_matrix<T>(out, in, 23),
                    dY = random_matrix<T>(n, out, 24);
    const Matrix<double> x = to_double(X), w = to_double(W), dy = to_double(dY),
                         a = to_double(lora.A()), b = to_double(lora.B());
    const double s = double(lora.scale());
    const Matrix<double> t = naive_product(x, a.transpose()), g = naive_product(dy, b);
    const Matrix<double> dB = s * naive_product(dy.transpose(), t);
    const Matrix<double> dA = s * naive_product(g.transpose(), x);
    const Matrix<double> dX = naive_product(dy, w) + s * naive_product(g, a);
    // Bounds: each result is a product of two computed intermediates (depth two), so the
    // absolute-value products with a doubled γ bound the error.
    const double u = eps<T>();
    const Matrix<double> abs_t = naive_product(x.cwiseAbs(), a.transpose().cwiseAbs());
    const Matrix<double> abs_g = naive_product(dy.cwiseAbs(), b.cwiseAbs());
    const Matrix<double> dB_bound = 2 * product_bound(dy.transpose().cwiseAbs(), abs_t, u, s) +
                                    product_bound(dy.transpose().cwiseAbs(), abs_t, double(in) * u, s);
    const Matrix<double> dA_bound = 2 * product_bound(abs_g.transpose(), x.cwiseAbs(), u, s) +
                                    product_bound(abs_g.transpose(), x.cwiseAbs(), double(out) * u, s);
    const Matrix<double> dX_bound = product_bound(dy.cwiseAbs(), w.cwiseAbs(), u) +
                                    2 * product_bound(abs_g, a.cwiseAbs(), double(out) * u, s) +
                                    2 * u * dX.cwiseAbs();

    LoraGrad<T> grad;
    Matrix<T> dXc;
    backward(X, W, lora, dY, grad, dXc);
    require_within(grad.B, dB, dB_bound, "dB");
    require_within(grad.A, dA, dA_bound, "dA");
    require_within(dXc, dX, dX_bound, "dX");

    LoraGrad<T> grad2;
    backward(X, W, lora, dY, grad2);
    REQUIRE(grad2.A == grad.A);
    REQUIRE(grad2.B == grad.B);

    LoraGrad<T> grad3;
    Matrix<T> dXa;
    backward_delta(X, lora, dY, grad3, dXa);
    REQUIRE(grad3.A == grad.A);
    REQUIRE(grad3.B == grad.B);
    const Matrix<double> dXa_bound = 2 * product_bound(abs_g, a.cwiseAbs(), double(out) * u, s) +
                                     2 * u * (s * naive_product(g, a)).cwiseAbs();
    require_within(dXa, s * naive_product(g, a), dXa_bound, "dXa");

    // backward_delta overwrites a dXa of the right shape (no accumulation into what it held).
    Matrix<T> dXa_held = Matrix<T>::Constant(n, in, T(1e3));
    backward_delta(X, lora, dY, grad3, dXa_held);
    require_within(dXa_held, s * naive_product(g, a), dXa_bound, "dXa over old values");
}

}  // namespace

TEMPLATE_TEST_CASE("backward equals the dense formulas", "[lora][backward]", float, double) {
    check_backward<TestType>(GENERATE(0, 1, 9, 31), 19, 14, GENERATE(1, 4));
}

// One row takes its own path (core::shrink_row_backward: A read once for T, dA and dX), in blocks
// of 4 rows of A and vectors of the input features: ranks around the block, inputs around the
// vector widths (tails of 5 and 13 on 8 and 16 lanes).
TEMPLATE_TEST_CASE("one-row backward equals the dense formulas", "[lora][backward]", float, double) {
    check_backward<TestType>(1, GENERATE(19, 70), GENERATE(14, 37, 64, 301), GENERATE(1, 3, 4, 5, 8, 13));
}

// An Xa of 1 MiB or more goes by blocks of its columns (core::blocking::backward_cols: T summed
// over the blocks, dA and dX written block by block), here two whole blocks and a tail.
TEMPLATE_TEST_CASE("backward by blocks of the input features equals the dense formulas", "[lora][backward]", float,
                   double) {
    using T = TestType;
    const Index n = sizeof(T) == 4 ? 40 : 20, in = 7000;
    const Index cb = lowrank::core::blocking::backward_cols(n, in, Index(sizeof(T)));
    REQUIRE(cb < in / 2);
    REQUIRE(in % cb != 0);
    check_backward<T>(n, 19, in, GENERATE(3, 17));
}

// The same on data every sum of which is exact in float (quarters of small integers, s = 1: all
// values times 64 stay below 2^24), so the blocked backward must give the dense result exactly;
// no rounding bound for a block left out of T (or written twice) to hide in (the float case above
// has γ_in at in = 7000).
TEST_CASE("backward by blocks is exact on data exactly representable in float", "[lora][backward]") {
    const Index n = 40, out = 19, in = 7000, r = 5;
    REQUIRE(lowrank::core::blocking::backward_cols(n, in, Index(sizeof(float))) < in / 2);
    std::uint64_t state = 12345;
    const auto quarters = [&](Index rows, Index cols, int span) {
        Matrix<float> m(rows, cols);
        for (Index i = 0; i < rows; ++i)
            for (Index j = 0; j < cols; ++j) {
                state = state * 6364136223846793005ULL + 1442695040888963407ULL;
                m(i, j) = float(int((state >> 33) % std::uint64_t(2 * span + 1)) - span) / 4;
            }
        return m;
    };
    const Matrix<float> X = quarters(n, in, 3), A = quarters(r, in, 2), B = quarters(out, r, 2),
                        dY = quarters(n, out, 2);
    const Lora<float> lora = Lora<float>::from_factors(A, B, double(r));
    REQUIRE(lora.scale() == 1.0f);
    LoraGrad<float> grad;
    Matrix<float> dXa;
    backward_delta(X, lora, dY, grad, dXa);
    const Matrix<double> x = to_double(X), a = to_double(A), b = to_double(B), dy = to_double(dY);
    const Matrix<double> t = naive_product(x, a.transpose()), g = naive_product(dy, b);
    REQUIRE(to_double(grad.B) == naive_product(dy.transpose(), t));
    REQUIRE(to_double(grad.A) == naive_product(g.transpose(), x));
    REQUIRE(to_double(dXa) == naive_product(g, a));
}

TEST_CASE("LoRA gradients pass the finite-difference check (double)", "[lora][gradcheck]") {
    const Index n = 5, out = 7, in = 6, r = 3;
    Lora<double> lora = random_lora<double>(out, in, r, 5, true, 31);
    const Matrix<double> X = random_matrix<double>(n, in, 32), W = random_matrix<double>(out, in, 33),
                         dY = random_matrix<double>(n, out, 34);
    LoraGrad<double> grad;
    Matrix<double> dX;
    backward(X, W, lora, dY, grad, dX);

    auto y_of_A = [&](const Matrix<double>& A) {
        Lora<double> l = lora;
        l.A() = A;
        Matrix<double> Y;
        forward(X, W, l, Y);
        return Y;
    };
    auto y_of_B = [&](const Matrix<double>& B) {
        Lora<double> l = lora;
        l.B() = B;
        Matrix<double> Y;
        forward(X, W, l, Y);
        return Y;
    };
    auto y_of_X = [&](const Matrix<double>& Xv) {
        Matrix<double> Y;
        forward(Xv, W, lora, Y);
        return Y;
    };
    const auto rA = testing::check_vjp(y_of_A, lora.A(), dY, grad.A);
    const auto rB = testing::check_vjp(y_of_B, lora.B(), dY, grad.B);
    const auto rX = testing::check_vjp(y_of_X, X, dY, dX);
    INFO(rA.message() << "\n" << rB.message() << "\n" << rX.message());
    REQUIRE(rA.ok);
    REQUIRE(rB.ok);
    REQUIRE(rX.ok);
}

TEMPLATE_TEST_CASE("merge equals W + s B A; unmerge returns W within the documented bound",
                   "[lora][merge]", float, double) {
    using T = TestType;
    const auto [out, in, r] = GENERATE(std::tuple<Index, Index, Index>{1, 1, 1},
                                       std::tuple<Index, Index, Index>{40, 33, 8},
                                       std::tuple<Index, Index, Index>{129, 70, 64});
    const Lora<T> lora = random_lora<T>(out, in, r, 32, false, 41);
    Matrix<T> W = random_matrix<T>(out, in, 42);
    const Matrix<T> W0 = W;
    const double s = double(lora.scale());
    const Matrix<double> dW = s * naive_product(to_double(lora.B()), to_double(lora.A()));
    const Matrix<double> dW_err =
        product_bound(to_double(lora.B()).cwiseAbs(), to_double(lora.A()).cwiseAbs(), eps<T>(), s);
    merge(W, lora);
    require_within(W, to_double(W0) + dW, dW_err + 2 * eps<T>() * (to_double(W0) + dW).cwiseAbs(),
                   "merged");
    unmerge(W, lora);
    const Matrix<double> bound =
        1.01 * eps<T>() * (2 * to_double(W0).cwiseAbs() + dW.cwiseAbs() + dW_err).array() +
        std::numeric_limits<double>::min();
    require_within(W, to_double(W0), bound, "round trip");

    // Merged forward equals the unmerged forward (factored path = dense ΔW path).
    const Matrix<T> X = random_matrix<T>(5, in, 43);
    Matrix<T> Wm = W0, Y_unmerged, Y_merged;
    merge(Wm, lora, T(0.5));
    Lora<T> half = lora;
    half.set_alpha(lora.config().alpha * 0.5);
    forward(X, W0, half, Y_unmerged);
    Y_merged = X * Wm.transpose();
    const double tol = 4 * eps<T>() * double(in + r + 2) *
                       (to_double(X).cwiseAbs() * (to_double(W0).cwiseAbs() + dW.cwiseAbs()).transpose())
                           .maxCoeff();
    REQUIRE((to_double(Y_unmerged) - to_double(Y_merged)).cwiseAbs().maxCoeff() <= tol);
}

TEST_CASE("bad arguments raise lowrank::error naming the function and the shapes", "[lora][errors]") {
    using Catch::Contains;
    const Matrix<float> W(6, 5), X(3, 5), dY(3, 6);
    SECTION("rank 0") {
        REQUIRE_THROWS_WITH((Lora<float>(6, 5, {.rank = 0})),
                            Contains("lowrank::Lora") && Contains("rank 0") && Contains("6 x 5"));
    }
    SECTION("rank > min(in, out)") {
        REQUIRE_THROWS_AS((Lora<float>(6, 5, {.rank = 6})), lowrank::error);
        REQUIRE_THROWS_WITH((Lora<float>(6, 5, {.rank = 6})), Contains("rank 6 is out of range"));
    }
    SECTION("non-finite alpha") {
        REQUIRE_THROWS_WITH((Lora<float>(6, 5, {.rank = 2, .alpha = NAN})), Contains("alpha must be finite"));
        REQUIRE_THROWS_WITH((Lora<float>(6, 5, {.rank = 2, .alpha = INFINITY})), Contains("alpha"));
        Lora<float> l(6, 5, {.rank = 2});
        REQUIRE_THROWS_AS(l.set_alpha(NAN), lowrank::error);
    }
    Lora<float> lora(6, 5, {.rank = 2});
    SECTION("X with the wrong number of features") {
        Matrix<float> Y;
        REQUIRE_THROWS_WITH(forward(Matrix<float>(3, 4), W, lora, Y),
                            Contains("lowrank::forward") && Contains("X is 3 x 4") && Contains("expected any x 5"));
    }
    SECTION("W of the wrong shape") {
        Matrix<float> Y;
        REQUIRE_THROWS_WITH(forward(X, Matrix<float>(5, 5), lora, Y),
                            Contains("lowrank::forward") && Contains("W is 5 x 5") && Contains("expected 6 x 5"));
    }
    SECTION("Y block of the wrong shape, left untouched") {
        Matrix<float> Ybig = Matrix<float>::Constant(4, 6, 3.f);
        REQUIRE_THROWS_WITH(forward(X, W, lora, Ybig.topRows(2)), Contains("Y is 2 x 6"));
        REQUIRE_THROWS_WITH(add_delta(X, lora, Ybig), Contains("lowrank::add_delta") && Contains("Y is 4 x 6"));
        REQUIRE(Ybig.isConstant(3.f));
    }
    SECTION("dY of the wrong shape") {
        LoraGrad<float> g;
        Matrix<float> dX;
        REQUIRE_THROWS_WITH(backward(X, W, lora, Matrix<float>(3, 5), g, dX),
                            Contains("lowrank::backward") && Contains("dY is 3 x 5") && Contains("expected 3 x 6"));
        REQUIRE_THROWS_WITH(backward_delta(X, lora, Matrix<float>(2, 6), g),
                            Contains("lowrank::backward_delta") && Contains("dY is 2 x 6"));
    }
    SECTION("merge into a weight of the wrong shape") {
        Matrix<float> Wt(5, 6);
        REQUIRE_THROWS_WITH(merge(Wt, lora), Contains("lowrank::merge") && Contains("W is 5 x 6"));
        REQUIRE_THROWS_WITH(unmerge(Wt, lora), Contains("lowrank::unmerge"));
        Matrix<float> Wok = Matrix<float>::Zero(6, 5);
        REQUIRE_THROWS_WITH(merge(Wok, lora, NAN), Contains("weight must be finite"));
    }
    SECTION("factors resized through the references") {
        lora.A().resize(3, 5);
        Matrix<float> Y;
        REQUIRE_THROWS_WITH(forward(X, W, lora, Y), Contains("factors were resized") && Contains("A is 3 x 5"));
    }
    SECTION("from_factors with inconsistent factors") {
        REQUIRE_THROWS_WITH(Lora<float>::from_factors(Matrix<float>(2, 5), Matrix<float>(6, 3), 4.0),
                            Contains("from_factors") && Contains("A is 2 x 5") && Contains("B is 6 x 3"));
    }
    SECTION("destination aliasing an input") {
        Matrix<float> buf = Matrix<float>::Zero(3, 6);
        Matrix<float> Xs = Matrix<float>::Zero(3, 5);
        Eigen::Map<Matrix<float>> alias(Xs.data(), 3, 5);
        Lora<float> sq(5, 5, {.rank = 2});
        REQUIRE_THROWS_WITH(add_delta(Xs, sq, alias), Contains("Y overlaps X"));
        (void)buf;
    }
}

#ifdef LOWRANK_TEST_COUNT_ALLOCATIONS
TEMPLATE_TEST_CASE("with a workspace, forward, add_delta and linear allocate nothing in steady state",
                   "[lora][workspace]", float, double) {
    using T = TestType;
    // One row (Eigen's GEMV), 5 rows (W streamed once, X copied into aligned rows), 40 rows (the
    // packed GEMM's blocks); a row-major and a packed W; in the second call nothing may allocate.
    const Index n = GENERATE(1, 5, 40), out = 70, in = 50;
    CAPTURE(n);
    const Lora<T> lora = random_lora<T>(out, in, 4, 8, 31), other = random_lora<T>(out, in, 3, 6, 32);
    const Matrix<T> X = random_matrix<T>(n, in, 33), W = random_matrix<T>(out, in, 34);
    const PackedWeight<T> packed(W);
    Matrix<T> Y(n, out), Yp(n, out);
    Workspace<T> ws;
    auto step = [&] {
        forward(X, W, lora, Y, ws);
        add_delta(X, other, Y, ws);
        Yp = linear(X, packed + lora, ws);
    };
    step();  // the workspace grows here
    const Matrix<T> Y1 = Y, Yp1 = Yp;
    REQUIRE(allocations_in(step) == 0);
    REQUIRE(Y == Y1);
    REQUIRE(Yp == Yp1);
    // The counter itself works: an allocation the library does make (no workspace) is seen.
    REQUIRE(allocations_in([&] { forward(X, W, lora, Y); }) > 0);
}

TEMPLATE_TEST_CASE("with a workspace, backward and backward_delta allocate nothing in steady state",
                   "[lora][workspace]", float, double) {
    using T = TestType;
    // 1, 5 and 40 rows (from 32 on, dX's adapter part copies A into strips); rank 4 and rank 40
    // (from 32 on, grad.A copies Gᵀ and blocks of X): those buffers live in the workspace. The
    // shapes keep Eigen's dY W (the base part of dX) on its stack buffers.
    const Index n = GENERATE(1, 5, 40), rank = GENERATE(4, 40), out = 70, in = 50;
    CAPTURE(n, rank);
    const Lora<T> lora = random_lora<T>(out, in, rank, 8, 41);
    const Matrix<T> X = random_matrix<T>(n, in, 42), W = random_matrix<T>(out, in, 43),
                    dY = random_matrix<T>(n, out, 44);
    LoraGrad<T> grad;
    Matrix<T> dX(n, in);
    Workspace<T> ws;
    backward(X, W, lora, dY, grad, dX, ws);  // the workspace and the gradients grow here
    const LoraGrad<T> first = grad;
    const Matrix<T> dX1 = dX;
    REQUIRE(allocations_in([&] { backward(X, W, lora, dY, grad, dX, ws); }) == 0);
    REQUIRE(grad.A == first.A);
    REQUIRE(grad.B == first.B);
    REQUIRE(dX == dX1);
    // The other three forms, on the same (grown) workspace, against their forms without one: the
    // same values, and no allocation (the gradients already have their shapes).
    LoraGrad<T> fresh;
    Matrix<T> dXa(n, in), dXa_fresh;
    backward_delta(X, lora, dY, fresh, dXa_fresh);
    REQUIRE(allocations_in([&] { backward_delta(X, lora, dY, grad, dXa, ws); }) == 0);
    REQUIRE(grad.A == fresh.A);
    REQUIRE(grad.B == fresh.B);
    REQUIRE(dXa == dXa_fresh);
    grad.A.setZero();
    grad.B.setZero();
    REQUIRE(allocations_in([&] { backward_delta(X, lora, dY, grad, ws); }) == 0);
    REQUIRE(grad.A == fresh.A);
    REQUIRE(grad.B == fresh.B);
    grad.A.setZero();
    grad.B.setZero();
    REQUIRE(allocations_in([&] { backward(X, W, lora, dY, grad, ws); }) == 0);
    REQUIRE(grad.A == first.A);
    REQUIRE(grad.B == first.B);
}
#endif
