// SPDX-License-Identifier: Apache-2.0
#pragma once
// Test helpers: seeded random matrices, naive double-precision products, and error bounds derived
// from the floating-point arithmetic (never tuned by trial).

#include <lowrank/core/random.hpp>
#include <lowrank/core/view.hpp>

#include <xsimd/xsimd.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>

namespace lowrank::test {

/// A path in the temporary directory that no other process uses: ctest runs test cases (the
/// float and double instances of one template among them) in parallel processes.
inline std::filesystem::path unique_temp_path(const std::string& name) {
    return std::filesystem::temp_directory_path() / ("lowrank_" + name + "_" + std::to_string(::getpid()));
}

/// Whether this kernel has transparent huge pages at all (otherwise madvise refuses the advice).
inline bool kernel_has_thp() {
#if defined(__linux__)
    return std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled").good();
#else
    return false;
#endif
}

/// Whether the mapping that contains p was advised for huge pages: the `hg` flag among its
/// VmFlags in /proc/self/smaps (what the kernel recorded, not what the library meant to ask).
inline bool advised_for_huge_pages(const void* p) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    std::ifstream smaps("/proc/self/smaps");
    std::string line;
    bool inside = false;
    while (std::getline(smaps, line)) {
        const auto dash = line.find('-'), space = line.find(' ');
        if (dash != std::string::npos && space != std::string::npos && dash < space &&
            line.find_first_not_of("0123456789abcdef") == dash) {  // "lo-hi perms offset ...": a mapping
            const std::uintptr_t lo = std::stoull(line.substr(0, dash), nullptr, 16);
            const std::uintptr_t hi = std::stoull(line.substr(dash + 1, space - dash - 1), nullptr, 16);
            inside = lo <= a && a < hi;
        } else if (inside && line.rfind("VmFlags:", 0) == 0) {
            std::istringstream flags(line.substr(8));
            for (std::string f; flags >> f;)
                if (f == "hg") return true;
            return false;
        }
    }
    return false;
}

/// Uniform(-1, 1) entries from a seeded, platform-independent stream.
template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed) {
    Random rng(seed);
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = T(rng.uniform(-1.0, 1.0));
    return m;
}

/// A (scalar type, architecture) pair for TEMPLATE_TEST_CASE over compiled SIMD paths. SSE2 is on
/// every x86-64; default_arch is what the build flags enable (AVX2+FMA with -march=native here).
/// With no extra flags both are SSE2 and the tests simply run twice.
template <class T, class Arch>
struct Case {
    using scalar = T;
    using arch = Arch;
};
using FloatSse2 = Case<float, xsimd::sse2>;
using DoubleSse2 = Case<double, xsimd::sse2>;
using FloatDefault = Case<float, xsimd::default_arch>;
using DoubleDefault = Case<double, xsimd::default_arch>;
/// The kernel tests' cases: SSE2 and the default, and in a build whose default is AVX-512 also
/// AVX2 + FMA, whose kernels take the 16-register branches (tiles, batch thresholds) the default
/// does not: the build that ships AVX-512 code is then also the one that checks the AVX2 code.
#if XSIMD_WITH_AVX512F && XSIMD_WITH_FMA3_AVX2
using FloatAvx2 = Case<float, xsimd::fma3<xsimd::avx2>>;
using DoubleAvx2 = Case<double, xsimd::fma3<xsimd::avx2>>;
using KernelCases = std::tuple<FloatSse2, DoubleSse2, FloatAvx2, DoubleAvx2, FloatDefault, DoubleDefault>;
#else
using KernelCases = std::tuple<FloatSse2, DoubleSse2, FloatDefault, DoubleDefault>;
#endif

/// A rows × cols block at (1, 2) of a larger random matrix, so that ld ≠ cols and the data is not
/// aligned: exercises leading dimensions and unaligned loads.
template <class T>
struct Strided {
    Matrix<T> storage;
    Index rows, cols;
    std::uint64_t seed;
    Strided(Index r, Index c, std::uint64_t s)
        : storage(random_matrix<T>(r + 3, c + 5, s)), rows(r), cols(c), seed(s) {}
    MatrixView<T> view() { return lowrank::view_mut(storage).block(1, 2, rows, cols); }
    Matrix<double> value() const { return storage.block(1, 2, rows, cols).template cast<double>(); }
    /// Whether the border around the block still holds what the seed drew (a kernel writing into
    /// view() wrote nothing outside it).
    bool border_intact() const {
        const Matrix<T> fresh = random_matrix<T>(rows + 3, cols + 5, seed);
        Matrix<T> now = storage;
        now.block(1, 2, rows, cols) = fresh.block(1, 2, rows, cols);
        return now == fresh;
    }
};

template <class T>
constexpr double eps() {
    return std::numeric_limits<T>::epsilon() / 2;  // unit roundoff u
}

/// Naive triple loop in double: C = A · B.
inline Matrix<double> naive_product(const Matrix<double>& a, const Matrix<double>& b) {
    Matrix<double> c = Matrix<double>::Zero(a.rows(), b.cols());
    for (Index i = 0; i < a.rows(); ++i)
        for (Index j = 0; j < b.cols(); ++j) {
            double s = 0;
            for (Index p = 0; p < a.cols(); ++p) s += a(i, p) * b(p, j);
            c(i, j) = s;
        }
    return c;
}

template <class D>
Matrix<double> to_double(const Eigen::MatrixBase<D>& m) {
    return m.template cast<double>();
}

/// max |m_ij|, 0 for an empty matrix (Eigen's maxCoeff asserts on empty input).
template <class D>
double max_abs(const Eigen::MatrixBase<D>& m) {
    return m.size() == 0 ? 0.0 : double(m.cwiseAbs().maxCoeff());
}

/// Checks |got − want| ≤ bound entrywise, reporting the worst entry. `bound` is a matrix of
/// per-entry bounds (from the error analysis of the computation).
template <class DG>
void require_within(const Eigen::MatrixBase<DG>& got_in, const Matrix<double>& want,
                    const Matrix<double>& bound, const std::string& what) {
    const Matrix<double> got = got_in.template cast<double>();
    REQUIRE(got.rows() == want.rows());
    REQUIRE(got.cols() == want.cols());
    double worst = 0;
    Index wi = -1, wj = -1;
    for (Index i = 0; i < got.rows(); ++i)
        for (Index j = 0; j < got.cols(); ++j) {
            const double err = std::abs(got(i, j) - want(i, j));
            const double r = err / bound(i, j);
            if (!(r <= worst) || std::isnan(err)) {
                worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : r;
                wi = i;
                wj = j;
            }
        }
    INFO(what << ": worst entry (" << wi << ", " << wj << ") error/bound = " << worst);
    REQUIRE(worst <= 1.0);
}

/// The standard bound for computed products: |fl(A·B) − A·B| ≤ γ · |A|·|B| entrywise, with
/// γ = c · (k + 2) · u for a length-k reduction plus the scaling and accumulation (c = 2 covers
/// FMA and non-FMA summation orders). `extra` adds terms such as the magnitude of a prior C.
inline Matrix<double> product_bound(const Matrix<double>& abs_a, const Matrix<double>& abs_b,
                                    double u, double scale = 1.0) {
    constexpr double c = 2.0;
    const double k = double(abs_a.cols());
    Matrix<double> b = naive_product(abs_a, abs_b) * (c * (k + 2) * u * std::abs(scale));
    b.array() += std::numeric_limits<double>::min();  // exact zeros compare with zero bound
    return b;
}

}  // namespace lowrank::test
