"""The avx512amx ISA (CPUs with AMX-BF16, e.g. Intel Xeon 4th generation and later): bf16 forward
and backward products on AMX tiles (csrc/cpu/amx_gemm.h). Against the fp64 reference over
head_dims that are whole tiles and head_dims (multiples of 16) padded to them, key and query counts with
tails that are not, strided rows, GQA
and causal/window blocks; against the avx512bf16 ISA (same function, VDPBF16PS products) for the
score variants, dropout, a paged KV cache and threads. Skipped where the CPU or the OS does not
give AMX.
"""

import threading

import pytest
import torch

import fusedattn
from conftest import ISAS, check_attention, force_isa, make_qkv
from test_backward import check_backward
from test_inference import _check_decode

pytestmark = pytest.mark.skipif("avx512amx" not in ISAS, reason="no AMX-BF16 on this CPU (or not allowed by the OS)")

CASES = [  # head_dim, (Lq, Lk), causal, window, (Hq, Hkv), layout, strides
    (32, (33, 1000), True, (-1, -1), (4, 2), "bhsd", "contiguous"),
    (64, (129, 129), False, (-1, -1), (8, 2), "bshd", "slice"),
    (96, (200, 77), True, (40, -1), (2, 2), "bhsd", "permuted"),
    (128, (1, 16), False, (-1, -1), (8, 1), "bshd", "contiguous"),
    (128, (17, 31), False, (-1, 5), (4, 4), "bhsd", "slice"),
    (160, (300, 300), True, (-1, -1), (2, 1), "bshd", "contiguous"),
    (256, (64, 130), False, (-1, -1), (2, 2), "bhsd", "contiguous"),
    (80, (65, 65), True, (-1, -1), (2, 2), "bhsd", "contiguous"),  # pairs padded to whole tiles
    (48, (130, 200), False, (20, 20), (4, 2), "bshd", "slice"),
    (16, (33, 70), True, (-1, -1), (2, 1), "bhsd", "permuted"),
    (40, (65, 65), True, (-1, -1), (2, 2), "bhsd", "contiguous"),  # not a multiple of 16: the avx512 kernels
    (40, (17, 90), True, (-1, -1), (4, 2), "bshd", "slice"),  # ... under 32 query rows: VDPBF16PS
]


@pytest.mark.parametrize("head_dim,seqlens,causal,window,heads,layout,strides", CASES)
def test_amx_forward_matches_reference(head_dim, seqlens, causal, window, heads, layout, strides):
    q, k, v = make_qkv(2, heads[0], heads[1], seqlens[0], seqlens[1], head_dim, torch.bfloat16, layout, strides,
                       k_scale=2.0)
    with force_isa("avx512amx"):
        result = fusedattn.attention(q, k, v, causal=causal, window=window, layout=layout, return_lse=True)
    check_attention(result, q, k, v, causal=causal, window=window, layout=layout, return_lse=True)


def _forward_and_grads(q, k, v):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out, lse, q.grad, k.grad, v.grad


@pytest.mark.parametrize("head_dim", [40, 100])
def test_odd_head_dims_run_the_avx512_kernels(head_dim):
    """bf16 prefill and its backward at a head_dim that is not a multiple of 16 run, under the
    avx512amx ISA (so on an Intel CPU), the avx512 ISA's widened products rather than VDPBF16PS
    pairs, which ran 0.68-0.74x as fast there (isa.cpp, kernels_for_call): output, LSE and
    gradients bitwise those of the forced avx512 ISA. At head_dim 64 (AMX tiles) the LSE is not."""
    q, k, v = make_qkv(1, 4, 2, 64, 96, head_dim, torch.bfloat16)
    with force_isa("avx512amx"):
        amx = _forward_and_grads(q, k, v)
    with force_isa("avx512"):
        widened = _forward_and_grads(q, k, v)
    for a, b in zip(amx, widened):
        assert torch.equal(a, b)
    q, k, v = make_qkv(1, 4, 2, 64, 96, 64, torch.bfloat16)
    with force_isa("avx512amx"):
        tiles = fusedattn.attention(q, k, v, causal=True, return_lse=True)[1]
    with force_isa("avx512"):
        assert not torch.equal(tiles, fusedattn.attention(q, k, v, causal=True, return_lse=True)[1])


def _both_isas(call):
    with force_isa("avx512amx"):
        amx = call()
    with force_isa("avx512bf16"):
        pairs = call()
    return amx, pairs


def _assert_same_function(amx, pairs):
    """Same function, products summed in another order: bf16 output rounding apart at most."""
    torch.testing.assert_close(amx.double(), pairs.double(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("variant", ["mask", "alibi", "softcap", "sinks", "q_offset"])
def test_amx_score_variants_match_vdpbf16ps(variant):
    torch.manual_seed(0)
    q, k, v = make_qkv(2, 8, 2, 70, 150, 64, torch.bfloat16)
    kwargs = {
        "mask": {"attn_mask": torch.randn(2, 1, 70, 150)},
        "alibi": {"alibi_slopes": torch.rand(8), "causal": True},
        "softcap": {"softcap": 5.0},
        "sinks": {"sinks": torch.randn(8)},
        "q_offset": {"q_offset": 80, "causal": True},
    }[variant]
    amx, pairs = _both_isas(lambda: fusedattn.attention(q, k, v, **kwargs))
    _assert_same_function(amx, pairs)


@pytest.mark.parametrize("page_size", [5, 16])
def test_amx_chunked_prefill_over_paged_cache(page_size):
    """Several new tokens over a paged cache run the forward's tiles on gathered key rows."""
    torch.manual_seed(1)
    batch, cached, new, heads, heads_kv, head_dim = 2, 90, 40, 8, 2, 128
    pages_per_seq = (cached + new + page_size - 1) // page_size
    k_cache = torch.randn(batch * pages_per_seq, page_size, heads_kv, head_dim).bfloat16()
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(batch * pages_per_seq).to(torch.int32).reshape(batch, pages_per_seq)
    q = torch.randn(batch, new, heads, head_dim).bfloat16()
    seqlens = torch.full((batch,), cached + new, dtype=torch.int32)
    amx, pairs = _both_isas(lambda: fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                                      block_table=table))
    _assert_same_function(amx, pairs)


# (heads, head_dim) of MHA whose cache rows hold 4 KiB or more of kv heads side by side (8 KiB
# here, so blocks of half the heads still do): the decode kernel's scores of 16 evenly spaced
# rows come from AMX tiles (amx_dot_rows). 160 is an odd count of 32-element tiles, 64 and
# 256 the smallest and largest head_dims.
AMX_DECODE_SHAPES = [(32, 128), (64, 64), (16, 256), (32, 160)]


@pytest.mark.parametrize("lengths", [[15, 16, 33, 70, 100], [240, 240, 240, 240, 233]], ids=["table-order", "pool-walk"])
@pytest.mark.parametrize("page_size", [None, 1, 8, 16, 24, 48],
                         ids=lambda p: "contiguous" if p is None else f"pages-of-{p}")
@pytest.mark.parametrize("heads,head_dim", AMX_DECODE_SHAPES, ids=lambda x: str(x))
def test_amx_decode_scores_match_reference(heads, head_dim, page_size, lengths):
    """Lengths short of a 16-row group, one group, and groups with tails; pages on which 16 rows
    lie evenly apart (16, 48 rows; 24 only for its first group) and pages on which they do not (1,
    8: the rows scored one by one). The shorter lengths read the pages in table order (their key
    blocks cross pages); the longer ones fill the pool with 4 MiB or more of K/V, which a pool
    walk reads in pool order, a visit per run of pages. Two threads and five sequences, so each
    block holds a sequence's heads. Against the fp64 reference and torch's bf16 math."""
    fusedattn.set_num_threads(2)
    with force_isa("avx512amx"):
        _check_decode(heads, heads, 1, lengths, 240, page_size, torch.bfloat16, seed=heads * 1000 + head_dim,
                      head_dim=head_dim)


@pytest.mark.parametrize("lengths", [[15, 16, 33, 70, 100], [240, 240, 240, 240, 233]], ids=["table-order", "pool-walk"])
@pytest.mark.parametrize("page_size", [None, 16, 24], ids=lambda p: "contiguous" if p is None else f"pages-of-{p}")
@pytest.mark.parametrize("queries", [2, 3, 4])
@pytest.mark.parametrize("heads,head_dim", [(32, 128), (16, 256)], ids=lambda x: str(x))
def test_amx_decode_scores_of_several_tokens(heads, head_dim, queries, page_size, lengths):
    """2-4 tokens of MHA (2-4 lanes per kv head: Qᵀ packed once per block, kept between the visits
    of a pool walk, the tile's 16 x lanes scores spread into lane rows; 4 lanes take the split
    path, whose q rows carry the scale), causal from the bottom right. Against the fp64 reference
    and torch's bf16 math."""
    fusedattn.set_num_threads(2)
    with force_isa("avx512amx"):
        _check_decode(heads, heads, queries, lengths, 240, page_size, torch.bfloat16,
                      seed=heads * 1000 + head_dim * 10 + queries, head_dim=head_dim)


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "pages-of-16"])
@pytest.mark.parametrize("variant", ["softcap", "alibi", "window", "sinks", "lse", "split"])
def test_amx_decode_score_variants_match_vdpbf16ps(variant, page_size):
    """The score variants after the tiles' scores, and a long sequence split along its keys over
    two threads (lengths off the 16-row groups), against the avx512bf16 ISA's row-by-row products."""
    torch.manual_seed(2)
    heads, head_dim, page = 32, 128, page_size or 1
    lengths = [3000] if variant == "split" else [300, 251, 17, 64]
    capacity = (max(lengths) + 15) // 16 * 16
    k_cache, v_cache = (torch.randn(len(lengths) * capacity // page, page, heads, head_dim).bfloat16()
                        for _ in range(2))
    table = None
    if page_size is not None:
        table = torch.randperm(k_cache.shape[0]).to(torch.int32).reshape(len(lengths), -1)
    else:
        k_cache, v_cache = (c.reshape(len(lengths), capacity, heads, head_dim) for c in (k_cache, v_cache))
    q = torch.randn(len(lengths), 1, heads, head_dim).bfloat16()
    kwargs = {
        "softcap": {"softcap": 3.0},
        "alibi": {"alibi_slopes": torch.rand(heads)},
        "window": {"window": (100, 0)},
        "sinks": {"sinks": torch.randn(heads)},
        "lse": {"return_lse": True},
        "split": {},
    }[variant]
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    fusedattn.set_num_threads(2)
    amx, pairs = _both_isas(lambda: fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                                      block_table=table, **kwargs))
    if variant == "lse":
        torch.testing.assert_close(amx[1], pairs[1], atol=1e-3, rtol=1e-3)
        amx, pairs = amx[0], pairs[0]
    _assert_same_function(amx, pairs)


def _results_from_several_threads(calls, rounds=3):
    """Runs each call `rounds` times in a thread of its own, all threads at once; the last results."""
    results = [None] * len(calls)

    def run(i):
        for _ in range(rounds):
            results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_amx_from_several_threads():
    """Each thread loads its own tile configuration: concurrent calls give the single-thread answers."""
    inputs = [make_qkv(1, 4, 2, 100, 300, 128, torch.bfloat16) for _ in range(4)]
    calls = [lambda qkv=qkv: fusedattn.attention(*qkv, causal=True) for qkv in inputs]
    with force_isa("avx512amx"):
        expected = [call() for call in calls]
        results = _results_from_several_threads(calls)
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_amx_decode_from_several_threads():
    """Decode blocks on tiles from several Python threads at once (each thread its own tile
    configuration and packed Qᵀ): 1 and 3 tokens of MHA bf16, contiguous and paged, give the
    answers of calls made one at a time."""
    torch.manual_seed(3)
    heads, head_dim, batch, capacity, length = 32, 128, 2, 208, 200
    k_cache, v_cache = (torch.randn(batch, capacity, heads, head_dim).bfloat16() for _ in range(2))
    table = torch.randperm(batch * capacity // 16).to(torch.int32).reshape(batch, -1)
    k_pages, v_pages = (c.reshape(-1, 16, heads, head_dim)[torch.argsort(table.flatten().long())]
                        for c in (k_cache, v_cache))
    calls = []
    for queries in (1, 3):
        q = torch.randn(batch, queries, heads, head_dim).bfloat16()
        calls.append(lambda q=q: fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=length))
        calls.append(lambda q=q: fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=length,
                                                                  block_table=table))
    with force_isa("avx512amx"):
        expected = [call() for call in calls]
        results = _results_from_several_threads(calls)
    for got, want in zip(results, expected):
        assert torch.equal(got, want)
    paged, contiguous = expected[1], expected[0]
    _assert_same_function(paged, contiguous)


BACKWARD_CASES = [  # head_dim, (Lq, Lk), causal, (Hq, Hkv), layout, strides
    (32, (100, 70), True, (4, 2), "bhsd", "contiguous"),
    (64, (129, 129), False, (2, 2), "bshd", "slice"),
    (96, (17, 200), False, (4, 1), "bhsd", "permuted"),
    (128, (65, 63), True, (2, 2), "bhsd", "contiguous"),
    (256, (40, 33), False, (2, 1), "bshd", "contiguous"),
    (80, (70, 90), True, (4, 2), "bhsd", "slice"),  # pairs padded to whole tiles
    (48, (33, 17), False, (2, 2), "bshd", "permuted"),
]


@pytest.mark.parametrize("head_dim,seqlens,causal,heads,layout,strides", BACKWARD_CASES)
def test_amx_backward_matches_reference(head_dim, seqlens, causal, heads, layout, strides):
    with force_isa("avx512amx"):
        check_backward(torch.bfloat16, head_dim, seqlens, causal, heads, layout, strides)


@pytest.mark.parametrize("variant", ["dropout", "mask", "softcap", "alibi"])
def test_amx_backward_variants_match_vdpbf16ps(variant):
    torch.manual_seed(2)
    q, k, v = make_qkv(1, 4, 2, 90, 110, 64, torch.bfloat16)
    dout = torch.randn_like(q)
    kwargs = {
        "dropout": {"dropout_p": 0.3, "seed": 7},
        "mask": {"attn_mask": torch.randn(1, 1, 90, 110)},
        "softcap": {"softcap": 4.0},
        "alibi": {"alibi_slopes": torch.rand(4), "causal": True},
    }[variant]

    def grads():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = fusedattn.attention(*leaves, **kwargs)
        return torch.autograd.grad(out, leaves, dout)

    amx, pairs = _both_isas(grads)
    for a, b in zip(amx, pairs):
        torch.testing.assert_close(a.double(), b.double(), atol=3e-2 * b.abs().max().item(), rtol=3e-2)
