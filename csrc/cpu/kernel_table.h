// The interface between the ISA-independent CPU driver (attention_cpu.cpp) and the kernels that
// attention_isa.cpp compiles once per ISA. Each ISA namespace provides kernel_table().
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/params.h"
#include "cpu/tiles.h"

namespace fusedattn {
namespace cpu {

// The forward's unit of work: query rows [row_begin, row_end) of heads [head_begin,
// head_begin + head_count), over keys [key_lo, key_hi) (a split of
// the key axis for split-KV decode; [0, seqlen_k) otherwise). With partial_out set, the block
// writes its normalised partial output (fp32, [head_count * rows][head_dim]) there, and each
// row's running max m and log of its sum l into partial_stats ([head_count * rows][2]), to be
// merged by LSE, instead of into params.out / params.lse. (m and log l are kept apart: their fp32
// sum, the LSE, drops log l where |m| is huge, as in a row whose keys a finfo.min mask hides,
// and the merge then weighed such splits equally whatever their key counts.)
struct ForwardBlock {
  int64_t batch = 0;
  int64_t head_begin = 0;
  int64_t head_count = 1;
  int64_t row_begin = 0;
  int64_t row_end = 0;
  int64_t key_lo = 0;
  int64_t key_hi = 0;
  float* partial_out = nullptr;
  float* partial_stats = nullptr;
};

// One visit of a pool walk (pool_walk.h) to a decode block: keys [key_lo, key_hi) of the
// block, whose running state (scaled q rows, O, max, sum, key ranges) stays in `state`
// (decode_state_bytes) between visits, so that several blocks' visits can interleave. The
// first visit sets the state up (with the sink where block.key_lo is 0), the last writes the
// block's output (or its partial, see ForwardBlock).
struct DecodeVisit {
  void* state = nullptr;
  int64_t key_lo = 0;
  int64_t key_hi = 0;
  bool first = false;
  bool last = false;
  // The walk's next visit (next_params null after a part's last): its sequence's params and
  // block, and its keys. The kernel prefetches that visit's first K rows as it ends this one.
  const AttentionParams* next_params = nullptr;
  const ForwardBlock* next_block = nullptr;
  int64_t next_key_lo = 0;
  int64_t next_key_hi = 0;
};

// A block's heads read one kv head, or (decode blocks only) whole GQA groups of several.
// Blocks whose lanes (query rows x heads) per kv head pass runs_decode_kernel run the decode
// kernel.

inline int64_t lanes_per_kv_head(const AttentionParams& params, const ForwardBlock& block) {
  const int64_t group = params.num_heads / params.num_heads_kv;
  const int64_t heads = block.head_count < group ? block.head_count : group;
  return (block.row_end - block.row_begin) * heads;
}

// Whether t's kv heads lie side by side in a cache row (a (B, L, Hkv, D) cache or a page), not
// each on its own, as in (B, Hkv, L, D) storage seen as (B, L, Hkv, D) (Hugging Face's caches).
// The decode planner and kernel choose their walk by it.
inline bool kv_heads_side_by_side(const TensorRef& t, int64_t head_dim) { return t.head_stride == head_dim; }

struct CpuKernelTable {
  const char* isa_name;
  // Bytes of per-thread scratch that forward_block needs for q-blocks of block_rows rows.
  size_t (*forward_scratch_bytes)(const AttentionParams& params, int64_t block_rows);
  void (*forward_block)(const AttentionParams& params, const ForwardBlock& block, void* scratch);
  // Bytes of one decode block's state between pool-walk visits (DecodeVisit), for `lanes` lanes.
  size_t (*decode_state_bytes)(const AttentionParams& params, int64_t lanes);
  // One visit to a decode block (one that passes runs_decode_kernel), scratch as forward_block's.
  void (*decode_visit)(const AttentionParams& params, const ForwardBlock& block, const DecodeVisit& visit,
                       void* scratch);
  // Merges the partial results of `count` key splits of `block` (see ForwardBlock) into out / lse.
  void (*merge_block_partials)(const AttentionParams& params, const ForwardBlock& block, const float* const* outs,
                               const float* const* stats, int64_t count);

  // Backward (see backward_block.h). Buffers typed "Acc" hold the compute type: fp64 for fp64
  // inputs, else fp32. Row buffers have row_pitch() elements per row.
  size_t (*backward_scratch_bytes)(const AttentionParams& params);
  int64_t (*row_pitch)(const AttentionParams& params);
  void (*backward_dsum)(const BackwardParams& params, int64_t batch, int64_t head, void* dsum);
  void (*backward_kv_block)(const BackwardParams& params, int64_t batch, int64_t kv_head, int64_t key_begin,
                            void* dq_partial, const void* dsum, void* scratch);
  void (*backward_reduce_dq)(const BackwardParams& params, int64_t batch, int64_t head,
                             const void* const* partials, int64_t num_partials);
  int64_t backward_block_keys;  // keys per backward_kv_block task

  // y[i] = exp(x[i]) through the kernels' vector exp (exp_vec), for its accuracy test.
  void (*exp_floats)(const float* x, float* y, int64_t n);

  // Whether blocks of more than 2 * kDecodeLanes lanes per kv head that the decode kernel could
  // take run faster on forward_block's tile (see runs_decode_kernel).
  bool (*decode_prefers_tiles)(const AttentionParams& params, int64_t lanes_per_kv);
};

// Whether blocks with `lanes_per_kv` lanes per kv head run the decode kernel: up to kDecodeLanes
// in one lane group, up to twice that many in two (5-8 lanes); more (see tiles.h) as groups of
// kDecodeLanes and a last one of the rest, up to kDecodeMaxLanesPerKv for GQA (not fp64) and for
// bf16/fp16 MHA in whole groups, and up to kDecodeMaxBf16LanesPerKv for bf16 GQA whose q rows
// dot_rows_bf16 holds in registers; fewer where the ISA's forward tile kernel is faster
// (CpuKernelTable::decode_prefers_tiles: bf16 on AMX tiles past two lane groups).
inline bool runs_decode_kernel(const AttentionParams& params, int64_t lanes_per_kv, const CpuKernelTable& kernels) {
  if (lanes_per_kv <= 2 * kDecodeLanes) return true;
  if (kernels.decode_prefers_tiles(params, lanes_per_kv)) return false;
  const bool gqa = params.num_heads != params.num_heads_kv;
  const bool two_byte = params.dtype == DType::kBFloat16 || params.dtype == DType::kFloat16;
  if (lanes_per_kv <= kDecodeMaxLanesPerKv) {
    return gqa ? params.dtype != DType::kFloat64 : two_byte && lanes_per_kv % kDecodeLanes == 0;
  }
  const bool bf16_in_registers =
      params.dtype == DType::kBFloat16 && params.head_dim % 32 == 0 && params.head_dim <= 128;
  return lanes_per_kv <= kDecodeMaxBf16LanesPerKv && gqa && bf16_in_registers;
}

#define FUSEDATTN_DECLARE_ISA(isa) \
  namespace isa {                  \
  const CpuKernelTable& kernel_table(); \
  }
FUSEDATTN_DECLARE_ISA(scalar)
FUSEDATTN_DECLARE_ISA(avx2)
FUSEDATTN_DECLARE_ISA(avx512)
FUSEDATTN_DECLARE_ISA(avx512bf16)
FUSEDATTN_DECLARE_ISA(avx512amx)
#undef FUSEDATTN_DECLARE_ISA

}  // namespace cpu
}  // namespace fusedattn
