"""Two CPU facts behind the decode kernel's design: VDPBF16PS against FMA, and how far ahead K must be fetched.

Compiles benchmarks/cpu_rates.cpp (see its header) with the avx512bf16 ISA's flags and prints
(1) the cycles per VDPBF16PS and per 512-bit FMA, throughput and latency: where VDPBF16PS is
slow (Intel Xeon: about 2 cycles and a latency of 9, against FMA's 0.5 and 4), the decode
kernel splits bf16 rows into floats for FMA instead (kDecodeSplitsBf16, decode_block.h);
(2) one thread reading two streams with arithmetic between the loads, with K left to the
hardware prefetchers and with every K line prefetched 1-16 KiB ahead (kDecodeKeyAheadBytes,
tiles.h). Needs g++ (or $CXX) and AVX512-BF16; no torch. About 30 s.

    python benchmarks/cpu_rates.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from profile_forward import ROOT, compile_profile, cpu_flags, row


def main() -> int:
    if "avx512_bf16" not in cpu_flags():
        print("cpu_rates.py needs AVX512-BF16", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as build_dir:
        exe = f"{build_dir}/cpu_rates"
        compile_profile(ROOT / "benchmarks" / "cpu_rates.cpp", "avx512bf16", exe)
        result = json.loads(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)
    print(f"clock about {result['ghz']} GHz (dependent IMULs)\n")
    print(row("512-bit instruction", "cycles per instruction (throughput)", "latency (cycles)"))
    print("|---|---:|---:|")
    print(row("VDPBF16PS", f"{result['dpbf16_throughput']:.2f}", f"{result['dpbf16_latency']:.2f}"))
    print(row("VFMADD231PS", f"{result['fma_throughput']:.2f}", f"{result['fma_latency']:.2f}"))
    print(f"\none thread, two 512 MiB streams, 16 FMAs per 64-byte K line (the arithmetic alone allows "
          f"{result['arithmetic_gbs']} GB/s), GB/s of K+V read:\n")
    print(row("K prefetched", *[("hardware only" if ahead == "0" else f"{int(ahead) // 1024} KiB ahead")
                                for ahead in result["stream"]]))
    print("|---|" + "---:|" * len(result["stream"]))
    print(row("GB/s", *[f"{gbs}" for gbs in result["stream"].values()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
