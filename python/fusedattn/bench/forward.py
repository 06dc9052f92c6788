"""The attention implementations compared on the forward, their inputs, FLOPs and the fp64 check.

implementations(torch): name -> fn(q, k, v, causal) on (batch, heads, seqlen, head_dim) tensors
with Lq = Lk: fusedattn, torch SDPA (default backend; on the CPU its flash kernel) and a naive
torch attention (matmul, softmax, matmul in the input dtype, materialising the L×L scores).
gpu_sdpa_backends(torch): SDPA pinned to each of its CUDA backends (flash, efficient, cuDNN).

run_cases() is the forward-only measuring loop that benchmarks/bench_forward.py uses (one Row per
implementation and case); `fusedattn bench` itself runs the suites in suites_attention.py.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Callable

from ..functional import attention
from ..reference import attention_reference, to_float64
from .common import BASELINE, time_interleaved
from .peaks import gemm_calls, measure_gemm_peaks

IMPLEMENTATIONS = ("fusedattn", "torch-sdpa", "naive-torch")
GPU_IMPLEMENTATIONS = ("torch-sdpa-flash", "torch-sdpa-efficient", "torch-sdpa-cudnn", "fusedattn-cpu")


def forward_flops(batch, num_heads, seqlen_q, seqlen_k, head_dim, causal) -> float:
    """Forward FLOPs: 4·B·H·Lq·Lk·D (two matmuls), halved when causal and Lq = Lk."""
    flops = 4.0 * batch * num_heads * seqlen_q * seqlen_k * head_dim
    return flops / 2 if causal and seqlen_q == seqlen_k else flops


def naive_attention(torch, q, k, v, causal):
    """matmul, softmax, matmul, all in the input dtype; materialises the (L, L) scores.

    k, v may have fewer heads than q (GQA): q's heads are grouped onto them by a reshape, no copy.
    """
    batch, num_heads, seqlen_q, head_dim = q.shape
    num_heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = num_heads // num_heads_kv
    q = q.reshape(batch, num_heads_kv, group * seqlen_q, head_dim)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))  # (B, Hkv, G·Lq, Lk)
    if causal:
        position = torch.arange(seqlen_q, device=q.device).repeat(group)[:, None] + (seqlen_k - seqlen_q)
        hidden = torch.arange(seqlen_k, device=q.device)[None, :] > position
        scores.masked_fill_(hidden, -math.inf)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.reshape(batch, num_heads, seqlen_q, head_dim)


def implementations(torch) -> dict[str, Callable]:
    """name -> fn(q, k, v, causal) for (batch, heads, seqlen, head_dim) tensors with Lq = Lk."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {
        "fusedattn": lambda q, k, v, causal: attention(q, k, v, causal=causal),
        "torch-sdpa": lambda q, k, v, causal: sdpa(q, k, v, is_causal=causal),
        "naive-torch": lambda q, k, v, causal: naive_attention(torch, q, k, v, causal),
    }


def gpu_sdpa_backends(torch) -> dict[str, Callable]:
    """'torch-sdpa-flash' etc. -> fn(q, k, v, causal): SDPA restricted to one CUDA backend.

    Backends this torch does not know are left out; one that cannot run a case (e.g. flash with
    fp32) raises, and the case reports it as a failed row.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns = {}
    for suffix, member in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                           ("cudnn", "CUDNN_ATTENTION")):
        backend = getattr(SDPBackend, member, None)
        if backend is None:
            continue

        def fn(q, k, v, causal, backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=causal)

        fns[f"torch-sdpa-{suffix}"] = fn
    return fns


def make_inputs(torch, shape, dtype, seed=0, device="cpu"):
    """Fresh random q, k, v of `shape` (drawn in fp32 on the CPU, then cast and moved)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=generator).to(device=device, dtype=dtype) for _ in range(3))


FIRST_HEAD = (slice(0, 1), slice(0, 1))  # batch 0, head 0: the reference materialises L×L in float64


def reference_first_head(q, k, v, causal):
    """The float64 reference output of batch 0, head 0, shape (1, 1, L, D)."""
    expected, _ = attention_reference(q[FIRST_HEAD], k[FIRST_HEAD], v[FIRST_HEAD], causal=causal)
    return expected


def max_abs_error(out, expected) -> float:
    """Max |out - expected| over batch 0, head 0 of out."""
    return float(abs(to_float64(out[FIRST_HEAD]) - expected).max())


# --- the forward-only loop of benchmarks/bench_forward.py ---------------------------------------

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
    import time

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
