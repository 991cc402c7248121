// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// SVD- and QR-based initialisations of a LoRA adapter from the pretrained weight, as Hugging Face
/// PEFT's `init_lora_weights="pissa"` and `"olora"` compute them (peft/tuners/lora/layer.py,
/// `pissa_init` and `olora_init`). Both return the adapter and replace W by the corrected base
/// weight, so the effective weight W_base + s · B A equals the original W to rounding.
///
/// - PiSSA (Meng, Wang, Zhang 2024): W ≈ U_r S_r V_rᵀ (top r), S' = S_r / s,
///       A = diag(√S') V_rᵀ,  B = U_r diag(√S'),  W_base = W − s · B A.
///   PEFT's "pissa" uses the exact SVD (the default here); "pissa_niter_k" uses
///   `torch.svd_lowrank(W, q=r, niter=k)`, which corresponds to
///   `{.method = SVDMethod::randomized, .oversampling = 0, .power_iterations = k}` (the random
///   streams differ, so only the exact variant is reproducible across the two).
///   Signs: PEFT keeps LAPACK's arbitrary signs of the singular pairs; here the sign rule of
///   linalg/svd.hpp applies, so B and A may differ from PEFT's by the sign of matching
///   columns / rows; B A and W_base do not.
/// - OLoRA (Büyükakyüz 2024): W = Q R (Householder QR, `torch.linalg.qr`, reduced),
///       B = Q[:, :r],  A = R[:r, :],  W_base = W − s · B A
///   (no division by s: PEFT's code does none). Only the first r Householder reflections are
///   computed (cost ≈ 4 · out · in · r flops instead of a full QR); they are the reflections LAPACK
///   computes (same sign convention, R_kk = −sign(pivot) · norm), so B and A match PEFT's to
///   rounding.
///
/// The adapter's scale follows `cfg` (alpha / r, or alpha / √r with rsLoRA); `cfg.init` and
/// `cfg.seed` are ignored. W must be finite; PiSSA needs s > 0 (√(S_r / s)).

#include <Eigen/Householder>

#include <cmath>

#include "core/args.hpp"
#include "core/ops.hpp"
#include "linalg/svd.hpp"
#include "lora.hpp"

namespace lowrank {

namespace detail {
template <class P>
void check_init_weight(const char* fn, const P& W, const LoraConfig& cfg) {
    check_lora_config(fn, W.rows(), W.cols(), cfg);
    if (!W.allFinite())
        for (Index i = 0; i < W.rows(); ++i)
            for (Index j = 0; j < W.cols(); ++j)
                if (!std::isfinite(double(W(i, j))))
                    fail(fn, ": W (", shape_of(W), ") has a non-finite entry at (", i, ", ", j, ")");
}
}  // namespace detail

/// PiSSA initialisation (PEFT `init_lora_weights="pissa"`): returns the adapter and overwrites W
/// (out × in; a Matrix, Map or Block) with W − s · B A. Cost: one truncated SVD (`svd_options`,
/// exact by default) plus out · in · r for the correction.
/// Throws for a rank outside [1, min(out, in)], a non-finite W or alpha, or s ≤ 0.
template <Destination DW>
[[nodiscard]] auto pissa_init(DW&& W, const LoraConfig& cfg,
                              const linalg::SVDOptions& svd_options = {.method = linalg::SVDMethod::exact})
    -> Lora<typename std::remove_cvref_t<DW>::Scalar> {
    using T = typename std::remove_cvref_t<DW>::Scalar;
    const char* fn = "lowrank::pissa_init";
    detail::check_init_weight(fn, W, cfg);
    const double s = lora_scale(cfg.alpha, cfg.rank, cfg.rslora);
    if (!(s > 0)) detail::fail(fn, ": the scale alpha / r must be > 0 (PiSSA takes √(S_r / s)), got ", s);
    auto w = detail::output_view(fn, "W", std::forward<DW>(W), W.rows(), W.cols(), false);
    const auto svd = linalg::svd(eigen_map(MatrixView<const T>(w)), cfg.rank, svd_options);
    Vector<T> root(cfg.rank);  // √(S_r / s)
    for (Index k = 0; k < cfg.rank; ++k) root(k) = static_cast<T>(std::sqrt(double(svd.S(k)) / s));
    const Matrix<T> A = root.asDiagonal() * svd.V.transpose();
    const Matrix<T> B = svd.U * root.asDiagonal();
    Lora<T> lora = Lora<T>::from_factors(A, B, cfg.alpha, cfg.rslora);
    core::rank_update<T>(w, view(lora.B()), view(lora.A()), -lora.scale());
    return lora;
}

/// OLoRA initialisation (PEFT `init_lora_weights="olora"`): returns the adapter with B = Q[:, :r],
/// A = R[:r, :] of W's Householder QR, and overwrites W with W − s · B A.
/// Cost ≈ 4 · out · in · r flops (r Householder reflections) plus out · in · r for the correction.
/// Throws for a rank outside [1, min(out, in)] or a non-finite W or alpha.
template <Destination DW>
[[nodiscard]] auto olora_init(DW&& W, const LoraConfig& cfg)
    -> Lora<typename std::remove_cvref_t<DW>::Scalar> {
    using T = typename std::remove_cvref_t<DW>::Scalar;
    using CM = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    const char* fn = "lowrank::olora_init";
    detail::check_init_weight(fn, W, cfg);
    auto w = detail::output_view(fn, "W", std::forward<DW>(W), W.rows(), W.cols(), false);
    const Index out = w.rows, in = w.cols, r = cfg.rank;
    // The first r steps of Householder QR (LAPACK geqr2 / Eigen's unblocked QR): reflection k
    // zeroes column k below the diagonal; its essential part is stored there, R_kk = beta.
    CM qr = eigen_map(MatrixView<const T>(w));
    Vector<T> tau(r);
    Vector<T> scratch(in);
    for (Index k = 0; k < r; ++k) {
        const Index rows = out - k;
        T beta;
        qr.col(k).tail(rows).makeHouseholderInPlace(tau(k), beta);
        qr(k, k) = beta;
        qr.bottomRightCorner(rows, in - k - 1)
            .applyHouseholderOnTheLeft(qr.col(k).tail(rows - 1), tau(k), scratch.data());
    }
    Matrix<T> A = qr.topRows(r).template triangularView<Eigen::Upper>();  // R[:r, :]
    const CM reflectors = qr.leftCols(r);
    const auto householder = Eigen::householderSequence(reflectors, tau);
    Matrix<T> B = householder * CM::Identity(out, r);  // Q[:, :r] = H_0 … H_{r−1} I[:, :r]
    Lora<T> lora = Lora<T>::from_factors(A, B, cfg.alpha, cfg.rslora);
    core::rank_update<T>(w, view(lora.B()), view(lora.A()), -lora.scale());
    return lora;
}

}  // namespace lowrank
