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
  if (begin > p.seqlen_k) begin = p.seqlen_k;  // a window past the last key sees nothing
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

// ---- Score modifications --------------------------------------------------------------------
// Written once for any arithmetic type V: a scalar (CUDA, and the CPU's scalar ISA) or a GCC
// vector of W lanes (the CPU's AVX2/AVX-512 kernels), so every backend runs the same formula.

// Position of query row `row` (DESIGN.md: row i sits at i + q_offset).
FUSEDATTN_HOST_DEVICE int64_t query_position(const AttentionParams& p, int64_t row) { return row + p.q_offset; }

// ALiBi slope of (batch, head); 0 when ALiBi is off.
FUSEDATTN_HOST_DEVICE double alibi_slope(const AttentionParams& p, int64_t batch, int64_t head) {
  return p.alibi_slopes == nullptr ? 0.0 : p.alibi_slopes[batch * p.alibi_batch_stride + head];
}

// ALiBi: s - slope·|position - key| (flash-attn's definition).
template <typename V, typename S>
FUSEDATTN_HOST_DEVICE V alibi_score(V score, S slope, V position, V key) {
  const V distance = position - key;
  return score - (distance < 0 ? -distance : distance) * slope;
}

// Softcap: cap · tanh(s / cap). `tanh_s_over_cap` is tanh(s / cap), computed by the caller's
// tanh (libm, CUDA's tanhf or the CPU's vector tanh); the backward's chain factor is 1 - t².
template <typename V, typename S>
FUSEDATTN_HOST_DEVICE V softcap_score(V tanh_s_over_cap, S cap) {
  return tanh_s_over_cap * cap;
}

// ---- Dropout: Philox4x32-10, counter-based ------------------------------------------------------
// The keep decision of weight (b, h, i, j) is word (j % 4) of
//   Philox4x32-10(counter = (j / 4, i, b·num_heads + h, offset_lo), key = (seed_lo, seed_hi ^ offset_hi))
// compared with a threshold: keep iff word < floor((1 - p)·2³²). Kept weights are scaled by
// 1/(1 - p). The same (seed, offset) give the same mask on every backend, and the backward
// regenerates it. python/fusedattn/reference.py implements the same function in numpy.
// U32 is uint32_t or a vector of uint32 lanes; mulhilo(a, x, &hi, &lo) is the 32x32->64 product.
template <typename U32, typename MulHiLo>
FUSEDATTN_HOST_DEVICE void philox4x32_10(U32 (&counter)[4], uint32_t key0, uint32_t key1, MulHiLo mulhilo) {
  for (int round = 0; round < 10; ++round) {
    U32 hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, counter[0], hi0, lo0);
    mulhilo(0xCD9E8D57u, counter[2], hi1, lo1);
    const U32 next0 = hi1 ^ counter[1] ^ key0;
    const U32 next2 = hi0 ^ counter[3] ^ key1;
    counter[0] = next0;
    counter[1] = lo1;
    counter[2] = next2;
    counter[3] = lo0;
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
}

FUSEDATTN_HOST_DEVICE void mulhilo_scalar(uint32_t a, uint32_t x, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * x;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

struct DropoutKey {
  uint32_t key0;
  uint32_t key1;
  uint32_t counter3;
};

FUSEDATTN_HOST_DEVICE DropoutKey dropout_key(const AttentionParams& p) {
  return {static_cast<uint32_t>(p.dropout_seed),
          static_cast<uint32_t>(p.dropout_seed >> 32) ^ static_cast<uint32_t>(p.dropout_offset >> 32),
          static_cast<uint32_t>(p.dropout_offset)};
}

// Random words < threshold are kept.
FUSEDATTN_HOST_DEVICE uint32_t dropout_threshold(double dropout_p) {
  const double keep = (1.0 - dropout_p) * 4294967296.0;
  return keep >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(keep);
}

// Factor applied to kept weights: 1/(1 - p), and 0 when everything is dropped (p = 1),
// computed in double and returned in the kernel's compute type T.
template <typename T = float>
FUSEDATTN_HOST_DEVICE T dropout_scale(double dropout_p) {
  return static_cast<T>(dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0);
}

// Scalar keep decision of one weight (tests and simple backends; kernels generate 4 at a time).
FUSEDATTN_HOST_DEVICE bool dropout_keep(const AttentionParams& p, int64_t batch, int64_t head, int64_t row,
                                        int64_t key) {
  const DropoutKey k = dropout_key(p);
  uint32_t counter[4] = {static_cast<uint32_t>(key >> 2), static_cast<uint32_t>(row),
                         static_cast<uint32_t>(batch * p.num_heads + head), k.counter3};
  philox4x32_10(counter, k.key0, k.key1, mulhilo_scalar);
  return counter[key & 3] < dropout_threshold(p.dropout_p);
}

}  // namespace
}  // namespace fusedattn
