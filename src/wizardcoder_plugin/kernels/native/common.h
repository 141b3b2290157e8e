// Shared by every kernel file: the SIMD vocabulary, the fork-join thread pool, and small math helpers.
//
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
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdlib>
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

// How long the pool's workers spin after a job the calling thread hands them (see Pool). The decode entry points
// ask for 2 ms: their next call comes within ~1 ms (the host's turn between steps takes 0.3-1 ms, and a worker
// woken from its condition variable there added 60-80 us to the step). Training and prefill keep 300 us: between
// their calls MindSpore's own kernels run on every core, and a longer spin slowed a tiny training step by ~3%.
extern thread_local int tl_spin_us;
struct SpinFor {
  int saved;
  explicit SpinFor(int us) : saved(tl_spin_us) { tl_spin_us = us; }
  ~SpinFor() { tl_spin_us = saved; }
};

// The library's fork-join pool (pool.cc): run_parts(job, ctx) calls job(ctx, 0) on the calling thread and
// job(ctx, 1..n-1) on its workers, and returns when all are done; pool_size() is n, the caller included.
void run_parts(void (*job)(void *, int), void *ctx);
int pool_size();

constexpr int64_t kSerialWork = 1 << 16;  // operations below which one thread beats the hand-off

// How many parts a job of `work` operations is split into: 1 (the caller alone) or the pool's size.
static int64_t parts(int64_t work) { return work < kSerialWork ? 1 : pool_size(); }

// f(part, lo, hi) for `n_parts` consecutive ranges covering [0, n), on the pool when there is more than one.
template <class F>
static void split(int64_t n, int64_t n_parts, F &&f) {
  if (n_parts == 1) return f(0, 0, n);
  struct Range {
    F *f;
    int64_t n, n_parts;
  } range{&f, n, n_parts};
  run_parts([](void *ctx, int t) {
    const Range &r = *static_cast<const Range *>(ctx);
    if (t < r.n_parts) (*r.f)(t, r.n * t / r.n_parts, r.n * (t + 1) / r.n_parts);
  }, &range);
}

static bool fp32(const char *dtype) { return dtype[0] == 'f' && (dtype[5] == '3' || dtype[5] == '\0'); }

static int64_t product(const int64_t *shape, int n) {
  int64_t total = 1;
  for (int i = 0; i < n; ++i) total *= shape[i];
  return total;
}


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


// y [M,N] = x [M,K] W[N,K]^T (+ b), multi-threaded (linear.cc).
void linear(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t K, int64_t N);
