// The handful of sm_80 instructions the tensor-core kernels use, as small inline-PTX wrappers
// (no CUTLASS/CuTe: the build stays dependency-free and short; docs/cuda.md). Each wrapper
// states the register layout it produces, from the PTX ISA's "Matrix Fragments for
// mma.m16n8k16" and "ldmatrix" sections. Notation: lane = threadIdx.x % 32, g = lane / 4
// (group), t = lane % 4 (thread in group).
//
//   mma.m16n8k16  A (16x16, row-major)  a0:(g, 2t..2t+1)  a1:(g+8, 2t..)  a2:(g, 2t+8..)  a3:(g+8, 2t+8..)
//                 B (16x8,  k x n)      b0:(k=2t..2t+1, n=g)  b1:(k=2t+8..2t+9, n=g)
//                 C/D (16x8 fp32)       c0,c1:(g, 2t..2t+1)  c2,c3:(g+8, 2t..2t+1)
//   ldmatrix.x4   lanes 8i..8i+7 give the row addresses of 8x8 matrix i; each lane receives
//                 r[i] = matrix i (row g, cols 2t..2t+1); with .trans (rows 2t..2t+1, col g).
// In a 32-bit register of two 16-bit values the lower-indexed one is in the low half.
#pragma once
#include "cuda/compat.cuh"

namespace fusedattn {
namespace cuda {

#if !defined(FUSEDATTN_CUDA_EMULATION)
FA_DEVICE uint32_t smem_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// 16 bytes global -> shared, asynchronously; bytes past src_bytes (0..16) are zero-filled.
// Both addresses 16-byte aligned; with src_bytes = 0 nothing is read (src must still be valid).
FA_DEVICE void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if defined(FUSEDATTN_CUDA_EMULATION)
  emu::cp_async_16(smem, gmem, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(src_bytes));
#endif
}

// Closes the group of cp.async issued since the last commit.
FA_DEVICE void cp_async_commit() {
#if defined(FUSEDATTN_CUDA_EMULATION)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
FA_DEVICE void cp_async_wait() {
#if defined(FUSEDATTN_CUDA_EMULATION)
  emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(FUSEDATTN_CUDA_EMULATION)
  emu::ldmatrix_x4(r, smem, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
#endif
}

FA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if defined(FUSEDATTN_CUDA_EMULATION)
  emu::ldmatrix_x4(r, smem, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
#endif
}

// d += a · b on the tensor cores: m16n8k16, fp16 or bf16 inputs, fp32 accumulators.
template <typename T>
FA_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
FA_DEVICE void mma_16816<Fp16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FUSEDATTN_CUDA_EMULATION)
  emu::mma_16816(d, a, b0, b1, false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
FA_DEVICE void mma_16816<Bf16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FUSEDATTN_CUDA_EMULATION)
  emu::mma_16816(d, a, b0, b1, true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// 2^x on the special-function unit (rel. error ~2^-22; -inf -> 0). The fp16/bf16 kernels'
// softmax runs in base 2 with the scores pre-multiplied by log2(e), as FlashAttention does.
FA_DEVICE float exp2_approx(float x) {
#if defined(FUSEDATTN_CUDA_EMULATION)
  return emu::exp2_approx(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

}  // namespace cuda
}  // namespace fusedattn
