// Helpers shared by the single-thread kernel profiles (profile_forward.cpp, profile_decode.cpp):
// a clock, medians, 64-byte-aligned buffers and the streaming-read bandwidth. Included after the
// kernel headers and `using namespace fusedattn::cpu::FUSEDATTN_ISA` (it uses VecT / vec_load).
#pragma once
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <new>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#define PROFILE_STRINGIFY_(x) #x
#define PROFILE_STRINGIFY(x) PROFILE_STRINGIFY_(x)

// Linux lets a process use AMX tiles only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM, as
// fusedattn's cpu_has_amx does); kernels built for the avx512amx ISA fault without it.
inline void request_amx_tiles() {
#if defined(__AMX_TILE__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
  syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData);
#endif
}

volatile float g_sink;  // keeps the results of timed loops alive

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : 0.5 * (values[mid - 1] + values[mid]);
}

void* aligned_buffer(size_t bytes) { return ::operator new[](bytes, std::align_val_t(64)); }
void free_buffer(void* p) { ::operator delete[](p, std::align_val_t(64)); }

// Best single-thread read bandwidth (GB/s) over `passes` sums of a `bytes` buffer.
double stream_read_gbs(size_t bytes, int passes) {
  using V = VecT<float>;
  constexpr int W = Vec<float>::kWidth;
  constexpr int kSums = 16;
  const size_t count = bytes / sizeof(float) / (kSums * W) * (kSums * W);
  float* buffer = static_cast<float*>(aligned_buffer(count * sizeof(float)));
  for (size_t i = 0; i < count; ++i) buffer[i] = 1.0f;
  double best = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    V sums[kSums] = {};
    const double t0 = now_us();
    for (size_t i = 0; i < count; i += kSums * W) {
#pragma GCC unroll 16
      for (int a = 0; a < kSums; ++a) sums[a] += vec_load<float>(buffer + i + a * W);
    }
    const double us = now_us() - t0;
    for (int a = 0; a < kSums; ++a) g_sink = g_sink + sums[a][0];
    best = std::max(best, count * sizeof(float) / us * 1e-3);
  }
  free_buffer(buffer);
  return best;
}
