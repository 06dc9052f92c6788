// CPU driver of the forward: tasks are (batch, head, q-block); the heaviest q-blocks (the
// last rows see the most keys under causal masking) are handed out first so the dynamic
// scheduler ends with short tasks. Each worker allocates its scratch once per call.
#include "cpu/attention_cpu.h"

#include <memory>
#include <new>
#include <vector>

#include "cpu/isa.h"
#include "cpu/thread_pool.h"

namespace fusedattn {
namespace cpu {
namespace {

struct AlignedDelete {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
using ScratchBuffer = std::unique_ptr<char[], AlignedDelete>;

ScratchBuffer allocate_scratch(size_t bytes) {
  return ScratchBuffer(static_cast<char*>(::operator new[](bytes, std::align_val_t(64))));
}

}  // namespace

int64_t forward_block_rows(const AttentionParams& params, int num_threads) {
  const int64_t heads = params.batch * params.num_heads;
  int64_t rows = 256;
  while (rows > 32 && heads * ((params.seqlen_q + rows - 1) / rows) < 4 * num_threads) rows /= 2;
  return rows < params.seqlen_q ? rows : params.seqlen_q;
}

void attention_forward(const AttentionParams& params, const std::string& isa, int num_threads) {
  const CpuKernelTable& kernels = kernels_for_isa(isa);
  if (params.seqlen_q == 0 || params.batch == 0 || params.num_heads == 0) return;
  const int64_t block_rows = forward_block_rows(params, num_threads);
  const int64_t num_blocks = (params.seqlen_q + block_rows - 1) / block_rows;
  const int64_t heads = params.batch * params.num_heads;
  const size_t scratch_bytes = kernels.forward_scratch_bytes(params, block_rows);
  std::vector<ScratchBuffer> scratch(num_threads > 0 ? num_threads : 1);

  parallel_for(heads * num_blocks, num_threads, [&](int64_t task, int worker) {
    const int64_t block_index = num_blocks - 1 - task / heads;  // heaviest first
    const int64_t head_index = task % heads;
    ForwardBlock block;
    block.batch = head_index / params.num_heads;
    block.head = head_index % params.num_heads;
    block.row_begin = block_index * block_rows;
    block.row_end = block.row_begin + block_rows < params.seqlen_q ? block.row_begin + block_rows
                                                                   : params.seqlen_q;
    if (!scratch[worker]) scratch[worker] = allocate_scratch(scratch_bytes);
    kernels.forward_block(params, block, scratch[worker].get());
  });
}

}  // namespace cpu
}  // namespace fusedattn
