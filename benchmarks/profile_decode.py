"""What limits CPU decode: the decode kernel's speed with its K/V in L2 against its speed from DRAM.

Compiles benchmarks/profile_decode.cpp (see its header) into a temporary directory with the flags
CMakeLists.txt gives the best AVX-512 ISA this CPU has (avx512bf16, else avx512), runs it
single-threaded and prints one Markdown table: for the inference issue's decode shapes (one token,
32 query heads, head_dim 128, Hkv 32 or 8, fp32 and bf16) the GB/s of K/V the kernel consumes
when they are cached, and when they stream from DRAM, next to the single-thread streaming-read
bandwidth of the same two sizes. Needs g++ (or $CXX); no torch, no installed package. About 10 s.

    python benchmarks/profile_decode.py [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from profile_forward import ISAS, ROOT, compile_profile, cpu_flags, row

SOURCE = ROOT / "benchmarks" / "profile_decode.cpp"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per case (median reported)")
    args = parser.parse_args()
    flags = cpu_flags()
    runnable = [isa for isa in ("avx512bf16", "avx512") if ISAS[isa][0] <= flags]
    if not runnable:
        print("profile_decode: this CPU has no AVX-512 (the profile covers the avx512 kernels only)")
        return 1
    isa = runnable[0]
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


if __name__ == "__main__":
    sys.exit(main())
