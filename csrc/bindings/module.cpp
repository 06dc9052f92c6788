// fusedattn._C: the private CPU extension. The only code besides tensor_view/validate that knows
// Python. Every kernel call validates its arrays, then runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>

#include "bindings/sequences.h"
#include "bindings/tensor_view.h"
#include "bindings/validate.h"
#include "cpu/attention_cpu.h"
#include "cpu/isa.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;
using namespace fusedattn;

namespace {

using Names = std::tuple<std::string, std::string, std::string>;  // the caller's names for q, k, v

void check_threads(int num_threads) {
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
}

std::optional<TensorView> optional_view(py::handle array, const char* name) {
  if (array.is_none()) return std::nullopt;
  return view_array(array, name);
}

ForwardViews forward_views(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                           const Names& names) {
  return ForwardViews{view_array(q, std::get<0>(names)), view_array(k, std::get<1>(names)),
                      view_array(v, std::get<2>(names)), view_array(out, "out"), optional_view(lse, "lse")};
}

BackwardViews backward_views(py::handle dout, py::handle dlse, py::handle q, py::handle k, py::handle v,
                             py::handle out, py::handle lse, py::handle dq, py::handle dk, py::handle dv,
                             const Names& names) {
  BackwardViews views{forward_views(q, k, v, out, lse, names), view_array(dout, "dout"), view_array(dq, "dq"),
                      view_array(dk, "dk"), view_array(dv, "dv"), optional_view(dlse, "dlse")};
  views.forward.out_is_input = true;
  return views;
}

// cu_seqlens views; sets the sequence count that per-sequence arguments are checked against.
std::pair<TensorView, TensorView> varlen_views(py::handle cu_seqlens_q, py::handle cu_seqlens_k,
                                               ForwardViews& views) {
  TensorView cu_q = view_array(cu_seqlens_q, "cu_seqlens_q"), cu_k = view_array(cu_seqlens_k, "cu_seqlens_k");
  views.sequence_count = cu_q.shape.empty() ? 0 : cu_q.shape[0] - 1;
  return {std::move(cu_q), std::move(cu_k)};
}

void reject_mask(const ForwardViews& views, const char* with) {
  if (views.mask) throw std::invalid_argument(std::string("attn_mask is not supported with ") + with);
}

// The ISA is checked (it raises) before the GIL is released for the kernel.
void run_forward(const AttentionParams& params, const std::string& isa, int num_threads) {
  cpu::kernels_for_isa(isa);
  py::gil_scoped_release release;
  cpu::attention_forward(params, isa, num_threads);
}

void run_backward(const BackwardParams& params, const std::string& isa, int num_threads) {
  cpu::kernels_for_isa(isa);
  py::gil_scoped_release release;
  cpu::attention_backward(params, isa, num_threads);
}

// variant: see parse_variant (validate.h).
void attention_forward(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                       const py::tuple& variant, const std::string& isa, int num_threads, const Names& names) {
  check_threads(num_threads);
  ForwardViews views = forward_views(q, k, v, out, lse, names);
  const ForwardOptions options = parse_variant(variant, views);
  run_forward(make_forward_params(views, options), isa, num_threads);
}

// dmask: None, or a zero-filled (batch, heads, seqlen_q, seqlen_k) array (float32, float64 for
// float64 inputs) for the gradient of a float attn_mask.
void attention_backward(py::handle dout, py::handle dlse, py::handle q, py::handle k, py::handle v, py::handle out,
                        py::handle lse, py::handle dq, py::handle dk, py::handle dv, py::handle dmask,
                        const py::tuple& variant, const std::string& isa, int num_threads, const Names& names) {
  check_threads(num_threads);
  BackwardViews views = backward_views(dout, dlse, q, k, v, out, lse, dq, dk, dv, names);
  views.dmask = optional_view(dmask, "dmask");
  const ForwardOptions options = parse_variant(variant, views.forward);
  run_backward(make_backward_params(views, options), isa, num_threads);
}

// Variable-length batches: q, k, v, out are the packed (total, heads, d) arrays viewed by the
// caller as (1, heads, total, d), lse (heads, total_q) as (1, heads, total_q).
void attention_varlen_forward(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                              py::handle cu_seqlens_q, py::handle cu_seqlens_k, const py::tuple& variant,
                              const std::string& isa, int num_threads, const Names& names) {
  check_threads(num_threads);
  ForwardViews views = forward_views(q, k, v, out, lse, names);
  const auto [cu_q, cu_k] = varlen_views(cu_seqlens_q, cu_seqlens_k, views);
  const ForwardOptions options = parse_variant(variant, views);
  reject_mask(views, "variable-length batches");
  AttentionParams params = make_forward_params(views, options);
  IndexCopies copies;
  apply_varlen(params, cu_q, cu_k, copies);
  run_forward(params, isa, num_threads);
}

void attention_varlen_backward(py::handle dout, py::handle dlse, py::handle q, py::handle k, py::handle v,
                               py::handle out, py::handle lse, py::handle dq, py::handle dk, py::handle dv,
                               py::handle cu_seqlens_q, py::handle cu_seqlens_k, const py::tuple& variant,
                               const std::string& isa, int num_threads, const Names& names) {
  check_threads(num_threads);
  BackwardViews views = backward_views(dout, dlse, q, k, v, out, lse, dq, dk, dv, names);
  const auto [cu_q, cu_k] = varlen_views(cu_seqlens_q, cu_seqlens_k, views.forward);
  const ForwardOptions options = parse_variant(variant, views.forward);
  reject_mask(views.forward, "variable-length batches");
  BackwardParams params = make_backward_params(views, options);
  IndexCopies copies;
  apply_varlen(params.forward, cu_q, cu_k, copies);
  run_backward(params, isa, num_threads);
}

// KV cache: q, out (batch, seqlen_q, heads, d); k_cache, v_cache (rows or pages, capacity or
// page_size, kv_heads, d): the caller's (flash-attn's) layout, viewed here with dims 1 and 2
// swapped as the kernels' (b, h, s, d), which spares the caller four transposes per decode call
// (about 3.5 µs in Python). k, v: None, or new entries (batch, seqlen_new, kv_heads, d) written
// into the caches at cache_seqlens once every argument has passed its checks (rotated ones are
// appended in inference.py, which then passes None).
void attention_kvcache_forward(py::handle q, py::handle k_cache, py::handle v_cache, py::handle out, py::handle lse,
                               py::handle cache_seqlens, py::handle block_table, py::handle cache_batch_idx,
                               py::handle cache_leftpad, py::handle k, py::handle v, const py::tuple& variant,
                               const std::string& isa, int num_threads) {
  check_threads(num_threads);
  ForwardViews views = forward_views(q, k_cache, v_cache, out, lse, Names{"q", "k_cache", "v_cache"});
  for (TensorView* view : {&views.q, &views.k, &views.v, &views.out}) {
    if (view->ndim() == 4) {  // (other ranks are rejected with their own shape below)
      std::swap(view->shape[1], view->shape[2]);
      std::swap(view->strides[1], view->strides[2]);
    }
  }
  views.kv_is_cache = true;
  const ForwardOptions options = parse_variant(variant, views);
  reject_mask(views, "a KV cache");
  AttentionParams params = make_forward_params(views, options);
  const KvCacheViews cache{view_array(cache_seqlens, "cache_seqlens"), optional_view(block_table, "block_table"),
                           optional_view(cache_batch_idx, "cache_batch_idx"),
                           optional_view(cache_leftpad, "cache_leftpad"), optional_view(k, "k"), optional_view(v, "v")};
  IndexCopies copies;
  apply_kvcache(params, cache, views.k.shape[0], copies);
  if (cache.k_new) {
    cpu::kernels_for_isa(isa);  // (raises for an unknown ISA before the cache is written)
    py::gil_scoped_release release;  // (a chunked prefill appends megabytes)
    append_to_cache(params, cache, views.k, views.v);
  }
  run_forward(params, isa, num_threads);
}

// exp_vec of one ISA over a float32 buffer, as bytes (the accuracy test of the vector exp).
py::bytes exp_floats(const std::string& isa, py::buffer x) {
  const py::buffer_info info = x.request();
  if (info.format != py::format_descriptor<float>::format() || info.ndim != 1 || info.strides[0] != sizeof(float)) {
    throw std::invalid_argument("x must be a contiguous 1-D float32 buffer");
  }
  std::string result(static_cast<size_t>(info.size) * sizeof(float), '\0');
  cpu::kernels_for_isa(isa).exp_floats(static_cast<const float*>(info.ptr), reinterpret_cast<float*>(result.data()),
                                       info.size);
  return py::bytes(result);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedattn CPU kernels (private; use the fusedattn package)";
  m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("variant"), py::arg("isa"), py::arg("num_threads"),
        py::arg("names"),
        "Forward attention into the caller-allocated out (and lse). All arrays in (b, h, s, d) order.");
  m.def("attention_backward", &attention_backward, py::arg("dout"), py::arg("dlse"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dmask"),
        py::arg("variant"), py::arg("isa"), py::arg("num_threads"), py::arg("names"),
        "Backward attention into the caller-allocated dq, dk, dv. All arrays in (b, h, s, d) order.");
  m.def("attention_varlen_forward", &attention_varlen_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("variant"),
        py::arg("isa"), py::arg("num_threads"), py::arg("names"),
        "Forward over packed variable-length sequences (bottom-right causal per sequence).");
  m.def("attention_varlen_backward", &attention_varlen_backward, py::arg("dout"), py::arg("dlse"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("variant"), py::arg("isa"),
        py::arg("num_threads"), py::arg("names"), "Backward over packed variable-length sequences.");
  m.def("attention_kvcache_forward", &attention_kvcache_forward, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("out"), py::arg("lse"), py::arg("cache_seqlens"), py::arg("block_table"),
        py::arg("cache_batch_idx"), py::arg("cache_leftpad"), py::arg("k"), py::arg("v"), py::arg("variant"),
        py::arg("isa"), py::arg("num_threads"),
        "Appends k, v (or None) to a contiguous or paged KV cache, then attends over it (bottom-right causal); "
        "q, caches, out, k, v in (b, s, h, d).");
  m.def("use_openmp_runtime", &cpu::use_openmp_runtime, py::arg("library_path"),
        "Run the CPU kernels on an already-loaded OpenMP runtime (PyTorch's); False if unusable.");
  m.def("available_isas", &cpu::available_isas, "CPU ISAs this build and this CPU can run, best first.");
  m.def("_exp_floats", &exp_floats, py::arg("isa"), py::arg("x"),
        "exp of a float32 buffer through the named ISA's vector exp (for its accuracy test).");
}
