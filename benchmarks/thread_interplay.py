"""Thread interplay: does fusedattn oversubscribe or spin against PyTorch's own thread pool?

A loop of N iterations of (torch.matmul of an n×n fp32 matrix, then a fusedattn.attention call of
comparable cost) is timed against the same loops of each op alone. If neither pool gets in the
other's way, alternating costs the sum of the two; the overhead is

    overhead % = (alternating / (matmul alone + attention alone) - 1) · 100.

Wake-up latency and spinning idle workers (torch's OpenMP threads spin for a while after each
parallel region) show up most with small ops, so the size pairs go from ~0.15 ms to ~1.5 ms per op.
As a control, the same is measured with torch SDPA in place of fusedattn (both ops in torch's pool).
The loops are interleaved (all five variants once per rep) and their medians compared.

    python benchmarks/thread_interplay.py [--reps 15] [--iters N] [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import time

import fusedattn
from fusedattn import bench

# (label, matmul size n, attention shape (B, H, L, D)): each pair's two ops cost about the same on
# a 2-core AVX-512 CPU (measured: 256² matmul 0.16 ms, (1,4,128,64) attention 0.12 ms; 384²
# 0.56 ms, (1,4,256,64) 0.41 ms; 512² 1.3 ms, (1,8,512,64) 1.7 ms).
PAIRS = [
    ("tiny", 256, (1, 4, 128, 64)),
    ("small", 384, (1, 4, 256, 64)),
    ("moderate", 512, (1, 8, 512, 64)),
]
TARGET_LOOP_SECONDS = 0.05  # default iterations: an alternating loop takes about this long


def loop(ops, iters):
    """A callable that runs `iters` iterations of every op in `ops`, in order."""
    def run():
        for _ in range(iters):
            for op in ops:
                op()
    return run


def median_op_seconds(op, reps=20) -> float:
    op()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_pair(torch, n, shape, reps, iters=None) -> dict:
    """Median seconds per iteration of each loop variant, and the two overheads in %."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    q, k, v = bench.make_inputs(torch, shape, torch.float32)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ops = {
        "matmul": lambda: torch.matmul(a, b),
        "fusedattn": lambda: fusedattn.attention(q, k, v),
        "sdpa": lambda: sdpa(q, k, v),
    }
    if iters is None:
        per_iteration = median_op_seconds(ops["matmul"]) + median_op_seconds(ops["fusedattn"])
        iters = max(10, round(TARGET_LOOP_SECONDS / per_iteration))
    loops = {
        "matmul": loop([ops["matmul"]], iters),
        "fusedattn": loop([ops["fusedattn"]], iters),
        "matmul+fusedattn": loop([ops["matmul"], ops["fusedattn"]], iters),
        "sdpa": loop([ops["sdpa"]], iters),
        "matmul+sdpa": loop([ops["matmul"], ops["sdpa"]], iters),
    }
    times, _, errors = bench.time_interleaved(loops, reps)
    if errors:
        raise RuntimeError(f"a loop failed: {errors}")
    t = {name: statistics.median(ts) / iters for name, ts in times.items()}
    t["iters"] = iters
    t["overhead_fusedattn"] = 100.0 * (t["matmul+fusedattn"] / (t["matmul"] + t["fusedattn"]) - 1)
    t["overhead_sdpa"] = 100.0 * (t["matmul+sdpa"] / (t["matmul"] + t["sdpa"]) - 1)
    return t


def format_table(results) -> str:
    header = ("pair", "matmul", "attention (B,H,L,D)", "iters", "matmul µs", "fusedattn µs",
              "alternating µs", "overhead", "SDPA µs", "alt. SDPA µs", "overhead (control)")
    lines = []
    for (label, n, shape), t in results:
        us = {name: f"{t[name] * 1e6:.1f}" for name in ("matmul", "fusedattn", "matmul+fusedattn",
                                                        "sdpa", "matmul+sdpa")}
        lines.append((label, f"{n}²", str(shape), str(t["iters"]), us["matmul"], us["fusedattn"],
                      us["matmul+fusedattn"], f"{t['overhead_fusedattn']:+.1f}%", us["sdpa"], us["matmul+sdpa"],
                      f"{t['overhead_sdpa']:+.1f}%"))
    return bench.aligned_table(header, lines, left_columns=3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=bench.positive_int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--iters", type=bench.positive_int, default=None,
                        help=f"iterations per loop (default: an alternating loop of ~{TARGET_LOOP_SECONDS * 1e3:.0f} ms)")
    parser.add_argument("--threads", type=bench.positive_int, default=None,
                        help="threads for torch and fusedattn alike (default: torch's; fusedattn follows it)")
    args = parser.parse_args()
    torch = bench.require_torch()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        fusedattn.set_num_threads(args.threads)
    print(bench.versions_line(torch))
    results = []
    for label, n, shape in PAIRS:
        results.append(((label, n, shape), measure_pair(torch, n, shape, args.reps, args.iters)))
        print(f"[{len(results)}/{len(PAIRS)}] {label} done", flush=True)
    print("\nper-iteration medians; overhead = alternating / (matmul + attention) - 1; "
          "the control pairs the matmul with torch SDPA instead of fusedattn\n")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
