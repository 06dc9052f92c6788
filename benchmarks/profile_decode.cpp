// Where decode's time goes, one thread: the decode kernel (decode_block_t) on one block of one
// token's 32 query heads (head_dim 128) against a (batch, L, Hkv, 128) cache, Hkv = 32 (MHA) or
// 8 (GQA), fp32 and bf16, the inference issue's decode shapes. Each case runs twice:
//   cached  an eighth of the heads (4 query heads, with 4 kv heads for MHA or 1 for GQA) and L
//           small enough that the block's K+V (512 KiB) stay in L2 across calls: what the
//           kernel's arithmetic allows (GB/s of K/V it could consume);
//   dram    L = 4096, cycling over 8 batches (128–1024 MiB, far beyond L3): what it reaches
//           streaming from memory.
// Next to them, the single-thread streaming-read bandwidth (best of the sums of a buffer) of the
// same two sizes. A kernel whose cached rate is not well above the DRAM stream cannot reach the stream.
//
// profile_decode.py compiles this file with the flags CMakeLists.txt gives the ISA's kernels
// (-DFUSEDATTN_ISA=avx512 or avx512bf16, -I csrc). Medians of REPS timings (20x as many for the
// cached cases), after two warm-up runs.
// Usage: profile_decode REPS; prints one JSON object (GB/s of K/V read).
//        profile_decode perf HKV fp32|bf16 REPS: only the full block of all 32 query heads over
//        Hkv kv heads, L small enough that its K+V (512 KiB) stay in L2, REPS calls; prints its
//        GB/s. For a sampling profiler (profile_decode.py --perf runs it under perf record).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "cpu/decode_block.h"

using namespace fusedattn;
using namespace fusedattn::cpu::FUSEDATTN_ISA;

#include "profile_util.h"

constexpr int64_t kHeads = 32;
constexpr int64_t kHeadDim = 128;
constexpr int64_t kDramLen = 4096;
constexpr int64_t kDramBatches = 8;
constexpr int64_t kCachedBytes = 512 * 1024;  // K+V of one block in the cached case

// Median GB/s of K/V read by decode_block_t over `batches` caches of `len` rows, a call per batch.
template <typename T>
double decode_gbs(int64_t heads, int64_t heads_kv, int64_t len, int64_t batches, int reps) {
  const int64_t row = heads_kv * kHeadDim;  // elements per cache row (all kv heads)
  std::vector<T> q(batches * heads * kHeadDim), out(batches * heads * kHeadDim);
  std::vector<T> k(batches * len * row), v(batches * len * row);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (auto* x : {&q, &k, &v}) {
    for (T& e : *x) e = from_float<T>(normal(rng));
  }
  AttentionParams p;
  p.dtype = std::is_same_v<T, float> ? DType::kFloat32 : DType::kBFloat16;
  p.q = p.out = TensorRef{nullptr, heads * kHeadDim, kHeadDim, heads * kHeadDim};  // (B, 1, H, D)
  p.k = p.v = TensorRef{nullptr, len * row, kHeadDim, row};                             // (B, L, Hkv, D)
  p.q.data = q.data();
  p.out.data = out.data();
  p.k.data = k.data();
  p.v.data = v.data();
  p.batch = batches;
  p.num_heads = heads;
  p.num_heads_kv = heads_kv;
  p.seqlen_q = 1;
  p.seqlen_k = len;
  p.head_dim = kHeadDim;
  p.scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  void* scratch = ::operator new[](forward_scratch_bytes_t<T>(p, heads), std::align_val_t(64));
  cpu::ForwardBlock block;
  block.head_count = heads;
  block.row_end = 1;
  block.key_hi = len;
  std::vector<double> samples;
  for (int rep = 0; rep < reps + 2; ++rep) {
    const double t0 = now_us();
    for (int64_t b = 0; b < batches; ++b) {
      block.batch = b;
      decode_block_t<T>(p, block, scratch);
    }
    const double us = now_us() - t0;
    if (rep >= 2) samples.push_back(2.0 * batches * len * row * sizeof(T) / us * 1e-3);
  }
  ::operator delete[](scratch, std::align_val_t(64));
  return median(samples);
}

template <typename T>
std::string profile_case(const char* dtype, int64_t heads_kv, int reps) {
  const int64_t cached_heads = kHeads / 8, cached_heads_kv = heads_kv / 8;
  const int64_t cached_len = kCachedBytes / (2 * cached_heads_kv * kHeadDim * static_cast<int64_t>(sizeof(T)));
  const double cached = decode_gbs<T>(cached_heads, cached_heads_kv, cached_len, 1, reps * 20);
  const double dram = decode_gbs<T>(kHeads, heads_kv, kDramLen, kDramBatches, reps);
  char text[256];
  std::snprintf(text, sizeof(text), "{\"dtype\": \"%s\", \"heads_kv\": %lld, \"cached_len\": %lld, \"cached_gbs\": %.2f, \"dram_gbs\": %.2f}",
                dtype, static_cast<long long>(heads_kv), static_cast<long long>(cached_len), cached, dram);
  return text;
}

int main(int argc, char** argv) {
  request_amx_tiles();
  if (argc == 5 && std::string(argv[1]) == "perf") {
    const int64_t heads_kv = std::atoi(argv[2]);
    const bool bf16 = std::string(argv[3]) == "bf16";
    const int reps = std::max(1, std::atoi(argv[4]));
    if (heads_kv < 1 || kHeads % heads_kv != 0) {
      std::fprintf(stderr, "profile_decode perf: HKV must divide %lld\n", static_cast<long long>(kHeads));
      return 1;
    }
    const int64_t len = kCachedBytes / (2 * heads_kv * kHeadDim * (bf16 ? 2 : 4));
    const double gbs = bf16 ? decode_gbs<BFloat16>(kHeads, heads_kv, len, 1, reps)
                            : decode_gbs<float>(kHeads, heads_kv, len, 1, reps);
    std::printf("{\"heads_kv\": %lld, \"len\": %lld, \"gbs\": %.2f}\n", static_cast<long long>(heads_kv),
                static_cast<long long>(len), gbs);
    return 0;
  }
  const int reps = argc > 1 ? std::atoi(argv[1]) : 9;
  std::string cases;
  for (int64_t heads_kv : {int64_t{32}, int64_t{8}}) {
    cases += (cases.empty() ? "" : ", ") + profile_case<float>("fp32", heads_kv, reps);
    cases += ", " + profile_case<BFloat16>("bf16", heads_kv, reps);
  }
  const double cached = stream_read_gbs(kCachedBytes, reps * 20), dram = stream_read_gbs(size_t{512} << 20, reps);
  std::printf("{\"isa\": \"%s\", \"stream_cached_gbs\": %.2f, \"stream_dram_gbs\": %.2f, \"cases\": [%s]}\n",
              PROFILE_STRINGIFY(FUSEDATTN_ISA), cached, dram, cases.c_str());
  return 0;
}
