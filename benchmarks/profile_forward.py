"""Where the CPU forward's time goes: a per-phase profile of one q-block of (1, 8, 2048, 128).

Compiles benchmarks/profile_forward.cpp (see its header for what each phase is) into a temporary
directory, once per AVX-512 ISA that this CPU has (/proc/cpuinfo), with the compiler flags that
CMakeLists.txt gives that ISA's kernel library (read from the file, plus -DFUSEDATTN_ISA=<isa>
-I csrc): avx512 profiles fp32 and bf16 (converted to fp32 per key block), avx512bf16 profiles
bf16 on VDPBF16PS (its fp32 code is avx512's). Runs each build single-threaded and prints one
Markdown table: µs per q-block (256 query rows x 2048 keys, non-causal) of each phase, its share
of the whole forward_block_t, the products' GFLOP/s against the FMA / VDPBF16PS peak measured in
the same run, and the K/V bytes read per q-block as GB/s against the streaming-read bandwidth
measured in the same run. Needs g++ (or $CXX); no torch, no installed package. About 10 s per ISA.

    python benchmarks/profile_forward.py [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "profile_forward.cpp"
# ISA -> (the /proc/cpuinfo flags its kernels need, isa.cpp's test; dtypes to profile)
ISAS = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}, ["fp32", "bf16"]),
    "avx512bf16": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c", "avx512_bf16"}, ["bf16"]),
}
PHASES = [  # (key in the program's output, label per path: fp32 / bf16 converted / bf16 pairs)
    ("qk", ("Q·Kᵀ: gemm FmaOp, K in place", "Q·Kᵀ: gemm FmaOp, converted K", "Q·Kᵀ: gemm Bf16PairOp, K in place")),
    ("scale", (None, None, "scaling pass of Sᵀ")),
    ("softmax", ("softmax_step",) * 3),
    ("rescale", ("rescale of O",) * 3),
    ("pack", ("kv_block (in place: nothing)", "kv_block: K, V bf16 → fp32",
              "value_pairs (V) + pack_float_row_pairs (P)")),
    ("pv", ("P·V: gemm FmaOp", "P·V: gemm FmaOp", "P·V: gemm Bf16PairOp")),
    ("pack_q", ("Qᵀ packing, scaled", "Qᵀ packing, bf16 → fp32, scaled", "pack_transposed_pairs (Q)")),
    ("output", ("write_block_output",) * 3),
]


def compile_flags(isa: str) -> list[str]:
    """The flags CMakeLists.txt compiles attention_isa.cpp with for `isa`."""
    text = (ROOT / "CMakeLists.txt").read_text()
    common = re.search(r"target_compile_options\(fusedattn_isa_\$\{name\} PRIVATE(.*?)\$\{ARGN\}", text, re.S)
    own = re.search(rf"fusedattn_isa_library\({isa}\s(.*?)\)", text, re.S)
    standard = re.search(r"set\(CMAKE_CXX_STANDARD (\d+)\)", text)
    if not (common and own and standard):
        raise SystemExit(f"profile_forward: cannot find the {isa} flags in CMakeLists.txt")
    return [f"-std=c++{standard.group(1)}", *common.group(1).split(), *own.group(1).split()]


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_profile(source: Path, isa: str, exe: str) -> None:
    """Compiles a profile program that includes the kernel headers, with `isa`'s kernel flags."""
    subprocess.run([os.environ.get("CXX", "g++"), *compile_flags(isa), f"-DFUSEDATTN_ISA={isa}",
                    f"-I{ROOT / 'csrc'}", str(source), "-o", exe], check=True)


def run_isa(isa: str, dtypes: list[str], reps: int, build_dir: str) -> dict:
    exe = os.path.join(build_dir, f"profile_forward_{isa}")
    compile_profile(SOURCE, isa, exe)
    result = subprocess.run([exe, str(reps), *dtypes], check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def row(*cells: str) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def table(results: list[dict]) -> str:
    lines = [row("ISA / dtype", "phase", "µs / q-block", "% of whole", "GFLOP/s", "% of peak"),
             "|---|---|---:|---:|---:|---:|"]
    for run in results:
        for prof in run["profiles"]:
            pairs = prof["bf16_pairs"]
            path = 2 if pairs else (0 if prof["dtype"] == "fp32" else 1)
            peak, peak_name = (run["dpbf16_gflops"], "VDPBF16PS") if pairs else (run["fma_gflops"], "FMA")
            us = prof["us"]
            whole = us["whole"]
            product_flop = 2 * prof["rows"] * prof["keys"] * prof["head_dim"]  # each of Q·Kᵀ and P·V

            def rate(flop: float, micros: float) -> tuple[str, str]:
                gflops = flop / micros * 1e-3
                return f"{gflops:.1f}", f"{100 * gflops / peak:.0f}% {peak_name}"

            name = f"{run['isa']} / {prof['dtype']}"
            for key, labels in PHASES:
                if key not in us:
                    continue
                rates = rate(product_flop, us[key]) if key in ("qk", "pv") else ("", "")
                lines.append(row(name, labels[path], f"{us[key]:.0f}", f"{100 * us[key] / whole:.1f}%", *rates))
                name = ""
            rest = whole - sum(us[key] for key, _ in PHASES if key in us)
            lines.append(row("", "whole − sum of phases", f"{rest:.0f}", f"{100 * rest / whole:.1f}%", "", ""))
            lines.append(row("", "**whole forward_block_t**", f"**{whole:.0f}**", "100%", *rate(2 * product_flop, whole)))
            kv_gbs = prof["kv_bytes"] / whole * 1e-3
            lines.append(row("", f"K/V read: {prof['kv_bytes'] / 2**20:.0f} MiB per q-block = {kv_gbs:.2f} GB/s", "",
                             "", "", f"{100 * kv_gbs / prof['kv_stream_gbs']:.1f}% of cached, "
                             f"{100 * kv_gbs / run['dram_stream_gbs']:.1f}% of DRAM stream"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=41, help="interleaved repetitions per phase (median reported)")
    args = parser.parse_args()
    flags = cpu_flags()
    runnable = [(isa, dtypes) for isa, (needs, dtypes) in ISAS.items() if needs <= flags]
    if not runnable:
        print("profile_forward: this CPU has no AVX-512 (the profile covers the avx512 kernels only)")
        return 1
    with tempfile.TemporaryDirectory() as build_dir:
        results = [run_isa(isa, dtypes, args.reps, build_dir) for isa, dtypes in runnable]
    shape = results[0]["profiles"][0]
    print(f"(1, 8, 2048, 128) non-causal forward, one q-block ({shape['rows']} query rows x {shape['keys']} keys, "
          f"key blocks of {shape['block_n']}), 1 thread; medians of {args.reps} interleaved repetitions")
    for run in results:
        dpbf16 = f", VDPBF16PS {run['dpbf16_gflops']:.1f} GFLOP/s" if "dpbf16_gflops" in run else ""
        cached = ", ".join(f"{p['kv_bytes'] / 2**20:.0f} MiB {p['kv_stream_gbs']:.0f} GB/s" for p in run["profiles"])
        print(f"{run['isa']} build: peaks FMA {run['fma_gflops']:.1f} GFLOP/s{dpbf16}; "
              f"stream read: cached {cached}, DRAM (512 MiB) {run['dram_stream_gbs']:.1f} GB/s")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
