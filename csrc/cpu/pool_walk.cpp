// Decode over a paged cache in pool order.
//
// A decode call reads each sequence's K/V pages in block-table order. Where the tables are
// shuffled (pages handed out while the batch's sequences grew side by side, or left so by
// churn), every page is a jump in memory: the hardware prefetchers restart there, and each jump
// waits for a cold page-table walk (docs/cpu.md). Attention over a sequence's keys does not
// depend on the order they are visited in (online softmax), so where the batch's pages sorted
// by their index in the pool (their address) jump far less often than in table order, this walk
// reads them sorted: one visit (DecodeVisit) per run of pages that follow one another both in
// the pool and in one sequence's keys, the sequences' decode blocks interleaved, each block's
// running state kept in memory between its visits. The sorted pages are cut into one part per
// thread (equal key rows); a sequence that several parts visit gets a partial result from
// each, merged by LSE as split-KV's are.
#include "cpu/pool_walk.h"

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "common/variant.h"
#include "cpu/attention_cpu.h"
#include "cpu/thread_pool.h"
#include "cpu/tiles.h"

namespace fusedattn {
namespace cpu {
namespace {

// Keys [key_lo, key_hi) of sequence `batch` (on one page, or on pages that follow one another).
struct KeyRun {
  int64_t page;  // the run's first page
  int64_t batch;
  int64_t key_lo;
  int64_t key_hi;
};

// Whether each sequence decodes as one block of all its heads that reads whole cache rows (the
// blocks plan_blocks makes for decode), so that a walk can visit it page by page: a paged cache,
// no cache_leftpad, no dropout or per-head mask, and fp32 partials are fine (not fp64). Kv heads
// of one lane group only: with two (a GQA group of 8, or 2 tokens of a group of 4) the walk
// measured 2-3 points below the table order (ab_decode.py --cases 4-float32-paged,... and
// --queries 2).
bool walkable(const AttentionParams& params) {
  const SequenceLayout& layout = params.sequences;
  if (layout.block_table == nullptr || layout.k_begin != nullptr || layout.cu_seqlens_q != nullptr) return false;
  if (params.dtype == DType::kFloat64 || params.dropout_p > 0.0) return false;
  if (params.mask.type != MaskType::kNone && params.mask.head_stride != 0) return false;
  const int64_t group = params.num_heads / params.num_heads_kv;
  return params.seqlen_q * group <= kDecodeLanes && params.seqlen_q * params.num_heads <= kDecodeBlockLanes &&
         kv_heads_side_by_side(params.k, params.head_dim) && kv_heads_side_by_side(params.v, params.head_dim);
}

// One part of the walk (a thread's): its visits in pool order, and per sequence it visits a
// state slot, the visits that open and close the block there, and the block.
struct WalkPart {
  std::vector<KeyRun> visits;
  std::vector<int64_t> slot_of;  // [batch] -> slot, -1 where not visited
  std::vector<int64_t> batch_of_slot;
  std::vector<int64_t> first_visit, last_visit;  // [slot]
  std::vector<ForwardBlock> blocks;              // [slot]
};

}  // namespace

bool decode_in_pool_order(const AttentionParams& params, const CpuKernelTable& kernels, int num_threads) {
  if (!walkable(params)) return false;
  const SequenceLayout& layout = params.sequences;
  const int64_t page_size = layout.page_size;

  // The pages every sequence sees (clipped to its visible keys), and the table order's jumps.
  std::vector<AttentionParams> sequences;
  std::vector<KeyRun> pages;
  std::vector<int64_t> no_keys;  // sequences with query rows and no visible key
  int64_t table_jumps = 0, rows = 0;
  for (int64_t b = 0; b < params.batch; ++b) {
    sequences.push_back(sequence_params(params, b));
    const AttentionParams& seq = sequences.back();
    if (seq.seqlen_q <= 0) continue;
    const KeyRange keys = visible_keys_of_rows(seq, 0, seq.seqlen_q);
    if (keys.end <= keys.begin) {
      no_keys.push_back(b);
      continue;
    }
    const int32_t* table = layout.block_table + b * layout.block_table_stride;
    for (int64_t p = keys.begin / page_size; p * page_size < keys.end; ++p) {
      if (p > keys.begin / page_size && table[p] != table[p - 1] + 1) ++table_jumps;
      pages.push_back({table[p], b, std::max(keys.begin, p * page_size), std::min(keys.end, (p + 1) * page_size)});
    }
    rows += keys.end - keys.begin;
  }

  // Pool order; runs of pages that follow one another in the pool and in one sequence's keys
  // make one visit. (Pages that several sequences share come one after the other: not a jump.)
  std::stable_sort(pages.begin(), pages.end(), [](const KeyRun& a, const KeyRun& b) { return a.page < b.page; });
  std::vector<KeyRun> visits;
  int64_t pool_jumps = 0, previous = -2;
  for (const KeyRun& page : pages) {
    const bool follows = page.page == previous + 1;
    if (!follows && page.page != previous) ++pool_jumps;
    if (follows && visits.back().batch == page.batch && visits.back().key_hi == page.key_lo) {
      visits.back().key_hi = page.key_hi;
    } else {
      visits.push_back(page);
    }
    previous = page.page;
  }
  const int64_t row_bytes = 2 * params.num_heads_kv * params.head_dim * dtype_size(params.dtype);  // K and V
  const int64_t page_count = static_cast<int64_t>(pages.size());
  const bool pays = page_size * row_bytes / 2 <= kPoolWalkMaxPageBytes &&  // (see tiles.h)
                   kPoolWalkTableRunPages * table_jumps > page_count && 2 * pool_jumps < table_jumps &&
                   page_count * page_size >= kPoolWalkMinVisitRows * static_cast<int64_t>(visits.size()) &&
                   rows * row_bytes >= kPoolWalkMinBytes;
  if (!pays) {
    return false;
  }

  // One part per thread, of about equal rows (a visit may be cut in two).
  const int64_t part_count = std::max(1, num_threads);
  std::vector<WalkPart> parts(part_count);
  const int64_t share = (rows + part_count - 1) / part_count;
  int64_t part = 0, filled = 0;
  for (KeyRun visit : visits) {
    while (visit.key_lo < visit.key_hi) {
      const int64_t room = part == part_count - 1 ? std::numeric_limits<int64_t>::max() : share - filled;
      const int64_t take = std::min(visit.key_hi - visit.key_lo, room);
      parts[part].visits.push_back({visit.page, visit.batch, visit.key_lo, visit.key_lo + take});
      visit.key_lo += take;
      filled += take;
      if (filled >= share && part < part_count - 1) ++part, filled = 0;
    }
  }

  // Each part's blocks; the sink goes to the block holding its sequence's first visible key,
  // partial results where several parts visit a sequence.
  const int64_t lanes = params.seqlen_q * params.num_heads;
  std::vector<int64_t> lowest_key(params.batch, std::numeric_limits<int64_t>::max());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> parts_of(params.batch);  // [batch] -> (part, slot)
  for (int64_t p = 0; p < part_count; ++p) {
    WalkPart& walk = parts[p];
    walk.slot_of.assign(params.batch, -1);
    std::vector<int64_t> part_lowest;
    for (int64_t i = 0; i < static_cast<int64_t>(walk.visits.size()); ++i) {
      const KeyRun& visit = walk.visits[i];
      int64_t& slot = walk.slot_of[visit.batch];
      if (slot < 0) {
        slot = static_cast<int64_t>(walk.batch_of_slot.size());
        walk.batch_of_slot.push_back(visit.batch);
        walk.first_visit.push_back(i);
        walk.last_visit.push_back(i);
        part_lowest.push_back(visit.key_lo);
        parts_of[visit.batch].emplace_back(p, slot);
      }
      walk.last_visit[slot] = i;
      part_lowest[slot] = std::min(part_lowest[slot], visit.key_lo);
      lowest_key[visit.batch] = std::min(lowest_key[visit.batch], visit.key_lo);
    }
    for (int64_t slot = 0; slot < static_cast<int64_t>(walk.batch_of_slot.size()); ++slot) {
      ForwardBlock block;
      block.batch = walk.batch_of_slot[slot];
      block.head_count = params.num_heads;
      block.row_end = sequences[block.batch].seqlen_q;
      block.key_lo = part_lowest[slot];  // (set to 0 below for the sink's block)
      block.key_hi = sequences[block.batch].seqlen_k;
      walk.blocks.push_back(block);
    }
  }
  const int64_t partial_floats = lanes * (params.head_dim + 1);
  std::vector<float> partials;
  std::vector<int64_t> merged;  // sequences visited by several parts
  for (int64_t b = 0; b < params.batch; ++b) {
    if (parts_of[b].size() > 1) merged.push_back(b);
  }
  size_t partial_count = 0;
  for (const int64_t b : merged) partial_count += parts_of[b].size();
  partials.resize(partial_count * static_cast<size_t>(partial_floats));
  size_t next_partial = 0;
  for (int64_t b = 0; b < params.batch; ++b) {
    for (const auto& [p, slot] : parts_of[b]) {
      ForwardBlock& block = parts[p].blocks[slot];
      if (block.key_lo == lowest_key[b]) block.key_lo = 0;
      if (parts_of[b].size() > 1) {
        block.partial_out = partials.data() + next_partial;
        block.partial_lse = block.partial_out + lanes * params.head_dim;
        next_partial += static_cast<size_t>(partial_floats);
      }
    }
  }

  const size_t scratch_bytes = kernels.forward_scratch_bytes(params, lanes);
  const size_t state_bytes = kernels.decode_state_bytes(params, lanes);
  parallel_for(part_count, num_threads, [&](int64_t p, int) {
    const WalkPart& walk = parts[p];
    const ScratchBuffer scratch = allocate_scratch(scratch_bytes);
    const ScratchBuffer states = allocate_scratch(std::max<size_t>(1, state_bytes * walk.batch_of_slot.size()));
    for (int64_t i = 0; i < static_cast<int64_t>(walk.visits.size()); ++i) {
      const KeyRun& run = walk.visits[i];
      const int64_t slot = walk.slot_of[run.batch];
      DecodeVisit visit;
      visit.state = states.get() + slot * state_bytes;
      visit.key_lo = run.key_lo;
      visit.key_hi = run.key_hi;
      visit.first = i == walk.first_visit[slot];
      visit.last = i == walk.last_visit[slot];
      kernels.decode_visit(sequences[run.batch], walk.blocks[slot], visit, scratch.get());
    }
  });
  parallel_for(static_cast<int64_t>(merged.size()), num_threads, [&](int64_t m, int) {
    const int64_t b = merged[m];
    std::vector<const float*> outs, lses;
    for (const auto& [p, slot] : parts_of[b]) {
      outs.push_back(parts[p].blocks[slot].partial_out);
      lses.push_back(parts[p].blocks[slot].partial_lse);
    }
    const ForwardBlock& block = parts[parts_of[b][0].first].blocks[parts_of[b][0].second];
    kernels.merge_block_partials(sequences[b], block, outs.data(), lses.data(), static_cast<int64_t>(outs.size()));
  });
  if (!no_keys.empty()) {  // a decode block that sees no key writes 0 and -inf (or the sink's LSE)
    const ScratchBuffer scratch = allocate_scratch(scratch_bytes);
    for (const int64_t b : no_keys) {
      ForwardBlock block;
      block.batch = b;
      block.head_count = params.num_heads;
      block.row_end = sequences[b].seqlen_q;
      block.key_hi = sequences[b].seqlen_k;
      kernels.forward_block(sequences[b], block, scratch.get());
    }
  }
  return true;
}

}  // namespace cpu
}  // namespace fusedattn
