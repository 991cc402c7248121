// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Streaming uncentred second moment of token encodings, C = (1/N) Σ e eᵀ, with an optional ridge,
/// a cached Cholesky factorisation, and a small binary file format ("layer statistics").
///
/// ROME (Meng et al. 2022, eq. 2) and Perfusion (Tewel et al. 2023, eq. 5) whiten their rank-one
/// edits with C⁻¹, where C is the **uncentred** second moment of the layer's inputs over a large
/// dictionary of encodings. It is accumulated batch by batch (`add`), shard by shard (`merge`),
/// saved once (`save`) and reloaded by every edit of the layer (`load`):
///
/// \code
///   lowrank::SecondMoment<float> stats(768);
///   for (const auto& batch : batches) stats.add(batch);   // n × 768 encodings per batch
///   stats.set_ridge(1e-4);                                 // C + λI (needed when N < in)
///   stats.save("text_encoder.c.lrsm");
///   auto same = lowrank::SecondMoment<float>::load("text_encoder.c.lrsm");
///   lowrank::Matrix<double> x = same.solve(b);             // (C + λI)⁻¹ b, Cholesky cached
/// \endcode
///
/// Numerics: sums are kept in double whatever T is (a float product e_i e_j is exact in double),
/// so the accumulated Σ e eᵀ has relative error ≈ N·2⁻⁵³ however long the stream.
///
/// File format (version 1, all integers and doubles little-endian):
///
/// | offset | size | content |
/// |---|---|---|
/// | 0 | 8 | magic `"LRSECMOM"` |
/// | 8 | 4 | uint32 format version (1) |
/// | 12 | 4 | uint32 reserved, 0 |
/// | 16 | 8 | uint64 `in` (number of features, 1 ≤ in ≤ 2²⁰) |
/// | 24 | 8 | uint64 `N` (number of encodings accumulated) |
/// | 32 | 8 | float64 ridge λ (finite, ≥ 0) |
/// | 40 | 8·in(in+1)/2 | float64 lower triangle of the **sum** Σ e eᵀ, row by row (i, j ≤ i) |
/// | end − 8 | 8 | uint64 FNV-1a 64-bit hash of every preceding byte |
///
/// `load` checks the file size against `in` before allocating, the magic, version, reserved
/// field, hash, and that every value is finite with a non-negative diagonal (and all zero when
/// N = 0); any failure raises `lowrank::error` naming the file and the problem.

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/view.hpp"

namespace lowrank {

namespace detail {

inline constexpr char second_moment_magic[8] = {'L', 'R', 'S', 'E', 'C', 'M', 'O', 'M'};
inline constexpr std::uint32_t second_moment_version = 1;
inline constexpr std::uint64_t second_moment_max_features = std::uint64_t(1) << 20;
inline constexpr std::size_t second_moment_header_bytes = 40;

[[nodiscard]] inline std::uint64_t fnv1a64(const unsigned char* data, std::size_t size) noexcept {
    std::uint64_t h = 0xcbf29ce484222325ULL;
    for (std::size_t i = 0; i < size; ++i) {
        h ^= data[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

inline void put_u64(std::vector<unsigned char>& out, std::uint64_t v) {
    for (int b = 0; b < 8; ++b) out.push_back(static_cast<unsigned char>(v >> (8 * b)));
}
inline void put_u32(std::vector<unsigned char>& out, std::uint32_t v) {
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<unsigned char>(v >> (8 * b)));
}
[[nodiscard]] inline std::uint64_t get_u64(const unsigned char* p) noexcept {
    std::uint64_t v = 0;
    for (int b = 7; b >= 0; --b) v = (v << 8) | p[b];
    return v;
}
[[nodiscard]] inline std::uint32_t get_u32(const unsigned char* p) noexcept {
    std::uint32_t v = 0;
    for (int b = 3; b >= 0; --b) v = (v << 8) | p[b];
    return v;
}

/// The Cholesky factor of a symmetric matrix `a` (lower triangle read), in double. Throws
/// `lowrank::error` "fn: <what> is singular to working precision (...); <hint>" unless every
/// pivot exceeds 4·n·2⁻⁵³ times the largest diagonal entry (so a numerically singular PSD matrix,
/// whose rounded pivots may be tiny and positive, is rejected as well as an indefinite one).
[[nodiscard]] inline Eigen::LLT<Eigen::MatrixXd, Eigen::Lower> checked_cholesky(
    const char* fn, const std::string& what, Eigen::MatrixXd a, const std::string& hint) {
    const Index n = a.rows();
    const double max_diag = n > 0 ? a.diagonal().maxCoeff() : 0.0;
    Eigen::LLT<Eigen::MatrixXd, Eigen::Lower> f(a);
    const double tol = 4.0 * double(n) * std::numeric_limits<double>::epsilon() / 2;
    double min_pivot = std::numeric_limits<double>::infinity();
    if (f.info() == Eigen::Success) {
        const Eigen::MatrixXd& l = f.matrixLLT();
        for (Index i = 0; i < n; ++i) min_pivot = std::min(min_pivot, l(i, i) * l(i, i));
    }
    if (f.info() != Eigen::Success || !(max_diag > 0) || !(min_pivot > tol * max_diag))
        fail(fn, ": ", what, " is singular to working precision (smallest Cholesky pivot ",
             f.info() == Eigen::Success ? min_pivot : 0.0, ", largest diagonal ", max_diag, "); ",
             hint);
    return f;
}

}  // namespace detail

/// Streaming accumulator of the uncentred second moment C = (1/N) Σ_t e_t e_tᵀ (in × in) of token
/// encodings e_t ∈ R^in, with an optional ridge λ and a cached Cholesky factor of C + λI.
///
/// T is the scalar type of `matrix()`; `add` accepts float or double encodings, and every sum is
/// kept in double. Mutating calls (`add`, `merge`, `set_ridge`) drop the cached factor; `solve`
/// and `factorize` are const and thread-safe (the factor is computed once, under a lock, and
/// shared by copies).
template <Real T>
class SecondMoment {
public:
    using scalar = T;

    /// An empty accumulator for encodings of `in_features` features (≥ 1).
    explicit SecondMoment(Index in_features) {
        if (in_features < 1 || std::uint64_t(in_features) > detail::second_moment_max_features)
            detail::fail("lowrank::SecondMoment: in_features must be in [1, 2^20], got ",
                         in_features);
        sum_.setZero(in_features, in_features);
    }

    SecondMoment(const SecondMoment& other)
        : sum_(other.sum_), count_(other.count_), ridge_(other.ridge_), factor_(other.cached_factor()) {}
    SecondMoment& operator=(const SecondMoment& other) {
        if (this != &other) {
            auto f = other.cached_factor();
            sum_ = other.sum_;
            count_ = other.count_;
            ridge_ = other.ridge_;
            std::lock_guard lock(mutex_);
            factor_ = std::move(f);
        }
        return *this;
    }
    SecondMoment(SecondMoment&& other) noexcept
        : sum_(std::move(other.sum_)), count_(other.count_), ridge_(other.ridge_),
          factor_(std::move(other.factor_)) {}
    SecondMoment& operator=(SecondMoment&& other) noexcept {
        sum_ = std::move(other.sum_);
        count_ = other.count_;
        ridge_ = other.ridge_;
        factor_ = std::move(other.factor_);
        return *this;
    }
    ~SecondMoment() = default;

    [[nodiscard]] Index in_features() const noexcept { return sum_.rows(); }
    /// N, the number of encodings accumulated.
    [[nodiscard]] std::uint64_t count() const noexcept { return count_; }
    /// λ of C + λI (0 unless set).
    [[nodiscard]] double ridge() const noexcept { return ridge_; }

    /// Accumulates the rows of E (n × in, float or double, any Eigen expression): Σ += Eᵀ E,
    /// N += n. Cost n·in² flops (half of them: only the lower triangle is updated), in double.
    /// Throws `lowrank::error` if E has the wrong number of columns or a non-finite entry
    /// (nothing is accumulated then).
    template <class D>
    void add(const Eigen::MatrixBase<D>& E) {
        const char* fn = "lowrank::SecondMoment::add";
        detail::check_shape(fn, "E", E.derived(), -1, in_features());
        // Evaluated once (an expression is not re-evaluated per pass); row-major memory is used
        // in place, anything else is copied.
        using S = typename D::Scalar;
        static_assert(Real<S>, "lowrank::SecondMoment::add: E must hold float or double");
        const Eigen::Ref<const Matrix<S>, 0, Eigen::OuterStride<>> e(E.derived());
        if (!e.allFinite()) detail::fail(fn, ": E (", detail::shape_of(e), ") has a non-finite entry");
        constexpr Index chunk = 256;  // rows converted to double at a time
        Eigen::MatrixXd block;
        for (Index r0 = 0; r0 < e.rows(); r0 += chunk) {
            const Index nr = std::min(chunk, Index(e.rows()) - r0);
            block = e.middleRows(r0, nr).template cast<double>().transpose();  // in × nr
            sum_.template selfadjointView<Eigen::Lower>().rankUpdate(block);
        }
        count_ += std::uint64_t(E.rows());
        invalidate();
    }

    /// Adds another accumulator of the same width (shards computed separately): Σ += Σ', N += N'.
    /// The ridge is left as it is here.
    void merge(const SecondMoment& other) {
        if (other.in_features() != in_features())
            detail::fail("lowrank::SecondMoment::merge: cannot merge statistics of ",
                         other.in_features(), " features into statistics of ", in_features(),
                         " features");
        if (&other == this) {
            sum_ *= 2.0;
            count_ *= 2;
        } else {
            sum_.template triangularView<Eigen::Lower>() += other.sum_;
            count_ += other.count_;
        }
        invalidate();
    }

    /// Sets the ridge λ ≥ 0 (finite): `factorize` and `solve` then use C + λI. λ is absolute, in
    /// the units of C (e.g. 1e-4 · trace(C) / in is a mild relative ridge).
    void set_ridge(double lambda) {
        if (!std::isfinite(lambda) || lambda < 0)
            detail::fail("lowrank::SecondMoment::set_ridge: lambda must be finite and >= 0, got ",
                         lambda);
        ridge_ = lambda;
        invalidate();
    }

    /// The raw sum Σ e eᵀ (in × in, symmetric), in double.
    [[nodiscard]] Matrix<double> sum() const {
        Matrix<double> s = sum_.template selfadjointView<Eigen::Lower>();
        return s;
    }

    /// C = Σ / N (in × in, symmetric, without the ridge). Throws if N = 0.
    [[nodiscard]] Matrix<T> matrix() const {
        if (count_ == 0) detail::fail("lowrank::SecondMoment::matrix: no encodings accumulated (N = 0)");
        return (sum() / double(count_)).template cast<T>();
    }

    /// Computes (once) the Cholesky factor of C + λI in double. Throws `lowrank::error` if N = 0 or
    /// if C + λI is singular to working precision (smallest pivot ≤ 4·in·2⁻⁵³ times the largest
    /// diagonal entry), with a message suggesting a ridge. Cost in³/3 flops, then cached.
    void factorize() const { (void)factor(); }

    /// X = (C + λI)⁻¹ B for B in × k (any scalar type), in double, through the cached Cholesky
    /// factor (computed on first use). Cost 2·in²·k flops after the factorisation.
    template <class D>
    [[nodiscard]] Matrix<double> solve(const Eigen::MatrixBase<D>& B) const {
        detail::check_shape("lowrank::SecondMoment::solve", "B", B.derived(), in_features(), -1);
        const auto f = factor();
        Eigen::MatrixXd x = f->solve(B.derived().template cast<double>().eval());
        Matrix<double> out = x;
        return out;
    }

    /// Writes the statistics to `path` in the format documented in this file's header.
    /// Throws `lowrank::error` if the file cannot be written.
    void save(const std::string& path) const {
        const Index n = in_features();
        std::vector<unsigned char> bytes;
        bytes.reserve(detail::second_moment_header_bytes + 8 * std::size_t(n * (n + 1) / 2) + 8);
        bytes.insert(bytes.end(), std::begin(detail::second_moment_magic),
                     std::end(detail::second_moment_magic));
        detail::put_u32(bytes, detail::second_moment_version);
        detail::put_u32(bytes, 0);
        detail::put_u64(bytes, std::uint64_t(n));
        detail::put_u64(bytes, count_);
        detail::put_u64(bytes, std::bit_cast<std::uint64_t>(ridge_));
        for (Index i = 0; i < n; ++i)
            for (Index j = 0; j <= i; ++j) detail::put_u64(bytes, std::bit_cast<std::uint64_t>(sum_(i, j)));
        detail::put_u64(bytes, detail::fnv1a64(bytes.data(), bytes.size()));
        std::ofstream file(path, std::ios::binary | std::ios::trunc);
        if (!file) detail::fail("lowrank::SecondMoment::save: cannot open '", path, "' for writing");
        file.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
        file.close();
        if (!file) detail::fail("lowrank::SecondMoment::save: writing '", path, "' failed");
    }

    /// Reads statistics written by `save`. Every field is validated before use (see the file
    /// header); a missing, truncated, oversized or corrupted file raises `lowrank::error`.
    [[nodiscard]] static SecondMoment load(const std::string& path) {
        const char* fn = "lowrank::SecondMoment::load";
        std::ifstream file(path, std::ios::binary);
        if (!file) detail::fail(fn, ": cannot open '", path, "'");
        file.seekg(0, std::ios::end);
        const std::streamoff size = file.tellg();
        file.seekg(0, std::ios::beg);
        if (size < 0) detail::fail(fn, ": cannot determine the size of '", path, "'");
        const auto file_size = static_cast<std::uint64_t>(size);
        if (file_size < detail::second_moment_header_bytes + 8)
            detail::fail(fn, ": '", path, "' is truncated (", file_size,
                         " bytes, shorter than the 48-byte header and hash)");
        unsigned char header[detail::second_moment_header_bytes];
        file.read(reinterpret_cast<char*>(header), sizeof header);
        if (!file) detail::fail(fn, ": reading the header of '", path, "' failed");
        if (std::memcmp(header, detail::second_moment_magic, 8) != 0)
            detail::fail(fn, ": '", path, "' is not a lowrank second-moment file (bad magic)");
        const std::uint32_t version = detail::get_u32(header + 8);
        if (version != detail::second_moment_version)
            detail::fail(fn, ": '", path, "' has format version ", version, ", this library reads version ",
                         detail::second_moment_version);
        if (detail::get_u32(header + 12) != 0)
            detail::fail(fn, ": '", path, "' has a non-zero reserved field");
        const std::uint64_t n = detail::get_u64(header + 16);
        if (n < 1 || n > detail::second_moment_max_features)
            detail::fail(fn, ": '", path, "' declares ", n, " features (expected 1 to 2^20)");
        const std::uint64_t expected = detail::second_moment_header_bytes + 8 * (n * (n + 1) / 2) + 8;
        if (file_size != expected)
            detail::fail(fn, ": '", path, "' is ", file_size, " bytes but ", n, " features need ",
                         expected, " bytes (", file_size < expected ? "truncated" : "trailing data",
                         ")");
        std::vector<unsigned char> bytes(expected);
        std::memcpy(bytes.data(), header, sizeof header);
        file.read(reinterpret_cast<char*>(bytes.data() + sizeof header),
                  std::streamsize(expected - sizeof header));
        if (!file) detail::fail(fn, ": reading '", path, "' failed (truncated while reading)");
        const std::uint64_t stored_hash = detail::get_u64(bytes.data() + expected - 8);
        if (stored_hash != detail::fnv1a64(bytes.data(), expected - 8))
            detail::fail(fn, ": '", path, "' is corrupted (hash mismatch)");
        const std::uint64_t count = detail::get_u64(header + 24);
        const double ridge = std::bit_cast<double>(detail::get_u64(header + 32));
        if (!std::isfinite(ridge) || ridge < 0)
            detail::fail(fn, ": '", path, "' has an invalid ridge ", ridge);
        SecondMoment stats(static_cast<Index>(n));
        const unsigned char* p = bytes.data() + detail::second_moment_header_bytes;
        for (Index i = 0; i < Index(n); ++i)
            for (Index j = 0; j <= i; ++j, p += 8) {
                const double v = std::bit_cast<double>(detail::get_u64(p));
                if (!std::isfinite(v) || (i == j && v < 0) || (count == 0 && v != 0))
                    detail::fail(fn, ": '", path, "' has an invalid entry ", v, " at (", i, ", ", j,
                                 ") for N = ", count);
                stats.sum_(i, j) = v;
            }
        stats.count_ = count;
        stats.ridge_ = ridge;
        return stats;
    }

private:
    using Factor = Eigen::LLT<Eigen::MatrixXd, Eigen::Lower>;

    void invalidate() {
        std::lock_guard lock(mutex_);
        factor_.reset();
    }

    [[nodiscard]] std::shared_ptr<const Factor> cached_factor() const {
        std::lock_guard lock(mutex_);
        return factor_;
    }

    [[nodiscard]] std::shared_ptr<const Factor> factor() const {
        std::lock_guard lock(mutex_);
        if (factor_) return factor_;
        const char* fn = "lowrank::SecondMoment::factorize";
        const Index n = in_features();
        if (count_ == 0)
            detail::fail(fn, ": no encodings accumulated (N = 0); add encodings or load statistics");
        Eigen::MatrixXd a = sum_.template selfadjointView<Eigen::Lower>();
        a /= double(count_);
        a.diagonal().array() += ridge_;
        std::ostringstream what;
        what << "the second moment C (" << n << " x " << n << ", N = " << count_
             << " encodings, ridge " << ridge_ << ")";
        const std::string hint =
            std::string(count_ < std::uint64_t(n) ? "N < in makes C singular; " : "") +
            "use a ridge C + lambda I: set_ridge(lambda) with lambda > 0";
        auto f = std::make_shared<Factor>(detail::checked_cholesky(fn, what.str(), std::move(a), hint));
        factor_ = std::move(f);
        return factor_;
    }

    Eigen::MatrixXd sum_;  // lower triangle of Σ e eᵀ (the upper triangle is not maintained)
    std::uint64_t count_ = 0;
    double ridge_ = 0;
    mutable std::mutex mutex_;
    mutable std::shared_ptr<const Factor> factor_;
};

}  // namespace lowrank
