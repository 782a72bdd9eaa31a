// Causal span attention on CPU, one parallel loop over independent tiles (docs/design.md §4).
//
// A task is a run of up to G query chunks of one row (row = batch·head). Chunk c of a row holds C queries at
// key positions o + cC .. o + cC + C − 1 and reads a window of W = E + C keys starting E keys before the chunk
// (E per (row, chunk), from the Python planner). Within a query's row of the window, column j is distance
// d = i + E − j and the span mask m(d) = clamp((R + z − d)/R, 0, 1) (hard: [d ≤ z]) splits the row into
// three zones: [0, a) m = 0, [a, b) the ramp 0 < m < 1, [b, i + E] m = 1; columns after i + E are the future.
// So no mask is ever materialised: the softmax runs over [a, i + E] only.
//
// Every task runs its GEMMs single-threaded (BLAS sgemm inside the parallel region) and its softmax in plain
// loops, and threads pull tasks from a shared counter. One parallel region per call, and a thread slowed by
// another process simply takes fewer tasks: the kernel degrades with the machine's free capacity instead of
// waiting at a barrier after every small operation.
//
// Backward: tasks of one row overlap in their key windows, so each task folds its dK, dV into a private
// buffer and adds it to the row under that row's lock.

// ATen and the Tensor caster alone, not <torch/extension.h> (the whole C++ frontend): the headers parse in a
// third of the time and the build takes about half (benchmarks/RESULTS.md, "The test loop").
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

// Row-major C (m×n) = alpha · op(A) · op(B) + beta · C, via column-major BLAS on the transposes.
// A is m×k (ta = false) or k×m (ta = true), row-major with leading dimension lda; likewise B.
void gemm_rm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
             float beta, float* Cm, int ldc) {
  // (A·B)ᵀ = Bᵀ·Aᵀ: a row-major matrix is its transpose in column-major order.
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  sgemm_(&tA, &tB, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, Cm, &ldc);
}

struct Geometry {
  int64_t BH, nC, C, D, Tkp, o, G;
  float ramp;
  bool hard;
};

// Zones of query i's row in a window of E + C keys: [a, b) ramp, [b, end) fully visible (end = i + E + 1).
inline void zones(const Geometry& g, int64_t E, int64_t i, float z, int64_t* a, int64_t* b) {
  const double x = double(i + E) - double(z);  // column where d = z
  int64_t lo, hi;
  if (g.hard) {
    lo = hi = std::max<int64_t>(0, int64_t(std::ceil(x)));
  } else {
    lo = std::max<int64_t>(0, int64_t(std::floor(x - g.ramp)) + 1);  // first column with d < z + R
    hi = std::max<int64_t>(lo, int64_t(std::ceil(x)));  // first column with d ≤ z
  }
  const int64_t end = i + E + 1;
  *a = std::min(lo, end - 1);  // the query's own key is always visible (z ≥ 0)
  *b = std::min(hi, end);
}

// Span weights of the ramp columns: m = (R + z − d)/R with d = i + E − j. In double: R + z − d cancels near
// the ramp's far end, where the span gradient divides by it.
inline float ramp_weight(const Geometry& g, int64_t E, int64_t i, float z, int64_t j) {
  return float((double(g.ramp) + double(z) - double(i + E - j)) / double(g.ramp));
}

// The first window column any query of the chunk sees: the GEMMs skip the columns before it (E is rounded
// up to 32 keys, and the ramp's far end moves with each query).
int64_t first_visible(const Geometry& g, int64_t E, const float* z) {
  int64_t j0 = E;
  for (int64_t i = 0; i < g.C; ++i) {
    int64_t a, b;
    zones(g, E, i, z[i], &a, &b);
    j0 = std::min(j0, a);
  }
  return j0;
}

// P (C × W) = m · softmax over the visible columns, from scores S in place; returns nothing, writes lse[i].
void softmax_tile(const Geometry& g, int64_t E, float* S, int64_t W, const float* z, float* lse) {
  for (int64_t i = 0; i < g.C; ++i) {
    float* s = S + i * W;
    int64_t a, b;
    zones(g, E, i, z[i], &a, &b);
    const int64_t end = i + E + 1;
    float mx = s[a];  // (column a is visible: no infinities, which -ffast-math may assume away)
    for (int64_t j = a + 1; j < end; ++j) mx = std::max(mx, s[j]);
    float total = 0.f;
    for (int64_t j = a; j < b; ++j) {
      s[j] = std::exp(s[j] - mx) * ramp_weight(g, E, i, z[i], j);
      total += s[j];
    }
    for (int64_t j = b; j < end; ++j) {
      s[j] = std::exp(s[j] - mx);
      total += s[j];
    }
    const float inv = 1.f / total;
    for (int64_t j = 0; j < a; ++j) s[j] = 0.f;
    for (int64_t j = a; j < end; ++j) s[j] *= inv;
    for (int64_t j = end; j < W; ++j) s[j] = 0.f;
    lse[i] = std::log(total) + mx;
  }
}

// P from raw scores S and the kept log-sum-exp: P = m · exp(S − lse) on the visible columns, 0 elsewhere.
void recompute_p(const Geometry& g, int64_t E, float* S, int64_t W, const float* z, const float* lse) {
  for (int64_t i = 0; i < g.C; ++i) {
    float* s = S + i * W;
    int64_t a, b;
    zones(g, E, i, z[i], &a, &b);
    const int64_t end = i + E + 1;
    for (int64_t j = 0; j < a; ++j) s[j] = 0.f;
    for (int64_t j = a; j < b; ++j) s[j] = std::exp(s[j] - lse[i]) * ramp_weight(g, E, i, z[i], j);
    for (int64_t j = b; j < end; ++j) s[j] = std::exp(s[j] - lse[i]);
    for (int64_t j = end; j < W; ++j) s[j] = 0.f;
  }
}

// Run fn(task) for tasks 0..n-1 on the intra-op threads, each thread pulling the next task when it is free.
template <typename F>
void for_each_task(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)));
  std::exception_ptr error;
  std::mutex error_lock;
#pragma omp parallel num_threads(threads)
  {
    for (int64_t t = next++; t < n; t = next++) {
      try {
        fn(t);
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!error) error = std::current_exception();
        next = n;
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

struct Tasks {
  std::vector<int64_t> row, c0, c1;
};

Tasks make_tasks(const Geometry& g) {
  Tasks t;
  for (int64_t r = 0; r < g.BH; ++r)
    for (int64_t c = 0; c < g.nC; c += g.G) {
      t.row.push_back(r);
      t.c0.push_back(c);
      t.c1.push_back(std::min(g.nC, c + g.G));
    }
  return t;
}

Geometry geometry(const at::Tensor& q, const at::Tensor& k, int64_t o, int64_t chunk, int64_t group,
                  double ramp, bool hard) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "band_span: q (BH, nC·C, D), k (BH, Tkp, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && k.is_contiguous(),
              "band_span: contiguous float32 inputs");
  Geometry g{q.size(0), q.size(1) / chunk, chunk, q.size(2), k.size(1), o, group, float(ramp), hard};
  TORCH_CHECK(g.nC * chunk == q.size(1), "band_span: the queries must be padded to whole chunks");
  return g;
}

}  // namespace

// q: (BH, nC·C, D) scaled queries; k, v: (BH, Tkp, D); z: (BH, nC·C) spans (floored when hard); E: (BH, nC)
// keys before each chunk. Returns (out (BH, nC·C, D), lse (BH, nC·C), P) with P the concatenated probability
// tiles when keep, else empty.
std::vector<at::Tensor> band_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor z,
                                        at::Tensor E, int64_t o, int64_t chunk, int64_t group, double ramp,
                                        bool hard, bool keep) {
  const Geometry g = geometry(q, k, o, chunk, group, ramp, hard);
  auto out = at::empty_like(q);
  auto lse = at::empty({g.BH, g.nC * g.C}, q.options());
  const auto Ea = E.accessor<int64_t, 2>();
  // offsets of each tile's P (C × (E + C)) in the kept buffer
  std::vector<int64_t> offset(g.BH * g.nC + 1, 0);
  for (int64_t r = 0; r < g.BH; ++r)
    for (int64_t c = 0; c < g.nC; ++c) offset[r * g.nC + c + 1] = offset[r * g.nC + c] + g.C * (Ea[r][c] + g.C);
  auto P = keep ? at::empty({offset.back()}, q.options()) : at::empty({0}, q.options());
  const Tasks tasks = make_tasks(g);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>(), *pp = P.data_ptr<float>();
  const int64_t Emax = E.numel() ? E.max().item<int64_t>() : 0;
  for_each_task(int64_t(tasks.row.size()), [&](int64_t t) {
    std::vector<float> scratch(keep ? 0 : g.C * (Emax + g.C));
    const int64_t r = tasks.row[t];
    for (int64_t c = tasks.c0[t]; c < tasks.c1[t]; ++c) {
      const int64_t e = Ea[r][c], W = e + g.C, q0 = c * g.C;
      const float* Q = qp + (r * g.nC * g.C + q0) * g.D;
      const float* K = kp + (r * g.Tkp + g.o + q0 - e) * g.D;
      const float* V = vp + (r * g.Tkp + g.o + q0 - e) * g.D;
      float* S = keep ? pp + offset[r * g.nC + c] : scratch.data();
      const float* zr = zp + r * g.nC * g.C + q0;
      const int64_t j0 = first_visible(g, e, zr), w = W - j0;
      gemm_rm(false, true, g.C, w, g.D, 1.f, Q, g.D, K + j0 * g.D, g.D, 0.f, S + j0, W);  // S = Q·Kᵀ (C, W)
      softmax_tile(g, e, S, W, zr, lp + r * g.nC * g.C + q0);
      gemm_rm(false, false, g.C, g.D, w, 1.f, S + j0, W, V + j0 * g.D, g.D, 0.f, op + (r * g.nC * g.C + q0) * g.D,
              g.D);  // O = P·V
    }
  });
  return {out, lse, P};
}

// Gradients (dq of the scaled queries, dk, dv (BH, Tkp, D), dz (BH, nC·C) or empty) from dout and
// delta = rowsum(dout ⊙ out); P as returned by the forward, or empty to recompute it from lse.
std::vector<at::Tensor> band_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor z,
                                         at::Tensor E, at::Tensor dout, at::Tensor delta,
                                         at::Tensor lse, at::Tensor P, int64_t o, int64_t chunk,
                                         int64_t group, double ramp, bool hard, bool want_z) {
  const Geometry g = geometry(q, k, o, chunk, group, ramp, hard);
  TORCH_CHECK(dout.is_contiguous() && delta.is_contiguous(), "band_span: contiguous gradients");
  auto dq = at::empty_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  auto dz = want_z ? at::zeros({g.BH, g.nC * g.C}, q.options()) : at::empty({0}, q.options());
  const auto Ea = E.accessor<int64_t, 2>();
  const bool keep = P.numel() > 0;
  std::vector<int64_t> offset(g.BH * g.nC + 1, 0);
  for (int64_t r = 0; r < g.BH; ++r)
    for (int64_t c = 0; c < g.nC; ++c) offset[r * g.nC + c + 1] = offset[r * g.nC + c] + g.C * (Ea[r][c] + g.C);
  const Tasks tasks = make_tasks(g);
  std::vector<std::mutex> row_lock(g.BH);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *zp = z.data_ptr<float>(), *gp = dout.data_ptr<float>(), *dl = delta.data_ptr<float>();
  const float *lp = lse.data_ptr<float>(), *pp = keep ? P.data_ptr<float>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  float* dzp = want_z ? dz.data_ptr<float>() : nullptr;
  const int64_t Emax = E.numel() ? E.max().item<int64_t>() : 0;
  for_each_task(int64_t(tasks.row.size()), [&](int64_t t) {
    const int64_t r = tasks.row[t], ca = tasks.c0[t], cb = tasks.c1[t];
    // the task's keys: from the first window's start to the last chunk's end
    int64_t lo = g.o + ca * g.C - Ea[r][ca];
    for (int64_t c = ca; c < cb; ++c) lo = std::min(lo, g.o + c * g.C - Ea[r][c]);
    const int64_t hi = g.o + cb * g.C, span = hi - lo;
    std::vector<float> dK(span * g.D, 0.f), dV(span * g.D, 0.f);
    std::vector<float> Pbuf(keep ? 0 : g.C * (Emax + g.C)), dS(g.C * (Emax + g.C));
    for (int64_t c = ca; c < cb; ++c) {
      const int64_t e = Ea[r][c], W = e + g.C, q0 = c * g.C, w0 = g.o + q0 - e;
      const int64_t qrow = r * g.nC * g.C + q0;
      const float* Q = qp + qrow * g.D;
      const float* dO = gp + qrow * g.D;
      const float* K = kp + (r * g.Tkp + w0) * g.D;
      const float* V = vp + (r * g.Tkp + w0) * g.D;
      const float* zr = zp + qrow;
      const int64_t j0 = first_visible(g, e, zr), w = W - j0;
      float* Pt;
      if (keep) {
        Pt = const_cast<float*>(pp) + offset[r * g.nC + c];
      } else {
        Pt = Pbuf.data();
        gemm_rm(false, true, g.C, w, g.D, 1.f, Q, g.D, K + j0 * g.D, g.D, 0.f, Pt + j0, W);
        recompute_p(g, e, Pt, W, zr, lp + qrow);
      }
      float* dSt = dS.data();
      gemm_rm(false, true, g.C, w, g.D, 1.f, dO, g.D, V + j0 * g.D, g.D, 0.f, dSt + j0, W);  // dO·Vᵀ
      for (int64_t i = 0; i < g.C; ++i) {  // dS = P ⊙ (dO·Vᵀ − δ) on the visible columns
        float* s = dSt + i * W;
        const float* p = Pt + i * W;
        int64_t a, b;
        zones(g, e, i, zr[i], &a, &b);
        const int64_t end = i + e + 1;
        for (int64_t j = 0; j < a; ++j) s[j] = 0.f;
        for (int64_t j = a; j < end; ++j) s[j] = p[j] * (s[j] - dl[qrow + i]);
        for (int64_t j = end; j < W; ++j) s[j] = 0.f;
        if (want_z) {  // ∂L/∂z_i = Σ_ramp dS_ij / (R m_ij) = Σ_ramp dS_ij / (R + z_i − d_ij)
          float acc = 0.f;
          for (int64_t j = a; j < b; ++j) acc += s[j] / float(double(g.ramp) + double(zr[i]) - double(i + e - j));
          dzp[qrow + i] = acc;
        }
      }
      // dQ = dS·K
      gemm_rm(false, false, g.C, g.D, w, 1.f, dSt + j0, W, K + j0 * g.D, g.D, 0.f, dqp + qrow * g.D, g.D);
      float* dKw = dK.data() + (w0 + j0 - lo) * g.D;
      float* dVw = dV.data() + (w0 + j0 - lo) * g.D;
      gemm_rm(true, false, w, g.D, g.C, 1.f, dSt + j0, W, Q, g.D, 1.f, dKw, g.D);  // dK += dSᵀ·Q
      gemm_rm(true, false, w, g.D, g.C, 1.f, Pt + j0, W, dO, g.D, 1.f, dVw, g.D);  // dV += Pᵀ·dO
    }
    std::lock_guard<std::mutex> guard(row_lock[r]);
    float* dkr = dkp + (r * g.Tkp + lo) * g.D;
    float* dvr = dvp + (r * g.Tkp + lo) * g.D;
    for (int64_t x = 0; x < span * g.D; ++x) {
      dkr[x] += dK[x];
      dvr[x] += dV[x];
    }
  });
  return {dq, dk, dv, dz};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &band_forward, "causal band span attention, forward");
  m.def("backward", &band_backward, "causal band span attention, backward");
}
