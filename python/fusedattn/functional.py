"""The attention functions: the native API and the SDPA- and flash-attn-compatible drop-ins.

All three are one kernel call. Layouts are views: "bhsd" (batch, heads, seqlen, head_dim) is
native, "bshd" (flash-attn's) is the same call with the seqlen and heads strides swapped.
Positions follow DESIGN.md: query row i sits at i + q_offset; the native API and flash-attn
default to q_offset = seqlen_k - seqlen_q (bottom-right causal), SDPA uses 0 (top-left).
"""

from __future__ import annotations

import math

from . import _C, _arrays, _runtime

__all__ = ["attention", "scaled_dot_product_attention", "flash_attn_func"]

_DIMS = {"bhsd": "(batch, heads, seqlen, head_dim)", "bshd": "(batch, seqlen, heads, head_dim)"}


def _not_implemented(feature: str):
    return NotImplementedError(f"fusedattn: {feature} is not implemented yet")


def _check_no_grad(*arrays) -> None:
    torch = _arrays.torch_module()
    if torch is not None and torch.is_grad_enabled():
        if any(_arrays.is_torch(x) and x.requires_grad for x in arrays):
            raise _not_implemented(
                "the backward pass (gradients)"
            ) from None


def _window_pair(window, name: str) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (left, right) of ints, got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{name} entries must be >= 0 or -1 (unbounded), got {window!r}")
    return left, right


def _forward(q, k, v, *, causal, scale, layout, q_offset, window, return_lse, names):
    """Shared body: validate the layout, allocate the outputs, call the kernel."""
    if layout not in _DIMS:
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    q = _arrays.as_array(q, names[0])
    k = _arrays.as_array(k, names[1])
    v = _arrays.as_array(v, names[2])
    for x, name in zip((q, k, v), names):
        _arrays.check_rank(x, 4, name, _DIMS[layout])
    _check_no_grad(q, k, v)
    left, right = _window_pair(window, "window")

    out = _arrays.empty_like_kind(q, q.shape)
    if layout == "bshd":
        q_n, k_n, v_n, out_n = (_arrays.swap_seq_heads(x) for x in (q, k, v, out))
    else:
        q_n, k_n, v_n, out_n = q, k, v, out
    batch, num_heads, seqlen_q, head_dim = q_n.shape
    seqlen_k = k_n.shape[2]
    lse = _arrays.empty_like_kind(q, (batch, num_heads, seqlen_q), _arrays.float32_of(q)) if return_lse else None
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if q_offset is None:
        q_offset = seqlen_k - seqlen_q

    _C.attention_forward(
        _arrays.for_kernel(q_n), _arrays.for_kernel(k_n), _arrays.for_kernel(v_n), out_n, lse,
        float(scale), bool(causal), int(q_offset), left, right,
        _runtime.cpu_isa(), _runtime.get_num_threads(), names,
    )
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
                    window=window_size, return_lse=False, names=("q", "k", "v"))
