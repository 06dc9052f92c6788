"""`fusedattn bench`, the package's main job: fusedattn vs torch SDPA vs naive torch, side by side.

Method (DESIGN.md, "Benchmark rules"): for each case every implementation runs once as warm-up,
then the implementations are interleaved A B C A B C ... and each one's median is reported, so
the ratios compare numbers measured side by side in one run. The peaks that "% peak" refers to
are measured in the same run (peaks.py), never hard-coded.

Suites (docs/benchmarks.md has the formulas and the commands):
    fwd     attention forward                       GFLOP/s   (suites_attention.py)
    bwd     attention backward alone                GFLOP/s
    decode  one token vs a KV cache                 GB/s of K/V read
    block   TransformerBlock forward + backward     GFLOP/s   (suites_model.py)
    lm      TransformerLM.generate                  tokens/s

Modules: common (timing, Case, Result), peaks, forward (implementations, inputs, FLOPs, fp64
check; the forward-only loop of benchmarks/bench_forward.py), suites_attention, suites_model,
runner, progress, report, plots, command (options and run). The names below are also what the
scripts in benchmarks/ import.
"""

from .command import SUITES, add_arguments, build_cases, parse_dtypes, parse_impls, parse_shapes, run
from .common import (
    BASELINE,
    DTYPES,
    REPS_RANGE,
    TARGET_SECONDS_PER_CASE,
    Case,
    Result,
    aligned_table,
    per_call_us,
    positive_int,
    require_torch,
    time_interleaved,
    versions_line,
)
from .forward import (
    GPU_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    Row,
    forward_flops,
    implementations,
    make_inputs,
    max_abs_error,
    measure_case,
    naive_attention,
    reference_first_head,
    run_cases,
)
from .peaks import GEMM_SIZE, Peaks, describe_peaks, gemm_calls, measure_gemm_peaks
from .runner import measure

__all__ = [
    "BASELINE", "DTYPES", "GEMM_SIZE", "GPU_IMPLEMENTATIONS", "IMPLEMENTATIONS", "REPS_RANGE", "SUITES",
    "TARGET_SECONDS_PER_CASE", "Case", "Peaks", "Result", "Row", "add_arguments", "build_cases",
    "describe_peaks", "forward_flops", "gemm_calls", "implementations", "make_inputs", "max_abs_error",
    "measure", "measure_case", "measure_gemm_peaks", "naive_attention", "parse_dtypes", "parse_impls",
    "parse_shapes", "per_call_us", "positive_int", "reference_first_head", "require_torch", "run", "run_cases",
    "time_interleaved", "versions_line",
]
