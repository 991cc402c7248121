#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Run lowrank's performance benchmarks and write bench/results/{README.md, roofline.png}.

Builds nothing. Given a build directory in which these targets were built:

    ninja -C BUILD probe bench_core bench_lora callgrind_kernels

it runs
  - bench/probe: the machine's single-thread FMA peak, the rate of the library's broadcast tile in
    L1 (shown beside the peak, not used by the rooflines) and read / read-modify-write / write
    bandwidth curves (16 KiB ... 512 MiB), measured here and now, before the benchmarks and again after
    them (the roofline takes the better of the two at each point: best_probe);
  - bench_core (fused forward, merge, threads, double vs float, vs Eigen and OpenBLAS) and the
    adapter-part and backward rows of bench_lora, with --benchmark_format=json, repetitions and
    median aggregates;
  - callgrind_kernels under `valgrind --tool=callgrind`: instruction counts of one kernel per
    lowrank::core family and of the Eigen product of the same shape;
  - with --avx2-build DIR, lowrank's rows of bench_core and bench_lora from that second build
    (-march=x86-64-v3) and from this one, alternating round by round (issue 7: an AVX2-only build
    within 2× of the AVX-512 one);
and writes one markdown report and one roofline plot, plus the raw JSON of every run (raw_*.json).
Repetitions run randomly interleaved across benchmarks (--no-interleave: back to back), so a row
and its baselines share the same minutes of a shared machine.

Roofline of one row: t_memory = bytes / bandwidth, where the bandwidth is the probe's curve
(read, or read-modify-write for in-place updates) interpolated at the row's working set;
t_compute = flops / FMA peak of the row's precision; the bound is max(t_memory, t_compute) and the
row's fraction of the roofline is bound / measured time. The adapter-part and backward rows also
get a bound that charges each class of bytes at its own bandwidth (Roofline.bound_by_class:
writes of fresh outputs at the probe's write curve, in-place updates at its read-modify-write
one). Multi-thread rows are compared with their one-thread twins (speedup) and left out of the
single-thread roofline.

Python 3 with Debian's python3-matplotlib (without it, the PNG is skipped). Example:

    /usr/bin/python3 bench/run.py build                  # the numbers of record (~15 minutes)
    /usr/bin/python3 bench/run.py build --avx2-build build_avx2   # and the AVX2 build (~25 minutes)
    /usr/bin/python3 bench/run.py build --quick --min-time 0.01 --repetitions 3   # tests the script
"""

import argparse
import bisect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- running ------------------------------------------------------------------------------------


def binary(build, name, required=True):
    path = os.path.join(build, "bench", name)
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    if required:
        sys.exit(f"run.py: {path} not found; build it first: ninja -C {build} {name}")
    log(f"run.py: {path} not found, its section is skipped")
    return None


def run_probe(path, quick):
    log(f"run.py: {path}")
    out = subprocess.run([path] + (["--quick"] if quick else []), check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def best_probe(runs):
    """The machine's best showing over several probe runs, point by point: the highest FMA peak and,
    at each working set, the highest bandwidth (with its streams and pages). A probe is one sample of
    a shared machine; one run during a neighbour's burst (seen: 30.8 against 41.2 GB/s at 64 MiB,
    minutes apart) would lower the roofline and lift every fraction against it. The runs are kept
    under "runs" (FMA peaks and curves only)."""
    best = dict(runs[0])
    for key in ("fma_peak_fp32", "fma_peak_fp64", "tile_peak_fp32", "tile_peak_fp64"):
        if all(key in r for r in runs):
            best[key] = max((r[key] for r in runs), key=lambda v: v["gflops"])
    for key in ("read_gbps", "rmw_gbps", "write_gbps"):
        if all(key in r for r in runs):
            best[key] = {name: max(r[key][name] for r in runs) for name in runs[0][key]}
    for key in ("read_curve", "rmw_curve", "write_curve"):
        if not all(key in r for r in runs):
            continue
        best[key] = [max(points, key=lambda p: p[1]) for points in zip(*(r[key] for r in runs))]
    best["runs"] = [{k: r[k] for k in ("date", "fma_peak_fp32", "fma_peak_fp64", "tile_peak_fp32", "tile_peak_fp64",
                                       "read_curve", "rmw_curve", "write_curve") if k in r}
                    for r in runs]
    return best


def run_benchmark(path, repetitions, min_time, bench_filter=None, interleave=False, label=""):
    """One Google Benchmark program's JSON (medians only when repeated) and its command line."""
    cmd = [path, "--benchmark_format=json",
           f"--benchmark_repetitions={repetitions}",
           "--benchmark_report_aggregates_only=true",
           f"--benchmark_min_time={min_time}"]
    if interleave:
        # Repetitions of all benchmarks in random order: a row and its baselines are then sampled
        # over the same minutes of this shared machine, whose speed drifts by ±20% between them.
        cmd.append("--benchmark_enable_random_interleaving=true")
    if bench_filter:
        cmd.append(f"--benchmark_filter={bench_filter}")
    log(f"run.py: {label}" + " ".join(cmd))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out), cmd


# The rows of the AVX2-only comparison: lowrank's own single-thread rows of bench_core and bench_lora.
ARCH_FILTERS = {"bench_core": r"BM_(forward|forward_f64|merge)_lowrank/",
                "bench_lora": r"BM_(add_delta|backward_delta)_lowrank/"}


def run_arch_rounds(builds, rounds, min_time):
    """The same benchmarks from several builds, alternating: `rounds` rounds, each running every
    build's bench_core and bench_lora subset once (one repetition). Returns, per build, the list of
    its rounds' rows (medians() of each round; bench_lora's with derived counts)."""
    per_build = {name: [] for name in builds}
    for i in range(rounds):
        for name, build in builds.items():
            rows = []
            for bench, bench_filter in ARCH_FILTERS.items():
                out, _ = run_benchmark(binary(build, bench), 1, min_time, bench_filter,
                                       label=f"round {i + 1}/{rounds}: ")
                rows += medians(out, derive_counts=bench == "bench_lora")
            per_build[name].append(rows)
    return per_build


def median_over_rounds(rounds):
    """One row per (op, impl, args): the first round's row with the median time over rounds."""
    times, first = {}, {}
    for rows in rounds:
        for r in rows:
            key = (r["op"], r["impl"], tuple(sorted(r["args"].items())))
            times.setdefault(key, []).append(r["time_s"])
            first.setdefault(key, r)
    out = []
    for key, row in first.items():
        ts = sorted(times[key])
        mid = len(ts) // 2
        out.append(dict(row, time_s=ts[mid] if len(ts) % 2 else (ts[mid - 1] + ts[mid]) / 2,
                        rounds=len(ts)))
    return out


def run_callgrind(path):
    valgrind = shutil.which("valgrind")
    if not valgrind:
        log("run.py: valgrind not found, the callgrind section is skipped")
        return None
    listing = subprocess.run([path, "--list"], check=True, stdout=subprocess.PIPE,
                             text=True).stdout
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for line in listing.strip().splitlines():
            name, family, what, m, n, k, flops = line.split("\t")
            out_file = os.path.join(tmp, "callgrind.out." + name)
            cmd = [valgrind, "--tool=callgrind", "--collect-atstart=no",
                   "--toggle-collect=lowrank_callgrind_measure",
                   f"--callgrind-out-file={out_file}", path, name]
            log("run.py: " + " ".join(cmd))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            instructions = None
            with open(out_file) as f:
                for l in f:
                    if l.startswith("totals:") or (instructions is None and l.startswith("summary:")):
                        instructions = int(l.split()[1])
            rows.append({"name": name, "family": family, "what": what, "m": int(m), "n": int(n),
                         "k": int(k), "flops": float(flops), "instructions": instructions})
    return rows


# ---- parsing --------------------------------------------------------------------------------------

NAME = re.compile(r"^BM_(?P<op>.+)_(?P<impl>lowrank|eigen|openblas)/(?P<args>.*)$")


def medians(bench_json, derive_counts=False):
    """Median rows of a Google Benchmark JSON: dicts with op, impl, args (ints), time_s, counters.

    Rows of multi-thread benchmarks (`/real_time`) use wall time, the others thread CPU time.
    With derive_counts (bench_lora, whose counters are rates over CPU time), per-call flops and
    bytes are recovered as rate × CPU time and the working set is taken as the bytes.
    """
    # Median aggregates; a benchmark run once (--repetitions 1) has only its iteration row.
    chosen = {}
    for b in bench_json["benchmarks"]:
        if b.get("error_occurred"):
            continue
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") == "median":
            chosen[b["run_name"]] = b
        elif b.get("run_type") == "iteration" and b.get("repetitions", 1) <= 1:
            chosen.setdefault(b["run_name"], b)
    rows = []
    # In registration order (random interleaving reports repetitions in the order they ran).
    for b in sorted(chosen.values(), key=lambda b: (b.get("family_index", 0), b.get("per_family_instance_index", 0))):
        parts = b["run_name"].split("/")
        real = "real_time" in parts
        # Google Benchmark appends /process_time, /real_time, /manual_time to the run name.
        m = NAME.match("/".join(p for p in parts if not p.endswith("_time")))
        if not m:
            continue
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
        time_s = (b["real_time"] if real else b["cpu_time"]) * scale
        args = {}
        for i, part in enumerate(m.group("args").split("/")):
            key, _, value = part.rpartition(":")
            args[key or f"arg{i}"] = int(value)
        row = {"op": m.group("op"), "impl": m.group("impl"), "args": args, "time_s": time_s,
               "cpu_s": b["cpu_time"] * scale, "wall": real}
        if derive_counts:
            cpu_s = b["cpu_time"] * scale
            row.update(flops=b["GFLOP/s"] * cpu_s, bytes=b["GB/s"] * cpu_s, rmw=False,
                       threads=1, elem_bytes=4, write_bytes=b.get("write_bytes"),
                       rmw_bytes=b.get("rmw_bytes"))
            row["working_set"] = row["bytes"]
        else:
            row.update(flops=b["flops"], bytes=b["bytes"], working_set=b["working_set"],
                       rmw=bool(b["rmw"]), threads=int(b["threads"]), elem_bytes=int(b["elem_bytes"]))
        rows.append(row)
    return rows


# ---- the roofline ---------------------------------------------------------------------------------


class Roofline:
    def __init__(self, probe):
        self.probe = probe
        self.peak = {4: probe["fma_peak_fp32"]["gflops"] * 1e9,
                     8: probe["fma_peak_fp64"]["gflops"] * 1e9}
        self.curves = {False: probe["read_curve"], True: probe["rmw_curve"]}
        self.write_curve = probe.get("write_curve")

    def bandwidth(self, working_set, rmw):
        """Bytes/s at this working set, from the read (or read-modify-write) curve."""
        return self.interpolate(self.curves[rmw], working_set)

    @staticmethod
    def interpolate(curve, working_set):
        """Bytes/s at this working set: log-log interpolation of a probe curve, clamped."""
        # curve: [bytes, GB/s, streams, page KiB] by increasing size
        sizes = [point[0] for point in curve]
        if working_set <= sizes[0]:
            return curve[0][1] * 1e9
        if working_set >= sizes[-1]:
            return curve[-1][1] * 1e9
        i = bisect.bisect_left(sizes, working_set)
        (s0, g0), (s1, g1) = curve[i - 1][:2], curve[i][:2]
        t = (math.log(working_set) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return math.exp(math.log(g0) + t * (math.log(g1) - math.log(g0))) * 1e9

    def bound(self, row):
        """(seconds, 'memory' | 'compute', bandwidth used) for one single-thread row."""
        bw = self.bandwidth(row["working_set"], row["rmw"])
        t_mem = row["bytes"] / bw
        t_cpu = row["flops"] / self.peak[row["elem_bytes"]]
        return (t_mem, "memory", bw) if t_mem >= t_cpu else (t_cpu, "compute", bw)

    def fraction(self, row):
        return self.bound(row)[0] / row["time_s"]

    def bound_by_class(self, row):
        """Seconds, for a row whose counters tell its bytes apart (bench_lora): bytes only read at
        the read curve, bytes written without being read (fresh outputs, each line fetched before
        it is written) at the write curve, bytes updated in place at the read-modify-write curve,
        the three times added (they share the path between the caches); max with the compute
        time. None without the probe's write curve or the row's byte classes."""
        if not self.write_curve or row.get("write_bytes") is None or row.get("rmw_bytes") is None:
            return None
        ws = row["working_set"]
        written, updated = row["write_bytes"], row["rmw_bytes"]
        t_mem = ((row["bytes"] - written - updated) / self.interpolate(self.curves[False], ws)
                 + written / self.interpolate(self.write_curve, ws)
                 + updated / self.interpolate(self.curves[True], ws))
        return max(t_mem, row["flops"] / self.peak[row["elem_bytes"]])


# ---- formatting -----------------------------------------------------------------------------------


def fmt_time(s):
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_ratio(a, b):
    """a / b, for 'baseline time / lowrank time' (> 1: lowrank is faster)."""
    if a is None or b is None:
        return "—"
    return f"{a / b:.2f}×"


def fmt_pct(x):
    return "—" if x is None else f"{100 * x:.0f}%"


def fmt_bytes(b):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            v = b / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3g} {unit}"
    return f"{int(b)} B"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def index(rows):
    """{(op, impl, frozen args): row}."""
    return {(r["op"], r["impl"], tuple(sorted(r["args"].items()))): r for r in rows}


def get(ix, op, impl, **args):
    return ix.get((op, impl, tuple(sorted(args.items()))))


def shapes(rows, op, keys):
    seen = []
    for r in rows:
        if r["op"] == op:
            s = tuple(r["args"][k] for k in keys)
            if s not in seen:
                seen.append(s)
    return seen


# ---- the report -----------------------------------------------------------------------------------


def comparison_table(rf, ix, rows, op, keys, labels, impls=("lowrank", "eigen", "openblas"), by_class=False):
    """One line per shape: times, baseline/lowrank ratios, roofline and fractions; with by_class,
    also the bound with each class of bytes at its own bandwidth (Roofline.bound_by_class)."""
    names = {"lowrank": "lowrank", "eigen": "Eigen", "openblas": "OpenBLAS"}
    present = [i for i in impls if any(r["op"] == op and r["impl"] == i for r in rows)]
    header = labels + [names[i] for i in present]
    header += [f"{names[i]} / lowrank" for i in present if i != "lowrank"]
    header += ["roofline (bound, GB/s used)", "lowrank % roofline"]
    header += [f"{names[i]} %" for i in present if i != "lowrank"]
    if by_class:
        header += ["bound, writes at the write rate", "lowrank % of it"]
    out = []
    for shape in shapes(rows, op, keys):
        args = dict(zip(keys, shape))
        cells = {i: get(ix, op, i, **args) for i in present}
        ref = next((c for c in cells.values() if c), None)
        lr = cells.get("lowrank")
        t, kind, bw = rf.bound(ref)
        line = [str(v) for v in shape]
        line += [fmt_time(c["time_s"] if c else None) for c in cells.values()]
        line += [fmt_ratio(cells[i]["time_s"] if cells[i] else None, lr["time_s"] if lr else None)
                 for i in present if i != "lowrank"]
        line.append(f"{fmt_time(t)} ({kind}, {bw / 1e9:.0f})")
        line.append(fmt_pct(t / lr["time_s"]) if lr else "—")
        line += [fmt_pct(t / cells[i]["time_s"]) if cells[i] else "—" for i in present if i != "lowrank"]
        if by_class:
            tc = rf.bound_by_class(ref)
            line += [fmt_time(tc), fmt_pct(tc / lr["time_s"]) if tc and lr else "—"]
        out.append(line)
    return table(header, out)


def packed_table(rf, ix, rows):
    """Forward from a PackedWeight against the row-major W (in ordinary and in huge pages) and
    OpenBLAS (likewise), same shapes; OpenBLAS's better time of the two is the baseline."""
    out = []

    def time_of(row):
        return row["time_s"] if row else None

    for (n, d, r) in shapes(rows, "forward_packed", ("n", "d", "r")):
        packed = get(ix, "forward_packed", "lowrank", n=n, d=d, r=r)
        plain = get(ix, "forward", "lowrank", n=n, d=d, r=r)
        huge = get(ix, "forward_huge", "lowrank", n=n, d=d, r=r)
        blas = get(ix, "forward", "openblas", n=n, d=d, r=r)
        blas_huge = get(ix, "forward_huge", "openblas", n=n, d=d, r=r)
        blas_times = [time_of(b) for b in (blas, blas_huge) if b]
        best_blas = min(blas_times) if blas_times else None
        t, kind, bw = rf.bound(packed)
        out.append([str(n), str(d), str(r), fmt_time(time_of(packed)), fmt_time(time_of(plain)),
                    fmt_time(time_of(huge)), fmt_time(time_of(blas)), fmt_time(time_of(blas_huge)),
                    fmt_ratio(time_of(plain), time_of(packed)), fmt_ratio(best_blas, time_of(packed)),
                    f"{fmt_time(t)} ({kind}, {bw / 1e9:.0f})",
                    fmt_pct(t / packed["time_s"]) if packed else "—",
                    fmt_pct(t / huge["time_s"]) if huge else "—"])
    return table(["n", "d", "r", "packed", "row-major W", "row-major W, huge pages", "OpenBLAS",
                  "OpenBLAS, huge pages", "row-major / packed", "best OpenBLAS / packed",
                  "roofline (bound, GB/s used)", "packed % roofline", "row-major W, huge pages, % roofline"],
                 out)


def threads_table(ix, rows):
    out = []
    for op, keys in (("forward_threads", ("n", "d", "r")), ("merge_threads", ("d", "r"))):
        for shape in shapes(rows, op, keys + ("t",)):
            if shape[-1] != 1:
                continue
            args = dict(zip(keys, shape[:-1]))
            label = ("forward " if op == "forward_threads" else "merge ") + \
                ", ".join(f"{k} = {v}" for k, v in args.items())
            for impl, name in (("lowrank", "lowrank"), ("openblas", "OpenBLAS")):
                one = get(ix, op, impl, **args, t=1)
                two = get(ix, op, impl, **args, t=2)
                if one or two:
                    out.append([label, name, fmt_time(one and one["time_s"]),
                                fmt_time(two and two["time_s"]),
                                fmt_ratio(one and one["time_s"], two and two["time_s"]),
                                f"{two['cpu_s'] / two['time_s']:.2f}" if two else "—"])
    return table(["operation", "implementation", "1 thread", "2 threads", "speedup",
                  "2 threads: process CPU / wall"], out)


def precision_table(rf, ix, rows):
    out = []
    for (n, d, r) in shapes(rows, "forward_f64", ("n", "d", "r")):
        for impl, name in (("lowrank", "lowrank"), ("eigen", "Eigen"), ("openblas", "OpenBLAS")):
            f32 = get(ix, "forward", impl, n=n, d=d, r=r)
            f64 = get(ix, "forward_f64", impl, n=n, d=d, r=r)
            if not (f32 or f64):
                continue
            out.append([n, d, r, name, fmt_time(f32 and f32["time_s"]),
                        fmt_time(f64 and f64["time_s"]),
                        fmt_ratio(f64 and f64["time_s"], f32 and f32["time_s"]),
                        fmt_pct(rf.fraction(f32)) if f32 else "—",
                        fmt_pct(rf.fraction(f64)) if f64 else "—"])
    return table(["n", "d", "r", "implementation", "float", "double", "double / float",
                  "float % roofline", "double % roofline (fp64 peak)"], out)


ARCH_OPS = (("forward", "forward", ("n", "d", "r")), ("forward_f64", "forward (double)", ("n", "d", "r")),
            ("merge", "merge", ("d", "r")), ("add_delta", "add_delta", ("arg0", "arg1", "arg2")),
            ("backward_delta", "backward", ("arg0", "arg1", "arg2")))


def arch_table(native, other):
    """lowrank's rows in this build and in the AVX2-only build: times and their ratio."""
    ix_n, ix_o = index(native), index(other)
    out, ratios = [], []
    for op, label, keys in ARCH_OPS:
        for shape in shapes(native, op, keys):
            args = dict(zip(keys, shape))
            a, b = get(ix_n, op, "lowrank", **args), get(ix_o, op, "lowrank", **args)
            if not (a and b):
                continue
            ratios.append((b["time_s"] / a["time_s"], label, shape))
            cells = [str(v) for v in shape] if len(shape) == 3 else ["—", str(shape[0]), str(shape[1])]
            out.append([label] + cells + [fmt_time(a["time_s"]), fmt_time(b["time_s"]),
                                          fmt_ratio(b["time_s"], a["time_s"])])
    return table(["operation", "n", "d", "r", "this build", "AVX2 build", "AVX2 / this build"], out), ratios


def callgrind_table(rows):
    out = []
    eigen = {r["family"]: r for r in rows if r["name"].startswith("eigen")}
    for r in rows:
        e = eigen.get(r["family"])
        rel = "—" if r["name"].startswith("eigen") or not e else \
            f"{r['instructions'] / e['instructions']:.2f}"
        out.append([r["name"], f"`{r['what']}`", f"{r['m']} × {r['n']} × {r['k']}",
                    f"{r['flops'] / 1e6:.2f} M", f"{r['instructions']:,}",
                    f"{r['flops'] / r['instructions']:.2f}", rel])
    return table(["kernel", "computes", "m × n × k", "flops", "instructions",
                  "flops / instruction", "instructions vs Eigen"], out)


def streams_pages(point):
    """'2, 4K': the stream count and page size of one probe point ([bytes, GB/s, streams, page KiB];
    probes before the page size was measured have three fields)."""
    if len(point) < 4:
        return str(point[2])
    return f"{point[2]}, {'2M' if point[3] >= 2048 else '4K'}"


def probe_runs_note(probe):
    """For a probe taken more than once (best_probe): each run's FMA peak and read bandwidth."""
    runs = probe.get("runs", [])
    if len(runs) < 2:
        return ""
    def per_run(value):
        return " / ".join(f"{value(r):.1f}" for r in runs)
    sizes = [p[0] for p in runs[0]["read_curve"]]
    reads = ", ".join(f"{fmt_bytes(size)} {per_run(lambda r, i=i: r['read_curve'][i][1])}"
                      for i, size in enumerate(sizes))
    return (f" The probe ran {len(runs)} times (before and after the benchmarks); each value above is "
            f"the best of the runs, which gave: FMA peak {per_run(lambda r: r['fma_peak_fp32']['gflops'])}"
            f" GFLOP/s fp32; read GB/s {reads}.")


def probe_section(probe):
    m, simd = probe["machine"], probe["simd"]
    f32, f64 = probe["fma_peak_fp32"], probe["fma_peak_fp64"]
    lines = [
        f"- CPU: {m['cpu']} (host `{m['host']}`, {m['hardware_threads']} hardware threads; "
        f"caches as reported by the OS: L1d {fmt_bytes(m['l1d_bytes'])}, L2 {fmt_bytes(m['l2_bytes'])}, "
        f"L3 {fmt_bytes(m['l3_bytes'])}); compiler {m['compiler']}; SIMD `{simd['arch']}` "
        f"({simd['fp32_lanes']} float lanes).",
        f"- FMA peak, one thread: **{f32['gflops']:.1f} GFLOP/s** fp32 ({f32['accumulators']} "
        f"accumulators), {f64['gflops']:.1f} GFLOP/s fp64 ({f64['accumulators']}).",
    ] + ([
        f"- Broadcast tile in L1 (the library's tile shape, {probe['tile_peak_fp32']['rows']} rows broadcast × "
        f"{probe['tile_peak_fp32']['vectors']} vectors, over panels that stay in L1 with nothing else to do): "
        f"{probe['tile_peak_fp32']['gflops']:.1f} GFLOP/s fp32 "
        f"({probe['tile_peak_fp32']['gflops'] / f32['gflops']:.0%} of the FMA peak), "
        f"{probe['tile_peak_fp64']['gflops']:.1f} fp64 ({probe['tile_peak_fp64']['gflops'] / f64['gflops']:.0%}): "
        "what a GEMM kernel's inner loop reaches here; the rooflines and targets stay on the FMA peak.",
    ] if "tile_peak_fp32" in probe else []) + [
        "- Read bandwidth, hot working set: " + ", ".join(
            f"{k.replace('_', ' ')}: **{v:.1f} GB/s**" for k, v in probe["read_gbps"].items()) + ".",
        "- In-place read-modify-write (bytes read + written): " + ", ".join(
            f"{k.replace('_', ' ')}: {v:.1f} GB/s" for k, v in probe["rmw_gbps"].items()) + ".",
    ] + ([
        "- Writes alone (plain stores; each line is fetched before it is written): " + ", ".join(
            f"{k.replace('_', ' ')}: {v:.1f} GB/s" for k, v in probe["write_gbps"].items()) + ".",
    ] if "write_gbps" in probe else []) + [
        "",
        table(["working set"] + [fmt_bytes(p[0]) for p in probe["read_curve"]],
              [["read GB/s"] + [f"{p[1]:.1f}" for p in probe["read_curve"]],
               ["(best of streams, pages)"] + [streams_pages(p) for p in probe["read_curve"]],
               ["read-modify-write GB/s"] + [f"{p[1]:.1f}" for p in probe["rmw_curve"]],
               ["(best of streams, pages)"] + [streams_pages(p) for p in probe["rmw_curve"]]]
              + ([["write GB/s"] + [f"{p[1]:.1f}" for p in probe["write_curve"]],
                  ["(best of streams, pages)"] + [streams_pages(p) for p in probe["write_curve"]]]
                 if "write_curve" in probe else [])),
        "",
        "Bandwidth: the best of 1, 2, 4 and 8 sequential streams read side by side, each the "
        "median of its repetitions, and from 2 MiB on the best of ordinary (4K) pages and memory "
        "advised for transparent huge pages (2M, as a PackedWeight holds W); FMA peak: the best "
        "chain count, likewise." + probe_runs_note(probe),
    ]
    return "\n".join(lines)


def git_describe():
    try:
        rev = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        status = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                                check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
        # the files this script writes (bench/results/) do not make the measured source dirty
        dirty = [line for line in status if not line[3:].startswith("bench/results/")]
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(path, args, probe, core, lora, callgrind, core_json, core_cmd, png_written, arch, source,
                 meta_note=None):
    rf = Roofline(probe)
    ix = index(core + lora)
    short = args.quick or args.min_time < 0.5 or args.repetitions < 5
    ctx = core_json.get("context", {})
    load = ctx.get("load_avg")
    doc = ["# lowrank performance results", ""]
    if args.label:
        doc += [f"> **{args.label}**", ""]
    if short:
        doc += ["> **Short run** (`--benchmark_min_time=" + str(args.min_time) + "`, "
                f"{args.repetitions} repetitions) on a shared machine: it shows the format and "
                "rough magnitudes; do not draw conclusions from it. The numbers of record come "
                "from a full run on a quiet machine (`bench/run.py BUILD`, defaults).", ""]
    doc += [
        f"Produced by `bench/run.py` on {probe['date']} on **{probe['machine']['cpu']}** "
        f"(host `{probe['machine']['host']}`), source {source}"
        + (f"; load average at the start of bench_core: {', '.join(f'{x:.2f}' for x in load)}" if load else "")
        + ".",
        "",
    ] + ([meta_note, ""] if meta_note else []) + [
        "All times are medians over repetitions. Single-thread rows are in thread CPU time, "
        "multi-thread rows in wall time. `X / lowrank` is X's time over lowrank's (above 1: lowrank "
        "is faster). The roofline of a row is max(bytes / bandwidth, flops / FMA peak), the bandwidth "
        "being the probe's read (or, for in-place updates, read-modify-write) curve at the row's "
        "working set; `% roofline` is that bound over the measured time. Bytes are the compulsory "
        "traffic (each operand read once, each output written once).",
        "",
        "## The machine (bench/probe, single thread, fp32)",
        "",
        probe_section(probe),
        "",
    ]
    if png_written:
        doc += ["![roofline](roofline.png)", "",
                "Single-thread rows only; lines: the FMA peak and the read bandwidth at three "
                "working-set sizes.", ""]

    if any(r["op"] == "forward" for r in core):
        doc += ["## Fused LoRA forward `Y = X Wᵀ + s (X Aᵀ) Bᵀ` (fp32, one thread, in = out = d)", "",
                "Targets (issue 7): n ≤ 32 at ≥ 80% of the memory roofline and ≥ 3× the best "
                "baseline at n = 16, d = 4096; n = 1 at ≥ 95%; n ≥ 128 at ≥ 75% of the FMA peak "
                "and ≥ 1.25× OpenBLAS.", "",
                comparison_table(rf, ix, core, "forward", ("n", "d", "r"), ["n", "d", "r"]), ""]
    if any(r["op"] == "forward_packed" for r in core):
        doc += ["## The same forward from a `PackedWeight` (W laid out once, fp32, one thread, r = 16)", "",
                "Issue 7 asks for the small-batch forward both from W in its stored layout and "
                "from a pre-packed weight type. A PackedWeight is a row-major copy of W in memory "
                "advised for transparent huge pages (`core::HugePageAllocator`), read by the same "
                "kernels as a row-major W; the forward rows above read W from Eigen's allocation, "
                "in 4 KiB pages on a kernel in THP's `madvise` mode. The huge-page columns read a "
                "copy of the row-major W made by the benchmark in advised memory, lowrank and "
                "OpenBLAS alike: the same layout as the PackedWeight's, so `packed` against "
                "`row-major W, huge pages` shows the run's noise.", "",
                packed_table(rf, ix, core), ""]
    if any(r["op"] == "merge" for r in core):
        doc += ["## Merge `W += s B A` (fp32, one thread)", "",
                "Target: ≥ 80% of the read-modify-write bandwidth.", "",
                comparison_table(rf, ix, core, "merge", ("d", "r"), ["d", "r"]), ""]
    if any(r["op"].endswith("_threads") for r in core):
        doc += ["## Two threads (`lowrank::Threads{2}`, wall time)", "",
                "Target: ≥ 1.8× on 2 cores for n = 128 and for merge. Process CPU / wall near 2 "
                "means both threads ran at once; near 1, they took turns on a busy machine (then "
                "the speedup says nothing about the code).", "",
                threads_table(ix, core), ""]
    if any(r["op"] == "forward_f64" for r in core):
        doc += ["## double vs float (fused forward, compute-bound shapes)", "",
                "Target: double within 2.2× of float.", "",
                precision_table(rf, ix, core), ""]
    if any(r["op"] == "layer_backward" for r in core):
        doc += ["## Layer backward with the input gradient (`lowrank::backward` with W, fp32, one thread)", "",
                "dX = dY W + s G A, dA = s Gᵀ X, dB = s dYᵀ T (G = dY B, T = X Aᵀ): what a trainer "
                "calls for a LoRA layer, the base product dY W most of its flops. Not a target of "
                "issue 7 (whose backward rows, below, are the adapter part alone); Eigen as users "
                "write it, OpenBLAS as six cblas_sgemm calls (cblas_sgemv for dY W at n = 1). Flops "
                "2·n·d² + 2·n·r·(3 in + 2 out); bytes: W, X, dY, A, B read once, dX, dA, dB written "
                "once.", "",
                comparison_table(rf, ix, core, "layer_backward", ("n", "d", "r"), ["n", "d", "r"]), ""]
    if lora:
        for op, title in (("add_delta", "Adapter part alone `Y += s (X Aᵀ) Bᵀ` (bench_lora)"),
                          ("backward_delta", "LoRA backward: dA, dB, dX of the adapter part (bench_lora)")):
            if any(r["op"] == op for r in lora):
                doc += [f"## {title}", "",
                        "Target: ≥ 70% of the roofline at every shape. Flops and bytes recovered "
                        "from bench_lora's rate counters; working set taken as the bytes." +
                        (" The backward's flops are the five products it must form, X Aᵀ included "
                         "(not an input of the call): 2·n·r·(3 in + 2 out)."
                         if op == "backward_delta" else "") +
                        " The last two columns charge each class of bytes at the probe's bandwidth for "
                        "it, the times added: bytes only read at the read curve, " +
                        ("dA, dB and dX (written, not read) at the write curve"
                         if op == "backward_delta" else "Y (read and written in place) at the "
                         "read-modify-write curve") +
                        "; the roofline columns before them (and the target) charge every byte at the "
                        "read rate.", "",
                        comparison_table(rf, ix, lora, op, ("arg0", "arg1", "arg2"), ["n", "d", "r"],
                                         impls=("lowrank", "eigen"), by_class=True), ""]
    if arch:
        text, ratios = arch_table(arch["native"], arch["other"])
        worst = max(ratios) if ratios else None
        p32, p64 = arch["probe"]["fma_peak_fp32"], arch["probe"]["fma_peak_fp64"]
        doc += ["## The AVX2-only build (`-march=x86-64-v3`) against this one", "",
                "Target (issue 7): AVX2-only builds correct and within 2× of the AVX-512 build. "
                f"lowrank's single-thread rows from both builds, alternating in {arch['rounds']} "
                f"rounds (each round runs every row of one build, then of the other; one "
                f"repetition of `--benchmark_min_time={arch['min_time']}`), medians over the "
                "rounds; times in thread CPU time. The AVX2 build's own probe (`--quick`): FMA peak "
                f"{p32['gflops']:.1f} GFLOP/s fp32, {p64['gflops']:.1f} fp64 (this build's: above).",
                ""]
        if worst:
            above = sum(1 for r in ratios if r[0] > 2.0)
            doc += [f"Largest ratio: **{worst[0]:.2f}×** ({worst[1]}, "
                    + ", ".join(f"{k} = {v}" for k, v in zip(("n", "d", "r") if len(worst[2]) == 3
                                                               else ("d", "r"), worst[2]))
                    + f"); rows above 2×: {above} of {len(ratios)}.", ""]
        doc += [text, ""]
    if callgrind:
        doc += ["## Instruction counts (callgrind, one call, AVX2 + FMA build)", "",
                "Stable where the times are not: `valgrind --tool=callgrind` on "
                "`bench/callgrind_kernels` (built with `-march=x86-64-v3`; valgrind cannot run "
                "AVX-512), counting only the measured call (warmed up once before).", "",
                callgrind_table(callgrind), ""]
    doc += ["## How to reproduce", "",
            "```sh",
            "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLOWRANK_NATIVE=ON -G Ninja",
            "ninja -C build probe bench_core bench_lora callgrind_kernels"] + (
            ["cmake -S . -B build_avx2 -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-march=x86-64-v3 "
             "-DLOWRANK_BUILD_BENCHMARKS=ON -G Ninja",
             "ninja -C build_avx2 probe bench_core bench_lora"] if arch else []) + [
            "/usr/bin/python3 bench/run.py build" + (" --avx2-build build_avx2" if arch else "") +
            ("" if not short else f"   # this file: --min-time {args.min_time} "
             f"--repetitions {args.repetitions}" + (" --quick" if args.quick else "")),
            "```", "",
            "bench_core command of this run: `" + " ".join(os.path.basename(c) if i == 0 else c
                                                          for i, c in enumerate(core_cmd)) + "`. "
            "Raw JSON of every run: `raw_*.json` beside this file.", ""]
    with open(path, "w") as f:
        f.write("\n".join(doc))


# ---- the plot -------------------------------------------------------------------------------------


def write_plot(path, probe, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("run.py: matplotlib not available (Debian: python3-matplotlib), no roofline.png")
        return False
    rf = Roofline(probe)
    single = [r for r in rows if r["threads"] == 1 and not r["op"].endswith("_threads")
              and r["flops"] > 0 and r["bytes"] > 0]
    fig, ax = plt.subplots(figsize=(11.5, 6))
    ai = [r["flops"] / r["bytes"] for r in single]
    lo = min(ai + [0.1]) / 2
    hi = max(ai + [100]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    peak32 = rf.peak[4] / 1e9
    peak64 = rf.peak[8] / 1e9
    for label, key, style in (("L2 256 KiB", "L2_256KiB", "-"), ("L3 8 MiB", "L3_8MiB", "--"),
                              ("DRAM 512 MiB", "DRAM_512MiB", ":")):
        bw = probe["read_gbps"][key]
        ax.plot(xs, [min(peak32, bw * x) for x in xs], "k" + style, lw=1,
                label=f"read {label}: {bw:.0f} GB/s")
    ax.axhline(peak64, color="grey", lw=0.8, ls="-.", label=f"fp64 FMA peak {peak64:.0f} GFLOP/s")
    if "tile_peak_fp32" in probe:
        tile32 = probe["tile_peak_fp32"]["gflops"]
        ax.axhline(tile32, color="tab:brown", lw=0.8, ls="--",
                   label=f"fp32 broadcast tile in L1 {tile32:.0f} GFLOP/s")
    ax.text(lo * 1.1, peak32 * 1.05, f"fp32 FMA peak {peak32:.0f} GFLOP/s ({probe['simd']['arch']})",
            fontsize=8)
    markers = {"lowrank": "o", "eigen": "s", "openblas": "^"}
    colours = {"forward": "tab:blue", "merge": "tab:red", "forward_f64": "tab:purple",
               "forward_packed": "tab:cyan", "forward_huge": "tab:olive",
               "add_delta": "tab:green", "backward_delta": "tab:orange", "layer_backward": "tab:brown"}
    seen = set()
    for r in single:
        x = r["flops"] / r["bytes"]
        y = r["flops"] / r["time_s"] / 1e9
        key = (r["op"], r["impl"])
        colour = colours.get(r["op"], "tab:grey")
        ax.scatter([x], [y], marker=markers.get(r["impl"], "x"), edgecolors=colour,
                   facecolors=colour if r["impl"] == "lowrank" else "none", s=28,
                   label=None if key in seen else f"{r['op']} · {r['impl']}")
        seen.add(key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop / compulsory byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"lowrank roofline, one thread, {probe['machine']['cpu']} ({probe['date'][:10]})")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main -----------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build", help="build directory holding bench/probe, bench/bench_core, ...")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    p.add_argument("--min-time", type=float, default=0.5, help="--benchmark_min_time (seconds)")
    p.add_argument("--repetitions", type=int, default=5, help="--benchmark_repetitions (odd)")
    p.add_argument("--filter", help="--benchmark_filter for bench_core")
    p.add_argument("--quick", action="store_true",
                   help="short probe and no bench_lora rows (for testing the script)")
    p.add_argument("--no-bench-lora", action="store_true", help="skip the bench_lora rows")
    p.add_argument("--no-callgrind", action="store_true", help="skip the callgrind section")
    p.add_argument("--label", help="a line at the top of the report")
    p.add_argument("--no-interleave", action="store_true",
                   help="run each benchmark's repetitions back to back (default: randomly interleaved)")
    p.add_argument("--avx2-build", metavar="DIR",
                   help="a second build (-march=x86-64-v3, probe bench_core bench_lora built) whose "
                        "lowrank rows are compared with this build's, alternating")
    p.add_argument("--avx2-rounds", type=int, default=5, help="rounds of that comparison (odd)")
    p.add_argument("--from-raw", action="store_true",
                   help="run nothing: rewrite README.md and roofline.png in --out from the raw_*.json "
                        "an earlier run left there (BUILD is then ignored)")
    args = p.parse_args()

    if args.from_raw:
        render(args, load_raw(args.out))
        return
    build = os.path.abspath(args.build)
    probe_bin = binary(build, "probe")
    core_bin = binary(build, "bench_core")
    lora_bin = None if (args.quick or args.no_bench_lora) else binary(build, "bench_lora", False)
    cg_bin = None if args.no_callgrind else binary(build, "callgrind_kernels", False)
    os.makedirs(args.out, exist_ok=True)

    source = git_describe()  # before the run: what is measured
    probe = run_probe(probe_bin, args.quick)
    interleave = not args.no_interleave
    core_json, core_cmd = run_benchmark(core_bin, args.repetitions, args.min_time, args.filter, interleave)
    lora_json = run_benchmark(lora_bin, args.repetitions, args.min_time, r"BM_(add_delta|backward_delta)_",
                              interleave)[0] if lora_bin else None
    # The probe again after the benchmarks: the roofline is the better of the two (best_probe).
    probe = best_probe([probe, run_probe(probe_bin, args.quick)])
    callgrind = run_callgrind(cg_bin) if cg_bin else None
    arch = None
    if args.avx2_build:
        other = os.path.abspath(args.avx2_build)
        arch_min_time = args.min_time / 2
        arch_rounds = run_arch_rounds({"native": build, "other": other}, args.avx2_rounds, arch_min_time)
        arch = {"native": median_over_rounds(arch_rounds["native"]),
                "other": median_over_rounds(arch_rounds["other"]),
                "probe": run_probe(binary(other, "probe"), True),
                "rounds": args.avx2_rounds, "min_time": arch_min_time}

    raw = {"probe": probe, "bench_core": core_json, "bench_lora": lora_json, "callgrind": callgrind,
           "avx2": arch, "meta": {"source": source, "bench_core_cmd": core_cmd,
                                  "min_time": args.min_time, "repetitions": args.repetitions,
                                  "quick": args.quick}}
    for name, data in raw.items():
        path = os.path.join(args.out, f"raw_{name}.json")
        if data is None:  # not part of this run: no stale file for --from-raw to pick up
            if os.path.exists(path):
                os.remove(path)
            continue
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    render(args, raw)


def load_raw(directory):
    """The raw_*.json files of an earlier run (what main() wrote beside its report)."""
    raw = {}
    for name in ("probe", "bench_core", "bench_lora", "callgrind", "avx2", "meta"):
        path = os.path.join(directory, f"raw_{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                raw[name] = json.load(f)
        elif name in ("probe", "bench_core", "meta"):
            sys.exit(f"run.py: --from-raw: {path} not found")
    return raw


def render(args, raw):
    """The report and the plot from a run's raw data (fresh, or re-read with --from-raw)."""
    meta = raw["meta"]
    # The settings of the run that measured, not of this invocation.
    args.min_time, args.repetitions, args.quick = meta["min_time"], meta["repetitions"], meta["quick"]
    core = medians(raw["bench_core"])
    lora = medians(raw["bench_lora"], derive_counts=True) if raw.get("bench_lora") else []
    png = write_plot(os.path.join(args.out, "roofline.png"), raw["probe"], core + lora)
    write_report(os.path.join(args.out, "README.md"), args, raw["probe"], core, lora, raw.get("callgrind"),
                 raw["bench_core"], meta["bench_core_cmd"], png, raw.get("avx2"), meta["source"], meta.get("note"))
    log(f"run.py: wrote {os.path.join(args.out, 'README.md')}" + (" and roofline.png" if png else ""))


if __name__ == "__main__":
    main()
