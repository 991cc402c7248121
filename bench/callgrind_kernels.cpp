// SPDX-License-Identifier: Apache-2.0
// Driver for instruction counts under valgrind's callgrind: one call of one kernel of each
// lowrank::core family and of the Eigen product of the same shape. Instruction counts do not
// depend on the machine's load, so they are the stable number beside the noisy benchmark times.
//
//   callgrind_kernels --list          names, shapes and flops, one per line (tab-separated)
//   callgrind_kernels NAME            set up, run NAME once to warm up, then once inside
//                                     `lowrank_callgrind_measure`, the only function collected by
//   valgrind --tool=callgrind --collect-atstart=no --toggle-collect=lowrank_callgrind_measure
//            --callgrind-out-file=out.NAME callgrind_kernels NAME
//
// Built for x86-64-v3 (AVX2 + FMA) whatever the other targets use: valgrind cannot run AVX-512.

#include <lowrank/core/ops.hpp>

#include <Eigen/Dense>

#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

using lowrank::Index;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

Mat random_matrix(Index rows, Index cols, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> dist(-1.f, 1.f);
    Mat m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
    return m;
}

/// One kernel call on fixed data: `C (+)= alpha A op(B)`.
struct Case {
    const char* name;
    const char* family;  // which lowrank::core family the shape exercises
    const char* what;
    Index m, n, k;
    bool transposed_b;   // gemm_dot: B is n × k (C = A Bᵀ); gemm_bcast: B is k × n (C += A B)
    bool eigen;          // the Eigen product instead of the lowrank kernel
};

// Shapes: gemm_bcast at the expand / merge shape (short k: a rank-16 update of 64 rows of a
// 1024-wide output), gemm_dot at the small-batch base product (16 rows against a 1024 × 1024 W),
// gemm_packed at a large-batch one (64 rows against 256 × 256, packed blocks), gemm_dot_narrow
// at the expand of one row (k = rank 16), rank_update at a merge (W 256 × 1024 += U V, r = 16;
// V copied into strips inside the call).
const Case cases[] = {
    {"gemm_bcast", "gemm_bcast", "C += a A B (rank update)", 64, 1024, 16, false, false},
    {"eigen_bcast", "gemm_bcast", "C.noalias() += a * A * B", 64, 1024, 16, false, true},
    {"gemm_dot", "gemm_dot", "C = A B^T (base product)", 16, 1024, 1024, true, false},
    {"eigen_dot", "gemm_dot", "C.noalias() = A * B.transpose()", 16, 1024, 1024, true, true},
    {"gemm_packed", "gemm_packed", "C = A B^T (large-batch base product)", 64, 256, 256, true, false},
    {"eigen_packed", "gemm_packed", "C.noalias() = A * B.transpose()", 64, 256, 256, true, true},
    {"gemm_dot_narrow", "gemm_dot_narrow", "C = A B^T, k = rank (expand of one row)", 1, 1024, 16, true, false},
    {"eigen_narrow", "gemm_dot_narrow", "C.noalias() = A * B.transpose()", 1, 1024, 16, true, true},
    {"rank_update", "rank_update", "W += a U V (merge)", 256, 1024, 16, false, false},
    {"eigen_update", "rank_update", "W.noalias() += a * U * V", 256, 1024, 16, false, true},
};

std::function<void()> measured_body;

}  // namespace

/// The only function callgrind collects (see the header comment).
extern "C" [[gnu::noinline]] void lowrank_callgrind_measure() { measured_body(); }

int main(int argc, char** argv) {
    if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
        for (const Case& c : cases)
            std::printf("%s\t%s\t%s\t%td\t%td\t%td\t%.0f\n", c.name, c.family, c.what, c.m, c.n, c.k,
                        2.0 * double(c.m) * double(c.n) * double(c.k));
        return 0;
    }
    const Case* chosen = nullptr;
    for (const Case& c : cases)
        if (argc == 2 && std::strcmp(argv[1], c.name) == 0) chosen = &c;
    if (!chosen) {
        std::fprintf(stderr, "usage: %s --list | NAME\n", argv[0]);
        return 2;
    }
    const Case& c = *chosen;
    const Mat A = random_matrix(c.m, c.k, 1);
    const Mat B = c.transposed_b ? random_matrix(c.n, c.k, 2) : random_matrix(c.k, c.n, 2);
    Mat C = random_matrix(c.m, c.n, 3);
    const Mat C0 = C;
    const float alpha = 0.5f;

    const std::string kernel = c.name;
    lowrank::core::GemmWorkspace<float> ws;
    if (c.eigen && c.transposed_b)
        measured_body = [&] { C.noalias() = alpha * A * B.transpose(); };
    else if (c.eigen)
        measured_body = [&] { C.noalias() += alpha * A * B; };
    else if (kernel == "gemm_bcast")
        measured_body = [&] {
            lowrank::core::gemm_bcast<float>(c.m, c.n, c.k, alpha, A.data(), c.k, 1, B.data(), c.n,
                                             C.data(), c.n, true);
        };
    else if (kernel == "rank_update")
        measured_body = [&] {
            lowrank::core::rank_update<float>(lowrank::view_mut(C), lowrank::view(A), lowrank::view(B), alpha);
        };
    else if (kernel == "gemm_dot")
        measured_body = [&] {
            lowrank::core::gemm_dot<float>(c.m, c.n, c.k, alpha, A.data(), c.k, B.data(), c.k,
                                           C.data(), c.n, false);
        };
    else if (kernel == "gemm_packed")
        measured_body = [&] {
            lowrank::core::gemm_packed<float>(c.m, c.n, c.k, alpha, A.data(), c.k, B.data(), c.k, C.data(), c.n,
                                              false, ws);
        };
    else
        measured_body = [&] {
            lowrank::core::gemm_dot_narrow<float>(c.m, c.n, c.k, alpha, A.data(), c.k, B.data(), c.k, C.data(),
                                                  c.n, false);
        };

    measured_body();  // warm-up: first-touch, Eigen's blocking buffers
    C = C0;
    lowrank_callgrind_measure();

    // Sanity: the measured call computed the product (against a plain double evaluation).
    const Eigen::MatrixXd Ad = A.cast<double>(), Bd = B.cast<double>();
    const Eigen::MatrixXd product = c.transposed_b ? Eigen::MatrixXd(Ad * Bd.transpose())
                                                   : Eigen::MatrixXd(Ad * Bd);
    const Eigen::MatrixXd expected =
        (c.transposed_b ? Eigen::MatrixXd::Zero(c.m, c.n) : Eigen::MatrixXd(C0.cast<double>())) +
        double(alpha) * product;
    const double error = (C.cast<double>() - expected).norm() / expected.norm();
    std::printf("%s arch=%s m=%td n=%td k=%td relative_error=%.2e\n", c.name,
                xsimd::default_arch::name(), c.m, c.n, c.k, error);
    return error < 1e-4 ? 0 : 1;
}
