// A small CUDA emulator for the kernels of csrc/cuda: the same kernel sources, compiled by a
// host C++ compiler with -DFUSEDATTN_CUDA_EMULATION, run on the CPU. Every GPU thread is a
// fiber (ucontext) of one OS thread; a block's fibers run round-robin and switch only at
// __syncthreads and at warp-wide instructions, which complete once all 32 lanes have arrived
// and are then computed from the PTX ISA's definitions (mma.m16n8k16 fragments, ldmatrix with
// and without .trans, shuffles). It checks what it can: shared-memory bounds and 16-byte
// alignment of cp.async / ldmatrix, warps that diverge at a collective, deadlocks, cp.async
// groups left in flight; shared memory starts as NaN bytes, so unwritten reads show up.
// cp.async can complete at issue or as late as the wait allows, and warps can run in lockstep
// or each as far ahead as it can (Options), which exposes missing waits and barriers. It is a correctness tool, about 10^5 times slower than a GPU.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = void*;

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

void __syncthreads();
int __syncthreads_or(int predicate);
void __syncwarp(unsigned mask = 0xffffffffu);
float __shfl_xor_sync(unsigned mask, float value, int lane_mask);
float __shfl_sync(unsigned mask, float value, int src_lane);

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {

struct Options {
  bool late_cp_async = false;       // complete cp.async at the wait instead of at issue
  bool reverse_schedule = false;    // run a block's fibers (or warps) last-to-first
  bool greedy_warps = false;        // run one warp as far as it gets before the next: warps drift apart
  int multiprocessors = 8;          // what the launchers read as the SM count
};
Options& options();

// Runs body() as every thread of every block of the grid (sequentially over blocks).
void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);
uint64_t launched_blocks();  // blocks run so far (statistics)

char* shared_memory();
void cp_async_16(void* smem, const void* gmem, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void copy_16(void* dst, const void* src);
inline float exp2_approx(float x) { return std::exp2(x); }

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);

}  // namespace emu
