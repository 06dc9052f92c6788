"""`fusedattn bench`: times the forward of fusedattn against torch SDPA and a naive torch attention.

Method (DESIGN.md, "Benchmark rules"): for each case (shape, dtype, causal) every implementation
runs once as warm-up, then the implementations are interleaved A B C A B C ... for `reps` rounds
and each one's median is reported, so the ratios compare numbers measured side by side. Per row:
median ms, GFLOP/s (forward FLOPs 4·B·H·Lq·Lk·D, halved when causal), % of the measured fp32 GEMM
peak, speed-up against torch SDPA, and max abs error against the float64 reference on head (0, 0)
of the last timed output. The GEMM peak is the fastest 2048² fp32 GEMM torch can run, timed with
torch.matmul (MKL) and oneDNN (torch's mkldnn linear, which unlike MKL uses AVX-512 on AMD CPUs):
best of a few at the start and one after each case, so a busy moment does not deflate it. Every
row, bf16 ones too, is compared with it, so oneDNN's bf16 dot-product GEMMs can exceed 100%.

The functions here are also used by the scripts in benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from typing import Callable

from . import __version__, _runtime
from .functional import attention
from .reference import attention_reference, to_float64

__all__ = ["add_arguments", "run"]

DEFAULT_SHAPES = [(1, 8, 2048, 64), (1, 8, 2048, 128), (4, 8, 512, 64), (8, 16, 256, 64)]
QUICK_SHAPES = [(1, 8, 512, 64), (2, 4, 256, 128)]
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64", "fp64": "float64"}
IMPLEMENTATIONS = ("fusedattn", "torch-sdpa", "naive-torch")
BASELINE = "torch-sdpa"

# Auto reps: as many rounds as fit in about this many seconds per case (full run, --quick), within
# REPS_RANGE: ~1-2 min for the default set on a 2-core CPU, ~10 s for --quick.
TARGET_SECONDS_PER_CASE = {False: 3.0, True: 1.0}
REPS_RANGE = (5, 50)
GEMM_SIZE = 2048


def require_torch():
    """torch, or SystemExit with the install hint: the benchmark compares against PyTorch."""
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "fusedattn bench needs PyTorch, which is not installed: pip install fusedattn[bench]"
        ) from None
    return torch


# --- what is measured -------------------------------------------------------------------------

def forward_flops(batch, num_heads, seqlen_q, seqlen_k, head_dim, causal) -> float:
    """Forward FLOPs: 4·B·H·Lq·Lk·D (two matmuls), halved when causal and Lq = Lk."""
    flops = 4.0 * batch * num_heads * seqlen_q * seqlen_k * head_dim
    return flops / 2 if causal and seqlen_q == seqlen_k else flops


def gemm_calls(torch, size=GEMM_SIZE) -> dict[str, Callable]:
    """fp32 (size × size) GEMMs by name, each run once (warm-up): torch.matmul, and oneDNN if present."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    calls = {"torch.matmul": lambda: torch.matmul(a, b)}
    try:  # a private torch entry point, so skipped when a torch version lacks it
        a_dnn, b_dnn = a.to_mkldnn(), b.to_mkldnn()

        def onednn():
            return torch._C._nn.mkldnn_linear(a_dnn, b_dnn, None)  # a @ b.T

        calls["onednn"] = onednn
        onednn()
    except (AttributeError, RuntimeError):
        calls.pop("onednn", None)
    calls["torch.matmul"]()
    return calls


def measure_gemm_peaks(calls, reps, previous=None) -> dict[str, float]:
    """{GEMM name: GFLOP/s of its best of `reps` calls}, each at least its value in `previous`."""
    peaks = dict(previous or {})
    for name, call in calls.items():
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        peaks[name] = max(peaks.get(name, 0.0), 2.0 * GEMM_SIZE**3 / best / 1e9)
    return peaks


def describe_peaks(peaks: dict[str, float]) -> str:
    """'measured fp32 GEMM peak: 459.3 GFLOP/s (onednn; torch.matmul 216.0), 2048², best of the run'."""
    best = max(peaks, key=peaks.get)
    others = "; ".join(f"{name} {value:.1f}" for name, value in peaks.items() if name != best)
    return (f"measured fp32 GEMM peak: {peaks[best]:.1f} GFLOP/s ({best}{'; ' + others if others else ''}), "
            f"{GEMM_SIZE}², best of the run")


def implementations(torch) -> dict[str, Callable]:
    """name -> fn(q, k, v, causal) for (batch, heads, seqlen, head_dim) tensors with Lq = Lk."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def naive(q, k, v, causal):
        # matmul, softmax, matmul, all in the input dtype; materialises the (L, L) scores.
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if causal:
            hidden = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu_(1)
            scores.masked_fill_(hidden, -math.inf)
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    return {
        "fusedattn": lambda q, k, v, causal: attention(q, k, v, causal=causal),
        "torch-sdpa": lambda q, k, v, causal: sdpa(q, k, v, is_causal=causal),
        "naive-torch": naive,
    }


def make_inputs(torch, shape, dtype, seed=0):
    """Fresh random q, k, v of `shape` (drawn in fp32, then cast to the torch dtype)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=generator).to(dtype) for _ in range(3))


def time_interleaved(calls: dict[str, Callable], reps=None, quick=False):
    """Warm up each call once, then run them interleaved A B C A B C ... for `reps` rounds.

    reps=None picks the count from the warm-up round's time (TARGET_SECONDS_PER_CASE).
    Returns ({name: [seconds per rep]}, {name: last result}, {name: error message}); a call
    that raises in the warm-up is left out of the timing and reported in the third dict.
    """
    results, errors = {}, {}
    warmup_start = time.perf_counter()
    for name, call in calls.items():
        try:
            results[name] = call()
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    live = {name: call for name, call in calls.items() if name not in errors}
    if reps is None:
        round_seconds = max(time.perf_counter() - warmup_start, 1e-6)
        low, high = REPS_RANGE
        reps = min(high, max(low, round(TARGET_SECONDS_PER_CASE[quick] / round_seconds)))
    times = {name: [] for name in live}
    for _ in range(reps):
        for name, call in live.items():
            start = time.perf_counter()
            results[name] = call()
            times[name].append(time.perf_counter() - start)
    return times, results, errors


FIRST_HEAD = (slice(0, 1), slice(0, 1))  # batch 0, head 0: the reference materialises L×L in float64


def reference_first_head(q, k, v, causal):
    """The float64 reference output of batch 0, head 0, shape (1, 1, L, D)."""
    expected, _ = attention_reference(q[FIRST_HEAD], k[FIRST_HEAD], v[FIRST_HEAD], causal=causal)
    return expected


def max_abs_error(out, expected) -> float:
    """Max |out - expected| over batch 0, head 0 of out."""
    return float(abs(to_float64(out[FIRST_HEAD]) - expected).max())


@dataclasses.dataclass
class Row:
    impl: str
    batch: int
    num_heads: int
    seqlen: int
    head_dim: int
    dtype: str
    causal: bool
    reps: int = 0
    ms: float | None = None
    gflops: float | None = None
    pct_fp32_peak: float | None = None
    speedup_vs_sdpa: float | None = None
    max_abs_err: float | None = None
    error: str | None = None
    times_ms: list = dataclasses.field(default_factory=list)


def measure_case(torch, shape, dtype_name, causal, impl_names, reps=None, quick=False) -> list[Row]:
    """One case: every implementation in impl_names timed side by side; one Row each.

    pct_fp32_peak is left to run_cases, once the run's GEMM peak is known.
    """
    fns = implementations(torch)
    q, k, v = make_inputs(torch, shape, getattr(torch, dtype_name))
    calls = {name: (lambda fn=fns[name]: fn(q, k, v, causal)) for name in impl_names}
    times, results, errors = time_interleaved(calls, reps, quick)
    expected = reference_first_head(q, k, v, causal)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    flops = forward_flops(shape[0], shape[1], shape[2], shape[2], shape[3], causal)
    rows = []
    for name in impl_names:
        row = Row(name, *shape, dtype=dtype_name, causal=causal)
        if name in errors:
            row.error = errors[name]
        else:
            seconds = medians[name]
            row.reps = len(times[name])
            row.times_ms = [t * 1e3 for t in times[name]]
            row.ms = seconds * 1e3
            row.gflops = flops / seconds / 1e9
            if BASELINE in medians:
                row.speedup_vs_sdpa = medians[BASELINE] / seconds
            row.max_abs_err = max_abs_error(results[name], expected)
        rows.append(row)
    return rows


def run_cases(torch, cases, impl_names, reps=None, quick=False) -> tuple[list[Row], dict[str, float]]:
    """Measures every (shape, dtype name, causal) case, printing progress; returns (rows, GEMM peaks).

    The GEMM peaks are the best of a few GEMMs before the first case and one after each case;
    the rows' pct_fp32_peak are set against the highest at the end.
    """
    gemms = gemm_calls(torch)
    peaks = measure_gemm_peaks(gemms, reps=3 if quick else 5)
    rows: list[Row] = []
    for index, (shape, dtype_name, causal) in enumerate(cases, 1):
        start = time.perf_counter()
        case_rows = measure_case(torch, shape, dtype_name, causal, impl_names, reps, quick)
        rows += case_rows
        peaks = measure_gemm_peaks(gemms, reps=1, previous=peaks)
        print(f"[{index}/{len(cases)}] {'×'.join(map(str, shape))} {dtype_name} causal={causal}: "
              f"{max(r.reps for r in case_rows)} reps, {time.perf_counter() - start:.1f} s", flush=True)
    for row in rows:
        if row.gflops is not None:
            row.pct_fp32_peak = 100.0 * row.gflops / max(peaks.values())
    return rows, peaks


# --- reporting --------------------------------------------------------------------------------

def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: list[Row]) -> str:
    """An aligned text table, one line per row, a blank line between cases."""
    header = ("impl", "B×H×L×D", "dtype", "causal", "ms", "GFLOP/s", "% fp32 peak", "vs SDPA", "max abs err")
    lines = []
    previous_case = None
    for row in rows:
        case = (row.batch, row.num_heads, row.seqlen, row.head_dim, row.dtype, row.causal)
        if previous_case is not None and case != previous_case:
            lines.append(None)
        previous_case = case
        shape = f"{row.batch}×{row.num_heads}×{row.seqlen}×{row.head_dim}"
        if row.error:
            lines.append((row.impl, shape, row.dtype, str(row.causal), f"failed: {row.error}"))
            continue
        lines.append((row.impl, shape, row.dtype, str(row.causal), _fmt(row.ms, ".3f"), _fmt(row.gflops, ".1f"),
                      _fmt(row.pct_fp32_peak, ".1f", "%"), _fmt(row.speedup_vs_sdpa, ".2f", "x"),
                      _fmt(row.max_abs_err, ".1e")))
    full = [line for line in lines if line and len(line) == len(header)]
    widths = [max([len(header[i])] + [len(line[i]) for line in (full if i >= 4 else filter(None, lines))])
              for i in range(len(header))]
    right = {4, 5, 6, 7, 8}

    def render(cells):
        if len(cells) < len(header):  # a failed row: its message spans the numeric columns
            return "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [render(header), "  ".join("-" * w for w in widths)]
    out += ["" if line is None else render(line) for line in lines]
    return "\n".join(out)


def versions_line(torch) -> str:
    """'fusedattn 0.1.0 (avx512, 2 threads) vs torch 2.13.0 (2 threads)'."""
    return (f"fusedattn {__version__} ({_runtime.cpu_isa()}, {_runtime.get_num_threads()} threads) vs "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def environment(torch, peaks) -> dict:
    """What the numbers depend on: versions, ISA, thread counts, the measured fp32 GEMM peaks."""
    return {
        "fusedattn": __version__,
        "torch": torch.__version__,
        "cpu_isa": _runtime.cpu_isa(),
        "fusedattn_threads": _runtime.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "fp32_gemm_peak_gflops": max(peaks.values()),
        "fp32_gemm_gflops": peaks,
        "gemm_size": GEMM_SIZE,
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- the command ------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def parse_shapes(text: str) -> list[tuple]:
    """'1x8x2048x64,4x8x512x64' -> [(1, 8, 2048, 64), (4, 8, 512, 64)]."""
    shapes = []
    for item in text.split(","):
        try:
            dims = tuple(int(d) for d in item.strip().lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 4 or min(dims) < 1:
            raise argparse.ArgumentTypeError(f"shape must be BxHxLxD with positive ints, got {item!r}")
        shapes.append(dims)
    return shapes


def parse_dtypes(text: str) -> list[str]:
    names = []
    for item in text.split(","):
        if item.strip() not in DTYPES:
            raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(DTYPES)}; got {item!r}")
        names.append(DTYPES[item.strip()])
    return names


def parse_impls(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",")]
    unknown = [name for name in names if name not in IMPLEMENTATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLEMENTATIONS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes, ~1 s per case (~10 s in all)")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated BxHxLxD, e.g. 1x8x2048x64,4x8x512x64 (default: a standard set)")
    parser.add_argument("--dtype", type=parse_dtypes, default=["float32", "bfloat16"],
                        help="comma-separated dtypes: float32,bfloat16,float16,float64 (default float32,bfloat16); "
                             "note naive torch float16 is very slow on CPUs without fp16 GEMMs")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="causal cases to run")
    parser.add_argument("--impls", type=parse_impls, default=list(IMPLEMENTATIONS),
                        help=f"comma-separated implementations (default {','.join(IMPLEMENTATIONS)})")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="interleaved rounds per case (default: ~3 s per case, --quick ~1 s, within 5..50)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for torch and fusedattn alike (default: torch's; fusedattn follows it)")
    parser.add_argument("--out", default=None, help="directory to write forward.json (results and environment)")


def run(args: argparse.Namespace) -> int:
    torch = require_torch()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        _runtime.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    causal_values = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]

    print(versions_line(torch))
    print("forward only; interleaved rounds, medians; errors vs float64 reference on head (0, 0)\n")

    cases = [(s, d, c) for s in shapes for d in args.dtype for c in causal_values]
    rows, peaks = run_cases(torch, cases, args.impls, args.reps, args.quick)
    print(f"\n{describe_peaks(peaks)}\n")
    print(format_table(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "forward.json")
        with open(path, "w") as file:
            report = {"environment": environment(torch, peaks), "rows": [dataclasses.asdict(r) for r in rows]}
            json.dump(report, file, indent=1)
        print(f"\nwrote {path}")
    return 0
