// Register-blocked micro-kernel for the products of attention, on the Vec vocabulary:
//   C[m, n] (+)= sum_k A(m, k) * B[k, n]
// A is read one element at a time (broadcast), at A + m*a_row_stride + k*a_k_stride, so it can be
// K (row-major) or Pᵀ (column access) without packing. B rows are contiguous in n (Qᵀ packed,
// or V rows). C is row-major. A tile is kRows x (kVecs*W) held in kRows*kVecs accumulators.
// The multiply-add is a policy: FmaOp<T> (C, A, B all T), or Bf16PairOp where every A and B
// element is a pair of bf16 along k (the VNNI layout) and one VDPBF16PS adds both products
// into fp32 C, so a k step does twice the work of an fp32 FMA.
// The tile sizes (kTileRows, kTileVecs) per ISA are in tiles.h.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "cpu/tiles.h"
#include "cpu/vec.h"

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

// Strided read-only operand A(m, k).
template <typename T>
struct StridedA {
  const T* data;
  int64_t row_stride;
  int64_t k_stride;
};

// C, A, B all of type T: acc += broadcast(a) * b.
template <typename T>
struct FmaOp {
  using C = T;
  using A = T;
  using B = T;
  static VecT<T> broadcast(const A* a) { return vec_set1<T>(*a); }
  static VecT<T> load_b(const B* b) { return vec_load<T>(b); }
  static VecT<T> madd(VecT<T> acc, VecT<T> a, VecT<T> b) { return a * b + acc; }
};

#if defined(__AVX512BF16__)
// A and B elements are uint32 holding two bf16 (k even in the low half, k odd in the high half);
// C is fp32 and acc += a.lo * b.lo + a.hi * b.hi per lane (VDPBF16PS).
struct Bf16PairOp {
  using C = float;
  using A = uint32_t;
  using B = uint32_t;
  static VecT<float> broadcast(const A* a) {
    uint32_t bits;
    std::memcpy(&bits, a, sizeof(bits));
    return reinterpret_cast<VecT<float>>(_mm512_set1_epi32(static_cast<int>(bits)));
  }
  static VecT<float> load_b(const B* b) {
    VecT<float> v;
    std::memcpy(&v, b, sizeof(v));
    return v;
  }
  static VecT<float> madd(VecT<float> acc, VecT<float> a, VecT<float> b) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
};
#endif

template <typename Op, int kRows, int kVecs>
inline void gemm_tile(int64_t depth, StridedA<typename Op::A> a, const typename Op::B* b, int64_t b_row_stride,
                      typename Op::C* c, int64_t c_row_stride, bool accumulate) {
  using T = typename Op::C;
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
    for (int v = 0; v < kVecs; ++v) bv[v] = Op::load_b(b + k * b_row_stride + v * W);
    const typename Op::A* a_col = a.data + k * a.k_stride;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const V av = Op::broadcast(a_col + r * a.row_stride);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[r][v] = Op::madd(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) vec_store<T>(c + r * c_row_stride + v * W, acc[r][v]);
  }
}

// One column strip of width kVecs*W over all `rows`, in kTileRows blocks plus a tail.
template <typename Op, int kVecs>
inline void gemm_strip(int64_t rows, int64_t depth, StridedA<typename Op::A> a, const typename Op::B* b,
                       int64_t b_row_stride, typename Op::C* c, int64_t c_row_stride, bool accumulate) {
  int64_t m = 0;
  for (; m + kTileRows <= rows; m += kTileRows) {
    const StridedA<typename Op::A> a_m{a.data + m * a.row_stride, a.row_stride, a.k_stride};
    gemm_tile<Op, kTileRows, kVecs>(depth, a_m, b, b_row_stride, c + m * c_row_stride, c_row_stride, accumulate);
  }
  const StridedA<typename Op::A> a_m{a.data + m * a.row_stride, a.row_stride, a.k_stride};
  typename Op::C* c_m = c + m * c_row_stride;
  switch (rows - m) {
#define FUSEDATTN_ROW_TAIL(n)                                                              \
  case n:                                                                                  \
    if constexpr (n < kTileRows)                                                           \
      gemm_tile<Op, n, kVecs>(depth, a_m, b, b_row_stride, c_m, c_row_stride, accumulate); \
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
template <typename Op>
inline void gemm_op(int64_t rows, int64_t cols, int64_t depth, StridedA<typename Op::A> a, const typename Op::B* b,
                    int64_t b_row_stride, typename Op::C* c, int64_t c_row_stride, bool accumulate) {
  constexpr int W = Vec<typename Op::C>::kWidth;
  int64_t n = 0;
  for (; n + kTileVecs * W <= cols; n += kTileVecs * W) {
    gemm_strip<Op, kTileVecs>(rows, depth, a, b + n, b_row_stride, c + n, c_row_stride, accumulate);
  }
  switch ((cols - n) / W) {
#define FUSEDATTN_COL_TAIL(n_vecs)                                                                  \
  case n_vecs:                                                                                      \
    if constexpr (n_vecs < kTileVecs)                                                               \
      gemm_strip<Op, n_vecs>(rows, depth, a, b + n, b_row_stride, c + n, c_row_stride, accumulate); \
    break;
    FUSEDATTN_COL_TAIL(1)
    FUSEDATTN_COL_TAIL(2)
    FUSEDATTN_COL_TAIL(3)
#undef FUSEDATTN_COL_TAIL
    default:
      break;
  }
}

template <typename T>
inline void gemm(int64_t rows, int64_t cols, int64_t depth, StridedA<T> a, const T* b, int64_t b_row_stride, T* c,
                 int64_t c_row_stride, bool accumulate) {
  gemm_op<FmaOp<T>>(rows, cols, depth, a, b, b_row_stride, c, c_row_stride, accumulate);
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
