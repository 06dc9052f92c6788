// Where the CPU forward's time goes: one q-block of the (1, 8, 2048, 128) non-causal forward
// (query rows 0..255 of head 0 against all 2048 keys, key blocks of kBlockN), one thread.
//
// profile_forward.py compiles this file once per AVX-512 ISA with the flags CMakeLists.txt gives
// that ISA's kernel library (-DFUSEDATTN_ISA=avx512 or avx512bf16, -I csrc). It includes the
// kernel headers and calls their functions on the kernel's own scratch layout (ForwardScratch,
// with Qᵀ packed by one call of forward_block_t), with the arguments forward_block_t passes.
// Each phase is timed on its own, over the q-block's 32 key blocks or once per q-block:
//   qk       Sᵀ = K·Qᵀ: gemm<float> (K read in place, or kv_block's converted bf16 K), or
//            key_pairs + gemm_op<Bf16PairOp> (bf16 on avx512bf16)
//   scale    the scaling pass of Sᵀ (bf16 on avx512bf16 only: Qᵀ is packed unscaled there)
//   softmax  modify_scores (nothing to do here) + softmax_step, on each key block's real scores
//            (copied back into Sᵀ before each block, outside the timing)
//   rescale  the rescale of O by the factors that softmax_step left
//   pack     kv_block of K and V (fp32: in place, nothing to do; bf16: converted to fp32), or
//            value_pairs of V + pack_float_row_pairs of P (bf16 on avx512bf16)
//   pv       O += P·V: gemm<float>, or gemm_op<Bf16PairOp>
//   pack_q   once: Qᵀ (scaled), or pack_transposed_pairs of Q (bf16 on avx512bf16)
//   output   once: write_block_output
//   whole    forward_block_t for the q-block
// The scaling pass and the O rescale are loops written inline in forward_block_t, not
// functions, so they are repeated here (marked "as forward_block_t"); the
// rest of its per-lane setup and the zeroing of O are only in the whole. The phases are compiled
// here, not inside forward_block_t, so their code can differ a little from the kernel's: the
// whole minus the sum of the phases shows by how much. Phases and whole are interleaved over
// the repetitions and their medians reported. Also measured, for comparison: the fp32 FMA peak
// (and the VDPBF16PS peak) from register-only loops, and the single-thread streaming-read
// bandwidth of a buffer the size of one head's K+V (cache-resident, as the kernel rereads one
// head's K/V for each of its 8 q-blocks) and of 512 MiB (DRAM).
//
// Usage: profile_forward REPS DTYPE... (DTYPE: fp32 or bf16); prints one JSON object (times in µs).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "cpu/forward_block.h"

using namespace fusedattn;
using namespace fusedattn::cpu::FUSEDATTN_ISA;

#include "profile_util.h"

constexpr int64_t kNumHeads = 8;
constexpr int64_t kSeqLen = 2048;
constexpr int64_t kHeadDim = 128;
constexpr int64_t kBlockRows = cpu::kMaxBlockRows;  // the driver's q-block here (forward_block_rows)
constexpr int64_t kKeyBlocks = kSeqLen / kBlockN;
constexpr int kWarmup = 3;

// Best GFLOP/s of `chains` independent register-only multiply-add chains (more chains than
// latency x ports, so the loop runs at the instruction's throughput). Madd(acc) returns the new acc.
template <int kChains, typename Reg, typename Madd>
double register_peak_gflops(Reg init, Madd madd, double flops_per_op) {
  constexpr int64_t kIters = 4'000'000;
  double best = 0.0;
  for (int trial = 0; trial < 5; ++trial) {
    Reg acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = init;
    const double t0 = now_us();
    for (int64_t i = 0; i < kIters; ++i) {
#pragma GCC unroll 24
      for (int c = 0; c < kChains; ++c) acc[c] = madd(acc[c]);
    }
    const double us = now_us() - t0;
    for (int c = 0; c < kChains; ++c) g_sink = g_sink + reinterpret_cast<const float*>(&acc[c])[0];
    best = std::max(best, kIters * kChains * flops_per_op / us * 1e-3);
  }
  return best;
}

double fma_peak_gflops() {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);  // acc -> 2, no denormals
  return register_peak_gflops<24>(one, [&](__m512 acc) { return _mm512_fmadd_ps(acc, half, one); }, 2.0 * 16);
}

#if defined(__AVX512BF16__)
double dpbf16_peak_gflops() {
  const __m512bh halves = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3F00));  // bf16 0.5
  // 16 lanes x 2 products x (multiply + add) per instruction
  return register_peak_gflops<24>(_mm512_setzero_ps(), [&](__m512 acc) { return _mm512_dpbf16_ps(acc, halves, halves); },
                                  4.0 * 16);
}
#endif

template <typename T>
void fill_normal(std::vector<T>& x, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  for (T& e : x) e = from_float<T>(normal(rng));
}

// Times the phases of one q-block in the element type T; returns a JSON object.
template <typename T>
std::string profile(const char* dtype, int reps) {
  constexpr bool kPairs = kBf16Pairs<T>;
  constexpr int W = Vec<float>::kWidth;
  constexpr int64_t n = kBlockN;
  const int64_t elements = kNumHeads * kSeqLen * kHeadDim;
  std::vector<T> q(elements), k(elements), v(elements), out(elements);
  std::mt19937 rng(0);
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng);

  AttentionParams p;
  p.dtype = std::is_same_v<T, float> ? DType::kFloat32 : DType::kBFloat16;
  const TensorRef bhsd{nullptr, elements, kSeqLen * kHeadDim, kHeadDim};
  p.q = p.k = p.v = p.out = bhsd;
  p.q.data = q.data();
  p.k.data = k.data();
  p.v.data = v.data();
  p.out.data = out.data();
  p.batch = 1;
  p.num_heads = p.num_heads_kv = kNumHeads;
  p.seqlen_q = p.seqlen_k = kSeqLen;
  p.head_dim = kHeadDim;
  p.scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  cpu::ForwardBlock block;
  block.row_end = kBlockRows;
  block.key_hi = kSeqLen;
  const BlockLanes lanes{kBlockRows, kBlockRows};

  void* scratch = aligned_buffer(forward_scratch_bytes_t<T>(p, kBlockRows));
  forward_block_t<T>(p, block, scratch);  // leaves Qᵀ packed in the scratch, as the phases read it
  const ForwardScratch<float> s = ForwardScratch<float>::carve(scratch, kHeadDim, kBlockRows);
  const float scale = static_cast<float>(p.scale);
  const LaneRange all_lanes{0, s.ldq};  // non-causal: every lane sees every key block

  // fp32 products: K and V blocks as kv_block hands them out (in place, or its conversion buffer).
  std::vector<const float*> k_blk(kKeyBlocks), v_blk(kKeyBlocks);
  std::vector<int64_t> k_stride(kKeyBlocks), v_stride(kKeyBlocks);
  auto convert_kv = [&](int64_t b) {
    k_blk[b] = kv_block<T, float>(p, p.k, 0, 0, b * n, n, false, s.k_rows, s.ldo, &k_stride[b]);
    v_blk[b] = kv_block<T, float>(p, p.v, 0, 0, b * n, n, true, s.v_rows, s.ldo, &v_stride[b]);
  };
#if defined(__AVX512BF16__)
  uint32_t* const q_pairs = reinterpret_cast<uint32_t*>(s.q_t);
  uint32_t* const v_pairs = reinterpret_cast<uint32_t*>(s.v_rows);
  auto q_row = [&](int64_t lane) { return q.data() + lane * kHeadDim; };
#endif

  auto scores = [&](int64_t b) {
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      int64_t stride;
      const uint32_t* k_pairs = key_pairs(p, 0, 0, b * n, n, reinterpret_cast<uint32_t*>(s.k_rows), &stride);
      gemm_op<Bf16PairOp>(n, s.ldq, (kHeadDim + 1) / 2, StridedA<uint32_t>{k_pairs, stride, 1}, q_pairs, s.ldq,
                          s.s_t, s.ldq, false);
#endif
    } else {
      gemm<float>(n, s.ldq, kHeadDim, StridedA<float>{k_blk[b], k_stride[b], 1}, s.q_t, s.ldq, s.s_t, s.ldq, false);
    }
  };
  auto scale_scores = [&](int64_t) {  // the scaling pass of the bf16 pairs, as forward_block_t
    for (int64_t j = 0; j < n; ++j) {
      float* row = s.s_t + j * s.ldq;
      for (int64_t i = 0; i < s.ldq; i += W) vec_store<float>(row + i, vec_load<float>(row + i) * scale);
    }
  };
  auto softmax = [&](int64_t b) {
    modify_scores(p, s, all_lanes, b * n, n, TileMask::kNone);
    softmax_step(s, all_lanes, n);
  };
  auto rescale_output = [&]() {  // as forward_block_t
    for (int64_t i = 0; i < lanes.lanes; ++i) {
      const float rescale = s.row_rescale[i];
      if (rescale == 1.0f) continue;
      float* o_row = s.o + i * s.ldo;
      for (int64_t c = 0; c < s.ldo; c += W) vec_store<float>(o_row + c, vec_load<float>(o_row + c) * vec_set1<float>(rescale));
    }
  };
  auto pack = [&](int64_t b) {
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      value_pairs(p, 0, 0, b * n, n, v_pairs, s.ldo);
      pack_float_row_pairs(s.s_t, n, s.ldq, s.ldq, s.p_pairs);
#endif
    } else {
      convert_kv(b);
    }
  };
  auto pv = [&](int64_t b) {
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      gemm_op<Bf16PairOp>(lanes.lanes, s.ldo, (n + 1) / 2, StridedA<uint32_t>{s.p_pairs, 1, s.ldq}, v_pairs, s.ldo,
                          s.o, s.ldo, true);
#endif
    } else {
      gemm<float>(lanes.lanes, s.ldo, n, StridedA<float>{s.s_t, 1, s.ldq}, v_blk[b], v_stride[b], s.o, s.ldo, true);
    }
  };
  auto pack_q = [&]() {
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      pack_transposed_pairs(q_row, lanes.lanes, kHeadDim, q_pairs, s.ldq);
#endif
    } else {  // scaled Qᵀ, as forward_block_t
      pack_transposed<float>([&](int64_t i) { return q.data() + i * kHeadDim; }, lanes.lanes, kHeadDim, s.q_t, s.ldq,
                             [scale](const T* row, int64_t d) { return static_cast<float>(to_float(row[d])) * scale; });
    }
  };

  // The real (scaled) scores of every key block, for the softmax phase.
  std::vector<float> saved_scores(kKeyBlocks * n * s.ldq);
  for (int64_t b = 0; b < kKeyBlocks; ++b) {
    if constexpr (!kPairs) convert_kv(b);
    scores(b);
    if constexpr (kPairs) scale_scores(b);
    std::memcpy(saved_scores.data() + b * n * s.ldq, s.s_t, n * s.ldq * sizeof(float));
  }

  auto time_once = [](auto&& phase) {
    const double t0 = now_us();
    phase();
    return now_us() - t0;
  };
  auto time_blocks = [&](auto&& phase) {
    return time_once([&] {
      for (int64_t b = 0; b < kKeyBlocks; ++b) phase(b);
    });
  };
  std::vector<std::pair<std::string, std::vector<double>>> phases;  // µs per repetition, by phase
  for (int rep = -kWarmup; rep < reps; ++rep) {
    auto record = [&](const char* name, double us) {
      if (rep < 0) return;  // warm-up
      auto it = std::find_if(phases.begin(), phases.end(), [&](const auto& phase) { return phase.first == name; });
      if (it == phases.end()) it = phases.insert(phases.end(), {name, {}});
      it->second.push_back(us);
    };
    record("whole", time_once([&] { forward_block_t<T>(p, block, scratch); }));
    record("qk", time_blocks(scores));
    if constexpr (kPairs) record("scale", time_blocks(scale_scores));
    // softmax from the kernel's initial state (m = -inf, l = 0, O = 0), each block on its scores
    std::fill(s.row_max, s.row_max + s.ldq, -std::numeric_limits<float>::infinity());
    std::fill(s.row_sum, s.row_sum + s.ldq, 0.0f);
    std::fill(s.o, s.o + s.ldq * s.ldo, 0.0f);
    double soft = 0.0, rescaling = 0.0;
    for (int64_t b = 0; b < kKeyBlocks; ++b) {
      std::memcpy(s.s_t, saved_scores.data() + b * n * s.ldq, n * s.ldq * sizeof(float));
      soft += time_once([&] { softmax(b); });
      rescaling += time_once(rescale_output);
    }
    record("softmax", soft);
    record("rescale", rescaling);
    record("pack", time_blocks(pack));
    record("pv", time_blocks(pv));
    record("pack_q", time_once(pack_q));
    record("output", time_once([&] { write_block_output<T>(p, block, lanes, s, false); }));
  }
  free_buffer(scratch);

  const size_t kv_bytes = 2 * kSeqLen * kHeadDim * sizeof(T);
  char head[256];
  std::snprintf(head, sizeof(head),
                "{\"dtype\": \"%s\", \"bf16_pairs\": %s, \"rows\": %lld, \"keys\": %lld, \"head_dim\": %lld, "
                "\"block_n\": %lld, \"kv_bytes\": %zu, \"kv_stream_gbs\": %.1f",
                dtype, kPairs ? "true" : "false", static_cast<long long>(kBlockRows), static_cast<long long>(kSeqLen),
                static_cast<long long>(kHeadDim), static_cast<long long>(kBlockN), kv_bytes,
                stream_read_gbs(kv_bytes, 200));
  std::string json = std::string(head) + ", \"us\": {";
  for (const auto& phase : phases) {
    char item[64];
    std::snprintf(item, sizeof(item), "%s\"%s\": %.1f", &phase == &phases.front() ? "" : ", ", phase.first.c_str(),
                  median(phase.second));
    json += item;
  }
  return json + "}}";
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s REPS DTYPE... (fp32 | bf16)\n", argv[0]);
    return 2;
  }
  const int reps = std::atoi(argv[1]);
  std::string profiles;
  for (int a = 2; a < argc; ++a) {
    const std::string dtype = argv[a];
    if (dtype != "fp32" && dtype != "bf16") {
      std::fprintf(stderr, "unknown dtype %s (fp32 | bf16)\n", argv[a]);
      return 2;
    }
    if (!profiles.empty()) profiles += ", ";
    profiles += dtype == "fp32" ? profile<float>("fp32", reps) : profile<BFloat16>("bf16", reps);
  }
  std::string peaks = "\"fma_gflops\": " + std::to_string(fma_peak_gflops());
#if defined(__AVX512BF16__)
  peaks += ", \"dpbf16_gflops\": " + std::to_string(dpbf16_peak_gflops());
#endif
  std::printf("{\"isa\": \"%s\", %s, \"dram_stream_gbs\": %.1f, \"profiles\": [%s]}\n",
              PROFILE_STRINGIFY(FUSEDATTN_ISA), peaks.c_str(), stream_read_gbs(size_t(512) << 20, 3),
              profiles.c_str());
  return 0;
}
