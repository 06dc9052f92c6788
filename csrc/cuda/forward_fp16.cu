// The fp16 forward kernels (one per head-dim bucket); see forward_kernel.cuh.
#include "cuda/forward_launch.cuh"

namespace fusedattn {
namespace cuda {
template void launch_forward<Fp16>(const AttentionParams&, int64_t, bool, void*);
}  // namespace cuda
}  // namespace fusedattn
