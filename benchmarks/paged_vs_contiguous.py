"""Where paged decode loses against contiguous decode: one process, fresh caches, three layouts.

The inference issue's GQA decode (B = 8, 32 query / 8 kv heads, L = 4096, D = 128; bf16 by default)
over three caches holding the same keys and values, each made anew in every round:

  contiguous   (B, L, Hkv, D), a clone
  in order     pages of --page-size rows in address order, read through an identity block table
               (no pool walk: the same bytes in the same order as contiguous, through the table)
  shuffled     the pages shuffled over the pool (the pool walk reads them in address order)

Interleaved (the default): the calls alternate A B C A B C..., so every call reads its cache
from DRAM after the others have streamed theirs. --steady: each layout's calls run back to back
on the same cache, as a loop over one layer's cache would (the last-level cache then keeps part
of it between calls). Prints the median ms per call of each and its ratio to contiguous.
--threads 1 shows what the walk costs a single thread, which memory does not hold back as much.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/paged_vs_contiguous.py [--steady] [--rounds 3] [--reps 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusedattn
from bench_decode import paged_copy  # (beside this script)

BATCH, HEADS, HEADS_KV, SEQLEN, HEAD_DIM = 8, 32, 8, 4096, 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", action="store_true", help="each layout's calls back to back (default: interleaved)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of fresh caches (default 3)")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per layout and round (default 7)")
    parser.add_argument("--page-size", type=int, default=16, help="rows per page (default 16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, help="fusedattn's threads (default: its own default)")
    args = parser.parse_args()
    if args.threads is not None:
        fusedattn.set_num_threads(args.threads)
    dtype, page = getattr(torch, args.dtype), args.page_size
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, 1, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k_source, v_source = (torch.randn(BATCH, SEQLEN, HEADS_KV, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    seqlens = torch.full((BATCH,), SEQLEN, dtype=torch.int32)
    pages = BATCH * SEQLEN // page
    shuffled = torch.randperm(pages, generator=gen).to(torch.int32).reshape(BATCH, -1)
    in_order = torch.arange(pages, dtype=torch.int32).reshape(BATCH, -1)

    times = {"contiguous": [], "in order": [], "shuffled": []}
    with torch.no_grad():
        for _ in range(args.rounds):
            caches = {"contiguous": (k_source.clone(), v_source.clone(), None),
                      "in order": (*paged_copy(k_source, v_source, page, in_order), in_order),
                      "shuffled": (*paged_copy(k_source, v_source, page, shuffled), shuffled)}

            def call(name):
                k, v, table = caches[name]
                start = time.perf_counter()
                fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table)
                times[name].append(time.perf_counter() - start)

            for name in caches:  # warm-up (not timed)
                fusedattn.attention_with_kvcache(q, caches[name][0], caches[name][1], cache_seqlens=seqlens,
                                                 block_table=caches[name][2])
            if args.steady:
                for name in caches:
                    for _ in range(args.reps):
                        call(name)
            else:
                for _ in range(args.reps):
                    for name in caches:
                        call(name)
            del caches
    base = statistics.median(times["contiguous"])
    print(f"fusedattn {fusedattn.__version__}, {fusedattn.get_num_threads()} threads, {args.dtype}, pages of {page}, "
          f"{'steady' if args.steady else 'interleaved'}, {args.rounds} rounds x {args.reps} calls")
    for name, samples in times.items():
        ms = statistics.median(samples) * 1e3
        print(f"  {name:12s} {ms:6.2f} ms  {ms / base / 1e3:5.3f}x contiguous")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
