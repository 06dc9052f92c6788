// CPU driver of the backward (FlashAttention-2 order: parallel over key blocks).
//   1. Dsum = rowsum(dO∘O) per query row, parallel over (batch, head).
//   2. Tasks are (batch, kv-head, key block); each writes its own rows of dK and dV. They are cut
//      into one contiguous chunk per thread with equal estimated cost (visible query rows), so
//      causal masks stay balanced. The split depends only on the shapes and the thread count.
//   3. Each chunk accumulates dQ into its own zeroed fp32 partial for the kv-head groups it
//      touches; the partials are then summed per (batch, head) in chunk order. No atomics, no
//      races, and the same inputs and thread count give bitwise the same gradients.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "common/variant.h"
#include "cpu/attention_cpu.h"
#include "cpu/isa.h"
#include "cpu/thread_pool.h"

namespace fusedattn {
namespace cpu {

namespace {

// The backward of batch entries [batch_begin, batch_end) of bp (all of them, or one sequence).
void run_backward(const BackwardParams& bp, const CpuKernelTable& kernels, int64_t batch_begin, int64_t batch_end,
                  int num_threads) {
  const AttentionParams& p = bp.forward;
  const int64_t batches = batch_end - batch_begin;
  const int64_t heads = batches * p.num_heads;
  const int64_t group = p.num_heads_kv > 0 ? p.num_heads / p.num_heads_kv : 0;
  const size_t acc_bytes = p.dtype == DType::kFloat64 ? 8 : 4;

  std::vector<char> dsum(static_cast<size_t>(heads * p.seqlen_q) * acc_bytes);
  parallel_for(heads, num_threads, [&](int64_t t, int) {
    kernels.backward_dsum(bp, batch_begin + t / p.num_heads, t % p.num_heads, dsum.data() + t * p.seqlen_q * acc_bytes);
  });

  // Tasks (group g = batch * num_heads_kv + kv_head, key block) and their estimated costs.
  const int64_t block_keys = kernels.backward_block_keys;
  const int64_t blocks_per_group = (p.seqlen_k + block_keys - 1) / block_keys;
  const int64_t num_tasks = batches * p.num_heads_kv * blocks_per_group;
  std::vector<int64_t> cost_prefix(num_tasks + 1, 0);
  for (int64_t t = 0; t < num_tasks; ++t) {
    const int64_t key_begin = (t % blocks_per_group) * block_keys;
    const int64_t key_end = std::min(p.seqlen_k, key_begin + block_keys);
    const RowRange rows = visible_rows_of_keys(p, key_begin, key_end);
    cost_prefix[t + 1] = cost_prefix[t] + 1 + (rows.end - rows.begin) * group;
  }
  const int64_t num_chunks = std::min<int64_t>(std::max(num_threads, 1), num_tasks);
  std::vector<int64_t> chunk_begin(num_chunks + 1, num_tasks);
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t target = cost_prefix[num_tasks] * c / num_chunks;
    chunk_begin[c] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), target) - cost_prefix.begin();
  }

  // dQ partials: chunk c covers groups [first_group[c], last_group[c]].
  const int64_t group_elements = group * p.seqlen_q * kernels.row_pitch(p);
  std::vector<int64_t> first_group(num_chunks), last_group(num_chunks);
  std::vector<std::vector<char>> partials(num_chunks);
  const size_t scratch_bytes = kernels.backward_scratch_bytes(p);
  parallel_for(num_chunks, num_threads, [&](int64_t c, int) {
    const int64_t begin = chunk_begin[c], end = chunk_begin[c + 1];
    if (begin >= end) return;
    first_group[c] = begin / blocks_per_group;
    last_group[c] = (end - 1) / blocks_per_group;
    partials[c].assign((last_group[c] - first_group[c] + 1) * group_elements * acc_bytes, 0);
    std::vector<char> scratch(scratch_bytes + 64);
    void* aligned_scratch = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / blocks_per_group;
      const int64_t batch = g / p.num_heads_kv;  // relative to batch_begin
      kernels.backward_kv_block(bp, batch_begin + batch, g % p.num_heads_kv, (t % blocks_per_group) * block_keys,
                                partials[c].data() + (g - first_group[c]) * group_elements * acc_bytes,
                                dsum.data() + batch * p.num_heads * p.seqlen_q * acc_bytes, aligned_scratch);
    }
  });

  parallel_for(heads, num_threads, [&](int64_t t, int) {
    const int64_t batch = t / p.num_heads, head = t % p.num_heads;
    const int64_t g = batch * p.num_heads_kv + head / group;
    const int64_t head_offset = ((head % group) * p.seqlen_q * kernels.row_pitch(p)) * acc_bytes;
    std::vector<const void*> parts;
    for (int64_t c = 0; c < num_chunks; ++c) {
      if (partials[c].empty() || g < first_group[c] || g > last_group[c]) continue;
      parts.push_back(partials[c].data() + (g - first_group[c]) * group_elements * acc_bytes + head_offset);
    }
    kernels.backward_reduce_dq(bp, batch_begin + batch, head, parts.data(), static_cast<int64_t>(parts.size()));
  });
}

}  // namespace

void attention_backward(const BackwardParams& bp, const std::string& isa, int num_threads) {
  const CpuKernelTable& kernels = kernels_for_call(isa, bp.forward);
  if (!bp.forward.sequences.any()) {
    run_backward(bp, kernels, 0, bp.forward.batch, num_threads);
    return;
  }
  // Variable-length sequences: one sequence at a time, each parallel over its key blocks.
  for (int64_t b = 0; b < bp.forward.batch; ++b) {
    BackwardParams sequence = bp;
    sequence.forward = sequence_params(bp.forward, b);
    const int64_t element = dtype_size(bp.forward.dtype);
    const SequenceLayout& s = bp.forward.sequences;
    for (TensorRef* t : {&sequence.dout, &sequence.dq}) {
      t->data = static_cast<char*>(t->data) + s.cu_seqlens_q[b] * t->row_stride * element;
      t->batch_stride = 0;
    }
    for (TensorRef* t : {&sequence.dk, &sequence.dv}) {
      t->data = static_cast<char*>(t->data) + s.cu_seqlens_k[b] * t->row_stride * element;
      t->batch_stride = 0;
    }
    if (sequence.dlse != nullptr) sequence.dlse += s.cu_seqlens_q[b];
    if (sequence.dlse_f64 != nullptr) sequence.dlse_f64 += s.cu_seqlens_q[b];
    run_backward(sequence, kernels, b, b + 1, num_threads);
  }
}

}  // namespace cpu
}  // namespace fusedattn
