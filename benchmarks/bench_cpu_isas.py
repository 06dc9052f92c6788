"""The CPU ISA paths side by side: forward and forward+backward of one shape under every ISA this
machine runs (FUSEDATTN_CPU_ISA's values), fp32 and bf16, timed interleaved in one run.

Shows what each path buys: avx512bf16 runs the bf16 products as bf16 pairs on VDPBF16PS, avx512
and avx2 convert bf16 to fp32 per tile, scalar is the portable fallback (slow: it is skipped
for shapes above --scalar-max-len). Speed-ups are against the avx512 path of the same dtype.

    python benchmarks/bench_cpu_isas.py [--shape B H L D] [--causal] [--threads N] [--reps N]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fusedattn
from fusedattn import _runtime, bench


def forced(isa, fn):
    """fn run with the ISA forced for the duration of the call."""
    def call():
        _runtime._set_cpu_isa(isa)
        try:
            return fn()
        finally:
            _runtime._set_cpu_isa(None)
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=bench.positive_int, nargs=4, default=(1, 8, 2048, 128),
                        metavar=("B", "H", "L", "D"))
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--threads", type=bench.positive_int, default=None)
    parser.add_argument("--reps", type=bench.positive_int, default=None)
    parser.add_argument("--scalar-max-len", type=bench.positive_int, default=512)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(bench.versions_line(torch))
    batch, heads, length, head_dim = args.shape
    isas = [isa for isa in fusedattn.info(verbose=False)["cpu_isas_available"]
            if isa != "scalar" or length <= args.scalar_max_len]
    flops = 4 * batch * heads * length * length * head_dim / (2 if args.causal else 1)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype).requires_grad_(True)
                   for _ in range(3))
        out = fusedattn.attention(q, k, v, causal=args.causal)
        dout = torch.randn_like(out)
        for name, factor, make in (
            ("fwd", 1.0, lambda isa: forced(isa, lambda: fusedattn.attention(q, k, v, causal=args.causal))),
            ("fwd+bwd", 3.5, lambda isa: forced(isa, lambda: torch.autograd.grad(
                fusedattn.attention(q, k, v, causal=args.causal), (q, k, v), dout))),
        ):
            with torch.no_grad() if name == "fwd" else torch.enable_grad():
                times, _, errors = bench.time_interleaved({isa: make(isa) for isa in isas}, reps=args.reps)
            if errors:
                raise SystemExit(str(errors))
            medians = {isa: statistics.median(t) for isa, t in times.items()}
            for isa in isas:
                seconds = medians[isa]
                rows.append((str(dtype).replace("torch.", ""), name, isa, f"{seconds * 1e3:.2f}",
                             f"{factor * flops / seconds / 1e9:.0f}",
                             f"{medians.get('avx512', seconds) / seconds:.2f}×"))
    print(f"\nshape {tuple(args.shape)}, causal={args.causal}; FLOPs: fwd 4·B·H·L²·D (halved when causal), "
          "fwd+bwd 3.5x that\n")
    print(bench.aligned_table(("dtype", "pass", "ISA", "ms", "GFLOP/s", "vs avx512"), rows, left_columns=3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
