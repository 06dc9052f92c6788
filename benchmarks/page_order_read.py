"""What reading a buffer in shuffled pages costs this machine, with no attention kernel involved.

Compiles benchmarks/page_order_read.cpp (see its header) into a temporary directory and runs it:
two threads each read 512 MiB in chunks of 16-256 KiB, in address order or shuffled (a paged KV
cache's random block table), as a pure sum or with 12 multiply-adds per 64-byte vector (about
GQA decode's arithmetic density). Prints one Markdown table of GB/s (both threads, medians of
interleaved runs) and the shuffled / in-order ratios: the yardstick for the paged decode's overhead, since a decode of a
cache with pages of 16 rows reads 32 KiB (GQA bf16) to 256 KiB (MHA fp32) per page. Needs g++
(or $CXX) and AVX-512; no torch, no installed package. About 10 s.

    python benchmarks/page_order_read.py [--reps N] [--huge-pages]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from profile_forward import ISAS, ROOT, cpu_flags, row

SOURCE = ROOT / "benchmarks" / "page_order_read.cpp"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=positive_int, default=5, help="timed repetitions per case (median reported)")
    parser.add_argument("--huge-pages", action="store_true",
                        help="read buffers on 2 MiB pages (madvise), to rule out page-table misses")
    args = parser.parse_args()
    if not ISAS["avx512"][0] <= cpu_flags():
        print("page_order_read: this CPU has no AVX-512")
        return 1
    with tempfile.TemporaryDirectory() as build_dir:
        exe = os.path.join(build_dir, "page_order_read")
        subprocess.run([os.environ.get("CXX", "g++"), "-std=c++20", "-O3", "-mavx512f", "-mfma", "-pthread",
                        str(SOURCE), "-o", exe], check=True)
        command = [exe, str(args.reps)] + (["huge"] if args.huge_pages else [])
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    huge = result["huge_pages_kib"]
    pages = f" ({huge // 1024} MiB of them on 2 MiB pages)" if huge >= 0 else ""
    print(f"{result['threads']} threads, 512 MiB each{pages}, medians of {args.reps} interleaved runs; GB/s of "
          "both threads together\n")
    print(row("chunk", "sum, in order", "sum, shuffled", "shuffled / in order", "12 FMA/vector, in order",
              "12 FMA/vector, shuffled", "shuffled / in order"))
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(row(f"{r['chunk_kib']} KiB", f"{r['in_order_sum']:.1f}", f"{r['shuffled_sum']:.1f}",
                  f"{r['shuffled_sum'] / r['in_order_sum']:.2f}", f"{r['in_order_fma']:.1f}",
                  f"{r['shuffled_fma']:.1f}", f"{r['shuffled_fma'] / r['in_order_fma']:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
