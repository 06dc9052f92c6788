// Device discovery for the CUDA module (host-side declarations; see device_probe.cu).
#pragma once
#include <stdexcept>
#include <string>

namespace fusedattn {
namespace cuda {

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct DeviceReport {
  std::string name;
  int compute_capability = 0;  // e.g. 90 for sm_90
  int kernel_arch = 0;         // the architecture of the image the probe kernel ran from
  int multiprocessors = 0;
  long long total_memory = 0;  // bytes
};

// Number of visible CUDA devices; 0 when there is no driver or no GPU (never throws).
int device_count();

// Runs the probe kernel on `device`. Throws CudaError naming the failing call.
DeviceReport probe_device(int device);

}  // namespace cuda
}  // namespace fusedattn
