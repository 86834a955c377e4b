// Selective scan (Mamba's S6) for CPU tensors, forward and a hand-written backward, along one or
// several scan orders of a channels-last sequence (SS2D's four directions in one call).
//
//   dt_l = softplus(delta_l + bias)            (softplus optional)
//   x_l  = exp(dt_l A) x_{l-1} + dt_l B_l u_l  (state of N values per channel)
//   y_l  = (C_l x_l + D u_l) * silu(z_l)       (D and z optional)
//
// Directions: K scans (K = 1 for a plain sequence, 4 for SS2D) read the same input u in their
// own order: step l of direction k reads position pos[k][l]. Each direction has its own
// parameters (rows k*D + d of A, D and bias) and its own delta, z, B and C, stored by position;
// its outputs are added at the positions they were read from, so `out` is SS2D's merged result
// and no permuted copy of any tensor is ever made.
//
// Channels are scanned in tiles of W = 16, one channel per SIMD lane (`omp simd` loops; exp,
// 2^x and log1p are written so that GCC vectorises them), with the tile's N x W states in a
// small buffer that stays in cache. Channels are the innermost dimension in memory, so a step's
// W lanes are one contiguous load. Work is spread over torch's intra-op threads by ranges of
// batch elements (and, in the forward, channel tiles); a task loads a tile's per-channel
// constants once for its whole batch range. Forward never forms a (Bt, D, L, N) tensor. When
// gradients are needed, it saves the state at the start of every chunk of `chunk` steps; the
// backward recomputes one chunk's states at a time and runs the adjoint recurrence in reverse.
//
// Layouts (one scalar type T = float or double, prepared by the Python side; contiguous unless
// said otherwise):
//   u, out                 (Bt, L, D), or (Bt, D, L) when not channels_last (a plain sequence)
//   delta, z               (K, Bt, L, D), or (K, Bt, D, L)
//   A                      (K*D, N)
//   Dskip, bias            (K*D,) or empty
//   B, C  variable         (Bt, G, L, N)   any strides with N contiguous; row k*D + d reads
//                                          group (k*D + d) / (K*D / G)
//         fixed            (K*D, N)
//   pos                    (K, L) int64
// or, instead of delta, its low-rank form (SS2D's dt projection, fused so that the full delta
// and its gradient never exist): delta[k, b, l, d] = sum_r dt_low[b, k, pos, r] * dt_w[k*D + d, r]
//   dt_low                 (Bt, K, L, R)   dt_w (K*D, R)
//   ckpt                   (Bt, K, tiles, chunks, N, W)   lane layout
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
  t = -126.0f > t ? -126.0f : t;  // one max and one min instruction each (NaN passes through)
  t = 126.0f < t ? 126.0f : t;
  const float n = std::nearbyint(t), r = t - n;
  // Estrin's scheme: the same polynomial as Horner's with half the dependent steps, which the
  // scan's latency-bound inner loop needs more than the extra multiply.
  const float r2 = r * r;
  const float p01 = 6.931472028550421e-1f * r + 1.0f, p23 = 5.550332471162809e-2f * r + 2.402264791363012e-1f;
  const float p45 = 1.339887440266574e-3f * r + 9.618437357674640e-3f;
  const float p = (1.535336188319500e-4f * r2 + (p45)) * (r2 * r2) + (p23 * r2 + p01);
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


constexpr int64_t W = 16;

struct Shape {
  int64_t batch, len, dim, dirs, nstate, chunk, nchunks, tiles, groups_b, groups_c;
  int64_t sl, sd;  // strides of a step and of a channel within a (L, D) plane
  int64_t rank;    // R of a low-rank delta, 0 for a full one
  bool var_b, var_c, softplus;
  int64_t rows() const { return dirs * dim; }
};

// Variable B or C: step values at base + b * sb + g * sg + p * sl (N contiguous).
template <typename T> struct StateMatrix {
  const T* base;
  int64_t sb, sl, sg, groups;
};

template <typename T> struct Inputs {
  const T *u, *delta, *A, *Dskip, *z, *bias, *dt_low, *dt_w;
  StateMatrix<T> B, C;  // base alone for fixed (K*D, N)
  const int64_t* pos;
};

// Tiles of at most W channels that never straddle a group boundary of B or C.
struct Tile {
  int64_t d0, width;
};

std::vector<Tile> make_tiles(const Shape& s) {
  int64_t segment = s.dim;
  if (s.var_b) segment = std::gcd(segment, s.rows() / s.groups_b);
  if (s.var_c) segment = std::gcd(segment, s.rows() / s.groups_c);
  std::vector<Tile> tiles;
  for (int64_t seg0 = 0; seg0 < s.dim; seg0 += segment)
    for (int64_t d0 = seg0; d0 < seg0 + segment; d0 += W) tiles.push_back({d0, std::min(W, seg0 + segment - d0)});
  return tiles;
}

// Where the B or C row of (batch b, direction k, tile) lives: step values at at(pos).
template <typename T> struct RowView {
  const T* base;
  int64_t step;
  const T* at(int64_t p) const { return base + p * step; }
};

template <typename T> RowView<T> row_of(const StateMatrix<T>& m, const Shape& s, int64_t b, int64_t row) {
  const int64_t g = row / (s.rows() / m.groups);
  return {m.base + b * m.sb + g * m.sg, m.sl};
}

// Step j's lanes: dst[j * W + c] = plane[pos[j] * sl + c * sd], c < width. Channels-last planes
// (sd = 1) read one contiguous row per step; channels-first ones (sl = 1) hold a plain sequence,
// read in order (pos[j] = pos[0] + j, checked by the driver), so each channel's run of steps is
// one contiguous, vectorised load.
template <typename T> void gather_steps(const T* plane, const int64_t* pos, int64_t kc, const Shape& s,
                                        int64_t width, T* dst) {
  if (width < W)  // padded lanes read zeros (tiles of several widths share the chunk buffers)
    for (int64_t j = 0; j < kc; ++j) std::fill(dst + j * W + width, dst + (j + 1) * W, T(0));
  if (s.sd == 1) {
    for (int64_t j = 0; j < kc; ++j) {
      const T* src = plane + pos[j] * s.sl;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) dst[j * W + c] = src[c];
    }
  } else {
    const T* base = plane + pos[0];
    for (int64_t c = 0; c < width; ++c) {
#pragma omp simd
      for (int64_t j = 0; j < kc; ++j) dst[j * W + c] = base[c * s.sd + j];
    }
  }
}

// The inverse of gather_steps, adding to (ACCUMULATE) or overwriting the destination.
template <bool ACCUMULATE, typename T> void scatter_steps(const T* src, const int64_t* pos, int64_t kc,
                                                          const Shape& s, int64_t width, T* plane) {
  if (s.sd == 1) {
    for (int64_t j = 0; j < kc; ++j) {
      T* dst = plane + pos[j] * s.sl;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) dst[c] = ACCUMULATE ? dst[c] + src[j * W + c] : src[j * W + c];
    }
  } else {  // row by row: contiguous stores measured faster than scatter instructions
    T* base = plane + pos[0];
    for (int64_t c = 0; c < width; ++c)
      for (int64_t j = 0; j < kc; ++j) base[c * s.sd + j] = ACCUMULATE ? base[c * s.sd + j] + src[j * W + c] : src[j * W + c];
  }
}

// A chunk's delta from its low-rank form: dst[j * W + c] = sum_r low[pos[j] * R + r] * w[r * W + c].
template <typename T> void low_rank_steps(const T* low, const int64_t* pos, int64_t kc, int64_t R, const T* w,
                                          T* dst) {
  for (int64_t j = 0; j < kc; ++j) {
    const T* row = low + pos[j] * R;
    T acc[W] = {};
    for (int64_t r = 0; r < R; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) acc[c] += row[r] * w[r * W + c];
    }
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) dst[j * W + c] = acc[c];
  }
}

// The lanes' rows of dt_w, (R, W).
template <typename T> void load_low_rank_weights(const Shape& s, const Inputs<T>& in, int64_t row0, int64_t width,
                                                 T* w) {
  for (int64_t c = 0; c < width; ++c)
    for (int64_t r = 0; r < s.rank; ++r) w[r * W + c] = in.dt_w[(row0 + c) * s.rank + r];
}

// Per-lane constants of the channels row0 .. row0 + width of all K*D rows, (N, W) or (W,):
// A log2 e (and A itself when `a` is given), fixed B and C, D and delta_bias. Padded lanes
// (c >= width) keep the zeros they were given.
template <typename T>
void load_lane_constants(const Shape& s, const Inputs<T>& in, int64_t row0, int64_t width, T* a2, T* bt,
                         T* ct, T* dskip, T* bias, T* a = nullptr) {
  const int64_t N = s.nstate;
  for (int64_t c = 0; c < width; ++c) {
    const int64_t r = row0 + c;
    for (int64_t n = 0; n < N; ++n) {
      a2[n * W + c] = in.A[r * N + n] * kLog2e<T>;
      if (a) a[n * W + c] = in.A[r * N + n];
      if (!s.var_b) bt[n * W + c] = in.B.base[r * N + n];
      if (!s.var_c) ct[n * W + c] = in.C.base[r * N + n];
    }
    dskip[c] = in.Dskip ? in.Dskip[r] : T(0);
    bias[c] = in.bias ? in.bias[r] : T(0);
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

// The forward of one tile of channels, every direction, batch elements b0 .. b1.
template <typename T, bool VB, bool VC>
void forward_task(const Shape& s, const Inputs<T>& in, const Tile& t, int64_t tile, int64_t b0, int64_t b1,
                  T* out, T* last_state, T* ckpt, std::vector<T>& scratch) {
  const int64_t N = s.nstate, L = s.len, D = s.dim, K = s.chunk, NW = N * W;
  const int64_t kb = std::min(K, L);  // steps per chunk buffer
  scratch.assign((4 * N + 4 * kb + 2 + s.rank) * W, T(0));  // zeros: padded lanes stay inert
  T* x = scratch.data();       // (N, W) the tile's states
  T* a2 = x + NW;              // (N, W) A log2 e
  T* bt = a2 + NW;             // (N, W) fixed B, per lane
  T* ct = bt + NW;             // (N, W) fixed C, per lane
  T* dtc = ct + NW;            // (kb, W) dt of the chunk
  T* uc = dtc + kb * W;        // (kb, W) u of the chunk
  T* zc = uc + kb * W;         // (kb, W) z of the chunk
  T* yc = zc + kb * W;         // (kb, W) output of the chunk
  T* dskip = yc + kb * W;      // (W,)
  T* bias = dskip + W;         // (W,)
  T* wdt = bias + W;           // (R, W) low-rank dt weights
  for (int64_t k = 0; k < s.dirs; ++k) {
    const int64_t row0 = k * D + t.d0;
    load_lane_constants(s, in, row0, t.width, a2, bt, ct, dskip, bias);
    if (s.rank) load_low_rank_weights(s, in, row0, t.width, wdt);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(x, x + NW, T(0));
      const T* u = in.u + b * L * D + t.d0 * s.sd;
      const T* delta = s.rank ? in.dt_low + (b * s.dirs + k) * L * s.rank : in.delta + (k * s.batch + b) * L * D + t.d0 * s.sd;
      const T* z = in.z ? in.z + (k * s.batch + b) * L * D + t.d0 * s.sd : nullptr;
      T* o = out + b * L * D + t.d0 * s.sd;
      const RowView<T> Bv = VB ? row_of(in.B, s, b, row0) : RowView<T>{bt, 0};
      const RowView<T> Cv = VC ? row_of(in.C, s, b, row0) : RowView<T>{ct, 0};
      T* saved = ckpt ? ckpt + ((b * s.dirs + k) * s.tiles + tile) * s.nchunks * NW : nullptr;
      for (int64_t ci = 0; ci < s.nchunks; ++ci) {
        const int64_t l0 = ci * K, kc = std::min(K, L - l0);
        const int64_t* pos = in.pos + k * L + l0;
        if (saved) std::copy(x, x + NW, saved + ci * NW);
        if (s.rank) low_rank_steps(delta, pos, kc, s.rank, wdt, dtc);
        else gather_steps(delta, pos, kc, s, t.width, dtc);
        gather_steps(u, pos, kc, s, t.width, uc);
        for (int64_t j = 0; j < kc; ++j) {
#pragma omp simd
          for (int64_t i = 0; i < W; ++i) dtc[j * W + i] = s.softplus ? softplus_v(dtc[j * W + i] + bias[i])
                                                                      : dtc[j * W + i] + bias[i];
        }
        for (int64_t j = 0; j < kc; ++j)
          scan_step<T, VB, VC>(N, dtc + j * W, uc + j * W, a2, VB ? Bv.at(pos[j]) : bt, VC ? Cv.at(pos[j]) : ct,
                               dskip, x, yc + j * W);
        if (z) {
          gather_steps(z, pos, kc, s, t.width, zc);
#pragma omp simd
          for (int64_t i = 0; i < kc * W; ++i) yc[i] *= zc[i] * sigmoid_v(zc[i]);
        }
        scatter_steps<true>(yc, pos, kc, s, t.width, o);
      }
      if (last_state)
        for (int64_t c = 0; c < t.width; ++c)
          for (int64_t n = 0; n < N; ++n) last_state[(b * s.rows() + row0 + c) * N + n] = x[n * W + c];
    }
  }
}

// ---------------------------------------------------------------- backward
// The backward walks the chunks of a tile last to first: it recomputes the chunk's states from
// the saved one, then runs the adjoint recurrence h_l = C_l dy_l + exp(dt_{l+1} A) h_{l+1} in
// reverse, one channel per lane as in the forward. Per-lane sums (du, ddt, dA, dD, dbias, and
// dB/dC of fixed B/C) stay vertical; the lane terms of variable dB/dC (and of a low-rank delta)
// are first summed over the tiles of a group, then over the lanes, once per step. A task owns a
// range of batch elements: it alone writes their du, ddelta, dz and variable dB/dC, and it sums
// its per-channel gradients into its own row of a partial buffer.
template <typename T> struct Grads {
  T *du;                // (Bt, L, D), summed over the directions
  T *ddelta, *dz;       // (K, Bt, L, D)
  T *dA, *dbf, *dcf;    // (tasks, K*D, N); dbf/dcf for fixed B/C
  T *dD, *dbias;        // (tasks, K*D)
  T *dB, *dC;           // variable: (Bt, G, L, N)
  T *dlow, *dw;         // low-rank delta: (Bt, K, L, R) and (tasks, K*D, R)
};
// One reverse time step for all W lanes and every state n: the adjoint h of each state, the
// lane terms of dB and dC (added to per-step sums over a group's tiles, or to per-lane sums for
// a fixed B or C), and per-lane sums for dA, du and ddt (the last two in local arrays kept in
// registers across n).
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
      dc[at + i] += gy[i] * xc[at + i];
      db[at + i] += h * dt[i] * u[i];
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

// Writes the lane sums of `count` rows of W lanes to dst, halving the width with vertical adds
// (measured 3x faster than a horizontal reduction per row). Overwrites rows; tmp holds 8 * count.
static_assert(W == 16, "lane_sums halves 16 -> 8 -> 4");
template <typename T> void lane_sums(T* rows, int64_t count, T* tmp, T* dst) {
  for (int64_t r = 0; r < count; ++r) {
#pragma omp simd
    for (int64_t k = 0; k < 8; ++k) tmp[r * 8 + k] = rows[r * 16 + k] + rows[r * 16 + 8 + k];
  }
  for (int64_t r = 0; r < count; ++r) {
#pragma omp simd
    for (int64_t k = 0; k < 4; ++k) rows[r * 4 + k] = tmp[r * 8 + k] + tmp[r * 8 + 4 + k];
  }
  for (int64_t r = 0; r < count; ++r) dst[r] = (rows[r * 4] + rows[r * 4 + 2]) + (rows[r * 4 + 1] + rows[r * 4 + 3]);
}


// dst[pos[j] * step + n] += the lane sum of rows[(j * N + n) * W ...], for the kc steps of a chunk.
template <typename T> void add_at_positions(T* rows, int64_t kc, int64_t N, T* tmp, T* dst, int64_t step,
                                            const int64_t* pos) {
  T* sums = rows;  // lane_sums reads row r before it writes sums[r] <= r * 4
  lane_sums(rows, kc * N, tmp, sums);
  for (int64_t j = 0; j < kc; ++j) {
    T* d = dst + pos[j] * step;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) d[n] += sums[j * N + n];
  }
}

template <typename T, bool VB, bool VC>
void backward_task(const Shape& s, const Inputs<T>& in, const std::vector<Tile>& tiles, int64_t task,
                   int64_t b0, int64_t b1, const T* ckpt, const T* dout, const Grads<T>& g,
                   std::vector<T>& scratch) {
  const int64_t N = s.nstate, L = s.len, D = s.dim, K = s.chunk, NW = N * W, R = s.rank;
  const int64_t kb = std::min(K, L), nt = static_cast<int64_t>(tiles.size());
  // Scratch: every tile's per-lane constants and accumulators (a tile's block), then the chunk
  // buffers shared by the tiles. Zeros: padded lanes (c >= width) add nothing.
  const int64_t block = (8 * N + 4 + 2 * R) * W;
  scratch.assign(nt * block + (2 + (4 * kb + 1) * N + kb * (std::max(N, R) + R) + 9 * kb) * W, T(0));
  struct Lanes { T *a2, *a, *bt, *ct, *hc, *dA, *dbf, *dcf, *dskip, *bias, *dD, *dbias, *wdt, *dwdt; };
  std::vector<Lanes> lanes(nt);
  for (int64_t ti = 0; ti < nt; ++ti) {
    T* q = scratch.data() + ti * block;
    auto take = [&](int64_t n) { T* r = q; q += n * W; return r; };
    Lanes& l = lanes[ti];
    l.a2 = take(N), l.a = take(N), l.bt = take(N), l.ct = take(N), l.hc = take(N);
    l.dA = take(N), l.dbf = take(N), l.dcf = take(N), l.dD = take(1), l.dbias = take(1), l.dwdt = take(R);
    l.dskip = take(1), l.bias = take(1), l.wdt = take(R);
  }
  T* p = scratch.data() + nt * block;
  auto take = [&](int64_t n) { T* q = p; p += n * W; return q; };
  T *du = take(1), *ddt = take(1);
  T *xs = take((kb + 1) * N), *ea = take(kb * N);                    // the chunk's states, exp(dt A)
  // the chunk's lane terms of variable dB and dC and of a low-rank delta, summed over the tiles of
  // one group before the (costlier) sums over the lanes
  T *gb = take(kb * N), *gc = take(kb * N), *gl = take(kb * R), *tmp = take(kb * std::max(N, R));
  T *dtc = take(kb), *uc = take(kb), *gyc = take(kb), *dyc = take(kb), *zc = take(kb), *sgc = take(kb);
  T *yc = take(kb), *duc = take(kb), *ddtc = take(kb);
  const int64_t per_group_b = s.rows() / s.groups_b, per_group_c = s.rows() / s.groups_c;

  for (int64_t k = 0; k < s.dirs; ++k) {
    for (int64_t ti = 0; ti < nt; ++ti) {
      const Lanes& l = lanes[ti];
      std::fill(l.dA, l.dA + (3 * N + 2 + R) * W, T(0));  // dA, dbf, dcf, dD, dbias, dwdt
      load_lane_constants(s, in, k * D + tiles[ti].d0, tiles[ti].width, l.a2, l.bt, l.ct, l.dskip, l.bias, l.a);
      if (R) load_low_rank_weights(s, in, k * D + tiles[ti].d0, tiles[ti].width, l.wdt);
    }
    for (int64_t b = b0; b < b1; ++b) {
      for (const Lanes& l : lanes) std::fill(l.hc, l.hc + NW, T(0));
      const T* low = R ? in.dt_low + (b * s.dirs + k) * L * R : nullptr;
      for (int64_t ci = s.nchunks - 1; ci >= 0; --ci) {
        const int64_t l0 = ci * K, kc = std::min(K, L - l0);
        const int64_t* pos = in.pos + k * L + l0;
        // the group sums of dB and dC go to their rows when the group changes and after the last tile
        int64_t grp_b = -1, grp_c = -1;
        auto flush = [&](bool variable, T* sums, int64_t grp, int64_t groups, T* grad) {
          if (variable && grp >= 0) add_at_positions(sums, kc, N, tmp, grad + (b * groups + grp) * L * N, N, pos);
          std::fill(sums, sums + kc * NW, T(0));
        };
        flush(false, gb, -1, 0, nullptr);
        flush(false, gc, -1, 0, nullptr);
        if (R) std::fill(gl, gl + kc * R * W, T(0));
        for (int64_t ti = 0; ti < nt; ++ti) {
          const Tile& t = tiles[ti];
          const Lanes& l = lanes[ti];
          const int64_t row0 = k * D + t.d0;
          if (VB && row0 / per_group_b != grp_b) flush(true, gb, grp_b, s.groups_b, g.dB), grp_b = row0 / per_group_b;
          if (VC && row0 / per_group_c != grp_c) flush(true, gc, grp_c, s.groups_c, g.dC), grp_c = row0 / per_group_c;
          const int64_t plane = b * L * D + t.d0 * s.sd, kplane = (k * s.batch + b) * L * D + t.d0 * s.sd;
          const RowView<T> Bv = VB ? row_of(in.B, s, b, row0) : RowView<T>{l.bt, 0};
          const RowView<T> Cv = VC ? row_of(in.C, s, b, row0) : RowView<T>{l.ct, 0};
          const T* saved = ckpt + (((b * s.dirs + k) * s.tiles + ti) * s.nchunks + ci) * NW;
          std::copy(saved, saved + NW, xs);
          if (R) low_rank_steps(low, pos, kc, R, l.wdt, dtc);
          else gather_steps(in.delta + kplane, pos, kc, s, t.width, dtc);
          gather_steps(in.u + plane, pos, kc, s, t.width, uc);
          gather_steps(dout + plane, pos, kc, s, t.width, dyc);
          if (in.z) gather_steps(in.z + kplane, pos, kc, s, t.width, zc);
          for (int64_t j = 0; j < kc; ++j) {
#pragma omp simd
            for (int64_t i = 0; i < W; ++i) dtc[j * W + i] += l.bias[i];
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
            const T* bl = Bv.at(pos[j]);
            const T* cl = Cv.at(pos[j]);
#pragma omp simd
            for (int64_t i = 0; i < W; ++i) du[i] = dtj[i] * uc[j * W + i];
            for (int64_t n = 0; n < N; ++n) {
              const T* bn = VB ? bl + n : l.bt + n * W;
              const T* xp = xs + (j * N + n) * W;
              T* xn = xs + ((j + 1) * N + n) * W;
              T* e = ea + (j * N + n) * W;
#pragma omp simd
              for (int64_t i = 0; i < W; ++i) {
                e[i] = exp2_v(dtj[i] * l.a2[n * W + i]);
                xn[i] = e[i] * xp[i] + du[i] * (VB ? bn[0] : bn[i]);
              }
              if (in.z) {  // the ungated output C x, for dz
                const T* cn = VC ? cl + n : l.ct + n * W;
#pragma omp simd
                for (int64_t i = 0; i < W; ++i) yc[j * W + i] += xn[i] * (VC ? cn[0] : cn[i]);
              }
            }
          }
          for (int64_t j = kc - 1; j >= 0; --j) {  // adjoint recurrence, last step first
            adjoint_step<T, VB, VC>(N, dtc + j * W, uc + j * W, gyc + j * W, l.a, Bv.at(pos[j]), Cv.at(pos[j]),
                                    xs + j * NW, xs + (j + 1) * NW, ea + j * NW, l.hc, l.dA,
                                    VB ? gb + j * NW : l.dbf, VC ? gc + j * NW : l.dcf, du, ddt);
#pragma omp simd
            for (int64_t i = 0; i < W; ++i) {
              const int64_t at = j * W + i;
              duc[at] = du[i] * dtc[at] + gyc[at] * l.dskip[i];
              l.dD[i] += gyc[at] * uc[at];
              ddtc[at] = ddt[i] * sgc[at];
              l.dbias[i] += ddtc[at];
            }
          }
          scatter_steps<true>(duc, pos, kc, s, t.width, g.du + plane);
          if (R) {  // a low-rank delta: lane terms of d dt_low (ddt * dt_w), per-lane sums of d dt_w
            for (int64_t j = 0; j < kc; ++j) {
              const T* row = low + pos[j] * R;
              for (int64_t r = 0; r < R; ++r) {
#pragma omp simd
                for (int64_t i = 0; i < W; ++i) {
                  gl[(j * R + r) * W + i] += ddtc[j * W + i] * l.wdt[r * W + i];
                  l.dwdt[r * W + i] += ddtc[j * W + i] * row[r];
                }
              }
            }
          } else {
            scatter_steps<false>(ddtc, pos, kc, s, t.width, g.ddelta + kplane);
          }
          if (in.z) {  // dz from the ungated output, written over yc
#pragma omp simd
            for (int64_t at = 0; at < kc * W; ++at) {
              const T sz = sigmoid_v(zc[at]);
              yc[at] = dyc[at] * (yc[at] + l.dskip[at % W] * uc[at]) * sz * (T(1) + zc[at] * (T(1) - sz));
            }
            scatter_steps<false>(yc, pos, kc, s, t.width, g.dz + kplane);
          }
        }
        flush(VB, gb, grp_b, s.groups_b, g.dB);
        flush(VC, gc, grp_c, s.groups_c, g.dC);
        if (R) add_at_positions(gl, kc, R, tmp, g.dlow + (b * s.dirs + k) * L * R, R, pos);
      }
    }
    for (int64_t ti = 0; ti < nt; ++ti) {  // this task's per-channel sums
      const Lanes& l = lanes[ti];
      for (int64_t c = 0; c < tiles[ti].width; ++c) {
        const int64_t row = task * s.rows() + k * D + tiles[ti].d0 + c;
        for (int64_t n = 0; n < N; ++n) {
          g.dA[row * N + n] = l.dA[n * W + c];
          if (!VB) g.dbf[row * N + n] = l.dbf[n * W + c];
          if (!VC) g.dcf[row * N + n] = l.dcf[n * W + c];
        }
        g.dD[row] = l.dD[c];
        g.dbias[row] = l.dbias[c];
        for (int64_t r = 0; r < R; ++r) g.dw[row * R + r] = l.dwdt[r * W + c];
      }
    }
  }
}

// ---------------------------------------------------------------- driver
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

template <typename T> StateMatrix<T> state_matrix(const torch::Tensor& m) {
  if (m.dim() == 2) return {m.data_ptr<T>(), 0, 0, 0, 1};
  return {m.data_ptr<T>(), m.stride(0), m.stride(2), m.stride(1), m.size(1)};
}

template <typename T>
Inputs<T> inputs_of(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                    const torch::Tensor& Bm, const torch::Tensor& Cm,
                    const c10::optional<torch::Tensor>& Dskip, const c10::optional<torch::Tensor>& z,
                    const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& dt_w,
                    const torch::Tensor& pos) {
  const bool low = opt_ptr<T>(dt_w) != nullptr;
  return {u.data_ptr<T>(), low ? nullptr : delta.data_ptr<T>(), A.data_ptr<T>(), opt_ptr<T>(Dskip), opt_ptr<T>(z),
          opt_ptr<T>(bias), low ? delta.data_ptr<T>() : nullptr, opt_ptr<T>(dt_w),
          state_matrix<T>(Bm), state_matrix<T>(Cm), pos.data_ptr<int64_t>()};
}

Shape make_shape(const torch::Tensor& u, const torch::Tensor& A, const torch::Tensor& Bm, const torch::Tensor& Cm,
                 const c10::optional<torch::Tensor>& dt_w, const torch::Tensor& pos, bool softplus, int64_t chunk,
                 bool channels_last) {
  Shape s;
  s.batch = u.size(0);
  s.len = u.size(channels_last ? 1 : 2);
  s.dim = u.size(channels_last ? 2 : 1);
  s.sl = channels_last ? s.dim : 1;
  s.sd = channels_last ? 1 : s.len;
  s.dirs = pos.size(0);
  s.rank = (dt_w.has_value() && dt_w->defined()) ? dt_w->size(1) : 0;
  s.nstate = A.size(1);
  s.chunk = chunk;
  s.nchunks = (s.len + chunk - 1) / chunk;
  s.var_b = Bm.dim() == 4;
  s.var_c = Cm.dim() == 4;
  s.groups_b = s.var_b ? Bm.size(1) : 1;
  s.groups_c = s.var_c ? Cm.size(1) : 1;
  s.softplus = softplus;
  s.tiles = static_cast<int64_t>(make_tiles(s).size());
  return s;
}

// Batch elements per task: enough tasks (`want` in all) to keep every thread busy.
int64_t batch_per_task(int64_t batch, int64_t others, int64_t want) {
  return std::max<int64_t>(1, batch * others / std::max<int64_t>(1, want));
}

void check_layouts(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& Bm,
                   const torch::Tensor& Cm, const c10::optional<torch::Tensor>& dt_w, const torch::Tensor& pos,
                   bool channels_last) {
  TORCH_CHECK(u.is_contiguous() && delta.is_contiguous(), "selective_scan_cpu: u and delta must be contiguous");
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.is_contiguous() && pos.dim() == 2 &&
              pos.size(1) == u.size(channels_last ? 1 : 2),
              "selective_scan_cpu: pos must be a contiguous (K, L) int64 tensor");
  const int64_t K = pos.size(0), L = pos.size(1), D = u.size(channels_last ? 2 : 1);
  if (dt_w.has_value() && dt_w->defined()) {
    TORCH_CHECK(channels_last && dt_w->is_contiguous() && dt_w->dim() == 2 && dt_w->size(0) == K * D &&
                delta.dim() == 4 && delta.size(0) == u.size(0) && delta.size(1) == K && delta.size(2) == L &&
                delta.size(3) == dt_w->size(1),
                "selective_scan_cpu: a low-rank delta is (Bt, K, L, R) with dt_w (K*D, R), channels-last u");
  } else {
    TORCH_CHECK(delta.dim() == 4 && delta.size(0) == K && delta.size(1) == u.size(0) && delta.size(2) == u.size(1) &&
                delta.size(3) == u.size(2), "selective_scan_cpu: delta must be (K, ...u's shape)");
  }
  for (const auto& m : {Bm, Cm})
    TORCH_CHECK(m.stride(-1) == 1 || m.size(-1) == 1, "selective_scan_cpu: B and C need a contiguous last dim");
  if (!channels_last) {  // a plain sequence, read in order (see gather_steps)
    const int64_t* p = pos.data_ptr<int64_t>();
    bool in_order = K == 1;
    for (int64_t l = 0; in_order && l < L; ++l) in_order = p[l] == l;
    TORCH_CHECK(in_order, "selective_scan_cpu: a channels-first u is scanned in order only (K = 1, pos[l] = l)");
  }
}

}  // namespace

// Returns (out, last_state, ckpt); last_state is empty unless want_last, ckpt unless save_ckpt.
std::vector<torch::Tensor> fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                               torch::Tensor Cm, c10::optional<torch::Tensor> Dskip,
                               c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> bias,
                               c10::optional<torch::Tensor> dt_w, torch::Tensor pos, bool channels_last,
                               bool softplus, int64_t chunk, bool save_ckpt, bool want_last) {
  check_layouts(u, delta, Bm, Cm, dt_w, pos, channels_last);
  const Shape s = make_shape(u, A, Bm, Cm, dt_w, pos, softplus, chunk, channels_last);
  auto out = torch::zeros_like(u);
  auto last = torch::empty({want_last ? s.batch : 0, s.rows(), s.nstate}, u.options());
  auto ckpt = torch::empty({save_ckpt ? s.batch : 0, s.dirs, s.tiles, s.nchunks, s.nstate, W}, u.options());
  const std::vector<Tile> tiles = make_tiles(s);
  const int64_t per = batch_per_task(s.batch, s.tiles, 8 * at::get_num_threads());
  const int64_t ranges = (s.batch + per - 1) / per;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    using T = scalar_t;
    const Inputs<T> in = inputs_of<T>(u, delta, A, Bm, Cm, Dskip, z, bias, dt_w, pos);
    T* pck = save_ckpt ? ckpt.data_ptr<T>() : nullptr;
    T* plast = want_last ? last.data_ptr<T>() : nullptr;
    at::parallel_for(0, ranges * s.tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tile = task % s.tiles, b0 = task / s.tiles * per, b1 = std::min(s.batch, b0 + per);
        with_layouts(s, [&](auto vb, auto vc) {
          forward_task<T, decltype(vb)::value, decltype(vc)::value>(
              s, in, tiles[tile], tile, b0, b1, out.data_ptr<T>(), plast, pck, scratch);
        });
      }
    });
  });
  return {out, last, ckpt};
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, dbias, ddt_w) in the layouts of the inputs (ddelta is
// d dt_low for a low-rank delta); dz is empty without z, ddt_w without dt_w.
std::vector<torch::Tensor> bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                               torch::Tensor Cm, c10::optional<torch::Tensor> Dskip,
                               c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> bias,
                               c10::optional<torch::Tensor> dt_w, torch::Tensor pos, bool channels_last,
                               bool softplus, int64_t chunk, torch::Tensor ckpt, torch::Tensor dout) {
  check_layouts(u, delta, Bm, Cm, dt_w, pos, channels_last);
  TORCH_CHECK(dout.is_contiguous() && dout.sizes() == u.sizes(), "selective_scan_cpu: dout must be contiguous like u");
  const Shape s = make_shape(u, A, Bm, Cm, dt_w, pos, softplus, chunk, channels_last);
  const std::vector<Tile> tiles = make_tiles(s);
  const int64_t per = batch_per_task(s.batch, 1, 2 * at::get_num_threads());
  const int64_t tasks = (s.batch + per - 1) / per;
  auto opts = u.options();
  std::vector<int64_t> per_direction{s.dirs};
  per_direction.insert(per_direction.end(), u.sizes().begin(), u.sizes().end());
  auto du = torch::zeros_like(u);
  auto ddelta = s.rank ? torch::zeros_like(delta) : torch::empty_like(delta);
  auto dz = (z.has_value() && z->defined()) ? torch::empty(per_direction, opts) : torch::empty({0}, opts);
  auto dA = torch::empty({tasks, s.rows(), s.nstate}, opts);
  auto dD = torch::empty({tasks, s.rows()}, opts), dbias = torch::empty({tasks, s.rows()}, opts);
  auto dw = torch::empty({s.rank ? tasks : 0, s.rows(), s.rank}, opts);
  auto grad_of = [&](const torch::Tensor& m, bool variable) {
    return variable ? torch::zeros(m.sizes(), opts) : torch::empty({tasks, s.rows(), s.nstate}, opts);
  };
  auto dB = grad_of(Bm, s.var_b), dC = grad_of(Cm, s.var_c);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    using T = scalar_t;
    const Inputs<T> in = inputs_of<T>(u, delta, A, Bm, Cm, Dskip, z, bias, dt_w, pos);
    const Grads<T> g{du.data_ptr<T>(),   ddelta.data_ptr<T>(), dz.numel() ? dz.data_ptr<T>() : nullptr,
                     dA.data_ptr<T>(),   dB.data_ptr<T>(),     dC.data_ptr<T>(),
                     dD.data_ptr<T>(),   dbias.data_ptr<T>(),  dB.data_ptr<T>(), dC.data_ptr<T>(),
                     ddelta.data_ptr<T>(), dw.data_ptr<T>()};
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch;
      for (int64_t task = begin; task < end; ++task)
        with_layouts(s, [&](auto vb, auto vc) {
          backward_task<T, decltype(vb)::value, decltype(vc)::value>(
              s, in, tiles, task, task * per, std::min(s.batch, (task + 1) * per), ckpt.data_ptr<T>(),
              dout.data_ptr<T>(), g, scratch);
        });
    });
  });
  // Per-task partial sums of the per-channel gradients.
  auto total = [](const torch::Tensor& t, bool variable) { return variable ? t : t.sum(0); };
  return {du, ddelta, dA.sum(0), total(dB, s.var_b), total(dC, s.var_c), dD.sum(0), dz, dbias.sum(0), dw.sum(0)};
}

// The shape of the checkpoints fwd keeps (save_ckpt), less the batch: for torch.compile's fake op.
// groups_b, groups_c: the groups of a variable B or C, 0 for a fixed one.
std::vector<int64_t> ckpt_shape(int64_t dirs, int64_t dim, int64_t len, int64_t nstate, int64_t chunk,
                                int64_t groups_b, int64_t groups_c) {
  Shape s{};
  s.dirs = dirs;
  s.dim = dim;
  s.var_b = groups_b > 0;
  s.var_c = groups_c > 0;
  s.groups_b = std::max<int64_t>(groups_b, 1);
  s.groups_c = std::max<int64_t>(groups_c, 1);
  return {dirs, static_cast<int64_t>(make_tiles(s).size()), (len + chunk - 1) / chunk, nstate, W};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Selective scan for CPU tensors along one or several scan orders (forward and backward).";
  m.def("fwd", &fwd, "selective scan forward");
  m.def("bwd", &bwd, "selective scan backward");
  m.def("ckpt_shape", &ckpt_shape, "the shape of fwd's checkpoints, less the batch");
}
