// Personalisation in a toy cross-attention layer: one Perfusion concept (a key-locked rank-1
// edit, Tewel et al. 2023) and two TARA concepts (token-masked LoRA adapters) composed on one
// prompt in one expression,
//
//     K = linear(E, W_K + key_edit + sks_K.masked(M.row(0)) + zwx_K.masked(M.row(1)))
//     V = linear(E, W_V + value_edit + sks_V.masked(M.row(0)) + zwx_V.masked(M.row(1)))
//
// It prints, for every token of the prompt, how much each concept moves that token's K and V rows
// (‖Δ row‖ / ‖base row‖), then how the Perfusion edit reacts when its gate (β, τ) is changed for
// one call with `with_gate`. Every number printed is also computed in double precision by a dense
// reference written here from the papers' formulas; the program exits with status 1 if the library
// differs from it by more than a rounding bound derived from the arithmetic.
//
// Everything is made up and seeded: a 64-dimensional toy "text encoder" (a fixed random embedding
// per token id plus a little context and position), W_K and W_V (32 × 64), the statistics C of the
// encodings of 4096 tokens of random captions, the adapters' factors.
#include <lowrank/compose.hpp>
#include <lowrank/expr/expr.hpp>
#include <lowrank/lora.hpp>
#include <lowrank/rank_one.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

namespace {

using lowrank::Index;
using lowrank::Matrix;
using MatD = Eigen::MatrixXd;
using VecD = Eigen::VectorXd;

constexpr Index in = 64;   // encoding width (the text encoder's output)
constexpr Index out = 32;  // K and V width (one attention head's worth)

// ------------------------------------------------------------------------------------------------
// A toy text encoder: e_t = emb(id_t) + 0.2 emb(id_{t−1}) + 0.1 pos(t), emb(id) ~ N(0, I) seeded
// by the id. Contextual enough that equal ids in different places get different encodings.
// ------------------------------------------------------------------------------------------------
VecD embedding(int id) {
    lowrank::Random rng(0x5eed0000u ^ (std::uint64_t(id) * 0x9e3779b97f4a7c15u));
    VecD e(in);
    for (Index j = 0; j < in; ++j) e(j) = rng.normal();
    return e;
}

Matrix<float> encode(const std::vector<int>& ids) {
    Matrix<float> E(Index(ids.size()), in);
    for (std::size_t t = 0; t < ids.size(); ++t) {
        VecD e = embedding(ids[t]);
        if (t > 0) e += 0.2 * embedding(ids[t - 1]);
        for (Index j = 0; j < in; ++j)
            e(j) += 0.1 * ((j % 2) ? std::cos(double(t) / std::pow(100.0, double(j) / in))
                                   : std::sin(double(t) / std::pow(100.0, double(j) / in)));
        E.row(Index(t)) = e.cast<float>().transpose();
    }
    return E;
}

Matrix<float> random_matrix(Index rows, Index cols, double sigma, std::uint64_t seed) {
    lowrank::Random rng(seed);
    Matrix<float> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = float(sigma * rng.normal());
    return m;
}

// ------------------------------------------------------------------------------------------------
// The dense double reference: h(e) = W e⊥ + σ((s − β)/τ) o* + Σ_k m_k s_k B_k A_k e, with
// s(e) = eᵀC⁻¹i*/(i*ᵀC⁻¹i*) and e⊥ = e − s(e) i* (Perfusion eqs. 5–8 for one concept; the gate is
// s(e) itself in the ROME limit), each part kept apart with its own rounding bound.
// ------------------------------------------------------------------------------------------------
struct Adapter {
    MatD A, B;       // r × in, out × r
    double scale;    // s_k
    VecD mask;       // n
};

struct Piece {
    MatD value;  // n × out
    MatD bound;  // n × out: entrywise bound on |float result − value|
};

struct Reference {
    Piece base, edit;
    std::vector<Piece> adapters;
    VecD s, gate;  // per token
    Piece total;
};

// u = 2⁻²⁴ (float's unit roundoff); a length-k float dot product errs by at most k·u·Σ|xᵢ||yᵢ|
// (to first order). `safety` covers the second-order terms and the few extra roundings named below.
constexpr double u = std::numeric_limits<float>::epsilon() / 2;
constexpr double safety = 2.0;

Reference reference(const MatD& E, const MatD& W, const MatD& C, const VecD& i_star,
                    const VecD& o_star, double beta, double tau, bool rome_limit,
                    const std::vector<Adapter>& adapters) {
    const Index n = E.rows(), K = Index(adapters.size());
    const MatD absE = E.cwiseAbs();
    Reference ref;
    // Base: one float dot product of length in per entry, then K + 1 additions into it.
    ref.base.value = E * W.transpose();
    ref.base.bound = safety * double(in + K + 2) * u * (absE * W.cwiseAbs().transpose());

    // The edit: shrink rows a = C⁻¹i*/energy (for s) and, for one concept, the projection row is
    // the same a (for p = s); expand columns W i* and o*. In float: the factors are rounded once
    // (u), s is a length-in dot product ((in + 1)·u·|e|·|a|), σ amplifies an error in s by at
    // most 1/(4τ), and each expand product adds 3 roundings.
    const Eigen::LLT<MatD> llt(C);
    const VecD whitened = llt.solve(i_star);
    const double energy = i_star.dot(whitened);
    const VecD a = whitened / energy;
    const VecD w_istar = W * i_star;
    ref.s = E * a;
    ref.gate.resize(n);
    const VecD s_err = double(in + 1) * u * (absE * a.cwiseAbs());
    ref.edit.value.resize(n, out);
    ref.edit.bound.resize(n, out);
    for (Index t = 0; t < n; ++t) {
        const double s = ref.s(t);
        const double g = rome_limit ? s : 1.0 / (1.0 + std::exp(-(s - beta) / tau));
        ref.gate(t) = g;
        const double g_err = rome_limit ? s_err(t) : s_err(t) / (4 * tau) + 2 * u;
        for (Index j = 0; j < out; ++j) {
            ref.edit.value(t, j) = -s * w_istar(j) + g * o_star(j);
            ref.edit.bound(t, j) = safety * (std::abs(w_istar(j)) * (s_err(t) + 3 * u * std::abs(s)) +
                                             std::abs(o_star(j)) * (g_err + 3 * u * g));
        }
    }

    // Masked LoRA: t = e A_kᵀ (length in), scaled by s_k·m_k (2 roundings), expanded by B_k
    // (length r) — at most (in + r + 3)·u relative to the sum of absolute products.
    for (const Adapter& ad : adapters) {
        Piece p;
        const Index r = ad.A.rows();
        p.value = ad.mask.asDiagonal() * ((E * ad.A.transpose()) * ad.B.transpose()) * ad.scale;
        p.bound = safety * double(in + r + 3) * u * ad.scale *
                  (ad.mask.cwiseAbs().asDiagonal() *
                   ((absE * ad.A.cwiseAbs().transpose()) * ad.B.cwiseAbs().transpose()));
        ref.adapters.push_back(std::move(p));
    }

    ref.total.value = ref.base.value + ref.edit.value;
    // Summing K + 2 parts of the row into one float adds one rounding per part to the total.
    MatD magnitude = ref.base.value.cwiseAbs() + ref.edit.value.cwiseAbs();
    ref.total.bound = ref.base.bound + ref.edit.bound;
    for (const Piece& p : ref.adapters) {
        ref.total.value += p.value;
        ref.total.bound += p.bound;
        magnitude += p.value.cwiseAbs();
    }
    ref.total.bound += safety * double(K + 2) * u * magnitude;
    return ref;
}

// ------------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------------
int failures = 0;
double worst_ratio = 0;  // largest |library − reference| / bound seen

void check(const char* what, const Matrix<float>& got, const Piece& want) {
    double ratio = 0;
    Index bad_t = -1, bad_j = -1;
    for (Index t = 0; t < got.rows(); ++t)
        for (Index j = 0; j < got.cols(); ++j) {
            const double err = std::abs(double(got(t, j)) - want.value(t, j));
            const double bound = want.bound(t, j) + std::numeric_limits<double>::min();
            if (err / bound > ratio) {
                ratio = err / bound;
                bad_t = t;
                bad_j = j;
            }
        }
    worst_ratio = std::max(worst_ratio, ratio);
    if (ratio > 1 || !got.allFinite()) {
        ++failures;
        std::printf("MISMATCH %s: entry (%lld, %lld) = %.9g, dense double %.9g, bound %.3g\n", what,
                    (long long)bad_t, (long long)bad_j, double(got(bad_t, bad_j)),
                    want.value(bad_t, bad_j), want.bound(bad_t, bad_j));
    }
}

/// ‖row t of delta‖ / ‖row t of base‖, or −1 when the row of delta is exactly zero.
double relative_move(const Matrix<float>& delta, const Matrix<float>& base, Index t) {
    if (delta.row(t).isZero(0)) return -1;
    return double(delta.row(t).norm()) / double(base.row(t).norm());
}

std::string cell(double v) {
    char buf[16];
    if (v < 0) return "      -";
    std::snprintf(buf, sizeof buf, "%7.3f", v);
    return buf;
}

}  // namespace

int main() {
    // --- the prompt -----------------------------------------------------------------------------
    // "<prf>" is the Perfusion concept's token (superordinate word "teddy"); "sks" and "zw x" are
    // the two TARA concepts' rare tokens (one and two sub-tokens) before their class words.
    const std::vector<std::string> words = {"<bos>", "a",   "photo", "of",  "my",   "<prf>",
                                            "teddy", "next", "to",   "sks", "dog",  "and",
                                            "zw",    "x",    "cat",  "in",  "snow", "<eos>"};
    const std::vector<int> ids = {49406, 320, 1125, 539, 607,  49408, 16758, 1131, 531,
                                  48136, 1929, 537, 49410, 49411, 2368, 530, 2583, 49407};
    const int prf_id = 49408, teddy_id = 16758;
    const std::vector<int> sks = {48136}, zwx = {49410, 49411};
    const Index n = Index(ids.size());
    Index prf_pos = -1, teddy_pos = -1;
    for (Index t = 0; t < n; ++t) {
        if (ids[std::size_t(t)] == prf_id) prf_pos = t;
        if (ids[std::size_t(t)] == teddy_id) teddy_pos = t;
    }

    const Matrix<float> E = encode(ids);                 // n × 64
    const Matrix<float> W_K = random_matrix(out, in, 1.0 / std::sqrt(double(in)), 11);
    const Matrix<float> W_V = random_matrix(out, in, 1.0 / std::sqrt(double(in)), 12);
    const Matrix<float> zero = Matrix<float>::Zero(out, in);  // linear(E, zero + term) = the term alone

    // --- statistics C of the encoder's outputs over 256 random captions of 16 tokens ---------------
    lowrank::SecondMoment<float> C(in);
    {
        lowrank::Random rng(2023);
        for (int caption = 0; caption < 256; ++caption) {
            std::vector<int> words_ids(16);
            for (int& id : words_ids) id = int(rng.uniform(0, 20000));
            C.add(encode(words_ids));
        }
    }
    const MatD C_plain = C.sum() / double(C.count());
    const double ridge = 1e-3 * C_plain.trace() / double(in);
    C.set_ridge(ridge);
    const MatD C_ridged = C_plain + ridge * MatD::Identity(in, in);

    // --- Perfusion: key-locked K edit and trainable V edit for the concept "<prf>" --------------
    // i_super: the encoding of "teddy" where the concept token stands (the prompt with the concept
    // word replaced by its superordinate, Perfusion's "global locking" input).
    std::vector<int> super_ids = ids;
    super_ids[std::size_t(prf_pos)] = teddy_id;
    const Matrix<float> E_super = encode(super_ids);
    const Matrix<float> i_super = E_super.row(prf_pos);
    auto key = lowrank::KeyLockedEdit<float>::key(W_K, C, i_super);      // o*_K = W_K i_super, fixed
    auto value = lowrank::KeyLockedEdit<float>::value(W_V, C, i_super);  // o*_V trainable
    // "Training": i* follows the concept token's encoding by Perfusion's EMA (decay 0.99), and the
    // value target o*_V moves away from W_V i_super (a made-up learned appearance vector).
    const Matrix<float> e_concept = E.row(prf_pos);
    const int ema_steps = 400;
    for (int step = 0; step < ema_steps; ++step) {
        key.update_target_input(e_concept, W_K, C, 0.99);
        value.update_target_input(e_concept, W_V, C, 0.99);
    }
    const VecD o_V = (W_V.cast<double>() * i_super.transpose().cast<double>() +
                      random_matrix(out, 1, 0.8, 13).cast<double>())
                         .eval();
    value.set_target_output(o_V);

    // --- TARA: two concepts, each a LoRA on K and one on V, masked to its own rare tokens ---------
    auto make_lora = [](std::uint64_t seed) {
        lowrank::Lora<float> l(out, in, {.rank = 4, .alpha = 8, .seed = seed});
        l.B() = random_matrix(out, 4, 0.5, seed + 1000);  // pretend it was trained (PEFT: B = 0)
        return l;
    };
    const lowrank::Lora<float> sks_K = make_lora(21), sks_V = make_lora(22);
    const lowrank::Lora<float> zwx_K = make_lora(31), zwx_V = make_lora(32);
    const Matrix<float> M = lowrank::token_masks(ids, {sks, zwx});  // 2 × n, TARA's masks

    // --- the double reference's inputs, computed independently of the library --------------------
    const MatD Ed = E.cast<double>(), W_Kd = W_K.cast<double>(), W_Vd = W_V.cast<double>();
    VecD i_star = i_super.transpose().cast<double>();
    for (int step = 0; step < ema_steps; ++step)
        i_star = 0.99 * i_star + (1 - 0.99) * e_concept.transpose().cast<double>();
    const VecD o_K = W_Kd * i_super.transpose().cast<double>();
    VecD mask_sks = VecD::Zero(n), mask_zwx = VecD::Zero(n);
    for (Index t = 0; t < n; ++t) {  // the masks by hand: positions of "sks" and of "zw" "x"
        const int id = ids[std::size_t(t)];
        if (id == sks[0]) mask_sks(t) = 1;
        if ((id == zwx[0] && t + 1 < n && ids[std::size_t(t + 1)] == zwx[1]) ||
            (id == zwx[1] && t > 0 && ids[std::size_t(t - 1)] == zwx[0]))
            mask_zwx(t) = 1;
    }
    if (!(M.row(0).cast<double>().transpose() - mask_sks).isZero(0) ||
        !(M.row(1).cast<double>().transpose() - mask_zwx).isZero(0)) {
        std::printf("MISMATCH token_masks: library masks differ from the positions found by hand\n");
        ++failures;
    }
    auto adapters_of = [&](const lowrank::Lora<float>& a, const lowrank::Lora<float>& b) {
        return std::vector<Adapter>{
            {a.A().cast<double>(), a.B().cast<double>(), double(a.scale()), mask_sks},
            {b.A().cast<double>(), b.B().cast<double>(), double(b.scale()), mask_zwx}};
    };
    const std::vector<Adapter> ad_K = adapters_of(sks_K, zwx_K), ad_V = adapters_of(sks_V, zwx_V);

    // --- one expression per projection, and each concept's contribution alone --------------------
    const lowrank::Gate g0 = key.gate();
    const Matrix<float> K = lowrank::linear(E, W_K + key + sks_K.masked(M.row(0)) + zwx_K.masked(M.row(1)));
    const Matrix<float> V = lowrank::linear(E, W_V + value + sks_V.masked(M.row(0)) + zwx_V.masked(M.row(1)));
    const Matrix<float> K_base = E * W_K.transpose(), V_base = E * W_V.transpose();
    const Matrix<float> dK_edit = lowrank::linear(E, zero + key);
    const Matrix<float> dK_sks = lowrank::linear(E, zero + sks_K.masked(M.row(0)));
    const Matrix<float> dK_zwx = lowrank::linear(E, zero + zwx_K.masked(M.row(1)));
    const Matrix<float> dV_edit = lowrank::linear(E, zero + value);
    const Matrix<float> dV_sks = lowrank::linear(E, zero + sks_V.masked(M.row(0)));
    const Matrix<float> dV_zwx = lowrank::linear(E, zero + zwx_V.masked(M.row(1)));

    const Reference rK = reference(Ed, W_Kd, C_ridged, i_star, o_K, g0.beta, g0.tau, false, ad_K);
    const Reference rV = reference(Ed, W_Vd, C_ridged, i_star, o_V, g0.beta, g0.tau, false, ad_V);
    check("K (composed)", K, rK.total);
    check("V (composed)", V, rV.total);
    check("K edit alone", dK_edit, rK.edit);
    check("V edit alone", dV_edit, rV.edit);
    check("K sks adapter alone", dK_sks, rK.adapters[0]);
    check("K zwx adapter alone", dK_zwx, rK.adapters[1]);
    check("V sks adapter alone", dV_sks, rV.adapters[0]);
    check("V zwx adapter alone", dV_zwx, rV.adapters[1]);
    // A masked adapter leaves the other tokens bit-for-bit alone.
    for (Index t = 0; t < n; ++t)
        for (int k = 0; k < 2; ++k) {
            const Matrix<float>& dK = k == 0 ? dK_sks : dK_zwx;
            const Matrix<float>& dV = k == 0 ? dV_sks : dV_zwx;
            const bool on = M(k, t) != 0;
            if (on == dK.row(t).isZero(0) || on == dV.row(t).isZero(0)) {
                std::printf("MISMATCH: TARA adapter %d %s token %lld\n", k,
                            on ? "does not move its own" : "moves the foreign", (long long)t);
                ++failures;
            }
        }

    std::printf("Toy cross-attention layer: E %lld x %lld (prompt below), W_K and W_V %lld x %lld, "
                "C from %llu encodings (+ ridge %.2g)\n",
                (long long)n, (long long)in, (long long)out, (long long)in,
                (unsigned long long)C.count(), ridge);
    std::printf("Perfusion concept <prf> (superordinate \"teddy\"): K edit key-locked (o* = W_K i_super), "
                "V edit with trained o*; i* = EMA of the <prf> encoding over %d steps; gate beta = %.2f, "
                "tau = %.2f\n", ema_steps, g0.beta, g0.tau);
    std::printf("TARA concepts: sks (ids {48136}) and zw x (ids {49410, 49411}), rank-4 LoRA on K and on V "
                "each, scale %.1f, masks from token_masks\n", double(sks_K.scale()));
    std::printf("K = linear(E, W_K + key + sks_K.masked(M.row(0)) + zwx_K.masked(M.row(1))), V likewise\n\n");
    std::printf("Per token: ||change of the row|| / ||base row|| caused by each concept ('-': exactly 0)\n");
    std::printf("  s(e) = e'C^-1 i* / i*'C^-1 i*  (1 on the key), gate = sigmoid((s - beta) / tau)\n\n");
    std::printf("  t  token   id     sks zwx    s(e)   gate  | K: <prf>     sks     zwx | V: <prf>     sks     zwx\n");
    for (Index t = 0; t < n; ++t) {
        std::printf("%3lld  %-6s %5d   %3.0f %3.0f  %6.3f  %5.3f  |  %s %s %s |  %s %s %s\n", (long long)t,
                    words[std::size_t(t)].c_str(), ids[std::size_t(t)], double(M(0, t)), double(M(1, t)),
                    rK.s(t), rK.gate(t), cell(relative_move(dK_edit, K_base, t)).c_str(),
                    cell(relative_move(dK_sks, K_base, t)).c_str(),
                    cell(relative_move(dK_zwx, K_base, t)).c_str(),
                    cell(relative_move(dV_edit, V_base, t)).c_str(),
                    cell(relative_move(dV_sks, V_base, t)).c_str(),
                    cell(relative_move(dV_zwx, V_base, t)).c_str());
    }
    // The key lock: the concept token's key now points where "teddy"'s key points in context.
    const Matrix<float> K_super = E_super * W_K.transpose();
    const double cos_before = double(K_base.row(prf_pos).dot(K_super.row(prf_pos))) /
                              double(K_base.row(prf_pos).norm() * K_super.row(prf_pos).norm());
    const double cos_after = double(K.row(prf_pos).dot(K_super.row(prf_pos))) /
                             double(K.row(prf_pos).norm() * K_super.row(prf_pos).norm());
    std::printf("\nKey lock: cosine(K row of <prf>, K row of \"teddy\" in its place) = %.3f before the edit, "
                "%.3f after\n", cos_before, cos_after);
    std::printf("The TARA adapters move only their masked tokens (other rows bit-for-bit unchanged). The edit's\n"
                "gate opens only where s(e) is near 1 (<prf>); other tokens still move by about |s(e)| ||W i*||\n"
                "through the projection e - s(e) i* (Perfusion's orthogonalisation), which is why \"my\" (whose\n"
                "context is part of the <prf> encoding) moves more than unrelated words.\n");

    // --- β, τ per call ---------------------------------------------------------------------------
    std::printf("\nGate per call (edit.with_gate(beta, tau); nothing is recomputed, the stored gate stays):\n");
    std::printf("  columns: the gate value at <prf>, then ||change by the edit|| / ||base row|| at <prf>, at \"teddy\"\n"
                "  and the largest over the other tokens; the composed K and V are checked for every setting\n");
    std::printf("  gate                    gate@<prf>  K: <prf>  teddy  max other | V: <prf>  teddy  max other\n");
    struct Setting {
        const char* name;
        double beta, tau;
        bool rome;
    };
    const Setting settings[] = {{"stored (0.70, 0.15)", g0.beta, g0.tau, false},
                                {"with_gate(0.60, 0.15)", 0.60, 0.15, false},
                                {"with_gate(0.90, 0.05)", 0.90, 0.05, false},
                                {"with_gate(1.05, 0.05)", 1.05, 0.05, false},
                                {"with_gate(0.40, 0.30)", 0.40, 0.30, false},
                                {"rome_limit() (gate=s)", 0, 1, true}};
    for (const Setting& st : settings) {
        const auto key_call = st.rome ? key.rome_limit() : key.with_gate(st.beta, st.tau);
        const auto value_call = st.rome ? value.rome_limit() : value.with_gate(st.beta, st.tau);
        const Matrix<float> Kc = lowrank::linear(E, W_K + key_call + sks_K.masked(M.row(0)) + zwx_K.masked(M.row(1)));
        const Matrix<float> Vc = lowrank::linear(E, W_V + value_call + sks_V.masked(M.row(0)) + zwx_V.masked(M.row(1)));
        const Matrix<float> dK = lowrank::linear(E, zero + key_call);
        const Matrix<float> dV = lowrank::linear(E, zero + value_call);
        const Reference gK = reference(Ed, W_Kd, C_ridged, i_star, o_K, st.beta, st.tau, st.rome, ad_K);
        const Reference gV = reference(Ed, W_Vd, C_ridged, i_star, o_V, st.beta, st.tau, st.rome, ad_V);
        const std::string label = std::string(st.name);
        check((label + ": K").c_str(), Kc, gK.total);
        check((label + ": V").c_str(), Vc, gV.total);
        check((label + ": K edit").c_str(), dK, gK.edit);
        check((label + ": V edit").c_str(), dV, gV.edit);
        double max_other_K = 0, max_other_V = 0;
        for (Index t = 0; t < n; ++t)
            if (t != prf_pos && t != teddy_pos) {
                max_other_K = std::max(max_other_K, relative_move(dK, K_base, t));
                max_other_V = std::max(max_other_V, relative_move(dV, V_base, t));
            }
        std::printf("  %-22s  %8.3f    %7.3f %6.3f %9.3f  | %7.3f %6.3f %9.3f\n", st.name, gK.gate(prf_pos),
                    relative_move(dK, K_base, prf_pos), relative_move(dK, K_base, teddy_pos), max_other_K,
                    relative_move(dV, V_base, prf_pos), relative_move(dV, V_base, teddy_pos), max_other_V);
    }
    const lowrank::Gate after = key.gate();
    if (after.beta != g0.beta || after.tau != g0.tau) {
        std::printf("MISMATCH: with_gate changed the stored gate\n");
        ++failures;
    }
    std::printf("  stored gate after these calls: (%.2f, %.2f)\n", after.beta, after.tau);

    std::printf("\nChecked %s against a dense double computation: largest |error| / bound = %.3f (bound: "
                "float rounding of each dot product, see reference())\n",
                "every K and V above (composed and per concept)", worst_ratio);
    if (failures) {
        std::printf("FAILED: %d mismatches\n", failures);
        return 1;
    }
    std::printf("all checks passed\n");
    return 0;
}
