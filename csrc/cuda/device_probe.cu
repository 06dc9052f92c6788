// The CUDA module's first kernel: each thread block reports the architecture it was compiled
// for (__CUDA_ARCH__), which tells which of the fat binary's images the driver picked.
// Together with cudaGetDeviceCount/Properties this is fusedattn.info()'s GPU report.
#include <cuda_runtime.h>

#include <string>

#include "cuda/device_probe.h"

namespace fusedattn {
namespace cuda {
namespace {

__global__ void report_arch_kernel(int* arch) {
#if defined(__CUDA_ARCH__)
  *arch = __CUDA_ARCH__;
#endif
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw CudaError(std::string(what) + " failed: " + cudaGetErrorString(status));
  }
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no GPU: report zero devices, leave no sticky error
    return 0;
  }
  return count;
}

DeviceReport probe_device(int device) {
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  int* arch_device = nullptr;
  check(cudaMalloc(&arch_device, sizeof(int)), "cudaMalloc");
  report_arch_kernel<<<1, 1>>>(arch_device);
  const cudaError_t launch = cudaGetLastError();
  int arch = 0;
  const cudaError_t copy = cudaMemcpy(&arch, arch_device, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(arch_device);
  check(launch, "report_arch_kernel launch");
  check(copy, "report_arch_kernel result copy");
  DeviceReport report;
  report.name = prop.name;
  report.compute_capability = prop.major * 10 + prop.minor;
  report.kernel_arch = arch / 10;
  report.multiprocessors = prop.multiProcessorCount;
  report.total_memory = static_cast<long long>(prop.totalGlobalMem);
  return report;
}

}  // namespace cuda
}  // namespace fusedattn
