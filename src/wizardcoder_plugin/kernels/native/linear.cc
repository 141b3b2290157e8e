// Small-row linear layers on the pool (W in HF's [out, in] layout), the one-call decode step of a GPTBigCode
// block built on them, and the prefill's one-pass epilogues.
#include "common.h"

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

void linear(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = (N + NR - 1) / NR;
  split(tiles, parts(M * K * N), [&](int, int64_t lo, int64_t hi) { columns(x, w, b, y, M, K, N, lo, hi); });
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


