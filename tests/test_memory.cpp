// SPDX-License-Identifier: Apache-2.0
// Memory for large operands (core/memory.hpp): HugePageAllocator's alignment and advice,
// advise_huge_pages' range arithmetic, and a PackedWeight large enough to sit in huge pages.
// The advice is read back from the kernel (the `hg` flag of the mapping in /proc/self/smaps,
// tests/support.hpp), with an unadvised allocation of the same size as the control.

#include <lowrank/core/memory.hpp>
#include <lowrank/expr/expr.hpp>
#include <lowrank/lora.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>

#include "lora_support.hpp"

using namespace lowrank;
using namespace lowrank::test;

namespace {

bool aligned_to(const void* p, std::size_t alignment) {
    return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
}

}  // namespace

TEMPLATE_TEST_CASE("HugePageAllocator aligns large allocations to huge pages and advises them", "[memory]", float,
                   double) {
    using T = TestType;
    core::HugePageAllocator<T> alloc;
    const std::size_t large = (std::size_t(3) << 20) / sizeof(T) + 5;  // 3 MiB and a bit: rounded to 4
    T* big = alloc.allocate(large);
    REQUIRE(aligned_to(big, core::huge_page_bytes));
    for (std::size_t i = 0; i < large; ++i) big[i] = T(i % 1000);  // every byte is usable
    double sum = 0;
    for (std::size_t i = 0; i < large; ++i) sum += double(big[i]);
    double expected = 0;
    for (std::size_t i = 0; i < large; ++i) expected += double(i % 1000);
    REQUIRE(sum == expected);

    T* small = alloc.allocate(100);  // below a huge page: a cache line's alignment only
    REQUIRE(aligned_to(small, core::small_alignment));
    small[99] = T(1);

    if (kernel_has_thp()) {
        CHECK(advised_for_huge_pages(big));
        CHECK(advised_for_huge_pages(big + large - 1));  // the whole allocation, its rounded tail included
        // The control: an allocation of the same size that nobody advised has no flag.
        void* plain = std::aligned_alloc(core::huge_page_bytes, std::size_t(4) << 20);
        REQUIRE(plain != nullptr);
        CHECK_FALSE(advised_for_huge_pages(plain));
        std::free(plain);
    }
    alloc.deallocate(small, 100);
    alloc.deallocate(big, large);

    REQUIRE(core::HugePageAllocator<T>() == core::HugePageAllocator<int>());
    REQUIRE_THROWS_AS(alloc.allocate(std::numeric_limits<std::size_t>::max() / sizeof(T)), std::bad_array_new_length);
}

TEST_CASE("advise_huge_pages advises the whole huge pages of a range and nothing else", "[memory]") {
    const std::size_t huge = core::huge_page_bytes;
    REQUIRE_FALSE(advise_huge_pages(nullptr, 8 * huge));
    // 5 huge pages of room, the range starting 1 KiB into the first: pages 2–4 are whole inside it.
    char* room = static_cast<char*>(std::aligned_alloc(huge, 5 * huge));
    REQUIRE(room != nullptr);
    char* begin = room + 1024;
    REQUIRE_FALSE(advise_huge_pages(begin, huge));           // no whole aligned page inside
    REQUIRE_FALSE(advise_huge_pages(begin, huge - 1024));    // ends exactly at the first boundary
    REQUIRE_FALSE(advise_huge_pages(room, 0));
    if (kernel_has_thp()) {
        REQUIRE(advise_huge_pages(begin, 4 * huge - 1024));  // pages 1, 2 and 3 of room
        CHECK_FALSE(advised_for_huge_pages(room));                          // the partial first page: not advised
        CHECK(advised_for_huge_pages(room + huge));
        CHECK(advised_for_huge_pages(room + 4 * huge - 1));
        CHECK_FALSE(advised_for_huge_pages(room + 4 * huge));  // past the range's last whole page
    } else {
        REQUIRE_FALSE(advise_huge_pages(begin, 4 * huge));
    }
    std::free(room);
}

TEMPLATE_TEST_CASE("a PackedWeight of more than a huge page sits in advised memory and multiplies right",
                   "[memory][packed]", float, double) {
    using T = TestType;
    // 4 MiB of float W (8 MiB in double): the allocator's huge path.
    const Index out = 1024, in = 1024, n = 3;
    const Matrix<T> W = random_matrix<T>(out, in, 31), X = random_matrix<T>(n, in, 32);
    const Lora<T> lora = random_lora<T>(out, in, 4, 8, 33);
    const PackedWeight<T> packed(W);
    REQUIRE(aligned_to(packed.view().data, core::huge_page_bytes));
    if (kernel_has_thp()) CHECK(advised_for_huge_pages(packed.view().data));
    const Matrix<T> Y = linear(X, packed + lora);
    const Matrix<double> want = naive_product(to_double(X), to_double(W).transpose()) +
                                double(lora.scale()) * naive_product(naive_product(to_double(X), to_double(lora.A()).transpose()),
                                                                     to_double(lora.B()).transpose());
    REQUIRE(max_abs(to_double(Y) - want) <= 16 * eps<T>() * in * (1 + max_abs(want)));
}
