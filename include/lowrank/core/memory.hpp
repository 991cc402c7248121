// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Memory for large operands streamed from DRAM: transparent huge pages.
///
/// A weight read once per call (the small-batch forward, a GEMV) streams tens of MiB from memory.
/// In 4 KiB pages that is a TLB miss, and a restart of the hardware prefetcher (which does not
/// cross a page), every 4 KiB of every stream; in 2 MiB pages, every 2 MiB. Linux backs memory with
/// transparent huge pages everywhere only in its `always` mode; in the common `madvise` mode only
/// ranges advised with `madvise(MADV_HUGEPAGE)`, and the advice has to come before the pages are
/// first written (pages already mapped are merged later, if ever, by a background thread).
///
/// - `advise_huge_pages(p, bytes)`: advises the whole 2 MiB pages inside [p, p + bytes). For a
///   weight in your own allocation (an Eigen matrix W of d × d), call it before filling it:
///
///       lowrank::Matrix<float> W(4096, 4096);                    // allocated, not yet written
///       lowrank::advise_huge_pages(W.data(), sizeof(float) * W.size());
///       load_weights_into(W);                                   // first write: huge pages
///
/// - `core::HugePageAllocator<T>`: a standard allocator whose allocations of 2 MiB or more are
///   2 MiB-aligned, rounded up to whole huge pages and advised before anything writes them;
///   smaller ones are only 64-byte aligned. `PackedWeight` keeps its copy of W in one.
///
/// The advice is a hint: where the kernel has no huge pages to give (THP `never`, fragmented
/// memory, not Linux) the memory is ordinary pages and everything works the same, only slower.
/// Measured: the forward from a 4096² PackedWeight (then Wᵀ in strips), float, r = 16, a Zen 4 VM
/// in `madvise` mode, both weights in one process, 15 alternating rounds, medians, huge / 4 KiB
/// pages: n = 1 0.86, n = 8 0.96, n = 16 0.94 (5.49 → 5.18 ms), n = 32 0.98; from the row-major W
/// in an advised allocation (today's PackedWeight layout): n = 1 0.92, n = 8 0.93, n = 16 0.97.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#elif defined(_WIN32)
#include <malloc.h>
#endif

namespace lowrank {

namespace core {
/// The size of a transparent huge page on x86-64 and the default on AArch64 Linux.
inline constexpr std::size_t huge_page_bytes = std::size_t(2) << 20;
/// Alignment of every HugePageAllocator allocation below huge_page_bytes (a cache line, an AVX-512
/// vector).
inline constexpr std::size_t small_alignment = 64;
}  // namespace core

/// Advises the kernel to back the whole 2 MiB pages within [p, p + bytes) with transparent huge
/// pages (Linux `madvise(MADV_HUGEPAGE)`). Returns whether a non-empty range was advised: false
/// when the range holds no whole, aligned 2 MiB page, when the platform has no such advice, or
/// when the kernel refused it (e.g. THP compiled out). Memory already written keeps its pages
/// until the kernel's background merging gets to it: advise before the first write.
inline bool advise_huge_pages(const void* p, std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const auto begin = reinterpret_cast<std::uintptr_t>(p);
    if (p == nullptr || bytes > std::numeric_limits<std::uintptr_t>::max() - begin) return false;
    const std::uintptr_t mask = core::huge_page_bytes - 1;
    const std::uintptr_t first = (begin + mask) & ~mask, last = (begin + bytes) & ~mask;
    if (first >= last) return false;
    // NOLINTNEXTLINE(performance-no-int-to-ptr): madvise takes the page-aligned address itself
    return ::madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
    (void)p;
    (void)bytes;
    return false;
#endif
}

namespace core {

/// A standard allocator for large, long-lived operands (a packed weight): allocations of
/// huge_page_bytes or more are huge_page_bytes-aligned, a whole number of huge pages long and
/// advised for transparent huge pages before they are returned (so the container's first write
/// maps huge pages); smaller ones are small_alignment-aligned. Stateless: all instances are equal.
template <class T>
struct HugePageAllocator {
    using value_type = T;

    HugePageAllocator() noexcept = default;
    template <class U>
    HugePageAllocator(const HugePageAllocator<U>& /*other*/) noexcept {}  // NOLINT(google-explicit-constructor)

    [[nodiscard]] T* allocate(std::size_t n) {
        if (n > (std::numeric_limits<std::size_t>::max() - huge_page_bytes) / sizeof(T))
            throw std::bad_array_new_length();
        const std::size_t bytes = std::max<std::size_t>(n * sizeof(T), 1);
        const bool huge = bytes >= huge_page_bytes;
        const std::size_t align = huge ? huge_page_bytes : std::max(small_alignment, alignof(T));
        const std::size_t rounded = (bytes + align - 1) / align * align;  // aligned_alloc's contract
#if defined(_WIN32)
        void* p = _aligned_malloc(rounded, align);  // MSVC's C library has no aligned_alloc
#else
        void* p = std::aligned_alloc(align, rounded);
#endif
        if (p == nullptr) throw std::bad_alloc();
        if (huge) advise_huge_pages(p, rounded);
        return static_cast<T*>(p);
    }
    void deallocate(T* p, std::size_t /*n*/) noexcept {
#if defined(_WIN32)
        _aligned_free(p);
#else
        std::free(p);
#endif
    }

    template <class U>
    friend bool operator==(const HugePageAllocator& /*a*/, const HugePageAllocator<U>& /*b*/) noexcept {
        return true;
    }
};

}  // namespace core
}  // namespace lowrank
