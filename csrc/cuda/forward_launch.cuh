// Definition of launch_forward<T> (launchers.h): grid and shared memory from ForwardTraits,
// one forward_kernel instantiation per head-dim bucket of tile_config.h. The grid is
// (q-tiles of max_seqlen_q) x heads x sequences, plus the tail sequence of a varlen call.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cuda/forward_kernel.cuh"
#include "cuda/launch.cuh"
#include "cuda/launchers.h"

namespace fusedattn {
namespace cuda {

template <typename T, int kHeadDim>
void launch_forward_bucket(const AttentionParams& params, int64_t max_seqlen_q, bool aligned, void* stream) {
  using Tr = ForwardTraits<T, kHeadDim>;
  const int64_t m_blocks = std::max<int64_t>(1, (max_seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM);
  // varlen: one more sequence, the packed rows after the last one (varlen.cuh).
  const int64_t sequences = params.batch + (params.sequences.cu_seqlens_q != nullptr ? 1 : 0);
  const ForwardArgs args{params, static_cast<int>(m_blocks), aligned};
  launch(forward_kernel<T, kHeadDim>, KernelName{"forward", T::kName, kHeadDim},
         m_blocks * params.num_heads * sequences, Tr::kThreads, Tr::kSmemBytes, stream, args);
}

template <typename T>
void launch_forward(const AttentionParams& params, int64_t max_seqlen_q, bool aligned, void* stream) {
  switch (head_dim_bucket(static_cast<int>(params.head_dim))) {
    case 32: return launch_forward_bucket<T, 32>(params, max_seqlen_q, aligned, stream);
    case 64: return launch_forward_bucket<T, 64>(params, max_seqlen_q, aligned, stream);
    case 96: return launch_forward_bucket<T, 96>(params, max_seqlen_q, aligned, stream);
    case 128: return launch_forward_bucket<T, 128>(params, max_seqlen_q, aligned, stream);
    case 192: return launch_forward_bucket<T, 192>(params, max_seqlen_q, aligned, stream);
    default: return launch_forward_bucket<T, 256>(params, max_seqlen_q, aligned, stream);
  }
}

}  // namespace cuda
}  // namespace fusedattn
