"""RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x²) + eps) · weight, no mean subtraction, no bias.

Low-precision inputs are normalised in fp32 and cast back before the weight, as in Llama.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x (..., dim) -> same shape and dtype."""
        x_float = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """"rms" -> RMSNorm, "layer" -> torch.nn.LayerNorm."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")
