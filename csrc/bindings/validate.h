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
};

struct ForwardOptions {
  double scale;
  bool causal;
  int64_t q_offset;
  int64_t window_left;
  int64_t window_right;
};

AttentionParams make_forward_params(const ForwardViews& views, const ForwardOptions& options);

struct BackwardViews {
  ForwardViews forward;  // q, k, v, out and the forward's lse (required here)
  TensorView dout;       // like out
  TensorView dq;         // like q
  TensorView dk;         // like k
  TensorView dv;         // like v
  std::optional<TensorView> dlse;  // like lse
};

BackwardParams make_backward_params(const BackwardViews& views, const ForwardOptions& options);

}  // namespace fusedattn
