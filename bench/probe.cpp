// SPDX-License-Identifier: Apache-2.0
// The machine's rooflines, measured where the benchmarks run: single thread, fp32 (fp64 beside it).
//
// - FMA peak: independent chains of `acc = fma(acc, m, a)` on xsimd batches of the widest
//   architecture the compiler flags enable, for several chain counts (a chain count of latency ×
//   issue width keeps every FMA pipe busy; more chains than vector registers spill). The best count
//   is reported with the GFLOP/s it reached.
// - Broadcast tile in L1: the rate of the library's tile shape (8 rows broadcast × 3 vectors, 24
//   accumulators, with 32 registers; 4 × 3 with 16) over panels that stay in L1, nothing else to
//   do: 3 loads and 8 broadcasts per 24 FMAs, against the peak's none. What a GEMM-like kernel can
//   reach on the machine; reported beside the peak (the rooflines stay on the peak).
// - Read bandwidth: repeated passes summing a hot working set, from 16 KiB (L1) through L2- and
//   L3-sized sets to 512 MiB (DRAM); bytes read / time. The best of 1, 2, 4 and 8 sequential
//   streams side by side (one stream alone leaves DRAM bandwidth unused on some machines, while a
//   GEMV over the rows of W reads several), so a kernel cannot beat its roofline by reading W
//   row-interleaved.
// - In-place read-modify-write bandwidth: x ← 0.5·x + 1 over the same sizes and stream counts;
//   bytes read + written / time (how `merge` is counted).
// - Write bandwidth: plain stores x ← 1 over the same sizes and stream counts; bytes written /
//   time (each line is still fetched before it is written: the cost of a kernel's fresh outputs,
//   such as the backward's factor gradients).
// - The bandwidths from 2 MiB on also in memory advised for transparent huge pages (the way
//   `PackedWeight` holds W): each point of a curve is the best over both page sizes, and says which
//   won, so no kernel reading huge pages can beat a roofline measured in 4 KiB ones.
//
// Every number is the median of repetitions timed in this thread's CPU time (the machine is shared:
// wall time would count other processes' time slices). Prints JSON to stdout.
//
//   probe [--quick]      (--quick: fewer repetitions, shorter samples; for tests of the script)

#include <lowrank/core/memory.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

using Arch = xsimd::default_arch;

double thread_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const std::size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

struct Settings {
    int repetitions = 9;
    double sample_seconds = 0.02;  // each repetition runs at least this long
};

/// Median over repetitions of (work per call × calls) / time, where each repetition repeats `body`
/// until it has run `sample_seconds`. The call count is fixed after a calibration run.
template <class F>
double median_rate(const Settings& s, double work_per_call, F&& body) {
    body();  // warm: page faults, caches, frequency
    long calls = 1;
    for (;;) {
        const double t0 = thread_seconds();
        for (long i = 0; i < calls; ++i) body();
        const double t = thread_seconds() - t0;
        if (t >= 0.25 * s.sample_seconds) {
            calls = std::max<long>(1, long(double(calls) * s.sample_seconds / std::max(t, 1e-9)));
            break;
        }
        calls *= 4;
    }
    std::vector<double> rates;
    for (int rep = 0; rep < s.repetitions; ++rep) {
        const double t0 = thread_seconds();
        for (long i = 0; i < calls; ++i) body();
        const double t = thread_seconds() - t0;
        rates.push_back(work_per_call * double(calls) / t);
    }
    return median(rates);
}

// ---- FMA peak -----------------------------------------------------------------------------------

template <class T>
T sink_value = T(0);  // results land here, so the chains are not dead code

/// `steps` rounds of N independent FMA chains; returns nothing, stores a checksum.
template <class T, std::size_t N>
[[gnu::noinline]] void fma_chains(long steps) {
    using batch = xsimd::batch<T, Arch>;
    // acc ← acc·m + a converges to a / (1 − m) = 2: no overflow, no subnormals.
    const batch m(T(0.5)), a(T(1));
    std::array<batch, N> acc;
    for (std::size_t j = 0; j < N; ++j) acc[j] = batch(T(j));
    for (long i = 0; i < steps; ++i)
        [&]<std::size_t... J>(std::index_sequence<J...>) {
            ((acc[J] = xsimd::fma(acc[J], m, a)), ...);
        }(std::make_index_sequence<N>{});
    batch total(T(0));
    for (const auto& v : acc) total += v;
    sink_value<T> += xsimd::hadd(total);
}

template <class T, std::size_t N>
double fma_rate(const Settings& s) {
    constexpr long steps = 1 << 16;
    constexpr double flops = 2.0 * double(xsimd::batch<T, Arch>::size) * double(N) * double(steps);
    return median_rate(s, flops, [] { fma_chains<T, N>(steps); });
}

struct Peak {
    double gflops = 0;
    std::size_t accumulators = 0;
    std::vector<std::pair<std::size_t, double>> by_accumulators;
};

template <class T, std::size_t... N>
Peak fma_peak_over(const Settings& s) {
    Peak p;
    ((p.by_accumulators.emplace_back(N, fma_rate<T, N>(s) * 1e-9)), ...);
    for (const auto& [n, g] : p.by_accumulators)
        if (g > p.gflops) p.gflops = g, p.accumulators = n;
    return p;
}

/// 512-bit vectors come with 32 registers (AVX-512); narrower ones with 16 (AVX2, SSE, NEON).
template <class T>
constexpr bool wide_registers = sizeof(xsimd::batch<T, Arch>) >= 64;

template <class T>
Peak fma_peak(const Settings& s) {
    if constexpr (wide_registers<T>)
        return fma_peak_over<T, 8, 12, 16, 20, 24, 28>(s);
    else
        return fma_peak_over<T, 6, 8, 10, 12, 14>(s);
}

// ---- broadcast tile in L1 -----------------------------------------------------------------------

constexpr long tile_depth = 128;  // steps: panels of 4 KiB (A) and 24 KiB (B) in float, 48 KiB of L1

/// C = Σ_p a[p·MR + i] · b[p·NV·W + v·W …] over tile_depth steps, C held in MR × NV vectors (each
/// row of A broadcast, NV loads of B per step); C is then summed into the checksum.
template <class T, int MR, int NV>
[[gnu::noinline]] void tile_pass(const T* a, const T* b) {
    using batch = xsimd::batch<T, Arch>;
    constexpr long W = long(batch::size);
    std::array<std::array<batch, NV>, MR> acc;
    for (auto& row : acc) row.fill(batch(T(0)));
    for (long p = 0; p < tile_depth; ++p) {
        std::array<batch, NV> x;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) x[v] = batch::load_aligned(b + (p * NV + v) * W);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            const batch ai(a[p * MR + i]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[i][v] = xsimd::fma(ai, x[v], acc[i][v]);
        }
    }
    batch total(T(0));
    for (const auto& row : acc)
        for (const auto& v : row) total += v;
    sink_value<T> += xsimd::hadd(total);
}

struct Tile {
    double gflops = 0;
    int rows = 0, vectors = 0;
};

template <class T>
Tile tile_peak(const Settings& s) {
    constexpr int MR = wide_registers<T> ? 8 : 4, NV = 3;
    constexpr long W = long(xsimd::batch<T, Arch>::size);
    using buffer = std::vector<T, xsimd::aligned_allocator<T, 64>>;
    buffer a(std::size_t(tile_depth * MR)), b(std::size_t(tile_depth * NV * W));
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = T(1) / T(1 + i % 7);  // values that neither grow nor vanish
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = T(1) / T(1 + i % 5);
    const double flops = 2.0 * double(MR * NV * W * tile_depth);
    return {median_rate(s, flops, [&] { tile_pass<T, MR, NV>(a.data(), b.data()); }) * 1e-9, MR, NV};
}

// ---- bandwidth ----------------------------------------------------------------------------------

/// A working set of `bytes`, in ordinary pages or (huge) in memory advised for 2 MiB pages before
/// its first write, as lowrank::core::HugePageAllocator does for a PackedWeight.
struct Buffer {
    float* data = nullptr;
    std::size_t count = 0;
    bool huge = false;
    Buffer(std::size_t bytes, bool huge_pages) : count(bytes / sizeof(float)), huge(huge_pages) {
        data = huge ? lowrank::core::HugePageAllocator<float>().allocate(count)
                    : static_cast<float*>(std::aligned_alloc(64, count * sizeof(float)));
        if (!data) {
            std::fprintf(stderr, "probe: cannot allocate %zu bytes\n", bytes);
            std::exit(1);
        }
        for (std::size_t i = 0; i < count; ++i) data[i] = float(i % 7) * 0.25f;  // touch every page
    }
    ~Buffer() {
        if (huge)
            lowrank::core::HugePageAllocator<float>().deallocate(data, count);
        else
            std::free(data);
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
};

/// One pass summing the buffer as S equal parts read side by side (S sequential streams, like the
/// rows of a GEMV), 8 vector accumulators in all (enough to hide the add latency at two loads per
/// cycle). The count is a multiple of 8 vectors per stream for every size used.
template <int S>
[[gnu::noinline]] float read_pass(const float* x, std::size_t count) {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::size_t W = batch::size, U = 8 / S;  // vectors per stream and step
    const std::size_t part = count / S;
    std::array<batch, 8> acc;
    acc.fill(batch(0.f));
    for (std::size_t i = 0; i < part; i += U * W)
        [&]<std::size_t... J>(std::index_sequence<J...>) {
            ((acc[J] += batch::load_aligned(x + (J / U) * part + i + (J % U) * W)), ...);
        }(std::make_index_sequence<8>{});
    batch total(0.f);
    for (const auto& v : acc) total += v;
    return xsimd::hadd(total);
}

/// One in-place pass x ← 0.5·x + 1 over S side-by-side streams, 8 vectors per step.
template <int S>
[[gnu::noinline]] void rmw_pass(float* x, std::size_t count) {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::size_t W = batch::size, U = 8 / S;
    const std::size_t part = count / S;
    const batch m(0.5f), a(1.f);
    for (std::size_t i = 0; i < part; i += U * W)
        [&]<std::size_t... J>(std::index_sequence<J...>) {
            ((xsimd::fma(batch::load_aligned(x + (J / U) * part + i + (J % U) * W), m, a)
                  .store_aligned(x + (J / U) * part + i + (J % U) * W)),
             ...);
        }(std::make_index_sequence<8>{});
}

/// One pass of plain stores x ← 1 over S side-by-side streams, 8 vectors per step: the lines are
/// not read by the program, but each store to a line not in L1 first fetches it (read for
/// ownership), and every line is written back as it leaves, so a kernel's outputs (the factor
/// gradients of the backward) cost more per byte than its inputs.
template <int S>
[[gnu::noinline]] void write_pass(float* x, std::size_t count) {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::size_t W = batch::size, U = 8 / S;
    const std::size_t part = count / S;
    const batch one(1.f);
    for (std::size_t i = 0; i < part; i += U * W)
        [&]<std::size_t... J>(std::index_sequence<J...>) {
            (one.store_aligned(x + (J / U) * part + i + (J % U) * W), ...);
        }(std::make_index_sequence<8>{});
}

/// Best bandwidth over 1, 2, 4 and 8 concurrent streams (one stream alone does not keep enough
/// misses in flight to reach DRAM's bandwidth on every machine), and the stream count that won.
struct Bandwidth {
    double gbps = 0;
    int streams = 0;
    bool huge = false;  ///< measured in memory advised for huge pages
};

/// Best over the stream counts S of `pass(std::integral_constant<int, S>())`, one pass over the
/// buffer moving `bytes` (as counted for the curve).
template <int... S, class Pass>
Bandwidth best_of_streams(const Settings& s, const Buffer& b, double bytes, Pass&& pass) {
    Bandwidth best;
    const auto one = [&](auto streams) {
        const double g = median_rate(s, bytes, [&] { pass(streams); }) * 1e-9;
        if (g > best.gbps) best = {g, decltype(streams)::value, b.huge};
    };
    (one(std::integral_constant<int, S>()), ...);
    return best;
}

Bandwidth best_read(const Settings& s, const Buffer& b) {
    return best_of_streams<1, 2, 4, 8>(s, b, double(b.count * sizeof(float)), [&](auto streams) {
        sink_value<float> += read_pass<decltype(streams)::value>(b.data, b.count);
    });
}

Bandwidth best_rmw(const Settings& s, const Buffer& b) {  // bytes read + written
    return best_of_streams<1, 2, 4, 8>(s, b, 2.0 * double(b.count * sizeof(float)),
                                       [&](auto streams) { rmw_pass<decltype(streams)::value>(b.data, b.count); });
}

Bandwidth best_write(const Settings& s, const Buffer& b) {
    return best_of_streams<1, 2, 4, 8>(s, b, double(b.count * sizeof(float)), [&](auto streams) {
        write_pass<decltype(streams)::value>(b.data, b.count);
        sink_value<float> += b.data[b.count / 2];  // the stores are observed
    });
}

// ---- machine description ------------------------------------------------------------------------

std::string cpu_model() {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
        if (line.rfind("model name", 0) == 0) {
            const auto colon = line.find(':');
            if (colon != std::string::npos) {
                auto v = line.substr(colon + 1);
                v.erase(0, v.find_first_not_of(' '));
                return v;
            }
        }
    return "unknown";
}

std::string json_string(const std::string& v) {
    std::string out = "\"";
    for (char c : v) {
        if (c == '"' || c == '\\') out += '\\';
        if (static_cast<unsigned char>(c) >= 0x20) out += c;
    }
    return out + "\"";
}

long sysconf_or_zero(int name) {
    const long v = sysconf(name);
    return v > 0 ? v : 0;
}

constexpr std::size_t KiB = 1024, MiB = 1024 * 1024;

}  // namespace

int main(int argc, char** argv) {
    Settings s;
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--quick") == 0) {
            s.repetitions = 3;
            s.sample_seconds = 0.005;
        } else {
            std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
            return 2;
        }
    }

    const Peak f32 = fma_peak<float>(s);
    const Peak f64 = fma_peak<double>(s);
    const Tile t32 = tile_peak<float>(s), t64 = tile_peak<double>(s);

    // Named points (what the issue quotes) and the whole curve, which run.py interpolates at each
    // benchmark's working set.
    const std::vector<std::size_t> sizes = {16 * KiB, 256 * KiB, 1 * MiB,  2 * MiB,  4 * MiB, 8 * MiB,
                                            16 * MiB, 32 * MiB,  64 * MiB, 96 * MiB, 512 * MiB};
    std::vector<Bandwidth> read, rmw, write;
    auto better = [](const Bandwidth& a, const Bandwidth& b) { return b.gbps > a.gbps ? b : a; };
    for (std::size_t bytes : sizes) {
        Bandwidth r, m, w;
        for (bool huge : {false, true}) {
            if (huge && bytes < lowrank::core::huge_page_bytes) continue;
            const Buffer b(bytes, huge);
            r = better(r, best_read(s, b));
            m = better(m, best_rmw(s, b));
            w = better(w, best_write(s, b));
        }
        read.push_back(r);
        rmw.push_back(m);
        write.push_back(w);
    }
    auto at = [&](const std::vector<Bandwidth>& v, std::size_t bytes) {
        return v[std::size_t(std::find(sizes.begin(), sizes.end(), bytes) - sizes.begin())].gbps;
    };

    char date[64];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    char host[256] = "unknown";
    gethostname(host, sizeof host - 1);

    std::printf("{\n");
    std::printf("  \"date\": \"%s\",\n", date);
    std::printf("  \"machine\": {\"cpu\": %s, \"host\": %s, \"hardware_threads\": %u,\n",
                json_string(cpu_model()).c_str(), json_string(host).c_str(),
                std::thread::hardware_concurrency());
    std::printf("              \"l1d_bytes\": %ld, \"l2_bytes\": %ld, \"l3_bytes\": %ld,\n",
                sysconf_or_zero(_SC_LEVEL1_DCACHE_SIZE), sysconf_or_zero(_SC_LEVEL2_CACHE_SIZE),
                sysconf_or_zero(_SC_LEVEL3_CACHE_SIZE));
    std::printf("              \"compiler\": %s},\n", json_string(__VERSION__).c_str());
    std::printf("  \"method\": {\"threads\": 1, \"timer\": \"thread CPU time\", \"statistic\": \"median\","
                " \"repetitions\": %d, \"sample_seconds\": %g},\n",
                s.repetitions, s.sample_seconds);
    std::printf("  \"simd\": {\"arch\": %s, \"fp32_lanes\": %zu, \"fp64_lanes\": %zu},\n",
                json_string(Arch::name()).c_str(), std::size_t(xsimd::batch<float, Arch>::size),
                std::size_t(xsimd::batch<double, Arch>::size));
    auto print_peak = [](const char* name, const Peak& p, bool last) {
        std::printf("  \"%s\": {\"gflops\": %.2f, \"accumulators\": %zu, \"by_accumulators\": {", name,
                    p.gflops, p.accumulators);
        for (std::size_t i = 0; i < p.by_accumulators.size(); ++i)
            std::printf("%s\"%zu\": %.2f", i ? ", " : "", p.by_accumulators[i].first,
                        p.by_accumulators[i].second);
        std::printf("}}%s\n", last ? "" : ",");
    };
    print_peak("fma_peak_fp32", f32, false);
    print_peak("fma_peak_fp64", f64, false);
    for (const auto& [name, t] : {std::pair{"tile_peak_fp32", t32}, std::pair{"tile_peak_fp64", t64}})
        std::printf("  \"%s\": {\"gflops\": %.2f, \"rows\": %d, \"vectors\": %d, \"depth\": %ld},\n", name,
                    t.gflops, t.rows, t.vectors, tile_depth);
    std::printf("  \"read_gbps\": {\"L1_16KiB\": %.2f, \"L2_256KiB\": %.2f, \"L3_8MiB\": %.2f, "
                "\"L3_32MiB\": %.2f, \"DRAM_512MiB\": %.2f},\n",
                at(read, 16 * KiB), at(read, 256 * KiB), at(read, 8 * MiB), at(read, 32 * MiB),
                at(read, 512 * MiB));
    std::printf("  \"rmw_gbps\": {\"L2_256KiB\": %.2f, \"L3_8MiB\": %.2f, \"L3_32MiB\": %.2f, "
                "\"DRAM_512MiB\": %.2f},\n",
                at(rmw, 256 * KiB), at(rmw, 8 * MiB), at(rmw, 32 * MiB), at(rmw, 512 * MiB));
    std::printf("  \"write_gbps\": {\"L2_256KiB\": %.2f, \"L3_8MiB\": %.2f, \"L3_32MiB\": %.2f, "
                "\"DRAM_512MiB\": %.2f},\n",
                at(write, 256 * KiB), at(write, 8 * MiB), at(write, 32 * MiB), at(write, 512 * MiB));
    // [bytes, GB/s, streams, page KiB (4: ordinary pages won, 2048: the advised ones)] per size.
    auto print_curve = [&](const char* name, const std::vector<Bandwidth>& v, bool last) {
        std::printf("  \"%s\": [", name);
        for (std::size_t i = 0; i < sizes.size(); ++i)
            std::printf("%s[%zu, %.2f, %d, %d]", i ? ", " : "", sizes[i], v[i].gbps, v[i].streams,
                        v[i].huge ? 2048 : 4);
        std::printf("]%s\n", last ? "" : ",");
    };
    print_curve("read_curve", read, false);
    print_curve("rmw_curve", rmw, false);
    print_curve("write_curve", write, false);
    std::printf("  \"checksum\": %g\n}\n", double(sink_value<float>) + sink_value<double>);
}
