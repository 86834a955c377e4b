// Selective scan (Mamba's S6) for CPU tensors: forward and a hand-written backward.
//
//   dt_l = softplus(delta_l + bias)            (softplus optional)
//   x_l  = exp(dt_l A) x_{l-1} + dt_l B_l u_l  (state of N values per channel)
//   y_l  = (C_l x_l + D u_l) * silu(z_l)       (D and z optional)
//
// One (batch, channel) row is scanned at a time with its N-value state in a small buffer that
// stays in L1 cache; loops over N and the elementwise passes over a row are vectorised
// (`omp simd`, with exp/log1p written so that GCC vectorises them); rows are spread over torch's
// intra-op threads with at::parallel_for. Forward never forms a (B, D, L, N) tensor. When
// gradients are needed, the forward saves the state at the start of every chunk of K steps; the
// backward recomputes one chunk's states at a time and runs the adjoint recurrence in reverse.
//
// Layouts (all contiguous, one scalar type T = float or double, prepared by the Python side):
//   u, delta, z, out       (Bt, D, L)
//   A                      (D, N)
//   B, C  variable         (Bt, G, L, N)   -- L before N: one step's N values are contiguous
//         fixed            (D, N)
//   Dskip, bias            (D,) or empty
//   ckpt                   (Bt, D, ceil(L / K), N)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for float without a libm call, so GCC vectorises it inside `omp simd` loops:
// Cody-Waite range reduction and a degree-6 polynomial, about 1 ulp over the whole range.
// NaN propagates; x < -87.3 gives 0; x > 88.7 saturates at exp(88.7).
#pragma omp declare simd notinbranch
inline float exp_v(float x) {
  const float hi = 88.7f, lo = -87.3f;
  float xc = x > hi ? hi : x;  // NaN fails both comparisons and passes through
  xc = xc < lo ? lo : xc;
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;  // x - n ln2, with ln2 split in two for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : p * scale;
}

// log(1 + e) for e in [0, 1] as 2 atanh(s), s = e / (2 + e) <= 1/3: relative error ~1e-8.
#pragma omp declare simd notinbranch
inline float log1p_unit_v(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  return 2.0f * s * (p * s2 + 1.0f);
}

// 2^t for float, vectorisable like exp_v: the scan's exp(dt A) is computed as 2^(dt A log2 e)
// with A log2 e formed once per channel. Cephes' degree-6 polynomial on [-1/2, 1/2], about
// 2 ulp; t is clamped to [-126, 126] (NaN passes through).
#pragma omp declare simd notinbranch
inline float exp2_v(float t) {
  t = t < -126.0f ? -126.0f : t;
  t = t > 126.0f ? 126.0f : t;
  const float n = std::nearbyint(t), r = t - n;
  float p = 1.535336188319500e-4f;
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#pragma omp declare simd notinbranch
inline double exp_v(double x) { return std::exp(x); }
#pragma omp declare simd notinbranch
inline double exp2_v(double t) { return std::exp2(t); }
#pragma omp declare simd notinbranch
inline double log1p_unit_v(double e) { return std::log1p(e); }

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), and x above 20 (torch's threshold); sigmoid(x).
template <typename T> inline T softplus_v(T x) {
  const T v = (x > T(0) ? x : T(0)) + log1p_unit_v(exp_v(-std::abs(x)));
  return x > T(20) ? x : v;
}
template <typename T> inline T sigmoid_v(T x) { return T(1) / (T(1) + exp_v(-x)); }

template <typename T> constexpr T kLog2e = T(1.44269504088896340736);

struct Shape {
  int64_t batch, dim, len, nstate, groups_b, groups_c, chunk;
  bool var_b, var_c, softplus;
};

// Where one row's B (or C) values live: step l's N values start at base + l * step.
template <typename T> struct RowView {
  const T* base;
  int64_t step;
  const T* at(int64_t l) const { return base + l * step; }
};

template <typename T>
RowView<T> row_of(const T* m, bool variable, int64_t groups, const Shape& s, int64_t b, int64_t d) {
  if (!variable) return {m + d * s.nstate, 0};
  const int64_t g = d / (s.dim / groups);
  return {m + (b * groups + g) * s.len * s.nstate, s.nstate};
}

// The inputs of one scan, as raw pointers (optional ones may be null).
template <typename T> struct Inputs {
  const T *u, *delta, *A, *B, *C, *Dskip, *z, *bias;
};

// dt of a whole row: delta + bias, softplus'd if asked.
template <typename T> void row_dt(const Shape& s, const T* delta, T bias, T* dt) {
#pragma omp simd
  for (int64_t l = 0; l < s.len; ++l) {
    const T v = delta[l] + bias;
    dt[l] = s.softplus ? softplus_v(v) : v;
  }
}

// ---------------------------------------------------------------- forward
// The forward scans W channels of one batch element at once, one channel per SIMD lane, so the
// readout C x is a vertical sum over N (no horizontal reduction per step). A tile's channels
// share their B and C rows (same group), which are then broadcast across lanes. Each chunk of K
// steps of u and dt is transposed into a (K, W) buffer first.
constexpr int64_t W = 16;

// Tiles of at most W channels that never straddle a group boundary of B or C.
struct Tile {
  int64_t b, d0, width;
};

std::vector<Tile> make_tiles(const Shape& s) {
  const int64_t per_b = s.var_b ? s.dim / s.groups_b : s.dim;
  const int64_t per_c = s.var_c ? s.dim / s.groups_c : s.dim;
  const int64_t segment = std::gcd(per_b, per_c);
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t seg0 = 0; seg0 < s.dim; seg0 += segment)
      for (int64_t d0 = seg0; d0 < seg0 + segment; d0 += W)
        tiles.push_back({b, d0, std::min(W, seg0 + segment - d0)});
  return tiles;
}

// One step of state n for all W lanes. Variable B/C (VB/VC) hold one value for all lanes.
template <typename T, bool VB, bool VC>
inline void scan_step(const T* dt, const T* a2, const T* du, const T* b, const T* c, T* x, T* y) {
  const T b0 = b[0], c0 = c[0];
#pragma omp simd
  for (int64_t i = 0; i < W; ++i) {
    const T v = exp2_v(dt[i] * a2[i]) * x[i] + du[i] * (VB ? b0 : b[i]);
    x[i] = v;
    y[i] += v * (VC ? c0 : c[i]);
  }
}

template <typename T, bool VB, bool VC>
void forward_tile(const Shape& s, const Inputs<T>& in, const Tile& t, T* out, T* last_state, T* ckpt,
                  std::vector<T>& scratch) {
  const int64_t N = s.nstate, L = s.len, K = s.chunk, nchunks = (L + K - 1) / K;
  const int64_t row0 = t.b * s.dim + t.d0;
  scratch.assign((4 * N + 3 * K + 3) * W, T(0));  // zeros: padded lanes stay inert
  T* x = scratch.data();       // (N, W) the tile's states
  T* a2 = x + N * W;           // (N, W) A log2 e
  T* bt = a2 + N * W;          // (N, W) fixed B, per lane
  T* ct = bt + N * W;          // (N, W) fixed C, per lane
  T* dtc = ct + N * W;         // (K, W) dt of the chunk
  T* uc = dtc + K * W;         // (K, W) u of the chunk
  T* yc = uc + K * W;          // (K, W) output of the chunk
  T* dskip = yc + K * W;       // (W,)
  T* bias = dskip + W;         // (W,)
  T* du = bias + W;            // (W,)
  for (int64_t c = 0; c < t.width; ++c) {
    const int64_t d = t.d0 + c;
    for (int64_t n = 0; n < N; ++n) {
      a2[n * W + c] = in.A[d * N + n] * kLog2e<T>;
      if (!s.var_b) bt[n * W + c] = in.B[d * N + n];
      if (!s.var_c) ct[n * W + c] = in.C[d * N + n];
    }
    dskip[c] = in.Dskip ? in.Dskip[d] : T(0);
    bias[c] = in.bias ? in.bias[d] : T(0);
  }
  const RowView<T> Bv = row_of(in.B, s.var_b, s.groups_b, s, t.b, t.d0);
  const RowView<T> Cv = row_of(in.C, s.var_c, s.groups_c, s, t.b, t.d0);

  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t l0 = ci * K, kc = std::min(K, L - l0);
    for (int64_t c = 0; c < t.width; ++c) {
      const int64_t row = row0 + c;
      if (ckpt)
        for (int64_t n = 0; n < N; ++n) ckpt[(row * nchunks + ci) * N + n] = x[n * W + c];
      for (int64_t j = 0; j < kc; ++j) {
        dtc[j * W + c] = in.delta[row * L + l0 + j] + bias[c];
        uc[j * W + c] = in.u[row * L + l0 + j];
      }
    }
    if (s.softplus) {
#pragma omp simd
      for (int64_t i = 0; i < kc * W; ++i) dtc[i] = softplus_v(dtc[i]);
    }
    for (int64_t j = 0; j < kc; ++j) {
      const T* dtj = dtc + j * W;
      const T* uj = uc + j * W;
      T* yj = yc + j * W;
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) {
        du[c] = dtj[c] * uj[c];
        yj[c] = dskip[c] * uj[c];
      }
      const T* bl = Bv.at(l0 + j);
      const T* cl = Cv.at(l0 + j);
      for (int64_t n = 0; n < N; ++n)
        scan_step<T, VB, VC>(dtj, a2 + n * W, du, VB ? bl + n : bt + n * W, VC ? cl + n : ct + n * W,
                             x + n * W, yj);
    }
    for (int64_t c = 0; c < t.width; ++c) {
      const int64_t row = row0 + c;
      T* o = out + row * L + l0;
      for (int64_t j = 0; j < kc; ++j) o[j] = yc[j * W + c];
      if (in.z) {
        const T* z = in.z + row * L + l0;
#pragma omp simd
        for (int64_t j = 0; j < kc; ++j) o[j] *= z[j] * sigmoid_v(z[j]);
      }
    }
  }
  for (int64_t c = 0; c < t.width; ++c)
    for (int64_t n = 0; n < N; ++n) last_state[(row0 + c) * N + n] = x[n * W + c];
}

// ---------------------------------------------------------------- backward
// Gradient outputs. Per-row ones go straight to their place; dB/dC of variable B/C are summed
// over the channels of one task into that task's own slice of a partial buffer (no races).
template <typename T> struct Grads {
  T *du, *ddelta, *dz;  // (Bt, D, L)
  T *dA;                // (Bt, D, N)  summed over Bt afterwards
  T *dD, *dbias;        // (Bt, D)     summed over Bt afterwards
  T *dB, *dC;           // variable: (P, Bt, G, L, N); fixed: (Bt, D, N)
};

template <typename T>
void backward_row(const Shape& s, const Inputs<T>& in, int64_t b, int64_t d, int64_t part,
                  const T* ckpt, const T* dout, const Grads<T>& g, std::vector<T>& scratch) {
  const int64_t N = s.nstate, L = s.len, K = s.chunk, row = b * s.dim + d;
  const int64_t nchunks = (L + K - 1) / K;
  const T* u = in.u + row * L;
  const T* delta = in.delta + row * L;
  const T* z = in.z ? in.z + row * L : nullptr;
  const T* a = in.A + d * N;
  const RowView<T> Bv = row_of(in.B, s.var_b, s.groups_b, s, b, d);
  const RowView<T> Cv = row_of(in.C, s.var_c, s.groups_c, s, b, d);
  const T dskip = in.Dskip ? in.Dskip[d] : T(0), bias = in.bias ? in.bias[d] : T(0);
  dout += row * L;
  T* du = g.du + row * L;
  T* ddt = g.ddelta + row * L;  // holds dLoss/ddt until the last pass turns it into ddelta

  // Gradient rows for B and C: a partial-buffer row (variable) or this (b, d)'s own row (fixed).
  auto grad_row = [&](T* buf, bool variable, int64_t groups) -> RowView<T> {
    if (!variable) return {buf + row * N, 0};
    const int64_t gi = d / (s.dim / groups);
    return {buf + ((part * s.batch + b) * groups + gi) * L * N, N};
  };
  const RowView<T> dBv = grad_row(g.dB, s.var_b, s.groups_b);
  const RowView<T> dCv = grad_row(g.dC, s.var_c, s.groups_c);

  scratch.assign(2 * L + (2 * K + 4) * N, T(0));
  T* dt = scratch.data();       // (L,) dt of the row
  T* gy = dt + L;               // (L,) dLoss/d(C x + D u): dout times the gate silu(z)
  T* xs = gy + L;               // (K + 1, N) states of one chunk, xs[0] = the state before it
  T* ea = xs + (K + 1) * N;     // (K, N) exp(dt A) of the chunk
  T* hc = ea + K * N;           // (N,) exp(dt_{l+1} A) h_{l+1}: the adjoint carried from the future
  T* dA_acc = hc + N;           // (N,)
  T* a2 = dA_acc + N;           // (N,) A log2 e, as in the forward
  for (int64_t n = 0; n < N; ++n) a2[n] = a[n] * kLog2e<T>;
  row_dt(s, delta, bias, dt);
  if (z) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) gy[l] = dout[l] * z[l] * sigmoid_v(z[l]);
  } else {
    std::copy(dout, dout + L, gy);
  }

  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t l0 = c * K, kc = std::min(K, L - l0);
    std::copy(ckpt + (row * nchunks + c) * N, ckpt + (row * nchunks + c + 1) * N, xs);
    for (int64_t j = 0; j < kc; ++j) {  // recompute the chunk's states
      const T dtl = dt[l0 + j], dul = dtl * u[l0 + j];
      const T* bl = Bv.at(l0 + j);
      const T* xp = xs + j * N;
      T* xn = xs + (j + 1) * N;
      T* e = ea + j * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        e[n] = exp2_v(dtl * a2[n]);
        xn[n] = e[n] * xp[n] + dul * bl[n];
      }
    }
    for (int64_t j = kc - 1; j >= 0; --j) {  // adjoint recurrence, last step first
      const int64_t l = l0 + j;
      const T dtl = dt[l], ul = u[l], dul = dtl * ul, gl = gy[l];
      const T* bl = Bv.at(l);
      const T* cl = Cv.at(l);
      const T* xp = xs + j * N;
      const T* xc = xs + (j + 1) * N;
      const T* e = ea + j * N;
      T* dbl = const_cast<T*>(dBv.at(l));
      T* dcl = const_cast<T*>(dCv.at(l));
      if (z) {  // dz needs the ungated output C x + D u
        T y = 0;
#pragma omp simd reduction(+ : y)
        for (int64_t n = 0; n < N; ++n) y += xc[n] * cl[n];
        const T sg = sigmoid_v(z[l]);
        g.dz[row * L + l] = dout[l] * (y + dskip * ul) * sg * (T(1) + z[l] * (T(1) - sg));
      }
      T du_acc = 0, ddt_acc = 0;
#pragma omp simd reduction(+ : du_acc, ddt_acc)
      for (int64_t n = 0; n < N; ++n) {
        const T h = cl[n] * gl + hc[n];  // dLoss/dx_l
        dcl[n] += gl * xc[n];
        dbl[n] += h * dul;
        du_acc += h * bl[n];
        const T t = h * xp[n] * e[n];
        ddt_acc += h * bl[n] * ul + t * a[n];
        dA_acc[n] += t * dtl;
        hc[n] = e[n] * h;
      }
      du[l] = du_acc * dtl;
      ddt[l] = ddt_acc;
    }
  }

  // The elementwise parts: the D skip, and delta through bias and softplus.
  T dD = 0, dbias = 0;
#pragma omp simd reduction(+ : dD, dbias)
  for (int64_t l = 0; l < L; ++l) {
    du[l] += gy[l] * dskip;
    dD += gy[l] * u[l];
    const T grad = s.softplus ? ddt[l] * sigmoid_v(delta[l] + bias) : ddt[l];
    ddt[l] = grad;
    dbias += grad;
  }
  std::copy(dA_acc, dA_acc + N, g.dA + row * N);
  g.dD[row] = dD;
  g.dbias[row] = dbias;
}

// ---------------------------------------------------------------- driver
// Channels are split into `parts` contiguous ranges per batch element; task (b, p) owns one.
int64_t num_parts(int64_t batch, int64_t dim) {
  const int64_t want = (2 * at::get_num_threads() + batch - 1) / batch;
  return std::max<int64_t>(1, std::min<int64_t>(dim, want));
}

// fn(b, d, p, scratch) runs for every row; scratch is a buffer private to the calling thread.
template <typename T, typename F> void for_each_row(int64_t batch, int64_t dim, int64_t parts, F fn) {
  at::parallel_for(0, batch * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / parts, p = t % parts;
      for (int64_t d = p * dim / parts; d < (p + 1) * dim / parts; ++d) fn(b, d, p, scratch);
    }
  });
}

template <typename T> const T* opt_ptr(const c10::optional<torch::Tensor>& t) {
  return (t.has_value() && t->defined() && t->numel() > 0) ? t->data_ptr<T>() : nullptr;
}

template <typename T>
Inputs<T> inputs_of(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                    const torch::Tensor& Bm, const torch::Tensor& Cm,
                    const c10::optional<torch::Tensor>& Dskip, const c10::optional<torch::Tensor>& z,
                    const c10::optional<torch::Tensor>& bias) {
  return {u.data_ptr<T>(), delta.data_ptr<T>(), A.data_ptr<T>(), Bm.data_ptr<T>(), Cm.data_ptr<T>(),
          opt_ptr<T>(Dskip), opt_ptr<T>(z), opt_ptr<T>(bias)};
}

Shape make_shape(const torch::Tensor& u, const torch::Tensor& A, const torch::Tensor& Bm,
                 const torch::Tensor& Cm, bool softplus, int64_t chunk) {
  Shape s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.len = u.size(2);
  s.nstate = A.size(1);
  s.var_b = Bm.dim() == 4;
  s.var_c = Cm.dim() == 4;
  s.groups_b = s.var_b ? Bm.size(1) : 1;
  s.groups_c = s.var_c ? Cm.size(1) : 1;
  s.chunk = chunk;
  s.softplus = softplus;
  return s;
}

}  // namespace

// Returns (out, last_state, ckpt); ckpt is empty unless save_ckpt.
std::vector<torch::Tensor> fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                               torch::Tensor Cm, c10::optional<torch::Tensor> Dskip,
                               c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> bias,
                               bool softplus, int64_t chunk, bool save_ckpt) {
  const Shape s = make_shape(u, A, Bm, Cm, softplus, chunk);
  auto out = torch::empty_like(u);
  auto last = torch::empty({s.batch, s.dim, s.nstate}, u.options());
  auto ckpt = torch::empty({save_ckpt ? s.batch : 0, s.dim, (s.len + chunk - 1) / chunk, s.nstate},
                           u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    using T = scalar_t;
    const Inputs<T> in = inputs_of<T>(u, delta, A, Bm, Cm, Dskip, z, bias);
    T* pck = save_ckpt ? ckpt.data_ptr<T>() : nullptr;
    const std::vector<Tile> tiles = make_tiles(s);
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch;
      for (int64_t i = begin; i < end; ++i) {
        auto run = [&](auto vb, auto vc) {
          forward_tile<T, decltype(vb)::value, decltype(vc)::value>(
              s, in, tiles[i], out.data_ptr<T>(), last.data_ptr<T>(), pck, scratch);
        };
        using yes = std::true_type;
        using no = std::false_type;
        if (s.var_b && s.var_c) run(yes{}, yes{});
        else if (s.var_b) run(yes{}, no{});
        else if (s.var_c) run(no{}, yes{});
        else run(no{}, no{});
      }
    });
  });
  return {out, last, ckpt};
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, dbias); dB/dC of variable B/C in the kernel layout
// (Bt, G, L, N); dz is empty without z.
std::vector<torch::Tensor> bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                               torch::Tensor Cm, c10::optional<torch::Tensor> Dskip,
                               c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> bias,
                               bool softplus, int64_t chunk, torch::Tensor ckpt, torch::Tensor dout) {
  const Shape s = make_shape(u, A, Bm, Cm, softplus, chunk);
  const int64_t parts = num_parts(s.batch, s.dim);
  auto opts = u.options();
  auto du = torch::empty_like(u), ddelta = torch::empty_like(u);
  auto dz = (z.has_value() && z->defined()) ? torch::empty_like(u) : torch::empty({0}, opts);
  auto dA = torch::empty({s.batch, s.dim, s.nstate}, opts);
  auto dD = torch::empty({s.batch, s.dim}, opts), dbias = torch::empty({s.batch, s.dim}, opts);
  auto grad_buffer = [&](bool variable, int64_t groups) {
    return variable ? torch::zeros({parts, s.batch, groups, s.len, s.nstate}, opts)
                    : torch::zeros({s.batch, s.dim, s.nstate}, opts);
  };
  auto dB = grad_buffer(s.var_b, s.groups_b), dC = grad_buffer(s.var_c, s.groups_c);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    using T = scalar_t;
    const Inputs<T> in = inputs_of<T>(u, delta, A, Bm, Cm, Dskip, z, bias);
    const Grads<T> g{du.data_ptr<T>(), ddelta.data_ptr<T>(), dz.numel() ? dz.data_ptr<T>() : nullptr,
                     dA.data_ptr<T>(), dD.data_ptr<T>(), dbias.data_ptr<T>(), dB.data_ptr<T>(),
                     dC.data_ptr<T>()};
    for_each_row<T>(s.batch, s.dim, parts,
                    [&](int64_t b, int64_t d, int64_t p, std::vector<T>& scratch) {
      backward_row<T>(s, in, b, d, p, ckpt.data_ptr<T>(), dout.data_ptr<T>(), g, scratch);
    });
  });
  // Partial sums: over the parts (variable B/C) or over the batch (fixed B/C, A, D, bias).
  return {du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0), dz, dbias.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Selective scan for CPU tensors (forward and backward).";
  m.def("fwd", &fwd, "selective scan forward");
  m.def("bwd", &bwd, "selective scan backward");
}
