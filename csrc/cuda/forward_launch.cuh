// Definition of launch_forward<T> (launchers.h): grid and shared memory from ForwardTraits,
// one forward_kernel instantiation per head-dim bucket of tile_config.h.
#pragma once
#include "cuda/forward_kernel.cuh"
#include "cuda/launch.cuh"
#include "cuda/launchers.h"

namespace fusedattn {
namespace cuda {

template <typename T, int kHeadDim>
void launch_forward_bucket(const AttentionParams& params, bool aligned, void* stream) {
  using Tr = ForwardTraits<T, kHeadDim>;
  const int64_t m_blocks = (params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  const ForwardArgs args{params, static_cast<int>(m_blocks), aligned};
  launch(forward_kernel<T, kHeadDim>, KernelName{"forward", T::kName, kHeadDim},
         m_blocks * params.num_heads * params.batch, Tr::kThreads, Tr::kSmemBytes, stream, args);
}

template <typename T>
void launch_forward(const AttentionParams& params, bool aligned, void* stream) {
  switch (head_dim_bucket(static_cast<int>(params.head_dim))) {
    case 32: return launch_forward_bucket<T, 32>(params, aligned, stream);
    case 64: return launch_forward_bucket<T, 64>(params, aligned, stream);
    case 96: return launch_forward_bucket<T, 96>(params, aligned, stream);
    case 128: return launch_forward_bucket<T, 128>(params, aligned, stream);
    case 192: return launch_forward_bucket<T, 192>(params, aligned, stream);
    default: return launch_forward_bucket<T, 256>(params, aligned, stream);
  }
}

}  // namespace cuda
}  // namespace fusedattn
