// The thread pool's one instance and the library's thread count (see common.h for the pool itself).
#include "common.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

// The CPUs the process may use, read when the library loads (on the loading thread: MindSpore's runtime threads,
// which call the kernels, may be pinned to one core).
static cpu_set_t load_time_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) != 0) {
    CPU_ZERO(&set);
    CPU_SET(0, &set);
  }
  return set;
}
static const cpu_set_t &kernel_cpus() {
  static const cpu_set_t cpus = load_time_cpus();
  return cpus;
}
static const cpu_set_t &kAtLoad = kernel_cpus();  // read now, on the thread loading the library

static int default_threads() {
  if (const char *env = std::getenv("ZOO_KERNEL_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return CPU_COUNT(&kernel_cpus());
}

thread_local int tl_spin_us = 300;

// A fork-join pool: run(fn, ctx) calls fn(ctx, 0) on the caller and fn(ctx, 1..n-1) on the workers, and returns
// when all are done. Callers are serialized (MindSpore may call from more than one thread). After fork() the child, which has
// no copy of the workers, runs every part itself. Workers spin for the caller's tl_spin_us after a job (yielding
// the core to any other runnable thread), then sleep on a condition variable.
class Pool {
 public:
  explicit Pool(int threads) : n_(threads < 1 ? 1 : threads) {
    for (int i = 1; i < n_; ++i) {
      workers_.emplace_back([this, i] { work(i); });
      // the process's CPUs, not the creator's pin
      pthread_setaffinity_np(workers_.back().native_handle(), sizeof(cpu_set_t), &kernel_cpus());
    }
  }
  int size() const { return n_; }

  void run(void (*fn)(void *, int), void *ctx) {
    if (getpid() != owner_) {  // a forked child has no workers: run every part here
      for (int i = 0; i < n_; ++i) fn(ctx, i);
      return;
    }
    if (n_ == 1) return fn(ctx, 0);
    std::lock_guard<std::mutex> caller(run_mutex_);
    fn_ = fn, ctx_ = ctx;
    spin_us_.store(tl_spin_us, std::memory_order_relaxed);
    pending_.store(n_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);  // a worker between its last check and its wait sees this
      epoch_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    fn(ctx, 0);
    while (pending_.load(std::memory_order_acquire) != 0) sched_yield();
  }

 private:
  void work(int i) {
    uint64_t seen = 0;
    int spin_us = 0;
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
      while (epoch_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        sched_yield();  // spin, but let any other runnable thread have this core
      if (epoch_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleeping_.fetch_add(1, std::memory_order_release);
        wake_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_release);
      }
      seen = epoch_.load(std::memory_order_acquire);
      spin_us = spin_us_.load(std::memory_order_relaxed);
      fn_(ctx_, i);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int n_;
  const pid_t owner_ = getpid();
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> pending_{0}, sleeping_{0}, spin_us_{0};
  void (*fn_)(void *, int) = nullptr;
  void *ctx_ = nullptr;
};


static Pool &pool() {
  // never destroyed: at exit the workers may be waiting, and the process ends them (no join to hang on)
  static Pool *p = new Pool(default_threads());
  return *p;
}

void run_parts(void (*job)(void *, int), void *ctx) { pool().run(job, ctx); }
int pool_size() { return pool().size(); }

extern "C" int KernelThreads() { return pool().size(); }
