// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The library's exception type and its argument checks.

#include <cassert>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace lowrank {

/// Every error raised by lowrank for bad arguments (shapes, ranks, scales) or malformed data.
/// The message names the function, the argument and the shapes involved.
class error : public std::invalid_argument {
public:
    explicit error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {

/// Builds a message from any streamable pieces: `fail("lowrank::forward: X has ", n, " columns")`.
template <class... Parts>
[[noreturn]] inline void fail(Parts&&... parts) {
    std::ostringstream os;
    (os << ... << std::forward<Parts>(parts));
    throw error(os.str());
}

/// "r x c" for messages.
struct shape {
    long long rows, cols;
    friend std::ostream& operator<<(std::ostream& os, const shape& s) {
        return os << s.rows << " x " << s.cols;
    }
};

template <class M>
[[nodiscard]] shape shape_of(const M& m) {
    return {static_cast<long long>(m.rows()), static_cast<long long>(m.cols())};
}

/// Throws unless `m` is `rows x cols` (a negative expectation matches anything).
template <class M>
void check_shape(const char* fn, const char* arg, const M& m, long long rows, long long cols) {
    const bool ok_r = rows < 0 || static_cast<long long>(m.rows()) == rows;
    const bool ok_c = cols < 0 || static_cast<long long>(m.cols()) == cols;
    if (!(ok_r && ok_c)) {
        std::ostringstream want;
        want << (rows < 0 ? std::string("any") : std::to_string(rows)) << " x "
             << (cols < 0 ? std::string("any") : std::to_string(cols));
        fail(fn, ": ", arg, " is ", shape_of(m), ", expected ", want.str());
    }
}

template <class T>
void check_finite(const char* fn, const char* arg, T value) {
    if (!std::isfinite(static_cast<double>(value)))
        fail(fn, ": ", arg, " must be finite, got ", static_cast<double>(value));
}

}  // namespace detail
}  // namespace lowrank

/// Internal invariant check inside kernels; compiled out under NDEBUG.
#ifdef NDEBUG
#define LOWRANK_ASSERT(cond) ((void)0)
#else
#define LOWRANK_ASSERT(cond) assert(cond)
#endif
