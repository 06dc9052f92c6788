// The CUDA backend's host API, as plain C++ (no CUDA headers): what the bindings call.
// Arrays are device pointers described like AttentionParams (common/params.h); `stream` is a
// cudaStream_t passed as void*; calls are asynchronous on it. Launch errors throw CudaError.
#pragma once
#include <cstdint>

#include "common/params.h"

namespace fusedattn {
namespace cuda {

// Forward attention (fp16/bf16: tensor cores, head_dim <= 256; fp32: exact SIMT path).
void attention_forward(const AttentionParams& params, int device, void* stream);

// Forward over packed variable-length sequences (flash-attn's varlen layout; cuda/varlen.cuh).
// attn is filled as for attention_forward on the packed (total, heads, head_dim) arrays viewed as
// (1, heads, total, head_dim), so seqlen_q / seqlen_k are the packed row counts and lse is
// (heads, total_q); then batch = the number of sequences, batch strides 0, and
// attn.sequences.cu_seqlens_q / cu_seqlens_k are DEVICE int32 (batch + 1,) arrays that the
// kernels read (no host sync; entries are clamped to the packed rows). Sequence b is
// bottom-right (q_offset ignored); rows after cu_seqlens_q[batch] get out 0 and LSE -inf.
// Every forward variant but attn_mask. max_seqlen_q only sizes the grid: the rows of a longer
// sequence past the grid's tiles get NaN out and LSE (varlen.cuh), so that the broken bound shows.
struct VarlenParams {
  AttentionParams attn;
  int64_t max_seqlen_q = 0;
};
void attention_varlen_forward(const VarlenParams& params, int device, void* stream);

// Attention over a KV cache: decode and chunked prefill, split-KV (flash-decoding).
// attn is filled as for the CPU's attention_kvcache_forward: q, out (batch, num_heads, seqlen_q,
// head_dim); k, v the cache viewed as (rows or pages, num_heads_kv, max_seqlen or page_size,
// head_dim); attn.sequences (DEVICE int32 arrays): seqlens_k (keys per sequence, new tokens
// included), optional k_begin (cache_leftpad), cache_batch_idx, or block_table + page_size.
// Sequence b attends to its cache slots [k_begin[b], seqlens_k[b]) (clamped to the capacity),
// its queries at the last positions (q_offset = its key count - seqlen_q). scale, causal,
// window, softcap, alibi_slopes and sinks as in the forward; no attn_mask, no dropout.
// Row or page ids outside [0, cache_rows) are never read (those keys count as zero vectors);
// the caller validates the index arrays' values (the Python layer does, as for the CPU).
struct KVCacheParams {
  AttentionParams attn;
  int64_t cache_rows = 0;  // rows (contiguous) or pages (paged) of k/v
  int64_t capacity = 0;    // slots one sequence can address: max_seqlen, or max_pages · page_size
  int num_splits = 0;      // 0: heuristic from the SM count; else 1..kMaxSplits
};
void attention_kvcache_forward(const KVCacheParams& params, int device, void* stream);

// The split count attention_kvcache_forward uses for these sizes on `device`.
int kvcache_num_splits(const KVCacheParams& params, int device);

// Writes new tokens into a KV cache in place: k_new/v_new (batch, num_heads_kv, seqlen_new,
// head_dim) go to slots cache_seqlens[b] + t of sequence b (its cache row cache_batch_idx[b]
// or its pages in block_table). Slots past the capacity and invalid row / page ids are skipped.
struct AppendParams {
  DType dtype = DType::kFloat16;
  TensorRef k_cache, v_cache;  // (rows or pages, num_heads_kv, max_seqlen or page_size, head_dim)
  TensorRef k_new, v_new;      // (batch, num_heads_kv, seqlen_new, head_dim)
  SequenceLayout sequences;    // seqlens_k = cache_seqlens (before appending); cache_batch_idx or block_table
  int64_t batch = 0, num_heads_kv = 0, seqlen_new = 0, head_dim = 0;
  int64_t cache_rows = 0, capacity = 0;
};
void kvcache_append(const AppendParams& params, int device, void* stream);

// A (batch, heads, seqlen) fp32 LSE array with any strides.
struct LseRef {
  float* data = nullptr;
  int64_t batch_stride = 0;
  int64_t head_stride = 0;
  int64_t row_stride = 0;
};

// out = (e^lse_a · out_a + e^lse_b · out_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b):
// two attention results over disjoint key sets combined into the result over their union.
// Rows where both LSEs are -inf give 0 and -inf. lse.data may be nullptr (not written).
struct MergeParams {
  DType dtype = DType::kFloat32;
  TensorRef out_a, out_b, out;  // (batch, heads, seqlen, head_dim)
  LseRef lse_a, lse_b, lse;
  int64_t batch = 0, num_heads = 0, seqlen = 0, head_dim = 0;
};
void merge_attention_states(const MergeParams& params, int device, void* stream);

}  // namespace cuda
}  // namespace fusedattn
