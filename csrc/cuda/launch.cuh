// Host-side launch helpers shared by every launcher: checked kernel launches (errors become
// CudaError naming the kernel), the dynamic shared-memory opt-in above 48 KiB, and the few
// runtime queries the launchers need. Under the emulator the same calls run on the CPU.
#pragma once
#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

#include "cuda/compat.cuh"
#include "cuda/device_probe.h"

namespace fusedattn {
namespace cuda {

// What a failing launch reports: "fusedattn CUDA kernel forward (bfloat16, head_dim 128): ...".
struct KernelName {
  const char* kernel;
  const char* dtype;
  int head_dim;  // 0: not applicable

  std::string str() const {
    std::string s = std::string("fusedattn CUDA kernel ") + kernel + " (" + dtype;
    if (head_dim > 0) s += ", head_dim " + std::to_string(head_dim);
    return s + ")";
  }
};

#if !defined(FUSEDATTN_CUDA_EMULATION)
inline void check_cuda(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) throw CudaError(what + " failed: " + cudaGetErrorString(status));
}

// Raises a kernel's dynamic shared-memory limit (needed above 48 KiB), once per (kernel, device).
inline void allow_dynamic_smem(const void* kernel, int bytes, const KernelName& name) {
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, int>> done;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, device, bytes}) != 0) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             name.str() + ": cudaFuncSetAttribute(shared memory " + std::to_string(bytes) + " bytes)");
  done.insert({kernel, device, bytes});
}
#endif

constexpr int64_t kMaxGridBlocks = 2147483647;  // gridDim.x limit

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), const KernelName& name, int64_t blocks, int threads, int smem_bytes,
            void* stream, const Args&... args) {
  if (blocks <= 0) return;
  if (blocks > kMaxGridBlocks) throw CudaError(name.str() + ": problem too large (" + std::to_string(blocks) + " blocks)");
#if defined(FUSEDATTN_CUDA_EMULATION)
  (void)stream;
  emu::launch(dim3(static_cast<unsigned>(blocks)), dim3(threads), smem_bytes, [&] { kernel(args...); });
#else
  if (smem_bytes > 48 * 1024) allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes, name);
  kernel<<<static_cast<unsigned>(blocks), threads, smem_bytes, static_cast<cudaStream_t>(stream)>>>(args...);
  check_cuda(cudaGetLastError(), name.str() + " launch");
#endif
}

// Multiprocessors of the current device (cached per device).
int multiprocessor_count();

// Stream-ordered scratch memory (cudaMallocAsync / cudaFreeAsync on `stream`).
void* allocate_async(size_t bytes, void* stream, const char* what);
void free_async(void* pointer, void* stream);

// Makes `device` current for the guard's lifetime (the caller's arrays live there).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace cuda
}  // namespace fusedattn
