"""The results as a text table (terminal), a Markdown table (docs) and JSON (every sample)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from .. import __version__, _runtime
from .common import SHORT_DTYPES, Result, cpu_name, load_average

HEADER = ("suite", "impl", "shape", "dtype", "ms", "throughput", "unit", "% peak", "vs SDPA", "max err")
RIGHT = {4, 5, 7, 8, 9}


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _throughput(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1e4 else f"{value:.0f}"


def _shape(result: Result) -> str:
    return result.shape + (" causal" if result.causal and result.suite in ("fwd", "bwd") else "")


def cells(result: Result) -> tuple:
    """The table cells of one result; a failed one has its message as the last cell."""
    head = (result.suite, result.impl, _shape(result), SHORT_DTYPES.get(result.dtype, result.dtype))
    if result.error:
        return head + (f"failed: {result.error}",)
    return head + (_fmt(result.ms, ".2f"), _throughput(result.throughput), result.unit,
                   _fmt(result.pct_peak, ".1f", "%"), _fmt(result.speedup_vs_sdpa, ".2f", "x"),
                   _fmt(result.max_abs_err, ".1e"))


def _case_key(result: Result) -> tuple:
    return (result.suite, result.shape, result.dtype, result.causal)


def format_table(results: list[Result]) -> str:
    """An aligned text table, one line per result, a blank line between cases."""
    lines, previous = [], None
    for result in results:
        if previous is not None and _case_key(result) != previous:
            lines.append(None)
        previous = _case_key(result)
        lines.append(cells(result))
    full = [line for line in lines if line and len(line) == len(HEADER)]
    widths = [max([len(HEADER[i])] + [len(line[i]) for line in (full if i >= 4 else filter(None, lines))])
              for i in range(len(HEADER))]

    def render(row):
        if len(row) < len(HEADER):  # a failed row: its message spans the numeric columns
            return "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1]
        return "  ".join(c.rjust(w) if i in RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [render(HEADER), "  ".join("-" * w for w in widths)]
    out += ["" if line is None else render(line) for line in lines]
    return "\n".join(out)


def markdown_table(results: list[Result]) -> str:
    """The same table in Markdown (for docs/benchmarks.md)."""
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---:" if i in RIGHT else "---"
                                                        for i in range(len(HEADER))) + "|"]
    for result in results:
        row = cells(result)
        if len(row) < len(HEADER):
            row = row + ("",) * (len(HEADER) - len(row))
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def environment(torch, device: str, peaks, args=None, load_start=None) -> dict:
    """What the numbers depend on: versions, machine, threads, measured peaks, load, command."""
    env = {
        "fusedattn": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": device,
        "cpu": cpu_name(),
        "cpu_isa": _runtime.cpu_isa(),
        "fusedattn_threads": _runtime.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "peaks": peaks.as_dict(),
    }
    if args is not None:
        env["options"] = {key: value for key, value in vars(args).items() if key != "func"}
    return env


def write_json(path: str, env: dict, results: list[Result], seconds: float) -> None:
    report = {"environment": env, "wall_seconds": seconds, "results": [dataclasses.asdict(r) for r in results]}
    with open(path, "w") as file:
        json.dump(report, file, indent=1, default=str)
