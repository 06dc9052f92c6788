"""Runs a list of Cases: each case's implementations interleaved, medians, then the derived columns.

Per case: prepare() the inputs, warm up every implementation once, time them interleaved
(A B C A B C ...), compute the errors against float64 on the last outputs, drop the tensors,
then measure the relevant peak once more (a GEMM after FLOP-counted cases, a read after decode
cases), so the peaks are the best seen over the whole run. "% peak" is set at the end against
those best values.
"""

from __future__ import annotations

import gc
import statistics

try:
    import resource
except ImportError:  # not on Unix: no context-switch counts
    resource = None

from .common import BASELINE, EXPECTED_ERRORS, UNIT_SCALE, Case, Result, time_interleaved
from .peaks import Peaks
from .progress import Progress


def involuntary_switches() -> int | None:
    """How often the OS has preempted this process so far (other jobs competing for the cores)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def measure(case: Case, *, impls=None, reps=None, quick=False, sync=None) -> list[Result]:
    """Times one case; one Result per implementation (failed ones carry `error`).

    Each Result's `preempted` is the number of involuntary context switches during the timing:
    a noise indicator (tens per second on an idle machine, hundreds when other jobs compete).
    """
    calls, check = case.prepare()
    if impls:
        calls = {name: call for name, call in calls.items() if name in impls}
    switches = involuntary_switches()
    times, outputs, failures = time_interleaved(calls, reps, quick, target_seconds=case.target_seconds[quick],
                                                reps_range=case.reps_range, sync=sync)
    preempted = None if switches is None else involuntary_switches() - switches
    errors = {}
    if check is not None:
        try:
            errors = check({name: outputs[name] for name in times})
        except EXPECTED_ERRORS as error:  # a reference that cannot run here: no error column
            print(f"\nnote: {case.title()}: float64 check failed: {error}")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    results = []
    for name in calls:
        result = Result(case.suite, name, case.label, case.dtype, case.causal, case.params, case.unit,
                        preempted=preempted)
        if name in failures:
            result.error = failures[name]
        else:
            seconds = medians[name]
            result.reps = len(times[name])
            result.times_ms = [t * 1e3 for t in times[name]]
            result.ms = seconds * 1e3
            result.throughput = case.work / seconds / UNIT_SCALE[case.unit]
            if BASELINE in medians:
                result.speedup_vs_sdpa = medians[BASELINE] / seconds
            result.max_abs_err = errors.get(name)
        results.append(result)
    return results


def run_cases(torch, cases: list[Case], peaks: Peaks, *, impls=None, reps=None, quick=False, device="cpu",
              progress: Progress | None = None) -> list[Result]:
    """Measures every case in order, showing progress; returns all Results with % peak filled in."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    progress = progress or Progress(len(cases))
    measured: list[tuple[Case, list[Result]]] = []
    for case in cases:
        progress.step(case.title())
        measured.append((case, measure(case, impls=impls, reps=reps, quick=quick, sync=sync)))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if case.flops is None:
            peaks.refresh_bandwidth()
        else:
            peaks.refresh_gemm()
    progress.finish()
    results = []
    for case, case_results in measured:
        for result in case_results:
            if result.ms is not None:
                if case.flops is None:  # GB/s rows: % of the read bandwidth
                    result.pct_peak = 100.0 * result.throughput / peaks.read_gbs
                else:
                    gflops = case.flops / (result.ms / 1e3) / 1e9
                    result.pct_peak = 100.0 * gflops / peaks.flops(case.dtype)
            results.append(result)
    return results
