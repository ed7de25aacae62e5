// Mamba's selective scan for XLA's CPU backend, forward and backward, called through XLA's FFI
// (models/cpu_kernels.py; models/sequential_scan.py picks it):
//
//     h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t,    y_t = C_t h_t        (per channel d, state n)
//
// XLA runs the sequential scan as a loop of small fused kernels, one token per iteration, with its (B, D, N) state
// and the backward's residuals going through memory every step. Here one batch row and one vector of channels at a
// time run the whole sequence with the state in registers (a vector per state index: its lanes are channels, so
// y_t = sum_n C_t[n] h_t[n] is multiply-adds, no reduction across lanes). The forward also writes the state entering
// every kChunk-th token; the backward recomputes a chunk's states from it, then runs the adjoint recurrence
//
//     g_t = exp(dt_{t+1} A) g_{t+1} + C_t dy_t
//
// back through the chunk (models/sequential_scan.py derives the gradients), so nothing of size (B, L, D, N) is
// stored between the passes. dB and dC, sums over channels, gather one vector per (token, state) over a task's
// channel vectors and are summed across lanes once per chunk.
//
// Layouts: dt, x, y, dy (B, L, D); A (D, N); B, C (B, L, N); h0, h_last (B, D, N); the chunk states (B, L/kChunk
// rounded up, N, D). dt A must be <= 0 (dt a softplus, A negative, as in Mamba), which exp_neg assumes.
#include "cpu_kernels.h"

namespace {

constexpr int64_t kChunk = 64;      // tokens whose states the backward holds at once (kChunk x N vectors)
constexpr int kMaxStates = 256;     // N; models/cpu_kernels.py leaves larger states to XLA

struct Dims {
  int64_t b, l, d, n;
  int64_t groups() const { return (d + kLanes - 1) / kLanes; }  // vectors of channels
  int64_t chunks() const { return (l + kChunk - 1) / kChunk; }
  int64_t width() const { return groups() * kLanes; }
};

// A^T (N, D) widened to whole vectors, zero past D: a padded channel decays by exp(0) = 1 from a zero state, and
// with dt = x = dy = 0 there, contributes nothing.
Floats transposed(const float* a, const Dims& s) {
  Floats at(s.n * s.width(), 0.0f);
  for (int64_t d = 0; d < s.d; ++d)
    for (int64_t n = 0; n < s.n; ++n) at[n * s.width() + d] = a[d * s.n + n];
  return at;
}

// h[n] = src[d0 + lane, n] (a (D, N) matrix) for the channel vector at d0 with `lanes` channels, zero past them.
void gather(vec* h, const float* src, int64_t d0, int lanes, int64_t ns) {
  for (int64_t n = 0; n < ns; ++n) {
    h[n] = vec{};
    for (int l = 0; l < lanes; ++l) h[n][l] = src[(d0 + l) * ns + n];
  }
}

void scatter(float* dst, const vec* h, int64_t d0, int lanes, int64_t ns) {
  for (int64_t n = 0; n < ns; ++n)
    for (int l = 0; l < lanes; ++l) dst[(d0 + l) * ns + n] = h[n][l];
}

// One batch row's channel vector at d0 through the sequence: y, the last state and the chunk states. NS: N where
// it is known at compile time (the state then stays in registers), 0 for any N.
template <int NS>
void forward_vector(const Dims& s, int64_t bi, int64_t d0, const float* dt, const float* at, const float* bm,
                    const float* cm, const float* x, const float* h0, float* y, float* h_last, float* hs) {
  const int64_t ns = NS ? NS : s.n, w = s.width();
  const int lanes = (int)std::min<int64_t>(kLanes, s.d - d0);
  vec h[NS ? NS : kMaxStates];
  gather(h, h0 + bi * s.d * ns, d0, lanes, ns);
  for (int64_t t = 0; t < s.l; ++t) {
    if (t % kChunk == 0)
      for (int64_t n = 0; n < ns; ++n) store(hs + ((bi * s.chunks() + t / kChunk) * ns + n) * s.d + d0, h[n], lanes);
    const int64_t row = bi * s.l + t;
    const vec dtv = load_lanes(dt + row * s.d + d0, lanes), u = dtv * load_lanes(x + row * s.d + d0, lanes);
    const float *bt = bm + row * ns, *ct = cm + row * ns;
    vec yv = {};
    for (int64_t n = 0; n < ns; ++n) {
      h[n] = exp_neg(dtv * *(const vec*)(at + n * w + d0)) * h[n] + u * bt[n];
      yv += h[n] * ct[n];
    }
    store(y + row * s.d + d0, yv, lanes);
  }
  scatter(h_last + bi * s.d * ns, h, d0, lanes, ns);
}

// What one backward task keeps: per channel vector the adjoint carried between chunks and dA's partial sums; per
// chunk token the states entering it, their decays, and the vector partial sums of dB and dC.
struct Scratch {
  Floats carry, da, prev, decay, db, dc;
};

// The backward of one batch row over channel vectors [g0, g1): ddt and dx for them, their share of dB, dC (summed
// across lanes into db_out, dc_out (L, N)), of dA (da_out (D, N), this row's) and dh0.
template <int NS>
void backward_vectors(const Dims& s, int64_t bi, int64_t g0, int64_t g1, const float* dt, const float* at,
                      const float* bm, const float* cm, const float* x, const float* hs, const float* dy,
                      const float* dh_last, float* ddt, float* dx, float* db_out, float* dc_out, float* da_out,
                      float* dh0, Scratch& m) {
  const int64_t ns = NS ? NS : s.n, w = s.width(), vecs = ns * kLanes;
  m.carry.resize((g1 - g0) * vecs);
  m.da.assign((g1 - g0) * vecs, 0.0f);
  for (int64_t g = g0; g < g1; ++g)
    gather((vec*)&m.carry[(g - g0) * vecs], dh_last + bi * s.d * ns, g * kLanes,
           (int)std::min<int64_t>(kLanes, s.d - g * kLanes), ns);
  m.prev.resize(kChunk * vecs);
  m.decay.resize(kChunk * vecs);
  for (int64_t c = s.chunks() - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, len = std::min(kChunk, s.l - t0);
    m.db.assign(len * vecs, 0.0f);
    m.dc.assign(len * vecs, 0.0f);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t d0 = g * kLanes;
      const int lanes = (int)std::min<int64_t>(kLanes, s.d - d0);
      vec h[NS ? NS : kMaxStates], gn[NS ? NS : kMaxStates], da[NS ? NS : kMaxStates];
      for (int64_t n = 0; n < ns; ++n) h[n] = load_lanes(hs + ((bi * s.chunks() + c) * ns + n) * s.d + d0, lanes);
      vec *prev = (vec*)m.prev.data(), *decay = (vec*)m.decay.data();
      for (int64_t i = 0; i < len; ++i) {  // the chunk's states again, from the one entering it
        const int64_t row = bi * s.l + t0 + i;
        const vec dtv = load_lanes(dt + row * s.d + d0, lanes), u = dtv * load_lanes(x + row * s.d + d0, lanes);
        const float* bt = bm + row * ns;
        for (int64_t n = 0; n < ns; ++n) {
          const vec a = exp_neg(dtv * *(const vec*)(at + n * w + d0));
          prev[i * ns + n] = h[n];
          decay[i * ns + n] = a;
          h[n] = a * h[n] + u * bt[n];
        }
      }
      vec *carry = (vec*)&m.carry[(g - g0) * vecs], *da_sum = (vec*)&m.da[(g - g0) * vecs];
      for (int64_t n = 0; n < ns; ++n) gn[n] = carry[n], da[n] = da_sum[n];
      vec *db = (vec*)m.db.data(), *dc = (vec*)m.dc.data();
      for (int64_t i = len - 1; i >= 0; --i) {
        const int64_t row = bi * s.l + t0 + i;
        const vec dtv = load_lanes(dt + row * s.d + d0, lanes), xv = load_lanes(x + row * s.d + d0, lanes);
        const vec dyv = load_lanes(dy + row * s.d + d0, lanes), u = dtv * xv;
        const float *bt = bm + row * ns, *ct = cm + row * ns;
        vec gb = {}, dda = {};
        for (int64_t n = 0; n < ns; ++n) {
          const vec hp = prev[i * ns + n], a = decay[i * ns + n];
          const vec g = gn[n] + dyv * ct[n], gda = g * hp * a;  // gda: the gradient of dt_t A
          gb += g * bt[n];
          dda += gda * *(const vec*)(at + n * w + d0);
          db[i * ns + n] += g * u;
          dc[i * ns + n] += (a * hp + u * bt[n]) * dyv;
          da[n] += gda * dtv;
          gn[n] = g * a;
        }
        store(ddt + row * s.d + d0, dda + xv * gb, lanes);
        store(dx + row * s.d + d0, dtv * gb, lanes);
      }
      for (int64_t n = 0; n < ns; ++n) carry[n] = gn[n], da_sum[n] = da[n];
    }
    for (int64_t i = 0; i < len; ++i)
      for (int64_t n = 0; n < ns; ++n) {
        db_out[(t0 + i) * ns + n] = sum_lanes(((vec*)m.db.data())[i * ns + n]);
        dc_out[(t0 + i) * ns + n] = sum_lanes(((vec*)m.dc.data())[i * ns + n]);
      }
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int lanes = (int)std::min<int64_t>(kLanes, s.d - g * kLanes);
    scatter(dh0 + bi * s.d * ns, (vec*)&m.carry[(g - g0) * vecs], g * kLanes, lanes, ns);
    scatter(da_out, (vec*)&m.da[(g - g0) * vecs], g * kLanes, lanes, ns);
  }
}

Dims dims_of(ffi::Buffer<ffi::F32>& dt, ffi::Buffer<ffi::F32>& a) {
  auto x = dt.dimensions(), an = a.dimensions();
  return {x[0], x[1], x[2], an[1]};
}

ffi::Error check(const Dims& s) {
  if (s.n > kMaxStates) return ffi::Error::InvalidArgument("selective scan: more than 256 states");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dt, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> bm,
                   ffi::Buffer<ffi::F32> cm, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h0,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h_last,
                   ffi::ResultBuffer<ffi::F32> hs) {
  const Dims s = dims_of(dt, a);
  if (auto err = check(s); err.failure()) return err;
  const Floats at = transposed(a.typed_data(), s);
  const float *dtp = dt.typed_data(), *atp = at.data(), *bp = bm.typed_data(), *cp = cm.typed_data(),
              *xp = x.typed_data(), *h0p = h0.typed_data();
  float *yp = y->typed_data(), *hp = h_last->typed_data(), *hsp = hs->typed_data();
  const int64_t tasks = s.b * s.groups();
  parallel_for(pool, tasks, num_workers(pool, tasks), [=](int64_t task, int64_t) {
    const int64_t bi = task / s.groups(), d0 = task % s.groups() * kLanes;
    if (s.n == 16)
      forward_vector<16>(s, bi, d0, dtp, atp, bp, cp, xp, h0p, yp, hp, hsp);
    else
      forward_vector<0>(s, bi, d0, dtp, atp, bp, cp, xp, h0p, yp, hp, hsp);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dt, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> bm,
                    ffi::Buffer<ffi::F32> cm, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> hs,
                    ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> dh_last, ffi::ResultBuffer<ffi::F32> ddt,
                    ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> dc,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dh0) {
  const Dims s = dims_of(dt, a);
  if (auto err = check(s); err.failure()) return err;
  const Floats at = transposed(a.typed_data(), s);
  // Batch rows, each split into `parts` runs of channel vectors where there are fewer rows than threads; each task
  // writes its own partial dB, dC (L, N) and dA (D, N), summed below.
  const int64_t workers = num_workers(pool, s.b * s.groups());
  const int64_t parts = std::min(s.groups(), std::max<int64_t>(1, (workers + s.b - 1) / s.b)), tasks = s.b * parts;
  Floats db_parts(tasks * s.l * s.n), dc_parts(tasks * s.l * s.n), da_rows(s.b * s.d * s.n);
  const float *dtp = dt.typed_data(), *atp = at.data(), *bp = bm.typed_data(), *cp = cm.typed_data(),
              *xp = x.typed_data(), *hsp = hs.typed_data(), *dyp = dy.typed_data(), *dhp = dh_last.typed_data();
  float *ddtp = ddt->typed_data(), *dxp = dx->typed_data(), *dh0p = dh0->typed_data();
  float *dbq = db_parts.data(), *dcq = dc_parts.data(), *daq = da_rows.data();
  parallel_for(pool, tasks, num_workers(pool, tasks), [=](int64_t task, int64_t) {
    thread_local Scratch m;
    const int64_t bi = task / parts, p = task % parts;
    const int64_t g0 = s.groups() * p / parts, g1 = s.groups() * (p + 1) / parts;
    float *dbt = dbq + task * s.l * s.n, *dct = dcq + task * s.l * s.n, *dat = daq + bi * s.d * s.n;
    if (s.n == 16)
      backward_vectors<16>(s, bi, g0, g1, dtp, atp, bp, cp, xp, hsp, dyp, dhp, ddtp, dxp, dbt, dct, dat, dh0p, m);
    else
      backward_vectors<0>(s, bi, g0, g1, dtp, atp, bp, cp, xp, hsp, dyp, dhp, ddtp, dxp, dbt, dct, dat, dh0p, m);
  });
  float *dbp = db->typed_data(), *dcp = dc->typed_data(), *dap = da->typed_data();
  const int64_t row = s.l * s.n;
  for (int64_t bi = 0; bi < s.b; ++bi)
    for (int64_t i = 0; i < row; ++i) {
      float sb = 0.0f, sc = 0.0f;
      for (int64_t p = 0; p < parts; ++p) sb += dbq[(bi * parts + p) * row + i], sc += dcq[(bi * parts + p) * row + i];
      dbp[bi * row + i] = sb, dcp[bi * row + i] = sc;
    }
  std::fill(dap, dap + s.d * s.n, 0.0f);
  for (int64_t bi = 0; bi < s.b; ++bi)
    for (int64_t i = 0; i < s.d * s.n; ++i) dap[i] += daq[bi * s.d * s.n + i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabSelectiveScan, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dt
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the last state
                                  .Ret<ffi::Buffer<ffi::F32>>());  // the chunk states

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabSelectiveScanGrad, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dt
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the chunk states
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the last state's cotangent
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ddt
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dA
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dB
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dC
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dh0
