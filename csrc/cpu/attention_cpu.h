// The CPU attention entry points: split the work into tasks, give each thread its scratch,
// and run the chosen ISA's kernels on the thread pool.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>

#include "common/params.h"

namespace fusedattn {
namespace cpu {

// Per-thread scratch, 64-byte aligned.
struct AlignedDelete {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
using ScratchBuffer = std::unique_ptr<char[], AlignedDelete>;
inline ScratchBuffer allocate_scratch(size_t bytes) {
  return ScratchBuffer(static_cast<char*>(::operator new[](bytes, std::align_val_t(64))));
}

// What a thread keeps scratch for between calls (kept_scratch): a block's scratch, and a pool
// walk's decode states and partial results (the latter on the calling thread).
enum class ScratchUse { kBlock, kDecodeStates, kPartials, kCount };
// At least `bytes` of 64-byte aligned scratch for `use` on the calling thread: a buffer the
// thread keeps between calls (thread_local, grown as needed, up to kKeptScratchBytes in
// tiles.h), or for a larger request a fresh one held in `fresh`. Memory that a call allocates
// afresh page-faults at its first touch of every 4 KiB page (the allocator hands freed memory
// back to the system, and this VM has no transparent huge pages). A thread runs one task at a
// time, so two tasks never share a buffer; a task holds it only until it returns.
char* kept_scratch(ScratchUse use, size_t bytes, ScratchBuffer& fresh);

// Forward over all (batch, head, q-block) tasks. `isa` names a kernel set (see isa.h).
void attention_forward(const AttentionParams& params, const std::string& isa, int num_threads);

// Backward: writes dq, dk, dv from dout, q, k, v, out and lse (see backward_cpu.cpp).
void attention_backward(const BackwardParams& params, const std::string& isa, int num_threads);

// The per-sequence view of a varlen / KV-cache call (see SequenceLayout in params.h): the
// lengths, bottom-right q_offset and base pointers of sequence b, batch strides 0 (so kernels
// keep using b for dropout and ALiBi). Returns params unchanged for plain batches.
AttentionParams sequence_params(const AttentionParams& params, int64_t b);

struct CpuKernelTable;  // kernel_table.h

// Whether a sequence of seqlen_q query rows decodes in blocks of whole GQA groups that read each
// cache row (all its kv heads) in one sweep, as plan_blocks makes them: no dropout or per-head
// mask, kv heads side by side in a cache row, and few enough lanes per kv head for the decode
// kernel (runs_decode_kernel with the ISA's kernels).
bool decodes_whole_rows(const AttentionParams& params, int64_t seqlen_q, const CpuKernelTable& kernels);

// Query rows per task: the largest of 256, 128, 64, 32 (capped by seqlen_q) that still gives
// every thread about four tasks, so dynamic scheduling can balance causal work.
int64_t forward_block_rows(const AttentionParams& params, int num_threads);

}  // namespace cpu
}  // namespace fusedattn
