// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// A finite-difference gradient checker, public so that downstream CI can check its own use of
/// the library (or any function of Eigen matrices) the way lowrank's tests do.
///
///     auto loss = [&](const lowrank::Matrix<double>& A) { ...; return scalar; };
///     auto r = lowrank::testing::check_gradient(loss, A0, analytic_dA);
///     REQUIRE(r.ok);   // else r.message() names the worst entry
///
/// Central differences in double: for each entry x_ij, with h = step · max(1, |x_ij|),
///     numeric_ij = (f(x + h e_ij) − f(x − h e_ij)) / (2h),
/// whose truncation error is (h²/6) ∂³f and rounding error about ε |f| / h. An entry passes when
///     |analytic − numeric| ≤ atol + rtol · |numeric| + rounding,
/// where rounding = 8 ε (|f(x + h e_ij)| + |f(x − h e_ij)|) / (2h) is the floating-point error of
/// the difference quotient itself (so a loss summed over many outputs, |f| large, does not make
/// exact gradients fail).
/// Costs 2 · size(x) evaluations of f.

#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "../core/error.hpp"
#include "../core/view.hpp"

namespace lowrank::testing {

struct GradCheckOptions {
    double step = 1e-6;  ///< relative finite-difference step
    double rtol = 1e-5;  ///< relative tolerance against the numeric derivative
    double atol = 1e-8;  ///< absolute tolerance
};

struct GradCheckResult {
    bool ok = true;
    double max_abs_error = 0;   ///< largest |analytic − numeric| over entries
    double worst_ratio = 0;     ///< largest |analytic − numeric| / tolerance; ok ⇔ ≤ 1
    Index worst_row = -1;       ///< entry with the worst ratio
    Index worst_col = -1;
    double analytic = 0;        ///< analytic and numeric derivative at that entry
    double numeric = 0;
    Index entries = 0;          ///< entries checked

    /// A one-line human-readable summary naming the worst entry.
    [[nodiscard]] std::string message() const {
        std::ostringstream os;
        os << (ok ? "gradient check passed" : "gradient check FAILED") << ": " << entries
           << " entries, max |analytic - numeric| = " << max_abs_error;
        if (worst_row >= 0)
            os << ", worst at (" << worst_row << ", " << worst_col << "): analytic " << analytic
               << " vs numeric " << numeric << " (ratio to tolerance " << worst_ratio << ")";
        return os.str();
    }
    explicit operator bool() const noexcept { return ok; }
};

/// The central-difference gradient of a scalar function f(x) (x: any double matrix shape).
template <class F>
[[nodiscard]] Matrix<double> numeric_gradient(F&& f, Matrix<double> x, double step = 1e-6,
                                              Matrix<double>* rounding = nullptr) {
    Matrix<double> g(x.rows(), x.cols());
    if (rounding) rounding->resize(x.rows(), x.cols());
    for (Index i = 0; i < x.rows(); ++i)
        for (Index j = 0; j < x.cols(); ++j) {
            const double x0 = x(i, j);
            const double h = step * std::max(1.0, std::abs(x0));
            x(i, j) = x0 + h;
            const double fp = f(static_cast<const Matrix<double>&>(x));
            x(i, j) = x0 - h;
            const double fm = f(static_cast<const Matrix<double>&>(x));
            x(i, j) = x0;
            g(i, j) = (fp - fm) / (2 * h);
            if (rounding)
                (*rounding)(i, j) = 8 * std::numeric_limits<double>::epsilon() *
                                    (std::abs(fp) + std::abs(fm)) / (2 * h);
        }
    return g;
}

/// Compares `analytic` (same shape as x) with the central-difference gradient of f at x.
/// Throws `lowrank::error` if the shapes differ.
template <class F, class DG>
[[nodiscard]] GradCheckResult check_gradient(F&& f, const Matrix<double>& x,
                                             const Eigen::MatrixBase<DG>& analytic,
                                             const GradCheckOptions& opts = {}) {
    detail::check_shape("lowrank::testing::check_gradient", "analytic", analytic.derived(),
                        x.rows(), x.cols());
    Matrix<double> rounding;
    const Matrix<double> numeric = numeric_gradient(f, x, opts.step, &rounding);
    GradCheckResult r;
    r.entries = x.size();
    for (Index i = 0; i < x.rows(); ++i)
        for (Index j = 0; j < x.cols(); ++j) {
            const double a = static_cast<double>(analytic(i, j));
            const double n = numeric(i, j);
            const double err = std::abs(a - n);
            const double ratio = err / (opts.atol + opts.rtol * std::abs(n) + rounding(i, j));
            r.max_abs_error = std::max(r.max_abs_error, err);
            if (!(ratio <= r.worst_ratio) || r.worst_row < 0) {  // also catches NaN
                r.worst_ratio = std::isnan(ratio) ? std::numeric_limits<double>::infinity() : ratio;
                r.worst_row = i;
                r.worst_col = j;
                r.analytic = a;
                r.numeric = n;
            }
        }
    r.ok = r.worst_ratio <= 1.0;
    return r;
}

/// Vector–Jacobian check for a matrix-valued function: with L(x) = Σ dY ⊙ F(x), compares the
/// claimed `analytic` = ∂L/∂x (what a backward pass returns for upstream gradient dY).
template <class F, class DdY, class DG>
[[nodiscard]] GradCheckResult check_vjp(F&& F_of_x, const Matrix<double>& x,
                                        const Eigen::MatrixBase<DdY>& dY,
                                        const Eigen::MatrixBase<DG>& analytic,
                                        const GradCheckOptions& opts = {}) {
    const Matrix<double> upstream = dY.template cast<double>();
    auto loss = [&](const Matrix<double>& xx) {
        const Matrix<double> y = F_of_x(xx);
        detail::check_shape("lowrank::testing::check_vjp", "F(x)", y, upstream.rows(),
                            upstream.cols());
        return (y.array() * upstream.array()).sum();
    };
    return check_gradient(loss, x, analytic, opts);
}

}  // namespace lowrank::testing
