// Implementation of parallel_for: on PyTorch's OpenMP runtime when use_openmp_runtime() found
// it (not in a forked child), else one process-wide pool that grows to the largest thread count
// asked for. A call publishes a job (function, task counter, number of helpers) under a mutex,
// wakes the workers, takes tasks itself, then waits until every helper has finished.
#include "cpu/thread_pool.h"

#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu/tiles.h"

namespace fusedattn {
namespace cpu {
namespace {

class ThreadPool {
 public:
  // Returns false (and does nothing) when the pool is busy with another caller's job.
  bool try_run(int64_t num_tasks, int num_threads, const std::function<void(int64_t, int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const int helpers = num_threads - 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(threads_.size()) < helpers) {
        const int worker = static_cast<int>(threads_.size()) + 1;
        threads_.emplace_back([this, worker] { worker_loop(worker); });
      }
      job_ = &fn;
      num_tasks_ = num_tasks;
      next_task_.store(0);
      helpers_ = helpers;
      helpers_running_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    take_tasks(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return helpers_running_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void take_tasks(int worker) {
    for (int64_t task = next_task_.fetch_add(1); task < num_tasks_; task = next_task_.fetch_add(1)) {
      (*job_)(task, worker);
    }
  }

  void worker_loop(int worker) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (worker > helpers_) continue;
      lock.unlock();
      take_tasks(worker);
      lock.lock();
      if (--helpers_running_ == 0) done_.notify_one();
    }
  }

  std::mutex busy_mutex_;  // held by the caller whose job is running
  std::mutex mutex_;       // guards the fields below
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> threads_;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  int helpers_ = 0;
  int helpers_running_ = 0;
  uint64_t generation_ = 0;
};

// Never destroyed: its sleeping workers simply end with the process. A forked child has none
// of the parent's threads, so it starts a fresh pool (the old one is abandoned, not touched).
std::atomic<ThreadPool*> g_pool{nullptr};

// The libgomp ABI that `#pragma omp parallel` compiles to, looked up in an already-loaded runtime.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpGetThreadNum = int (*)();
struct OpenMpRuntime {
  GompParallel parallel;
  OmpGetThreadNum thread_num;
};
std::atomic<const OpenMpRuntime*> g_openmp{nullptr};

// A forked child (a DataLoader worker, multiprocessing's fork) runs on a fresh private pool and
// never on libgomp, which is not fork-safe: a child that called GOMP_parallel with several
// threads hung in its barrier (torch's own ops hang there too unless the child runs them on one
// thread). The handler, registered when the extension is loaded, drops the parent's hand-over
// and pool, and use_openmp_runtime refuses a new hand-over in the child.
std::atomic<bool> g_forked{false};

void reset_threads_in_child() {
  g_pool.store(nullptr);
  g_openmp.store(nullptr);
  g_forked.store(true);
}

const bool g_fork_handler_registered = pthread_atfork(nullptr, nullptr, &reset_threads_in_child) == 0;

ThreadPool& pool() {
  ThreadPool* instance = g_pool.load();
  if (instance == nullptr) {
    ThreadPool* fresh = new ThreadPool();
    if (g_pool.compare_exchange_strong(instance, fresh)) {
      instance = fresh;
    } else {
      delete fresh;  // another thread won the race; `instance` now holds its pool
    }
  }
  return *instance;
}

struct OpenMpJob {
  const std::function<void(int64_t, int)>* fn;
  int64_t num_tasks;
  std::atomic<int64_t> next{0};
  OmpGetThreadNum thread_num;
};

void run_openmp_job(void* data) {
  OpenMpJob* job = static_cast<OpenMpJob*>(data);
  const int worker = job->thread_num();
  for (int64_t task = job->next.fetch_add(1); task < job->num_tasks; task = job->next.fetch_add(1)) {
    (*job->fn)(task, worker);
  }
}

}  // namespace

bool use_openmp_runtime(const std::string& library_path) {
  if (g_forked.load()) return false;
  void* handle = dlopen(library_path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return false;
  auto parallel = reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
  auto thread_num = reinterpret_cast<OmpGetThreadNum>(dlsym(handle, "omp_get_thread_num"));
  if (parallel == nullptr || thread_num == nullptr) return false;
  g_openmp.store(new OpenMpRuntime{parallel, thread_num});  // process lifetime, like the runtime
  return true;
}

int64_t serial_work_macs() { return g_openmp.load() != nullptr ? 0 : kPoolSerialWorkMacs; }

void parallel_for(int64_t num_tasks, int num_threads, const std::function<void(int64_t, int)>& fn) {
  if (num_tasks <= 0) return;
  if (num_threads > num_tasks) num_threads = static_cast<int>(num_tasks);
  const OpenMpRuntime* openmp = g_openmp.load();
  if (num_threads > 1 && openmp != nullptr) {
    OpenMpJob job;
    job.fn = &fn;
    job.num_tasks = num_tasks;
    job.thread_num = openmp->thread_num;
    openmp->parallel(&run_openmp_job, &job, static_cast<unsigned>(num_threads), 0);
    return;
  }
  if (num_threads <= 1 || !pool().try_run(num_tasks, num_threads, fn)) {
    for (int64_t task = 0; task < num_tasks; ++task) fn(task, 0);
  }
}

}  // namespace cpu
}  // namespace fusedattn

