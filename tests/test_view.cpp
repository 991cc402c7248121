// SPDX-License-Identifier: Apache-2.0
// Views of Eigen objects: layouts, leading dimensions, and the compile-time rejection of
// column-major storage (checked as traits, mdspan-style).

#include <lowrank/core/args.hpp>

#include <catch2/catch.hpp>

using namespace lowrank;

template <class M>
concept Viewable = requires(const M& m) { lowrank::view(m); };

// Column-major matrices are rejected at compile time (view() static_asserts, so the check is on
// the trait the assertion uses, not on instantiating it).
static_assert(!detail::is_row_contiguous_v<Eigen::MatrixXf>,
              "a dynamic column-major matrix must not be viewable as row-major");
static_assert(detail::is_row_contiguous_v<Matrix<float>>, "row-major matrices are viewable");
static_assert(detail::is_row_contiguous_v<Eigen::VectorXd>, "column vectors are viewable");
static_assert(detail::is_row_contiguous_v<Eigen::Map<const Matrix<double>>>,
              "maps of row-major storage are viewable");
static_assert(RowMajorDense<Matrix<float>>, "plain matrices have direct access");
static_assert(!RowMajorDense<decltype(Matrix<float>() * 2.f)>,
              "an unevaluated expression has no direct access");

TEST_CASE("views of row-major matrices, maps and blocks", "[view]") {
    Matrix<float> m(4, 6);
    for (Index i = 0; i < 4; ++i)
        for (Index j = 0; j < 6; ++j) m(i, j) = float(10 * i + j);
    const auto v = view(m);
    REQUIRE(v.rows == 4);
    REQUIRE(v.cols == 6);
    REQUIRE(v.ld == 6);
    REQUIRE(v(2, 3) == 23.f);

    const auto b = view(m.block(1, 2, 2, 3));
    REQUIRE(b.ld == 6);
    REQUIRE(b(0, 0) == 12.f);
    REQUIRE(b(1, 2) == 24.f);

    std::vector<double> host(3 * 5);
    for (std::size_t i = 0; i < host.size(); ++i) host[i] = double(i);
    Eigen::Map<Matrix<double>, 0, Eigen::OuterStride<>> strided(host.data(), 3, 4,
                                                                Eigen::OuterStride<>(5));
    const auto sv = view(strided);
    REQUIRE(sv.ld == 5);
    REQUIRE(sv(2, 1) == 11.0);

    Eigen::VectorXd col = Eigen::VectorXd::LinSpaced(4, 0, 3);
    const auto cv = view(col);
    REQUIRE(cv.cols == 1);
    REQUIRE(cv(3, 0) == 3.0);

    auto mv = view_mut(m).middle_rows(2, 2);
    mv(0, 0) = -1.f;
    REQUIRE(m(2, 0) == -1.f);
}

TEST_CASE("blocks of an empty view without storage stay without storage", "[view]") {
    // An empty batch's scratch has no storage; its column blocks must not offset the null pointer
    // (undefined behaviour, reported by clang's UBSan in LoRA-XS's backward with n = 0).
    const MatrixView<float> empty{nullptr, 0, 12, 12};
    const auto b = empty.block(0, 4, 0, 4);
    REQUIRE(b.data == nullptr);
    REQUIRE(b.rows == 0);
    REQUIRE(b.cols == 4);
    REQUIRE(b.ld == 12);
    REQUIRE(empty.middle_rows(0, 0).data == nullptr);
    // A block of a view with storage is still offset (row 1, column 2 of a 3 x 4 buffer).
    std::vector<float> buf(12, 0.f);
    const MatrixView<float> full{buf.data(), 3, 4, 4};
    REQUIRE(full.block(1, 2, 2, 2).data == buf.data() + 6);
    REQUIRE(full.block(3, 0, 0, 4).data == buf.data() + 12);
}

TEST_CASE("a non-contiguous row is rejected at run time with lowrank::error", "[view]") {
    Matrix<float> m = Matrix<float>::Zero(4, 6);
    Eigen::Map<Matrix<float>, 0, Eigen::Stride<12, 2>> every_other(m.data(), 2, 3);
    REQUIRE_THROWS_AS(view(every_other), lowrank::error);
}

TEST_CASE("overlap detection between destination and source views", "[view]") {
    Matrix<float> m = Matrix<float>::Zero(6, 6);
    const auto top = view_mut(m).middle_rows(0, 3);
    const auto bottom = view_mut(m).middle_rows(3, 3);
    REQUIRE_NOTHROW(detail::check_no_overlap("f", "Y", top, "X", MatrixView<const float>(bottom)));
    REQUIRE_THROWS_WITH(
        detail::check_no_overlap("f", "Y", top, "X", MatrixView<const float>(view_mut(m))),
        Catch::Contains("f: Y overlaps X"));
}
