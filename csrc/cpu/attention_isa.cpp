// The CPU kernels of one ISA. CMake compiles this file once per ISA (scalar, AVX2+FMA, AVX-512)
// with -DFUSEDATTN_ISA=<name> and that ISA's flags; everything it instantiates lives in the
// namespace fusedattn::cpu::<name>, so the linker never mixes code built for different ISAs.
#include "cpu/forward_block.h"

#include <stdexcept>

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {
namespace {

#define FUSEDATTN_STRINGIFY_(x) #x
#define FUSEDATTN_STRINGIFY(x) FUSEDATTN_STRINGIFY_(x)

template <typename F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:  return f(float{});
    case DType::kFloat64:  return f(double{});
    case DType::kFloat16:  return f(Half{});
    case DType::kBFloat16: return f(BFloat16{});
  }
  throw std::invalid_argument("fusedattn: unknown dtype");
}

size_t forward_scratch_bytes(const AttentionParams& params, int64_t block_rows) {
  return dispatch_dtype(params.dtype, [&](auto tag) {
    return forward_scratch_bytes_t<decltype(tag)>(params, block_rows);
  });
}

void forward_block(const AttentionParams& params, const ForwardBlock& block, void* scratch) {
  dispatch_dtype(params.dtype, [&](auto tag) { forward_block_t<decltype(tag)>(params, block, scratch); });
}

}  // namespace

const CpuKernelTable& kernel_table() {
  static const CpuKernelTable table{FUSEDATTN_STRINGIFY(FUSEDATTN_ISA), &forward_scratch_bytes,
                                    &forward_block};
  return table;
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
