"""CUDA backend glue: the thin functions the public API calls when its inputs are CUDA arrays.

Each function passes the caller's arrays (already validated and laid out by the public API) to
``fusedattn._cuda`` together with the current CUDA stream of their device, so the kernels run
asynchronously in order with the caller's other work, exactly like a torch op. Outputs are
allocated by the caller (or here, with torch) and filled in place.

Layout conventions (all views, never copies): q, k, v, out are (batch, heads, seqlen, head_dim);
a KV cache is viewed as (rows or pages, heads_kv, max_seqlen or page_size, head_dim), i.e. the
flash-attn cache tensor ``.transpose(1, 2)``; index arrays are int32 on the same GPU. The kernel
signatures are documented in docs/cuda.md.
"""

from __future__ import annotations

from . import _arrays

try:
    from . import _cuda
except ImportError:  # built without nvcc
    _cuda = None

__all__ = ["available", "forward", "varlen_forward", "kvcache_append", "kvcache_forward", "decode",
           "merge_attention_states"]


def available() -> bool:
    """Whether the CUDA module was built and sees at least one GPU."""
    return _cuda is not None and _cuda.device_count() > 0


def _module():
    if _cuda is None:
        raise RuntimeError("fusedattn was built without CUDA (no nvcc at install time): reinstall with "
                           "FUSEDATTN_CUDA=ON on a machine with the CUDA toolkit")
    return _cuda


def _stream(x) -> int:
    """The current CUDA stream of x's device as an int (torch), else the legacy default stream (0)."""
    if _arrays.is_torch(x):
        return _arrays.torch_module().cuda.current_stream(x.device).cuda_stream
    return 0


def forward(q, k, v, out, lse, variant, names=("q", "k", "v")) -> None:
    """Forward attention into out (and lse, float32 (batch, heads, seqlen_q), or None).

    variant: functional._Call.variant's tuple (scale, causal, q_offset, window_left,
    window_right, softcap, attn_mask, alibi_slopes (float64), sinks (float64), dropout_p, seed,
    offset), its arrays on q's GPU. fp16/bf16 run on the tensor cores, fp32 on the exact path.
    """
    _module().attention_forward(q, k, v, out, lse, variant, _stream(q), tuple(names))


def varlen_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, variant, names=("q", "k", "v")) -> None:
    """Forward over packed variable-length sequences into out (and lse), with no host sync.

    q, k, v, out: the packed (total, heads, head_dim) arrays viewed as (1, heads, total, head_dim);
    lse: float32 (1, heads, total_q) or None. cu_seqlens_q/k: int32 (batch + 1,) on the GPU, read
    by the kernel, which clamps them to the packed rows. max_seqlen_q sizes the grid (a longer
    sequence is still computed in full). variant: as forward's, no attn_mask; each sequence is
    bottom-right (q_offset is ignored). Rows after cu_seqlens_q[-1] get out 0 and LSE -inf.
    """
    _module().attention_varlen_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), variant,
                                       _stream(q), tuple(names))


def kvcache_forward(q, k_cache, v_cache, out, lse, cache_seqlens, variant, *, block_table=None, cache_batch_idx=None,
                    cache_leftpad=None, num_splits=0) -> None:
    """Attention of q over a KV cache (split-KV "flash-decoding"), as _C.attention_kvcache_forward.

    cache_seqlens: int32 (batch,) keys per sequence, new tokens included; sequence b attends
    to cache slots [cache_leftpad[b], cache_seqlens[b]) with its queries at the last positions.
    block_table: int32 (batch, max_pages) for a paged cache (any page size), else None.
    num_splits: 0 = heuristic from the SM count, or 1..128. No attn_mask, no dropout.
    """
    _module().attention_kvcache_forward(q, k_cache, v_cache, out, lse, cache_seqlens, block_table, cache_batch_idx,
                                        cache_leftpad, variant, int(num_splits), _stream(q))


def kvcache_append(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None, cache_batch_idx=None) -> None:
    """Writes k, v (batch, heads_kv, seqlen_new, head_dim) into the cache at slots
    cache_seqlens[b] + t (int32 on the GPU), in place; slots past the capacity are dropped."""
    _module().kvcache_append(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, _stream(k_cache))


def decode(q, k_cache, v_cache, out, lse, cache_seqlens, variant, *, k=None, v=None, block_table=None,
           cache_batch_idx=None, cache_leftpad=None, num_splits=0) -> None:
    """flash_attn_with_kvcache on the GPU with no host synchronisation: appends k, v (if given)
    at cache_seqlens (tokens cached BEFORE this call), then attends q over the updated cache."""
    if k is not None:
        kvcache_append(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table, cache_batch_idx=cache_batch_idx)
        cache_seqlens = cache_seqlens + k.shape[2]  # stays int32, on the GPU
    kvcache_forward(q, k_cache, v_cache, out, lse, cache_seqlens, variant, block_table=block_table,
                    cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, num_splits=num_splits)


def merge_attention_states(out_a, lse_a, out_b, lse_b, out=None, lse=None):
    """(out, lse) over the union of two disjoint key sets from the two partial results: natural-log
    LSEs (float32 (batch, heads, seqlen), any strides), outs (batch, heads, seqlen, head_dim).
    Parts with LSE -inf contribute nothing. out / lse are allocated (torch) when not given;
    out may be out_a itself (in place)."""
    if out is None:
        out = out_a.new_empty(out_a.shape)
    if lse is None:
        lse = lse_a.new_empty(lse_a.shape)
    _module().merge_attention_states(out_a, lse_a, out_b, lse_b, out, lse, _stream(out_a))
    return out, lse
