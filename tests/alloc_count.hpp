// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Include in one translation unit of a test program (it defines the malloc family).

#include <cerrno>
#include <cstddef>

// Allocation counting for the steady-state tests: the including program's malloc family forwards
// to glibc's and counts the calls made while `counting` is set (operator new, Eigen and xsimd's
// aligned allocators all end here). Not under AddressSanitizer, which owns malloc itself.
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__)
#define LOWRANK_TEST_COUNT_ALLOCATIONS 1
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}
namespace {
bool counting = false;
long allocations = 0;
void note_allocation() {
    if (counting) ++allocations;
}
}  // namespace
extern "C" {
void* malloc(std::size_t n) {
    note_allocation();
    return __libc_malloc(n);
}
void* calloc(std::size_t k, std::size_t n) {
    note_allocation();
    return __libc_calloc(k, n);
}
void* realloc(void* p, std::size_t n) {
    note_allocation();
    return __libc_realloc(p, n);
}
int posix_memalign(void** p, std::size_t alignment, std::size_t n) {
    note_allocation();
    *p = __libc_memalign(alignment, n);
    return *p ? 0 : ENOMEM;
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
    note_allocation();
    return __libc_memalign(alignment, n);
}
}
#endif

#ifdef LOWRANK_TEST_COUNT_ALLOCATIONS
namespace {
/// Allocations made by f() (the malloc family's calls).
template <class F>
long allocations_in(F&& f) {
    allocations = 0;
    counting = true;
    f();
    counting = false;
    return allocations;
}
}  // namespace
#endif
