// fusedattn._C: the private CPU extension. The only code besides tensor_view/validate that knows
// Python. Every kernel call validates its arrays, then runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/sequences.h"
#include "bindings/tensor_view.h"
#include "bindings/validate.h"
#include "cpu/attention_cpu.h"
#include "cpu/isa.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;
using namespace fusedattn;

namespace {

void check_threads(int num_threads) {
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
}

// variant: see parse_variant (validate.h). names: the caller's names for q, k, v.
void attention_forward(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                       const py::tuple& variant, const std::string& isa, int num_threads,
                       const std::tuple<std::string, std::string, std::string>& names) {
  check_threads(num_threads);
  ForwardViews views{view_array(q, std::get<0>(names)), view_array(k, std::get<1>(names)),
                     view_array(v, std::get<2>(names)), view_array(out, "out")};
  if (!lse.is_none()) views.lse = view_array(lse, "lse");
  const ForwardOptions options = parse_variant(variant, views);
  const AttentionParams params = make_forward_params(views, options);
  cpu::kernels_for_isa(isa);  // raises for an unavailable ISA before releasing the GIL
  py::gil_scoped_release release;
  cpu::attention_forward(params, isa, num_threads);
}

// dmask: None, or a zero-filled float32 (batch, heads, seqlen_q, seqlen_k) array for the
// gradient of a float attn_mask.
void attention_backward(py::handle dout, py::handle dlse, py::handle q, py::handle k, py::handle v, py::handle out,
                        py::handle lse, py::handle dq, py::handle dk, py::handle dv, py::handle dmask,
                        const py::tuple& variant, const std::string& isa, int num_threads,
                        const std::tuple<std::string, std::string, std::string>& names) {
  check_threads(num_threads);
  BackwardViews views{ForwardViews{view_array(q, std::get<0>(names)), view_array(k, std::get<1>(names)),
                                   view_array(v, std::get<2>(names)), view_array(out, "out"), view_array(lse, "lse")},
                      view_array(dout, "dout"), view_array(dq, "dq"), view_array(dk, "dk"), view_array(dv, "dv"),
                      std::nullopt};
  if (!dlse.is_none()) views.dlse = view_array(dlse, "dlse");
  if (!dmask.is_none()) views.dmask = view_array(dmask, "dmask");
  const ForwardOptions options = parse_variant(variant, views.forward);
  const BackwardParams params = make_backward_params(views, options);
  cpu::kernels_for_isa(isa);
  py::gil_scoped_release release;
  cpu::attention_backward(params, isa, num_threads);
}

// Variable-length batches: q, k, v, out are the packed (total, heads, d) arrays viewed by the
// caller as (1, heads, total, d), lse (heads, total_q) as (1, heads, total_q).
void attention_varlen_forward(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                              py::handle cu_seqlens_q, py::handle cu_seqlens_k, const py::tuple& variant,
                              const std::string& isa, int num_threads,
                              const std::tuple<std::string, std::string, std::string>& names) {
  check_threads(num_threads);
  ForwardViews views{view_array(q, std::get<0>(names)), view_array(k, std::get<1>(names)),
                     view_array(v, std::get<2>(names)), view_array(out, "out")};
  if (!lse.is_none()) views.lse = view_array(lse, "lse");
  const TensorView cu_q = view_array(cu_seqlens_q, "cu_seqlens_q"), cu_k = view_array(cu_seqlens_k, "cu_seqlens_k");
  views.sequence_count = cu_q.shape.empty() ? 0 : cu_q.shape[0] - 1;
  const ForwardOptions options = parse_variant(variant, views);
  if (views.mask) throw std::invalid_argument("attn_mask is not supported with variable-length batches");
  AttentionParams params = make_forward_params(views, options);
  apply_varlen(params, cu_q, cu_k);
  cpu::kernels_for_isa(isa);
  py::gil_scoped_release release;
  cpu::attention_forward(params, isa, num_threads);
}

void attention_varlen_backward(py::handle dout, py::handle dlse, py::handle q, py::handle k, py::handle v,
                               py::handle out, py::handle lse, py::handle dq, py::handle dk, py::handle dv,
                               py::handle cu_seqlens_q, py::handle cu_seqlens_k, const py::tuple& variant,
                               const std::string& isa, int num_threads,
                               const std::tuple<std::string, std::string, std::string>& names) {
  check_threads(num_threads);
  BackwardViews views{ForwardViews{view_array(q, std::get<0>(names)), view_array(k, std::get<1>(names)),
                                   view_array(v, std::get<2>(names)), view_array(out, "out"), view_array(lse, "lse")},
                      view_array(dout, "dout"), view_array(dq, "dq"), view_array(dk, "dk"), view_array(dv, "dv"),
                      std::nullopt};
  if (!dlse.is_none()) views.dlse = view_array(dlse, "dlse");
  const TensorView cu_q = view_array(cu_seqlens_q, "cu_seqlens_q"), cu_k = view_array(cu_seqlens_k, "cu_seqlens_k");
  views.forward.sequence_count = cu_q.shape.empty() ? 0 : cu_q.shape[0] - 1;
  const ForwardOptions options = parse_variant(variant, views.forward);
  if (views.forward.mask) throw std::invalid_argument("attn_mask is not supported with variable-length batches");
  BackwardParams params = make_backward_params(views, options);
  apply_varlen(params.forward, cu_q, cu_k);
  cpu::kernels_for_isa(isa);
  py::gil_scoped_release release;
  cpu::attention_backward(params, isa, num_threads);
}

// KV cache: q, out (batch, heads, seqlen_q, d); k_cache, v_cache viewed as (rows or pages,
// kv_heads, capacity or page_size, d). The new keys are already appended (see functional.py).
void attention_kvcache_forward(py::handle q, py::handle k_cache, py::handle v_cache, py::handle out, py::handle lse,
                               py::handle cache_seqlens, py::handle block_table, py::handle cache_batch_idx,
                               py::handle cache_leftpad, const py::tuple& variant, const std::string& isa,
                               int num_threads) {
  check_threads(num_threads);
  ForwardViews views{view_array(q, "q"), view_array(k_cache, "k_cache"), view_array(v_cache, "v_cache"),
                     view_array(out, "out")};
  if (!lse.is_none()) views.lse = view_array(lse, "lse");
  views.kv_is_cache = true;
  const ForwardOptions options = parse_variant(variant, views);
  if (views.mask) throw std::invalid_argument("attn_mask is not supported with a KV cache");
  AttentionParams params = make_forward_params(views, options);
  KvCacheViews cache{view_array(cache_seqlens, "cache_seqlens")};
  if (!block_table.is_none()) cache.block_table = view_array(block_table, "block_table");
  if (!cache_batch_idx.is_none()) cache.cache_batch_idx = view_array(cache_batch_idx, "cache_batch_idx");
  if (!cache_leftpad.is_none()) cache.cache_leftpad = view_array(cache_leftpad, "cache_leftpad");
  apply_kvcache(params, cache, views.k.shape[0]);
  cpu::kernels_for_isa(isa);
  py::gil_scoped_release release;
  cpu::attention_forward(params, isa, num_threads);
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
        py::arg("cache_batch_idx"), py::arg("cache_leftpad"), py::arg("variant"), py::arg("isa"),
        py::arg("num_threads"), "Forward over a contiguous or paged KV cache (bottom-right causal).");
  m.def("use_openmp_runtime", &cpu::use_openmp_runtime, py::arg("library_path"),
        "Run the CPU kernels on an already-loaded OpenMP runtime (PyTorch's); False if unusable.");
  m.def("available_isas", &cpu::available_isas, "CPU ISAs this build and this CPU can run, best first.");
}
