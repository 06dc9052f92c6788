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
};

// k/v in params are the cache viewed as (cache_rows rows or pages, kv_heads, capacity or
// page_size, d); params.seqlen_k holds that third dim on entry.
void apply_kvcache(AttentionParams& params, const KvCacheViews& views, int64_t cache_rows, IndexCopies& copies);

}  // namespace fusedattn
