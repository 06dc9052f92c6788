// What a paged KV cache's page order costs the memory system, without any attention kernel:
// two threads each read their own 512 MiB buffer in chunks (the cache pages), chunk after chunk
// in address order or in a shuffled order (a paged cache's random block table), with either
// nothing but a sum per 64-byte vector (a pure read) or 12 multiply-adds per vector (about the
// arithmetic density of GQA decode, which consumes data a little slower than memory delivers).
// The extra time per shuffled chunk is what every page jump costs the hardware prefetchers,
// which restart at each jump; decode of a paged cache pays it once per page of K and of V.
//
// page_order_read.py compiles this with -O3 -mavx512f -mfma. Usage: page_order_read REPS [huge];
// "huge" asks for 2 MiB pages (madvise MADV_HUGEPAGE), to tell page-table misses apart from
// the prefetchers' restarts; the JSON says how much of the process's memory they covered.
// prints one JSON object: per chunk size, the median GB/s (both threads together) of the four
// (order, density) cases, timed in turn within each repetition (this machine's bandwidth drifts
// between about 45 and 80 GB/s over minutes, so only interleaved cases compare).
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

constexpr size_t kBufferBytes = size_t{512} << 20;  // per thread, far beyond L3
constexpr int kThreads = 2;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// AnonHugePages of this process (KiB), from /proc/self/smaps_rollup; -1 if unreadable.
long anon_huge_kib() {
  FILE* f = std::fopen("/proc/self/smaps_rollup", "r");
  if (f == nullptr) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::sscanf(line, "AnonHugePages: %ld kB", &kib) == 1) break;
  }
  std::fclose(f);
  return kib;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : 0.5 * (values[mid - 1] + values[mid]);
}

// Reads the chunks of `buffer` in `order` (chunk indices, chunk_floats each); FMAS multiply-adds
// per vector (0: one add). Returns a value that depends on every element read.
template <int FMAS>
float read_chunks(const float* buffer, const std::vector<size_t>& order, size_t chunk_floats) {
  __m512 acc[8];
  for (__m512& a : acc) a = _mm512_setzero_ps();
  const __m512 factor = _mm512_set1_ps(1.0001f);
  for (size_t chunk : order) {
    const float* p = buffer + chunk * chunk_floats;
    for (size_t i = 0; i < chunk_floats; i += 128) {
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) {
        const __m512 x = _mm512_loadu_ps(p + i + v * 16);
        if constexpr (FMAS == 0) acc[v] = _mm512_add_ps(acc[v], x);
#pragma GCC unroll 16
        for (int f = 0; f < FMAS; ++f) acc[(v + f) % 8] = _mm512_fmadd_ps(x, factor, acc[(v + f) % 8]);
      }
    }
  }
  float total = 0.0f;
  for (__m512& a : acc) total += _mm512_reduce_add_ps(a);
  return total;
}

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  const bool huge = argc > 2 && std::strcmp(argv[2], "huge") == 0;
  std::vector<float*> buffers(kThreads);
  for (float*& b : buffers) {
    b = static_cast<float*>(std::aligned_alloc(size_t{2} << 20, kBufferBytes));
    if (b == nullptr) {
      std::fprintf(stderr, "page_order_read: cannot allocate %zu MiB\n", kBufferBytes >> 20);
      return 1;
    }
    madvise(b, kBufferBytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    std::fill(b, b + kBufferBytes / sizeof(float), 1.0f);
  }
  const long huge_kib = anon_huge_kib();
  std::string rows;
  for (size_t chunk_bytes : {size_t{16} << 10, size_t{32} << 10, size_t{64} << 10, size_t{128} << 10, size_t{256} << 10}) {
    const size_t chunks = kBufferBytes / chunk_bytes, chunk_floats = chunk_bytes / sizeof(float);
    std::vector<size_t> in_order(chunks), shuffled(chunks);
    for (size_t c = 0; c < chunks; ++c) in_order[c] = shuffled[c] = c;
    std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(1));
    std::vector<double> gbs[4];  // (in order, shuffled) x (sum, 12 FMAs), interleaved per repetition
    for (int rep = 0; rep < reps; ++rep) {
      for (int kind = 0; kind < 4; ++kind) {
        const std::vector<size_t>& order = kind % 2 ? shuffled : in_order;
        std::barrier start(kThreads + 1), stop(kThreads + 1);
        std::atomic<float> sink{0.0f};
        std::vector<std::thread> threads;
        for (int t = 0; t < kThreads; ++t) {
          threads.emplace_back([&, t] {
            start.arrive_and_wait();
            const float r = kind < 2 ? read_chunks<0>(buffers[t], order, chunk_floats)
                                     : read_chunks<12>(buffers[t], order, chunk_floats);
            sink = sink + r;
            stop.arrive_and_wait();
          });
        }
        start.arrive_and_wait();
        const double t0 = now_s();
        stop.arrive_and_wait();
        const double seconds = now_s() - t0;
        for (std::thread& t : threads) t.join();
        if (sink.load() == 1234.0f) std::puts("");  // keeps the reads alive
        gbs[kind].push_back(kThreads * kBufferBytes / seconds * 1e-9);
      }
    }
    char row[256];
    std::snprintf(row, sizeof(row),
                  "{\"chunk_kib\": %zu, \"in_order_sum\": %.2f, \"shuffled_sum\": %.2f, \"in_order_fma\": %.2f, "
                  "\"shuffled_fma\": %.2f}",
                  chunk_bytes >> 10, median(gbs[0]), median(gbs[1]), median(gbs[2]), median(gbs[3]));
    rows += (rows.empty() ? "" : ", ") + std::string(row);
  }
  for (float* b : buffers) std::free(b);
  std::printf("{\"threads\": %d, \"huge_pages_kib\": %ld, \"rows\": [%s]}\n", kThreads, huge_kib, rows.c_str());
  return 0;
}
