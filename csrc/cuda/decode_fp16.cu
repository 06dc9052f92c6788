// The fp16 split-KV decode kernels (one per head-dim bucket) and their combine step; see decode_kernel.cuh.
#include "cuda/decode_launch.cuh"

namespace fusedattn {
namespace cuda {
template void launch_decode<Fp16>(const DecodeArgs&, void*);
template void launch_combine<Fp16>(const CombineArgs&, void*);
}  // namespace cuda
}  // namespace fusedattn
