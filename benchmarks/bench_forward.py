"""Forward benchmark: fusedattn vs torch SDPA, side by side, on the issue's shapes.

Shapes (1, 8, 2048, 64), (1, 8, 2048, 128) and (1, 16, 4096, 64) (the CPU speed issue's),
causal and not, fp32 and bf16. For each case both
implementations are warmed up, then timed interleaved (A B A B ...) and their medians compared, as
DESIGN.md's benchmark rules ask; the measuring is fusedattn.bench's (`fusedattn bench` runs the
same code with more shapes and the naive torch baseline). One line per case: each side's median
ms, GFLOP/s and % of the measured fp32 GEMM peak, and fusedattn's speed-up over SDPA.

    python benchmarks/bench_forward.py [--reps N]
"""

from __future__ import annotations

import argparse

from fusedattn import bench

SHAPES = [(1, 8, 2048, 64), (1, 8, 2048, 128), (1, 16, 4096, 64)]
DTYPES = ["float32", "bfloat16"]
IMPLS = ["fusedattn", "torch-sdpa"]


def side_by_side(rows: list[bench.Row]) -> str:
    """One line per case: fusedattn's and SDPA's numbers next to each other, then the speed-up."""
    cases: dict[tuple, dict[str, bench.Row]] = {}
    for row in rows:
        key = (f"{row.batch}×{row.num_heads}×{row.seqlen}×{row.head_dim}", row.dtype, str(row.causal))
        cases.setdefault(key, {})[row.impl] = row
    header = ("B×H×L×D", "dtype", "causal", "fusedattn ms", "GFLOP/s", "% peak",
              "SDPA ms", "GFLOP/s", "% peak", "speed-up", "fusedattn err", "SDPA err")
    lines = []
    for key, by_impl in cases.items():
        ours, sdpa = by_impl["fusedattn"], by_impl["torch-sdpa"]
        if ours.error or sdpa.error:
            lines.append(key + (f"failed: {ours.error or sdpa.error}",) + ("",) * 8)
            continue
        lines.append(key + (f"{ours.ms:.2f}", f"{ours.gflops:.1f}", f"{ours.pct_fp32_peak:.1f}%",
                            f"{sdpa.ms:.2f}", f"{sdpa.gflops:.1f}", f"{sdpa.pct_fp32_peak:.1f}%",
                            f"{ours.speedup_vs_sdpa:.2f}x", f"{ours.max_abs_err:.1e}", f"{sdpa.max_abs_err:.1e}"))
    return bench.aligned_table(header, lines, left_columns=3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=bench.positive_int, default=None,
                        help="interleaved rounds per case (default: about 3 s per case, 5..50)")
    args = parser.parse_args()
    torch = bench.require_torch()
    print(bench.versions_line(torch) + "; forward only")
    cases = [(shape, dtype, causal) for shape in SHAPES for dtype in DTYPES for causal in (False, True)]
    rows, peaks = bench.run_cases(torch, cases, IMPLS, args.reps)
    print(f"\n{bench.describe_peaks(peaks)}")
    print("speed-up = SDPA ms / fusedattn ms; errors: max abs vs float64 reference, head (0, 0)\n")
    print(side_by_side(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
