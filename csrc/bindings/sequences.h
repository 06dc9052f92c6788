// Validation of variable-length batches (cu_seqlens) and KV caches (cache_seqlens, paged
// block_table, cache_batch_idx, cache_leftpad), filling AttentionParams::sequences. Every
// index is checked against the tensors' sizes so that no input can read outside them.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "bindings/tensor_view.h"
#include "common/params.h"

namespace fusedattn {

// The index arrays of one call, copied: they are checked here and read again by the kernels
// with the GIL released, so they must not stay the caller's memory, which another thread may
// change in between (a block_table entry so changed had the kernel read outside the cache).
// Lives as long as the call's AttentionParams, which point into it (the inner vectors' buffers
// stay put when the outer one grows).
using IndexCopies = std::vector<std::vector<int32_t>>;

// cu_seqlens_q/k: int32 (batch + 1,), starting at 0, non-decreasing, ending within the packed
// totals (params.seqlen_q/k hold the totals on entry). Sets batch, the per-sequence maxima and
// zero batch strides.
void apply_varlen(AttentionParams& params, const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k,
                  IndexCopies& copies);

struct KvCacheViews {
  TensorView cache_seqlens;                   // int32 (batch,): keys per sequence (after appending)
  std::optional<TensorView> block_table;      // int32 (batch, max_pages): paged cache
  std::optional<TensorView> cache_batch_idx;  // int32 (batch,): cache row per sequence
  std::optional<TensorView> cache_leftpad;    // int32 (batch,): first valid key per sequence
  // New keys and values (batch, new_tokens, kv_heads, d), appended at cache_seqlens, which then
  // count the keys before them; or none.
  std::optional<TensorView> k_new, v_new;
};

// k/v in params are the cache viewed as (cache_rows rows or pages, kv_heads, capacity or
// page_size, d); params.seqlen_k holds that third dim on entry.
// With k_new / v_new, checks them too, and every sequence's keys after the append must fit;
// params.sequences.seqlens_k then counts the keys after it. Writes nothing.
void apply_kvcache(AttentionParams& params, const KvCacheViews& views, int64_t cache_rows, IndexCopies& copies);

// Copies views.k_new / v_new into the caches of params (as apply_kvcache left them; k_cache and
// v_cache are their views) at the slots of the new keys: the last new_tokens keys of each
// sequence, through its block_table row or cache_batch_idx. New entries that share memory with a
// cache are copied out before any slot is written. Raises (having written nothing) when a cache
// is read-only. Call it only once apply_kvcache and every other check have passed, so that a
// rejected call leaves the cache as it was.
void append_to_cache(const AttentionParams& params, const KvCacheViews& views, const TensorView& k_cache,
                     const TensorView& v_cache);

}  // namespace fusedattn
