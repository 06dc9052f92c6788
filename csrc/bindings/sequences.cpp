// See sequences.h. The index arrays are read here on the host (they are small: one entry per
// sequence or page) to check every bound before a kernel uses them.
#include "bindings/sequences.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "bindings/validate.h"
#include "common/kv_layout.h"

namespace py = pybind11;

namespace fusedattn {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// The int32 array `view` of `rank` dims, copied into `copies` (see IndexCopies).
const int32_t* int32_vector(const TensorView& view, int64_t rank, const std::string& shape, IndexCopies& copies) {
  if (view.dtype.code != dlpack::kInt || view.dtype.bits != 32 || view.dtype.lanes != 1) {
    throw py::type_error(view.name + " must be int32, got " + view.dtype_string());
  }
  if (view.ndim() != rank) fail(view.name + " must have shape " + shape + ", got " + view.shape_string());
  if (view.device.device_type != dlpack::kCPU && view.device.device_type != dlpack::kCUDAHost) {
    fail(view.name + " must be a CPU array, got one on " + view.device_string());
  }
  if (!view.is_contiguous()) fail(view.name + " must be contiguous");
  const int32_t* data = static_cast<const int32_t*>(view.data);
  int64_t count = 1;
  for (const int64_t n : view.shape) count *= n;
  copies.emplace_back(data, data + count);
  return copies.back().data();
}

// k_new and v_new, when given: both (batch, new_tokens, kv_heads, head_dim) of the cache's dtype,
// on the CPU. Returns new_tokens (0 without them).
int64_t check_new_entries(const AttentionParams& params, const KvCacheViews& views) {
  if (!views.k_new || !views.v_new) {
    if (views.k_new || views.v_new) fail("pass both k and v (new entries), or neither");
    return 0;
  }
  const TensorView& k = *views.k_new;
  const TensorView& v = *views.v_new;
  for (const TensorView* view : {&k, &v}) {
    if (view->ndim() != 4 || view->shape != k.shape || k.shape[0] != params.batch ||
        k.shape[2] != params.num_heads_kv || k.shape[3] != params.head_dim) {
      fail("k and v must have shape (" + std::to_string(params.batch) + ", seqlen_new, " +
           std::to_string(params.num_heads_kv) + ", " + std::to_string(params.head_dim) + "), got " +
           k.shape_string() + " and " + v.shape_string());
    }
    if (kernel_dtype(*view) != params.dtype) {
      throw py::type_error("k and v must have the cache's dtype, got " + view->dtype_string() + " for " + view->name);
    }
    if (view->device.device_type != dlpack::kCPU && view->device.device_type != dlpack::kCUDAHost) {
      fail(view->name + " must be a CPU array, got one on " + view->device_string());
    }
  }
  return k.shape[1];
}

// Head h of token t of sequence b in new entries `view` (batch, new_tokens, kv_heads, d).
const char* entry_row(const TensorView& view, int64_t b, int64_t t, int64_t h, int64_t element) {
  const int64_t offset = b * view.strides[0] + t * view.strides[1] + h * view.strides[2];
  return static_cast<const char*>(view.data) + offset * element;
}

// Copies `count` elements, `stride` elements apart in `from`, to consecutive ones at `to`.
void copy_row(char* to, const char* from, int64_t stride, int64_t count, int64_t element) {
  if (stride == 1) {
    std::memcpy(to, from, count * element);
  } else {
    for (int64_t d = 0; d < count; ++d) std::memcpy(to + d * element, from + d * stride * element, element);
  }
}

// Whether the memory a and b span (from their lowest to their highest element) overlaps.
bool overlaps(const TensorView& a, const TensorView& b, int64_t element) {
  auto span = [element](const TensorView& view) -> std::pair<const char*, const char*> {
    const char* low = static_cast<const char*>(view.data);
    const char* high = low + element;
    for (int64_t i = 0; i < view.ndim(); ++i) {
      if (view.shape[i] == 0) return {low, low};  // (no elements)
      const int64_t reach = (view.shape[i] - 1) * view.strides[i] * element;
      (reach < 0 ? low : high) += reach;
    }
    return {low, high};
  };
  const auto [a_low, a_high] = span(a);
  const auto [b_low, b_high] = span(b);
  return a_low < a_high && b_low < b_high && a_low < b_high && b_low < a_high;
}

}  // namespace

void apply_varlen(AttentionParams& params, const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k,
                  IndexCopies& copies) {
  const int32_t* cu_q = int32_vector(cu_seqlens_q, 1, "(batch + 1,)", copies);
  const int32_t* cu_k = int32_vector(cu_seqlens_k, 1, "(batch + 1,)", copies);
  if (cu_seqlens_q.shape[0] < 1 || cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]) {
    fail("cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 1 entries, got " + cu_seqlens_q.shape_string() +
         " and " + cu_seqlens_k.shape_string());
  }
  const int64_t batch = cu_seqlens_q.shape[0] - 1;
  int64_t max_q = 0, max_k = 0;
  for (const auto& [cu, total, name, max_len] :
       {std::tuple{cu_q, params.seqlen_q, cu_seqlens_q.name, &max_q}, std::tuple{cu_k, params.seqlen_k, cu_seqlens_k.name, &max_k}}) {
    if (cu[0] != 0) fail(name + "[0] must be 0, got " + std::to_string(cu[0]));
    for (int64_t b = 0; b < batch; ++b) {
      if (cu[b + 1] < cu[b]) fail(name + " must be non-decreasing, but entry " + std::to_string(b + 1) + " < entry " + std::to_string(b));
      *max_len = std::max<int64_t>(*max_len, cu[b + 1] - cu[b]);
    }
    if (cu[batch] > total) {
      fail(name + " ends at " + std::to_string(cu[batch]) + ", beyond the " + std::to_string(total) + " packed rows");
    }
  }
  params.batch = batch;
  params.seqlen_q = max_q;
  params.seqlen_k = max_k;
  params.sequences.cu_seqlens_q = cu_q;
  params.sequences.cu_seqlens_k = cu_k;
  for (TensorRef* t : {&params.q, &params.k, &params.v, &params.out}) t->batch_stride = 0;
}

void apply_kvcache(AttentionParams& params, const KvCacheViews& views, int64_t cache_rows, IndexCopies& copies) {
  const int64_t batch = params.batch;
  const std::string batch_shape = "(" + std::to_string(batch) + ",)";
  const int64_t new_tokens = check_new_entries(params, views);
  const int32_t* given = int32_vector(views.cache_seqlens, 1, batch_shape, copies);
  if (views.cache_seqlens.shape[0] != batch) fail("cache_seqlens must have shape " + batch_shape);
  int64_t capacity = params.seqlen_k;  // cache length S_max, or page_size when paged
  SequenceLayout& s = params.sequences;
  if (views.block_table) {
    const TensorView& table = *views.block_table;
    s.block_table = int32_vector(table, 2, "(batch, max_pages)", copies);
    if (table.shape[0] != batch) fail("block_table must have " + std::to_string(batch) + " rows, got " + table.shape_string());
    s.block_table_stride = table.shape[1];
    s.page_size = params.seqlen_k;
    check_page_size(s.page_size);
    capacity = table.shape[1] * s.page_size;
    if (views.cache_batch_idx) fail("cache_batch_idx cannot be combined with a paged cache (block_table)");
    if (views.cache_leftpad) fail("cache_leftpad cannot be combined with a paged cache (block_table)");
  }
  if (views.cache_batch_idx) {
    s.cache_batch_idx = int32_vector(*views.cache_batch_idx, 1, batch_shape, copies);
    if (views.cache_batch_idx->shape[0] != batch) fail("cache_batch_idx must have shape " + batch_shape);
    for (int64_t b = 0; b < batch; ++b) {
      if (s.cache_batch_idx[b] < 0 || s.cache_batch_idx[b] >= cache_rows) {
        fail("cache_batch_idx[" + std::to_string(b) + "] = " + std::to_string(s.cache_batch_idx[b]) +
             " is outside the cache's " + std::to_string(cache_rows) + " rows");
      }
    }
  } else if (!views.block_table && cache_rows < batch) {
    fail("the cache has " + std::to_string(cache_rows) + " rows but q has batch " + std::to_string(batch));
  }
  if (views.cache_leftpad) {
    s.k_begin = int32_vector(*views.cache_leftpad, 1, batch_shape, copies);
    if (views.cache_leftpad->shape[0] != batch) fail("cache_leftpad must have shape " + batch_shape);
  }
  // The keys of each sequence after the append (the given lengths where nothing is appended).
  const int64_t keys_limit = std::min<int64_t>(capacity, std::numeric_limits<int32_t>::max());  // (int32 lengths)
  for (int64_t b = 0; b < batch; ++b) {
    if (given[b] < 0 || given[b] > keys_limit - new_tokens) {
      fail("cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(given[b]) +
           (new_tokens > 0 ? " + " + std::to_string(new_tokens) + " new tokens" : std::string()) +
           " must stay within the cache capacity " + std::to_string(keys_limit));
    }
  }
  copies.emplace_back(given, given + batch);
  for (int32_t& keys : copies.back()) keys = static_cast<int32_t>(keys + new_tokens);  // (fits: <= keys_limit)
  const int32_t* seqlens = copies.back().data();
  s.seqlens_k = seqlens;
  int64_t max_k = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t begin = s.k_begin != nullptr ? s.k_begin[b] : 0;
    if (begin < 0 || begin > seqlens[b]) {
      fail("cache_leftpad[" + std::to_string(b) + "] = " + std::to_string(begin) + " must be in [0, cache_seqlens[b]" +
           (new_tokens > 0 ? " + " + std::to_string(new_tokens) : std::string()) + "]");
    }
    if (s.block_table != nullptr) {
      const int64_t pages = (seqlens[b] + s.page_size - 1) / s.page_size;
      for (int64_t i = 0; i < pages; ++i) {
        const int32_t page = s.block_table[b * s.block_table_stride + i];
        if (page < 0 || page >= cache_rows) {
          fail("block_table[" + std::to_string(b) + ", " + std::to_string(i) + "] = " + std::to_string(page) +
               " is outside the cache's " + std::to_string(cache_rows) + " pages");
        }
      }
    }
    max_k = std::max<int64_t>(max_k, seqlens[b] - begin);
  }
  params.seqlen_k = max_k;
}

void append_to_cache(const AttentionParams& params, const KvCacheViews& views, const TensorView& k_cache,
                     const TensorView& v_cache) {
  if (!views.k_new) return;
  for (const TensorView* cache : {&k_cache, &v_cache}) {
    if (cache->read_only) fail(cache->name + " is read-only; the new k, v are written into it");
  }
  const SequenceLayout& s = params.sequences;
  const int64_t new_tokens = views.k_new->shape[1], element = dtype_size(params.dtype);
  // New entries that share memory with a cache (a view of it) are copied out first, so that no
  // slot is read after this call has written it.
  std::vector<char> staged[2];
  TensorView sources[2] = {*views.k_new, *views.v_new};
  for (int i = 0; i < 2; ++i) {
    if (!overlaps(sources[i], k_cache, element) && !overlaps(sources[i], v_cache, element)) continue;
    const std::vector<int64_t>& shape = sources[i].shape;
    staged[i].resize(static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3] * element));
    char* to = staged[i].data();
    for (int64_t b = 0; b < shape[0]; ++b) {
      for (int64_t t = 0; t < shape[1]; ++t) {
        for (int64_t h = 0; h < shape[2]; ++h, to += shape[3] * element) {
          copy_row(to, entry_row(sources[i], b, t, h, element), sources[i].strides[3], shape[3], element);
        }
      }
    }
    sources[i].data = staged[i].data();
    sources[i].strides = {shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1};
  }
  // The slots the kernels read the keys from (kv_row_offset, as they do: the block table row of
  // sequence b, else its cache row).
  for (const auto& [cache, added] : {std::pair{&params.k, &sources[0]}, std::pair{&params.v, &sources[1]}}) {
    for (int64_t b = 0; b < params.batch; ++b) {
      const int64_t row = s.block_table == nullptr && s.cache_batch_idx != nullptr ? s.cache_batch_idx[b] : b;
      for (int64_t t = 0; t < new_tokens; ++t) {
        const int64_t key = s.seqlens_k[b] - new_tokens + t;
        for (int64_t h = 0; h < params.num_heads_kv; ++h) {
          char* to = static_cast<char*>(cache->data) + kv_row_offset(params, *cache, row, h, key) * element;
          copy_row(to, entry_row(*added, b, t, h, element), added->strides[3], params.head_dim, element);
        }
      }
    }
  }
}

}  // namespace fusedattn
