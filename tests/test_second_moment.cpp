// SPDX-License-Identifier: Apache-2.0
// SecondMoment: streaming accumulation against a naive double EᵀE/N, shards merged against one
// pass, ridge and Cholesky solves against residuals, the file format (round trip and every kind
// of damaged file), and bad arguments.

#include <lowrank/linalg/second_moment.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::max_abs;
using lowrank::test::naive_product;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

namespace {

constexpr double u_double = 0x1.0p-53;

/// Σ e eᵀ summed in double: each term e_i e_j carries at most one rounding (none for float data),
/// the sum of N terms (N + 1) more, so |computed − exact| ≤ 2 (N + 2) 2⁻⁵³ Σ |e_i e_j|.
Matrix<double> sum_bound(const Matrix<double>& abs_e) {
    const double N = double(abs_e.rows());
    Matrix<double> b = naive_product(abs_e.transpose(), abs_e) * (2.0 * (N + 2) * u_double);
    b.array() += std::numeric_limits<double>::min();
    return b;
}

std::string temp_path(const std::string& name) {
    return test::unique_temp_path("r1_" + name).string();
}

std::vector<unsigned char> read_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}
/// FNV-1a 64 written from its specification (offset basis 0xcbf29ce484222325, prime 2⁴⁰+2⁸+0xb3).
std::uint64_t fnv1a(const std::vector<unsigned char>& b, std::size_t n) {
    std::uint64_t h = 14695981039346656037ULL;
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}
void rehash(std::vector<unsigned char>& b) {
    const std::uint64_t h = fnv1a(b, b.size() - 8);
    for (int i = 0; i < 8; ++i) b[b.size() - 8 + std::size_t(i)] = static_cast<unsigned char>(h >> (8 * i));
}

}  // namespace

TEMPLATE_TEST_CASE("streaming accumulation equals the naive double EᵀE / N", "[second_moment]",
                   float, double) {
    using T = TestType;
    const Index in = GENERATE(1, 7, 33);
    const Index N = GENERATE(1, 5, 300);  // 300 > the internal 256-row chunk
    CAPTURE(in, N);
    const Matrix<T> E = random_matrix<T>(N, in, 1);
    const Matrix<double> e = to_double(E);
    SecondMoment<T> m(in);
    REQUIRE(m.count() == 0);
    m.add(E);
    REQUIRE(m.count() == std::uint64_t(N));
    REQUIRE(m.in_features() == in);
    const Matrix<double> want = naive_product(e.transpose(), e);
    const Matrix<double> bound = sum_bound(e.cwiseAbs());
    require_within(m.sum(), want, bound, "sum");
    // matrix() = Σ / N rounded to T.
    require_within(m.matrix(), want / double(N),
                   bound / double(N) + eps<T>() * (want / double(N)).cwiseAbs() * 2, "matrix");
    // Symmetric exactly.
    const Matrix<double> s = m.sum();
    REQUIRE(s == s.transpose());
}

TEMPLATE_TEST_CASE("shards accumulated separately and merged equal one pass", "[second_moment]",
                   float, double) {
    using T = TestType;
    const Index in = 19;
    const Matrix<T> E = random_matrix<T>(420, in, 2);
    SecondMoment<T> one(in);
    one.add(E);
    // Three shards of uneven sizes (one empty), each in uneven batches; and a column-major input.
    SecondMoment<T> a(in), b(in), c(in);
    a.add(E.topRows(7));
    a.add(E.middleRows(7, 150));
    b.add(E.middleRows(157, 0));
    using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
    const ColMajor tail = E.bottomRows(420 - 157);
    c.add(tail);
    a.merge(b);
    a.merge(c);
    REQUIRE(a.count() == one.count());
    const Matrix<double> e = to_double(E);
    const Matrix<double> want = naive_product(e.transpose(), e);
    // Both are within the summation bound of the exact sum, so within twice of each other.
    require_within(a.sum(), one.sum(), 2 * sum_bound(e.cwiseAbs()), "shards vs one pass");
    require_within(a.sum(), want, sum_bound(e.cwiseAbs()), "shards vs exact");
    // Merging with itself doubles.
    SecondMoment<T> twice = one;
    twice.merge(twice);
    REQUIRE(twice.count() == 2 * one.count());
    REQUIRE(twice.sum() == 2.0 * one.sum());
}

TEST_CASE("solve uses C + λI through a cached Cholesky factor", "[second_moment][solve]") {
    const Index in = 12;
    SecondMoment<float> m(in);
    m.add(random_matrix<float>(40, in, 3));
    const Matrix<double> b = random_matrix<double>(in, 3, 4);
    for (const double lambda : {0.0, 0.5}) {
        m.set_ridge(lambda);
        REQUIRE(m.ridge() == lambda);
        const Matrix<double> x = m.solve(b);
        const Matrix<double> A = m.sum() / double(m.count()) + lambda * Matrix<double>::Identity(in, in);
        // Backward-stable Cholesky: ‖A x − b‖ ≤ c · in · 2⁻⁵³ · ‖A‖ ‖x‖ (c = 8, norms ∞ entrywise).
        const Matrix<double> resid = A * x - b;
        REQUIRE(max_abs(resid) <= 8.0 * in * u_double * in * max_abs(A) * max_abs(x));
        const Matrix<double> x2 = m.solve(b);
        REQUIRE(x2 == x);  // same factor, same result
    }
    // The ridge changes the solution: (C + λI)x = b differs from C x = b.
    m.set_ridge(0);
    const Matrix<double> x0 = m.solve(b);
    m.set_ridge(0.5);
    REQUIRE(max_abs(m.solve(b) - x0) > 1e-3 * max_abs(x0));
    // Adding data invalidates the factor.
    m.add(random_matrix<float>(10, in, 5));
    const Matrix<double> A = m.sum() / double(m.count()) + 0.5 * Matrix<double>::Identity(in, in);
    const Matrix<double> x = m.solve(b);
    REQUIRE(max_abs(A * x - b) <= 8.0 * in * u_double * in * max_abs(A) * max_abs(x));
    // A copy shares the factor and the data.
    const SecondMoment<float> copy = m;
    REQUIRE(copy.solve(b) == x);
}

TEMPLATE_TEST_CASE("save and load round-trip every bit", "[second_moment][io]", float, double) {
    using T = TestType;
    const Index in = GENERATE(1, 9);
    SecondMoment<T> m(in);
    m.add(random_matrix<T>(23, in, 6));
    m.set_ridge(1.0 / 3.0);
    const std::string path = temp_path("roundtrip.lrsm");
    m.save(path);
    const auto bytes = read_bytes(path);
    REQUIRE(bytes.size() == std::size_t(40 + 8 * in * (in + 1) / 2 + 8));
    REQUIRE(std::string(bytes.begin(), bytes.begin() + 8) == "LRSECMOM");
    const auto loaded = SecondMoment<T>::load(path);
    REQUIRE(loaded.in_features() == in);
    REQUIRE(loaded.count() == 23);
    REQUIRE(loaded.ridge() == 1.0 / 3.0);
    REQUIRE(loaded.sum() == m.sum());
    const Matrix<double> b = random_matrix<double>(in, 1, 7);
    REQUIRE(loaded.solve(b) == m.solve(b));
    // An empty accumulator round-trips too.
    SecondMoment<T> empty(in);
    empty.save(path);
    REQUIRE(SecondMoment<T>::load(path).count() == 0);
    std::remove(path.c_str());
}

TEST_CASE("damaged files raise lowrank::error before any allocation sized by them",
          "[second_moment][io][errors]") {
    using Catch::Contains;
    const Index in = 5;
    SecondMoment<double> m(in);
    m.add(random_matrix<double>(11, in, 8));
    const std::string good = temp_path("good.lrsm"), bad = temp_path("bad.lrsm");
    m.save(good);
    const auto bytes = read_bytes(good);
    const auto load_bad = [&](std::vector<unsigned char> b) {
        write_bytes(bad, b);
        return SecondMoment<double>::load(bad);
    };
    SECTION("missing file") {
        REQUIRE_THROWS_WITH(SecondMoment<double>::load(temp_path("does_not_exist.lrsm")),
                            Contains("lowrank::SecondMoment::load") && Contains("cannot open"));
    }
    SECTION("truncated: inside the header, inside the payload, the hash cut off") {
        for (const std::size_t keep : {std::size_t(0), std::size_t(20), std::size_t(47),
                                       std::size_t(100), bytes.size() - 1}) {
            CAPTURE(keep);
            REQUIRE_THROWS_WITH(load_bad({bytes.begin(), bytes.begin() + std::ptrdiff_t(keep)}),
                                Contains("truncated"));
        }
    }
    SECTION("trailing data") {
        auto b = bytes;
        b.push_back(0);
        REQUIRE_THROWS_WITH(load_bad(b), Contains("trailing data"));
    }
    SECTION("bad magic, version, reserved field") {
        auto b = bytes;
        b[0] = 'X';
        REQUIRE_THROWS_WITH(load_bad(b), Contains("bad magic"));
        b = bytes;
        b[8] = 2;
        REQUIRE_THROWS_WITH(load_bad(b), Contains("format version 2"));
        b = bytes;
        b[13] = 1;
        REQUIRE_THROWS_WITH(load_bad(b), Contains("reserved"));
    }
    SECTION("a huge declared size is rejected by the size check, not allocated") {
        auto b = bytes;
        b[16] = 0xff;
        b[17] = 0xff;
        b[18] = 0x0f;  // in = 0x0fffff (< 2^20): needs ~4 TB
        REQUIRE_THROWS_WITH(load_bad(b), Contains("1048575 features need") && Contains("truncated"));
        b[18] = 0x10;  // 2^20 + … : out of range
        b[19] = 0x01;
        REQUIRE_THROWS_WITH(load_bad(b), Contains("expected 1 to 2^20"));
        b = bytes;
        for (int i = 16; i < 24; ++i) b[std::size_t(i)] = 0;
        REQUIRE_THROWS_WITH(load_bad(b), Contains("declares 0 features"));
    }
    SECTION("a flipped payload bit fails the hash") {
        auto b = bytes;
        b[60] ^= 0x10;
        REQUIRE_THROWS_WITH(load_bad(b), Contains("corrupted"));
    }
    SECTION("well-hashed but invalid values") {
        auto b = bytes;
        // Diagonal (0, 0) is the first payload double: make it -1.0.
        const std::uint64_t minus_one = 0xbff0000000000000ULL;
        for (int i = 0; i < 8; ++i) b[40 + std::size_t(i)] = static_cast<unsigned char>(minus_one >> (8 * i));
        rehash(b);
        REQUIRE_THROWS_WITH(load_bad(b), Contains("invalid entry") && Contains("at (0, 0)"));
        b = bytes;
        const std::uint64_t nan = 0x7ff8000000000000ULL;
        for (int i = 0; i < 8; ++i) b[32 + std::size_t(i)] = static_cast<unsigned char>(nan >> (8 * i));
        rehash(b);
        REQUIRE_THROWS_WITH(load_bad(b), Contains("invalid ridge"));
        b = bytes;
        for (int i = 24; i < 32; ++i) b[std::size_t(i)] = 0;  // N = 0 with a non-zero sum
        rehash(b);
        REQUIRE_THROWS_WITH(load_bad(b), Contains("for N = 0"));
    }
    std::remove(good.c_str());
    std::remove(bad.c_str());
}

TEST_CASE("bad arguments raise lowrank::error naming the function and the shapes",
          "[second_moment][errors]") {
    using Catch::Contains;
    SECTION("construction") {
        REQUIRE_THROWS_WITH(SecondMoment<float>(0), Contains("lowrank::SecondMoment") && Contains("got 0"));
    }
    SecondMoment<float> m(6);
    SECTION("add with the wrong width or a non-finite entry: nothing accumulated") {
        REQUIRE_THROWS_WITH(m.add(Matrix<float>::Zero(3, 5)),
                            Contains("lowrank::SecondMoment::add") && Contains("E is 3 x 5") &&
                                Contains("expected any x 6"));
        Matrix<float> e = Matrix<float>::Ones(4, 6);
        e(2, 3) = NAN;
        REQUIRE_THROWS_WITH(m.add(e), Contains("non-finite"));
        REQUIRE(m.count() == 0);
        REQUIRE(m.sum().isZero(0));
    }
    SECTION("merge of different widths") {
        SecondMoment<float> other(7);
        REQUIRE_THROWS_WITH(m.merge(other), Contains("lowrank::SecondMoment::merge") && Contains("7 features"));
    }
    SECTION("negative or non-finite ridge") {
        REQUIRE_THROWS_WITH(m.set_ridge(-1), Contains("lambda must be finite and >= 0"));
        REQUIRE_THROWS_WITH(m.set_ridge(INFINITY), Contains("lambda"));
    }
    SECTION("no data; singular C without a ridge (suggesting one); wrong right-hand side") {
        REQUIRE_THROWS_WITH(m.factorize(), Contains("N = 0"));
        REQUIRE_THROWS_WITH(m.matrix(), Contains("N = 0"));
        Matrix<float> e = random_matrix<float>(4, 6, 9);
        e.col(5).setZero();  // C has an exact zero row and column
        m.add(e);
        REQUIRE_THROWS_WITH(m.factorize(),
                            Contains("lowrank::SecondMoment::factorize") && Contains("singular") &&
                                Contains("N < in") && Contains("set_ridge(lambda)"));
        REQUIRE_THROWS_WITH(m.solve(Matrix<double>::Ones(6, 1)), Contains("set_ridge"));
        m.set_ridge(1e-6);
        REQUIRE_NOTHROW(m.factorize());
        REQUIRE_THROWS_WITH(m.solve(Matrix<double>::Ones(5, 1)),
                            Contains("lowrank::SecondMoment::solve") && Contains("B is 5 x 1"));
    }
}
