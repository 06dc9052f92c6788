// The CPU attention entry points: split the work into tasks, give each thread its scratch,
// and run the chosen ISA's kernels on the thread pool.
#pragma once
#include <string>

#include "common/params.h"

namespace fusedattn {
namespace cpu {

// Forward over all (batch, head, q-block) tasks. `isa` names a kernel set (see isa.h).
void attention_forward(const AttentionParams& params, const std::string& isa, int num_threads);

// Backward: writes dq, dk, dv from dout, q, k, v, out and lse (see backward_cpu.cpp).
void attention_backward(const BackwardParams& params, const std::string& isa, int num_threads);

// Query rows per task: the largest of 256, 128, 64, 32 (capped by seqlen_q) that still gives
// every thread about four tasks, so dynamic scheduling can balance causal work.
int64_t forward_block_rows(const AttentionParams& params, int num_threads);

}  // namespace cpu
}  // namespace fusedattn
