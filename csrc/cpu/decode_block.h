// The CPU forward for blocks of very few query rows (decode: one token per head, or a GQA
// group's heads packed together), where the transposed Sᵀ = K·Qᵀ tile of forward_block.h would
// fill one vector lane in W. Here the vectors run along head_dim instead:
//   s[l][j] = <q_l, k_j>        one pass over each K row for all lanes (horizontal sums)
//   online softmax per lane over the key block (vectors along the keys)
//   o[l] += Σ_j p[l][j] · v_j   one pass over each V row for all lanes
// Each K/V row is read once per block, so the kernel runs at memory bandwidth. The score
// pipeline (softcap, ALiBi, mask, windows, sinks, dropout, key splits) is forward_block.h's.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/kv_layout.h"
#include "common/variant.h"
#include "cpu/convert.h"
#include "cpu/forward_block.h"
#include "cpu/score_mods.h"
#include "cpu/vec.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

// Blocks with at most this many lanes (query rows x packed heads) use the decode kernel.
// At 4 lanes the dot-product form costs about what the transposed tile wastes on empty lanes.
constexpr int64_t kDecodeLanes = 4;

// Sum of the lanes: a shuffle tree for 16 and 8 floats, a plain loop otherwise.
template <typename T>
inline T vec_sum(VecT<T> v) {
  constexpr int W = Vec<T>::kWidth;
  if constexpr (W == 16 && sizeof(T) == 4) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
  } else if constexpr (W == 8 && sizeof(T) == 4) {
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
    return v[0];
  } else {
    T sum = 0;
    for (int lane = 0; lane < W; ++lane) sum += vec_lane<T>(v, lane);
    return sum;
  }
}

template <typename T>
void decode_block_t(const AttentionParams& params, const ForwardBlock& block, void* scratch) {
  using Acc = typename ComputeType<T>::type;
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  const int64_t head_dim = params.head_dim;
  const BlockLanes lanes{block.row_end - block.row_begin, (block.row_end - block.row_begin) * block.head_count};
  const ForwardScratch<Acc> s = ForwardScratch<Acc>::carve(scratch, head_dim, lanes.lanes);
  const int64_t kv_head = kv_head_of(params, block.head_begin);
  const int64_t ldn = kBlockN;  // scores: [lanes x kBlockN] row-major in s.s_t
  const Orientation row_major{ldn, 1};

  const Acc scale = static_cast<Acc>(params.scale);
  KeyRange keys{params.seqlen_k, 0};
  for (int64_t l = 0; l < lanes.lanes; ++l) {
    const int64_t head = lanes.head(block, l), row = lanes.row(block, l);
    const T* q = static_cast<const T*>(params.q.data) + block.batch * params.q.batch_stride +
                 head * params.q.head_stride + row * params.q.row_stride;
    Acc* q_row = s.q_rows + l * s.ldo;
    for (int64_t d = 0; d < s.ldo; ++d) q_row[d] = d < head_dim ? static_cast<Acc>(to_float(q[d])) * scale : Acc(0);
    KeyRange range = visible_keys(params, row);
    range.begin = range.begin > block.key_lo ? range.begin : block.key_lo;
    range.end = range.end < block.key_hi ? range.end : block.key_hi;
    if (range.end < range.begin) range.end = range.begin;
    s.key_begin[l] = static_cast<MaskIndex<Acc>>(range.begin);
    s.key_end[l] = static_cast<MaskIndex<Acc>>(range.end);
    keys.begin = range.begin < keys.begin ? range.begin : keys.begin;
    keys.end = range.end > keys.end ? range.end : keys.end;
    const bool sink_here = params.sinks != nullptr && block.key_lo == 0;
    s.row_max[l] = sink_here ? static_cast<Acc>(params.sinks[head]) : -std::numeric_limits<Acc>::infinity();
    s.row_sum[l] = sink_here ? Acc(1) : Acc(0);
    s.query_pos[l] = static_cast<Acc>(query_position(params, row));
    s.lane_slope[l] = static_cast<Acc>(alibi_slope(params, block.batch, head));
    for (int64_t c = 0; c < s.ldo; ++c) s.o[l * s.ldo + c] = Acc(0);
  }

  bool any_key = false;
  for (int64_t j0 = keys.begin / kBlockN * kBlockN; j0 < keys.end; j0 += kBlockN) {
    const int64_t n = (keys.end - j0 < kBlockN) ? keys.end - j0 : kBlockN;
    if (params.mask.type != MaskType::kNone) {
      if (!load_mask_tile(params.mask, block.batch, block.head_begin, block.row_begin, lanes.rows, j0, n,
                          s.mask_tile, row_major)) {
        continue;
      }
      for (int64_t l = lanes.rows; l < lanes.lanes; ++l) {  // packed heads share the mask
        std::memcpy(s.mask_tile + l * ldn, s.mask_tile + (l % lanes.rows) * ldn, n * sizeof(Acc));
      }
    }
    // Scores, one K row at a time for every lane.
    int64_t k_stride;
    const Acc* k_blk = kv_block<T, Acc>(params, params.k, block.batch, kv_head, j0, n, true, s.k_rows, s.ldo,
                                        &k_stride);
    for (int64_t j = 0; j < n; ++j) {
      const Acc* k_row = k_blk + j * k_stride;
      if (j + kPrefetchRows < n) prefetch_row(k_blk + (j + kPrefetchRows) * k_stride, head_dim);
      for (int64_t l = 0; l < lanes.lanes; ++l) {
        const Acc* q_row = s.q_rows + l * s.ldo;
        V acc = vec_set1<Acc>(Acc(0));
        for (int64_t d = 0; d < s.ldo; d += W) acc = vec_load<Acc>(q_row + d) * vec_load<Acc>(k_row + d) + acc;
        s.s_t[l * ldn + j] = vec_sum<Acc>(acc);
      }
    }
    for (int64_t l = 0; l < lanes.lanes; ++l) {
      Acc* row = s.s_t + l * ldn;
      if (params.softcap > 0.0f) {
        for (int64_t j = 0; j < n; ++j) row[j] = softcap_score(std::tanh(row[j] / static_cast<Acc>(params.softcap)), static_cast<Acc>(params.softcap));
      }
      const Acc minus_inf = -std::numeric_limits<Acc>::infinity();
      if (params.alibi_slopes != nullptr || params.mask.type != MaskType::kNone) {
        for (int64_t j = 0; j < n; ++j) {
          Acc score = row[j];
          if (params.alibi_slopes != nullptr) score = alibi_score(score, s.lane_slope[l], s.query_pos[l], Acc(j0 + j));
          if (params.mask.type != MaskType::kNone) score += s.mask_tile[l * ldn + j];
          row[j] = score;
        }
      }
      // Keys outside this lane's visible range (and the tile's padding) get -inf.
      const int64_t lo = s.key_begin[l] - j0, hi = s.key_end[l] - j0;
      for (int64_t j = 0; j < ldn; ++j) {
        if (j < lo || j >= hi || j >= n) row[j] = minus_inf;
      }
      // Online softmax of this lane over the block, a vector of keys at a time.
      V max_vec = vec_set1<Acc>(s.row_max[l]);
      for (int64_t j = 0; j < ldn; j += W) max_vec = vec_max<Acc>(max_vec, vec_load<Acc>(row + j));
      Acc new_max = vec_lane<Acc>(max_vec, 0);
      for (int lane = 1; lane < W; ++lane) new_max = vec_lane<Acc>(max_vec, lane) > new_max ? vec_lane<Acc>(max_vec, lane) : new_max;
      const Acc shift = new_max == minus_inf ? Acc(0) : new_max;
      const Acc rescale = exp_scalar(s.row_max[l] - shift);
      V sum_vec = vec_set1<Acc>(Acc(0));
      for (int64_t j = 0; j < ldn; j += W) {
        const V prob = exp_vec<Acc>(vec_load<Acc>(row + j) - vec_set1<Acc>(shift));
        vec_store<Acc>(row + j, prob);
        sum_vec += prob;
      }
      const Acc sum = vec_sum<Acc>(sum_vec);
      s.row_max[l] = new_max;
      s.row_sum[l] = s.row_sum[l] * rescale + sum;
      if (rescale != Acc(1)) {
        Acc* o_row = s.o + l * s.ldo;
        for (int64_t c = 0; c < s.ldo; c += W) vec_store<Acc>(o_row + c, vec_load<Acc>(o_row + c) * vec_set1<Acc>(rescale));
      }
    }
    if (params.dropout_p > 0.0f) {
      dropout_tile(params, block.batch, block.head_begin, block.row_begin, lanes.lanes, j0, n, s.drop_tile, row_major);
      for (int64_t l = 0; l < lanes.lanes; ++l) {
        for (int64_t j = 0; j < n; ++j) s.s_t[l * ldn + j] *= s.drop_tile[l * ldn + j];
      }
    }
    // O += P · V, one V row at a time for every lane.
    int64_t v_stride;
    const Acc* v_blk = kv_block<T, Acc>(params, params.v, block.batch, kv_head, j0, n, true, s.v_rows, s.ldo,
                                        &v_stride);
    // O += P · V, a vector of head_dim at a time: each O vector stays in a register over the
    // block's keys (the V block is in cache after the first column).
    for (int64_t j = 0; j + kPrefetchRows < n; ++j) prefetch_row(v_blk + (j + kPrefetchRows) * v_stride, head_dim);
    for (int64_t l = 0; l < lanes.lanes; ++l) {
      const Acc* p_row = s.s_t + l * ldn;
      Acc* o_row = s.o + l * s.ldo;
      for (int64_t c = 0; c < s.ldo; c += W) {
        V acc = vec_load<Acc>(o_row + c);
        for (int64_t j = 0; j < n; ++j) acc = vec_set1<Acc>(p_row[j]) * vec_load<Acc>(v_blk + j * v_stride + c) + acc;
        vec_store<Acc>(o_row + c, acc);
      }
    }
    any_key = true;
  }
  write_block_output<T>(params, block, lanes, s, !any_key);
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
