// The CPU forward for blocks of very few query rows (decode: one token per head, or a GQA
// group's heads packed together), where the transposed Sᵀ = K·Qᵀ tile of forward_block.h would
// fill one vector lane in W. Here the vectors run along head_dim instead:
//   s[l][j] = <q_l, k_j>        one pass over each K row for all lanes (horizontal sums; 1-4
//                               tokens of MHA bf16 on the avx512amx ISA: 16 rows per AMX tile,
//                               amx_dot_rows)
//   online softmax of each lane over the key block (vectors along the keys), W lanes at a
//                               time sharing one reduction tree, the max moved only when a
//                               block's scores rise well above it (softmax_lanes)
//   o[l] += Σ_j p[l][j] · v_j   one pass over each V row for all lanes (bf16: two rows per
//                               VDPBF16PS, P rounded to bf16, accumulate_pairs_bf16; or where
//                               VDPBF16PS is slow, rows split into floats on FMA,
//                               accumulate_rows_split)
// Each K/V row is read from memory once per block (a kv head of two lane groups reads its part
// of a K row twice, the second time from L1), so the kernel runs at memory bandwidth. Blocks whose
// q rows outgrow L1 (several query tokens) or whose kv heads have two lane groups take the score
// rows in chunks where the block's kv heads lie side by side over 4 KiB or more of a row
// (kDecodeScoreChunkRows, tiles.h), each lane group over the whole chunk, so q is read once per
// chunk. Kv heads of 3-8 lane groups (several tokens of a GQA group: speculative decoding)
// take the whole key block per lane group, bf16 with the group's q rows in registers
// (dot_rows_bf16). The score pipeline (softcap, ALiBi, mask, windows, sinks, dropout, key splits) is forward_block.h's.
// A block runs whole (forward_block), or in visits (DecodeVisit: a pool walk over a paged cache,
// pool_walk.cpp), its running state then kept in a DecodeState between them.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include "common/kv_layout.h"
#include "common/variant.h"
#include "cpu/convert.h"
#include "cpu/forward_block.h"
#include "cpu/kernel_table.h"
#include "cpu/score_mods.h"
#include "cpu/vec.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

// combine() of all lanes (a sum or a max): a shuffle tree for 16 and 8 floats, a loop otherwise.
template <typename T, typename Combine>
inline T vec_reduce(VecT<T> v, Combine combine) {
  constexpr int W = Vec<T>::kWidth;
  if constexpr (W == 16 && sizeof(T) == 4) {
    v = combine(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = combine(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = combine(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = combine(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return v[0];
  } else if constexpr (W == 8 && sizeof(T) == 4) {
    v = combine(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = combine(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
    v = combine(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
    return v[0];
  } else {
    VecT<T> result = vec_set1<T>(vec_lane<T>(v, 0));
    for (int lane = 1; lane < W; ++lane) result = combine(result, vec_set1<T>(vec_lane<T>(v, lane)));
    return vec_lane<T>(result, 0);
  }
}

template <typename T>
inline T vec_sum(VecT<T> v) {
  return vec_reduce<T>(v, [](VecT<T> a, VecT<T> b) { return a + b; });
}

// Lane i of the result: combine() of all lanes of v[i], for the W vectors v[0, W), by one
// transposing shuffle tree for all of them (W - 1 combines of two shuffles each, independent of
// one another within a level) instead of a tree per vector, whose steps each wait for the last.
// Overwrites v.
template <typename T, typename Combine>
inline VecT<T> reduce_each(VecT<T>* v, Combine combine) {
  constexpr int W = Vec<T>::kWidth;
  if constexpr (W == 16 && sizeof(T) == 4) {
    for (int i = 0; i < 8; ++i) {  // lanes [8k, 8k + 8): 8 partials of vector 2i + k
      v[i] = combine(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                     __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    }
    for (int i = 0; i < 4; ++i) {  // lanes [4k, 4k + 4): 4 partials of vector 4i + k
      v[i] = combine(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                     __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
    }
    for (int i = 0; i < 2; ++i) {  // lanes [2k, 2k + 2): 2 partials of vector 8i + k
      v[i] = combine(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
                     __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
    }
    return combine(__builtin_shufflevector(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                   __builtin_shufflevector(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
  } else if constexpr (W == 8 && sizeof(T) == 4) {
    for (int i = 0; i < 4; ++i) {  // lanes [4k, 4k + 4): 4 partials of vector 2i + k
      v[i] = combine(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11),
                     __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15));
    }
    for (int i = 0; i < 2; ++i) {  // lanes [2k, 2k + 2): 2 partials of vector 4i + k
      v[i] = combine(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13),
                     __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15));
    }
    return combine(__builtin_shufflevector(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14),
                   __builtin_shufflevector(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15));
  } else {
    T each[W];
    for (int i = 0; i < W; ++i) each[i] = vec_reduce<T>(v[i], combine);
    return vec_load<T>(each);
  }
}

// How far (natural log) a lane's scores may rise above its running max before softmax_lanes
// moves the max: below it the probabilities stay against the old max (at most e^8, about
// 3000, far from fp32's range), so neither the max nor O change (lazy rescaling).
constexpr float kSoftmaxMaxSlack = 8.0f;

// True when the W lanes of a score tile (lane-major, ld apart, n_vectors vectors per lane, each
// score times `scale`) each have a finite running max (old_max) and no score above it by more
// than kSoftmaxMaxSlack (a NaN score or max answers false). The lanes go in the inner loop, W
// independent compares per score vector.
template <typename Acc>
inline bool scores_near_max(const Acc* scores, int64_t ld, int64_t n_vectors, VecT<Acc> old_max, VecT<Acc> scale) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  const V zero = vec_set1<Acc>(Acc(0)), one = vec_set1<Acc>(Acc(1));
  Acc limits[W];
  vec_store<Acc>(limits, old_max + vec_set1<Acc>(static_cast<Acc>(kSoftmaxMaxSlack)));
  auto any_far = [](V far) { return vec_reduce<Acc>(far, [](V a, V b) { return vec_max<Acc>(a, b); }) != Acc(0); };
  V far = old_max == vec_set1<Acc>(-std::numeric_limits<Acc>::infinity()) ? one : zero;  // 1: a lane fails
  if (any_far(far)) return false;  // a lane that has seen no key yet (a block's first key block)
  for (int64_t j = 0; j < n_vectors; j += W) {
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) far = vec_load<Acc>(scores + i * ld + j) * scale <= vec_set1<Acc>(limits[i]) ? far : one;
  }
  return !any_far(far);
}

// The online-softmax step of a key block for `lanes` lanes, W at a time: scores [lanes x ld],
// lane-major, n_vectors vectors per lane (-inf where a key is hidden or padding), each times
// `scale` (1, or the softmax scale where the products left it out), become probabilities in
// place; row_max / row_sum (round_up(lanes, W) entries, the padding lanes initialised too) move
// on; O rows (ld_o apart) are rescaled where their max grew. The maxima and sums of W lanes
// come from one reduce_each, the rescale factors from one vector exp (a tree and an exp per
// lane kept a 16-row visit of a pool walk waiting on their latencies). Where every score of W
// lanes stays near its lane's max (scores_near_max), as almost all do after a sequence's first
// key blocks, only the sums move: no max tree, no rescale.
template <typename Acc>
inline void softmax_lanes(Acc* scores, int64_t ld, int64_t n_vectors, int64_t lanes, Acc* row_max, Acc* row_sum,
                          Acc* o, int64_t ld_o, Acc scale) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  const V scales = vec_set1<Acc>(scale);
  const V minus_inf = vec_set1<Acc>(-std::numeric_limits<Acc>::infinity());
  const V zero = vec_set1<Acc>(Acc(0));
  for (int64_t l0 = 0; l0 < lanes; l0 += W) {
    const int64_t count = lanes - l0 < W ? lanes - l0 : W;
    V part[W];  // per lane: its partial max, then its partial sum (lanes past `count`: -inf, then 0)
    // p = exp(score * scale - shifts[i]) in place for lane l0 + i; returns each lane's sum of them.
    auto probabilities = [&](const Acc* shifts) {
      for (int i = 0; i < W; ++i) part[i] = zero;
      for (int64_t j = 0; j < n_vectors; j += W) {
#pragma GCC unroll 16
        for (int i = 0; i < W; ++i) {
          if (i >= count) break;
          Acc* p = scores + (l0 + i) * ld + j;
          const V prob = exp_vec<Acc>(vec_load<Acc>(p) * scales - vec_set1<Acc>(shifts[i]));
          vec_store<Acc>(p, prob);
          part[i] += prob;
        }
      }
      return reduce_each<Acc>(part, [](V a, V b) { return a + b; });
    };
    if (count == W && scores_near_max<Acc>(scores + l0 * ld, ld, n_vectors, vec_load<Acc>(row_max + l0), scales)) {
      vec_store<Acc>(row_sum + l0, vec_load<Acc>(row_sum + l0) + probabilities(row_max + l0));
      continue;
    }
    for (int i = 0; i < W; ++i) {
      part[i] = minus_inf;
      for (int64_t j = 0; i < count && j < n_vectors; j += W) {
        part[i] = vec_max<Acc>(part[i], vec_load<Acc>(scores + (l0 + i) * ld + j) * scales);
      }
    }
    const V old_max = vec_load<Acc>(row_max + l0);
    const V new_max = vec_max<Acc>(old_max, reduce_each<Acc>(part, [](V a, V b) { return vec_max<Acc>(a, b); }));
    const V shift = new_max == minus_inf ? zero : new_max;
    const V rescale = exp_vec<Acc>(old_max - shift);
    Acc shifts[W], factors[W];
    vec_store<Acc>(shifts, shift);
    vec_store<Acc>(factors, rescale);
    const V sum = probabilities(shifts);
    vec_store<Acc>(row_max + l0, new_max);
    vec_store<Acc>(row_sum + l0, vec_load<Acc>(row_sum + l0) * rescale + sum);
    for (int64_t i = 0; i < count; ++i) {
      if (factors[i] == Acc(1)) continue;
      Acc* o_row = o + (l0 + i) * ld_o;
      for (int64_t c = 0; c < ld_o; c += W) vec_store<Acc>(o_row + c, vec_load<Acc>(o_row + c) * vec_set1<Acc>(factors[i]));
    }
  }
}

// A vector of Acc from W elements of S: a plain load, or bf16/fp16 widened in registers.
template <typename Acc, typename S>
inline VecT<Acc> load_widened(const S* p) {
  constexpr int W = Vec<Acc>::kWidth;
  if constexpr (std::is_same_v<S, Acc>) {
    return vec_load<Acc>(p);
  } else if constexpr (W == 1) {
    return static_cast<Acc>(to_float(p[0]));
  } else {
    static_assert(W == kConvertLanes, "widening loads produce one vector of floats");
    const ConvertFloats wide = widen_vector(p);
    VecT<Acc> out;
    std::memcpy(&out, &wide, sizeof(out));
    return out;
  }
}

// The four lane sums of a0..a3 (a shuffle tree shared by the four for 16 floats).
template <typename Acc>
inline void vec_sum4(VecT<Acc> a0, VecT<Acc> a1, VecT<Acc> a2, VecT<Acc> a3, Acc* out) {
  if constexpr (Vec<Acc>::kWidth == 16 && sizeof(Acc) == 4) {
    const VecT<Acc> x01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                          __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const VecT<Acc> x23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                          __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    // lanes [4k, 4k + 4) hold four partial sums of a_k
    VecT<Acc> y = __builtin_shufflevector(x01, x23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(x01, x23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    y += __builtin_shufflevector(y, y, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    y += __builtin_shufflevector(y, y, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = y[0], out[1] = y[4], out[2] = y[8], out[3] = y[12];
  } else {
    out[0] = vec_sum<Acc>(a0), out[1] = vec_sum<Acc>(a1), out[2] = vec_sum<Acc>(a2), out[3] = vec_sum<Acc>(a3);
  }
}

// Scores of one cache row for up to four lanes of HEADS consecutive kv heads with LPK lanes each
// (HEADS * LPK <= 4): s[λ * ld_s] = <q_λ, k_{λ / LPK}> for lanes λ (q rows ld apart), where kv
// head h's part of the row starts at key + h * head_stride. Each K vector is loaded (and widened)
// once for the lanes of its head, one head after the other (interleaving the heads' loads cost
// MHA bf16 decode 10 points of bandwidth), and the four lanes share one reduction tree.
template <typename Acc, typename S, int HEADS, int LPK>
inline void dot_heads(const Acc* q, int64_t ld, const S* key, int64_t head_stride, Acc* s, int64_t ld_s) {
  static_assert(HEADS * LPK <= 4, "four lanes per reduction");
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  V acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = vec_set1<Acc>(Acc(0));
  for (int h = 0; h < HEADS; ++h) {  // heads outer: the row is read in address order
    for (int64_t d = 0; d < ld; d += W) {
      const V k = load_widened<Acc>(key + h * head_stride + d);
      for (int l = 0; l < LPK; ++l) acc[h * LPK + l] = vec_load<Acc>(q + (h * LPK + l) * ld + d) * k + acc[h * LPK + l];
    }
  }
  Acc sums[4];
  vec_sum4<Acc>(acc[0], acc[1], acc[2], acc[3], sums);
  for (int i = 0; i < HEADS * LPK; ++i) s[i * ld_s] = sums[i];
}

#if defined(__AVX512BF16__)
// dot_heads for bf16 rows read as they are (head_dim a multiple of 32): one VDPBF16PS multiplies
// 16 adjacent pairs of q and k, which is exactly the pair layout, so nothing is packed or
// widened. q: raw bf16 rows ld_q elements apart; the sums are unscaled.
template <int HEADS, int LPK>
inline void dot_heads_bf16(const BFloat16* q, int64_t ld_q, const BFloat16* key, int64_t head_stride,
                           int64_t head_dim, float* s, int64_t ld_s) {
  static_assert(HEADS * LPK <= 4, "four lanes per reduction");
  __m512 acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
  for (int h = 0; h < HEADS; ++h) {  // heads outer: the row is read in address order
    for (int64_t d = 0; d < head_dim; d += 32) {
      const __m512bh k = reinterpret_cast<__m512bh>(_mm512_loadu_si512(key + h * head_stride + d));
      for (int l = 0; l < LPK; ++l) {
        const int i = h * LPK + l;
        acc[i] = _mm512_dpbf16_ps(acc[i], reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + i * ld_q + d)), k);
      }
    }
  }
  float sums[4];
  vec_sum4<float>(acc[0], acc[1], acc[2], acc[3], sums);
  for (int i = 0; i < HEADS * LPK; ++i) s[i * ld_s] = sums[i];
}

// Scores of `count` cache rows for LANES (1-4) lanes of one kv head, bf16 read in place
// (head_dim = 32 * DV): s[λ * ld_s + r] = <q_λ, rows[r] + offset>, unscaled. The lanes' q rows
// (ld_q apart) stay in registers (LANES x DV vectors) over all the rows, so a row costs its DV K
// loads and LANES x DV VDPBF16PS, not also the q loads dot_heads_bf16 makes row by row.
template <int LANES, int DV>
inline void dot_rows_bf16(const BFloat16* q, int64_t ld_q, const BFloat16* const* rows, int64_t offset,
                          int64_t count, float* s, int64_t ld_s) {
  __m512bh qv[LANES][DV];
  for (int l = 0; l < LANES; ++l) {
    for (int d = 0; d < DV; ++d) qv[l][d] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + l * ld_q + 32 * d));
  }
  for (int64_t r = 0; r < count; ++r) {
    const BFloat16* key = rows[r] + offset;
    __m512 acc[4];
    for (int l = 0; l < 4; ++l) acc[l] = _mm512_setzero_ps();
    for (int d = 0; d < DV; ++d) {
      const __m512bh k = reinterpret_cast<__m512bh>(_mm512_loadu_si512(key + 32 * d));
      for (int l = 0; l < LANES; ++l) acc[l] = _mm512_dpbf16_ps(acc[l], qv[l][d], k);
    }
    float sums[4];
    vec_sum4<float>(acc[0], acc[1], acc[2], acc[3], sums);
    for (int l = 0; l < LANES; ++l) s[l * ld_s + r] = sums[l];
  }
}

// dot_rows_bf16 for head_dim 32, 64, 96 or 128.
template <int LANES>
inline void dot_rows_bf16(const BFloat16* q, int64_t ld_q, const BFloat16* const* rows, int64_t offset,
                          int64_t count, int64_t head_dim, float* s, int64_t ld_s) {
  switch (head_dim / 32) {
    case 1: dot_rows_bf16<LANES, 1>(q, ld_q, rows, offset, count, s, ld_s); break;
    case 2: dot_rows_bf16<LANES, 2>(q, ld_q, rows, offset, count, s, ld_s); break;
    case 3: dot_rows_bf16<LANES, 3>(q, ld_q, rows, offset, count, s, ld_s); break;
    default: dot_rows_bf16<LANES, 4>(q, ld_q, rows, offset, count, s, ld_s); break;
  }
}

// P·V for bf16 V rows read in place, two rows per VDPBF16PS: for each pair of rows (2t, 2t + 1)
// and each 32 columns, VPUNPCKLWD / VPUNPCKHWD interleave the two rows into the pair layout
// (columns {0-3, 8-11, 16-19, 24-27} and {4-7, 12-15, 20-23, 28-31} of the 32), and each lane's
// probability pair (p[2t], p[2t + 1], bf16) multiplies them: half the multiply-adds of widening
// V to fp32, and no widening. O rows therefore hold each 32 columns in that order (see
// pair_slot). o_l += Σ_t p_l[t] · v_t for LANES lanes (o rows ld apart, ld a
// multiple of 32; the probability pairs of lane l at pp + l * ld_pp, broadcast from memory as
// each product needs them) and rows rows[t] + offset; with kOddMissing the last pair's second
// row is zero (an odd tail).
template <int LANES, int PAIRS, bool kOddMissing>
inline void accumulate_pairs_bf16(float* o, const uint32_t* pp, int64_t ld_pp, const BFloat16* const* rows,
                                  int64_t offset, int64_t ld) {
  const BFloat16* even[PAIRS];
  const BFloat16* odd[PAIRS];
  for (int t = 0; t < PAIRS; ++t) {
    even[t] = rows[2 * t] + offset;
    odd[t] = kOddMissing && t == PAIRS - 1 ? nullptr : rows[2 * t + 1] + offset;
  }
  for (int64_t c = 0; c < ld; c += 32) {
    __m512 low[LANES], high[LANES];
    for (int l = 0; l < LANES; ++l) {
      low[l] = _mm512_loadu_ps(o + l * ld + c);
      high[l] = _mm512_loadu_ps(o + l * ld + c + 16);
    }
    for (int t = 0; t < PAIRS; ++t) {
      const __m512i a = _mm512_loadu_si512(even[t] + c);
      const __m512i b = kOddMissing && t == PAIRS - 1 ? _mm512_setzero_si512() : _mm512_loadu_si512(odd[t] + c);
      const __m512bh pairs_low = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
      const __m512bh pairs_high = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
      for (int l = 0; l < LANES; ++l) {
        const __m512bh prob = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pp[l * ld_pp + t])));
        low[l] = _mm512_dpbf16_ps(low[l], pairs_low, prob);
        high[l] = _mm512_dpbf16_ps(high[l], pairs_high, prob);
      }
    }
    for (int l = 0; l < LANES; ++l) {
      _mm512_storeu_ps(o + l * ld + c, low[l]);
      _mm512_storeu_ps(o + l * ld + c + 16, high[l]);
    }
  }
}

// Each lane's probabilities [lanes x ld], n_vectors vectors per lane, rounded to bf16 pairs
// (pairs[l][t] = p[l][2t] | p[l][2t + 1] << 16, ld_pairs apart), as accumulate_pairs_bf16 reads them.
inline void probability_pairs(const float* p, int64_t ld, int64_t n_vectors, int64_t lanes, uint32_t* pairs,
                              int64_t ld_pairs) {
  for (int64_t l = 0; l < lanes; ++l) {
    for (int64_t j = 0; j < n_vectors; j += 16) {
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(p + l * ld + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs + l * ld_pairs + j / 2), reinterpret_cast<__m256i>(rounded));
    }
  }
}

// Where column d (of 32) sits in accumulate_pairs_bf16's order: slot i of the low / high half
// holds column 8 (i / 4) + i % 4 (+ 4).
inline int64_t pair_slot(int64_t d) { return d % 8 / 4 * 16 + d / 8 * 4 + d % 4; }
#endif

// Whether this ISA's decode may multiply bf16 K/V rows as split floats on FMA (below) instead
// of as pairs on VDPBF16PS: on AVX-512 without AVX512-BF16 (where the generic path widened 16
// at a time), and on the avx512amx ISA, whose CPUs (Intel Xeon) issue a VDPBF16PS every two
// cycles at a latency of 8 where two 512-bit FMAs issue per cycle at a latency of 4
// (benchmarks/cpu_rates.py). There kv heads of kDecodeLanes lanes or more split: ab_decode.py
// pairs -> split, % of a torch.sum timed alongside, one token of GQA bf16 83% -> 91%, paged
// 72% -> 77%; two tokens of GQA 59% / 58%. Fewer lanes keep the pairs: one token of MHA bf16
// 83% -> 79%, two tokens 91% -> 86% when split. The avx512bf16 ISA keeps the pairs (measured
// on AMD).
#if defined(__AVX512F__) && (defined(FUSEDATTN_AMX) || !defined(__AVX512BF16__))
constexpr bool kDecodeSplitsBf16 = true;
#else
constexpr bool kDecodeSplitsBf16 = false;
#endif

#if defined(__AVX512F__)
// bf16 rows read in place as floats, 32 elements per load: a bf16 is the high half of its
// float, so the even elements of the 32 are the vector's 32-bit lanes shifted left by 16 and the
// odd ones those lanes with the low half cleared, one instruction each (widening 16 elements
// took two). q and O rows hold each 32 columns in that split order (even columns, then odd:
// split_slot), so the products pair them without shuffles.
inline void split_bf16(const BFloat16* p, __m512& even, __m512& odd) {
  const __m512i bits = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Where column d of a row sits in the split order: within its 32 columns, the even ones first.
inline int64_t split_slot(int64_t d) { return d / 32 * 32 + d % 2 * 16 + d % 32 / 2; }

// dot_heads for bf16 K rows split on FMA (head_dim a multiple of 32): q rows (ld apart, floats in
// split order, scaled) against kv head h's part of the row at key + h * head_stride; the even
// and odd halves accumulate apart (two chains per lane) and the four lanes share one reduction.
template <int HEADS, int LPK>
inline void dot_heads_split(const float* q, int64_t ld, const BFloat16* key, int64_t head_stride, int64_t head_dim,
                            float* s, int64_t ld_s) {
  static_assert(HEADS * LPK <= 4, "four lanes per reduction");
  __m512 acc_even[4], acc_odd[4];
  for (int i = 0; i < 4; ++i) acc_even[i] = acc_odd[i] = _mm512_setzero_ps();
  for (int h = 0; h < HEADS; ++h) {  // heads outer: the row is read in address order
    for (int64_t d = 0; d < head_dim; d += 32) {
      __m512 even, odd;
      split_bf16(key + h * head_stride + d, even, odd);
      for (int l = 0; l < LPK; ++l) {
        const int i = h * LPK + l;
        acc_even[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * ld + d), even, acc_even[i]);
        acc_odd[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * ld + d + 16), odd, acc_odd[i]);
      }
    }
  }
  float sums[4];
  vec_sum4<float>(acc_even[0] + acc_odd[0], acc_even[1] + acc_odd[1], acc_even[2] + acc_odd[2],
                  acc_even[3] + acc_odd[3], sums);
  for (int i = 0; i < HEADS * LPK; ++i) s[i * ld_s] = sums[i];
}

// accumulate_rows for bf16 V rows split on FMA: o_l += Σ_t p_l[t] · v_t for LANES lanes (o rows
// ld apart in split order, ld a multiple of 32; p_l = p + l * ld_p, floats) and ROWS rows
// rows[t] + offset, each 32 columns of a row loaded once for all lanes.
template <int LANES, int ROWS>
inline void accumulate_rows_split(float* o, const float* p, int64_t ld_p, const BFloat16* const* rows, int64_t offset,
                                  int64_t ld) {
  const BFloat16* value_rows[ROWS];
  for (int t = 0; t < ROWS; ++t) value_rows[t] = rows[t] + offset;
  for (int64_t c = 0; c < ld; c += 32) {
    __m512 even_acc[LANES], odd_acc[LANES];
    for (int l = 0; l < LANES; ++l) {
      even_acc[l] = _mm512_loadu_ps(o + l * ld + c);
      odd_acc[l] = _mm512_loadu_ps(o + l * ld + c + 16);
    }
    for (int t = 0; t < ROWS; ++t) {
      __m512 even, odd;
      split_bf16(value_rows[t] + c, even, odd);
      for (int l = 0; l < LANES; ++l) {
        const __m512 prob = _mm512_set1_ps(p[l * ld_p + t]);
        even_acc[l] = _mm512_fmadd_ps(prob, even, even_acc[l]);
        odd_acc[l] = _mm512_fmadd_ps(prob, odd, odd_acc[l]);
      }
    }
    for (int l = 0; l < LANES; ++l) {
      _mm512_storeu_ps(o + l * ld + c, even_acc[l]);
      _mm512_storeu_ps(o + l * ld + c + 16, odd_acc[l]);
    }
  }
}


// O rows whose 32-column chunks hold column d at slot(d) (pair_slot, split_slot) back in column
// order: two VPERMT2PS per 32 columns, their indices built once from slot (instead of a scalar
// copy per element).
template <typename Slot>
inline void columns_in_order(float* o, int64_t ld, int64_t lanes, Slot slot) {
  alignas(64) int32_t index[32];
  for (int d = 0; d < 32; ++d) index[d] = static_cast<int32_t>(slot(d));
  const __m512i index_low = _mm512_load_si512(index), index_high = _mm512_load_si512(index + 16);
  for (int64_t l = 0; l < lanes; ++l) {
    for (int64_t c = 0; c < ld; c += 32) {
      float* chunk = o + l * ld + c;
      const __m512 low = _mm512_loadu_ps(chunk), high = _mm512_loadu_ps(chunk + 16);
      _mm512_storeu_ps(chunk, _mm512_permutex2var_ps(low, index_low, high));
      _mm512_storeu_ps(chunk + 16, _mm512_permutex2var_ps(low, index_high, high));
    }
  }
}
#endif

// o_l[0, ld) += Σ_t p_l[t] · v_t[0, ld) for LANES lanes (o rows ld apart, p_l = p + l * ld_p)
// and ROWS value rows v_t = rows[t] + offset (each row from its own pointer, so rows on different
// cache pages step together), ld a multiple of W: each V vector is loaded (and widened) once for
// all lanes, O is read and written once for all rows, and each probability is broadcast once for
// the whole row.
template <typename Acc, typename S, int LANES, int ROWS>
inline void accumulate_rows(Acc* o, const Acc* p, int64_t ld_p, const S* const* rows, int64_t offset, int64_t ld) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  V prob[ROWS][LANES];
  const S* value_rows[ROWS];
  for (int t = 0; t < ROWS; ++t) {
    value_rows[t] = rows[t] + offset;
    for (int l = 0; l < LANES; ++l) prob[t][l] = vec_set1<Acc>(p[l * ld_p + t]);
  }
  for (int64_t c = 0; c < ld; c += W) {
    V acc[LANES];
    for (int l = 0; l < LANES; ++l) acc[l] = vec_load<Acc>(o + l * ld + c);
    for (int t = 0; t < ROWS; ++t) {
      const V value = load_widened<Acc>(value_rows[t] + c);
      for (int l = 0; l < LANES; ++l) acc[l] = prob[t][l] * value + acc[l];
    }
    for (int l = 0; l < LANES; ++l) vec_store<Acc>(o + l * ld + c, acc[l]);
  }
}

#if defined(FUSEDATTN_AMX)
// The scores of LANES lanes (1-4) from amx_dot_rows's tile c [16 rows][LANES], times factor,
// into lane-major rows: s[l * ld_s + r] = c[r * LANES + l] * factor, by two VPERMT2PS per lane.
template <int LANES>
inline void lane_scores_from_tile(const float* c, float factor, float* s, int64_t ld_s) {
  const __m512 low0 = _mm512_load_ps(c), low1 = _mm512_load_ps(c + 16);
  const __m512 high0 = LANES > 2 ? _mm512_load_ps(c + 32) : _mm512_setzero_ps();
  const __m512 high1 = LANES > 3 ? _mm512_load_ps(c + 48) : _mm512_setzero_ps();
  const __m512i rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int l = 0; l < LANES; ++l) {
    const __m512i index = _mm512_add_epi32(_mm512_mullo_epi32(rows, _mm512_set1_epi32(LANES)), _mm512_set1_epi32(l));
    const __mmask16 high = _mm512_cmpge_epi32_mask(index, _mm512_set1_epi32(32));
    const __m512 scores = _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(low0, index, low1),
                                               _mm512_permutex2var_ps(high0, index, high1));
    _mm512_storeu_ps(s + l * ld_s, _mm512_mul_ps(scores, _mm512_set1_ps(factor)));
  }
}
#endif

// What a decode block keeps between the visits of a pool walk (DecodeVisit::state): the
// ForwardScratch parts that outlive a key block, in elements of Acc (the key indices too).
template <typename Acc>
struct DecodeState {
  static int64_t elements(int64_t head_dim, int64_t lanes) {
    const int64_t ldq = round_up(lanes, Vec<Acc>::kWidth), ldo = round_up(head_dim, Vec<Acc>::kWidth);
    return 2 * ldq * ldo + ldq * ldo / 2 + 6 * ldq;
  }
  // Points s's lasting parts (o, q_rows, q_t as the decode's packed AMX Qᵀ, row_max, row_sum,
  // query_pos, lane_slope, key_begin, key_end) into `state`; s's key-block parts stay in the
  // thread's scratch.
  static void place(void* state, ForwardScratch<Acc>& s) {
    Acc* p = static_cast<Acc*>(state);
    s.o = p;          p += s.ldq * s.ldo;
    s.q_rows = p;     p += s.ldq * s.ldo;
    s.q_t = p;        p += s.ldq * s.ldo / 2;
    s.row_max = p;    p += s.ldq;
    s.row_sum = p;    p += s.ldq;
    s.query_pos = p;  p += s.ldq;
    s.lane_slope = p; p += s.ldq;
    s.key_begin = reinterpret_cast<MaskIndex<Acc>*>(p); p += s.ldq;
    s.key_end = reinterpret_cast<MaskIndex<Acc>*>(p);
  }
};

// Calls f(first, second), both std::integral_constant, for a kv head of lanes_per_kv lanes (one
// that passes runs_decode_kernel, as the dispatch checks): one lane group of 1-4 lanes (second
// 0), or two, `first` lanes then `second` (3 + 2, 3 + 3, 4 + 3, 4 + 4 for 5-8 lanes). Both are
// compile-time: with the group count known only at run time, MHA bf16 decode lost about 10 points.
// More lanes (9 and up, see runs_decode_kernel): first 4, second kManyLaneGroups, and the
// callers walk the groups at run time (each_lane_group: groups of 4, the last of 1-4).
constexpr int kManyLaneGroups = -1;
template <typename F>
inline void with_lane_groups(int64_t lanes_per_kv, F&& f) {
  static_assert(kDecodeLanes == 4, "one case per lane count");
  using std::integral_constant;
  switch (lanes_per_kv) {
    case 1: f(integral_constant<int, 1>{}, integral_constant<int, 0>{}); break;
    case 2: f(integral_constant<int, 2>{}, integral_constant<int, 0>{}); break;
    case 3: f(integral_constant<int, 3>{}, integral_constant<int, 0>{}); break;
    case 4: f(integral_constant<int, 4>{}, integral_constant<int, 0>{}); break;
    case 5: f(integral_constant<int, 3>{}, integral_constant<int, 2>{}); break;
    case 6: f(integral_constant<int, 3>{}, integral_constant<int, 3>{}); break;
    case 7: f(integral_constant<int, 4>{}, integral_constant<int, 3>{}); break;
    case 8: f(integral_constant<int, 4>{}, integral_constant<int, 4>{}); break;
    default: f(integral_constant<int, 4>{}, integral_constant<int, kManyLaneGroups>{}); break;  // 9 and up
  }
}

// The decode kernel. A block's lanes (query rows x heads) may span several kv heads: decode
// blocks hold all heads of a token (see plan_blocks). Lanes of kv head g are
// [g * lanes_per_kv, (g + 1) * lanes_per_kv). Each key block is walked in the cache's own order,
// which is what lets the hardware prefetchers stream it:
//   scores  one cache row at a time, all its kv heads before the next row (dot_heads), or for
//           blocks with much q or two lane groups per kv head, chunks of kDecodeScoreChunkRows
//           rows, each lane group over the chunk (see the score pass); kv heads of more than
//           two lane groups: each group over the whole key block, bf16 q in registers;
//   P·V     kDecodeValueRows rows at a time, each kv head's part of them in turn.
// The P·V walk reads kDecodeValueRows rows side by side, which the hardware prefetchers do not
// follow: from DRAM it ran at what memory and arithmetic take one after the other. So where a
// block's K and V rows fit in L2 together (decode_staging_bytes), the score pass fetches V row j
// along with K row j (every line), and P·V reads V from L2 (see prefetch_ahead and
// fetch_heads for the rest).
// benchmarks/ab_decode.py, 2 threads, % of a torch.sum timed alongside: GQA bf16 49-55% ->
// 61-71%, GQA fp32 66-67% -> 71-72% against 16 (then 4) rows per kv head before the next head.
// kDirect: K/V rows are read in place (a whole number of vectors wide), else each row is first
// converted and zero-padded into scratch.
// visit: null for the whole block, else one visit of a pool walk (its keys, its state).
template <typename T, bool kDirect>
void decode_block_impl(const AttentionParams& params, const ForwardBlock& block, void* scratch,
                       const DecodeVisit* visit) {
  using Acc = typename ComputeType<T>::type;
  using V = VecT<Acc>;
  using S = std::conditional_t<kDirect, T, Acc>;  // what the dot products read
  constexpr int W = Vec<Acc>::kWidth;
  const int64_t head_dim = params.head_dim;
  const BlockLanes lanes{block.row_end - block.row_begin, (block.row_end - block.row_begin) * block.head_count};
  ForwardScratch<Acc> s = ForwardScratch<Acc>::carve(scratch, head_dim, lanes.lanes);
  if (visit != nullptr) DecodeState<Acc>::place(visit->state, s);
  const bool resumed = visit != nullptr && !visit->first;  // the lanes' state is already in visit->state
  const int64_t kv_first = kv_head_of(params, block.head_begin);
  const int64_t lanes_per_kv = lanes_per_kv_head(params, block);
  const int64_t kv_count = lanes.lanes / lanes_per_kv;
  const int64_t ldn = kBlockN;  // scores: [lanes x kBlockN] row-major in s.s_t
  const Orientation row_major{ldn, 1};
  int64_t j0 = 0, n = 0;  // the current key block
  // bf16 K rows in place on VDPBF16PS: q kept as raw bf16 rows, the scale applied to the sums.
  // Or split into floats on FMA (kDecodeSplitsBf16): q scaled, q and O rows in split order.
  constexpr bool kPairDots = kBf16Pairs<T> && kDirect;
  constexpr bool kSplitDots = kDecodeSplitsBf16 && std::is_same_v<T, BFloat16> && kDirect;
  const bool split_dots = kSplitDots && head_dim % 32 == 0 && (!kPairDots || lanes_per_kv >= kDecodeLanes);
  const bool pair_dots = kPairDots && head_dim % 32 == 0 && !split_dots;

  // Row j of the key block's first kv head, for K and for V (kv head g is g head strides
  // further): one page lookup per page the key block touches, once per key block
  // (translate_ahead looks up the rows kTranslationAheadRows ahead once more).
  const SequenceLayout& pages = params.sequences;
  const T* k_row[kBlockN];
  const T* v_row[kBlockN];
  auto block_rows = [&](const TensorRef& t, const T** rows) {
    for (int64_t j = 0; j < n;) {
      const T* first = static_cast<const T*>(t.data) + kv_row_offset(params, t, block.batch, kv_first, j0 + j);
      const int64_t on_page =
          pages.block_table == nullptr ? n - j : std::min(n - j, pages.page_size - (j0 + j) % pages.page_size);
      for (int64_t r = 0; r < on_page; ++r) rows[j + r] = first + r * t.row_stride;
      j += on_page;
    }
  };
  // Kv heads [g, g + count) of a cache row as the products read them: in place (kv head h at
  // *stride elements from the first), or converted and zero-padded into buffer rows s.ldo apart.
  auto heads_of = [&](const TensorRef& t, const T* first_head, int64_t g, int64_t count, Acc* buffer,
                      int64_t* stride = nullptr) -> const S* {
    const T* row = first_head + g * t.head_stride;
    if constexpr (kDirect) {
      if (stride != nullptr) *stride = t.head_stride;
      return row;
    } else {
      for (int64_t h = 0; h < count; ++h) convert_rows(row + h * t.head_stride, 0, 1, head_dim, buffer + h * s.ldo, s.ldo);
      if (stride != nullptr) *stride = s.ldo;
      return buffer;
    }
  };

  // Software prefetch besides the V rows fetched by the score pass, for the score pass in chunks
  // of rows (one row at a time it fetches K with the scores instead: fetch_heads below) and for
  // P·V (benchmarks/ab_decode.py, % of a torch.sum timed alongside):
  //  - paged caches whose pages hold kSmallPageBytes or less: the cache jumps elsewhere every few
  //    rows and the hardware prefetchers restart at each jump, so every line of the row
  //    kSmallPagePrefetchBytes ahead is fetched (the K pass reaching into the block's V rows,
  //    unless it fetches them row by row anyway). GQA, pages of 16 rows: bf16 41-49% -> 52-54%,
  //    fp32 57-68% -> 61-63%.
  //  - blocks of one kv head whose K rows follow one another in memory (caches stored (B, Hkv,
  //    L, D), as Hugging Face's, or of a single kv head), not paged: every line of K
  //    kRowStreamPrefetchBytes ahead, across key blocks (see tiles.h; such rows are 256-512
  //    bytes, and without it the stream ran well below the bandwidth; their V rows, 2 KiB at
  //    most, are always staged).
  //  - else fp32/fp64 caches: the first line of each 4 KiB page that begins in the row
  //    kPagePrefetchBytes ahead, so each page's stream starts early (the hardware prefetchers
  //    stop at page boundaries). fp32 MHA 76-78% -> 80-84%, GQA 47-49% -> 52-55%; bf16 caches
  //    lost 4 points, so they skip it.
  // row_bytes: what the block reads of a cache row, K or V (its kv heads' parts). In a (B, L,
  // Hkv, D) cache or a page the parts lie side by side; in other layouts, such as (B, Hkv, L, D)
  // storage passed as (B, L, Hkv, D) views (Hugging Face's caches), each part is on its own, and
  // prefetches go part by part: by the row's whole span they fetched a line in every 4 KiB page
  // between the heads, fp32 decode of such caches ran at 1 GB/s (ab_decode.py --head-major).
  const int64_t row_bytes = kv_count * head_dim * static_cast<int64_t>(sizeof(T));
  auto side_by_side = [&](const TensorRef& t) { return kv_count == 1 || kv_heads_side_by_side(t, head_dim); };
  const bool k_side_by_side = side_by_side(params.k), v_side_by_side = side_by_side(params.v);
#if defined(FUSEDATTN_AMX)
  // bf16 rows of 4 KiB or more with the kv heads side by side (MHA), 1-4 lanes per kv head: the
  // scores of 16 rows come from AMX tiles (amx_dot_rows) where the 16 rows lie evenly apart in
  // memory (kv_rows_strided: a contiguous cache, or within a page), one kv head after the other.
  // A tile load of 16 rows keeps 16 lines in flight where the row-by-row products with their
  // horizontal sums kept memory and arithmetic taking turns. ab_decode.py, % of a torch.sum
  // timed alongside, row by row -> tiles: one token of MHA bf16 78% -> 89%, 101% -> 107%, paged
  // (16) 74% -> 81%, 68% -> 81%; --heads 16 (4 KiB rows) --reps 25, three runs 90-94% ->
  // 102-107%, paged 84-97% -> 91-104%; --queries 2 71% -> 87%, 75% -> 95%; --queries 3 63% ->
  // 78%, 72% -> 85%; --queries 4 (blocks whose q outgrows L1, which took chunks of rows) 71% ->
  // 84%, 69% -> 84%, paged 54% -> 66%, 49% -> 63% once a pool walk kept the packed Qᵀ between
  // visits (2-3 tokens paged alike). Rows of 2 KiB lost: --heads 8 (MHA) 85-95% -> 78-88%, GQA
  // bf16 (8 kv heads) 76% / 70% -> 71% / 74%, paged 66% -> 58-61%; so did caches stored (B, Hkv,
  // L, D) (--head-major) 96-113% -> 88-89%: they keep the rows.
  const bool amx_scores =
      (lanes_per_kv == 1 ? pair_dots : (pair_dots || split_dots) && lanes_per_kv <= kDecodeLanes) && k_side_by_side &&
      row_bytes >= 4096;
  std::optional<AmxTileScope> amx_scope;
  // Qᵀ of each kv head as amx_dot_rows reads it, [head_dim / 32][16][lanes_per_kv] pairs per kv
  // head (one lane: its raw q row), packed into q_t once per block (the decode kernel otherwise
  // leaves q_t unused; a pool walk keeps it in DecodeState between visits).
  uint32_t* const amx_q = reinterpret_cast<uint32_t*>(s.q_t);
  const int64_t amx_q_per_kv = head_dim / 2 * lanes_per_kv;
  if (amx_scores) {
    amx_scope.emplace(lanes_per_kv);
    for (int64_t l = 0; l < lanes.lanes && !resumed; ++l) {
      const T* q = static_cast<const T*>(params.q.data) + block.batch * params.q.batch_stride +
                   lanes.head(block, l) * params.q.head_stride + lanes.row(block, l) * params.q.row_stride;
      uint32_t* lane = amx_q + l / lanes_per_kv * amx_q_per_kv + l % lanes_per_kv;
      for (int64_t pair = 0; pair < head_dim / 2; ++pair) std::memcpy(lane + pair * lanes_per_kv, q + 2 * pair, 4);
    }
  }
#else
  constexpr bool amx_scores = false;  // (tiles only on the avx512amx ISA)
#endif
  // A visit of a pool walk (one run of pages: its key blocks end with the run) stages by its own
  // rows where the score pass spreads its fetches (kv heads of several lanes, see
  // fetch_heads): ab_decode.py, pages of 16, GQA fp32 (64 KiB pages, 128 KiB of K+V per
  // visit) 74% -> 78% of a torch.sum; MHA bf16 (one lane, a fetch per row) lost 71% -> 66%.
  const int64_t staged_rows =
      visit == nullptr || lanes_per_kv == 1 ? kBlockN : std::min(kBlockN, visit->key_hi - visit->key_lo);
  const bool stage_values =
      (v_side_by_side || kv_count <= kDecodeStagedParts) && 2 * staged_rows * row_bytes <= decode_staging_bytes();
  const int64_t query_row_bytes =
      pair_dots ? head_dim * static_cast<int64_t>(sizeof(T)) : s.ldo * static_cast<int64_t>(sizeof(Acc));
  const int64_t query_bytes = lanes.lanes * query_row_bytes;  // the block's q rows as the products read them
  const bool chunk_rows = !amx_scores && k_side_by_side && row_bytes >= 4096 &&  // (tiles read q per 16 rows)
                          (query_bytes > kDecodeQueryL1Bytes || lanes_per_kv > kDecodeLanes);
  const int64_t score_rows = chunk_rows ? kDecodeScoreChunkRows : 1;
  // (A pool walk reads the pages in address order, which the hardware prefetchers follow.)
  const bool small_pages =
      pages.block_table != nullptr && pages.page_size * row_bytes <= kSmallPageBytes && visit == nullptr;
  const bool pool_pages_follow = params.k.batch_stride == pages.page_size * params.k.row_stride &&
                                 params.v.batch_stride == pages.page_size * params.v.row_stride;
  const int32_t* page_table = small_pages ? pages.block_table + block.batch * pages.block_table_stride : nullptr;
  const bool k_rows_follow = kv_count == 1 && params.k.row_stride == head_dim && pages.block_table == nullptr;
  const int64_t ahead_bytes =
      small_pages ? kSmallPagePrefetchBytes : k_rows_follow ? kRowStreamPrefetchBytes : kPagePrefetchBytes;
  const int64_t rows_ahead = (ahead_bytes + row_bytes - 1) / row_bytes;
  // Small pages: whether the rows_ahead rows before key `key` (kSmallPagePrefetchBytes) do not
  // run on in memory up to it. Only such keys get the small-page prefetches below. Where they
  // do (runs of adjacent pages in a pool whose pages follow one another, as an allocator that
  // hands out free pages in order leaves them), the hardware prefetchers already stream the
  // rows as through a contiguous cache and the prefetches only got in their way: ab_decode.py
  // before after, pages of 16 in address order, % of a torch.sum timed alongside, GQA fp32 /
  // bf16 52 -> 62% / 51 -> 58% at about 80 GB/s; runs of 8 pages 53 -> 62% / 50 -> 56%.
  // (Comparing the two ends rather than each page: with runs of 8 one-row pages, 16 KiB, a
  // page-by-page test dropped the prefetches too early and lost 9%.)
  auto page_jumps = [&](int64_t key) {
    if (!pool_pages_follow || key < rows_ahead) return true;
    const int64_t back = key - rows_ahead, size = pages.page_size;
    return (page_table[key / size] - page_table[back / size]) * size + key % size - back % size != rows_ahead;
  };
  // Every line of the block's part of a cache row of t (row: its first kv head's part).
  auto prefetch_parts = [&](const TensorRef& t, bool together, const T* row) {
    if (together) {
      prefetch_row(reinterpret_cast<const char*>(row), row_bytes);
      return;
    }
    for (int64_t h = 0; h < kv_count; ++h) prefetch_row(row + h * t.head_stride, head_dim);
  };
  // The first line of each 4 KiB page that begins within a row's side-by-side parts, and with
  // first_page the row's own first line too: one line in every page the row touches.
  auto prefetch_page_lines = [&](const T* row_start, bool first_page) {
    const char* row = reinterpret_cast<const char*>(row_start);
    const int64_t into_page = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) & 4095);
    if (first_page) prefetch_line(row);
    const int64_t first = into_page == 0 && !first_page ? 0 : 4096 - into_page;  // the next page start
    for (int64_t offset = first; offset < row_bytes; offset += 4096) prefetch_line(row + offset);
  };
  KeyRange keys{params.seqlen_k, 0};  // the keys any lane sees (set with the lanes below)
  KeyRange every{0, params.seqlen_k};  // the keys every lane sees
  auto prefetch_ahead = [&](const T* const* rows, int64_t j) {
    const int64_t ahead = j + rows_ahead;
    const bool is_k = rows == k_row;
    if (is_k && k_rows_follow) {  // across key blocks too, within the sequence's rows
      if (j0 + ahead < keys.end) prefetch_row(rows[j] + rows_ahead * head_dim, head_dim);
    } else if (small_pages) {  // past the block's K rows come its V rows
      if (ahead < n) {
        if (page_jumps(j0 + ahead)) {
          prefetch_parts(is_k ? params.k : params.v, is_k ? k_side_by_side : v_side_by_side, rows[ahead]);
        }
      } else if (is_k && !stage_values && ahead - n < n && page_jumps(j0 + ahead - n)) {
        prefetch_parts(params.v, v_side_by_side, v_row[ahead - n]);
      }
    } else if (sizeof(T) >= 4 && ahead < n && (is_k ? k_side_by_side : v_side_by_side)) {
      prefetch_page_lines(rows[ahead], false);
    }
  };

  const Acc scale = static_cast<Acc>(params.scale);
  const bool score_mods = params.softcap > 0.0f || params.alibi_slopes != nullptr || params.mask.type != MaskType::kNone;
  auto note_lane_keys = [&](int64_t begin, int64_t end) {  // widens `keys`, narrows `every`
    keys.begin = begin < keys.begin ? begin : keys.begin;
    keys.end = end > keys.end ? end : keys.end;
    every.begin = begin > every.begin ? begin : every.begin;
    every.end = end < every.end ? end : every.end;
  };
  for (int64_t l = 0; l < lanes.lanes && resumed; ++l) note_lane_keys(s.key_begin[l], s.key_end[l]);
  for (int64_t l = 0; l < lanes.lanes && !resumed; ++l) {
    const int64_t head = lanes.head(block, l), row = lanes.row(block, l);
    const T* q = static_cast<const T*>(params.q.data) + block.batch * params.q.batch_stride +
                 head * params.q.head_stride + row * params.q.row_stride;
    Acc* q_row = s.q_rows + l * s.ldo;
    if (pair_dots) {
      std::memcpy(reinterpret_cast<T*>(s.q_rows) + l * s.ldo, q, head_dim * sizeof(T));
    } else if (split_dots) {
      if constexpr (kSplitDots) {  // (T is BFloat16; split_dots: head_dim a multiple of 32)
#if defined(__AVX512F__)
        for (int64_t d = 0; d < head_dim; d += 32) {
          __m512 even, odd;
          split_bf16(q + d, even, odd);
          _mm512_storeu_ps(q_row + d, _mm512_mul_ps(even, _mm512_set1_ps(scale)));
          _mm512_storeu_ps(q_row + d + 16, _mm512_mul_ps(odd, _mm512_set1_ps(scale)));
        }
#endif
      }
    } else {
      for (int64_t d = 0; d < s.ldo; ++d) q_row[d] = d < head_dim ? static_cast<Acc>(to_float(q[d])) * scale : Acc(0);
    }
    const KeyRange range = init_lane_state(params, block, lanes, s, l, l);
    note_lane_keys(range.begin, range.end);
    for (int64_t c = 0; c < s.ldo; ++c) s.o[l * s.ldo + c] = Acc(0);
  }
  for (int64_t l = lanes.lanes; l < s.ldq && !resumed; ++l) {  // padding lanes, which softmax_lanes reads
    s.row_max[l] = -std::numeric_limits<Acc>::infinity();
    s.row_sum[l] = Acc(0);
  }

  // Small pages: one line in each 4 KiB page of K and V row `key` (kTranslationAheadRows ahead of
  // the score pass), so the page-table walks of the jumps are done before the prefetches above
  // and the loads reach those rows.
  auto translate_ahead = [&](int64_t key) {
    if (key >= keys.end || !page_jumps(key)) return;
    for (const TensorRef* t : {&params.k, &params.v}) {
      const T* row = static_cast<const T*>(t->data) + kv_row_offset(params, *t, block.batch, kv_first, key);
      if (side_by_side(*t)) {
        prefetch_page_lines(row, true);
      } else {
        for (int64_t h = 0; h < kv_count; ++h) prefetch_line(reinterpret_cast<const char*>(row + h * t->head_stride));
      }
    }
  };

  // Key blocks: kBlockN-aligned from the first visible key, or a visit's keys cut at the same
  // multiples of kBlockN.
  const int64_t walk_begin = visit == nullptr ? keys.begin / kBlockN * kBlockN : std::max(keys.begin, visit->key_lo);
  const int64_t walk_end = visit == nullptr ? keys.end : std::min(keys.end, visit->key_hi);

  // One row at a time (the score pass's common case), the prefetches go with the scores instead
  // of prefetch_ahead's: just before a kv head's scores of row j, the K lines
  // kDecodeKeyAheadBytes further on in the cache's rows (where the block's kv heads lie side by
  // side, the rows read as one stream; else that head's part of row j + k_rows_ahead) and,
  // where V is staged, the head's part of V row j. On the Intel machine the hardware
  // prefetchers run little ahead of a kernel that computes between its loads
  // (benchmarks/cpu_rates.py), so memory and arithmetic took turns; fetches spread over the
  // arithmetic keep lines in flight all along. ab_decode.py, % of a torch.sum timed alongside,
  // before -> after (one row ahead): GQA bf16 54% -> 64%, fp32 71% -> 83%; paged (16) GQA bf16
  // 49% -> 58%, fp32 81% -> 95%. MHA, whose rows of 8-16 KiB put one row too far ahead, lost
  // with whole rows (fp32 90% -> 85%) and gains with the stream's bytes (see
  // kDecodeKeyAheadBytes).
  const int64_t row_elements = row_bytes / static_cast<int64_t>(sizeof(T));
  const int64_t k_rows_ahead = std::max<int64_t>(1, (kDecodeKeyAheadBytes + row_bytes - 1) / row_bytes);
  // Row jj (from the key block's start, jj >= 0) of the block's first kv head, past the key block
  // too: the sequence's next rows, or past a visit's keys the next visit's first rows (null past
  // them all). The fetches ask for it per kv head and row, so the rows of the key block are
  // inline and the next visit's first page is looked up once per visit (next_rows): out of line
  // with a page lookup and two divisions per call, this took 1.4% of a pool walk's samples
  // (perf_paged_decode.py, GQA bf16).
  const T* next_rows = nullptr;  // the next visit's first key row, and how many evenly strided rows from it
  int64_t next_strided_rows = 0, next_kv = 0;
  if (visit != nullptr && visit->next_params != nullptr) {
    const AttentionParams& next = *visit->next_params;
    const int64_t first = visit->next_key_lo;
    next_kv = kv_head_of(next, visit->next_block->head_begin);
    next_rows = static_cast<const T*>(next.k.data) + kv_row_offset(next, next.k, visit->next_block->batch, next_kv, first);
    const int64_t page = next.sequences.page_size;
    next_strided_rows = next.sequences.block_table == nullptr ? visit->next_key_hi - first
                                                               : std::min(visit->next_key_hi - first, page - first % page);
  }
  auto row_past_block = [&](int64_t key) -> const T* {
    if (key < walk_end) return static_cast<const T*>(params.k.data) + kv_row_offset(params, params.k, block.batch, kv_first, key);
    if (visit == nullptr || visit->next_params == nullptr) return nullptr;
    const AttentionParams& next = *visit->next_params;
    const int64_t into_next = key - walk_end;  // rows into the next visit's keys
    if (into_next < next_strided_rows) return next_rows + into_next * next.k.row_stride;
    const int64_t next_key = visit->next_key_lo + into_next;
    if (next_key >= visit->next_key_hi) return nullptr;
    return static_cast<const T*>(next.k.data) + kv_row_offset(next, next.k, visit->next_block->batch, next_kv, next_key);
  };
  auto key_row = [&](int64_t jj) __attribute__((always_inline)) -> const T* {
    return jj < n ? k_row[jj] : row_past_block(j0 + jj);
  };
  // kDecodeKeyAheadBytes as whole rows and elements into the next: from kv head 0's part of a row.
  constexpr int64_t kKeyAheadElements = kDecodeKeyAheadBytes / static_cast<int64_t>(sizeof(T));
  const int64_t ahead_rows = kKeyAheadElements / row_elements, ahead_within = kKeyAheadElements % row_elements;
  auto fetch_heads = [&](int64_t kv, int64_t count, int64_t j) __attribute__((always_inline)) {
    if (k_side_by_side) {  // the lines kKeyAheadElements past head kv's part of row j, within a row
      int64_t rows = ahead_rows, within = ahead_within + kv * head_dim;  // (kv * head_dim < row_elements)
      if (within >= row_elements) within -= row_elements, ++rows;
      const T* row = key_row(j + rows);
      if (row != nullptr) prefetch_row(row + within, std::min(count * head_dim, row_elements - within));
    } else if (const T* row = key_row(j + k_rows_ahead); row != nullptr) {
      for (int64_t h = kv; h < kv + count; ++h) prefetch_row(row + h * params.k.head_stride, head_dim);
    }
    for (int64_t h = kv; h < kv + count && stage_values; ++h) prefetch_row(v_row[j] + h * params.v.head_stride, head_dim);
  };

  for (j0 = walk_begin; j0 < walk_end; j0 += n) {
    n = std::min(walk_end - j0, kBlockN - j0 % kBlockN);
    if (params.mask.type != MaskType::kNone) {
      if (!load_mask_tile(params.mask, block.batch, block.head_begin, block.row_begin, lanes.rows, j0, n,
                          s.mask_tile, row_major)) {
        continue;
      }
      for (int64_t l = lanes.rows; l < lanes.lanes; ++l) {  // packed heads share the mask
        std::memcpy(s.mask_tile + l * ldn, s.mask_tile + (l % lanes.rows) * ldn, n * sizeof(Acc));
      }
    }
    block_rows(params.k, k_row);
    block_rows(params.v, v_row);
    // body(l, group) for the lane groups of kv head kv where it has more than two (kManyLaneGroups):
    // lanes from l, `group` of them (std::integral_constant), 4 at a time and the rest last.
    auto each_lane_group = [&](int64_t kv, auto&& body) __attribute__((always_inline)) {
      using std::integral_constant;
      const int64_t end = (kv + 1) * lanes_per_kv;
      int64_t l = kv * lanes_per_kv;
      for (; l + kDecodeLanes <= end; l += kDecodeLanes) body(l, integral_constant<int, 4>{});
      switch (end - l) {
        case 1: body(l, integral_constant<int, 1>{}); break;
        case 2: body(l, integral_constant<int, 2>{}); break;
        case 3: body(l, integral_constant<int, 3>{}); break;
        default: break;
      }
    };
    // Scores: one cache row at a time, all kv heads of a row before the next row (see the
    // header), four lanes per reduction: one lane group with 3-4 lanes, or 2 / 4 kv heads. Kv
    // heads with 5-8 lanes run as two lane groups (kFirst lanes, then kSecond), reading the
    // head's part of each row twice (the second time from L1). Where chunk_rows holds (the
    // block's q rows outgrow L1, or kv heads have two lane groups; see kDecodeScoreChunkRows in
    // tiles.h), rows go in chunks of score_rows, each lane group over the whole chunk before the
    // next, so q is read from L2 once per chunk instead of once per row. Kv heads of more lanes
    // (kManyLaneGroups) take the whole key block per lane group, bf16 with the group's q rows
    // held in registers (dot_rows_bf16). (always_inline, here and for P·V: with the many-group
    // case GCC called six of the lane-group cases out of line, and one token of paged GQA fp32
    // lost 5%, ab_decode.py --cases 8-float32-paged 36.7-37.1 -> 34.0-35.3 GB/s.)
    with_lane_groups(lanes_per_kv, [&](auto first, auto second) __attribute__((always_inline)) {
      constexpr int kFirst = decltype(first)::value, kSecond = decltype(second)::value;
      constexpr bool kMany = kSecond == kManyLaneGroups;  // groups walked by each_lane_group
      constexpr int kPerKv = kFirst + kSecond;            // lanes_per_kv (unless kMany)
      constexpr int kHeads = kSecond == 0 && kFirst < 3 ? 4 / kFirst : 1;
      // The lane groups of `heads` kv heads from kv head kv, `group` lanes each from lane l (one
      // group of each head), row j (always_inline: GCC called it out of line, which cost MHA
      // bf16 2-token decode 10%).
      auto score = [&](int64_t kv, int64_t l, auto heads, auto group, int64_t j) __attribute__((always_inline)) {
        constexpr int kCount = decltype(heads)::value, kLanes = decltype(group)::value;
        if constexpr (kPairDots) {
#if defined(__AVX512BF16__)
          if (pair_dots) {
            dot_heads_bf16<kCount, kLanes>(reinterpret_cast<const T*>(s.q_rows) + l * s.ldo, s.ldo,
                                           k_row[j] + kv * params.k.head_stride, params.k.head_stride, head_dim,
                                           s.s_t + l * ldn + j, ldn);
            return;
          }
#endif
        }
        if constexpr (kSplitDots) {
#if defined(__AVX512F__)
          if (split_dots) {
            dot_heads_split<kCount, kLanes>(s.q_rows + l * s.ldo, s.ldo, k_row[j] + kv * params.k.head_stride,
                                            params.k.head_stride, head_dim, s.s_t + l * ldn + j, ldn);
            return;
          }
#endif
        }
        int64_t stride = 0;
        const S* key = heads_of(params.k, k_row[j], kv, kCount, s.k_rows, &stride);
        dot_heads<Acc, S, kCount, kLanes>(s.q_rows + l * s.ldo, s.ldo, key, stride, s.s_t + l * ldn + j, ldn);
      };
      // body(kv, l, heads, group) for each of the block's lane groups in lane order: kHeads kv
      // heads of one group at a time, or each kv head's two (or more) groups in turn.
      auto each_group = [&](auto&& body) __attribute__((always_inline)) {
        using std::integral_constant;
        if constexpr (kMany) {
          for (int64_t kv = 0; kv < kv_count; ++kv) {
            each_lane_group(kv, [&](int64_t l, auto group) __attribute__((always_inline)) {
              body(kv, l, integral_constant<int, 1>{}, group);
            });
          }
        } else if constexpr (kSecond == 0) {
          int64_t kv = 0;
          for (; kv + kHeads <= kv_count; kv += kHeads) {
            body(kv, kv * kFirst, integral_constant<int, kHeads>{}, integral_constant<int, kFirst>{});
          }
          for (; kv < kv_count; ++kv) body(kv, kv * kFirst, integral_constant<int, 1>{}, integral_constant<int, kFirst>{});
        } else {
          for (int64_t kv = 0; kv < kv_count; ++kv) {
            body(kv, kv * kPerKv, integral_constant<int, 1>{}, integral_constant<int, kFirst>{});
            body(kv, kv * kPerKv + kFirst, integral_constant<int, 1>{}, integral_constant<int, kSecond>{});
          }
        }
      };
      auto fetch_ahead = [&](int64_t j) __attribute__((always_inline)) {
        if (small_pages) translate_ahead(j0 + j + kTranslationAheadRows);
        prefetch_ahead(k_row, j);
        if (stage_values) prefetch_parts(params.v, v_side_by_side, v_row[j]);
      };
      const int64_t chunk = kMany ? kBlockN : score_rows;  // (kMany: each lane group over the whole key block)
      if (chunk == 1) {  // the rows in address order (a loop of its own: as one with the
                         // chunks' below, MHA bf16 2-token decode lost 15%)
        for (int64_t j = 0; j < n; ++j) {
          if (small_pages) translate_ahead(j0 + j + kTranslationAheadRows);
#if defined(FUSEDATTN_AMX)
          if constexpr ((kPairDots || kSplitDots) && kSecond == 0 && kFirst <= 4) {
            if (amx_scores && j % kAmxTile == 0 && j + kAmxTile <= n && kv_rows_strided(params, j0 + j, kAmxTile)) {
              const Acc factor = split_dots ? scale : Acc(1);  // (split q rows are scaled, raw ones not)
              for (int64_t kv = 0; kv < kv_count; ++kv) {
                for (int64_t r = 0; r < kAmxTile && stage_values; ++r) {
                  prefetch_row(v_row[j + r] + kv * params.v.head_stride, head_dim);
                }
                float* scores = s.s_t + kv * kFirst * ldn + j;
                alignas(64) float c[kAmxTile * 4];
                const bool in_place = kFirst == 1 && !split_dots;
                amx_dot_rows(amx_q + kv * amx_q_per_kv, kFirst, k_row[j] + kv * params.k.head_stride,
                             params.k.row_stride * static_cast<int64_t>(sizeof(T)), head_dim, in_place ? scores : c);
                if (!in_place) lane_scores_from_tile<kFirst>(c, factor, scores, ldn);
              }
              j += kAmxTile - 1;
              continue;
            }
          }
#endif
          each_group([&](int64_t kv, int64_t l, auto heads, auto group) __attribute__((always_inline)) {
            if (l == kv * lanes_per_kv) fetch_heads(kv, decltype(heads)::value, j);
            score(kv, l, heads, group, j);
          });
        }
        return;
      }
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t c1 = c0 + chunk < n ? c0 + chunk : n;
        for (int64_t j = c0; j < c1; ++j) fetch_ahead(j);
        each_group([&](int64_t kv, int64_t l, auto heads, auto group) __attribute__((always_inline)) {
#if defined(__AVX512BF16__)
          if constexpr (kPairDots && kMany) {
            if (pair_dots && head_dim <= 128) {  // q in registers: up to 4 x head_dim / 32 vectors
              dot_rows_bf16<decltype(group)::value>(reinterpret_cast<const T*>(s.q_rows) + l * s.ldo, s.ldo,
                                                    k_row + c0, kv * params.k.head_stride, c1 - c0, head_dim,
                                                    s.s_t + l * ldn + c0, ldn);
              return;
            }
          }
#endif
          for (int64_t j = c0; j < c1; ++j) score(kv, l, heads, group, j);
        });
      }
    });
    const int64_t n_vectors = round_up(n, W);  // the block's scores as whole vectors (-inf padded)
    // Per lane: softcap, ALiBi, the mask, and -inf outside its keys; nothing to do where the
    // block is whole vectors of keys that every lane sees and no modifier applies. The bf16
    // products' scale is applied before those, else by the softmax as it reads the scores.
    const bool lanes_differ = score_mods || n != n_vectors || j0 < every.begin || j0 + n > every.end;
    if (pair_dots && lanes_differ) {
      for (int64_t l = 0; l < lanes.lanes; ++l) {
        Acc* row = s.s_t + l * ldn;
        for (int64_t j = 0; j < n_vectors; j += W) vec_store<Acc>(row + j, vec_load<Acc>(row + j) * scale);
      }
    }
    for (int64_t l = 0; l < lanes.lanes && lanes_differ; ++l) {
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
      const int64_t lo = s.key_begin[l] > j0 ? s.key_begin[l] - j0 : 0;
      const int64_t hi = s.key_end[l] - j0 < n ? s.key_end[l] - j0 : n;
      for (int64_t j = 0; j < lo && j < n_vectors; ++j) row[j] = minus_inf;
      for (int64_t j = hi > 0 ? hi : 0; j < n_vectors; ++j) row[j] = minus_inf;
    }
    softmax_lanes<Acc>(s.s_t, ldn, n_vectors, lanes.lanes, s.row_max, s.row_sum, s.o, s.ldo,
                       pair_dots && !lanes_differ ? scale : Acc(1));
    if (params.dropout_p > 0.0f) {  // (blocks with dropout hold one head: see plan_blocks)
      dropout_tile(params, block.batch, block.head_begin, block.row_begin, lanes.lanes, j0, n, s.drop_tile, row_major);
      for (int64_t l = 0; l < lanes.lanes; ++l) {
        for (int64_t j = 0; j < n; ++j) s.s_t[l * ldn + j] *= s.drop_tile[l * ldn + j];
      }
    }
    // O += P · V: the same walk over the V rows, kDecodeValueRows rows per step where they are
    // read in place (whichever pages they are on), so O is read and written once per step; bf16
    // pairs (accumulate_pairs_bf16) kDecodePairValueRows rows per step, an odd tail as a pair
    // whose second row is zero.
#if defined(__AVX512BF16__)
    if constexpr (kPairDots) {
      if (pair_dots) probability_pairs(s.s_t, ldn, n_vectors, lanes.lanes, s.p_pairs, ldn / 2);
    }
#endif
    with_lane_groups(lanes_per_kv, [&](auto first, auto second) __attribute__((always_inline)) {
      constexpr int kFirst = decltype(first)::value, kSecond = decltype(second)::value;
      constexpr bool kMany = kSecond == kManyLaneGroups;  // groups walked by each_lane_group
      constexpr int kPerKv = kFirst + kSecond;            // lanes_per_kv (unless kMany)
      constexpr int kRows = static_cast<int>(kDecodeValueRows);
      constexpr int kPairRows = static_cast<int>(kDecodePairValueRows);
      static_assert(kPairRows % 2 == 0, "whole pairs per step");
      const int64_t step_rows = pair_dots ? kPairRows : kRows, tail_rows = pair_dots ? 2 : 1;
      // The lane group of `group` lanes from lane l, on kv head kv: rows [j, j + step_rows)
      // (step), or the tail's rows from j.
      auto accumulate = [&](int64_t kv, int64_t l, auto group, int64_t j, bool step) __attribute__((always_inline)) {
        constexpr int kLanes = decltype(group)::value;
        Acc* o = s.o + l * s.ldo;
#if defined(__AVX512BF16__)
        if constexpr (kPairDots) {
          if (pair_dots) {
            const uint32_t* pp = s.p_pairs + l * (ldn / 2) + j / 2;
            const int64_t offset = kv * params.v.head_stride;
            if (step) {
              accumulate_pairs_bf16<kLanes, kPairRows / 2, false>(o, pp, ldn / 2, v_row + j, offset, s.ldo);
            } else if (j + 1 < n) {
              accumulate_pairs_bf16<kLanes, 1, false>(o, pp, ldn / 2, v_row + j, offset, s.ldo);
            } else {
              accumulate_pairs_bf16<kLanes, 1, true>(o, pp, ldn / 2, v_row + j, offset, s.ldo);
            }
            return;
          }
        }
#endif
        const Acc* p = s.s_t + l * ldn + j;
        if constexpr (kSplitDots) {
#if defined(__AVX512F__)
          if (split_dots) {
            const int64_t offset = kv * params.v.head_stride;
            if (step) {
              accumulate_rows_split<kLanes, kRows>(o, p, ldn, v_row + j, offset, s.ldo);
            } else {
              accumulate_rows_split<kLanes, 1>(o, p, ldn, v_row + j, offset, s.ldo);
            }
            return;
          }
#endif
        }
        if constexpr (kDirect) {  // (S is T)
          if (step) {
            accumulate_rows<Acc, S, kLanes, kRows>(o, p, ldn, v_row + j, kv * params.v.head_stride, s.ldo);
            return;
          }
        }
        const S* value = heads_of(params.v, v_row[j], kv, 1, s.v_rows);
        accumulate_rows<Acc, S, kLanes, 1>(o, p, ldn, &value, 0, s.ldo);
      };
      for (int64_t j = 0; j < n;) {
        const bool step = kDirect && j + step_rows <= n;
        const int64_t rows = std::min(step ? step_rows : tail_rows, n - j);
        if (!stage_values) {
          for (int64_t r = j; r < j + rows; ++r) prefetch_ahead(v_row, r);
        }
        for (int64_t kv = 0; kv < kv_count; ++kv) {
          if constexpr (kMany) {
            each_lane_group(kv, [&](int64_t l, auto group) __attribute__((always_inline)) {
              accumulate(kv, l, group, j, step);
            });
          } else {
            accumulate(kv, kv * kPerKv, first, j, step);
            if constexpr (kSecond > 0) accumulate(kv, kv * kPerKv + kFirst, second, j, step);
          }
        }
        j += rows;
      }
    });
  }
  if (visit == nullptr || visit->last) {
#if defined(__AVX512BF16__)
    if constexpr (kPairDots) {
      if (pair_dots) columns_in_order(s.o, s.ldo, lanes.lanes, pair_slot);
    }
#endif
#if defined(__AVX512F__)
    if constexpr (kSplitDots) {
      if (split_dots) columns_in_order(s.o, s.ldo, lanes.lanes, split_slot);
    }
#endif
    write_block_output<T>(params, block, lanes, s);
  }
}

template <typename T>
size_t decode_state_bytes_t(const AttentionParams& params, int64_t lanes) {
  using Acc = typename ComputeType<T>::type;
  const int64_t bytes = DecodeState<Acc>::elements(params.head_dim, lanes) * static_cast<int64_t>(sizeof(Acc));
  return static_cast<size_t>(round_up(bytes, 64));
}

// visit: null for the whole block, else one visit of a pool walk (DecodeVisit).
template <typename T>
void decode_block_t(const AttentionParams& params, const ForwardBlock& block, void* scratch,
                    const DecodeVisit* visit = nullptr) {
  using Acc = typename ComputeType<T>::type;
  constexpr int W = Vec<Acc>::kWidth;
  // Reading bf16/fp16 in place needs widening loads (kConvertLanes floats per vector).
  constexpr bool kWidens = std::is_same_v<T, Acc> || W == 1 || (std::is_same_v<Acc, float> && W == kConvertLanes);
  if (kWidens && params.head_dim % W == 0) {
    decode_block_impl<T, kWidens>(params, block, scratch, visit);
  } else {
    decode_block_impl<T, false>(params, block, scratch, visit);
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
