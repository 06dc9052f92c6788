// The mask and score-modification semantics of DESIGN.md, as inline host/device functions.
// ONE definition shared by the CPU and CUDA kernels, so the CPU tests pin the GPU semantics.
//
// Causal and sliding-window masks are both "a contiguous range of visible keys per query":
// query position p sees keys j with  max(0, p - left) <= j <= min(seqlen_k - 1, p + right),
// where causal sets right = min(right, 0). Kernels use the range to skip whole tiles and to
// mask the columns of partially visible ones.
#pragma once
#include <cstdint>

#include "common/params.h"

#if defined(__CUDACC__)
#define FUSEDATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDATTN_HOST_DEVICE inline
#endif

namespace fusedattn {
namespace {  // internal linkage: each ISA's translation unit keeps its own copy

// Half-open range [begin, end) of keys visible to one query row; empty when begin >= end.
struct KeyRange {
  int64_t begin;
  int64_t end;
};

// Effective right bound of the window after causal masking (-1 = unbounded).
FUSEDATTN_HOST_DEVICE int64_t effective_window_right(const AttentionParams& p) {
  return p.causal ? 0 : p.window_right;  // a window's right side >= 0, so causal caps it at 0
}

// Keys visible to query row `row` (0-based within its sequence).
FUSEDATTN_HOST_DEVICE KeyRange visible_keys(const AttentionParams& p, int64_t row) {
  const int64_t pos = row + p.q_offset;
  int64_t begin = 0;
  int64_t end = p.seqlen_k;
  if (p.window_left >= 0 && pos - p.window_left > begin) begin = pos - p.window_left;
  const int64_t right = effective_window_right(p);
  if (right >= 0 && pos + right + 1 < end) end = pos + right + 1;
  if (end < begin) end = begin;
  return {begin, end};
}

// Union of the visible ranges of rows [row_begin, row_end): the keys a q-tile must visit.
// Both bounds of visible_keys are non-decreasing in the row, so the first and last rows suffice.
FUSEDATTN_HOST_DEVICE KeyRange visible_keys_of_rows(const AttentionParams& p, int64_t row_begin,
                                                    int64_t row_end) {
  const KeyRange first = visible_keys(p, row_begin);
  const KeyRange last = visible_keys(p, row_end - 1);
  return {first.begin, last.end > first.begin ? last.end : first.begin};
}

// Half-open range [begin, end) of query rows (0-based) that see at least one key of
// [key_begin, key_end): those with visible_keys(row).end > key_begin and .begin < key_end.
struct RowRange {
  int64_t begin;
  int64_t end;
};

FUSEDATTN_HOST_DEVICE RowRange visible_rows_of_keys(const AttentionParams& p, int64_t key_begin,
                                                    int64_t key_end) {
  int64_t begin = 0;
  int64_t end = p.seqlen_q;
  const int64_t right = effective_window_right(p);
  // end(row) = row + q_offset + right + 1 > key_begin
  if (right >= 0 && key_begin - right - p.q_offset > begin) begin = key_begin - right - p.q_offset;
  // begin(row) = row + q_offset - left < key_end
  if (p.window_left >= 0 && key_end + p.window_left - p.q_offset < end) end = key_end + p.window_left - p.q_offset;
  if (end < begin) end = begin;
  return {begin, end};
}

// Query head h reads key/value head h / (num_heads / num_heads_kv) (GQA / MQA).
FUSEDATTN_HOST_DEVICE int64_t kv_head_of(const AttentionParams& p, int64_t head) {
  return head / (p.num_heads / p.num_heads_kv);
}

}  // namespace
}  // namespace fusedattn
