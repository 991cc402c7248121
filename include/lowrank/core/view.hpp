// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Row-major matrix views with an explicit leading dimension, and their construction from Eigen.
///
/// Every kernel in `core/` works on `MatrixView<T>` (mutable) and `MatrixView<const T>` (read-only):
/// a pointer, a shape and the distance in elements between consecutive rows (`ld >= cols`). A view
/// never owns memory. Views are built from any Eigen object with direct access whose elements are
/// contiguous along a row (row-major matrices, `Map`s, `Ref`s, row blocks, and vectors); a
/// column-major matrix is rejected at compile time rather than silently read transposed.

#include <Eigen/Core>

#include <concepts>
#include <cstddef>
#include <type_traits>

#include "error.hpp"

namespace lowrank {

using Index = std::ptrdiff_t;

/// The matrix type of the library's own storage and results (PyTorch layout: row-major).
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// The floating-point types every routine is instantiated for.
template <class T>
concept Real = std::same_as<T, float> || std::same_as<T, double>;

/// A row-major view: element (i, j) lives at `data[i * ld + j]`.
template <class T>
struct MatrixView {
    T* data = nullptr;
    Index rows = 0;
    Index cols = 0;
    Index ld = 0;

    [[nodiscard]] T* row(Index i) const noexcept { return data + i * ld; }
    [[nodiscard]] T& operator()(Index i, Index j) const noexcept {
        LOWRANK_ASSERT(i >= 0 && i < rows && j >= 0 && j < cols);
        return data[i * ld + j];
    }
    /// Rows [r0, r0 + nr) and columns [c0, c0 + nc).
    [[nodiscard]] MatrixView block(Index r0, Index c0, Index nr, Index nc) const noexcept {
        LOWRANK_ASSERT(r0 >= 0 && c0 >= 0 && r0 + nr <= rows && c0 + nc <= cols);
        // An empty view may have no storage: offsetting a null pointer is undefined behaviour.
        return {data ? data + r0 * ld + c0 : data, nr, nc, ld};
    }
    [[nodiscard]] MatrixView middle_rows(Index r0, Index nr) const noexcept {
        return block(r0, 0, nr, cols);
    }
    [[nodiscard]] bool empty() const noexcept { return rows == 0 || cols == 0; }
    operator MatrixView<const T>() const noexcept
        requires(!std::is_const_v<T>)
    {
        return {data, rows, cols, ld};
    }
};

namespace detail {
template <class D>
constexpr bool is_row_contiguous_v =
    bool(D::IsRowMajor) || D::ColsAtCompileTime == 1 || D::MaxColsAtCompileTime == 1;
}  // namespace detail

/// Eigen objects a view can be taken of: direct access, and contiguous along rows.
template <class D>
concept RowMajorDense = std::derived_from<D, Eigen::DenseBase<D>> &&
                        bool(Eigen::internal::traits<D>::Flags & Eigen::DirectAccessBit);

/// Read-only view of an Eigen object (row-major, Map, Ref, row block, vector).
template <class D>
[[nodiscard]] auto view(const Eigen::DenseBase<D>& m) {
    static_assert(RowMajorDense<D>,
                  "lowrank: this Eigen expression has no direct memory access; evaluate it into a "
                  "lowrank::Matrix first");
    static_assert(detail::is_row_contiguous_v<D>,
                  "lowrank: column-major matrices are not accepted (the library uses PyTorch's "
                  "row-major layout); use lowrank::Matrix<T> or a RowMajor Map");
    using T = typename D::Scalar;
    const D& d = m.derived();
    const Index row_stride = D::IsRowMajor ? d.outerStride() : d.innerStride();
    const Index col_stride = D::IsRowMajor ? d.innerStride() : d.outerStride();
    if (d.cols() > 1 && col_stride != 1)
        detail::fail("lowrank::view: elements of a row must be contiguous (inner stride ",
                     col_stride, ")");
    return MatrixView<const T>{d.data(), d.rows(), d.cols(), d.rows() > 1 ? row_stride : d.cols()};
}

/// Mutable view of an Eigen object (row-major, Map, Ref, row block, vector).
template <class D>
[[nodiscard]] auto view_mut(Eigen::DenseBase<D>& m) {
    auto v = view(static_cast<const Eigen::DenseBase<D>&>(m));
    using T = typename D::Scalar;
    return MatrixView<T>{const_cast<T*>(v.data), v.rows, v.cols, v.ld};
}
template <class T>
[[nodiscard]] MatrixView<const T> view(MatrixView<T> v) noexcept {
    return v;
}

/// An Eigen map over a view, so that Eigen can compute on library views.
template <class T>
using MapOf = Eigen::Map<std::conditional_t<std::is_const_v<T>, const Matrix<std::remove_const_t<T>>,
                                            Matrix<std::remove_const_t<T>>>,
                         Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
[[nodiscard]] MapOf<T> eigen_map(MatrixView<T> v) noexcept {
    return MapOf<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.ld > 0 ? v.ld : v.cols));
}

}  // namespace lowrank
