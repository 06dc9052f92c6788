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
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/params.h"
#include "common/variant.h"
#include "cpu/convert.h"
#include "cpu/gemm_tile.h"
#include "cpu/kernel_table.h"
#include "cpu/score_mods.h"
#include "cpu/vec.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

// Keys per block. 64 keys x 256 queries of fp32 scores = 64 KiB, which stays in L2 between
// the score, softmax and P·V passes.
constexpr int64_t kBlockN = 64;

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Integer lanes of the same width as the compute type, for the column mask.
template <typename Acc>
using MaskIndex = std::conditional_t<sizeof(Acc) == 8, int64_t, int32_t>;

// Layout of the per-thread scratch buffer, in elements of Acc.
template <typename Acc>
struct ForwardScratch {
  int64_t ldq;  // columns of Qᵀ / Sᵀ (query rows, padded)
  int64_t ldo;  // columns of O and of converted K/V rows (head_dim, padded)
  Acc* q_t;     // [head_dim x ldq]
  Acc* s_t;     // [kBlockN x ldq]
  Acc* o;       // [ldq x ldo]
  Acc* k_rows;  // [kBlockN x ldo]  converted K block (when K is not already Acc)
  Acc* v_rows;  // [kBlockN x ldo]  converted / padded V block
  Acc* row_max;       // [ldq]
  Acc* row_sum;       // [ldq]
  Acc* row_rescale;   // [ldq]
  Acc* query_pos;     // [ldq] position of each query row (ALiBi)
  Acc* mask_tile;     // [kBlockN x ldq] attn_mask values of the current key block
  Acc* drop_tile;     // [kBlockN x ldq] dropout factors of the current key block
  MaskIndex<Acc>* key_begin;  // [ldq] first visible key per query row
  MaskIndex<Acc>* key_end;    // [ldq] one past the last visible key

  // Elements of Acc that carve() hands out (the two index arrays have Acc's size too).
  static int64_t elements(int64_t head_dim, int64_t block_rows) {
    constexpr int W = Vec<Acc>::kWidth;
    const int64_t ldq = round_up(block_rows, W);
    const int64_t ldo = round_up(head_dim, W);
    return head_dim * ldq + 3 * kBlockN * ldq + ldq * ldo + 2 * kBlockN * ldo + 6 * ldq;
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
    s.k_rows = p;      p += kBlockN * s.ldo;
    s.v_rows = p;      p += kBlockN * s.ldo;
    s.row_max = p;     p += s.ldq;
    s.row_sum = p;     p += s.ldq;
    s.row_rescale = p; p += s.ldq;
    s.query_pos = p;   p += s.ldq;
    s.mask_tile = p;   p += kBlockN * s.ldq;
    s.drop_tile = p;   p += kBlockN * s.ldq;
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
    for (int64_t c = 0; c < head_dim; ++c) d[c] = static_cast<Acc>(to_float(s[c]));
    for (int64_t c = head_dim; c < ld; ++c) d[c] = Acc(0);
  }
}

// Sets Sᵀ[j][i] = -inf where key j0 + j is outside the visible range of query row i.
template <typename Acc>
inline void mask_scores(const ForwardScratch<Acc>& s, int64_t j0, int64_t n) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  typedef MaskIndex<Acc> Index;
  const V minus_inf = vec_set1<Acc>(-std::numeric_limits<Acc>::infinity());
  for (int64_t j = 0; j < n; ++j) {
    const Index key = static_cast<Index>(j0 + j);
    Acc* row = s.s_t + j * s.ldq;
    for (int64_t i = 0; i < s.ldq; i += W) {
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

// softcap → ALiBi → + attn_mask on the n x ldq block of scores (DESIGN.md's order).
template <typename Acc>
inline void modify_scores(const AttentionParams& params, const ForwardScratch<Acc>& s, int64_t j0, int64_t n,
                          Acc slope) {
  constexpr int W = Vec<Acc>::kWidth;
  if (params.softcap > 0.0f) apply_softcap<Acc>(s.s_t, n * s.ldq, params.softcap, nullptr);
  if (params.alibi_slopes != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const VecT<Acc> key = vec_set1<Acc>(static_cast<Acc>(j0 + j));
      Acc* row = s.s_t + j * s.ldq;
      for (int64_t i = 0; i < s.ldq; i += W) {
        vec_store<Acc>(row + i, alibi_score(vec_load<Acc>(row + i), slope, vec_load<Acc>(s.query_pos + i), key));
      }
    }
  }
  if (params.mask.type != MaskType::kNone) {
    for (int64_t j = 0; j < n; ++j) {
      Acc* row = s.s_t + j * s.ldq;
      const Acc* bias = s.mask_tile + j * s.ldq;
      for (int64_t i = 0; i < s.ldq; i += W) vec_store<Acc>(row + i, vec_load<Acc>(row + i) + vec_load<Acc>(bias + i));
    }
  }
}

// Online-softmax step over the n x ldq block of scores in s_t (in place: scores -> P).
// Updates row_max and row_sum and leaves the O rescale factor of each query in row_rescale.
template <typename Acc>
inline void softmax_step(const ForwardScratch<Acc>& s, int64_t n) {
  using V = VecT<Acc>;
  constexpr int W = Vec<Acc>::kWidth;
  const V minus_inf = vec_set1<Acc>(-std::numeric_limits<Acc>::infinity());
  const V zero = vec_set1<Acc>(Acc(0));
  for (int64_t i = 0; i < s.ldq; i += W) {
    const V old_max = vec_load<Acc>(s.row_max + i);
    V new_max = old_max;
    for (int64_t j = 0; j < n; ++j) new_max = vec_max<Acc>(new_max, vec_load<Acc>(s.s_t + j * s.ldq + i));
    // A row that has seen only masked keys keeps max -inf; subtracting 0 then gives P = 0.
    const V shift = new_max == minus_inf ? zero : new_max;
    const V rescale = exp_vec<Acc>(old_max - shift);
    V sum = zero;
    for (int64_t j = 0; j < n; ++j) {
      Acc* p = s.s_t + j * s.ldq + i;
      const V prob = exp_vec<Acc>(vec_load<Acc>(p) - shift);
      vec_store<Acc>(p, prob);
      sum += prob;
    }
    vec_store<Acc>(s.row_max + i, new_max);
    vec_store<Acc>(s.row_sum + i, vec_load<Acc>(s.row_sum + i) * rescale + sum);
    vec_store<Acc>(s.row_rescale + i, rescale);
  }
}

template <typename T>
void forward_block_t(const AttentionParams& params, const ForwardBlock& block, void* scratch) {
  using Acc = typename ComputeType<T>::type;
  constexpr bool kDirect = std::is_same_v<T, Acc>;  // K/V can be read in place
  constexpr int W = Vec<Acc>::kWidth;
  const int64_t head_dim = params.head_dim;
  const int64_t rows = block.row_end - block.row_begin;
  const ForwardScratch<Acc> s = ForwardScratch<Acc>::carve(scratch, head_dim, rows);

  const int64_t kv_head = kv_head_of(params, block.head);
  const T* q = static_cast<const T*>(params.q.data) + block.batch * params.q.batch_stride +
               block.head * params.q.head_stride + block.row_begin * params.q.row_stride;
  const T* k = static_cast<const T*>(params.k.data) + block.batch * params.k.batch_stride +
               kv_head * params.k.head_stride;
  const T* v = static_cast<const T*>(params.v.data) + block.batch * params.v.batch_stride +
               kv_head * params.v.head_stride;

  // Qᵀ, scaled; padding columns are zero and reuse the last row's key range.
  const Acc scale = static_cast<Acc>(params.scale);
  for (int64_t d = 0; d < head_dim; ++d) {
    Acc* dst = s.q_t + d * s.ldq;
    for (int64_t i = 0; i < rows; ++i) dst[i] = static_cast<Acc>(to_float(q[i * params.q.row_stride + d])) * scale;
    for (int64_t i = rows; i < s.ldq; ++i) dst[i] = Acc(0);
  }
  // A sink is a virtual key with score sink[head] and no value: the running max and sum start
  // from it instead of from (-inf, 0).
  const bool has_sink = params.sinks != nullptr;
  const Acc sink = has_sink ? static_cast<Acc>(params.sinks[block.head]) : Acc(0);
  for (int64_t i = 0; i < s.ldq; ++i) {
    const int64_t row = block.row_begin + (i < rows ? i : rows - 1);
    const KeyRange range = visible_keys(params, row);
    s.key_begin[i] = static_cast<MaskIndex<Acc>>(range.begin);
    s.key_end[i] = static_cast<MaskIndex<Acc>>(range.end);
    s.row_max[i] = has_sink ? sink : -std::numeric_limits<Acc>::infinity();
    s.row_sum[i] = has_sink ? Acc(1) : Acc(0);
    s.query_pos[i] = static_cast<Acc>(query_position(params, row));
  }
  const Orientation transposed{1, s.ldq};  // Sᵀ: element (query i, key j) at j * ldq + i
  const Acc slope = static_cast<Acc>(alibi_slope(params, block.batch, block.head));

  const KeyRange keys = visible_keys_of_rows(params, block.row_begin, block.row_end);
  const bool use_direct_v = kDirect && head_dim % W == 0;
  bool first = true;
  // Key blocks start at multiples of kBlockN, so a row's summation order (and result) does not
  // depend on which q-block, hence which thread count, it was computed in.
  for (int64_t j0 = keys.begin / kBlockN * kBlockN; j0 < keys.end; j0 += kBlockN) {
    const int64_t n = (keys.end - j0 < kBlockN) ? keys.end - j0 : kBlockN;
    if (params.mask.type != MaskType::kNone &&
        !load_mask_tile(params.mask, block.batch, block.head, block.row_begin, rows, j0, n, s.mask_tile, transposed)) {
      continue;  // a bool mask hides the whole tile
    }
    // Sᵀ = K_blk · Qᵀ
    StridedA<Acc> k_blk;
    if constexpr (kDirect) {
      k_blk = {k + j0 * params.k.row_stride, params.k.row_stride, 1};
    } else {
      convert_rows(k + j0 * params.k.row_stride, params.k.row_stride, n, head_dim, s.k_rows, s.ldo);
      k_blk = {s.k_rows, s.ldo, 1};
    }
    gemm<Acc>(n, s.ldq, head_dim, k_blk, s.q_t, s.ldq, s.s_t, s.ldq, false);
    modify_scores(params, s, j0, n, slope);

    const bool fully_visible = j0 >= s.key_begin[rows - 1] && j0 + n <= s.key_end[0];
    if (!fully_visible) mask_scores(s, j0, n);
    softmax_step(s, n);
    if (params.dropout_p > 0.0f) {
      dropout_tile(params, block.batch, block.head, block.row_begin, rows, j0, n, s.drop_tile, transposed);
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < rows; ++i) s.s_t[j * s.ldq + i] *= s.drop_tile[j * s.ldq + i];
      }
    }

    if (!first) {
      for (int64_t i = 0; i < rows; ++i) {
        const Acc rescale = s.row_rescale[i];
        if (rescale == Acc(1)) continue;
        Acc* o_row = s.o + i * s.ldo;
        for (int64_t c = 0; c < s.ldo; c += W) vec_store<Acc>(o_row + c, vec_load<Acc>(o_row + c) * vec_set1<Acc>(rescale));
      }
    }
    // O += P · V_blk, with Pᵀ read column-wise.
    const Acc* v_blk;
    int64_t v_stride;
    if (use_direct_v) {
      v_blk = reinterpret_cast<const Acc*>(v + j0 * params.v.row_stride);
      v_stride = params.v.row_stride;
    } else {
      convert_rows(v + j0 * params.v.row_stride, params.v.row_stride, n, head_dim, s.v_rows, s.ldo);
      v_blk = s.v_rows;
      v_stride = s.ldo;
    }
    gemm<Acc>(rows, s.ldo, n, StridedA<Acc>{s.s_t, 1, s.ldq}, v_blk, v_stride, s.o, s.ldo, !first);
    first = false;
  }

  // out = O / l; LSE = m + log(l). Rows that saw no key: 0 and -inf.
  T* out = static_cast<T*>(params.out.data) + block.batch * params.out.batch_stride +
           block.head * params.out.head_stride + block.row_begin * params.out.row_stride;
  float* lse = params.lse == nullptr
                   ? nullptr
                   : params.lse + (block.batch * params.num_heads + block.head) * params.seqlen_q + block.row_begin;
  for (int64_t i = 0; i < rows; ++i) {
    const Acc sum = s.row_sum[i];
    const bool no_weight = sum == Acc(0);  // no visible key and no sink (a NaN sum stays NaN)
    const bool empty = first || no_weight;
    const Acc inv = empty ? Acc(0) : Acc(1) / sum;
    T* out_row = out + i * params.out.row_stride;
    const Acc* o_row = s.o + i * s.ldo;
    for (int64_t c = 0; c < head_dim; ++c) out_row[c] = from_float<T>(empty ? Acc(0) : o_row[c] * inv);
    if (lse != nullptr) {
      lse[i] = no_weight ? -std::numeric_limits<float>::infinity()
                         : static_cast<float>(s.row_max[i] + std::log(sum));
    }
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
