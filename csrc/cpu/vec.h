// A tiny SIMD vocabulary for the CPU kernels, on GCC/Clang vector extensions so one source
// compiles to AVX-512 (16 floats), AVX2 (8 floats) or plain scalars (width 1), depending on the
// flags of the translation unit that includes it (see attention_isa.cpp).
// Vec<T>::type is the register type; the free functions below are the only operations used.
// exp_vec is a Cephes-style polynomial exp (|rel err| <= 2 ulp on [-87.3, 88]) that returns
// exactly 0 for inputs below -87.3 (so -inf scores give probability 0) and NaN for NaN.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 0;  // scalar: one element per "vector"
#endif

template <typename T>
constexpr int vec_width() {
  return kVecBytes == 0 ? 1 : kVecBytes / static_cast<int>(sizeof(T));
}

template <typename T, int W = vec_width<T>()>
struct Vec {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
  static constexpr int kWidth = W;
};
template <typename T>
struct Vec<T, 1> {
  using type = T;
  static constexpr int kWidth = 1;
};

template <typename T>
using VecT = typename Vec<T>::type;

template <typename T>
inline VecT<T> vec_load(const T* p) {
  VecT<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vec_store(T* p, VecT<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Every lane x, as one broadcast: x - 0 is exactly x, so the compiler drops the subtraction
// (`VecT<T>{} + x` kept an addition of 0 before each broadcast, since 0 + -0.0 is +0.0).
template <typename T>
inline VecT<T> vec_set1(T x) {
  if constexpr (Vec<T>::kWidth == 1) {
    return x;
  } else {
    return x - VecT<T>{};
  }
}

template <typename T>
inline VecT<T> vec_max(VecT<T> a, VecT<T> b) {
  return a > b ? a : b;
}

template <typename T>
inline T vec_lane(VecT<T> v, int lane) {
  if constexpr (Vec<T>::kWidth == 1) {
    return v;
  } else {
    return v[lane];
  }
}

// True (all lanes) when every lane of a equals the matching lane of b.
template <typename T>
inline bool vec_all_equal(VecT<T> a, VecT<T> b) {
  for (int lane = 0; lane < Vec<T>::kWidth; ++lane) {
    if (vec_lane<T>(a, lane) != vec_lane<T>(b, lane)) return false;
  }
  return true;
}

inline float exp_scalar(float x) { return std::exp(x); }
inline double exp_scalar(double x) { return std::exp(x); }

// e^r for |r| <= ln2 / 2 (Cephes' expf polynomial).
template <typename T>
inline VecT<T> exp_reduced_polynomial(VecT<T> r) {
  VecT<T> p = vec_set1<T>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.0f;
}

// exp over every lane. float vectors use the polynomial; scalars and doubles use libm.
template <typename T>
inline VecT<T> exp_vec(VecT<T> x) {
  if constexpr (Vec<T>::kWidth == 1) {
    return exp_scalar(x);
  } else if constexpr (sizeof(T) == 8) {
    VecT<T> y;
    for (int lane = 0; lane < Vec<T>::kWidth; ++lane) y[lane] = std::exp(x[lane]);
    return y;
  } else {
    constexpr int W = Vec<T>::kWidth;
#if defined(__AVX512F__)
    if constexpr (W == 16) {
      // n = round(x / ln2) by VRNDSCALEPS, 2^n applied by VSCALEFPS (no integer exponent
      // arithmetic, no upper clamp: 2^n overflows to inf by itself); the polynomial is below.
      const VecT<T> kLowest = vec_set1<T>(-87.33654f);
      const VecT<T> xc = vec_max<T>(x, kLowest);
      const VecT<T> nf = _mm512_roundscale_ps(xc * 1.44269504088896341f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      VecT<T> r = xc - nf * 0.693359375f;
      r = r - nf * -2.12194440e-4f;
      const VecT<T> y = _mm512_scalef_ps(exp_reduced_polynomial<T>(r), nf);
      const VecT<T> y_or_zero = x < kLowest ? vec_set1<T>(0.0f) : y;
      return x != x ? x : y_or_zero;  // NaN in, NaN out
    }
#endif
    typedef int32_t IntVec __attribute__((vector_size(W * sizeof(int32_t))));
    const VecT<T> kLowest = vec_set1<T>(-87.33654f);
    const VecT<T> xc = vec_max<T>(x, kLowest);
    const VecT<T> xm = xc < vec_set1<T>(88.3762626647949f) ? xc : vec_set1<T>(88.3762626647949f);
    // n = round(x / ln2); r = x - n ln2 (ln2 split in two for precision).
    const VecT<T> t = xm * 1.44269504088896341f + 0.5f;
    IntVec n = __builtin_convertvector(t, IntVec);
    n += (__builtin_convertvector(n, VecT<T>) > t);  // truncation -> floor (true lanes are -1)
    const VecT<T> nf = __builtin_convertvector(n, VecT<T>);
    VecT<T> r = xm - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    const VecT<T> p = exp_reduced_polynomial<T>(r);
    const IntVec bits = (n + 127) << 23;
    VecT<T> scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const VecT<T> y = p * scale;
    const VecT<T> y_or_zero = x < kLowest ? vec_set1<T>(0.0f) : y;
    return x != x ? x : y_or_zero;  // NaN in, NaN out
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
