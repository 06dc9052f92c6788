// CPU driver of the forward: plans the blocks, runs them on the thread pool, merges key splits.
//
// Blocks (ForwardBlock) are q-blocks of one (sequence, head); for short queries (decode,
// Lq·group <= kPackedLanes) the query heads of a GQA group are packed into one block so K/V
// are read once per group, and for decode (runs_decode_kernel(Lq·group)) a block holds the
// groups of up to kDecodeBlockLanes lanes, so that it reads each cache row (all kv heads) in one
// sweep. When there are fewer blocks than 2x the threads, or a decode block carries more than
// its share of the work, and the keys are long, the block's key axis is split (split-KV) and
// the partial results merged by LSE.
// Blocks are handed out heaviest first (estimated by rows x keys), which keeps threads busy
// to the end even when sequence lengths are very uneven.
#include "cpu/attention_cpu.h"

#include <algorithm>
#include <vector>

#include "common/variant.h"
#include "cpu/isa.h"
#include "cpu/pool_walk.h"
#include "cpu/thread_pool.h"
#include "cpu/tiles.h"

namespace fusedattn {
namespace cpu {
namespace {

struct PlannedBlock {
  ForwardBlock block;
  int64_t cost;
  int64_t merge_index;  // -1, or which merged block this split belongs to
};

}  // namespace

char* kept_scratch(ScratchUse use, size_t bytes, ScratchBuffer& fresh) {
  struct Kept {
    ScratchBuffer buffer;
    size_t bytes = 0;
  };
  thread_local Kept kept[static_cast<int>(ScratchUse::kCount)];
  if (bytes > static_cast<size_t>(kKeptScratchBytes)) {
    fresh = allocate_scratch(bytes);
    return fresh.get();
  }
  Kept& mine = kept[static_cast<int>(use)];
  if (mine.bytes < bytes) {
    mine.buffer.reset();  // (before the new one: a thread holds one buffer per use at most)
    mine.buffer = allocate_scratch(bytes);
    mine.bytes = bytes;
  }
  return mine.buffer.get();
}

AttentionParams sequence_params(const AttentionParams& p, int64_t b) {
  const SequenceLayout& s = p.sequences;
  if (!s.any()) return p;
  AttentionParams q = p;
  const int64_t element = dtype_size(p.dtype);
  auto advance = [element](TensorRef& t, int64_t rows) {
    t.data = static_cast<char*>(t.data) + rows * t.row_stride * element;
    t.batch_stride = 0;
  };
  if (s.cu_seqlens_q != nullptr) {
    q.seqlen_q = s.cu_seqlens_q[b + 1] - s.cu_seqlens_q[b];
    advance(q.q, s.cu_seqlens_q[b]);
    advance(q.out, s.cu_seqlens_q[b]);
    if (q.lse != nullptr) q.lse += s.cu_seqlens_q[b];
    if (q.lse_f64 != nullptr) q.lse_f64 += s.cu_seqlens_q[b];
    q.lse_batch_stride = 0;
  }
  if (s.cu_seqlens_k != nullptr) {
    q.seqlen_k = s.cu_seqlens_k[b + 1] - s.cu_seqlens_k[b];
    advance(q.k, s.cu_seqlens_k[b]);
    advance(q.v, s.cu_seqlens_k[b]);
  } else if (s.seqlens_k != nullptr) {
    const int64_t begin = s.k_begin != nullptr ? s.k_begin[b] : 0;
    q.seqlen_k = s.seqlens_k[b] - begin;
    if (s.block_table != nullptr) {
      q.sequences.block_table = s.block_table + b * s.block_table_stride;  // the kernel indexes it with batch b
      q.sequences.block_table_stride = 0;
    } else {
      const int64_t cache_row = s.cache_batch_idx != nullptr ? s.cache_batch_idx[b] : b;
      for (TensorRef* t : {&q.k, &q.v}) {
        t->data = static_cast<char*>(t->data) + (cache_row * t->batch_stride + begin * t->row_stride) * element;
        t->batch_stride = 0;
      }
    }
  }
  q.q_offset = q.seqlen_k - q.seqlen_q;  // bottom-right, per sequence
  return q;
}

int64_t forward_block_rows(const AttentionParams& params, int num_threads) {
  const int64_t heads = params.batch * params.num_heads;
  int64_t rows = kMaxBlockRows;
  while (rows > kMinBlockRows && heads * ((params.seqlen_q + rows - 1) / rows) < 4 * num_threads) rows /= 2;
  return rows < params.seqlen_q ? rows : params.seqlen_q;
}

namespace {

// Whether a block may hold several heads: no dropout (its keep mask is per head) and no
// per-head attn_mask.
bool heads_packable(const AttentionParams& params) {
  return params.dropout_p == 0.0f && !(params.mask.type != MaskType::kNone && params.mask.head_stride != 0);
}

}  // namespace

bool decodes_whole_rows(const AttentionParams& params, int64_t seqlen_q, const CpuKernelTable& kernels) {
  // Where the kv heads lie side by side in a cache row. In caches stored (B, Hkv, L, D) and seen
  // as (B, L, Hkv, D) (Hugging Face's), each kv head's rows run on by themselves, and a block per
  // group reads one stream: ab_decode.py --head-major, GB/s, one token MHA / GQA fp32 36.7 ->
  // 38.5 / 26.2 -> 33.7, bf16 30.4 -> 36.6 / 24.0 -> 31.3; 8 tokens MHA fp32 16.3 -> 31.3.
  const bool rows_side_by_side = params.num_heads_kv == 1 || (kv_heads_side_by_side(params.k, params.head_dim) &&
                                                               kv_heads_side_by_side(params.v, params.head_dim));
  const int64_t group = params.num_heads / params.num_heads_kv;
  return heads_packable(params) && rows_side_by_side && runs_decode_kernel(params, seqlen_q * group, kernels);
}

namespace {

// How many key splits a block with `span` visible keys can take: kMinSplitKeys keys each, and
// none for fp64, which keeps its full precision (no fp32 partials).
int64_t max_key_splits(const AttentionParams& params, int64_t span) {
  return params.dtype == DType::kFloat64 ? 1 : span / kMinSplitKeys;
}

std::vector<PlannedBlock> plan_blocks(const AttentionParams& params, int num_threads, const CpuKernelTable& kernels) {
  std::vector<PlannedBlock> plan;
  const int64_t group = params.num_heads / params.num_heads_kv;
  const int64_t block_rows = std::max<int64_t>(1, forward_block_rows(params, num_threads));
  const bool packable = heads_packable(params);
  for (int64_t b = 0; b < params.batch; ++b) {
    const AttentionParams seq = sequence_params(params, b);
    if (seq.seqlen_q <= 0) continue;
    const bool pack = group > 1 && seq.seqlen_q * group <= kPackedLanes && packable;
    // Decode: whole groups, up to kDecodeBlockLanes lanes, so cache rows are read front to back
    // (decodes_whole_rows).
    const bool all_heads = decodes_whole_rows(params, seq.seqlen_q, kernels);
    int64_t heads_per_block = pack ? group : 1;
    if (all_heads) {  // ... but at least 2 blocks per thread: from key splits (split_keys) where
      // the cache is long enough, which keep each cache row read whole, else from the heads
      const int64_t blocks_per_sequence = (2 * num_threads + params.batch - 1) / params.batch;
      const KeyRange keys = visible_keys_of_rows(seq, 0, seq.seqlen_q);
      const bool key_splits = max_key_splits(params, keys.end - keys.begin) >= blocks_per_sequence;
      const int64_t head_blocks = key_splits ? 1 : blocks_per_sequence;
      const int64_t groups = (params.num_heads / group + head_blocks - 1) / head_blocks;
      heads_per_block = group * std::max<int64_t>(1, std::min(groups, kDecodeBlockLanes / (seq.seqlen_q * group)));
    }
    const int64_t rows = pack || all_heads ? seq.seqlen_q : block_rows;
    for (int64_t head = 0; head < params.num_heads; head += heads_per_block) {
      for (int64_t r = 0; r < seq.seqlen_q; r += rows) {
        ForwardBlock block;
        block.batch = b;
        block.head_begin = head;
        block.head_count = std::min(heads_per_block, params.num_heads - head);
        block.row_begin = r;
        block.row_end = std::min(seq.seqlen_q, r + rows);
        block.key_lo = 0;
        block.key_hi = seq.seqlen_k;
        const KeyRange keys = visible_keys_of_rows(seq, block.row_begin, block.row_end);
        const int64_t cost = (block.row_end - block.row_begin) * block.head_count * (keys.end - keys.begin + 64);
        plan.push_back({block, cost, -1});
      }
    }
  }
  return plan;
}

// Splits the key axis of blocks when there are too few blocks for the threads, and of decode
// blocks that carry more than a share (half a thread's) of the work: a long sequence decoded
// next to short ones (its heads stay in one block, see plan_blocks) is still spread over the
// threads.
int64_t split_keys(std::vector<PlannedBlock>& plan, const AttentionParams& params, int num_threads,
                   const CpuKernelTable& kernels) {
  const int64_t blocks = static_cast<int64_t>(plan.size());
  if (blocks == 0) return 0;
  int64_t total_cost = 0;
  for (const PlannedBlock& planned : plan) total_cost += planned.cost;
  const int64_t share = std::max<int64_t>(1, total_cost / (2 * num_threads));
  std::vector<PlannedBlock> split;
  int64_t merged = 0;
  for (const PlannedBlock& planned : plan) {
    const AttentionParams seq = sequence_params(params, planned.block.batch);
    const KeyRange keys = visible_keys_of_rows(seq, planned.block.row_begin, planned.block.row_end);
    const int64_t span = keys.end - keys.begin;
    int64_t want = blocks < 2 * num_threads ? (2 * num_threads + blocks - 1) / blocks : 1;
    if (runs_decode_kernel(params, lanes_per_kv_head(params, planned.block), kernels)) {
      want = std::max(want, (planned.cost + share - 1) / share);
    }
    const int64_t splits = std::min<int64_t>(want, max_key_splits(params, span));
    if (splits < 2) {
      split.push_back(planned);
      continue;
    }
    const int64_t chunk = ((span + splits - 1) / splits + 63) / 64 * 64;  // key blocks stay aligned
    for (int64_t lo = keys.begin / 64 * 64; lo < keys.end; lo += chunk) {
      PlannedBlock part = planned;
      part.block.key_lo = lo == keys.begin / 64 * 64 ? 0 : lo;  // the first split also owns the sink
      part.block.key_hi = std::min(keys.end, lo + chunk);
      part.cost = planned.cost / splits;
      part.merge_index = merged;
      split.push_back(part);
    }
    ++merged;
  }
  plan.swap(split);
  return merged;
}

}  // namespace

void attention_forward(const AttentionParams& params, const std::string& isa, int num_threads) {
  const CpuKernelTable& kernels = kernels_for_call(isa, params);
  if (params.batch == 0 || params.num_heads == 0) return;
  if (decode_in_pool_order(params, kernels, num_threads)) return;
  std::vector<PlannedBlock> plan = plan_blocks(params, num_threads, kernels);
  const int64_t merged = split_keys(plan, params, num_threads, kernels);
  std::stable_sort(plan.begin(), plan.end(),
                   [](const PlannedBlock& a, const PlannedBlock& b) { return a.cost > b.cost; });

  // (after sorting: parts_of indexes the final plan order)
  int64_t max_lanes = 1;
  for (const PlannedBlock& p : plan) {
    max_lanes = std::max(max_lanes, (p.block.row_end - p.block.row_begin) * p.block.head_count);
  }
  // Partial results of split blocks: [lanes][head_dim] outputs and [lanes][2] (max, log sum) each.
  std::vector<float> partials;
  std::vector<std::vector<int64_t>> parts_of(merged);
  if (merged > 0) {
    size_t offset = 0;
    for (size_t i = 0; i < plan.size(); ++i) {
      if (plan[i].merge_index < 0) continue;
      parts_of[plan[i].merge_index].push_back(static_cast<int64_t>(i));
      offset += static_cast<size_t>(max_lanes * (params.head_dim + 2));
    }
    partials.resize(offset);
    offset = 0;
    for (PlannedBlock& p : plan) {
      if (p.merge_index < 0) continue;
      p.block.partial_out = partials.data() + offset;
      p.block.partial_stats = p.block.partial_out + max_lanes * params.head_dim;
      offset += static_cast<size_t>(max_lanes * (params.head_dim + 2));
    }
  }

  // A call whose whole work is a few microseconds runs on the calling thread where waking the
  // other threads would cost more than they save (serial_work_macs). The plan stays the one for
  // num_threads, so the results do not depend on it.
  int64_t work_macs = 0;
  for (const PlannedBlock& p : plan) work_macs += 2 * p.cost * params.head_dim;
  const int run_threads = work_macs < serial_work_macs() ? 1 : num_threads;

  const size_t scratch_bytes = kernels.forward_scratch_bytes(params, max_lanes);
  parallel_for(static_cast<int64_t>(plan.size()), run_threads, [&](int64_t task, int) {
    const ForwardBlock& block = plan[task].block;
    ScratchBuffer fresh;
    char* scratch = kept_scratch(ScratchUse::kBlock, scratch_bytes, fresh);
    kernels.forward_block(sequence_params(params, block.batch), block, scratch);
  });
  parallel_for(merged, run_threads, [&](int64_t m, int) {
    std::vector<const float*> outs, stats;
    for (const int64_t i : parts_of[m]) {
      outs.push_back(plan[i].block.partial_out);
      stats.push_back(plan[i].block.partial_stats);
    }
    const ForwardBlock& block = plan[parts_of[m].front()].block;
    kernels.merge_block_partials(sequence_params(params, block.batch), block, outs.data(), stats.data(),
                                 static_cast<int64_t>(outs.size()));
  });
}

}  // namespace cpu
}  // namespace fusedattn
