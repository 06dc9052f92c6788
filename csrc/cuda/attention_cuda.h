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

// A KV cache: `k`/`v` of DecodeParams::attn point at it and its strides say where token j of
// (batch b, kv head h) lives. Contiguous: (batch, capacity, heads_kv, head_dim) with
// attn.k.batch_stride between sequences. Paged (block_table != nullptr): (num_blocks,
// block_size, heads_kv, head_dim) with attn.k.batch_stride between pages; token j of sequence
// b is row j % block_size of page block_table[b, j / block_size].
struct KVCache {
  const int32_t* block_table = nullptr;  // (batch, max_blocks) int32; nullptr = contiguous
  int64_t block_table_stride = 0;        // elements between the block_table rows of two sequences
  int64_t block_size = 0;                // paged: tokens per page; contiguous: the capacity
  int64_t num_blocks = 0;                // paged: pages in the cache (ids outside [0, num_blocks) are never read)
  int64_t capacity = 0;                  // tokens a sequence can hold (max_blocks · block_size or S_max)
  const int32_t* seqlens = nullptr;      // (batch,) int32 tokens already cached; nullptr = capacity
};

// Split-KV decode (flash-decoding). attn: q, out, lse (batch, num_heads, seqlen_q, head_dim);
// k, v: the caches (see KVCache); scale, causal, window, softcap, alibi_slopes, sinks as in
// the forward (no attn_mask, no dropout). Each sequence b attends to its first
// seqlen_k(b) = min(seqlens[b] + seqlen_new, capacity) cached tokens, its queries sitting at
// the last positions (q_offset = seqlen_k(b) - seqlen_q). With k_new/v_new (batch, heads_kv,
// seqlen_new, head_dim), those tokens are first written into the cache at positions
// seqlens[b] .. seqlens[b] + seqlen_new - 1 (those past the capacity are dropped).
struct DecodeParams {
  AttentionParams attn;
  KVCache cache;
  TensorRef k_new;
  TensorRef v_new;
  int64_t seqlen_new = 0;
  int num_splits = 0;  // 0: heuristic from the SM count; else 1..kMaxSplits
};
void decode(const DecodeParams& params, int device, void* stream);

// The split count decode() would use for these sizes on the current device (0 = heuristic).
int decode_num_splits(const DecodeParams& params, int device);

// Writes k_new/v_new into the cache (the first step of decode(), also callable alone).
void kvcache_append(const DecodeParams& params, int device, void* stream);

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
