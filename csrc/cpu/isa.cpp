// CPU ISA detection by cpuid (__builtin_cpu_supports also checks that the OS saves the
// AVX/AVX-512 register state; AMX is checked by hand, cpu_has_amx), lookup of the matching
// kernel table, and the table a call runs on (kernels_for_call).
#include "cpu/isa.h"

#include <stdexcept>

#if defined(FUSEDATTN_HAVE_AMX)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
#if defined(FUSEDATTN_HAVE_AMX)
// AMX-TILE and AMX-BF16 (cpuid leaf 7, EDX bits 24 and 22), the tile state enabled by the OS
// (XCR0 bits 17 and 18), and this process allowed to use it: Linux asks each process to request
// the tile data state once (arch_prctl ARCH_REQ_XCOMP_PERM), else the first tile instruction
// faults. The request is process-wide and idempotent (PyTorch's oneDNN makes the same one).
bool cpu_has_amx() {
  static const bool usable = [] {
    if (!cpu_has_avx512bf16()) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
    unsigned xcr0_low = 0, xcr0_high = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    if ((xcr0_low & (3u << 17)) != (3u << 17)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  return usable;
}
#endif
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

const std::vector<IsaEntry>& isa_entries() {  // best first
  static const std::vector<IsaEntry> entries{
#if defined(FUSEDATTN_HAVE_AMX)
      {"avx512amx", &cpu_has_amx, &avx512amx::kernel_table},
#endif
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

constexpr int64_t kTileCallRows = 32;  // query rows from which a call runs the tiles, not the decode kernel

// bf16 whose head_dim is not a multiple of 16 (40, 72, 100, ...: the AMX tiles take multiples of
// 16) multiplies its pairs on VDPBF16PS under the avx512bf16 and avx512amx ISAs, and on Intel
// CPUs that ran slower than the avx512 ISA's products of widened bf16: `python
// benchmarks/bench_cpu_isas.py --shape 1 8 2048 40` (and 100), forward 0.71-0.74x and forward +
// backward 0.68-0.69x of avx512's on the Intel Xeon with AMX. Calls of 32 query rows or more
// (prefill and its backward, which run the tiles) take the avx512 ISA's kernels there; decode
// keeps the named ISA's (memory-bound: within a few percent either way in a timing probe, not
// committed; avx512amx 9% faster at head_dim 40 with GQA). AMD's VDPBF16PS was not measured at
// such head_dims, so other CPUs keep the named ISA's.
const CpuKernelTable& kernels_for_call(const std::string& name, const AttentionParams& params) {
  const CpuKernelTable& named = kernels_for_isa(name);
#if defined(FUSEDATTN_HAVE_X86_ISAS)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  const bool pairs_isa = name == "avx512amx" || name == "avx512bf16";
  if (intel && pairs_isa && params.dtype == DType::kBFloat16 && params.head_dim % 16 != 0 &&
      params.seqlen_q >= kTileCallRows) {
    return kernels_for_isa("avx512");
  }
#endif
  return named;
}

}  // namespace cpu
}  // namespace fusedattn
