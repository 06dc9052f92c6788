// Split-KV decode ("flash-decoding") for fp16/bf16 on mma.sync, over a contiguous or paged cache.
//
// Decode is bound by reading K/V once, so a thread block owns ONE kv head of one sequence and
// one split of its keys, and all the query rows that read that kv head: the group's query
// heads times the seqlen_q positions, packed into one 16-row MMA tile ("pack GQA"; more rows
// take more tiles). Each of the block's warps takes 16 keys of every kBlockN = 16·warps key
// tile (double-buffered by cp.async, rows fetched through the block table), keeps its own
// online-softmax state, and at the end the warps' (m, l, O) are merged through shared memory.
// With one split the block writes out / LSE; with several it writes each split's normalised O
// and LSE (fp32 workspace, (splits, batch, heads, seqlen_q[, head_dim])) and combine_kernel merges them: O = Σ e^(lse_s - lse) O_s.
#pragma once
#include <cstdint>

#include "common/params.h"
#include "common/variant.h"
#include "cuda/attention_cuda.h"
#include "cuda/compat.cuh"
#include "cuda/kv_cache.cuh"
#include "cuda/ptx.cuh"
#include "cuda/score_mod.cuh"
#include "cuda/tile_config.h"
#include "cuda/warp_tile.cuh"

namespace fusedattn {
namespace cuda {

struct DecodeArgs {
  AttentionParams attn;  // k, v: the caches; attn.sequences: lengths, pages (attention_cuda.h)
  int64_t cache_rows;
  int64_t capacity;
  int num_splits;
  int num_m_tiles;       // ceil(group · seqlen_q / 16)
  bool aligned;          // 16-byte cp.async path
  float* out_partial;    // (num_splits, batch, num_heads, seqlen_q, head_dim) when num_splits > 1
  float* lse_partial;    // (num_splits, batch, num_heads, seqlen_q)
};

template <typename T, int kHeadDim>
struct DecodeTraits {
  static constexpr int kWarps = decode_tile(kHeadDim).warps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kPitch = smem_pitch<kHeadDim>();
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kKVBytes = 4 * kBlockN * kPitch * 2;  // K and V, 2 stages
  static constexpr int kSmemBytes = kDecodeRows * kPitch * 2 + kKVBytes;
  // The merge reuses the K/V stages: O [warps x 16 x D] then m, l [warps x 16] in fp32.
  static constexpr int kMergeBytes = kWarps * kDecodeRows * (kHeadDim + 2) * 4;
  static_assert(kMergeBytes <= kKVBytes, "the warps' states must fit where K/V were");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(DecodeTraits<T, kHeadDim>::kThreads)
    decode_kernel(const __grid_constant__ DecodeArgs args) {
  using Tr = DecodeTraits<T, kHeadDim>;
  constexpr int kBlockN = Tr::kBlockN, kPitch = Tr::kPitch, kDTiles = Tr::kDTiles;
  const AttentionParams& p = args.attn;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  // Block -> (split, m_tile, kv_head, batch).
  int64_t index = blockIdx.x;
  const int split = static_cast<int>(index % args.num_splits);
  index /= args.num_splits;
  const int m_tile = static_cast<int>(index % args.num_m_tiles);
  index /= args.num_m_tiles;
  const int64_t kv_head = index % p.num_heads_kv;
  const int64_t batch = index / p.num_heads_kv;
  const int group = static_cast<int>(p.num_heads / p.num_heads_kv);
  const int seqlen_q = static_cast<int>(p.seqlen_q);
  const int packed_rows = group * seqlen_q;  // packed row r: head kv_head·group + r / seqlen_q, query r % seqlen_q
  const int head_dim = static_cast<int>(p.head_dim);

  // This split's keys: a run of whole tiles of the capacity, cut to the sequence's length and
  // to the union of the visible ranges of its queries.
  const CacheSequence sequence = cache_sequence(p.sequences, args.capacity, batch);
  const int64_t seqlen_k = sequence.length;
  const AttentionParams geo = sequence_geometry(p, seqlen_k, seqlen_k - p.seqlen_q);
  const int64_t tiles_per_split = ((args.capacity + kBlockN - 1) / kBlockN + args.num_splits - 1) / args.num_splits;
  const int64_t split_begin = split * tiles_per_split * kBlockN;
  const int64_t split_end = min64(split_begin + tiles_per_split * kBlockN, seqlen_k);
  const KeyRange all_rows = visible_keys_of_rows(geo, 0, seqlen_q);
  const int64_t begin = max64(all_rows.begin, split_begin);
  const int64_t end = min64(all_rows.end, split_end);
  const int n_begin = static_cast<int>(begin / kBlockN);
  const int n_end = end > begin ? static_cast<int>((end + kBlockN - 1) / kBlockN) : n_begin;
  const int64_t all_visible_begin = max64(visible_keys(geo, seqlen_q - 1).begin, split_begin);
  const int64_t all_visible_end = min64(visible_keys(geo, 0).end, split_end);

  uint16_t* s_q = reinterpret_cast<uint16_t*>(shared_memory());
  uint16_t* s_k = s_q + kDecodeRows * kPitch;
  uint16_t* s_v = s_k + 2 * kBlockN * kPitch;

  const auto q_row = [&](int r) -> const uint16_t* {
    const int packed = m_tile * kDecodeRows + r;
    if (packed >= packed_rows) return nullptr;
    const int64_t head = kv_head * group + packed / seqlen_q;
    return static_cast<const uint16_t*>(p.q.data) + batch * p.q.batch_stride + head * p.q.head_stride +
           (packed % seqlen_q) * p.q.row_stride;
  };
  load_tile<kDecodeRows, kHeadDim, Tr::kThreads>(s_q, q_row, head_dim, args.aligned, p.q.data, tid);
  auto load_kv = [&](int n, int stage) {
    const int64_t key0 = static_cast<int64_t>(n) * kBlockN;
    const auto row = [&](const TensorRef& ref, int r) {
      return key0 + r < seqlen_k
                 ? cache_slot<const uint16_t>(ref, p.sequences, args.cache_rows, batch, kv_head, sequence.begin + key0 + r)
                 : nullptr;
    };
    load_tile<kBlockN, kHeadDim, Tr::kThreads>(
        s_k + stage * kBlockN * kPitch, [&](int r) { return row(p.k, r); }, head_dim, args.aligned, p.k.data, tid);
    load_tile<kBlockN, kHeadDim, Tr::kThreads>(
        s_v + stage * kBlockN * kPitch, [&](int r) { return row(p.v, r); }, head_dim, args.aligned, p.v.data, tid);
  };
  if (n_begin < n_end) load_kv(n_begin, 0);
  cp_async_commit();

  // Row slots g and g+8 of the packed tile (rows past the end reuse query 0's range).
  const ScoreMod mod = make_score_mod(p, false);
  const auto slot = [&](int ri) {
    const int packed = m_tile * kDecodeRows + ri * 8 + lane / 4;
    const int query = packed < packed_rows ? packed % seqlen_q : 0;
    const int64_t head = kv_head * group + (packed < packed_rows ? packed / seqlen_q : 0);
    const KeyRange range = visible_keys(geo, query);
    return RowSlot{query, static_cast<int>(max64(range.begin, split_begin)), static_cast<int>(min64(range.end, split_end)),
                   static_cast<float>(query_position(geo, query)), static_cast<float>(alibi_slope(p, batch, head)),
                   nullptr};
  };
  float row_max[2] = {kNegInf, kNegInf};
  float row_sum[2] = {0.0f, 0.0f};
  float o[1][kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[0][dt][e] = 0.0f;
  }

  for (int n = n_begin; n < n_end; ++n) {
    const int stage = (n - n_begin) % 2;
    if (n + 1 < n_end) load_kv(n + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int key0 = n * kBlockN;
    const int warp_key0 = key0 + 16 * warp;
    float s[1][2][4];
    gemm_qk<T, 1, 2, kHeadDim>(s, s_q, s_k + (stage * kBlockN + 16 * warp) * kPitch, lane);
    const bool range_mask = !(key0 >= all_visible_begin && key0 + kBlockN <= all_visible_end);
    scores_to_log2<1, 2>(s, mod, p.mask, slot, warp_key0, lane, range_mask);
    online_softmax<1, 2, kDTiles>(s, o, row_max, row_sum);
    gemm_pv<T, 1, 2, kHeadDim>(o, s, s_v + (stage * kBlockN + 16 * warp) * kPitch, lane);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the warps: each publishes (m, l, O) of its 16 rows, then the block combines them.
  float* merge_o = reinterpret_cast<float*>(s_k);                // [warps][16][kHeadDim]
  float* merge_max = merge_o + Tr::kWarps * kDecodeRows * kHeadDim;  // [warps][16]
  float* merge_sum = merge_max + Tr::kWarps * kDecodeRows;          // [warps][16]
  const int t = lane % 4;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int row = ri * 8 + lane / 4;
    const float sum = warp_sum_quad(row_sum[ri]);
    float* o_row = merge_o + (warp * kDecodeRows + row) * kHeadDim;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      o_row[dt * 8 + 2 * t] = o[0][dt][2 * ri];
      o_row[dt * 8 + 2 * t + 1] = o[0][dt][2 * ri + 1];
    }
    if (t == 0) {
      merge_max[warp * kDecodeRows + row] = row_max[ri];
      merge_sum[warp * kDecodeRows + row] = sum;
    }
  }
  __syncthreads();

  const bool final_output = args.num_splits == 1;
  for (int e = tid; e < kDecodeRows * kHeadDim; e += Tr::kThreads) {
    const int row = e / kHeadDim;
    const int col = e % kHeadDim;
    const int packed = m_tile * kDecodeRows + row;
    if (packed >= packed_rows || col >= head_dim) continue;
    const int query = packed % seqlen_q;
    const int64_t head = kv_head * group + packed / seqlen_q;
    // The sink joins the softmax once, in whichever step writes the final output.
    const float sink = final_output && p.sinks != nullptr ? static_cast<float>(p.sinks[head]) * kLog2e : kNegInf;
    float m = sink;
    for (int w = 0; w < Tr::kWarps; ++w) m = fmaxf(m, merge_max[w * kDecodeRows + row]);
    const float shift = m == kNegInf ? 0.0f : m;
    float l = exp2_approx(sink - shift);
    float acc = 0.0f;
    for (int w = 0; w < Tr::kWarps; ++w) {
      const float factor = exp2_approx(merge_max[w * kDecodeRows + row] - shift);
      l += merge_sum[w * kDecodeRows + row] * factor;
      acc += merge_o[(w * kDecodeRows + row) * kHeadDim + col] * factor;
    }
    const float value = l == 0.0f ? 0.0f : acc / l;
    const float lse = l == 0.0f ? kNegInf : m * kLn2 + logf(l);
    if (final_output) {
      static_cast<uint16_t*>(p.out.data)[batch * p.out.batch_stride + head * p.out.head_stride +
                                         query * p.out.row_stride + col] = T::from_float(value);
      if (col == 0 && p.lse != nullptr) p.lse[lse_index(p, batch, head, query)] = lse;
    } else {
      const int64_t bhq = (batch * p.num_heads + head) * p.seqlen_q + query;
      const int64_t partial = split * p.batch * p.num_heads * p.seqlen_q + bhq;
      args.out_partial[partial * head_dim + col] = value;
      if (col == 0) args.lse_partial[partial] = lse;
    }
  }
}

// Merges the splits of decode_kernel: one block per (batch, head, query) row.
struct CombineArgs {
  AttentionParams attn;
  int num_splits;
  const float* out_partial;
  const float* lse_partial;
};

constexpr int kCombineThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const __grid_constant__ CombineArgs args) {
  const AttentionParams& p = args.attn;
  int64_t index = blockIdx.x;
  const int64_t query = index % p.seqlen_q;
  index /= p.seqlen_q;
  const int64_t head = index % p.num_heads;
  const int64_t batch = index / p.num_heads;
  const int64_t bhq = (batch * p.num_heads + head) * p.seqlen_q + query;
  const int64_t split_stride = p.batch * p.num_heads * p.seqlen_q;

  const float sink = p.sinks != nullptr ? static_cast<float>(p.sinks[head]) : kNegInf;
  float m = sink;
  for (int s = 0; s < args.num_splits; ++s) m = fmaxf(m, args.lse_partial[s * split_stride + bhq]);
  const float shift = m == kNegInf ? 0.0f : m;
  float l = expf(sink - shift);
  for (int s = 0; s < args.num_splits; ++s) l += expf(args.lse_partial[s * split_stride + bhq] - shift);
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;
  if (threadIdx.x == 0 && p.lse != nullptr) p.lse[lse_index(p, batch, head, query)] = l == 0.0f ? kNegInf : m + logf(l);
  typename T::Storage* out = static_cast<typename T::Storage*>(p.out.data) + batch * p.out.batch_stride +
                             head * p.out.head_stride + query * p.out.row_stride;
  for (int col = threadIdx.x; col < p.head_dim; col += kCombineThreads) {
    float acc = 0.0f;
    for (int s = 0; s < args.num_splits; ++s) {
      const float weight = expf(args.lse_partial[s * split_stride + bhq] - shift);
      if (weight != 0.0f) acc += weight * args.out_partial[(s * split_stride + bhq) * p.head_dim + col];
    }
    out[col] = T::from_float(acc * inv);
  }
}

}  // namespace cuda
}  // namespace fusedattn
