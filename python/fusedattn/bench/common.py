"""Shared pieces of `fusedattn bench`: the torch import, dtype names, interleaved timing, the
Case (what one measurement is) and the Result (one implementation's numbers on a case)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from typing import Callable

from .. import __version__, _runtime

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64", "fp64": "float64"}
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

BASELINE = "torch-sdpa"  # every suite's speed-up is against torch SDPA (default backend)

# Auto reps: as many interleaved rounds as fit in about this many seconds per case (full run,
# --quick), within REPS_RANGE. Suites with slow calls (block, lm) set their own (Case fields).
TARGET_SECONDS_PER_CASE = {False: 3.0, True: 0.5}
REPS_RANGE = (5, 50)

# What a failing implementation may raise (unsupported dtype or device, no kernel, out of memory):
# it is reported as a failed row, and the other implementations still run.
EXPECTED_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError)


def require_torch():
    """torch, or SystemExit with the install hint: the benchmark compares against PyTorch."""
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "fusedattn bench needs PyTorch, which is not installed: pip install fusedattn[bench]"
        ) from None
    return torch


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def per_call_us(calls: dict[str, Callable], reps=3000) -> dict[str, float]:
    """Median µs per call of each (cheap) call, one after the other: 200 warm-up calls, then 7
    batches of reps // 7 calls, each timed as a whole (the per-call overhead of tiny inputs)."""
    result = {}
    for name, call in calls.items():
        for _ in range(200):
            call()
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(reps // 7):
                call()
            samples.append((time.perf_counter() - start) / (reps // 7) * 1e6)
        samples.sort()
        result[name] = samples[len(samples) // 2]
    return result


def time_interleaved(calls: dict[str, Callable], reps=None, quick=False, *, target_seconds=None,
                     reps_range=REPS_RANGE, sync: Callable | None = None):
    """Warm up each call once, then run them interleaved A B C A B C ... for `reps` rounds.

    reps=None picks the count from the warm-up round's time: about target_seconds per case
    (default TARGET_SECONDS_PER_CASE[quick]), within reps_range. sync (e.g. torch.cuda.synchronize)
    runs after every call, inside its timing. Returns ({name: [seconds per rep]}, {name: last
    result}, {name: error message}); a call that raises in the warm-up is left out of the timing
    and reported in the third dict.
    """
    sync = sync or (lambda: None)
    results, errors = {}, {}
    warmup_start = time.perf_counter()
    for name, call in calls.items():
        try:
            results[name] = call()
            sync()
        except EXPECTED_ERRORS as error:
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    live = {name: call for name, call in calls.items() if name not in errors}
    if reps is None:
        round_seconds = max(time.perf_counter() - warmup_start, 1e-6)
        target = TARGET_SECONDS_PER_CASE[quick] if target_seconds is None else target_seconds
        low, high = reps_range
        reps = min(high, max(low, round(target / round_seconds)))
    times = {name: [] for name in live}
    for _ in range(reps):
        for name, call in live.items():
            start = time.perf_counter()
            results[name] = call()
            sync()
            times[name].append(time.perf_counter() - start)
    return times, results, errors


def aligned_table(header, rows, left_columns: int = 0) -> str:
    """Plain-text table: the first `left_columns` columns left-aligned, the rest right-aligned,
    a dashed rule under the header."""
    rows = [tuple(map(str, row)) for row in rows]
    widths = [max(len(cells[i]) for cells in [tuple(header)] + rows) for i in range(len(header))]

    def render(cells):
        return "  ".join(c.ljust(w) if i < left_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([render(header), "  ".join("-" * w for w in widths)] + [render(cells) for cells in rows])


def versions_line(torch) -> str:
    """'fusedattn 0.1.0 (avx512, 2 threads) vs torch 2.13.0 (2 threads)'."""
    return (f"fusedattn {__version__} ({_runtime.cpu_isa()}, {_runtime.get_num_threads()} threads) vs "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def cpu_name() -> str:
    """The CPU's model name ('AMD EPYC 9R14 96-Core Processor'), or the platform's best guess."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(torch, device: str) -> str:
    """'AMD EPYC, 2 threads' or 'NVIDIA H100 80GB HBM3 (host: AMD EPYC, 2 threads)': for plot titles."""
    cpu = f"{cpu_name()}, {torch.get_num_threads()} threads"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (host: {cpu})"
    return cpu


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (other jobs on the machine make timings noisy)."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):
        return None


def dtype_of(torch, name: str):
    return getattr(torch, name)


@dataclasses.dataclass
class Case:
    """One measurement: several implementations of the same work, timed side by side.

    prepare() builds the inputs (only when the case runs, so no two cases' tensors are alive at
    once) and returns (calls, check): calls maps implementation name to a no-argument callable;
    check(results) maps name to max abs error against a float64 reference (or is None).
    work is per call, in the unit's numerator: FLOP (GFLOP/s), bytes (GB/s) or tokens (tok/s).
    flops: FLOPs per call, for "% peak" against the GEMM peak (None: peak is the bandwidth's).
    """

    suite: str
    label: str
    dtype: str
    causal: bool | None
    params: dict
    unit: str
    work: float
    flops: float | None
    prepare: Callable[[], tuple[dict[str, Callable], Callable | None]]
    target_seconds: dict = dataclasses.field(default_factory=lambda: dict(TARGET_SECONDS_PER_CASE))
    reps_range: tuple = REPS_RANGE

    def title(self) -> str:
        """'bwd 1x8x1024x64 bf16 causal': the progress bar's text."""
        causal = " causal" if self.causal and self.suite in ("fwd", "bwd") else ""
        return f"{self.suite} {self.label} {SHORT_DTYPES.get(self.dtype, self.dtype)}{causal}"


UNIT_SCALE = {"GFLOP/s": 1e9, "GB/s": 1e9, "tok/s": 1.0}


@dataclasses.dataclass
class Result:
    """One implementation on one case: median ms, throughput in `unit`, % of the measured peak
    (GEMM FLOP/s, or read bandwidth for GB/s rows), speed-up vs torch SDPA, max abs error."""

    suite: str
    impl: str
    shape: str
    dtype: str
    causal: bool | None
    params: dict
    unit: str
    reps: int = 0
    ms: float | None = None
    throughput: float | None = None
    pct_peak: float | None = None
    speedup_vs_sdpa: float | None = None
    max_abs_err: float | None = None
    error: str | None = None
    preempted: int | None = None  # involuntary context switches while the case was timed (noise)
    times_ms: list = dataclasses.field(default_factory=list)
