"""Plain attention in float64 (numpy), written for clarity: the oracle of tests and benchmarks.

It materialises the full (Lq, Lk) score matrix, so use it on small shapes only. Semantics are
DESIGN.md's: query row i sits at position i + q_offset (default Lk - Lq), key j at j; causal
hides keys j > position; window (left, right) keeps position-left <= j <= position+right;
rows that see no key give output 0 and LSE -inf.
"""

from __future__ import annotations

import math

import numpy as np


def to_float64(x) -> np.ndarray:
    """Any torch tensor (also bf16, on any device, with grad) or array-like as a float64 ndarray."""
    if hasattr(x, "detach"):  # torch tensor
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def visible_mask(seqlen_q: int, seqlen_k: int, *, causal=False, q_offset=None, window=(-1, -1)) -> np.ndarray:
    """(seqlen_q, seqlen_k) bool: True where query row i may attend to key j."""
    if q_offset is None:
        q_offset = seqlen_k - seqlen_q
    position = np.arange(seqlen_q)[:, None] + q_offset
    key = np.arange(seqlen_k)[None, :]
    visible = np.ones((seqlen_q, seqlen_k), dtype=bool)
    left, right = window
    if causal:
        visible &= key <= position
    if left >= 0:
        visible &= key >= position - left
    if right >= 0:
        visible &= key <= position + right
    return visible


def _mask_array(attn_mask) -> np.ndarray:
    """A bool mask as a bool ndarray, a float mask as float64 (torch or array-like)."""
    if hasattr(attn_mask, "detach"):  # torch tensor
        import torch

        mask = attn_mask.detach().cpu()
        return mask.numpy() if mask.dtype == torch.bool else mask.to(torch.float64).numpy()
    mask = np.asarray(attn_mask)
    return mask if mask.dtype == bool else mask.astype(np.float64)


def attention_probabilities(q, k, *, causal=False, scale=None, q_offset=None, window=(-1, -1), layout="bhsd",
                            attn_mask=None, alibi_slopes=None, softcap=0.0, sinks=None):
    """(probs, lse) in float64: probs (batch, heads, seqlen_q, seqlen_k) before dropout, lse (batch, heads, seqlen_q).

    The score pipeline of DESIGN.md, in order: s = scale·q·kᵀ → softcap·tanh(s/softcap) →
    s - slope_h·|position - j| (ALiBi) → + attn_mask (float) → masking (causal, window, bool
    attn_mask) → softmax, with sinks[h] as one more logit in each row's denominator (carrying
    no value). attn_mask broadcasts to (batch, heads, seqlen_q, seqlen_k) whatever the layout.
    """
    q, k = to_float64(q), to_float64(k)
    if layout == "bshd":
        q, k = q.swapaxes(1, 2), k.swapaxes(1, 2)
    elif layout != "bhsd":
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    batch, num_heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    k = np.repeat(k, num_heads // k.shape[1], axis=1)  # query head h reads kv head h // group
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if q_offset is None:
        q_offset = seqlen_k - seqlen_q
    scores = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = to_float64(alibi_slopes)
        slopes = slopes.reshape((-1 if slopes.ndim == 2 else 1, num_heads))
        distance = np.abs(np.arange(seqlen_q)[:, None] + q_offset - np.arange(seqlen_k)[None, :])
        scores = scores - slopes[:, :, None, None] * distance
    visible = np.broadcast_to(visible_mask(seqlen_q, seqlen_k, causal=causal, q_offset=q_offset, window=window),
                              scores.shape)
    if attn_mask is not None:
        mask = _mask_array(attn_mask)
        if mask.dtype == bool:
            visible = visible & np.broadcast_to(mask, scores.shape)
        else:
            scores = scores + np.broadcast_to(mask, scores.shape)
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    sink = None if sinks is None else to_float64(sinks)[None, :, None, None]
    if sink is not None:
        row_max = np.maximum(row_max, sink)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - safe_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    if sink is not None:
        row_sum = row_sum + np.exp(sink - safe_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = np.where(row_sum > 0, weights / row_sum, 0.0)
        lse = np.where(row_sum[..., 0] > 0, np.log(row_sum[..., 0]) + safe_max[..., 0], -np.inf)
    return probs, lse


def attention_reference(q, k, v, *, causal=False, scale=None, q_offset=None, window=(-1, -1), layout="bhsd",
                        attn_mask=None, alibi_slopes=None, softcap=0.0, sinks=None, dropout_p=0.0,
                        dropout_mask=None):
    """Returns (out, lse) in float64: out like q (in q's layout), lse (batch, heads, seqlen_q).

    attention_probabilities() (see there for the pipeline), then dropout: weights where
    dropout_mask (broadcastable bool, True = keep) is False are dropped and kept ones scaled by
    1/(1 - dropout_p); then ·v.
    """
    probs, lse = attention_probabilities(q, k, causal=causal, scale=scale, q_offset=q_offset, window=window,
                                         layout=layout, attn_mask=attn_mask, alibi_slopes=alibi_slopes,
                                         softcap=softcap, sinks=sinks)
    v = to_float64(v)
    if layout == "bshd":
        v = v.swapaxes(1, 2)
    v = np.repeat(v, probs.shape[1] // v.shape[1], axis=1)
    if dropout_p > 0.0:
        keep = np.broadcast_to(np.asarray(dropout_mask, dtype=bool), probs.shape)
        probs = np.where(keep, probs / (1.0 - dropout_p), 0.0) if dropout_p < 1.0 else np.zeros_like(probs)
    out = np.einsum("bhij,bhjd->bhid", probs, v)
    if layout == "bshd":
        out = out.swapaxes(1, 2)
    return out, lse


# ---- Dropout: the same Philox4x32-10 as csrc/common/variant.h --------------------------------

_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key0: int, key1: int):
    """Philox4x32-10 on arrays: counter is 4 uint32 arrays (broadcastable); returns 4 uint32 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    for _ in range(10):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(key0), lo1, hi0 ^ c3 ^ np.uint64(key1), lo0
        key0 = (key0 + _PHILOX_W0) & 0xFFFFFFFF
        key1 = (key1 + _PHILOX_W1) & 0xFFFFFFFF
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def dropout_keep_mask(batch: int, num_heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float, seed: int,
                      offset: int = 0) -> np.ndarray:
    """(batch, heads, seqlen_q, seqlen_k) bool: True where the kernels keep attention weight (b, h, i, j).

    Word j % 4 of Philox(counter = (j // 4, i, b * heads + h, offset_lo), key = (seed_lo, seed_hi ^ offset_hi))
    is kept iff it is below floor((1 - p) * 2**32).
    """
    seed, offset = int(seed) & (2**64 - 1), int(offset) & (2**64 - 1)
    key0 = seed & 0xFFFFFFFF
    key1 = ((seed >> 32) ^ (offset >> 32)) & 0xFFFFFFFF
    keep = (1.0 - float(dropout_p)) * 4294967296.0
    threshold = 0xFFFFFFFF if keep >= 4294967295.0 else int(keep)
    j = np.arange(seqlen_k)
    i = np.arange(seqlen_q)[:, None]
    stream = (np.arange(batch)[:, None] * num_heads + np.arange(num_heads)[None, :])[:, :, None, None]
    counter = (np.broadcast_to(j >> 2, (seqlen_q, seqlen_k)), np.broadcast_to(i, (seqlen_q, seqlen_k)),
               stream, offset & 0xFFFFFFFF)
    words = philox4x32_10(counter, key0, key1)
    word = np.choose(np.broadcast_to(j & 3, (batch, num_heads, seqlen_q, seqlen_k)),
                     [np.broadcast_to(w, (batch, num_heads, seqlen_q, seqlen_k)) for w in words])
    return word < np.uint32(threshold)
