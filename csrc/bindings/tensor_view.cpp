// DLPack import: ask for a versioned capsule (DLPack >= 1.0, which also carries the read-only
// flag), fall back to the legacy one for older producers, and copy out shape and strides.
#include "bindings/tensor_view.h"

#include <cstring>
#include <stdexcept>
#include <utility>

namespace py = pybind11;

namespace fusedattn {
namespace {

py::object export_capsule(const py::handle& array, const std::string& name) {
  if (!py::hasattr(array, "__dlpack__")) {
    throw py::type_error(name + " must be an array (torch tensor, numpy array or any object with __dlpack__), got " +
                         std::string(py::str(py::type::handle_of(array).attr("__name__"))));
  }
  py::object method = array.attr("__dlpack__");
  try {
    try {
      return method(py::arg("max_version") = py::make_tuple(1, 0));
    } catch (py::error_already_set& error) {
      if (!error.matches(PyExc_TypeError)) throw;
      return method();  // producer predates DLPack 1.0
    }
  } catch (py::error_already_set& error) {  // e.g. numpy's big-endian arrays
    if (!error.matches(PyExc_BufferError)) throw;
    throw py::type_error(name + " cannot be read through DLPack: " + std::string(py::str(error.value())));
  }
}

// torch tensors are read through their own accessors (data_ptr, shape, stride, dtype,
// device): about 1 µs per tensor against 3 µs for a DLPack export, and no autograd detach.
struct TorchTypes {
  py::object tensor_type;
  std::vector<std::pair<py::object, dlpack::DataType>> dtypes;
  // Attribute names, created once (a per-call string would cost as much as the lookup).
  py::str dtype{"dtype"}, is_cpu{"is_cpu"}, is_cuda{"is_cuda"}, get_device{"get_device"}, device{"device"},
      data_ptr{"data_ptr"}, shape{"shape"}, stride{"stride"}, is_neg{"is_neg"};
};

// Looked up once torch has been imported (the GIL serialises the first lookups).
const TorchTypes* torch_types() {
  static const TorchTypes* types = nullptr;
  if (types != nullptr) return types;
  types = []() -> const TorchTypes* {
    py::object sys_modules = py::module_::import("sys").attr("modules");
    if (!sys_modules.contains("torch")) return nullptr;
    py::object torch = sys_modules["torch"];
    // Not while torch's import is still running (in another thread): its dtypes are not made yet.
    const py::object spec = py::getattr(torch, "__spec__", py::none());
    if (!spec.is_none() && py::getattr(spec, "_initializing", py::bool_(false)).cast<bool>()) return nullptr;
    auto* t = new TorchTypes{torch.attr("Tensor"), {}};  // process lifetime, like torch's own types
    t->dtypes = {{torch.attr("float32"), {dlpack::kFloat, 32, 1}},
                 {torch.attr("bfloat16"), {dlpack::kBfloat, 16, 1}},
                 {torch.attr("float16"), {dlpack::kFloat, 16, 1}},
                 {torch.attr("float64"), {dlpack::kFloat, 64, 1}},
                 {torch.attr("int32"), {dlpack::kInt, 32, 1}},
                 {torch.attr("int64"), {dlpack::kInt, 64, 1}},
                 {torch.attr("bool"), {dlpack::kBool, 8, 1}}};
    return t;
  }();
  return types;
}

bool view_torch_tensor(const py::handle& array, TensorView& view) {
  const TorchTypes* types = torch_types();
  if (types == nullptr || !py::isinstance(array, types->tensor_type)) return false;
  const py::object dtype = array.attr(types->dtype);
  bool known = false;
  for (const auto& entry : types->dtypes) {
    if (dtype.is(entry.first)) {
      view.dtype = entry.second;
      known = true;
      break;
    }
  }
  if (!known) return false;  // other dtypes: let DLPack describe them (or fail) as usual
  if (array.attr(types->is_cpu).cast<bool>()) {
    view.device = {dlpack::kCPU, 0};
  } else if (array.attr(types->is_cuda).cast<bool>()) {
    view.device = {dlpack::kCUDA, array.attr(types->get_device)().cast<int32_t>()};
  } else {
    throw std::invalid_argument(view.name + " is on device '" + std::string(py::str(array.attr(types->device))) +
                                "'; fusedattn takes cpu or cuda tensors");
  }
  if (array.attr(types->is_neg)().cast<bool>()) {  // its memory holds -x: the kernels would read x
    throw py::type_error(view.name + " is a lazily negated view (torch's negative bit, as from .conj().imag); "
                         "pass " + view.name + ".resolve_neg()");
  }
  try {
    view.data = reinterpret_cast<void*>(array.attr(types->data_ptr)().cast<uintptr_t>());
  } catch (const py::error_already_set& error) {  // sparse tensors, torch.func's wrappers: no storage
    throw py::type_error(view.name + "'s data cannot be read (" + error.what() +
                         "); fusedattn takes dense (strided) tensors with storage");
  }
  for (const py::handle size : array.attr(types->shape)) view.shape.push_back(size.cast<int64_t>());
  for (const py::handle stride : array.attr(types->stride)()) view.strides.push_back(stride.cast<int64_t>());
  view.read_only = false;
  view.capsule = py::reinterpret_borrow<py::object>(array);  // keeps the tensor alive
  return true;
}

}  // namespace

TensorView view_array(const py::handle& array, const std::string& name) {
  TensorView view;
  view.name = name;
  if (view_torch_tensor(array, view)) return view;
  view.capsule = export_capsule(array, name);
  PyObject* capsule = view.capsule.ptr();
  const char* capsule_name = PyCapsule_GetName(capsule);
  const dlpack::Tensor* tensor = nullptr;
  if (capsule_name != nullptr && std::strcmp(capsule_name, "dltensor_versioned") == 0) {
    auto* managed = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(capsule, capsule_name));
    if (managed == nullptr) throw py::error_already_set();
    if (managed->version.major != 1) {
      throw py::type_error(name + ": unsupported DLPack major version " + std::to_string(managed->version.major));
    }
    tensor = &managed->dl_tensor;
    view.read_only = (managed->flags & dlpack::kFlagReadOnly) != 0;
  } else if (capsule_name != nullptr && std::strcmp(capsule_name, "dltensor") == 0) {
    auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, capsule_name));
    if (managed == nullptr) throw py::error_already_set();
    tensor = &managed->dl_tensor;
  } else {
    throw py::type_error(name + ".__dlpack__() did not return a DLPack capsule");
  }
  view.data = static_cast<char*>(tensor->data) + tensor->byte_offset;
  view.device = tensor->device;
  view.dtype = tensor->dtype;
  view.shape.assign(tensor->shape, tensor->shape + tensor->ndim);
  view.strides.resize(tensor->ndim);
  int64_t compact = 1;
  for (int32_t d = tensor->ndim - 1; d >= 0; --d) {
    view.strides[d] = tensor->strides != nullptr ? tensor->strides[d] : compact;
    compact *= tensor->shape[d];
  }
  return view;
}

DType kernel_dtype(const TensorView& view) {
  if (view.dtype.lanes == 1) {
    if (view.dtype.code == dlpack::kFloat && view.dtype.bits == 32) return DType::kFloat32;
    if (view.dtype.code == dlpack::kFloat && view.dtype.bits == 64) return DType::kFloat64;
    if (view.dtype.code == dlpack::kFloat && view.dtype.bits == 16) return DType::kFloat16;
    if (view.dtype.code == dlpack::kBfloat && view.dtype.bits == 16) return DType::kBFloat16;
  }
  throw py::type_error(view.name + " has dtype " + view.dtype_string() +
                       "; supported: float32, float64, float16, bfloat16");
}

bool TensorView::is_contiguous() const {
  for (const int64_t size : shape) {
    if (size == 0) return true;  // an empty array addresses nothing
  }
  int64_t expected = 1;
  for (int64_t d = ndim() - 1; d >= 0; --d) {
    if (shape[d] > 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_string() const {
  std::string s = "(";
  for (size_t d = 0; d < shape.size(); ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::string TensorView::dtype_string() const {
  const char* kind = "unknown";
  switch (dtype.code) {
    case dlpack::kInt: kind = "int"; break;
    case dlpack::kUInt: kind = "uint"; break;
    case dlpack::kFloat: kind = "float"; break;
    case dlpack::kBfloat: kind = "bfloat"; break;
    case dlpack::kBool: return "bool";
    default: break;
  }
  std::string s = kind + std::to_string(dtype.bits);
  if (dtype.lanes != 1) s += "x" + std::to_string(dtype.lanes);
  return s;
}

std::string TensorView::device_string() const {
  switch (device.device_type) {
    case dlpack::kCPU: return "cpu";
    case dlpack::kCUDA: return "cuda:" + std::to_string(device.device_id);
    case dlpack::kCUDAHost: return "cuda_host";
    case dlpack::kCUDAManaged: return "cuda_managed:" + std::to_string(device.device_id);
    default: return "device_type " + std::to_string(device.device_type);
  }
}

}  // namespace fusedattn
