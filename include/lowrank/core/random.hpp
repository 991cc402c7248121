// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// A fully specified random generator, so that seeded initialisations give the same numbers on
/// every platform and standard library (the `std::` distributions are implementation-defined).
///
/// - Seeding: SplitMix64 (Steele, Lea, Flood 2014) expands the 64-bit seed into the state.
/// - Generator: xoshiro256** (Blackman, Vigna 2018).
/// - `uniform()`: the top 53 bits of one output scaled by 2⁻⁵³, a double in [0, 1).
/// - `normal()`: Box–Muller on two uniforms, u₁ ∈ (0, 1] and u₂ ∈ [0, 1):
///   √(−2 ln u₁) · cos(2π u₂), then √(−2 ln u₁) · sin(2π u₂) on the next call. Only `log`, `cos`,
///   `sin` and `sqrt` of the C library are involved (correctly rounded or within an ulp on
///   glibc, musl and MSVC), and results are computed in double before any cast to float.

#include <cmath>
#include <cstdint>
#include <numbers>

namespace lowrank {

class Random {
public:
    explicit Random(std::uint64_t seed) noexcept {
        for (auto& word : state_) word = splitmix64(seed);
    }

    /// The next 64 random bits (xoshiro256**).
    std::uint64_t next() noexcept {
        const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
        const std::uint64_t t = state_[1] << 17;
        state_[2] ^= state_[0];
        state_[3] ^= state_[1];
        state_[1] ^= state_[2];
        state_[0] ^= state_[3];
        state_[2] ^= t;
        state_[3] = rotl(state_[3], 45);
        return result;
    }

    /// Uniform on [0, 1).
    double uniform() noexcept { return double(next() >> 11) * 0x1.0p-53; }
    /// Uniform on [lo, hi).
    double uniform(double lo, double hi) noexcept { return lo + (hi - lo) * uniform(); }

    /// Standard normal (Box–Muller, both outputs used in turn).
    double normal() noexcept {
        if (has_spare_) {
            has_spare_ = false;
            return spare_;
        }
        const double u1 = 1.0 - uniform();  // (0, 1]: log is finite
        const double u2 = uniform();
        const double radius = std::sqrt(-2.0 * std::log(u1));
        const double angle = 2.0 * std::numbers::pi * u2;
        spare_ = radius * std::sin(angle);
        has_spare_ = true;
        return radius * std::cos(angle);
    }

private:
    static std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }
    static std::uint64_t splitmix64(std::uint64_t& x) noexcept {
        std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }

    std::uint64_t state_[4];
    double spare_ = 0.0;
    bool has_spare_ = false;
};

}  // namespace lowrank
