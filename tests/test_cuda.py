"""The CUDA backend (fusedattn._cuda through fusedattn._cuda_backend) on a GPU.

Same oracle and tolerance rule as the CPU tests: the fp64 reference (fusedattn.reference) and
DESIGN.md's rule (fp16/bf16 may err at most 2x as much as PyTorch's own math in that dtype, plus
a rounding-sized slack; fp32 ~1e-5). PyTorch's own low-precision math is conftest.torch_attention
on CPU copies of the inputs; torch SDPA on the GPU is a second, independent comparison.
Every output is poisoned (NaN, inside a NaN buffer) before the run: every element must be
written and nothing around it. Skipped without a GPU (conftest.py).
"""

import itertools
import math
import random

import numpy as np
import pytest
import torch

import fusedattn
from conftest import (FP32_ATOL, FP32_RTOL, LSE_ATOL, LSE_RTOL, assert_close_to_reference, assert_lse_close,
                      torch_attention)
from fusedattn import _cuda_backend as backend
from fusedattn import inference
from fusedattn.reference import attention_reference, dropout_keep_mask

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HEAD_DIMS = [32, 40, 59, 64, 96, 111, 128, 160, 192, 256]
SEQLENS = [(1, 1), (17, 129), (129, 17), (130, 257)]
HEADS = [(2, 2), (4, 1), (8, 2)]  # MHA, MQA, GQA


# ---------------------------------------------------------------- helpers

def _variant(scale, *, causal=False, q_offset=0, window=(-1, -1), softcap=0.0, attn_mask=None, alibi_slopes=None,
             sinks=None, dropout_p=0.0, seed=0, offset=0):
    """The extension's variant tuple (validate.h); per-head arrays as float64 on the GPU."""
    def f64(x):
        return None if x is None else x.to(device=DEVICE, dtype=torch.float64).contiguous()
    return (scale, causal, q_offset, *window, softcap, attn_mask, f64(alibi_slopes), f64(sinks), dropout_p, seed,
            offset)


def _strided(shape, dtype, kind):
    """A random 4-D GPU tensor: contiguous, a slice of a bigger one (every stride padded), or permuted-dense."""
    if kind == "contiguous":
        return torch.randn(shape, dtype=dtype, device=DEVICE)
    if kind == "slice":
        b, s1, s2, d = shape
        return torch.randn(b + 1, s1 + 2, s2 + 3, d + 8, dtype=dtype, device=DEVICE)[1:, 2:, 1:1 + s2, 8:8 + d]
    return torch.randn(shape, dtype=dtype, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)


def _nan_view(shape, dtype, layout="bhsd"):
    """An output view inside a NaN-filled buffer (padded on every dim), in `layout`."""
    b, h, s, d = shape
    dims = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    big = torch.full(tuple(n + 2 for n in dims), float("nan"), dtype=dtype, device=DEVICE)
    return big, big[1:1 + dims[0], 1:1 + dims[1], 1:1 + dims[2], 1:1 + dims[3]]


def _assert_only_view_written(big, view):
    """Every element of view is a number; everything else in big is still NaN."""
    assert not torch.isnan(view).any(), "an output element was not written"
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[1:1 + view.shape[0], 1:1 + view.shape[1], 1:1 + view.shape[2], 1:1 + view.shape[3]] = False
    assert torch.isnan(big[outside]).all(), "an element outside the output was written"


def _cpu(x):
    return None if x is None else x.detach().cpu()


def _bhsd(x, layout):
    return x.transpose(1, 2) if layout == "bshd" else x


def _run_forward(q, k, v, *, layout="bhsd", scale=None, causal=False, q_offset=None, window=(-1, -1), softcap=0.0,
                 attn_mask=None, alibi_slopes=None, sinks=None, dropout_p=0.0, seed=0):
    """Calls the CUDA forward on q, k, v (in `layout`); returns (out, lse) after checking the poison."""
    qb, kb, vb = (_bhsd(x, layout) for x in (q, k, v))
    batch, heads, seqlen_q, head_dim = qb.shape
    scale = head_dim**-0.5 if scale is None else scale
    q_offset = kb.shape[2] - seqlen_q if q_offset is None else q_offset
    big, out = _nan_view(qb.shape, q.dtype, layout)
    lse = torch.full((batch, heads, seqlen_q), float("nan"), device=DEVICE)
    variant = _variant(scale, causal=causal, q_offset=q_offset, window=window, softcap=softcap, attn_mask=attn_mask,
                       alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p, seed=seed)
    backend.forward(qb, kb, vb, _bhsd(out, layout), lse, variant)
    torch.cuda.synchronize()
    _assert_only_view_written(big, out)
    return out, lse


def _check(out, lse, q, k, v, *, layout="bhsd", factor=2.0, **kwargs):
    """DESIGN.md's rule against the fp64 reference, torch's own math as the low-precision yardstick."""
    dropout_p = kwargs.get("dropout_p", 0.0)
    ref_kwargs = {key: value for key, value in kwargs.items() if key != "seed"}
    dropout_mask = None
    if dropout_p > 0.0:
        qb, kb = _bhsd(q, layout), _bhsd(k, layout)
        dropout_mask = dropout_keep_mask(qb.shape[0], qb.shape[1], qb.shape[2], kb.shape[2], dropout_p, kwargs["seed"])
    ref, ref_lse = attention_reference(q, k, v, layout=layout, dropout_mask=dropout_mask, **ref_kwargs)
    lowp = None
    if q.dtype != torch.float32:
        cpu_kwargs = {key: (_cpu(value) if isinstance(value, torch.Tensor) else value) for key, value in ref_kwargs.items()}
        lowp, _ = torch_attention(_cpu(q), _cpu(k), _cpu(v), layout=layout, dropout_mask=dropout_mask, **cpu_kwargs)
    assert_close_to_reference(out.cpu(), lowp, ref, factor=factor)
    empty = np.isneginf(ref_lse)
    got = _bhsd(out, layout).float().cpu().numpy()
    sinks = kwargs.get("sinks")
    if sinks is None:
        assert np.all(got[empty] == 0.0), "rows that see no key must be exactly 0"
    assert_lse_close(lse.cpu(), ref_lse, q.dtype)
    return ref


# ---------------------------------------------------------------- forward grid

def _grid():
    draw = random.Random(20261130)
    cases = []
    for dtype, head_dim, (seqlen_q, seqlen_k), causal in itertools.product(DTYPES, HEAD_DIMS, SEQLENS, [False, True]):
        heads, layout = draw.choice(HEADS), draw.choice(["bhsd", "bshd"])
        strides = draw.choice(["contiguous", "slice", "permuted"])
        name = (f"{str(dtype)[6:]}-d{head_dim}-{seqlen_q}x{seqlen_k}-{'causal' if causal else 'full'}"
                f"-h{heads[0]}kv{heads[1]}-{layout}-{strides}")
        cases.append(pytest.param(dtype, head_dim, seqlen_q, seqlen_k, causal, heads, layout, strides, id=name))
    return cases


@pytest.mark.parametrize("dtype,head_dim,seqlen_q,seqlen_k,causal,heads,layout,strides", _grid())
def test_forward_grid(dtype, head_dim, seqlen_q, seqlen_k, causal, heads, layout, strides):
    def shape(h, s):
        return (2, h, s, head_dim) if layout == "bhsd" else (2, s, h, head_dim)
    q = _strided(shape(heads[0], seqlen_q), dtype, strides)
    k = _strided(shape(heads[1], seqlen_k), dtype, strides) * 2.0
    v = _strided(shape(heads[1], seqlen_k), dtype, strides)
    out, lse = _run_forward(q, k, v, layout=layout, causal=causal)
    _check(out, lse, q, k, v, layout=layout, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_forward_matches_torch_sdpa(dtype, causal, head_dim):
    """Against torch SDPA on the GPU (flash/efficient/cuDNN, whichever torch picks): our error vs
    the fp64 reference is at most 2x SDPA's, plus a rounding-sized slack."""
    q, k, v = (torch.randn(1, 8, 1000, head_dim, dtype=dtype, device=DEVICE) for _ in range(3))
    out, lse = _run_forward(q, k, v, causal=causal)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref, ref_lse = attention_reference(q, k, v, causal=causal)
    assert_close_to_reference(out.cpu(), sdpa.cpu(), ref)
    assert_lse_close(lse.cpu(), ref_lse, dtype)


# ---------------------------------------------------------------- variants

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,causal", [((0, 0), False), ((16, -1), True), ((-1, 5), False), ((40, 3), False),
                                           ((100, 100), True)], ids=str)
def test_window(dtype, window, causal):
    q, k, v = (torch.randn(1, 4, n, 64, dtype=dtype, device=DEVICE) for n in (150, 200, 200))
    k, v = k[:, :2], v[:, :2]
    out, lse = _run_forward(q, k, v, window=window, causal=causal)
    _check(out, lse, q, k, v, window=window, causal=causal)


@pytest.mark.parametrize("q_offset", [-300, -20, 0, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_q_offset(q_offset, dtype):
    """Explicit positions, including ones that put every query before the first key or after the last."""
    q, k, v = (torch.randn(2, 2, n, 96, dtype=dtype, device=DEVICE) for n in (70, 90, 90))
    out, lse = _run_forward(q, k, v, causal=True, q_offset=q_offset, window=(30, -1))
    _check(out, lse, q, k, v, causal=True, q_offset=q_offset, window=(30, -1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [40, 128, 256])
def test_alibi_softcap_sinks(dtype, head_dim):
    q, k, v = (torch.randn(2, 4, n, head_dim, dtype=dtype, device=DEVICE) for n in (65, 140, 140))
    k, v = k[:, :2], v[:, :2]
    slopes = torch.tensor([2.0**-(h + 1) for h in range(4)], device=DEVICE)
    per_batch = torch.stack([slopes, slopes * 0.5])  # (batch, heads) slopes
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEVICE)
    for alibi in (slopes, per_batch):
        kwargs = dict(causal=True, alibi_slopes=alibi, softcap=5.0, sinks=sinks)
        out, lse = _run_forward(q, k, v, **kwargs)
        _check(out, lse, q, k, v, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float32", "float16", "bool-broadcast"])
def test_attn_mask(dtype, kind):
    """Bool masks (True = attend; whole key tiles hidden for some heads, so tiles get skipped) and
    float masks (added), broadcast by stride 0 (no copies)."""
    q, k, v = (torch.randn(2, 3, n, 64, dtype=dtype, device=DEVICE) for n in (70, 300, 300))
    if kind.startswith("bool"):
        mask = torch.rand(2, 3, 70, 300, device=DEVICE) < 0.7
        mask[:, 1, :, 64:200] = False
        mask[0, 2, 5] = False  # one row that sees nothing
        if kind == "bool-broadcast":
            mask = mask[:1, :1].expand(2, 3, 70, 300)
    else:
        mask = torch.randn(1, 1, 70, 300, device=DEVICE, dtype=getattr(torch, kind)).expand(2, 3, 70, 300)
    out, lse = _run_forward(q, k, v, attn_mask=mask)
    _check(out, lse, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.17, 0.5])
def test_dropout_matches_the_philox_mask(dtype, dropout_p):
    """The kept weights are exactly reference.dropout_keep_mask's (the CPU's) for the seed."""
    q, k, v = (torch.randn(2, 2, n, 64, dtype=dtype, device=DEVICE) for n in (33, 77, 77))
    out, lse = _run_forward(q, k, v, causal=True, dropout_p=dropout_p, seed=123456789)
    _check(out, lse, q, k, v, causal=True, dropout_p=dropout_p, seed=123456789)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["causal_lq_gt_lk", "negative_offset", "empty_window"])
def test_fully_masked_rows_are_zero_with_lse_minus_inf(dtype, case):
    kwargs, lengths = {"causal_lq_gt_lk": (dict(causal=True), (40, 9)),
                       "negative_offset": (dict(causal=True, q_offset=-50), (40, 9)),
                       "empty_window": (dict(window=(0, 0), q_offset=0), (40, 9))}[case]
    q = torch.randn(2, 2, lengths[0], 32, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(2, 2, lengths[1], 32, dtype=dtype, device=DEVICE) for _ in range(2))
    out, lse = _run_forward(q, k, v, **kwargs)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    _check(out, lse, q, k, v, **kwargs)


def test_keys_past_the_end_are_never_read():
    """K/V are views into NaN-filled buffers: reading any key past seqlen_k would show up as NaN."""
    for dtype, head_dim in [(torch.float16, 64), (torch.bfloat16, 59), (torch.float32, 40)]:
        big_k = torch.full((1, 2, 2000, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        big_v = big_k.clone()
        big_k[:, :, :70] = torch.randn(1, 2, 70, head_dim, dtype=dtype, device=DEVICE)
        big_v[:, :, :70] = torch.randn(1, 2, 70, head_dim, dtype=dtype, device=DEVICE)
        q = torch.randn(1, 2, 33, head_dim, dtype=dtype, device=DEVICE)
        out, lse = _run_forward(q, big_k[:, :, :70], big_v[:, :, :70], causal=True)
        _check(out, lse, q, big_k[:, :, :70], big_v[:, :, :70], causal=True)


def test_runs_on_the_current_stream():
    """The kernels run on torch's current stream, in order with the caller's work on it."""
    stream = torch.cuda.Stream()
    q, k, v = (torch.randn(1, 4, 512, 64, dtype=torch.float16, device=DEVICE) for _ in range(3))
    out = torch.empty_like(q)
    with torch.cuda.stream(stream):
        q2 = q * 2.0  # queued on `stream`: the kernel must see it
        backend.forward(q2, k, v, out, None, _variant(0.125))
    stream.synchronize()
    expected, _ = _run_forward(q * 2.0, k, v, scale=0.125)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_large_batch_and_heads_grid():
    """More blocks than any grid dimension but x allows (batch · heads > 65535)."""
    q, k, v = (torch.randn(1100, 64, 3, 32, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    out, lse = _run_forward(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), sdpa, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- KV cache / decode

def _cache_case(dtype, *, batch, heads, heads_kv, seqlen_q, head_dim, capacity, page_size, new, leftpad, batch_idx):
    """Random caches (contiguous (rows, capacity, h, d) or paged (pages, page_size, h, d)), lengths and new tokens."""
    gen = torch.Generator().manual_seed(batch * 1000 + capacity)
    if page_size:
        pages_per_seq = math.ceil(capacity / page_size)
        num_pages = batch * pages_per_seq + 3
        k_cache = torch.randn(num_pages, page_size, heads_kv, head_dim, dtype=dtype, device=DEVICE)
        table = torch.randperm(num_pages, generator=gen)[: batch * pages_per_seq].reshape(batch, pages_per_seq)
        block_table = table.to(device=DEVICE, dtype=torch.int32)
        capacity = pages_per_seq * page_size
        rows = None
    else:
        k_cache = torch.randn(batch + 2, capacity, heads_kv, head_dim, dtype=dtype, device=DEVICE)
        block_table = None
        rows = torch.randperm(batch + 2, generator=gen)[:batch] if batch_idx else torch.arange(batch)
    v_cache = torch.randn_like(k_cache)
    before = torch.randint(0, capacity - new + 1, (batch,), generator=gen)
    before[0] = capacity - new  # one full sequence
    begin = torch.minimum(torch.randint(0, 9, (batch,), generator=gen), before) if leftpad else torch.zeros(batch, dtype=torch.int64)
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=DEVICE)
    k_new = torch.randn(batch, new, heads_kv, head_dim, dtype=dtype, device=DEVICE)
    v_new = torch.randn_like(k_new)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, rows=rows, before=before, begin=begin,
                k_new=k_new, v_new=v_new, capacity=capacity)


def _sequence_keys(c, cache, b, total):
    """Keys [begin, total) of sequence b, gathered on the CPU: (1, total - begin, heads_kv, d)."""
    slots = torch.arange(int(c["begin"][b]), total)
    if c["block_table"] is None:
        return cache[int(c["rows"][b])][slots].cpu()[None]
    table = c["block_table"].cpu()
    page_size = cache.shape[1]
    return cache[table[b, slots // page_size].to(cache.device), (slots % page_size).to(cache.device)].cpu()[None]


DECODE_CASES = [
    # dtype, batch, heads, heads_kv, seqlen_q, head_dim, capacity, page_size, new, leftpad, batch_idx, splits, causal
    (torch.float16, 4, 32, 8, 1, 128, 1000, 0, 1, False, True, 0, True),
    (torch.bfloat16, 3, 8, 1, 1, 64, 4096, 0, 1, True, False, 0, True),
    (torch.float16, 2, 16, 2, 4, 128, 700, 16, 4, False, False, 0, True),
    (torch.bfloat16, 3, 6, 2, 3, 96, 300, 7, 3, False, False, 5, True),
    (torch.float16, 2, 4, 4, 1, 256, 500, 1, 1, False, False, 3, False),
    (torch.bfloat16, 5, 8, 8, 2, 59, 200, 256, 2, False, False, 1, True),
    (torch.float16, 1, 64, 8, 16, 128, 2048, 64, 16, False, False, 0, True),
    (torch.float32, 3, 8, 2, 2, 64, 300, 0, 2, True, True, 0, True),
    (torch.float32, 2, 4, 1, 1, 40, 260, 13, 1, False, False, 0, True),
]


@pytest.mark.parametrize("dtype,batch,heads,heads_kv,seqlen_q,head_dim,capacity,page_size,new,leftpad,batch_idx,"
                         "splits,causal", DECODE_CASES,
                         ids=[f"{str(c[0])[6:]}-b{c[1]}h{c[2]}kv{c[3]}-q{c[4]}-d{c[5]}-cap{c[6]}-page{c[7]}-new{c[8]}"
                              f"{'-leftpad' if c[9] else ''}{'-batchidx' if c[10] else ''}-splits{c[11]}" for c in DECODE_CASES])
def test_decode(dtype, batch, heads, heads_kv, seqlen_q, head_dim, capacity, page_size, new, leftpad, batch_idx,
                splits, causal):
    c = _cache_case(dtype, batch=batch, heads=heads, heads_kv=heads_kv, seqlen_q=seqlen_q, head_dim=head_dim,
                    capacity=capacity, page_size=page_size, new=new, leftpad=leftpad, batch_idx=batch_idx)
    before = c["before"].to(device=DEVICE, dtype=torch.int32)
    kwargs = dict(block_table=c["block_table"],
                  cache_batch_idx=None if not batch_idx else c["rows"].to(device=DEVICE, dtype=torch.int32),
                  cache_leftpad=None if not leftpad else c["begin"].to(device=DEVICE, dtype=torch.int32))
    big, out = _nan_view((batch, heads, seqlen_q, head_dim), dtype, "bshd")
    lse = torch.full((batch, heads, seqlen_q), float("nan"), device=DEVICE)
    slopes = torch.linspace(0.1, 0.5, heads, device=DEVICE)
    window = (100, -1) if leftpad else (-1, -1)
    variant = _variant(head_dim**-0.5, causal=causal, window=window, alibi_slopes=slopes if page_size == 7 else None,
                       softcap=10.0 if page_size == 1 else 0.0)
    backend.decode(c["q"].transpose(1, 2), c["k_cache"].transpose(1, 2), c["v_cache"].transpose(1, 2),
                   out.transpose(1, 2), lse, before, variant, k=c["k_new"].transpose(1, 2),
                   v=c["v_new"].transpose(1, 2), num_splits=splits, **kwargs)
    torch.cuda.synchronize()
    _assert_only_view_written(big, out)
    for b in range(batch):
        total = int(c["before"][b]) + new
        keys = _sequence_keys(c, c["k_cache"], b, total)
        values = _sequence_keys(c, c["v_cache"], b, total)
        # The new tokens were appended in place at [before, before + new).
        n_begin = int(c["before"][b]) - int(c["begin"][b])
        torch.testing.assert_close(keys[0, n_begin:], c["k_new"][b].cpu(), atol=0, rtol=0)
        torch.testing.assert_close(values[0, n_begin:], c["v_new"][b].cpu(), atol=0, rtol=0)
        ref_kwargs = dict(causal=causal, window=window, q_offset=keys.shape[1] - seqlen_q,
                          alibi_slopes=slopes if page_size == 7 else None, softcap=10.0 if page_size == 1 else 0.0)
        qb = c["q"][b:b + 1]
        ref, ref_lse = attention_reference(qb, keys, values, layout="bshd", **ref_kwargs)
        lowp = None
        if dtype != torch.float32:
            cpu_kwargs = {key: (_cpu(x) if isinstance(x, torch.Tensor) else x) for key, x in ref_kwargs.items()}
            lowp, _ = torch_attention(qb.cpu(), keys, values, layout="bshd", **cpu_kwargs)
        assert_close_to_reference(out[b:b + 1].cpu(), lowp, ref)
        assert_lse_close(lse[b:b + 1].cpu(), ref_lse, dtype)


def test_decode_split_counts_agree():
    """Every split count computes the same function (to rounding): 1, 2, 7, 128 and the heuristic."""
    c = _cache_case(torch.float16, batch=2, heads=8, heads_kv=2, seqlen_q=1, head_dim=128, capacity=3000,
                    page_size=0, new=0, leftpad=False, batch_idx=False)
    lengths = c["before"].to(device=DEVICE, dtype=torch.int32)
    results = []
    for splits in (1, 2, 7, 128, 0):
        out = torch.empty(2, 8, 1, 128, dtype=torch.float16, device=DEVICE)
        lse = torch.empty(2, 8, 1, device=DEVICE)
        backend.kvcache_forward(c["q"].transpose(1, 2), c["k_cache"].transpose(1, 2), c["v_cache"].transpose(1, 2),
                                out, lse, lengths, _variant(128**-0.5, causal=True), num_splits=splits)
        results.append((out.float(), lse))
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lse, results[0][1], atol=1e-5, rtol=1e-5)


def test_kvcache_append_paged_any_page_size():
    for page_size in (1, 3, 16):
        cache = torch.zeros(20, page_size, 2, 8, dtype=torch.bfloat16, device=DEVICE)
        other = torch.zeros_like(cache)
        table = torch.randperm(20, device=DEVICE)[:12].reshape(2, 6).to(torch.int32)
        k = torch.randn(2, 2, 5, 8, dtype=torch.bfloat16, device=DEVICE)  # (batch, heads_kv, new, d)
        at = torch.tensor([0, min(6 * page_size - 5, 4)], dtype=torch.int32, device=DEVICE)
        backend.kvcache_append(cache.transpose(1, 2), other.transpose(1, 2), k, k * 2, at, block_table=table)
        for b in range(2):
            for t in range(5):
                slot = int(at[b]) + t
                page = int(table[b, slot // page_size])
                assert torch.equal(cache[page, slot % page_size], k[b, :, t])
                assert torch.equal(other[page, slot % page_size], k[b, :, t] * 2)
        assert int((cache != 0).any(-1).any(-1).sum()) == 10  # nothing else written


# ---------------------------------------------------------------- varlen (packed sequences)

VARLEN_LENGTHS = ([1, 17, 0, 1000, 5], [3, 17, 4, 1000, 0])  # an empty q and an empty k sequence


def _packed(lengths, heads, head_dim, dtype, scale=1.0):
    """A random packed (total, heads, head_dim) GPU tensor and its int32 cu_seqlens on the GPU."""
    x = torch.randn(int(sum(lengths)), heads, head_dim, dtype=dtype, device=DEVICE) * scale
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=DEVICE)
    return x, cu


def _varlen_options(case, num_heads, batch):
    """Keyword arguments of one varlen variant; ALiBi slopes per (sequence, head)."""
    return dict(causal=case.get("causal", False), window=case.get("window", (-1, -1)), softcap=case.get("softcap", 0.0),
                alibi_slopes=torch.rand(batch, num_heads, device=DEVICE) * 0.1 if case.get("alibi") else None,
                sinks=torch.randn(num_heads, device=DEVICE) if case.get("sinks") else None)


def _run_varlen(q, k, v, cu_q, cu_k, max_seqlen_q, *, tail=0, scale=None, causal=False, window=(-1, -1), softcap=0.0,
                alibi_slopes=None, sinks=None, dropout_p=0.0, seed=0):
    """The CUDA varlen forward into a NaN-poisoned out (inside a NaN buffer) and lse, q having
    `tail` extra packed rows after the last sequence. Returns (out, lse) after checking that every
    element, the tail's included, was written and nothing around it."""
    total_q, heads, head_dim = q.shape[0] + tail, q.shape[1], q.shape[2]
    q = torch.cat([q, torch.randn(tail, heads, head_dim, dtype=q.dtype, device=DEVICE)])
    big, out = _nan_view((1, heads, total_q, head_dim), q.dtype, "bshd")  # out[0]: (total_q, heads, d)
    lse = torch.full((1, heads, total_q), float("nan"), device=DEVICE)
    variant = _variant(head_dim**-0.5 if scale is None else scale, causal=causal, window=window, softcap=softcap,
                       alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p, seed=seed)
    backend.varlen_forward(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                           out.transpose(1, 2), lse, cu_q, cu_k, max_seqlen_q, variant)
    torch.cuda.synchronize()
    _assert_only_view_written(big, out)
    assert not torch.isnan(lse).any(), "an lse entry was not written"
    end = int(cu_q[-1])
    assert torch.equal(out[0, end:], torch.zeros_like(out[0, end:])), "rows after the last sequence must be 0"
    assert torch.isneginf(lse[0, :, end:]).all(), "rows after the last sequence must have LSE -inf"
    return out[0, :end], lse[0, :, :end]


def _check_varlen_sequence(out, lse, q, k, v, dropout_mask=None, **options):
    """One sequence (packed rows) against the fp64 reference with DESIGN.md's rule."""
    if k.shape[0] == 0:  # no keys: out 0, LSE -inf (or the sink's logit, through exp2/log2 on tensor cores)
        sinks = options.get("sinks")
        expected = (torch.full(lse.shape, float("-inf")) if sinks is None
                    else sinks.float().cpu()[:, None].expand(lse.shape))
        assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
        torch.testing.assert_close(lse.cpu(), expected, atol=LSE_ATOL, rtol=LSE_RTOL)
        return
    q, k, v = (x[None] for x in (q, k, v))  # (1, seqlen, heads, d): bshd
    ref, ref_lse = attention_reference(q, k, v, layout="bshd", dropout_mask=dropout_mask, **options)
    lowp = None
    if q.dtype != torch.float32:
        cpu_options = {key: (_cpu(x) if isinstance(x, torch.Tensor) else x) for key, x in options.items()}
        lowp, _ = torch_attention(_cpu(q), _cpu(k), _cpu(v), layout="bshd", dropout_mask=dropout_mask, **cpu_options)
    assert_close_to_reference(out[None].cpu(), lowp, ref)
    if options.get("sinks") is None:
        assert np.all(out.float().cpu().numpy().swapaxes(0, 1)[np.isneginf(ref_lse[0])] == 0.0)
    assert_lse_close(lse[None].cpu(), ref_lse, q.dtype)


VARLEN_CASES = [dict(causal=True), dict(window=(8, 3)), dict(causal=True, softcap=15.0, alibi=True, sinks=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=["causal", "window", "softcap-alibi-sinks"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_varlen_equals_per_sequence_calls_and_reference(dtype, case, heads):
    """Sequences of lengths 1, 17, 0 (no queries), 1000 and 5 (no keys), plus 3 rows after the last
    one: each sequence's rows equal a plain CUDA call on that sequence alone (the same kernel on
    the same tiles: bit for bit) and the fp64 reference (DESIGN.md's rule), bottom-right."""
    (lengths_q, lengths_k), (num_heads, num_heads_kv) = VARLEN_LENGTHS, heads
    q, cu_q = _packed(lengths_q, num_heads, 64, dtype)
    k, cu_k = _packed(lengths_k, num_heads_kv, 64, dtype, scale=2.0)
    v, _ = _packed(lengths_k, num_heads_kv, 64, dtype)
    options = _varlen_options(case, num_heads, len(lengths_q))
    out, lse = _run_varlen(q, k, v, cu_q, cu_k, max(lengths_q), tail=3, **options)
    for b in range(len(lengths_q)):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lengths_q[b] == 0:
            continue
        slopes = options["alibi_slopes"]
        per_sequence = dict(options, alibi_slopes=None if slopes is None else slopes[b])
        alone, alone_lse = fusedattn.attention(q[rows][None], k[keys][None], v[keys][None], layout="bshd",
                                               return_lse=True, **per_sequence)
        torch.testing.assert_close(out[rows], alone[0], atol=0, rtol=0)
        torch.testing.assert_close(lse[:, rows], alone_lse[0], atol=0, rtol=0)
        _check_varlen_sequence(out[rows], lse[:, rows], q[rows], k[keys], v[keys], **per_sequence)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(192, 128), (64, 96)], ids=str)
def test_value_head_dim_unlike_the_query_s(dtype, dims):
    """DeepSeek's MLA shapes through the public API (v or q and k zero-padded: functional._pad_head_dims)."""
    q, k = (torch.randn(2, n, 4, dims[0], dtype=dtype, device=DEVICE) for n in (130, 150))
    v = torch.randn(2, 150, 4, dims[1], dtype=dtype, device=DEVICE)
    out, lse = fusedattn.attention(q, k, v, causal=True, layout="bshd", return_lse=True)
    assert out.shape == (2, 130, 4, dims[1]) and out.is_cuda
    _check(out, lse, q, k, v, layout="bshd", causal=True)
    lengths = [1, 17, 0, 130]
    qp, cu = _packed(lengths, 4, dims[0], dtype)
    kp, _ = _packed(lengths, 2, dims[0], dtype)
    vp, _ = _packed(lengths, 2, dims[1], dtype)
    packed = fusedattn.attention_varlen(qp, kp, vp, cu, cu, 130, 130, causal=True)
    for b in range(len(lengths)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        if lengths[b]:
            expected = fusedattn.attention(qp[None, rows], kp[None, rows], vp[None, rows], causal=True, layout="bshd")
            torch.testing.assert_close(packed[rows], expected[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 59, 96, 128, 192, 256])
def test_varlen_head_dims(dtype, head_dim):
    """Every head-dim bucket (59: the 2-byte load path), GQA, a sequence longer than one q-tile."""
    lengths_q, lengths_k = [1, 17, 0, 130, 5], [3, 17, 4, 140, 0]
    q, cu_q = _packed(lengths_q, 4, head_dim, dtype)
    k, cu_k = _packed(lengths_k, 2, head_dim, dtype, scale=2.0)
    v, _ = _packed(lengths_k, 2, head_dim, dtype)
    out, lse = _run_varlen(q, k, v, cu_q, cu_k, 130, tail=2, causal=True)
    for b in range(len(lengths_q)):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lengths_q[b]:
            _check_varlen_sequence(out[rows], lse[:, rows], q[rows], k[keys], v[keys], causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.17, 0.5])
def test_varlen_dropout_matches_the_philox_mask(dtype, dropout_p):
    """Dropout sees (sequence b, head, row within the sequence, key): reference.dropout_keep_mask's
    batch index is the sequence, as on the CPU."""
    lengths_q, lengths_k = [1, 17, 0, 70, 5], [3, 17, 4, 90, 0]
    q, cu_q = _packed(lengths_q, 2, 64, dtype)
    k, cu_k = _packed(lengths_k, 2, 64, dtype)
    v, _ = _packed(lengths_k, 2, 64, dtype)
    out, lse = _run_varlen(q, k, v, cu_q, cu_k, 70, causal=True, dropout_p=dropout_p, seed=987654321)
    keep = dropout_keep_mask(len(lengths_q), 2, max(lengths_q), max(lengths_k), dropout_p, 987654321)
    for b in range(len(lengths_q)):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lengths_q[b]:
            mask = keep[b:b + 1, :, :lengths_q[b], :lengths_k[b]]
            _check_varlen_sequence(out[rows], lse[:, rows], q[rows], k[keys], v[keys], dropout_mask=mask, causal=True,
                                   dropout_p=dropout_p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_public_api_and_rows_after_the_last_sequence(dtype):
    """attention_varlen / flash_attn_varlen_func on CUDA tensors, cu_seqlens on the GPU (int32 or
    int64) or on the host (lists, CPU tensors: checked first, as on the CPU); packed rows after
    cu_seqlens_q[-1] give 0 and LSE -inf."""
    q, cu_q = _packed([7, 9], 4, 64, dtype)
    k, cu_k = _packed([12, 9], 2, 64, dtype)
    q_padded = torch.cat([q, torch.randn(3, 4, 64, dtype=dtype, device=DEVICE)])
    out, lse = fusedattn.attention_varlen(q_padded, k, k, cu_q, cu_k.long(), 9, 12, causal=True, return_lse=True)
    assert out.is_cuda and out.shape == q_padded.shape and lse.shape == (4, 19) and lse.dtype == torch.float32
    assert torch.equal(out[16:], torch.zeros_like(out[16:])) and torch.isneginf(lse[:, 16:]).all()
    host = fusedattn.flash_attn_varlen_func(q_padded, k, k, [0, 7, 16], cu_k.cpu(), 9, 12, causal=True,
                                            return_attn_probs=True)
    torch.testing.assert_close(host[0], out, atol=0, rtol=0)
    torch.testing.assert_close(host[1], lse, atol=0, rtol=0)
    for b, rows in enumerate((slice(0, 7), slice(7, 16))):
        keys = slice(int(cu_k[b]), int(cu_k[b + 1]))
        _check_varlen_sequence(out[rows], lse[:, rows], q_padded[rows], k[keys], k[keys], causal=True)


def test_varlen_sequence_longer_than_max_seqlen_q_is_nan_not_stale():
    """max_seqlen_q sizes the grid and cannot be checked against cu_seqlens on the GPU without a
    host sync: the rows of a longer sequence past the grid's q-tiles come out NaN (out and LSE),
    the rows the tiles cover are right. With cu_seqlens on the host it is a ValueError."""
    for dtype in DTYPES:
        q, cu_q = _packed([300, 3], 2, 64, dtype)  # the grid covers >= 4 rows (fp32) or >= 64 (tensor cores)
        k, cu_k = _packed([310, 5], 2, 64, dtype)
        out, lse = fusedattn.attention_varlen(q, k, k, cu_q, cu_k, 1, 310, causal=True, return_lse=True)
        torch.cuda.synchronize()
        nan_rows = torch.isnan(lse[0, :300])
        computed = int((~nan_rows).sum())
        assert 1 <= computed < 300 and not nan_rows[:computed].any(), "the grid covers a prefix of the sequence"
        assert torch.equal(torch.isnan(out[:300]).all(-1).all(-1), nan_rows)
        assert torch.equal(torch.isnan(lse[:, :300]), nan_rows.expand(2, 300))
        _check_varlen_sequence(out[:computed], lse[:, :computed], q[:computed], k[:310], k[:310], causal=True,
                               q_offset=10)
        _check_varlen_sequence(out[300:], lse[:, 300:], q[300:], k[310:], k[310:], causal=True)
    with pytest.raises(ValueError, match="max_seqlen_q / max_seqlen_k are smaller"):
        fusedattn.attention_varlen(q, k, k, cu_q.cpu(), cu_k.cpu(), 1, 310)


def test_varlen_errors_and_no_backward():
    q, cu_q = _packed([3, 5], 2, 32, torch.float16)
    k, cu_k = _packed([3, 5], 2, 32, torch.float16)
    for cu, message in (([1, 3, 8], r"\[0\] must be 0"), ([0, 5, 3], "non-decreasing"), ([0, 3, 99], "beyond")):
        with pytest.raises(ValueError, match=message):
            fusedattn.attention_varlen(q, k, k, torch.tensor(cu, dtype=torch.int32), cu_k, 99, 99)
    with pytest.raises(ValueError, match="batch \\+ 1"):
        fusedattn.attention_varlen(q, k, k, cu_q, cu_k[:2], 5, 5)
    with pytest.raises(TypeError, match="integer"):
        fusedattn.attention_varlen(q, k, k, cu_q.float(), cu_k, 5, 5)
    with pytest.raises(TypeError, match="float64"):
        fusedattn.attention_varlen(q.double(), k.double(), k.double(), cu_q, cu_k, 5, 5)
    with pytest.raises(ValueError, match="k is on cpu"):
        fusedattn.attention_varlen(q, k.cpu(), k, cu_q, cu_k, 5, 5)
    q_grad = q.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="backward pass on CUDA"):
        fusedattn.attention_varlen(q_grad, k, k, cu_q, cu_k, 5, 5)
    with torch.no_grad():
        fusedattn.attention_varlen(q_grad, k, k, cu_q, cu_k, 5, 5)


# ---------------------------------------------------------------- rotary with CUDA caches

def _rotary_table(positions, rotary_dim, dtype=torch.float32):
    angles = torch.arange(positions, dtype=torch.float64)[:, None] / (
        100.0 ** (torch.arange(rotary_dim // 2, dtype=torch.float64) / (rotary_dim // 2)))
    return angles.cos().to(dtype), angles.sin().to(dtype)


ROTARY_CASES = [
    # dtype, interleaved, causal, window, paged, leftpad, new tokens
    (torch.float16, True, True, (-1, -1), False, False, 2),
    (torch.bfloat16, False, True, (-1, -1), True, False, 3),
    (torch.float32, True, False, (-1, -1), False, True, 1),   # causal=False, no window: all of q at cache_seqlens
    (torch.float16, False, False, (16, 0), False, False, 2),  # a window: per-token positions again
    (torch.bfloat16, True, True, (-1, -1), False, True, 0),   # no new tokens: only q rotates
]


@pytest.mark.parametrize("dtype,interleaved,causal,window,paged,leftpad,new", ROTARY_CASES,
                         ids=[f"{str(c[0])[6:]}-{'interleaved' if c[1] else 'halves'}-{'causal' if c[2] else 'full'}"
                              f"-w{c[3][0]}{'-paged' if c[4] else ''}{'-leftpad' if c[5] else ''}-new{c[6]}"
                              for c in ROTARY_CASES])
def test_kvcache_rotary_matches_the_cpu_path(dtype, interleaved, causal, window, paged, leftpad, new):
    """attention_with_kvcache(rotary_cos=..., rotary_sin=...) on CUDA caches: the cache gets
    exactly the CPU path's rotated keys (same torch ops, bit for bit), and out is the attention
    of the rotated q over it (fp64 reference, DESIGN.md's rule)."""
    batch, seqlen_q, heads, heads_kv, head_dim, rotary_dim, capacity = 3, max(new, 2), 4, 2, 64, 32, 48
    cos, sin = _rotary_table(capacity, rotary_dim)
    before = torch.tensor([2, 17, capacity - seqlen_q], dtype=torch.int32)  # the last one ends at the capacity
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k_new, v_new = (torch.randn(batch, new, heads_kv, head_dim, dtype=dtype) for _ in range(2))
    kwargs = dict(causal=causal, window=window, rotary_interleaved=interleaved, return_lse=True)
    if paged:
        page_size = 16
        table = torch.randperm(batch * capacity // page_size + 2)[: batch * capacity // page_size]
        kwargs["block_table"] = table.reshape(batch, -1).to(torch.int32)
        cache_shape = (batch * capacity // page_size + 2, page_size, heads_kv, head_dim)
    else:
        cache_shape = (batch, capacity, heads_kv, head_dim)
    if leftpad:
        kwargs["cache_leftpad"] = torch.tensor([0, 5, 2], dtype=torch.int32)
    k_cache, v_cache = (torch.randn(cache_shape, dtype=dtype) for _ in range(2))
    k_gpu, v_gpu = k_cache.to(DEVICE), v_cache.to(DEVICE)
    new_kv = (k_new, v_new) if new else (None, None)

    out_cpu, lse_cpu = fusedattn.attention_with_kvcache(q, k_cache, v_cache, *new_kv, cache_seqlens=before,
                                                        rotary_cos=cos, rotary_sin=sin, **kwargs)
    gpu_kwargs = {key: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for key, x in kwargs.items()}
    out, lse = fusedattn.attention_with_kvcache(q.to(DEVICE), k_gpu, v_gpu,
                                                *(None if x is None else x.to(DEVICE) for x in new_kv),
                                                cache_seqlens=before.to(DEVICE), rotary_cos=cos.to(DEVICE),
                                                rotary_sin=sin.to(DEVICE), **gpu_kwargs)
    torch.cuda.synchronize()
    assert torch.equal(k_gpu.cpu(), k_cache) and torch.equal(v_gpu.cpu(), v_cache)
    # The rotated q, as the CPU path computes it (its positions rule), then plain attention per sequence.
    steps = torch.arange(seqlen_q) if causal or window != (-1, -1) else torch.zeros(seqlen_q, dtype=torch.long)
    q_rot = inference._apply_rotary(q, cos, sin, before.long()[:, None] + steps, interleaved)
    begin = kwargs.get("cache_leftpad", torch.zeros(batch, dtype=torch.int32))
    for b in range(batch):
        slots = torch.arange(int(begin[b]), int(before[b]) + new)
        if paged:
            table = kwargs["block_table"]
            keys, values = (c[table[b, slots // page_size].long(), slots % page_size][None] for c in (k_cache, v_cache))
        else:
            keys, values = k_cache[b, slots][None], v_cache[b, slots][None]
        options = dict(causal=causal, window=window, q_offset=keys.shape[1] - seqlen_q)
        ref, ref_lse = attention_reference(q_rot[b:b + 1], keys, values, layout="bshd", **options)
        lowp = None if dtype == torch.float32 else torch_attention(q_rot[b:b + 1], keys, values, layout="bshd",
                                                                   **options)[0]
        assert_close_to_reference(out[b:b + 1].cpu(), lowp, ref)
        assert_lse_close(lse[b:b + 1].cpu(), ref_lse, dtype)
    torch.testing.assert_close(lse.cpu(), lse_cpu, atol=2e-5, rtol=2e-6)


def test_kvcache_rotary_errors():
    q = torch.randn(1, 1, 2, 64, dtype=torch.float16, device=DEVICE)
    cache = torch.zeros(1, 32, 1, 64, dtype=torch.float16, device=DEVICE)
    cos, sin = (x.to(DEVICE) for x in _rotary_table(32, 16))
    with pytest.raises(ValueError, match="both rotary_cos and rotary_sin"):
        fusedattn.attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=3, rotary_cos=cos)
    with pytest.raises(ValueError, match="cache capacity"):
        fusedattn.attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=3, rotary_cos=cos[:20],
                                         rotary_sin=sin[:20])
    with pytest.raises(ValueError, match="rotary_dim"):
        wide = torch.zeros(32, 40, device=DEVICE)
        fusedattn.attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=3, rotary_cos=wide, rotary_sin=wide)


# ---------------------------------------------------------------- merge_attention_states

@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attention_states_recovers_the_full_result(dtype):
    """Attention over keys [0, 150) and [150, 300) separately, merged by LSE, equals attention over
    all 300 (within the rounding of the two partial outputs); a window makes some parts empty."""
    q, k, v = (torch.randn(2, 4, n, 64, dtype=dtype, device=DEVICE) for n in (50, 300, 300))
    kwargs = dict(q_offset=0, window=(20, 120))
    out_a, lse_a = _run_forward(q, k[:, :, :150], v[:, :, :150], **kwargs)
    out_b, lse_b = _run_forward(q, k[:, :, 150:], v[:, :, 150:], q_offset=-150, window=(20, 120))
    assert torch.isneginf(lse_b).any()  # some rows see nothing in the second half
    out, lse = backend.merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.cuda.synchronize()
    _check(out, lse, q, k, v, factor=3.0, **kwargs)


def test_merge_attention_states_in_place_and_strided():
    out_a = torch.randn(2, 50, 3, 32, dtype=torch.float16, device=DEVICE).transpose(1, 2)  # bshd storage
    out_b = torch.randn(2, 3, 50, 32, dtype=torch.float16, device=DEVICE)
    lse_a = torch.randn(2, 50, 3, device=DEVICE).transpose(1, 2)
    lse_b = torch.randn(2, 3, 50, device=DEVICE)
    lse_a[0, 0, :5] = float("-inf")
    lse_b[0, 0, :3] = float("-inf")
    expected_lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - expected_lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - expected_lse).nan_to_num(0.0)[..., None]
    expected = (wa * out_a.float() + wb * out_b.float()).to(torch.float16)
    out, lse = backend.merge_attention_states(out_a, lse_a, out_b, lse_b, out=out_a)
    torch.cuda.synchronize()
    assert out is out_a
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    assert torch.equal(out[0, 0, :3], torch.zeros_like(out[0, 0, :3])) and torch.isneginf(lse[0, 0, :3]).all()


# ---------------------------------------------------------------- errors

def test_errors_are_clear():
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16, device=DEVICE)
    out = torch.empty_like(q)
    variant = _variant(0.125)
    with pytest.raises(ValueError, match="k is on cpu; the CUDA kernels need CUDA arrays"):
        backend.forward(q, q.cpu(), q, out, None, variant)
    with pytest.raises(ValueError, match="q is on cpu"):
        backend.forward(q.cpu(), q.cpu(), q.cpu(), out.cpu(), None, variant)
    with pytest.raises(TypeError, match="float64"):
        backend.forward(q.double(), q.double(), q.double(), out.double(), None, variant)
    with pytest.raises(TypeError, match="k has dtype"):
        backend.forward(q, q.float(), q, out, None, variant)
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(1, 2, 8, 300, dtype=torch.float16, device=DEVICE)
        backend.forward(big, big, big, torch.empty_like(big), None, variant)
    with pytest.raises(ValueError, match="v must be contiguous in its last dim"):
        strided = torch.randn(1, 2, 64, 8, dtype=torch.float16, device=DEVICE).transpose(2, 3)
        backend.forward(q, q, strided, out, None, variant)
    with pytest.raises(ValueError, match="the CUDA kernels need CUDA arrays"):
        backend.forward(q, q, q, out, None, _variant(0.125, attn_mask=torch.ones(1, 2, 8, 8, dtype=torch.bool)))
    cache = torch.randn(2, 4, 2, 64, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        backend.kvcache_forward(q[:, :, :1], cache, cache, out[:, :, :1], None,
                                torch.zeros(1, dtype=torch.int64, device=DEVICE), variant)
    with pytest.raises(ValueError, match="num_splits"):
        backend.kvcache_forward(q[:, :, :1], cache, cache, out[:, :, :1], None,
                                torch.zeros(1, dtype=torch.int32, device=DEVICE), variant, num_splits=1000)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="all arrays must be on one GPU"):
            backend.forward(q, q.to("cuda:1"), q, out, None, variant)


def test_fp32_is_exact():
    """The SIMT fp32 path matches the fp64 reference to fp32 rounding (no tf32 anywhere)."""
    q, k, v = (torch.randn(1, 2, n, 256, device=DEVICE) for n in (64, 500, 500))
    out, lse = _run_forward(q, k, v, causal=True)
    ref, _ = attention_reference(q, k, v, causal=True)
    err = np.abs(out.double().cpu().numpy() - ref)
    assert (err <= FP32_ATOL + FP32_RTOL * np.abs(ref)).all(), f"max error {err.max():.3g}"


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_torch_compile_cuda(paged):
    """attention_with_kvcache on CUDA tensors under torch.compile(fullgraph=True) (through the
    fusedattn::attention_kvcache op): output, LSE and the appended caches equal eager mode's. The
    graph holds the op alone, so Inductor generates no Triton kernel (a quick compile)."""
    torch._dynamo.reset()

    def step(q, k_cache, v_cache, k, v, seqlens, table):
        return fusedattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                                return_lse=True)

    compiled = torch.compile(step, fullgraph=True)
    q = torch.randn(2, 2, 8, 64, dtype=torch.bfloat16, device=DEVICE)
    k, v = (torch.randn(2, 2, 2, 64, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    shape = (8, 16, 2, 64) if paged else (2, 64, 2, 64)
    k_cache, v_cache = (torch.randn(shape, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    table = torch.randperm(8, device=DEVICE).to(torch.int32).reshape(2, 4) if paged else None
    seqlens = torch.tensor([37, 5], dtype=torch.int32, device=DEVICE)
    results = []
    for fn in (step, compiled):
        caches = (k_cache.clone(), v_cache.clone())
        results.append(tuple(fn(q, *caches, k, v, seqlens, table)) + caches)
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=0, rtol=0)
