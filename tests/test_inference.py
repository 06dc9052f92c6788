"""Inference APIs on the CPU: variable-length batches, KV caches (contiguous, paged, appending,
rotary, leftpad, batch index), split-KV decode and merging attention states.

Every result is compared with plain fusedattn.attention calls (themselves pinned to the fp64
reference by test_forward/test_variants) or with the fp64 reference directly.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch

import fusedattn
from fusedattn import reference

from conftest import ISAS, assert_close_to_reference, force_isa, torch_attention  # noqa: F401  (shared tolerance helpers)


def _packed(lengths, heads, head_dim, dtype=torch.float32, grad=False):
    total = int(sum(lengths))
    x = torch.randn(total, heads, head_dim, dtype=dtype)
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    return (x.requires_grad_() if grad else x), cu


def _close(a, b, tol=2e-5):
    """Equal infinities (e.g. LSE -inf of rows that see nothing) and close finite values."""
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite) and torch.equal(a[~finite], b[~finite])
    if finite.any():
        scale = max(1.0, b[finite].abs().max().item())
        assert (a[finite] - b[finite]).abs().max().item() <= tol * scale


# ---- variable-length batches ------------------------------------------------------------------

VARLEN_CASES = [
    dict(causal=True),
    dict(causal=False, window=(8, 3)),
    dict(causal=True, softcap=15.0, alibi=True, sinks=True),
]


@pytest.mark.parametrize("options", VARLEN_CASES, ids=["causal", "window", "softcap-alibi-sinks"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_varlen_equals_per_sequence_loop(options, heads):
    """Forward and backward equal a Python loop of per-sequence calls, with empty sequences and
    lengths 1, 17 and 1000 in one batch."""
    num_heads, num_heads_kv = heads
    lengths_q, lengths_k = [1, 17, 0, 1000, 5], [3, 17, 4, 1000, 0]
    q, cu_q = _packed(lengths_q, num_heads, 32, grad=True)
    k, cu_k = _packed(lengths_k, num_heads_kv, 32, grad=True)
    v, _ = _packed(lengths_k, num_heads_kv, 32, grad=True)
    extra = dict(causal=options["causal"], window=options.get("window", (-1, -1)),
                 softcap=options.get("softcap", 0.0),
                 alibi_slopes=torch.rand(num_heads) * 0.1 if options.get("alibi") else None,
                 sinks=torch.randn(num_heads) if options.get("sinks") else None)
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, 1000, 1000, return_lse=True, **extra)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = [torch.zeros_like(x) for x in (q, k, v)]
    for b in range(len(lengths_q)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys = slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lengths_q[b] == 0:
            continue
        qs, ks, vs = (x[s].detach().clone().requires_grad_() for x, s in ((q, rows), (k, keys), (v, keys)))
        o, l = fusedattn.attention(qs[None], ks[None], vs[None], layout="bshd", return_lse=True, **extra)
        _close(out[rows], o[0])
        _close(lse[:, rows], l[0])
        if lengths_k[b] > 0:
            for i, g in enumerate(torch.autograd.grad(o[0], (qs, ks, vs), dout[rows])):
                expected_grads[i][(rows, keys, keys)[i]] = g
    for got, expected in zip(grads, expected_grads):
        _close(got, expected)


def test_varlen_rows_after_the_last_sequence_are_zero():
    q, cu_q = _packed([3, 4], 2, 16)
    k, cu_k = _packed([5, 6], 2, 16)
    q_padded = torch.cat([q, torch.randn(3, 2, 16)])
    out, lse = fusedattn.attention_varlen(q_padded, k, k, cu_q, cu_k, 4, 6, return_lse=True)
    assert torch.equal(out[7:], torch.zeros_like(out[7:]))
    assert torch.isneginf(lse[:, 7:]).all()


def test_varlen_sink_gradient_with_rows_after_the_last_sequence():
    """Packed q rows that belong to no sequence (LSE -inf) add nothing to the sinks' gradient
    (their exp(sink - LSE) was exp(+inf) · 0 = NaN)."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, 2, 16, generator=generator) for n in (7, 11, 11))
    sinks = torch.randn(2, generator=generator)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 5, 11], dtype=torch.int32)
    grads = []
    for rows in (7, 5):  # with the two trailing rows, and without them
        leaves = [q[:rows].clone().requires_grad_(), sinks.clone().requires_grad_()]
        out = fusedattn.attention_varlen(leaves[0], k, v, cu_q, cu_k, 3, 6, sinks=leaves[1])
        out.backward(torch.ones_like(out))
        grads.append(leaves[1].grad)
    assert torch.isfinite(grads[0]).all()
    _close(grads[0], grads[1], tol=1e-6)


def test_varlen_numpy_and_flash_attn_drop_in():
    q, cu_q = _packed([7, 9], 4, 16)
    k, cu_k = _packed([12, 9], 2, 16)
    out = fusedattn.flash_attn_varlen_func(q, k, k, cu_q, cu_k, 9, 12, causal=True)
    out_np = fusedattn.attention_varlen(q.numpy(), k.numpy(), k.numpy(), cu_q.numpy(), cu_k.numpy(), 9, 12,
                                        causal=True)
    assert isinstance(out_np, np.ndarray)
    _close(out, torch.from_numpy(out_np), tol=0)


@pytest.mark.parametrize("cu_q, message", [([1, 3, 8], r"\[0\] must be 0"), ([0, 5, 3], "non-decreasing"),
                                            ([0, 3, 99], "beyond")])
def test_varlen_bad_cu_seqlens(cu_q, message):
    q, _ = _packed([3, 5], 2, 8)
    k, cu_k = _packed([3, 5], 2, 8)
    with pytest.raises(ValueError, match=message):
        fusedattn.attention_varlen(q, k, k, torch.tensor(cu_q, dtype=torch.int32), cu_k, 99, 99)


# ---- KV cache ---------------------------------------------------------------------------------


def _cache(batch, capacity, heads_kv, head_dim, dtype=torch.float32):
    return (torch.randn(batch, capacity, heads_kv, head_dim, dtype=dtype),
            torch.randn(batch, capacity, heads_kv, head_dim, dtype=dtype))


def _paged_copy(k_cache, v_cache, page_size, generator):
    """The (batch, capacity, Hkv, D) caches cut into pages of page_size rows stored in a random
    order: (k_pages, v_pages, block_table int32 (batch, capacity / page_size))."""
    batch, capacity, heads_kv, head_dim = k_cache.shape
    pages_per_seq = capacity // page_size
    table = torch.randperm(batch * pages_per_seq, generator=generator).reshape(batch, -1).to(torch.int32)
    pages = []
    for cache in (k_cache, v_cache):
        paged = torch.empty(batch * pages_per_seq, page_size, heads_kv, head_dim, dtype=cache.dtype)
        paged[table.long()] = cache.reshape(batch, pages_per_seq, page_size, heads_kv, head_dim)
        pages.append(paged)
    return pages[0], pages[1], table


@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvcache_append_then_attend(seqlen_q, dtype):
    """Appending writes exactly the new slots; attention equals plain attention over the cache."""
    k_cache, v_cache = _cache(3, 64, 2, 32, dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor([0, 20, 61 - seqlen_q], dtype=torch.int32)
    q = torch.randn(3, seqlen_q, 4, 32, dtype=dtype)
    k_new, v_new = (torch.randn(3, seqlen_q, 2, 32, dtype=dtype) for _ in range(2))
    out = fusedattn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens)
    for b in range(3):
        n = int(seqlens[b])
        new = slice(n, n + seqlen_q)
        assert torch.equal(k_cache[b, new], k_new[b]) and torch.equal(v_cache[b, new], v_new[b])
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[new] = False
        assert torch.equal(k_cache[b, untouched], k_before[b, untouched])
        assert torch.equal(v_cache[b, untouched], v_before[b, untouched])
        expected = fusedattn.attention(q[b:b + 1], k_cache[b:b + 1, :n + seqlen_q], v_cache[b:b + 1, :n + seqlen_q],
                                       causal=True, layout="bshd")
        _close(out[b:b + 1], expected, tol=0 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("layout", ["contiguous", "paged", "cache_batch_idx", "strided new entries", "numpy",
                                    "bfloat16"])
def test_kvcache_append_writes_exactly_its_slots(layout):
    """The extension writes the new k, v (bindings/sequences.cpp): at each sequence's slots after
    cache_seqlens, through its pages or cache row, from new entries of any strides; every other
    element of the poisoned caches stays as it was."""
    generator = torch.Generator().manual_seed(11)
    dtype = torch.bfloat16 if layout == "bfloat16" else torch.float32
    batch, new_len, heads_kv, head_dim, page = 3, 3, 2, 8, 3
    seqlens = torch.tensor([0, 7, 14], dtype=torch.int32)
    q = torch.randn(batch, new_len, 4, head_dim, generator=generator).to(dtype)
    k_new, v_new = (torch.randn(batch, new_len, heads_kv, head_dim, generator=generator).to(dtype) for _ in range(2))
    options = {}
    if layout == "paged":  # 6 pages of 3 rows per sequence (room for 17 keys), in a shuffled pool of 20
        k_cache, v_cache = (torch.full((20, page, heads_kv, head_dim), 7.0, dtype=dtype) for _ in range(2))
        options["block_table"] = torch.randperm(20, generator=generator)[:18].reshape(batch, 6).to(torch.int32)
    else:
        k_cache, v_cache = (torch.full((4, 18, heads_kv, head_dim), 7.0, dtype=dtype) for _ in range(2))
        if layout == "cache_batch_idx":
            options["cache_batch_idx"] = torch.tensor([2, 0, 3], dtype=torch.int32)
    if layout == "strided new entries":  # every other element of wider arrays, heads and tokens swapped
        k_new, v_new = (torch.randn(batch, heads_kv, new_len, 2 * head_dim).transpose(1, 2)[..., ::2] for _ in range(2))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    versions = (k_cache._version, v_cache._version)
    for b in range(batch):
        for t in range(new_len):
            key = int(seqlens[b]) + t
            if layout == "paged":
                slot = (int(options["block_table"][b, key // page]), key % page)
            else:
                slot = (int(options["cache_batch_idx"][b]) if layout == "cache_batch_idx" else b, key)
            expected_k[slot], expected_v[slot] = k_new[b, t], v_new[b, t]
    arrays = (q, k_cache, v_cache, k_new, v_new)
    if layout == "numpy":
        arrays = tuple(x.numpy() for x in arrays)
        options = {name: x.numpy() for name, x in options.items()}
    out = fusedattn.attention_with_kvcache(*arrays, cache_seqlens=seqlens.numpy() if layout == "numpy" else seqlens,
                                           **options)
    k_after, v_after = (torch.as_tensor(x) for x in arrays[1:3])
    assert torch.equal(k_after, expected_k) and torch.equal(v_after, expected_v)
    if layout != "numpy":  # written in place, as autograd's version counters must say
        assert k_cache._version > versions[0] and v_cache._version > versions[1]
    if layout in ("contiguous", "strided new entries"):  # and attends over the cache with them
        expected = torch.cat([fusedattn.attention(q[b:b + 1], expected_k[b:b + 1, :int(seqlens[b]) + new_len],
                                                  expected_v[b:b + 1, :int(seqlens[b]) + new_len], causal=True,
                                                  layout="bshd") for b in range(batch)])
        _close(torch.as_tensor(out), expected, tol=0)


def test_kvcache_append_from_views_of_the_caches():
    """New entries that are views of the caches themselves are read as they were before the call,
    as a copy of them would be: k from k_cache's own rows written one row on, and v from rows of
    k_cache that the k append overwrites first."""
    for kind in ("torch", "numpy"):
        k_cache = torch.arange(64.0).reshape(1, 16, 1, 4)
        v_cache = -k_cache
        before_k, before_v = k_cache.clone(), v_cache.clone()
        arrays = (torch.randn(1, 2, 1, 4), k_cache, v_cache)
        if kind == "numpy":
            arrays = tuple(x.numpy() for x in arrays)
        q, k_cache_given, v_cache_given = arrays
        k_new, v_new = k_cache_given[:, 2:4], k_cache_given[:, 3:5]  # written at rows 3 and 4 of each cache
        fusedattn.attention_with_kvcache(q, k_cache_given, v_cache_given, k_new, v_new, cache_seqlens=3)
        k_after, v_after = torch.as_tensor(k_cache_given), torch.as_tensor(v_cache_given)
        assert torch.equal(k_after[0, 3:5], before_k[0, 2:4]), kind
        assert torch.equal(v_after[0, 3:5], before_k[0, 3:5]), kind  # (k_cache row 4 was overwritten by then)
        assert torch.equal(k_after[0, :3], before_k[0, :3]) and torch.equal(k_after[0, 5:], before_k[0, 5:])
        assert torch.equal(v_after[0, :3], before_v[0, :3]) and torch.equal(v_after[0, 5:], before_v[0, 5:])


def test_kvcache_append_rejects_what_it_cannot_write():
    """Lengths past int32 (a paged cache of 2**32 slots), new entries that require grad, and (the
    extension's own guard, as the private call sees it) a read-only cache: errors, the caches
    unchanged."""
    q, k_new, v_new = torch.randn(1, 1, 1, 8), torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8)
    k_pages, v_pages = torch.zeros(1, 1024, 1, 8), torch.zeros(1, 1024, 1, 8)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 2147483647 \+ 1 new tokens must stay within"):
        fusedattn.attention_with_kvcache(q, k_pages, v_pages, k_new, v_new, cache_seqlens=2**31 - 1,
                                         block_table=torch.zeros(1, 2**22, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="no_grad"):
        fusedattn.attention_with_kvcache(q, k_pages, v_pages, k_new.requires_grad_(), v_new, cache_seqlens=3)
    assert not k_pages.any() and not v_pages.any()
    from fusedattn import _C, _runtime
    k_cache, v_cache = np.zeros((1, 16, 1, 8), dtype=np.float32), np.zeros((1, 16, 1, 8), dtype=np.float32)
    v_cache.flags.writeable = False
    variant = (8**-0.5, True, 0, -1, -1, 0.0, None, None, None, 0.0, 0, 0)
    with pytest.raises(ValueError, match="v_cache is read-only"):
        _C.attention_kvcache_forward(q.numpy(), k_cache, v_cache, np.empty((1, 1, 1, 8), dtype=np.float32), None,
                                     np.array([3], dtype=np.int32), None, None, None, np.ones((1, 1, 1, 8), np.float32),
                                     np.ones((1, 1, 1, 8), np.float32), variant, _runtime.cpu_isa(), 1)
    assert not k_cache.any()


def test_kvcache_overflow_is_an_error_and_leaves_the_cache_unchanged():
    k_cache, v_cache = _cache(2, 16, 2, 8)
    before = k_cache.clone()
    q = torch.randn(2, 2, 2, 8)
    k_new = torch.randn(2, 2, 2, 8)
    with pytest.raises(ValueError, match="capacity"):
        fusedattn.attention_with_kvcache(q, k_cache, v_cache, k_new, k_new, cache_seqlens=torch.tensor([3, 15]))
    with pytest.raises(ValueError, match="window"):
        fusedattn.attention_with_kvcache(q, k_cache, v_cache, k_new, k_new, cache_seqlens=3, window=(-2, 0))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("append", [False, True], ids=["decode", "append"])
@pytest.mark.parametrize("case, error, message", [
    ("beyond capacity", ValueError, "capacity"),
    ("negative length", ValueError, "capacity"),
    ("page out of range", ValueError, "block_table"),
    ("negative page", ValueError, "block_table"),
    ("lengths shape", ValueError, "cache_seqlens"),
    ("float lengths", TypeError, "cache_seqlens"),
    ("int beyond int32", ValueError, "cache_seqlens"),
    ("int64 lengths beyond int32", ValueError, "cache_seqlens"),
    ("int64 page beyond int32", ValueError, "block_table"),
    ("batch index out of range", ValueError, "cache_batch_idx"),
    ("batch index shape", ValueError, "cache_batch_idx"),
    ("fewer cache rows than the batch", ValueError, "rows"),
    ("leftpad out of range", ValueError, "cache_leftpad"),
    ("table rows", ValueError, "block_table"),
    ("table 1-D", ValueError, "block_table"),
    ("no lengths", TypeError, "cache_seqlens"),
])
def test_kvcache_bad_lengths_and_pages(case, error, message, append):
    """Calls that append are checked by the extension before it writes anything, as calls that
    only read (a decode step) are: both reject the same inputs, naming them, the cache unchanged."""
    k_cache, v_cache = _cache(2, 32, 2, 8)
    k_pages, v_pages = k_cache.reshape(8, 8, 2, 8), v_cache.reshape(8, 8, 2, 8)
    q = torch.randn(2, 1, 2, 8)
    new = {"k": torch.randn(2, 1, 2, 8), "v": torch.randn(2, 1, 2, 8)} if append else {}
    seqlens = torch.tensor([5, 9], dtype=torch.int32)
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
    paged = {"k_cache": k_pages, "v_cache": v_pages, "block_table": table}
    contiguous = {"k_cache": k_cache, "v_cache": v_cache}
    args = {
        "beyond capacity": dict(contiguous, cache_seqlens=torch.tensor([5, 33], dtype=torch.int32)),
        "negative length": dict(contiguous, cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)),
        "page out of range": dict(paged, cache_seqlens=seqlens, block_table=torch.tensor([[0, 1, 2, 3], [8, 5, 6, 7]],
                                                                                          dtype=torch.int32)),
        "negative page": dict(paged, cache_seqlens=seqlens, block_table=torch.tensor([[-3, 1, 2, 3], [4, 5, 6, 7]],
                                                                                      dtype=torch.int32)),
        "lengths shape": dict(contiguous, cache_seqlens=torch.tensor([5, 9, 1], dtype=torch.int32)),
        "float lengths": dict(contiguous, cache_seqlens=torch.tensor([5.0, 9.0])),
        "int beyond int32": dict(contiguous, cache_seqlens=2**32 + 5),
        "int64 lengths beyond int32": dict(contiguous, cache_seqlens=torch.tensor([5, 2**32 + 9])),
        "int64 page beyond int32": dict(paged, cache_seqlens=seqlens,
                                        block_table=torch.tensor([[0, 1, 2, 3], [2**32 + 4, 5, 6, 7]])),
        "batch index out of range": dict(contiguous, cache_seqlens=seqlens,
                                         cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)),
        "batch index shape": dict(contiguous, cache_seqlens=seqlens,
                                  cache_batch_idx=torch.tensor([1], dtype=torch.int32)),
        "fewer cache rows than the batch": dict(k_cache=k_cache[:1], v_cache=v_cache[:1], cache_seqlens=seqlens),
        "leftpad out of range": dict(contiguous, cache_seqlens=seqlens,
                                     cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32)),
        "table rows": dict(paged, cache_seqlens=seqlens, block_table=torch.cat((table, table[:1]))),
        "table 1-D": dict(paged, cache_seqlens=seqlens, block_table=table[0]),
        "no lengths": dict(contiguous, cache_seqlens=None),
    }[case]
    before = (k_cache.clone(), v_cache.clone())
    with pytest.raises(error, match=message):
        fusedattn.attention_with_kvcache(q, **args, **new)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_cuda_index_arguments_from_the_host():
    """The CUDA path's index arguments (_index_on_device, run here with q on the CPU): host values
    are range-checked like the CPU path's, an int spreads over the batch, the result is int32."""
    from fusedattn.inference import _index_on_device

    q = torch.randn(3, 1, 2, 8)
    assert torch.equal(_index_on_device(7, "cache_seqlens", q), torch.full((3,), 7, dtype=torch.int32))
    assert torch.equal(_index_on_device(torch.tensor(7), "cache_seqlens", q), torch.full((3,), 7, dtype=torch.int32))
    table = _index_on_device(np.array([[0, 1], [2, 3], [4, 5]]), "block_table", q)
    assert table.dtype == torch.int32 and table.is_contiguous() and table.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert _index_on_device(None, "cache_leftpad", q) is None
    with pytest.raises(ValueError, match="cache_seqlens must fit in int32"):
        _index_on_device(2**32 + 5, "cache_seqlens", q)
    with pytest.raises(ValueError, match="block_table must fit in int32"):
        _index_on_device(torch.tensor([[0, 2**32 + 1]]), "block_table", q)
    with pytest.raises(TypeError, match="cache_batch_idx"):
        _index_on_device(torch.tensor([0.0, 1.0, 2.0]), "cache_batch_idx", q)


def test_kvcache_pages_of_no_rows_are_an_error():
    """A paged cache whose pages hold no rows is a ValueError (it was a division by zero in the
    extension, which killed the process), with lengths of 0 and as flash-attn's full cache."""
    q, k_pages, v_pages = torch.randn(2, 1, 4, 16), torch.randn(8, 0, 2, 16), torch.randn(8, 0, 2, 16)
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
    with pytest.raises(ValueError, match="at least one row"):
        fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=0, block_table=table)
    with pytest.raises(ValueError, match="at least one row"):
        fusedattn.flash_attn_with_kvcache(q, k_pages, v_pages, block_table=table)


@pytest.mark.parametrize("writes", ["append", "rotary"])
def test_kvcache_unused_table_entries_are_not_checked(writes):
    """Entries of a block table past each sequence's own pages in use may hold anything (here -1),
    whether or not the call writes the cache: the checks go sequence by sequence."""
    generator = torch.Generator().manual_seed(3)
    k_pages, v_pages = (torch.randn(6, 4, 2, 16, generator=generator) for _ in range(2))
    table = torch.tensor([[0, -1, -1, -1, -1, -1], [1, 2, 3, 4, 5, -1]], dtype=torch.int32)  # 3 and 17 tokens
    q = torch.randn(2, 1, 4, 16, generator=generator)
    options = {"append": dict(k=torch.randn(2, 1, 2, 16, generator=generator),
                              v=torch.randn(2, 1, 2, 16, generator=generator)),
               "rotary": dict(rotary_cos=torch.ones(64, 4), rotary_sin=torch.zeros(64, 4))}[writes]  # (identity)
    seqlens = torch.tensor([3, 17], dtype=torch.int32)
    out = fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table, **options)
    total = seqlens + (1 if writes == "append" else 0)
    contiguous = fusedattn.attention_with_kvcache(q, *(x[table.clamp(min=0)].reshape(2, 24, 2, 16)
                                                       for x in (k_pages, v_pages)), cache_seqlens=total)
    _close(out, contiguous, tol=1e-6)


@pytest.mark.parametrize("case, error, message", [
    ("sin alone", ValueError, "rotary_cos and rotary_sin"),
    ("cos alone", ValueError, "rotary_cos and rotary_sin"),
    ("table too short", ValueError, "positions"),
    ("rotary_dim above head_dim", ValueError, "rotary_dim"),
    ("1-D tables", ValueError, "max_positions"),
    ("shapes differ", ValueError, "max_positions"),
    ("integer tables", TypeError, "floating-point"),
    ("numpy tables for torch q", TypeError, "rotary_cos"),
    ("new k of another dtype", TypeError, "dtype"),
])
def test_kvcache_bad_rotary_or_new_entries(case, error, message):
    """Rotary tables and new entries are checked before anything is written: an error naming
    them, and the cache unchanged (rotary_sin alone used to be ignored without a word)."""
    k_cache, v_cache = _cache(2, 32, 2, 16)
    before = (k_cache.clone(), v_cache.clone())
    q, k_new, v_new = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    cos, sin = torch.randn(64, 4), torch.randn(64, 4)
    rotary = {
        "sin alone": dict(rotary_sin=sin),
        "cos alone": dict(rotary_cos=cos),
        "table too short": dict(rotary_cos=cos[:6], rotary_sin=sin[:6]),
        "rotary_dim above head_dim": dict(rotary_cos=torch.randn(64, 12), rotary_sin=torch.randn(64, 12)),
        "1-D tables": dict(rotary_cos=cos[:, 0], rotary_sin=sin[:, 0]),
        "shapes differ": dict(rotary_cos=cos, rotary_sin=sin[:, :2]),
        "integer tables": dict(rotary_cos=cos.int(), rotary_sin=sin.int()),
        "numpy tables for torch q": dict(rotary_cos=cos.numpy(), rotary_sin=sin.numpy()),
        "new k of another dtype": dict(rotary_cos=cos, rotary_sin=sin),
    }[case]
    if case == "new k of another dtype":
        k_new = k_new.bfloat16()
    for new in ({}, {"k": k_new, "v": v_new}):
        if case == "new k of another dtype" and not new:
            continue
        with pytest.raises(error, match=message):
            fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([5, 9], dtype=torch.int32),
                                             **new, **rotary)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_flash_attn_kvcache_full_cache_with_a_list_table():
    """cache_seqlens=None (a full cache) with the block table given as a list, as lists are
    accepted for index arrays elsewhere."""
    q, k_pages, v_pages = torch.randn(2, 1, 4, 16), torch.randn(8, 8, 2, 16), torch.randn(8, 8, 2, 16)
    table = [[0, 1, 2, 3], [4, 5, 6, 7]]
    out = fusedattn.flash_attn_with_kvcache(q, k_pages, v_pages, block_table=table)
    expected = fusedattn.flash_attn_with_kvcache(q, k_pages, v_pages,
                                                 block_table=torch.tensor(table, dtype=torch.int32))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("lengths", [7, [7], (7,)], ids=["int", "list", "tuple"])
def test_kvcache_one_length_for_every_sequence(lengths, kind):
    """An int (or a single length) for cache_seqlens applies to every sequence, with or without an
    append, for torch and numpy callers alike."""
    k_cache, v_cache = _cache(3, 16, 2, 8)
    q = torch.randn(3, 1, 4, 8)
    expected = fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.full((3,), 7, dtype=torch.int32))
    convert = (lambda x: x) if kind == "torch" else (lambda x: x.numpy())
    out = fusedattn.attention_with_kvcache(convert(q), convert(k_cache), convert(v_cache), cache_seqlens=lengths)
    _close(torch.as_tensor(out), expected, tol=0)
    k_new, v_new = torch.randn(3, 1, 2, 8), torch.randn(3, 1, 2, 8)
    appended = fusedattn.attention_with_kvcache(convert(q), convert(k_cache), convert(v_cache), convert(k_new),
                                                convert(v_new), cache_seqlens=lengths)
    assert torch.equal(k_cache[:, 7], k_new[:, 0]) and torch.equal(v_cache[:, 7], v_new[:, 0])
    _close(torch.as_tensor(appended), fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=8), tol=0)


@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_paged_cache_equals_contiguous(page_size):
    """Random, non-monotonic block tables; also appending through the pages."""
    batch, heads_kv, head_dim = 3, 2, 32
    capacity = 512
    pages_per_seq = capacity // page_size
    num_pages = batch * pages_per_seq + 5
    generator = torch.Generator().manual_seed(page_size)
    table = torch.randperm(num_pages, generator=generator)[: batch * pages_per_seq].reshape(batch, -1).to(torch.int32)
    k_pages, v_pages = (torch.randn(num_pages, page_size, heads_kv, head_dim) for _ in range(2))
    k_contig = torch.stack([k_pages[table[b].long()].reshape(-1, heads_kv, head_dim) for b in range(batch)])
    v_contig = torch.stack([v_pages[table[b].long()].reshape(-1, heads_kv, head_dim) for b in range(batch)])
    seqlens = torch.tensor([1, 300, 510], dtype=torch.int32)
    q = torch.randn(batch, 2, 4, head_dim)
    k_new, v_new = (torch.randn(batch, 2, heads_kv, head_dim) for _ in range(2))
    paged = fusedattn.attention_with_kvcache(q, k_pages, v_pages, k_new, v_new, cache_seqlens=seqlens,
                                             block_table=table, softcap=20.0)
    contiguous = fusedattn.attention_with_kvcache(q, k_contig, v_contig, k_new, v_new, cache_seqlens=seqlens,
                                                  softcap=20.0)
    _close(paged, contiguous, tol=0)


@pytest.mark.parametrize("order", ["address", "runs"])
@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("lengths", [[1500, 37, 900], [3000]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_cache_in_address_order(order, page_size, lengths, dtype):
    """Block tables whose pages follow one another in the pool, throughout or in runs of 5 pages
    (the decode kernel leaves such rows to the hardware prefetchers), equal the contiguous cache;
    [3000] alone is split across the threads, so splits start mid-sequence."""
    batch, heads_kv, head_dim, capacity = len(lengths), 2, 64, 3006
    pages_per_seq = -(-capacity // page_size)
    num_pages = batch * pages_per_seq
    if order == "address":
        table = torch.arange(num_pages, dtype=torch.int32).reshape(batch, -1)
    else:
        run = 5
        runs = torch.randperm(-(-num_pages // run), generator=torch.Generator().manual_seed(page_size))
        table = (runs[:, None] * run + torch.arange(run)).flatten()
        table = table[table < num_pages].to(torch.int32).reshape(batch, -1)
    k_pages, v_pages = (torch.randn(num_pages, page_size, heads_kv, head_dim).to(dtype) for _ in range(2))
    k_contig, v_contig = (torch.stack([pages[table[b].long()].reshape(-1, heads_kv, head_dim) for b in range(batch)])
                          for pages in (k_pages, v_pages))
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(batch, 1, 8, head_dim).to(dtype)
    paged = fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    contiguous = fusedattn.attention_with_kvcache(q, k_contig, v_contig, cache_seqlens=seqlens)
    _close(paged, contiguous, tol=0)
    _check_per_sequence(paged, q, k_contig, v_contig, lengths)


def _pool_walk_case(pool, lengths, queries=1, dtype=torch.float32, page_size=16, heads=(16, 8), seed=0):
    """A decode call over a paged cache of about 16 MiB of K+V (fp32; the CPU reads such caches
    in pool order where their tables are shuffled, pool_walk.cpp), in the block-table order `pool`
    names: "shuffled" (a random permutation of the pool), "interleaved" (page p of sequence b
    at p * batch + b, as sequences that grew side by side leave a pool), or "shared" (shuffled,
    and sequence 1 reads sequence 0's first 20 pages, a shared prefix). Returns q and the
    contiguous caches and table."""
    num_heads, num_heads_kv = heads
    batch, head_dim = len(lengths), 64
    generator = torch.Generator().manual_seed(seed)
    pages_per_seq = -(-max(max(lengths) + queries, 1) // page_size)
    num_pages = batch * pages_per_seq
    if pool == "interleaved":
        table = (torch.arange(pages_per_seq)[None, :] * batch + torch.arange(batch)[:, None]).to(torch.int32)
    else:
        table = torch.randperm(num_pages, generator=generator).to(torch.int32).reshape(batch, -1)
        if pool == "shared":
            table[1, :20] = table[0, :20]
    k_pages, v_pages = (torch.randn(num_pages, page_size, num_heads_kv, head_dim, generator=generator).to(dtype)
                        for _ in range(2))
    q = torch.randn(batch, queries, num_heads, head_dim, generator=generator).to(dtype)
    return q, k_pages, v_pages, table


def _check_pool_walk(out, q, k_pages, v_pages, table, lengths, lse=None, **variant):
    """out (and lse) of a decode of q over a paged cache against the fp64 reference per sequence,
    causal from the bottom right, each sequence's keys gathered from its pages in table order
    (and, for bf16, torch's math in bf16 with the same variant: conftest.torch_attention).
    Sequences of no key are left to the caller."""
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        q_b = q[b:b + 1].transpose(1, 2)
        k_b, v_b = (pages[table[b].long()].flatten(0, 1)[None, :n].transpose(1, 2) for pages in (k_pages, v_pages))
        expected, expected_lse = reference.attention_reference(q_b, k_b, v_b, causal=True, **variant)
        torch_lowp = None if q.dtype == torch.float32 else torch_attention(q_b, k_b, v_b, causal=True, **variant)[0]
        assert_close_to_reference(out[b:b + 1].transpose(1, 2), torch_lowp, expected)
        if lse is not None:
            np.testing.assert_allclose(lse[b:b + 1].double().numpy(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pool", ["shuffled", "interleaved", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_in_pool_order(threads, pool, dtype):
    """Shuffled block tables over a large pool: the CPU reads the pages sorted by their place in
    the pool, interleaving the sequences (pool_walk.cpp), and splits the pool between the
    threads, merging each sequence's parts by LSE. Equals the fp64 reference per sequence,
    with lengths that end mid-page, an empty sequence, a sink per head and the LSE."""
    lengths = [2000, 1234, 0, 3001]
    q, k_pages, v_pages, table = _pool_walk_case(pool, lengths, dtype=dtype)
    sinks = torch.randn(q.shape[2], generator=torch.Generator().manual_seed(1))
    fusedattn.set_num_threads(threads)
    out, lse = fusedattn.attention_with_kvcache(q, k_pages, v_pages,
                                                cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                                block_table=table, sinks=sinks, return_lse=True)
    _check_pool_walk(out, q, k_pages, v_pages, table, lengths, lse=lse, sinks=sinks)
    # the sequence of no key: zero output, LSE the sink's logit
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    np.testing.assert_allclose(lse[2, :, 0].numpy(), sinks.numpy(), rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(32, 4, 1), (16, 4, 2)], ids=["group-8", "group-4-two-tokens"])
def test_paged_decode_in_pool_order_two_lane_groups(shape, threads):
    """bf16 kv heads of 8 lanes (one token of a GQA group of 8, two tokens of a group of 4) run as
    two lane groups and take the pool-order walk too (fp32 keeps the table order there). Shuffled
    pages, lengths that end mid-page, causal from the bottom right; against the fp64 reference
    and torch's bf16 math, with the LSE."""
    num_heads, num_heads_kv, queries = shape
    lengths = [2000, 1234, 3001]
    q, k_pages, v_pages, table = _pool_walk_case("shuffled", lengths, queries=queries, dtype=torch.bfloat16,
                                                  heads=(num_heads, num_heads_kv), seed=5)
    fusedattn.set_num_threads(threads)
    out, lse = fusedattn.attention_with_kvcache(q, k_pages, v_pages,
                                                cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                                block_table=table, return_lse=True)
    _check_pool_walk(out, q, k_pages, v_pages, table, lengths, lse=lse)


def test_paged_decode_in_pool_order_from_several_threads():
    """Python threads decoding at once, each over a shuffled pool of its own size: a walk keeps its
    plan, partial results, scratch and decode states per thread (pool_walk.cpp, kept_scratch),
    never shared, so every result equals the same call made alone, bitwise."""
    cases = []
    for i, lengths in enumerate(([1500, 900, 1200], [2000, 700], [600, 1700, 400, 1300])):
        dtype = torch.bfloat16 if i == 1 else torch.float32
        q, k_pages, v_pages, table = _pool_walk_case("shuffled", lengths, dtype=dtype, seed=10 + i)
        cases.append((q, k_pages, v_pages, table, torch.tensor(lengths, dtype=torch.int32)))

    def decode(case):
        q, k_pages, v_pages, table, seqlens = case
        return fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)

    fusedattn.set_num_threads(2)
    alone = [decode(case) for case in cases]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(decode, [cases[i % len(cases)] for i in range(24)]))
    for i, out in enumerate(results):
        assert torch.equal(out, alone[i % len(cases)]), f"call {i}"


@pytest.mark.parametrize("variant", ["window", "alibi", "softcap", "queries"])
def test_paged_decode_in_pool_order_variants(variant):
    """The pool-order walk with the score variants that decode over a cache meets: a sliding
    window (the walk skips pages outside it), ALiBi (key positions from the table), softcap, and
    two query tokens (of a GQA group of 2: one lane group per kv head), causal from the bottom right."""
    lengths = [3000, 2047, 2500, 1800]
    queries = 2 if variant == "queries" else 1
    q, k_pages, v_pages, table = _pool_walk_case("shuffled", lengths, queries=queries, seed=2)
    kwargs = {"window": (2000, 0)} if variant == "window" else {}
    if variant == "alibi":
        kwargs["alibi_slopes"] = torch.rand(q.shape[2], generator=torch.Generator().manual_seed(3)) * 0.01
    if variant == "softcap":
        kwargs["softcap"] = 5.0
    out = fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                           block_table=table, **kwargs)
    _check_pool_walk(out, q, k_pages, v_pages, table, lengths, **kwargs)


def _check_decode(num_heads, num_heads_kv, queries, lengths, capacity, page_size, dtype, seed, head_dim=64):
    """attention_with_kvcache of `queries` new tokens per sequence over caches holding `lengths`
    tokens (contiguous, or in shuffled pages of page_size rows), causal from the bottom right,
    against the fp64 reference per sequence (and torch's low-precision math for bf16)."""
    batch = len(lengths)
    generator = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(batch, capacity, num_heads_kv, head_dim, generator=generator).to(dtype)
                        for _ in range(2))
    q = torch.randn(batch, queries, num_heads, head_dim, generator=generator).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    if page_size is None:
        out = fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
    else:
        k_pages, v_pages, table = _paged_copy(k_cache, v_cache, page_size, generator)
        out = fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)
    _check_per_sequence(out, q, k_cache, v_cache, lengths)


def _check_per_sequence(out, q, k_cache, v_cache, lengths, also_attention=False):
    """out (batch, queries, heads, d) of q over the first lengths[b] rows of each (batch, capacity,
    kv_heads, d) cache, causal from the bottom right, against the fp64 reference per sequence
    (and torch's low-precision math for bf16); also_attention: fusedattn.attention of the same
    (b, s, h, d) slices too."""
    queries = q.shape[1]
    for b, n in enumerate(lengths):
        q_b, k_b, v_b = (x[b:b + 1, :length] for x, length in ((q, queries), (k_cache, n), (v_cache, n)))
        q_t, k_t, v_t = (x.transpose(1, 2) for x in (q_b, k_b, v_b))
        expected, _ = reference.attention_reference(q_t, k_t, v_t, causal=True)
        torch_lowp = None
        if q.dtype != torch.float32:
            visible = torch.arange(n)[None, :] <= torch.arange(n - queries, n)[:, None]
            torch_lowp = torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=visible,
                                                                          enable_gqa=True)
        assert_close_to_reference(out[b:b + 1].transpose(1, 2), torch_lowp, expected)
        if also_attention:
            direct = fusedattn.attention(q_b, k_b, v_b, layout="bshd", causal=True)
            assert_close_to_reference(direct.transpose(1, 2), torch_lowp, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "pool-walk"])
@pytest.mark.parametrize("scores", ["rising", "late-spike"])
def test_decode_running_max_moves(scores, layout, dtype):
    """The decode softmax keeps each lane's running max until a key block's scores rise more
    than 8 above it (lazy rescaling), then moves it and rescales O. Scores that climb by 0.7 per
    key, from -210 to 0, over the first 300 keys the kernel reads (by position in a contiguous
    cache, by place in the pool where it walks shuffled pages in pool order) move the max in
    each key block there; a key 100 above the rest near the end (beyond fp32's exp range from
    the old max) moves it once, late. Only the first query head of each kv head is lifted; the
    others stay near their first max. Against the fp64 reference per sequence, with the LSE."""
    lengths = [2000, 1234, 3001]
    q, k_pages, v_pages, table = _pool_walk_case("shuffled", lengths, dtype=torch.float32, seed=4)
    num_heads, num_heads_kv, page_size = q.shape[2], k_pages.shape[2], k_pages.shape[1]
    group = num_heads // num_heads_kv
    positions = torch.arange(table.shape[1] * page_size)
    for b, n in enumerate(lengths):
        if scores == "rising":
            pool_place = table[b].long().repeat_interleave(page_size) * page_size + positions % page_size
            order = pool_place if layout == "pool-walk" else positions
            rank = torch.empty_like(order)
            rank[order[:n].argsort()] = torch.arange(n)
            lift = 0.7 * (rank.double() - 300).clamp(max=0)
            lift[n:] = 0
        else:
            lift = torch.zeros(len(positions), dtype=torch.float64)
            lift[n - 5] = 100.0
        q_dirs = q[b, 0, ::group].double()  # (kv heads, d): the lifted head of each group
        lift = lift[None, :] * 64 ** 0.5 / (q_dirs.norm(dim=-1)[:, None] ** 2)  # (kv heads, positions)
        rows = k_pages[table[b].long()].flatten(0, 1)  # (positions, kv heads, d)
        rows += (lift.T[:, :, None] * q_dirs[None]).float()
        k_pages[table[b].long()] = rows.reshape(-1, page_size, num_heads_kv, rows.shape[-1])
    q, k_pages, v_pages = (x.to(dtype) for x in (q, k_pages, v_pages))
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    if layout == "pool-walk":
        out, lse = fusedattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table,
                                                    return_lse=True)
    else:
        k_cache, v_cache = (pages[table.long()].flatten(1, 2) for pages in (k_pages, v_pages))
        out, lse = fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, return_lse=True)
    _check_pool_walk(out, q, k_pages, v_pages, table, lengths, lse=lse)


@pytest.mark.parametrize("page_size", [None, 3, 16], ids=["contiguous", "pages-of-3", "pages-of-16"])
@pytest.mark.parametrize("head_dim", [32, 96, 256])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_decode_bf16_value_pairs(heads, head_dim, page_size):
    """bf16 decode at head_dim a multiple of 32 multiplies P by two V rows at once (VDPBF16PS on
    the rows interleaved, each 32 columns of O held in the interleaved order until the block
    writes its output): one to eight 32-column chunks, lengths of one row, odd lengths (a last
    pair with one row) and lengths off the 8-row step, across pages. Against the fp64 reference
    and torch's bf16 math."""
    num_heads, num_heads_kv = heads
    _check_decode(num_heads, num_heads_kv, 1, [1, 2, 7, 17, 130], 144, page_size, torch.bfloat16,
                  seed=head_dim + num_heads, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 3], ids=["contiguous", "pages-of-3"])
@pytest.mark.parametrize("heads", [(3, 3), (5, 5), (6, 3), (10, 5), (8, 2), (3, 1)])
def test_decode_walk_edges(heads, page_size, dtype):
    """The decode kernel scores up to four kv heads per reduction and steps several value rows at
    a time, across pages too: odd kv head counts, lengths that are not a multiple of the step and
    pages of 3 rows take every tail path. Against the fp64 reference, per sequence."""
    num_heads, num_heads_kv = heads
    _check_decode(num_heads, num_heads_kv, 1, [1, 6, 67, 130], 132, page_size, dtype,
                  seed=num_heads * 10 + num_heads_kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 3], ids=["contiguous", "pages-of-3"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (12, 4, 2), (8, 4, 3), (16, 4, 2), (6, 3, 4), (4, 4, 6), (2, 2, 8),
                                   (48, 24, 3), (40, 20, 4)],
                         ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}")
def test_decode_lane_groups(shape, page_size, dtype):
    """Kv heads with 6 or 8 lanes (query tokens x heads of a group: GQA group 8, or a few tokens of
    speculative decoding) run the decode kernel as two lane groups that share the head's K/V rows.
    The last two shapes have 144 and 160 lanes per token, so decode blocks of up to 128 lanes
    (kDecodeBlockLanes) split the heads unevenly. Causal from the bottom right; lengths that are
    not a multiple of the 8-row value steps, pages of 3 rows. Against the fp64 reference."""
    num_heads, num_heads_kv, queries = shape
    _check_decode(num_heads, num_heads_kv, queries, [8, 9, 70, 133], 135, page_size, dtype,
                  seed=num_heads * 100 + num_heads_kv * 10 + queries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 3, 16], ids=["contiguous", "pages-of-3", "pages-of-16"])
@pytest.mark.parametrize("shape", [(32, 32, 8, 128), (32, 32, 8, 72), (32, 32, 4, 128), (64, 16, 2, 128)],
                         ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}-d{s[3]}")
def test_decode_score_chunks(shape, page_size, dtype):
    """The score pass takes rows in chunks of 8, each lane group over the whole chunk, where a
    decode block's kv heads run as two lane groups (8 tokens of MHA, 2 tokens of a GQA group of 4:
    8 lanes per kv head; decode blocks of 128 lanes hold 16 kv heads) or its q rows take more than
    32 KiB (4 tokens of 32 MHA heads, fp32), and its cache rows span 4 KiB or more (bf16 too at
    head_dim 128). head_dim 72 converts each K row into scratch (fp32). Lengths that are not a
    multiple of the chunk, pages of 3 rows that split it. Against the fp64 reference."""
    num_heads, num_heads_kv, queries, head_dim = shape
    _check_decode(num_heads, num_heads_kv, queries, [8, 13, 70, 133], 144, page_size, dtype,
                  seed=num_heads * 100 + num_heads_kv * 10 + queries, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 3, 16], ids=["contiguous", "pages-of-3", "pages-of-16"])
@pytest.mark.parametrize("shape", [(10, 2, 1, 64), (14, 2, 1, 64), (4, 4, 5, 64), (4, 4, 7, 64), (40, 8, 1, 128),
                                   (28, 4, 1, 72)], ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}-d{s[3]}")
def test_decode_uneven_lane_groups(shape, page_size, dtype):
    """Kv heads with 5 or 7 lanes (one token of a GQA group of 5 or 7, as Qwen2.5's 40 / 8 and
    28 / 4 heads; 5 or 7 tokens of MHA) run the decode kernel as two lane groups of 3 + 2 and
    4 + 3 lanes: 40 / 8 heads in fp32 (4 KiB rows) score in chunks, head_dim 72 converts each row.
    Against the fp64 reference, per sequence."""
    num_heads, num_heads_kv, queries, head_dim = shape
    _check_decode(num_heads, num_heads_kv, queries, [1, 9, 70, 133], 144, page_size, dtype,
                  seed=num_heads * 100 + num_heads_kv * 10 + queries, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(10, 2, 1), (28, 4, 1), (4, 4, 7)], ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}")
def test_decode_uneven_lane_groups_head_major(shape, dtype):
    """The same lane groups over caches stored (B, Hkv, L, D), one decode block per kv head group,
    through attention_with_kvcache and attention."""
    num_heads, num_heads_kv, queries = shape
    lengths = [5, 70, 133]
    generator = torch.Generator().manual_seed(num_heads + queries)
    k_cache, v_cache = (torch.randn(len(lengths), num_heads_kv, 140, 64, generator=generator).to(dtype)
                        .transpose(1, 2) for _ in range(2))
    q = torch.randn(len(lengths), queries, num_heads, 64, generator=generator).to(dtype)
    out = fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
    _check_per_sequence(out, q, k_cache, v_cache, lengths, also_attention=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [None, 3, 16], ids=["contiguous", "pages-of-3", "pages-of-16"])
@pytest.mark.parametrize("shape", [(8, 2, 3, 128), (8, 2, 4, 64), (16, 2, 2, 96), (12, 3, 4, 64), (4, 4, 16, 32),
                                   (8, 2, 4, 72), (8, 2, 6, 96), (16, 2, 4, 64), (8, 2, 8, 128), (6, 2, 3, 64),
                                   (28, 4, 2, 128), (10, 2, 2, 32), (6, 2, 5, 96), (28, 4, 3, 64), (4, 4, 10, 64)],
                         ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}-d{s[3]}")
def test_decode_many_lane_groups(shape, page_size, dtype):
    """Kv heads of 9-16 lanes (several tokens of a GQA group: 3 tokens of a group of 3 or 4, 2 of a
    group of 5, 7 or 8, 4 of a group of 4; 12 or 16 tokens of MHA in bf16/fp16), and in bf16 GQA
    up to 32 lanes (21 to 32: 3 tokens of a group of 7, 6 or 8 of a group of 4), run the decode
    kernel as lane groups of 4 and a last one of the rest, each over the whole key block; bf16 at
    head_dim 32-128 keeps each group's q rows in registers (dot_rows_bf16), head_dim 72 converts
    each K row. 10 tokens of MHA and the fp32/fp16 21-32-lane shapes take the transposed tile,
    checked here as well, as do the bf16 shapes of 9+ lanes on the avx512amx ISA (AMX products;
    the next test pins the decode kernel's bf16 groups there). Lengths that are not a multiple
    of the value steps, pages of 3 rows. Against the fp64 reference, per sequence."""
    num_heads, num_heads_kv, queries, head_dim = shape
    _check_decode(num_heads, num_heads_kv, queries, [16, 19, 70, 133], 144, page_size, dtype,
                  seed=num_heads * 100 + num_heads_kv * 10 + queries, head_dim=head_dim)


@pytest.mark.skipif("avx512bf16" not in ISAS, reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("page_size", [None, 3], ids=["contiguous", "pages-of-3"])
@pytest.mark.parametrize("shape", [(8, 2, 3, 128), (8, 2, 8, 128), (28, 4, 3, 64), (4, 4, 16, 32), (8, 2, 4, 72)],
                         ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}-d{s[3]}")
def test_decode_many_lane_groups_bf16_on_vdpbf16ps(shape, page_size):
    """The bf16 shapes of 9-32 lanes per kv head under the avx512bf16 ISA, whose decode kernel
    takes them (dot_rows_bf16's q in registers, 12 and 16 tokens of MHA, head_dim 72 converted),
    where the avx512amx ISA would give them to the AMX tile: so CPUs with AMX test them too."""
    num_heads, num_heads_kv, queries, head_dim = shape
    with force_isa("avx512bf16"):
        _check_decode(num_heads, num_heads_kv, queries, [16, 19, 70, 133], 144, page_size, torch.bfloat16,
                      seed=num_heads * 100 + num_heads_kv * 10 + queries, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 3, 16], ids=["contiguous", "pages-of-3", "pages-of-16"])
@pytest.mark.parametrize("head_dim", [33, 64])
@pytest.mark.parametrize("shape", [(12, 2, 3), (8, 2, 5), (4, 4, 9)], ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}")
def test_transposed_tile_over_a_cache(shape, head_dim, page_size, dtype):
    """Kv heads with more lanes than the decode kernel takes (3 tokens of a GQA group of 6 or 5
    of a group of 4: 18 or 20 lanes, in fp32, and in bf16 at head_dim 33, whose q rows
    dot_rows_bf16 does not hold; 9 tokens of MHA) run the transposed tile. Its bf16 keys are
    copied row by row as pairs from pages that split a key block, and also from a contiguous cache
    for blocks one vector of lanes wide (16 lanes or fewer, here MHA's); an odd head_dim zero-pads
    the last pair. Against the fp64 reference."""
    num_heads, num_heads_kv, queries = shape
    _check_decode(num_heads, num_heads_kv, queries, [9, 17, 70, 133], 144, page_size, dtype,
                  seed=head_dim * 1000 + num_heads * 100 + num_heads_kv * 10 + queries, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 32, 1, (9, 70, 133)), (32, 8, 1, (9, 70, 133)), (16, 4, 2, (9, 70, 133)),
                                   (16, 16, 8, (9, 70, 133)), (8, 2, 1, (1500,))],
                         ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}-b{len(s[3])}")
def test_decode_head_major_cache(shape, dtype):
    """Caches stored (B, Hkv, L, D) and passed as (B, L, Hkv, D) views, as Hugging Face keeps them:
    a row's kv head parts lie a whole head apart, so decode blocks take one kv head group each
    (one long sequence: split along the keys too) and prefetch and stage V part by part.
    attention_with_kvcache and attention (the integration's call) against the fp64 reference per
    sequence."""
    num_heads, num_heads_kv, queries, lengths = shape
    batch, capacity, head_dim = len(lengths), max(lengths) + 7, 64
    generator = torch.Generator().manual_seed(num_heads * 10 + num_heads_kv + queries)
    k_cache, v_cache = (torch.randn(batch, num_heads_kv, capacity, head_dim, generator=generator).to(dtype)
                        .transpose(1, 2) for _ in range(2))
    q = torch.randn(batch, queries, num_heads, head_dim, generator=generator).to(dtype)
    out = fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
    _check_per_sequence(out, q, k_cache, v_cache, lengths, also_attention=True)


def test_kvcache_leftpad_and_batch_idx():
    k_cache, v_cache = _cache(4, 40, 2, 16)
    q = torch.randn(2, 1, 2, 16)
    seqlens = torch.tensor([30, 12], dtype=torch.int32)
    leftpad = torch.tensor([5, 0], dtype=torch.int32)
    rows = torch.tensor([3, 1], dtype=torch.int32)
    out = fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                           cache_batch_idx=rows)
    for b in range(2):
        keys = slice(int(leftpad[b]), int(seqlens[b]))
        row = int(rows[b])
        expected = fusedattn.attention(q[b:b + 1], k_cache[row:row + 1, keys], v_cache[row:row + 1, keys],
                                       causal=True, layout="bshd")
        _close(out[b:b + 1], expected, tol=0)


@pytest.mark.parametrize("interleaved", [True, False])
def test_kvcache_rotary(interleaved):
    """q and the new k are rotated at positions cache_seqlens + t before attending."""
    head_dim, rotary_dim = 16, 8
    k_cache, v_cache = _cache(1, 32, 1, head_dim)
    reference_cache = k_cache.clone()
    positions = torch.arange(32, dtype=torch.float64)
    angles = positions[:, None] / (100.0 ** (torch.arange(rotary_dim // 2) / (rotary_dim // 2)))
    cos, sin = angles.cos().float(), angles.sin().float()
    q, k_new, v_new = torch.randn(1, 2, 1, head_dim), torch.randn(1, 2, 1, head_dim), torch.randn(1, 2, 1, head_dim)

    def rotate(x, start):
        y = x.clone()
        c, s = cos[start:start + x.shape[1]][None, :, None, :], sin[start:start + x.shape[1]][None, :, None, :]
        if interleaved:
            x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
            y[..., 0:rotary_dim:2], y[..., 1:rotary_dim:2] = x1 * c - x2 * s, x1 * s + x2 * c
        else:
            x1, x2 = x[..., : rotary_dim // 2], x[..., rotary_dim // 2: rotary_dim]
            y[..., : rotary_dim // 2], y[..., rotary_dim // 2: rotary_dim] = x1 * c - x2 * s, x1 * s + x2 * c
        return y

    out = fusedattn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=10, rotary_cos=cos,
                                           rotary_sin=sin, rotary_interleaved=interleaved)
    reference_cache[:, 10:12] = rotate(k_new, 10)
    _close(k_cache[:, :12], reference_cache[:, :12], tol=1e-6)
    expected = fusedattn.attention(rotate(q, 10), reference_cache[:, :12], v_cache[:, :12], causal=True,
                                   layout="bshd")
    _close(out, expected, tol=1e-5)


def test_kvcache_numpy():
    k_cache, v_cache = (np.random.randn(2, 20, 1, 8).astype(np.float32) for _ in range(2))
    q = np.random.randn(2, 1, 2, 8).astype(np.float32)
    out = fusedattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=np.array([5, 20], dtype=np.int32))
    assert isinstance(out, np.ndarray)
    expected = fusedattn.attention(q[:1], k_cache[:1, :5], v_cache[:1, :5], layout="bshd")
    np.testing.assert_allclose(out[:1], expected, rtol=0, atol=1e-6)


# ---- split-KV and merging ---------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_split_kv_decode_matches_reference(threads, heads):
    """Few (batch, kv head) blocks and long keys: the key axis is split and merged by LSE."""
    num_heads, num_heads_kv = heads
    q = torch.randn(1, num_heads, 1, 64)
    k, v = (torch.randn(1, num_heads_kv, 3000, 64) for _ in range(2))
    sinks = torch.randn(num_heads)
    fusedattn.set_num_threads(threads)
    out, lse = fusedattn.attention(q, k, v, sinks=sinks, return_lse=True)
    expected, expected_lse = reference.attention_reference(q, k, v, sinks=sinks)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse.numpy(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 8, 4), (28, 4, 2), (32, 8, 8)], ids=lambda s: f"h{s[0]}-kv{s[1]}-q{s[2]}")
def test_split_kv_decode_many_lane_groups(shape, dtype, threads):
    """One long sequence of several query tokens per GQA group (16, 14 and, in bf16, 32 lanes per
    kv head: the decode kernel's many lane groups) is split along the keys and merged by LSE;
    causal from the bottom right (fp32 with sinks, which SDPA's bf16 comparison lacks), against
    the fp64 reference, the LSE too."""
    num_heads, num_heads_kv, queries = shape
    generator = torch.Generator().manual_seed(num_heads + queries)
    q = torch.randn(1, queries, num_heads, 128, generator=generator).to(dtype)
    k, v = (torch.randn(1, 3000, num_heads_kv, 128, generator=generator).to(dtype) for _ in range(2))
    sinks = torch.randn(num_heads, generator=generator) if dtype == torch.float32 else None
    fusedattn.set_num_threads(threads)
    out, lse = fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=3000, sinks=sinks, return_lse=True)
    q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
    expected, expected_lse = reference.attention_reference(q_t, k_t, v_t, causal=True, sinks=sinks)
    torch_lowp = None
    if dtype != torch.float32:
        visible = torch.arange(3000)[None, :] <= torch.arange(3000 - queries, 3000)[:, None]
        torch_lowp = torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=visible, enable_gqa=True)
    assert_close_to_reference(out.transpose(1, 2), torch_lowp, expected)
    np.testing.assert_allclose(lse.numpy(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "pages-of-16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_key_splits_of_whole_rows(batch, page_size, threads):
    """Decode of fewer sequences than twice the threads over long caches: each sequence's heads
    stay in one block, so cache rows are read whole, and its key axis is split instead (the
    planner splits heads only for short caches or fp64). GQA with sinks, a window reaching across
    the splits, lengths that are no multiple of 64; against the fp64 reference, out and LSE."""
    num_heads, num_heads_kv, head_dim, capacity = 8, 2, 32, 1600
    lengths = [1599, 1100, 1537][:batch]  # visible spans >= 1536: key splits for every thread count here
    generator = torch.Generator().manual_seed(batch * 10 + threads)
    k_cache, v_cache = (torch.randn(batch, capacity, num_heads_kv, head_dim, generator=generator) for _ in range(2))
    q = torch.randn(batch, 1, num_heads, head_dim, generator=generator)
    sinks = torch.randn(num_heads, generator=generator)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    kwargs = {"cache_seqlens": seqlens, "sinks": sinks, "window": (1540, 0), "return_lse": True}
    caches = (k_cache, v_cache)
    if page_size is not None:
        *caches, table = _paged_copy(k_cache, v_cache, page_size, generator)
        kwargs["block_table"] = table
    fusedattn.set_num_threads(threads)
    out, lse = fusedattn.attention_with_kvcache(q, *caches, **kwargs)
    for b, n in enumerate(lengths):
        q_b, k_b, v_b = (x[b:b + 1, :length].transpose(1, 2) for x, length in ((q, 1), (k_cache, n), (v_cache, n)))
        expected, expected_lse = reference.attention_reference(q_b, k_b, v_b, causal=True, window=(1540, 0),
                                                               sinks=sinks)
        assert_close_to_reference(out[b:b + 1].transpose(1, 2), None, expected)
        np.testing.assert_allclose(lse[b:b + 1].numpy(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [2, 4])
def test_decode_long_sequence_among_short_ones(threads):
    """One long cache next to short ones: the long sequence's block carries most of the work, so
    it is split along its keys even though the short ones make enough blocks. Against the fp64
    reference, out and LSE."""
    lengths = [2900, 40, 70, 1]
    batch, capacity, num_heads, num_heads_kv, head_dim = len(lengths), 2900, 8, 2, 32
    generator = torch.Generator().manual_seed(threads)
    k_cache, v_cache = (torch.randn(batch, capacity, num_heads_kv, head_dim, generator=generator) for _ in range(2))
    q = torch.randn(batch, 1, num_heads, head_dim, generator=generator)
    fusedattn.set_num_threads(threads)
    out, lse = fusedattn.attention_with_kvcache(q, k_cache, v_cache, return_lse=True,
                                                cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
    for b, n in enumerate(lengths):
        q_b, k_b, v_b = (x[b:b + 1, :length].transpose(1, 2) for x, length in ((q, 1), (k_cache, n), (v_cache, n)))
        expected, expected_lse = reference.attention_reference(q_b, k_b, v_b, causal=True)
        assert_close_to_reference(out[b:b + 1].transpose(1, 2), None, expected)
        np.testing.assert_allclose(lse[b:b + 1].numpy(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_two_halves_equals_whole(layout, dtype):
    q = torch.randn(2, 4, 9, 32, dtype=dtype)
    k, v = (torch.randn(2, 4, 50, 32, dtype=dtype) for _ in range(2))
    view = (lambda x: x.transpose(1, 2)) if layout == "bshd" else (lambda x: x)
    a = fusedattn.attention(view(q), view(k[:, :, :20]), view(v[:, :, :20]), layout=layout, return_lse=True)
    b = fusedattn.attention(view(q), view(k[:, :, 20:]), view(v[:, :, 20:]), layout=layout, return_lse=True)
    out, lse = fusedattn.merge_attention_states(a[0], a[1], b[0], b[1], layout=layout)
    whole, whole_lse = fusedattn.attention(view(q), view(k), view(v), layout=layout, return_lse=True)
    _close(out, whole, tol=1e-6 if dtype == torch.float32 else 1e-12)
    _close(lse, whole_lse, tol=1e-6 if dtype == torch.float32 else 1e-12)


def test_merge_with_a_fully_masked_part_and_list_form():
    q = torch.randn(1, 2, 5, 16)
    k, v = (torch.randn(1, 2, 12, 16) for _ in range(2))
    hidden = torch.zeros(1, 1, 5, 6, dtype=torch.bool)  # the first half sees nothing
    a = fusedattn.attention(q, k[:, :, :6], v[:, :, :6], attn_mask=hidden, return_lse=True)
    b = fusedattn.attention(q, k[:, :, 6:], v[:, :, 6:], return_lse=True)
    assert torch.isneginf(a[1]).all()
    out, lse = fusedattn.merge_attention_states_list([a[0], b[0]], [a[1], b[1]])
    _close(out, b[0], tol=0)
    _close(lse, b[1], tol=0)
    both_empty = fusedattn.merge_attention_states(a[0], a[1], a[0], a[1])
    assert torch.equal(both_empty[0], torch.zeros_like(a[0])) and torch.isneginf(both_empty[1]).all()
    out_np, lse_np = fusedattn.merge_attention_states(a[0].numpy(), a[1].numpy(), b[0].numpy(), b[1].numpy())
    np.testing.assert_allclose(out_np, b[0].numpy(), rtol=0, atol=0)


def test_merge_gradients_where_every_part_is_empty():
    """Rows where every part's LSE is -inf (no key anywhere) merge to 0 and -inf with zero, not
    NaN, gradients (torch.logsumexp's backward gave NaN there); with one part empty, gradcheck
    in float64."""
    generator = torch.Generator().manual_seed(6)
    outs = [torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator).requires_grad_() for _ in range(3)]
    lses = [torch.randn(2, 3, 4, dtype=torch.float64, generator=generator) for _ in range(3)]
    lses[1][0, 0, 0] = float("-inf")  # one part empty
    assert torch.autograd.gradcheck(lambda *a: fusedattn.merge_attention_states_list(list(a[:3]), list(a[3:])),
                                    (*outs, *(x.clone().requires_grad_() for x in lses)))
    for x in lses:
        x[1, 2, 3] = float("-inf")  # every part empty (the merged LSE -inf: no finite differences there)
    lses = [x.requires_grad_() for x in lses]
    out, lse = fusedattn.merge_attention_states_list(outs, lses)
    assert torch.equal(out[1, 2, 3], torch.zeros(5, dtype=torch.float64)) and lse[1, 2, 3] == float("-inf")
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for x in outs + lses:
        assert torch.isfinite(x.grad).all()
        assert (x.grad[1, 2, 3] == 0).all()


def _kvcache_step(q, k_cache, v_cache, k, v, seqlens, table, rotary):
    """One decode step as compiled code would write it: append, attend, return out and LSE
    (seqlens None: flash_attn_with_kvcache over the full cache)."""
    if seqlens is None:
        out, lse = fusedattn.flash_attn_with_kvcache(q, k_cache, v_cache, block_table=table, causal=True,
                                                     return_softmax_lse=True)
        return out * 2.0, lse
    cos, sin = rotary if rotary is not None else (None, None)
    out, lse = fusedattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                                window=(40, -1), softcap=30.0, rotary_cos=cos, rotary_sin=sin,
                                                return_lse=True)
    return out * 2.0, lse


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("case", ["contiguous", "paged", "no-append", "int-seqlens", "lists", "rotary", "flash-attn"])
def test_kvcache_torch_compile(case, dynamic):
    """attention_with_kvcache under torch.compile(fullgraph=True) (any graph break raises) goes
    through fusedattn::attention_kvcache: output, LSE and both caches (appended in place) equal
    eager mode's, for a contiguous and a paged cache, with and without new k/v, lengths as a
    tensor, an int or a list (with the block table a list), with rotary embeddings, and
    flash_attn_with_kvcache over a full cache; with dynamic=True over two batch sizes."""
    torch._dynamo.reset()
    compiled = torch.compile(_kvcache_step, fullgraph=True, dynamic=dynamic)
    for batch in (2, 3) if dynamic else (2,):
        generator = torch.Generator().manual_seed(batch)
        q = torch.randn(batch, 2, 8, 32, generator=generator)
        k, v = (torch.randn(batch, 2, 2, 32, generator=generator) for _ in range(2))
        k_cache, v_cache = (torch.randn(batch, 64, 2, 32, generator=generator) for _ in range(2))
        table = None
        if case in ("paged", "lists"):
            k_cache, v_cache, table = _paged_copy(k_cache, v_cache, 16, generator)
        seqlens = {"int-seqlens": 37, "flash-attn": None}.get(case, torch.tensor([37, 5, 60][:batch], dtype=torch.int32))
        if case == "lists":
            seqlens, table = seqlens.tolist(), table.tolist()
        rotary = (torch.randn(64, 16, generator=generator), torch.randn(64, 16, generator=generator)) \
            if case == "rotary" else None
        if case in ("no-append", "flash-attn"):
            k = v = None
        results = []
        for fn in (_kvcache_step, compiled):
            caches = (k_cache.clone(), v_cache.clone())
            out, lse = fn(q, *caches, k, v, seqlens, table, rotary)
            results.append((out, lse) + caches)
        for eager, comp in zip(*results):
            torch.testing.assert_close(comp, eager, atol=1e-6, rtol=1e-6)
        if k is not None:
            assert not torch.equal(results[0][2], k_cache), "the step appended nothing"


def test_opcheck_attention_kvcache():
    """torch.library.opcheck of fusedattn::attention_kvcache: schema (k_cache and v_cache written
    in place, nothing else), fake kernel, dispatch."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 16, generator=generator)
    k, v = (torch.randn(2, 1, 2, 16, generator=generator) for _ in range(2))
    k_cache, v_cache = (torch.randn(2, 24, 2, 16, generator=generator) for _ in range(2))
    seqlens = torch.tensor([7, 20], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fusedattn.attention_kvcache.default,
                          (q, k_cache, v_cache, k, v, seqlens, None, None, None, None, None, None, None, None, True,
                           -1, -1, 0.0, True))


def test_kvcache_tensor_subclass_caches():
    """Caches held as nn.Parameter (a tensor subclass) take the op in eager mode too: the op's
    kernel runs attention_with_kvcache on plain views of them, so the append lands in their
    storage and the result equals plain tensors'."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 16, generator=generator)
    k, v = (torch.randn(2, 1, 2, 16, generator=generator) for _ in range(2))
    k_cache, v_cache = (torch.randn(2, 24, 2, 16, generator=generator) for _ in range(2))
    seqlens = torch.tensor([7, 20], dtype=torch.int32)
    plain = (k_cache.clone(), v_cache.clone())
    held = tuple(torch.nn.Parameter(c.clone(), requires_grad=False) for c in (k_cache, v_cache))
    expected = fusedattn.attention_with_kvcache(q, *plain, k, v, cache_seqlens=seqlens)
    with torch.no_grad():
        out = fusedattn.attention_with_kvcache(q, *held, k, v, cache_seqlens=seqlens)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for cache, reference_cache in zip(held, plain):
        torch.testing.assert_close(cache.detach(), reference_cache, atol=0, rtol=0)


def _varlen_step(q, k, v, cu_seqlens, flash):
    """One packed-batch call as compiled code would write it (flash: the flash-attn drop-in)."""
    if flash:
        return fusedattn.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 15, 15, causal=True) * 2.0
    return fusedattn.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, 15, 15, causal=True, window=(6, -1)) * 2.0


@pytest.mark.parametrize("flash", [False, True], ids=["attention_varlen", "flash_attn_varlen_func"])
def test_varlen_torch_compile(flash):
    """attention_varlen and flash_attn_varlen_func under torch.compile(fullgraph=True) (any graph
    break raises): output and the gradients of q, k, v equal eager mode's."""
    torch._dynamo.reset()
    compiled = torch.compile(_varlen_step, fullgraph=True)
    cu_seqlens = torch.tensor([0, 5, 5, 20], dtype=torch.int32)  # lengths 5, 0, 15
    results = []
    for fn in (_varlen_step, compiled):
        generator = torch.Generator().manual_seed(1)
        q = torch.randn(20, 4, 16, generator=generator).requires_grad_()
        k, v = (torch.randn(20, 2, 16, generator=generator).requires_grad_() for _ in range(2))
        out = fn(q, k, v, cu_seqlens, flash)
        out.square().sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=1e-6)
