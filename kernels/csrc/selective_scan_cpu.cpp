// Selective scan (Mamba's S6) for CPU tensors: forward and a hand-written backward.
//
//   dt_l = softplus(delta_l + bias)            (softplus optional)
//   x_l  = exp(dt_l A) x_{l-1} + dt_l B_l u_l  (state of N values per channel)
//   y_l  = (C_l x_l + D u_l) * silu(z_l)       (D and z optional)
//
// Channels are scanned in tiles of W = 16, one channel per SIMD lane (`omp simd` loops; exp,
// 2^x and log1p are written so that GCC vectorises them), with the tile's N x W states in a
// small buffer that stays in cache. Tiles are spread over torch's intra-op threads with
// at::parallel_for. Forward never forms a (B, D, L, N) tensor. When gradients are needed, the
// forward saves the state at the start of every chunk of K steps; the backward recomputes one
// chunk's states at a time and runs the adjoint recurrence in reverse.
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

// ---------------------------------------------------------------- forward
// The forward scans W channels of one batch element at once, one channel per SIMD lane, so the
// readout C x is a vertical sum over N (no horizontal reduction per step). A tile's channels
// share their B and C rows (same group), which are then broadcast across lanes. Each chunk of K
// steps of u and dt is transposed into a (K, W) buffer first.
constexpr int64_t W = 16;

// Moving a chunk between rows (channel-major, as in memory) and lanes (step-major, W per step).
// dst[j * W + c] = src[(row0 + c) * L + l0 + j]: steps l0 .. l0 + kc of `width` rows, one per lane.
template <typename T> void gather_lanes(const T* src, int64_t row0, int64_t width, int64_t L,
                                        int64_t l0, int64_t kc, T* dst) {
  const T* base = src + row0 * L + l0;
  for (int64_t j = 0; j < kc; ++j) {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) dst[j * W + c] = base[c * L + j];
  }
}

// The inverse of gather_lanes: dst[(row0 + c) * L + l0 + j] = src[j * W + c]. Row by row:
// contiguous stores measured faster than scatter instructions.
template <typename T> void scatter_lanes(const T* src, int64_t row0, int64_t width, int64_t L,
                                         int64_t l0, int64_t kc, T* dst) {
  T* base = dst + row0 * L + l0;
  for (int64_t c = 0; c < width; ++c)
    for (int64_t j = 0; j < kc; ++j) base[c * L + j] = src[j * W + c];
}

// Asks the cache for the next chunk of each lane's rows while this one is computed.
template <typename T> void prefetch_chunk(const T* base, int64_t row0, int64_t width, int64_t L,
                                          int64_t l0, int64_t kc) {
  if (l0 < 0 || l0 >= L || !base) return;
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t c = 0; c < width; ++c)
    for (int64_t j = 0; j < std::min(kc, L - l0); j += line) __builtin_prefetch(base + (row0 + c) * L + l0 + j);
}

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

// Per-lane constants of a tile, (N, W) or (W,): A log2 e (and A itself when `a` is given), fixed
// B and C, D and delta_bias. Padded lanes (c >= width) keep the zeros they were allocated with.
template <typename T>
void load_lane_constants(const Shape& s, const Inputs<T>& in, const Tile& t, T* a2, T* bt, T* ct,
                         T* dskip, T* bias, T* a = nullptr) {
  const int64_t N = s.nstate;
  for (int64_t c = 0; c < t.width; ++c) {
    const int64_t d = t.d0 + c;
    for (int64_t n = 0; n < N; ++n) {
      a2[n * W + c] = in.A[d * N + n] * kLog2e<T>;
      if (a) a[n * W + c] = in.A[d * N + n];
      if (!s.var_b) bt[n * W + c] = in.B[d * N + n];
      if (!s.var_c) ct[n * W + c] = in.C[d * N + n];
    }
    dskip[c] = in.Dskip ? in.Dskip[d] : T(0);
    bias[c] = in.bias ? in.bias[d] : T(0);
  }
}

// One time step for all W lanes: every state n of every lane, and the lane's output. The
// output sums live in a local array of W values, which the compiler keeps in registers across n.
// Variable B/C (VB/VC) hold one value per n for all lanes; fixed ones one value per lane.
template <typename T, bool VB, bool VC>
inline void scan_step(int64_t N, const T* dt, const T* u, const T* a2, const T* b, const T* c,
                      const T* dskip, T* x, T* y) {
  T du[W], acc[W];
#pragma omp simd
  for (int64_t i = 0; i < W; ++i) {
    du[i] = dt[i] * u[i];
    acc[i] = dskip[i] * u[i];
  }
  for (int64_t n = 0; n < N; ++n) {
    const T* an = a2 + n * W;
    T* xn = x + n * W;
#pragma omp simd
    for (int64_t i = 0; i < W; ++i) {
      const T v = exp2_v(dt[i] * an[i]) * xn[i] + du[i] * (VB ? b[n] : b[n * W + i]);
      xn[i] = v;
      acc[i] += v * (VC ? c[n] : c[n * W + i]);
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < W; ++i) y[i] = acc[i];
}

template <typename T, bool VB, bool VC>
void forward_tile(const Shape& s, const Inputs<T>& in, const Tile& t, T* out, T* last_state, T* ckpt,
                  std::vector<T>& scratch) {
  const int64_t N = s.nstate, L = s.len, K = s.chunk, nchunks = (L + K - 1) / K;
  const int64_t row0 = t.b * s.dim + t.d0;
  const int64_t kb = std::min(K, L);  // steps per chunk buffer
  scratch.assign((4 * N + 3 * kb + 2) * W, T(0));  // zeros: padded lanes stay inert
  T* x = scratch.data();       // (N, W) the tile's states
  T* a2 = x + N * W;           // (N, W) A log2 e
  T* bt = a2 + N * W;          // (N, W) fixed B, per lane
  T* ct = bt + N * W;          // (N, W) fixed C, per lane
  T* dtc = ct + N * W;         // (kb, W) dt of the chunk
  T* uc = dtc + kb * W;        // (kb, W) u of the chunk
  T* yc = uc + kb * W;         // (kb, W) output of the chunk
  T* dskip = yc + kb * W;      // (W,)
  T* bias = dskip + W;         // (W,)
  load_lane_constants(s, in, t, a2, bt, ct, dskip, bias);
  const RowView<T> Bv = row_of(in.B, s.var_b, s.groups_b, s, t.b, t.d0);
  const RowView<T> Cv = row_of(in.C, s.var_c, s.groups_c, s, t.b, t.d0);

  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t l0 = ci * K, kc = std::min(K, L - l0);
    if (ckpt)
      for (int64_t c = 0; c < t.width; ++c)
        for (int64_t n = 0; n < N; ++n) ckpt[((row0 + c) * nchunks + ci) * N + n] = x[n * W + c];
    for (const T* next : {in.delta, in.u}) prefetch_chunk(next, row0, t.width, L, l0 + K, K);
    gather_lanes(in.delta, row0, t.width, L, l0, kc, dtc);
    gather_lanes(in.u, row0, t.width, L, l0, kc, uc);
    for (int64_t j = 0; j < kc; ++j) {
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) dtc[j * W + i] = s.softplus ? softplus_v(dtc[j * W + i] + bias[i])
                                                                  : dtc[j * W + i] + bias[i];
    }
    for (int64_t j = 0; j < kc; ++j)
      scan_step<T, VB, VC>(N, dtc + j * W, uc + j * W, a2, VB ? Bv.at(l0 + j) : bt,
                           VC ? Cv.at(l0 + j) : ct, dskip, x, yc + j * W);
    scatter_lanes(yc, row0, t.width, L, l0, kc, out);
    if (in.z)
      for (int64_t c = 0; c < t.width; ++c) {
        T* o = out + (row0 + c) * L + l0;
        const T* z = in.z + (row0 + c) * L + l0;
#pragma omp simd
        for (int64_t j = 0; j < kc; ++j) o[j] *= z[j] * sigmoid_v(z[j]);
      }
  }
  for (int64_t c = 0; c < t.width; ++c)
    for (int64_t n = 0; n < N; ++n) last_state[(row0 + c) * N + n] = x[n * W + c];
}

// ---------------------------------------------------------------- backward
// The backward walks the chunks of a tile last to first: it recomputes the chunk's states from
// the saved one, then runs the adjoint recurrence h_l = C_l dy_l + exp(dt_{l+1} A) h_{l+1} in
// reverse, one channel per lane as in the forward. Per-lane sums (du, ddt, dA, dD, dbias, and
// dB/dC of fixed B/C) stay vertical; dB/dC of variable B/C are summed over the lanes once per
// chunk into the task's own slice of a partial buffer (no races).
template <typename T> struct Grads {
  T *du, *ddelta, *dz;  // (Bt, D, L)
  T *dA;                // (Bt, D, N)  summed over Bt afterwards
  T *dD, *dbias;        // (Bt, D)     summed over Bt afterwards
  T *dB, *dC;           // variable: (P, Bt, G, L, N); fixed: (Bt, D, N) summed over Bt afterwards
};

// One reverse time step for all W lanes and every state n: the adjoint h of each state, the
// lane terms of dB and dC (variable: stored per step for a lane sum; fixed: accumulated), and
// per-lane sums for dA, du and ddt (the last two in local arrays kept in registers across n).
template <typename T, bool VB, bool VC>
inline void adjoint_step(int64_t N, const T* dt, const T* u, const T* gy, const T* a, const T* b,
                         const T* c, const T* xp, const T* xc, const T* e, T* hc, T* dA, T* db,
                         T* dc, T* du_out, T* ddt_out) {
  T du[W] = {}, ddt[W] = {};
  for (int64_t n = 0; n < N; ++n) {
    const int64_t at = n * W;
#pragma omp simd
    for (int64_t i = 0; i < W; ++i) {
      const T bi = VB ? b[n] : b[at + i], ci = VC ? c[n] : c[at + i];
      const T h = ci * gy[i] + hc[at + i];  // dLoss/dx_l
      const T t = h * xp[at + i] * e[at + i];
      if (VC) dc[at + i] = gy[i] * xc[at + i]; else dc[at + i] += gy[i] * xc[at + i];
      if (VB) db[at + i] = h * dt[i] * u[i]; else db[at + i] += h * dt[i] * u[i];
      du[i] += h * bi;
      ddt[i] += h * bi * u[i] + t * a[at + i];
      dA[at + i] += t * dt[i];
      hc[at + i] = e[at + i] * h;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < W; ++i) {
    du_out[i] = du[i];
    ddt_out[i] = ddt[i];
  }
}

// Adds the lane sums of `count` rows of W lanes to dst, halving the width with vertical adds
// (measured 3x faster than a horizontal reduction per row). Overwrites rows; tmp holds 8 * count.
static_assert(W == 16, "add_lane_sums halves 16 -> 8 -> 4");
template <typename T> void add_lane_sums(T* rows, int64_t count, T* tmp, T* dst) {
  for (int64_t r = 0; r < count; ++r) {
#pragma omp simd
    for (int64_t k = 0; k < 8; ++k) tmp[r * 8 + k] = rows[r * 16 + k] + rows[r * 16 + 8 + k];
  }
  for (int64_t r = 0; r < count; ++r) {
#pragma omp simd
    for (int64_t k = 0; k < 4; ++k) rows[r * 4 + k] = tmp[r * 8 + k] + tmp[r * 8 + 4 + k];
  }
  for (int64_t r = 0; r < count; ++r) dst[r] += (rows[r * 4] + rows[r * 4 + 2]) + (rows[r * 4 + 1] + rows[r * 4 + 3]);
}

template <typename T, bool VB, bool VC>
void backward_tile(const Shape& s, const Inputs<T>& in, const Tile& t, int64_t part, const T* ckpt,
                   const T* dout, const Grads<T>& g, std::vector<T>& scratch) {
  const int64_t N = s.nstate, L = s.len, K = s.chunk, nchunks = (L + K - 1) / K;
  const int64_t row0 = t.b * s.dim + t.d0;
  // Scratch: the tile's constants and accumulators (zeroed for every tile), then the chunk
  // buffers, sized for min(K, L) steps. Those are zeroed only when allocated or when the tile is
  // narrower than W: padded lanes must hold zeros so that they add nothing to the lane sums.
  const int64_t kb = std::min(K, L), per_tile = (8 * N + 6) * W;
  const int64_t size = per_tile + ((4 * kb + 1) * N + kb * N / 2 + 9 * kb) * W;
  if (static_cast<int64_t>(scratch.size()) != size || t.width < W) scratch.assign(size, T(0));
  std::fill(scratch.begin(), scratch.begin() + per_tile, T(0));
  T* p = scratch.data();
  auto take = [&](int64_t n) { T* q = p; p += n * W; return q; };
  T *a2 = take(N), *a = take(N), *bt = take(N), *ct = take(N);         // per lane constants
  T *hc = take(N), *dA = take(N), *dbf = take(N), *dcf = take(N);      // per lane accumulators
  T *dskip = take(1), *bias = take(1), *dD = take(1), *dbias = take(1), *du = take(1), *ddt = take(1);
  T *xs = take((kb + 1) * N), *ea = take(kb * N);                      // the chunk's states, exp(dt A)
  T *gb = take(kb * N), *gc = take(kb * N), *tmp = take(kb * N / 2);   // lane terms of variable dB, dC
  T *dtc = take(kb), *uc = take(kb), *gyc = take(kb), *dyc = take(kb), *zc = take(kb), *sgc = take(kb);
  T *yc = take(kb), *duc = take(kb), *ddtc = take(kb);
  load_lane_constants(s, in, t, a2, bt, ct, dskip, bias, a);
  const RowView<T> Bv = row_of(in.B, VB, s.groups_b, s, t.b, t.d0);
  const RowView<T> Cv = row_of(in.C, VC, s.groups_c, s, t.b, t.d0);
  auto partial = [&](T* buf, int64_t groups) {  // this task's (L, N) slice for the tile's group
    return buf + ((part * s.batch + t.b) * groups + t.d0 / (s.dim / groups)) * L * N;
  };
  T* dBp = VB ? partial(g.dB, s.groups_b) : nullptr;
  T* dCp = VC ? partial(g.dC, s.groups_c) : nullptr;

  for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
    const int64_t l0 = ci * K, kc = std::min(K, L - l0);
    for (const T* next : {in.delta, in.u, dout, in.z}) prefetch_chunk(next, row0, t.width, L, l0 - K, K);
    // Gather the chunk, one channel per lane.
    for (int64_t c = 0; c < t.width; ++c)
      for (int64_t n = 0; n < N; ++n) xs[n * W + c] = ckpt[((row0 + c) * nchunks + ci) * N + n];
    gather_lanes(in.delta, row0, t.width, L, l0, kc, dtc);
    gather_lanes(in.u, row0, t.width, L, l0, kc, uc);
    gather_lanes(dout, row0, t.width, L, l0, kc, dyc);
    if (in.z) gather_lanes(in.z, row0, t.width, L, l0, kc, zc);
    for (int64_t j = 0; j < kc; ++j) {
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) dtc[j * W + i] += bias[i];
    }
    // dt, its derivative with respect to delta, and dy times the gate silu(z).
    if (s.softplus) {
#pragma omp simd
      for (int64_t i = 0; i < kc * W; ++i) {
        sgc[i] = sigmoid_v(dtc[i]);
        dtc[i] = softplus_v(dtc[i]);
      }
    } else {
      std::fill(sgc, sgc + kc * W, T(1));
    }
    if (in.z) {
#pragma omp simd
      for (int64_t i = 0; i < kc * W; ++i) gyc[i] = dyc[i] * zc[i] * sigmoid_v(zc[i]);
      std::fill(yc, yc + kc * W, T(0));
    } else {
      std::copy(dyc, dyc + kc * W, gyc);
    }
    for (int64_t j = 0; j < kc; ++j) {  // recompute the chunk's states
      const T* dtj = dtc + j * W;
      const T* bl = Bv.at(l0 + j);
      const T* cl = Cv.at(l0 + j);
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) du[i] = dtj[i] * uc[j * W + i];
      for (int64_t n = 0; n < N; ++n) {
        const T* b = VB ? bl + n : bt + n * W;
        const T* xp = xs + (j * N + n) * W;
        T* xn = xs + ((j + 1) * N + n) * W;
        T* e = ea + (j * N + n) * W;
#pragma omp simd
        for (int64_t i = 0; i < W; ++i) {
          e[i] = exp2_v(dtj[i] * a2[n * W + i]);
          xn[i] = e[i] * xp[i] + du[i] * (VB ? b[0] : b[i]);
        }
        if (in.z) {  // the ungated output C x, for dz
          const T* cc = VC ? cl + n : ct + n * W;
#pragma omp simd
          for (int64_t i = 0; i < W; ++i) yc[j * W + i] += xn[i] * (VC ? cc[0] : cc[i]);
        }
      }
    }
    for (int64_t j = kc - 1; j >= 0; --j) {  // adjoint recurrence, last step first
      const T* bl = Bv.at(l0 + j);
      const T* cl = Cv.at(l0 + j);
      adjoint_step<T, VB, VC>(N, dtc + j * W, uc + j * W, gyc + j * W, a, VB ? bl : bt, VC ? cl : ct,
                              xs + j * N * W, xs + (j + 1) * N * W, ea + j * N * W, hc, dA,
                              VB ? gb + j * N * W : dbf, VC ? gc + j * N * W : dcf, du, ddt);
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) {
        const int64_t at = j * W + i;
        duc[at] = du[i] * dtc[at] + gyc[at] * dskip[i];
        dD[i] += gyc[at] * uc[at];
        ddtc[at] = ddt[i] * sgc[at];
        dbias[i] += ddtc[at];
      }
    }
    if (VB) add_lane_sums(gb, kc * N, tmp, dBp + l0 * N);
    if (VC) add_lane_sums(gc, kc * N, tmp, dCp + l0 * N);
    scatter_lanes(duc, row0, t.width, L, l0, kc, g.du);
    scatter_lanes(ddtc, row0, t.width, L, l0, kc, g.ddelta);
    if (in.z) {  // dz from the ungated output, written over yc
      for (int64_t j = 0; j < kc; ++j) {
#pragma omp simd
        for (int64_t i = 0; i < W; ++i) {
          const int64_t at = j * W + i;
          const T sz = sigmoid_v(zc[at]);
          yc[at] = dyc[at] * (yc[at] + dskip[i] * uc[at]) * sz * (T(1) + zc[at] * (T(1) - sz));
        }
      }
      scatter_lanes(yc, row0, t.width, L, l0, kc, g.dz);
    }
  }
  for (int64_t c = 0; c < t.width; ++c) {
    const int64_t row = row0 + c;
    for (int64_t n = 0; n < N; ++n) {
      g.dA[row * N + n] = dA[n * W + c];
      if (!VB) g.dB[row * N + n] = dbf[n * W + c];
      if (!VC) g.dC[row * N + n] = dcf[n * W + c];
    }
    g.dD[row] = dD[c];
    g.dbias[row] = dbias[c];
  }
}

// ---------------------------------------------------------------- driver
// Tasks for the backward: the tiles of each batch element split into `parts` contiguous runs.
int64_t num_parts(int64_t batch, int64_t tiles_per_batch) {
  const int64_t want = (2 * at::get_num_threads() + batch - 1) / batch;
  return std::max<int64_t>(1, std::min<int64_t>(tiles_per_batch, want));
}

// Calls fn(std::integral_constant<bool, var_b>, std::integral_constant<bool, var_c>).
template <typename F> void with_layouts(const Shape& s, F fn) {
  using yes = std::true_type;
  using no = std::false_type;
  if (s.var_b && s.var_c) fn(yes{}, yes{});
  else if (s.var_b) fn(yes{}, no{});
  else if (s.var_c) fn(no{}, yes{});
  else fn(no{}, no{});
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
      for (int64_t i = begin; i < end; ++i)
        with_layouts(s, [&](auto vb, auto vc) {
          forward_tile<T, decltype(vb)::value, decltype(vc)::value>(
              s, in, tiles[i], out.data_ptr<T>(), last.data_ptr<T>(), pck, scratch);
        });
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
  const std::vector<Tile> tiles = make_tiles(s);
  const int64_t per_batch = static_cast<int64_t>(tiles.size()) / s.batch;
  const int64_t parts = num_parts(s.batch, per_batch);
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
    at::parallel_for(0, s.batch * parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / parts, p = task % parts;
        for (int64_t i = p * per_batch / parts; i < (p + 1) * per_batch / parts; ++i)
          with_layouts(s, [&](auto vb, auto vc) {
            backward_tile<T, decltype(vb)::value, decltype(vc)::value>(
                s, in, tiles[b * per_batch + i], p, ckpt.data_ptr<T>(), dout.data_ptr<T>(), g, scratch);
          });
      }
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
