"""Backward benchmark: fusedattn vs torch SDPA, backward alone and forward+backward.

Shapes (1, 8, 1024, 64) (the training issue's), (1, 8, 2048, 64), (1, 8, 2048, 128) and
(1, 16, 4096, 64) (the CPU speed issue's), causal and not, fp32 and bf16. Backward alone is timed as torch.autograd.grad over a retained forward graph; both
implementations are timed interleaved and compared by medians (DESIGN.md). FLOPs: backward =
2.5x the forward's 4·B·H·L²·D (halved when causal), fwd+bwd = 3.5x. Also the per-call overhead of
a tiny call (1, 1, 1, 8), eager, with and without autograd, against SDPA.

    python benchmarks/bench_backward.py [--reps N]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import fusedattn
from fusedattn import bench

SHAPES = [(1, 8, 1024, 64), (1, 8, 2048, 64), (1, 8, 2048, 128), (1, 16, 4096, 64)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def attention_fns(causal):
    return {
        "fusedattn": lambda q, k, v: fusedattn.attention(q, k, v, causal=causal),
        "torch-sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }


def backward_calls(shape, dtype, causal):
    """{impl: call} for backward alone (grad over a retained graph) and for forward+backward."""
    q, k, v = (x.requires_grad_() for x in bench.make_inputs(torch, shape, dtype))
    dout = torch.randn(shape).to(dtype)
    backward, both = {}, {}
    for name, fn in attention_fns(causal).items():
        out = fn(q, k, v)
        backward[name] = lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        both[name] = lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    return backward, both


def overhead_us(reps=3000):
    """Median µs per call at (1, 1, 1, 8), eager, for each implementation, without and with autograd."""
    x = torch.randn(1, 1, 1, 8)
    xg = x.clone().requires_grad_()
    calls = {
        "fusedattn": lambda: fusedattn.attention(x, x, x),
        "torch-sdpa": lambda: F.scaled_dot_product_attention(x, x, x),
        "fusedattn (autograd)": lambda: fusedattn.attention(xg, xg, xg),
        "torch-sdpa (autograd)": lambda: F.scaled_dot_product_attention(xg, xg, xg),
    }
    return bench.per_call_us(calls, reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=bench.positive_int, default=None)
    args = parser.parse_args()
    print(f"{bench.versions_line(torch)}")
    lines = [("B×H×L×D", "dtype", "causal", "pass", "fusedattn ms", "GFLOP/s", "SDPA ms", "GFLOP/s", "speed-up")]
    for shape in SHAPES:
        for dtype_name, dtype in DTYPES.items():
            for causal in (False, True):
                backward, both = backward_calls(shape, dtype, causal)
                forward_flops = bench.forward_flops(*shape[:3], shape[2], shape[3], causal)
                for label, calls, factor in (("bwd", backward, 2.5), ("fwd+bwd", both, 3.5)):
                    times, _, errors = bench.time_interleaved(calls, reps=args.reps)
                    if errors:
                        raise SystemExit(f"{label} {shape} {dtype_name}: {errors}")
                    ours, theirs = (statistics.median(times[n]) for n in ("fusedattn", "torch-sdpa"))
                    flops = factor * forward_flops
                    lines.append(("×".join(map(str, shape)), dtype_name, str(causal), label, f"{ours * 1e3:.2f}",
                                  f"{flops / ours / 1e9:.0f}", f"{theirs * 1e3:.2f}", f"{flops / theirs / 1e9:.0f}",
                                  f"{theirs / ours:.2f}×"))
                print(f"  done {shape} {dtype_name} causal={causal}", flush=True)
    print(bench.aligned_table(lines[0], lines[1:]))
    print("\nper-call overhead at (1, 1, 1, 8), eager, median µs:")
    for name, value in overhead_us().items():
        print(f"  {name:24s} {value:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
