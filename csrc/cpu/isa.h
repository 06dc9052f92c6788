// CPU ISA detection and the kernel table of each ISA this build and this CPU can run.
#pragma once
#include <string>
#include <vector>

#include "common/params.h"
#include "cpu/kernel_table.h"

namespace fusedattn {
namespace cpu {

// ISAs compiled into this build that the running CPU (and OS) supports, best first.
std::vector<std::string> available_isas();

// The kernels of the named ISA. Throws std::invalid_argument naming the available ones when
// `name` is unknown or not runnable here.
const CpuKernelTable& kernels_for_isa(const std::string& name);

// The kernels a forward or backward of `params` runs on under the named ISA: the ISA's own, except
// where another ISA's are faster on this CPU for the call (see isa.cpp). Throws as kernels_for_isa.
const CpuKernelTable& kernels_for_call(const std::string& name, const AttentionParams& params);

}  // namespace cpu
}  // namespace fusedattn
