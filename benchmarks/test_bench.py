"""pytest-benchmark suite: the cases of `fusedattn bench`, one benchmark per (case, implementation).

    pytest benchmarks/ --benchmark-only                          # the --quick cases of every suite
    FUSEDATTN_BENCH_CASES=full pytest benchmarks/ --benchmark-only   # the default (full) cases
    pytest benchmarks/ --benchmark-only -k "fwd and fusedattn"   # a subset
    pytest benchmarks/ --benchmark-only --benchmark-save=base    # then --benchmark-compare=0001

The cases are the CLI's own (fusedattn.bench.build_cases: same shapes, inputs, FLOP/byte
counts and float64 checks); each benchmark is grouped by case, so pytest-benchmark's table puts
fusedattn, torch SDPA and naive torch of one case together. Unlike the CLI, pytest-benchmark
runs the implementations one after the other, not interleaved: for ratios on a noisy machine
prefer `fusedattn bench`. extra_info carries the throughput (GFLOP/s, GB/s or tok/s from the
median) and the max abs error against float64, which is also asserted.

The plain tests at the end check the CLI's pieces (option parsing, progress bar, table, plots)
without timing anything; --benchmark-only skips them. The repository's `python -m pytest`
(testpaths = ["tests"]) collects nothing from here.
"""

from __future__ import annotations

import argparse
import io
import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

from fusedattn import bench  # noqa: E402
from fusedattn.bench import command, common, progress, report  # noqa: E402

FULL = os.environ.get("FUSEDATTN_BENCH_CASES", "quick") == "full"
DEVICE = command.resolve_device(torch, os.environ.get("FUSEDATTN_BENCH_DEVICE", "auto"))
TOLERANCE = {"float32": 2e-4, "float64": 1e-9, "bfloat16": 5e-2, "float16": 1e-2}


def _cases():
    args = argparse.Namespace(suite=list(command.SUITES), shapes={}, dtype=None, causal="no", quick=not FULL)
    return command.build_cases(torch, args, DEVICE)


CASES = _cases()
IMPLS = bench.IMPLEMENTATIONS + (bench.GPU_IMPLEMENTATIONS if DEVICE == "cuda" else ())
_prepared: dict[str, tuple] = {}


def prepared(case):
    """The case's (calls, check), built once and kept for the module (one case at a time)."""
    key = case.title()
    if key not in _prepared:
        _prepared.clear()
        _prepared[key] = case.prepare()
    return _prepared[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.title().replace(" ", "-") for c in CASES])
def test_bench(benchmark, case, impl):
    calls, check = prepared(case)
    if impl not in calls:
        pytest.skip(f"{impl} does not run {case.suite}")
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def call():
        out = calls[impl]()
        sync()
        return out

    benchmark.group = case.title()
    benchmark.extra_info.update(suite=case.suite, shape=case.label, dtype=case.dtype, unit=case.unit,
                                work_per_call=case.work)
    try:
        out = benchmark(call)
    except common.EXPECTED_ERRORS as error:
        pytest.skip(f"{impl} cannot run {case.title()} here: {error}")
    median = benchmark.stats.stats.median
    benchmark.extra_info["throughput"] = case.work / median / common.UNIT_SCALE[case.unit]
    if check is not None:
        error = check({impl: out})[impl]
        benchmark.extra_info["max_abs_err"] = error
        assert error <= TOLERANCE[case.dtype], f"{impl} on {case.title()}: max abs error {error:.2e}"


# --- the CLI's pieces, untimed --------------------------------------------------------------------

def test_parse_shapes():
    shapes = command.parse_shapes("1x8x256x64,decode:2x8/2x512x64,block:1x128x64x2,lm:1x16x4")
    assert shapes["fwd"] == [(1, 8, 256, 64)] and shapes["bwd"] == [(1, 8, 256, 64)]
    assert shapes["decode"] == [(1, 8, 8, 256, 64), (2, 8, 2, 512, 64)]
    assert shapes["block"] == [(1, 128, 64, 2)] and shapes["lm"] == [(1, 16, 4)]
    for bad in ("1x8x256", "nope:1x1x1x1", "decode:1x8/3x16x16", "0x1x1x1"):
        with pytest.raises(argparse.ArgumentTypeError):
            command.parse_shapes(bad)


def test_progress_lines_without_a_tty():
    stream = io.StringIO()
    bar = progress.Progress(2, stream=stream, width=10)
    bar.step("fwd 1x8x1024x64 fp32")
    bar.step("bwd 1x8x1024x64 bf16")
    bar.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[----------] 1/2 fwd 1x8x1024x64 fp32")
    assert lines[1].startswith("[#####-----] 2/2 bwd 1x8x1024x64 bf16")
    assert lines[2].startswith("[##########] 2/2 done in")


def test_progress_rewrites_one_line_on_a_tty():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = progress.Progress(3, stream=stream)
    bar.step("a long step name")
    bar.step("short")
    bar.finish()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")


def test_cli_end_to_end(tmp_path):
    """A tiny run of every suite through the command: table, bench.json, table.md, plots."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--quick", "--reps", "1", "--device", "cpu", "--out", str(tmp_path),
                              "--shapes", "1x2x64x16,decode:1x4/2x64x16,block:1x32x32x2,lm:1x8x2"])
    assert command.run(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    suites = {r["suite"] for r in data["results"]}
    assert suites == set(command.SUITES)
    for result in data["results"]:
        assert result["error"] is None, result
        assert result["ms"] > 0 and result["throughput"] > 0 and result["pct_peak"] > 0
        if result["impl"] == "torch-sdpa":
            assert result["speedup_vs_sdpa"] == pytest.approx(1.0)
    assert data["environment"]["peaks"]["read_gbs"] > 0
    assert "| fwd | fusedattn |" in (tmp_path / "table.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "forward_throughput.png").stat().st_size > 10_000
    assert (tmp_path / "speedup.png").stat().st_size > 10_000


def test_table_reports_failed_rows():
    failed = common.Result("fwd", "fusedattn", "1x1x8x8", "float16", False, {}, "GFLOP/s", error="RuntimeError: no")
    ok = common.Result("fwd", "torch-sdpa", "1x1x8x8", "float16", False, {}, "GFLOP/s", reps=3, ms=1.0,
                       throughput=2.0, pct_peak=1.0, speedup_vs_sdpa=1.0, max_abs_err=1e-3)
    table = report.format_table([failed, ok])
    assert "failed: RuntimeError: no" in table and "1.00x" in table
