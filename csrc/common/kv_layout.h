// Where key/value row j of (batch, kv_head) lives: evenly strided rows, or a paged cache
// (SequenceLayout::block_table). Shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#include "common/params.h"
#include "common/variant.h"

namespace fusedattn {
namespace {

// Element offset of row j of (batch, kv_head) in tensor t (k or v).
FUSEDATTN_HOST_DEVICE int64_t kv_row_offset(const AttentionParams& p, const TensorRef& t, int64_t batch,
                                            int64_t kv_head, int64_t j) {
  const SequenceLayout& s = p.sequences;
  if (s.block_table != nullptr) {
    const int64_t page = s.block_table[batch * s.block_table_stride + j / s.page_size];
    return page * t.batch_stride + (j % s.page_size) * t.row_stride + kv_head * t.head_stride;
  }
  return batch * t.batch_stride + kv_head * t.head_stride + j * t.row_stride;
}

// True when rows [j0, j0 + n) are evenly strided by row_stride (always, unless they cross pages).
FUSEDATTN_HOST_DEVICE bool kv_rows_strided(const AttentionParams& p, int64_t j0, int64_t n) {
  const SequenceLayout& s = p.sequences;
  return s.block_table == nullptr || j0 / s.page_size == (j0 + n - 1) / s.page_size;
}

}  // namespace
}  // namespace fusedattn
