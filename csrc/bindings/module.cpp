// fusedattn._C: the private CPU extension. The only code besides tensor_view/validate that knows
// Python. Every kernel call validates its arrays, then runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/tensor_view.h"
#include "bindings/validate.h"
#include "cpu/attention_cpu.h"
#include "cpu/isa.h"

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
  m.def("available_isas", &cpu::available_isas, "CPU ISAs this build and this CPU can run, best first.");
}
