// Tile-level score modifications of the CPU kernels: softcap, ALiBi, attn_mask tiles and the
// dropout mask, vectorised on the Vec vocabulary. The formulas themselves (ALiBi's distance,
// softcap, Philox and the keep rule) come from common/variant.h, shared with CUDA.
//
// Tiles are addressed by an Orientation: the forward works on Sᵀ (rows = keys, lanes = query
// rows), the backward on S (rows = query rows, columns = keys). Element (query i, key j) of a
// tile lives at tile[i * query_step + j * key_step].
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/params.h"
#include "common/variant.h"
#include "cpu/convert.h"
#include "cpu/vec.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

struct Orientation {
  int64_t query_step;
  int64_t key_step;
};

// tanh on every lane: an odd polynomial below |x| = 0.3 (where 1 - 2/(e^2x + 1) would cancel)
// and the exp form above; |rel err| < 3e-7. Scalars and doubles use libm.
template <typename T>
inline VecT<T> tanh_vec(VecT<T> x) {
  if constexpr (Vec<T>::kWidth == 1) {
    return std::tanh(x);
  } else if constexpr (sizeof(T) == 8) {
    VecT<T> y;
    for (int lane = 0; lane < Vec<T>::kWidth; ++lane) y[lane] = std::tanh(x[lane]);
    return y;
  } else {
    const VecT<T> x2 = x * x;
    VecT<T> poly = x2 * (62.0f / 2835.0f) - (17.0f / 315.0f);
    poly = poly * x2 + (2.0f / 15.0f);
    poly = poly * x2 - (1.0f / 3.0f);
    poly = poly * (x2 * x) + x;
    const VecT<T> large = 1.0f - 2.0f / (exp_vec<T>(x + x) + 1.0f);
    const VecT<T> magnitude = x < 0.0f ? -x : x;
    return magnitude < 0.3f ? poly : large;
  }
}

// s -> softcap · tanh(s / softcap), in place over `count` elements (a multiple of W).
template <typename Acc>
inline void apply_softcap(Acc* scores, int64_t count, double softcap, Acc* tanh_out) {
  constexpr int W = Vec<Acc>::kWidth;
  const Acc cap = static_cast<Acc>(softcap);
  const VecT<Acc> inv_cap = vec_set1<Acc>(Acc(1) / cap);
  for (int64_t e = 0; e < count; e += W) {
    const VecT<Acc> t = tanh_vec<Acc>(vec_load<Acc>(scores + e) * inv_cap);
    if (tanh_out != nullptr) vec_store<Acc>(tanh_out + e, t);
    vec_store<Acc>(scores + e, softcap_score(t, cap));
  }
}

// Reads the attn_mask tile of (batch, head), queries [row_begin, row_begin + rows) and keys
// [key_begin, key_begin + keys) into `tile` as additive values (bool: 0 or -inf). Returns
// whether any entry attends (bool masks) — a tile with none is skipped by the caller.
template <typename M, typename Acc>
inline bool load_mask_tile_t(const MaskRef& mask, int64_t batch, int64_t head, int64_t row_begin, int64_t rows,
                             int64_t key_begin, int64_t keys, Acc* tile, Orientation o) {
  const M* base = static_cast<const M*>(mask.data) + batch * mask.batch_stride + head * mask.head_stride +
                  row_begin * mask.row_stride + key_begin * mask.col_stride;
  const Acc additive[2] = {-std::numeric_limits<Acc>::infinity(), Acc(0)};  // indexed by the bool: no branch
  bool any = false;
  // Loop so that the tile is written contiguously (its rows are the inner dimension).
  const bool keys_outer = o.key_step > o.query_step;
  const int64_t outer = keys_outer ? keys : rows, inner = keys_outer ? rows : keys;
  for (int64_t a = 0; a < outer; ++a) {
    for (int64_t b = 0; b < inner; ++b) {
      const int64_t i = keys_outer ? b : a, j = keys_outer ? a : b;
      const M value = base[i * mask.row_stride + j * mask.col_stride];
      Acc* out = tile + i * o.query_step + j * o.key_step;
      if constexpr (std::is_same_v<M, bool>) {
        any |= value;
        *out = additive[value ? 1 : 0];
      } else {
        *out = static_cast<Acc>(to_float(value));
      }
    }
  }
  if constexpr (!std::is_same_v<M, bool>) any = true;
  return any;
}

// A bool mask tile into the transposed frame (tile[j * ld + i], lanes = query rows), a vector of
// query rows at a time: the rows' bytes are copied to a small block, then each key's column is
// widened to 0 / -inf floats with vector ops (float compute, AVX2 / AVX-512 builds).
inline bool load_bool_tile_transposed(const MaskRef& mask, int64_t batch, int64_t head, int64_t row_begin,
                                      int64_t rows, int64_t key_begin, int64_t keys, float* tile, int64_t ld) {
  constexpr int W = kConvertLanes;
  const uint8_t* base = static_cast<const uint8_t*>(mask.data) + batch * mask.batch_stride +
                        head * mask.head_stride + row_begin * mask.row_stride + key_begin * mask.col_stride;
  uint8_t block[W > 0 ? W : 1][64];
  ConvertBytes any_bytes{};
  const ConvertFloats minus_inf = ConvertFloats{} - std::numeric_limits<float>::infinity();
  for (int64_t i0 = 0; i0 < rows; i0 += W) {
    for (int r = 0; r < W; ++r) {
      const int64_t row = i0 + r < rows ? i0 + r : rows - 1;  // padding lanes repeat the last row
      std::memcpy(block[r], base + row * mask.row_stride, keys);
    }
    for (int64_t j = 0; j < keys; ++j) {
      ConvertBytes column;
      for (int r = 0; r < W; ++r) column[r] = block[r][j];
      any_bytes |= column;
      const ConvertI32 wide = __builtin_convertvector(column, ConvertI32);
      const ConvertFloats values = wide != 0 ? ConvertFloats{} : minus_inf;
      std::memcpy(tile + j * ld + i0, &values, sizeof(values));
    }
  }
  bool any = false;
  for (int r = 0; r < W; ++r) any |= any_bytes[r] != 0;
  return any;
}

template <typename Acc>
inline bool load_mask_tile(const MaskRef& mask, int64_t batch, int64_t head, int64_t row_begin, int64_t rows,
                           int64_t key_begin, int64_t keys, Acc* tile, Orientation o) {
  switch (mask.type) {
    case MaskType::kBool:
      if constexpr (std::is_same_v<Acc, float> && kConvertLanes > 0) {
        if (o.query_step == 1 && mask.col_stride == 1 && keys <= 64) {
          return load_bool_tile_transposed(mask, batch, head, row_begin, rows, key_begin, keys, tile, o.key_step);
        }
      }
      return load_mask_tile_t<bool>(mask, batch, head, row_begin, rows, key_begin, keys, tile, o);
    case MaskType::kFloat32:
      return load_mask_tile_t<float>(mask, batch, head, row_begin, rows, key_begin, keys, tile, o);
    case MaskType::kFloat64:
      return load_mask_tile_t<double>(mask, batch, head, row_begin, rows, key_begin, keys, tile, o);
    case MaskType::kFloat16:
      return load_mask_tile_t<Half>(mask, batch, head, row_begin, rows, key_begin, keys, tile, o);
    case MaskType::kBFloat16:
      return load_mask_tile_t<BFloat16>(mask, batch, head, row_begin, rows, key_begin, keys, tile, o);
    case MaskType::kNone:
      break;
  }
  return true;
}

inline int64_t mask_element_size(MaskType type) {
  switch (type) {
    case MaskType::kBool: return 1;
    case MaskType::kFloat16:
    case MaskType::kBFloat16: return 2;
    case MaskType::kFloat32: return 4;
    case MaskType::kFloat64: return 8;
    case MaskType::kNone: break;
  }
  return 0;
}

// When every query row of the tile carries the same mask values (a key padding mask, whether
// broadcast with row stride 0 or materialised per row), writes them once per key into key_bias
// (additive: 0 / -inf for bool) and returns true; *any_visible tells whether any key attends.
// Comparing the rows' bytes costs far less than building the transposed tile.
template <typename Acc>
inline bool load_uniform_mask_rows(const MaskRef& mask, int64_t batch, int64_t head, int64_t row_begin, int64_t rows,
                                   int64_t key_begin, int64_t keys, Acc* key_bias, bool* any_visible) {
  const int64_t element = mask_element_size(mask.type);
  const char* first = static_cast<const char*>(mask.data) +
                      (batch * mask.batch_stride + head * mask.head_stride + row_begin * mask.row_stride +
                       key_begin * mask.col_stride) * element;
  if (mask.row_stride != 0) {
    for (int64_t i = 1; i < rows; ++i) {
      const char* row = first + i * mask.row_stride * element;
      if (mask.col_stride == 1) {
        if (std::memcmp(row, first, keys * element) != 0) return false;
      } else {
        for (int64_t j = 0; j < keys; ++j) {
          if (std::memcmp(row + j * mask.col_stride * element, first + j * mask.col_stride * element, element) != 0) {
            return false;
          }
        }
      }
    }
  }
  *any_visible = load_mask_tile(mask, batch, head, row_begin, 1, key_begin, keys, key_bias, Orientation{0, 1});
  return true;
}

// The 32x32 -> 64 product of mulhilo, on every lane of a uint32 vector (as many lanes as floats).
constexpr int kRandomLanes = vec_width<float>();
struct VectorMulHiLo {
  typedef uint32_t U32 __attribute__((vector_size(kRandomLanes * sizeof(uint32_t))));
  typedef uint64_t U64 __attribute__((vector_size(kRandomLanes * sizeof(uint64_t))));
  void operator()(uint32_t a, U32 x, U32& hi, U32& lo) const {
    const U64 product = __builtin_convertvector(x, U64) * static_cast<uint64_t>(a);
    hi = __builtin_convertvector(product >> 32, U32);
    lo = __builtin_convertvector(product, U32);
  }
};

// Dropout factors of the tile (0 for dropped weights, 1/(1 - p) for kept ones), written like a
// mask tile. key_begin must be a multiple of 4 (Philox gives the keys of one word group together).
// Lanes run over query rows: one Philox call yields 4 keys for W rows.
template <typename Acc>
inline void dropout_tile(const AttentionParams& p, int64_t batch, int64_t head, int64_t row_begin, int64_t rows,
                         int64_t key_begin, int64_t keys, Acc* tile, Orientation o) {
  constexpr int W = kRandomLanes;
  const DropoutKey key = dropout_key(p);
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const Acc keep_scale = dropout_scale<Acc>(p.dropout_p);
  const uint32_t stream = static_cast<uint32_t>(batch * p.num_heads + head);
  for (int64_t i0 = 0; i0 < rows; i0 += W) {
    for (int64_t g = 0; g < keys; g += 4) {
      const uint32_t group = static_cast<uint32_t>((key_begin + g) >> 2);
      uint32_t words[4][W];
      if constexpr (W == 1) {
        uint32_t counter[4] = {group, static_cast<uint32_t>(row_begin + i0), stream, key.counter3};
        philox4x32_10(counter, key.key0, key.key1, mulhilo_scalar);
        for (int w = 0; w < 4; ++w) words[w][0] = counter[w];
      } else {
        typedef VectorMulHiLo::U32 U32;
        U32 lane_rows;
        for (int lane = 0; lane < W; ++lane) lane_rows[lane] = static_cast<uint32_t>(row_begin + i0 + lane);
        U32 counter[4] = {U32{} + group, lane_rows, U32{} + stream, U32{} + key.counter3};
        philox4x32_10(counter, key.key0, key.key1, VectorMulHiLo{});
        for (int w = 0; w < 4; ++w) std::memcpy(words[w], &counter[w], sizeof(words[w]));
      }
      for (int w = 0; w < 4 && g + w < keys; ++w) {
        for (int lane = 0; lane < W && i0 + lane < rows; ++lane) {
          tile[(i0 + lane) * o.query_step + (g + w) * o.key_step] = words[w][lane] < threshold ? keep_scale : Acc(0);
        }
      }
    }
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
