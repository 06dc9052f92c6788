// Definitions of launch_decode<T> and launch_combine<T> (launchers.h).
#pragma once
#include "cuda/decode_kernel.cuh"
#include "cuda/launch.cuh"
#include "cuda/launchers.h"

namespace fusedattn {
namespace cuda {

template <typename T, int kHeadDim>
void launch_decode_bucket(const DecodeArgs& args, void* stream) {
  using Tr = DecodeTraits<T, kHeadDim>;
  const AttentionParams& p = args.attn;
  launch(decode_kernel<T, kHeadDim>, KernelName{"decode", T::kName, kHeadDim},
         static_cast<int64_t>(args.num_splits) * args.num_m_tiles * p.num_heads_kv * p.batch, Tr::kThreads,
         Tr::kSmemBytes, stream, args);
}

template <typename T>
void launch_decode(const DecodeArgs& args, void* stream) {
  switch (head_dim_bucket(static_cast<int>(args.attn.head_dim))) {
    case 32: return launch_decode_bucket<T, 32>(args, stream);
    case 64: return launch_decode_bucket<T, 64>(args, stream);
    case 96: return launch_decode_bucket<T, 96>(args, stream);
    case 128: return launch_decode_bucket<T, 128>(args, stream);
    case 192: return launch_decode_bucket<T, 192>(args, stream);
    default: return launch_decode_bucket<T, 256>(args, stream);
  }
}

template <typename T>
void launch_combine(const CombineArgs& args, void* stream) {
  const AttentionParams& p = args.attn;
  launch(combine_kernel<T>, KernelName{"decode_combine", T::kName, 0}, p.batch * p.num_heads * p.seqlen_q,
         kCombineThreads, 0, stream, args);
}

}  // namespace cuda
}  // namespace fusedattn
