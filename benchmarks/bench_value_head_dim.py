"""A value head_dim unlike the query's (DeepSeek-V2/V3's MLA: q and k 192, v 128): fusedattn, which
zero-pads v to 192 (functional._pad_head_dims), against torch SDPA, which takes the shapes as they
are, and against fusedattn at one head_dim (v of 192 too: what the padding costs beyond the copy).

Causal prefill, B = 1, 16 heads, L = 1024 by default, forward and forward + backward, fp32 and
bf16; timings interleaved (A B C A B C ...), medians, ms, and each against SDPA.

    python benchmarks/bench_value_head_dim.py [--seqlen 1024] [--heads 16] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import fusedattn
from fusedattn import bench

DIM_QK, DIM_V = 192, 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if min(args.seqlen, args.heads, args.reps) < 1:
        parser.error("--seqlen, --heads and --reps must be >= 1")
    print(f"fusedattn {fusedattn.__version__} ({fusedattn.info()['cpu_isa']}, {fusedattn.get_num_threads()} "
          f"threads) vs torch {torch.__version__}; B 1, H {args.heads}, L {args.seqlen}, causal, "
          f"q/k head_dim {DIM_QK}, v {DIM_V}; median ms of {args.reps} interleaved runs\n")
    print("| dtype | pass | SDPA | fusedattn | × SDPA | fusedattn, v of 192 |")
    print("|---|---|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = (torch.randn(1, args.heads, args.seqlen, DIM_QK, generator=generator).to(dtype) for _ in range(2))
        v = torch.randn(1, args.heads, args.seqlen, DIM_V, generator=generator).to(dtype)
        v_wide = F.pad(v, (0, DIM_QK - DIM_V))
        for backward in (False, True):
            def run(fn, v):
                def call():
                    inputs = [x.detach().requires_grad_(backward) for x in (q, k, v)]
                    out = fn(*inputs, is_causal=True)
                    if backward:
                        out.backward(torch.ones_like(out))
                    return out
                return call

            calls = {"sdpa": run(F.scaled_dot_product_attention, v),
                     "fusedattn": run(fusedattn.scaled_dot_product_attention, v),
                     "wide": run(fusedattn.scaled_dot_product_attention, v_wide)}
            times, results, _ = bench.time_interleaved(calls, reps=args.reps)
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            diff = (results["fusedattn"].float() - results["sdpa"].float()).abs().max().item()
            assert diff < (1e-4 if dtype == torch.float32 else 5e-2), f"fusedattn and SDPA differ by {diff}"
            print(f"| {str(dtype)[6:]} | {'forward + backward' if backward else 'forward'} | {ms['sdpa']:.1f} | "
                  f"{ms['fusedattn']:.1f} | {ms['sdpa'] / ms['fusedattn']:.2f}× | {ms['wide']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
