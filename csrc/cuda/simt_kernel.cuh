// The exact-fp32 path: plain FMA (SIMT) attention, one warp per query row, written for
// clarity over speed. Serves the fp32 forward (any head_dim 1..256; plain or packed varlen
// batches, varlen.cuh) and fp32 KV-cache attention (keys from a contiguous or paged cache,
// per-sequence lengths).
//
// The warp walks the row's visible keys 32 at a time: lane j scores key j0 + j (q from shared
// memory, the key row from global memory), the warp takes max / sum by shuffles (online softmax
// with expf, natural units), then every lane accumulates its head-dim columns (d = lane + 32c)
// of Σ_j p_j · v_j, broadcasting p_j by shuffle. fp32 throughout, so results match the fp64
// reference to ~1e-6 relative.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/params.h"
#include "common/variant.h"
#include "cuda/compat.cuh"
#include "cuda/kv_cache.cuh"
#include "cuda/score_mod.cuh"
#include "cuda/varlen.cuh"

namespace fusedattn {
namespace cuda {

struct SimtArgs {
  AttentionParams params;
  bool kv_cache;       // keys from a KV cache (params.sequences: per-sequence slots, bottom-right)
  int64_t cache_rows;  // with kv_cache: rows or pages of k/v
  int64_t capacity;    // with kv_cache: slots a sequence can address
  int64_t row_blocks;  // blocks per (sequence, head): ceil(seqlen_q, or max_seqlen_q for varlen, / kSimtWarps)
};

constexpr int kSimtWarps = 4;     // query rows per block
constexpr int kSimtColumns = 8;   // head-dim columns per lane: 8 · 32 = 256
constexpr int kSimtSmemBytes = kSimtWarps * 256 * 4;

// One query row of one head, by one warp; q: the warp's 256 floats of shared memory.
FA_DEVICE void simt_row(const SimtArgs& args, const SequenceRows& seq, int64_t head, int64_t batch, int64_t row,
                        float* q, int lane) {
  const AttentionParams& p = args.params;
  const int64_t kv_head = kv_head_of(p, head);
  const int head_dim = static_cast<int>(p.head_dim);

  // Keys [sequence.begin, + length) of k/v rows (plain, varlen) or of the sequence's cache slots.
  const CacheSequence sequence =
      args.kv_cache ? cache_sequence(p.sequences, args.capacity, batch) : CacheSequence{seq.k_begin, seq.seqlen_k};
  const AttentionParams geo =
      args.kv_cache ? sequence_geometry(p, sequence.length, sequence.length - p.seqlen_q) : forward_geometry(p, seq);
  const KeyRange range = visible_keys(geo, row);
  const auto key_row = [&](const TensorRef& ref, int64_t key) -> const float* {
    if (args.kv_cache) return cache_slot<const float>(ref, p.sequences, args.cache_rows, batch, kv_head, sequence.begin + key);
    return static_cast<const float*>(ref.data) + batch * ref.batch_stride + kv_head * ref.head_stride +
           (sequence.begin + key) * ref.row_stride;
  };

  const float* q_row = static_cast<const float*>(p.q.data) + batch * p.q.batch_stride + head * p.q.head_stride +
                       (seq.q_begin + row) * p.q.row_stride;
  for (int d = lane; d < head_dim; d += 32) q[d] = q_row[d];
  __syncwarp();

  const float scale = static_cast<float>(p.scale);
  const float softcap = static_cast<float>(p.softcap);
  const float position = static_cast<float>(query_position(geo, row));
  const float slope = static_cast<float>(alibi_slope(p, batch, head));
  const void* mask_row = p.mask.type == MaskType::kNone
                             ? nullptr
                             : static_cast<const char*>(p.mask.data) +
                                   (batch * p.mask.batch_stride + head * p.mask.head_stride + row * p.mask.row_stride) *
                                       mask_element_size(p.mask.type);
  // A sink is one more logit in the denominator with no value.
  float row_max = p.sinks != nullptr ? static_cast<float>(p.sinks[head]) : kNegInf;
  float row_sum = p.sinks != nullptr ? 1.0f : 0.0f;
  float o[kSimtColumns];
#pragma unroll
  for (int c = 0; c < kSimtColumns; ++c) o[c] = 0.0f;

  for (int64_t key0 = range.begin; key0 < range.end; key0 += 32) {
    const int64_t key = key0 + lane;
    const float* k = key < range.end ? key_row(p.k, key) : nullptr;
    float score = kNegInf;
    if (k != nullptr) {
      float dot = 0.0f;
      for (int d = 0; d < head_dim; ++d) dot = fmaf(q[d], k[d], dot);
      score = dot * scale;
      if (softcap > 0.0f) score = softcap_score(tanhf(score / softcap), softcap);
      if (p.alibi_slopes != nullptr) score = alibi_score(score, slope, position, static_cast<float>(key));
      if (mask_row != nullptr) score += mask_value(p.mask, mask_row, key);
    }
    const float new_max = fmaxf(row_max, warp_max(score));
    const float shift = new_max == kNegInf ? 0.0f : new_max;
    const float rescale = expf(row_max - shift);
    float prob = expf(score - shift);
    row_sum = row_sum * rescale + warp_sum(prob);
    row_max = new_max;
    if (p.dropout_p > 0.0f && k != nullptr) {
      prob *= dropout_keep(p, batch, head, row, key) ? dropout_scale<float>(p.dropout_p) : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < kSimtColumns; ++c) o[c] *= rescale;
    for (int j = 0; j < 32; ++j) {
      const float weight = __shfl_sync(0xffffffffu, prob, j);
      if (weight == 0.0f) continue;  // masked, dropped, or past the end: the row is never read
      const float* v = key_row(p.v, key0 + j);
#pragma unroll
      for (int c = 0; c < kSimtColumns; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) o[c] = fmaf(weight, v[d], o[c]);
      }
    }
  }

  const float inv = row_sum == 0.0f ? 0.0f : 1.0f / row_sum;
  float* out = static_cast<float*>(p.out.data) + batch * p.out.batch_stride + head * p.out.head_stride +
               (seq.q_begin + row) * p.out.row_stride;
#pragma unroll
  for (int c = 0; c < kSimtColumns; ++c) {
    const int d = lane + 32 * c;
    if (d < head_dim) out[d] = o[c] * inv;
  }
  if (lane == 0 && p.lse != nullptr) {
    p.lse[lse_index(p, batch, head, seq.q_begin + row)] = row_sum == 0.0f ? kNegInf : row_max + logf(row_sum);
  }
}

__global__ void __launch_bounds__(32 * kSimtWarps) simt_kernel(const __grid_constant__ SimtArgs args) {
  const AttentionParams& p = args.params;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t index = blockIdx.x;
  const int64_t row_block = index % args.row_blocks;
  index /= args.row_blocks;
  const int64_t head = index % p.num_heads;
  const int64_t batch = index / p.num_heads;
  const SequenceRows seq = sequence_rows(p, batch);
  if (fill_rows_outside_tiles<Fp32>(p, seq, batch, head, row_block, args.row_blocks, kSimtWarps, threadIdx.x,
                                    32 * kSimtWarps)) {
    return;
  }
  const int64_t row = row_block * kSimtWarps + warp;
  if (row >= seq.seqlen_q) return;  // whole warps only; no block-wide barrier follows
  simt_row(args, seq, head, batch, row, reinterpret_cast<float*>(shared_memory()) + warp * 256, lane);
}

}  // namespace cuda
}  // namespace fusedattn
