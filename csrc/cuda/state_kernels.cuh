// The two memory-bound helpers of decode and context parallelism:
//   append_kernel  writes new k/v tokens into a contiguous or paged cache at cache_seqlens[b];
//   merge_kernel   merge_attention_states: two partial results (O, LSE) over disjoint keys ->
//                  the result over their union, O = (e^lse_a O_a + e^lse_b O_b) / (e^lse_a + e^lse_b).
// One warp per row (lanes over head_dim), 4 rows per block.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/params.h"
#include "cuda/attention_cuda.h"
#include "cuda/compat.cuh"
#include "cuda/kv_cache.cuh"
#include "cuda/warp_tile.cuh"

namespace fusedattn {
namespace cuda {

constexpr int kRowWarps = 4;

// S: the element storage (uint16_t or float); the copy is bit-exact.
template <typename S>
__global__ void __launch_bounds__(32 * kRowWarps) append_kernel(const __grid_constant__ AppendParams args) {
  const int lane = threadIdx.x % 32;
  int64_t index = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (index >= args.batch * args.seqlen_new * args.num_heads_kv) return;
  const int64_t kv_head = index % args.num_heads_kv;
  index /= args.num_heads_kv;
  const int64_t token = index % args.seqlen_new;
  const int64_t batch = index / args.seqlen_new;
  const int64_t slot = args.sequences.seqlens_k[batch] + token;
  if (slot < 0 || slot >= args.capacity) return;  // past the cache: dropped
  S* k = cache_slot<S>(args.k_cache, args.sequences, args.cache_rows, batch, kv_head, slot);
  S* v = cache_slot<S>(args.v_cache, args.sequences, args.cache_rows, batch, kv_head, slot);
  if (k == nullptr || v == nullptr) return;  // row or page id outside the cache
  const S* k_new = static_cast<const S*>(args.k_new.data) + batch * args.k_new.batch_stride +
                   kv_head * args.k_new.head_stride + token * args.k_new.row_stride;
  const S* v_new = static_cast<const S*>(args.v_new.data) + batch * args.v_new.batch_stride +
                   kv_head * args.v_new.head_stride + token * args.v_new.row_stride;
  for (int64_t d = lane; d < args.head_dim; d += 32) {
    k[d] = k_new[d];
    v[d] = v_new[d];
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps) merge_kernel(const __grid_constant__ MergeParams m) {
  using S = typename T::Storage;
  const int lane = threadIdx.x % 32;
  int64_t index = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (index >= m.batch * m.num_heads * m.seqlen) return;
  const int64_t row = index % m.seqlen;
  index /= m.seqlen;
  const int64_t head = index % m.num_heads;
  const int64_t batch = index / m.num_heads;
  const auto lse_at = [&](const LseRef& l) -> float& {
    return l.data[batch * l.batch_stride + head * l.head_stride + row * l.row_stride];
  };
  const auto row_of = [&](const TensorRef& t) {
    return static_cast<S*>(t.data) + batch * t.batch_stride + head * t.head_stride + row * t.row_stride;
  };
  const float lse_a = lse_at(m.lse_a);
  const float lse_b = lse_at(m.lse_b);
  const float top = fmaxf(lse_a, lse_b);
  float weight_a = 0.0f, weight_b = 0.0f, lse = kNegInf;
  if (top != kNegInf) {  // parts with LSE -inf saw no key and contribute nothing
    weight_a = expf(lse_a - top);
    weight_b = expf(lse_b - top);
    const float sum = weight_a + weight_b;
    lse = top + logf(sum);
    weight_a /= sum;
    weight_b /= sum;
  }
  const S* a = row_of(m.out_a);
  const S* b = row_of(m.out_b);
  S* out = row_of(m.out);
  for (int64_t d = lane; d < m.head_dim; d += 32) {
    const float x = weight_a == 0.0f ? 0.0f : weight_a * T::to_float(a[d]);
    const float y = weight_b == 0.0f ? 0.0f : weight_b * T::to_float(b[d]);
    out[d] = T::from_float(x + y);
  }
  if (lane == 0 && m.lse.data != nullptr) lse_at(m.lse) = lse;
}

}  // namespace cuda
}  // namespace fusedattn
