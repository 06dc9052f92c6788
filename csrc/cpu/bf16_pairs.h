// Packing into the "pair" (VNNI) layout that VDPBF16PS reads (the avx512bf16 ISA only): a
// uint32 holds two bf16 values adjacent along the reduction axis k, k even in the low half.
//   pairs[kp][i] = x[2kp][i] | x[2kp + 1][i] << 16
// A matrix that is already stored with k contiguous (a bf16 K or Q row: k = head_dim) is its own
// pair layout and is read in place; the others (Qᵀ, P, V for the forward) are packed here, with
// zeros for the odd tail of k and for padding columns, so padded products add exact zeros.
#pragma once
#if defined(__AVX512BF16__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/convert.h"
#include "cpu/transpose.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

inline uint32_t pair_bits(uint16_t low, uint16_t high) {
  return static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
}

// Pair kp of a bf16 row of `depth` elements: elements 2kp and 2kp + 1 (0 past the end).
inline uint32_t row_pair(const BFloat16* row, int64_t kp, int64_t depth) {
  return pair_bits(row[2 * kp].bits, 2 * kp + 1 < depth ? row[2 * kp + 1].bits : 0);
}

// A bf16 row of `depth` elements as its (depth + 1) / 2 pairs, into dst: the whole pairs are the
// row's own bytes (x86 is little-endian), and an odd depth's last pair is zero-padded.
inline void copy_row_as_pairs(const BFloat16* row, int64_t depth, uint32_t* dst) {
  std::memcpy(dst, row, depth / 2 * sizeof(uint32_t));
  if (depth % 2) dst[depth / 2] = row_pair(row, depth / 2, depth);
}

// 16 pairs from 16 bf16 of row k (low halves) and 16 of row k + 1 (high halves).
inline __m512i pair_vectors(const BFloat16* even_row, const BFloat16* odd_row) {
  const __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even_row)));
  const __m512i high = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd_row)));
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

// dst[kp][c] for c < ld (a multiple of 16) from `rows` rows of `cols` bf16 (row r at
// src + r * src_stride): row pairs (2kp, 2kp + 1), a missing odd row and columns >= cols zero.
inline void pack_row_pairs(const BFloat16* src, int64_t src_stride, int64_t rows, int64_t cols, uint32_t* dst,
                           int64_t ld) {
  static const BFloat16 zeros[16] = {};
  for (int64_t r = 0; r < rows; r += 2) {
    const BFloat16* even = src + r * src_stride;
    const bool has_odd = r + 1 < rows;
    const BFloat16* odd = has_odd ? even + src_stride : nullptr;
    uint32_t* out = dst + (r / 2) * ld;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
      _mm512_storeu_si512(out + c, pair_vectors(even + c, has_odd ? odd + c : zeros));
    }
    for (; c < cols; ++c) out[c] = pair_bits(even[c].bits, has_odd ? odd[c].bits : 0);
    for (; c < ld; ++c) out[c] = 0;
  }
}

// dst[kp][i] for i < cols from fp32 src[k][i] (k < rows; src and dst rows ld apart), rounded to
// bf16 (nearest even); a missing odd row gives zeros. cols is a multiple of 16.
inline void pack_float_row_pairs(const float* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst) {
  for (int64_t r = 0; r < rows; r += 2) {
    const float* even = src + r * ld;
    const float* odd = even + ld;
    uint32_t* out = dst + (r / 2) * ld;
    for (int64_t i = 0; i < cols; i += 16) {
      const __m512 high = r + 1 < rows ? _mm512_loadu_ps(odd + i) : _mm512_setzero_ps();
      // cvtne2ps puts the second operand's 16 values in the low 256 bits: (even | odd << 256)
      const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, _mm512_loadu_ps(even + i)));
      const __m512i low = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(both));
      const __m512i up = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(both, 1));
      _mm512_storeu_si512(out + i, _mm512_or_si512(low, _mm512_slli_epi32(up, 16)));
    }
  }
}

// Rows of bf16 (m rows, row_stride apart) as rows of pairs along the row: in place when
// head_dim and the stride are even, else copied (zero-padded to an even width) into `buffer`
// ([m x (head_dim + 1) / 2]). *stride is in pairs.
inline const uint32_t* rows_as_pairs(const BFloat16* rows, int64_t row_stride, int64_t m, int64_t head_dim,
                                     uint32_t* buffer, int64_t* stride) {
  if (head_dim % 2 == 0 && row_stride % 2 == 0) {
    *stride = row_stride / 2;
    return reinterpret_cast<const uint32_t*>(rows);
  }
  const int64_t pairs = (head_dim + 1) / 2;
  for (int64_t r = 0; r < m; ++r) copy_row_as_pairs(rows + r * row_stride, head_dim, buffer + r * pairs);
  *stride = pairs;
  return buffer;
}

// fp32 rows (m rows of ld floats, ld a multiple of 32) rounded to bf16 in place of pairs:
// dst[r][cp] = bf16(src[r][2cp]) | bf16(src[r][2cp + 1]) << 16, i.e. plain bf16 rows.
inline void round_rows_to_pairs(const float* src, int64_t m, int64_t ld, uint32_t* dst) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < ld; c += 32) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + r * ld + c + 16), _mm512_loadu_ps(src + r * ld + c));
      _mm512_storeu_si512(dst + (r * ld + c) / 2, reinterpret_cast<__m512i>(both));
    }
  }
}

// Transposed pairs: dst[kp][i] = x_i[2kp] | x_i[2kp + 1] << 16 for lanes i < lanes (row i at
// row_of(i), `depth` bf16 along k), zero for lanes in [lanes, ld) and for the odd tail of k.
template <typename RowOf>
inline void pack_transposed_pairs(RowOf row_of, int64_t lanes, int64_t depth, uint32_t* dst, int64_t ld) {
  pack_transposed<uint32_t>(row_of, lanes, (depth + 1) / 2, dst, ld,
                            [depth](const BFloat16* row, int64_t kp) { return row_pair(row, kp, depth); });
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
#endif
