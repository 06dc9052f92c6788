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
// each, merged by LSE as split-KV's are, by the part that writes the last of them.
#include "cpu/pool_walk.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <vector>

#include "common/variant.h"
#include "cpu/attention_cpu.h"
#include "cpu/thread_pool.h"
#include "cpu/tiles.h"

namespace fusedattn {
namespace cpu {
namespace {

// Keys [key_lo, key_hi) of sequence `batch` (on one page, or on pages that follow one another).
// 32-bit fields (pages, lengths and so keys are int32; walkable refuses batches past int32): a
// plan's vectors are read and written several times per call.
struct KeyRun {
  int32_t page;  // the run's first page
  int32_t batch;
  int32_t key_lo;
  int32_t key_hi;
};

// Whether each sequence decodes as one block of all its heads that reads whole cache rows
// (decodes_whole_rows, as plan_blocks makes them), so that a walk can visit it page by page: a
// paged cache, no cache_leftpad, and fp32 partials are fine (not fp64). Kv heads of two lane
// groups (a GQA group of 8, or 2 tokens of a group of 4) for bf16 only: with two, fp32
// measured 2-4 points below the table order and bf16 (paired P·V) 1-4 above
// (ab_decode.py --cases 4-float32-paged,4-bfloat16-paged,... and --queries 2). Not kv heads of
// more lane groups (kManyLaneGroups): a 16-row visit of 4 tokens of 32 / 8 bf16 heads would
// carry 96 KiB of q and O for its 64 KiB of K and V (not measured).
bool walkable(const AttentionParams& params, const CpuKernelTable& kernels) {
  const SequenceLayout& layout = params.sequences;
  if (layout.block_table == nullptr || layout.k_begin != nullptr || layout.cu_seqlens_q != nullptr) return false;
  if (params.batch > std::numeric_limits<int32_t>::max()) return false;  // (KeyRun::batch)
  if (params.dtype == DType::kFloat64 || !decodes_whole_rows(params, params.seqlen_q, kernels)) return false;
  const int64_t lanes_per_kv = params.seqlen_q * (params.num_heads / params.num_heads_kv);
  const bool lane_groups_walk = lanes_per_kv <= kDecodeLanes ||
                                (lanes_per_kv <= 2 * kDecodeLanes && params.dtype == DType::kBFloat16);
  return lane_groups_walk && params.seqlen_q * params.num_heads <= kDecodeBlockLanes;
}

// One part of the walk (a thread's): its visits in pool order, and per sequence it visits a
// state slot, the visits that open and close the block there, and the block.
struct WalkPart {
  std::vector<KeyRun> visits;
  std::vector<int64_t> slot_of;  // [batch] -> slot, -1 where not visited
  std::vector<int64_t> first_visit, last_visit;  // [slot]
  std::vector<ForwardBlock> blocks;              // [slot]
};

// A walk's plan: the batch's visible pages in pool order, as visits, and the parts cut from
// them. Each calling thread keeps one between calls (KeptPlan), its vectors cleared and refilled
// by every call: allocated afresh, they page-faulted at every call, and planning took about
// 95 µs of the inference issue's 7.5 ms GQA bf16 decode (a timing probe, not committed).
struct WalkPlan {
  std::vector<AttentionParams> sequences;  // [batch]: sequence_params
  std::vector<KeyRun> pages;               // every sequence's visible pages, clipped to its visible keys
  std::vector<KeyRun> sort_buffer;         // (sort_by_page)
  std::vector<int64_t> digit_starts;       // (sort_by_page)
  std::vector<KeyRun> visits;              // in pool order
  std::vector<int64_t> no_keys;            // sequences with query rows and no visible key
  int64_t rows = 0;                        // keys visited, all sequences
  std::vector<WalkPart> parts;             // (cut_into_parts)

  size_t bytes() const {  // what the vectors hold on to
    size_t total = sequences.capacity() * sizeof(AttentionParams) +
                   (digit_starts.capacity() + no_keys.capacity()) * sizeof(int64_t) +
                   (pages.capacity() + sort_buffer.capacity() + visits.capacity()) * sizeof(KeyRun);
    for (const WalkPart& part : parts) {
      total += part.visits.capacity() * sizeof(KeyRun) + part.blocks.capacity() * sizeof(ForwardBlock) +
               (part.slot_of.capacity() + part.first_visit.capacity() + part.last_visit.capacity()) * sizeof(int64_t);
    }
    return total;
  }
};

// The calling thread's plan for one call, emptied. A plan that grew past kKeptScratchBytes
// (tiles.h) is dropped when the call ends, so that one long batch does not keep its plan.
class KeptPlan {
 public:
  KeptPlan() : plan_(thread_plan()) {
    plan_.sequences.clear();
    plan_.pages.clear();
    plan_.visits.clear();
    plan_.no_keys.clear();
    plan_.rows = 0;
  }
  ~KeptPlan() {
    if (plan_.bytes() > static_cast<size_t>(kKeptScratchBytes)) plan_ = WalkPlan();
  }
  KeptPlan(const KeptPlan&) = delete;
  KeptPlan& operator=(const KeptPlan&) = delete;
  WalkPlan& get() { return plan_; }

 private:
  static WalkPlan& thread_plan() {
    thread_local WalkPlan plan;
    return plan;
  }
  WalkPlan& plan_;
};

// Sorts plan.pages by page, stably: radix passes of kPageDigitBits over the page indices (one
// pass for pools of up to 2048 pages, two up to 4M). std::stable_sort took about 80 µs for the
// 2048 pages of the inference issue's decode (a timing probe), 1% of the call.
void sort_by_page(WalkPlan& plan) {
  constexpr int kPageDigitBits = 11;
  constexpr int64_t kDigits = int64_t{1} << kPageDigitBits;
  std::vector<KeyRun>& runs = plan.pages;
  std::vector<int64_t>& start = plan.digit_starts;
  int64_t max_page = 0;
  for (const KeyRun& run : runs) max_page = std::max<int64_t>(max_page, run.page);
  plan.sort_buffer.resize(runs.size());
  start.resize(kDigits + 1);
  for (int shift = 0; (max_page >> shift) > 0; shift += kPageDigitBits) {
    std::fill(start.begin(), start.end(), 0);
    for (const KeyRun& run : runs) ++start[((run.page >> shift) & (kDigits - 1)) + 1];
    for (int64_t d = 0; d < kDigits; ++d) start[d + 1] += start[d];
    for (const KeyRun& run : runs) plan.sort_buffer[start[(run.page >> shift) & (kDigits - 1)]++] = run;
    runs.swap(plan.sort_buffer);
  }
}

// Fills plan's sequences, visits, no_keys and rows and returns true where the pool order jumps
// in memory far less often than the table order (and the other conditions in tiles.h hold).
bool plan_pool_order(const AttentionParams& params, WalkPlan& plan) {
  const SequenceLayout& layout = params.sequences;
  const int64_t page_size = layout.page_size;
  std::vector<KeyRun>& pages = plan.pages;
  int64_t table_jumps = 0;
  for (int64_t b = 0; b < params.batch; ++b) {
    plan.sequences.push_back(sequence_params(params, b));
    const AttentionParams& seq = plan.sequences.back();
    if (seq.seqlen_q <= 0) continue;
    const KeyRange keys = visible_keys_of_rows(seq, 0, seq.seqlen_q);
    if (keys.end <= keys.begin) {
      plan.no_keys.push_back(b);
      continue;
    }
    const int32_t* table = layout.block_table + b * layout.block_table_stride;
    for (int64_t p = keys.begin / page_size; p * page_size < keys.end; ++p) {
      if (p > keys.begin / page_size && table[p] != table[p - 1] + 1) ++table_jumps;
      pages.push_back({table[p], static_cast<int32_t>(b), static_cast<int32_t>(std::max(keys.begin, p * page_size)),
                       static_cast<int32_t>(std::min(keys.end, (p + 1) * page_size))});
    }
    plan.rows += keys.end - keys.begin;
  }
  // Runs of pages that follow one another in the pool and in one sequence's keys make one
  // visit. (Pages that several sequences share come one after the other: not a jump.)
  sort_by_page(plan);
  int64_t pool_jumps = 0, previous = -2;
  for (const KeyRun& page : pages) {
    const bool follows = page.page == previous + 1;
    if (!follows && page.page != previous) ++pool_jumps;
    KeyRun* last = plan.visits.empty() ? nullptr : &plan.visits.back();
    if (follows && last->batch == page.batch && last->key_hi == page.key_lo) {
      last->key_hi = page.key_hi;
    } else {
      plan.visits.push_back(page);
    }
    previous = page.page;
  }
  const int64_t row_bytes = 2 * params.num_heads_kv * params.head_dim * dtype_size(params.dtype);  // K and V
  const int64_t page_count = static_cast<int64_t>(pages.size());
  return page_size * row_bytes / 2 <= kPoolWalkMaxPageBytes && kPoolWalkTableRunPages * table_jumps > page_count &&
         2 * pool_jumps < table_jumps &&
         page_count * page_size >= kPoolWalkMinVisitRows * static_cast<int64_t>(plan.visits.size()) &&
         plan.rows * row_bytes >= kPoolWalkMinBytes;
}

// The visits cut into `count` parts of about equal rows (a visit may be cut in two), each with
// its blocks, into plan.parts: a block's key_lo is the first key it visits (its lanes' key ranges
// start there; decode_in_pool_order sets it to 0, which brings the sink, in its sequence's first
// block).
void cut_into_parts(const AttentionParams& params, WalkPlan& plan, int64_t count) {
  plan.parts.resize(count);
  for (WalkPart& walk : plan.parts) {
    walk.visits.clear();
    walk.visits.reserve(plan.visits.size() / count + 2);  // (+ the cut visits)
    walk.first_visit.clear();
    walk.last_visit.clear();
    walk.blocks.clear();
  }
  const int64_t share = (plan.rows + count - 1) / count;
  int64_t part = 0, filled = 0;
  for (KeyRun visit : plan.visits) {
    while (visit.key_lo < visit.key_hi) {
      const int64_t room = part == count - 1 ? std::numeric_limits<int64_t>::max() : share - filled;
      const int32_t take = static_cast<int32_t>(std::min<int64_t>(visit.key_hi - visit.key_lo, room));
      plan.parts[part].visits.push_back({visit.page, visit.batch, visit.key_lo, visit.key_lo + take});
      visit.key_lo += take;
      filled += take;
      if (filled >= share && part < count - 1) ++part, filled = 0;
    }
  }
  for (WalkPart& walk : plan.parts) {
    walk.slot_of.assign(params.batch, -1);
    for (int64_t i = 0; i < static_cast<int64_t>(walk.visits.size()); ++i) {
      const KeyRun& visit = walk.visits[i];
      int64_t& slot = walk.slot_of[visit.batch];
      if (slot < 0) {
        slot = static_cast<int64_t>(walk.blocks.size());
        ForwardBlock block;
        block.batch = visit.batch;
        block.head_count = params.num_heads;
        block.row_end = plan.sequences[visit.batch].seqlen_q;
        block.key_lo = visit.key_lo;
        block.key_hi = plan.sequences[visit.batch].seqlen_k;
        walk.blocks.push_back(block);
        walk.first_visit.push_back(i);
        walk.last_visit.push_back(i);
      }
      walk.last_visit[slot] = i;
      walk.blocks[slot].key_lo = std::min<int64_t>(walk.blocks[slot].key_lo, visit.key_lo);
    }
  }
}

}  // namespace

bool decode_in_pool_order(const AttentionParams& params, const CpuKernelTable& kernels, int num_threads) {
  if (!walkable(params, kernels)) return false;
  KeptPlan kept;
  WalkPlan& plan = kept.get();
  if (!plan_pool_order(params, plan)) return false;
  cut_into_parts(params, plan, std::max(1, num_threads));
  std::vector<WalkPart>& parts = plan.parts;

  // The sink goes to the block holding its sequence's first visible key; the blocks of a
  // sequence that several parts visit write partial results, merged by LSE.
  const int64_t lanes = params.seqlen_q * params.num_heads;
  std::vector<std::vector<ForwardBlock*>> blocks_of(params.batch);
  std::vector<int64_t> first_key(params.batch, std::numeric_limits<int64_t>::max());
  for (WalkPart& walk : parts) {
    for (ForwardBlock& block : walk.blocks) {
      blocks_of[block.batch].push_back(&block);
      first_key[block.batch] = std::min(first_key[block.batch], block.key_lo);
    }
  }
  size_t partial_count = 0;  // one per block of a sequence that several parts visit
  for (int64_t b = 0; b < params.batch; ++b) {
    for (ForwardBlock* block : blocks_of[b]) {
      if (block->key_lo == first_key[b]) block->key_lo = 0;
    }
    if (blocks_of[b].size() > 1) partial_count += blocks_of[b].size();
  }
  // The part that writes a sequence's last partial merges them (pending counts the rest).
  std::unique_ptr<std::atomic<int64_t>[]> pending(new std::atomic<int64_t>[params.batch]);
  for (int64_t b = 0; b < params.batch; ++b) pending[b].store(static_cast<int64_t>(blocks_of[b].size()));
  auto merge_partials = [&](int64_t b) {
    std::vector<const float*> outs, stats;
    for (const ForwardBlock* block : blocks_of[b]) {
      outs.push_back(block->partial_out);
      stats.push_back(block->partial_stats);
    }
    kernels.merge_block_partials(plan.sequences[b], *blocks_of[b].front(), outs.data(), stats.data(),
                                 static_cast<int64_t>(outs.size()));
  };
  const int64_t partial_floats = lanes * (params.head_dim + 2);
  ScratchBuffer fresh_partials;
  float* next_partial = reinterpret_cast<float*>(kept_scratch(
      ScratchUse::kPartials, partial_count * static_cast<size_t>(partial_floats) * sizeof(float), fresh_partials));
  for (const std::vector<ForwardBlock*>& blocks : blocks_of) {
    if (blocks.size() < 2) continue;
    for (ForwardBlock* block : blocks) {
      block->partial_out = next_partial;
      block->partial_stats = next_partial + lanes * params.head_dim;
      next_partial += partial_floats;
    }
  }

  const size_t scratch_bytes = kernels.forward_scratch_bytes(params, lanes);
  const size_t state_bytes = kernels.decode_state_bytes(params, lanes);
  parallel_for(static_cast<int64_t>(parts.size()), num_threads, [&](int64_t p, int) {
    const WalkPart& walk = parts[p];
    ScratchBuffer fresh_scratch, fresh_states;
    char* const scratch = kept_scratch(ScratchUse::kBlock, scratch_bytes, fresh_scratch);
    char* const states = kept_scratch(ScratchUse::kDecodeStates, state_bytes * walk.blocks.size(), fresh_states);
    for (int64_t i = 0; i < static_cast<int64_t>(walk.visits.size()); ++i) {
      const KeyRun& run = walk.visits[i];
      const int64_t slot = walk.slot_of[run.batch];
      DecodeVisit visit;
      visit.state = states + slot * state_bytes;
      visit.key_lo = run.key_lo;
      visit.key_hi = run.key_hi;
      visit.first = i == walk.first_visit[slot];
      visit.last = i == walk.last_visit[slot];
      if (i + 1 < static_cast<int64_t>(walk.visits.size())) {
        const KeyRun& next = walk.visits[i + 1];
        visit.next_params = &plan.sequences[next.batch];
        visit.next_block = &walk.blocks[walk.slot_of[next.batch]];
        visit.next_key_lo = next.key_lo;
        visit.next_key_hi = next.key_hi;
      }
      kernels.decode_visit(plan.sequences[run.batch], walk.blocks[slot], visit, scratch);
      if (visit.last && blocks_of[run.batch].size() > 1 &&
          pending[run.batch].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        merge_partials(run.batch);  // (merging in a second parallel region cost 60-90 µs)
      }
    }
  });
  if (!plan.no_keys.empty()) {  // a decode block that sees no key writes 0 and -inf (or the sink's LSE)
    ScratchBuffer fresh;
    char* const scratch = kept_scratch(ScratchUse::kBlock, scratch_bytes, fresh);
    for (const int64_t b : plan.no_keys) {
      ForwardBlock block;
      block.batch = b;
      block.head_count = params.num_heads;
      block.row_end = plan.sequences[b].seqlen_q;
      block.key_hi = plan.sequences[b].seqlen_k;
      kernels.forward_block(plan.sequences[b], block, scratch);
    }
  }
  return true;
}

}  // namespace cpu
}  // namespace fusedattn
