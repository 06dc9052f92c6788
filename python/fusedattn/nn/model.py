"""TransformerLM: a decoder-only language model, the classic LLM pipeline.

    input_ids (batch, seqlen) -> token embedding -> num_layers × TransformerBlock -> final norm
    -> output head (optionally tied to the embedding) -> logits (batch, seqlen, vocab_size)

generate() turns logits back into tokens: the prompt runs once through the model (prefill),
filling a KVCache; then each new token is one step of seqlen 1 that attends to the cache. Batches
of prompts of different lengths are left-padded and carry an attention_mask; RoPE positions count
only real tokens, so a padded prompt continues exactly as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention
from .backends import check_backend
from .block import TransformerBlock
from .cache import KVCache
from .norm import make_norm


@dataclass
class TransformerConfig:
    """Shape and options of a TransformerLM (see TransformerBlock and Attention for their meaning)."""

    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    mlp: str = "swiglu"
    norm: str = "rms"
    norm_eps: float = 1e-6
    causal: bool = True
    rope_base: float | None = 10000.0
    bias: bool = False
    tie_embeddings: bool = True
    attn_backend: str = "fusedattn"
    init_std: float = 0.02


class TransformerLM(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.hidden_size, config.num_heads, config.num_kv_heads, head_dim=config.head_dim,
                             intermediate_size=config.intermediate_size, mlp=config.mlp, norm=config.norm,
                             norm_eps=config.norm_eps, causal=config.causal, rope_base=config.rope_base,
                             bias=config.bias, attn_backend=config.attn_backend, layer_idx=i)
            for i in range(config.num_layers)
        )
        self.norm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_attn_backend(self, name: str) -> None:
        """Switches every layer to attention backend `name` ("fusedattn", "sdpa" or "naive")."""
        check_backend(name)
        self.config.attn_backend = name
        for module in self.modules():
            if isinstance(module, Attention):
                module.attn_backend = name

    def new_cache(self, max_seqlen: int | None = None) -> KVCache:
        """An empty KVCache for this model (max_seqlen: preallocate; None: grow as needed)."""
        return KVCache(len(self.blocks), max_seqlen)

    def forward(self, input_ids, attention_mask=None, cache=None, position_ids=None):
        """input_ids (batch, seqlen) -> logits (batch, seqlen, vocab_size).

        attention_mask: (batch, past + seqlen), 1/True = real token, 0/False = padding, where past is
            the number of tokens already in `cache` (0 without one).
        cache: a KVCache (see new_cache()); the new tokens' keys and values are appended to it.
        position_ids: RoPE positions (batch, seqlen); default: count of real tokens before each one.
        """
        batch, seqlen = input_ids.shape
        past = 0 if cache is None else cache.seqlen()
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            if tuple(attention_mask.shape) != (batch, past + seqlen):
                raise ValueError(f"attention_mask must be (batch, past + seqlen) = {(batch, past + seqlen)}, "
                                 f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + seqlen, device=input_ids.device)
            else:
                position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)[:, past:]
        x = self.embed(input_ids)                                                   # (B, L, hidden)
        for block in self.blocks:
            x = block(x, attention_mask=attention_mask, positions=position_ids, cache=cache)
        return self.head(self.norm(x))                                              # (B, L, vocab)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, attention_mask=None, temperature: float = 0.0,
                 generator: torch.Generator | None = None, use_cache: bool = True):
        """Continues input_ids (batch, prompt_len) by max_new_tokens tokens -> (batch, prompt_len + max_new_tokens).

        temperature 0 is greedy (argmax); > 0 samples from softmax(logits / temperature), drawing
        from `generator` when given. attention_mask (batch, prompt_len) marks left padding.
        use_cache=False recomputes the whole sequence at every step (no KVCache): the reference
        that the cached path must reproduce.
        """
        if not self.config.causal:
            raise ValueError("generate() needs a causal model (TransformerConfig.causal=True)")
        batch, prompt_len = input_ids.shape
        tokens = input_ids
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        cache = self.new_cache(prompt_len + max_new_tokens) if use_cache else None
        step_input = input_ids                                                      # prefill: the whole prompt
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else tokens, attention_mask=mask, cache=cache)[:, -1]  # (B, V)
            next_token = _pick_token(logits, temperature, generator)                # (B, 1)
            tokens = torch.cat((tokens, next_token), dim=1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
            step_input = next_token
        return tokens


def _pick_token(logits, temperature: float, generator):
    """logits (batch, vocab) -> (batch, 1) token ids."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
