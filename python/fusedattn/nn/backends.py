"""The attention backends of fusedattn.nn: one masking rule, three implementations.

attend(q, k, v, ...) -> (batch, num_heads, seqlen_q, head_dim), where
    q is (batch, num_heads, seqlen_q, head_dim) and k, v are (batch, num_heads_kv, seqlen_k, head_dim),
    num_heads % num_heads_kv == 0 (GQA: query head h reads kv head h // (num_heads / num_heads_kv)).

Positions: query row i is the token at position seqlen_k - seqlen_q + i, i.e. the newest queries are
the newest keys ("bottom-right", what a KV cache needs). causal: key j is visible iff j <= that
position. key_padding_mask (batch, seqlen_k), True = a real token: padded keys are never visible.
A query row that sees no key gives 0 (DESIGN.md), with zero gradients, in every backend.

- "fusedattn": fusedattn.attention; bottom-right causal is its default q_offset, GQA is native,
  and it runs in the (batch, seqlen, heads, head_dim) layout so that merging heads needs no copy.
- "sdpa": torch.nn.functional.scaled_dot_product_attention (GQA needs torch >= 2.5). Its is_causal
  is top-left, the same rule only when seqlen_q == seqlen_k; other causal or padded cases get a bool mask.
- "naive": matmul -> masked softmax -> matmul in the inputs' dtype, K/V repeated for GQA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedattn

ATTN_BACKENDS = ("fusedattn", "sdpa", "naive")


def check_backend(name: str) -> str:
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {name!r}")
    return name


def visible_mask(seqlen_q: int, seqlen_k: int, *, causal: bool, key_padding_mask=None, device=None):
    """Bool (batch or 1, 1, seqlen_q, seqlen_k) mask of the visible keys, True = attend; None = all."""
    mask = None
    if causal:
        position = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)  # (Lq, 1)
        mask = (torch.arange(seqlen_k, device=device)[None, :] <= position)[None, None]    # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]                                        # (B, 1, 1, Lk)
        mask = padding if mask is None else mask & padding
    return mask


def attend(q, k, v, *, backend: str = "fusedattn", causal: bool = True, key_padding_mask=None, scale=None):
    """Attention of q over k, v with the module's masking rule (see the file docstring)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key padding mask must be (batch, seqlen_k) = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    if backend == "fusedattn":
        return _attend_fusedattn(q, k, v, causal, key_padding_mask, scale)
    if backend == "sdpa":
        return _attend_sdpa(q, k, v, causal, key_padding_mask, scale)
    if backend == "naive":
        return _attend_naive(q, k, v, causal, key_padding_mask, scale)
    raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")


def _attend_fusedattn(q, k, v, causal, key_padding_mask, scale):
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]   # (B, 1, 1, Lk)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                                      # (B, L, H, D) views
    out = fusedattn.attention(q, k, v, causal=causal, scale=scale, layout="bshd", attn_mask=attn_mask)
    return out.transpose(1, 2)                                                            # (B, H, Lq, D) view


def _attend_sdpa(q, k, v, causal, key_padding_mask, scale):
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}  # the argument exists from torch 2.5
    if key_padding_mask is None and (not causal or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    mask = visible_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


def _attend_naive(q, k, v, causal, key_padding_mask, scale):
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))                           # (B, H, Lk, D)
    scores = (q @ k.transpose(-2, -1)) * scale                                          # (B, H, Lq, Lk)
    mask = visible_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if mask is None:
        return torch.softmax(scores, dim=-1) @ v
    # Fill with the dtype's min rather than -inf: a row with no visible key then stays finite
    # (uniform) in the forward and backward, and the row factor below makes it exactly 0.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * mask.any(dim=-1, keepdim=True)
    return probs @ v
