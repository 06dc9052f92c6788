// The fp16/bf16 forward: FlashAttention-2 on mma.sync m16n8k16 (fp32 accumulators).
//
// One thread block per (q-tile of kBlockM rows, head, batch); warp w owns rows
// [16·kMTiles·w, 16·kMTiles·(w+1)) of the tile ("split-Q": no reduction across warps).
// Packed variable-length batches (varlen.cuh) run the same code: the grid covers the q-tiles
// of max_seqlen_q, and each block reads its sequence's rows from cu_seqlens on the device
// (the tile's sequence then sits in shared memory, TileSequence).
//   shared memory  Q [kBlockM x D] | K [2 stages x kBlockN x D] | V [2 stages x kBlockN x D] | TileSequence
//   registers      S [kMTiles·16 x kBlockN] and O [kMTiles·16 x D] per warp, fp32
// For each key tile n (only tiles that intersect the rows' visible ranges, variant.h):
// cp.async tile n+1 into the other stage; wait for tile n; S = Q·Kᵀ; score pipeline
// (score_mod.cuh); online softmax in base 2 (m, l per row); dropout; O += P·V with P reused
// from the S registers. At the end O / l goes out through shared memory (16-byte stores) and
// LSE = m·ln2 + ln(l). Rows that saw no key give 0 and LSE -inf (or the sink's logit).
// head_dim below the bucket's D is zero-padded in shared memory; unaligned inputs (odd strides
// or head_dim % 8 != 0) take 2-byte loads instead of cp.async, so nothing is ever copied.
#pragma once
#include <cstdint>

#include "common/params.h"
#include "common/variant.h"
#include "cuda/compat.cuh"
#include "cuda/kv_cache.cuh"
#include "cuda/ptx.cuh"
#include "cuda/score_mod.cuh"
#include "cuda/tile_config.h"
#include "cuda/varlen.cuh"
#include "cuda/warp_tile.cuh"

namespace fusedattn {
namespace cuda {

struct ForwardArgs {
  AttentionParams params;  // varlen: params.sequences.cu_seqlens_q/k set, packed views (varlen.cuh)
  int num_m_blocks;        // ceil(seqlen_q / kBlockM), or ceil(max_seqlen_q / kBlockM) for varlen
  bool aligned;            // 16-byte cp.async path (see load_tile)
};

// Where a q-tile's sequence lies (varlen.cuh), kept in shared memory: held in registers across
// the key loop, these few values made ptxas spill (56/92 bytes of spill stores/loads at d128,
// sm_80), while the constants of a plain batch cost no register.
struct TileSequence {
  int64_t q_row0;    // the tile's first q/out row in the views
  int64_t q_offset;  // position of the sequence's query row 0
  int64_t seqlen_k;  // its keys
};

template <typename T, int kHeadDim>
struct ForwardTraits {
  static constexpr ForwardTile kTile = forward_tile(kHeadDim);
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kWarps = kTile.warps;
  static constexpr int kMTiles = kTile.m_tiles;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPitch = smem_pitch<kHeadDim>();
  static constexpr int kNTiles = kBlockN / 8;
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kPitch * 2 + sizeof(TileSequence);
  static_assert(kBlockM == 16 * kMTiles * kWarps, "each warp owns kMTiles 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "MMA k-steps are 16 wide");
};

// 16 bytes from shared memory to global memory.
FA_DEVICE void store_16(void* dst, const void* src) {
#if defined(FUSEDATTN_CUDA_EMULATION)
  emu::copy_16(dst, src);
#else
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
#endif
}

// Writes a warp's normalised O rows (already packed into its own Q rows of shared memory) to
// global memory: 16-byte chunks when aligned, else element by element.
template <int kHeadDim, int kRows>
FA_DEVICE void store_rows(uint16_t* out, int64_t row_stride, const uint16_t* tile, int valid_rows, int head_dim,
                          bool aligned, int lane) {
  constexpr int kPitch = smem_pitch<kHeadDim>();
  if (aligned) {
    constexpr int kChunksPerRow = kHeadDim / 8;
    for (int c = lane; c < kRows * kChunksPerRow; c += 32) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      if (row < valid_rows && col < head_dim) store_16(out + row * row_stride + col, tile + row * kPitch + col);
    }
  } else {
    for (int e = lane; e < kRows * kHeadDim; e += 32) {
      const int row = e / kHeadDim;
      const int col = e % kHeadDim;
      if (row < valid_rows && col < head_dim) out[row * row_stride + col] = tile[row * kPitch + col];
    }
  }
}

// One q-tile: rows [m_block·kBlockM, +kBlockM) of sequence `seq` (varlen.cuh), one head.
template <typename T, int kHeadDim>
FA_DEVICE void forward_tile(const ForwardArgs& args, const SequenceRows& seq, int m_block, int64_t head,
                            int64_t batch) {
  using Tr = ForwardTraits<T, kHeadDim>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kMTiles = Tr::kMTiles, kPitch = Tr::kPitch;
  constexpr int kRowSlots = 2 * kMTiles;
  const AttentionParams& p = args.params;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  uint16_t* s_q = reinterpret_cast<uint16_t*>(shared_memory());
  uint16_t* s_k = s_q + kBlockM * kPitch;
  uint16_t* s_v = s_k + 2 * kBlockN * kPitch;
  TileSequence* s_seq = reinterpret_cast<TileSequence*>(s_v + 2 * kBlockN * kPitch);

  const int64_t kv_head = kv_head_of(p, head);
  const int row_begin = m_block * kBlockM;
  const int rows = min(kBlockM, static_cast<int>(seq.seqlen_q) - row_begin);
  const int head_dim = static_cast<int>(p.head_dim);
  if (tid == 0) *s_seq = TileSequence{seq.q_begin + row_begin, sequence_q_offset(p, seq), seq.seqlen_k};
  __syncthreads();
  // variant.h's geometry of the sequence (positions, visible ranges), read from shared memory.
  const auto geometry = [&] { return sequence_geometry(p, s_seq->seqlen_k, s_seq->q_offset); };

  const uint16_t* q = static_cast<const uint16_t*>(p.q.data) + batch * p.q.batch_stride + head * p.q.head_stride +
                      (seq.q_begin + row_begin) * p.q.row_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k.data) + batch * p.k.batch_stride + kv_head * p.k.head_stride +
                      seq.k_begin * p.k.row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v.data) + batch * p.v.batch_stride + kv_head * p.v.head_stride +
                      seq.k_begin * p.v.row_stride;

  // Key tiles to visit: those meeting the union of the rows' visible ranges. A tile inside
  // [begin of the last row, end of the first row) is visible to every row: no range test.
  const KeyRange keys = visible_keys_of_rows(geometry(), row_begin, row_begin + rows);
  const int n_begin = static_cast<int>(keys.begin / kBlockN);
  const int n_end = keys.end > keys.begin ? static_cast<int>((keys.end + kBlockN - 1) / kBlockN) : n_begin;
  const int64_t all_visible_begin = visible_keys(geometry(), row_begin + rows - 1).begin;
  const int64_t all_visible_end = visible_keys(geometry(), row_begin).end;

  load_tile<kBlockM, kHeadDim, Tr::kThreads>(
      s_q, [&](int r) { return r < rows ? q + r * p.q.row_stride : nullptr; }, head_dim, args.aligned, p.q.data, tid);
  auto load_kv = [&](int n, int stage) {
    const int key0 = n * kBlockN;
    const int valid = min(kBlockN, static_cast<int>(s_seq->seqlen_k) - key0);
    load_tile<kBlockN, kHeadDim, Tr::kThreads>(
        s_k + stage * kBlockN * kPitch, [&](int r) { return r < valid ? k + (key0 + r) * p.k.row_stride : nullptr; },
        head_dim, args.aligned, p.k.data, tid);
    load_tile<kBlockN, kHeadDim, Tr::kThreads>(
        s_v + stage * kBlockN * kPitch, [&](int r) { return r < valid ? v + (key0 + r) * p.v.row_stride : nullptr; },
        head_dim, args.aligned, p.v.data, tid);
  };
  if (n_begin < n_end) load_kv(n_begin, 0);
  cp_async_commit();

  // This lane's row slots: rows g and g+8 of each of the warp's 16-row tiles. Rows past the
  // end take the last row's range (they are computed on zero queries and never stored).
  const bool has_mask = p.mask.type != MaskType::kNone;
  const bool bool_mask = p.mask.type == MaskType::kBool;
  const ScoreMod mod = make_score_mod(p, has_mask);
  const Dropout dropout = make_dropout(p, batch, head);
  const float slope = static_cast<float>(alibi_slope(p, batch, head));
  const int warp_row0 = warp * 16 * kMTiles;
  const auto slot = [&](int ri) {
    const int local = warp_row0 + (ri / 2) * 16 + (ri % 2) * 8 + lane / 4;
    const bool valid = local < rows;
    const int row = row_begin + (valid ? local : rows - 1);
    const AttentionParams geo = geometry();
    const KeyRange range = visible_keys(geo, row);
    const void* mask_row = has_mask && valid ? static_cast<const char*>(p.mask.data) +
                                                   (batch * p.mask.batch_stride + head * p.mask.head_stride +
                                                    row * p.mask.row_stride) * mask_element_size(p.mask.type)
                                             : nullptr;
    return RowSlot{row, static_cast<int>(range.begin), static_cast<int>(range.end),
                   static_cast<float>(query_position(geo, row)), slope, mask_row};
  };
  // A sink is a virtual key of logit sinks[head] and no value: (m, l) start at (sink, 1), with
  // the 1 on one lane of the quad since the quad's partial sums are added at the end.
  const bool has_sink = p.sinks != nullptr;
  float row_max[kRowSlots], row_sum[kRowSlots];
#pragma unroll
  for (int ri = 0; ri < kRowSlots; ++ri) {
    row_max[ri] = has_sink ? static_cast<float>(p.sinks[head]) * kLog2e : kNegInf;
    row_sum[ri] = has_sink && lane % 4 == 0 ? 1.0f : 0.0f;
  }
  float o[kMTiles][Tr::kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < Tr::kDTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.0f;
    }
  }

  for (int n = n_begin; n < n_end; ++n) {
    const int stage = (n - n_begin) % 2;
    if (n + 1 < n_end) load_kv(n + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile n (and Q) have landed; tile n+1 may still be in flight
    __syncthreads();
    const int key0 = n * kBlockN;
    // A bool attn_mask can hide a whole tile: skip its MMAs (the block decides together).
    const bool visible =
        !bool_mask || __syncthreads_or(bool_mask_any<kMTiles, Tr::kNTiles>(p.mask, slot, key0, lane));
    if (visible) {
      float s[kMTiles][Tr::kNTiles][4];
      gemm_qk<T, kMTiles, Tr::kNTiles, kHeadDim>(s, s_q + warp_row0 * kPitch, s_k + stage * kBlockN * kPitch, lane);
      const bool range_mask = !(key0 >= all_visible_begin && key0 + kBlockN <= all_visible_end);
      scores_to_log2<kMTiles, Tr::kNTiles>(s, mod, p.mask, slot, key0, lane, range_mask);
      online_softmax<kMTiles, Tr::kNTiles, Tr::kDTiles>(s, o, row_max, row_sum);
      if (p.dropout_p > 0.0f) apply_dropout<kMTiles, Tr::kNTiles>(s, dropout, slot, key0, lane);
      gemm_pv<T, kMTiles, Tr::kNTiles, kHeadDim>(o, s, s_v + stage * kBlockN * kPitch, lane);
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  cp_async_wait<0>();
  __syncthreads();  // also when no tile was visited: Q's cp.async must land before we overwrite it

  // Epilogue: O / l into the warp's own Q rows (packed to T), then out to global memory.
  const int t = lane % 4;
  float* lse = p.lse == nullptr ? nullptr : p.lse + lse_index(p, batch, head, s_seq->q_row0);
#pragma unroll
  for (int ri = 0; ri < kRowSlots; ++ri) {
    const float sum = warp_sum_quad(row_sum[ri]);
    const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
    const int local = warp_row0 + (ri / 2) * 16 + (ri % 2) * 8 + lane / 4;
    const int mt = ri / 2;
    const int e = (ri % 2) * 2;
#pragma unroll
    for (int dt = 0; dt < Tr::kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(s_q + local * kPitch + dt * 8 + 2 * t) =
          T::pack2(o[mt][dt][e] * inv, o[mt][dt][e + 1] * inv);
    }
    if (lse != nullptr && t == 0 && local < rows) lse[local] = sum == 0.0f ? kNegInf : row_max[ri] * kLn2 + logf(sum);
  }
  __syncwarp();
  uint16_t* out = static_cast<uint16_t*>(p.out.data) + batch * p.out.batch_stride + head * p.out.head_stride +
                  (s_seq->q_row0 + warp_row0) * p.out.row_stride;
  store_rows<kHeadDim, 16 * kMTiles>(out, p.out.row_stride, s_q + warp_row0 * kPitch, rows - warp_row0, head_dim,
                                     args.aligned, lane);
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(ForwardTraits<T, kHeadDim>::kThreads)
    forward_kernel(const __grid_constant__ ForwardArgs args) {
  using Tr = ForwardTraits<T, kHeadDim>;
  const AttentionParams& p = args.params;
  // Block -> (m_block, head, batch); the last q-tiles (the longest under causal) start first.
  int64_t index = blockIdx.x;
  const int m_block = args.num_m_blocks - 1 - static_cast<int>(index % args.num_m_blocks);
  index /= args.num_m_blocks;
  const int64_t head = index % p.num_heads;
  const int64_t batch = index / p.num_heads;
  const SequenceRows seq = sequence_rows(p, batch);
  if (fill_rows_outside_tiles<T>(p, seq, batch, head, m_block, args.num_m_blocks, Tr::kBlockM, threadIdx.x,
                                 Tr::kThreads)) {
    return;  // the tail of a varlen call
  }
  if (static_cast<int64_t>(m_block) * Tr::kBlockM >= seq.seqlen_q) return;  // a tile past its sequence's end
  forward_tile<T, kHeadDim>(args, seq, m_block, head, batch);
}

}  // namespace cuda
}  // namespace fusedattn
