// BatchNorm's per-channel statistics for XLA's CPU backend, called through XLA's FFI (models/cpu_kernels.py).
// XLA computes sum(x) and sum(x * x) (and in the backward pass sum(dy) and sum(dy * x)) as two YNNPACK reductions,
// each reading the activations on one thread; this reads them once, a chunk of rows per task over XLA's intra-op
// threads.
#include "cpu_kernels.h"

// Sums over n rows of c values (row stride c) of a and of a * b, for the NV vectors of channels at a and b,
// added into s and p. Two rows at a time, so that consecutive rows do not wait on each other's additions.
template <int NV>
static void moments_block(const float* a, const float* b, int64_t n, int64_t c, float* s, float* p) {
  vec as[2][NV] = {}, ps[2][NV] = {};
  int64_t r = 0;
  for (; r + 1 < n; r += 2)
    for (int u = 0; u < 2; ++u)
      for (int v = 0; v < NV; ++v) {
        vec x = *(const vec*)(a + (r + u) * c + v * kLanes), y = *(const vec*)(b + (r + u) * c + v * kLanes);
        as[u][v] += x;
        ps[u][v] += x * y;
      }
  for (; r < n; ++r)
    for (int v = 0; v < NV; ++v) {
      vec x = *(const vec*)(a + r * c + v * kLanes), y = *(const vec*)(b + r * c + v * kLanes);
      as[0][v] += x;
      ps[0][v] += x * y;
    }
  for (int v = 0; v < NV; ++v) {
    *(vec*)(s + v * kLanes) += as[0][v] + as[1][v];
    *(vec*)(p + v * kLanes) += ps[0][v] + ps[1][v];
  }
}

// sum = sum of a, dot = sum of a * b over all but the last axis. The rows are summed in chunks of a fixed size
// whose partial sums are added in order at the end, so a result repeats bitwise whatever the thread count.
static ffi::Error ChannelMoments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                                 ffi::ResultBuffer<ffi::F32> sum, ffi::ResultBuffer<ffi::F32> dot) {
  int64_t c = a.dimensions().back();
  if (c == 0 || a.element_count() != b.element_count())
    return ffi::Error::InvalidArgument("channel_moments: operands of different sizes, or no channels");
  int64_t rows = a.element_count() / c, chunk = std::max<int64_t>(1, (1 << 14) / c);
  int64_t chunks = std::max<int64_t>(1, (rows + chunk - 1) / chunk), whole = c / kLanes * kLanes;
  Floats partial(chunks * 2 * c, 0.0f);
  const float *ap = a.typed_data(), *bp = b.typed_data();
  float* part = partial.data();
  parallel_for(pool, chunks, num_workers(pool, chunks), [=](int64_t k, int64_t) {
    int64_t r0 = k * chunk, n = std::min(chunk, rows - r0);
    const float *ak = ap + r0 * c, *bk = bp + r0 * c;
    float *s = part + k * 2 * c, *p = s + c;
    int64_t o = 0;
    for (; o + 4 * kLanes <= whole; o += 4 * kLanes) moments_block<4>(ak + o, bk + o, n, c, s + o, p + o);
    for (; o + 2 * kLanes <= whole; o += 2 * kLanes) moments_block<2>(ak + o, bk + o, n, c, s + o, p + o);
    for (; o < whole; o += kLanes) moments_block<1>(ak + o, bk + o, n, c, s + o, p + o);
    for (int64_t r = 0; r < n && whole < c; ++r)  // channels after the last whole vector
      for (int64_t e = whole; e < c; ++e) {
        s[e] += ak[r * c + e];
        p[e] += ak[r * c + e] * bk[r * c + e];
      }
  });
  float *sp = sum->typed_data(), *dp = dot->typed_data();
  std::fill(sp, sp + c, 0.0f);
  std::fill(dp, dp + c, 0.0f);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t e = 0; e < c; ++e) {
      sp[e] += part[k * 2 * c + e];
      dp[e] += part[k * 2 * c + c + e];
    }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabChannelMoments, ChannelMoments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
