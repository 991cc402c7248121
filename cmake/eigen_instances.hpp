// SPDX-License-Identifier: Apache-2.0
// Build-time only (never installed, never part of lowrank::lowrank): explicit instantiation
// declarations of the Eigen decompositions that the project's own tests, benchmarks and examples
// use. Force-included into every such translation unit (see lowrank_bench_flags in CMakeLists.txt),
// so the compiler does not instantiate these large class templates in each of them; they are
// instantiated once, in cmake/eigen_instances_float.cpp and cmake/eigen_instances_double.cpp.
// Measured: test_lora_svd_init.cpp at -O3 -march=native, 170 s → 56 s of CPU time.
#pragma once
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13 && defined(__AVX512F__)
// GCC 12's AVX-512 intrinsics (_mm512_extractf64x4_pd, _mm512_insertf64x4, …) build their unused
// lanes from `__m256d __Y = __Y;`, which -Wuninitialized reports wherever they are inlined: in
// Eigen's and xsimd's AVX-512 code, so -march=native -Werror fails on an AVX-512 machine. Fixed in
// GCC 13 (PR 105593). The intrinsic headers are read here, first, with the warning off.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#include <Eigen/Dense>

#define LOWRANK_EIGEN_INSTANCES(EXTERN, T)                                                 \
    EXTERN template class Eigen::BDCSVD<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>;    \
    EXTERN template class Eigen::JacobiSVD<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>; \
    EXTERN template class Eigen::HouseholderQR<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>; \
    EXTERN template class Eigen::SelfAdjointEigenSolver<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>;

#ifndef LOWRANK_EIGEN_INSTANCES_DEFINE
LOWRANK_EIGEN_INSTANCES(extern, float)
LOWRANK_EIGEN_INSTANCES(extern, double)
#endif
