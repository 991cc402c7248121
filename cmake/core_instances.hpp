// SPDX-License-Identifier: Apache-2.0
// Build-time only (never installed, never part of lowrank::lowrank): explicit instantiation
// declarations of the lowrank::core entry points, float and double, at the default architecture
// of the build. Force-included into the project's tests and examples after eigen_instances.hpp
// (see lowrank_dev_flags in CMakeLists.txt), so that each test program does not instantiate and
// optimise the same kernels again; they are instantiated once, in cmake/core_instances_float.cpp
// and cmake/core_instances_double.cpp. The code is the same: only where it is compiled changes.
//
// Not for:
//  - the benchmarks (CMakeLists.txt: lowrank_bench_flags): they measure what a user's
//    header-only build gets, the kernels compiled and inlined in the caller's translation unit;
//  - a translation unit built for another architecture than the library of instances (its
//    default_arch differs: the declarations below would name instances nobody defines, a link
//    error, not a silent mismatch), such as bench/callgrind_kernels (x86-64-v3).
// Kernels called at an explicit non-default Arch (test_arch, the SSE2 paths of test_kernels)
// are instantiated where they are called, as before.
#pragma once
#include "eigen_instances.hpp"  // first: GCC 12's AVX-512 intrinsics, read with -Wuninitialized off

#include <lowrank/core/gathered.hpp>

// The entry points of core/kernels.hpp, gemm.hpp, ops.hpp and gathered.hpp whose Arch defaults to
// xsimd::default_arch, and the few without an Arch that instantiate heavy code (Eigen's product).
#define LOWRANK_CORE_INSTANCES(EXTERN, T)                                                           \
    EXTERN template void gemm_bcast<T, xsimd::default_arch>(Index, Index, Index, T, const T*, Index,  \
                                                            Index, const T*, Index, T*, Index,       \
                                                            bool) noexcept;                          \
    EXTERN template void gemm_dot<T, xsimd::default_arch>(Index, Index, Index, T, const T*, Index,    \
                                                          const T*, Index, T*, Index, bool) noexcept; \
    EXTERN template void gemm_dot_narrow<T, xsimd::default_arch>(Index, Index, Index, T, const T*,    \
                                                                 Index, const T*, Index, T*, Index,   \
                                                                 bool) noexcept;                      \
    EXTERN template void gemm_packed<T, xsimd::default_arch>(Index, Index, Index, T, const T*, Index, \
                                                             const T*, Index, T*, Index, bool,        \
                                                             GemmWorkspace<T>&);                      \
    EXTERN template void gemm_packed_ab<T, xsimd::default_arch>(Index, Index, Index, T, const T*, Index, \
                                                                const T*, Index, T*, Index, bool,     \
                                                                GemmWorkspace<T>&);                   \
    EXTERN template void gemm_bcast_sweep<T, xsimd::default_arch>(Index, Index, Index, T, const T*, Index, \
                                                                  const T*, Index, T*, Index, bool) noexcept; \
    EXTERN template void gemm_stream_rows<T, xsimd::default_arch>(Index, Index, Index, T, const T*,   \
                                                                  Index, const T*, Index, T*, Index,  \
                                                                  bool, GemmWorkspace<T>&);           \
    EXTERN template void base_product<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                              MatrixView<T>, GemmWorkspace<T>&);      \
    EXTERN template void base_product<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                              MatrixView<T>);                         \
    EXTERN template void base_input_grad<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                                 MatrixView<T>, bool, GemmWorkspace<T>&); \
    EXTERN template void base_input_grad<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                                 MatrixView<T>, bool);                \
    EXTERN template void shrink<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>,     \
                                                        MatrixView<T>, bool) noexcept;                \
    EXTERN template void expand<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>,     \
                                                        MatrixView<T>, T, bool) noexcept;             \
    EXTERN template void project_back<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                              MatrixView<T>) noexcept;                \
    EXTERN template void grad_expand<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                             MatrixView<T>, T, bool) noexcept;        \
    EXTERN template void grad_shrink<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                             MatrixView<T>, T, bool,                  \
                                                             GemmWorkspace<T>&);                      \
    EXTERN template void grad_shrink<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                             MatrixView<T>, T, bool);                 \
    EXTERN template void input_grad<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                            MatrixView<T>, T, bool, GemmWorkspace<T>&); \
    EXTERN template void input_grad<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                            MatrixView<T>, T, bool);                  \
    EXTERN template void rank_update<T, xsimd::default_arch>(MatrixView<T>, MatrixView<const T>,      \
                                                             MatrixView<const T>, T);                 \
    EXTERN template void gathered_shrink<T, xsimd::default_arch>(MatrixView<const T>, RowSet,         \
                                                                 MatrixView<const T>, MatrixView<T>) noexcept; \
    EXTERN template void gathered_shrink_transposed<T, xsimd::default_arch>(                          \
        MatrixView<const T>, RowSet, MatrixView<const T>, MatrixView<T>) noexcept;                    \
    EXTERN template void gathered_expand<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<const T>, \
                                                                 MatrixView<T>, RowSet, T, bool) noexcept; \
    EXTERN template void gathered_expand_strips<T, xsimd::default_arch>(                              \
        MatrixView<const T>, MatrixView<const T>, MatrixView<T>, RowSet, T, bool) noexcept;           \
    EXTERN template void scatter_add_rows<T, xsimd::default_arch>(MatrixView<const T>, RowSet,        \
                                                                  MatrixView<T>) noexcept;            \
    EXTERN template void gathered_apply<T, xsimd::default_arch>(MatrixView<const T>, MatrixView<T>,   \
                                                                const GatheredFactors<T>&, RowSet,    \
                                                                const T*, GatherWorkspace<T>&);       \
    EXTERN template void gathered_backward<T, xsimd::default_arch>(                                   \
        MatrixView<const T>, MatrixView<const T>, const GatheredFactors<T>&, RowSet, const T*,        \
        MatrixView<T>, MatrixView<T>, MatrixView<T>*, bool, GatherWorkspace<T>&);

#ifndef LOWRANK_CORE_INSTANCES_DEFINE
namespace lowrank::core {
LOWRANK_CORE_INSTANCES(extern, float)
LOWRANK_CORE_INSTANCES(extern, double)
}  // namespace lowrank::core
#endif
