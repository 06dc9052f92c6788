// Register-blocked micro-kernel for the two products of attention, on the Vec vocabulary:
//   C[m, n] (+)= sum_k A(m, k) * B[k, n]
// A is read one element at a time (broadcast), at A + m*a_row_stride + k*a_k_stride, so it can be
// K (row-major) or Pᵀ (column access) without packing. B rows are contiguous in n (Qᵀ packed,
// or V rows). C is row-major. A tile is kRows x (kVecs*W) held in kRows*kVecs accumulators.
//
// Register budget (measured to keep all accumulators in registers, no spills):
//   AVX-512 (32 zmm): 6 rows x 4 vectors = 24 accumulators + 4 B vectors + 1 broadcast
//   AVX2    (16 ymm): 6 rows x 2 vectors = 12 accumulators + 2 + 1
//   scalar         : 4 rows x 4 columns
#pragma once
#include <cstdint>

#include "cpu/vec.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

#if defined(__AVX512F__)
constexpr int kTileRows = 6;
constexpr int kTileVecs = 4;
#elif defined(__AVX2__)
constexpr int kTileRows = 6;
constexpr int kTileVecs = 2;
#else
constexpr int kTileRows = 4;
constexpr int kTileVecs = 4;
#endif

// Strided read-only operand A(m, k).
template <typename T>
struct StridedA {
  const T* data;
  int64_t row_stride;
  int64_t k_stride;
};

template <typename T, int kRows, int kVecs>
inline void gemm_tile(int64_t depth, StridedA<T> a, const T* b, int64_t b_row_stride, T* c,
                      int64_t c_row_stride, bool accumulate) {
  using V = VecT<T>;
  constexpr int W = Vec<T>::kWidth;
  V acc[kRows][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = accumulate ? vec_load<T>(c + r * c_row_stride + v * W) : vec_set1<T>(T(0));
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    V bv[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) bv[v] = vec_load<T>(b + k * b_row_stride + v * W);
    const T* a_col = a.data + k * a.k_stride;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const V av = vec_set1<T>(a_col[r * a.row_stride]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[r][v] = av * bv[v] + acc[r][v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) vec_store<T>(c + r * c_row_stride + v * W, acc[r][v]);
  }
}

// One column strip of width kVecs*W over all `rows`, in kTileRows blocks plus a tail.
template <typename T, int kVecs>
inline void gemm_strip(int64_t rows, int64_t depth, StridedA<T> a, const T* b,
                       int64_t b_row_stride, T* c, int64_t c_row_stride, bool accumulate) {
  int64_t m = 0;
  for (; m + kTileRows <= rows; m += kTileRows) {
    const StridedA<T> a_m{a.data + m * a.row_stride, a.row_stride, a.k_stride};
    gemm_tile<T, kTileRows, kVecs>(depth, a_m, b, b_row_stride, c + m * c_row_stride,
                                   c_row_stride, accumulate);
  }
  const StridedA<T> a_m{a.data + m * a.row_stride, a.row_stride, a.k_stride};
  T* c_m = c + m * c_row_stride;
  switch (rows - m) {
#define FUSEDATTN_ROW_TAIL(n)                                                             \
  case n:                                                                                 \
    if constexpr (n < kTileRows)                                                          \
      gemm_tile<T, n, kVecs>(depth, a_m, b, b_row_stride, c_m, c_row_stride, accumulate); \
    break;
    FUSEDATTN_ROW_TAIL(1)
    FUSEDATTN_ROW_TAIL(2)
    FUSEDATTN_ROW_TAIL(3)
    FUSEDATTN_ROW_TAIL(4)
    FUSEDATTN_ROW_TAIL(5)
#undef FUSEDATTN_ROW_TAIL
    default:
      break;
  }
}

// C[rows, cols] (+)= A(rows, depth) · B[depth, cols]. cols must be a multiple of W; B and C
// must be readable/writable up to cols (callers pad their scratch buffers to that).
template <typename T>
inline void gemm(int64_t rows, int64_t cols, int64_t depth, StridedA<T> a, const T* b,
                 int64_t b_row_stride, T* c, int64_t c_row_stride, bool accumulate) {
  constexpr int W = Vec<T>::kWidth;
  int64_t n = 0;
  for (; n + kTileVecs * W <= cols; n += kTileVecs * W) {
    gemm_strip<T, kTileVecs>(rows, depth, a, b + n, b_row_stride, c + n, c_row_stride, accumulate);
  }
  switch ((cols - n) / W) {
#define FUSEDATTN_COL_TAIL(n_vecs)                                                           \
  case n_vecs:                                                                               \
    if constexpr (n_vecs < kTileVecs)                                                        \
      gemm_strip<T, n_vecs>(rows, depth, a, b + n, b_row_stride, c + n, c_row_stride, accumulate); \
    break;
    FUSEDATTN_COL_TAIL(1)
    FUSEDATTN_COL_TAIL(2)
    FUSEDATTN_COL_TAIL(3)
#undef FUSEDATTN_COL_TAIL
    default:
      break;
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
