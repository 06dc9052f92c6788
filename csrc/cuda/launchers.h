// Launchers of the templated kernels, one explicit instantiation per dtype in its own .cu file
// (forward_fp16.cu, forward_bf16.cu, decode_fp16.cu, decode_bf16.cu) so that nvcc compiles them
// in parallel. attention_cuda.cu dispatches to them.
#pragma once
#include "cuda/decode_kernel.cuh"
#include "cuda/forward_kernel.cuh"

namespace fusedattn {
namespace cuda {

// Forward on tensor cores: head-dim bucket switch inside. T: Fp16 or Bf16. max_seqlen_q sizes
// the grid: params.seqlen_q, or for varlen (cu_seqlens set) the caller's bound on the lengths.
template <typename T>
void launch_forward(const AttentionParams& params, int64_t max_seqlen_q, bool aligned, void* stream);

// Split-KV decode (args.num_splits > 1 writes the workspace) and its combine step.
template <typename T>
void launch_decode(const DecodeArgs& args, void* stream);

template <typename T>
void launch_combine(const CombineArgs& args, void* stream);

}  // namespace cuda
}  // namespace fusedattn
