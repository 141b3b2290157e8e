#include "common.h"

static thread_local std::vector<float> tl_ln;

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


// ------------------------------------------------------------------------------------------- the screen's tables
// W [V,E] fp32 -> Q [V,E] int8 and info [V,3] (s_v, c1_v, c2_v), as `kernels/head.py` derives them: per row, in
// float64, s_v = max|W[v]| / 127 rounded to fp32, Q[v] = clip(rint(W[v] / s_v), -127, 127), W^[v] = s_v Q[v]
// (exact), c1_v = |W[v] - W^[v]| + gamma |W[v]| with gamma = E u / (1 - E u), u = 2^-24, c2_v = |W^[v]|, both
// inflated by 1e-6 and rounded up to fp32. Returns 1, writing nothing useful, where a weight is not finite.
static float round_up(double x) {
  const float f = static_cast<float>(x);
  return f < x ? std::nextafter(f, INFINITY) : f;
}

extern "C" int GreedyTables(const float *w, int64_t V, int64_t E, int8_t *q, float *info) {
  const double unit = std::ldexp(1.0, -24), gamma = E * unit / (1 - E * unit);
  std::vector<int> bad(pool_size(), 0);
  split(V, parts(V * E * 8), [&](int t, int64_t lo, int64_t hi) {
    for (int64_t v = lo; v < hi && !bad[t]; ++v) {
      const float *row = w + v * E;
      double amax = 0;
      for (int64_t i = 0; i < E; ++i) {
        if (!std::isfinite(row[i])) {
          bad[t] = 1;
          break;
        }
        amax = std::max(amax, std::fabs(static_cast<double>(row[i])));
      }
      const float scale = static_cast<float>(amax / 127);
      const double divisor = scale > 0 ? scale : 1.0;
      double err = 0, norm = 0, norm_hat = 0;
      for (int64_t i = 0; i < E; ++i) {
        const double x = row[i], level = std::min(127.0, std::max(-127.0, std::nearbyint(x / divisor)));
        const double x_hat = level * static_cast<double>(scale);
        q[v * E + i] = static_cast<int8_t>(level);
        err += (x - x_hat) * (x - x_hat), norm += x * x, norm_hat += x_hat * x_hat;
      }
      info[v * 3] = scale;
      info[v * 3 + 1] = round_up((std::sqrt(err) + gamma * std::sqrt(norm)) * (1 + 1e-6));
      info[v * 3 + 2] = round_up(std::sqrt(norm_hat) * (1 + 1e-6));
    }
  });
  for (int b : bad)
    if (b) return 1;
  return 0;
}
