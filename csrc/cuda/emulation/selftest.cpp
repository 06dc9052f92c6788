// Runs the CUDA kernels' sources on the emulator (emulator.h) and checks them against a plain
// fp64 attention written on common/variant.h — the same semantics the CPU tests pin. Every
// tensor lives inside a NaN-filled buffer with padded strides: reading outside an input shows
// up as NaN, and every output element must be written while nothing around it is.
//
//   csrc/cuda/emulation/run_selftest.sh [filter]     (builds with g++, runs; ~1-3 minutes)
//
// Each case prints one line: its name, max error of out and LSE against the bound, PASS/FAIL.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "common/params.h"
#include "common/variant.h"
#include "cuda/attention_cuda.h"
#include "cuda/emulation/emulator.h"
#include "cuda/tile_config.h"

using namespace fusedattn;

namespace {

std::mt19937_64 g_rng(20261130);
const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

int element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

uint16_t to_bits(DType t, float x) { return t == DType::kFloat16 ? emu::float_to_half(x) : emu::float_to_bf16(x); }

// A (batch, heads, rows, dim) tensor inside a NaN-filled buffer, with optional padding of every
// stride. Layout "bhsd" or "bshd" (rows and heads swapped in memory).
struct Tensor {
  DType dtype;
  int64_t b, h, s, d;
  int64_t stride_b, stride_h, stride_s;
  std::vector<char> buffer;
  int64_t offset;  // elements from the buffer start to element (0,0,0,0)

  Tensor(DType t, int64_t b_, int64_t h_, int64_t s_, int64_t d_, int64_t pad, bool bshd) : dtype(t), b(b_), h(h_), s(s_), d(d_) {
    const int64_t row = d + pad;
    if (bshd) {
      stride_h = row;
      stride_s = h * row + pad;
      stride_b = s * stride_s + pad;
    } else {
      stride_s = row;
      stride_h = s * row + pad;
      stride_b = h * stride_h + pad;
    }
    offset = pad;
    const int64_t elements = offset + b * stride_b + pad + 8;
    buffer.assign(static_cast<size_t>(elements * element_size(t)), 0);
    for (int64_t e = 0; e < elements; ++e) set_raw(e, kNaN);
  }
  int64_t index(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return offset + i0 * stride_b + i1 * stride_h + i2 * stride_s + i3;
  }
  void set_raw(int64_t e, double x) {
    if (dtype == DType::kFloat32) {
      float f = static_cast<float>(x);
      std::memcpy(buffer.data() + e * 4, &f, 4);
    } else {
      const uint16_t bits = to_bits(dtype, static_cast<float>(x));
      std::memcpy(buffer.data() + e * 2, &bits, 2);
    }
  }
  double raw(int64_t e) const {
    if (dtype == DType::kFloat32) {
      float f;
      std::memcpy(&f, buffer.data() + e * 4, 4);
      return f;
    }
    uint16_t bits;
    std::memcpy(&bits, buffer.data() + e * 2, 2);
    return dtype == DType::kFloat16 ? emu::half_to_float(bits) : emu::bf16_to_float(bits);
  }
  double at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const { return raw(index(i0, i1, i2, i3)); }
  void randomize(double scale = 1.0, int64_t rows = -1) {  // the first `rows` rows (default all)
    std::normal_distribution<double> normal(0.0, scale);
    for (int64_t i0 = 0; i0 < b; ++i0)
      for (int64_t i1 = 0; i1 < h; ++i1)
        for (int64_t i2 = 0; i2 < (rows < 0 ? s : rows); ++i2)
          for (int64_t i3 = 0; i3 < d; ++i3) set_raw(index(i0, i1, i2, i3), normal(g_rng));
  }
  TensorRef ref() {
    return TensorRef{buffer.data() + offset * element_size(dtype), stride_b, stride_h, stride_s};
  }
  // Every element inside (of the first `rows` rows; default all) was written (not NaN) and
  // every one outside still NaN.
  bool written_exactly(int64_t rows = -1) const {
    std::vector<char> inside(buffer.size() / element_size(dtype), 0);
    for (int64_t i0 = 0; i0 < b; ++i0)
      for (int64_t i1 = 0; i1 < h; ++i1)
        for (int64_t i2 = 0; i2 < (rows < 0 ? s : rows); ++i2)
          for (int64_t i3 = 0; i3 < d; ++i3) inside[index(i0, i1, i2, i3)] = 1;
    for (size_t e = 0; e < inside.size(); ++e) {
      if (inside[e] != 0 && std::isnan(raw(e))) return false;
      if (inside[e] == 0 && !std::isnan(raw(e))) return false;
    }
    return true;
  }
};

struct Case {
  std::string name;
  DType dtype = DType::kFloat16;
  int64_t batch = 1, heads = 2, heads_kv = 1, seqlen_q = 17, seqlen_k = 33, head_dim = 64;
  bool causal = false;
  int64_t q_offset = -1000000;  // default: seqlen_k - seqlen_q
  int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;
  bool alibi = false, sinks = false;
  MaskType mask = MaskType::kNone;
  float dropout = 0.0f;
  bool bshd = false;
  int64_t pad = 8;  // stride padding (elements); odd = unaligned rows
  // KV cache (decode): 0 = plain forward
  int64_t page_size = 0;  // > 0 paged; -1 contiguous cache
  int64_t seqlen_new = 0;
  int num_splits = 0;
  bool leftpad = false;
  double k_scale = 1.0;
  // Varlen (packed sequences): lengths per sequence, packed rows after the last sequence, the
  // max_seqlen_q given to the launcher (-1: the real maximum), and cu_seqlens whose last
  // entries run past the packed rows (the kernels clamp them).
  bool varlen = false;
  std::vector<int32_t> lengths_q, lengths_k;
  int64_t tail = 0;
  int64_t max_seqlen_q = -1;
  bool overrun = false;
};

std::vector<double> g_slopes, g_sinks;
std::vector<char> g_mask;
std::vector<int32_t> g_seqlens, g_begins, g_table, g_batch_idx, g_append_at;

using Accessor = std::function<double(int64_t, int64_t, int64_t, int64_t)>;

// Plain attention in fp64 on variant.h's definitions. query(b, h, i, d), key(b, h_kv, j, d) and
// value(...) give row i / key j of sequence b; geometry(b) its lengths and q_offset. Results are
// (batch, heads, p.seqlen_q) rows (p.seqlen_q >= every sequence's length); rows past a
// sequence's end stay 0 / -inf.
void reference(const AttentionParams& p, const Accessor& query, const Accessor& key, const Accessor& value,
               const std::function<AttentionParams(int64_t)>& geometry, std::vector<double>& out,
               std::vector<double>& lse) {
  out.assign(p.batch * p.num_heads * p.seqlen_q * p.head_dim, 0.0);
  lse.assign(p.batch * p.num_heads * p.seqlen_q, -kInf);
  for (int64_t b = 0; b < p.batch; ++b) {
    const AttentionParams g = geometry(b);
    for (int64_t h = 0; h < p.num_heads; ++h) {
      const int64_t hk = kv_head_of(p, h);
      for (int64_t i = 0; i < g.seqlen_q; ++i) {
        const KeyRange range = visible_keys(g, i);
        std::vector<double> scores;
        std::vector<int64_t> keys;
        for (int64_t j = range.begin; j < range.end; ++j) {
          double s = 0;
          for (int64_t d = 0; d < p.head_dim; ++d) s += query(b, h, i, d) * key(b, hk, j, d);
          s *= p.scale;
          if (p.softcap > 0) s = p.softcap * std::tanh(s / p.softcap);
          if (p.alibi_slopes != nullptr) s -= alibi_slope(p, b, h) * std::fabs(static_cast<double>(i + g.q_offset - j));
          if (p.mask.type == MaskType::kBool) {
            if (!static_cast<const bool*>(p.mask.data)[b * p.mask.batch_stride + h * p.mask.head_stride + i * p.mask.row_stride + j]) continue;
          } else if (p.mask.type == MaskType::kFloat32) {
            s += static_cast<const float*>(p.mask.data)[b * p.mask.batch_stride + h * p.mask.head_stride + i * p.mask.row_stride + j];
          }
          scores.push_back(s);
          keys.push_back(j);
        }
        double top = p.sinks != nullptr ? p.sinks[h] : -kInf;
        for (double s : scores) top = std::max(top, s);
        if (top == -kInf) continue;
        double sum = p.sinks != nullptr ? std::exp(p.sinks[h] - top) : 0.0;
        for (double s : scores) sum += std::exp(s - top);
        lse[(b * p.num_heads + h) * p.seqlen_q + i] = top + std::log(sum);
        for (size_t n = 0; n < scores.size(); ++n) {
          double w = std::exp(scores[n] - top) / sum;
          if (p.dropout_p > 0) w = dropout_keep(p, b, h, i, keys[n]) ? w / (1.0 - p.dropout_p) : 0.0;
          for (int64_t d = 0; d < p.head_dim; ++d) out[((b * p.num_heads + h) * p.seqlen_q + i) * p.head_dim + d] += w * value(b, hk, keys[n], d);
        }
      }
    }
  }
}

int g_failures = 0;

// Prints one case's line (errors, PASS or FAIL: result) and counts a failure; true if it passed.
bool report_case(const std::string& name, double worst_out, double tol, double worst_lse, const char* result) {
  std::printf("%-58s out %.2e (bound %.0e)  lse %.2e  %s%s\n", name.c_str(), worst_out, tol, worst_lse,
              result == nullptr ? "PASS" : "FAIL: ", result == nullptr ? "" : result);
  std::fflush(stdout);
  if (result != nullptr) ++g_failures;
  return result == nullptr;
}

// The parameters a case sets whatever its layout: dtype, heads, head_dim and scale, and the
// variant (causal, window, softcap, dropout with a fixed seed and offset).
AttentionParams variant_params(const Case& c) {
  AttentionParams p;
  p.dtype = c.dtype;
  p.num_heads = c.heads;
  p.num_heads_kv = c.heads_kv;
  p.head_dim = c.head_dim;
  p.scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  p.causal = c.causal;
  p.window_left = c.window_left;
  p.window_right = c.window_right;
  p.softcap = c.softcap;
  p.dropout_p = c.dropout;
  p.dropout_seed = 0x123456789abcdefULL;
  p.dropout_offset = 0x42ULL << 32 | 7;
  return p;
}

bool run(const Case& c) {
  const bool cache = c.page_size != 0;
  AttentionParams p = variant_params(c);
  p.batch = c.batch;
  p.seqlen_q = c.seqlen_q;

  Tensor q(c.dtype, c.batch, c.heads, c.seqlen_q, c.head_dim, c.pad, c.bshd);
  Tensor out(c.dtype, c.batch, c.heads, c.seqlen_q, c.head_dim, c.pad, c.bshd);
  q.randomize();
  p.q = q.ref();
  p.out = out.ref();
  // LSE (batch, heads, seqlen_q) with padded head stride, NaN around.
  std::vector<float> lse_buffer(c.batch * c.heads * (c.seqlen_q + 3) + 8, std::nanf(""));
  p.lse = lse_buffer.data() + 4;
  p.lse_head_stride = c.seqlen_q + 3;
  p.lse_batch_stride = c.heads * p.lse_head_stride;

  // Keys: a plain (batch, heads_kv, seqlen_k) tensor, or a cache.
  int64_t cache_rows = c.batch, capacity = c.seqlen_k, slots = c.seqlen_k;
  if (cache && c.page_size > 0) {
    const int64_t pages_per_seq = (c.seqlen_k + c.page_size - 1) / c.page_size;
    cache_rows = c.batch * pages_per_seq + 3;
    slots = c.page_size;
    capacity = pages_per_seq * c.page_size;
  } else if (cache) {
    cache_rows = c.batch + 2;
  }
  Tensor k(c.dtype, cache_rows, c.heads_kv, slots, c.head_dim, c.pad, cache || c.bshd);
  Tensor v(c.dtype, cache_rows, c.heads_kv, slots, c.head_dim, c.pad, cache || c.bshd);
  k.randomize(c.k_scale);
  v.randomize();
  p.k = k.ref();
  p.v = v.ref();
  p.seqlen_k = slots;

  std::vector<double> slopes_storage;
  if (c.alibi) {
    g_slopes.clear();
    for (int64_t h = 0; h < c.heads; ++h) g_slopes.push_back(std::pow(2.0, -(h + 1.0)));
    p.alibi_slopes = g_slopes.data();
  }
  if (c.sinks) {
    g_sinks.clear();
    for (int64_t h = 0; h < c.heads; ++h) g_sinks.push_back(0.5 * h - 0.3);
    p.sinks = g_sinks.data();
  }
  std::vector<float> float_mask;
  if (c.mask != MaskType::kNone) {
    // (seqlen_q, seqlen_k) broadcast over batch; per head for bool (head stride), shared for float.
    const int64_t heads = c.mask == MaskType::kBool ? c.heads : 1;
    std::bernoulli_distribution attend(0.7);
    std::normal_distribution<double> normal(0.0, 1.0);
    if (c.mask == MaskType::kBool) {
      g_mask.assign(heads * c.seqlen_q * c.seqlen_k, 0);
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < c.seqlen_q; ++i)
          for (int64_t j = 0; j < c.seqlen_k; ++j) {
            // Whole key tiles hidden for some heads, so tile skipping runs.
            const bool hidden_tile = h == 1 && j >= 64 && j < 128;
            g_mask[(h * c.seqlen_q + i) * c.seqlen_k + j] = !hidden_tile && attend(g_rng);
          }
      p.mask.data = g_mask.data();
      p.mask.head_stride = c.seqlen_q * c.seqlen_k;
    } else {
      float_mask.resize(c.seqlen_q * c.seqlen_k);
      for (auto& m : float_mask) m = static_cast<float>(normal(g_rng));
      float_mask[3] = -std::numeric_limits<float>::infinity();
      p.mask.data = float_mask.data();
      p.mask.head_stride = 0;
    }
    p.mask.type = c.mask;
    p.mask.batch_stride = 0;
    p.mask.row_stride = c.seqlen_k;
    p.mask.col_stride = 1;
  }

  std::vector<double> ref_out, ref_lse;
  const char* result = nullptr;
  if (!cache) {
    p.q_offset = c.q_offset == -1000000 ? c.seqlen_k - c.seqlen_q : c.q_offset;
    reference(p, [&](int64_t b, int64_t h, int64_t i, int64_t d) { return q.at(b, h, i, d); },
              [&](int64_t b, int64_t h, int64_t j, int64_t d) { return k.at(b, h, j, d); },
              [&](int64_t b, int64_t h, int64_t j, int64_t d) { return v.at(b, h, j, d); },
              [&](int64_t) { return p; }, ref_out, ref_lse);
    cuda::attention_forward(p, 0, nullptr);
  } else {
    // Sequence b: slots [begin, end) of its cache row (batch_idx) or pages (block table).
    std::uniform_int_distribution<int64_t> length(c.seqlen_k / 2, c.seqlen_k);
    g_seqlens.assign(c.batch, 0);
    g_begins.assign(c.batch, 0);
    g_append_at.assign(c.batch, 0);
    for (int64_t b = 0; b < c.batch; ++b) {
      g_seqlens[b] = static_cast<int32_t>(b == 0 ? c.seqlen_k : length(g_rng));
      g_begins[b] = c.leftpad ? static_cast<int32_t>(b * 3 % 7) : 0;
      g_append_at[b] = g_seqlens[b] - static_cast<int32_t>(c.seqlen_new);
    }
    p.sequences.seqlens_k = g_seqlens.data();
    if (c.leftpad) p.sequences.k_begin = g_begins.data();
    if (c.page_size > 0) {
      const int64_t pages_per_seq = capacity / c.page_size;
      g_table.assign(c.batch * pages_per_seq, 0);
      std::vector<int32_t> ids(cache_rows);
      for (int64_t i = 0; i < cache_rows; ++i) ids[i] = static_cast<int32_t>(i);
      std::shuffle(ids.begin(), ids.end(), g_rng);
      for (size_t i = 0; i < g_table.size(); ++i) g_table[i] = ids[i];
      p.sequences.block_table = g_table.data();
      p.sequences.block_table_stride = pages_per_seq;
      p.sequences.page_size = c.page_size;
    } else {
      g_batch_idx.assign(c.batch, 0);
      for (int64_t b = 0; b < c.batch; ++b) g_batch_idx[b] = static_cast<int32_t>((b + 1) % cache_rows);
      p.sequences.cache_batch_idx = g_batch_idx.data();
    }
    const auto slot_index = [&](const Tensor& t, int64_t b, int64_t h, int64_t slot, int64_t d) {
      if (c.page_size > 0) {
        return t.index(g_table[b * p.sequences.block_table_stride + slot / c.page_size], h, slot % c.page_size, d);
      }
      return t.index(g_batch_idx[b], h, slot, d);
    };
    // New tokens: written by kvcache_append into slots [seqlens - seqlen_new, seqlens).
    Tensor k_new(c.dtype, c.batch, c.heads_kv, c.seqlen_new, c.head_dim, c.pad, true);
    Tensor v_new(c.dtype, c.batch, c.heads_kv, c.seqlen_new, c.head_dim, c.pad, true);
    if (c.seqlen_new > 0) {
      k_new.randomize(c.k_scale);
      v_new.randomize();
      cuda::AppendParams a;
      a.dtype = c.dtype;
      a.k_cache = k.ref();
      a.v_cache = v.ref();
      a.k_new = k_new.ref();
      a.v_new = v_new.ref();
      a.sequences = p.sequences;
      a.sequences.seqlens_k = g_append_at.data();
      a.batch = c.batch;
      a.num_heads_kv = c.heads_kv;
      a.seqlen_new = c.seqlen_new;
      a.head_dim = c.head_dim;
      a.cache_rows = cache_rows;
      a.capacity = capacity;
      cuda::kvcache_append(a, 0, nullptr);
      for (int64_t b = 0; b < c.batch; ++b)
        for (int64_t h = 0; h < c.heads_kv; ++h)
          for (int64_t t = 0; t < c.seqlen_new; ++t)
            for (int64_t d = 0; d < c.head_dim; ++d) {
              const int64_t slot = g_append_at[b] + t;
              if (k.raw(slot_index(k, b, h, slot, d)) != k_new.at(b, h, t, d) ||
                  v.raw(slot_index(v, b, h, slot, d)) != v_new.at(b, h, t, d)) {
                result = "append wrote the wrong slot";
              }
            }
    }
    reference(p, [&](int64_t b, int64_t h, int64_t i, int64_t d) { return q.at(b, h, i, d); },
              [&](int64_t b, int64_t h, int64_t j, int64_t d) {
                return k.raw(slot_index(k, b, h, g_begins[b] + j, d));
              },
              [&](int64_t b, int64_t h, int64_t j, int64_t d) { return v.raw(slot_index(v, b, h, g_begins[b] + j, d)); },
              [&](int64_t b) {
                AttentionParams g = p;
                g.seqlen_k = g_seqlens[b] - g_begins[b];
                g.q_offset = g.seqlen_k - p.seqlen_q;
                return g;
              },
              ref_out, ref_lse);
    cuda::KVCacheParams kv;
    kv.attn = p;
    kv.cache_rows = cache_rows;
    kv.capacity = capacity;
    kv.num_splits = c.num_splits;
    cuda::attention_kvcache_forward(kv, 0, nullptr);
  }

  // Compare.
  const double tol = c.dtype == DType::kFloat32 ? 2e-5 : c.dtype == DType::kFloat16 ? 3e-3 : 2.5e-2;
  double worst_out = 0.0, worst_lse = 0.0;
  bool nan = false, lse_inf_mismatch = false;
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t h = 0; h < c.heads; ++h)
      for (int64_t i = 0; i < c.seqlen_q; ++i) {
        const int64_t row = (b * c.heads + h) * c.seqlen_q + i;
        for (int64_t d = 0; d < c.head_dim; ++d) {
          const double got = out.at(b, h, i, d), want = ref_out[row * c.head_dim + d];
          if (std::isnan(got)) nan = true;
          worst_out = std::max(worst_out, std::fabs(got - want) / (1.0 + std::fabs(want)));
        }
        const double got = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i], want = ref_lse[row];
        if (std::isnan(got)) nan = true;
        if (std::isinf(want) || std::isinf(got)) {
          lse_inf_mismatch |= got != want;
        } else {
          worst_lse = std::max(worst_lse, std::fabs(got - want) / (1.0 + std::fabs(want)));
        }
      }
  bool lse_written = true;
  for (size_t e = 0; e < lse_buffer.size(); ++e) {
    const int64_t rel = static_cast<int64_t>(e) - 4;
    const int64_t b = rel / p.lse_batch_stride, h = rel % p.lse_batch_stride / p.lse_head_stride,
                  i = rel % p.lse_head_stride;
    const bool inside = rel >= 0 && b < c.batch && i < c.seqlen_q;
    lse_written &= inside ? !std::isnan(lse_buffer[e]) : std::isnan(lse_buffer[e]);
    (void)h;
  }
  if (result == nullptr) {
    if (nan) result = "NaN in the output";
    else if (!out.written_exactly()) result = "out: an element unwritten, or one outside written";
    else if (!lse_written) result = "lse: an entry unwritten, or one outside written";
    else if (lse_inf_mismatch) result = "LSE -inf where the reference is finite (or the reverse)";
    else if (worst_out > tol) result = "out error above bound";
    else if (worst_lse > 1e-4) result = "LSE error above bound";
  }
  return report_case(c.name, worst_out, tol, worst_lse, result);
}

// Packed variable-length sequences through attention_varlen_forward: q/out (total_q + tail,
// heads, d) and k/v (total_k, heads_kv, d) as bshd views with padded strides in NaN buffers,
// cu_seqlens read by the kernels, per-sequence ALiBi slopes (batch, heads). Compared per
// sequence with the fp64 reference (bottom-right, rows counted from the sequence start);
// tail rows must be exactly 0 with LSE -inf, and rows past the grid's q-tiles NaN.
bool run_varlen(const Case& c) {
  const int64_t batch = static_cast<int64_t>(c.lengths_q.size());
  std::vector<int32_t> cu_q(batch + 1, 0), cu_k(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    cu_q[b + 1] = cu_q[b] + c.lengths_q[b];
    cu_k[b + 1] = cu_k[b] + c.lengths_k[b];
  }
  const int64_t total_q = cu_q[batch] + c.tail, total_k = cu_k[batch];
  // The kernels' view of the lengths: entries past the packed rows are clamped to them.
  std::vector<int32_t> used_q = cu_q, used_k = cu_k;
  if (c.overrun && batch > 0) {
    cu_q[batch] += 1000;
    cu_k[batch] += 77;
    used_q[batch] = static_cast<int32_t>(total_q);
  }
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max<int64_t>(longest, used_q[b + 1] - used_q[b]);

  // Guard rows after the packed ones, which the kernels must not touch: out's stay NaN (never
  // written), k/v's are NaN (a key read past the packed rows shows in the output), q's are
  // numbers (a query row past them would be written as a number).
  constexpr int64_t kGuardRows = 40;
  Tensor q(c.dtype, 1, c.heads, total_q + kGuardRows, c.head_dim, c.pad, true);
  Tensor out(c.dtype, 1, c.heads, total_q + kGuardRows, c.head_dim, c.pad, true);
  Tensor k(c.dtype, 1, c.heads_kv, total_k + kGuardRows, c.head_dim, c.pad, true);
  Tensor v(c.dtype, 1, c.heads_kv, total_k + kGuardRows, c.head_dim, c.pad, true);
  q.randomize();
  k.randomize(c.k_scale, total_k);
  v.randomize(1.0, total_k);

  cuda::VarlenParams vp;
  vp.attn = variant_params(c);
  AttentionParams& p = vp.attn;
  p.batch = batch;
  p.seqlen_q = total_q;
  p.seqlen_k = total_k;
  p.q_offset = 12345;  // ignored: every sequence is bottom-right
  p.q = q.ref();
  p.k = k.ref();
  p.v = v.ref();
  p.out = out.ref();
  for (TensorRef* t : {&p.q, &p.k, &p.v, &p.out}) t->batch_stride = 0;
  // LSE (heads, total_q) with a padded head stride, NaN around.
  const int64_t lse_stride = total_q + 3;
  std::vector<float> lse_buffer(c.heads * lse_stride + 8, std::nanf(""));
  p.lse = lse_buffer.data() + 4;
  p.lse_head_stride = lse_stride;
  p.lse_batch_stride = 0;
  if (c.alibi) {
    g_slopes.clear();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < c.heads; ++h) g_slopes.push_back(std::pow(2.0, -(h + 1.0)) * (1.0 + 0.5 * b));
    p.alibi_slopes = g_slopes.data();
    p.alibi_batch_stride = c.heads;
  }
  if (c.sinks) {
    g_sinks.clear();
    for (int64_t h = 0; h < c.heads; ++h) g_sinks.push_back(0.5 * h - 0.3);
    p.sinks = g_sinks.data();
  }
  p.sequences.cu_seqlens_q = cu_q.data();
  p.sequences.cu_seqlens_k = cu_k.data();
  vp.max_seqlen_q = c.max_seqlen_q >= 0 ? c.max_seqlen_q : longest;
  // Rows a sequence has past the ones the grid's q-tiles cover (max_seqlen_q below its length)
  // must come out NaN: they start as numbers here.
  const int bucket = cuda::head_dim_bucket(static_cast<int>(c.head_dim));
  const int64_t block_m = c.dtype == DType::kFloat32 ? 4  // simt_kernel.cuh's kSimtWarps
                                                     : cuda::forward_tile(bucket).block_m;
  const int64_t covered = std::max<int64_t>(1, (vp.max_seqlen_q + block_m - 1) / block_m) * block_m;
  const auto uncovered = [&](int64_t b, int64_t i) { return b < batch && i >= covered; };
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = covered; i < used_q[b + 1] - used_q[b]; ++i)
      for (int64_t h = 0; h < c.heads; ++h) {
        for (int64_t d = 0; d < c.head_dim; ++d) out.set_raw(out.index(0, h, used_q[b] + i, d), 7.0);
        p.lse[h * lse_stride + used_q[b] + i] = 7.0f;
      }

  AttentionParams rp = p;  // the reference's rows: (batch, heads, longest)
  rp.seqlen_q = longest;
  std::vector<double> ref_out, ref_lse;
  const auto clamped = [](const std::vector<int32_t>& cu, int64_t b, int64_t total) {
    return std::min<int64_t>(cu[b], total);
  };
  reference(rp, [&](int64_t b, int64_t h, int64_t i, int64_t d) { return q.at(0, h, used_q[b] + i, d); },
            [&](int64_t b, int64_t h, int64_t j, int64_t d) { return k.at(0, h, clamped(cu_k, b, total_k) + j, d); },
            [&](int64_t b, int64_t h, int64_t j, int64_t d) { return v.at(0, h, clamped(cu_k, b, total_k) + j, d); },
            [&](int64_t b) {
              AttentionParams g = rp;
              g.seqlen_q = used_q[b + 1] - used_q[b];
              g.seqlen_k = clamped(cu_k, b + 1, total_k) - clamped(cu_k, b, total_k);
              g.q_offset = g.seqlen_k - g.seqlen_q;
              return g;
            },
            ref_out, ref_lse);
  cuda::attention_varlen_forward(vp, 0, nullptr);

  const double tol = c.dtype == DType::kFloat32 ? 2e-5 : c.dtype == DType::kFloat16 ? 3e-3 : 2.5e-2;
  double worst_out = 0.0, worst_lse = 0.0;
  bool nan = false, lse_inf_mismatch = false, tail_dirty = false, uncovered_not_nan = false;
  for (int64_t h = 0; h < c.heads; ++h) {
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < used_q[b + 1] - used_q[b]; ++i) {
        if (uncovered(b, i)) {  // must be NaN; then numbers, for the written-exactly checks below
          for (int64_t d = 0; d < c.head_dim; ++d) {
            uncovered_not_nan |= !std::isnan(out.at(0, h, used_q[b] + i, d));
            out.set_raw(out.index(0, h, used_q[b] + i, d), 0.0);
          }
          uncovered_not_nan |= !std::isnan(p.lse[h * lse_stride + used_q[b] + i]);
          p.lse[h * lse_stride + used_q[b] + i] = 0.0f;
          continue;
        }
        const int64_t row = (b * c.heads + h) * longest + i;
        for (int64_t d = 0; d < c.head_dim; ++d) {
          const double got = out.at(0, h, used_q[b] + i, d), want = ref_out[row * c.head_dim + d];
          if (std::isnan(got)) nan = true;
          worst_out = std::max(worst_out, std::fabs(got - want) / (1.0 + std::fabs(want)));
        }
        const double got = p.lse[h * lse_stride + used_q[b] + i], want = ref_lse[row];
        if (std::isnan(got)) nan = true;
        if (std::isinf(want) || std::isinf(got)) {
          lse_inf_mismatch |= got != want;
        } else {
          worst_lse = std::max(worst_lse, std::fabs(got - want) / (1.0 + std::fabs(want)));
        }
      }
    }
    for (int64_t r = used_q[batch]; r < total_q; ++r) {
      for (int64_t d = 0; d < c.head_dim; ++d) tail_dirty |= out.at(0, h, r, d) != 0.0;
      tail_dirty |= p.lse[h * lse_stride + r] != -kInf;
    }
  }
  bool lse_written = true;
  for (size_t e = 0; e < lse_buffer.size(); ++e) {
    const int64_t rel = static_cast<int64_t>(e) - 4;
    const bool inside = rel >= 0 && rel / lse_stride < c.heads && rel % lse_stride < total_q;
    lse_written &= inside ? !std::isnan(lse_buffer[e]) : std::isnan(lse_buffer[e]);
  }
  const char* result = nullptr;
  if (nan) result = "NaN in the output";
  else if (!out.written_exactly(total_q)) result = "out: an element unwritten, or one outside written";
  else if (!lse_written) result = "lse: an entry unwritten, or one outside written";
  else if (tail_dirty) result = "rows after the last sequence are not 0 / -inf";
  else if (uncovered_not_nan) result = "rows past the grid's q-tiles (max_seqlen_q too small) are not NaN";
  else if (lse_inf_mismatch) result = "LSE -inf where the reference is finite (or the reverse)";
  else if (worst_out > tol) result = "out error above bound";
  else if (worst_lse > 1e-4) result = "LSE error above bound";
  return report_case(c.name, worst_out, tol, worst_lse, result);
}

const char* dtype_name(DType t) { return t == DType::kFloat16 ? "fp16" : t == DType::kBFloat16 ? "bf16" : "fp32"; }

// A float mask (1, 1, 1, 3) whose last entry ends right before a page that may not be read (a
// PROT_NONE page): the forward must read no mask entry past seqlen_k, as the last key tile's
// padding columns did (a crash here, not a FAIL line). One query row sees all 3 keys.
bool run_mask_at_guard_page(DType dtype) {
  const int64_t Lk = 3, D = 64;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  char* pages = static_cast<char*>(mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  mprotect(pages + page, page, PROT_NONE);
  float* mask = reinterpret_cast<float*>(pages + page) - Lk;
  for (int64_t j = 0; j < Lk; ++j) mask[j] = 0.5f * static_cast<float>(j);
  const int size = dtype == DType::kFloat32 ? 4 : 2;
  std::vector<char> q(D * size), k(Lk * D * size), v(Lk * D * size), out(D * size);
  auto store = [&](std::vector<char>& x, int64_t i, float value) {
    const uint16_t h = dtype == DType::kFloat16 ? emu::float_to_half(value) : emu::float_to_bf16(value);
    std::memcpy(x.data() + i * size, size == 4 ? static_cast<const void*>(&value) : &h, size);
  };
  for (int64_t i = 0; i < D; ++i) store(q, i, 0.01f * static_cast<float>(i));
  for (int64_t i = 0; i < Lk * D; ++i) {
    store(k, i, 0.02f * static_cast<float>(i % 7));
    store(v, i, static_cast<float>(i / D));  // value row j holds j everywhere
  }
  AttentionParams p;
  p.dtype = dtype;
  p.batch = p.num_heads = p.num_heads_kv = p.seqlen_q = 1;
  p.seqlen_k = Lk;
  p.head_dim = D;
  p.scale = 0.125;
  p.q_offset = Lk - 1;
  p.q = p.out = TensorRef{nullptr, D, D, D};
  p.q.data = q.data();
  p.out.data = out.data();
  p.k = p.v = TensorRef{nullptr, Lk * D, Lk * D, D};
  p.k.data = k.data();
  p.v.data = v.data();
  p.mask = MaskRef{mask, MaskType::kFloat32, Lk, Lk, Lk, 1};
  cuda::attention_forward(p, 0, nullptr);
  // expected: sum_j j * softmax_j(0.125 * q.k_j + mask_j), from the same inputs in double
  double weights[Lk], total = 0.0, expected = 0.0;
  for (int64_t j = 0; j < Lk; ++j) {
    double dot = 0.0;
    for (int64_t d = 0; d < D; ++d) dot += (0.01 * d) * (0.02 * ((j * D + d) % 7));
    weights[j] = std::exp(0.125 * dot + mask[j]);
    total += weights[j];
  }
  for (int64_t j = 0; j < Lk; ++j) expected += j * weights[j] / total;
  float got = 0.0f;
  if (size == 4) std::memcpy(&got, out.data(), 4);
  else {
    uint16_t h;
    std::memcpy(&h, out.data(), 2);
    got = dtype == DType::kFloat16 ? emu::half_to_float(h) : emu::bf16_to_float(h);
  }
  munmap(pages, 2 * page);
  const double error = std::fabs(got - expected), tol = size == 4 ? 1e-5 : 3e-2;
  return report_case(std::string(dtype_name(dtype)) + " d64 float mask ending at a guard page", error, tol, 0.0,
                     error <= tol ? nullptr : "out error above bound");
}

bool run_merge(DType dtype) {
  // out = merge of two halves of a key set, compared with the forward over all keys.
  const int64_t B = 2, H = 3, L = 5, D = 40;
  Tensor a(dtype, B, H, L, D, 3, false), bb(dtype, B, H, L, D, 1, true), out(dtype, B, H, L, D, 2, false);
  a.randomize();
  bb.randomize();
  std::vector<float> lse_a(B * H * L), lse_b(B * H * L), lse(B * H * L, std::nanf(""));
  std::normal_distribution<double> normal(0.0, 2.0);
  for (size_t i = 0; i < lse_a.size(); ++i) {
    lse_a[i] = static_cast<float>(normal(g_rng));
    lse_b[i] = static_cast<float>(normal(g_rng));
  }
  lse_a[0] = lse_b[0] = -std::numeric_limits<float>::infinity();  // both empty: 0, -inf
  lse_a[1] = -std::numeric_limits<float>::infinity();               // only b
  cuda::MergeParams m;
  m.dtype = dtype;
  m.out_a = a.ref();
  m.out_b = bb.ref();
  m.out = out.ref();
  m.lse_a = cuda::LseRef{lse_a.data(), H * L, L, 1};
  m.lse_b = cuda::LseRef{lse_b.data(), H * L, L, 1};
  m.lse = cuda::LseRef{lse.data(), H * L, L, 1};
  m.batch = B;
  m.num_heads = H;
  m.seqlen = L;
  m.head_dim = D;
  cuda::merge_attention_states(m, 0, nullptr);
  double worst = 0.0, worst_lse = 0.0;
  bool ok = out.written_exactly();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < L; ++i) {
        const int64_t r = (b * H + h) * L + i;
        const double la = lse_a[r], lb = lse_b[r];
        const double top = std::max(la, lb);
        const double wa = top == -kInf ? 0 : std::exp(la - top), wb = top == -kInf ? 0 : std::exp(lb - top);
        const double want_lse = top == -kInf ? -kInf : top + std::log(wa + wb);
        if (std::isinf(want_lse)) ok &= lse[r] == want_lse;
        else worst_lse = std::max(worst_lse, std::fabs(lse[r] - want_lse));
        for (int64_t d = 0; d < D; ++d) {
          const double want = top == -kInf ? 0.0 : (wa * a.at(b, h, i, d) + wb * bb.at(b, h, i, d)) / (wa + wb);
          worst = std::max(worst, std::fabs(out.at(b, h, i, d) - want));
        }
      }
  const double tol = dtype == DType::kFloat32 ? 1e-6 : dtype == DType::kFloat16 ? 2e-3 : 1.6e-2;
  ok &= worst <= tol && worst_lse <= 1e-5;
  std::printf("%-58s out %.2e (bound %.0e)  lse %.2e  %s\n",
              (std::string("merge_attention_states ") + (dtype == DType::kFloat32 ? "fp32" : dtype == DType::kFloat16 ? "fp16" : "bf16")).c_str(),
              worst, tol, worst_lse, ok ? "PASS" : "FAIL");
  if (!ok) ++g_failures;
  return ok;
}

std::vector<Case> cases() {
  std::vector<Case> all;
  const auto add = [&](Case c, const std::string& what) {
    c.name = std::string(dtype_name(c.dtype)) + " d" + std::to_string(c.head_dim) + " " + std::to_string(c.seqlen_q) +
             "x" + std::to_string(c.seqlen_k) + " " + what;
    all.push_back(c);
  };
  // Tensor-core forward: every head-dim bucket, odd lengths, the variants.
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    Case c;
    c.dtype = t;
    c.seqlen_q = 70;
    c.seqlen_k = 133;
    add(c, "full h2kv1");
    c.causal = true;
    c.seqlen_q = c.seqlen_k = 129;
    c.heads = 1;
    add(c, "causal");
  }
  {
    Case c;
    c.head_dim = 32; c.seqlen_q = 20; c.seqlen_k = 150; c.window_left = 40; c.window_right = 3; c.heads = 1;
    add(c, "window (40,3)");
    c = Case(); c.head_dim = 96; c.dtype = DType::kBFloat16; c.alibi = true; c.softcap = 3.0f; c.causal = true;
    c.seqlen_q = 40; c.seqlen_k = 70; c.heads = 2; c.heads_kv = 2;
    add(c, "alibi softcap causal bshd"); all.back().bshd = true;
    c = Case(); c.head_dim = 128; c.seqlen_q = 33; c.seqlen_k = 77; c.mask = MaskType::kFloat32; c.heads = 1;
    add(c, "float mask");
    c = Case(); c.head_dim = 192; c.seqlen_q = 18; c.seqlen_k = 140; c.mask = MaskType::kBool; c.sinks = true;
    add(c, "bool mask (a hidden tile) + sinks");
    c = Case(); c.head_dim = 256; c.seqlen_q = 9; c.seqlen_k = 40; c.causal = true; c.sinks = true; c.heads = 1;
    add(c, "causal + sinks");
    c = Case(); c.head_dim = 64; c.seqlen_q = 30; c.seqlen_k = 50; c.dropout = 0.3f; c.heads = 1;
    add(c, "dropout 0.3");
    c = Case(); c.head_dim = 59; c.pad = 3; c.seqlen_q = 21; c.seqlen_k = 45; c.heads = 4; c.heads_kv = 2; c.causal = true;
    add(c, "unaligned (2-byte path) gqa causal");
    c = Case(); c.head_dim = 40; c.seqlen_q = 50; c.seqlen_k = 9; c.causal = true; c.heads = 1;
    add(c, "Lq > Lk causal: fully masked rows");
    c = Case(); c.head_dim = 16; c.seqlen_q = 1; c.seqlen_k = 1; c.heads = 1; c.dtype = DType::kBFloat16;
    add(c, "1x1");
    c = Case(); c.head_dim = 64; c.seqlen_q = 12; c.seqlen_k = 30; c.q_offset = 60; c.window_left = 8; c.heads = 1;
    add(c, "window past the last key: nothing visible");
  }
  // fp32 SIMT path.
  {
    Case c;
    c.dtype = DType::kFloat32; c.head_dim = 59; c.pad = 1; c.seqlen_q = 19; c.seqlen_k = 70; c.causal = true;
    c.heads = 4; c.heads_kv = 2;
    add(c, "simt causal gqa unaligned");
    c.head_dim = 256; c.alibi = true; c.softcap = 5.0f; c.sinks = true; c.mask = MaskType::kBool; c.causal = false;
    c.heads = 2; c.heads_kv = 1; c.seqlen_q = 7; c.seqlen_k = 150;
    add(c, "simt alibi softcap sinks bool mask");
    c = Case(); c.dtype = DType::kFloat32; c.head_dim = 8; c.seqlen_q = 10; c.seqlen_k = 33; c.dropout = 0.25f; c.heads = 1;
    c.mask = MaskType::kFloat32;
    add(c, "simt dropout float mask");
  }
  // KV cache / decode.
  for (DType t : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    Case c;
    c.dtype = t; c.batch = 3; c.heads = 8; c.heads_kv = 2; c.seqlen_q = 1; c.seqlen_k = 300; c.head_dim = 128;
    c.page_size = -1; c.seqlen_new = 1; c.num_splits = 3;
    add(c, "decode contiguous batch_idx, append 1, 3 splits");
    c.page_size = 16; c.num_splits = 0; c.seqlen_q = 3; c.seqlen_new = 3; c.causal = true; c.head_dim = 64;
    add(c, "decode paged 16, Lq 3 causal, heuristic splits");
    if (t == DType::kFloat32) continue;
    c.page_size = 5; c.num_splits = 2; c.seqlen_q = 2; c.seqlen_new = 0; c.causal = false; c.head_dim = 256;
    c.heads = 4; c.heads_kv = 1; c.alibi = true; c.sinks = true; c.seqlen_k = 100;
    add(c, "decode paged 5, alibi sinks, 2 splits");
    c = Case(); c.dtype = t; c.batch = 2; c.heads = 2; c.heads_kv = 2; c.seqlen_q = 1; c.seqlen_k = 70;
    c.head_dim = 40; c.page_size = -1; c.leftpad = true; c.window_left = 20; c.softcap = 4.0f; c.num_splits = 1;
    add(c, "decode leftpad window softcap, 1 split");
    c = Case(); c.dtype = t; c.batch = 2; c.heads = 6; c.heads_kv = 1; c.seqlen_q = 4; c.seqlen_k = 40;
    c.head_dim = 96; c.page_size = 1; c.causal = true; c.num_splits = 4;
    add(c, "decode page 1, 24 packed rows (2 m-tiles), 4 splits");
    c = Case(); c.dtype = t; c.batch = 1; c.heads = 2; c.heads_kv = 1; c.seqlen_q = 1; c.seqlen_k = 40;
    c.head_dim = 59; c.pad = 1; c.page_size = -1; c.num_splits = 2;
    add(c, "decode unaligned d59");
  }
  // Varlen: empty sequences (no queries, no keys), lengths 1, 17 and > block_m, tail rows
  // (longer than the grid covers, too), max_seqlen_q above the longest and below it (the rows
  // past the grid's tiles come out NaN), cu_seqlens clamped to the packed rows.
  const auto add_varlen = [&](Case c, const std::string& what) {
    c.name = std::string(dtype_name(c.dtype)) + " d" + std::to_string(c.head_dim) + " varlen " + what;
    c.varlen = true;
    all.push_back(c);
  };
  {
    Case c;
    c.lengths_q = {1, 17, 0, 150, 5};
    c.lengths_k = {3, 17, 4, 140, 0};
    c.tail = 3; c.heads = 4; c.heads_kv = 2; c.causal = true;
    add_varlen(c, "1/17/0/150/5 causal gqa, tail 3");
    c.dtype = DType::kBFloat16; c.head_dim = 128; c.causal = false; c.window_left = 8; c.window_right = 3;
    c.alibi = true; c.softcap = 4.0f; c.sinks = true; c.tail = 0;
    add_varlen(c, "window alibi(b,h) softcap sinks");
    c = Case(); c.head_dim = 32; c.lengths_q = {40, 300, 7}; c.lengths_k = {40, 310, 70}; c.causal = true;
    c.heads = 2; c.heads_kv = 1; c.max_seqlen_q = 64; c.tail = 130;
    add_varlen(c, "max_seqlen_q 64 < 300: rows past 128 NaN, tail 130");
    c = Case(); c.head_dim = 64; c.lengths_q = {33, 20}; c.lengths_k = {50, 64}; c.dropout = 0.3f; c.heads = 2;
    c.heads_kv = 2; c.causal = true; c.max_seqlen_q = 500;
    add_varlen(c, "dropout 0.3, max_seqlen_q 500");
    c = Case(); c.head_dim = 59; c.pad = 3; c.lengths_q = {21, 1}; c.lengths_k = {45, 9}; c.heads = 2; c.heads_kv = 1;
    c.tail = 2; c.overrun = true;
    add_varlen(c, "unaligned (2-byte path), cu_seqlens past the rows");
    c = Case(); c.head_dim = 16; c.tail = 5; c.heads = 1; c.heads_kv = 1;
    add_varlen(c, "no sequence, 5 tail rows");
  }
  {
    Case c;
    c.dtype = DType::kFloat32; c.head_dim = 40; c.lengths_q = {1, 17, 0, 70, 5}; c.lengths_k = {3, 17, 4, 80, 0};
    c.tail = 11; c.heads = 4; c.heads_kv = 2; c.causal = true; c.sinks = true; c.max_seqlen_q = 6;
    add_varlen(c, "simt causal gqa sinks, max_seqlen_q 6: NaN past 8, tail 11");
    c.head_dim = 8; c.causal = false; c.sinks = false; c.dropout = 0.25f; c.alibi = true; c.window_left = 5;
    c.overrun = true; c.max_seqlen_q = -1;
    add_varlen(c, "simt dropout alibi(b,h) window, cu_seqlens past the rows");
  }
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  // Four schedules; a missing wait or barrier shows up in at least one of them:
  //   cp.async completing at issue or as late as the waits allow (then unwaited data reads NaN),
  //   warps in lockstep or each run as far as it gets (then a warp refills a stage others read).
  const struct {
    bool late, greedy, reverse;
  } schedules[] = {{false, false, false}, {true, false, false}, {true, true, true}, {false, true, false}};
  for (const auto& schedule : schedules) {
    emu::options().late_cp_async = schedule.late;
    emu::options().greedy_warps = schedule.greedy;
    emu::options().reverse_schedule = schedule.reverse;
    std::printf("-- cp.async %s, warps %s\n", schedule.late ? "late" : "at issue",
                !schedule.greedy ? "in lockstep" : schedule.reverse ? "one at a time, last first" : "one at a time");
    for (const Case& c : cases()) {
      if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
      if (c.varlen) run_varlen(c);
      else run(c);
    }
    if (filter.empty() || std::string("merge").find(filter) != std::string::npos) {
      for (DType t : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) run_merge(t);
    }
    if (filter.empty() || std::string("guard page").find(filter) != std::string::npos) {
      for (DType t : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) run_mask_at_guard_page(t);
    }
  }
  std::printf("%s: %d failure(s), %llu blocks emulated\n", g_failures ? "FAILED" : "OK", g_failures,
              static_cast<unsigned long long>(emu::launched_blocks()));
  return g_failures ? 1 : 0;
}
