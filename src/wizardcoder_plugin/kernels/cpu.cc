// Native fp32 CPU kernels: small-row linear layers y[M,N] = x[M,K] . W[N,K]^T (+ b[N]) with W in HF's [out, in]
// layout, on them a GPTBigCode block's decode step (one call, caches written in place), the screened greedy LM
// head (exact argmax from an int8 copy), the prefill's one-pass epilogues, and for training LayerNorm and GELU
// forward and backward, linear layers' backward (a packed GEMM) and the AdamW update.
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

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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
static inline V vset1(float x) { return _mm512_set1_ps(x); }
static inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
static inline void vstore(float *p, V v) { _mm512_storeu_ps(p, v); }
constexpr int GM = 14, GV = 2;  // GEMM micro-tile: 14 rows x 2 vectors (28 accumulators of 32 registers)
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
static inline V vset1(float x) { return _mm256_set1_ps(x); }
static inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
static inline void vstore(float *p, V v) { _mm256_storeu_ps(p, v); }
constexpr int GM = 6, GV = 2;  // 12 accumulators of 16 registers
#else
typedef float V;
constexpr int VW = 1, NR = 4, MR = 2;
static inline V vload(const float *p) { return *p; }
static inline V vfma(V a, V b, V c) { return a * b + c; }
static inline V vzero() { return 0.f; }
static inline float vsum(V v) { return v; }
static inline V vset1(float x) { return x; }
static inline V vadd(V a, V b) { return a + b; }
static inline void vstore(float *p, V v) { *p = v; }
constexpr int GM = 4, GV = 4;
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

// How long the pool's workers spin after a job the calling thread hands them (see Pool). The decode entry points
// ask for 2 ms: their next call comes within ~1 ms (the host's turn between steps takes 0.3-1 ms, and a worker
// woken from its condition variable there added 60-80 us to the step). Training and prefill keep 300 us: between
// their calls MindSpore's own kernels run on every core, and a longer spin slowed a tiny training step by ~3%.
static thread_local int tl_spin_us = 300;
struct SpinFor {
  int saved;
  explicit SpinFor(int us) : saved(tl_spin_us) { tl_spin_us = us; }
  ~SpinFor() { tl_spin_us = saved; }
};

// A fork-join pool: run(job) calls job(0) on the caller and job(1..n-1) on the workers, and returns when all are
// done. Callers are serialized (MindSpore may call from more than one thread). After fork() the child, which has
// no copy of the workers, runs every part itself. Workers spin for the caller's tl_spin_us after a job (yielding
// the core to any other runnable thread), then sleep on a condition variable.
class Pool {
 public:
  explicit Pool(int threads) : n_(threads < 1 ? 1 : threads) {
    for (int i = 1; i < n_; ++i) {
      workers_.emplace_back([this, i] { work(i); });
      pthread_setaffinity_np(workers_.back().native_handle(), sizeof kCpus, &kCpus);  // not the creator's pin
    }
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
    spin_us_.store(tl_spin_us, std::memory_order_relaxed);
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
  std::atomic<int> pending_{0}, sleeping_{0}, spin_us_{0};
  std::function<void(int)> job_;
};

static Pool &pool() {
  // never destroyed: at exit the workers may be waiting, and the process ends them (no join to hang on)
  static Pool *p = new Pool(default_threads());
  return *p;
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
          h[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[i][j]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i][j]), 1)));
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

constexpr int64_t kSerialWork = 1 << 16;  // operations below which one thread beats the hand-off

// How many parts a job of `work` operations is split into: 1 (the caller alone) or the pool's size.
static int64_t parts(int64_t work) { return work < kSerialWork ? 1 : pool().size(); }

// f(part, lo, hi) for `n_parts` consecutive ranges covering [0, n), on the pool when there is more than one.
template <class F>
static void split(int64_t n, int64_t n_parts, F &&f) {
  if (n_parts == 1) return f(0, 0, n);
  pool().run([&](int t) {
    if (t < n_parts) f(t, n * t / n_parts, n * (t + 1) / n_parts);
  });
}

static void linear(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = (N + NR - 1) / NR;
  split(tiles, parts(M * K * N), [&](int, int64_t lo, int64_t hi) { columns(x, w, b, y, M, K, N, lo, hi); });
}

static bool fp32(const char *dtype) { return dtype[0] == 'f' && (dtype[5] == '3' || dtype[5] == '\0'); }

static int64_t product(const int64_t *shape, int n) {
  int64_t total = 1;
  for (int i = 0; i < n; ++i) total *= shape[i];
  return total;
}

// params: x [M,K], W [N,K], optional b [N], y [M,N]
extern "C" int Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                      void *) {
  SpinFor decode_path(2000);
  const bool bias = nparam == 4;
  if ((nparam != 3 && !bias) || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][1]
      || (bias && shapes[2][0] != shapes[1][0]) || !fp32(dtypes[0]) || !fp32(dtypes[1]))
    return 1;
  linear(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
         bias ? static_cast<const float *>(params[2]) : nullptr, static_cast<float *>(params[nparam - 1]),
         shapes[0][0], shapes[0][1], shapes[1][0]);
  return 0;
}

// ------------------------------------------------------------------------------------------------ decoder blocks
// One decode step of a GPTBigCode block in one call that also writes the step's key and value into the caches, so
// a layer is 1 graph kernel instead of ~24: MindSpore on CPU pays 5-20 us per kernel launch, and more (its runtime
// threads waking) after a long kernel, which is most of a small model's step. The math is HF's
// modeling_gpt_bigcode.py, in fp32.

static thread_local std::vector<float> tl_ln, tl_fused, tl_attn, tl_mid, tl_inner;

static inline float bits_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
static inline int32_t float_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// e^a, relative error < 1e-7 on [-87, 87] (clamped there): 2^n p(r), r = a - n ln2 in [-ln2/2, ln2/2], Cephes'
// expf polynomial. Branch-free (a ternary clamp, not fmin/fmax), so the loops calling it vectorize: the tanh-GELU
// of 3072 values takes ~1.6 us this way against ~31 us with std::tanh.
static inline float fast_exp(float a) {
  a = a < -87.f ? -87.f : (a > 87.f ? 87.f : a);
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float t = a * 1.44269504088896341f + shifter;
  const int32_t n = float_bits(t) - float_bits(shifter);
  const float fn = t - shifter;
  const float r = (a - fn * 0.693359375f) + fn * 2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.f) * bits_float((n + 127) << 23);
}

constexpr float kTanhC = 0.79788456080286536f, kTanhA = 0.044715f, kInvSqrt2 = 0.70710678118654752f;

// y[i] = GELU(x[i]) for i in [lo, hi): the exact erf form, or HF's tanh form as x sigmoid(2z),
// z = sqrt(2/pi) (x + 0.044715 x^3) (equal to 0.5 x (1 + tanh z)).
static void gelu(const float *x, float *y, int64_t lo, int64_t hi, bool exact) {
  if (exact) {
    for (int64_t i = lo; i < hi; ++i) y[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * kInvSqrt2));
    return;
  }
  for (int64_t i = lo; i < hi; ++i) {
    const float v = x[i];
    y[i] = v / (1.f + fast_exp(-2.f * kTanhC * (v + kTanhA * v * v * v)));
  }
}

static float *scratch(std::vector<float> &v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

static void row_stats(const float *x, int64_t E, float eps, float *mean, float *inv) {
  float m = 0.f, v = 0.f;
  for (int64_t i = 0; i < E; ++i) m += x[i];
  m /= E;
  for (int64_t i = 0; i < E; ++i) v += (x[i] - m) * (x[i] - m);
  *mean = m;
  *inv = 1.f / std::sqrt(v / E + eps);
}

// y[r] = LayerNorm(x[r]) * g + b over E, for `rows` rows.
static void layer_norm(const float *x, const float *g, const float *b, float *y, int64_t rows, int64_t E, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float mean, inv;
    row_stats(x + r * E, E, eps, &mean, &inv);
    for (int64_t i = 0; i < E; ++i) y[r * E + i] = (x[r * E + i] - mean) * inv * g[i] + b[i];
  }
}

static inline float dot(const float *a, const float *b, int64_t n) {
  V acc = vzero();
  int64_t i = 0;
  for (; i + VW <= n; i += VW) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// params: hidden [B,E], ln_1.weight [E], ln_1.bias [E], c_attn.weight [E+2kv*d, E], c_attn.bias [E+2kv*d],
// key cache [B*kv*T, d], value cache [B*kv*T, d], positions [B] int32, attn.c_proj.weight [E,E],
// attn.c_proj.bias [E], ln_2.weight [E], ln_2.bias [E], c_fc.weight [F,E], c_fc.bias [F], mlp.c_proj.weight [E,F],
// mlp.c_proj.bias [E], meta [eps, exact_gelu] -> hidden [B,E] after the block.
// Row b's new key and value are written into the caches in place, at slot positions[b] (clamped to T-1) of its
// cache rows b*kv..b*kv+kv-1, and it attends to slots 0..positions[b]. Head layout of c_attn (HF): multi-query
// (kv = 1) [q (E) | k (d) | v (d)]; multi-head (kv = H) per head [q_h | k_h | v_h]. GELU: exact erf form, or HF's
// tanh form.
extern "C" int DecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  SpinFor decode_path(2000);
  if (nparam != 18 || ndims[0] != 2 || ndims[5] != 2 || ndims[6] != 2 || std::strcmp(dtypes[7], "int32") != 0)
    return 1;
  for (int i = 0; i < nparam; ++i)
    if (i != 7 && !fp32(dtypes[i])) return 1;
  const int64_t B = shapes[0][0], E = shapes[0][1], C = shapes[3][0], d = shapes[5][1], F = shapes[12][0];
  const int64_t kv = (C - E) / 2 / d, H = E / d, T = shapes[5][0] / (B * kv), G = H / kv;
  if (C != E + 2 * kv * d || shapes[3][1] != E || kv < 1 || H % kv != 0 || T * B * kv != shapes[5][0]
      || shapes[6][0] != shapes[5][0] || shapes[6][1] != d || shapes[8][0] != E || shapes[8][1] != E
      || shapes[12][1] != E || shapes[14][0] != E || shapes[14][1] != F)
    return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const float *hidden = in(0);
  float *keys = static_cast<float *>(params[5]), *values = static_cast<float *>(params[6]);
  const int32_t *positions = static_cast<const int32_t *>(params[7]);
  const float eps = in(16)[0], scale = 1.f / std::sqrt(static_cast<float>(d));
  const bool exact = in(16)[1] != 0.f;
  float *out = static_cast<float *>(params[17]);

  // attention half: out = hidden + c_proj(attention(c_attn(LN_1(hidden))))
  float *ln = scratch(tl_ln, B * E), *fused = scratch(tl_fused, B * C), *attn = scratch(tl_attn, B * E);
  layer_norm(hidden, in(1), in(2), ln, B, E, eps);
  linear(ln, in(3), in(4), fused, B, E, C);
  auto position = [&](int64_t b) { return std::min<int64_t>(std::max<int32_t>(positions[b], 0), T - 1); };
  auto q_at = [&](int64_t b, int64_t h) { return fused + b * C + (kv == 1 ? h * d : h * 3 * d); };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < kv; ++g) {
      const int64_t slot = ((b * kv + g) * T + position(b)) * d;
      std::memcpy(keys + slot, fused + b * C + (kv == 1 ? E : g * 3 * d + d), d * sizeof(float));
      std::memcpy(values + slot, fused + b * C + (kv == 1 ? E + d : g * 3 * d + 2 * d), d * sizeof(float));
    }
  auto head = [&](int64_t unit, std::vector<float> &scores) {
    const int64_t b = unit / H, h = unit % H, row = b * kv + h / G, p = position(b);
    const float *q = q_at(b, h), *kc = keys + row * T * d, *vc = values + row * T * d;
    scores.resize(p + 1);
    float top = -INFINITY;
    for (int64_t t = 0; t <= p; ++t) {
      scores[t] = dot(q, kc + t * d, d) * scale;
      top = std::max(top, scores[t]);
    }
    float total = 0.f;
    for (int64_t t = 0; t <= p; ++t) scores[t] = fast_exp(scores[t] - top);
    for (int64_t t = 0; t <= p; ++t) total += scores[t];
    float *o = attn + b * E + h * d;
    for (int64_t i = 0; i < d; ++i) o[i] = 0.f;
    for (int64_t t = 0; t <= p; ++t) {
      const float w = scores[t] / total, *vt = vc + t * d;
      for (int64_t i = 0; i < d; ++i) o[i] += w * vt[i];
    }
  };
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += H * (position(b) + 1) * d;
  split(B * H, parts(work), [&](int, int64_t lo, int64_t hi) {
    std::vector<float> scores;
    for (int64_t u = lo; u < hi; ++u) head(u, scores);
  });
  float *mid = scratch(tl_mid, B * E);
  linear(attn, in(8), in(9), mid, B, E, E);
  for (int64_t i = 0; i < B * E; ++i) mid[i] += hidden[i];

  // MLP half: out = mid + c_proj(GELU(c_fc(LN_2(mid))))
  float *inner = scratch(tl_inner, B * F);
  layer_norm(mid, in(10), in(11), ln, B, E, eps);
  linear(ln, in(12), in(13), inner, B, E, F);
  gelu(inner, inner, 0, B * F, exact);
  linear(inner, in(14), in(15), out, B, F, E);
  for (int64_t i = 0; i < B * E; ++i) out[i] += mid[i];
  return 0;
}

// ------------------------------------------------------------------------------------------- greedy LM head
// The next token of greedy decoding, argmax_v x . W[v] with x = LN_f(h), without reading all of the fp32 head.
// The screen: W[v] ~ s_v Q[v] (int8, per-row scale) and x ~ s_x X (int16, |X| <= 8191), so x.W[v] ~ s_v s_x X.Q[v],
// an integer dot product computed exactly (int32 lanes cannot overflow for E < 32768). Its error is at most
// |x| c1_v + |x - s_x X| c2_v, where c1_v covers |W[v] - s_v Q[v]| and the fp32 rounding of the re-scoring dot
// product, and c2_v = |s_v Q[v]| (Cauchy-Schwarz; float64 on the host, `kernels/head.py`). A row whose upper bound
// is below the best lower bound of any row cannot be the argmax; the rows left are re-scored on the fp32 weights
// and the first maximum wins, so the token is the fp32 argmax, at a quarter of the weight bytes read. Where too
// many rows are left (a nearly flat distribution, non-finite values) the whole row is scored in fp32.

constexpr int32_t kHiddenLevels = 8191;

#if defined(__AVX512BW__)
typedef __m512i IV;
constexpr int IW = 32, QMR = 4;  // int16 lanes per vector; hidden rows per tile (16 accumulators)
static inline IV iload_q(const int8_t *p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
}
static inline IV iload_x(const int16_t *p) { return _mm512_loadu_si512(p); }
static inline IV izero() { return _mm512_setzero_si512(); }
#if defined(__AVX512VNNI__)
static inline IV idot(IV acc, IV a, IV b) { return _mm512_dpwssd_epi32(acc, a, b); }
#else
static inline IV idot(IV acc, IV a, IV b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
#endif
static inline int32_t isum(IV v) { return _mm512_reduce_add_epi32(v); }
#elif defined(__AVX2__)
typedef __m256i IV;
constexpr int IW = 16, QMR = 2;
static inline IV iload_q(const int8_t *p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}
static inline IV iload_x(const int16_t *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }
static inline IV izero() { return _mm256_setzero_si256(); }
static inline IV idot(IV acc, IV a, IV b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
static inline int32_t isum(IV v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
#else
typedef int32_t IV;
constexpr int IW = 1, QMR = 2;
static inline IV iload_q(const int8_t *p) { return *p; }
static inline IV iload_x(const int16_t *p) { return *p; }
static inline IV izero() { return 0; }
static inline IV idot(IV acc, IV a, IV b) { return acc + a * b; }
static inline int32_t isum(IV v) { return v; }
#endif

// sums[i][j] = X[i] . Q[j] for mr rows of X and 4 rows of Q.
template <int mr>
static inline void qtile(const int16_t *x, const int8_t *q, int64_t K, int32_t sums[][4]) {
  IV acc[mr][4];
#pragma GCC unroll 8
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = izero();
  int64_t k = 0;
  for (; k + IW <= K; k += IW) {
    IV wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      wv[j] = iload_q(q + j * K + k);
      __builtin_prefetch(q + (j + 8) * K + k);  // two tiles ahead: from DRAM, 20 -> 26 GB/s measured
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; ++i) {
      IV xv = iload_x(x + i * K + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = idot(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < 4; ++j) {
      int32_t s = isum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += int32_t(x[i * K + kk]) * q[j * K + kk];
      sums[i][j] = s;
    }
}

struct Survivor {
  int64_t row;
  double upper;
};

// One part's screen of vocabulary rows [lo, hi) for every hidden row b: its best lower bound, and the rows whose
// upper bound reached the best lower bound seen so far (pruned as it rises).
struct Screen {
  std::vector<double> best;
  std::vector<std::vector<Survivor>> kept;
  std::vector<size_t> prune_at;
};

// Per hidden row: the int16 levels X, the scale s_x, |x| and |x - s_x X| (both rounded up a little).
struct Levels {
  std::vector<int16_t> x;
  std::vector<double> scale, norm, error;
};

static void quantize_hidden(const float *x, int64_t B, int64_t K, Levels &l) {
  l.x.resize(B * K);
  l.scale.resize(B), l.norm.resize(B), l.error.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    const float *xb = x + b * K;
    double top = 0., norm = 0., error = 0.;
    for (int64_t k = 0; k < K; ++k) top = std::max(top, std::fabs(static_cast<double>(xb[k])));
    const double scale = top > 0. ? top / kHiddenLevels : 1.;
    for (int64_t k = 0; k < K; ++k) {
      const double level = std::nearbyint(xb[k] / scale), diff = xb[k] - level * scale;
      l.x[b * K + k] = static_cast<int16_t>(std::max(-32767., std::min(32767., level)));
      norm += static_cast<double>(xb[k]) * xb[k];
      error += diff * diff;
    }
    l.scale[b] = scale;
    l.norm[b] = std::sqrt(norm) * (1. + 1e-12);
    l.error[b] = std::sqrt(error) * (1. + 1e-12);
  }
}

static void screen_rows(const Levels &l, const int8_t *q, const float *info, int64_t B, int64_t K, int64_t lo,
                        int64_t hi, Screen &s) {
  s.best.assign(B, -INFINITY);
  s.kept.assign(B, {});
  s.prune_at.assign(B, 256);
  int32_t sums[QMR][4];
  auto take = [&](int64_t b, int64_t v, int32_t dot_q) {
    const float *row = info + 3 * v;
    {  // most rows fall far below the best: rule them out in fp32 (1e-6 covers its rounding), then in float64
      const float approx = row[0] * static_cast<float>(l.scale[b]) * static_cast<float>(dot_q);
      const float slack = static_cast<float>(l.norm[b]) * row[1] + static_cast<float>(l.error[b]) * row[2];
      if (approx + slack + 1e-6f * (std::fabs(approx) + slack) < s.best[b]) return;
    }
    const double approx = static_cast<double>(row[0]) * l.scale[b] * dot_q;
    const double slack = l.norm[b] * row[1] + l.error[b] * row[2];
    if (approx - slack > s.best[b]) s.best[b] = approx - slack;
    if (approx + slack >= s.best[b]) {
      std::vector<Survivor> &kept = s.kept[b];
      if (kept.size() >= s.prune_at[b]) {  // drop the rows the risen lower bound has ruled out
        const double floor = s.best[b];
        kept.erase(std::remove_if(kept.begin(), kept.end(), [floor](const Survivor &c) { return c.upper < floor; }),
                   kept.end());
        if (kept.size() * 2 > s.prune_at[b]) s.prune_at[b] *= 2;  // a flat row: prune less often
      }
      kept.push_back({v, approx + slack});
    }
  };
  int64_t v = lo;
  for (; v + 4 <= hi; v += 4)
    for (int64_t b = 0; b < B; b += QMR) {
      const int64_t m = std::min<int64_t>(QMR, B - b);
      const int16_t *xb = l.x.data() + b * K;
      if constexpr (QMR == 4) {
        switch (m) {
          case 4: qtile<4>(xb, q + v * K, K, sums); break;
          case 3: qtile<3>(xb, q + v * K, K, sums); break;
          case 2: qtile<2>(xb, q + v * K, K, sums); break;
          default: qtile<1>(xb, q + v * K, K, sums); break;
        }
      } else {
        if (m == 2) qtile<2>(xb, q + v * K, K, sums);
        else qtile<1>(xb, q + v * K, K, sums);
      }
      for (int64_t i = 0; i < m; ++i)
        for (int j = 0; j < 4; ++j) take(b + i, v + j, sums[i][j]);
    }
  for (; v < hi; ++v)
    for (int64_t b = 0; b < B; ++b) {
      int32_t d = 0;
      for (int64_t k = 0; k < K; ++k) d += int32_t(l.x[b * K + k]) * q[v * K + k];
      take(b, v, d);
    }
}

static thread_local std::vector<float> tl_logits;

// params: hidden [B,E], ln_f.weight [E], ln_f.bias [E], W [V,E] fp32, Q [V,E] int8, info [V,3] (s_v, c1_v, c2_v),
// meta [eps] -> token ids [B] int64 (as ArgMaxWithValue gives them).
extern "C" int GreedyHead(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  SpinFor decode_path(2000);
  if (nparam != 8 || ndims[0] != 2 || ndims[3] != 2 || ndims[4] != 2 || ndims[5] != 2
      || std::strcmp(dtypes[4], "int8") != 0 || std::strcmp(dtypes[7], "int64") != 0)
    return 1;
  for (int i : {0, 1, 2, 3, 5, 6})
    if (!fp32(dtypes[i])) return 1;
  const int64_t B = shapes[0][0], E = shapes[0][1], Vocab = shapes[3][0];
  if (shapes[3][1] != E || shapes[4][0] != Vocab || shapes[4][1] != E || shapes[5][0] != Vocab || shapes[5][1] != 3
      || E >= 32768)
    return 1;
  const float *w = static_cast<const float *>(params[3]), *info = static_cast<const float *>(params[5]);
  const int8_t *q = static_cast<const int8_t *>(params[4]);
  const float eps = static_cast<const float *>(params[6])[0];
  int64_t *ids = static_cast<int64_t *>(params[7]);

  float *x = scratch(tl_ln, B * E);
  layer_norm(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
             static_cast<const float *>(params[2]), x, B, E, eps);
  Levels levels;
  quantize_hidden(x, B, E, levels);
  const int64_t n_parts = parts(B * E * Vocab);
  std::vector<Screen> screens(n_parts);
  split(Vocab, n_parts, [&](int t, int64_t lo, int64_t hi) { screen_rows(levels, q, info, B, E, lo, hi, screens[t]); });
  const size_t limit = std::max<int64_t>(64, Vocab / 64);
  for (int64_t b = 0; b < B; ++b) {
    double best = -INFINITY;
    for (const Screen &s : screens) best = std::max(best, s.best[b]);
    std::vector<int64_t> rows;  // ascending: the parts cover consecutive ranges, each in order
    for (const Screen &s : screens)
      for (const Survivor &c : s.kept[b])
        if (c.upper >= best) rows.push_back(c.row);
    const float *xb = x + b * E;
    int64_t top = 0;
    if (rows.empty() || rows.size() > limit) {  // score the whole row in fp32
      float *logits = scratch(tl_logits, Vocab);
      linear(xb, w, nullptr, logits, 1, E, Vocab);
      for (int64_t v = 1; v < Vocab; ++v)
        if (logits[v] > logits[top]) top = v;
    } else {
      float top_score = -INFINITY;
      top = rows[0];
      for (int64_t v : rows) {
        const float score = dot(xb, w + v * E, E);
        if (score > top_score) top_score = score, top = v;
      }
    }
    ids[b] = top;
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------ prefill
// A prefill keeps MindSpore's MatMul (near the cores' peak for hundreds of rows) and replaces what follows it: its
// CPU bias Add, residual Add and the five elementwise kernels of GELU each cost a pass over [rows, N] (with
// LayerNorm, ~40% of a tiny_starcoder prefill of 256 tokens, measured); these are one pass each.

// params: y [R,N], b [N], optional residual [R,N] -> y + b (+ residual)
extern "C" int BiasAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                       void *) {
  const bool residual = nparam == 4;
  if ((nparam != 3 && !residual) || ndims[0] != 2 || !fp32(dtypes[0]) || !fp32(dtypes[1])
      || shapes[1][0] != shapes[0][1] || (residual && (!fp32(dtypes[2]) || product(shapes[2], ndims[2]) !=
                                                                              shapes[0][0] * shapes[0][1])))
    return 1;
  const int64_t R = shapes[0][0], N = shapes[0][1];
  const float *y = static_cast<const float *>(params[0]), *b = static_cast<const float *>(params[1]);
  const float *r = residual ? static_cast<const float *>(params[2]) : nullptr;
  float *out = static_cast<float *>(params[nparam - 1]);
  split(R, parts(R * N), [&](int, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t j = 0; j < N; ++j) out[i * N + j] = y[i * N + j] + b[j] + (r ? r[i * N + j] : 0.f);
  });
  return 0;
}

// params: y [R,N], b [N], meta [exact] -> GELU(y + b) (the forms of gelu())
extern "C" int BiasGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                        void *) {
  if (nparam != 4 || ndims[0] != 2 || !fp32(dtypes[0]) || !fp32(dtypes[1]) || shapes[1][0] != shapes[0][1])
    return 1;
  const int64_t R = shapes[0][0], N = shapes[0][1];
  const float *y = static_cast<const float *>(params[0]), *b = static_cast<const float *>(params[1]);
  const bool exact = static_cast<const float *>(params[2])[0] != 0.f;
  float *out = static_cast<float *>(params[3]);
  split(R, parts(R * N * 8), [&](int, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      for (int64_t j = 0; j < N; ++j) out[i * N + j] = y[i * N + j] + b[j];
      gelu(out + i * N, out + i * N, 0, N, exact);
    }
  });
  return 0;
}


// ------------------------------------------------------------------------------------ linear backward (training)
// MindSpore 2.9's CPU MatMul runs the backward products of a linear layer at 160-300 GFLOP/s on one Xeon where its
// forward x W^T reaches ~340 (measured per shape: the qkv layer's dx and dW, [1024, 896] x [896, 768], at ~170;
// the MLP's output layer so slowly that the trainer had split it in two). This is a packed GEMM in the usual
// structure (Goto/BLIS): for each block of KC of the inner dimension, the right operand's block is packed into
// panels of GN columns (kept in L2), and each GM-row panel of the left one (kept in L1) meets every column panel
// in a GM x GN register tile. Packing reads any layout, so one routine serves dx = dy W and dW = dy^T x.

constexpr int GN = GV * VW;
constexpr int64_t GKC = 256, GNC = GN * 32;

// C tile [rows, cols] (row stride ldc) = (or +=) Ap [kc, GM] . Bp [kc, GN], from zero-padded panels.
static inline void gemm_tile(const float *__restrict Ap, const float *__restrict Bp, int64_t kc, float *C,
                             int64_t ldc, int rows, int cols, bool add) {
  V acc[GM][GV];
#pragma GCC unroll 16
  for (int i = 0; i < GM; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < GV; ++v) acc[i][v] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    V b[GV];
#pragma GCC unroll 4
    for (int v = 0; v < GV; ++v) b[v] = vload(Bp + k * GN + v * VW);
    __builtin_prefetch(Bp + (k + 8) * GN);
    __builtin_prefetch(Bp + (k + 8) * GN + GN / 2);
#pragma GCC unroll 16
    for (int i = 0; i < GM; ++i) {
      const V a = vset1(Ap[k * GM + i]);
#pragma GCC unroll 4
      for (int v = 0; v < GV; ++v) acc[i][v] = vfma(a, b[v], acc[i][v]);
    }
  }
  if (rows == GM && cols == GN) {
#pragma GCC unroll 16
    for (int i = 0; i < GM; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < GV; ++v)
        vstore(C + i * ldc + v * VW, add ? vadd(acc[i][v], vload(C + i * ldc + v * VW)) : acc[i][v]);
    return;
  }
  float t[GM][GN];
  for (int i = 0; i < GM; ++i)
    for (int v = 0; v < GV; ++v) vstore(&t[i][v * VW], acc[i][v]);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) C[i * ldc + j] = add ? C[i * ldc + j] + t[i][j] : t[i][j];
}

// A strided matrix: element (r, c) at p[r * rs + c * cs].
struct Strided {
  const float *p;
  int64_t rs, cs;
  float at(int64_t r, int64_t c) const { return p[r * rs + c * cs]; }
};

// B[k0 : k0+kc, j0 : j0+nc] into panels of GN columns (k-major inside a panel), zero from column N on.
static void pack_columns(Strided b, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int64_t N, float *out) {
  for (int64_t jp = 0; jp < nc; jp += GN) {
    float *dst = out + jp * kc;
    const int64_t cols = std::min<int64_t>(GN, N - j0 - jp);
    for (int64_t k = 0; k < kc; ++k) {
      const float *src = b.p + (k0 + k) * b.rs + (j0 + jp) * b.cs;
      int64_t j = 0;
      if (b.cs == 1)
        for (; j < cols; ++j) dst[k * GN + j] = src[j];
      else
        for (; j < cols; ++j) dst[k * GN + j] = src[j * b.cs];
      for (; j < GN; ++j) dst[k * GN + j] = 0.f;
    }
  }
}

// A[i0 : i0+GM, k0 : k0+kc] as one panel (k-major), zero past row M.
static void pack_rows(Strided a, int64_t i0, int64_t M, int64_t k0, int64_t kc, float *out) {
  const int64_t rows = std::min<int64_t>(GM, M - i0);
  if (a.rs == 1) {  // a column of the panel is contiguous
    for (int64_t k = 0; k < kc; ++k) {
      const float *src = a.p + (k0 + k) * a.cs + i0;
      int64_t i = 0;
      for (; i < rows; ++i) out[k * GM + i] = src[i];
      for (; i < GM; ++i) out[k * GM + i] = 0.f;
    }
    return;
  }
  for (int64_t i = 0; i < GM; ++i)
    for (int64_t k = 0; k < kc; ++k) out[k * GM + i] = i < rows ? a.at(i0 + i, k0 + k) : 0.f;
}

static thread_local std::vector<float> tl_pack_a, tl_pack_b;

// C[m0:m1, n0:n1] = A[m0:m1, :] . B[:, n0:n1] on the calling thread; C is row-major [., N].
static void gemm_block(Strided a, Strided b, float *c, int64_t N, int64_t K, int64_t m0, int64_t m1, int64_t n0,
                       int64_t n1) {
  float *ap = scratch(tl_pack_a, GM * GKC), *bp = scratch(tl_pack_b, GNC * GKC);
  for (int64_t jc = n0; jc < n1; jc += GNC) {
    const int64_t nc = std::min(GNC, n1 - jc);
    for (int64_t pc = 0; pc < K; pc += GKC) {
      const int64_t kc = std::min(GKC, K - pc);
      pack_columns(b, pc, kc, jc, nc, n1, bp);
      for (int64_t ir = m0; ir < m1; ir += GM) {
        pack_rows(a, ir, m1, pc, kc, ap);
        const int rows = static_cast<int>(std::min<int64_t>(GM, m1 - ir));
        for (int64_t jr = 0; jr < nc; jr += GN)
          gemm_tile(ap, bp + jr * kc, kc, c + ir * N + jc + jr, N, rows,
                    static_cast<int>(std::min<int64_t>(GN, nc - jr)), pc > 0);
      }
    }
  }
}

// C [M,N] = A [M,K] . B [K,N], split between the pool's threads along the longer output side (each thread packs
// the operand it shares; that copy is the smaller one).
static void gemm(Strided a, Strided b, float *c, int64_t M, int64_t N, int64_t K) {
  const int64_t n_parts = parts(M * N * K);
  if (N >= M) {
    const int64_t panels = (N + GN - 1) / GN;
    split(panels, std::min(n_parts, panels), [&](int, int64_t lo, int64_t hi) {
      gemm_block(a, b, c, N, K, 0, M, lo * GN, std::min(N, hi * GN));
    });
  } else {
    const int64_t tiles = (M + GM - 1) / GM;
    split(tiles, std::min(n_parts, tiles), [&](int, int64_t lo, int64_t hi) {
      gemm_block(a, b, c, N, K, lo * GM, std::min(M, hi * GM), 0, N);
    });
  }
}

// params: x [M,K], W [N,K], dy [M,N] -> dx [M,K] = dy W, dW [N,K] = dy^T x, db [N] = column sums of dy
// (the backward of y = x W^T + b).
extern "C" int LinearBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  if (nparam != 6 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  for (int i = 0; i < 3; ++i)
    if (!fp32(dtypes[i])) return 1;
  const int64_t M = shapes[0][0], K = shapes[0][1], N = shapes[1][0];
  if (shapes[1][1] != K || shapes[2][0] != M || shapes[2][1] != N) return 1;
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]), *dw = static_cast<float *>(params[4]);
  float *db = static_cast<float *>(params[5]);
  gemm({dy, N, 1}, {w, K, 1}, dx, M, K, N);
  gemm({dy, 1, N}, {x, K, 1}, dw, N, K, M);
  split(N, parts(M * N), [&](int, int64_t lo, int64_t hi) {
    std::fill(db + lo, db + hi, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = lo; j < hi; ++j) db[j] += dy[m * N + j];
  });
  return 0;
}

// -------------------------------------------------------------------------------- LayerNorm (training, prefill)
// MindSpore 2.9's CPU LayerNormGrad takes ~14 ms on [1024, 768] (about 0.5 s of a tiny_starcoder training step);
// these take well under 1 ms. The backward recomputes each row's mean and 1/std from x (cheaper than storing them).

// params: x [..., E], weight [E], bias [E], meta [eps] -> y [..., E]
extern "C" int LayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *, void *) {
  if (nparam != 5 || !fp32(dtypes[0]) || !fp32(dtypes[1]) || !fp32(dtypes[2])) return 1;
  const int64_t E = shapes[0][ndims[0] - 1], R = product(shapes[0], ndims[0] - 1);
  const float *x = static_cast<const float *>(params[0]), *g = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]), eps = static_cast<const float *>(params[3])[0];
  float *y = static_cast<float *>(params[4]);
  split(R, parts(R * E), [&](int, int64_t lo, int64_t hi) {
    layer_norm(x + lo * E, g, b, y + lo * E, hi - lo, E, eps);
  });
  return 0;
}

// params: x [..., E], weight [E], dy [..., E], meta [eps] -> dx [..., E], dweight [E], dbias [E]
extern "C" int LayerNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *, void *) {
  if (nparam != 7 || !fp32(dtypes[0]) || !fp32(dtypes[1]) || !fp32(dtypes[2])) return 1;
  const int64_t E = shapes[0][ndims[0] - 1], R = product(shapes[0], ndims[0] - 1);
  const float *x = static_cast<const float *>(params[0]), *g = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]), eps = static_cast<const float *>(params[3])[0];
  float *dx = static_cast<float *>(params[4]), *dg = static_cast<float *>(params[5]);
  float *db = static_cast<float *>(params[6]);
  const int64_t T = parts(R * E);
  std::vector<float> partial(2 * T * E, 0.f);  // per-part dweight, dbias: summed below in a fixed order
  split(R, T, [&](int t, int64_t lo, int64_t hi) {
    float *pg = partial.data() + 2 * t * E, *pb = pg + E;
    for (int64_t r = lo; r < hi; ++r) {
      const float *xr = x + r * E, *dyr = dy + r * E;
      float mean, inv, s1 = 0.f, s2 = 0.f;
      row_stats(xr, E, eps, &mean, &inv);
      for (int64_t i = 0; i < E; ++i) {
        const float xh = (xr[i] - mean) * inv, gd = dyr[i] * g[i];
        s1 += gd;
        s2 += gd * xh;
        pg[i] += dyr[i] * xh;
        pb[i] += dyr[i];
      }
      s1 /= E;
      s2 /= E;
      for (int64_t i = 0; i < E; ++i) dx[r * E + i] = inv * (dyr[i] * g[i] - s1 - (xr[i] - mean) * inv * s2);
    }
  });
  for (int64_t i = 0; i < E; ++i) {
    float sg = 0.f, sb = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      sg += partial[2 * t * E + i];
      sb += partial[2 * t * E + E + i];
    }
    dg[i] = sg;
    db[i] = sb;
  }
  return 0;
}

// ----------------------------------------------------------------------------------------------- AdamW (training)
// torch.optim.AdamW's update of one parameter in one pass, in place: MindSpore's path is a decay pass, a gradient
// scaling pass, ApplyAdam and a pass zeroing the accumulator (0.37 s per tiny_starcoder step); this reads p, m, v
// and g once and writes them once.

// params: p [...], m [...], v [...], g [...] (the fp32 accumulator), hyper [lr, grad_coef, bc1, bc2, beta1,
// beta2, eps], decay [1] -> done [1]. p, m, v are updated and g zeroed in place:
//   p <- p (1 - lr decay); g' = g grad_coef; m <- b1 m + (1 - b1) g'; v <- b2 v + (1 - b2) g'^2;
//   p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
extern "C" int AdamWStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (nparam != 7) return 1;
  for (int i = 0; i < 6; ++i)
    if (!fp32(dtypes[i])) return 1;
  const int64_t n = product(shapes[0], ndims[0]);
  for (int i = 1; i < 4; ++i)
    if (product(shapes[i], ndims[i]) != n) return 1;
  if (product(shapes[4], ndims[4]) != 7) return 1;
  float *p = static_cast<float *>(params[0]), *m = static_cast<float *>(params[1]);
  float *v = static_cast<float *>(params[2]), *g = static_cast<float *>(params[3]);
  const float *h = static_cast<const float *>(params[4]);
  const float lr = h[0], coef = h[1], b1 = h[4], b2 = h[5], eps = h[6];
  const float keep = 1.f - lr * static_cast<const float *>(params[5])[0];
  const float step = static_cast<float>(static_cast<double>(lr) / h[2]);
  const float inv_sqrt_bc2 = static_cast<float>(1. / std::sqrt(static_cast<double>(h[3])));
  split(n, parts(n * 8), [&](int, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float gi = g[i] * coef, mi = b1 * m[i] + (1.f - b1) * gi, vi = b2 * v[i] + (1.f - b2) * gi * gi;
      p[i] = p[i] * keep - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
      m[i] = mi;
      v[i] = vi;
      g[i] = 0.f;
    }
  });
  static_cast<float *>(params[6])[0] = 0.f;
  return 0;
}

// params: g [...], total [1] -> total + sum(g^2) [1]: the gradient norm's square one tensor at a time in one pass
// (MindSpore: a multiply and two reductions per tensor, 0.13 s per tiny_starcoder step), each part summed in
// float64 and the parts added in a fixed order.
extern "C" int SumSquares(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  if (nparam != 3 || !fp32(dtypes[0]) || !fp32(dtypes[1]) || product(shapes[1], ndims[1]) != 1) return 1;
  const int64_t n = product(shapes[0], ndims[0]);
  const float *g = static_cast<const float *>(params[0]);
  const int64_t n_parts = parts(n * 4);
  std::vector<double> partial(n_parts, 0.);
  split(n, n_parts, [&](int t, int64_t lo, int64_t hi) {
    double lane[8] = {0., 0., 0., 0., 0., 0., 0., 0.};  // 8 independent sums: the loop vectorizes
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8)
      for (int j = 0; j < 8; ++j) lane[j] += static_cast<double>(g[i + j]) * g[i + j];
    double sum = 0.;
    for (; i < hi; ++i) sum += static_cast<double>(g[i]) * g[i];
    for (int j = 0; j < 8; ++j) sum += lane[j];
    partial[t] = sum;
  });
  double total = static_cast<const float *>(params[1])[0];
  for (double x : partial) total += x;
  static_cast<float *>(params[2])[0] = static_cast<float>(total);
  return 0;
}

// ----------------------------------------------------------------------------------- cross-entropy (training)
// MindSpore's LogSoftmax, GatherD and their gradients are ~100 ms of a tiny_starcoder step on [1024, 49153]
// logits; these are two passes forward (max, then the sum of exponentials) and one backward (the forward's log-sum-
// exp saved), each row on one thread.

constexpr int kLanes = 16;  // independent partial results per row: the loops vectorize

static float row_log_sum_exp(const float *x, int64_t V) {
  float lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = -INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
  float top = -INFINITY;
  for (; i < V; ++i) top = x[i] > top ? x[i] : top;
  for (int j = 0; j < kLanes; ++j) top = lane[j] > top ? lane[j] : top;
  if (!std::isfinite(top)) return top;  // inf or NaN logits: the loss says so
  for (int j = 0; j < kLanes; ++j) lane[j] = 0.f;
  for (i = 0; i + kLanes <= V; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += fast_exp(x[i + j] - top);
  float sum = 0.f;
  for (; i < V; ++i) sum += fast_exp(x[i] - top);
  for (int j = 0; j < kLanes; ++j) sum += lane[j];
  return top + std::log(sum);
}

// params: logits [R,V], labels [R] int32 (-100: ignored) -> nll [R] (0 where ignored), lse [R]
extern "C" int CrossEntropyForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  if (nparam != 4 || ndims[0] != 2 || !fp32(dtypes[0]) || std::strcmp(dtypes[1], "int32") != 0
      || product(shapes[1], ndims[1]) != shapes[0][0])
    return 1;
  const int64_t R = shapes[0][0], V = shapes[0][1];
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *label = static_cast<const int32_t *>(params[1]);
  float *nll = static_cast<float *>(params[2]), *lse = static_cast<float *>(params[3]);
  for (int64_t r = 0; r < R; ++r)
    if (label[r] != -100 && (label[r] < 0 || label[r] >= V)) return 1;  // an id past the vocabulary
  split(R, parts(R * V * 4), [&](int, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      lse[r] = row_log_sum_exp(x + r * V, V);
      nll[r] = label[r] == -100 ? 0.f : lse[r] - x[r * V + label[r]];
    }
  });
  return 0;
}

// params: logits [R,V], labels [R], lse [R], dnll [R] -> dlogits [R,V] = (softmax - onehot(label)) dnll
extern "C" int CrossEntropyBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *, void *) {
  if (nparam != 5 || ndims[0] != 2 || !fp32(dtypes[0]) || std::strcmp(dtypes[1], "int32") != 0
      || !fp32(dtypes[2]) || !fp32(dtypes[3]))
    return 1;
  const int64_t R = shapes[0][0], V = shapes[0][1];
  const float *x = static_cast<const float *>(params[0]), *lse = static_cast<const float *>(params[2]);
  const int32_t *label = static_cast<const int32_t *>(params[1]);
  const float *g = static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  split(R, parts(R * V * 4), [&](int, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float *xr = x + r * V;
      float *d = dx + r * V;
      if (label[r] == -100) {
        std::fill(d, d + V, 0.f);
        continue;
      }
      const float top = lse[r], scale = g[r];
      for (int64_t i = 0; i < V; ++i) d[i] = fast_exp(xr[i] - top) * scale;
      d[label[r]] -= scale;
    }
  });
  return 0;
}
// ----------------------------------------------------------------------------------------------- GELU (training)
// MindSpore runs the composed GELU as ~5 elementwise kernels forward and ~10 backward over [rows, 4*hidden]
// (each a full pass over memory); these are one pass each (the forms of gelu() above).

// params: x [...], meta [exact] -> y [...]
extern "C" int GeluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  if (nparam != 3 || !fp32(dtypes[0])) return 1;
  const int64_t n = product(shapes[0], ndims[0]);
  const float *x = static_cast<const float *>(params[0]);
  const bool exact = static_cast<const float *>(params[1])[0] != 0.f;
  float *y = static_cast<float *>(params[2]);
  split(n, parts(n), [&](int, int64_t lo, int64_t hi) { gelu(x, y, lo, hi, exact); });
  return 0;
}

// params: x [...], dy [...], meta [exact] -> dx [...]
extern "C" int GeluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  if (nparam != 4 || !fp32(dtypes[0]) || !fp32(dtypes[1])) return 1;
  const int64_t n = product(shapes[0], ndims[0]);
  const float *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  const bool exact = static_cast<const float *>(params[2])[0] != 0.f;
  float *dx = static_cast<float *>(params[3]);
  split(n, parts(n), [&](int, int64_t lo, int64_t hi) {
    if (exact) {  // d/dx 0.5 x (1 + erf(x/sqrt2)) = 0.5 (1 + erf(x/sqrt2)) + x exp(-x^2/2) / sqrt(2 pi)
      for (int64_t i = lo; i < hi; ++i) {
        const float v = x[i];
        dx[i] = dy[i] * (0.5f * (1.f + std::erf(v * kInvSqrt2))
                         + v * std::exp(-0.5f * v * v) * 0.39894228040143268f);
      }
      return;
    }
    for (int64_t i = lo; i < hi; ++i) {  // d/dx x s(2z) = s + x s (1 - s) 2 dz/dx
      const float v = x[i], s = 1.f / (1.f + fast_exp(-2.f * kTanhC * (v + kTanhA * v * v * v)));
      dx[i] = dy[i] * (s + v * s * (1.f - s) * 2.f * kTanhC * (1.f + 3.f * kTanhA * v * v));
    }
  });
  return 0;
}
