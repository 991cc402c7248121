// LoRA forward, backward and merge on a small layer, each checked against an independent
// computation: a dense double-precision formula, central finite differences, and the merge /
// unmerge round trip against its documented bound. Prints each check and exits non-zero if one
// fails.
#include <lowrank/lowrank.hpp>

#include <cstdio>
#include <limits>

namespace {

using lowrank::Matrix;

int failures = 0;

void report(const char* what, double value, double bound) {
    const bool ok = value <= bound;
    failures += ok ? 0 : 1;
    std::printf("  %-52s %10.3e  (bound %9.3e)  %s\n", what, value, bound, ok ? "ok" : "FAIL");
}

template <class D>
double max_abs(const Eigen::MatrixBase<D>& m) {
    return m.size() ? double(m.cwiseAbs().maxCoeff()) : 0.0;
}

}  // namespace

int main() {
    const lowrank::Index n = 32, in = 96, out = 80, r = 8;
    const Matrix<float> W = Matrix<float>::Random(out, in), X = Matrix<float>::Random(n, in);
    lowrank::Lora<float> lora(out, in, {.rank = r, .alpha = 16, .rslora = true, .seed = 7});
    lora.B().setRandom();
    std::printf("LoRA %lld x %lld, rank %lld, rsLoRA scale alpha/sqrt(r) = %.4f, batch %lld\n",
                (long long)out, (long long)in, (long long)r, double(lora.scale()), (long long)n);

    // Forward against the dense formula in double.
    Matrix<float> Y;
    lowrank::forward(X, W, lora, Y);
    const Matrix<double> Xd = X.cast<double>(), Wd = W.cast<double>(), Ad = lora.A().cast<double>(),
                         Bd = lora.B().cast<double>();
    const double s = lora.scale();
    const Matrix<double> Yref = Xd * Wd.transpose() + s * (Xd * Ad.transpose()) * Bd.transpose();
    const double u = std::numeric_limits<float>::epsilon() / 2;
    const double fwd_bound =
        4 * (in + r) * u * max_abs(Matrix<double>(Xd.cwiseAbs() * (Wd.cwiseAbs() + s * (Bd.cwiseAbs() * Ad.cwiseAbs())).transpose()));
    std::printf("forward\n");
    report("max |Y - dense double formula|", max_abs(Y.cast<double>() - Yref), fwd_bound);

    // Backward: analytic gradients vs central differences of L = sum(dY ⊙ Y), in double.
    lowrank::Lora<double> lora64 = lowrank::Lora<double>::from_factors(Ad, Bd, 16, true);
    const Matrix<double> dY = Matrix<double>::Random(n, out);
    lowrank::LoraGrad<double> grad;
    Matrix<double> dX;
    lowrank::backward(Xd, Wd, lora64, dY, grad, dX);
    auto y_of_A = [&](const Matrix<double>& A) {
        auto l = lora64;
        l.A() = A;
        return Matrix<double>(lowrank::linear(Xd, Wd + l));
    };
    auto y_of_B = [&](const Matrix<double>& B) {
        auto l = lora64;
        l.B() = B;
        return Matrix<double>(lowrank::linear(Xd, Wd + l));
    };
    auto y_of_X = [&](const Matrix<double>& Xv) { return Matrix<double>(lowrank::linear(Xv, Wd + lora64)); };
    std::printf("backward (finite differences, worst |analytic - numeric|)\n");
    const auto ga = lowrank::testing::check_vjp(y_of_A, lora64.A(), dY, grad.A);
    const auto gb = lowrank::testing::check_vjp(y_of_B, lora64.B(), dY, grad.B);
    const auto gx = lowrank::testing::check_vjp(y_of_X, Xd, dY, dX);
    report("dA", ga.worst_ratio, 1.0);
    report("dB", gb.worst_ratio, 1.0);
    report("dX", gx.worst_ratio, 1.0);
    std::printf("  (ratios of the error to the tolerance 1e-8 + 1e-5 |numeric| + rounding; max abs errors "
                "%.2e, %.2e, %.2e)\n", ga.max_abs_error, gb.max_abs_error, gx.max_abs_error);

    // Merge: the merged layer computes the same outputs; unmerge restores W within its bound.
    Matrix<float> Wm = W;
    lowrank::merge(Wm, lora);
    std::printf("merge / unmerge\n");
    report("max |X W_merged^T - Y|", max_abs((X * Wm.transpose() - Y).cast<double>()), fwd_bound);
    lowrank::unmerge(Wm, lora);
    const Matrix<double> dW = s * Bd * Ad;
    double worst = 0;
    for (lowrank::Index i = 0; i < out; ++i)
        for (lowrank::Index j = 0; j < in; ++j) {
            const double bound = 1.01 * u * (2 * std::abs(Wd(i, j)) + std::abs(dW(i, j))) + 1e-300;
            worst = std::max(worst, std::abs(double(Wm(i, j)) - Wd(i, j)) / bound);
        }
    report("round trip error / u(2|W| + |dW|)", worst, 1.0);

    std::printf(failures ? "%d check(s) FAILED\n" : "all checks passed\n", failures);
    return failures ? 1 : 0;
}
