// Direct NHWC fp32 convolutions and max pooling for XLA's CPU backend, called through XLA's FFI
// (models/cpu_kernels.py builds and registers them; layers.cpu_dot also runs dense layers' weight gradients
// through the convolution weight gradient, as 1x1 convolutions). XLA's CPU convolutions (Eigen) run ResNet-20's
// 3x3 layers at a third to a half of the machine's FMA rate and their weight gradients at a quarter; these loops
// keep one image's tile in cache and a block of output pixels (or of the weight gradient's rows) in vector
// registers, kLanes channels to a vector (16 with AVX-512, 8 with AVX2, 4 with NEON or SSE; below).
//
// Layouts as lax.conv_general_dilated with ("NHWC", "HWIO", "NHWC"); strides (sh, sw); the top and left padding
// (pt, pl), the bottom and right following from the output's shape. Images are split over XLA's intra-op threads.
#include "cpu_kernels.h"

// Channels are processed a vector at a time, two where they divide into pairs of vectors; a count that is not a
// whole number of vectors is widened with zeros in packed copies of the weights (or of dy) and stored through a
// mask.
static int64_t widen(int64_t d) { return (d + kLanes - 1) / kLanes * kLanes; }
static int group(int64_t d) { return d % (2 * kLanes) == 0 ? 2 : 1; }
static int lanes(int64_t d, int64_t o, int nc) {
  return (int)std::min<int64_t>(kLanes, d - o - kLanes * (nc - 1));
}
static int pixels(int64_t d) { return kAccumulators / group(d); }  // output pixels per forward block
// Where block i of a row of n pixels starts when the row is split into blocks of at most `most` as even as they go:
// on AVX2 (6 pixels) ResNet-20's 7-pixel rows as 4 + 3, not 6 + 1, whose one-pixel block waits on each multiply-add.
static int64_t blocks(int64_t n, int64_t most) { return (n + most - 1) / most; }
static int64_t block_start(int64_t i, int64_t n, int64_t most) { return i * n / blocks(n, most); }

// rows x d values, as rows x widen(d) with zeros after each row's d (src itself if d needs no widening).
static const float* widened(const float* src, int64_t rows, int64_t d, Floats& out) {
  int64_t dv = widen(d);
  if (dv == d) return src;
  out.assign(rows * dv, 0.0f);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(&out[r * dv], src + r * d, d * sizeof(float));
  return out.data();
}

// A thread's buffer for zero-padded images; its zeros are written once per geometry, not once per image.
struct Scratch {
  Floats data;
  std::array<int64_t, 8> geometry{};
};

// `count` consecutive images of x (h, w, c), each zero-padded into scratch as rows [-pt, rows - pt) and columns
// [-pl, cols - pl), rows * cols * c apart; x itself where no padding is needed (its images h * w * c apart).
// `room` (at least count) is how many the scratch holds, so that a smaller last group keeps its zeros.
static const float* padded(const float* x, int64_t h, int64_t w, int64_t c, int64_t pt, int64_t pl,
                           int64_t rows, int64_t cols, Scratch& scratch, int64_t count = 1, int64_t room = 1) {
  if (pt == 0 && pl == 0 && cols == w && rows <= h) return x;
  std::array<int64_t, 8> geometry{h, w, c, pt, pl, rows, cols, room};
  if (geometry != scratch.geometry) {
    scratch.data.assign(room * rows * cols * c, 0.0f);
    scratch.geometry = geometry;
  }
  float* out = scratch.data.data();
  int64_t c0 = std::max<int64_t>(0, pl), c1 = std::min<int64_t>(cols, w + pl);
  for (int64_t g = 0; g < count; ++g)
    for (int64_t r = std::max<int64_t>(0, pt); r < std::min<int64_t>(rows, h + pt); ++r)
      if (c1 > c0)
        std::memcpy(out + ((g * rows + r) * cols + c0) * c, x + ((g * h + r - pt) * w + c0 - pl) * c,
                    (c1 - c0) * c * sizeof(float));
  return out;
}

// Part `part` of `parts` of the `count` floats at p asked into L2: the image a thread likely takes next (threads
// take images in turn), spread over the rows of the one it computes, so that its copy into padded scratch reads the
// cache instead of waiting on memory (memmove was 5% of ResNet-20's step). Per op ResNet-20's 28x28x16 layers
// 1.02-1.05x, its step 1.01-1.02x (Zen 4); results unchanged.
static void prefetch_part(const float* p, int64_t count, int64_t part, int64_t parts) {
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t i = part * count / parts / kLine * kLine; i < (part + 1) * count / parts; i += kLine)
    __builtin_prefetch(p + i, 0, 2);
}

// y[b, o0:o0+kLanes*NC] for BW neighbouring output pixels b. xs points at the first one's window, whose rows are run
// contiguous values apart xrow, the next pixel's window pstride further; w at [0, o0], rows of wstride, run rows
// per window row. BW * NC accumulators stay in registers; each x value is loaded once for NC vectors, each w
// vector once for BW pixels. The last vector stores its first n lanes. PS > 0 is pstride known at compile time,
// so that the BW pixels' x values are one pointer plus constant offsets (28x28x16 layers 1.1-1.2x). Compiled on
// its own: inlined into forward_tail's chain of blocks, with wv pinned, GCC kept a block's accumulators on the stack.
template <int BW, int NC, int PS>
__attribute__((noinline)) static void forward_block(const float* xs, int64_t xrow, int64_t run, int64_t pixel_stride,
                                                    const float* w, int64_t wstride, int64_t kh, float* y,
                                                    int64_t ystride, int n) {
  const int64_t pstride = PS > 0 ? PS : pixel_stride;
  vec acc[BW][NC] = {};
  for (int64_t i = 0; i < kh; ++i) {
    const float* xp = xs + i * xrow;
    const float* wp = w + i * run * wstride;
    for (int64_t t = 0; t < run; ++t) {
      vec wv[NC];
      for (int m = 0; m < NC; ++m) {
        wv[m] = *(const vec*)(wp + t * wstride + kLanes * m);
        in_register(wv[m]);
      }
      for (int b = 0; b < BW; ++b) {
        float xv = xp[b * pstride + t];
        for (int m = 0; m < NC; ++m) acc[b][m] += xv * wv[m];
      }
    }
  }
  // Unrolled, so that the accumulators go from registers to y: as loops, GCC zeroed a copy of acc on the stack
  // (a call to memset) on entry and stored through it. Per op ResNet-20's convolutions 1.02-1.10x, attention
  // 1.04-1.14x.
#pragma GCC unroll 16
  for (int b = 0; b < BW; ++b) {
#pragma GCC unroll 4
    for (int m = 0; m < NC - 1; ++m) *(vec*)(y + b * ystride + kLanes * m) = acc[b][m];
    store(y + b * ystride + kLanes * (NC - 1), acc[b][NC - 1], n);
  }
}

// forward_block for nb <= BW pixels and nc (1 or 2) vectors.
template <int BW>
static void forward_tail(int nb, int nc, const float* xs, int64_t xrow, int64_t run, int64_t pstride,
                         const float* w, int64_t wstride, int64_t kh, float* y, int64_t ystride, int n) {
  if constexpr (BW > 0) {
    if (nb == BW && nc == 2) {
      if (pstride == 32) return forward_block<BW, 2, 32>(xs, xrow, run, pstride, w, wstride, kh, y, ystride, n);
      if (pstride == 64) return forward_block<BW, 2, 64>(xs, xrow, run, pstride, w, wstride, kh, y, ystride, n);
      return forward_block<BW, 2, 0>(xs, xrow, run, pstride, w, wstride, kh, y, ystride, n);
    }
    if (nb == BW) {
      if (pstride == 16) return forward_block<BW, 1, 16>(xs, xrow, run, pstride, w, wstride, kh, y, ystride, n);
      if (pstride == 32) return forward_block<BW, 1, 32>(xs, xrow, run, pstride, w, wstride, kh, y, ystride, n);
      return forward_block<BW, 1, 0>(xs, xrow, run, pstride, w, wstride, kh, y, ystride, n);
    }
    forward_tail<BW - 1>(nb, nc, xs, xrow, run, pstride, w, wstride, kh, y, ystride, n);
  }
}

#ifdef __AVX512F__
// The forward of a one-channel stride-1 layer with fewer output channels than a vector holds (LeNet's conv1),
// by pixels as pixel_weight_grad: CO accumulators of 16 output pixels of a row, each x vector loaded once for
// all CO channels, then interleaved into y's (pixel, channel) order in registers: y's vector v takes lane e
// from channel (16v + e) % CO at pixel (16v + e) / CO, one masked permute per channel.
struct Interleave {
  __m512i index[kLanes * kLanes];
  __mmask16 mask[kLanes * kLanes];
  explicit Interleave(int co) {
    for (int v = 0; v < co; ++v)
      for (int o = 0; o < co; ++o) {
        alignas(64) int32_t idx[kLanes] = {};
        __mmask16 m = 0;
        for (int e = 0; e < kLanes; ++e)
          if ((kLanes * v + e) % co == o) idx[e] = (kLanes * v + e) / co, m |= (__mmask16)(1u << e);
        index[v * co + o] = _mm512_load_si512(idx);
        mask[v * co + o] = m;
      }
  }
};

template <int CO>
static void pixel_forward_row(const float* xr, int64_t xrow, const float* w, int64_t kh, int64_t kw, int64_t wo,
                              float* y, const Interleave& il) {
  for (int64_t q = 0; q < wo; q += kLanes) {
    __m512 acc[CO];
    for (int o = 0; o < CO; ++o) acc[o] = _mm512_setzero_ps();
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        __m512 xv = _mm512_loadu_ps(xr + i * xrow + q + j);
        const float* wt = w + (i * kw + j) * CO;
        for (int o = 0; o < CO; ++o) acc[o] = _mm512_fmadd_ps(xv, _mm512_set1_ps(wt[o]), acc[o]);
      }
    int64_t values = std::min<int64_t>(kLanes, wo - q) * CO;
    for (int v = 0; v * kLanes < values; ++v) {
      __m512 out = _mm512_setzero_ps();
      for (int o = 0; o < CO; ++o)
        out = _mm512_mask_permutexvar_ps(out, il.mask[v * CO + o], il.index[v * CO + o], acc[o]);
      store(y + q * CO + v * kLanes, (vec)out, (int)std::min<int64_t>(kLanes, values - v * kLanes));
    }
  }
}

template <int CO = kLanes - 1>
static void pixel_forward_co(int64_t co, const float* xr, int64_t xrow, const float* w, int64_t kh, int64_t kw,
                             int64_t wo, float* y, const Interleave& il) {
  if constexpr (CO > 0) {
    if (co == CO) return pixel_forward_row<CO>(xr, xrow, w, kh, kw, wo, y, il);
    pixel_forward_co<CO - 1>(co, xr, xrow, w, kh, kw, wo, y, il);
  }
}
#endif

static ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                              ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  int64_t n = xd[0], h = xd[1], wi = xd[2], c = xd[3], kh = wd[0], kw = wd[1], co = wd[3], ho = yd[1], wo = yd[2];
  int64_t rows = (ho - 1) * sh + kh, cols = (wo - 1) * sw + kw, cv = widen(co);
  int nc = group(co);
  Floats wpad;
  const float* wp = widened(w.typed_data(), kh * kw * c, co, wpad);
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
#ifdef __AVX512F__
  if (c == 1 && sh == 1 && sw == 1 && co < kLanes) {  // pixel_forward_row's case
    auto il = std::make_shared<Interleave>((int)co);
    const float* wd_ = w.typed_data();
    int64_t xcols = widen(wo) + kw - 1;  // every x column a 16-pixel vector reads
    parallel_for(pool, n, num_workers(pool, n), [=](int64_t b, int64_t) {
      thread_local Scratch scratch;
      const float* xb = xp + b * h * wi;
      const float* xs = padded(xb, h, wi, 1, pt, pl, rows, xcols, scratch);
      int64_t xrow = xs == xb ? wi : xcols;
      for (int64_t r = 0; r < ho; ++r)
        pixel_forward_co(co, xs + r * xrow, xrow, wd_, kh, kw, wo, yp + (b * ho + r) * wo * co, *il);
    });
    return ffi::Error::Success();
  }
#endif
  const int64_t workers = num_workers(pool, n);
  parallel_for(pool, n, workers, [=](int64_t b, int64_t) {
    thread_local Scratch scratch;
    const float* xb = xp + b * h * wi * c;
    const float* xs = padded(xb, h, wi, c, pt, pl, rows, cols, scratch);
    int64_t xrow = (xs == xb ? wi : cols) * c;
    for (int64_t r = 0; r < ho; ++r) {
      if (xs != xb && b + workers < n) prefetch_part(xb + workers * h * wi * c, h * wi * c, r, ho);
      for (int64_t i = 0; i < blocks(wo, pixels(co)); ++i) {
        const int64_t q = block_start(i, wo, pixels(co));
        const int nb = (int)(block_start(i + 1, wo, pixels(co)) - q);
        for (int64_t o = 0; o < cv; o += kLanes * nc)
          forward_tail<kAccumulators>(nb, nc, xs + r * sh * xrow + q * sw * c, xrow, kw * c, sw * c, wp + o, cv,
                                      kh, yp + ((b * ho + r) * wo + q) * co + o, co, lanes(co, o, nc));
      }
    }
  });
  return ffi::Error::Success();
}

// dx of a convolution with strides (sh, sw): for each phase (rh, rw) of dx's rows and columns, a stride-1
// correlation of dy with the taps that reach it (polyphase), so no zeros are inserted between dy's pixels.
struct Phase {
  int64_t dmin, taps;
};
static Phase phase(int64_t r, int64_t s, int64_t p, int64_t k) {
  // tap i reaches dx row r (mod s) iff (r + p - i) divides by s; it reads dy row a + (r + p - i) / s, and these
  // offsets run over consecutive values as i falls
  int64_t dmin = 0, taps = 0;
  for (int64_t i = k - 1; i >= 0; --i) {
    int64_t t = r + p - i, m = ((t % s) + s) % s;
    if (m != 0) continue;
    if (taps == 0) dmin = (t - m) / s;
    ++taps;
  }
  return {dmin, taps};
}

// The input gradient of a layer with fewer input channels C than a vector holds (LeNet's conv2: 6), vectorised
// over dy's channels instead: dx[pixel, k] for P neighbouring pixels of a phase, each the lane sum of C x P
// accumulators over the taps' dy vectors times w[tap, k, :] (packed (taps_h, taps_w, C, co)). 2.7x fewer
// multiply-adds than 16-lane vectors of which C are used. Only tap columns [u0, u1) of the tw, those that reach
// dy for some of the P pixels, are summed (the others read padding).
template <int C, int P>
__attribute__((noinline)) static void narrow_block(const float* dr, int64_t drow, int64_t co, const float* wq,
                                                   int64_t th, int64_t tw, int64_t u0, int64_t u1, float* x,
                                                   int64_t xstride) {
  vec acc[P][C] = {};
  for (int64_t o = 0; o < co; o += kLanes)
    for (int64_t t = 0; t < th; ++t)
      for (int64_t u = u0; u < u1; ++u) {
        const float* wt = wq + (t * tw + u) * C * co + o;
        if constexpr (P * C + C + 1 <= kRegisters) {  // the C weight vectors in registers, the P pixels' dy in turn
          vec wv[C];
          for (int k = 0; k < C; ++k) {
            wv[k] = *(const vec*)(wt + k * co);
            in_register(wv[k]);
          }
          for (int p = 0; p < P; ++p) {
            vec d = *(const vec*)(dr + t * drow + (p + u) * co + o);
            in_register(d);
            for (int k = 0; k < C; ++k) acc[p][k] += d * wv[k];
          }
        } else {  // 16 registers: the P pixels' dy in registers, each weight vector loaded once for all of them
          vec d[P];
          for (int p = 0; p < P; ++p) {
            d[p] = *(const vec*)(dr + t * drow + (p + u) * co + o);
            in_register(d[p]);
          }
          for (int k = 0; k < C; ++k) {
            vec w = *(const vec*)(wt + k * co);
            in_register(w);
            for (int p = 0; p < P; ++p) acc[p][k] += d[p] * w;
          }
        }
      }
#pragma GCC unroll 16  // as in forward_block: LeNet conv2's input gradient 1.26x
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int k = 0; k < C; ++k) x[p * xstride + k] = sum_lanes(acc[p][k]);
}

// P x C accumulators, P dy vectors and a weight vector fit the registers
constexpr int narrow_pixels(int c) { return std::max(1, std::min(4, (kRegisters - 1) / (c + 1))); }

template <int C, int P = narrow_pixels(C)>
static void narrow_tail(int np, const float* dr, int64_t drow, int64_t co, const float* wq, int64_t th, int64_t tw,
                        int64_t u0, int64_t u1, float* x, int64_t xstride) {
  if constexpr (P > 0) {
    if (np == P) return narrow_block<C, P>(dr, drow, co, wq, th, tw, u0, u1, x, xstride);
    narrow_tail<C, P - 1>(np, dr, drow, co, wq, th, tw, u0, u1, x, xstride);
  }
}

// narrow_tail for c = 1 .. kLanes - 1 known at compile time.
template <int C = kLanes - 1>
static void narrow(int c, int np, const float* dr, int64_t drow, int64_t co, const float* wq, int64_t th, int64_t tw,
                   int64_t u0, int64_t u1, float* x, int64_t xstride) {
  if constexpr (C > 0) {
    if (c == C) return narrow_tail<C>(np, dr, drow, co, wq, th, tw, u0, u1, x, xstride);
    narrow<C - 1>(c, np, dr, drow, co, wq, th, tw, u0, u1, x, xstride);
  }
}

static ffi::Error ConvInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  auto dd = dy.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
  int64_t n = dd[0], ho = dd[1], wo = dd[2], kh = wd[0], kw = wd[1], c = wd[2], co = wd[3], h = xd[1], wi = xd[2];
  int64_t cv = widen(c);
  int nc = group(c);
  bool few = c < kLanes && co % kLanes == 0;  // narrow_block's case
  std::vector<Phase> ph(sh), pw(sw);
  for (int64_t r = 0; r < sh; ++r) ph[r] = phase(r, sh, pt, kh);
  for (int64_t r = 0; r < sw; ++r) pw[r] = phase(r, sw, pl, kw);
  int64_t top = 0, left = 0;
  for (auto& p : ph) if (p.taps) top = std::max(top, -p.dmin);
  for (auto& p : pw) if (p.taps) left = std::max(left, -p.dmin);
  // Per phase, its taps' weights as (taps_h, taps_w, co, cv), in the order they meet dy (few: (.., c, co)).
  std::vector<Floats> packed(sh * sw);
  const float* wp = w.typed_data();
  for (int64_t rh = 0; rh < sh; ++rh)
    for (int64_t rw = 0; rw < sw; ++rw) {
      auto& q = packed[rh * sw + rw];
      q.assign(ph[rh].taps * pw[rw].taps * co * cv, 0.0f);
      for (int64_t t = 0; t < ph[rh].taps; ++t)
        for (int64_t u = 0; u < pw[rw].taps; ++u) {
          int64_t i = rh + pt - sh * (ph[rh].dmin + t), j = rw + pl - sw * (pw[rw].dmin + u);
          int64_t tap = t * pw[rw].taps + u;
          for (int64_t o = 0; o < co; ++o)
            for (int64_t k = 0; k < c; ++k)
              q[few ? (tap * c + k) * co + o : (tap * co + o) * cv + k] = wp[((i * kw + j) * c + k) * co + o];
        }
    }
  // every row and column a phase can read; beyond dy's own, zeros
  int64_t rows = top + (h + sh - 1) / sh + std::max<int64_t>(0, pt) / sh + kh + 1;
  int64_t cols = left + (wi + sw - 1) / sw + std::max<int64_t>(0, pl) / sw + kw + 1;
  const float* dp = dy.typed_data();
  float* xp = dx->typed_data();
  const auto* pk = &packed;
  const auto *php = &ph, *pwp = &pw;
  const int64_t workers = num_workers(pool, n);
  parallel_for(pool, n, workers, [=](int64_t b, int64_t) {
    thread_local Scratch scratch;
    const float* db = dp + b * ho * wo * co;
    const float* ds = padded(db, ho, wo, co, top, left, rows, cols, scratch);
    const bool fetch = ds != db && b + workers < n;
    int64_t drow = (ds == db ? wo : cols) * co;
    float* xb = xp + b * h * wi * c;
    for (int64_t rh = 0; rh < sh; ++rh)
      for (int64_t rw = 0; rw < sw; ++rw) {
        const Phase &p = (*php)[rh], &q = (*pwp)[rw];
        const float* wq = (*pk)[rh * sw + rw].data();
        int64_t nq = (wi - rw + sw - 1) / sw;  // dx columns in this phase
        for (int64_t a = 0; rh + sh * a < h; ++a) {
          if (fetch && rh == 0 && rw == 0)
            prefetch_part(db + workers * ho * wo * co, ho * wo * co, a, (h + sh - 1) / sh);
          float* xr = xb + (rh + sh * a) * wi * c;
          // Tap t reads dy row d0 + t: only taps [t0, t1) reach one of dy's rows (a VALID layer's border rows
          // meet few; LeNet's conv2 60 -> 40 tap rows an image).
          int64_t d0 = a + p.dmin, t0 = std::max<int64_t>(0, -d0), t1 = std::min<int64_t>(p.taps, ho - d0);
          if (t1 <= t0 || q.taps == 0) {  // no tap reaches these pixels (kernel smaller than the stride)
            for (int64_t e = 0; e < nq; ++e) std::memset(xr + (rw + sw * e) * c, 0, c * sizeof(float));
            continue;
          }
          const float* dr = ds + (d0 + t0 + top) * drow + (q.dmin + left) * co;
          const float* wt = wq + t0 * q.taps * co * (few ? c : cv);
          if (few) {
            for (int64_t e = 0; e < nq; e += narrow_pixels(c)) {
              int64_t np = std::min<int64_t>(narrow_pixels(c), nq - e), c0 = q.dmin + e;  // dy column at tap 0
              int64_t u0 = std::max<int64_t>(0, -(c0 + np - 1)), u1 = std::min<int64_t>(q.taps, wo - c0);
              narrow((int)c, (int)np, dr + e * co, drow, co, wt, t1 - t0, q.taps, u0, std::max(u0, u1),
                     xr + (rw + sw * e) * c, sw * c);
            }
            continue;
          }
          for (int64_t i = 0; i < blocks(nq, pixels(c)); ++i) {
            const int64_t e = block_start(i, nq, pixels(c));
            const int nb = (int)(block_start(i + 1, nq, pixels(c)) - e);
            for (int64_t k = 0; k < cv; k += kLanes * nc)
              forward_tail<kAccumulators>(nb, nc, dr + e * co, drow, q.taps * co, co, wt + k, cv, t1 - t0,
                                          xr + (rw + sw * e) * c + k, sw * c, lanes(c, k, nc));
          }
        }
      }
  });
  return ffi::Error::Success();
}

// dw[t0:t0+CB, o0:o0+kLanes*NC] += the sum over the output pixels of `images` images of x[window, t] * dy[pixel, o],
// t running over one kernel row's (kw, c) values, contiguous in x's window row and in dw. xs points at the first
// pixel's window (value t0), the next pixel's pstride further, the next image's ximage further; dy (pixels of dv
// values, one image after another) and dw (rows of dv) at o0.
template <int CB, int NC>
static inline void weight_block(const float* xs, int64_t xrow, int64_t pstride, int64_t sh, const float* dy,
                                int64_t ho, int64_t wo, int64_t dv, float* dw, int64_t images, int64_t ximage) {
  vec acc[CB][NC];
  for (int k = 0; k < CB; ++k)
    for (int m = 0; m < NC; ++m) acc[k][m] = *(const vec*)(dw + k * dv + kLanes * m);
  for (int64_t g = 0; g < images; ++g)
    for (int64_t r = 0; r < ho; ++r) {
      const float* xr = xs + g * ximage + r * sh * xrow;
      const float* dr = dy + (g * ho + r) * wo * dv;
      for (int64_t q = 0; q < wo; ++q) {
        vec d[NC];
        for (int m = 0; m < NC; ++m) d[m] = *(const vec*)(dr + q * dv + kLanes * m);
        const float* xq = xr + q * pstride;
        for (int k = 0; k < CB; ++k) {
          float xv = xq[k];
          for (int m = 0; m < NC; ++m) acc[k][m] += xv * d[m];
        }
      }
    }
  for (int k = 0; k < CB; ++k)
    for (int m = 0; m < NC; ++m) *(vec*)(dw + k * dv + kLanes * m) = acc[k][m];
}

template <int CB>
static void weight_tail(int nr, int nc, const float* xs, int64_t xrow, int64_t pstride, int64_t sh,
                        const float* dy, int64_t ho, int64_t wo, int64_t dv, float* dw, int64_t images,
                        int64_t ximage) {
  if constexpr (CB > 0) {
    if (nr == CB && nc == 2) return weight_block<CB, 2>(xs, xrow, pstride, sh, dy, ho, wo, dv, dw, images, ximage);
    if (nr == CB) return weight_block<CB, 1>(xs, xrow, pstride, sh, dy, ho, wo, dv, dw, images, ximage);
    weight_tail<CB - 1>(nr, nc, xs, xrow, pstride, sh, dy, ho, wo, dv, dw, images, ximage);
  }
}

// Where dw's columns are a whole number of kDenseCols vectors and there are 32 registers (AVX-512, NEON), blocks of
// 6 rows by 4 vectors: 24 multiply-adds for 10 loads, against weight_block<8, 2>'s 16 for 10.
constexpr int kDenseCols = 4, kDenseRows = (kRegisters - kDenseCols - 2) / kDenseCols;  // as attention's blocks
constexpr bool kDenseBlocks = kDenseRows * kDenseCols > kAccumulators;

template <int CB = kDenseRows>
static void wide_block(int nr, const float* xs, int64_t xrow, int64_t pstride, int64_t sh, const float* dy,
                       int64_t ho, int64_t wo, int64_t dv, float* dw, int64_t images, int64_t ximage) {
  if constexpr (CB > 0) {
    if (nr == CB) return weight_block<CB, kDenseCols>(xs, xrow, pstride, sh, dy, ho, wo, dv, dw, images, ximage);
    wide_block<CB - 1>(nr, xs, xrow, pstride, sh, dy, ho, wo, dv, dw, images, ximage);
  }
}

// The register blocks of a weight gradient whose dw has d columns: nc accumulator vectors by `rows` dw rows.
struct WeightBlocks {
  int nc;
  int64_t rows;
};
static WeightBlocks weight_blocks(int64_t d) {
  if (kDenseBlocks && widen(d) % (kLanes * kDenseCols) == 0) return {kDenseCols, kDenseRows};
  return {group(d), kAccumulators / group(d)};
}

// weight_block for nr dw rows (at most weight_blocks' rows) and nc vectors.
static void weight_rows(int nr, int nc, const float* xs, int64_t xrow, int64_t pstride, int64_t sh, const float* dy,
                        int64_t ho, int64_t wo, int64_t dv, float* dw, int64_t images = 1, int64_t ximage = 0) {
  if (nc == kDenseCols) return wide_block(nr, xs, xrow, pstride, sh, dy, ho, wo, dv, dw, images, ximage);
  weight_tail<kAccumulators>(nr, nc, xs, xrow, pstride, sh, dy, ho, wo, dv, dw, images, ximage);
}

// The weight gradient of a one-channel stride-1 layer with fewer output channels than a vector holds (LeNet's
// conv1: 5x5 to 6, whose dy vectors above use 6 of 16 lanes), vectorised over a row's output pixels instead:
// dw[i, j, o] += x[r + i, q + j : +kLanes] . dy[o, r, q : +kLanes] for kLanes pixels q at a time, dy's channels
// deinterleaved into rows of whole vectors (zeros after wo). Per kernel row i and group of G channels, KW x G
// accumulators; each x vector loaded once for G channels, each dy vector once for KW taps. The sums stay vectors
// (vsum, (kh, kw, co) of them) until the caller adds their lanes.
constexpr int kPixelGroup = 3;
template <int KW>
static void pixel_weight_grad(const float* xs, int64_t xrow, const float* dq, int64_t ho, int64_t wq, int64_t kh,
                              int64_t co, vec* vsum) {
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t o = 0; o < co; o += kPixelGroup) {
      int g = (int)std::min<int64_t>(kPixelGroup, co - o);
      vec acc[KW][kPixelGroup] = {};
      for (int64_t r = 0; r < ho; ++r)
        for (int64_t q = 0; q < wq; q += kLanes) {
          vec xv[KW];
          for (int j = 0; j < KW; ++j) xv[j] = *(const vec*)(xs + (r + i) * xrow + q + j);
          for (int m = 0; m < kPixelGroup; ++m) {
            if (m >= g) break;
            vec d = *(const vec*)(dq + ((o + m) * ho + r) * wq + q);
            for (int j = 0; j < KW; ++j) acc[j][m] += xv[j] * d;
          }
        }
      for (int j = 0; j < KW; ++j)
        for (int m = 0; m < g; ++m) vsum[(i * KW + j) * co + o + m] += acc[j][m];
    }
}

constexpr int kPixelMaxKW = 7;
template <int KW = kPixelMaxKW>
static void pixel_weight_grad_kw(int64_t kw, const float* xs, int64_t xrow, const float* dq, int64_t ho, int64_t wq,
                                 int64_t kh, int64_t co, vec* vsum) {
  if constexpr (KW > 0) {
    if (kw == KW) return pixel_weight_grad<KW>(xs, xrow, dq, ho, wq, kh, co, vsum);
    pixel_weight_grad_kw<KW - 1>(kw, xs, xrow, dq, ho, wq, kh, co, vsum);
  }
}

// Small images' weight gradients sum each register block over a group of images of up to kSweepPixels output
// pixels, whose padded x and dy fit in kGroupBytes of cache, so that the block's accumulators are not loaded and
// stored every few dozen pixels (ResNet-20's 7x7x64 layer: 96 blocks an image of 49 pixels). Per op its weight
// gradient 1.20x, the 14x14x32 layer's 1.04x, LeNet conv2's 1.11x (Zen 4); ResNet-20's step 1.02x.
constexpr int64_t kSweepPixels = 512, kGroupBytes = 256 << 10;

static ffi::Error ConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  auto xd = x.dimensions(), dd = dy.dimensions(), wd = dw->dimensions();
  int64_t n = xd[0], h = xd[1], wi = xd[2], c = xd[3], kh = wd[0], kw = wd[1], co = wd[3], ho = dd[1], wo = dd[2];
  int64_t rows = (ho - 1) * sh + kh, cols = (wo - 1) * sw + kw, run = kw * c, cv = widen(co), size = kh * run * cv;
  const WeightBlocks blocks = weight_blocks(co);
  const int nc = blocks.nc;
  const int64_t block = blocks.rows;
  int64_t workers = num_workers(pool, n);
  const int64_t image_bytes = (rows * cols * c + ho * wo * cv) * (int64_t)sizeof(float);
  const int64_t image_pixels = std::max<int64_t>(1, ho * wo);
  const int64_t group_size =
      std::max<int64_t>(1, std::min((kSweepPixels + image_pixels - 1) / image_pixels, kGroupBytes / image_bytes));
  // One dw (rows of cv) per chunk of images, summed at the end; kept by the calling thread between calls, so that
  // a dense layer's megabytes of partial sums are not allocated (and faulted in) every step.
  thread_local Floats partial;
  if (partial.size() < (size_t)(workers * size)) partial.resize(workers * size);
  const float* xp = x.typed_data();
  const float* dp = dy.typed_data();
  float* part = partial.data();
  // Image chunk s adds into partial dw s, whichever thread takes it: the sums' order, hence the result, is the
  // same in every run.
  bool by_pixel = c == 1 && sh == 1 && sw == 1 && co < kLanes && kw <= kPixelMaxKW;  // pixel_weight_grad's case
  int64_t wq = widen(wo);  // by_pixel: dy rows of whole vectors; x columns read up to wq + kw - 1
  parallel_for(pool, workers, workers, [=](int64_t chunk, int64_t) {
    thread_local Scratch scratch;
    thread_local Floats dy_wide;
    float* acc = part + chunk * size;
    std::fill(acc, acc + size, 0.0f);
    if (by_pixel) {
      std::vector<vec> vsum(kh * kw * co, vec{});
      dy_wide.assign(co * ho * wq, 0.0f);
      for (int64_t b = chunk * n / workers; b < (chunk + 1) * n / workers; ++b) {
        const float* xb = xp + b * h * wi;
        const float* xs = padded(xb, h, wi, 1, pt, pl, rows, wq + kw - 1, scratch);
        const float* db = dp + b * ho * wo * co;
        for (int64_t o = 0; o < co; ++o)
          for (int64_t r = 0; r < ho; ++r) {
            float* dq = dy_wide.data() + (o * ho + r) * wq;
            const float* dr = db + r * wo * co + o;
            for (int64_t q = 0; q < wo; ++q) dq[q] = dr[q * co];
          }
        pixel_weight_grad_kw(kw, xs, xs == xb ? wi : wq + kw - 1, dy_wide.data(), ho, wq, kh, co, vsum.data());
      }
      for (int64_t t = 0; t < kh * kw; ++t)
        for (int64_t o = 0; o < co; ++o) acc[t * cv + o] = sum_lanes(vsum[t * co + o]);
      return;
    }
    const int64_t end = (chunk + 1) * n / workers;
    for (int64_t b = chunk * n / workers; b < end; b += group_size) {
      const int64_t count = std::min(group_size, end - b);
      const float* xb = xp + b * h * wi * c;
      const float* xs = padded(xb, h, wi, c, pt, pl, rows, cols, scratch, count, group_size);
      const bool in_place = xs == xb;
      int64_t xrow = (in_place ? wi : cols) * c, ximage = in_place ? h * wi * c : rows * cols * c;
      const float* db = widened(dp + b * ho * wo * co, count * ho * wo, co, dy_wide);
      const int64_t next = std::min(group_size, end - b - count), steps = (run + block - 1) / block;
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t t = 0; t < run; t += block) {
          if (!in_place && next > 0)
            prefetch_part(xb + count * h * wi * c, next * h * wi * c, i * steps + t / block, kh * steps);
          for (int64_t o = 0; o < cv; o += kLanes * nc)
            weight_rows((int)std::min<int64_t>(block, run - t), nc, xs + i * xrow + t, xrow, sw * c, sh, db + o, ho,
                        wo, cv, acc + (i * run + t) * cv + o, count, ximage);
        }
    }
  });
  float* out = dw->typed_data();
  int64_t total = kh * run;
  parallel_for(pool, workers, workers, [=](int64_t w, int64_t) {  // the rows of dw split over the threads
    for (int64_t r = w * total / workers; r < (w + 1) * total / workers; ++r)
      for (int64_t o = 0; o < co; ++o) {
        float v = part[r * cv + o];
        for (int64_t s = 1; s < workers; ++s) v += part[s * size + r * cv + o];
        out[r * co + o] = v;
      }
  });
  return ffi::Error::Success();
}

// A dense layer's weight gradient dw = x^T dy for x (M, K), dy (M, N), N a whole number of vectors, in tiles of
// up to kTileK x kTileN, each summed over its rows kTileM at a time with a block of dw in registers (6 rows by 4
// vectors where N and 32 registers allow: 24 multiply-adds for 10 loads; else weight_block's 8-16 rows by 1-2
// vectors), so that a tile's sums stay in L2 and its x rows in L1 (ConvWeightGrad's partial sums per "image", a
// 384 x 1536 dw, streamed 2.4 MB through memory per 64 rows). A dw of fewer than kTasks tiles (ViT-tiny's 64 x 64)
// is also split over the rows, each part's sums kept apart and added in order at the end. The split depends on
// the shapes alone, so a result repeats bitwise whatever the thread count.
constexpr int64_t kTileK = 96, kTileN = 256, kTileM = 256, kTasks = 8;
static_assert(kTileN % (kLanes * kDenseCols) == 0, "a tile is a whole number of blocks wide");

static ffi::Error DenseWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                  ffi::ResultBuffer<ffi::F32> dw) {
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = dy.dimensions()[1];
  if (n % kLanes != 0 || dy.dimensions()[0] != m)
    return ffi::Error::InvalidArgument("dense_weight_grad: dy's rows differ from x's, or not whole vectors wide");
  if (k == 0 || n == 0) return ffi::Error::Success();  // an empty dw
  const WeightBlocks blocks = weight_blocks(n);
  const int nc = blocks.nc;
  const int64_t block = blocks.rows;
  int64_t tiles_k = (k + kTileK - 1) / kTileK, tiles_n = (n + kTileN - 1) / kTileN, tiles = tiles_k * tiles_n;
  int64_t parts = std::max<int64_t>(1, std::min((kTasks + tiles - 1) / tiles, m / kTileM));
  thread_local Floats partial;  // parts 1.. (part 0 sums into dw), kept between calls
  if (partial.size() < (size_t)((parts - 1) * k * n)) partial.resize((parts - 1) * k * n);
  const float* xp = x.typed_data();
  const float* dp = dy.typed_data();
  float* out = dw->typed_data();
  float* part = partial.data();
  parallel_for(pool, tiles * parts, num_workers(pool, tiles * parts), [=](int64_t task, int64_t) {
    int64_t tile = task % tiles, p = task / tiles;
    int64_t k0 = tile % tiles_k * kTileK, k1 = std::min(k, k0 + kTileK);
    int64_t n0 = tile / tiles_k * kTileN, n1 = std::min(n, n0 + kTileN);
    int64_t m0 = p * m / parts, m1 = (p + 1) * m / parts;
    float* acc = p == 0 ? out : part + (p - 1) * k * n;
    for (int64_t r = k0; r < k1; ++r) std::fill(acc + r * n + n0, acc + r * n + n1, 0.0f);
    for (int64_t i = m0; i < m1; i += kTileM) {
      const int64_t rows = std::min(kTileM, m1 - i);
      for (int64_t t = k0; t < k1; t += block)
        for (int64_t o = n0; o < n1; o += kLanes * nc) {
          weight_rows((int)std::min<int64_t>(block, k1 - t), nc, xp + i * k + t, k, 0, 1, dp + i * n + o, rows, 1,
                      n, acc + t * n + o);
        }
    }
  });
  if (parts > 1) {
    int64_t workers = num_workers(pool, k);
    parallel_for(pool, workers, workers, [=](int64_t w, int64_t) {  // the rows of dw split over the threads
      for (int64_t e = w * k / workers * n; e < (w + 1) * k / workers * n; ++e)
        for (int64_t p = 1; p < parts; ++p) out[e] += part[(p - 1) * k * n + e];
    });
  }
  return ffi::Error::Success();
}

// Max pooling over k x k windows at stride k (VALID), and its gradient routed to each window's first maximum (as
// reduce_window's select-and-scatter and PyTorch do), from the window positions the forward pass records. One
// output pixel's channels at a time, 16 to a vector (masked for the last few) where AVX-512 is there.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ARCHLAB_POOL_GROUPS 1
constexpr int64_t kMaxPoolTaps = 4;  // pool_group's windows: at most 4 wide
static void pool_pixel(const float* x, int64_t row, int64_t k, int64_t c, float* y, uint8_t* where, int64_t) {
  for (int64_t e = 0; e < c; e += 16) {
    __mmask16 lanes = first_lanes(c - e);
    __m512 best = _mm512_maskz_loadu_ps(lanes, x + e);
    __m512i pos = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        if (i == 0 && j == 0) continue;
        __m512 v = _mm512_maskz_loadu_ps(lanes, x + i * row + j * c + e);
        // v wins if greater, or if it is a NaN and best is not (a NaN propagates, as in reduce_max)
        __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) |
                         (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(best, best, _CMP_ORD_Q));
        best = _mm512_mask_blend_ps(take, best, v);
        pos = _mm512_mask_blend_epi32(take, pos, _mm512_set1_epi32((int)(i * k + j)));
      }
    _mm512_mask_storeu_ps(y + e, lanes, best);
    _mm_mask_storeu_epi8(where + e, lanes, _mm512_cvtepi32_epi8(pos));
  }
}

static void unpool_pixel(const float* g, const uint8_t* where, int64_t row, int64_t k, int64_t c, float* dx,
                         int64_t) {
  for (int64_t e = 0; e < c; e += 16) {
    __mmask16 lanes = first_lanes(c - e);
    __m512 gv = _mm512_maskz_loadu_ps(lanes, g + e);
    __m512i pos = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, where + e));
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        __mmask16 hit = _mm512_cmpeq_epi32_mask(pos, _mm512_set1_epi32((int)(i * k + j)));
        _mm512_mask_storeu_ps(dx + i * row + j * c + e, lanes, _mm512_maskz_mov_ps(hit, gv));
      }
  }
}

// Fewer channels than half a vector (LeNet's first pool: 6, of which pool_pixel's vectors used 6 of 16 lanes):
// P = 16 / c neighbouring output pixels a vector. Their windows' values of one window row, P * k * c <= 32
// contiguous floats, are two vectors, from which one two-source permute per window column picks each tap's values.
struct PoolGroups {
  int64_t pixels = 0;  // P; 0 where the case does not apply
  __m512i tap[kMaxPoolTaps];           // forward: lane (q, e) <- window value (k q + j) c + e of the row, per column j
  __m512i lane[2], column[2];          // gradient: window value s <- lane (q, e), and the column j it belongs to
  PoolGroups(int64_t k, int64_t c) {
    int64_t p = c < kLanes / 2 ? kLanes / c : 0;
    if (p < 2 || p * k * c > 2 * kLanes || k > kMaxPoolTaps) return;
    pixels = p;
    alignas(64) int32_t idx[2 * kLanes];
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t l = 0; l < kLanes; ++l) idx[l] = l < p * c ? (int32_t)((l / c * k + j) * c + l % c) : 0;
      tap[j] = _mm512_load_si512(idx);
    }
    alignas(64) int32_t col[2 * kLanes];
    for (int64_t s = 0; s < 2 * kLanes; ++s) {
      bool used = s < p * k * c;
      idx[s] = used ? (int32_t)(s / (k * c) * c + s % c) : 0;
      col[s] = used ? (int32_t)(s / c % k) : -1;
    }
    for (int h = 0; h < 2; ++h) {
      lane[h] = _mm512_load_si512(idx + h * kLanes);
      column[h] = _mm512_load_si512(col + h * kLanes);
    }
  }
};

// np <= P output pixels from x at their first window's top left.
static void pool_group(const float* x, int64_t row, int64_t k, int64_t c, int64_t np, const PoolGroups& g,
                       float* y, uint8_t* where) {
  int64_t span = np * k * c;
  __m512 best = _mm512_setzero_ps();
  __m512i pos = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; ++i) {
    __m512 lo = _mm512_maskz_loadu_ps(first_lanes(span), x + i * row);
    __m512 hi = _mm512_maskz_loadu_ps(first_lanes(span - kLanes), x + i * row + kLanes);
    for (int64_t j = 0; j < k; ++j) {
      __m512 v = _mm512_permutex2var_ps(lo, g.tap[j], hi);
      if (i == 0 && j == 0) {
        best = v;
        continue;
      }
      __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) |
                       (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(best, best, _CMP_ORD_Q));
      best = _mm512_mask_blend_ps(take, best, v);
      pos = _mm512_mask_blend_epi32(take, pos, _mm512_set1_epi32((int)(i * k + j)));
    }
  }
  _mm512_mask_storeu_ps(y, first_lanes(np * c), best);
  _mm_mask_storeu_epi8(where, first_lanes(np * c), _mm512_cvtepi32_epi8(pos));
}

static void unpool_group(const float* gy, const uint8_t* where, int64_t row, int64_t k, int64_t c, int64_t np,
                         const PoolGroups& g, float* dx) {
  int64_t span = np * k * c;
  __m512 gv = _mm512_maskz_loadu_ps(first_lanes(np * c), gy);
  __m512i pos = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(first_lanes(np * c), where));
  for (int h = 0; h < 2 && h * kLanes < span; ++h) {
    __m512 value = _mm512_permutexvar_ps(g.lane[h], gv);
    __m512i tap = _mm512_permutexvar_epi32(g.lane[h], pos);
    for (int64_t i = 0; i < k; ++i) {
      __mmask16 hit = _mm512_cmpeq_epi32_mask(tap, _mm512_add_epi32(g.column[h], _mm512_set1_epi32((int)(i * k))));
      _mm512_mask_storeu_ps(dx + i * row + h * kLanes, first_lanes(span - h * kLanes),
                            _mm512_maskz_mov_ps(hit, value));
    }
  }
}
#else
// The same with the machine's vectors (AVX2: 8 lanes; SSE, NEON: 4), for a pixel's last few channels (LeNet's 6
// of 8) AVX2's masked loads, and whole-vector stores where the lanes past the pixel's are written again later by
// the same task (`room`: the floats from the pixel's first to the end of what the task writes in order): AVX2's
// masked stores are slow, and per channel, as scalar code, the pool was a quarter of LeNet's step on the Zen 3.
// v's first n lanes at p, and its others after them if `room` (floats from p) holds a whole vector.
static inline void store_lanes(float* p, vec v, int n, int64_t room) { store(p, v, room >= kLanes ? kLanes : n); }

static void pool_pixel(const float* x, int64_t row, int64_t k, int64_t c, float* y, uint8_t* where,
                       int64_t room) {
  for (int64_t e = 0; e < c; e += kLanes) {
    int n = (int)std::min<int64_t>(kLanes, c - e);
    vec best = load_lanes(x + e, n);
    ivec pos = {};
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        if (i == 0 && j == 0) continue;
        vec v = load_lanes(x + i * row + j * c + e, n);
        ivec take = (v > best) | ((v != v) & (best == best));  // a NaN wins and stays, as in reduce_max
        best = take ? v : best;
        pos = take ? (ivec){} + (int32_t)(i * k + j) : pos;
      }
    store_lanes(y + e, best, n, room - e);
    for (int l = 0; l < n; ++l) where[e + l] = (uint8_t)pos[l];
  }
}

static void unpool_pixel(const float* g, const uint8_t* where, int64_t row, int64_t k, int64_t c, float* dx,
                         int64_t room) {
  for (int64_t e = 0; e < c; e += kLanes) {
    int n = (int)std::min<int64_t>(kLanes, c - e);
    vec gv = load_lanes(g + e, n);
    ivec pos = {};
    for (int l = 0; l < n; ++l) pos[l] = where[e + l];
    // over a pixel's few channels, the taps of a window row in order: each store's spare lanes fall on the next's
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j)
        store_lanes(dx + i * row + j * c + e, pos == (int32_t)(i * k + j) ? gv : (vec){}, n,
                    c < kLanes ? room - j * c : 0);
  }
}
#endif

static ffi::Error MaxPool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::U8> where, int64_t k) {
  auto xd = x.dimensions(), yd = y->dimensions();
  int64_t n = xd[0], h = xd[1], wi = xd[2], c = xd[3], ho = yd[1], wo = yd[2];
  if (k < 1 || k > 15) return ffi::Error::InvalidArgument("max_pool: window must be 1 to 15");
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  uint8_t* wp = where->typed_data();
#ifdef ARCHLAB_POOL_GROUPS
  auto groups = std::make_shared<PoolGroups>(k, c);
  if (groups->pixels) {
    int64_t P = groups->pixels;
    parallel_for(pool, n, num_workers(pool, n), [=](int64_t b, int64_t) {
      for (int64_t r = 0; r < ho; ++r)
        for (int64_t q = 0; q < wo; q += P) {
          int64_t o = ((b * ho + r) * wo + q) * c;
          pool_group(xp + ((b * h + r * k) * wi + q * k) * c, wi * c, k, c, std::min(P, wo - q), *groups, yp + o,
                     wp + o);
        }
    });
    return ffi::Error::Success();
  }
#endif
  parallel_for(pool, n, num_workers(pool, n), [=](int64_t b, int64_t) {
    for (int64_t r = 0; r < ho; ++r)
      for (int64_t q = 0; q < wo; ++q) {
        int64_t o = ((b * ho + r) * wo + q) * c;
        pool_pixel(xp + ((b * h + r * k) * wi + q * k) * c, wi * c, k, c, yp + o, wp + o,
                   ((ho - r) * wo - q) * c);  // to the end of image b's output
      }
  });
  return ffi::Error::Success();
}

static ffi::Error MaxPoolGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> where,
                              ffi::ResultBuffer<ffi::F32> dx, int64_t k) {
  auto dd = dy.dimensions(), xd = dx->dimensions();
  int64_t n = dd[0], ho = dd[1], wo = dd[2], c = dd[3], h = xd[1], wi = xd[2];
  const float* dp = dy.typed_data();
  const uint8_t* wp = where.typed_data();
  float* xp = dx->typed_data();
#ifdef ARCHLAB_POOL_GROUPS
  auto groups = std::make_shared<PoolGroups>(k, c);
#endif
  parallel_for(pool, n, num_workers(pool, n), [=](int64_t b, int64_t) {
    float* xb = xp + b * h * wi * c;
    for (int64_t r = 0; r < ho; ++r) {
#ifdef ARCHLAB_POOL_GROUPS
      if (groups->pixels) {
        for (int64_t q = 0; q < wo; q += groups->pixels) {
          int64_t o = ((b * ho + r) * wo + q) * c;
          unpool_group(dp + o, wp + o, wi * c, k, c, std::min(groups->pixels, wo - q), *groups,
                       xb + (r * k * wi + q * k) * c);
        }
      } else
#endif
      for (int64_t q = 0; q < wo; ++q) {
        int64_t o = ((b * ho + r) * wo + q) * c;
        unpool_pixel(dp + o, wp + o, wi * c, k, c, xb + (r * k * wi + q * k) * c, (wi - q * k) * c);  // row's end
      }
      for (int64_t i = 0; i < k && wo * k < wi; ++i)  // columns no window covers
        std::memset(xb + ((r * k + i) * wi + wo * k) * c, 0, (wi - wo * k) * c * sizeof(float));
    }
    if (ho * k < h) std::memset(xb + ho * k * wi * c, 0, (h - ho * k) * wi * c * sizeof(float));  // and rows
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabMaxPool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabMaxPoolGrad, MaxPoolGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k"));

// The three convolutions' signature: two fp32 operands, one fp32 result, strides and top/left padding.
static auto conv_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("pt")
      .Attr<int64_t>("pl");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabConvForward, ConvForward, conv_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabConvInputGrad, ConvInputGrad, conv_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabConvWeightGrad, ConvWeightGrad, conv_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabDenseWeightGrad, DenseWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The build's vector registers: models/layers.py leaves dense weight gradients of 128 columns and more to XLA's
// dot where there are 16 (AVX2), since wide_block's 6 x 4-vector blocks need 32.
extern "C" int ArchlabVectorRegisters() { return kRegisters; }
