"""Inference APIs: variable-length batches, KV-cache attention (contiguous or paged), merging
attention states, and their flash-attn drop-ins.

    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
        packed (total, heads, head_dim) sequences; forward and backward (autograd).
    attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, ...)
        appends k/v in place at cache_seqlens, then attends; bottom-right causal.
    merge_attention_states(out_a, lse_a, out_b, lse_b) / merge_attention_states_list(outs, lses)

Causal masks are bottom-right within each sequence, as in flash-attn. The split of long key
axes across threads (split-KV decode) and the packing of a GQA group's query heads into one
block happen inside the kernel driver (csrc/cpu/attention_cpu.cpp); nothing to set here.
"""

from __future__ import annotations

import numpy as np

from . import _C, _arrays, _runtime
from .functional import _Call, _integer, _scale, _window_pair

__all__ = [
    "attention_varlen",
    "flash_attn_varlen_func",
    "attention_with_kvcache",
    "flash_attn_with_kvcache",
    "merge_attention_states",
    "merge_attention_states_list",
]


def _check_int32(low, high, name):
    """ValueError unless index values in [low, high] fit in int32 (else they would wrap around)."""
    if not -2**31 <= low <= high < 2**31:
        raise ValueError(f"{name} must fit in int32 (its entries would wrap around)")


def _int32(x, name, reference):
    """An index array as contiguous int32 of reference's kind (torch or numpy); a Python int as a
    one-element numpy array whatever the reference (the extension reads either kind, and a torch
    tensor made from an int cost a decode call about 3 µs)."""
    if isinstance(x, int) and not isinstance(x, bool):
        _check_int32(x, x, name)
        return np.full(1, x, dtype=np.int32)
    if x is None:
        raise TypeError(f"{name} must be an int or an integer array, got None")
    if _arrays.is_torch(reference):
        torch = _arrays.torch_module()
        if type(x) is torch.Tensor and x.dtype == torch.int32 and x.is_cpu and x.is_contiguous():
            return x  # already what the extension reads: a decode step's lengths and block table (~1 µs each)
        x = torch.as_tensor(x)
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {x.device}; index arrays go on the CPU (or q's GPU)")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer array, got {x.dtype}")
        if x.dtype != torch.int32 and x.numel():
            _check_int32(int(x.min()), int(x.max()), name)
        return x.to(device="cpu", dtype=torch.int32).contiguous()
    if hasattr(x, "__dlpack__") and not _arrays.is_torch(x):  # (np.asarray makes them 0-d object arrays)
        x = _arrays.as_array(x, name)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got {x.dtype}")
    if x.dtype != np.int32 and x.size:
        _check_int32(int(x.min()), int(x.max()), name)
    return np.ascontiguousarray(x, dtype=np.int32)


# ---- variable-length batches ------------------------------------------------------------------


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     window=(-1, -1), alibi_slopes=None, softcap=0.0, sinks=None, dropout_p=0.0, seed=None,
                     return_lse=False):
    """Attention over packed variable-length sequences (flash-attn's varlen layout).

    Args:
        q: (total_q, num_heads, head_dim); sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1].
        k, v: (total_k, num_heads_kv, head_dim), split by cu_seqlens_k.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative lengths starting at 0.
        max_seqlen_q, max_seqlen_k: accepted for flash-attn compatibility (the kernel reads the
            lengths from cu_seqlens); they must bound the real lengths.
        The rest as in fusedattn.attention (causal is bottom-right per sequence).

    Returns:
        out (total_q, num_heads, head_dim), and lse (num_heads, total_q) when return_lse.
    """
    names = ("q", "k", "v")
    arrays = []
    for x, name in zip((q, k, v), names):
        x = _arrays.as_array(x, name)
        _arrays.check_rank(x, 3, name, "(total, heads, head_dim)")
        arrays.append(x)
    q, k, v = arrays
    if _arrays.is_cuda(q):
        return _varlen_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, scale=scale,
                            window=window, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                            seed=seed, return_lse=return_lse)
    cu_q, cu_k = _int32(cu_seqlens_q, "cu_seqlens_q", q), _int32(cu_seqlens_k, "cu_seqlens_k", q)
    # A host-side check, not of cu_seqlens without data (compile traces, fake tensors: make_fx); the
    # kernel validates cu_seqlens itself.
    if not _arrays.is_compiling() and not _arrays.is_tensor_subclass(cu_q):
        max_seqlen_q, max_seqlen_k = _integer(max_seqlen_q, "max_seqlen_q"), _integer(max_seqlen_k, "max_seqlen_k")
        lengths_q, lengths_k = np.diff(np.asarray(cu_q)), np.diff(np.asarray(cu_k))
        if len(lengths_q) and (lengths_q.max() > max_seqlen_q or lengths_k.max() > max_seqlen_k):
            raise ValueError("max_seqlen_q / max_seqlen_k are smaller than the longest sequence in cu_seqlens")
    # (total, heads, d) viewed as (1, total, heads, d): the kernels' bshd layout with batch 1.
    call = _Call(q[None], k[None], v[None], layout="bshd", names=names, causal=causal, scale=scale, q_offset=0,
                 window=window, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                 seed=seed)
    if _arrays.is_torch(q):
        call.check_no_slope_gradient()  # (their gradient was silently None)
        mode = _arrays.torch_mode(*(x for x in (q, k, v, call.sinks) if x is not None))
        if mode != "direct":
            from . import _torch_varlen

            call.check_devices()
            run = _torch_varlen.varlen_forward if mode == "op" else _torch_varlen.EagerVarlen.apply
            out, lse = run(call.q[0], call.k[0], call.v[0], cu_q, cu_k, *call.op_args())
            out = call.unpad(out)
            return (out, lse) if return_lse else out
    q, k, v = call.q[0], call.k[0], call.v[0]  # (padded where v's head_dim is not q's: see _Call)
    out = _arrays.empty_like_kind(q, q.shape)
    lse = _arrays.empty_like_kind(q, (q.shape[1], q.shape[0]), _arrays.lse_dtype_of(q)) if return_lse else None
    variant = call.variant(_arrays.float64_contiguous(call.alibi_slopes), _arrays.float64_contiguous(call.sinks))
    _C.attention_varlen_forward(call.bhsd(q[None]), call.bhsd(k[None]), call.bhsd(v[None]), call.bhsd(out[None]),
                                None if lse is None else lse[None], cu_q, cu_k, variant, _runtime.cpu_isa(),
                                _runtime.get_num_threads(), names)
    clear_rows_after_last_sequence(out, lse, int(cu_q[-1]))
    out = call.unpad(out)
    return (out, lse) if return_lse else out


def clear_rows_after_last_sequence(out, lse, end: int) -> None:
    """Packed rows past cu_seqlens_q[-1] belong to no sequence: output 0, LSE -inf."""
    if end < out.shape[0]:
        out[end:] = 0
        if lse is not None:
            lse[:, end:] = -np.inf


def _cu_seqlens_cuda(x, name, q, total, max_seqlen):
    """cu_seqlens as contiguous int32 on q's GPU. CUDA tensors stay on the device unread (no host
    sync: the kernel reads them and clamps them to the packed rows); host arrays are checked here
    first, as the CPU path checks them, then copied over."""
    torch = _arrays.torch_module()
    if _arrays.is_cuda(x):
        if x.is_floating_point():
            raise TypeError(f"{name} must be an integer array, got {x.dtype}")
        return x.to(torch.int32).contiguous()
    cu = np.asarray(_int32(x, name, q))
    if cu.ndim != 1 or len(cu) < 1:
        raise ValueError(f"{name} must have shape (batch + 1,), got {cu.shape}")
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu[0]}")
    lengths = np.diff(cu)
    if (lengths < 0).any():
        b = int(np.argmax(lengths < 0)) + 1
        raise ValueError(f"{name} must be non-decreasing, but entry {b} < entry {b - 1}")
    if cu[-1] > total:
        raise ValueError(f"{name} ends at {cu[-1]}, beyond the {total} packed rows")
    if len(lengths) and lengths.max() > max_seqlen:
        raise ValueError("max_seqlen_q / max_seqlen_k are smaller than the longest sequence in cu_seqlens")
    return torch.from_numpy(cu).to(q.device)


def _varlen_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, return_lse, **options):
    """attention_varlen on CUDA tensors: one kernel launch reading cu_seqlens on the GPU, no host
    sync; max_seqlen_q sizes its grid (see _cuda_backend.varlen_forward). Forward only."""
    from . import _cuda_backend

    names = ("q", "k", "v")
    call = _Call(q[None], k[None], v[None], layout="bshd", names=names, q_offset=0, **options)
    mode = _arrays.torch_mode(*(x for x in (q, k, v, call.sinks) if x is not None))
    q, k, v = call.q[0], call.k[0], call.v[0]  # (padded where v's head_dim is not q's: see _Call)
    if mode == "autograd":
        raise NotImplementedError("fusedattn: the backward pass on CUDA is not implemented yet; "
                                  "use CPU tensors for training, or call under torch.no_grad()")
    if mode == "op":
        raise NotImplementedError("fusedattn: attention_varlen on CUDA under torch.compile or with tensor subclasses "
                                  "is not implemented yet")
    if int(max_seqlen_q) < 0 or int(max_seqlen_k) < 0:
        raise ValueError(f"max_seqlen_q and max_seqlen_k must be >= 0, got {max_seqlen_q} and {max_seqlen_k}")
    cu_q = _cu_seqlens_cuda(cu_seqlens_q, "cu_seqlens_q", q, q.shape[0], max_seqlen_q)
    cu_k = _cu_seqlens_cuda(cu_seqlens_k, "cu_seqlens_k", q, k.shape[0], max_seqlen_k)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 1 entries, got "
                         f"{tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
    out = _arrays.empty_like_kind(q, q.shape)
    lse = _arrays.empty_like_kind(q, (q.shape[1], q.shape[0]), _arrays.lse_dtype_of(q)) if return_lse else None
    variant = call.variant(_arrays.float64_contiguous(call.alibi_slopes), _arrays.float64_contiguous(call.sinks))
    _cuda_backend.varlen_forward(call.bhsd(q[None]), call.bhsd(k[None]), call.bhsd(v[None]), call.bhsd(out[None]),
                                 None if lse is None else lse[None], cu_q, cu_k, max_seqlen_q, variant, names)
    out = call.unpad(out)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Drop-in for flash_attn.flash_attn_varlen_func. return_attn_probs returns (out, lse) (no
    dense probabilities for packed batches); block_table (paged K/V) is not supported here: use
    flash_attn_with_kvcache for paged caches."""
    del deterministic
    if block_table is not None:
        raise NotImplementedError("fusedattn: flash_attn_varlen_func(block_table=...) is not supported; "
                                  "use flash_attn_with_kvcache for paged KV caches")
    result = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                              scale=_scale(softmax_scale), window=_window_pair(window_size, "window_size"),
                              alibi_slopes=alibi_slopes, softcap=softcap,
                              dropout_p=dropout_p, return_lse=return_attn_probs)
    return result


# ---- KV cache ---------------------------------------------------------------------------------


def _apply_rotary(x, cos, sin, positions, interleaved):
    """Rotates the first 2·cos.shape[1] channels of x (batch, seqlen, heads, d) at `positions`
    (batch, seqlen): interleaved pairs (0,1),(2,3)... or GPT-NeoX halves (i, i + rotary_dim/2)."""
    half = cos.shape[1]
    c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]  # (batch, seqlen, 1, half)
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    if _arrays.is_torch(x):
        torch = _arrays.torch_module()
        rotated = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
        return torch.cat((rotated.to(x.dtype), rest), dim=-1)
    rotated = np.stack((y1, y2), axis=-1).reshape(y1.shape[:-1] + (2 * half,)) if interleaved else np.concatenate(
        (y1, y2), axis=-1)
    return np.concatenate((rotated.astype(x.dtype), rest), axis=-1)


def _check_writable(cache, name):
    """ValueError unless the new k, v can be written into `cache` (checked for both caches before
    either is written: a v_cache that could not be written had k_cache written already)."""
    if not _arrays.is_torch(cache):
        if not cache.flags.writeable:
            raise ValueError(f"{name} is read-only; the new k, v are written into it")
        return
    torch = _arrays.torch_module()
    if cache.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad; append under torch.no_grad() (the cache has no gradient)")
    if cache.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor, which can be written only under torch.inference_mode()")


def _append(cache, new, rows, positions, block_table):
    """Writes new (batch, n, heads, d) into cache at (rows[b], positions[b, t]) or into pages."""
    if block_table is None:
        cache[rows[:, None], positions] = new
    else:
        page_size = cache.shape[1]
        pages = block_table[np.arange(len(rows))[:, None], positions // page_size]
        cache[pages, positions % page_size] = new


def _check_cache_geometry(q, k_cache, v_cache, block_table, cache_batch_idx, cache_leftpad) -> None:
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    head_dim, num_heads, num_heads_kv = q.shape[3], q.shape[2], k_cache.shape[2]
    if k_cache.shape[3] != head_dim or not 1 <= head_dim <= 256:
        raise ValueError(f"q has head_dim {head_dim} and k_cache {k_cache.shape[3]}; they must match, in 1..256")
    if num_heads_kv == 0 or num_heads % num_heads_kv != 0:
        raise ValueError(f"q has {num_heads} heads, not a multiple of the cache's {num_heads_kv} heads")
    if block_table is not None and (cache_batch_idx is not None or cache_leftpad is not None):
        raise ValueError("a paged cache (block_table) cannot be combined with cache_batch_idx or cache_leftpad")


def _check_capacity(seqlens, total, new_len, capacity):
    """ValueError unless every sequence's lengths before (seqlens) and after (total) the append fit."""
    if total.size and (seqlens.min() < 0 or total.max() > capacity):
        raise ValueError(f"cache_seqlens + {new_len} new tokens must stay within the cache capacity {capacity}, "
                         f"got cache_seqlens {seqlens.tolist()}")


def _check_append_indices(k_cache, batch, seqlens, new_len, block_table, cache_batch_idx, cache_leftpad, q):
    """Checks the index arrays of a call that writes the cache (appends k, v or rotates) before
    anything is written, as the extension checks them afterwards (bindings/sequences.cpp), each
    sequence over its own pages in use; returns (block_table, cache rows) as the append takes
    them. seqlens: int64 (batch,), the lengths before the new_len new tokens."""
    total = seqlens + new_len
    table, rows = None, np.arange(batch)
    if block_table is not None:  # a paged cache (cache_batch_idx and leftpad are rejected with it)
        table = _int32(block_table, "block_table", q)
        table_np, page_size, num_pages = np.asarray(table), k_cache.shape[1], k_cache.shape[0]
        if table_np.ndim != 2 or table_np.shape[0] != batch:
            raise ValueError(f"block_table must have shape ({batch}, max_pages), got {tuple(table_np.shape)}")
        _check_capacity(seqlens, total, new_len, table_np.shape[1] * page_size)
        if page_size >= 1:  # (pages of no rows: the extension rejects them)
            in_use = np.arange(table_np.shape[1])[None, :] < -(-total[:, None] // page_size)  # (batch, max_pages)
            bad = in_use & ((table_np < 0) | (table_np >= num_pages))
            if bad.any():
                b, i = (int(x) for x in np.argwhere(bad)[0])
                raise ValueError(f"block_table[{b}, {i}] = {int(table_np[b, i])} is outside the cache's {num_pages} "
                                 "pages (entries of the pages in use must be in range)")
        return table, rows
    _check_capacity(seqlens, total, new_len, k_cache.shape[1])
    if cache_batch_idx is not None:
        rows = np.asarray(_int32(cache_batch_idx, "cache_batch_idx", q))
        if rows.shape != (batch,):
            raise ValueError(f"cache_batch_idx must have shape ({batch},), got {rows.shape}")
        if (rows < 0).any() or (rows >= k_cache.shape[0]).any():
            raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]})")
    elif k_cache.shape[0] < batch:
        raise ValueError(f"the cache has {k_cache.shape[0]} rows but q has batch {batch}")
    if cache_leftpad is not None:
        leftpad = np.asarray(_int32(cache_leftpad, "cache_leftpad", q))
        if leftpad.shape != (batch,):
            raise ValueError(f"cache_leftpad must have shape ({batch},), got {leftpad.shape}")
        if (leftpad < 0).any() or (leftpad > total).any():
            raise ValueError("cache_leftpad entries must be in [0, cache_seqlens[b] + seqlen_new]")
    return table, rows


def _check_rotary_shapes(cos, sin, head_dim):
    """ValueError unless cos and sin are both (max_positions, rotary_dim / 2), rotary_dim <= head_dim."""
    if cos.ndim != 2 or tuple(cos.shape) != tuple(sin.shape) or not 1 <= 2 * cos.shape[1] <= head_dim:
        raise ValueError(f"rotary_cos and rotary_sin must both be (max_positions, rotary_dim / 2) with rotary_dim <= "
                         f"head_dim {head_dim}, got {tuple(cos.shape)} and {tuple(sin.shape)}")


def _rotary_tables(rotary_cos, rotary_sin, q, last_position):
    """rotary_cos and rotary_sin as arrays of q's kind, checked: both (max_positions, rotary_dim /
    2) floating point, rotary_dim <= head_dim, with a row for every position up to last_position."""
    cos, sin = _arrays.as_array(rotary_cos, "rotary_cos"), _arrays.as_array(rotary_sin, "rotary_sin")
    _arrays.check_same_kind((q, cos, sin), ("q", "rotary_cos", "rotary_sin"))
    if _arrays.is_torch(q):
        _arrays.check_same_device((q, cos, sin), ("q", "rotary_cos", "rotary_sin"))
    for x, name in ((cos, "rotary_cos"), (sin, "rotary_sin")):
        if not _arrays.is_floating(x):
            raise TypeError(f"{name} must be a floating-point array, got {x.dtype}")
    _check_rotary_shapes(cos, sin, q.shape[3])
    if last_position >= cos.shape[0]:
        raise ValueError(f"rotary_cos has {cos.shape[0]} positions but position {last_position} is needed "
                         "(cache_seqlens + the new tokens)")
    return cos, sin


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           cache_batch_idx=None, cache_leftpad=None, causal=True, scale=None, window=(-1, -1),
                           alibi_slopes=None, softcap=0.0, sinks=None, rotary_cos=None, rotary_sin=None,
                           rotary_interleaved=True, return_lse=False):
    """Appends k, v to the cache in place at cache_seqlens, then attends q over the cache.

    Args:
        q: (batch, seqlen_q, num_heads, head_dim); several query tokens (chunked prefill,
            speculative decoding) see the cache bottom-right causally.
        k_cache, v_cache: (cache_rows, max_seqlen, num_heads_kv, head_dim), or with block_table
            a paged cache (num_pages, page_size, num_heads_kv, head_dim), any page_size >= 1.
        k, v: (batch, seqlen_new, num_heads_kv, head_dim) new entries, or None.
        cache_seqlens: int or int32 (batch,): tokens already in the cache (before k, v).
        block_table: int32 (batch, max_pages_per_seq): pages of each sequence, in order.
        cache_batch_idx: int32 (batch,): the cache row of each sequence (contiguous cache).
        cache_leftpad: int32 (batch,): keys before this index are padding (contiguous cache).
        rotary_cos, rotary_sin: (max_positions, rotary_dim / 2): rotary embedding applied to q
            and the new k at their positions (cache_seqlens + t); with causal=False all of q
            gets position cache_seqlens, as in flash-attn.
        The rest as in fusedattn.attention.

    Returns:
        out like q, and lse (batch, num_heads, seqlen_q) when return_lse.

    Traces under torch.compile(fullgraph=True), through the op fusedattn::attention_kvcache
    (_torch_kvcache.py), which writes k_cache and v_cache in place.
    """
    q = _arrays.as_array(q, "q")
    k_cache, v_cache = _arrays.as_array(k_cache, "k_cache"), _arrays.as_array(v_cache, "v_cache")
    for x, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _arrays.check_rank(x, 4, name, "(batch, seqlen, heads, head_dim)")
    _arrays.check_same_kind((q, k_cache, v_cache), ("q", "k_cache", "v_cache"))
    _arrays.check_dense(q, "q")
    _arrays.check_no_grad(q, "attention_with_kvcache (inference only)")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (new entries), or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    if _arrays.is_torch(q) and _arrays.needs_op(q, k_cache, v_cache):
        # (torch.compile traces, tensor subclasses: the op, whose kernel calls this function again
        # on plain tensors, outside any trace)
        from . import _torch_kvcache

        out, lse = _torch_kvcache.attention_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
            cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, causal=causal, scale=scale, window=window,
            alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
            rotary_interleaved=rotary_interleaved)
        return (out, lse) if return_lse else out
    if _arrays.is_cuda(q):
        return _kvcache_cuda(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                             cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, causal=causal, scale=scale,
                             window=window, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
                             rotary=(rotary_cos, rotary_sin, rotary_interleaved), return_lse=return_lse)
    # Everything is validated before the cache is written, so a rejected call changes nothing.
    call = _Call(q, k_cache, v_cache, layout="bshd", names=("q", "k_cache", "v_cache"), causal=causal,
                 scale=scale, q_offset=0, window=window, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
                 arrays_checked=True)
    _check_cache_geometry(q, k_cache, v_cache, block_table, cache_batch_idx, cache_leftpad)
    batch, seqlen_q = q.shape[0], q.shape[1]
    lengths = _int32(cache_seqlens, "cache_seqlens", q)
    if tuple(lengths.shape) == (1,) and batch != 1:  # one length for every sequence
        lengths = np.full(batch, int(lengths[0]), dtype=np.int32)
    if k is None and rotary_cos is None:
        # Nothing is written, so the extension's own checks of cache_seqlens, the pages in use and
        # cache_batch_idx (bindings/sequences.cpp) suffice: a decode step pays no numpy work here.
        return _kvcache_forward(call, q, k_cache, v_cache, lengths, block_table, cache_batch_idx, cache_leftpad,
                                return_lse)
    new_len = 0
    if k is not None:
        k, v = _arrays.as_array(k, "k"), _arrays.as_array(v, "v")
        _arrays.check_same_kind((q, k, v), ("q", "k", "v"))
        for x, name in ((k, "k"), (v, "v")):  # (the cache gets no gradient: see _check_writable)
            _arrays.check_no_grad(x, f"attention_with_kvcache's {name} (the cache has no gradient)")
        if k.shape != v.shape or k.ndim != 4 or k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k and v must have shape ({batch}, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
            raise TypeError(f"k and v must have the cache's dtype {k_cache.dtype}, got {k.dtype} and {v.dtype}")
        if _arrays.is_torch(q):
            _arrays.check_same_device((k_cache, v_cache, k, v), ("k_cache", "v_cache", "k", "v"))
        for cache, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
            _check_writable(cache, name)
        new_len = k.shape[1]
        if rotary_cos is None:
            # The extension checks the lengths, the pages and rows the new entries go to, and k, v
            # themselves before it writes them (bindings/sequences.cpp), as it checks a decode
            # step's: a one-token append took 60-63 µs with numpy checks and index_put here, 26-27
            # so (benchmarks/bench_decode.py, its per-call overhead lines).
            return _kvcache_forward(call, q, k_cache, v_cache, lengths, block_table, cache_batch_idx, cache_leftpad,
                                    return_lse, new=(k, v))
    seqlens = np.asarray(lengths).astype(np.int64)
    if seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be an int or have shape ({batch},), got {seqlens.shape}")
    table, rows = _check_append_indices(k_cache, batch, seqlens, new_len, block_table, cache_batch_idx, cache_leftpad,
                                        q)
    positions_new = None if k is None else seqlens[:, None] + np.arange(new_len)[None, :]
    if rotary_cos is not None:
        local = tuple(int(w) for w in window) != (-1, -1)
        q_positions = seqlens[:, None] + np.arange(seqlen_q)[None, :] if causal or local else \
            np.repeat(seqlens[:, None], seqlen_q, axis=1)
        positions = q_positions if positions_new is None else np.concatenate((q_positions, positions_new), axis=1)
        cos, sin = _rotary_tables(rotary_cos, rotary_sin, q, int(positions.max(initial=-1)))
        q = _apply_rotary(q, cos, sin, _arrays.index_like(q, q_positions), rotary_interleaved)
        if k is not None:
            k = _apply_rotary(k, cos, sin, _arrays.index_like(q, positions_new), rotary_interleaved)
    if k is not None:
        index_rows = _arrays.index_like(q, rows)
        index_positions = _arrays.index_like(q, positions_new)
        _append(k_cache, k, index_rows, index_positions, table)
        _append(v_cache, v, index_rows, index_positions, table)

    total = (seqlens + new_len).astype(np.int32)  # (the extension reads index arrays of either kind)
    return _kvcache_forward(call, q, k_cache, v_cache, total, table, cache_batch_idx, cache_leftpad, return_lse)


def _kvcache_forward(call, q, k_cache, v_cache, lengths, block_table, cache_batch_idx, cache_leftpad, return_lse,
                     new=(None, None)):
    """Attention of q over the first lengths[b] rows of each sequence's cache (CPU), into new
    arrays; with new = (k, v), the extension first appends them at lengths[b], and q attends over
    lengths[b] + seqlen_new rows."""
    out = _arrays.empty_like_kind(q, q.shape)
    lse = _arrays.empty_like_kind(q, call.lse_shape(), _arrays.lse_dtype_of(q)) if return_lse else None
    variant = call.variant(_arrays.float64_contiguous(call.alibi_slopes), _arrays.float64_contiguous(call.sinks))
    table = None if block_table is None else _int32(block_table, "block_table", q)
    leftpad = None if cache_leftpad is None else _int32(cache_leftpad, "cache_leftpad", q)
    batch_idx = None if cache_batch_idx is None else _int32(cache_batch_idx, "cache_batch_idx", q)
    # (the extension takes q, the caches and out in this (b, s, h, d) layout as they are)
    _C.attention_kvcache_forward(q, k_cache, v_cache, out, lse, lengths, table, batch_idx, leftpad, new[0], new[1],
                                 variant, _runtime.cpu_isa(), _runtime.get_num_threads())
    if new[0] is not None and _arrays.is_torch(k_cache):  # (written through their memory: as index_put would)
        torch = _arrays.torch_module()
        torch.autograd.graph.increment_version(k_cache)
        torch.autograd.graph.increment_version(v_cache)
    return (out, lse) if return_lse else out


def _kvcache_cuda(q, k_cache, v_cache, k, v, *, cache_seqlens, block_table, cache_batch_idx, cache_leftpad, causal,
                  scale, window, alibi_slopes, softcap, sinks, rotary, return_lse):
    """attention_with_kvcache on CUDA tensors: append and attend on the GPU with no host sync
    (the cache indices stay on the device; see _cuda_backend.decode)."""
    from . import _cuda_backend

    torch = _arrays.torch_module()
    call = _Call(q, k_cache[:1], v_cache[:1], layout="bshd", names=("q", "k_cache", "v_cache"), causal=causal,
                 scale=scale, q_offset=0, window=window, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
                 arrays_checked=True)
    _check_cache_geometry(q, k_cache, v_cache, block_table, cache_batch_idx, cache_leftpad)

    seqlens = _index_on_device(cache_seqlens, "cache_seqlens", q)
    if rotary[0] is not None or rotary[1] is not None:
        capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
        q, k = _rotary_cuda(q, k, seqlens, rotary, rotate_q_per_token=causal or tuple(call.window) != (-1, -1),
                            capacity=capacity)
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device) if return_lse \
        else None
    variant = call.variant(_arrays.float64_contiguous(call.alibi_slopes), _arrays.float64_contiguous(call.sinks))
    _cuda_backend.decode(call.bhsd(q), call.bhsd(k_cache), call.bhsd(v_cache), call.bhsd(out), lse, seqlens, variant,
                         k=None if k is None else call.bhsd(k), v=None if v is None else call.bhsd(v),
                         block_table=_index_on_device(block_table, "block_table", q),
                         cache_batch_idx=_index_on_device(cache_batch_idx, "cache_batch_idx", q),
                         cache_leftpad=_index_on_device(cache_leftpad, "cache_leftpad", q))
    return (out, lse) if return_lse else out


def _index_on_device(x, name, q):
    """An index argument of a CUDA call as a contiguous int32 tensor on q's device, a single
    value spread over the batch. Values given on the host (ints, lists, numpy arrays, CPU
    tensors) are checked as the CPU path checks them (_int32: integers within int32); a CUDA
    tensor is converted as it is, since checking it would need a host sync."""
    if x is None:
        return None
    torch = _arrays.torch_module()
    scalar = isinstance(x, int) and not isinstance(x, bool)
    if not _arrays.is_cuda(x):
        x = _int32(x, name, q)
    x = torch.as_tensor(x, device=q.device)
    if scalar or x.ndim == 0:
        x = x.reshape(()).expand(q.shape[0])
    return x.to(torch.int32).contiguous()


def _rotary_cuda(q, k, seqlens, rotary, *, rotate_q_per_token, capacity):
    """q and the new k rotated exactly as the CPU path rotates them (_apply_rotary: the same torch
    ops, at positions cache_seqlens + t; all of q at cache_seqlens unless causal or local), on the
    GPU: seqlens (int32 (batch,) on q's device) are never read on the host. The table must cover
    the cache capacity (flash-attn's rule, as positions are not known here); positions past it,
    from invalid cache_seqlens, are clamped into it rather than faulting the device."""
    torch = _arrays.torch_module()
    cos, sin, interleaved = rotary  # (both given: attention_with_kvcache checks)
    cos, sin = (torch.as_tensor(_arrays.as_array(x, name), device=q.device)
                for x, name in ((cos, "rotary_cos"), (sin, "rotary_sin")))
    _check_rotary_shapes(cos, sin, q.shape[3])
    if cos.shape[0] < capacity:
        raise ValueError(f"rotary_cos has {cos.shape[0]} positions but the cache holds {capacity}; on CUDA the "
                         "table must cover the cache capacity")
    if k is not None and not (_arrays.is_cuda(k) and k.device == q.device):
        raise ValueError(f"k must be a CUDA tensor on {q.device} like q, got one on "
                         f"{k.device if _arrays.is_torch(k) else type(k).__name__}")
    base, last = seqlens.long()[:, None], cos.shape[0] - 1
    steps = torch.arange(q.shape[1], device=q.device)
    q_positions = base + (steps if rotate_q_per_token else torch.zeros_like(steps))  # (batch, seqlen_q)
    q = _apply_rotary(q, cos, sin, q_positions.clamp_(0, last), interleaved)
    if k is not None:
        k_positions = base + torch.arange(k.shape[1], device=q.device)  # (batch, seqlen_new)
        k = _apply_rotary(k, cos, sin, k_positions.clamp_(0, last), interleaved)
    return q, k


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Drop-in for flash_attn.flash_attn_with_kvcache (same arguments and defaults).

    num_splits is accepted and ignored: the CPU driver chooses the key splits from the thread
    count. cache_seqlens=None means a full cache (every row holds max_seqlen tokens).
    """
    del num_splits
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending k, v")
        q, k_cache = _arrays.as_array(q, "q"), _arrays.as_array(k_cache, "k_cache")
        for x, name in ((q, "q"), (k_cache, "k_cache")):
            _arrays.check_rank(x, 4, name, "(batch, seqlen, heads, head_dim)")
        table_shape = None if block_table is None else np.shape(block_table)  # (any array, or a list)
        if table_shape is not None and len(table_shape) != 2:
            raise ValueError(f"block_table must have shape (batch, max_pages), got {tuple(table_shape)}")
        capacity = k_cache.shape[1] if block_table is None else table_shape[1] * k_cache.shape[1]
        cache_seqlens = [capacity] * q.shape[0]
    return attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                                  cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, causal=causal,
                                  scale=_scale(softmax_scale), window=_window_pair(window_size, "window_size"),
                                  alibi_slopes=alibi_slopes, softcap=softcap,
                                  rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                                  return_lse=return_softmax_lse)


# ---- merging attention states ------------------------------------------------------------------


def merge_attention_states_list(outs, lses, *, layout="bhsd"):
    """Merges partial attention results over disjoint key sets by their LSE.

    outs[i]: (batch, heads, seqlen, d) (or (batch, seqlen, heads, d) for layout "bshd"); lses[i]:
    (batch, heads, seqlen) natural-log LSE. Returns (out, lse) with lse = log Σ exp(lse_i) and
    out = Σ exp(lse_i - lse) · out_i; parts with LSE -inf (no visible key) contribute nothing, and
    rows where every part is -inf give 0 and -inf. Computed in float32 (float64 for float64
    outputs); out has the outputs' dtype. Differentiable for torch inputs.
    """
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"need as many outs as lses (at least one), got {len(outs)} and {len(lses)}")
    outs = [_arrays.as_array(o, f"outs[{i}]") for i, o in enumerate(outs)]
    lses = [_arrays.as_array(x, f"lses[{i}]") for i, x in enumerate(lses)]
    names = [f"outs[{i}]" for i in range(len(outs))] + [f"lses[{i}]" for i in range(len(lses))]
    _arrays.check_same_kind(outs + lses, names)
    for x, name in zip(outs + lses, names):
        if not _arrays.is_floating(x):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if _arrays.is_torch(outs[0]):
        _arrays.check_same_device(outs + lses, names)
    for i, (o, x) in enumerate(zip(outs, lses)):
        _arrays.check_rank(o, 4, f"outs[{i}]", "(batch, heads, seqlen, head_dim)" if layout == "bhsd" else
                           "(batch, seqlen, heads, head_dim)")
        expected = (o.shape[0], o.shape[2], o.shape[1]) if layout == "bshd" else tuple(o.shape[:-1])
        if o.shape != outs[0].shape or tuple(x.shape) != expected:
            raise ValueError(f"outs[{i}] / lses[{i}] have shapes {tuple(o.shape)} / {tuple(x.shape)}; expected "
                             f"{tuple(outs[0].shape)} / {expected}")
    if _arrays.is_torch(outs[0]):
        torch = _arrays.torch_module()
        compute = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
        stacked = torch.stack([x.to(compute) for x in lses])
        # As the numpy path below, not torch.logsumexp: its gradient is NaN where every part is -inf.
        top = stacked.detach().amax(dim=0)  # (the result does not depend on it: no gradient)
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.where(torch.isfinite(stacked), torch.exp(stacked - safe), torch.zeros_like(stacked))
        total = weights.sum(dim=0)
        nonzero = torch.where(total > 0, total, torch.ones_like(total))
        lse = torch.where(total > 0, safe + torch.log(nonzero), torch.full_like(total, float("-inf")))
        weights = weights / nonzero
        if layout == "bshd":
            weights = weights.transpose(2, 3)
        out = sum(w[..., None] * o.to(compute) for w, o in zip(weights, outs))
        return out.to(outs[0].dtype), lse
    compute = np.float64 if outs[0].dtype == np.float64 else np.float32
    stacked = np.stack([x.astype(compute) for x in lses])
    top = stacked.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0).astype(compute)
    weights = np.where(np.isfinite(stacked), np.exp(stacked - safe), 0.0).astype(compute)
    total = weights.sum(axis=0)
    nonzero = np.where(total > 0, total, 1.0)
    lse = np.where(total > 0, safe + np.log(nonzero), -np.inf).astype(compute)
    weights = np.where(total > 0, weights / nonzero, 0.0)
    if layout == "bshd":
        weights = weights.swapaxes(2, 3)
    out = sum(w[..., None] * o.astype(compute) for w, o in zip(weights, outs))
    return out.astype(outs[0].dtype), lse


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, layout="bhsd"):
    """Merges two partial attention results (see merge_attention_states_list)."""
    return merge_attention_states_list([out_a, out_b], [lse_a, lse_b], layout=layout)
