// bf16-pair products on AMX tiles (TDPBF16PS), for the avx512amx ISA: the forward's Sᵀ = K·Qᵀ,
// whose operands are already in the pair layout the tiles read (K rows in place, Qᵀ packed as
// bf16 pairs; forward_block.h), and Oᵀ += Vᵀ · P, O kept transposed so that P's pairs (packed
// as for VDPBF16PS) are the B operand and only V is transposed (transpose_value_pairs); the
// backward's five products over its VDPBF16PS buffers, Pᵀ and dSᵀ transposed (transpose_u32)
// where the tiles want them as A (backward_block.h); and the decode's scores of 1-4 MHA tokens,
// 16 K rows in place against the 1-4 q rows of a kv head (amx_dot_rows, decode_block.h).
// All eight tiles are 16 rows x 64 bytes (AmxTileScope): C as 16 x 16 fp32, A as 16 rows x 16
// pairs (32 bf16), B as 16 pairs x 16 columns (amx_dot_rows: C and B 1-4 columns wide).
// amx_gemm_pairs walks C in 32 x 32 blocks (four C tiles, two A, two B), then the 16-wide
// edges. The tile configuration belongs to the thread: AmxTileScope loads it and releases the
// tiles at the end of its scope (Linux saves them with the thread's state).
#pragma once
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FUSEDATTN_AMX 1  // the kernels' guard for their AMX paths (the avx512amx ISA only)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

constexpr int64_t kAmxTile = 16;  // rows of every tile, fp32 columns of C, pairs of A

// The head_dims the tiles take (a multiple of 16), and their pairs padded to whole tiles.
inline bool amx_takes_head_dim(int64_t head_dim) { return head_dim % 16 == 0; }
inline int64_t amx_head_dim_pairs(int64_t head_dim) { return (head_dim / 2 + kAmxTile - 1) / kAmxTile * kAmxTile; }

// Zeroes `width` pairs of rows [first, last) of a pair matrix whose rows are ld apart.
inline void zero_pair_rows(uint32_t* rows, int64_t first, int64_t last, int64_t ld, int64_t width) {
  for (int64_t r = first; r < last; ++r) std::memset(static_cast<void*>(rows + r * ld), 0, width * sizeof(uint32_t));
}

// `pairs` pairs from src (none where src is null) into a row of `padded` pairs, zero past them.
inline void copy_padded_pair_row(const void* src, int64_t pairs, int64_t padded, uint32_t* dst) {
  const int64_t have = src != nullptr ? pairs : 0;
  if (have > 0) std::memcpy(dst, src, have * sizeof(uint32_t));
  std::memset(static_cast<void*>(dst + have), 0, (padded - have) * sizeof(uint32_t));
}

class AmxTileScope {
 public:
  // columns: the width of C tiles (0-3, fp32) and B tiles (6-7, pairs); A tiles (4-5) are
  // always 64 bytes wide. amx_dot_rows takes 1-4 columns, the GEMMs kAmxTile.
  explicit AmxTileScope(int64_t columns = kAmxTile) {
    std::memset(&config_, 0, sizeof(config_));
    config_.palette = 1;
    for (int t = 0; t < 8; ++t) {
      const bool a_tile = t == 4 || t == 5;
      config_.rows[t] = kAmxTile;
      config_.colsb[t] = static_cast<uint16_t>(a_tile ? 64 : 4 * columns);
    }
    _tile_loadconfig(&config_);
  }
  ~AmxTileScope() { _tile_release(); }
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;

 private:
  struct alignas(64) Config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config_;
};

// One block of MI x NJ C tiles (MI, NJ in {1, 2}): C[i0 .., j0 ..] (+)= A[i0 .., :] · B[:, j0 ..].
// C tiles 0-3 (tile 2 * i + j), A tiles 4-5, B tiles 6-7.
template <int MI, int NJ>
inline void amx_block(int64_t pairs, const uint32_t* a, int64_t a_stride, const uint32_t* b, int64_t b_stride,
                      float* c, int64_t c_stride, bool accumulate) {
  const int64_t a_bytes = a_stride * 4, b_bytes = b_stride * 4, c_bytes = c_stride * 4;
  auto c_tile = [&](int i, int j) { return c + i * kAmxTile * c_stride + j * kAmxTile; };
  if (accumulate) {
    _tile_loadd(0, c_tile(0, 0), c_bytes);
    if constexpr (NJ == 2) _tile_loadd(1, c_tile(0, 1), c_bytes);
    if constexpr (MI == 2) _tile_loadd(2, c_tile(1, 0), c_bytes);
    if constexpr (MI == 2 && NJ == 2) _tile_loadd(3, c_tile(1, 1), c_bytes);
  } else {
    _tile_zero(0);
    if constexpr (NJ == 2) _tile_zero(1);
    if constexpr (MI == 2) _tile_zero(2);
    if constexpr (MI == 2 && NJ == 2) _tile_zero(3);
  }
  for (int64_t k = 0; k < pairs; k += kAmxTile) {
    _tile_loadd(4, a + k, a_bytes);
    _tile_loadd(6, b + k * b_stride, b_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NJ == 2) {
      _tile_loadd(7, b + k * b_stride + kAmxTile, b_bytes);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MI == 2) {
      _tile_loadd(5, a + kAmxTile * a_stride + k, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NJ == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c_tile(0, 0), c_bytes);
  if constexpr (NJ == 2) _tile_stored(1, c_tile(0, 1), c_bytes);
  if constexpr (MI == 2) _tile_stored(2, c_tile(1, 0), c_bytes);
  if constexpr (MI == 2 && NJ == 2) _tile_stored(3, c_tile(1, 1), c_bytes);
}

// c[r * lanes + l] = <q_l, rows + r * row_bytes> for 16 bf16 rows (head_dim a multiple of 32
// elements, row_bytes apart) and 1-4 bf16 q rows: Sᵀ = K·Qᵀ as 16 rows x `lanes` columns, the
// rows read in place as A tiles (32 elements each, tiles 4 and 5 in turn), Qᵀ as B tiles (6, 7)
// from q_pairs [head_dim / 32][16][lanes] (pair r of lane l of each 32 elements: one raw q row
// when lanes is 1), so no horizontal sums; C in tile 0. Needs an AmxTileScope(lanes) on this
// thread.
inline void amx_dot_rows(const uint32_t* q_pairs, int64_t lanes, const void* rows, int64_t row_bytes,
                         int64_t head_dim, float* c) {
  const char* k = static_cast<const char*>(rows);
  const int64_t slice_pairs = kAmxTile * lanes;  // q_pairs per 32 elements
  _tile_zero(0);
  for (int64_t slice = 0; slice < head_dim / 32; slice += 2) {
    _tile_loadd(4, k + slice * 64, row_bytes);
    _tile_loadd(6, q_pairs + slice * slice_pairs, 4 * lanes);
    _tile_dpbf16ps(0, 4, 6);
    if (slice + 1 < head_dim / 32) {
      _tile_loadd(5, k + slice * 64 + 64, row_bytes);
      _tile_loadd(7, q_pairs + (slice + 1) * slice_pairs, 4 * lanes);
      _tile_dpbf16ps(0, 5, 7);
    }
  }
  _tile_stored(0, c, 4 * lanes);
}

// C[m x n] (+)= A[m x pairs] · B[pairs x n] in bf16 pairs (uint32: two bf16 of the reduction
// axis), fp32 C; A's rows a_stride uint32 apart, B's rows b_stride apart, C's c_stride floats.
// m, n and pairs multiples of 16. Needs an AmxTileScope on this thread.
inline void amx_gemm_pairs(int64_t m, int64_t n, int64_t pairs, const uint32_t* a, int64_t a_stride,
                           const uint32_t* b, int64_t b_stride, float* c, int64_t c_stride, bool accumulate) {
  int64_t i = 0;
  for (; i + 2 * kAmxTile <= m; i += 2 * kAmxTile) {
    int64_t j = 0;
    for (; j + 2 * kAmxTile <= n; j += 2 * kAmxTile) {
      amx_block<2, 2>(pairs, a + i * a_stride, a_stride, b + j, b_stride, c + i * c_stride + j, c_stride, accumulate);
    }
    if (j < n) amx_block<2, 1>(pairs, a + i * a_stride, a_stride, b + j, b_stride, c + i * c_stride + j, c_stride, accumulate);
  }
  if (i < m) {
    int64_t j = 0;
    for (; j + 2 * kAmxTile <= n; j += 2 * kAmxTile) {
      amx_block<1, 2>(pairs, a + i * a_stride, a_stride, b + j, b_stride, c + i * c_stride + j, c_stride, accumulate);
    }
    if (j < n) amx_block<1, 1>(pairs, a + i * a_stride, a_stride, b + j, b_stride, c + i * c_stride + j, c_stride, accumulate);
  }
}

// Transposes 16 rows of 16 uint32 (r[t] is row t) in place: r[c] becomes column c.
inline void transpose_16x16_u32(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + m], 128-bit lane L: rows 4i..4i+3 of column 4L + m
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x88), c1 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xDD);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x88), d1 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xDD);
    r[m] = _mm512_shuffle_i32x4(c0, d0, 0x88);
    r[4 + m] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[8 + m] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
    r[12 + m] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols (both multiples of 16).
inline void transpose_u32(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t cols, uint32_t* dst,
                          int64_t ld_dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512i tile[16];
      for (int r = 0; r < 16; ++r) tile[r] = _mm512_loadu_si512(src + (r0 + r) * ld_src + c0);
      transpose_16x16_u32(tile);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + (c0 + c) * ld_dst + r0, tile[c]);
    }
  }
}

// A key block's V rows as Vᵀ in pairs of keys, the A operand of Oᵀ += Vᵀ · P: vt[d * ld + t] =
// (V[2t][d], V[2t + 1][d]) for t < pairs (a multiple of 16), rows past n zero. row(j) is key j's
// V row (bf16, head_dim a multiple of 16: a last half chunk is read masked). Pairs of rows are
// interleaved 32 columns at a time (VPUNPCKLWD / VPUNPCKHWD: columns {0-3, 8-11, 16-19, 24-27}
// and {+4}), and each 16 pairs x 16 columns transposed.
template <typename RowOf>
inline void transpose_value_pairs(RowOf&& row, int64_t n, int64_t pairs, int64_t head_dim, uint32_t* vt, int64_t ld) {
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t t0 = 0; t0 < pairs; t0 += 16) {
    const uint16_t* even[16];
    const uint16_t* odd[16];
    for (int t = 0; t < 16; ++t) {
      const int64_t j = 2 * (t0 + t);
      even[t] = j < n ? reinterpret_cast<const uint16_t*>(row(j)) : nullptr;
      odd[t] = j + 1 < n ? reinterpret_cast<const uint16_t*>(row(j + 1)) : nullptr;
    }
    for (int64_t c = 0; c < head_dim; c += 32) {
      const __mmask32 columns = c + 32 <= head_dim ? ~__mmask32{0} : __mmask32{0xFFFF};
      __m512i low[16], high[16];
      for (int t = 0; t < 16; ++t) {
        const __m512i a = even[t] ? _mm512_maskz_loadu_epi16(columns, even[t] + c) : zero;
        const __m512i b = odd[t] ? _mm512_maskz_loadu_epi16(columns, odd[t] + c) : zero;
        low[t] = _mm512_unpacklo_epi16(a, b);
        high[t] = _mm512_unpackhi_epi16(a, b);
      }
      transpose_16x16_u32(low);
      transpose_16x16_u32(high);
      for (int slot = 0; slot < 16; ++slot) {  // slot s of a half: column 8 (s / 4) + s % 4 (+ 4)
        const int64_t d = c + 8 * (slot / 4) + slot % 4;
        if (d >= head_dim) break;  // (a half chunk: slots 8-15 are past it)
        _mm512_storeu_si512(vt + d * ld + t0, low[slot]);
        _mm512_storeu_si512(vt + (d + 4) * ld + t0, high[slot]);
      }
    }
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
#endif
