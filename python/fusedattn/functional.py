"""The attention functions: the native API and the SDPA- and flash-attn-compatible drop-ins.

All three are one kernel call. Layouts are views: "bhsd" (batch, heads, seqlen, head_dim) is
native, "bshd" (flash-attn's) is the same call with the seqlen and heads strides swapped.
Positions follow DESIGN.md: query row i sits at i + q_offset; the native API and flash-attn
default to q_offset = seqlen_k - seqlen_q (bottom-right causal), SDPA uses 0 (top-left).
"""

from __future__ import annotations

import math

from . import _C, _arrays, _runtime

__all__ = ["attention", "attention_backward", "scaled_dot_product_attention", "flash_attn_func"]

_DIMS = {"bhsd": "(batch, heads, seqlen, head_dim)", "bshd": "(batch, seqlen, heads, head_dim)"}


def _not_implemented(feature: str):
    return NotImplementedError(f"fusedattn: {feature} is not implemented yet")


def _window_pair(window, name: str) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (left, right) of ints, got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{name} entries must be >= 0 or -1 (unbounded), got {window!r}")
    return left, right


def _arrays_of(q, k, v, layout, names):
    """Checks kinds, ranks and layout; returns the three arrays (numpy / torch, zero-copy)."""
    if layout not in _DIMS:
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    arrays = tuple(_arrays.as_array(x, name) for x, name in zip((q, k, v), names))
    for x, name in zip(arrays, names):
        _arrays.check_rank(x, 4, name, _DIMS[layout])
    _arrays.check_same_kind(arrays, names)
    return arrays


def _default_scale(scale, head_dim: int, name: str) -> float:
    if head_dim < 1:
        raise ValueError(f"{name} has head_dim {head_dim}; supported: 1..256")
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim)


def _forward(q, k, v, *, causal, scale, layout, q_offset, window, return_lse, names, window_name="window"):
    """Shared body: validate, allocate the outputs in the caller's framework, call the kernel."""
    q, k, v = _arrays_of(q, k, v, layout, names)
    left, right = _window_pair(window, window_name)
    bshd = layout == "bshd"
    seq_dim = 1 if bshd else 2
    seqlen_q, seqlen_k, head_dim = q.shape[seq_dim], k.shape[seq_dim], q.shape[3]
    scale = _default_scale(scale, head_dim, names[0])
    q_offset = seqlen_k - seqlen_q if q_offset is None else int(q_offset)

    if _arrays.is_torch(q):
        mode = _arrays.torch_mode(q, k, v)
        if mode != "direct":
            ops = _arrays.torch_ops()
            run = ops.attention_forward if mode == "op" else ops.EagerAttention.apply
            out, lse = run(q, k, v, scale, bool(causal), q_offset, left, right, bshd, ",".join(names))
            return (out, lse) if return_lse else out

    # numpy, or eager torch with no gradient to record: call the kernel directly.
    out = _arrays.empty_like_kind(q, q.shape)
    lse_shape = (q.shape[0], q.shape[3 - seq_dim], seqlen_q)
    lse = _arrays.empty_like_kind(q, lse_shape, _arrays.float32_of(q)) if return_lse else None
    views = [_arrays.swap_seq_heads(x) if bshd else x for x in (q, k, v, out)]
    _C.attention_forward(*views, lse, scale, bool(causal), q_offset, left, right,
                         _runtime.cpu_isa(), _runtime.get_num_threads(), names)
    return (out, lse) if return_lse else out


def attention(q, k, v, *, causal=False, scale=None, layout="bhsd", q_offset=None, window=(-1, -1),
              return_lse=False):
    """Exact attention softmax(q·kᵀ·scale)·v without materialising the score matrix.

    Args:
        q: (batch, num_heads, seqlen_q, head_dim) for layout "bhsd", or (batch, seqlen_q,
            num_heads, head_dim) for "bshd". torch tensor, numpy array or any DLPack array.
        k, v: like q with seqlen_k and num_heads_kv heads; num_heads % num_heads_kv == 0 (GQA).
        causal: query at position p sees keys j <= p.
        scale: multiplies q·k; default 1/sqrt(head_dim).
        layout: "bhsd" (native, as SDPA) or "bshd" (flash-attn); any other strides are views.
        q_offset: position of query row 0; default seqlen_k - seqlen_q (bottom-right).
        window: (left, right) sliding window around the query position, -1 = unbounded.
        return_lse: also return the float32 log-sum-exp of the scores, shape (batch, heads, seqlen_q).

    Returns:
        out (same kind, dtype and layout as q), or (out, lse) when return_lse.
        Rows that see no key give 0 (and LSE -inf).
    """
    return _forward(q, k, v, causal=causal, scale=scale, layout=layout, q_offset=q_offset, window=window,
                    return_lse=return_lse, names=("q", "k", "v"))


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, layout="bhsd", q_offset=None,
                       window=(-1, -1)):
    """Gradients (dq, dk, dv) of attention, given the forward's out and lse from outside.

    For context-parallel and ring attention, where the forward's out and lse are merged across
    devices before the backward. Arguments mean what they mean in attention(); dout has out's
    shape; lse is the float32 (batch, heads, seqlen_q) log-sum-exp. Gradients have the kinds,
    dtypes and shapes of q, k, v (contiguous in the given layout).
    """
    names = ("q", "k", "v")
    q, k, v = _arrays_of(q, k, v, layout, names)
    dout = _arrays.as_array(dout, "dout")
    out = _arrays.as_array(out, "out")
    lse = _arrays.as_array(lse, "lse")
    _arrays.check_same_kind((q, dout, out, lse), ("q", "dout", "out", "lse"))
    _arrays.check_rank(dout, 4, "dout", _DIMS[layout])
    _arrays.check_rank(out, 4, "out", _DIMS[layout])
    left, right = _window_pair(window, "window")
    bshd = layout == "bshd"
    seq_dim = 1 if bshd else 2
    scale = _default_scale(scale, q.shape[3], "q")
    q_offset = k.shape[seq_dim] - q.shape[seq_dim] if q_offset is None else int(q_offset)

    if _arrays.is_torch(q):
        return _arrays.torch_ops().attention_backward(dout, None, q, k, v, out, lse, scale, bool(causal), q_offset,
                                                      left, right, bshd, ",".join(names))
    grads = tuple(_arrays.empty_like_kind(x, x.shape) for x in (q, k, v))
    views = [_arrays.swap_seq_heads(x) if bshd else x for x in (dout, q, k, v, out)]
    grad_views = [_arrays.swap_seq_heads(x) if bshd else x for x in grads]
    _C.attention_backward(views[0], None, *views[1:], lse, *grad_views, scale, bool(causal), q_offset, left, right,
                          _runtime.cpu_isa(), _runtime.get_num_threads(), names)
    return grads


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same signature and semantics).

    (..., heads, seqlen, head_dim) inputs; is_causal is top-left aligned, as in torch.
    """
    if attn_mask is not None:
        raise _not_implemented("attn_mask")
    if dropout_p != 0.0:
        raise _not_implemented("dropout (dropout_p > 0)")
    names = ("query", "key", "value")
    query, key, value = (_arrays.as_array(x, n) for x, n in zip((query, key, value), names))
    for x, name in zip((query, key, value), names):
        if x.ndim < 3:
            raise ValueError(f"{name} must be at least 3-D (..., heads, seqlen, head_dim), got shape {tuple(x.shape)}")
    if not enable_gqa and query.shape[-3] != key.shape[-3]:
        raise ValueError(
            f"query has {query.shape[-3]} heads but key has {key.shape[-3]}; pass enable_gqa=True for GQA"
        )
    lead = query.shape[:-3]
    for x, name in ((key, "key"), (value, "value")):
        if tuple(x.shape[:-3]) != tuple(lead):
            raise ValueError(f"{name} has leading (batch) dims {tuple(x.shape[:-3])} but query has {tuple(lead)}")
    batch = math.prod(lead)
    q4, k4, v4 = (x.reshape((batch,) + tuple(x.shape[-3:])) for x in (query, key, value))
    out = _forward(q4, k4, v4, causal=is_causal, scale=scale, layout="bhsd", q_offset=0, window=(-1, -1),
                   return_lse=False, names=names)
    return out.reshape(tuple(lead) + tuple(out.shape[1:]))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for flash_attn.flash_attn_func: (batch, seqlen, heads, head_dim), bottom-right causal."""
    if dropout_p != 0.0:
        raise _not_implemented("dropout (dropout_p > 0)")
    if softcap != 0.0:
        raise _not_implemented("softcap")
    if alibi_slopes is not None:
        raise _not_implemented("alibi_slopes")
    if return_attn_probs:
        raise _not_implemented("return_attn_probs")
    del deterministic  # the forward is always deterministic
    return _forward(q, k, v, causal=causal, scale=softmax_scale, layout="bshd", q_offset=None,
                    window=window_size, return_lse=False, names=("q", "k", "v"), window_name="window_size")
