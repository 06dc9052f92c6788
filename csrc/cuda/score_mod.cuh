// DESIGN.md's score pipeline on register tiles of the tensor-core kernels (layout: warp_tile.cuh):
//   s = scale·q·k → softcap → ALiBi → + attn_mask → masking → (softmax) → dropout.
// The formulas are common/variant.h's, shared with the CPU kernels. Scores leave in base 2
// (·log2 e) for the exp2-based softmax. When nothing but the scale is on, the whole pipeline
// is one multiply by scale·log2(e) plus the visible-range test on tiles that need it.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/params.h"
#include "common/variant.h"
#include "cuda/compat.cuh"
#include "cuda/warp_tile.cuh"

namespace fusedattn {
namespace cuda {

// Constants of the pipeline (the ALiBi slope is per row slot: decode packs several heads).
struct ScoreMod {
  float scale;       // multiplies q·k
  float scale_log2;  // scale · log2(e)
  float softcap;     // > 0: s -> softcap · tanh(s / softcap)
  bool alibi;
  bool modified;     // softcap, ALiBi or an attn_mask: the per-element path
};

FA_DEVICE ScoreMod make_score_mod(const AttentionParams& p, bool has_mask) {
  ScoreMod mod;
  mod.scale = static_cast<float>(p.scale);
  mod.scale_log2 = mod.scale * kLog2e;
  mod.softcap = static_cast<float>(p.softcap);
  mod.alibi = p.alibi_slopes != nullptr;
  mod.modified = mod.softcap > 0.0f || mod.alibi || has_mask;
  return mod;
}

// One attn_mask entry as an additive score: bool -> 0 (attend) or -inf, floats as they are.
FA_DEVICE float mask_value(const MaskRef& mask, const void* row, int64_t key) {
  const int64_t offset = key * mask.col_stride;
  switch (mask.type) {
    case MaskType::kBool: return static_cast<const bool*>(row)[offset] ? 0.0f : kNegInf;
    case MaskType::kFloat32: return static_cast<const float*>(row)[offset];
    case MaskType::kFloat64: return static_cast<float>(static_cast<const double*>(row)[offset]);
    case MaskType::kFloat16: return Fp16::to_float(static_cast<const uint16_t*>(row)[offset]);
    case MaskType::kBFloat16: return Bf16::to_float(static_cast<const uint16_t*>(row)[offset]);
    case MaskType::kNone: break;
  }
  return 0.0f;
}

// Element size of a mask type, for row pointers.
FA_DEVICE int mask_element_size(MaskType type) {
  return type == MaskType::kBool ? 1 : type == MaskType::kFloat64 ? 8 : type == MaskType::kFloat32 ? 4 : 2;
}

// What the pipeline needs to know about one row slot of a lane (warp_tile.cuh): kernels pass a
// callable slot(ri) -> RowSlot, evaluated once per slot and tile, so that none of this is
// held in registers across the key loop (the O and S accumulators need them).
struct RowSlot {
  int row;               // query row (0-based in its sequence), for dropout
  int lo, hi;            // visible keys [lo, hi)
  float position;        // query position, for ALiBi
  float slope;           // ALiBi slope of the row's head
  const void* mask_row;  // the row's attn_mask entries at key 0, or nullptr
};

// Raw q·k products of a tile -> base-2 scores. key0: the key of the tile's column 0 (this
// lane's columns are key0 + 8·nt + 2t + c); range_mask: some entry of the tile may fall
// outside its row's visible range.
template <int kMTiles, int kNTiles, typename SlotFn>
FA_DEVICE void scores_to_log2(float (&s)[kMTiles][kNTiles][4], const ScoreMod& mod, const MaskRef& mask,
                              SlotFn slot, int key0, int lane, bool range_mask) {
  const int t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (!mod.modified && !range_mask) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          s[mt][nt][2 * half] *= mod.scale_log2;
          s[mt][nt][2 * half + 1] *= mod.scale_log2;
        }
        continue;
      }
      const RowSlot r = slot(2 * mt + half);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = key0 + 8 * nt + 2 * t + c;
          const bool visible = key >= r.lo && key < r.hi;
          float x = s[mt][nt][2 * half + c];
          if (mod.modified) {
            x *= mod.scale;
            if (mod.softcap > 0.0f) x = softcap_score(tanhf(x / mod.softcap), mod.softcap);
            if (mod.alibi) x = alibi_score(x, r.slope, r.position, static_cast<float>(key));
            // (visible keys only: a tile's last columns may lie past seqlen_k, past the mask's end)
            if (r.mask_row != nullptr && visible) x += mask_value(mask, r.mask_row, key);
            x *= kLog2e;
          } else {
            x *= mod.scale_log2;
          }
          if (range_mask && !visible) x = kNegInf;
          s[mt][nt][2 * half + c] = x;
        }
      }
    }
  }
}

// Whether any entry of a bool attn_mask tile is true for this lane (keys in the rows' visible
// ranges only); the block skips a key tile that no lane can see.
template <int kMTiles, int kNTiles, typename SlotFn>
FA_DEVICE bool bool_mask_any(const MaskRef& mask, SlotFn slot, int key0, int lane) {
  const int t = lane % 4;
  bool any = false;
#pragma unroll
  for (int ri = 0; ri < 2 * kMTiles; ++ri) {
    const RowSlot r = slot(ri);
    if (r.mask_row == nullptr) continue;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = key0 + 8 * nt + 2 * t + c;
        if (key >= r.lo && key < r.hi) {
          any |= static_cast<const bool*>(r.mask_row)[static_cast<int64_t>(key) * mask.col_stride];
        }
      }
    }
  }
  return any;
}

// Dropout on a tile of softmax weights: weight (row, key) is kept iff word key % 4 of
// Philox4x32-10(counter = (key / 4, row, batch·heads + head, offset_lo), key = (seed_lo,
// seed_hi ^ offset_hi)) is below the threshold (variant.h); kept weights are scaled by
// 1/(1 - p). A lane's two columns 2t, 2t+1 share one Philox call (words 0,1 or 2,3).
struct Dropout {
  uint32_t key0, key1, counter3;  // variant.h's DropoutKey
  uint32_t threshold;
  uint32_t stream;  // batch · num_heads + head
  float keep_scale;
};

FA_DEVICE Dropout make_dropout(const AttentionParams& p, int64_t batch, int64_t head) {
  const DropoutKey key = dropout_key(p);
  return Dropout{key.key0, key.key1, key.counter3, dropout_threshold(p.dropout_p),
                 static_cast<uint32_t>(batch * p.num_heads + head), dropout_scale<float>(p.dropout_p)};
}

template <int kMTiles, int kNTiles, typename SlotFn>
FA_DEVICE void apply_dropout(float (&p)[kMTiles][kNTiles][4], const Dropout& d, SlotFn slot, int key0, int lane) {
  static_assert(2 * kNTiles <= 32, "one keep bit per column of a row slot");
  const int t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // Keep bits first, one Philox call at a time (a rolled loop keeps registers free for the
      // accumulators), then applied with the tile fully unrolled.
      const uint32_t row = static_cast<uint32_t>(slot(2 * mt + half).row);
      uint32_t keep = 0;
#pragma unroll 1
      for (int nt = 0; nt < kNTiles; ++nt) {
        const uint32_t key = static_cast<uint32_t>(key0 + 8 * nt + 2 * t);
        uint32_t counter[4] = {key >> 2, row, d.stream, d.counter3};
        philox4x32_10(counter, d.key0, d.key1, mulhilo_scalar);
        const bool high = (key & 2u) != 0;  // key % 4 is 0 or 2: words (0, 1) or (2, 3)
        const uint32_t w0 = high ? counter[2] : counter[0];
        const uint32_t w1 = high ? counter[3] : counter[1];
        keep |= (w0 < d.threshold ? 1u : 0u) << (2 * nt);
        keep |= (w1 < d.threshold ? 1u : 0u) << (2 * nt + 1);
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        p[mt][nt][2 * half] *= (keep >> (2 * nt)) & 1u ? d.keep_scale : 0.0f;
        p[mt][nt][2 * half + 1] *= (keep >> (2 * nt + 1)) & 1u ? d.keep_scale : 0.0f;
      }
    }
  }
}

}  // namespace cuda
}  // namespace fusedattn
