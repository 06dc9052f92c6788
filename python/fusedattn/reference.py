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


def attention_reference(q, k, v, *, causal=False, scale=None, q_offset=None, window=(-1, -1), layout="bhsd"):
    """Returns (out, lse) in float64: out like q (in q's layout), lse (batch, heads, seqlen_q)."""
    q, k, v = (to_float64(x) for x in (q, k, v))
    if layout == "bshd":
        q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))
    elif layout != "bhsd":
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    num_heads, num_heads_kv = q.shape[1], k.shape[1]
    group = num_heads // num_heads_kv
    k = np.repeat(k, group, axis=1)  # query head h reads kv head h // group
    v = np.repeat(v, group, axis=1)
    head_dim = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    scores = np.einsum("bhid,bhjd->bhij", q, k) * scale
    visible = visible_mask(q.shape[2], k.shape[2], causal=causal, q_offset=q_offset, window=window)
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - safe_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = np.where(row_sum > 0, weights / row_sum, 0.0)
        lse = np.where(row_sum[..., 0] > 0, np.log(row_sum[..., 0]) + safe_max[..., 0], -np.inf)
    out = np.einsum("bhij,bhjd->bhid", probs, v)
    if layout == "bshd":
        out = out.swapaxes(1, 2)
    return out, lse
