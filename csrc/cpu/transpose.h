// Packing a block of rows into its transpose: dst[k * ld + i] = value(i, k) for lanes i < ld
// (lanes >= `lanes` get zero) and k < depth. The copy runs in 16 x 16 tiles, so the strided
// writes of a tile stay within 16 cache lines; a row-by-row loop touches `depth` lines per row
// and made Qᵀ packing 6.5% of the fp32 forward (benchmarks/profile_forward.py).
#pragma once
#include <cstdint>

namespace fusedattn {
namespace cpu {
namespace FUSEDATTN_ISA {

// row_of(i): the source row of lane i; value(row, k): element k of a row, as Out.
template <typename Out, typename RowOf, typename Value>
inline void pack_transposed(RowOf row_of, int64_t lanes, int64_t depth, Out* dst, int64_t ld, Value value) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < ld; i0 += kTile) {
    const int64_t i1 = i0 + kTile < ld ? i0 + kTile : ld;
    for (int64_t k0 = 0; k0 < depth; k0 += kTile) {
      const int64_t k1 = k0 + kTile < depth ? k0 + kTile : depth;
      for (int64_t i = i0; i < i1; ++i) {
        if (i < lanes) {
          const auto row = row_of(i);
          for (int64_t k = k0; k < k1; ++k) dst[k * ld + i] = value(row, k);
        } else {
          for (int64_t k = k0; k < k1; ++k) dst[k * ld + i] = Out(0);
        }
      }
    }
  }
}

}  // namespace FUSEDATTN_ISA
}  // namespace cpu
}  // namespace fusedattn
