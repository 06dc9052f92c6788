"""Decode benchmark: one new token against a 4096-token KV cache, in GB/s of K/V read.

B = 8, Hq = 32, L = 4096, D = 128, with Hkv = 32 (MHA) and 8 (GQA), fp32 and bf16 (the
inference issue's shapes). fusedattn reads the cache through attention_with_kvcache (the
(B, L, Hkv, D) layout of a real cache), torch SDPA gets contiguous (B, Hkv, L, D) tensors
(its best case; enable_gqa for GQA). Also the paged cache (pages of 16 rows unless
--page-size says otherwise, shuffled) against the contiguous one. The machine's read bandwidth is measured in the same run, twice: a
torch.sum over a 2 GiB fp32 tensor at the start, and, for "% BW", a torch.sum over as many
bytes as the case's K/V, interleaved with the case's own timings (this machine's bandwidth
drifts between about 45 and 80 GB/s over minutes, so only a measurement taken alongside is a
fair yardstick). All timings interleaved, medians (DESIGN.md). Every contender (and the sum)
reads fresh copies of the same cache, made anew in each of --allocations rounds: on this VM one
allocation of the same bytes read 18 GB/s and another 27 (decode_placement.py), so a single
allocation per contender decided ratios by luck (fusedattn once read the torch.randn output
itself, the slowest of them).

    python benchmarks/bench_decode.py [--reps N] [--allocations 3] [--batch B --seqlen L] [--queries N]
        [--heads 32] [--heads-kv 32,8] [--dtypes float32,bfloat16] [--page-size 16] [--head-major]

--batch / --seqlen change B and L (one sequence, B = 1, is the case where the key axis is split
across the threads; B = 1 with L = 32768 reads as many bytes as the default). --queries N
attends N new tokens per sequence (speculative decoding, small chunks of prefill), causal from
the bottom right; SDPA then gets the same causal mask as a bool attn_mask. --heads sets the
query heads (e.g. 28 with --heads-kv 4 and 40 with --heads-kv 8: Qwen2.5's GQA groups of 7 and
5), --heads-kv the kv head counts, each dividing --heads. --dtypes picks the
cache dtypes (float16 too), --page-size the rows per page of the paged cache (1 for a
token-granular cache), --head-major gives fusedattn SDPA's (B, Hkv, L, D) tensors as (B, L, Hkv, D)
views, the layout Hugging Face's caches reach the integration in. Last, the per-call overhead of a decode call on a tiny cache, next to
fusedattn.attention's and SDPA's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fusedattn
from fusedattn import bench

HEADS, HEAD_DIM = 32, 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_bandwidth(reps=7) -> float:
    """GB/s of a torch.sum over 2 GiB of fp32 (read-only traffic)."""
    data = torch.ones(512 * 1024 * 1024)
    data.sum()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        data.sum()
        samples.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(samples) / 1e9


def paged_copy(k_cache, v_cache, page, table):
    """The (batch, L, Hkv, D) caches cut into pages of `page` rows, page i of sequence b stored at
    table[b, i]: (k_pages, v_pages). ab_decode.py builds its paged cases with it too."""
    batch, _, num_heads_kv, head_dim = k_cache.shape
    pages = [torch.empty(table.numel(), page, num_heads_kv, head_dim, dtype=k_cache.dtype) for _ in range(2)]
    for paged, contiguous in zip(pages, (k_cache, v_cache)):
        paged[table.long()] = contiguous.reshape(batch, -1, page, num_heads_kv, head_dim)
    return pages[0], pages[1]


def decode_case(batch, seqlen, queries, num_heads_kv, dtype, page, reps, allocations, head_major=False,
                heads=HEADS):
    """Medians of each contender's timings over `allocations` rounds, each with fresh copies of
    every contender's tensors (made in a rotating order) and reps / allocations interleaved calls:
    the speed of a memory-bound call depends on where its buffers lie (decode_placement.py), so
    no contender keeps one lucky or unlucky allocation."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, queries, heads, HEAD_DIM, generator=gen).to(dtype)
    k_source = torch.randn(batch, seqlen, num_heads_kv, HEAD_DIM, generator=gen).to(dtype)
    v_source = torch.randn(batch, seqlen, num_heads_kv, HEAD_DIM, generator=gen).to(dtype)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32)
    pages = torch.randperm(batch * seqlen // page, generator=gen).to(torch.int32).reshape(batch, -1)
    q_sdpa = q.transpose(1, 2).contiguous()
    gqa = num_heads_kv != heads
    # query i (of the last `queries` tokens) sees keys up to seqlen - queries + i: bottom-right causal
    causal_mask = None
    if queries > 1:
        causal_mask = torch.arange(seqlen)[None, :] <= torch.arange(seqlen - queries, seqlen)[:, None]
    bytes_read = 2 * k_source.numel() * k_source.element_size()
    makers = {
        "contiguous": lambda: (k_source.clone(), v_source.clone()),
        "paged": lambda: paged_copy(k_source, v_source, page, pages),
        "sdpa": lambda: tuple(x.transpose(1, 2).contiguous() for x in (k_source, v_source)),
        "sum": lambda: torch.ones(bytes_read // 4),  # fp32, as many bytes as the caches
    }
    times = {}
    per_round = max(1, -(-reps // allocations))
    for round_index in range(allocations):
        names = list(makers)
        names = names[round_index % len(names):] + names[:round_index % len(names)]
        made = {name: makers[name]() for name in names}
        k_cache, v_cache = made["contiguous"]
        k_paged, v_paged = made["paged"]
        k_sdpa, v_sdpa = made["sdpa"]
        if head_major:  # fusedattn reads SDPA's (B, Hkv, L, D) tensors as (B, L, Hkv, D) views
            k_cache, v_cache = k_sdpa.transpose(1, 2), v_sdpa.transpose(1, 2)
        same_bytes = made["sum"]
        calls = {
            "read-bw": lambda: same_bytes.sum(),
            "fusedattn": lambda: fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens),
            "fusedattn-paged": lambda: fusedattn.attention_with_kvcache(q, k_paged, v_paged, cache_seqlens=seqlens,
                                                                          block_table=pages),
            "torch-sdpa": lambda: F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, attn_mask=causal_mask,
                                                                 enable_gqa=gqa),
        }
        with torch.no_grad():
            round_times, results, errors = bench.time_interleaved(calls, reps=per_round)
        if errors:
            raise SystemExit(str(errors))
        for name, t in round_times.items():
            times.setdefault(name, []).extend(t)
        del made, k_cache, v_cache, k_paged, v_paged, k_sdpa, v_sdpa, same_bytes, calls
    error = (results["fusedattn"].float() - results["torch-sdpa"].transpose(1, 2).float()).abs().max().item()
    return {name: statistics.median(t) for name, t in times.items()}, bytes_read, error


def overhead_us(reps=3000) -> dict[str, float]:
    """Median µs per call of one token over a 16-token cache at B = 1, one head, D = 8: what a
    decode step pays per attention layer beyond reading the cache (a generate loop appends the
    token's k, v in the same call)."""
    q, k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 16, 1, 8), torch.randn(1, 16, 1, 8)
    seqlens = torch.tensor([16], dtype=torch.int32)
    k_new, v_new, before = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), torch.tensor([15], dtype=torch.int32)
    q_sdpa, k_sdpa, v_sdpa = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    calls = {
        "fusedattn.attention_with_kvcache": lambda: fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=seqlens),
        "  ... cache_seqlens as an int": lambda: fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=16),
        "  ... appending the token's k, v": lambda: fusedattn.attention_with_kvcache(q, k, v, k_new, v_new,
                                                                                    cache_seqlens=before),
        "fusedattn.attention": lambda: fusedattn.attention(q, k, v, layout="bshd"),
        "torch SDPA": lambda: F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa),
    }
    with torch.no_grad():
        return bench.per_call_us(calls, reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=bench.positive_int, default=15, help="timed calls per contender (default 15)")
    parser.add_argument("--allocations", type=bench.positive_int, default=3,
                        help="rounds of fresh copies of every contender's tensors, the reps spread over them "
                             "(default 3; see decode_placement.py)")
    parser.add_argument("--batch", type=bench.positive_int, default=8, help="sequences (default 8)")
    parser.add_argument("--heads", type=bench.positive_int, default=HEADS, help=f"query heads (default {HEADS})")
    parser.add_argument("--heads-kv", default="32,8", help="kv head counts to run, dividing --heads (default 32,8)")
    parser.add_argument("--queries", type=bench.positive_int, default=1,
                        help="new tokens per sequence, attending causally from the bottom right (default 1)")
    parser.add_argument("--seqlen", type=bench.positive_int, default=4096,
                        help="cached tokens per sequence, a multiple of --page-size (default 4096)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help=f"cache dtypes to run, of {','.join(DTYPES)} (default float32,bfloat16)")
    parser.add_argument("--page-size", type=bench.positive_int, default=16,
                        help="rows per page of the paged cache (default 16)")
    parser.add_argument("--head-major", action="store_true",
                        help="the contiguous cache is SDPA's (B, Hkv, L, D) tensors seen as (B, L, Hkv, D), "
                             "as Hugging Face's caches reach the integration")
    args = parser.parse_args()
    heads_kv = [int(h) for h in args.heads_kv.split(",")]
    if any(h < 1 or args.heads % h for h in heads_kv):
        parser.error(f"--heads-kv entries must divide --heads ({args.heads})")
    if args.queries > args.seqlen:
        parser.error("--queries must not exceed --seqlen")
    if args.seqlen % args.page_size:
        parser.error(f"--seqlen must be a multiple of --page-size ({args.page_size})")
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)} (choose from {', '.join(DTYPES)})")
    print(bench.versions_line(torch))
    bandwidth = read_bandwidth()
    print(f"measured read bandwidth (torch.sum over 2 GiB fp32): {bandwidth:.1f} GB/s")
    layout = ", cache (B, Hkv, L, D) seen as (B, L, Hkv, D)" if args.head_major else ""
    print(f"B = {args.batch}, Hq = {args.heads}, L = {args.seqlen}, D = {HEAD_DIM}, {args.queries} query token(s){layout}\n")
    header = ("Hkv", "dtype", "fusedattn ms", "GB/s", "sum GB/s", "% BW", f"paged{args.page_size} ms", "paged/contig",
              "SDPA ms", "GB/s",
              "speed-up", "max |diff|")
    rows = [header]
    for num_heads_kv in heads_kv:
        for dtype in (DTYPES[d] for d in args.dtypes.split(",")):
            t, bytes_read, error = decode_case(args.batch, args.seqlen, args.queries, num_heads_kv, dtype,
                                               args.page_size, args.reps, args.allocations, args.head_major,
                                               args.heads)
            ours, paged, sdpa, summed = t["fusedattn"], t["fusedattn-paged"], t["torch-sdpa"], t["read-bw"]
            rows.append((str(num_heads_kv), str(dtype).removeprefix("torch."), f"{ours * 1e3:.2f}",
                         f"{bytes_read / ours / 1e9:.1f}", f"{bytes_read / summed / 1e9:.1f}", f"{summed / ours:.0%}",
                         f"{paged * 1e3:.2f}", f"{paged / ours:.2f}", f"{sdpa * 1e3:.2f}",
                         f"{bytes_read / sdpa / 1e9:.1f}", f"{sdpa / ours:.2f}×", f"{error:.1e}"))
            print(f"  done Hkv={num_heads_kv} {dtype}", flush=True)
    print(bench.aligned_table(rows[0], rows[1:]))
    print("\nper-call overhead (B = 1, Hq = Hkv = 1, L = 16, D = 8, one token), median µs:")
    for name, value in overhead_us().items():
        print(f"  {name:34s}{value:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
