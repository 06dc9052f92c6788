// A small blocking thread pool for the CPU kernels. Workers sleep on a condition variable
// between calls (they never spin), so they do not compete with PyTorch's own pool when calls
// alternate with torch ops. The calling thread always takes part as worker 0.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace fusedattn {
namespace cpu {

// Runs fn(task, worker) for every task in [0, num_tasks) on up to num_threads threads, tasks
// handed out dynamically in increasing order, worker in [0, num_threads). Returns when all are
// done. When another call is already using the pool (concurrent callers), this call runs all
// its tasks on the calling thread, so concurrent calls are always safe.
void parallel_for(int64_t num_tasks, int num_threads, const std::function<void(int64_t, int)>& fn);

// Multiply-adds below which a call is better run on the calling thread alone: what waking the
// helpers costs. kPoolSerialWorkMacs (tiles.h) on fusedattn's own pool, whose helpers sleep
// between calls; 0 on PyTorch's OpenMP runtime, whose threads spin after torch's ops.
int64_t serial_work_macs();

// From now on, run parallel_for on the OpenMP runtime at `library_path` if the process has
// already loaded it (PyTorch's bundled libgomp): fusedattn's work then runs on torch's own
// OpenMP threads instead of a second pool that would compete with them while they spin after
// a torch op. Returns false (and changes nothing) when the library is not loaded or lacks the
// GOMP entry points, and in a forked child (libgomp is not fork-safe: thread_pool.cpp).
bool use_openmp_runtime(const std::string& library_path);

}  // namespace cpu
}  // namespace fusedattn
