// CPU ISA detection and the kernel table of each ISA this build and this CPU can run.
#pragma once
#include <string>
#include <vector>

#include "cpu/kernel_table.h"

namespace fusedattn {
namespace cpu {

// ISAs compiled into this build that the running CPU (and OS) supports, best first.
std::vector<std::string> available_isas();

// The kernels of the named ISA. Throws std::invalid_argument naming the available ones when
// `name` is unknown or not runnable here.
const CpuKernelTable& kernels_for_isa(const std::string& name);

}  // namespace cpu
}  // namespace fusedattn
