// Decode over a paged cache in pool order (pool_walk.cpp): where the block tables are shuffled,
// the batch's pages are read sorted by their place in the pool, interleaving the sequences'
// decode blocks, instead of each sequence's pages in table order.
#pragma once
#include "common/params.h"
#include "cpu/kernel_table.h"

namespace fusedattn {
namespace cpu {

// Runs the forward of `params` as a pool walk and returns true where that reads the cache with
// far fewer jumps in memory than the table order (see pool_walk.cpp); returns false, having
// done nothing, otherwise.
bool decode_in_pool_order(const AttentionParams& params, const CpuKernelTable& kernels, int num_threads);

}  // namespace cpu
}  // namespace fusedattn
