// Where token j of (sequence b, kv head h) lives in a contiguous or paged KV cache
// (attention_cuda.h, KVCache), and how many tokens each sequence attends to.
#pragma once
#include <cstdint>

#include "common/params.h"
#include "cuda/attention_cuda.h"
#include "cuda/compat.cuh"

namespace fusedattn {
namespace cuda {

// Element pointer of row `key` of (batch, kv_head) in the cache `ref`, or nullptr when the
// page id in the block table is outside [0, num_blocks) (never dereferenced then).
template <typename S>
FA_DEVICE S* cache_row(const TensorRef& ref, const KVCache& cache, int64_t batch, int64_t kv_head, int64_t key) {
  int64_t page = batch;
  int64_t row = key;
  if (cache.block_table != nullptr) {
    const int64_t id = cache.block_table[batch * cache.block_table_stride + key / cache.block_size];
    if (id < 0 || id >= cache.num_blocks) return nullptr;
    page = id;
    row = key % cache.block_size;
  }
  return static_cast<S*>(ref.data) + page * ref.batch_stride + kv_head * ref.head_stride + row * ref.row_stride;
}

// Keys sequence `batch` attends to: its cached tokens plus the ones appended by this call.
FA_DEVICE int64_t cache_seqlen(const KVCache& cache, int64_t seqlen_new, int64_t batch) {
  int64_t length = cache.seqlens == nullptr ? cache.capacity : cache.seqlens[batch] + seqlen_new;
  length = length < 0 ? 0 : length;
  return length > cache.capacity ? cache.capacity : length;
}

// The geometry of one sequence for variant.h's visible_keys: its key count and its queries
// at the last positions (bottom-right, q_offset = seqlen_k - seqlen_q).
FA_DEVICE AttentionParams sequence_geometry(const AttentionParams& p, int64_t seqlen_k) {
  AttentionParams g;
  g.seqlen_q = p.seqlen_q;
  g.seqlen_k = seqlen_k;
  g.q_offset = seqlen_k - p.seqlen_q;
  g.causal = p.causal;
  g.window_left = p.window_left;
  g.window_right = p.window_right;
  return g;
}

}  // namespace cuda
}  // namespace fusedattn
