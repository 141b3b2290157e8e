// Small-row fp32 linear layers for CPU decoding: y[M,N] = x[M,K] . W[N,K]^T (+ b[N]), W in HF's [out, in] layout.
//
// Why it exists: MindSpore 2.9's CPU MatMul runs a one-row product on one core, so a decode step reads its weights
// at one core's bandwidth. Here the output columns are split between the calling thread and a small pool of its
// own (ZOO_KERNEL_THREADS threads in all, default every CPU the process may use when the library loads), each
// thread streaming its own rows of W once for all M rows of x. The micro-tile is MR rows of x by NR rows of W,
// accumulated in vector registers along K (AVX-512, AVX2+FMA, or plain C).
//
// Not OpenMP: MindSpore calls kernels from several runtime threads, and libgomp keeps a spinning team per calling
// thread, so a few calls left more spinning threads than cores (measured: a decode step 4x slower). The one pool
// here spins briefly between calls (yielding the core to any other runnable thread), then sleeps.
// The entry points follow MindSpore's Custom "aot" calling convention.
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
typedef __m512 V;
constexpr int VW = 16, NR = 4, MR = 4;
static inline V vload(const float *p) { return _mm512_loadu_ps(p); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V vzero() { return _mm512_setzero_ps(); }
static inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 V;
constexpr int VW = 8, NR = 2, MR = 4;  // 16 ymm registers: 8 accumulators, 2 weights, 1 input
static inline V vload(const float *p) { return _mm256_loadu_ps(p); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V vzero() { return _mm256_setzero_ps(); }
static inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
typedef float V;
constexpr int VW = 1, NR = 4, MR = 2;
static inline V vload(const float *p) { return *p; }
static inline V vfma(V a, V b, V c) { return a * b + c; }
static inline V vzero() { return 0.f; }
static inline float vsum(V v) { return v; }
#endif

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
static const cpu_set_t kCpus = load_time_cpus();

static int default_threads() {
  if (const char *env = std::getenv("ZOO_KERNEL_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return CPU_COUNT(&kCpus);
}

// A fork-join pool: run(job) calls job(0) on the caller and job(1..n-1) on the workers, and returns when all are
// done. Callers are serialized (MindSpore may call from more than one thread). After fork() the child, which has
// no copy of the workers, runs every part itself.
class Pool {
 public:
  explicit Pool(int threads) : n_(threads < 1 ? 1 : threads) {
    for (int i = 1; i < n_; ++i) {
      workers_.emplace_back([this, i] { work(i); });
      pthread_setaffinity_np(workers_.back().native_handle(), sizeof kCpus, &kCpus);  // not the creator's pin
    }
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stop_ = true;
      epoch_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto &t : workers_) t.join();
  }
  int size() const { return n_; }

  template <class F>
  void run(F &&job) {
    if (getpid() != owner_) {  // a forked child has no workers: run every part here
      for (int i = 0; i < n_; ++i) job(i);
      return;
    }
    if (n_ == 1) return job(0);
    std::lock_guard<std::mutex> caller(run_mutex_);
    job_ = [&job](int i) { job(i); };
    pending_.store(n_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);  // a worker between its last check and its wait sees this
      epoch_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    job(0);
    while (pending_.load(std::memory_order_acquire) != 0) sched_yield();
  }

 private:
  void work(int i) {
    uint64_t seen = 0;
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(300);
      while (epoch_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        sched_yield();  // spin, but let any other runnable thread have this core
      if (epoch_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleeping_.fetch_add(1, std::memory_order_release);
        wake_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_release);
      }
      seen = epoch_.load(std::memory_order_acquire);
      if (stop_) return;
      job_(i);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int n_;
  const pid_t owner_ = getpid();
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> pending_{0}, sleeping_{0};
  std::function<void(int)> job_;
  bool stop_ = false;
};

static Pool &pool() {
  static Pool p(default_threads());  // first use: threads start only where a kernel runs
  return p;
}

extern "C" int KernelThreads() { return pool().size(); }

// mr rows of x against nr rows of W: mr*nr dot products of length K.
template <int mr, int nr>
static inline void tile(const float *x, const float *w, const float *b, float *y, int64_t K, int64_t N) {
  V acc[mr][nr];
#pragma GCC unroll 8
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < nr; ++j) acc[i][j] = vzero();
  int64_t k = 0;
  for (; k + VW <= K; k += VW) {
    V wv[nr];
#pragma GCC unroll 8
    for (int j = 0; j < nr; ++j) wv[j] = vload(w + j * K + k);
#pragma GCC unroll 8
    for (int i = 0; i < mr; ++i) {
      V xv = vload(x + i * K + k);
#pragma GCC unroll 8
      for (int j = 0; j < nr; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
#if defined(__AVX512F__)
  if constexpr (nr == 4) {
    if (k == K) {  // the common case: four sums per row in one transpose-and-add tree
      for (int i = 0; i < mr; ++i) {
        __m256 h[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
          h[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[i][j]), _mm512_extractf32x8_ps(acc[i][j], 1));
        __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
        __m128 sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        if (b) sums = _mm_add_ps(sums, _mm_loadu_ps(b));
        _mm_storeu_ps(y + i * N, sums);
      }
      return;
    }
  }
#endif
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      float s = vsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * K + kk] * w[j * K + kk];
      y[i * N + j] = b ? s + b[j] : s;
    }
}

// Every row of x against nr rows of W.
template <int nr>
static void rows(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t K, int64_t N) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<MR, nr>(x + m * K, w, b, y + m * N, K, N);
  switch (M - m) {
    case 3: tile<3, nr>(x + m * K, w, b, y + m * N, K, N); break;
    case 2: tile<2, nr>(x + m * K, w, b, y + m * N, K, N); break;
    case 1: tile<1, nr>(x + m * K, w, b, y + m * N, K, N); break;
    default: break;
  }
}

// Output columns [lo, hi) in tiles of NR.
static void columns(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t K, int64_t N,
                    int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    int64_t n = i * NR;
    if (n + NR <= N) {
      rows<NR>(x, w + n * K, b ? b + n : nullptr, y + n, M, K, N);
    } else {
      for (; n < N; ++n) rows<1>(x, w + n * K, b ? b + n : nullptr, y + n, M, K, N);
    }
  }
}

constexpr int64_t kSerialWork = 1 << 16;  // multiply-adds below which one thread beats the hand-off

static void linear(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = (N + NR - 1) / NR;
  if (M * K * N < kSerialWork) return columns(x, w, b, y, M, K, N, 0, tiles);
  Pool &p = pool();
  const int64_t T = p.size();
  p.run([&](int t) { columns(x, w, b, y, M, K, N, tiles * t / T, tiles * (t + 1) / T); });
}

static bool fp32(const char *dtype) { return dtype[0] == 'f' && (dtype[5] == '3' || dtype[5] == '\0'); }

// params: x [M,K], W [N,K], b [N], y [M,N]
extern "C" int LinearBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][1] || shapes[2][0] != shapes[1][0]
      || !fp32(dtypes[0]) || !fp32(dtypes[1]))
    return 1;
  linear(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
         static_cast<const float *>(params[2]), static_cast<float *>(params[3]), shapes[0][0], shapes[0][1],
         shapes[1][0]);
  return 0;
}

// params: x [M,K], W [N,K], y [M,N]
extern "C" int Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                      void *) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][1] || !fp32(dtypes[0])
      || !fp32(dtypes[1]))
    return 1;
  linear(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]), nullptr,
         static_cast<float *>(params[2]), shapes[0][0], shapes[0][1], shapes[1][0]);
  return 0;
}
