// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Explicit, optional parallelism. There is no global thread pool: a call given `Threads{k}`
/// starts k − 1 `std::thread`s, splits its rows between them and the calling thread, and joins
/// them before it returns. `Threads{1}` (the default everywhere) runs on the calling thread only.

#include <algorithm>
#include <exception>
#include <thread>
#include <vector>

#include "view.hpp"

namespace lowrank {

/// How many threads a call may use (≥ 1). Starting a thread costs tens of microseconds, so calls
/// split their work only in chunks of at least a minimum size and use fewer threads below it.
struct Threads {
    int count = 1;
};

namespace core {

/// Runs f(begin, end) over [0, n) split into at most `threads.count` contiguous chunks of at least
/// `min_chunk` items (chunk boundaries are multiples of `align`). The calling thread runs the last
/// chunk. f must be safe to run concurrently on disjoint ranges; an exception thrown by any chunk
/// is rethrown after all chunks have finished.
template <class F>
void parallel_for(Threads threads, Index n, Index min_chunk, Index align, F&& f) {
    if (n <= 0) return;
    const Index by_size = std::max<Index>(1, n / std::max<Index>(min_chunk, 1));
    const Index parts = std::clamp<Index>(Index(threads.count), 1, by_size);
    if (parts == 1) {
        f(Index(0), n);
        return;
    }
    align = std::max<Index>(align, 1);
    std::vector<Index> bounds(static_cast<std::size_t>(parts + 1));
    for (Index p = 0; p <= parts; ++p) {
        const Index b = n * p / parts;
        bounds[std::size_t(p)] = p == parts ? n : std::min(n, (b + align - 1) / align * align);
    }
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(parts));
    std::vector<std::thread> workers;
    workers.reserve(std::size_t(parts - 1));
    auto run = [&](Index p) {
        try {
            const Index b = bounds[std::size_t(p)], e = bounds[std::size_t(p + 1)];
            if (b < e) f(b, e);
        } catch (...) {
            errors[std::size_t(p)] = std::current_exception();
        }
    };
    for (Index p = 0; p + 1 < parts; ++p) workers.emplace_back(run, p);
    run(parts - 1);
    for (auto& w : workers) w.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace core
}  // namespace lowrank
