"""TransformerBlock: pre-norm residual block, x + attn(norm(x)) then x + mlp(norm(x)).

The MLP is either GELU (hidden -> intermediate -> GELU -> hidden, GPT-2 style) or SwiGLU
(down(silu(gate(x)) · up(x)), Llama style); the norm is RMSNorm or LayerNorm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .norm import make_norm


class MLP(nn.Module):
    """GELU feed-forward: (..., hidden) -> (..., intermediate) -> GELU -> (..., hidden)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.fc_out = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020): down(silu(gate(x)) · up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def default_intermediate_size(hidden_size: int, mlp: str) -> int:
    """4·hidden for GELU; for SwiGLU 8/3·hidden (the same parameter count), rounded up to 8."""
    if mlp == "gelu":
        return 4 * hidden_size
    size = 8 * hidden_size // 3
    return (size + 7) // 8 * 8


class TransformerBlock(nn.Module):
    """One pre-norm Transformer layer.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim, causal, rope_base, bias, attn_backend,
            layer_idx: as in Attention.
        intermediate_size: MLP width; default default_intermediate_size(hidden_size, mlp).
        mlp: "swiglu" or "gelu".
        norm: "rms" (RMSNorm) or "layer" (LayerNorm); norm_eps its epsilon.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, intermediate_size: int | None = None, mlp: str = "swiglu",
                 norm: str = "rms", norm_eps: float = 1e-6, causal: bool = True,
                 rope_base: float | None = 10000.0, bias: bool = False, attn_backend: str = "fusedattn",
                 layer_idx: int = 0):
        super().__init__()
        if mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {mlp!r}")
        intermediate_size = intermediate_size or default_intermediate_size(hidden_size, mlp)
        self.attn_norm = make_norm(norm, hidden_size, norm_eps)
        self.attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, causal=causal,
                              rope_base=rope_base, bias=bias, attn_backend=attn_backend, layer_idx=layer_idx)
        self.mlp_norm = make_norm(norm, hidden_size, norm_eps)
        self.mlp = (SwiGLU if mlp == "swiglu" else MLP)(hidden_size, intermediate_size, bias=bias)

    def forward(self, x, *, attention_mask=None, positions=None, cache=None):
        """x (batch, seqlen, hidden) -> same; the keyword arguments are Attention's."""
        x = x + self.attn(self.attn_norm(x), attention_mask=attention_mask, positions=positions, cache=cache)
        return x + self.mlp(self.mlp_norm(x))
