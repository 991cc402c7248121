// SPDX-License-Identifier: Apache-2.0
// Rank-one key-locked edits (ROME, Perfusion): against dense double-precision formulas written
// here from the method's equations (inverse of C by Eigen's LU of a naively accumulated EᵀE/N),
// finite-difference gradient checks, and every class of bad input.

#include <lowrank/expr/expr.hpp>
#include <lowrank/lora.hpp>
#include <lowrank/rank_one.hpp>
#include <lowrank/testing/gradcheck.hpp>

#include <Eigen/Eigenvalues>
#include <Eigen/LU>

#include "support.hpp"

using namespace lowrank;
using lowrank::test::eps;
using lowrank::test::max_abs;
using lowrank::test::naive_product;
using lowrank::test::product_bound;
using lowrank::test::random_matrix;
using lowrank::test::require_within;
using lowrank::test::to_double;

namespace {

constexpr double u_double = 0x1.0p-53;

/// Statistics of N random encodings, and the dense reference C⁻¹ computed independently of the
/// library: C = EᵀE / N by a naive triple loop, inverted by Eigen's full-pivoting LU. κ = cond₂(C).
template <class T>
struct Stats {
    SecondMoment<T> moment;
    Matrix<double> C, Cinv;
    double kappa;
};
template <class T>
Stats<T> make_stats(Index in, Index N, std::uint64_t seed) {
    const Matrix<T> D = random_matrix<T>(N, in, seed);
    SecondMoment<T> m(in);
    m.add(D.topRows(N / 3));
    m.add(D.bottomRows(N - N / 3));
    const Matrix<double> d = to_double(D);
    Matrix<double> C = naive_product(d.transpose(), d) / double(N);
    Matrix<double> Cinv = Eigen::FullPivLU<Eigen::MatrixXd>(Eigen::MatrixXd(C)).inverse();
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es{Eigen::MatrixXd(C)};
    const double kappa = es.eigenvalues().maxCoeff() / es.eigenvalues().minCoeff();
    return {std::move(m), std::move(C), std::move(Cinv), kappa};
}

double logistic(double x) { return 1.0 / (1.0 + std::exp(-x)); }

/// Perfusion's forward written directly from the method's equations, in double, with an error
/// bound for the library's computation in precision u (see `bound` below).
struct Reference {
    Matrix<double> H;      // n × out
    Matrix<double> bound;  // n × out
    Matrix<double> eperp;  // n × in (e⊥ of every row)
};
Reference perfusion_reference(const Matrix<double>& E, const Matrix<double>& W,
                              const Matrix<double>& Cinv, double kappa, const Matrix<double>& I,
                              const Matrix<double>& O, const std::vector<Gate>& gates,
                              Orthogonalization mode, bool linear_gate, double u) {
    const Index n = E.rows(), in = E.cols(), out = W.rows(), K = I.rows();
    const Matrix<double> CinvI = naive_product(Cinv, I.transpose());  // in × K
    Vector<double> energy(K);
    for (Index c = 0; c < K; ++c) energy(c) = I.row(c).dot(CinvI.col(c).transpose());
    const Matrix<double> G = naive_product(I, CinvI);
    const Matrix<double> Ginv = Eigen::FullPivLU<Eigen::MatrixXd>(Eigen::MatrixXd(G)).inverse();
    Matrix<double> A(K, in), P(K, in);
    for (Index c = 0; c < K; ++c) A.row(c) = CinvI.col(c).transpose() / energy(c);
    P = mode == Orthogonalization::exact ? Matrix<double>(naive_product(Ginv, CinvI.transpose())) : A;
    const Matrix<double> WI = naive_product(W, I.transpose());  // out × K
    double kappa_g = 1;
    if (mode == Orthogonalization::exact && K > 1) {
        Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es{Eigen::MatrixXd(G)};
        kappa_g = es.eigenvalues().maxCoeff() / es.eigenvalues().minCoeff();
    }
    // Rounding: the shrink (length in), the per-row transform, the expand (2K terms) and the base
    // product (length in) in precision u, γ = 2 (in + 2K + 4) u; the double solves behind P and A
    // contribute a relative error ≤ 8 · in · κ(C) κ(G) · 2⁻⁵³.
    const double gamma = 2.0 * double(in + 2 * K + 4) * u + 8.0 * double(in) * kappa * kappa_g * u_double;
    Reference r{Matrix<double>::Zero(n, out), Matrix<double>::Zero(n, out), Matrix<double>(n, in)};
    for (Index t = 0; t < n; ++t) {
        const Vector<double> e = E.row(t).transpose();
        Vector<double> s(K), p(K), gate(K), abs_p(K), abs_a(K);
        for (Index c = 0; c < K; ++c) s(c) = A.row(c).dot(e.transpose());
        p = mode == Orthogonalization::exact ? Vector<double>(P * e) : s;
        const Vector<double> ep = e - I.transpose() * p;
        r.eperp.row(t) = ep.transpose();
        for (Index c = 0; c < K; ++c) {
            gate(c) = linear_gate ? s(c) : logistic((s(c) - gates[c].beta) / gates[c].tau);
            abs_p(c) = P.row(c).cwiseAbs().dot(e.cwiseAbs().transpose());
            abs_a(c) = A.row(c).cwiseAbs().dot(e.cwiseAbs().transpose());
        }
        for (Index j = 0; j < out; ++j) {
            double h = W.row(j).dot(ep.transpose());
            double scale = W.row(j).cwiseAbs().dot(e.cwiseAbs().transpose());
            for (Index c = 0; c < K; ++c) {
                h += gate(c) * O(c, j);
                const double dgate = linear_gate ? 1.0 : 0.25 / gates[c].tau;
                scale += (std::abs(p(c)) + abs_p(c)) * std::abs(WI(j, c)) +
                         (std::abs(gate(c)) + abs_a(c) * dgate) * std::abs(O(c, j));
            }
            r.H(t, j) = h;
            r.bound(t, j) = gamma * scale + u * std::abs(h) + std::numeric_limits<double>::min();
        }
    }
    return r;
}

/// Encodings that exercise the gate's transition: random rows and rows α·i*_c + small noise.
template <class T>
Matrix<T> test_tokens(Index n_random, const Matrix<double>& I, std::uint64_t seed) {
    const Index in = I.cols(), K = I.rows();
    const double alphas[] = {0.4, 0.7, 0.85, 1.0, 1.2};
    Matrix<double> E(n_random + 5 * K, in);
    E.topRows(n_random) = to_double(random_matrix<T>(n_random, in, seed));
    const Matrix<double> noise = 0.05 * to_double(random_matrix<T>(5 * K, in, seed + 1));
    for (Index c = 0; c < K; ++c)
        for (Index a = 0; a < 5; ++a)
            E.row(n_random + 5 * c + a) = alphas[a] * I.row(c) + noise.row(5 * c + a);
    return E.template cast<T>();
}

template <class T>
Matrix<double> rows_of(const std::vector<Vector<double>>& v) {
    Matrix<double> m(Index(v.size()), v.front().size());
    for (std::size_t i = 0; i < v.size(); ++i) m.row(Index(i)) = v[i].transpose();
    return m;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ROME
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("ROME: W' k* = v*, W' e = W e when k*ᵀC⁻¹e = 0, and the dense formula",
                   "[rank_one][rome]", float, double) {
    using T = TestType;
    const Index in = 20, out = 13;
    const auto st = make_stats<T>(in, 80, 1);
    const Matrix<T> W = random_matrix<T>(out, in, 2);
    const Matrix<T> kT = random_matrix<T>(in, 1, 3), vT = random_matrix<T>(out, 1, 4);
    const Matrix<double> w = to_double(W), k = to_double(kT), v = to_double(vT);
    const RomeEdit<T> edit = rome_edit(W, st.moment, kT, vT);

    // Dense formula: W' = W + (v − W k)(C⁻¹k)ᵀ / (kᵀC⁻¹k).
    const Matrix<double> ck = naive_product(st.Cinv, k);
    const double energy = (k.transpose() * ck)(0, 0);
    const Matrix<double> resid = v - naive_product(w, k);
    const Matrix<double> dW = naive_product(resid, ck.transpose()) / energy;
    const Matrix<double> Wref = w + dW;
    // ΔW entries carry the solve's relative error 8·in·κ·2⁻⁵³ and u from each rounded factor, the
    // residual the error of a length-in dot product.
    const double u = eps<T>();
    const double rel = 8.0 * in * st.kappa * u_double + 4 * u;
    const Matrix<double> resid_err = product_bound(w.cwiseAbs(), k.cwiseAbs(), u) + u * v.cwiseAbs();
    const Matrix<double> dW_bound =
        (rel * naive_product(resid.cwiseAbs() + resid_err, ck.transpose().cwiseAbs()) +
         naive_product(resid_err, ck.transpose().cwiseAbs())) / energy;

    const Matrix<T> Wm = dense(W + edit);
    require_within(Wm, Wref, dW_bound + u * Wref.cwiseAbs(), "dense(W + rome)");

    Matrix<T> Wm2 = W;
    merge(Wm2, edit);
    REQUIRE(Wm2 == Wm);

    // W' k* = v*: the merged weight's product, within the error of ΔW and of the product.
    const Matrix<double> Wk = naive_product(to_double(Wm), k);
    require_within(Wk, v,
                   naive_product(dW_bound + 2 * u * Wref.cwiseAbs(), k.cwiseAbs()) +
                       product_bound(Wref.cwiseAbs(), k.cwiseAbs(), u),
                   "W' k* = v*");

    // W' e = W e for e C⁻¹-orthogonal to k*: e = r − (kᵀC⁻¹r / kᵀC⁻¹k) k.
    const Matrix<double> r = to_double(random_matrix<T>(in, 1, 5));
    const Matrix<double> e = r - ((ck.transpose() * r)(0, 0) / energy) * k;
    const Matrix<T> E = e.transpose().template cast<T>();
    const Matrix<double> e_rounded = to_double(E).transpose();
    const Matrix<T> He = linear(E, W + edit);
    // The edit's contribution s(e)(v − Wk) is zero up to the rounding of e to T and the solve.
    const double s_err = (ck.transpose().cwiseAbs() * (e_rounded - e).cwiseAbs())(0, 0) / energy +
                         rel * (ck.transpose().cwiseAbs() * e.cwiseAbs())(0, 0) / energy +
                         2.0 * (in + 2) * u * (ck.transpose().cwiseAbs() * e.cwiseAbs())(0, 0) / energy;
    require_within(He.transpose(), naive_product(w, e_rounded),
                   product_bound(w.cwiseAbs(), e_rounded.cwiseAbs(), u) +
                       s_err * (resid.cwiseAbs() + resid_err) +
                       product_bound(Matrix<double>::Constant(1, 1, s_err), resid.transpose().cwiseAbs(), u).transpose(),
                   "W' e = W e");

    // The dense-C overload gives the same edit as the statistics object (same C to rounding).
    const RomeEdit<T> edit2 = rome_edit(W, st.C, kT, vT);
    require_within(edit2.key_direction(), to_double(edit.key_direction()),
                   2 * rel * to_double(edit.key_direction()).cwiseAbs() +
                       Matrix<double>::Constant(1, in, std::numeric_limits<double>::min()),
                   "dense-C ROME");
    REQUIRE(edit2.residual() == edit.residual());
}

// ---------------------------------------------------------------------------------------------
// Perfusion, one concept
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("gated edit: key and value constructors, forward equals the dense formula",
                   "[rank_one][forward]", float, double) {
    using T = TestType;
    const Index in = 24, out = GENERATE(1, 19);
    const auto st = make_stats<T>(in, 96, 11);
    const Matrix<T> W = random_matrix<T>(out, in, 12);
    const Matrix<T> i_super = random_matrix<T>(1, in, 13);
    const Matrix<double> w = to_double(W), I = to_double(i_super);
    const Matrix<double> Wi = naive_product(I, w.transpose());  // 1 × out: W i_super

    auto key = KeyLockedEdit<T>::key(W, st.moment, i_super);
    auto value = KeyLockedEdit<T>::value(W, st.moment, i_super.transpose(), perfusion_training_gate);
    REQUIRE(key.is_key_locked());
    REQUIRE_FALSE(value.is_key_locked());
    REQUIRE(key.gate().beta == 0.7);
    REQUIRE(key.gate().tau == 0.15);
    REQUIRE(value.gate().beta == 0.75);
    // o* = W i_super (computed in double from the T entries).
    require_within(key.target_output().transpose(), Wi,
                   product_bound(I.cwiseAbs(), w.transpose().cwiseAbs(), u_double), "o*_K");
    REQUIRE(value.target_output() == key.target_output());
    REQUIRE(key.target_input() == I.transpose());

    const Index n = GENERATE(0, 1, 40);
    CAPTURE(n, out);
    const Matrix<T> E = test_tokens<T>(n, I, 14);
    const Matrix<double> e = to_double(E);
    const double u = eps<T>();

    // Key edit, default inference gate.
    {
        const auto ref = perfusion_reference(e, w, st.Cinv, st.kappa, I, Wi, {perfusion_inference_gate},
                                             Orthogonalization::exact, false, u);
        const Matrix<T> H = linear(E, W + key);
        require_within(H, ref.H, ref.bound, "key edit");
        Matrix<T> H2;
        forward(E, W, key, H2);
        REQUIRE(H2 == H);
    }
    // Value edit with a trained o* and per-call gates (no recomputation).
    const Matrix<T> o = random_matrix<T>(1, out, 15);
    value.set_target_output(o);
    for (const Gate g : {Gate{0.75, 0.1}, Gate{0.5, 0.3}, Gate{0.9, 0.05}}) {
        const auto ref = perfusion_reference(e, w, st.Cinv, st.kappa, I, to_double(o), {g},
                                             Orthogonalization::exact, false, u);
        const Matrix<T> H = linear(E, W + value.with_gate(g.beta, g.tau));
        require_within(H, ref.H, ref.bound, "value edit with_gate");
        auto copy = value;
        copy.set_gate(g);
        const Matrix<T> H2 = linear(E, W + copy);
        REQUIRE(H2 == H);
    }
    // e⊥ is C⁻¹-orthogonal to i*: with W = I_in and o* = 0 the output is e⊥ itself.
    {
        const Matrix<T> Id = Matrix<T>::Identity(in, in);
        auto probe = KeyLockedEdit<T>::from_targets(Id, st.moment, i_super, Matrix<T>::Zero(1, in));
        const Matrix<T> Ep = linear(E, Id + probe);
        const auto ref = perfusion_reference(e, to_double(Id), st.Cinv, st.kappa, I,
                                             Matrix<double>::Zero(1, in), {perfusion_inference_gate},
                                             Orthogonalization::exact, false, u);
        require_within(Ep, ref.eperp, ref.bound, "e_perp");
    }
}

TEMPLATE_TEST_CASE("gate replaced by s(e) reproduces the ROME edit exactly", "[rank_one][rome]",
                   float, double) {
    using T = TestType;
    const Index in = 16, out = 11, n = 30;
    const auto st = make_stats<T>(in, 64, 21);
    const Matrix<T> W = random_matrix<T>(out, in, 22);
    const Matrix<T> i_star = random_matrix<T>(1, in, 23), o_star = random_matrix<T>(1, out, 24);
    const auto edit = KeyLockedEdit<T>::from_targets(W, st.moment, i_star, o_star);
    const Matrix<double> w = to_double(W), I = to_double(i_star), O = to_double(o_star);
    const Matrix<T> E = test_tokens<T>(n, I, 25);
    const Matrix<double> e = to_double(E);

    // The dense ROME weight W' = W + (o* − W i*)(C⁻¹i*)ᵀ/(i*ᵀC⁻¹i*), applied to E.
    const Matrix<double> ci = naive_product(st.Cinv, I.transpose());
    const double energy = naive_product(I, ci)(0, 0);
    const Matrix<double> Wrome = w + naive_product(O.transpose() - naive_product(w, I.transpose()),
                                                   ci.transpose()) / energy;
    const Matrix<double> Hrome = naive_product(e, Wrome.transpose());
    const auto ref = perfusion_reference(e, w, st.Cinv, st.kappa, I, O, {edit.gate()},
                                         Orthogonalization::exact, true, eps<T>());
    const auto ref_d = perfusion_reference(e, w, st.Cinv, st.kappa, I, O, {edit.gate()},
                                           Orthogonalization::exact, true, u_double);
    require_within(ref.H, Hrome, 2 * ref_d.bound, "the reference's linear gate is ROME");

    const Matrix<T> H = linear(E, W + edit.rome_limit());
    require_within(H, Hrome, ref.bound, "rome_limit");
    // And the library's own ROME term, unmerged, agrees with it.
    const RomeEdit<T> rome = rome_edit(W, st.moment, i_star, o_star);
    const Matrix<T> H2 = linear(E, W + rome);
    require_within(H2, Hrome, ref.bound, "rome_edit term");
}

TEMPLATE_TEST_CASE("EMA update of i* and mixing with LoRA terms in one expression",
                   "[rank_one][forward]", float, double) {
    using T = TestType;
    const Index in = 12, out = 9, n = 17;
    const auto st = make_stats<T>(in, 60, 31);
    const Matrix<T> W = random_matrix<T>(out, in, 32);
    const Matrix<T> i_super = random_matrix<T>(1, in, 33), e_tok = random_matrix<T>(1, in, 34);
    auto edit = KeyLockedEdit<T>::value(W, st.moment, i_super);
    edit.update_target_input(e_tok, W, st.moment, 0.99);
    const Vector<double> want = 0.99 * to_double(i_super).transpose() + 0.01 * to_double(e_tok).transpose();
    REQUIRE(max_abs(edit.target_input() - want) <= 4 * u_double * max_abs(want));
    // o* of the value path is kept (initialised from W i_super), only i* moved.
    const auto fresh = KeyLockedEdit<T>::from_targets(W, st.moment, edit.target_input(),
                                                      edit.target_output());
    const Matrix<T> E = random_matrix<T>(n, in, 35);
    const Matrix<T> H1 = linear(E, W + edit), H2 = linear(E, W + fresh);
    REQUIRE(H1 == H2);

    // W + edit + LoRA in one expression = the edit's output + the LoRA delta.
    Lora<T> lora(out, in, {.rank = 3, .alpha = 6, .seed = 36});
    lora.B() = random_matrix<T>(out, 3, 37);
    const Matrix<T> Hmix = linear(E, W + edit + 0.5 * lora);
    Matrix<T> Hsep = H1;
    Lora<T> half = lora;
    half.set_alpha(3);
    add_delta(E, half, Hsep);
    const double tol = 8 * eps<T>() * double(in + 8) *
                       (max_abs(to_double(Hsep)) + max_abs(to_double(E)) * double(in) * 4);
    REQUIRE(max_abs(to_double(Hmix) - to_double(Hsep)) <= tol);
}

// ---------------------------------------------------------------------------------------------
// Several concepts
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("several concepts: exact joint orthogonalisation and the approximate form",
                   "[rank_one][multi]", float, double) {
    using T = TestType;
    const Index in = 24, out = 17, K = GENERATE(2, 3), n = 25;
    CAPTURE(K);
    const auto st = make_stats<T>(in, 120, 41);
    const Matrix<T> W = random_matrix<T>(out, in, 42);
    const Matrix<double> w = to_double(W);
    std::vector<KeyLockedEdit<T>> concepts;
    std::vector<Gate> gates;
    Matrix<double> I(K, in), O(K, out);
    for (Index c = 0; c < K; ++c) {
        const Matrix<T> ic = random_matrix<T>(1, in, 43 + c), oc = random_matrix<T>(1, out, 53 + c);
        const Gate g{0.55 + 0.05 * double(c), 0.12 + 0.02 * double(c)};
        concepts.push_back(KeyLockedEdit<T>::from_targets(W, st.moment, ic, oc, g));
        gates.push_back(g);
        I.row(c) = to_double(ic);
        O.row(c) = to_double(oc);
    }
    std::vector<const KeyLockedEdit<T>*> ptrs;
    for (const auto& c : concepts) ptrs.push_back(&c);
    const KeyLockedEditSet<T> exact(W, st.moment, ptrs);
    const KeyLockedEditSet<T> approx(W, st.moment, ptrs, Orthogonalization::approximate);
    REQUIRE(exact.concepts() == K);
    REQUIRE(exact.orthogonalization() == Orthogonalization::exact);
    const Matrix<T> E = test_tokens<T>(n, I, 44);
    const Matrix<double> e = to_double(E);
    const double u = eps<T>();

    const auto ref_exact = perfusion_reference(e, w, st.Cinv, st.kappa, I, O, gates,
                                               Orthogonalization::exact, false, u);
    const auto ref_approx = perfusion_reference(e, w, st.Cinv, st.kappa, I, O, gates,
                                                Orthogonalization::approximate, false, u);
    const Matrix<T> He = linear(E, W + exact), Ha = linear(E, W + approx);
    require_within(He, ref_exact.H, ref_exact.bound, "exact");
    require_within(Ha, ref_approx.H, ref_approx.bound, "approximate");
    // Random i* are not C⁻¹-orthogonal: the two forms must differ (the test could fail).
    REQUIRE(max_abs(ref_exact.H - ref_approx.H) > 100 * max_abs(ref_exact.bound));

    // Per-call gates for every concept.
    std::vector<Gate> other;
    for (Index c = 0; c < K; ++c) other.push_back({0.6, 0.15 + 0.05 * double(c)});
    const auto ref_other = perfusion_reference(e, w, st.Cinv, st.kappa, I, O, other,
                                               Orthogonalization::exact, false, u);
    require_within(Matrix<T>(linear(E, W + exact.with_gates(other))), ref_other.H, ref_other.bound,
                   "with_gates");
    KeyLockedEditSet<T> changed = exact;
    for (Index c = 0; c < K; ++c) changed.set_gate(c, other[std::size_t(c)]);
    REQUIRE(Matrix<T>(linear(E, W + changed)) == Matrix<T>(linear(E, W + exact.with_gates(other))));

    // Exact e⊥ is C⁻¹-orthogonal to every i*_c: W = I_in, o* = 0 makes the output e⊥.
    const Matrix<T> Id = Matrix<T>::Identity(in, in);
    std::vector<KeyLockedEdit<T>> probes;
    for (Index c = 0; c < K; ++c)
        probes.push_back(KeyLockedEdit<T>::from_targets(Id, st.moment, I.row(c),
                                                        Matrix<T>::Zero(1, in), gates[std::size_t(c)]));
    std::vector<const KeyLockedEdit<T>*> probe_ptrs;
    for (const auto& p : probes) probe_ptrs.push_back(&p);
    const KeyLockedEditSet<T> probe(Id, st.moment, probe_ptrs);
    const Matrix<double> ep = to_double(Matrix<T>(linear(E, Id + probe)));
    const auto ref_perp = perfusion_reference(e, to_double(Id), st.Cinv, st.kappa, I,
                                              Matrix<double>::Zero(K, in), gates,
                                              Orthogonalization::exact, false, u);
    require_within(ep, ref_perp.eperp, ref_perp.bound, "e_perp (exact)");
    // i*_cᵀ C⁻¹ e⊥ = 0 up to the error of e⊥ propagated through |C⁻¹ i*_c|.
    const Matrix<double> CinvI = naive_product(st.Cinv, I.transpose());
    const Matrix<double> inner = naive_product(ep, CinvI);  // n × K
    const Matrix<double> inner_bound = naive_product(ref_perp.bound, CinvI.cwiseAbs()) +
                                       product_bound(ep.cwiseAbs(), CinvI.cwiseAbs(), u_double);
    require_within(inner, Matrix<double>::Zero(e.rows(), K), inner_bound, "C^-1-orthogonality");
    // The approximate form is not orthogonal for these concepts.
    const KeyLockedEditSet<T> probe_approx(Id, st.moment, probe_ptrs, Orthogonalization::approximate);
    const Matrix<double> inner_a = naive_product(to_double(Matrix<T>(linear(E, Id + probe_approx))), CinvI);
    REQUIRE(max_abs(inner_a) > 100 * max_abs(inner_bound));
}

TEMPLATE_TEST_CASE("approximate equals exact when the concepts are C⁻¹-orthogonal",
                   "[rank_one][multi]", float, double) {
    using T = TestType;
    const Index in = 20, out = 15, K = 3, n = 20;
    const auto st = make_stats<T>(in, 100, 61);
    const Matrix<T> W = random_matrix<T>(out, in, 62);
    // Gram–Schmidt (twice) in the C⁻¹ inner product, in double. The edits keep i* in double, so
    // the library sees concepts C⁻¹-orthogonal to double rounding for T = float too.
    Matrix<double> I = to_double(random_matrix<T>(K, in, 63));
    for (int pass = 0; pass < 2; ++pass) {
        for (Index c = 0; c < K; ++c)
            for (Index b = 0; b < c; ++b) {
                const double num = (I.row(c) * st.Cinv * I.row(b).transpose())(0, 0);
                const double den = (I.row(b) * st.Cinv * I.row(b).transpose())(0, 0);
                I.row(c) -= (num / den) * I.row(b);
            }
    }
    std::vector<KeyLockedEdit<T>> concepts;
    std::vector<Gate> gates;
    Matrix<double> O(K, out);
    for (Index c = 0; c < K; ++c) {
        O.row(c) = to_double(random_matrix<T>(1, out, 70 + c));
        gates.push_back({0.6, 0.15});
        // The double master copy of i* is used as given (vector_arg reads doubles exactly).
        concepts.push_back(KeyLockedEdit<T>::from_targets(W, st.moment, I.row(c), O.row(c), gates.back()));
    }
    std::vector<const KeyLockedEdit<T>*> ptrs;
    for (const auto& c : concepts) ptrs.push_back(&c);
    const KeyLockedEditSet<T> exact(W, st.moment, ptrs);
    const KeyLockedEditSet<T> approx(W, st.moment, ptrs, Orthogonalization::approximate);
    const Matrix<T> E = test_tokens<T>(n, I, 64);
    const Matrix<double> e = to_double(E);
    const auto ref = perfusion_reference(e, to_double(W), st.Cinv, st.kappa, I, O, gates,
                                         Orthogonalization::exact, false, eps<T>());
    const auto ref_a = perfusion_reference(e, to_double(W), st.Cinv, st.kappa, I, O, gates,
                                           Orthogonalization::approximate, false, eps<T>());
    // The two dense formulas agree (to double rounding) for orthogonal concepts ...
    const auto ref_d = perfusion_reference(e, to_double(W), st.Cinv, st.kappa, I, O, gates,
                                           Orthogonalization::exact, false, u_double);
    require_within(ref_a.H, ref.H, 2 * ref_d.bound, "formulas agree");
    // ... and so do the library's two forms, each within its own bound of the formula.
    const Matrix<T> He = linear(E, W + exact), Ha = linear(E, W + approx);
    require_within(He, ref.H, ref.bound, "exact");
    require_within(Ha, ref.H, ref.bound + ref_a.bound, "approximate");
    require_within(Ha, to_double(He), 2 * (ref.bound + ref_a.bound), "approximate vs exact");
}

// ---------------------------------------------------------------------------------------------
// Gradients
// ---------------------------------------------------------------------------------------------

namespace {

struct GradSetup {
    Index in = 10, out = 7, n = 9;
    Stats<double> st = make_stats<double>(10, 50, 81);
    Matrix<double> W = random_matrix<double>(7, 10, 82);
};

void require_ok(const testing::GradCheckResult& r, const char* what) {
    INFO(what << ": " << r.message());
    REQUIRE(r.ok);
}

}  // namespace

TEST_CASE("one concept: every gradient passes the finite-difference check", "[rank_one][gradcheck]") {
    GradSetup s;
    const Matrix<double> i_star = random_matrix<double>(1, s.in, 83), o_star = random_matrix<double>(1, s.out, 84);
    const Gate gate = perfusion_training_gate;
    const auto edit = KeyLockedEdit<double>::from_targets(s.W, s.st.moment, i_star, o_star, gate);
    const Matrix<double> E = test_tokens<double>(s.n, i_star, 85);
    const Matrix<double> dY = random_matrix<double>(E.rows(), s.out, 86);

    KeyLockedGrad<double> g;
    Matrix<double> dE;
    backward(E, s.W, edit, dY, g, dE,
             {.gate = true, .target_input = true, .statistics = &s.st.moment});
    REQUIRE(g.target_output.rows() == 1);
    REQUIRE(g.target_input.cols() == s.in);

    const auto H_of_E = [&](const Matrix<double>& x) { return Matrix<double>(linear(x, s.W + edit)); };
    require_ok(testing::check_vjp(H_of_E, E, dY, dE), "dE");

    const auto H_of_o = [&](const Matrix<double>& o) {
        auto e2 = edit;
        e2.set_target_output(o);
        return Matrix<double>(linear(E, s.W + e2));
    };
    require_ok(testing::check_vjp(H_of_o, o_star, dY, g.target_output), "do*");

    Matrix<double> bt(1, 2), dbt(1, 2);
    bt << gate.beta, gate.tau;
    dbt << g.beta(0), g.tau(0);
    const auto H_of_bt = [&](const Matrix<double>& p) {
        return Matrix<double>(linear(E, s.W + edit.with_gate(p(0, 0), p(0, 1))));
    };
    require_ok(testing::check_vjp(H_of_bt, bt, dY, dbt), "dbeta, dtau");

    const auto H_of_i = [&](const Matrix<double>& i) {
        const auto e2 = KeyLockedEdit<double>::from_targets(s.W, s.st.moment, i, o_star, gate);
        return Matrix<double>(linear(E, s.W + e2));
    };
    require_ok(testing::check_vjp(H_of_i, i_star, dY, g.target_input), "di*");

    // The same gradients through the ROME limit (linear gate).
    const auto rome = edit.rome_limit();
    backward(E, s.W, rome, dY, g, dE);
    const auto R_of_E = [&](const Matrix<double>& x) { return Matrix<double>(linear(x, s.W + rome)); };
    require_ok(testing::check_vjp(R_of_E, E, dY, dE), "dE (rome limit)");
    const auto R_of_o = [&](const Matrix<double>& o) {
        auto e2 = edit;
        e2.set_target_output(o);
        return Matrix<double>(linear(E, s.W + e2.rome_limit()));
    };
    require_ok(testing::check_vjp(R_of_o, o_star, dY, g.target_output), "do* (rome limit)");

    // Without dE: the same parameter gradients.
    KeyLockedGrad<double> g2;
    backward(E, s.W, edit, dY, g2);
    backward(E, s.W, edit, dY, g, dE);
    REQUIRE(g2.target_output == g.target_output);
    REQUIRE(g2.beta.size() == 0);
    REQUIRE(g2.target_input.size() == 0);
}

TEST_CASE("several concepts: every gradient passes the finite-difference check",
          "[rank_one][gradcheck]") {
    GradSetup s;
    const Index K = 3;
    const Orthogonalization mode = GENERATE(Orthogonalization::exact, Orthogonalization::approximate);
    CAPTURE(int(mode));
    const Matrix<double> I0 = random_matrix<double>(K, s.in, 91), O0 = random_matrix<double>(K, s.out, 92);
    std::vector<Gate> gates{{0.6, 0.15}, {0.7, 0.1}, {0.5, 0.2}};
    const auto make_set = [&](const Matrix<double>& I, const Matrix<double>& O,
                              const std::vector<Gate>& gs) {
        std::vector<KeyLockedEdit<double>> cs;
        for (Index c = 0; c < K; ++c)
            cs.push_back(KeyLockedEdit<double>::from_targets(s.W, s.st.moment, I.row(c), O.row(c),
                                                             gs[std::size_t(c)]));
        std::vector<const KeyLockedEdit<double>*> ptrs;
        for (const auto& c : cs) ptrs.push_back(&c);
        return KeyLockedEditSet<double>(s.W, s.st.moment, ptrs, mode);
    };
    const auto set = make_set(I0, O0, gates);
    const Matrix<double> E = test_tokens<double>(s.n, I0, 93);
    const Matrix<double> dY = random_matrix<double>(E.rows(), s.out, 94);
    KeyLockedGrad<double> g;
    Matrix<double> dE;
    backward(E, s.W, set, dY, g, dE, {.gate = true, .target_input = true, .statistics = &s.st.moment});

    require_ok(testing::check_vjp([&](const Matrix<double>& x) { return Matrix<double>(linear(x, s.W + set)); },
                                  E, dY, dE),
               "dE");
    require_ok(testing::check_vjp(
                   [&](const Matrix<double>& O) {
                       auto s2 = set;
                       for (Index c = 0; c < K; ++c) s2.set_target_output(c, O.row(c));
                       return Matrix<double>(linear(E, s.W + s2));
                   },
                   O0, dY, g.target_output),
               "dO");
    Matrix<double> bt(K, 2), dbt(K, 2);
    for (Index c = 0; c < K; ++c) {
        bt.row(c) << gates[std::size_t(c)].beta, gates[std::size_t(c)].tau;
        dbt.row(c) << g.beta(c), g.tau(c);
    }
    require_ok(testing::check_vjp(
                   [&](const Matrix<double>& p) {
                       std::vector<Gate> gs;
                       for (Index c = 0; c < K; ++c) gs.push_back({p(c, 0), p(c, 1)});
                       return Matrix<double>(linear(E, s.W + set.with_gates(gs)));
                   },
                   bt, dY, dbt),
               "dbeta, dtau");
    require_ok(testing::check_vjp(
                   [&](const Matrix<double>& I) {
                       const auto s2 = make_set(I, O0, gates);
                       return Matrix<double>(linear(E, s.W + s2));
                   },
                   I0, dY, g.target_input),
               "dI");
}

TEMPLATE_TEST_CASE("backward in T agrees with the double backward within the rounding bound",
                   "[rank_one][backward]", float, double) {
    using T = TestType;
    GradSetup s;
    const Index K = 2;
    const Matrix<double> i_star = random_matrix<double>(K, s.in, 101), o_star = random_matrix<double>(K, s.out, 102);
    // Data rounded to T first, so both computations see the same inputs; C is accumulated in
    // double from the same encodings, so the factors V, U of the T edit are the T-roundings of
    // the double edit's (the solves are the same computation).
    const Matrix<T> W = s.W.cast<T>();
    const Matrix<double> Wd = to_double(W);
    SecondMoment<T> C(s.in);
    C.add(random_matrix<double>(50, s.in, 81));  // the encodings of s.st
    const auto c0 = KeyLockedEdit<T>::from_targets(W, C, i_star.row(0), o_star.row(0));
    const auto c1 = KeyLockedEdit<T>::from_targets(W, C, i_star.row(1), o_star.row(1));
    const KeyLockedEditSet<T> set(W, C, {c0, c1});
    const auto d0 = KeyLockedEdit<double>::from_targets(Wd, s.st.moment, i_star.row(0), o_star.row(0));
    const auto d1 = KeyLockedEdit<double>::from_targets(Wd, s.st.moment, i_star.row(1), o_star.row(1));
    const KeyLockedEditSet<double> dset(Wd, s.st.moment, {d0, d1});
    const Matrix<T> Et = test_tokens<double>(s.n, i_star, 103).cast<T>();
    const Matrix<T> dYt = random_matrix<T>(Et.rows(), s.out, 104);
    const Matrix<double> E = to_double(Et), dY = to_double(dYt);
    const Index n = E.rows();
    KeyLockedGrad<T> g;
    KeyLockedGrad<double> gd;
    Matrix<T> dE;
    Matrix<double> dEd;
    backward(Et, W, set, dYt, g, dE, {.gate = true});
    backward(E, Wd, dset, dY, gd, dEd, {.gate = true});

    // Error bound, from the absolute values of the double computation: every product and
    // reduction in T has relative error γ = 2 (in + out + 2K + 4) u; the shrink outputs s carry
    // δs ≤ γ |E||V|ᵀ, which moves σ' / τ by at most 0.1 δs / τ² (|d(σ(1−σ))/dx| ≤ 0.1) and σ by
    // δs / (4τ).
    const double u = eps<T>();
    const double gamma = 2.0 * double(s.in + s.out + 2 * K + 4) * u;
    const Matrix<double> V = eigen_map(dset.shrink_factor()), U = eigen_map(dset.expand_factor());
    const Matrix<double> abs_back = naive_product(dY.cwiseAbs(), U.cwiseAbs());   // n × 2K
    const Matrix<double> abs_s = naive_product(E.cwiseAbs(), V.cwiseAbs().transpose());  // n × 2K
    Matrix<double> abs_dt(n, 2 * K), err_dt(n, 2 * K), err_sigma(n, K);
    for (Index t = 0; t < n; ++t)
        for (Index c = 0; c < 2 * K; ++c) {
            const double tau = c < K ? 1.0 : dset.gate(c - K).tau;
            abs_dt(t, c) = abs_back(t, c) * (c < K ? 1.0 : 0.25 / tau);
            err_dt(t, c) = gamma * abs_back(t, c) *
                           (c < K ? 1.0 : 0.25 / tau + 0.1 * abs_s(t, c) / (tau * tau));
            if (c >= K) err_sigma(t, c - K) = gamma * (1.0 + abs_s(t, c) / (4 * tau));
        }
    const Matrix<double> dE_bound = product_bound(dY.cwiseAbs(), Wd.cwiseAbs(), u) +
                                    naive_product(err_dt + gamma * abs_dt, V.cwiseAbs());
    require_within(dE, dEd, dE_bound, "dE");
    const Matrix<double> dO_bound =
        naive_product(err_sigma.transpose(), dY.cwiseAbs()) +
        Matrix<double>::Constant(K, s.out, std::numeric_limits<double>::min());
    require_within(g.target_output, gd.target_output, dO_bound, "do*");
    Matrix<double> beta_bound(K, 1), tau_bound(K, 1);
    for (Index c = 0; c < K; ++c) {
        const Gate gate = dset.gate(c);
        double bb = 0, tb = 0;
        for (Index t = 0; t < n; ++t) {
            const double e = err_dt(t, K + c) + gamma * abs_dt(t, K + c) * double(n);
            const double sb = abs_s(t, K + c) + std::abs(gate.beta);
            bb += e;
            tb += (e * sb + abs_dt(t, K + c) * gamma * abs_s(t, K + c)) / gate.tau;
        }
        beta_bound(c, 0) = bb + std::numeric_limits<double>::min();
        tau_bound(c, 0) = tb + std::numeric_limits<double>::min();
    }
    require_within(g.beta, gd.beta, beta_bound, "dbeta");
    require_within(g.tau, gd.tau, tau_bound, "dtau");
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

TEST_CASE("bad input raises lowrank::error naming the function, argument and shapes",
          "[rank_one][errors]") {
    using Catch::Contains;
    const Index in = 8, out = 5;
    const Matrix<float> W = random_matrix<float>(out, in, 1);
    SecondMoment<float> good(in);
    good.add(random_matrix<float>(40, in, 2));
    const Matrix<float> i = random_matrix<float>(1, in, 3);

    SECTION("singular C without a ridge: the message suggests one") {
        SecondMoment<float> few(in);
        Matrix<float> d = random_matrix<float>(3, in, 4);
        d.rightCols(5).setZero();  // N = 3 < in = 8, and C has exact zero rows: exactly singular
        few.add(d);
        REQUIRE_THROWS_WITH(KeyLockedEdit<float>::key(W, few, i),
                            Contains("singular") && Contains("ridge") && Contains("N < in"));
        REQUIRE_THROWS_WITH(rome_edit(W, few, i, Matrix<float>::Zero(1, out)),
                            Contains("lowrank::SecondMoment::factorize") && Contains("set_ridge"));
        Matrix<double> Cs = Matrix<double>::Identity(in, in);
        Cs(in - 1, in - 1) = 0;
        REQUIRE_THROWS_WITH(rome_edit(W, Cs, i, Matrix<float>::Zero(1, out)),
                            Contains("lowrank::rome_edit") && Contains("C is singular") && Contains("ridge"));
        few.set_ridge(1e-3);
        REQUIRE_NOTHROW(KeyLockedEdit<float>::key(W, few, i));
    }
    SECTION("zero i* or k*") {
        const Matrix<float> z = Matrix<float>::Zero(1, in);
        REQUIRE_THROWS_WITH(KeyLockedEdit<float>::key(W, good, z),
                            Contains("lowrank::KeyLockedEdit::key") && Contains("zero"));
        REQUIRE_THROWS_WITH(rome_edit(W, good, z, Matrix<float>::Zero(1, out)),
                            Contains("lowrank::rome_edit") && Contains("k (1 x 8) is zero"));
        auto e = KeyLockedEdit<float>::value(W, good, i);
        REQUIRE_THROWS_WITH(e.set_target_input(z, W, good), Contains("set_target_input") && Contains("zero"));
        REQUIRE(e.target_input() == to_double(i).transpose());  // unchanged after the failure
    }
    SECTION("tau <= 0 or non-finite beta") {
        REQUIRE_THROWS_WITH(KeyLockedEdit<float>::key(W, good, i, {0.7, 0.0}),
                            Contains("tau of concept 0 must be finite and > 0, got 0"));
        auto e = KeyLockedEdit<float>::key(W, good, i);
        REQUIRE_THROWS_WITH(e.set_gate({0.7, -0.1}), Contains("lowrank::KeyLockedEdit::set_gate") && Contains("tau"));
        REQUIRE_THROWS_WITH(e.with_gate(NAN, 0.1), Contains("beta"));
        REQUIRE(e.gate().tau == 0.15);
        const auto e2 = KeyLockedEdit<float>::value(W, good, random_matrix<float>(1, in, 5));
        KeyLockedEditSet<float> set(W, good, {e, e2});
        REQUIRE_THROWS_WITH(set.set_gate(1, {0.6, -1}), Contains("tau of concept 1"));
        REQUIRE_THROWS_WITH(set.with_gates({Gate{0.6, 0.1}}), Contains("1 gates given for 2 concepts"));
        REQUIRE_THROWS_WITH(set.set_gate(2, {0.6, 0.1}), Contains("concept index 2 out of range"));
    }
    SECTION("shape mismatches") {
        REQUIRE_THROWS_WITH(KeyLockedEdit<float>::key(Matrix<float>(out, in + 1), good, i),
                            Contains("lowrank::KeyLockedEdit::key") && Contains("W is 5 x 9") &&
                                Contains("expected any x 8"));
        REQUIRE_THROWS_WITH(KeyLockedEdit<float>::value(W, good, Matrix<float>(1, in - 1)),
                            Contains("i_super is 1 x 7") && Contains("vector of 8 entries"));
        REQUIRE_THROWS_WITH(KeyLockedEdit<float>::from_targets(W, good, i, Matrix<float>(1, out + 2)),
                            Contains("o_star is 1 x 7") && Contains("5 entries"));
        REQUIRE_THROWS_WITH(rome_edit(W, good, i, Matrix<float>(2, out)), Contains("v is 2 x 5"));
        REQUIRE_THROWS_WITH(rome_edit(W, Matrix<float>(in, in + 1), i, Matrix<float>(1, out)),
                            Contains("C is 8 x 9") && Contains("expected 8 x 8"));
        auto e = KeyLockedEdit<float>::value(W, good, i);
        REQUIRE_THROWS_WITH(e.set_target_output(Matrix<float>(1, out + 1)), Contains("o is 1 x 6"));
        const Matrix<float> W2 = random_matrix<float>(out + 1, in, 6);
        Matrix<float> H;
        REQUIRE_THROWS_WITH(H = linear(Matrix<float>(3, in), W2 + e),
                            Contains("lowrank::linear") && Contains("5 x 8 weight applied to a 6 x 8"));
        REQUIRE_THROWS_WITH(H = linear(Matrix<float>(3, in + 1), W + e),
                            Contains("lowrank::linear") && Contains("X is 3 x 9"));
        KeyLockedGrad<float> g;
        Matrix<float> dE;
        REQUIRE_THROWS_WITH(backward(Matrix<float>(3, in), W, e, Matrix<float>(3, out + 1), g, dE),
                            Contains("lowrank::backward") && Contains("dY is 3 x 6") && Contains("expected 3 x 5"));
        REQUIRE_THROWS_WITH(backward(Matrix<float>(3, in), W, e, Matrix<float>(3, out), g, dE,
                                     {.target_input = true}),
                            Contains("needs the statistics C"));
        SecondMoment<float> other(in + 1);
        REQUIRE_THROWS_WITH(e.update_target_input(i, W, other), Contains("statistics C are 9 x 9"));
        REQUIRE_THROWS_WITH(KeyLockedEditSet<float>(W2, good, {e}), Contains("concept 0 edits a 5 x 8 weight"));
        REQUIRE_THROWS_WITH(e.update_target_input(i, W, good, 1.5), Contains("decay must be in [0, 1]"));
    }
    SECTION("key-locked o* cannot change; dependent concepts cannot be joined exactly") {
        auto k = KeyLockedEdit<float>::key(W, good, i);
        REQUIRE_THROWS_WITH(k.set_target_output(Matrix<float>::Zero(1, out)), Contains("key-locked"));
        const Matrix<float> i2 = 2.f * i;
        const auto k2 = KeyLockedEdit<float>::key(W, good, i2);
        REQUIRE_THROWS_WITH(KeyLockedEditSet<float>(W, good, {k, k2}),
                            Contains("lowrank::KeyLockedEditSet") && Contains("linearly dependent"));
        REQUIRE_NOTHROW(KeyLockedEditSet<float>(W, good, {k, k2}, Orthogonalization::approximate));
        KeyLockedEditSet<float> set(W, good, {k, k2}, Orthogonalization::approximate);
        REQUIRE_THROWS_WITH(set.set_target_output(0, Matrix<float>::Zero(1, out)), Contains("concept 0 is key-locked"));
    }
}
