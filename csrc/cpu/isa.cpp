// CPU ISA detection by cpuid (__builtin_cpu_supports also checks that the OS saves the
// AVX/AVX-512 register state) and lookup of the matching kernel table.
#include "cpu/isa.h"

#include <stdexcept>

namespace fusedattn {
namespace cpu {
namespace {

struct IsaEntry {
  const char* name;
  bool (*supported)();
  const CpuKernelTable& (*table)();
};

#if defined(FUSEDATTN_HAVE_X86_ISAS)
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

const std::vector<IsaEntry>& isa_entries() {  // best first
  static const std::vector<IsaEntry> entries{
#if defined(FUSEDATTN_HAVE_AVX512BF16)
      {"avx512bf16", &cpu_has_avx512bf16, &avx512bf16::kernel_table},
#endif
#if defined(FUSEDATTN_HAVE_X86_ISAS)
      {"avx512", &cpu_has_avx512, &avx512::kernel_table},
      {"avx2", &cpu_has_avx2, &avx2::kernel_table},
#endif
      {"scalar", &always, &scalar::kernel_table},
  };
  return entries;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& entry : isa_entries()) {
    if (entry.supported()) names.emplace_back(entry.name);
  }
  return names;
}

const CpuKernelTable& kernels_for_isa(const std::string& name) {
  for (const IsaEntry& entry : isa_entries()) {
    if (name == entry.name && entry.supported()) return entry.table();
  }
  std::string message = "CPU ISA '" + name + "' is not available on this machine; available:";
  for (const std::string& available : available_isas()) message += " " + available;
  throw std::invalid_argument(message);
}

}  // namespace cpu
}  // namespace fusedattn
