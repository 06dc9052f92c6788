// Entry points of the CUDA backend (attention_cuda.h): dtype dispatch, the 16-byte alignment
// test that picks the cp.async path, the split-KV heuristic and its workspace, the launchers of
// the kernels that are not templated on the head dim, and the runtime helpers of launch.cuh.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/attention_cuda.h"
#include "cuda/launch.cuh"
#include "cuda/launchers.h"
#include "cuda/simt_kernel.cuh"
#include "cuda/state_kernels.cuh"
#include "cuda/tile_config.h"

namespace fusedattn {
namespace cuda {
namespace {

// Every row of a (batch, heads, rows, head_dim) 16-bit view starts on a 16-byte boundary: the
// pointer is aligned and the strides of the dims that are walked are multiples of 8 elements.
bool rows_aligned(const TensorRef& t, int64_t batch, int64_t heads, int64_t rows) {
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  const auto ok = [](int64_t size, int64_t stride) { return size <= 1 || stride % 8 == 0; };
  return ok(batch, t.batch_stride) && ok(heads, t.head_stride) && ok(rows, t.row_stride);
}

bool forward_aligned(const AttentionParams& p) {
  return p.head_dim % 8 == 0 && rows_aligned(p.q, p.batch, p.num_heads, p.seqlen_q) &&
         rows_aligned(p.out, p.batch, p.num_heads, p.seqlen_q) &&
         rows_aligned(p.k, p.batch, p.num_heads_kv, p.seqlen_k) && rows_aligned(p.v, p.batch, p.num_heads_kv, p.seqlen_k);
}

bool kvcache_aligned(const KVCacheParams& c) {
  const AttentionParams& p = c.attn;
  // Cache rows: rows (or pages), heads and slots are all walked.
  const int64_t slots = p.sequences.block_table != nullptr ? p.sequences.page_size : c.capacity;
  return p.head_dim % 8 == 0 && rows_aligned(p.q, p.batch, p.num_heads, p.seqlen_q) &&
         rows_aligned(p.k, c.cache_rows, p.num_heads_kv, slots) && rows_aligned(p.v, c.cache_rows, p.num_heads_kv, slots);
}

[[noreturn]] void unsupported_dtype(const char* what) {
  throw std::invalid_argument(std::string(what) + ": the CUDA kernels take float16, bfloat16 or float32 (float64 is CPU-only)");
}

// FlashAttention-2's split heuristic: with `blocks` thread blocks and `slots` of them
// resident at once (2 per SM), pick the smallest split count whose wave efficiency
// (waves / ceil(waves)) is within 85% of the best, among counts that change the tiles per split.
int num_splits_heuristic(int64_t blocks, int64_t slots, int64_t tiles, int max_splits) {
  if (blocks >= slots * 4 / 5) return 1;  // already ~a full wave
  const int64_t limit = std::min<int64_t>({max_splits, slots, tiles});
  if (limit <= 1) return 1;
  const auto efficiency = [&](int64_t splits) {
    const double waves = static_cast<double>(blocks * splits) / static_cast<double>(slots);
    return waves / std::ceil(waves);
  };
  const auto eligible = [&](int64_t splits) {
    return splits == 1 || (tiles + splits - 1) / splits != (tiles + splits - 2) / (splits - 1);
  };
  double best = 0.0;
  for (int64_t s = 1; s <= limit; ++s) {
    if (eligible(s)) best = std::max(best, efficiency(s));
  }
  for (int64_t s = 1; s <= limit; ++s) {
    if (eligible(s) && efficiency(s) >= 0.85 * best) return static_cast<int>(s);
  }
  return 1;
}

int64_t decode_m_tiles(const AttentionParams& p) {
  const int64_t packed_rows = p.num_heads / p.num_heads_kv * p.seqlen_q;
  return (packed_rows + kDecodeRows - 1) / kDecodeRows;
}

// The SIMT kernel over max_seqlen_q rows per (sequence, head), plus a varlen call's tail sequence.
void launch_simt(SimtArgs args, int64_t max_seqlen_q, void* stream) {
  const AttentionParams& p = args.params;
  args.row_blocks = std::max<int64_t>(1, (max_seqlen_q + kSimtWarps - 1) / kSimtWarps);
  const int64_t sequences = p.batch + (p.sequences.cu_seqlens_q != nullptr ? 1 : 0);
  launch(simt_kernel, KernelName{args.kv_cache ? "kvcache_simt" : "forward_simt", Fp32::kName, 0},
         args.row_blocks * p.num_heads * sequences, 32 * kSimtWarps, kSimtSmemBytes, stream, args);
}

}  // namespace

// ---- Forward -----------------------------------------------------------------------------

void attention_forward(const AttentionParams& p, int device, void* stream) {
  if (p.batch == 0 || p.num_heads == 0 || p.seqlen_q == 0) return;
  DeviceGuard guard(device);
  switch (p.dtype) {
    case DType::kFloat16: return launch_forward<Fp16>(p, p.seqlen_q, forward_aligned(p), stream);
    case DType::kBFloat16: return launch_forward<Bf16>(p, p.seqlen_q, forward_aligned(p), stream);
    case DType::kFloat32: return launch_simt(SimtArgs{p, false, 0, 0, 0}, p.seqlen_q, stream);
    default: unsupported_dtype("attention_forward");
  }
}

void attention_varlen_forward(const VarlenParams& v, int device, void* stream) {
  const AttentionParams& p = v.attn;
  if (p.num_heads == 0 || p.seqlen_q == 0) return;  // no packed query rows
  DeviceGuard guard(device);
  // Alignment is judged on the packed views: every row of q/out (k/v) is walked.
  switch (p.dtype) {
    case DType::kFloat16: return launch_forward<Fp16>(p, v.max_seqlen_q, forward_aligned(p), stream);
    case DType::kBFloat16: return launch_forward<Bf16>(p, v.max_seqlen_q, forward_aligned(p), stream);
    case DType::kFloat32: return launch_simt(SimtArgs{p, false, 0, 0, 0}, v.max_seqlen_q, stream);
    default: unsupported_dtype("attention_varlen_forward");
  }
}

// ---- KV cache -----------------------------------------------------------------------------

int kvcache_num_splits(const KVCacheParams& c, int device) {
  const AttentionParams& p = c.attn;
  if (p.dtype == DType::kFloat32) return 1;  // the SIMT path does not split
  if (c.num_splits > 0) return std::min(c.num_splits, kMaxSplits);
  DeviceGuard guard(device);
  const int64_t block_n = 16 * decode_tile(head_dim_bucket(static_cast<int>(p.head_dim))).warps;
  const int64_t tiles = (c.capacity + block_n - 1) / block_n;
  return num_splits_heuristic(p.batch * p.num_heads_kv * decode_m_tiles(p), 2 * multiprocessor_count(), tiles,
                              kMaxSplits);
}

void attention_kvcache_forward(const KVCacheParams& c, int device, void* stream) {
  const AttentionParams& p = c.attn;
  if (p.batch == 0 || p.num_heads == 0 || p.seqlen_q == 0) return;
  DeviceGuard guard(device);
  if (p.dtype == DType::kFloat32) {
    return launch_simt(SimtArgs{p, true, c.cache_rows, c.capacity, 0}, p.seqlen_q, stream);
  }
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) unsupported_dtype("attention_kvcache_forward");

  DecodeArgs args{p, c.cache_rows, c.capacity, kvcache_num_splits(c, device), static_cast<int>(decode_m_tiles(p)),
                  kvcache_aligned(c), nullptr, nullptr};
  const bool fp16 = p.dtype == DType::kFloat16;
  if (args.num_splits == 1) return fp16 ? launch_decode<Fp16>(args, stream) : launch_decode<Bf16>(args, stream);

  // Several splits: partial results in a stream-ordered fp32 workspace, then combine.
  const int64_t rows = args.num_splits * p.batch * p.num_heads * p.seqlen_q;
  const size_t bytes = static_cast<size_t>(rows) * (p.head_dim + 1) * sizeof(float);
  float* workspace = static_cast<float*>(allocate_async(bytes, stream, "split-KV workspace"));
  args.out_partial = workspace;
  args.lse_partial = workspace + rows * p.head_dim;
  const CombineArgs combine{p, args.num_splits, args.out_partial, args.lse_partial};
  try {
    if (fp16) {
      launch_decode<Fp16>(args, stream);
      launch_combine<Fp16>(combine, stream);
    } else {
      launch_decode<Bf16>(args, stream);
      launch_combine<Bf16>(combine, stream);
    }
  } catch (...) {
    free_async(workspace, stream);
    throw;
  }
  free_async(workspace, stream);
}

void kvcache_append(const AppendParams& a, int device, void* stream) {
  const int64_t rows = a.batch * a.seqlen_new * a.num_heads_kv;
  if (rows == 0) return;
  DeviceGuard guard(device);
  const int64_t blocks = (rows + kRowWarps - 1) / kRowWarps;
  switch (a.dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return launch(append_kernel<uint16_t>, KernelName{"kvcache_append", "16-bit", 0}, blocks, 32 * kRowWarps, 0,
                    stream, a);
    case DType::kFloat32:
      return launch(append_kernel<float>, KernelName{"kvcache_append", Fp32::kName, 0}, blocks, 32 * kRowWarps, 0,
                    stream, a);
    default: unsupported_dtype("kvcache_append");
  }
}

// ---- merge_attention_states ----------------------------------------------------------------

void merge_attention_states(const MergeParams& m, int device, void* stream) {
  const int64_t rows = m.batch * m.num_heads * m.seqlen;
  if (rows == 0) return;
  DeviceGuard guard(device);
  const int64_t blocks = (rows + kRowWarps - 1) / kRowWarps;
  switch (m.dtype) {
    case DType::kFloat16:
      return launch(merge_kernel<Fp16>, KernelName{"merge_attention_states", Fp16::kName, 0}, blocks, 32 * kRowWarps,
                    0, stream, m);
    case DType::kBFloat16:
      return launch(merge_kernel<Bf16>, KernelName{"merge_attention_states", Bf16::kName, 0}, blocks, 32 * kRowWarps,
                    0, stream, m);
    case DType::kFloat32:
      return launch(merge_kernel<Fp32>, KernelName{"merge_attention_states", Fp32::kName, 0}, blocks, 32 * kRowWarps,
                    0, stream, m);
    default: unsupported_dtype("merge_attention_states");
  }
}

// ---- Runtime helpers (launch.cuh) ------------------------------------------------------------

#if defined(FUSEDATTN_CUDA_EMULATION)

int multiprocessor_count() { return emu::options().multiprocessors; }
void* allocate_async(size_t bytes, void*, const char*) { return ::operator new(bytes); }
void free_async(void* pointer, void*) { ::operator delete(pointer); }
DeviceGuard::DeviceGuard(int) {}
DeviceGuard::~DeviceGuard() {}

#else

int multiprocessor_count() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  if (device < kMaxDevices && counts[device] > 0) return counts[device];
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  if (device < kMaxDevices) counts[device] = count;
  return count;
}

void* allocate_async(size_t bytes, void* stream, const char* what) {
  void* pointer = nullptr;
  check_cuda(cudaMallocAsync(&pointer, bytes, static_cast<cudaStream_t>(stream)),
             std::string("cudaMallocAsync(") + std::to_string(bytes) + " bytes, " + what + ")");
  return pointer;
}

void free_async(void* pointer, void* stream) { cudaFreeAsync(pointer, static_cast<cudaStream_t>(stream)); }

DeviceGuard::DeviceGuard(int device) {
  check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  } else {
    previous_ = -1;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

#endif

}  // namespace cuda
}  // namespace fusedattn
