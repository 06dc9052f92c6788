"""Attention: the multi-head (GQA) self-attention layer of fusedattn.nn.

    x (batch, seqlen, hidden) -> q, k, v projections -> RoPE -> [KV cache] -> attend -> out projection.

num_kv_heads < num_heads gives grouped-query attention (num_kv_heads = 1: multi-query); K/V are
never repeated for fusedattn and sdpa. With a KVCache the new keys are appended to the layer's
cache and the queries attend to everything cached, bottom-right aligned (query i is the token at
position past + i). attention_mask (batch, past + seqlen) marks real tokens (1/True) and padding
(0/False) among all the keys. attn_backend picks "fusedattn", "sdpa" or "naive" (backends.py) with
identical semantics, so the same weights can be compared across them.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import attend, check_backend
from .rope import RotaryEmbedding


class Attention(nn.Module):
    """Self-attention with GQA, RoPE, padding masks and a KV cache.

    Args:
        hidden_size: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (divides num_heads); default num_heads.
        head_dim: default hidden_size // num_heads.
        causal: decoder (True) or bidirectional encoder (False) attention.
        rope_base: RoPE frequency base; None disables RoPE.
        bias: biases in the four projections.
        attn_backend: "fusedattn", "sdpa" or "naive".
        layer_idx: this layer's slot in a KVCache.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, causal: bool = True, rope_base: float | None = 10000.0,
                 bias: bool = False, attn_backend: str = "fusedattn", layer_idx: int = 0):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for value, name in ((hidden_size, "hidden_size"), (num_heads, "num_heads"), (num_kv_heads, "num_kv_heads")):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}"
                             + (f" (hidden_size {hidden_size} // num_heads {num_heads})" if head_dim is None else ""))
        self.causal = causal
        self.attn_backend = check_backend(attn_backend)
        self.layer_idx = layer_idx
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)
        self.rotary = None if rope_base is None else RotaryEmbedding(self.head_dim, rope_base)

    def forward(self, x, *, attention_mask=None, positions=None, cache=None):
        """x (batch, seqlen, hidden) -> (batch, seqlen, hidden).

        attention_mask: (batch, past + seqlen) bool/int, True/1 = real token; None = no padding.
        positions: RoPE positions, (seqlen,) or (batch, seqlen); default past + arange(seqlen).
        cache: a KVCache; this layer's keys and values are appended to it.
        """
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)     # (B, H, L, D)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past = 0 if cache is None else cache.seqlen(self.layer_idx)
        if self.rotary is not None:
            if positions is None:
                positions = torch.arange(past, past + seqlen, device=x.device)
            q, k = self.rotary(q, k, positions)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                             # (B, Hkv, S, D)
        out = attend(q, k, v, backend=self.attn_backend, causal=self.causal, key_padding_mask=attention_mask,
                     scale=self.scale)                                                            # (B, H, L, D)
        out = out.transpose(1, 2).reshape(batch, seqlen, self.num_heads * self.head_dim)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, attn_backend={self.attn_backend!r}")
