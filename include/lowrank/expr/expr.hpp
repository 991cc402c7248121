// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Expression types: `W + lora`, `W + lora1 + 0.5 * lora2`, … and their evaluation.
///
///     lowrank::Matrix<float> Y = lowrank::linear(X, W + lora1 + 0.5f * lora2);  // X Wᵀ + Σ terms
///     lowrank::Matrix<float> Wm = lowrank::dense(W + lora);                    // merged weight
///
/// `W + term` builds a `SumExpr`: a view of W and a compile-time list of terms. Nothing is
/// computed until the expression is assigned: `linear(X, e)` then runs the base product once and
/// all terms in one pass of the core (`core::apply_terms`), with a single n × Σw scratch (pass a
/// `Workspace` to reuse it across calls); `dense(e)` copies W once and adds each term's ΔW in place.
/// Any type satisfying `LowRankTerm` (core/terms.hpp) is a term: new methods plug in without
/// touching this file.
///
/// Lifetimes: an expression refers to W and to owning terms (a `Lora`) by address; it never copies
/// them. Building one from a temporary owning object (`W + make_lora()`, `make_W() + lora`,
/// `2 * make_lora()`) does not compile. W may be a Map, Ref or Block of live memory.
/// Light terms (wrappers such as `0.5 * lora`, marked `stored_by_value`) are held by value.

#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/args.hpp"
#include "../core/memory.hpp"
#include "../core/terms.hpp"

namespace lowrank {

/// Marks a term type that is a small value (a reference plus a few numbers) and may be copied
/// into expressions. Owning terms (Lora, …) are held by reference instead.
template <class Term>
concept LightTerm = LowRankTerm<Term> && Term::stored_by_value;

namespace detail {
/// How an expression holds a term: light terms by value, owning terms by pointer.
template <class Term>
struct TermHolder {
    const Term* ptr;
    [[nodiscard]] const Term& get() const noexcept { return *ptr; }
};
template <LightTerm Term>
struct TermHolder<Term> {
    Term value;
    [[nodiscard]] const Term& get() const noexcept { return value; }
};
template <class Term>
[[nodiscard]] TermHolder<Term> hold(const Term& t) {
    if constexpr (LightTerm<Term>)
        return {t};
    else
        return {&t};
}
}  // namespace detail

/// `weight · term`: the term's output (and ΔW) multiplied by a scalar.
template <LowRankTerm Term>
class WeightedTerm {
public:
    using scalar = typename Term::scalar;
    static constexpr bool stored_by_value = true;

    WeightedTerm(const Term& term, scalar weight) : term_(detail::hold(term)), weight_(weight) {}

    [[nodiscard]] scalar weight() const noexcept { return weight_; }
    [[nodiscard]] const Term& term() const noexcept { return term_.get(); }

    [[nodiscard]] Index in_features() const { return term().in_features(); }
    [[nodiscard]] Index out_features() const { return term().out_features(); }
    [[nodiscard]] Index width() const { return term().width(); }
    [[nodiscard]] MatrixView<const scalar> shrink_factor() const { return term().shrink_factor(); }
    [[nodiscard]] MatrixView<const scalar> expand_factor() const { return term().expand_factor(); }
    void transform(MatrixView<scalar> t, Index row0) const {
        term().transform(t, row0);
        for (Index i = 0; i < t.rows; ++i) {
            scalar* row = t.row(i);
            for (Index j = 0; j < t.cols; ++j) row[j] *= weight_;
        }
    }
    void validate(const char* fn, Index n, Index in, Index out) const {
        detail::check_finite(fn, "term weight", weight_);
        term().validate(fn, n, in, out);
    }
    void merge_into(MatrixView<scalar> w, scalar alpha) const
        requires MergeableTerm<Term>
    {
        term().merge_into(w, alpha * weight_);
    }

private:
    detail::TermHolder<Term> term_;
    scalar weight_;
};

/// `W + term₁ + term₂ + …`: a view of the base weight (out × in, row-major: W itself or a
/// PackedWeight's copy) and a list of terms.
template <Real T, LowRankTerm... Terms>
class SumExpr {
public:
    using scalar = T;

    SumExpr(MatrixView<const T> w, std::tuple<detail::TermHolder<Terms>...> terms)
        : w_(w), terms_(std::move(terms)) {}

    [[nodiscard]] MatrixView<const T> weight() const noexcept { return w_; }
    [[nodiscard]] Index in_features() const noexcept { return w_.cols; }
    [[nodiscard]] Index out_features() const noexcept { return w_.rows; }
    [[nodiscard]] static constexpr std::size_t size() noexcept { return sizeof...(Terms); }

    /// Calls `f(term₁, term₂, …)` with the terms.
    template <class F>
    decltype(auto) apply(F&& f) const {
        return std::apply([&](const auto&... h) -> decltype(auto) { return f(h.get()...); },
                          terms_);
    }

    /// `e + term`: one more term.
    template <LowRankTerm Next>
    [[nodiscard]] SumExpr<T, Terms..., Next> plus(const Next& next) const {
        return {w_, std::tuple_cat(terms_, std::make_tuple(detail::hold(next)))};
    }

private:
    MatrixView<const T> w_;
    std::tuple<detail::TermHolder<Terms>...> terms_;
};

/// A base weight W (out × in, nn.Linear layout) copied once, at load time, into memory laid out
/// and advised for the forward product, as an inference engine does: row-major with no gaps
/// between rows (from any source: column-major, a block, a Map with strides, an expression), in
/// memory advised for transparent huge pages (core::HugePageAllocator, core/memory.hpp), so that
/// `linear(X, packed + terms…)` streams it through the row-major kernels (the stream kernel reads
/// W's rows once per pass, sequentially, and packs nothing of W) with a TLB miss per 2 MiB instead
/// of per 4 KiB. `dense(packed + …)` gives the merged weight (a new matrix; the copy is const).
///
/// The layout is the row-major one because it is the fastest this library has for the forward.
/// The copy was formerly Wᵀ in strips one cache line wide for a BLIS-style micro-kernel (no
/// per-call packing either); on the Sapphire Rapids VM of bench/results the stream kernel on the
/// row-major copy outran it at every batch from 16 rows on (X Wᵀ alone, 4096², medians of
/// 9–15, ms, strips → row-major: float n = 16 3.85 → 3.16, 32 6.72 → 5.73, 128 27.5 → 23.8;
/// double n = 16 11.8 → 7.4–8.4, 128 63.4 → 49.3; an AVX2 build, float, n = 16 6.33 → 5.13),
/// lost 2–4% at n = 2–8 on AVX-512 and 10% at n = 4 on AVX2 (2.42 vs 2.67), and tied at n = 1.
template <Real T>
class PackedWeight {
public:
    template <class D>
        requires std::same_as<typename D::Scalar, T>
    explicit PackedWeight(const Eigen::MatrixBase<D>& W)
        : rows_(Index(W.rows())), cols_(Index(W.cols())),
          data_(static_cast<std::size_t>(rows_) * static_cast<std::size_t>(cols_)) {
        // The allocator advised the pages before the vector's zero fill first wrote them.
        Eigen::Map<Matrix<T>>(data_.data(), rows_, cols_) = W;
    }

    [[nodiscard]] Index rows() const noexcept { return rows_; }  ///< out_features
    [[nodiscard]] Index cols() const noexcept { return cols_; }  ///< in_features
    /// The copy of W (row-major, leading dimension cols()).
    [[nodiscard]] MatrixView<const T> view() const noexcept { return {data_.data(), rows_, cols_, cols_}; }

private:
    Index rows_ = 0, cols_ = 0;
    std::vector<T, core::HugePageAllocator<T>> data_;  // 2 MiB pages where the OS gives them
};

// --- building expressions --------------------------------------------------------------------

/// `W + term`. W: out × in, row-major with direct access (Matrix, Map, Ref, Block).
template <class D, LowRankTerm Term>
    requires std::same_as<typename D::Scalar, typename Term::scalar>
[[nodiscard]] SumExpr<typename D::Scalar, Term> operator+(const Eigen::MatrixBase<D>& W,
                                                          const Term& term) {
    return {view(W), std::make_tuple(detail::hold(term))};
}
/// A temporary owning matrix as the base would dangle: not allowed.
template <class S, int R, int C, int O, int MR, int MC, LowRankTerm Term>
SumExpr<S, Term> operator+(Eigen::Matrix<S, R, C, O, MR, MC>&& W, const Term& term) = delete;
/// A temporary owning term would dangle: not allowed (light terms are copied and are fine).
template <class D, LowRankTerm Term>
    requires(!LightTerm<Term> && !std::is_lvalue_reference_v<Term>)
SumExpr<typename D::Scalar, Term> operator+(const Eigen::MatrixBase<D>& W, Term&& term) = delete;

/// `packed + term`, the base a PackedWeight.
template <Real T, LowRankTerm Term>
    requires std::same_as<T, typename Term::scalar>
[[nodiscard]] SumExpr<T, Term> operator+(const PackedWeight<T>& W, const Term& term) {
    return {W.view(), std::make_tuple(detail::hold(term))};
}
template <Real T, LowRankTerm Term>
SumExpr<T, Term> operator+(PackedWeight<T>&& W, const Term& term) = delete;
template <Real T, LowRankTerm Term>
    requires(!LightTerm<Term> && !std::is_lvalue_reference_v<Term>)
SumExpr<T, Term> operator+(const PackedWeight<T>& W, Term&& term) = delete;

/// `(W + …) + term`.
template <Real T, LowRankTerm... Terms, LowRankTerm Next>
    requires std::same_as<T, typename Next::scalar>
[[nodiscard]] auto operator+(const SumExpr<T, Terms...>& e, const Next& next) {
    return e.plus(next);
}
template <Real T, LowRankTerm... Terms, LowRankTerm Next>
    requires(!LightTerm<Next> && !std::is_lvalue_reference_v<Next>)
SumExpr<T, Terms..., Next> operator+(const SumExpr<T, Terms...>& e, Next&& next) = delete;

/// `weight * term` (any arithmetic weight, converted to the term's scalar).
template <class S, LowRankTerm Term>
    requires std::is_arithmetic_v<S>
[[nodiscard]] WeightedTerm<Term> operator*(S weight, const Term& term) {
    return {term, static_cast<typename Term::scalar>(weight)};
}
template <class S, LowRankTerm Term>
    requires(std::is_arithmetic_v<S> && !LightTerm<Term> && !std::is_lvalue_reference_v<Term>)
WeightedTerm<Term> operator*(S weight, Term&& term) = delete;
template <class S, LowRankTerm Term>
    requires std::is_arithmetic_v<S>
[[nodiscard]] WeightedTerm<Term> operator*(const Term& term, S weight) {
    return {term, static_cast<typename Term::scalar>(weight)};
}

// --- evaluating them -------------------------------------------------------------------------

template <class Expr, class DX>
class LinearExpr;
template <class Expr>
class DenseExpr;

}  // namespace lowrank

namespace Eigen::internal {
template <class Expr, class DX>
struct traits<lowrank::LinearExpr<Expr, DX>> {
    using ReturnType = lowrank::Matrix<typename Expr::scalar>;
};
template <class Expr>
struct traits<lowrank::DenseExpr<Expr>> {
    using ReturnType = lowrank::Matrix<typename Expr::scalar>;
};
}  // namespace Eigen::internal

namespace lowrank {

/// `linear(X, W + terms)`: X Wᵀ + Σ terms, n × out, evaluated when assigned to an Eigen matrix
/// (a `Matrix<T>` is resized; a Map or Block must have the shape). The destination must not
/// overlap X or W. It holds the expression by value and X, W and owning terms by address:
/// assign it in the statement that creates it (`Matrix<T> Y = linear(...)`), do not keep it in
/// an `auto` variable past the lifetime of X.
template <class Expr, class DX>
class LinearExpr : public Eigen::ReturnByValue<LinearExpr<Expr, DX>> {
public:
    using scalar = typename Expr::scalar;

    LinearExpr(const Eigen::MatrixBase<DX>& x, const Expr& e, Workspace<scalar>* ws, Threads threads)
        : x_(detail::input_view("lowrank::linear", "X", x, -1, e.in_features())), expr_(e), ws_(ws),
          threads_(threads) {
        expr_.apply([&](const auto&... terms) {
            validate_terms("lowrank::linear", x_.rows, expr_.in_features(), expr_.out_features(),
                           terms...);
        });
    }

    [[nodiscard]] Eigen::Index rows() const noexcept { return x_.rows; }
    [[nodiscard]] Eigen::Index cols() const noexcept { return expr_.out_features(); }

    template <class Dest>
    void evalTo(Dest& dst) const {
        const char* fn = "lowrank::linear";
        auto y = detail::output_view(fn, "Y", dst, rows(), cols(), true);
        const auto x = x_;
        detail::check_no_overlap(fn, "Y", y, "X", x);
        detail::check_no_overlap(fn, "Y", y, "W", expr_.weight());
        Workspace<scalar> local;
        Workspace<scalar>& ws = ws_ ? *ws_ : local;
        expr_.apply([&](const auto&... terms) {
            core::linear_terms<scalar>(x, expr_.weight(), y, ws, threads_, terms...);
        });
    }

private:
    MatrixView<const scalar> x_;
    Expr expr_;
    Workspace<scalar>* ws_;
    Threads threads_;
};

/// `dense(W + terms)`: the merged weight W + Σ ΔW (out × in), for mergeable terms.
template <class Expr>
class DenseExpr : public Eigen::ReturnByValue<DenseExpr<Expr>> {
public:
    using scalar = typename Expr::scalar;

    explicit DenseExpr(const Expr& e) : expr_(e) {
        expr_.apply([&](const auto&... terms) {
            validate_terms("lowrank::dense", 0, expr_.in_features(), expr_.out_features(), terms...);
        });
    }

    [[nodiscard]] Eigen::Index rows() const noexcept { return expr_.out_features(); }
    [[nodiscard]] Eigen::Index cols() const noexcept { return expr_.in_features(); }

    template <class Dest>
    void evalTo(Dest& dst) const {
        const char* fn = "lowrank::dense";
        auto out = detail::output_view(fn, "W_merged", dst, rows(), cols(), true);
        const auto w = expr_.weight();
        if (out.data != w.data) {  // dense(W + lora) assigned back into W is an in-place merge
            detail::check_no_overlap(fn, "W_merged", out, "W", w);
            eigen_map(out) = eigen_map(w);
        } else if (out.ld != w.ld) {
            detail::fail(fn, ": the destination overlaps W with a different layout");
        }
        expr_.apply([&](const auto&... terms) { (terms.merge_into(out, scalar(1)), ...); });
    }

private:
    Expr expr_;
};

/// X Wᵀ + Σ terms for the expression `W + terms` (PyTorch's `F.linear` semantics).
template <class DX, Real T, LowRankTerm... Terms>
    requires std::same_as<typename DX::Scalar, T>
[[nodiscard]] LinearExpr<SumExpr<T, Terms...>, DX> linear(const Eigen::MatrixBase<DX>& X,
                                                          const SumExpr<T, Terms...>& e) {
    return {X, e, nullptr, Threads{}};
}
/// As above, with the n × Σw scratch taken from (and kept in) `ws`, on up to `threads.count`
/// threads (see core/terms.hpp: with a base weight the threads split its output features).
template <class DX, Real T, LowRankTerm... Terms>
    requires std::same_as<typename DX::Scalar, T>
[[nodiscard]] LinearExpr<SumExpr<T, Terms...>, DX> linear(const Eigen::MatrixBase<DX>& X,
                                                          const SumExpr<T, Terms...>& e,
                                                          Workspace<T>& ws, Threads threads = {}) {
    return {X, e, &ws, threads};
}

/// The merged weight W + Σ ΔW of an expression whose terms are all mergeable.
template <Real T, LowRankTerm... Terms>
    requires(MergeableTerm<Terms> && ...)
[[nodiscard]] DenseExpr<SumExpr<T, Terms...>> dense(const SumExpr<T, Terms...>& e) {
    return DenseExpr<SumExpr<T, Terms...>>(e);
}

}  // namespace lowrank
