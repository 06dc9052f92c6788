// Turns DLPack views of (q, k, v, out, lse) into AttentionParams, checking every rule of
// DESIGN.md's contract. Errors are ValueError / TypeError naming the argument and the
// expected vs actual value, before any kernel runs.
#pragma once
#include <optional>

#include "bindings/tensor_view.h"
#include "common/params.h"

namespace fusedattn {

struct ForwardViews {
  TensorView q;    // (batch, num_heads,    seqlen_q, head_dim)
  TensorView k;    // (batch, num_heads_kv, seqlen_k, head_dim)
  TensorView v;    // (batch, num_heads_kv, seqlen_k, head_dim)
  TensorView out;  // like q
  std::optional<TensorView> lse;  // (batch, num_heads, seqlen_q) float32, contiguous
  std::optional<TensorView> mask;          // (batch, num_heads, seqlen_q, seqlen_k), bool or float
  std::optional<TensorView> alibi_slopes;  // (num_heads,) or (batch, num_heads) float32
  std::optional<TensorView> sinks;         // (num_heads,) float32
  bool kv_is_cache = false;  // k/v are a KV cache: their batch dim counts cache rows or pages
  bool out_is_input = false;  // the backward: out and lse are the forward's, only read
  int64_t sequence_count = -1;  // varlen: the number of sequences (rows of (batch, heads) alibi_slopes)
};

struct ForwardOptions {
  double scale = 1.0;
  bool causal = false;
  int64_t q_offset = 0;
  int64_t window_left = -1;
  int64_t window_right = -1;
  double softcap = 0.0;
  double dropout_p = 0.0;
  uint64_t seed = 0;
  uint64_t offset = 0;
};

// The Python-side "variant" tuple: (scale, causal, q_offset, window_left, window_right, softcap,
// mask, alibi_slopes, sinks, dropout_p, seed, offset); arrays may be None. Fills the options
// and the optional views.
ForwardOptions parse_variant(const pybind11::tuple& variant, ForwardViews& views);

AttentionParams make_forward_params(const ForwardViews& views, const ForwardOptions& options);

struct BackwardViews {
  ForwardViews forward;  // q, k, v, out and the forward's lse (required here)
  TensorView dout;       // like out
  TensorView dq;         // like q
  TensorView dk;         // like k
  TensorView dv;         // like v
  std::optional<TensorView> dlse;  // like lse
  std::optional<TensorView> dmask;  // (batch, num_heads, seqlen_q, seqlen_k) float32 (float64 for fp64), contiguous, zeroed
};

BackwardParams make_backward_params(const BackwardViews& views, const ForwardOptions& options);

// A paged KV cache's rows per page (k_cache's page dim): ValueError unless >= 1 (the kernels
// divide key positions by it).
void check_page_size(int64_t page_size);

}  // namespace fusedattn
