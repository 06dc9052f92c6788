"""Rotary position embeddings (RoPE, Su et al. 2021), in the rotate-half form used by Llama.

The pair (x[i], x[i + head_dim/2]) of every query and key head is rotated by the angle
position · base^(-2i / head_dim). Angles are computed on the fly from the positions, in fp32
(fp64 for fp64 inputs), so no precomputed table limits the sequence length and a model cast to
bf16 keeps exact angles.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x):
    """(..., head_dim) -> (-x2, x1) where x = (x1, x2) split in halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x (batch, heads, seqlen, head_dim); cos, sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k at the given positions.

    Args:
        head_dim: size of each head (even).
        base: the frequency base (10000 in Llama 1/2, 500000 in Llama 3, 1000000 in Qwen2).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)

    def cos_sin(self, positions, dtype):
        """positions (seqlen,) or (batch, seqlen) ints -> cos, sin (1 or batch, 1, seqlen, head_dim) in dtype."""
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=angle_dtype) / self.head_dim
        inv_freq = self.base ** -exponents                                              # (head_dim/2,)
        angles = positions.to(angle_dtype)[..., None] * inv_freq                        # (..., seqlen, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)                                    # (..., seqlen, head_dim)
        if angles.ndim == 2:
            angles = angles[None]
        angles = angles[:, None]                                                        # (B, 1, seqlen, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, q, k, positions):
        """q (batch, num_heads, seqlen, head_dim), k (batch, num_heads_kv, seqlen, head_dim)."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"
