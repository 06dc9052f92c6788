// What the kernels need from CUDA, in one place, so that the same kernel sources also compile
// with a host C++ compiler against the emulator (csrc/cuda/emulation/): there every GPU thread
// is a fiber, and the warp-wide instructions (mma, ldmatrix, shuffles) are computed from the
// PTX ISA's fragment layouts. With nvcc this header is just the CUDA runtime plus the element
// types: fp16 and bf16 are 16-bit storage (uint16_t) with conversion helpers.
#pragma once
#include <cstdint>

#if defined(FUSEDATTN_CUDA_EMULATION)
#include "cuda/emulation/emulator.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#define FA_DEVICE __device__ __forceinline__

namespace fusedattn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- Element types: storage plus conversions -------------------------------------------------
// Kernels are templated on one of these tags. fp16/bf16 move as raw 16-bit words (cp.async,
// ldmatrix) and only convert at the edges.

struct Fp16 {
  using Storage = uint16_t;
  static constexpr const char* kName = "float16";
  FA_DEVICE static float to_float(uint16_t x) {
#if defined(FUSEDATTN_CUDA_EMULATION)
    return emu::half_to_float(x);
#else
    return __half2float(__ushort_as_half(x));
#endif
  }
  FA_DEVICE static uint16_t from_float(float x) {
#if defined(FUSEDATTN_CUDA_EMULATION)
    return emu::float_to_half(x);
#else
    return __half_as_ushort(__float2half_rn(x));
#endif
  }
  // Two floats as one 32-bit register of two fp16 (lo in the low half), rounded to nearest.
  FA_DEVICE static uint32_t pack2(float lo, float hi) {
#if defined(FUSEDATTN_CUDA_EMULATION)
    return emu::float_to_half(lo) | (static_cast<uint32_t>(emu::float_to_half(hi)) << 16);
#else
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
#endif
  }
};

struct Bf16 {
  using Storage = uint16_t;
  static constexpr const char* kName = "bfloat16";
  FA_DEVICE static float to_float(uint16_t x) {
#if defined(FUSEDATTN_CUDA_EMULATION)
    return emu::bf16_to_float(x);
#else
    return __bfloat162float(__ushort_as_bfloat16(x));
#endif
  }
  FA_DEVICE static uint16_t from_float(float x) {
#if defined(FUSEDATTN_CUDA_EMULATION)
    return emu::float_to_bf16(x);
#else
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#endif
  }
  FA_DEVICE static uint32_t pack2(float lo, float hi) {
#if defined(FUSEDATTN_CUDA_EMULATION)
    return emu::float_to_bf16(lo) | (static_cast<uint32_t>(emu::float_to_bf16(hi)) << 16);
#else
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
#endif
  }
};

struct Fp32 {
  using Storage = float;
  static constexpr const char* kName = "float32";
  FA_DEVICE static float to_float(float x) { return x; }
  FA_DEVICE static float from_float(float x) { return x; }
};

FA_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FA_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Dynamic shared memory of the running block, 128-byte aligned.
FA_DEVICE char* shared_memory() {
#if defined(FUSEDATTN_CUDA_EMULATION)
  return emu::shared_memory();
#else
  extern __shared__ __align__(128) char smem[];
  return smem;
#endif
}

FA_DEVICE float warp_max_quad(float x) {  // max over the 4 lanes of a quad (lanes 4g..4g+3)
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

FA_DEVICE float warp_sum_quad(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

FA_DEVICE float warp_max(float x) {
  for (int mask = 16; mask > 0; mask >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

FA_DEVICE float warp_sum(float x) {
  for (int mask = 16; mask > 0; mask >>= 1) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

}  // namespace cuda
}  // namespace fusedattn
