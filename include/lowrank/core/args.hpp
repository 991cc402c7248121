// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Argument handling shared by the public entry points: views of inputs and outputs with their
/// shape checks, and the aliasing check between a destination and its sources.

#include <concepts>
#include <functional>
#include <type_traits>

#include "view.hpp"

namespace lowrank {

/// An Eigen object a routine can write into: a (resizable) Matrix, or a Map / Ref / Block with
/// direct access. Passed by forwarding reference, so `Y.middleRows(0, 4)` can be a destination.
template <class D>
concept Destination = std::derived_from<std::remove_cvref_t<D>, Eigen::DenseBase<std::remove_cvref_t<D>>> &&
                      !std::is_const_v<std::remove_reference_t<D>>;

namespace detail {

template <class D>
constexpr bool is_plain_v = std::derived_from<D, Eigen::PlainObjectBase<D>>;

/// Read-only view of an input, with its shape checked (negative: any).
template <class D>
[[nodiscard]] auto input_view(const char* fn, const char* arg, const Eigen::DenseBase<D>& m,
                              long long rows, long long cols) {
    check_shape(fn, arg, m.derived(), rows, cols);
    return view(m);
}

/// Mutable view of an output. A plain matrix is resized to rows × cols (like Eigen assignment)
/// when `resize` is set; a Map, Ref or Block must already have that shape.
template <class D>
[[nodiscard]] auto output_view(const char* fn, const char* arg, D&& out, long long rows,
                               long long cols, bool resize) {
    using P = std::remove_cvref_t<D>;
    if constexpr (is_plain_v<P>) {
        if (resize && (out.rows() != rows || out.cols() != cols)) out.resize(rows, cols);
    }
    check_shape(fn, arg, out, rows, cols);
    return view_mut(out);
}

/// Last element + 1 of a view's memory.
template <class T>
[[nodiscard]] const void* view_end(MatrixView<T> v) noexcept {
    if (v.empty()) return v.data;
    return v.data + (v.rows - 1) * v.ld + v.cols;
}

/// Throws if the destination view overlaps the source view in memory.
template <class T, class U>
void check_no_overlap(const char* fn, const char* dst_name, MatrixView<T> dst, const char* src_name,
                      MatrixView<U> src) {
    if (dst.empty() || src.empty()) return;
    const auto* d0 = static_cast<const void*>(dst.data);
    const auto* s0 = static_cast<const void*>(src.data);
    const std::less<const void*> lt;
    if (lt(d0, view_end(src)) && lt(s0, view_end(dst)))
        fail(fn, ": ", dst_name, " overlaps ", src_name, " in memory (the destination must not "
             "alias an input)");
}

}  // namespace detail
}  // namespace lowrank
