// Every tile size and tuning constant of the CPU kernels, in one table, each with the
// measurement or the budget that chose it. The first part is the same for every ISA (the
// driver, attention_cpu.cpp, plans with it); the second is compiled once per ISA (included from
// attention_isa.cpp's headers, where FUSEDATTN_ISA names the ISA namespace). None depends on
// head_dim: head_dim only sets how deep each product runs.
// Numbers: 2-core AMD EPYC (AVX-512, AVX512-BF16), 2 threads, unless said otherwise.
#pragma once
#include <cstdint>

namespace fusedattn {
namespace cpu {

// ---- planning (all ISAs) ----------------------------------------------------------------------

// Query rows per forward block at most; halved (down to 32) while there are fewer than 4 blocks
// per thread. 256 rows x 64 keys of fp32 scores (64 KiB) stay in L2 between the passes.
constexpr int64_t kMaxBlockRows = 256;
constexpr int64_t kMinBlockRows = 32;
// Lanes (query rows x heads) per block at most when GQA heads are packed for the transposed
// tile: 64 lanes keep Qᵀ and the score tile within L1/L2. (Decode blocks: kDecodeBlockLanes.)
constexpr int64_t kPackedLanes = 64;
// Lanes per decode block at most (all heads of a token where they fit, see plan_blocks): 128
// lanes of fp32 O and query rows take 128 KiB, in L2. Several query tokens of MHA (4 lanes on
// each of 32 kv heads, 128 lanes) then read each cache row in one block, not as two halves.
// ab_decode.py, 64 -> 128, % of a torch.sum timed alongside: --queries 3 fp32 59% -> 72%, bf16
// 48% -> 67%; --queries 4 fp32 53-54% -> 59-61%, bf16 43-47% -> 55%; 256 measured like 128.
constexpr int64_t kDecodeBlockLanes = 128;
// Blocks with at most this many lanes per kv head run the decode kernel (dot products along
// head_dim): at 4 lanes that costs about what the transposed tile wastes on empty lanes. Kv heads
// with 5-8 lanes (GQA groups of 5-8, several query tokens of a smaller group: speculative
// decoding) run there too, as two groups of kDecodeLanes or fewer (runs_decode_kernel), because
// the decode kernel reads each cache row whole and the transposed tile reads one kv head's slice
// of it. ab_decode.py --queries 2 (GQA: 8 lanes per kv head), % of a torch.sum timed alongside:
// bf16 26% -> 56-57%, fp32 36-37% -> 40-42%; paged (16) bf16 14% -> 45%, fp32 33-34% -> 48-50%.
// Groups of 5 and 7 (3 + 2 and 4 + 3 lanes), one token, bench_decode.py --heads 28 --heads-kv 4 /
// --heads 40 --heads-kv 8, GB/s: fp32 18.4 -> 32.0 / 17.8 -> 26.1, bf16 14.0 -> 26.7 / 14.7 -> 32.2.
constexpr int64_t kDecodeLanes = 4;
// Kv heads with more lanes than two groups (several tokens of a GQA group: speculative
// decoding) run the decode kernel too, up to this many lanes, as groups of kDecodeLanes and a
// last group of the rest, each over a whole key block (bf16 with its q rows in registers,
// dot_rows_bf16); MHA only in whole groups of bf16/fp16 (for 16 tokens of MHA fp32 the transposed
// tile measured 9% faster; fp64 keeps the tile). Against the transposed tile, ab_decode.py
// before after --reps 7-9, B 8, L 4096, GB/s of K/V read (the machine at about 70 GB/s):
// --queries 3 fp32 / bf16 15.9 -> 20.6 / 12.9 -> 19.3, paged (16) 15.4 -> 20.9 / 12.0 -> 16.8;
// --heads 64 --queries 2 (group 8) 14.9 -> 18.6 / 12.5 -> 17.0; --heads 28 --heads-kv 4
// --queries 2 (group 7, 14 lanes) 15.3 -> 19.1 / 13.7 -> 17.8; --heads 40 --queries 2 (group 5)
// 15.0 -> 20.3 / 13.6 -> 20.9; --heads 24 --queries 3 (group 3) 15.7 -> 20.9 / 13.3 -> 20.8;
// --queries 4 --head-major 16.0 -> 20.4 / 15.4 -> 19.3; --queries 16 --seqlen 2048 MHA bf16 /
// fp16 11.8 -> 16.4 / 9.0 -> 12.0. 16 also keeps prefill blocks (32 rows at least) on the tile.
constexpr int64_t kDecodeMaxLanesPerKv = 16;
// bf16 GQA kv heads of up to 32 lanes (5-8 tokens of a group of 4, 3-4 of a group of 8) too, where
// dot_rows_bf16 holds the q rows (head_dim a multiple of 32 up to 128); ab_decode.py before after
// --reps 7, GB/s, at about 45 GB/s: --queries 8 9.3 -> 10.6, paged (16) 9.5 -> 10.0; --queries 6
// 9.4 -> 11.9, paged 10.1 -> 11.7; --heads 64 --queries 4 9.1 -> 10.3; --heads 28 --heads-kv 4
// --queries 3 (21 lanes) 9.8 -> 14.1. fp16 (widened, row by
// row) measured 7.8 -> 7.3 at 8 tokens and fp32 alike, so they keep the tile. (On CPUs without
// AVX512-BF16, bf16 is widened row by row as fp16 is; not measured there.)
constexpr int64_t kDecodeMaxBf16LanesPerKv = 32;
// Forward and decode calls of fewer multiply-adds than this (Q·Kᵀ and P·V, about 2 x lanes x
// keys x head_dim) run on the calling thread when the kernels use fusedattn's own thread pool
// (no PyTorch in the process): waking its sleeping helpers took about 40-50 µs on this VM.
// benchmarks/small_calls.py (numpy arrays, 2 threads), one decode token, 32 query / 8 kv
// heads, D 128, µs per call: L 16 62 -> 20, L 64 56 -> 29, L 256 75 either way (2.6M
// multiply-adds); a causal prefill of 32 tokens, 8 heads, D 64, 45 -> 36. On PyTorch's OpenMP
// threads, which spin after torch's own ops, a threshold of 4M cost 20-50% from L 64 up, so
// there it is 0 (serial_work_macs, thread_pool.h).
constexpr int64_t kPoolSerialWorkMacs = int64_t{1} << 21;
// Scratch a thread keeps between calls, per use, at most (kept_scratch, attention_cpu.h). Fresh
// scratch page-faults at every call: a pool walk's states and scratch (about 330 KiB per thread
// for the inference issue's GQA bf16 decode) cost 150-190 µs of an 8 ms call against kept ones
// (timers in decode_in_pool_order, not committed). A prefill block's scratch (256 rows, fp64,
// head_dim 128) is about 1.4 MiB, a walk's states for 8 sequences of 4 MHA tokens 1.3 MiB. So a
// thread that ran fusedattn keeps at most 2 x 2 MiB until it exits, and a thread that called a
// pool walk 2 x 2 MiB more (its partial results, and its plan: pool_walk.cpp).
constexpr int64_t kKeptScratchBytes = 2 << 20;
// A key split (split-KV) is at least this many keys (4 key blocks), so merging stays cheap.
constexpr int64_t kMinSplitKeys = 256;

// A paged decode call reads its pages in pool order (pool_walk.cpp) only where the table order
// jumps elsewhere in memory at least every kPoolWalkTableRunPages pages on average (runs of 8
// adjacent pages, which the hardware prefetchers stream through, lost 5-6 points walked in pool
// order), the pool order jumps at most half as often, the visits it makes average at least
// kPoolWalkMinVisitRows key rows of whole pages (each visit has a key block's fixed costs), and
// the call reads at least kPoolWalkMinBytes of K and V (a cache that fits in L2 gains nothing
// from its order), on pages of at most kPoolWalkMaxPageBytes of K (MHA fp32 at pages of 16
// rows, 256 KiB, lost 4% in pool order: a jump costs little next to so long a page).
constexpr int64_t kPoolWalkMaxPageBytes = 128 << 10;
constexpr int64_t kPoolWalkTableRunPages = 4;
constexpr int64_t kPoolWalkMinVisitRows = 16;
constexpr int64_t kPoolWalkMinBytes = 4 << 20;

}  // namespace cpu
}  // namespace fusedattn

#if defined(FUSEDATTN_ISA)
namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

// ---- products (per ISA) -----------------------------------------------------------------------

// Micro-kernel tile (gemm_tile.h): kTileRows rows x kTileVecs vectors of accumulators, the most
// that stay in registers with the B vectors and the broadcast (no spills in the generated code):
//   AVX-512 / AVX512-BF16 (32 zmm): 6 x 4 = 24 accumulators + 4 + 1; the same tile runs the fp32
//     FMA and the bf16-pair VDPBF16PS products. Forward fp32 at (1,8,2048,128): 67-76% of the
//     measured FMA peak non-causal (bench_forward.py).
//   AVX2 (16 ymm): 6 x 2 = 12 + 2 + 1.   scalar: 4 x 4.
#if defined(__AVX512F__)
constexpr int kTileRows = 6;
constexpr int kTileVecs = 4;
#elif defined(__AVX2__)
constexpr int kTileRows = 6;
constexpr int kTileVecs = 2;
#else
constexpr int kTileRows = 4;
constexpr int kTileVecs = 4;
#endif

// Keys per forward key block: 64 keys x 256 queries of fp32 scores = 64 KiB, in L2 between the
// score, softmax and P·V passes (and an even count, for the bf16 pairs of P and V).
constexpr int64_t kBlockN = 64;

// Backward: keys per task and query rows per inner step. 64 x 64 fp32 P and dS tiles (16 KiB
// each) stay in L1 across the five products that use them; a multiple of 32 for the bf16 rows.
constexpr int64_t kBwdBlockN = 64;
constexpr int64_t kBwdBlockM = 64;

// Cache rows fetched ahead by gathered K/V blocks (kv_block: rows far apart, or from pages).
// Measured when the decode kernel still used it, one block per (batch, kv head), bench_decode.py
// fp32 / bf16 MHA GB/s: no prefetch 20 / 11, 4 rows ahead 26.7 / 13.1, 12 rows 27.5 / 15.4,
// 24 rows 24.2 / 10.4. (The decode kernel now walks the cache in order and prefetches by bytes:
// kDecodeStagingBytes, kPagePrefetchBytes, kSmallPagePrefetchBytes below.)
constexpr int64_t kPrefetchRows = 12;

// Value rows per step of the decode kernel's P·V (accumulate_rows; rows read in place, each from
// its own pointer, so also across cache pages): O is read and written once per step.
// benchmarks/ab_decode.py-style runs (fp32 / bf16 GQA, % of a torch.sum timed alongside): 1 row
// 72% / 68%, 2 rows 65% / 63%, 4 rows 72% / 70%; then 8 rows against 4, two interleaved runs:
// equal or 1-2 points better in 14 of 16 cases. Steps across pages (they used to fall back to
// one row at a time), ab_decode.py --page-size 1 / 4: +12-24% / +8-23% GB/s.
constexpr int64_t kDecodeValueRows = 8;
// ... and for bf16 V on VDPBF16PS (accumulate_pairs_bf16, two rows per product, each lane's
// probability pairs broadcast from memory): 16 rows per step, so a 16-row pool-walk visit reads
// and writes its O once. decode_in_cache.py (GQA bf16, one thread) against 8 rows: paged 35.8 ->
// 36.2-36.6 GB/s, contiguous unchanged.
constexpr int64_t kDecodePairValueRows = 16;
// The decode kernel's score pass fetches each V row along with its K row when a key block's K
// and V rows (2 x kBlockN rows of all the block's kv heads) take at most this many bytes
// (decode_staging_bytes below picks one by the CPU's vendor), so P·V finds them in L2.
// AMD EPYC (1 MiB of L2 per core): ab_decode.py, % of a torch.sum timed alongside, against no
// such fetch: MHA bf16 (1 MiB) 79-80% -> 88-91%, GQA fp32 (512 KiB) 71-75% -> 79-85%, GQA bf16
// (256 KiB) 64-66% -> 81-82%. MHA fp32 (2 MiB) lost 3-7 points with it (its rows leave L2
// before P·V reaches them), and smaller key blocks for it lost 6-10.
// Intel Xeon with AMX (2 MiB of L2 per core, about 29 GB/s for 2 threads): the same fetch cost
// the larger blocks what it gained on AMD (its hardware prefetchers follow P·V's side-by-side
// rows, and a score pass that also fetches a whole V row per K row reads K slower). ab_decode.py
// with 1 MiB / 256 KiB / none, 11 rounds: MHA bf16 68% / 82% / 82%, GQA fp32 70% / 77% / 77%,
// paged (16) MHA bf16 68% / 72% / 74%, GQA fp32 72% / 76% / 75%; GQA bf16 (256 KiB) kept it:
// 60% / 61% / 51%. So 256 KiB there.
constexpr int64_t kDecodeStagingBytes = 1 << 20;
constexpr int64_t kDecodeStagingBytesIntel = 256 << 10;
// kDecodeStagingBytes for the running CPU: kDecodeStagingBytesIntel on Intel's, else the
// default (measured on AMD's). Per ISA, as all code here (an inline function built
// with different ISA flags must not be shared between the ISAs' objects).
inline int64_t decode_staging_bytes() {
  static const int64_t bytes = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return kDecodeStagingBytesIntel;
#endif
    return kDecodeStagingBytes;
  }();
  return bytes;
}
// Caches whose kv heads' parts of a row do not lie side by side ((B, Hkv, L, D) storage seen as
// (B, L, Hkv, D), as Hugging Face's caches) stage V part by part, and only for blocks of at most
// this many kv heads: ab_decode.py --head-major, one token, bf16: Hkv 4 17.6 -> 21.0 GB/s, 8
// 18.8 -> 23.5, 16 24.4 -> 24.7, 32 29.9 -> 24.0 (a prefetch call per part and row).
constexpr int64_t kDecodeStagedParts = 8;
// The decode kernel's score pass takes rows in chunks of kDecodeScoreChunkRows, each lane group
// over the whole chunk, where the block's q rows take more than kDecodeQueryL1Bytes (then each
// row re-read q from L2: 48 KiB of L1 hold q or the K rows, not both) or its kv heads run as two
// lane groups, and the block's kv heads lie side by side over 4 KiB or more of a cache row (each
// row's slices then stay in pages of their own, which keeps the hardware prefetchers' streams;
// GQA bf16 2-token decode, 2 KiB per row, lost 42% with chunks; caches stored (B, Hkv, L, D),
// MHA bf16 8-token decode, ab_decode.py --head-major, 17.8 -> 14.9 GB/s). ab_decode.py, B 8,
// L 4096, GB/s before -> after: --queries 8 MHA fp32 15.1 -> 22.5, bf16 14.8 -> 20.4; --queries
// 4 MHA fp32 27.9 -> 30.7; --queries 2 GQA fp32 19.4 -> 24.4; --heads 64 (a GQA group of 8, one
// token) fp32 18.3 -> 22.6. MHA fp32 2-token (32 KiB of q, one lane group) lost 4-6% with
// chunks, hence the threshold. (8 rows, the value step's count, is not tuned further.)
constexpr int64_t kDecodeScoreChunkRows = 8;
constexpr int64_t kDecodeQueryL1Bytes = 32768;
// How far ahead the decode kernel prefetches the first line of each page (fp32/fp64 caches):
// 8 and 32 KiB measured alike (profile_decode.py, fp32 MHA from DRAM 27 -> 32 GB/s).
constexpr int64_t kPagePrefetchBytes = 16384;
// Decode blocks of one kv head whose K rows follow one another in memory (caches stored (B, Hkv,
// L, D), passed as (B, L, Hkv, D) views, as Hugging Face's reach the integration; or one kv head)
// prefetch every line of K this far ahead, instead of the hardware prefetchers alone (and, for
// fp32, the page-line prefetch). ab_decode.py --head-major, B 8, L 4096, % of a torch.sum timed
// alongside, before -> after, MHA fp32 / MHA bf16 / GQA fp32 / GQA bf16: at about 80 GB/s
// 60/53/56/42% -> 73/75/73/57%; at about 47 GB/s 80/76/76/68% -> 84/85/81/79%. 2, 8 and 16 KiB
// measured alike (8 and 16 KiB 4-9 points lower for bf16 at 75 GB/s). Every line of K ahead in
// caches whose rows hold all kv heads side by side (2-16 KiB rows) lost 4-9 points there, at
// both bandwidths.
constexpr int64_t kRowStreamPrefetchBytes = 4096;
// Paged caches with at most kSmallPageBytes per page get every line prefetched this far ahead
// (GQA bf16, pages of 16 rows = 32 KiB: 16 KiB ahead 46-50%, 48 KiB 52-54% of the bandwidth).
constexpr int64_t kSmallPageBytes = 65536;
constexpr int64_t kSmallPagePrefetchBytes = 49152;
// ... and one line in each 4 KiB page of the K and V rows this many rows ahead, which has the
// page-table walk of each jump done before those prefetches need the translation. ab_decode.py
// --page-size 1, GB/s against none: GQA bf16 16.0 -> 17.5, MHA bf16 18.3 -> 24.2, GQA fp32
// 15.9 -> 22.3, MHA fp32 27.6 -> 35.7 (sum about 70 GB/s); pages of 4 rows +5-10%; of 16 rows
// +1-6% at about 70 GB/s, nothing at 45. 64 and 192 rows measured alike.
constexpr int64_t kTranslationAheadRows = 64;
// The decode kernel's score pass (one row at a time) prefetches the K lines this far ahead of
// each kv head's part of the row it scores, spread over the row's heads (see decode_block.h).
// benchmarks/cpu_rates.py on the Intel machine, one thread, two streams with arithmetic between
// the loads: 11.6 GB/s with the hardware prefetchers alone, 14.4 / 14.7 / 14.2 / 14.0 with K
// 1 / 2 / 4 / 16 KiB ahead. profile_decode.py-style, MHA bf16 (8 KiB rows) from DRAM, one
// thread, % of the stream: 73-77% with prefetch_ahead, 78% with 1-2 KiB ahead, 80-86% with 4,
// 71-76% with 8 (one row), 68-72% with 16.
constexpr int64_t kDecodeKeyAheadBytes = 4096;

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
#endif
