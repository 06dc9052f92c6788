"""Where a paged cache's extra decode time goes: the installed fusedattn under `perf record`.

Runs the inference issue's GQA decode shape (one token, B = 8, Hq = 32, Hkv = 8, L = 4096,
D = 128) over a contiguous cache and over the same cache in shuffled pages of --page-size rows
(16 by default), --calls calls each, every run sampled by `perf record` on the CPU clock (this
VM's hardware counters do not work; the clock does), then prints one Markdown table: the
samples per kernel function in each run, and the difference. Samples land on the instruction
after the one that stalls, so `--annotate` also prints the hottest instructions (as `perf
annotate` gives them) of the function whose samples grew most in the paged run. Needs perf, torch, and the extension's
symbols (install with -Ccmake.define.CMAKE_STRIP=/bin/true); about 20 s.

    python benchmarks/perf_paged_decode.py [--dtype bfloat16] [--page-size 16] [--calls 400] [--annotate]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from profile_decode import short_name  # (beside this script)

BATCH, SEQLEN, HEADS, HEADS_KV, HEAD_DIM = 8, 4096, 32, 8, 128


def worker(paged: bool, dtype_name: str, page: int, calls: int) -> None:
    """The decode calls that perf samples (run as a child process)."""
    import torch

    import fusedattn
    from bench_decode import paged_copy

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, 1, HEADS, HEAD_DIM, generator=generator).to(dtype)
    k, v = (torch.randn(BATCH, SEQLEN, HEADS_KV, HEAD_DIM, generator=generator).to(dtype) for _ in range(2))
    kwargs = {}
    if paged:
        table = torch.randperm(BATCH * SEQLEN // page, generator=generator).to(torch.int32).reshape(BATCH, -1)
        k, v = paged_copy(k, v, page, table)
        kwargs["block_table"] = table
    seqlens = torch.full((BATCH,), SEQLEN, dtype=torch.int32)
    for _ in range(calls):
        fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=seqlens, **kwargs)


def samples_by_function(data: str) -> dict[str, int]:
    """fusedattn's functions in a perf.data file -> their sample counts."""
    report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "symbol", "-n"], check=True,
                            capture_output=True, text=True).stdout
    counts = {}
    for line in report.splitlines():
        match = re.match(r"\s*[\d.]+%\s+(\d+)\s+\[\.\]\s+(.*?)(\s+-)*\s*$", line)
        if match and "fusedattn::" in match.group(2):
            counts[match.group(2)] = int(match.group(1))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--page-size", type=int, default=16, help="rows per page (default 16)")
    parser.add_argument("--calls", type=int, default=400, help="decode calls per run (default 400)")
    parser.add_argument("--annotate", action="store_true",
                        help="also the hottest instructions of the function that grew most (paged run)")
    parser.add_argument("--worker", choices=["contiguous", "paged"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.page_size < 1 or SEQLEN % args.page_size or args.calls < 1:
        parser.error(f"--page-size must divide {SEQLEN}, --calls be >= 1")
    if args.worker:
        worker(args.worker == "paged", args.dtype, args.page_size, args.calls)
        return 0
    if shutil.which("perf") is None:
        print("perf_paged_decode: perf is not installed")
        return 1
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("contiguous", "paged"):
            data = os.path.join(tmp, f"{run}.data")
            command = ["perf", "record", "-q", "-F", "2000", "-o", data, sys.executable, __file__, "--worker", run,
                       "--dtype", args.dtype, "--page-size", str(args.page_size), "--calls", str(args.calls)]
            subprocess.run(command, check=True, capture_output=True, text=True)
            counts[run] = samples_by_function(data)
        if not counts["contiguous"] or not counts["paged"]:
            print("perf_paged_decode: no samples in fusedattn's functions (is the installed extension stripped? "
                  "pip install . -Ccmake.define.CMAKE_STRIP=/bin/true keeps its symbols)")
            return 1
        print(f"GQA decode, B {BATCH}, Hq {HEADS}, Hkv {HEADS_KV}, L {SEQLEN}, D {HEAD_DIM}, {args.dtype}, "
              f"{args.calls} calls per run; perf samples on the CPU clock (2000/s per thread), pages of "
              f"{args.page_size} rows shuffled\n")
        print("| function | contiguous | paged | paged − contiguous |")
        print("|---|---:|---:|---:|")
        names = sorted(set(counts["contiguous"]) | set(counts["paged"]),
                       key=lambda n: -max(counts["contiguous"].get(n, 0), counts["paged"].get(n, 0)))
        for name in names:
            contiguous, paged = counts["contiguous"].get(name, 0), counts["paged"].get(name, 0)
            if max(contiguous, paged) >= 20:
                print(f"| {short_name(name)} | {contiguous} | {paged} | {paged - contiguous:+d} |")
        total_c, total_p = sum(counts["contiguous"].values()), sum(counts["paged"].values())
        print(f"| all of fusedattn | {total_c} | {total_p} | {total_p - total_c:+d} |")
        if args.annotate:
            name = max(counts["paged"], key=lambda n: counts["paged"][n] - counts["contiguous"].get(n, 0))
            listing = subprocess.run(["perf", "annotate", "-i", os.path.join(tmp, "paged.data"), "--stdio", "-s", name],
                                     capture_output=True, text=True).stdout
            code = [line.rstrip()[:140] for line in listing.splitlines() if re.match(r"\s+[\d.]+ :", line)]
            hot = sorted(range(1, len(code)), key=lambda i: -float(code[i].split()[0]))[:3]
            shown = sorted({j for i in hot for j in (i - 1, i)})
            print(f"\nhottest instructions of {short_name(name)} (paged run, % of its samples), each with the "
                  "instruction before it, which is the one that stalled:\n")
            print("```")
            print("\n".join(code[i] for i in shown))
            print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
