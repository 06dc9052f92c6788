// The interface between the ISA-independent CPU driver (attention_cpu.cpp) and the kernels that
// attention_isa.cpp compiles once per ISA. Each ISA namespace provides kernel_table().
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/params.h"

namespace fusedattn {
namespace cpu {

// The forward's unit of work: one q-block of `block_rows` query rows of one (batch, head).
struct ForwardBlock {
  int64_t batch;
  int64_t head;
  int64_t row_begin;
  int64_t row_end;
};

struct CpuKernelTable {
  const char* isa_name;
  // Bytes of per-thread scratch that forward_block needs for q-blocks of block_rows rows.
  size_t (*forward_scratch_bytes)(const AttentionParams& params, int64_t block_rows);
  void (*forward_block)(const AttentionParams& params, const ForwardBlock& block, void* scratch);
};

#define FUSEDATTN_DECLARE_ISA(isa) \
  namespace isa {                  \
  const CpuKernelTable& kernel_table(); \
  }
FUSEDATTN_DECLARE_ISA(scalar)
FUSEDATTN_DECLARE_ISA(avx2)
FUSEDATTN_DECLARE_ISA(avx512)
#undef FUSEDATTN_DECLARE_ISA

}  // namespace cpu
}  // namespace fusedattn
