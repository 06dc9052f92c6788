// Zero-copy views of Python arrays through DLPack. Any object with __dlpack__ (torch tensors,
// numpy arrays, cupy, JAX) is accepted; the capsule is kept alive, and not consumed, for the
// view's lifetime, so the producer's own capsule destructor releases the buffer afterwards.
// torch tensors take a faster lane through their own accessors (same information, no export).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings/dlpack.h"
#include "common/params.h"

namespace fusedattn {

struct TensorView {
  pybind11::object capsule;  // the DLPack export (or the torch tensor) kept alive while viewed
  std::string name;          // the argument name, for error messages
  void* data = nullptr;
  dlpack::Device device{};
  dlpack::DataType dtype{};
  bool read_only = false;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // elements

  int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
  // Row-major contiguous, ignoring the strides of dims of size 1 and of empty arrays (they address nothing).
  bool is_contiguous() const;
  std::string shape_string() const;
  std::string dtype_string() const;
  std::string device_string() const;
};

// Views `array` (named `name` in errors). Raises TypeError when it has no __dlpack__.
TensorView view_array(const pybind11::handle& array, const std::string& name);

// The kernel dtype of a view, or TypeError naming the argument for unsupported dtypes.
DType kernel_dtype(const TensorView& view);

}  // namespace fusedattn
