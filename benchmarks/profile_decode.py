"""What limits CPU decode: the decode kernel's speed with its K/V in L2 against its speed from DRAM.

Compiles benchmarks/profile_decode.cpp (see its header) into a temporary directory with the flags
CMakeLists.txt gives the best AVX-512 ISA this CPU has (avx512amx, avx512bf16, else avx512), runs it
single-threaded and prints one Markdown table: for the inference issue's decode shapes (one token,
32 query heads, head_dim 128, Hkv 32 or 8, fp32 and bf16) the GB/s of K/V the kernel consumes
when they are cached, and when they stream from DRAM, next to the single-thread streaming-read
bandwidth of the same two sizes. Needs g++ (or $CXX); no torch, no installed package. About 10 s.

    python benchmarks/profile_decode.py [--reps N]

--perf HKV DTYPE instead runs the kernel on the full block (all 32 query heads over HKV kv
heads, K+V in L2) under `perf record` (sampling on the CPU clock, which works on this VM where
the hardware counters do not) and prints the share of samples per function: which part of the
kernel (scores, P·V, softmax) the arithmetic goes to. Needs perf; about 10 s.

    python benchmarks/profile_decode.py --perf 8 bf16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from profile_forward import ISAS, ROOT, compile_profile, cpu_flags, row

SOURCE = ROOT / "benchmarks" / "profile_decode.cpp"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per case (median reported)")
    parser.add_argument("--perf", nargs=2, metavar=("HKV", "DTYPE"),
                        help="profile one full block (HKV kv heads, fp32 or bf16) with perf record instead")
    args = parser.parse_args()
    if args.perf and (not args.perf[0].isdigit() or args.perf[1] not in ("fp32", "bf16")):
        parser.error("--perf takes HKV (a number dividing 32) and DTYPE (fp32 or bf16)")
    flags = cpu_flags()
    isas = dict(ISAS, avx512amx=(ISAS["avx512bf16"][0] | {"amx_tile", "amx_bf16"}, ["bf16"]))
    runnable = [isa for isa in ("avx512amx", "avx512bf16", "avx512") if isas[isa][0] <= flags]
    if not runnable:
        print("profile_decode: this CPU has no AVX-512 (the profile covers the avx512 kernels only)")
        return 1
    isa = runnable[0]
    if args.perf:
        return perf_profile(isa, int(args.perf[0]), args.perf[1])
    with tempfile.TemporaryDirectory() as build_dir:
        exe = os.path.join(build_dir, "profile_decode")
        compile_profile(SOURCE, isa, exe)
        result = json.loads(subprocess.run([exe, str(args.reps)], check=True, capture_output=True, text=True).stdout)
    print(f"decode kernel, {result['isa']} build, 1 thread, medians of {args.reps} runs; single-thread "
          f"streaming read: cached {result['stream_cached_gbs']:.0f} GB/s, DRAM {result['stream_dram_gbs']:.1f} GB/s\n")
    print(row("Hkv", "dtype", "cached GB/s (L)", "DRAM GB/s (L = 4096)", "DRAM / cached", "DRAM / DRAM stream"))
    print("|---:|---|---:|---:|---:|---:|")
    for case in result["cases"]:
        print(row(str(case["heads_kv"]), case["dtype"], f"{case['cached_gbs']:.1f} ({case['cached_len']})",
                  f"{case['dram_gbs']:.1f}", f"{case['dram_gbs'] / case['cached_gbs']:.0%}",
                  f"{case['dram_gbs'] / result['stream_dram_gbs']:.0%}"))
    return 0


def perf_profile(isa: str, heads_kv: int, dtype: str) -> int:
    """Runs profile_decode's perf mode under perf record; prints the top functions by samples."""
    if shutil.which("perf") is None:
        print("profile_decode --perf: perf is not installed")
        return 1
    with tempfile.TemporaryDirectory() as build_dir:
        exe, data = os.path.join(build_dir, "profile_decode"), os.path.join(build_dir, "perf.data")
        compile_profile(SOURCE, isa, exe)
        run = subprocess.run(["perf", "record", "-q", "-F", "5000", "-o", data, exe, "perf", str(heads_kv), dtype, "20000"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"profile_decode --perf: perf record failed: {run.stderr.strip()}")
            return 1
        result = json.loads(run.stdout)
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "symbol"], check=True,
                                capture_output=True, text=True).stdout
    print(f"decode kernel, {isa} build, 1 thread, Hq 32, Hkv {heads_kv}, {dtype}, L {result['len']} (K+V in L2): "
          f"{result['gbs']:.1f} GB/s; share of perf samples (CPU clock)\n")
    print(row("share", "function"))
    print("|---:|---|")
    for line in report.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].endswith("%") and float(parts[0][:-1]) >= 1.0:
            print(row(parts[0], short_name(parts[2].split("[.]")[-1].strip())))
    return 0


def short_name(symbol: str) -> str:
    """A kernel symbol without its namespaces, the kernels' own parameter lists as (...), and cut
    to 110 characters (perf_paged_decode.py uses it too)."""
    symbol = re.sub(r"(\s+-)+\s*$", "", symbol).replace("fusedattn::cpu::", "").replace("fusedattn::", "")
    for isa in ISAS:
        symbol = symbol.replace(f"{isa}::", "")
    symbol = re.sub(r"\(AttentionParams const&[^()]*\)", "(...)", symbol)
    return symbol if len(symbol) <= 110 else symbol[:107] + "..."


if __name__ == "__main__":
    sys.exit(main())
