// Where key j of sequence b lives in a contiguous or paged KV cache (AttentionParams::sequences,
// attention_cuda.h), and which slots each sequence attends to.
#pragma once
#include <cstdint>

#include "common/params.h"
#include "cuda/compat.cuh"

namespace fusedattn {
namespace cuda {

// The cache slots [begin, begin + length) of one sequence: [k_begin[b], seqlens_k[b]) clamped
// to [0, capacity].
struct CacheSequence {
  int64_t begin;
  int64_t length;
};

FA_DEVICE CacheSequence cache_sequence(const SequenceLayout& s, int64_t capacity, int64_t batch) {
  int64_t end = s.seqlens_k[batch];
  end = end < 0 ? 0 : end > capacity ? capacity : end;
  int64_t begin = s.k_begin != nullptr ? s.k_begin[batch] : 0;
  begin = begin < 0 ? 0 : begin > end ? end : begin;
  return {begin, end - begin};
}

// Element pointer of cache slot `slot` of (batch, kv_head) in the cache viewed by `ref`, or
// nullptr when its row or page id is outside [0, cache_rows) (then never dereferenced).
template <typename S>
FA_DEVICE S* cache_slot(const TensorRef& ref, const SequenceLayout& s, int64_t cache_rows, int64_t batch,
                        int64_t kv_head, int64_t slot) {
  int64_t page;
  int64_t row = slot;
  if (s.block_table != nullptr) {
    page = s.block_table[batch * s.block_table_stride + slot / s.page_size];
    row = slot % s.page_size;
  } else {
    page = s.cache_batch_idx != nullptr ? s.cache_batch_idx[batch] : batch;
  }
  if (page < 0 || page >= cache_rows) return nullptr;
  return static_cast<S*>(ref.data) + page * ref.batch_stride + kv_head * ref.head_stride + row * ref.row_stride;
}

// The geometry of one sequence for variant.h's visible_keys and query_position: seqlen_k keys,
// query row 0 at position q_offset (seqlen_k - seqlen_q: bottom-right), p's causal and window.
FA_DEVICE AttentionParams sequence_geometry(const AttentionParams& p, int64_t seqlen_k, int64_t q_offset) {
  AttentionParams g;
  g.seqlen_k = seqlen_k;
  g.q_offset = q_offset;
  g.causal = p.causal;
  g.window_left = p.window_left;
  g.window_right = p.window_right;
  return g;
}

// The LSE entry of (batch, head, row).
FA_DEVICE int64_t lse_index(const AttentionParams& p, int64_t batch, int64_t head, int64_t row) {
  return batch * p.lse_batch_stride + head * p.lse_head_stride + row;
}

}  // namespace cuda
}  // namespace fusedattn
