"""torch.library op for attention over a KV cache, so that attention_with_kvcache traces under
torch.compile(fullgraph=True) instead of breaking the graph at its host-side index checks.

    fusedattn::attention_kvcache(q, k_cache!, v_cache!, k?, v?, cache_seqlens, block_table?,
        cache_batch_idx?, cache_leftpad?, rotary_cos?, rotary_sin?, alibi_slopes?, sinks?, scale?,
        causal, window_left, window_right, softcap, rotary_interleaved) -> (out, lse)

k_cache and v_cache are written in place (the new k, v appended at cache_seqlens: the schema marks
them mutated, whether or not a call appends). cache_seqlens is an integer tensor of (batch,) or
(1,) lengths. The real kernel is attention_with_kvcache itself in eager mode (CPU or CUDA: it
runs on the real tensors as plain torch.Tensor views, outside any trace); the fake kernel gives
out like q, as the kernels allocate it, and the LSE, (batch, heads, seqlen_q) float32 (float64
for float64 q). Inference only: no autograd.
"""

from __future__ import annotations

import torch

from .functional import _window_pair

torch.library.define(
    "fusedattn::attention_kvcache",
    "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens, "
    "Tensor? block_table, Tensor? cache_batch_idx, Tensor? cache_leftpad, Tensor? rotary_cos, Tensor? rotary_sin, "
    "Tensor? alibi_slopes, Tensor? sinks, float? scale, bool causal, int window_left, int window_right, "
    "float softcap, bool rotary_interleaved) -> (Tensor, Tensor)",
)


def _attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                       rotary_cos, rotary_sin, alibi_slopes, sinks, scale, causal, window_left, window_right, softcap,
                       rotary_interleaved):
    from . import inference

    q, k_cache, v_cache = (x.as_subclass(torch.Tensor) for x in (q, k_cache, v_cache))  # (same storage)
    return inference.attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, causal=causal, scale=scale,
        window=(window_left, window_right), alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
        rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, return_lse=True)


def _attention_kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                            rotary_cos, rotary_sin, alibi_slopes, sinks, scale, causal, window_left, window_right,
                            softcap, rotary_interleaved):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # (CUDA takes no float64)
    # as the kernels allocate it: contiguous on the CPU, q's own (dense) layout on CUDA
    out = torch.empty_like(q) if q.is_cuda else torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype)
    return out, lse


torch.library.impl("fusedattn::attention_kvcache", "CPU")(_attention_kvcache)
torch.library.impl("fusedattn::attention_kvcache", "CUDA")(_attention_kvcache)
torch.library.register_fake("fusedattn::attention_kvcache")(_attention_kvcache_fake)


def attention_kvcache(q, k_cache, v_cache, k, v, *, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                      causal, scale, window, alibi_slopes, softcap, sinks, rotary_cos, rotary_sin, rotary_interleaved):
    """attention_with_kvcache's arguments (torch tensors) through the op: returns (out, lse).
    As in eager mode, cache_seqlens may be an int and the index arrays lists or numpy arrays: they
    become int32 tensors on q's device (an int, of shape (1,))."""
    def indices(x):
        return x if x is None or isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.int32, device=q.device)

    cache_seqlens = indices(cache_seqlens).reshape(-1)
    block_table, cache_batch_idx, cache_leftpad = (indices(x) for x in (block_table, cache_batch_idx, cache_leftpad))
    window_left, window_right = _window_pair(window, "window")
    return torch.ops.fusedattn.attention_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad, rotary_cos, rotary_sin,
        alibi_slopes, sinks, None if scale is None else float(scale), bool(causal), window_left, window_right,
        float(softcap), bool(rotary_interleaved))
