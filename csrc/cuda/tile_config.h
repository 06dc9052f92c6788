// Tile configuration of the CUDA kernels: ONE table per kernel, indexed by the head-dim bucket.
// Launchers, smem sizes and static_asserts all derive from it (see forward_kernel.cuh and
// decode_kernel.cuh for what each number means). docs/cuda.md explains every entry.
//
// Forward (FlashAttention-2 "split-Q"): a thread block owns kBlockM query rows of one (batch,
// head); each of its kWarps warps owns kMTiles x 16 of those rows, so kBlockM = 16·kMTiles·kWarps.
// K/V stream through shared memory in tiles of kBlockN keys, two stages deep (cp.async).
// Registers per thread ≈ O accumulator (kMTiles·kHeadDim/2 floats) + S accumulator
// (kMTiles·kBlockN/2 floats) + ~50; the table keeps that at or under 255 with no spills
// (docs/ptxas.txt). Shared memory = (kBlockM + 4·kBlockN) rows of kHeadDim + 8 halves.
//
// NOTE: not yet tuned on a GPU: the numbers are FlashAttention-2's sm80 choices, shrunk where
// our registers or the 2-blocks-per-SM budget on H100 (227 KiB smem) asked for it.
#pragma once

namespace fusedattn {
namespace cuda {

// Head dims with a compiled kernel; any other head_dim <= 256 runs in the next bucket up with
// its columns zero-padded in shared memory (no copy of the inputs).
constexpr int kHeadDimBuckets[] = {32, 64, 96, 128, 192, 256};

constexpr int head_dim_bucket(int head_dim) {
  return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : head_dim <= 96 ? 96 : head_dim <= 128 ? 128
       : head_dim <= 192 ? 192 : 256;
}

struct ForwardTile {
  int block_m;   // query rows per thread block
  int block_n;   // keys per K/V tile
  int warps;     // warps per thread block
  int m_tiles;   // 16-row MMA tiles per warp (block_m = 16 · m_tiles · warps)
};

//                          block_m block_n warps m_tiles  smem (KiB)  regs (O + S floats)
constexpr ForwardTile forward_tile(int head_dim) {
  return head_dim == 32    ? ForwardTile{128,   64,    4,    2}   //  30         32 + 64
       : head_dim == 64    ? ForwardTile{128,   64,    4,    2}   //  54         64 + 64
       : head_dim == 96    ? ForwardTile{128,   32,    4,    2}   //  52         96 + 32
       : head_dim == 128   ? ForwardTile{128,   32,    4,    2}   //  68        128 + 32
       : head_dim == 192   ? ForwardTile{ 64,   32,    4,    1}   //  75         96 + 16
       :                     ForwardTile{ 64,   32,    4,    1};  //  99        128 + 16
}

// Split-KV decode: a thread block owns 16 packed query rows (the query heads of one KV head
// times the few query positions) and one split of the keys; each of its warps takes 16 keys of
// every kBlockN = 16·warps key tile, so K/V are read once per KV head and split.
struct DecodeTile {
  int warps;
};

constexpr DecodeTile decode_tile(int head_dim) { return DecodeTile{head_dim <= 128 ? 4 : 2}; }

constexpr int kDecodeRows = 16;     // packed query rows per decode block (one MMA tile)
constexpr int kMaxSplits = 128;     // upper bound of the split-KV heuristic and of num_splits

}  // namespace cuda
}  // namespace fusedattn
