// Element types of the CPU kernels and their conversions to the fp32/fp64 compute type.
// fp16 is the compiler's _Float16, widened a vector at a time by the F16C / AVX-512 intrinsics;
// bf16 is converted by hand: widening is a shift, narrowing rounds to nearest even.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {  // per-ISA copies: the linker must not merge F16C code into scalar

struct BFloat16 {
  uint16_t bits;
};
using Half = _Float16;

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(Half x) { return static_cast<float>(x); }
inline float to_float(BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline T from_float(float x);
template <typename T>
inline T from_float(double x);

template <>
inline float from_float<float>(float x) { return x; }
template <>
inline double from_float<double>(double x) { return x; }
template <>
inline Half from_float<Half>(float x) { return static_cast<Half>(x); }
template <>
inline BFloat16 from_float<BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((bits >> 16) | 0x40)};
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return BFloat16{static_cast<uint16_t>(bits >> 16)};
}

// Converts the first (count / kConvertLanes) * kConvertLanes elements of src to float, a vector
// at a time; returns how many. bf16 widens by a 16-bit shift, fp16 by VCVTPH2PS (F16C). The
// scalar build converts nothing here (returns 0).
#if defined(__AVX512F__)
constexpr int kConvertLanes = 16;
#elif defined(__AVX2__)
constexpr int kConvertLanes = 8;
#else
constexpr int kConvertLanes = 0;
#endif
constexpr int kConvertTypeLanes = kConvertLanes ? kConvertLanes : 2;  // the types must exist either way
typedef float ConvertFloats __attribute__((vector_size(kConvertTypeLanes * sizeof(float))));
typedef uint32_t ConvertU32 __attribute__((vector_size(kConvertTypeLanes * sizeof(uint32_t))));
typedef uint16_t ConvertU16 __attribute__((vector_size(kConvertTypeLanes * sizeof(uint16_t))));
typedef uint8_t ConvertBytes __attribute__((vector_size(kConvertTypeLanes)));
typedef int32_t ConvertI32 __attribute__((vector_size(kConvertTypeLanes * sizeof(int32_t))));

// kConvertLanes elements of src as floats (T: float, bf16 or fp16; kConvertLanes > 0). bf16 on
// AVX-512 is one VPMOVZXWD from memory and one shift; fp16 one VCVTPH2PS (GCC 12 turns
// __builtin_convertvector of _Float16 into one scalar conversion per element: fp16 decode ran at
// a third of bf16's bandwidth).
template <typename T>
inline ConvertFloats widen_vector(const T* src) {
  ConvertFloats out;
  if constexpr (std::is_same_v<T, BFloat16>) {
#if defined(__AVX512F__)
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    return (ConvertFloats)_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
#else
    ConvertU16 bits;
    std::memcpy(&bits, src, sizeof(bits));
    const ConvertU32 wide = __builtin_convertvector(bits, ConvertU32) << 16;
    std::memcpy(&out, &wide, sizeof(out));
#endif
  } else if constexpr (std::is_same_v<T, Half>) {
#if defined(__AVX512F__)
    return (ConvertFloats)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#elif defined(__F16C__)  // (every AVX2 build has -mf16c)
    return (ConvertFloats)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
#else
    static_assert(sizeof(T) == 0, "the scalar build converts fp16 element by element, never a vector");
#endif
  } else {
    std::memcpy(&out, src, sizeof(out));
  }
  return out;
}

template <typename T>
inline int64_t convert_to_float_vectors(const T* src, int64_t count, float* dst) {
  int64_t c = 0;
  if constexpr (kConvertLanes > 0) {
    for (; c + kConvertLanes <= count; c += kConvertLanes) {
      const ConvertFloats out = widen_vector(src + c);
      std::memcpy(dst + c, &out, sizeof(out));
    }
  }
  return c;
}

// The accumulation type of an element type: fp64 for fp64, fp32 for everything else.
template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
