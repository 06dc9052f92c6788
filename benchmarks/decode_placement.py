"""How much a decode timing depends on where its cache happens to lie in physical memory.

Decode reads the whole KV cache once per call, so its speed is the memory's. This script makes
--copies copies of one decode cache (B = 8, Hq = 32, L = 4096, D = 128, the inference issue's
shape; Hkv and dtype by flag), each a fresh allocation holding the same bytes, then times
fusedattn.attention_with_kvcache on each copy, and torch SDPA on as many copies of its
(B, Hkv, L, D) layout, and a torch.sum over each of fusedattn's copies (K and V), all
interleaved call by call (--reps rounds, medians). Identical work on
identical bytes: whatever differs between the copies of one contender is where the allocator
put them (this VM has no transparent huge pages for them, so every 4 KiB page lies on its own).
The first copy of fusedattn's cache is the torch.randn output itself, as bench_decode.py used
it before it timed over several allocations.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_placement.py [--heads-kv 32] [--dtype float32]
        [--copies 3] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import fusedattn
from fusedattn import bench

HEADS, HEAD_DIM, BATCH, SEQLEN = 32, 128, 8, 4096


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads-kv", type=bench.positive_int, default=32, help="kv heads (default 32)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--copies", type=bench.positive_int, default=3, help="allocations per contender (default 3)")
    parser.add_argument("--reps", type=bench.positive_int, default=15)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, 1, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k_cache = torch.randn(BATCH, SEQLEN, args.heads_kv, HEAD_DIM, generator=gen).to(dtype)
    v_cache = torch.randn(BATCH, SEQLEN, args.heads_kv, HEAD_DIM, generator=gen).to(dtype)
    seqlens = torch.full((BATCH,), SEQLEN, dtype=torch.int32)
    ours = [(k_cache, v_cache)] + [(k_cache.clone(), v_cache.clone()) for _ in range(args.copies - 1)]
    q_sdpa = q.transpose(1, 2).contiguous()
    theirs = [tuple(x.transpose(1, 2).contiguous() for x in (k_cache, v_cache)) for _ in range(args.copies)]
    gqa = args.heads_kv != HEADS
    calls = {}
    for i, (k, v) in enumerate(ours):
        calls[f"fusedattn copy {i}"] = lambda k=k, v=v: fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=seqlens)
    for i, (k, v) in enumerate(theirs):
        calls[f"torch SDPA copy {i}"] = lambda k=k, v=v: F.scaled_dot_product_attention(q_sdpa, k, v, enable_gqa=gqa)
    for i, (k, v) in enumerate(ours):
        calls[f"torch.sum of fusedattn's copy {i}"] = lambda k=k, v=v: (k.sum(), v.sum())
    with torch.no_grad():
        times, _, errors = bench.time_interleaved(calls, reps=args.reps)
    if errors:
        raise SystemExit(str(errors))
    bytes_read = 2 * k_cache.numel() * k_cache.element_size()
    print(bench.versions_line(torch))
    print(f"B = {BATCH}, Hq = {HEADS}, Hkv = {args.heads_kv}, L = {SEQLEN}, D = {HEAD_DIM}, {args.dtype}, "
          f"{args.reps} interleaved rounds, GB/s of K/V read (median)\n")
    rows = [(name, f"{bytes_read / statistics.median(t) / 1e9:.1f}") for name, t in times.items()]
    print(bench.aligned_table(("contender, allocation", "GB/s"), rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
