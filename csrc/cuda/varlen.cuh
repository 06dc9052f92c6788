// Packed variable-length batches (flash-attn's varlen layout) in the forward kernels.
//
// q/out are (total_q, heads, head_dim) and k/v (total_k, heads_kv, head_dim), viewed as
// (1, heads, total, head_dim): batch strides 0, params.seqlen_q / seqlen_k = total_q / total_k.
// Sequence b owns q rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) and k rows [cu_seqlens_k[b],
// cu_seqlens_k[b+1]), int32 arrays on the device that each block reads for itself: no host
// sync. Its queries sit bottom-right (q_offset = its seqlen_k - its seqlen_q); dropout and ALiBi
// see batch = b and rows counted from the start of the sequence, as on the CPU.
// The grid has one more "sequence", b = batch: the packed rows after cu_seqlens_q[batch], which
// belong to no sequence and get out 0 and LSE -inf. The entries are clamped to the packed rows,
// so no cu_seqlens value can make a kernel read or write outside the tensors. max_seqlen_q sizes
// the grid; see fill_rows_outside_tiles for a sequence longer than it.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/params.h"
#include "cuda/compat.cuh"
#include "cuda/kv_cache.cuh"

namespace fusedattn {
namespace cuda {

// The rows of one sequence: q/out rows [q_begin, q_begin + seqlen_q) and k/v rows [k_begin,
// k_begin + seqlen_k) of the views. A plain batch (no cu_seqlens) is all rows of batch `batch`.
struct SequenceRows {
  int64_t q_begin;
  int64_t seqlen_q;
  int64_t k_begin;
  int64_t seqlen_k;
};

// True for the grid's extra sequence of a varlen call: the packed rows after the last sequence.
FA_DEVICE bool is_tail(const AttentionParams& p, int64_t batch) { return batch == p.batch; }

FA_DEVICE SequenceRows sequence_rows(const AttentionParams& p, int64_t batch) {
  const int32_t* cu_q = p.sequences.cu_seqlens_q;
  const int32_t* cu_k = p.sequences.cu_seqlens_k;
  if (cu_q == nullptr) return {0, p.seqlen_q, 0, p.seqlen_k};
  const auto clamp = [](int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; };
  const int64_t q_begin = clamp(cu_q[batch], 0, p.seqlen_q);
  if (is_tail(p, batch)) return {q_begin, p.seqlen_q - q_begin, 0, 0};
  const int64_t q_end = clamp(cu_q[batch + 1], q_begin, p.seqlen_q);
  const int64_t k_begin = clamp(cu_k[batch], 0, p.seqlen_k);
  const int64_t k_end = clamp(cu_k[batch + 1], k_begin, p.seqlen_k);
  return {q_begin, q_end - q_begin, k_begin, k_end - k_begin};
}

// Position of a sequence's query row 0: a plain batch keeps the caller's q_offset, a varlen
// sequence is bottom-right.
FA_DEVICE int64_t sequence_q_offset(const AttentionParams& p, const SequenceRows& seq) {
  return p.sequences.cu_seqlens_q == nullptr ? p.q_offset : seq.seqlen_k - seq.seqlen_q;
}

// variant.h's geometry of one sequence (kv_cache.cuh's sequence_geometry).
FA_DEVICE AttentionParams forward_geometry(const AttentionParams& p, const SequenceRows& seq) {
  return sequence_geometry(p, seq.seqlen_k, sequence_q_offset(p, seq));
}

// Writes `value` to out rows [row_begin, row_begin + rows) of one head and `lse_value` to their
// LSE (varlen views: batch strides 0), by `threads` threads, this one being `tid`; no barrier.
template <typename T>
FA_DEVICE void fill_rows(const AttentionParams& p, int64_t head, int64_t row_begin, int64_t rows, float value,
                         float lse_value, int tid, int threads) {
  using S = typename T::Storage;
  const S fill = T::from_float(value);
  S* out = static_cast<S*>(p.out.data) + head * p.out.head_stride + row_begin * p.out.row_stride;
  for (int64_t e = tid; e < rows * p.head_dim; e += threads) {
    out[(e / p.head_dim) * p.out.row_stride + e % p.head_dim] = fill;
  }
  if (p.lse == nullptr) return;
  for (int64_t r = tid; r < rows; r += threads) p.lse[lse_index(p, 0, head, row_begin + r)] = lse_value;
}

// The rows of a varlen call that no q-tile computes, written by the blocks of (batch, head):
//  - the tail (rows after the last sequence): out 0 and LSE -inf, as on the CPU. Its length is
//    not bounded by max_seqlen_q, so block m writes tiles m, m + num_m_blocks, ...;
//  - the rows of a sequence past the num_m_blocks·block_m rows the grid covers, i.e. a caller's
//    max_seqlen_q below the real length (only cu_seqlens on the device can hide that from the
//    host checks): NaN out and LSE, written by the last tile's block, so that the broken bound
//    shows instead of leaving stale memory. (A loop over the extra q-tiles would compute them,
//    but around the tensor-core tile it made ptxas spill at d64-d256.)
// Returns true for the tail's blocks, which have nothing else to do. Plain batches: no-op.
template <typename T>
FA_DEVICE bool fill_rows_outside_tiles(const AttentionParams& p, const SequenceRows& seq, int64_t batch, int64_t head,
                                       int64_t m_block, int64_t num_m_blocks, int block_m, int tid, int threads) {
  const int64_t covered = num_m_blocks * block_m;
  if (is_tail(p, batch)) {
    for (int64_t r = m_block * block_m; r < seq.seqlen_q; r += covered) {
      fill_rows<T>(p, head, seq.q_begin + r, min64(block_m, seq.seqlen_q - r), 0.0f, -INFINITY, tid, threads);
    }
    return true;
  }
  if (m_block == num_m_blocks - 1 && seq.seqlen_q > covered) {
    fill_rows<T>(p, head, seq.q_begin + covered, seq.seqlen_q - covered, NAN, NAN, tid, threads);
  }
  return false;
}

}  // namespace cuda
}  // namespace fusedattn
