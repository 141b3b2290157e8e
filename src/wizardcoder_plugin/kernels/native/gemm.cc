#include "common.h"

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

