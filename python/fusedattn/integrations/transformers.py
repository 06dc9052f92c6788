"""Hugging Face transformers integration: fusedattn as an `attn_implementation`.

    from fusedattn.integrations import transformers as fusedattn_hf
    fusedattn_hf.register()                                          # once per process
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fusedattn")
    model.set_attn_implementation("fusedattn")                       # or switch a loaded model

register() puts attention_forward in transformers' AttentionInterface and SDPA's mask builder in
AttentionMaskInterface under the same name, so models build the masks they build for "sdpa": a 4-D
bool (batch, 1, q_len, kv_len) mask, True = attend, or None when plain causal/full attention suffices.
(Without the mask entry transformers would pass no mask at all: no padding, no causality.)

The rules, which are those of transformers' sdpa integration minus repeat_kv:
- An explicit mask (bool, or float and additive) already holds causality, padding, the sliding
  window and the cache offset: it is used as is.
- No mask: causal iff the module is causal and q_len > 1, top-left aligned like torch's is_causal.
  transformers relies on top-left for a static-cache prefill (the keys past q_len are empty slots).
  q_len == 1 (decoding) attends to every key.
- GQA: k, v keep their num_key_value_heads heads; fusedattn reads them in place.
- sliding_window w (Mistral, Qwen2, Gemma-2) means keys in (p - w, p]: window (w - 1, 0). A given
  mask already contains it, so it is applied only without one, to causal layers.
- scaling, softcap (Gemma-2), dropout (transformers passes 0 outside training), s_aux (gpt-oss
  attention sinks) map to fusedattn's arguments; position_bias (T5) joins the mask as a float bias.

BLOOM computes attention inside BloomAttention.forward, outside the AttentionInterface (as of
transformers 5.24); patch_bloom(model) swaps in a forward that calls fusedattn with ALiBi slopes.
"""

from __future__ import annotations

import types

import torch

import fusedattn

NAME = "fusedattn"

__all__ = ["NAME", "attention_forward", "patch_bloom", "register"]


def register(name: str = NAME) -> None:
    """Registers fusedattn under `name` in transformers' attention and attention-mask interfaces."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def attention_forward(module: torch.nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, s_aux=None, position_bias=None, **kwargs):
    """transformers' attention-function contract, computed by fusedattn.attention.

    query (batch, num_heads, q_len, head_dim); key, value (batch, num_key_value_heads, kv_len, head_dim);
    attention_mask (batch or 1, 1, q_len, kv_len) bool (True = attend) or float (added), or None.
    Returns (attn_output (batch, q_len, num_heads, head_dim), None): no attention weights.
    """
    if kwargs.get("output_attentions", False):
        _warn_once("fusedattn does not return attention weights (output_attentions); use 'eager' for them")
    q_len = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(is_causal) and q_len > 1 and attention_mask is None
    if position_bias is not None:  # T5-style learned bias: fold it and the causal rule into one float mask
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    window = (-1, -1)
    if sliding_window is not None and attention_mask is None and is_causal:
        window = (sliding_window - 1, 0)
    # Without a mask the causal rule is top-left (q_offset 0) for several queries, as torch's SDPA;
    # a single decoding query is the newest token (bottom-right), which places its window.
    q_offset = 0 if q_len > 1 else key.shape[2] - 1
    out = fusedattn.attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout="bshd",  # (B, L, H, D) views
        causal=causal, scale=scaling, q_offset=q_offset, window=window, attn_mask=attention_mask,
        softcap=softcap or 0.0, sinks=s_aux, dropout_p=dropout,
    )
    return out, None  # (batch, q_len, num_heads, head_dim), allocated in that layout


# ---------------------------------------------------------------- BLOOM (ALiBi)

def patch_bloom(model: torch.nn.Module) -> torch.nn.Module:
    """Routes every BloomAttention in `model` through fusedattn; returns the model.

    BLOOM adds slope_h · key_position to the scores, a key's position being the count of attended
    tokens before it in attention_mask. Where the mask's zeros all come first (left padding) or
    last, that is j minus a per-row constant, and under the causal mask every visible key j is at
    or before the query's position p, so slope_h · j = -slope_h · |p - j| + slope_h · p: fusedattn's
    ALiBi plus a per-row constant, which softmax ignores. The slopes are then read, not the
    (batch · heads, 1, kv_len) alibi tensor. A mask with holes (zeros between ones, as packed
    sequences leave) shifts the positions after each hole: there the alibi tensor itself is added to
    the mask as a float bias (a dense (batch, heads, q_len, kv_len) one). Calls that ask for
    attention weights (output_attentions) or use the slow_but_exact tensor-parallel split take the
    original forward, which needs BLOOM's own float masks: keep such models on attn_implementation
    "eager".
    """
    from transformers.models.bloom.modeling_bloom import BloomAttention

    patched = 0
    for module in model.modules():
        if isinstance(module, BloomAttention):
            module.forward = types.MethodType(_bloom_attention_forward, module)
            patched += 1
    if not patched:
        raise ValueError("patch_bloom: the model has no BloomAttention module")
    return model


def _bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                             output_attentions=False, **kwargs):
    """BloomAttention.forward (transformers 5.24) with the scores, softmax and bmm done by fusedattn."""
    from transformers.models.bloom.modeling_bloom import BloomAttention, _get_alibi_slopes, dropout_add

    if output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact):
        return BloomAttention.forward(self, hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                      use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # 3 × (B, H, L, D) views
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)          # (B, H, kv_len, D)
    # BLOOM's own masks (config "eager") are float and always given. Under the "fusedattn" mask
    # builder the mask may be None: then attention_forward's rule (top-left causal for several
    # queries). Either way each query sits at or after its visible keys, as ALiBi here needs.
    causal = attention_mask is None and q_length > 1
    slopes = _get_alibi_slopes(self.num_heads, hidden_states.device)
    if attention_mask is not None and _mask_has_holes(attention_mask):
        bias = alibi.view(batch_size, self.num_heads, 1, -1)[..., : key.shape[2]]  # slope_h · position_j
        if attention_mask.dtype == torch.bool:  # (True attends)
            attention_mask = torch.where(attention_mask, bias, float("-inf"))
        else:
            attention_mask = bias + attention_mask
        slopes = None
    context = fusedattn.attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout="bshd",
        causal=causal, q_offset=0 if causal else None, scale=self.inv_norm_factor, attn_mask=attention_mask,
        alibi_slopes=slopes, dropout_p=self.attention_dropout.p if self.training else 0.0,
    ).reshape(batch_size, q_length, self.hidden_size)                      # (B, L, H·D)
    return dropout_add(self.dense(context), residual, self.hidden_dropout, self.training), None


def _mask_has_holes(mask: torch.Tensor) -> bool:
    """Whether a (batch, 1, q_len, kv_len) mask (bool: True attends; float: 0 attends, very negative
    hides) leaves a gap between the visible keys of a sequence's last query row, which sees them all."""
    visible = mask[:, 0, -1] if mask.dtype == torch.bool else mask[:, 0, -1] > torch.finfo(mask.dtype).min / 2
    index = torch.arange(visible.shape[-1], device=mask.device)
    first = torch.where(visible, index, visible.shape[-1]).amin(-1)
    last = torch.where(visible, index, -1).amax(-1)
    return bool(((last - first + 1 > visible.sum(-1)) & (last >= 0)).any())


def _warn_once(message: str) -> None:
    from transformers.utils import logging

    logging.get_logger(__name__).warning_once(message)
