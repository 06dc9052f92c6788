// Warp-level building blocks of the tensor-core kernels (forward and decode): global -> shared
// tile loads, the two GEMMs of a key tile on mma.m16n8k16, and the online-softmax step.
//
// Register tiles follow the mma C layout (ptx.cuh): a warp's S or O tile of kMTiles x 16 rows
// is float[kMTiles][N/8][4]; lane (g, t) holds rows g and g+8 of each 16-row tile ("row slot"
// ri = 2·mt + half) and columns 2t, 2t+1 of each 8-column tile. Row statistics are per row
// slot; a row's 4 owners (a quad) combine them with two xor-shuffles.
//
// Shared-memory tiles are row-major with a pitch of kHeadDim + 8 halves: the 16-byte pad puts
// the 8 rows an ldmatrix reads into 8 different bank groups (conflict-free for every head dim
// here), at 3-25% more shared memory than a swizzle would need.
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

namespace fusedattn {
namespace cuda {

constexpr float kNegInf = -INFINITY;

template <int kHeadDim>
constexpr int smem_pitch() {
  return kHeadDim + 8;  // halves
}

// Loads rows [0, kRows) of a tile into shared memory (pitch kHeadDim + 8 halves): row r comes
// from row_ptr(r) (nullptr: zero row), columns past head_dim are zero. `aligned`: every row
// pointer is 16-byte aligned and head_dim % 8 == 0, so rows go by 16-byte cp.async (with
// zero-fill); otherwise by 2-byte loads, synchronously. `any_global`: a valid global address,
// the nominal source of zero-filled chunks (nothing is read from it). All kThreads threads call it.
template <int kRows, int kHeadDim, int kThreads, typename RowPtr>
FA_DEVICE void load_tile(uint16_t* dst, RowPtr row_ptr, int head_dim, bool aligned, const void* any_global,
                         int tid) {
  constexpr int kPitch = smem_pitch<kHeadDim>();
  if (aligned) {
    constexpr int kChunksPerRow = kHeadDim / 8;
    for (int c = tid; c < kRows * kChunksPerRow; c += kThreads) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const uint16_t* src = row_ptr(row);
      int bytes = src == nullptr ? 0 : (head_dim - col) * 2;
      bytes = bytes < 0 ? 0 : bytes > 16 ? 16 : bytes;
      cp_async_16(dst + row * kPitch + col, bytes > 0 ? static_cast<const void*>(src + col) : any_global, bytes);
    }
  } else {
    for (int e = tid; e < kRows * kHeadDim; e += kThreads) {
      const int row = e / kHeadDim;
      const int col = e % kHeadDim;
      const uint16_t* src = row_ptr(row);
      dst[row * kPitch + col] = (src != nullptr && col < head_dim) ? src[col] : uint16_t(0);
    }
  }
}

// S[kMTiles·16 x kNTiles·8] = Q · Kᵀ for one warp. q: the warp's first query row in shared
// memory; k: the first key row of the tile (rows = keys, columns = head dims).
template <typename T, int kMTiles, int kNTiles, int kHeadDim>
FA_DEVICE void gemm_qk(float (&s)[kMTiles][kNTiles][4], const uint16_t* q, const uint16_t* k, int lane) {
  constexpr int kPitch = smem_pitch<kHeadDim>();
  static_assert(kNTiles % 2 == 0, "K fragments are loaded 16 keys at a time");
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
    }
  }
  // A: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15): lane -> row lane % 16, col 8·(lane / 16).
  const uint16_t* q_lane = q + (lane % 16) * kPitch + (lane / 16) * 8;
  // B: matrices (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), (keys 8-15,
  // dims 8-15) = b0, b1 of n-tile 2j and b0, b1 of n-tile 2j+1.
  const uint16_t* k_lane = k + ((lane % 8) + (lane / 16) * 8) * kPitch + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a[mt], q_lane + mt * 16 * kPitch + ks * 16);
#pragma unroll
    for (int j = 0; j < kNTiles / 2; ++j) {
      uint32_t b[4];
      ldmatrix_x4(b, k_lane + j * 16 * kPitch + ks * 16);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_16816<T>(s[mt][2 * j], a[mt], b[0], b[1]);
        mma_16816<T>(s[mt][2 * j + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// O[kMTiles·16 x kHeadDim] += P · V for one warp. P (the softmax weights, fp32 in the S
// layout) becomes the A operand in registers: the C layout of n-tiles 2j, 2j+1 is exactly the
// A layout of k-step j. v: the first key row of the tile (rows = keys, columns = head dims).
template <typename T, int kMTiles, int kNTiles, int kHeadDim>
FA_DEVICE void gemm_pv(float (&o)[kMTiles][kHeadDim / 8][4], const float (&p)[kMTiles][kNTiles][4],
                       const uint16_t* v, int lane) {
  constexpr int kPitch = smem_pitch<kHeadDim>();
  // B with .trans: matrices (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims 8-15),
  // (keys 8-15, dims 8-15) = b0, b1 of d-tile 2i and b0, b1 of d-tile 2i+1.
  const uint16_t* v_lane = v + ((lane % 8) + ((lane / 8) % 2) * 8) * kPitch + (lane / 16) * 8;
#pragma unroll
  for (int ks = 0; ks < kNTiles / 2; ++ks) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      a[mt][0] = T::pack2(p[mt][2 * ks][0], p[mt][2 * ks][1]);
      a[mt][1] = T::pack2(p[mt][2 * ks][2], p[mt][2 * ks][3]);
      a[mt][2] = T::pack2(p[mt][2 * ks + 1][0], p[mt][2 * ks + 1][1]);
      a[mt][3] = T::pack2(p[mt][2 * ks + 1][2], p[mt][2 * ks + 1][3]);
    }
#pragma unroll
    for (int i = 0; i < kHeadDim / 16; ++i) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_lane + ks * 16 * kPitch + i * 16);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_16816<T>(o[mt][2 * i], a[mt], b[0], b[1]);
        mma_16816<T>(o[mt][2 * i + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// One online-softmax step over a tile of base-2 scores s (masked entries -inf), in place:
// s becomes P = 2^(s - m_new), row_sum = row_sum · 2^(m_old - m_new) + Σ P (this lane's
// columns only; the quad adds its 4 partial sums at the end) and O is rescaled by the same
// factor. A row that has seen only masked keys keeps max -inf and gets P = 0.
template <int kMTiles, int kNTiles, int kDTiles>
FA_DEVICE void online_softmax(float (&s)[kMTiles][kNTiles][4], float (&o)[kMTiles][kDTiles][4],
                              float (&row_max)[2 * kMTiles], float (&row_sum)[2 * kMTiles]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int ri = 2 * mt + half;
      float tile_max = kNegInf;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        tile_max = fmaxf(tile_max, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
      }
      const float new_max = fmaxf(row_max[ri], warp_max_quad(tile_max));
      const float shift = new_max == kNegInf ? 0.0f : new_max;
      const float rescale = exp2_approx(row_max[ri] - shift);
      row_max[ri] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float prob = exp2_approx(s[mt][nt][2 * half + c] - shift);
          s[mt][nt][2 * half + c] = prob;
          sum += prob;
        }
      }
      row_sum[ri] = row_sum[ri] * rescale + sum;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[mt][dt][2 * half] *= rescale;
        o[mt][dt][2 * half + 1] *= rescale;
      }
    }
  }
}

}  // namespace cuda
}  // namespace fusedattn
