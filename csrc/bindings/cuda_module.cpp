// fusedattn._cuda: the private CUDA extension, built only when nvcc is found. Importing it
// needs no GPU (cudart is linked statically); device_count() is 0 without a driver or GPU.
#include <pybind11/pybind11.h>

#include "cuda/device_probe.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedattn CUDA kernels (private; use the fusedattn package)";
  py::register_exception<fusedattn::cuda::CudaError>(m, "CudaError", PyExc_RuntimeError);
  m.def("device_count", &fusedattn::cuda::device_count, "Visible CUDA devices (0 without a driver or GPU).");
  m.def("probe_device", [](int device) {
    const fusedattn::cuda::DeviceReport r = fusedattn::cuda::probe_device(device);
    py::dict d;
    d["name"] = r.name;
    d["compute_capability"] = r.compute_capability;
    d["kernel_arch"] = r.kernel_arch;
    d["multiprocessors"] = r.multiprocessors;
    d["total_memory"] = r.total_memory;
    return d;
  }, py::arg("device") = 0, "Runs the probe kernel on a device; returns its name, capability, SMs, memory.");
}
