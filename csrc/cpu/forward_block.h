// The CPU forward for one q-block (FlashAttention-2 with an online softmax), on one thread.
//
// The block works in a transposed frame so that no K transpose is ever needed:
//   Qᵀ   [head_dim x ldq]   packed once per block, pre-multiplied by the scale (ldq = rows
//                           rounded up to the vector width; padding columns are zero)
//   Sᵀ   [block_n x ldq]    = K_blk · Qᵀ   (A = K rows read in place, B = Qᵀ)
//   Pᵀ   overwrites Sᵀ      the softmax runs down the key axis, one vector = W query rows,
//                           so the row max / row sum are plain vector max / add
//   O    [rows x ldo]      += P · V_blk   (A = Pᵀ read column-wise, B = V rows)
// For each key block: Sᵀ, mask (only partially visible blocks), running max m, rescale factor
// alpha = exp(m_old - m_new), P = exp(S - m_new), l = alpha·l + rowsum(P), O = alpha·O + P·V.
// At the end O /= l and LSE = m + log(l); rows that saw no key give 0 and LSE = -inf.
// Key blocks outside the union of the rows' visible ranges (variant.h) are never visited.
// bf16 on the avx512bf16 ISA keeps both products in bf16 (VDPBF16PS, fp32 accumulation):
// Qᵀ unscaled in bf16 pairs, K rows read in place as pairs, Sᵀ scaled after the product, and
// P and V packed into pairs per key block (P rounded to bf16, as FlashAttention does).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/kv_layout.h"
#include "common/params.h"
#include "common/variant.h"
#include "cpu/amx_gemm.h"
#include "cpu/bf16_pairs.h"
#include "cpu/convert.h"
#include "cpu/gemm_tile.h"
#include "cpu/kernel_table.h"
#include "cpu/score_mods.h"
#include "cpu/tiles.h"
#include "cpu/transpose.h"
#include "cpu/vec.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Integer lanes of the same width as the compute type, for the column mask.
template <typename Acc>
using MaskIndex = std::conditional_t<sizeof(Acc) == 8, int64_t, int32_t>;

// Lanes [begin, end) of a block (multiples of the vector width, end <= ldq) that see any key of
// the current key block; the others (e.g. the rows above the diagonal of a causal block) skip
// its products and softmax.
struct LaneRange {
  int64_t begin;
  int64_t end;
};

// Layout of the per-thread scratch buffer, in elements of Acc.
template <typename Acc>
struct ForwardScratch {
  int64_t ldq;  // columns of Qᵀ / Sᵀ (query rows, padded)
  int64_t ldo;  // columns of O and of converted K/V rows (head_dim, padded)
  Acc* q_t;     // [head_dim x ldq]
  Acc* s_t;     // [kBlockN x ldq]
  Acc* o;       // [ldq x ldo]
  Acc* q_rows;  // [ldq x ldo]  scaled query rows (the decode kernel's layout)
  Acc* k_rows;  // [kBlockN x ldo]  converted K block (when K is not already Acc)
  Acc* v_rows;  // [kBlockN x ldo]  converted / padded V block
  Acc* row_max;       // [ldq]
  Acc* row_sum;       // [ldq]
  Acc* row_rescale;   // [ldq]
  Acc* query_pos;     // [ldq] position of each query row (ALiBi)
  Acc* lane_slope;    // [ldq] ALiBi slope of each lane's head
  Acc* mask_tile;     // [kBlockN x ldq] attn_mask values of the current key block
  Acc* key_bias;      // [kBlockN] the mask values of a key block whose query rows all agree
  Acc* drop_tile;     // [kBlockN x ldq] dropout factors of the current key block
  uint32_t* p_pairs;  // [kBlockN / 2 x ldq] P in bf16 pairs (the avx512bf16 path)
  MaskIndex<Acc>* key_begin;  // [ldq] first visible key per query row
  MaskIndex<Acc>* key_end;    // [ldq] one past the last visible key

  // Elements of Acc that carve() hands out (the two index arrays have Acc's size too).
  static int64_t elements(int64_t head_dim, int64_t block_rows) {
    constexpr int W = Vec<Acc>::kWidth;
    const int64_t ldq = round_up(block_rows, W);
    const int64_t ldo = round_up(head_dim, W);
    return head_dim * ldq + 3 * kBlockN * ldq + 2 * ldq * ldo + 2 * kBlockN * ldo + 7 * ldq + kBlockN +
           kBlockN / 2 * ldq;
  }

  static ForwardScratch carve(void* base, int64_t head_dim, int64_t block_rows) {
    constexpr int W = Vec<Acc>::kWidth;
    ForwardScratch s;
    s.ldq = round_up(block_rows, W);
    s.ldo = round_up(head_dim, W);
    Acc* p = static_cast<Acc*>(base);
    s.q_t = p;         p += head_dim * s.ldq;
    s.s_t = p;         p += kBlockN * s.ldq;
    s.o = p;           p += s.ldq * s.ldo;
    s.q_rows = p;      p += s.ldq * s.ldo;
    s.k_rows = p;      p += kBlockN * s.ldo;
    s.v_rows = p;      p += kBlockN * s.ldo;
    s.row_max = p;     p += s.ldq;
    s.row_sum = p;     p += s.ldq;
    s.row_rescale = p; p += s.ldq;
    s.query_pos = p;   p += s.ldq;
    s.lane_slope = p;  p += s.ldq;
    s.mask_tile = p;   p += kBlockN * s.ldq;
    s.key_bias = p;    p += kBlockN;
    s.drop_tile = p;   p += kBlockN * s.ldq;
    s.p_pairs = reinterpret_cast<uint32_t*>(p); p += kBlockN / 2 * s.ldq;
    s.key_begin = reinterpret_cast<MaskIndex<Acc>*>(p); p += s.ldq;
    s.key_end = reinterpret_cast<MaskIndex<Acc>*>(p);
    return s;
  }
};

template <typename T>
inline size_t forward_scratch_bytes_t(const AttentionParams& params, int64_t block_rows) {
  using Acc = typename ComputeType<T>::type;
  return static_cast<size_t>(ForwardScratch<Acc>::elements(params.head_dim, block_rows)) * sizeof(Acc);
}

// Converts `rows` rows of `head_dim` elements into dst[rows x ld], zero-padding columns to ld.
template <typename T, typename Acc>
inline void convert_rows(const T* src, int64_t src_row_stride, int64_t rows, int64_t head_dim,
                         Acc* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * src_row_stride;
    Acc* d = dst + r * ld;
    int64_t c = 0;
    if constexpr (std::is_same_v<Acc, float> && Vec<float>::kWidth > 1) {
      c = convert_to_float_vectors(s, head_dim, d);
    }
    for (; c < head_dim; ++c) d[c] = static_cast<Acc>(to_float(s[c]));
    for (c = head_dim; c < ld; ++c) d[c] = Acc(0);
  }
}

// Sets Sᵀ[j][i] = -inf where key j0 + j is outside the visible range of query row i.
template <typename Acc>
inline void mask_scores(const ForwardScratch<Acc>& s, LaneRange active, int64_t j0, int64_t n) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  typedef MaskIndex<Acc> Index;
  const V minus_inf = vec_set1<Acc>(-std::numeric_limits<Acc>::infinity());
  for (int64_t j = 0; j < n; ++j) {
    const Index key = static_cast<Index>(j0 + j);
    Acc* row = s.s_t + j * s.ldq;
    for (int64_t i = active.begin; i < active.end; i += W) {
      if constexpr (W == 1) {
        if (key < s.key_begin[i] || key >= s.key_end[i]) row[i] = minus_inf;
      } else {
        typedef Index IndexVec __attribute__((vector_size(W * sizeof(Index))));
        IndexVec begin, end;
        std::memcpy(&begin, s.key_begin + i, sizeof(begin));
        std::memcpy(&end, s.key_end + i, sizeof(end));
        const auto hidden = (begin > key) | (end <= key);
        vec_store<Acc>(row + i, hidden ? minus_inf : vec_load<Acc>(row + i));
      }
    }
  }
}

// How the current key block's attn_mask applies: not at all, one value per key, or a full tile.
enum class TileMask { kNone, kPerKey, kTile };

// softcap → ALiBi → + attn_mask on the active lanes of the n x ldq block of scores (DESIGN.md's order).
template <typename Acc>
inline void modify_scores(const AttentionParams& params, const ForwardScratch<Acc>& s, LaneRange active, int64_t j0,
                          int64_t n, TileMask tile_mask) {
  constexpr int W = Vec<Acc>::kWidth;
  for (int64_t j = 0; j < n; ++j) {
    Acc* row = s.s_t + j * s.ldq;
    if (params.softcap > 0.0f) apply_softcap<Acc>(row + active.begin, active.end - active.begin, params.softcap, nullptr);
    if (params.alibi_slopes != nullptr) {
      const VecT<Acc> key = vec_set1<Acc>(static_cast<Acc>(j0 + j));
      for (int64_t i = active.begin; i < active.end; i += W) {
        vec_store<Acc>(row + i, alibi_score(vec_load<Acc>(row + i), vec_load<Acc>(s.lane_slope + i),
                                            vec_load<Acc>(s.query_pos + i), key));
      }
    }
    if (tile_mask == TileMask::kPerKey && s.key_bias[j] != Acc(0)) {
      const VecT<Acc> bias = vec_set1<Acc>(s.key_bias[j]);
      for (int64_t i = active.begin; i < active.end; i += W) vec_store<Acc>(row + i, vec_load<Acc>(row + i) + bias);
    } else if (tile_mask == TileMask::kTile) {
      const Acc* bias = s.mask_tile + j * s.ldq;
      for (int64_t i = active.begin; i < active.end; i += W) {
        vec_store<Acc>(row + i, vec_load<Acc>(row + i) + vec_load<Acc>(bias + i));
      }
    }
  }
}

// How far (natural log) a row's scores may rise above its running max before softmax_step
// moves the max: below it the probabilities stay against the old max (at most e^8, about 3000,
// far from fp32's range), the rescale factor is 1 and O is left alone (lazy rescaling, as the
// decode kernel's softmax_lanes). On the avx512amx ISA the rescale of O (kept transposed, a
// pass over all of it per key block) took 7% of a bf16 forward.
constexpr float kForwardMaxSlack = 8.0f;

// Online-softmax step over the active lanes of the n x ldq block of scores in s_t (in place:
// scores -> P), each score times `scale` as it is read where kScaled (the bf16 products leave
// the scale out; see forward_block_t). Updates row_max and row_sum and leaves the O rescale
// factor in row_rescale.
template <typename Acc, bool kScaled>
inline void softmax_step_t(const ForwardScratch<Acc>& s, LaneRange active, int64_t n, Acc scale) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  const V minus_inf = vec_set1<Acc>(-std::numeric_limits<Acc>::infinity());
  const V zero = vec_set1<Acc>(Acc(0));
  const V slack = vec_set1<Acc>(static_cast<Acc>(kForwardMaxSlack));
  const V scales = vec_set1<Acc>(scale);
  auto score = [&](const Acc* p) {
    if constexpr (kScaled) return vec_load<Acc>(p) * scales;
    else return vec_load<Acc>(p);
  };
  for (int64_t i = active.begin; i < active.end; i += W) {
    const V old_max = vec_load<Acc>(s.row_max + i);
    V block_max = minus_inf;
    for (int64_t j = 0; j < n; ++j) block_max = vec_max<Acc>(block_max, score(s.s_t + j * s.ldq + i));
    // The max moves only where the block rises more than the slack above it (a row that has
    // seen no key yet, max -inf, always; a NaN score too, as before).
    const V new_max = block_max <= old_max + slack ? old_max : vec_max<Acc>(old_max, block_max);
    // A row that has seen only masked keys keeps max -inf; subtracting 0 then gives P = 0.
    const V shift = new_max == minus_inf ? zero : new_max;
    const V rescale = exp_vec<Acc>(old_max - shift);
    V sum = zero;
    for (int64_t j = 0; j < n; ++j) {
      Acc* p = s.s_t + j * s.ldq + i;
      const V prob = exp_vec<Acc>(score(p) - shift);
      vec_store<Acc>(p, prob);
      sum += prob;
    }
    vec_store<Acc>(s.row_max + i, new_max);
    vec_store<Acc>(s.row_sum + i, vec_load<Acc>(s.row_sum + i) * rescale + sum);
    vec_store<Acc>(s.row_rescale + i, rescale);
  }
}

template <typename Acc>
inline void softmax_step(const ForwardScratch<Acc>& s, LaneRange active, int64_t n, Acc scale = Acc(1)) {
  if (scale == Acc(1)) softmax_step_t<Acc, false>(s, active, n, scale);
  else softmax_step_t<Acc, true>(s, active, n, scale);
}

// Prefetches one cache line. On x86 an asm statement: GCC 12 deleted __builtin_prefetch loops of
// the decode kernel as dead code (no prefetch instruction was left in its objdump).
inline void prefetch_line(const char* line) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*line));
#else
  __builtin_prefetch(line);
#endif
}

// Fetches the cache lines of `count` elements from `row` (K/V rows kPrefetchRows ahead, tiles.h;
// decode rows of small cache pages): loads stay in flight for the memory bus where rows are far
// apart or gathered from pages.
template <typename T>
inline void prefetch_row(const T* row, int64_t count) {
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(T)); offset += 64) {
    prefetch_line(reinterpret_cast<const char*>(row) + offset);
  }
}

// Calls copy(row, j) for rows j0 + j (j < n) of (batch, kv_head) in t, one after the other,
// prefetching kPrefetchRows ahead: the gather of K/V rows that are far apart or on cache pages.
template <typename T, typename Copy>
inline void for_each_gathered_row(const AttentionParams& p, const TensorRef& t, int64_t batch, int64_t kv_head,
                                  int64_t j0, int64_t n, Copy&& copy) {
  const T* base = static_cast<const T*>(t.data);
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPrefetchRows < n) prefetch_row(base + kv_row_offset(p, t, batch, kv_head, j0 + j + kPrefetchRows), p.head_dim);
    copy(base + kv_row_offset(p, t, batch, kv_head, j0 + j), j);
  }
}

// Keys [j0, j0 + n) of (batch, kv_head) as a matrix of Acc rows: in place when the element type
// is Acc and the rows are evenly strided (and, for `padded`, a whole number of vectors wide),
// else converted (and zero-padded to ld) into `buffer`.
template <typename T, typename Acc>
inline const Acc* kv_block(const AttentionParams& p, const TensorRef& t, int64_t batch, int64_t kv_head, int64_t j0,
                           int64_t n, bool padded, Acc* buffer, int64_t ld, int64_t* stride) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (kv_rows_strided(p, j0, n) && (!padded || p.head_dim % Vec<Acc>::kWidth == 0)) {
      *stride = t.row_stride;
      return static_cast<const T*>(t.data) + kv_row_offset(p, t, batch, kv_head, j0);
    }
  }
  for_each_gathered_row<T>(p, t, batch, kv_head, j0, n, [&](const T* row, int64_t j) {
    convert_rows(row, 0, 1, p.head_dim, buffer + j * ld, ld);
  });
  *stride = ld;
  return buffer;
}

// Rows of a block: lane r is query row block.row_begin + r % rows of head block.head_begin + r / rows
// (GQA heads of one kv head are packed into the block, so K/V are read once for all of them).
struct BlockLanes {
  int64_t rows;   // query rows per head
  int64_t lanes;  // rows * head_count
  int64_t head(const ForwardBlock& b, int64_t lane) const { return b.head_begin + lane / rows; }
  int64_t row(const ForwardBlock& b, int64_t lane) const { return b.row_begin + lane % rows; }
};

// Scratch slot i's per-lane state for lane `lane` of the block: its visible keys clipped to the
// block's key split, the running max / sum (from the sink, in the first split only: a sink is a
// virtual key with score sinks[head] and no value), its query position and ALiBi slope.
// Returns the clipped key range.
template <typename Acc>
inline KeyRange init_lane_state(const AttentionParams& params, const ForwardBlock& block, const BlockLanes& lanes,
                                const ForwardScratch<Acc>& s, int64_t i, int64_t lane) {
  const int64_t head = lanes.head(block, lane), row = lanes.row(block, lane);
  KeyRange range = visible_keys(params, row);
  range.begin = range.begin > block.key_lo ? range.begin : block.key_lo;
  range.end = range.end < block.key_hi ? range.end : block.key_hi;
  if (range.end < range.begin) range.end = range.begin;
  s.key_begin[i] = static_cast<MaskIndex<Acc>>(range.begin);
  s.key_end[i] = static_cast<MaskIndex<Acc>>(range.end);
  const bool sink_here = params.sinks != nullptr && block.key_lo == 0;
  s.row_max[i] = sink_here ? static_cast<Acc>(params.sinks[head]) : -std::numeric_limits<Acc>::infinity();
  s.row_sum[i] = sink_here ? Acc(1) : Acc(0);
  s.query_pos[i] = static_cast<Acc>(query_position(params, row));
  s.lane_slope[i] = static_cast<Acc>(alibi_slope(params, block.batch, head));
  return range;
}

// out = O / l and LSE = m + log(l) for every lane (rows that saw no key: 0 and -inf, or the
// sink's logit), into params.out / params.lse, or out and (m, log l) into the block's fp32
// partial buffers.
template <typename T, typename Acc>
void write_block_output(const AttentionParams& params, const ForwardBlock& block, const BlockLanes& lanes,
                        const ForwardScratch<Acc>& s) {
  for (int64_t i = 0; i < lanes.lanes; ++i) {
    const Acc sum = s.row_sum[i];
    const bool no_weight = sum == Acc(0);  // no visible key and no sink (a NaN sum stays NaN)
    const Acc inv = no_weight ? Acc(0) : Acc(1) / sum;
    const Acc lse = no_weight ? -std::numeric_limits<Acc>::infinity() : s.row_max[i] + std::log(sum);
    const Acc* o_row = s.o + i * s.ldo;
    if (block.partial_out != nullptr) {
      float* out_row = block.partial_out + i * params.head_dim;
      for (int64_t c = 0; c < params.head_dim; ++c) out_row[c] = static_cast<float>(no_weight ? Acc(0) : o_row[c] * inv);
      const float minus_inf = -std::numeric_limits<float>::infinity();
      block.partial_stats[2 * i] = no_weight ? minus_inf : static_cast<float>(s.row_max[i]);
      block.partial_stats[2 * i + 1] = static_cast<float>(std::log(sum));
      continue;
    }
    const int64_t head = lanes.head(block, i), row = lanes.row(block, i);
    T* out_row = static_cast<T*>(params.out.data) + block.batch * params.out.batch_stride +
                 head * params.out.head_stride + row * params.out.row_stride;
    for (int64_t c = 0; c < params.head_dim; ++c) out_row[c] = from_float<T>(no_weight ? Acc(0) : o_row[c] * inv);
    store_lse(params, block.batch * params.lse_batch_stride + head * params.lse_head_stride + row, lse);
  }
}

// Merges the fp32 partial results of `count` key splits of one block (split-KV) by their LSE
// and writes out / lse: with split s's max m_s and sum l_s (stats[s]: (m_s, log l_s) per lane)
// and M = max m_s, weight w_s = exp(m_s - M + log l_s), out = Σ w_s · out_s / Σ w_s and
// lse = M + log Σ w_s; splits that saw no key (m_s -inf) contribute nothing, and a row with
// none gives 0 and -inf.
template <typename T>
void merge_block_partials_t(const AttentionParams& params, const ForwardBlock& block, const float* const* outs,
                            const float* const* stats, int64_t count) {
  using Acc = typename ComputeType<T>::type;
  const BlockLanes lanes{block.row_end - block.row_begin, (block.row_end - block.row_begin) * block.head_count};
  std::vector<float> merged(params.head_dim);  // one output row, summed over the splits
  for (int64_t i = 0; i < lanes.lanes; ++i) {
    float max_m = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < count; ++s) max_m = stats[s][2 * i] > max_m ? stats[s][2 * i] : max_m;
    // (m_s - M first: the two may be huge and equal, log l_s is small)
    auto weight_of = [&](int64_t s) { return std::exp((stats[s][2 * i] - max_m) + stats[s][2 * i + 1]); };
    const int64_t head = lanes.head(block, i), row = lanes.row(block, i);
    T* out_row = static_cast<T*>(params.out.data) + block.batch * params.out.batch_stride +
                 head * params.out.head_stride + row * params.out.row_stride;
    float lse = -std::numeric_limits<float>::infinity();
    if (max_m == -std::numeric_limits<float>::infinity()) {
      for (int64_t c = 0; c < params.head_dim; ++c) out_row[c] = from_float<T>(Acc(0));
    } else {
      float total = 0.0f;
      for (int64_t s = 0; s < count; ++s) total += weight_of(s);
      // Each split's share w_s / Σ w, one split after another over the row (an exp per split,
      // not per element: a pool walk's merges took 1.5% of a decode call that way).
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int64_t s = 0; s < count; ++s) {
        const float weight = weight_of(s) / total;
        const float* part = outs[s] + i * params.head_dim;
        for (int64_t c = 0; c < params.head_dim; ++c) merged[c] += weight * part[c];
      }
      for (int64_t c = 0; c < params.head_dim; ++c) out_row[c] = from_float<T>(static_cast<Acc>(merged[c]));
      lse = max_m + std::log(total);
    }
    store_lse(params, block.batch * params.lse_batch_stride + head * params.lse_head_stride + row, lse);
  }
}

// The lanes (of `lanes` real ones) whose visible keys meet [j0, j0 + n), widened to whole vectors.
template <typename Acc>
inline LaneRange lanes_seeing(const ForwardScratch<Acc>& s, int64_t lanes, int64_t j0, int64_t n) {
  constexpr int W = Vec<Acc>::kWidth;
  int64_t first = lanes, last = -1;
  for (int64_t i = 0; i < lanes; ++i) {
    if (s.key_begin[i] < j0 + n && s.key_end[i] > j0) {
      first = i < first ? i : first;
      last = i;
    }
  }
  if (last < 0) return LaneRange{0, 0};
  const int64_t end = round_up(last + 1, W);
  return LaneRange{first / W * W, end < s.ldq ? end : s.ldq};
}

// Whether T's products run as bf16 pairs (VDPBF16PS) in this ISA.
template <typename T>
constexpr bool kBf16Pairs =
#if defined(__AVX512BF16__)
    std::is_same_v<T, BFloat16>;
#else
    false;
#endif

#if defined(__AVX512BF16__)
// Keys [j0, j0 + n) of (batch, kv_head) as rows of bf16 pairs along head_dim: in place
// (rows_as_pairs), or gathered into `buffer` row by row, prefetching kPrefetchRows ahead, where
// the rows are not evenly strided (a paged cache) or `gather` asks for it. *stride in pairs.
inline const uint32_t* key_pairs(const AttentionParams& p, int64_t batch, int64_t kv_head, int64_t j0, int64_t n,
                                 bool gather, uint32_t* buffer, int64_t* stride) {
  const BFloat16* base = static_cast<const BFloat16*>(p.k.data);
  if (!gather && kv_rows_strided(p, j0, n)) {
    return rows_as_pairs(base + kv_row_offset(p, p.k, batch, kv_head, j0), p.k.row_stride, n, p.head_dim, buffer,
                         stride);
  }
  const int64_t pairs = (p.head_dim + 1) / 2;
  for_each_gathered_row<BFloat16>(p, p.k, batch, kv_head, j0, n, [&](const BFloat16* row, int64_t j) {
    copy_row_as_pairs(row, p.head_dim, buffer + j * pairs);
  });
  *stride = pairs;
  return buffer;
}

// V rows [j0, j0 + n) of (batch, kv_head) packed into pairs of rows: dst[(n + 1) / 2 x ld].
inline void value_pairs(const AttentionParams& p, int64_t batch, int64_t kv_head, int64_t j0, int64_t n,
                        uint32_t* dst, int64_t ld) {
  const BFloat16* base = static_cast<const BFloat16*>(p.v.data);
  for (int64_t j = 0; j < n; j += 2) {
    const BFloat16* even = base + kv_row_offset(p, p.v, batch, kv_head, j0 + j);
    if (j + 1 < n) {
      const BFloat16* odd = base + kv_row_offset(p, p.v, batch, kv_head, j0 + j + 1);
      pack_row_pairs(even, odd - even, 2, p.head_dim, dst + (j / 2) * ld, ld);
    } else {
      pack_row_pairs(even, 0, 1, p.head_dim, dst + (j / 2) * ld, ld);
    }
  }
}
#endif

template <typename T>
void forward_block_t(const AttentionParams& params, const ForwardBlock& block, void* scratch) {
  using Acc = typename ComputeType<T>::type;
  constexpr int W = Vec<Acc>::kWidth;
  const int64_t head_dim = params.head_dim;
  const BlockLanes lanes{block.row_end - block.row_begin, (block.row_end - block.row_begin) * block.head_count};
  const ForwardScratch<Acc> s = ForwardScratch<Acc>::carve(scratch, head_dim, lanes.lanes);
  const int64_t kv_head = kv_head_of(params, block.head_begin);

  // Per-lane state (padding lanes copy the last lane's key range), then Qᵀ (zero padding lanes).
  const Acc scale = static_cast<Acc>(params.scale);
  for (int64_t i = 0; i < s.ldq; ++i) init_lane_state(params, block, lanes, s, i, i < lanes.lanes ? i : lanes.lanes - 1);
  auto q_row = [&](int64_t lane) {
    return static_cast<const T*>(params.q.data) + block.batch * params.q.batch_stride +
           lanes.head(block, lane) * params.q.head_stride + lanes.row(block, lane) * params.q.row_stride;
  };
#if defined(__AVX512BF16__)
  uint32_t* const q_pairs = reinterpret_cast<uint32_t*>(s.q_t);  // [(head_dim + 1) / 2 x ldq], unscaled
  if constexpr (kBf16Pairs<T>) pack_transposed_pairs(q_row, lanes.lanes, head_dim, q_pairs, s.ldq);
#endif
  if constexpr (!kBf16Pairs<T>) {
    pack_transposed<Acc>(q_row, lanes.lanes, head_dim, s.q_t, s.ldq,
                         [scale](const T* row, int64_t d) { return static_cast<Acc>(to_float(row[d])) * scale; });
  }
  MaskIndex<Acc> max_begin = s.key_begin[0], min_end = s.key_end[0];
  KeyRange keys{s.key_begin[0], s.key_end[0]};
  for (int64_t i = 1; i < lanes.lanes; ++i) {
    max_begin = s.key_begin[i] > max_begin ? s.key_begin[i] : max_begin;
    min_end = s.key_end[i] < min_end ? s.key_end[i] : min_end;
    keys.begin = s.key_begin[i] < keys.begin ? s.key_begin[i] : keys.begin;
    keys.end = s.key_end[i] > keys.end ? s.key_end[i] : keys.end;
  }
  const Orientation transposed{1, s.ldq};  // Sᵀ: element (query lane i, key j) at j * ldq + i
  // bf16 blocks one vector of lanes wide (a few query tokens of a GQA group, over a cache) read
  // each key block once and spend little arithmetic on it: their keys are gathered row by row
  // with prefetch rather than read in place by the GEMM, six rows at a time. ab_decode.py
  // --queries 4, GQA bf16 (16 lanes), % of a torch.sum timed alongside: 27% -> 31%; fp32 lost
  // 3 points the same way, and prefill (wide blocks, each key block reused) 2-3%, so they do not.
  const bool gather_keys = kBf16Pairs<T> && s.ldq <= W;
  // The avx512amx ISA: both products on AMX tiles (amx_gemm.h) where head_dim is a multiple of
  // 16, O then kept transposed (see the P·V step). A head_dim that is not whole tiles of 32
  // (48, 80, ...) has its pairs zero-padded to amx_pairs: Qᵀ's extra rows, and K copied per key
  // block into padded rows.
#if defined(FUSEDATTN_AMX)
  const bool amx = kBf16Pairs<T> && amx_takes_head_dim(head_dim);
  const int64_t amx_pairs = amx_head_dim_pairs(head_dim);
  std::optional<AmxTileScope> amx_scope;
  if (amx) {
    amx_scope.emplace();
    zero_pair_rows(q_pairs, head_dim / 2, amx_pairs, s.ldq, s.ldq);
  }
#endif

  for (int64_t e = 0; e < lanes.lanes * s.ldo; e += W) vec_store<Acc>(s.o + e, vec_set1<Acc>(Acc(0)));
#if defined(FUSEDATTN_AMX)
  // AMX: O kept transposed, Oᵀ [head_dim x ldq] in q_rows (unused by the forward), until the end.
  float* const o_t = reinterpret_cast<float*>(s.q_rows);
  if (amx) std::memset(static_cast<void*>(o_t), 0, head_dim * s.ldq * sizeof(float));
#endif
  // Key blocks start at multiples of kBlockN, so a row's summation order (and result) does not
  // depend on which q-block, hence which thread count, it was computed in.
  for (int64_t j0 = keys.begin / kBlockN * kBlockN; j0 < keys.end; j0 += kBlockN) {
    const int64_t n = (keys.end - j0 < kBlockN) ? keys.end - j0 : kBlockN;
    TileMask tile_mask = TileMask::kNone;
    if (params.mask.type != MaskType::kNone) {
      bool any_visible = true;
      if (load_uniform_mask_rows(params.mask, block.batch, block.head_begin, block.row_begin, lanes.rows, j0, n,
                                 s.key_bias, &any_visible)) {
        if (!any_visible) continue;  // a bool mask hides the whole tile
        for (int64_t j = 0; j < n && tile_mask == TileMask::kNone; ++j) {
          if (s.key_bias[j] != Acc(0)) tile_mask = TileMask::kPerKey;
        }
      } else {
        if (!load_mask_tile(params.mask, block.batch, block.head_begin, block.row_begin, lanes.rows, j0, n,
                            s.mask_tile, transposed)) {
          continue;
        }
        for (int64_t j = 0; j < n; ++j) {  // packed heads share the mask (its head stride is 0)
          Acc* tile_row = s.mask_tile + j * s.ldq;
          for (int64_t i = lanes.rows; i < lanes.lanes; ++i) tile_row[i] = tile_row[i % lanes.rows];
        }
        tile_mask = TileMask::kTile;
      }
    }
    const bool fully_visible = j0 >= max_begin && j0 + n <= min_end;
    LaneRange active{0, s.ldq};
    if (!fully_visible) {
      active = lanes_seeing(s, lanes.lanes, j0, n);
      if (active.begin == active.end) continue;
    }
    const int64_t width = active.end - active.begin;
    // Sᵀ = K_blk · Qᵀ
    Acc* const s_active = s.s_t + active.begin;
    // bf16 pairs leave the scale out of the product: the softmax applies it as it reads the
    // scores where nothing else reads them first (a pass over Sᵀ saved), else a pass does.
    const bool fold_scale = kBf16Pairs<T> && params.softcap <= 0.0f && params.alibi_slopes == nullptr &&
                            tile_mask == TileMask::kNone && scale > Acc(0);
    if constexpr (kBf16Pairs<T>) {
#if defined(__AVX512BF16__)
      int64_t k_stride;
      const uint32_t* k_blk = key_pairs(params, block.batch, kv_head, j0, n, gather_keys,
                                        reinterpret_cast<uint32_t*>(s.k_rows), &k_stride);
#if defined(FUSEDATTN_AMX)
      if (amx) {
        // Whole 16-key tiles from K in place; the rest (a last partial tile, or every row where
        // head_dim's pairs are padded) from zero-padded copies (in v_rows, free until P·V), so
        // that every score comes from the tiles whatever the key block's length, which follows
        // the block's rows (and so the thread count).
        const int64_t pairs = head_dim / 2;
        const int64_t whole = amx_pairs == pairs ? n / kAmxTile * kAmxTile : 0;
        if (whole > 0) {
          amx_gemm_pairs(whole, width, pairs, k_blk, k_stride, q_pairs + active.begin, s.ldq, s_active, s.ldq, false);
        }
        if (whole < n) {
          const int64_t copied = round_up(n - whole, kAmxTile);
          uint32_t* rest = reinterpret_cast<uint32_t*>(s.v_rows);  // [copied x amx_pairs]
          for (int64_t j = 0; j < copied; ++j) {
            copy_padded_pair_row(whole + j < n ? k_blk + (whole + j) * k_stride : nullptr, pairs, amx_pairs,
                                 rest + j * amx_pairs);
          }
          amx_gemm_pairs(copied, width, amx_pairs, rest, amx_pairs, q_pairs + active.begin, s.ldq,
                         s_active + whole * s.ldq, s.ldq, false);
        }
      } else
#endif
      {
        gemm_op<Bf16PairOp>(n, width, (head_dim + 1) / 2, StridedA<uint32_t>{k_blk, k_stride, 1},
                            q_pairs + active.begin, s.ldq, s_active, s.ldq, false);
      }
      if (!fold_scale) {
        for (int64_t j = 0; j < n; ++j) {
          Acc* row = s_active + j * s.ldq;
          for (int64_t i = 0; i < width; i += W) vec_store<Acc>(row + i, vec_load<Acc>(row + i) * scale);
        }
      }
#endif
    } else {
      int64_t k_stride;
      const Acc* k_blk = kv_block<T, Acc>(params, params.k, block.batch, kv_head, j0, n, false, s.k_rows, s.ldo,
                                          &k_stride);
      gemm<Acc>(n, width, head_dim, StridedA<Acc>{k_blk, k_stride, 1}, s.q_t + active.begin, s.ldq, s_active, s.ldq,
                false);
    }
    modify_scores(params, s, active, j0, n, tile_mask);
    if (!fully_visible) mask_scores(s, active, j0, n);
    softmax_step(s, active, n, fold_scale ? scale : Acc(1));
    const int64_t lane_end = active.end < lanes.lanes ? active.end : lanes.lanes;
    if (params.dropout_p > 0.0f) {
      dropout_tile(params, block.batch, block.head_begin, block.row_begin, lanes.lanes, j0, n, s.drop_tile,
                   transposed);
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = active.begin; i < lane_end; ++i) s.s_t[j * s.ldq + i] *= s.drop_tile[j * s.ldq + i];
      }
    }
#if defined(FUSEDATTN_AMX)
    if constexpr (kBf16Pairs<T>) {
      if (amx) {  // Oᵀ = Oᵀ · diag(rescale) + Vᵀ · P over the active lanes
        // (Vectors of lanes whose factors are all 1, their max unmoved, as the lazy max leaves
        // most, are skipped; the rest row by row, in address order.)
        int64_t rescaled_begin = active.end, rescaled_end = active.begin;
        for (int64_t i = active.begin; i < active.end; i += W) {
          if (_mm512_cmpneq_ps_mask(_mm512_loadu_ps(s.row_rescale + i), _mm512_set1_ps(1.0f)) != 0) {
            rescaled_begin = std::min(rescaled_begin, i);
            rescaled_end = i + W;
          }
        }
        for (int64_t d = 0; d < head_dim && rescaled_begin < rescaled_end; ++d) {
          float* row = o_t + d * s.ldq;
          for (int64_t i = rescaled_begin; i < rescaled_end; i += W) {
            _mm512_storeu_ps(row + i, _mm512_mul_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(s.row_rescale + i)));
          }
        }
        const int64_t pairs = round_up((n + 1) / 2, kAmxTile);
        uint32_t* v_t = reinterpret_cast<uint32_t*>(s.v_rows);  // [head_dim x kBlockN / 2]
        const BFloat16* v_base = static_cast<const BFloat16*>(params.v.data);
        transpose_value_pairs([&](int64_t j) { return v_base + kv_row_offset(params, params.v, block.batch, kv_head, j0 + j); },
                              n, pairs, head_dim, v_t, kBlockN / 2);
        pack_float_row_pairs(s_active, n, width, s.ldq, s.p_pairs + active.begin);
        zero_pair_rows(s.p_pairs + active.begin, (n + 1) / 2, pairs, s.ldq, width);
        amx_gemm_pairs(head_dim, width, pairs, v_t, kBlockN / 2, s.p_pairs + active.begin, s.ldq, o_t + active.begin,
                       s.ldq, true);
        continue;
      }
    }
#endif
    for (int64_t i = active.begin; i < lane_end; ++i) {
      const Acc rescale = s.row_rescale[i];
      if (rescale == Acc(1)) continue;
      Acc* o_row = s.o + i * s.ldo;
      for (int64_t c = 0; c < s.ldo; c += W) vec_store<Acc>(o_row + c, vec_load<Acc>(o_row + c) * vec_set1<Acc>(rescale));
    }
    // O += P · V_blk over the active lanes, with Pᵀ read column-wise.
    Acc* const o_active = s.o + active.begin * s.ldo;
    const int64_t rows = lane_end - active.begin;
    if constexpr (kBf16Pairs<T>) {
#if defined(__AVX512BF16__)
      uint32_t* v_pairs = reinterpret_cast<uint32_t*>(s.v_rows);  // [(n + 1) / 2 x ldo]
      value_pairs(params, block.batch, kv_head, j0, n, v_pairs, s.ldo);
      pack_float_row_pairs(s_active, n, width, s.ldq, s.p_pairs + active.begin);
      gemm_op<Bf16PairOp>(rows, s.ldo, (n + 1) / 2, StridedA<uint32_t>{s.p_pairs + active.begin, 1, s.ldq}, v_pairs,
                          s.ldo, o_active, s.ldo, true);
#endif
    } else {
      int64_t v_stride;
      const Acc* v_blk = kv_block<T, Acc>(params, params.v, block.batch, kv_head, j0, n, true, s.v_rows, s.ldo,
                                          &v_stride);
      gemm<Acc>(rows, s.ldo, n, StridedA<Acc>{s_active, 1, s.ldq}, v_blk, v_stride, o_active, s.ldo, true);
    }
  }
#if defined(FUSEDATTN_AMX)
  if (amx) {  // Oᵀ back into O's rows, 16 x 16 at a time (O has ldq rows, head_dim <= ldo)
    for (int64_t i = 0; i < lanes.lanes; i += 16) {
      for (int64_t d = 0; d < head_dim; d += 16) {
        __m512i tile[16];
        for (int r = 0; r < 16; ++r) tile[r] = _mm512_loadu_si512(o_t + (d + r) * s.ldq + i);
        transpose_16x16_u32(tile);
        for (int r = 0; r < 16; ++r) _mm512_storeu_si512(s.o + (i + r) * s.ldo + d, tile[r]);
      }
    }
  }
#endif
  write_block_output<T>(params, block, lanes, s);
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
