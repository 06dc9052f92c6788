// fusedattn._cuda: the private CUDA extension, built only when nvcc is found. Importing it
// needs no GPU (cudart is linked statically); device_count() is 0 without a driver or GPU.
//
// Every kernel entry takes DLPack/torch views (validated by the same code as the CPU module:
// bindings/validate.cpp, after checking that all arrays sit on one CUDA device), a `stream`
// (cudaStream_t as an int, e.g. torch.cuda.current_stream().cuda_stream) and runs
// asynchronously on it with the GIL released. Launch errors raise CudaError naming the kernel.
// Signatures: docs/cuda.md.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/tensor_view.h"
#include "bindings/validate.h"
#include "cuda/attention_cuda.h"
#include "cuda/device_probe.h"
#include "cuda/tile_config.h"

namespace py = pybind11;
using namespace fusedattn;

namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

bool on_cuda(const TensorView& view) {
  return view.device.device_type == dlpack::kCUDA || view.device.device_type == dlpack::kCUDAManaged;
}

// The CUDA device all `views` live on; ValueError naming the first array that is elsewhere.
int cuda_device(const std::vector<const TensorView*>& views) {
  const TensorView* first = views.front();
  for (const TensorView* view : views) {
    if (!on_cuda(*view)) {
      fail(view->name + " is on " + view->device_string() + "; the CUDA kernels need CUDA arrays" +
           (view == first || !on_cuda(*first) ? "" : " (" + first->name + " is on " + first->device_string() + ")"));
    }
    if (view->device.device_id != first->device.device_id) {
      fail(view->name + " is on " + view->device_string() + " but " + first->name + " is on " + first->device_string() +
           "; all arrays must be on one GPU");
    }
  }
  return first->device.device_id;
}

// The shared validation (validate.cpp) checks shapes, dtypes and strides for CPU arrays; once
// cuda_device() has placed every array on one GPU, views are handed to it labelled as host
// memory (it reads no data, only the descriptions).
void label_as_host(TensorView& view) { view.device = {dlpack::kCPU, 0}; }

void label_as_host(ForwardViews& views) {
  for (TensorView* view : {&views.q, &views.k, &views.v, &views.out}) label_as_host(*view);
  for (std::optional<TensorView>* view : {&views.lse, &views.mask, &views.alibi_slopes, &views.sinks}) {
    if (*view) label_as_host(**view);
  }
}

int forward_device(const ForwardViews& views) {
  std::vector<const TensorView*> all{&views.q, &views.k, &views.v, &views.out};
  for (const std::optional<TensorView>* view : {&views.lse, &views.mask, &views.alibi_slopes, &views.sinks}) {
    if (*view) all.push_back(&**view);
  }
  return cuda_device(all);
}

void check_gpu_dtype(const AttentionParams& params, const TensorView& q) {
  if (params.dtype == DType::kFloat64) {
    throw py::type_error(q.name + " is float64; the CUDA kernels take float16, bfloat16 or float32 (float64 runs on the CPU)");
  }
}

void* stream_pointer(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// An int32 index array on `device`: rank and shape checked, innermost dim contiguous.
const int32_t* int32_array(const TensorView& view, const std::vector<int64_t>& shape, const std::string& expected,
                           int device, int64_t* row_stride = nullptr) {
  if (view.dtype.code != dlpack::kInt || view.dtype.bits != 32 || view.dtype.lanes != 1) {
    throw py::type_error(view.name + " must be int32, got " + view.dtype_string());
  }
  if (view.shape != shape) fail(view.name + " must have shape " + expected + ", got " + view.shape_string());
  if (!on_cuda(view) || view.device.device_id != device) {
    fail(view.name + " is on " + view.device_string() + "; it must be on the GPU of the other arrays (cuda:" +
         std::to_string(device) + ")");
  }
  if (shape.back() > 1 && view.strides.back() != 1) fail(view.name + " must be contiguous in its last dim");
  if (row_stride != nullptr) *row_stride = view.strides[0];
  return static_cast<const int32_t*>(view.data);
}

std::string shape_text(std::initializer_list<int64_t> dims) {
  std::string s = "(";
  for (const int64_t d : dims) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// ---- Entry points ---------------------------------------------------------------------------

// q, k, v, out: (batch, heads, seqlen, head_dim) views; lse: None or float32 (batch, heads,
// seqlen_q); variant: validate.h's tuple; names: the caller's names for q, k, v.
void attention_forward(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                       const py::tuple& variant, uintptr_t stream,
                       const std::tuple<std::string, std::string, std::string>& names) {
  ForwardViews views{view_array(q, std::get<0>(names)), view_array(k, std::get<1>(names)),
                     view_array(v, std::get<2>(names)), view_array(out, "out")};
  if (!lse.is_none()) views.lse = view_array(lse, "lse");
  const ForwardOptions options = parse_variant(variant, views);
  const int device = forward_device(views);
  const TensorView q_view = views.q;
  label_as_host(views);
  const AttentionParams params = make_forward_params(views, options);
  check_gpu_dtype(params, q_view);
  py::gil_scoped_release release;
  cuda::attention_forward(params, device, stream_pointer(stream));
}

// Packed variable-length batches: q, k, v, out the packed (total, heads, head_dim) arrays viewed
// as (1, heads, total, head_dim); lse None or float32 (1, heads, total_q); cu_seqlens_q/k int32
// (batch + 1,) on the same GPU, read by the kernels (no host sync; their values are not checked
// here, the kernels clamp them to the packed rows); max_seqlen_q sizes the grid. variant: as
// attention_forward with no attn_mask (q_offset is ignored: each sequence is bottom-right).
void attention_varlen_forward(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                              py::handle cu_seqlens_q, py::handle cu_seqlens_k, int64_t max_seqlen_q,
                              const py::tuple& variant, uintptr_t stream,
                              const std::tuple<std::string, std::string, std::string>& names) {
  ForwardViews views{view_array(q, std::get<0>(names)), view_array(k, std::get<1>(names)),
                     view_array(v, std::get<2>(names)), view_array(out, "out")};
  if (!lse.is_none()) views.lse = view_array(lse, "lse");
  const TensorView cu_q = view_array(cu_seqlens_q, "cu_seqlens_q"), cu_k = view_array(cu_seqlens_k, "cu_seqlens_k");
  if (cu_q.ndim() != 1 || cu_q.shape[0] < 1) {
    fail("cu_seqlens_q must have shape (batch + 1,), got " + cu_q.shape_string());
  }
  const int64_t batch = cu_q.shape[0] - 1;
  views.sequence_count = batch;  // rows of (batch, heads) alibi_slopes
  const ForwardOptions options = parse_variant(variant, views);
  if (views.mask) fail("attn_mask is not supported with variable-length batches");
  if (max_seqlen_q < 0) fail("max_seqlen_q must be >= 0, got " + std::to_string(max_seqlen_q));
  const int device = forward_device(views);
  const TensorView q_view = views.q;
  label_as_host(views);
  cuda::VarlenParams varlen;
  varlen.attn = make_forward_params(views, options);
  check_gpu_dtype(varlen.attn, q_view);
  AttentionParams& p = varlen.attn;
  if (p.batch != 1) {
    fail(q_view.name + " must be the packed (total, heads, head_dim) array viewed as (1, heads, total, head_dim), "
         "got " + q_view.shape_string());
  }
  const std::string cu_shape = shape_text({batch + 1});
  p.sequences.cu_seqlens_q = int32_array(cu_q, {batch + 1}, cu_shape, device);
  p.sequences.cu_seqlens_k = int32_array(cu_k, {batch + 1}, cu_shape, device);
  p.batch = batch;
  for (TensorRef* t : {&p.q, &p.k, &p.v, &p.out}) t->batch_stride = 0;
  p.lse_batch_stride = 0;
  varlen.max_seqlen_q = max_seqlen_q;
  py::gil_scoped_release release;
  cuda::attention_varlen_forward(varlen, device, stream_pointer(stream));
}

// Attention over a KV cache (decode, chunked prefill), as _C.attention_kvcache_forward: q, out
// (batch, heads, seqlen_q, head_dim); k_cache, v_cache viewed as (rows or pages, heads_kv,
// max_seqlen or page_size, head_dim); cache_seqlens int32 (batch,) keys per sequence (new
// tokens included); block_table int32 (batch, max_pages) or None; cache_batch_idx and
// cache_leftpad int32 (batch,) or None (contiguous cache only). All on the GPU. num_splits: 0
// = heuristic. variant: validate.h's tuple with no attn_mask and dropout_p 0 (q_offset is
// ignored: queries sit at the last positions of each sequence).
void attention_kvcache_forward(py::handle q, py::handle k_cache, py::handle v_cache, py::handle out, py::handle lse,
                               py::handle cache_seqlens, py::handle block_table, py::handle cache_batch_idx,
                               py::handle cache_leftpad, const py::tuple& variant, int num_splits, uintptr_t stream) {
  ForwardViews views{view_array(q, "q"), view_array(k_cache, "k_cache"), view_array(v_cache, "v_cache"),
                     view_array(out, "out")};
  if (!lse.is_none()) views.lse = view_array(lse, "lse");
  views.kv_is_cache = true;
  const ForwardOptions options = parse_variant(variant, views);
  if (views.mask) fail("attn_mask is not supported with a KV cache");
  if (options.dropout_p != 0.0) fail("dropout is not supported with a KV cache (inference only)");
  if (num_splits < 0 || num_splits > cuda::kMaxSplits) {
    fail("num_splits must be 0 (heuristic) or 1.." + std::to_string(cuda::kMaxSplits) + ", got " + std::to_string(num_splits));
  }
  const int device = forward_device(views);
  const TensorView q_view = views.q;
  const int64_t cache_rows = views.k.shape[0];
  label_as_host(views);
  cuda::KVCacheParams kv;
  kv.attn = make_forward_params(views, options);
  check_gpu_dtype(kv.attn, q_view);
  AttentionParams& p = kv.attn;
  const std::string batch_shape = shape_text({p.batch});
  SequenceLayout& s = p.sequences;
  s.seqlens_k = int32_array(view_array(cache_seqlens, "cache_seqlens"), {p.batch}, batch_shape, device);
  kv.cache_rows = cache_rows;
  kv.capacity = p.seqlen_k;  // max_seqlen, or page_size when paged
  if (!block_table.is_none()) {
    const TensorView table = view_array(block_table, "block_table");
    if (table.ndim() != 2 || table.shape[0] != p.batch) {
      fail("block_table must have shape (" + std::to_string(p.batch) + ", max_pages), got " + table.shape_string());
    }
    s.block_table = int32_array(table, table.shape, "(batch, max_pages)", device, &s.block_table_stride);
    s.page_size = p.seqlen_k;
    check_page_size(s.page_size);
    kv.capacity = table.shape[1] * s.page_size;
    if (!cache_batch_idx.is_none()) fail("cache_batch_idx cannot be combined with a paged cache (block_table)");
    if (!cache_leftpad.is_none()) fail("cache_leftpad cannot be combined with a paged cache (block_table)");
  } else if (cache_batch_idx.is_none() && cache_rows < p.batch) {
    fail("the cache has " + std::to_string(cache_rows) + " rows but q has batch " + std::to_string(p.batch));
  }
  if (!cache_batch_idx.is_none()) {
    s.cache_batch_idx = int32_array(view_array(cache_batch_idx, "cache_batch_idx"), {p.batch}, batch_shape, device);
  }
  if (!cache_leftpad.is_none()) {
    s.k_begin = int32_array(view_array(cache_leftpad, "cache_leftpad"), {p.batch}, batch_shape, device);
  }
  p.seqlen_k = kv.capacity;
  kv.num_splits = num_splits;
  py::gil_scoped_release release;
  cuda::attention_kvcache_forward(kv, device, stream_pointer(stream));
}

// Writes k_new, v_new (batch, heads_kv, seqlen_new, head_dim) views into the cache views
// (rows or pages, heads_kv, max_seqlen or page_size, head_dim) at slots cache_seqlens[b] + t;
// block_table / cache_batch_idx as in attention_kvcache_forward.
void kvcache_append(py::handle k_cache, py::handle v_cache, py::handle k_new, py::handle v_new,
                    py::handle cache_seqlens, py::handle block_table, py::handle cache_batch_idx, uintptr_t stream) {
  const TensorView kc = view_array(k_cache, "k_cache"), vc = view_array(v_cache, "v_cache");
  const TensorView kn = view_array(k_new, "k"), vn = view_array(v_new, "v");
  for (const TensorView* view : {&kc, &vc, &kn, &vn}) {
    if (view->ndim() != 4) fail(view->name + " must be 4-D, got shape " + view->shape_string());
    if (view->shape[3] > 1 && view->strides[3] != 1) fail(view->name + " must be contiguous in its last dim");
    if (kernel_dtype(*view) != kernel_dtype(kc)) {
      throw py::type_error(view->name + " has dtype " + view->dtype_string() + " but k_cache has " + kc.dtype_string());
    }
  }
  if (vc.shape != kc.shape) fail("v_cache must have the shape of k_cache " + kc.shape_string() + ", got " + vc.shape_string());
  if (vn.shape != kn.shape) fail("v must have the shape of k " + kn.shape_string() + ", got " + vn.shape_string());
  if (kn.shape[1] != kc.shape[1] || kn.shape[3] != kc.shape[3]) {
    fail("k has heads_kv, head_dim (" + std::to_string(kn.shape[1]) + ", " + std::to_string(kn.shape[3]) +
         ") but the cache has (" + std::to_string(kc.shape[1]) + ", " + std::to_string(kc.shape[3]) + ")");
  }
  const int device = cuda_device({&kc, &vc, &kn, &vn});
  cuda::AppendParams a;
  a.dtype = kernel_dtype(kc);
  if (a.dtype == DType::kFloat64) throw py::type_error("float64 caches run on the CPU");
  const auto ref = [](const TensorView& t) { return TensorRef{t.data, t.strides[0], t.strides[1], t.strides[2]}; };
  a.k_cache = ref(kc);
  a.v_cache = ref(vc);
  a.k_new = ref(kn);
  a.v_new = ref(vn);
  a.batch = kn.shape[0];
  a.num_heads_kv = kn.shape[1];
  a.seqlen_new = kn.shape[2];
  a.head_dim = kn.shape[3];
  a.cache_rows = kc.shape[0];
  a.capacity = kc.shape[2];
  const std::string batch_shape = shape_text({a.batch});
  a.sequences.seqlens_k = int32_array(view_array(cache_seqlens, "cache_seqlens"), {a.batch}, batch_shape, device);
  if (!block_table.is_none()) {
    const TensorView table = view_array(block_table, "block_table");
    if (table.ndim() != 2 || table.shape[0] != a.batch) {
      fail("block_table must have shape (" + std::to_string(a.batch) + ", max_pages), got " + table.shape_string());
    }
    a.sequences.block_table = int32_array(table, table.shape, "(batch, max_pages)", device, &a.sequences.block_table_stride);
    a.sequences.page_size = kc.shape[2];
    check_page_size(a.sequences.page_size);
    a.capacity = table.shape[1] * a.sequences.page_size;
    if (!cache_batch_idx.is_none()) fail("cache_batch_idx cannot be combined with a paged cache (block_table)");
  } else if (cache_batch_idx.is_none() && a.cache_rows < a.batch) {
    fail("the cache has " + std::to_string(a.cache_rows) + " rows but k has batch " + std::to_string(a.batch));
  }
  if (!cache_batch_idx.is_none()) {
    a.sequences.cache_batch_idx = int32_array(view_array(cache_batch_idx, "cache_batch_idx"), {a.batch}, batch_shape, device);
  }
  py::gil_scoped_release release;
  cuda::kvcache_append(a, device, stream_pointer(stream));
}

// out = merge of (out_a, lse_a) and (out_b, lse_b): outs (batch, heads, seqlen, head_dim)
// views, lses float32 (batch, heads, seqlen) with any strides; out and lse (or None) written.
void merge_attention_states(py::handle out_a, py::handle lse_a, py::handle out_b, py::handle lse_b, py::handle out,
                            py::handle lse, uintptr_t stream) {
  const TensorView oa = view_array(out_a, "out_a"), ob = view_array(out_b, "out_b"), o = view_array(out, "out");
  const TensorView la = view_array(lse_a, "lse_a"), lb = view_array(lse_b, "lse_b");
  std::optional<TensorView> l;
  if (!lse.is_none()) l = view_array(lse, "lse");
  for (const TensorView* view : {&oa, &ob, &o}) {
    if (view->ndim() != 4) fail(view->name + " must be 4-D (batch, heads, seqlen, head_dim), got shape " + view->shape_string());
    if (view->shape != oa.shape) fail(view->name + " must have the shape of out_a " + oa.shape_string() + ", got " + view->shape_string());
    if (view->shape[3] > 1 && view->strides[3] != 1) fail(view->name + " must be contiguous in its last dim");
    if (kernel_dtype(*view) != kernel_dtype(oa)) {
      throw py::type_error(view->name + " has dtype " + view->dtype_string() + " but out_a has " + oa.dtype_string());
    }
  }
  if (o.read_only) fail("out is read-only");
  const std::vector<int64_t> lse_shape{oa.shape[0], oa.shape[1], oa.shape[2]};
  std::vector<const TensorView*> lses{&la, &lb};
  if (l) lses.push_back(&*l);
  for (const TensorView* view : lses) {
    if (view->dtype.code != dlpack::kFloat || view->dtype.bits != 32 || view->dtype.lanes != 1) {
      throw py::type_error(view->name + " must be float32, got " + view->dtype_string());
    }
    if (view->shape != lse_shape) {
      fail(view->name + " must have shape " + shape_text({lse_shape[0], lse_shape[1], lse_shape[2]}) + ", got " +
           view->shape_string());
    }
  }
  const int device = l ? cuda_device({&oa, &ob, &o, &la, &lb, &*l}) : cuda_device({&oa, &ob, &o, &la, &lb});
  cuda::MergeParams m;
  m.dtype = kernel_dtype(oa);
  if (m.dtype == DType::kFloat64) throw py::type_error("float64 states are merged on the CPU");
  const auto ref = [](const TensorView& t) { return TensorRef{t.data, t.strides[0], t.strides[1], t.strides[2]}; };
  const auto lse_ref = [](const TensorView& t) {
    return cuda::LseRef{static_cast<float*>(t.data), t.strides[0], t.strides[1], t.strides[2]};
  };
  m.out_a = ref(oa);
  m.out_b = ref(ob);
  m.out = ref(o);
  m.lse_a = lse_ref(la);
  m.lse_b = lse_ref(lb);
  if (l) m.lse = lse_ref(*l);
  m.batch = oa.shape[0];
  m.num_heads = oa.shape[1];
  m.seqlen = oa.shape[2];
  m.head_dim = oa.shape[3];
  py::gil_scoped_release release;
  cuda::merge_attention_states(m, device, stream_pointer(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedattn CUDA kernels (private; use the fusedattn package)";
  py::register_exception<cuda::CudaError>(m, "CudaError", PyExc_RuntimeError);
  m.def("device_count", &cuda::device_count, "Visible CUDA devices (0 without a driver or GPU).");
  m.def("probe_device", [](int device) {
    const cuda::DeviceReport r = cuda::probe_device(device);
    py::dict d;
    d["name"] = r.name;
    d["compute_capability"] = r.compute_capability;
    d["kernel_arch"] = r.kernel_arch;
    d["multiprocessors"] = r.multiprocessors;
    d["total_memory"] = r.total_memory;
    return d;
  }, py::arg("device") = 0, "Runs the probe kernel on a device; returns its name, capability, SMs, memory.");
  m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("variant"), py::arg("stream"), py::arg("names"),
        "Forward attention into the caller-allocated out (and lse), on `stream`. Arrays in (b, h, s, d) order.");
  m.def("attention_varlen_forward", &attention_varlen_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("variant"), py::arg("stream"), py::arg("names"),
        "Forward over packed variable-length sequences (bottom-right per sequence); cu_seqlens int32 on the GPU.");
  m.def("attention_kvcache_forward", &attention_kvcache_forward, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("out"), py::arg("lse"), py::arg("cache_seqlens"), py::arg("block_table"), py::arg("cache_batch_idx"),
        py::arg("cache_leftpad"), py::arg("variant"), py::arg("num_splits"), py::arg("stream"),
        "Split-KV attention over a contiguous or paged KV cache (decode, chunked prefill), bottom-right causal.");
  m.def("kvcache_append", &kvcache_append, py::arg("k_cache"), py::arg("v_cache"), py::arg("k"), py::arg("v"),
        py::arg("cache_seqlens"), py::arg("block_table"), py::arg("cache_batch_idx"), py::arg("stream"),
        "Writes new k, v tokens into the cache at cache_seqlens (in place).");
  m.def("merge_attention_states", &merge_attention_states, py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"),
        py::arg("lse_b"), py::arg("out"), py::arg("lse"), py::arg("stream"),
        "Merges two partial attention results (over disjoint keys) by their LSEs into out (and lse).");
  m.def("max_splits", [] { return cuda::kMaxSplits; }, "Largest num_splits of attention_kvcache_forward.");
}
