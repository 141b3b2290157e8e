// Training kernels: LayerNorm, AdamW, the squared gradient norm, cross-entropy and GELU, forward and backward.
#include "common.h"

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
