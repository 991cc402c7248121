// Data-parallel LoRA-Pro training with MPI: every rank holds the frozen base weight, a replica of
// the adapter and of the optimiser state, and one shard of each global batch. Per step, each rank
// computes the ordinary LoRA gradients of its shard (lowrank::backward) and the ranks all-reduce
// those gradients only — gA (r × in) and gB (out × r), never anything out × in — after which every
// rank applies the same lowrank::pro::AdamW step (the correction and, in full mode, the out × in
// moments are local and stay replicated).
//
// Rank 0 also runs the single-process computation on the combined batch and checks that the
// distributed run gives the same result:
//   1. every step, at the distributed run's parameters: the all-reduced gradients against the
//      combined-batch gradients, entry by entry, within a bound derived from the floating-point
//      arithmetic (below, `gradient_bound`);
//   2. at the end: every rank holds bitwise the same adapter as rank 0 (same reduced gradients,
//      same deterministic step);
//   3. at the end: the adapter of an independent single-process run over all the steps against the
//      distributed one (rounding differences propagated through the whole run; see `main`).
// Exits non-zero if a check fails.
//
// Run:  mpirun --allow-run-as-root --oversubscribe -np 2 ./build/examples/distributed
// Flags: --steps K (60)  --batch N (256, the global batch)  --rank r (4)  --lr (1e-2)
//        --mode full|efficient|both (both)
#include <lowrank/lora.hpp>
#include <lowrank/lora_pro.hpp>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using lowrank::Index;
using T = double;  // the check in 3. is meaningful at double's rounding level; see the report
using Mat = lowrank::Matrix<T>;
using Lora = lowrank::Lora<T>;
namespace pro = lowrank::pro;

struct Options {
    Index steps = 60, batch = 256, rank = 4, in = 96, out = 64;
    double lr = 1e-2;
    std::vector<pro::Mode> modes = {pro::Mode::full, pro::Mode::efficient};
    std::uint64_t seed = 3;
};

/// A regression task that needs a full-rank change of the weight: Y = X W*ᵀ, W* = W0 + 0.3 N(0, 1/in).
/// Identical on every rank (same seed, same code).
struct Task {
    Mat X, Y, W0;
};

Task make_task(const Options& o) {
    lowrank::Random rng(o.seed);
    auto normal = [&](Index rows, Index cols, double sigma) {
        Mat m(rows, cols);
        for (Index i = 0; i < rows; ++i)
            for (Index j = 0; j < cols; ++j) m(i, j) = sigma * rng.normal();
        return m;
    };
    Task t;
    t.X = normal(o.batch, o.in, 1.0);
    t.W0 = normal(o.out, o.in, 1.0 / std::sqrt(double(o.in)));
    const Mat Wstar = t.W0 + normal(o.out, o.in, 0.3 / std::sqrt(double(o.in)));
    t.Y.noalias() = t.X * Wstar.transpose();
    return t;
}

/// Rows [first, first + count) of the global batch that `rank` of `size` owns (sizes differ by ≤ 1).
void shard(Index n, int rank, int size, Index& first, Index& count) {
    const Index base = n / size, extra = n % size;
    first = rank * base + std::min<Index>(rank, extra);
    count = base + (rank < extra ? 1 : 0);
}

/// Loss 0.5/N ‖X Wᵀ + s X Aᵀ Bᵀ − Y‖² contributions and the LoRA gradients of rows [first, first+count)
/// of the global batch of N rows: dY = (Ŷ − Y) / N, so summing the shards' gradients gives the
/// gradient of the global mean loss. Returns the shard's sum of squared residuals.
double shard_gradients(const Task& t, const Lora& lora, Index first, Index count,
                       lowrank::LoraGrad<T>& grad, Mat* yhat_out = nullptr) {
    const auto X = t.X.middleRows(first, count);
    const auto Y = t.Y.middleRows(first, count);
    Mat Yhat;
    lowrank::forward(X, t.W0, lora, Yhat);
    const Mat dY = (Yhat - Y) / T(t.X.rows());
    lowrank::backward(X, t.W0, lora, dY, grad);
    const double sq = (Yhat - Y).squaredNorm();
    if (yhat_out) *yhat_out = std::move(Yhat);
    return sq;
}

/// Entrywise bound on |g_distributed − g_single| for gA and gB at the same parameters.
///
/// Standard model of floating-point arithmetic, unit roundoff u, and the bound γ_k = 2 (k + 2) u for a
/// length-k sum of products (the convention of the tests' `product_bound`: c = 2 over the classical
/// k u, which also covers any blocking/FMA order a kernel uses). Each run computes, with its own
/// summation order and its own kernel paths (the row count differs),
///   Ŷ = X W0ᵀ + s (X Aᵀ) Bᵀ        |δŶ| ≤ E_Y = γ_{in+r} (|X||W0|ᵀ + s |X||A|ᵀ|B|ᵀ)
///   dY = (Ŷ − Y)/N                 |δdY| ≤ E_dY = (E_Y + 2u (|Ŷ| + |Y|)) / N
///   gA = s (dY B)ᵀ X               |δgA| ≤ s |B|ᵀ E_dYᵀ |X| + γ_{out+N+P} s |B|ᵀ |dY|ᵀ |X|
///   gB = s dYᵀ (X Aᵀ)              |δgB| ≤ s E_dYᵀ |X||A|ᵀ + γ_{in+N+P} s |dY|ᵀ |X||A|ᵀ
/// (the P in the sum lengths is the all-reduce's sum of the P shard gradients). Both runs are within
/// these bounds of the exact gradient, so their difference is within twice them (first order in u).
struct GradBound {
    Mat A, B;
};

GradBound gradient_bound(const Task& t, const Lora& lora, const Mat& Yhat, int P) {
    const double u = std::numeric_limits<T>::epsilon() / 2;
    const double N = double(t.X.rows()), in = double(t.X.cols()), out = double(t.Y.cols()),
                 r = double(lora.rank()), s = std::abs(double(lora.scale()));
    auto gamma = [u](double k) { return 2.0 * (k + 2) * u; };
    const Mat aX = t.X.cwiseAbs(), aW = t.W0.cwiseAbs(), aA = lora.A().cwiseAbs(), aB = lora.B().cwiseAbs();
    const Mat aXA = aX * aA.transpose();  // |X||A|ᵀ, N × r
    const Mat EY = gamma(in + r) * (aX * aW.transpose() + s * aXA * aB.transpose());
    const Mat EdY = (EY + 2 * u * (Yhat.cwiseAbs() + t.Y.cwiseAbs())) / N;
    const Mat adY = (Yhat - t.Y).cwiseAbs() / N;
    GradBound b;
    b.A = 2 * s * ((aB.transpose() * EdY.transpose()) * aX +
                   gamma(out + N + P) * (aB.transpose() * adY.transpose()) * aX);
    b.B = 2 * s * (EdY.transpose() * aXA + gamma(in + N + P) * adY.transpose() * aXA);
    b.A.array() += std::numeric_limits<T>::min();  // exact zeros (B = 0 at the start) compare with 0
    b.B.array() += std::numeric_limits<T>::min();
    return b;
}

/// max |a − b| / bound, entrywise.
double worst_ratio(const Mat& a, const Mat& b, const Mat& bound) {
    return ((a - b).cwiseAbs().array() / bound.array()).maxCoeff();
}

double max_abs(const Mat& m) { return m.size() ? m.cwiseAbs().maxCoeff() : 0.0; }

Options parse_args(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (i + 1 >= argc) throw std::runtime_error("'" + a + "' needs a value (flags: --steps --batch --rank --lr --mode)");
        const std::string v = argv[++i];
        char* end = nullptr;
        if (a == "--mode") {
            if (v == "full") o.modes = {pro::Mode::full};
            else if (v == "efficient") o.modes = {pro::Mode::efficient};
            else if (v == "both") o.modes = {pro::Mode::full, pro::Mode::efficient};
            else throw std::runtime_error("--mode must be full, efficient or both");
        } else if (a == "--lr") {
            o.lr = std::strtod(v.c_str(), &end);
            if (*end || !(o.lr > 0) || !std::isfinite(o.lr)) throw std::runtime_error("--lr must be a positive number");
        } else {
            const long long x = std::strtoll(v.c_str(), &end, 10);
            if (*end || x < 1 || x > 1000000) throw std::runtime_error(a + " must be an integer in [1, 1000000]");
            if (a == "--steps") o.steps = x;
            else if (a == "--batch") o.batch = x;
            else if (a == "--rank") o.rank = x;
            else throw std::runtime_error("unknown flag '" + a + "'");
        }
    }
    if (o.rank > std::min(o.in, o.out)) throw std::runtime_error("--rank must be at most 64");
    return o;
}

void allreduce_sum(std::vector<T>& buf) {
    MPI_Allreduce(MPI_IN_PLACE, buf.data(), int(buf.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}

/// Trains one adapter with `mode` on every rank; rank 0 checks against the single-process run.
/// Returns true when every check passed (the same value on every rank).
bool run(const Options& o, const Task& task, pro::Mode mode, int rank, int size) {
    const char* mode_name = mode == pro::Mode::full ? "full" : "efficient";
    const lowrank::LoraConfig cfg{.rank = o.rank, .alpha = 2.0 * double(o.rank), .seed = o.seed + 1};
    const pro::AdamWOptions opt_cfg{.lr = o.lr, .mode = mode};
    Lora lora(o.out, o.in, cfg);  // identical on every rank (same seed): A Kaiming-uniform, B = 0
    pro::AdamW<T> opt(lora, opt_cfg);
    Lora ref(o.out, o.in, cfg);   // rank 0's independent single-process run on the combined batch
    pro::AdamW<T> ref_opt(ref, opt_cfg);

    Index first = 0, count = 0;
    shard(o.batch, rank, size, first, count);
    const Index r = o.rank, nA = r * o.in, nB = o.out * r;
    std::vector<T> packed(std::size_t(nA + nB + 1));
    lowrank::LoraGrad<T> local, single, ref_grad;
    double worst_grad = 0, dist_loss = 0, ref_loss = 0, first_loss = 0;
    double unreduced = 0;  // the same ratio for rank 0's own shard gradient, had it not been reduced
    if (rank == 0)
        std::printf("LoRA-Pro %s mode, %d rank(s), global batch %lld (shard of rank 0: %lld rows), W %lld x %lld, "
                    "rank %lld, lr %.0e, %lld steps\n",
                    mode_name, size, (long long)o.batch, (long long)count, (long long)o.out, (long long)o.in,
                    (long long)r, o.lr, (long long)o.steps);
    for (Index step = 1; step <= o.steps; ++step) {
        // Each rank: its shard's gradients; then one all-reduce of [gA | gB | Σ residual²].
        const double sq = shard_gradients(task, lora, first, count, local);
        std::copy(local.A.data(), local.A.data() + nA, packed.begin());
        std::copy(local.B.data(), local.B.data() + nB, packed.begin() + nA);
        packed.back() = sq;
        allreduce_sum(packed);
        const Mat gA = Eigen::Map<const Mat>(packed.data(), r, o.in);
        const Mat gB = Eigen::Map<const Mat>(packed.data() + nA, o.out, r);
        dist_loss = 0.5 * packed.back() / double(o.batch);
        if (step == 1) first_loss = dist_loss;
        if (rank == 0) {
            // 1. The single-process gradient of the combined batch at the same parameters.
            Mat Yhat;
            shard_gradients(task, lora, 0, o.batch, single, &Yhat);
            const GradBound bound = gradient_bound(task, lora, Yhat, size);
            worst_grad = std::max({worst_grad, worst_ratio(gA, single.A, bound.A), worst_ratio(gB, single.B, bound.B)});
            if (size > 1)
                unreduced = std::max({unreduced, worst_ratio(local.A, single.A, bound.A),
                                      worst_ratio(local.B, single.B, bound.B)});
            // 3. The independent single-process run, one step.
            ref_loss = 0.5 * shard_gradients(task, ref, 0, o.batch, ref_grad) / double(o.batch);
            ref_opt.step(ref, ref_grad.A, ref_grad.B);
        }
        opt.step(lora, gA, gB);  // the same step on every rank
        if (rank == 0 && (step == 1 || step % 10 == 0 || step == o.steps))
            std::printf("  step %4lld  loss: distributed %.10f  single-process %.10f\n", (long long)step,
                        dist_loss, ref_loss);
    }

    // 2. Every rank's adapter equals rank 0's, bit for bit.
    std::vector<T> params(std::size_t(nA + nB)), root(std::size_t(nA + nB));
    std::copy(lora.A().data(), lora.A().data() + nA, params.begin());
    std::copy(lora.B().data(), lora.B().data() + nB, params.begin() + nA);
    root = params;
    MPI_Bcast(root.data(), int(root.size()), MPI_DOUBLE, 0, MPI_COMM_WORLD);
    double spread = 0;
    for (std::size_t k = 0; k < params.size(); ++k) spread = std::max(spread, std::abs(params[k] - root[k]));
    MPI_Allreduce(MPI_IN_PLACE, &spread, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);

    int ok = 1;
    if (rank == 0) {
        // 3. The whole run against the single-process run. There is no rigorous a-priori bound for a
        // trajectory of a nonlinear optimiser; the two runs differ only by rounding (check 1 bounds
        // each step's inputs to ~1e-16 relative), so we require the final factors to agree to 1e-9
        // relative to their size: 10⁷ times the per-step rounding level, a margin that only a real
        // divergence (a gradient that is not the combined batch's, a step that is not replicated)
        // can exceed.
        const double dA = max_abs(lora.A() - ref.A()), dB = max_abs(lora.B() - ref.B());
        const double scale = std::max(max_abs(ref.A()), max_abs(ref.B()));
        const double traj = std::max(dA, dB) / scale, traj_bound = 1e-9;
        const double loss_diff = std::abs(dist_loss - ref_loss);
        std::printf("  1. all-reduced vs combined-batch gradients, every step: worst |difference| / bound = %.3g "
                    "(bound from the arithmetic; must be <= 1)\n", worst_grad);
        if (size > 1)
            std::printf("     (the check's sensitivity: rank 0's own shard gradient, not all-reduced, would give %.3g)\n",
                        unreduced);
        std::printf("  2. adapters across the %d ranks: max |difference| = %.3g (must be exactly 0)\n", size, spread);
        std::printf("  3. after %lld steps, distributed vs single-process run: max |dA| = %.3g, max |dB| = %.3g, "
                    "relative %.3g (must be <= %.0e); final losses differ by %.3g\n",
                    (long long)o.steps, dA, dB, traj, traj_bound, loss_diff);
        ok = worst_grad <= 1 && spread == 0 && traj <= traj_bound && std::isfinite(dist_loss);
        std::printf("  %s (loss %.6f -> %.6f)\n", ok ? "SAME RESULT" : "MISMATCH", first_loss, dist_loss);
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    return ok != 0;
}

}  // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int status = 0;
    try {
        const Options o = parse_args(argc, argv);
        if (o.batch < size) throw std::runtime_error("the global batch must have at least one row per rank");
        const Task task = make_task(o);
        for (pro::Mode mode : o.modes)
            if (!run(o, task, mode, rank, size)) status = 1;
        if (rank == 0) std::printf("%s\n", status == 0 ? "distributed: all checks passed" : "distributed: FAILED");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "distributed (rank %d): %s\n", rank, e.what());
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    MPI_Finalize();
    return status;
}
