// Two facts about the CPU that decide the decode kernel's design (cpu_rates.py runs it):
//  1. instruction rates, in cycles (the clock from a chain of dependent IMULs, 3 cycles each):
//     VDPBF16PS and VFMADD231PS on 512-bit registers, throughput (12 independent chains) and
//     latency (one chain);
//  2. one thread streaming two 512 MiB arrays ("K" and "V") with arithmetic between the loads:
//     per 2 KiB row, 32 K lines each followed by WORK FMAs, V's lines fetched by prefetcht0 for
//     later (as the decode's score pass stages V). GB/s of K+V read with the hardware
//     prefetchers alone for K, and with every K line prefetched 1-16 KiB ahead, spread one per
//     line; and the rate the arithmetic alone allows.
// Usage: cpu_rates; prints one JSON object.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double cycles_per_second() {
  const long n = 500000000;
  long x = 3;
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) asm volatile("imul %0, %0\n\timul %0, %0" : "+r"(x));
  return 2.0 * 3.0 * n / seconds_since(t0);
}

#define TWELVE(op)                                                                        \
  op " %%zmm30, %%zmm31, %%zmm0\n\t" op " %%zmm30, %%zmm31, %%zmm1\n\t" op                \
     " %%zmm30, %%zmm31, %%zmm2\n\t" op " %%zmm30, %%zmm31, %%zmm3\n\t" op                \
     " %%zmm30, %%zmm31, %%zmm4\n\t" op " %%zmm30, %%zmm31, %%zmm5\n\t" op                \
     " %%zmm30, %%zmm31, %%zmm6\n\t" op " %%zmm30, %%zmm31, %%zmm7\n\t" op                \
     " %%zmm30, %%zmm31, %%zmm8\n\t" op " %%zmm30, %%zmm31, %%zmm9\n\t" op                \
     " %%zmm30, %%zmm31, %%zmm10\n\t" op " %%zmm30, %%zmm31, %%zmm11\n\t"
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"

// Cycles per instruction: 12 independent chains (throughput) or one chain of two (latency).
template <bool kDot, bool kChain>
double cycles(double hz) {
  const long n = 100000000;
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
    if constexpr (kDot && !kChain) asm volatile(TWELVE("vdpbf16ps") ::: CLOBBERS);
    if constexpr (!kDot && !kChain) asm volatile(TWELVE("vfmadd231ps") ::: CLOBBERS);
    if constexpr (kDot && kChain) asm volatile("vdpbf16ps %%zmm30, %%zmm31, %%zmm0\n\tvdpbf16ps %%zmm30, %%zmm31, %%zmm0" ::: "xmm0");
    if constexpr (!kDot && kChain) asm volatile("vfmadd231ps %%zmm30, %%zmm31, %%zmm0\n\tvfmadd231ps %%zmm30, %%zmm31, %%zmm0" ::: "xmm0");
  }
  return seconds_since(t0) * hz / (n * (kChain ? 2.0 : 12.0));
}

constexpr size_t kArrayBytes = size_t(512) << 20;
constexpr int kRowBytes = 2048;
constexpr int kWork = 16;  // FMAs per K line (8 chains of 2): about 8 cycles, 64 B of K + 64 of V

// GQA bf16 decode's arithmetic per byte, roughly. ahead: bytes of K prefetched ahead (0: none).
double stream(const char* k, const char* v, long ahead) {
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t r = 0; r < kArrayBytes / kRowBytes; ++r) {
    const char* k_row = k + r * kRowBytes;
    const char* v_row = v + r * kRowBytes;
    for (int line = 0; line < kRowBytes / 64; ++line) {
      if (ahead > 0 && r * kRowBytes + line * 64 + ahead < kArrayBytes) _mm_prefetch(k_row + 64 * line + ahead, _MM_HINT_T0);
      _mm_prefetch(v_row + 64 * line, _MM_HINT_T0);
      const __m512 x = _mm512_loadu_ps(reinterpret_cast<const float*>(k_row + 64 * line));
      for (int w = 0; w < kWork / 8; ++w) {
        asm volatile(
            "vfmadd231ps %0, %0, %%zmm20\n\tvfmadd231ps %0, %0, %%zmm21\n\tvfmadd231ps %0, %0, %%zmm22\n\t"
            "vfmadd231ps %0, %0, %%zmm23\n\tvfmadd231ps %0, %0, %%zmm24\n\tvfmadd231ps %0, %0, %%zmm25\n\t"
            "vfmadd231ps %0, %0, %%zmm26\n\tvfmadd231ps %0, %0, %%zmm27" ::"v"(x)
            : "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27");
      }
    }
  }
  return 2.0 * kArrayBytes / seconds_since(t0) / 1e9;
}

}  // namespace

int main() {
  const double hz = cycles_per_second();
  std::printf("{\"ghz\": %.2f, \"dpbf16_throughput\": %.2f, \"fma_throughput\": %.2f, ", hz / 1e9,
              cycles<true, false>(hz), cycles<false, false>(hz));
  std::printf("\"dpbf16_latency\": %.2f, \"fma_latency\": %.2f, ", cycles<true, true>(hz), cycles<false, true>(hz));
  char* k = static_cast<char*>(std::aligned_alloc(4096, kArrayBytes));
  char* v = static_cast<char*>(std::aligned_alloc(4096, kArrayBytes));
  std::memset(k, 1, kArrayBytes);
  std::memset(v, 1, kArrayBytes);
  // The arithmetic alone: 16 FMAs on 8 chains, 2 per cycle, per 128 bytes of K+V.
  std::printf("\"arithmetic_gbs\": %.1f, \"stream\": {", 128.0 / (kWork / 2.0) * hz / 1e9);
  const long aheads[] = {0, 1024, 2048, 4096, 8192, 16384};
  for (int i = 0; i < 6; ++i) {
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      const double gbs = stream(k, v, aheads[i]);
      best = gbs > best ? gbs : best;
    }
    std::printf("%s\"%ld\": %.1f", i ? ", " : "", aheads[i], best);
  }
  std::printf("}}\n");
  std::free(k);
  std::free(v);
  return 0;
}
