"""fusedattn.nn: Transformer building blocks on fusedattn.attention (needs torch).

    from fusedattn.nn import TransformerConfig, TransformerLM
    model = TransformerLM(TransformerConfig(vocab_size=32000, num_heads=8, num_kv_heads=2))
    logits = model(input_ids)                                # (batch, seqlen, vocab_size)
    tokens = model.generate(input_ids, max_new_tokens=32)    # prefill + KV-cached decoding

Every attention layer takes attn_backend="fusedattn" | "sdpa" | "naive" with identical masking
semantics, so one set of weights can be run and compared on each.
"""

from .attention import Attention
from .backends import ATTN_BACKENDS, attend, visible_mask
from .block import MLP, SwiGLU, TransformerBlock
from .cache import KVCache
from .model import TransformerConfig, TransformerLM
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rotary

__all__ = [
    "ATTN_BACKENDS",
    "Attention",
    "KVCache",
    "MLP",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerLM",
    "apply_rotary",
    "attend",
    "visible_mask",
]
