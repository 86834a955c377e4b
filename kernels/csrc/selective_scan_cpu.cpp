// Selective scan (Mamba's S6) for CPU tensors: forward and a hand-written backward.
//
// One (batch, channel) row is scanned at a time with its state of N values kept in a small
// buffer that stays in L1 cache; the loop over N is vectorised (`omp simd`), rows are spread
// over torch's intra-op threads with at::parallel_for.  Forward never forms a (B, D, L, N)
// tensor.  When gradients are needed, the forward saves the state at the start of every chunk
// of K steps; the backward recomputes the states of one chunk at a time and runs the adjoint
// recurrence in reverse.
//
// The kernel is the bare recurrence  x_l = exp(dt_l A) x_{l-1} + dt_l B_l u_l,  y_l = C_l x_l.
// The elementwise parts of Mamba's scan (delta_bias, softplus, the D skip and the silu(z) gate)
// are applied around it by the Python side with vectorised torch ops and autograd.
//
// Layouts (all contiguous, one scalar type T = float or double, prepared by the Python side):
//   u, dt, y               (Bt, D, L)
//   A                      (D, N)
//   B, C  variable         (Bt, G, L, N)   -- note L before N: one step's N values are contiguous
//         fixed            (D, N)
//   ckpt                   (Bt, D, ceil(L / K), N)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for float in a form GCC vectorises inside `omp simd` loops (no libm call):
// Cody-Waite range reduction and a degree-6 polynomial, about 1 ulp on the whole range.
// NaN propagates; x < -87.3 underflows to 0; x > 88.7 saturates at FLT_MAX * 1.
#pragma omp declare simd notinbranch
inline float exp_simd(float x) {
  const float hi = 88.7f, lo = -87.3f;
  float xc = x > hi ? hi : x;           // NaN passes both comparisons unchanged
  xc = xc < lo ? lo : xc;
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;      // ln 2, split in two for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const float v = p * scale;
  return x < lo ? 0.0f : v;
}

#pragma omp declare simd notinbranch
inline double exp_simd(double x) { return std::exp(x); }

// Where one row's B (or C) values live: step l's N values start at base + l * step.
template <typename T> struct RowView {
  const T* base;
  int64_t step;
  const T* at(int64_t l) const { return base + l * step; }
};

struct Shape {
  int64_t batch, dim, len, nstate, groups_b, groups_c, chunk;
  bool var_b, var_c;
};

template <typename T>
RowView<T> row_of(const T* m, bool variable, int64_t groups, const Shape& s, int64_t b, int64_t d) {
  if (!variable) return {m + d * s.nstate, 0};
  const int64_t g = d / (s.dim / groups);
  return {m + (b * groups + g) * s.len * s.nstate, s.nstate};
}

// ---------------------------------------------------------------- forward
template <typename T>
void forward_row(const Shape& s, int64_t b, int64_t d, const T* u, const T* dt, const T* A,
                 const T* Bm, const T* Cm, T* y, T* last_state, T* ckpt) {
  const int64_t N = s.nstate, L = s.len, row = b * s.dim + d;
  u += row * L;
  dt += row * L;
  y += row * L;
  const T* a = A + d * N;
  const RowView<T> Bv = row_of(Bm, s.var_b, s.groups_b, s, b, d);
  const RowView<T> Cv = row_of(Cm, s.var_c, s.groups_c, s, b, d);
  T* x = last_state + row * N;
  std::fill(x, x + N, T(0));
  T* ck = ckpt ? ckpt + row * ((L + s.chunk - 1) / s.chunk) * N : nullptr;
  for (int64_t l = 0; l < L; ++l) {
    if (ck && l % s.chunk == 0) std::copy(x, x + N, ck + (l / s.chunk) * N);
    const T dtl = dt[l], du = dtl * u[l];
    const T* bl = Bv.at(l);
    const T* cl = Cv.at(l);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      const T xn = exp_simd(dtl * a[n]) * x[n] + du * bl[n];
      x[n] = xn;
      acc += xn * cl[n];
    }
    y[l] = acc;
  }
}

// ---------------------------------------------------------------- backward
// Per-row outputs go straight to their place; dB/dC of variable B/C are summed over the
// channels of one task into that task's own slice of a partial buffer (no races).
template <typename T> struct Grads {
  T *du, *ddt;                // (Bt, D, L)
  T *dA;                      // (Bt, D, N)  summed over Bt afterwards
  T *dB, *dC;                 // variable: (P, Bt, G, L, N); fixed: (Bt, D, N)
};

template <typename T>
void backward_row(const Shape& s, int64_t b, int64_t d, int64_t part, const T* u, const T* dt,
                  const T* A, const T* Bm, const T* Cm, const T* ckpt, const T* dy,
                  const Grads<T>& g, std::vector<T>& scratch) {
  const int64_t N = s.nstate, L = s.len, K = s.chunk, row = b * s.dim + d;
  const int64_t nchunks = (L + K - 1) / K;
  u += row * L;
  dt += row * L;
  dy += row * L;
  const T* a = A + d * N;
  const RowView<T> Bv = row_of(Bm, s.var_b, s.groups_b, s, b, d);
  const RowView<T> Cv = row_of(Cm, s.var_c, s.groups_c, s, b, d);
  const T* ck = ckpt + row * nchunks * N;

  // Gradient rows for B and C: a partial-buffer row (variable) or this (b, d)'s own row (fixed).
  auto grad_row = [&](T* buf, bool variable, int64_t groups) -> std::pair<T*, int64_t> {
    if (!variable) return {buf + row * N, 0};
    const int64_t gi = d / (s.dim / groups);
    return {buf + ((part * s.batch + b) * groups + gi) * L * N, N};
  };
  auto [dBbase, dBstep] = grad_row(g.dB, s.var_b, s.groups_b);
  auto [dCbase, dCstep] = grad_row(g.dC, s.var_c, s.groups_c);

  scratch.assign((2 * K + 2) * N + N, T(0));
  T* xs = scratch.data();             // (K + 1, N) states of the chunk, xs[0] = state before it
  T* ea = xs + (K + 1) * N;           // (K, N) exp(dt A) of the chunk
  T* hc = ea + K * N;                 // (N,) exp(dt_{l+1} A) h_{l+1}: adjoint carried from the future
  T* dA_acc = hc + N;                 // (N,)

  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t l0 = c * K, kc = std::min(K, L - l0);
    std::copy(ck + c * N, ck + (c + 1) * N, xs);
    for (int64_t j = 0; j < kc; ++j) {  // recompute the chunk's states
      const int64_t l = l0 + j;
      const T dtl = dt[l], du = dtl * u[l];
      const T* bl = Bv.at(l);
      const T* xp = xs + j * N;
      T* xn = xs + (j + 1) * N;
      T* e = ea + j * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        e[n] = exp_simd(dtl * a[n]);
        xn[n] = e[n] * xp[n] + du * bl[n];
      }
    }
    for (int64_t j = kc - 1; j >= 0; --j) {  // adjoint recurrence, last step first
      const int64_t l = l0 + j;
      const T dtl = dt[l], ul = u[l], du = dtl * ul, gy = dy[l];
      const T* bl = Bv.at(l);
      const T* cl = Cv.at(l);
      const T* xp = xs + j * N;
      const T* xc = xs + (j + 1) * N;
      const T* e = ea + j * N;
      T* dbl = dBbase + l * dBstep;
      T* dcl = dCbase + l * dCstep;
      T du_acc = 0, ddt_acc = 0;
#pragma omp simd reduction(+ : du_acc, ddt_acc)
      for (int64_t n = 0; n < N; ++n) {
        const T h = cl[n] * gy + hc[n];  // dLoss/dx_l
        dcl[n] += gy * xc[n];
        dbl[n] += h * du;
        du_acc += h * bl[n];
        const T t = h * xp[n] * e[n];
        ddt_acc += h * bl[n] * ul + t * a[n];
        dA_acc[n] += t * dtl;
        hc[n] = e[n] * h;
      }
      g.du[row * L + l] = du_acc * dtl;
      g.ddt[row * L + l] = ddt_acc;
    }
  }
  std::copy(dA_acc, dA_acc + N, g.dA + row * N);
}

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

Shape make_shape(const torch::Tensor& u, const torch::Tensor& A, const torch::Tensor& Bm,
                 const torch::Tensor& Cm, int64_t chunk) {
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
  return s;
}

}  // namespace

// Returns (y, last_state, ckpt); ckpt is empty unless save_ckpt.
std::vector<torch::Tensor> fwd(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                               torch::Tensor Cm, int64_t chunk, bool save_ckpt) {
  const Shape s = make_shape(u, A, Bm, Cm, chunk);
  auto y = torch::empty_like(u);
  auto last = torch::empty({s.batch, s.dim, s.nstate}, u.options());
  auto ckpt = torch::empty({save_ckpt ? s.batch : 0, s.dim, (s.len + chunk - 1) / chunk, s.nstate},
                           u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    using T = scalar_t;
    T* pck = save_ckpt ? ckpt.data_ptr<T>() : nullptr;
    for_each_row<T>(s.batch, s.dim, num_parts(s.batch, s.dim),
                    [&](int64_t b, int64_t d, int64_t, std::vector<T>&) {
      forward_row<T>(s, b, d, u.data_ptr<T>(), dt.data_ptr<T>(), A.data_ptr<T>(), Bm.data_ptr<T>(),
                     Cm.data_ptr<T>(), y.data_ptr<T>(), last.data_ptr<T>(), pck);
    });
  });
  return {y, last, ckpt};
}

// Returns (du, ddt, dA, dB, dC) with dB/dC of variable B/C in the kernel layout (Bt, G, L, N).
std::vector<torch::Tensor> bwd(torch::Tensor u, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                               torch::Tensor Cm, int64_t chunk, torch::Tensor ckpt, torch::Tensor dy) {
  const Shape s = make_shape(u, A, Bm, Cm, chunk);
  const int64_t parts = num_parts(s.batch, s.dim);
  auto opts = u.options();
  auto du = torch::empty_like(u), ddt = torch::empty_like(u);
  auto dA = torch::empty({s.batch, s.dim, s.nstate}, opts);
  auto grad_buffer = [&](bool variable, int64_t groups) {
    return variable ? torch::zeros({parts, s.batch, groups, s.len, s.nstate}, opts)
                    : torch::zeros({s.batch, s.dim, s.nstate}, opts);
  };
  auto dB = grad_buffer(s.var_b, s.groups_b), dC = grad_buffer(s.var_c, s.groups_c);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    using T = scalar_t;
    Grads<T> g{du.data_ptr<T>(), ddt.data_ptr<T>(), dA.data_ptr<T>(), dB.data_ptr<T>(), dC.data_ptr<T>()};
    for_each_row<T>(s.batch, s.dim, parts,
                    [&](int64_t b, int64_t d, int64_t p, std::vector<T>& scratch) {
      backward_row<T>(s, b, d, p, u.data_ptr<T>(), dt.data_ptr<T>(), A.data_ptr<T>(),
                      Bm.data_ptr<T>(), Cm.data_ptr<T>(), ckpt.data_ptr<T>(), dy.data_ptr<T>(), g,
                      scratch);
    });
  });
  // Partial sums: over the parts (variable B/C) or over the batch (fixed B/C, and A).
  return {du, ddt, dA.sum(0), dB.sum(0), dC.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Selective scan recurrence for CPU tensors (forward and backward).";
  m.def("fwd", &fwd, "selective scan forward");
  m.def("bwd", &bwd, "selective scan backward");
}
