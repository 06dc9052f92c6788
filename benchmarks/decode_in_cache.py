"""Decode's arithmetic alone: a cache small enough to stay in L2/L3, contiguous against paged.

The inference issue's decode shape with a short cache (B = 8, Hq = 32, L = 256, D = 128 by
default: 8 MiB of bf16 GQA K/V, which the L3 holds), so that each call reads from cache and the
time is the kernel's own work, not DRAM's. Times the contiguous cache and the same cache in
shuffled pages of --page-size rows (walked in pool order where pool_walk.cpp takes them), blocks
of back-to-back calls interleaved, medians; prints GB/s of K/V read and paged / contiguous. With
--threads 1 it shows what a paged visit costs per row next to a contiguous key block.

    python benchmarks/decode_in_cache.py [--dtype bfloat16] [--heads-kv 8] [--seqlen 256]
        [--page-size 16] [--threads 1] [--reps 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusedattn
from bench_decode import paged_copy  # (beside this script)

BATCH, HEADS, HEAD_DIM = 8, 32, 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256, help="cached tokens per sequence (default 256)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    if HEADS % args.heads_kv or args.seqlen % args.page_size or min(args.threads, args.reps) < 1:
        parser.error(f"--heads-kv must divide {HEADS}, --page-size divide --seqlen, --threads/--reps be >= 1")
    fusedattn.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, 1, HEADS, HEAD_DIM, generator=generator).to(dtype)
    k, v = (torch.randn(BATCH, args.seqlen, args.heads_kv, HEAD_DIM, generator=generator).to(dtype) for _ in range(2))
    seqlens = torch.full((BATCH,), args.seqlen, dtype=torch.int32)
    table = torch.randperm(BATCH * args.seqlen // args.page_size, generator=generator).to(torch.int32)
    table = table.reshape(BATCH, -1)
    k_pages, v_pages = paged_copy(k, v, args.page_size, table)
    calls = {
        "contiguous": lambda: fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=seqlens),
        "paged": lambda: fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens,
                                                          block_table=table),
    }
    bytes_read = 2 * k.numel() * k.element_size()
    inner = max(20, int(1e9 / bytes_read))  # calls per sample: about 1 GB read
    samples = {name: [] for name in calls}
    for fn in calls.values():
        for _ in range(10):
            fn()
    for _ in range(args.reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"B {BATCH}, Hq {HEADS}, Hkv {args.heads_kv}, L {args.seqlen}, D {HEAD_DIM}, {args.dtype}, "
          f"{bytes_read / 2**20:.1f} MiB of K/V, {args.threads} thread(s), pages of {args.page_size} shuffled")
    for name, seconds in median.items():
        print(f"  {name:10s} {seconds * 1e6:8.1f} µs  {bytes_read / seconds / 1e9:6.1f} GB/s")
    print(f"  paged / contiguous {median['paged'] / median['contiguous']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
