// AttentionParams: everything a kernel needs to compute one attention call, as plain data.
// No Python, no torch: the bindings fill it from DLPack views, and every backend (CPU, CUDA)
// reads it. Tensors are described in the native "bhsd" order by pointer + element strides;
// the flash-attn "bshd" layout is the same call with other strides. Only head_dim is contiguous.
#pragma once
#include <cstdint>

namespace fusedattn {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// A strided 4-D view (batch, heads, seqlen, head_dim) with a contiguous last dim.
struct TensorRef {
  void* data = nullptr;
  int64_t batch_stride = 0;  // elements
  int64_t head_stride = 0;
  int64_t row_stride = 0;    // stride of seqlen
};

// An optional attn_mask broadcast to (batch, num_heads, seqlen_q, seqlen_k) by its strides
// (a broadcast dim has stride 0). Bool: true = attend. Float: added to the scores.
enum class MaskType : int { kNone = 0, kBool = 1, kFloat32 = 2, kFloat64 = 3, kFloat16 = 4, kBFloat16 = 5 };

struct MaskRef {
  const void* data = nullptr;
  MaskType type = MaskType::kNone;
  int64_t batch_stride = 0;  // elements
  int64_t head_stride = 0;
  int64_t row_stride = 0;    // over query rows
  int64_t col_stride = 0;    // over keys
};

// Variable-length batches and KV caches. With any of these set, `batch` counts sequences and
// each sequence b has its own lengths (and q_offset = its seqlen_k - seqlen_q, bottom-right):
//  - varlen: q/out rows of sequence b are rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of the packed
//    (total, heads, head_dim) tensors (their batch strides are 0); keys likewise with cu_seqlens_k.
//  - KV cache: sequence b reads cache row cache_batch_idx[b] (default b), keys [k_begin[b],
//    seqlens_k[b]) (k_begin = cache_leftpad, default 0).
//  - paged KV: key row j of sequence b is slot j % page_size of page block_table[b][j / page_size];
//    k/v batch_stride is then the page stride and row_stride the slot stride.
struct SequenceLayout {
  const int32_t* cu_seqlens_q = nullptr;     // (batch + 1,)
  const int32_t* cu_seqlens_k = nullptr;     // (batch + 1,)
  const int32_t* seqlens_k = nullptr;        // (batch,)
  const int32_t* k_begin = nullptr;          // (batch,)
  const int32_t* cache_batch_idx = nullptr;  // (batch,)
  const int32_t* block_table = nullptr;      // (batch, block_table_stride)
  int64_t block_table_stride = 0;
  int64_t page_size = 0;

  bool any() const { return cu_seqlens_q != nullptr || seqlens_k != nullptr; }
};

struct AttentionParams {
  DType dtype = DType::kFloat32;  // q, k, v and out share it

  TensorRef q;    // (batch, num_heads,    seqlen_q, head_dim)
  TensorRef k;    // (batch, num_heads_kv, seqlen_k, head_dim)
  TensorRef v;    // (batch, num_heads_kv, seqlen_k, head_dim)
  TensorRef out;  // (batch, num_heads,    seqlen_q, head_dim)
  // (batch, num_heads, seqlen_q), rows contiguous; fp32, or fp64 (lse_f64) for fp64 inputs so
  // that fp64 gradients stay fp64-accurate. At most one is set; neither = not requested.
  float* lse = nullptr;
  double* lse_f64 = nullptr;
  int64_t lse_batch_stride = 0;  // elements
  int64_t lse_head_stride = 0;

  int64_t batch = 0;
  int64_t num_heads = 0;
  int64_t num_heads_kv = 0;
  int64_t seqlen_q = 0;  // for a SequenceLayout: the longest sequence
  int64_t seqlen_k = 0;
  int64_t head_dim = 0;

  double scale = 1.0;  // multiplies q·k (double so fp64 inputs keep full precision)

  // Positions (DESIGN.md): query row i sits at i + q_offset, key j at j.
  int64_t q_offset = 0;
  bool causal = false;
  // Sliding window (left, right) around the query position; -1 = unbounded.
  int64_t window_left = -1;
  int64_t window_right = -1;

  // Score modifications, applied in DESIGN.md's order (see variant.h):
  // s = scale·q·k → softcap → ALiBi → + float mask → masking → softmax (with sink) → dropout.
  double softcap = 0.0;                  // > 0: s = softcap · tanh(s / softcap)
  const double* alibi_slopes = nullptr;  // slope of (batch, head) at b·alibi_batch_stride + h
  int64_t alibi_batch_stride = 0;        // 0 for (num_heads,) slopes, num_heads for (batch, num_heads)
  MaskRef mask;
  const double* sinks = nullptr;         // (num_heads,) logits in each row's softmax denominator
  double dropout_p = 0.0;                // probability of dropping each attention weight
  uint64_t dropout_seed = 0;             // Philox key; the mask depends on (seed, offset, b, h, i, j)
  uint64_t dropout_offset = 0;

  SequenceLayout sequences;
};

// The LSE entry at `index` (batch·lse_batch_stride + head·lse_head_stride + row), in either precision.
inline bool has_lse(const AttentionParams& p) { return p.lse != nullptr || p.lse_f64 != nullptr; }
inline void store_lse(const AttentionParams& p, int64_t index, double value) {
  if (p.lse_f64 != nullptr) p.lse_f64[index] = value;
  else if (p.lse != nullptr) p.lse[index] = static_cast<float>(value);
}
inline double load_lse(const AttentionParams& p, int64_t index) {
  return p.lse_f64 != nullptr ? p.lse_f64[index] : static_cast<double>(p.lse[index]);
}

inline int64_t dtype_size(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : (dtype == DType::kFloat32 ? 4 : 2);
}

// The backward reads q, k, v, out and the forward's lse (all in `forward`; lse is an input
// here and must be given) and writes dq, dk, dv. Gradients have the shapes of q, k, v.
struct BackwardParams {
  AttentionParams forward;
  TensorRef dout;  // like out
  TensorRef dq;    // like q
  TensorRef dk;    // like k
  TensorRef dv;    // like v
  // Gradient of the lse output, (batch, num_heads, seqlen_q) fp32 contiguous; null = none.
  // It enters as dS += P·dlse (d lse_i / d s_ij = P_ij), i.e. Dsum_i -= dlse_i.
  const float* dlse = nullptr;
  const double* dlse_f64 = nullptr;  // instead of dlse, when the lse is fp64
  // Gradient of a float attn_mask, dense (batch, num_heads, seqlen_q, seqlen_k) fp32 and
  // zero-filled by the caller (entries of skipped tiles stay 0); null = not requested. The
  // caller sums it over the mask's broadcast dims.
  float* dmask = nullptr;
  double* dmask_f64 = nullptr;  // instead of dmask, for fp64 inputs
};

}  // namespace fusedattn
