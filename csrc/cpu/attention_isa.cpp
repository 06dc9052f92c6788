// The CPU kernels of one ISA. CMake compiles this file once per ISA (scalar, AVX2+FMA, AVX-512,
// AVX512-BF16, AMX) with -DFUSEDATTN_ISA=<name> and that ISA's flags; everything it instantiates lives in the
// namespace fusedattn::cpu::<name>, so the linker never mixes code built for different ISAs.
#include "cpu/backward_block.h"
#include "cpu/decode_block.h"
#include "cpu/forward_block.h"

#include <cstring>
#include <stdexcept>

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {
namespace {

#define FUSEDATTN_STRINGIFY_(x) #x
#define FUSEDATTN_STRINGIFY(x) FUSEDATTN_STRINGIFY_(x)

template <typename F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:  return f(float{});
    case DType::kFloat64:  return f(double{});
    case DType::kFloat16:  return f(Half{});
    case DType::kBFloat16: return f(BFloat16{});
  }
  throw std::invalid_argument("fusedattn: unknown dtype");
}

size_t forward_scratch_bytes(const AttentionParams& params, int64_t block_rows) {
  return dispatch_dtype(params.dtype, [&](auto tag) {
    return forward_scratch_bytes_t<decltype(tag)>(params, block_rows);
  });
}

void forward_block(const AttentionParams& params, const ForwardBlock& block, void* scratch) {
  dispatch_dtype(params.dtype, [&](auto tag) {
    if (runs_decode_kernel(params, lanes_per_kv_head(params, block), kernel_table())) {
      decode_block_t<decltype(tag)>(params, block, scratch);
    } else {
      forward_block_t<decltype(tag)>(params, block, scratch);
    }
  });
}

size_t decode_state_bytes(const AttentionParams& params, int64_t lanes) {
  return dispatch_dtype(params.dtype, [&](auto tag) { return decode_state_bytes_t<decltype(tag)>(params, lanes); });
}

void decode_visit(const AttentionParams& params, const ForwardBlock& block, const DecodeVisit& visit, void* scratch) {
  dispatch_dtype(params.dtype, [&](auto tag) { decode_block_t<decltype(tag)>(params, block, scratch, &visit); });
}

void merge_block_partials(const AttentionParams& params, const ForwardBlock& block, const float* const* outs,
                          const float* const* stats, int64_t count) {
  dispatch_dtype(params.dtype, [&](auto tag) { merge_block_partials_t<decltype(tag)>(params, block, outs, stats, count); });
}

size_t backward_scratch_bytes(const AttentionParams& params) {
  return dispatch_dtype(params.dtype, [&](auto tag) { return backward_scratch_bytes_t<decltype(tag)>(params); });
}

int64_t row_pitch(const AttentionParams& params) {
  return dispatch_dtype(params.dtype, [&](auto tag) { return row_pitch_t<decltype(tag)>(params); });
}

void backward_dsum(const BackwardParams& params, int64_t batch, int64_t head, void* dsum) {
  dispatch_dtype(params.forward.dtype, [&](auto tag) { backward_dsum_t<decltype(tag)>(params, batch, head, dsum); });
}

void backward_kv_block(const BackwardParams& params, int64_t batch, int64_t kv_head, int64_t key_begin,
                       void* dq_partial, const void* dsum, void* scratch) {
  dispatch_dtype(params.forward.dtype, [&](auto tag) {
    backward_kv_block_t<decltype(tag)>(params, batch, kv_head, key_begin, dq_partial, dsum, scratch);
  });
}

void backward_reduce_dq(const BackwardParams& params, int64_t batch, int64_t head, const void* const* partials,
                        int64_t num_partials) {
  dispatch_dtype(params.forward.dtype, [&](auto tag) {
    backward_reduce_dq_t<decltype(tag)>(params, batch, head, partials, num_partials);
  });
}

// The avx512amx ISA: bf16 blocks of more than two lane groups per kv head (several tokens of a
// GQA group, 12+ tokens of MHA) whose head_dim the AMX tiles take run forward_block's tile, whose
// products are on AMX. ab_decode.py --queries Q, GB/s decode kernel -> tile: GQA bf16 (Hq 32,
// Hkv 8) 3 tokens 7.4 -> 8.3, 4 tokens 6.3 -> 8.4, 8 tokens 4.0 -> 7.8; MHA bf16 16 tokens 5.9
// -> 6.9; MHA 8 tokens (8 lanes) stays: 14.8 on the decode kernel, 7.8 on the tile.
bool decode_prefers_tiles(const AttentionParams& params, int64_t lanes_per_kv) {
#if defined(FUSEDATTN_AMX)
  return lanes_per_kv > 2 * kDecodeLanes && params.dtype == DType::kBFloat16 && amx_takes_head_dim(params.head_dim);
#else
  (void)params, (void)lanes_per_kv;
  return false;
#endif
}

void exp_floats(const float* x, float* y, int64_t n) {
  constexpr int W = Vec<float>::kWidth;
  for (int64_t i = 0; i < n; i += W) {
    const int64_t count = n - i < W ? n - i : W;
    float in[W] = {};
    float out[W];
    std::memcpy(in, x + i, count * sizeof(float));
    vec_store<float>(out, exp_vec<float>(vec_load<float>(in)));
    std::memcpy(y + i, out, count * sizeof(float));
  }
}

}  // namespace

const CpuKernelTable& kernel_table() {
  static const CpuKernelTable table{FUSEDATTN_STRINGIFY(FUSEDATTN_ISA),
                                    &forward_scratch_bytes,
                                    &forward_block,
                                    &decode_state_bytes,
                                    &decode_visit,
                                    &merge_block_partials,
                                    &backward_scratch_bytes,
                                    &row_pitch,
                                    &backward_dsum,
                                    &backward_kv_block,
                                    &backward_reduce_dq,
                                    kBwdBlockN,
                                    &exp_floats,
                                    &decode_prefers_tiles};
  return table;
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
