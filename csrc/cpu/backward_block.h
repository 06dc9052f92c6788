// The CPU backward for one key block of one (batch, kv-head), on one thread (FlashAttention-2):
// for every query head of the GQA group and every q-block that sees these keys,
//   S  = Q·Kᵀ            [m x n]   (A = Q rows in place,  B = Kᵀ packed once per task)
//   P  = exp(scale·S - LSE), 0 where masked
//   dV += Pᵀ·dO          [n x d]   (A = Pᵀ read column-wise)
//   dP = dO·Vᵀ           [m x n]   (B = Vᵀ packed once per task)
//   dS = P∘(dP - Dsum)             Dsum = rowsum(dO∘O), precomputed per query row
//   dK += dSᵀ·Q          [n x d]
//   dQ += dS·K           [m x d]   into this thread's private fp32 partial (summed later in
//                                  a fixed order, so the result is deterministic)
// dK (times scale) and dV are written at the end; they sum over the group without K/V copies.
// bf16 on the avx512bf16 ISA runs all five products on VDPBF16PS (bf16 pairs, fp32 sums): the
// operands read along head_dim (Q, dO rows) in place, the others packed into pairs (Kᵀ, Vᵀ
// and K per task; P, dS (rounded to bf16, as FlashAttention does), Q and dO along the query
// rows per q-block). Scores, softmax, dS and the accumulators stay fp32.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "common/params.h"
#include "common/variant.h"
#include "cpu/amx_gemm.h"
#include "cpu/bf16_pairs.h"
#include "cpu/convert.h"
#include "cpu/forward_block.h"
#include "cpu/gemm_tile.h"
#include "cpu/score_mods.h"
#include "cpu/tiles.h"
#include "cpu/vec.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

template <typename Acc>
struct BackwardScratch {
  int64_t ldn;  // columns of Kᵀ, Vᵀ, P, dS (keys, padded)
  int64_t ldo;  // columns of row buffers (head_dim, padded)
  Acc* k_t;      // [head_dim x ldn]
  Acc* v_t;      // [head_dim x ldn]
  Acc* k_rows;   // [kBwdBlockN x ldo]
  Acc* dk;       // [kBwdBlockN x ldo]
  Acc* dv;       // [kBwdBlockN x ldo]
  Acc* q_rows;   // [kBwdBlockM x ldo] converted Q (when Q cannot be read in place)
  Acc* do_rows;  // [kBwdBlockM x ldo] converted dO
  Acc* p;        // [kBwdBlockM x ldn]
  Acc* ds;       // [kBwdBlockM x ldn]
  Acc* p_drop;   // [kBwdBlockM x ldn] P with dropout applied (the weights that multiplied V)
  Acc* drop;     // [kBwdBlockM x ldn] dropout factors
  Acc* cap_t;    // [kBwdBlockM x ldn] tanh(s / softcap), for the softcap chain rule
  Acc* mask;     // [kBwdBlockM x ldn] attn_mask values
  // bf16 pairs (the avx512bf16 path), in uint32 elements:
  uint32_t* p_t;       // [kBwdBlockM / 2 x ldn]  P (with dropout) paired along the query rows
  uint32_t* ds_t;      // [kBwdBlockM / 2 x ldn]  dS paired along the query rows
  uint32_t* ds_rows;   // [kBwdBlockM x ldn / 2]  dS paired along the keys (bf16 rows)
  uint32_t* q_pairs;   // [kBwdBlockM / 2 x ldo]  Q paired along the query rows
  uint32_t* do_pairs;  // [kBwdBlockM / 2 x ldo]  dO paired along the query rows
  uint32_t* pairs_t;   // [ldn x kBwdBlockM / 2]  p_t or ds_t transposed (the avx512amx path)

  static int64_t elements(int64_t head_dim) {
    constexpr int W = Vec<Acc>::kWidth;
    const int64_t ldn = round_up(kBwdBlockN, W);
    const int64_t ldo = round_up(head_dim, W);
    return 2 * head_dim * ldn + 3 * kBwdBlockN * ldo + 2 * kBwdBlockM * ldo + 6 * kBwdBlockM * ldn +
           kBwdBlockM / 2 * (4 * ldn + 2 * ldo);
  }

  static BackwardScratch carve(void* base, int64_t head_dim) {
    constexpr int W = Vec<Acc>::kWidth;
    BackwardScratch s;
    s.ldn = round_up(kBwdBlockN, W);
    s.ldo = round_up(head_dim, W);
    Acc* p = static_cast<Acc*>(base);
    s.k_t = p;     p += head_dim * s.ldn;
    s.v_t = p;     p += head_dim * s.ldn;
    s.k_rows = p;  p += kBwdBlockN * s.ldo;
    s.dk = p;      p += kBwdBlockN * s.ldo;
    s.dv = p;      p += kBwdBlockN * s.ldo;
    s.q_rows = p;  p += kBwdBlockM * s.ldo;
    s.do_rows = p; p += kBwdBlockM * s.ldo;
    s.p = p;       p += kBwdBlockM * s.ldn;
    s.ds = p;      p += kBwdBlockM * s.ldn;
    s.p_drop = p;  p += kBwdBlockM * s.ldn;
    s.drop = p;    p += kBwdBlockM * s.ldn;
    s.cap_t = p;   p += kBwdBlockM * s.ldn;
    s.mask = p;    p += kBwdBlockM * s.ldn;
    uint32_t* pairs = reinterpret_cast<uint32_t*>(p);
    s.p_t = pairs;      pairs += kBwdBlockM / 2 * s.ldn;
    s.ds_t = pairs;     pairs += kBwdBlockM / 2 * s.ldn;
    s.ds_rows = pairs;  pairs += kBwdBlockM / 2 * s.ldn;
    s.q_pairs = pairs;  pairs += kBwdBlockM / 2 * s.ldo;
    s.do_pairs = pairs; pairs += kBwdBlockM / 2 * s.ldo;
    s.pairs_t = pairs;
    return s;
  }
};

template <typename T>
inline size_t backward_scratch_bytes_t(const AttentionParams& params) {
  using Acc = typename ComputeType<T>::type;
  return static_cast<size_t>(BackwardScratch<Acc>::elements(params.head_dim)) * sizeof(Acc);
}

template <typename T>
inline int64_t row_pitch_t(const AttentionParams& params) {
  using Acc = typename ComputeType<T>::type;
  return round_up(params.head_dim, Vec<Acc>::kWidth);
}

// dsum[i] = sum_d dO[i][d]·O[i][d] - dlse[i] for the rows of one (batch, head); dsum is Acc[seqlen_q].
template <typename T>
void backward_dsum_t(const BackwardParams& bp, int64_t batch, int64_t head, void* dsum) {
  using Acc = typename ComputeType<T>::type;
  const AttentionParams& p = bp.forward;
  const T* out = static_cast<const T*>(p.out.data) + batch * p.out.batch_stride + head * p.out.head_stride;
  const T* dout = static_cast<const T*>(bp.dout.data) + batch * bp.dout.batch_stride + head * bp.dout.head_stride;
  Acc* result = static_cast<Acc*>(dsum);
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    const T* o_row = out + i * p.out.row_stride;
    const T* do_row = dout + i * bp.dout.row_stride;
    Acc sum = 0;
    for (int64_t d = 0; d < p.head_dim; ++d) {
      sum += static_cast<Acc>(to_float(o_row[d])) * static_cast<Acc>(to_float(do_row[d]));
    }
    const int64_t lse_index = batch * p.lse_batch_stride + head * p.lse_head_stride + i;  // dlse shares lse's layout
    if (bp.dlse_f64 != nullptr) sum -= static_cast<Acc>(bp.dlse_f64[lse_index]);
    else if (bp.dlse != nullptr) sum -= static_cast<Acc>(bp.dlse[lse_index]);
    result[i] = sum;
  }
}

// Rows [i0, i0 + m) of a (batch, head) matrix as an A/B operand: in place when the element type
// is the compute type and rows are a whole number of vectors, else converted into `buffer`.
template <typename T, typename Acc>
inline const Acc* operand_rows(const T* rows, int64_t row_stride, int64_t m, int64_t head_dim, Acc* buffer,
                               int64_t ldo, int64_t* stride) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (head_dim % Vec<Acc>::kWidth == 0) {
      *stride = row_stride;
      return rows;
    }
  }
  convert_rows(rows, row_stride, m, head_dim, buffer, ldo);
  *stride = ldo;
  return buffer;
}

// Recomputes the forward's weights of the m x n tile from S = Q·Kᵀ (in s.p):
// scale → softcap → ALiBi → + attn_mask → P = exp(s - lse) on visible keys, else 0 (rows with
// LSE -inf are all 0). The attn_mask tile is already in s.mask. Leaves tanh(s / softcap) in
// s.cap_t for the chain rule.
template <typename Acc>
inline void probabilities_from_lse(const AttentionParams& params, const BackwardScratch<Acc>& s, int64_t batch,
                                   int64_t head, int64_t i0, int64_t m, int64_t j0, int64_t n, int64_t lse_base) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  const V scale = vec_set1<Acc>(static_cast<Acc>(params.scale));
  for (int64_t e = 0; e < m * s.ldn; e += W) vec_store<Acc>(s.p + e, vec_load<Acc>(s.p + e) * scale);
  if (params.softcap > 0.0f) apply_softcap<Acc>(s.p, m * s.ldn, params.softcap, s.cap_t);
  V key_offsets;  // j0 + lane, for ALiBi
  for (int lane = 0; lane < W; ++lane) {
    if constexpr (W == 1) key_offsets = static_cast<Acc>(j0);
    else key_offsets[lane] = static_cast<Acc>(j0 + lane);
  }
  const Acc slope = static_cast<Acc>(alibi_slope(params, batch, head));
  for (int64_t r = 0; r < m; ++r) {
    Acc* row = s.p + r * s.ldn;
    const Acc row_lse = static_cast<Acc>(load_lse(params, lse_base + i0 + r));
    const KeyRange keys = visible_keys(params, i0 + r);
    int64_t lo = keys.begin - j0, hi = keys.end - j0;
    lo = lo < 0 ? 0 : (lo > n ? n : lo);
    hi = hi < lo ? lo : (hi > n ? n : hi);
    if (row_lse == -std::numeric_limits<Acc>::infinity()) lo = hi = 0;
    const V shift = vec_set1<Acc>(row_lse);
    const V position = vec_set1<Acc>(static_cast<Acc>(query_position(params, i0 + r)));
    for (int64_t c = 0; c < s.ldn; c += W) {
      V score = vec_load<Acc>(row + c);
      if (params.alibi_slopes != nullptr) score = alibi_score(score, slope, position, key_offsets + static_cast<Acc>(c));
      if (params.mask.type != MaskType::kNone) score += vec_load<Acc>(s.mask + r * s.ldn + c);
      vec_store<Acc>(row + c, exp_vec<Acc>(score - shift));
    }
    for (int64_t c = 0; c < lo; ++c) row[c] = Acc(0);
    for (int64_t c = hi; c < s.ldn; ++c) row[c] = Acc(0);
  }
}

// dS = P ∘ (dP - dsum[row]), in place in s.ds.
template <typename Acc>
inline void softmax_gradient(const BackwardScratch<Acc>& s, int64_t m, const Acc* dsum) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  for (int64_t r = 0; r < m; ++r) {
    const V row_dsum = vec_set1<Acc>(dsum[r]);
    Acc* ds = s.ds + r * s.ldn;
    const Acc* p = s.p + r * s.ldn;
    for (int64_t c = 0; c < s.ldn; c += W) {
      vec_store<Acc>(ds + c, vec_load<Acc>(p + c) * (vec_load<Acc>(ds + c) - row_dsum));
    }
  }
}

// One task: keys [key_begin, key_begin + kBwdBlockN) of (batch, kv_head).
// dq_partial: Acc[group][seqlen_q][ldo], this thread's accumulator for the group's query heads.
// dsum: Acc[num_heads][seqlen_q], the Dsum rows of this batch entry.
template <typename T>
void backward_kv_block_t(const BackwardParams& bp, int64_t batch, int64_t kv_head, int64_t key_begin,
                         void* dq_partial, const void* dsum, void* scratch) {
  using Acc = typename ComputeType<T>::type;
  const AttentionParams& p = bp.forward;
  const int64_t head_dim = p.head_dim;
  const int64_t group = p.num_heads / p.num_heads_kv;
  const int64_t j0 = key_begin;
  const int64_t n = p.seqlen_k - j0 < kBwdBlockN ? p.seqlen_k - j0 : kBwdBlockN;
  const BackwardScratch<Acc> s = BackwardScratch<Acc>::carve(scratch, head_dim);

  const T* k = static_cast<const T*>(p.k.data) + batch * p.k.batch_stride + kv_head * p.k.head_stride +
               j0 * p.k.row_stride;
  const T* v = static_cast<const T*>(p.v.data) + batch * p.v.batch_stride + kv_head * p.v.head_stride +
               j0 * p.v.row_stride;
#if defined(__AVX512BF16__)
  // Kᵀ and Vᵀ paired along head_dim, K paired along the keys.
  uint32_t* const k_t_pairs = reinterpret_cast<uint32_t*>(s.k_t);   // [(head_dim + 1) / 2 x ldn]
  uint32_t* const v_t_pairs = reinterpret_cast<uint32_t*>(s.v_t);   // [(head_dim + 1) / 2 x ldn]
  uint32_t* const k_pairs = reinterpret_cast<uint32_t*>(s.k_rows);  // [(n + 1) / 2 x ldo]
  if constexpr (kBf16Pairs<T>) {
    pack_transposed_pairs([&](int64_t j) { return k + j * p.k.row_stride; }, n, head_dim, k_t_pairs, s.ldn);
    pack_transposed_pairs([&](int64_t j) { return v + j * p.v.row_stride; }, n, head_dim, v_t_pairs, s.ldn);
    pack_row_pairs(k, p.k.row_stride, n, head_dim, k_pairs, s.ldo);
  }
#endif
#if defined(FUSEDATTN_AMX)
  // The avx512amx ISA: the five products on AMX tiles where head_dim is a multiple of 16 (the
  // last q-block's rows past a multiple of 16 on VDPBF16PS). Reductions over keys run over all
  // ldn / 2 key pairs, so K's pairs past the block are zero; reductions over head_dim over
  // amx_pairs pairs, so Kᵀ's and Vᵀ's pair rows past head_dim / 2 are zero, and Q's and dO's rows
  // are copied into rows of amx_pairs pairs where that is more (see the q-block loop).
  const bool amx = kBf16Pairs<T> && amx_takes_head_dim(head_dim);
  const int64_t amx_pairs = amx_head_dim_pairs(head_dim);
  std::optional<AmxTileScope> amx_scope;
  if (amx) {
    amx_scope.emplace();
    zero_pair_rows(k_pairs, (n + 1) / 2, s.ldn / 2, s.ldo, s.ldo);
    zero_pair_rows(k_t_pairs, head_dim / 2, amx_pairs, s.ldn, s.ldn);
    zero_pair_rows(v_t_pairs, head_dim / 2, amx_pairs, s.ldn, s.ldn);
  }
  // Rows [0, m) of q-block rows `rows` (bf16, row_stride apart, head_dim even) as rows of
  // amx_pairs pairs, zero past head_dim / 2, into buffer (the tiles read whole tiles of pairs).
  auto padded_pairs = [&](const auto* rows, int64_t row_stride, int64_t m, uint32_t* buffer) {
    for (int64_t r = 0; r < m; ++r) copy_padded_pair_row(rows + r * row_stride, head_dim / 2, amx_pairs, buffer + r * amx_pairs);
    return static_cast<const uint32_t*>(buffer);
  };
  // C[rows x cols] (+)= A · B for A's whole 16-row tiles (A's rows a_stride apart, B's b_stride);
  // returns the rows done, the rest being the caller's (VDPBF16PS).
  auto tiled_rows = [&](int64_t rows, int64_t cols, int64_t pairs, const uint32_t* a, int64_t a_stride,
                        const uint32_t* b, int64_t b_stride, float* c, int64_t ldc, bool accumulate) -> int64_t {
    const int64_t whole = amx ? rows / kAmxTile * kAmxTile : 0;
    if (whole > 0) amx_gemm_pairs(whole, cols, pairs, a, a_stride, b, b_stride, c, ldc, accumulate);
    return whole;
  };
  // C[ldn x head_dim] += Aᵀ · B for A = pairs of query rows [query_pairs x ldn] (p_t or ds_t) and
  // B = q_pairs or do_pairs [query_pairs x ldo], both zero past the q-block's (m + 1) / 2 pairs.
  auto keys_times = [&](int64_t m, uint32_t* a, uint32_t* b, float* c) {
    const int64_t used = (m + 1) / 2, query_pairs = round_up(used, kAmxTile);
    zero_pair_rows(a, used, query_pairs, s.ldn, s.ldn);
    zero_pair_rows(b, used, query_pairs, s.ldo, s.ldo);
    transpose_u32(a, s.ldn, query_pairs, s.ldn, s.pairs_t, kBwdBlockM / 2);
    amx_gemm_pairs(s.ldn, head_dim, query_pairs, s.pairs_t, kBwdBlockM / 2, b, s.ldo, c, s.ldo, true);
  };
#endif
  if constexpr (!kBf16Pairs<T>) {
    convert_rows(k, p.k.row_stride, n, head_dim, s.k_rows, s.ldo);
    for (int64_t j = n; j < kBwdBlockN; ++j) {
      for (int64_t d = 0; d < s.ldo; ++d) s.k_rows[j * s.ldo + d] = Acc(0);
    }
    for (int64_t d = 0; d < head_dim; ++d) {
      for (int64_t j = 0; j < s.ldn; ++j) {
        s.k_t[d * s.ldn + j] = j < n ? static_cast<Acc>(to_float(k[j * p.k.row_stride + d])) : Acc(0);
        s.v_t[d * s.ldn + j] = j < n ? static_cast<Acc>(to_float(v[j * p.v.row_stride + d])) : Acc(0);
      }
    }
  }
  for (int64_t e = 0; e < kBwdBlockN * s.ldo; ++e) s.dk[e] = s.dv[e] = Acc(0);

  const RowRange rows = visible_rows_of_keys(p, j0, j0 + n);
  const bool dropout = p.dropout_p > 0.0f;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t head = kv_head * group + g;
    const T* q = static_cast<const T*>(p.q.data) + batch * p.q.batch_stride + head * p.q.head_stride;
    const T* dout = static_cast<const T*>(bp.dout.data) + batch * bp.dout.batch_stride + head * bp.dout.head_stride;
    const int64_t lse_base = batch * p.lse_batch_stride + head * p.lse_head_stride;
    const Acc* head_dsum = static_cast<const Acc*>(dsum) + head * p.seqlen_q;
    Acc* dq = static_cast<Acc*>(dq_partial) + g * p.seqlen_q * s.ldo;
    for (int64_t i0 = rows.begin; i0 < rows.end; i0 += kBwdBlockM) {
      const int64_t m = rows.end - i0 < kBwdBlockM ? rows.end - i0 : kBwdBlockM;
      if (p.mask.type != MaskType::kNone &&
          !load_mask_tile(p.mask, batch, head, i0, m, j0, n, s.mask, Orientation{s.ldn, 1})) {
        continue;  // a bool mask hides the whole tile: no gradient flows through it
      }
      int64_t q_stride = 0, do_stride = 0;
      const Acc* q_blk = nullptr;
      const Acc* do_blk = nullptr;
#if defined(__AVX512BF16__)
      const uint32_t* q_row_pairs = nullptr;   // Q rows paired along head_dim
      const uint32_t* do_row_pairs = nullptr;  // dO rows paired along head_dim
#endif
      if constexpr (kBf16Pairs<T>) {
#if defined(__AVX512BF16__)
        q_row_pairs = rows_as_pairs(q + i0 * p.q.row_stride, p.q.row_stride, m, head_dim,
                                    reinterpret_cast<uint32_t*>(s.q_rows), &q_stride);
        do_row_pairs = rows_as_pairs(dout + i0 * bp.dout.row_stride, bp.dout.row_stride, m, head_dim,
                                     reinterpret_cast<uint32_t*>(s.do_rows), &do_stride);
        pack_row_pairs(q + i0 * p.q.row_stride, p.q.row_stride, m, head_dim, s.q_pairs, s.ldo);
        pack_row_pairs(dout + i0 * bp.dout.row_stride, bp.dout.row_stride, m, head_dim, s.do_pairs, s.ldo);
        int64_t tiled = 0;  // rows of S the AMX tiles make
#if defined(FUSEDATTN_AMX)
        if (amx && amx_pairs != head_dim / 2) {  // (the VDPBF16PS rows read the same copies)
          q_row_pairs = padded_pairs(q + i0 * p.q.row_stride, p.q.row_stride, m, reinterpret_cast<uint32_t*>(s.q_rows));
          do_row_pairs = padded_pairs(dout + i0 * bp.dout.row_stride, bp.dout.row_stride, m,
                                      reinterpret_cast<uint32_t*>(s.do_rows));
          q_stride = do_stride = amx_pairs;
        }
        tiled = tiled_rows(m, s.ldn, amx_pairs, q_row_pairs, q_stride, k_t_pairs, s.ldn, s.p, s.ldn, false);
#endif
        if (tiled < m) {
          gemm_op<Bf16PairOp>(m - tiled, s.ldn, (head_dim + 1) / 2,
                              StridedA<uint32_t>{q_row_pairs + tiled * q_stride, q_stride, 1}, k_t_pairs, s.ldn,
                              s.p + tiled * s.ldn, s.ldn, false);
        }
#endif
      } else {
        q_blk = operand_rows(q + i0 * p.q.row_stride, p.q.row_stride, m, head_dim, s.q_rows, s.ldo, &q_stride);
        do_blk = operand_rows(dout + i0 * bp.dout.row_stride, bp.dout.row_stride, m, head_dim, s.do_rows, s.ldo,
                              &do_stride);
        gemm<Acc>(m, s.ldn, head_dim, StridedA<Acc>{q_blk, q_stride, 1}, s.k_t, s.ldn, s.p, s.ldn, false);
      }
      probabilities_from_lse(p, s, batch, head, i0, m, j0, n, lse_base);
      const Acc* weights = s.p;  // what multiplied V in the forward
      if (dropout) {
        dropout_tile(p, batch, head, i0, m, j0, n, s.drop, Orientation{s.ldn, 1});
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t c = 0; c < n; ++c) s.p_drop[r * s.ldn + c] = s.p[r * s.ldn + c] * s.drop[r * s.ldn + c];
        }
        weights = s.p_drop;
      }
      if constexpr (kBf16Pairs<T>) {
#if defined(__AVX512BF16__)
        pack_float_row_pairs(weights, m, s.ldn, s.ldn, s.p_t);
        int64_t tiled = 0;     // rows of dP the AMX tiles make
        bool dv_done = false;  // dV by the AMX tiles
#if defined(FUSEDATTN_AMX)
        if (amx) {
          keys_times(m, s.p_t, s.do_pairs, s.dv);
          dv_done = true;
          tiled = tiled_rows(m, s.ldn, amx_pairs, do_row_pairs, do_stride, v_t_pairs, s.ldn, s.ds, s.ldn, false);
        }
#endif
        if (!dv_done) {
          gemm_op<Bf16PairOp>(n, s.ldo, (m + 1) / 2, StridedA<uint32_t>{s.p_t, 1, s.ldn}, s.do_pairs, s.ldo, s.dv,
                              s.ldo, true);
        }
        if (tiled < m) {
          gemm_op<Bf16PairOp>(m - tiled, s.ldn, (head_dim + 1) / 2,
                              StridedA<uint32_t>{do_row_pairs + tiled * do_stride, do_stride, 1}, v_t_pairs, s.ldn,
                              s.ds + tiled * s.ldn, s.ldn, false);
        }
#endif
      } else {
        gemm<Acc>(n, s.ldo, m, StridedA<Acc>{weights, 1, s.ldn}, do_blk, do_stride, s.dv, s.ldo, true);
        gemm<Acc>(m, s.ldn, head_dim, StridedA<Acc>{do_blk, do_stride, 1}, s.v_t, s.ldn, s.ds, s.ldn, false);
      }
      if (dropout) {
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t c = 0; c < n; ++c) s.ds[r * s.ldn + c] *= s.drop[r * s.ldn + c];
        }
      }
      softmax_gradient(s, m, head_dsum + i0);
      const int64_t dmask_offset = ((batch * p.num_heads + head) * p.seqlen_q + i0) * p.seqlen_k + j0;
      for (int64_t r = 0; r < m && (bp.dmask != nullptr || bp.dmask_f64 != nullptr); ++r) {
        for (int64_t c = 0; c < n; ++c) {
          const int64_t index = dmask_offset + r * p.seqlen_k + c;
          if (bp.dmask_f64 != nullptr) bp.dmask_f64[index] = static_cast<double>(s.ds[r * s.ldn + c]);
          else bp.dmask[index] = static_cast<float>(s.ds[r * s.ldn + c]);
        }
      }
      if (p.softcap > 0.0f) {  // d(cap·tanh(s/cap))/ds = 1 - tanh²
        for (int64_t e = 0; e < m * s.ldn; ++e) s.ds[e] *= Acc(1) - s.cap_t[e] * s.cap_t[e];
      }
      if constexpr (kBf16Pairs<T>) {
#if defined(__AVX512BF16__)
        pack_float_row_pairs(s.ds, m, s.ldn, s.ldn, s.ds_t);
        round_rows_to_pairs(s.ds, m, s.ldn, s.ds_rows);
        int64_t tiled = 0;     // rows of dQ the AMX tiles make
        bool dk_done = false;  // dK by the AMX tiles
#if defined(FUSEDATTN_AMX)
        if (amx) {
          keys_times(m, s.ds_t, s.q_pairs, s.dk);
          dk_done = true;
          tiled = tiled_rows(m, head_dim, s.ldn / 2, s.ds_rows, s.ldn / 2, k_pairs, s.ldo, dq + i0 * s.ldo, s.ldo, true);
        }
#endif
        if (!dk_done) {
          gemm_op<Bf16PairOp>(n, s.ldo, (m + 1) / 2, StridedA<uint32_t>{s.ds_t, 1, s.ldn}, s.q_pairs, s.ldo, s.dk,
                              s.ldo, true);
        }
        if (tiled < m) {
          gemm_op<Bf16PairOp>(m - tiled, s.ldo, (n + 1) / 2,
                              StridedA<uint32_t>{s.ds_rows + tiled * (s.ldn / 2), s.ldn / 2, 1}, k_pairs, s.ldo,
                              dq + (i0 + tiled) * s.ldo, s.ldo, true);
        }
#endif
      } else {
        gemm<Acc>(n, s.ldo, m, StridedA<Acc>{s.ds, 1, s.ldn}, q_blk, q_stride, s.dk, s.ldo, true);
        gemm<Acc>(m, s.ldo, n, StridedA<Acc>{s.ds, s.ldn, 1}, s.k_rows, s.ldo, dq + i0 * s.ldo, s.ldo, true);
      }
    }
  }

  const Acc scale = static_cast<Acc>(p.scale);
  T* dk = static_cast<T*>(bp.dk.data) + batch * bp.dk.batch_stride + kv_head * bp.dk.head_stride + j0 * bp.dk.row_stride;
  T* dv = static_cast<T*>(bp.dv.data) + batch * bp.dv.batch_stride + kv_head * bp.dv.head_stride + j0 * bp.dv.row_stride;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < head_dim; ++d) {
      dk[j * bp.dk.row_stride + d] = from_float<T>(s.dk[j * s.ldo + d] * scale);
      dv[j * bp.dv.row_stride + d] = from_float<T>(s.dv[j * s.ldo + d]);
    }
  }
}

// dq[batch, head] = scale · sum of the partials (each Acc[seqlen_q][ldo]), added in the given order.
template <typename T>
void backward_reduce_dq_t(const BackwardParams& bp, int64_t batch, int64_t head, const void* const* partials,
                          int64_t num_partials) {
  using Acc = typename ComputeType<T>::type;
  const AttentionParams& p = bp.forward;
  const int64_t ldo = row_pitch_t<T>(p);
  const Acc scale = static_cast<Acc>(p.scale);
  T* dq = static_cast<T*>(bp.dq.data) + batch * bp.dq.batch_stride + head * bp.dq.head_stride;
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    for (int64_t d = 0; d < p.head_dim; ++d) {
      Acc sum = 0;
      for (int64_t part = 0; part < num_partials; ++part) sum += static_cast<const Acc*>(partials[part])[i * ldo + d];
      dq[i * bp.dq.row_stride + d] = from_float<T>(sum * scale);
    }
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
