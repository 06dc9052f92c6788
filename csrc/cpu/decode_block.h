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

template <typename T>
inline T vec_max_lane(VecT<T> v) {
  return vec_reduce<T>(v, [](VecT<T> a, VecT<T> b) { return vec_max<T>(a, b); });
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
    VecT<Acc> out;
    if constexpr (std::is_same_v<S, BFloat16>) {
      ConvertU16 bits;
      std::memcpy(&bits, p, sizeof(bits));
      const ConvertU32 wide = __builtin_convertvector(bits, ConvertU32) << 16;
      std::memcpy(&out, &wide, sizeof(out));
    } else {
      ConvertHalves halves;
      std::memcpy(&halves, p, sizeof(halves));
      out = __builtin_convertvector(halves, ConvertFloats);
    }
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

// s[l * ld_s + t] = <q_l, k[t]> for LANES query lanes (rows of q, ld apart) and four key rows,
// over ld elements (a multiple of the vector width). Each K vector is loaded (and widened) once
// for all lanes.
template <typename Acc, typename S, int LANES>
inline void dot4(const Acc* q, const S* const* k, int64_t ld, Acc* s, int64_t ld_s) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  V acc[LANES][4];
  for (int l = 0; l < LANES; ++l) {
    for (int t = 0; t < 4; ++t) acc[l][t] = vec_set1<Acc>(Acc(0));
  }
  for (int64_t d = 0; d < ld; d += W) {
    const V k0 = load_widened<Acc>(k[0] + d), k1 = load_widened<Acc>(k[1] + d);
    const V k2 = load_widened<Acc>(k[2] + d), k3 = load_widened<Acc>(k[3] + d);
    for (int l = 0; l < LANES; ++l) {
      const V qv = vec_load<Acc>(q + l * ld + d);
      acc[l][0] = qv * k0 + acc[l][0];
      acc[l][1] = qv * k1 + acc[l][1];
      acc[l][2] = qv * k2 + acc[l][2];
      acc[l][3] = qv * k3 + acc[l][3];
    }
  }
  for (int l = 0; l < LANES; ++l) vec_sum4<Acc>(acc[l][0], acc[l][1], acc[l][2], acc[l][3], s + l * ld_s);
}

#if defined(__AVX512BF16__)
// dot4 for bf16 rows read as they are (head_dim a multiple of 32): one VDPBF16PS multiplies 16
// adjacent pairs of q and k, which is exactly the pair layout, so nothing is packed or widened.
// q: LANES rows of raw bf16 (ld_q elements apart); the sums are unscaled.
template <int LANES>
inline void dot4_bf16(const BFloat16* q, int64_t ld_q, const BFloat16* const* k, int64_t head_dim, float* s,
                      int64_t ld_s) {
  __m512 acc[LANES][4];
  for (int l = 0; l < LANES; ++l) {
    for (int t = 0; t < 4; ++t) acc[l][t] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < head_dim; d += 32) {
    __m512bh kv[4];
    for (int t = 0; t < 4; ++t) kv[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(k[t] + d));
    for (int l = 0; l < LANES; ++l) {
      const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + l * ld_q + d));
      for (int t = 0; t < 4; ++t) acc[l][t] = _mm512_dpbf16_ps(acc[l][t], qv, kv[t]);
    }
  }
  for (int l = 0; l < LANES; ++l) vec_sum4<float>(acc[l][0], acc[l][1], acc[l][2], acc[l][3], s + l * ld_s);
}
#endif

// o_l[0, ld) += Σ_t p_l[t] · v[t][0, ld) for LANES lanes (o rows ld apart, p rows ld_p apart)
// and four value rows; each V vector is loaded (and widened) once for all lanes.
template <typename Acc, typename S, int LANES>
inline void accumulate4(Acc* o, const Acc* p, int64_t ld_p, const S* const* v, int64_t ld) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  V prob[LANES][4];
  for (int l = 0; l < LANES; ++l) {
    for (int t = 0; t < 4; ++t) prob[l][t] = vec_set1<Acc>(p[l * ld_p + t]);
  }
  for (int64_t c = 0; c < ld; c += W) {
    const V v0 = load_widened<Acc>(v[0] + c), v1 = load_widened<Acc>(v[1] + c);
    const V v2 = load_widened<Acc>(v[2] + c), v3 = load_widened<Acc>(v[3] + c);
    for (int l = 0; l < LANES; ++l) {
      V acc = vec_load<Acc>(o + l * ld + c);
      acc = prob[l][0] * v0 + acc;
      acc = prob[l][1] * v1 + acc;
      acc = prob[l][2] * v2 + acc;
      acc = prob[l][3] * v3 + acc;
      vec_store<Acc>(o + l * ld + c, acc);
    }
  }
}

// Calls f(std::integral_constant<int, lanes>{}) for lanes in [1, kDecodeLanes].
template <typename F>
inline void with_lane_count(int64_t lanes, F&& f) {
  static_assert(kDecodeLanes == 4, "one case per lane count");
  switch (lanes) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// The decode kernel. A block's lanes (query rows x heads) may span several kv heads: decode
// blocks hold all heads of a token (see plan_blocks), so each cache row, which stores the kv
// heads side by side, is read front to back once: the hardware prefetchers see one sequential
// stream instead of one 512-byte piece per row and head (bench_decode.py, fp32 MHA: 26 -> 58 GB/s).
// Lanes of kv head g are [g * lanes_per_kv, (g + 1) * lanes_per_kv).
// kDirect: K/V rows are read in place (a whole number of vectors wide), else each row is first
// converted and zero-padded into scratch.
template <typename T, bool kDirect>
void decode_block_impl(const AttentionParams& params, const ForwardBlock& block, void* scratch) {
  using Acc = typename ComputeType<T>::type;
  using V = VecT<Acc>;
  using S = std::conditional_t<kDirect, T, Acc>;  // what the dot products read
  constexpr int W = Vec<Acc>::kWidth;
  constexpr int64_t kRowStep = kDecodeRowStep;
  static_assert(kRowStep == 4, "dot4 / accumulate4 take four cache rows");
  const int64_t head_dim = params.head_dim;
  const BlockLanes lanes{block.row_end - block.row_begin, (block.row_end - block.row_begin) * block.head_count};
  const ForwardScratch<Acc> s = ForwardScratch<Acc>::carve(scratch, head_dim, lanes.lanes);
  const int64_t kv_first = kv_head_of(params, block.head_begin);
  const int64_t lanes_per_kv = lanes_per_kv_head(params, block);
  const int64_t kv_count = lanes.lanes / lanes_per_kv;
  const int64_t ldn = kBlockN;  // scores: [lanes x kBlockN] row-major in s.s_t
  const Orientation row_major{ldn, 1};
  int64_t j0 = 0, n = 0;  // the current key block
  // bf16 K rows in place on VDPBF16PS: q kept as raw bf16 rows, the scale applied to the sums.
  constexpr bool kPairDots = kBf16Pairs<T> && kDirect;
  const bool pair_dots = kPairDots && head_dim % 32 == 0;

  // Row j of the block's first kv head (kv head g is g head strides further: one page lookup
  // per cache row, not one per row and head), and the rows kPrefetchRows ahead.
  auto first_head_row = [&](const TensorRef& t, int64_t j) {
    return static_cast<const T*>(t.data) + kv_row_offset(params, t, block.batch, kv_first, j0 + j);
  };
  auto row_of = [&](const TensorRef& t, const T* first_head, int64_t g, Acc* buffer) -> const S* {
    const T* row = first_head + g * t.head_stride;
    if constexpr (kDirect) {
      return row;
    } else {
      convert_rows(row, 0, 1, head_dim, buffer, s.ldo);
      return buffer;
    }
  };
  auto prefetch_ahead = [&](const TensorRef& t, int64_t j) {
    if (j + kPrefetchRows < n) {
      const T* ahead = first_head_row(t, j + kPrefetchRows);
      for (int64_t g = 0; g < kv_count; ++g) prefetch_row(ahead + g * t.head_stride, head_dim);
    }
  };
  // Walks the key block kRowStep cache rows at a time (a tail repeats its last row), and each
  // kv head of those rows: visit(j, g, rows), rows[r] = row j + r of kv head g.
  auto for_each_row_group = [&](const TensorRef& t, Acc* buffer, auto&& visit) {
    for (int64_t j = 0; j < n; j += kRowStep) {
      const T* first[kRowStep];
      for (int64_t r = 0; r < kRowStep; ++r) {
        prefetch_ahead(t, j + r);
        first[r] = first_head_row(t, j + r < n ? j + r : n - 1);
      }
      for (int64_t g = 0; g < kv_count; ++g) {
        const S* rows[kRowStep];
        for (int64_t r = 0; r < kRowStep; ++r) rows[r] = row_of(t, first[r], g, buffer + r * s.ldo);
        visit(j, g, rows);
      }
    }
  };

  const Acc scale = static_cast<Acc>(params.scale);
  KeyRange keys{params.seqlen_k, 0};
  for (int64_t l = 0; l < lanes.lanes; ++l) {
    const int64_t head = lanes.head(block, l), row = lanes.row(block, l);
    const T* q = static_cast<const T*>(params.q.data) + block.batch * params.q.batch_stride +
                 head * params.q.head_stride + row * params.q.row_stride;
    Acc* q_row = s.q_rows + l * s.ldo;
    if (pair_dots) {
      std::memcpy(reinterpret_cast<T*>(s.q_rows) + l * s.ldo, q, head_dim * sizeof(T));
    } else {
      for (int64_t d = 0; d < s.ldo; ++d) q_row[d] = d < head_dim ? static_cast<Acc>(to_float(q[d])) * scale : Acc(0);
    }
    const KeyRange range = init_lane_state(params, block, lanes, s, l, l);
    keys.begin = range.begin < keys.begin ? range.begin : keys.begin;
    keys.end = range.end > keys.end ? range.end : keys.end;
    for (int64_t c = 0; c < s.ldo; ++c) s.o[l * s.ldo + c] = Acc(0);
  }

  bool any_key = false;
  for (j0 = keys.begin / kBlockN * kBlockN; j0 < keys.end; j0 += kBlockN) {
    n = (keys.end - j0 < kBlockN) ? keys.end - j0 : kBlockN;
    if (params.mask.type != MaskType::kNone) {
      if (!load_mask_tile(params.mask, block.batch, block.head_begin, block.row_begin, lanes.rows, j0, n,
                          s.mask_tile, row_major)) {
        continue;
      }
      for (int64_t l = lanes.rows; l < lanes.lanes; ++l) {  // packed heads share the mask
        std::memcpy(s.mask_tile + l * ldn, s.mask_tile + (l % lanes.rows) * ldn, n * sizeof(Acc));
      }
    }
    // Scores: each cache row once, all its kv heads, every lane of each (the scores of a
    // repeated tail row fall outside [0, n) and are masked below).
    for_each_row_group(params.k, s.k_rows, [&](int64_t j, int64_t g, const S* const* k_rows) {
      const int64_t l = g * lanes_per_kv;
      with_lane_count(lanes_per_kv, [&](auto count) {
        if constexpr (kPairDots) {
#if defined(__AVX512BF16__)
          if (pair_dots) {
            dot4_bf16<decltype(count)::value>(reinterpret_cast<const T*>(s.q_rows) + l * s.ldo, s.ldo, k_rows,
                                              head_dim, s.s_t + l * ldn + j, ldn);
            return;
          }
#endif
        }
        dot4<Acc, S, decltype(count)::value>(s.q_rows + l * s.ldo, k_rows, s.ldo, s.s_t + l * ldn + j, ldn);
      });
    });
    if (pair_dots) {
      for (int64_t l = 0; l < lanes.lanes; ++l) {
        Acc* row = s.s_t + l * ldn;
        for (int64_t j = 0; j < ldn; j += W) vec_store<Acc>(row + j, vec_load<Acc>(row + j) * scale);
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
      const int64_t lo = s.key_begin[l] > j0 ? s.key_begin[l] - j0 : 0;
      const int64_t hi = s.key_end[l] - j0 < n ? s.key_end[l] - j0 : n;
      for (int64_t j = 0; j < lo && j < ldn; ++j) row[j] = minus_inf;
      for (int64_t j = hi > 0 ? hi : 0; j < ldn; ++j) row[j] = minus_inf;
      // Online softmax of this lane over the block, a vector of keys at a time.
      V max_vec = vec_set1<Acc>(s.row_max[l]);
      for (int64_t j = 0; j < ldn; j += W) max_vec = vec_max<Acc>(max_vec, vec_load<Acc>(row + j));
      const Acc new_max = vec_max_lane<Acc>(max_vec);
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
    if (params.dropout_p > 0.0f) {  // (blocks with dropout hold one head: see plan_blocks)
      dropout_tile(params, block.batch, block.head_begin, block.row_begin, lanes.lanes, j0, n, s.drop_tile, row_major);
      for (int64_t l = 0; l < lanes.lanes; ++l) {
        for (int64_t j = 0; j < n; ++j) s.s_t[l * ldn + j] *= s.drop_tile[l * ldn + j];
      }
    }
    // O += P · V, the same walk over the V rows (the probabilities past n are 0).
    for_each_row_group(params.v, s.v_rows, [&](int64_t j, int64_t g, const S* const* v_rows) {
      const int64_t l = g * lanes_per_kv;
      with_lane_count(lanes_per_kv, [&](auto count) {
        accumulate4<Acc, S, decltype(count)::value>(s.o + l * s.ldo, s.s_t + l * ldn + j, ldn, v_rows, s.ldo);
      });
    });
    any_key = true;
  }
  write_block_output<T>(params, block, lanes, s, !any_key);
}

template <typename T>
void decode_block_t(const AttentionParams& params, const ForwardBlock& block, void* scratch) {
  using Acc = typename ComputeType<T>::type;
  constexpr int W = Vec<Acc>::kWidth;
  // Reading bf16/fp16 in place needs widening loads (kConvertLanes floats per vector).
  constexpr bool kWidens = std::is_same_v<T, Acc> || W == 1 || (std::is_same_v<Acc, float> && W == kConvertLanes);
  if (kWidens && params.head_dim % W == 0) {
    decode_block_impl<T, kWidens>(params, block, scratch);
  } else {
    decode_block_impl<T, false>(params, block, scratch);
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
