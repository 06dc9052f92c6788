"""Variant benchmark: what masks cost, and fusedattn with a bool mask against torch SDPA.

  1. causal vs non-causal at (1, 8, 4096, 64) fp32 (tile skipping: causal should cost ~half);
  2. a sliding window of 256 keys (window=(255, 0), causal) vs full attention at (1, 8, 8192, 64);
  3. a (B, 1, Lq, Lk) bool padding mask vs no mask at (1, 8, 2048, 64) fp32: all-True (pure
     overhead of reading the mask) and 25% padded keys (tiles skipped);
  4. fusedattn vs torch SDPA with the same bool mask at (1, 8, 2048, 64) fp32: the padding mask
     and a dense random mask (90% True).
Each comparison is timed interleaved in one run (medians), as DESIGN.md asks.

    python benchmarks/bench_variants.py [--reps N]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import fusedattn
from fusedattn import bench


def medians(calls, reps):
    times, _, errors = bench.time_interleaved(calls, reps=reps)
    if errors:
        raise SystemExit(str(errors))
    return {name: statistics.median(t) for name, t in times.items()}


def padding_mask(batch, seqlen_q, seqlen_k, padded_fraction):
    mask = torch.ones(batch, 1, seqlen_q, seqlen_k, dtype=torch.bool)
    mask[..., int(seqlen_k * (1 - padded_fraction)):] = False
    return mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=bench.positive_int, default=None)
    args = parser.parse_args()
    print(bench.versions_line(torch))

    q, k, v = bench.make_inputs(torch, (1, 8, 4096, 64), torch.float32)
    t = medians({"full": lambda: fusedattn.attention(q, k, v),
                 "causal": lambda: fusedattn.attention(q, k, v, causal=True)}, args.reps)
    print(f"1. (1,8,4096,64) fp32: full {t['full'] * 1e3:.1f} ms, causal {t['causal'] * 1e3:.1f} ms, "
          f"causal/full = {t['causal'] / t['full']:.2f} (bar <= 0.6)")

    q, k, v = bench.make_inputs(torch, (1, 8, 8192, 64), torch.float32)
    t = medians({"full": lambda: fusedattn.attention(q, k, v),
                 "window": lambda: fusedattn.attention(q, k, v, causal=True, window=(255, 0))}, args.reps or 5)
    print(f"2. (1,8,8192,64) fp32: full {t['full'] * 1e3:.1f} ms, window 256 {t['window'] * 1e3:.1f} ms, "
          f"window/full = {t['window'] / t['full']:.3f} (bar <= 0.15)")

    q, k, v = bench.make_inputs(torch, (1, 8, 2048, 64), torch.float32)
    all_true, padded = padding_mask(1, 2048, 2048, 0.0), padding_mask(1, 2048, 2048, 0.25)
    t = medians({"none": lambda: fusedattn.attention(q, k, v),
                 "all-true": lambda: fusedattn.attention(q, k, v, attn_mask=all_true),
                 "padded": lambda: fusedattn.attention(q, k, v, attn_mask=padded)}, args.reps)
    print(f"3. (1,8,2048,64) fp32, (B,1,Lq,Lk) bool mask: none {t['none'] * 1e3:.1f} ms, all-True "
          f"{t['all-true'] * 1e3:.1f} ms ({t['all-true'] / t['none'] - 1:+.1%} overhead), 25% padded "
          f"{t['padded'] * 1e3:.1f} ms ({t['padded'] / t['none']:.2f}x of no mask)")

    random_mask = torch.rand(1, 1, 2048, 2048, generator=torch.Generator().manual_seed(0)) < 0.9
    for label, mask in (("25% padded keys", padded), ("random 90% True", random_mask)):
        t = medians({"fusedattn": lambda: fusedattn.attention(q, k, v, attn_mask=mask, q_offset=0),
                     "torch-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}, args.reps)
        print(f"4. (1,8,2048,64) fp32, bool mask ({label}): fusedattn {t['fusedattn'] * 1e3:.1f} ms, SDPA "
              f"{t['torch-sdpa'] * 1e3:.1f} ms, speed-up {t['torch-sdpa'] / t['fusedattn']:.2f}x (bar >= 1.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
