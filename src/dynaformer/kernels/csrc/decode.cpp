// One decoding step of attention on CPU: each of B rows brings one new token (docs/design.md §4, "Decoding").
//
// Per (row, head) task, in one call: rotate the new q and k (rotary, half-split pairing), write k and v into the
// KV cache at the slot the Python cache chose, then attend over the slot's keys 0 .. slot (the newest last)
// with the span mask m(d) = clamp((R + z − d)/R, 0, 1) (hard: [d ≤ z]; none: dense), d = slot − j. The mask is
// never materialised: keys before the span's reach are skipped, the ramp's keys are weighted by m. The eager
// path this replaces spends ~20 small tensor ops per layer (view, rotary, cache narrow/copy, the mask's ops,
// SDPA, transpose, reshape), each a few µs of dispatch at this size; here they are one call.
//
// The cache may hold fp32 or bf16 (its buffers' dtype): bf16 halves the bytes read per token, the decode's
// floor at long contexts; the arithmetic is fp32 either way.

// ATen and the Tensor caster alone, not <torch/extension.h> (the whole C++ frontend): the headers parse in a
// third of the time and the build takes about half (benchmarks/RESULTS.md, "The test loop").
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// bf16 is stored as its bits (uint16_t): the widening is a shift, which vectorises.
inline float load(float x) { return x; }
inline float load(uint16_t x) { return __builtin_bit_cast(float, uint32_t(x) << 16); }
inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) { *p = c10::BFloat16(x).x; }  // round to nearest even, as .to()

struct Step {
  int64_t B, H, D, pos;
  float scale, ramp;
  int mode;  // 0 dense, 1 soft span, 2 hard span
};

// Scores of W keys at once (W = the vector width in floats): each key's products summed within vectors over D,
// then the W vectors' lanes summed by a transposing tree (log2 W levels of two shuffles and an add), instead of
// reducing each key's vector on its own. The tree leaves the keys in bit-reversed order; a last shuffle sorts them.
#if defined(__AVX512F__)
constexpr int W = 16;
typedef float vec __attribute__((vector_size(64), aligned(4), may_alias));
#define SH(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
inline vec tree(vec* p) {
  vec r[8], t[4], u[2];
  for (int i = 0; i < 8; ++i)
    r[i] = SH(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SH(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    t[i] = SH(r[2 * i], r[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           SH(r[2 * i], r[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    u[i] = SH(t[2 * i], t[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           SH(t[2 * i], t[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const vec x = SH(u[0], u[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                SH(u[0], u[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return SH(x, x, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}
#else
constexpr int W = 8;
typedef float vec __attribute__((vector_size(32), aligned(4), may_alias));
#define SH(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
inline vec tree(vec* p) {
  vec r[4], t[2];
  for (int i = 0; i < 4; ++i)
    r[i] = SH(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) + SH(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    t[i] = SH(r[2 * i], r[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) + SH(r[2 * i], r[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  const vec x = SH(t[0], t[1], 0, 8, 2, 10, 4, 12, 6, 14) + SH(t[0], t[1], 1, 9, 3, 11, 5, 13, 7, 15);
  return SH(x, x, 0, 4, 2, 6, 1, 5, 3, 7);
}
#endif

// W consecutive values of the cache as floats (bf16: widened by a shift). A load through the unaligned vector
// type, not memcpy, which GCC routes through the stack for 256-bit vectors (4× slower scores under AVX2).
inline vec load_vec(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline vec load_vec(const uint16_t* p) {
  typedef uint16_t half_vec __attribute__((vector_size(2 * W), aligned(2)));
  typedef uint32_t word_vec __attribute__((vector_size(4 * W)));
  half_vec h;
  std::memcpy(&h, p, sizeof(h));
  const word_vec w = __builtin_convertvector(h, word_vec) << 16;
  vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// q·k for one key, D known at compile time (0: the runtime D) so the loop unrolls into whole vectors.
template <int DC, typename KV>
inline float dot(const float* q, const KV* k, int64_t D) {
  const int64_t n = DC > 0 ? DC : D;
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += q[d] * load(k[d]);
  return acc;
}

// s[j] = q·K[j] for keys [a, b); returns their maximum. D a multiple of W: W keys per step through `tree`.
template <int DC, typename KV>
inline float scores(const float* q, const KV* K, int64_t a, int64_t b, int64_t D, float* s) {
  const int64_t n = DC > 0 ? DC : D;
  int64_t j = a;
  float mx = dot<DC>(q, K + a * n, n);  // (no −inf start: -ffast-math may assume infinities away)
  if constexpr (DC > 0 && DC % W == 0) {
    constexpr int NC = DC / W;
    vec qv[NC], m = {};
    for (int c = 0; c < NC; ++c) qv[c] = load_vec(q + c * W);
    m += mx;
    for (; j + W <= b; j += W) {
      vec p[W];
      for (int u = 0; u < W; ++u) {
        const KV* k = K + (j + u) * DC;
        vec acc = qv[0] * load_vec(k);
        for (int c = 1; c < NC; ++c) acc += qv[c] * load_vec(k + c * W);
        p[u] = acc;
      }
      const vec r = tree(p);
      std::memcpy(s + j, &r, sizeof(r));
      m = m > r ? m : r;
    }
    for (int u = 0; u < W; ++u) mx = std::max(mx, m[u]);
  }
  for (; j < b; ++j) {
    s[j] = dot<DC>(q, K + j * n, n);
    mx = std::max(mx, s[j]);
  }
  return mx;
}

// out = Σ_j w[j]·V[j] over keys [a, b): four keys per pass into four accumulators, so consecutive keys' adds
// do not wait on each other.
template <int DC, typename KV>
inline void weighted_sum(const float* w, const KV* V, int64_t a, int64_t b, int64_t D, float* out) {
  const int64_t n = DC > 0 ? DC : D;
  constexpr int64_t NA = DC > 0 ? DC : 1;
  if constexpr (DC > 0) {
    float acc[4][NA] = {};
    int64_t j = a;
    for (; j + 4 <= b; j += 4) {
      for (int u = 0; u < 4; ++u) {
        const KV* v = V + (j + u) * n;
        const float wj = w[j + u];
#pragma omp simd
        for (int64_t d = 0; d < n; ++d) acc[u][d] += wj * load(v[d]);
      }
    }
    for (; j < b; ++j) {
      const KV* v = V + j * n;
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) acc[0][d] += w[j] * load(v[d]);
    }
    for (int64_t d = 0; d < n; ++d) out[d] = (acc[0][d] + acc[1][d]) + (acc[2][d] + acc[3][d]);
  } else {
    for (int64_t d = 0; d < n; ++d) out[d] = 0.f;
    for (int64_t j = a; j < b; ++j) {
      const KV* v = V + j * n;
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) out[d] += w[j] * load(v[d]);
    }
  }
}

// The softmax over the span-masked scores and the weighted sum of values, for one query over keys [0, L) of one
// (row, head); the newest key is L − 1, at distance 0.
template <int DC, typename KV>
void attend(const Step& st, const float* q, const KV* K, const KV* V, int64_t L, float z, float* s, float* out) {
  const int64_t D = st.D;
  int64_t j0 = 0, jfull = 0;  // first key with m > 0; first key with m = 1 (keys [j0, jfull) are the ramp)
  if (st.mode == 1) {
    j0 = std::max<int64_t>(0, L - int64_t(std::ceil(double(z) + st.ramp)));  // d < z + R
    jfull = std::max<int64_t>(j0, L - 1 - int64_t(std::floor(z)));           // d ≤ z
  } else if (st.mode == 2) {
    j0 = jfull = std::max<int64_t>(0, L - 1 - int64_t(std::floor(z)));
  }
  j0 = std::min(j0, L - 1);  // the query's own key is always visible (z ≥ 0)
  jfull = std::min(jfull, L - 1);
  const float sc = st.scale, off = scores<DC>(q, K, j0, L, D, s) * st.scale;
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = j0; j < L; ++j) {
    s[j] = std::exp(s[j] * sc - off);
    total += s[j];
  }
  const float inv_r = 1.f / st.ramp, top = (st.ramp + z) * inv_r;
  for (int64_t j = j0; j < jfull; ++j) {  // the ramp: m = (R + z − d)/R
    const float w = s[j] * (top - float(L - 1 - j) * inv_r);
    total += w - s[j];
    s[j] = w;
  }
  weighted_sum<DC>(s, V, j0, L, D, out);
  const float inv = 1.f / total;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

// x rotated by the position's angles into r: (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin).
inline void rotate(const float* x, const float* c, const float* sn, int64_t D, float* r) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    r[i] = x[i] * c[i] - x[i + h] * sn[i];
    r[i + h] = x[i + h] * c[i] + x[i] * sn[i];
  }
}

template <typename KV>
void run(const Step& st, const float* qkv, const float* cos, const float* sin, const std::vector<KV*>& kb,
         const std::vector<KV*>& vb, const std::vector<int64_t>& group, const std::vector<int64_t>& index,
         const std::vector<int64_t>& size, const std::vector<int64_t>& slots, const std::vector<int64_t>& capacity,
         const float* z, int64_t zb, float* y) {
  const int64_t B = st.B, H = st.H, D = st.D, C = H * D;
  // Keys × D over all tasks: a step that reads under ~1 MB stays on this thread. A parallel region costs a few µs
  // idle and, on a shared machine, waits for the busiest core; reading 1 MB takes ~30 µs on one.
  int64_t work = 0;
  for (int64_t g = 0; g < int64_t(slots.size()); ++g) work += (slots[g] + 1) * size[g] * B * D;
  const int64_t grain = work < (1 << 18) ? B * H : 1;
  const float* c = cos + st.pos * (D / 2);
  const float* sn = sin + st.pos * (D / 2);
  at::parallel_for(0, B * H, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch;
    std::vector<float> qr(D), kr(D);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / H, h = t % H, g = group[h], gi = index[h];
      const int64_t slot = slots[g], L = slot + 1;
      const float* row = qkv + b * 3 * C;
      rotate(row + h * D, c, sn, D, qr.data());
      rotate(row + C + h * D, c, sn, D, kr.data());
      const int64_t base = ((b * size[g] + gi) * capacity[g]) * D;  // this (row, head)'s keys in the group
      KV* K = kb[g] + base;
      KV* V = vb[g] + base;
      const float* v = row + 2 * C + h * D;
      for (int64_t d = 0; d < D; ++d) {
        store(K + slot * D + d, kr[d]);
        store(V + slot * D + d, v[d]);
      }
      if (int64_t(scratch.size()) < L) scratch.resize(L);
      const float zz = z == nullptr ? 0.f : z[(zb == 1 ? 0 : b) * H + h];
      float* out = y + b * C + h * D;
      switch (D) {  // the usual head sizes unrolled; any other even size runs the generic loops
        case 16: attend<16>(st, qr.data(), K, V, L, zz, scratch.data(), out); break;
        case 32: attend<32>(st, qr.data(), K, V, L, zz, scratch.data(), out); break;
        case 64: attend<64>(st, qr.data(), K, V, L, zz, scratch.data(), out); break;
        case 128: attend<128>(st, qr.data(), K, V, L, zz, scratch.data(), out); break;
        default: attend<0>(st, qr.data(), K, V, L, zz, scratch.data(), out);
      }
    }
  });
}

// qkv (B, 3·H·D) fp32: the fused projection of each row's new token; cos, sin (N, D/2) fp32 rotary tables; pos:
// the tokens' position. Per group of heads g: k_bufs[g], v_bufs[g] (B, G_g, capacity_g, D) contiguous, fp32 or
// bf16; heads[g] the model's heads it holds; slots[g] where the new key goes (keys 0 .. slot are attended).
// z: (1 or B, H) fp32 spans, or an empty tensor (dense); mode 0 dense, 1 soft ramp R, 2 hard window.
// Returns y (B, H·D) fp32, the heads' outputs side by side (the output projection's input).
std::tuple<at::Tensor, at::Tensor> decode_attention(
    at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t pos, std::vector<at::Tensor> k_bufs,
    std::vector<at::Tensor> v_bufs, std::vector<std::vector<int64_t>> heads, std::vector<int64_t> slots,
    at::Tensor z, int64_t mode, double ramp, at::Tensor span_x, at::Tensor span_v, at::Tensor span_a,
    double span_max) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous(), "qkv: (B, 3C) fp32");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(), "rotary tables");
  const int64_t n_groups = int64_t(k_bufs.size());
  TORCH_CHECK(n_groups > 0 && int64_t(v_bufs.size()) == n_groups && int64_t(heads.size()) == n_groups &&
                  int64_t(slots.size()) == n_groups, "one buffer pair, head list and slot per group");
  const int64_t B = qkv.size(0), D = k_bufs[0].size(-1);
  int64_t H = 0;
  for (const auto& hs : heads) H += int64_t(hs.size());
  TORCH_CHECK(qkv.size(1) == 3 * H * D, "qkv: expected 3·H·D columns");
  TORCH_CHECK(pos >= 0 && pos < cos.size(0) && cos.size(1) == D / 2, "rotary table does not cover the position");
  std::vector<int64_t> group(H, -1), index(H, 0), size(n_groups), capacity(n_groups);
  const auto kv_type = k_bufs[0].scalar_type();
  for (int64_t g = 0; g < n_groups; ++g) {
    const auto& kb = k_bufs[g];
    TORCH_CHECK(kb.is_contiguous() && v_bufs[g].is_contiguous() && kb.dim() == 4 && kb.sizes() == v_bufs[g].sizes(),
                "cache buffers: (B, G, capacity, D) contiguous");
    TORCH_CHECK(kb.scalar_type() == kv_type && v_bufs[g].scalar_type() == kv_type, "one cache dtype");
    TORCH_CHECK(kb.size(0) == B && kb.size(1) == int64_t(heads[g].size()) && kb.size(3) == D, "cache shape");
    TORCH_CHECK(slots[g] >= 0 && slots[g] < kb.size(2), "slot outside the cache buffer");
    size[g] = kb.size(1);
    capacity[g] = kb.size(2);
    for (int64_t i = 0; i < size[g]; ++i) {
      const int64_t h = heads[g][i];
      TORCH_CHECK(h >= 0 && h < H && group[h] < 0, "each head in exactly one group");
      group[h] = g;
      index[h] = i;
    }
  }
  const float* zp = nullptr;
  int64_t zb = 1;
  if (mode != 0 && span_v.numel() > 0) {  // spans predicted from the token: z = S·σ(a + v·x)
    const int64_t Cx = span_x.size(-1);
    TORCH_CHECK(span_x.scalar_type() == at::kFloat && span_x.is_contiguous() && span_x.numel() == B * Cx &&
                    span_v.scalar_type() == at::kFloat && span_v.is_contiguous() && span_v.size(0) == H &&
                    span_v.size(1) == Cx && span_a.scalar_type() == at::kFloat && span_a.numel() == H,
                "span predictor: x (B, C), v (H, C), a (H,) fp32");
    z = at::empty({B, H}, qkv.options());
    const float *x = span_x.data_ptr<float>(), *v = span_v.data_ptr<float>(), *a = span_a.data_ptr<float>();
    float* zo = z.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        float t = 0.f;
#pragma omp simd reduction(+ : t)
        for (int64_t c = 0; c < Cx; ++c) t += x[b * Cx + c] * v[h * Cx + c];
        zo[b * H + h] = float(span_max) / (1.f + std::exp(-(a[h] + t)));
      }
  }
  if (mode != 0) {
    TORCH_CHECK(z.dim() == 2 && z.size(1) == H && z.scalar_type() == at::kFloat && z.is_contiguous(), "z: (1|B, H)");
    zb = z.size(0);
    TORCH_CHECK(zb == 1 || zb == B, "z: one row or one per batch row");
    zp = z.data_ptr<float>();
  }
  auto y = at::empty({B, H * D}, qkv.options());
  const Step st{B, H, D, pos, float(1.0 / std::sqrt(double(D))), float(ramp), int(mode)};
  if (kv_type == at::kFloat) {
    std::vector<float*> kb(n_groups), vb(n_groups);
    for (int64_t g = 0; g < n_groups; ++g) kb[g] = k_bufs[g].data_ptr<float>(), vb[g] = v_bufs[g].data_ptr<float>();
    run<float>(st, qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), kb, vb, group, index, size,
               slots, capacity, zp, zb, y.data_ptr<float>());
  } else {
    TORCH_CHECK(kv_type == at::kBFloat16, "cache dtype: float32 or bfloat16");
    std::vector<uint16_t*> kb(n_groups), vb(n_groups);
    for (int64_t g = 0; g < n_groups; ++g)
      kb[g] = reinterpret_cast<uint16_t*>(k_bufs[g].data_ptr<c10::BFloat16>()),
      vb[g] = reinterpret_cast<uint16_t*>(v_bufs[g].data_ptr<c10::BFloat16>());
    run<uint16_t>(st, qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), kb, vb, group, index,
                       size, slots, capacity, zp, zb, y.data_ptr<float>());
  }
  return {y, z};
}

// RMSNorm of each row of x (rows, C) fp32: x · rsqrt(mean(x²) + eps) · w, one pass for the few rows of a decoding
// step (ATen's composite runs seven ops).
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps) {
  x = x.contiguous();
  w = w.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.numel() == x.size(-1),
              "rms_norm: fp32 x (..., C), w (C)");
  auto out = at::empty_like(x);
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * C;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    const float inv = 1.f / std::sqrt(ss / float(C) + float(eps));
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) op[r * C + c] = (xr[c] * inv) * wp[c];
  }
  return out;
}

// The dynamic residual's decoding update (model/residual.py, DynamicResidual): per row of the stream x (rows, C),
// x + m·y with m = base + Σ_k γ_k·tanh(h·w_k), h = N(x) the branch input and y the branch output; w_t (C, k),
// gamma (k). Without w_t (an empty tensor) m = base. One call for what takes five ops as tensors.
at::Tensor dyn_residual(at::Tensor x, at::Tensor y, at::Tensor h, at::Tensor w_t, at::Tensor gamma,
                           double base) {
  x = x.contiguous();
  y = y.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && y.sizes() == x.sizes(),
              "dyn_residual: fp32 x, y of one shape");
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0, K = w_t.numel() ? w_t.size(1) : 0;
  if (K > 0) {
    h = h.contiguous();
    w_t = w_t.contiguous();
    gamma = gamma.contiguous();
    TORCH_CHECK(h.scalar_type() == at::kFloat && h.sizes() == x.sizes() && w_t.scalar_type() == at::kFloat &&
                    w_t.size(0) == C && gamma.scalar_type() == at::kFloat && gamma.numel() == K,
                "dyn_residual: h like x, w_t (C, k), gamma (k) fp32");
  }
  auto out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float m = float(base);
    if (K > 0) {
      const float *hr = h.data_ptr<float>() + r * C, *w = w_t.data_ptr<float>(), *g = gamma.data_ptr<float>();
      for (int64_t k = 0; k < K; ++k) {
        float t = 0.f;
        for (int64_t c = 0; c < C; ++c) t += hr[c] * w[c * K + k];
        m += std::tanh(t) * g[k];
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) op[r * C + c] = xp[r * C + c] + m * yp[r * C + c];
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one decoding step of (span) attention with the KV cache write");
  m.def("rms_norm", &rms_norm, "RMSNorm of a few rows");
  m.def("dyn_residual", &dyn_residual, "the dynamic residual's update of a few rows");
}
