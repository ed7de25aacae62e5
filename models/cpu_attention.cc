// Fused fp32 attention for XLA's CPU backend, softmax(q k^T / sqrt(Dh)) v with no mask, a causal one or one over
// keys, forward and backward, called through XLA's FFI (models/cpu_kernels.py builds and registers it;
// layers.dot_product_attention picks it). XLA runs attention as batched dot products over (T, S) logits, the
// softmax between them as separate passes, and the causal mask as a select over the full square (or, blocked, as
// einsums over query blocks with pads);
// here one (batch, head) at a time stays in cache: a block of queries' logits, their softmax and their product with
// the values in one pass, no logits above the diagonal computed, and the backward recomputes the probabilities from
// the forward's log-sum-exp (as FlashAttention-2), so that nothing of size T x S is stored between the passes.
//
// Layouts: q (B, T, H, Dh), k and v (B, S, H, Dh), o as q, lse (B, H, T); causal needs T == S. The key mask
// (B or 1, S), 1 = attend, or (1, 0) for none, is a padding mask: masked keys get probability exactly 0, and a batch
// whose keys are all masked attends uniformly to all of them with no gradient to q or k, as XLA's select of a
// constant logit does (layers.einsum_attention).
#include <cmath>
#include <utility>

#include "cpu_kernels.h"

namespace {

// Register blocks of c: R rows by NC vectors, beside NC vectors of b and a broadcast of a. With 32 registers 6 x 4
// (24 multiply-adds for 10 loads); with AVX2's 16, 4 x 3 (12 for 7, where 2 x 4 did 8 for 6), a row's last
// vectors as 6 x 2 or 8 x 1 blocks.
constexpr int kCols = kRegisters >= 32 ? 4 : 3;
constexpr int rows_for(int nc) { return kRegisters >= 32 ? 6 : nc >= 3 ? 4 : nc == 2 ? 6 : 8; }
constexpr int kMaxRows = rows_for(1);                    // the tallest block: dispatch's bound
constexpr int64_t kQueryBlock = 64;                      // queries whose logits are held at once

int64_t widen(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// c[r, 0:kLanes*NC] (= or +=) sum over d in [lo, hi) of a[r*ar + d*ad] * b[d*ldb, 0:kLanes*NC], for r < R: R x NC
// accumulators in registers, each b vector loaded once for R rows.
template <int R, int NC>
void block(const float* a, int64_t ar, int64_t ad, const float* b, int64_t ldb, int64_t lo, int64_t hi, float* c,
           int64_t ldc, bool add) {
  vec acc[R][NC] = {};
  for (int64_t d = lo; d < hi; ++d) {
    vec bv[NC];
    for (int m = 0; m < NC; ++m) {
      bv[m] = *(const vec*)(b + d * ldb + kLanes * m);
      in_register(bv[m]);
    }
    for (int r = 0; r < R; ++r) {
      float av = a[r * ar + d * ad];
      for (int m = 0; m < NC; ++m) acc[r][m] += av * bv[m];
    }
  }
#pragma GCC unroll 8  // acc from registers, not from a stack copy zeroed by memset (cpu_kernels.cc's forward_block)
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < NC; ++m) {
      vec* p = (vec*)(c + r * ldc + kLanes * m);
      *p = add ? *p + acc[r][m] : acc[r][m];
    }
}

template <int R>
void block_cols(int nc, const float* a, int64_t ar, int64_t ad, const float* b, int64_t ldb, int64_t lo, int64_t hi,
                float* c, int64_t ldc, bool add) {
  switch (nc) {
    case 1: return block<R, 1>(a, ar, ad, b, ldb, lo, hi, c, ldc, add);
    case 2: return block<R, 2>(a, ar, ad, b, ldb, lo, hi, c, ldc, add);
    case 3: return block<R, 3>(a, ar, ad, b, ldb, lo, hi, c, ldc, add);
    default: return block<R, kCols>(a, ar, ad, b, ldb, lo, hi, c, ldc, add);
  }
}

template <int... Rs>
void dispatch(std::integer_sequence<int, Rs...>, int nr, int nc, const float* a, int64_t ar, int64_t ad,
              const float* b, int64_t ldb, int64_t lo, int64_t hi, float* c, int64_t ldc, bool add) {
  ((nr == Rs + 1 ? block_cols<Rs + 1>(nc, a, ar, ad, b, ldb, lo, hi, c, ldc, add) : void()), ...);
}

// Which entries of a product a causal mask leaves: rows are queries and columns keys (kColumns: the logits q k^T,
// columns past a row's diagonal skipped a block at a time), the contraction runs over keys (kKeys: p v and ds k,
// stopping at the block's last diagonal key), or rows are keys and the contraction runs over queries (kQueries:
// ds^T q and p^T do, starting at the block's first diagonal query). `diag` is the first row's query index minus
// the first key's.
enum Causal { kNone, kColumns, kKeys, kQueries };

// c (rows x cols, cols a multiple of kLanes) (= or +=) a b, a's (row, d) at a[row*ar + d*ad], b rows of ldb, d < n.
void matmul(const float* a, int64_t ar, int64_t ad, int64_t rows, const float* b, int64_t ldb, int64_t cols,
            int64_t n, float* c, int64_t ldc, bool add, Causal causal = kNone, int64_t diag = 0) {
  for (int64_t c0 = 0, tile; c0 < cols; c0 += kLanes * tile) {
    const int64_t left = (cols - c0) / kLanes;  // 4 vectors left on AVX2 as 2 + 2, not 3 + 1
    tile = kRegisters >= 32 || left != 4 ? std::min<int64_t>(kCols, left) : 2;
    const int tile_rows = rows_for((int)tile);
    for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
      int nr = (int)std::min<int64_t>(tile_rows, rows - r0), nc = (int)tile;
      int64_t lo = 0, hi = n;
      if (causal == kColumns) {  // the vectors up to the block's last diagonal key
        if (c0 > diag + r0 + nr - 1) continue;
        nc = (int)std::min<int64_t>(nc, (diag + r0 + nr - 1 - c0) / kLanes + 1);
      }
      if (causal == kKeys) hi = std::min(n, diag + r0 + nr);
      if (causal == kQueries) lo = std::max<int64_t>(0, r0 - diag);
      if (lo >= hi) {  // nothing but masked entries: c's block is zero
        if (!add)
          for (int r = 0; r < nr; ++r) std::memset(c + (r0 + r) * ldc + c0, 0, kLanes * nc * sizeof(float));
        continue;
      }
      dispatch(std::make_integer_sequence<int, kMaxRows>(), nr, nc, a + r0 * ar, ar, ad, b + c0, ldb, lo, hi,
               c + r0 * ldc + c0, ldc, add);
    }
  }
}

vec iota() {
  vec v;
  for (int l = 0; l < kLanes; ++l) v[l] = (float)l;
  return v;
}

// p[0:width] = e^(s * scale - shift) for the first n logits, 0 after; returns their sum.
float exp_row(float* p, const float* s, int64_t n, int64_t width, float scale, float shift) {
  vec sum = {}, zero = {}, lane = iota();
  for (int64_t j = 0; j < width; j += kLanes) {
    vec e = exp_neg(*(const vec*)(s + j) * scale - shift);
    e = lane + (float)j < (float)n ? e : zero;
    *(vec*)(p + j) = e;
    sum += e;
  }
  return sum_lanes(sum);
}

float max_row(const float* s, int64_t n) {
  vec m = vec{} - INFINITY, lane = iota();
  for (int64_t j = 0; j < n; j += kLanes) {
    vec x = *(const vec*)(s + j);
    m = (lane + (float)j < (float)n) & (x > m) ? x : m;
  }
  float best = m[0];
  for (int l = 1; l < kLanes; ++l) best = std::max(best, m[l]);
  return best;
}

#ifdef __AVX512F__
// Transposes a 16 x 16 tile in registers: pairs of rows interleaved by 32 and then 64 bits, which leaves each
// 128-bit lane holding one column of four rows; the lanes are then exchanged in two rounds of 128-bit shuffles.
void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int g = 0; g < 16; g += 4) {  // r[g + c], lane k: column 4k + c of rows g..g+3
    r[g] = lo(t[g], t[g + 2]);
    r[g + 1] = hi(t[g], t[g + 2]);
    r[g + 2] = lo(t[g + 1], t[g + 3]);
    r[g + 3] = hi(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44), v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#elif defined(__AVX__)
// The same for an 8 x 8 tile: pairs of rows interleaved by 32 bits, then 64, which leaves each 128-bit half holding
// four rows of one column; the halves are then exchanged.
void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {  // u[g + c]: column c of rows g..g+3, and column 4 + c in the upper half
    u[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}
#endif

// One (batch, head)'s keys or values, transposed into dst (Dh x sp), zero past the s-th key: kLanes keys at a
// time, whose rows stay in L1 while their columns are gathered (a column at a time over all keys: the forward
// 1.1x slower); with AVX-512, 16 x 16 tiles transposed in registers (the forward 1.05x, the backward 1.08x faster),
// with AVX2 8 x 8 ones.
void transpose(const float* x, int64_t ld, int64_t s, int64_t sp, int64_t dh, float* dst) {
  for (int64_t j0 = 0; j0 < sp; j0 += kLanes) {
    const int n = (int)std::min<int64_t>(kLanes, s - j0);
#ifdef __AVX512F__
    for (int64_t d0 = 0; d0 < dh; d0 += kLanes) {
      __m512 r[16];
      for (int l = 0; l < 16; ++l) r[l] = l < n ? _mm512_loadu_ps(x + (j0 + l) * ld + d0) : _mm512_setzero_ps();
      transpose16(r);
      for (int m = 0; m < 16; ++m) _mm512_storeu_ps(dst + (d0 + m) * sp + j0, r[m]);
    }
#elif defined(__AVX__)
    for (int64_t d0 = 0; d0 < dh; d0 += kLanes) {
      __m256 r[8];
      for (int l = 0; l < 8; ++l) r[l] = l < n ? _mm256_loadu_ps(x + (j0 + l) * ld + d0) : _mm256_setzero_ps();
      transpose8(r);
      for (int m = 0; m < 8; ++m) _mm256_storeu_ps(dst + (d0 + m) * sp + j0, r[m]);
    }
#else
    for (int64_t d = 0; d < dh; ++d) {
      vec column = {};
      for (int l = 0; l < n; ++l) column[l] = x[(j0 + l) * ld + d];
      *(vec*)(dst + d * sp + j0) = column;
    }
#endif
  }
}

struct Shape {
  int64_t b, t, s, h, dh;
  bool causal;
  int64_t ld() const { return h * dh; }  // a row's stride in (B, T, H, Dh)
  float scale() const { return 1.0f / std::sqrt((float)dh); }
  // Where (batch, head) number `task` starts in q (B, T, H, Dh) and in k (B, S, H, Dh).
  int64_t query_offset(int64_t task) const { return ((task / h) * t * h + task % h) * dh; }
  int64_t key_offset(int64_t task) const { return ((task / h) * s * h + task % h) * dh; }
  int64_t keys(int64_t i0, int64_t rows) const { return causal ? std::min(i0 + rows, s) : s; }
  int64_t visible(int64_t i) const { return causal ? std::min(i + 1, s) : s; }
};

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, bool causal) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return {qd[0], qd[1], kd[1], qd[2], qd[3], causal};
}

ffi::Error check(const Shape& x) {
  if (x.dh % kLanes) return ffi::Error::InvalidArgument("attention: the head size must be a multiple of the vector");
  if (x.causal && x.t != x.s) return ffi::Error::InvalidArgument("attention: causal needs as many keys as queries");
  return ffi::Error::Success();
}

// A batch's key mask: its row, or null where every key counts; `blank` where it masks them all.
struct KeyMask {
  const float* row = nullptr;
  bool blank = false;
};

KeyMask key_mask(const ffi::Buffer<ffi::F32>& mask, const Shape& x, int64_t task) {
  auto md = mask.dimensions();
  if (md[1] == 0) return {};
  const float* row = mask.typed_data() + (md[0] == 1 ? 0 : task / x.h) * x.s;
  bool any = false;
  for (int64_t j = 0; j < x.s && !any; ++j) any = row[j] != 0.0f;
  return {row, !any};
}

// Before the softmax: a masked key's logit to -inf (its e^x then ~0, set to exactly 0 by `drop_masked`); a blank
// batch's logits all to 0 (uniform probabilities).
void mask_logits(float* row, const KeyMask& m, int64_t n) {
  if (m.blank) std::fill(row, row + n, 0.0f);
  else if (m.row)
    for (int64_t j = 0; j < n; ++j)
      if (m.row[j] == 0.0f) row[j] = -INFINITY;
}

void drop_masked(float* p, const KeyMask& m, int64_t n) {
  if (m.row && !m.blank)
    for (int64_t j = 0; j < n; ++j)
      if (m.row[j] == 0.0f) p[j] = 0.0f;
}

ffi::Error check_mask(const ffi::Buffer<ffi::F32>& mask, const Shape& x) {
  auto md = mask.dimensions();
  if (md.size() != 2 || (md[1] != 0 && (md[1] != x.s || (md[0] != 1 && md[0] != x.b))))
    return ffi::Error::InvalidArgument("attention: the key mask must be (B or 1, S) or (1, 0)");
  return ffi::Error::Success();
}

struct Scratch {
  Floats kt, vt, s, dp, inverse_sums;  // inverse_sums: the forward's 1 / sum of p per query
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse,
                   int64_t causal) {
  Shape x = shape_of(q, k, causal);
  if (auto err = check(x); err.failure()) return err;
  if (auto err = check_mask(mask, x); err.failure()) return err;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  const int64_t ld = x.ld(), sp = widen(x.s), tasks = x.b * x.h;
  const float scale = x.scale();
  parallel_for(pool, tasks, num_workers(pool, tasks), [=](int64_t task, int64_t) {
    thread_local Scratch w;
    w.kt.resize(x.dh * sp);
    w.s.resize(kQueryBlock * sp);
    w.inverse_sums.resize(kQueryBlock);
    const int64_t qoff = x.query_offset(task), koff = x.key_offset(task);
    const KeyMask m = key_mask(mask, x, task);
    const float *qb = qp + qoff, *vb = vp + koff;
    float *ob = op + qoff, *lb = lp + task * x.t;
    transpose(kp + koff, ld, x.s, sp, x.dh, w.kt.data());
    for (int64_t i0 = 0; i0 < x.t; i0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, x.t - i0), keys = x.keys(i0, rows), width = widen(keys);
      float* s = w.s.data();
      matmul(qb + i0 * ld, ld, 1, rows, w.kt.data(), sp, width, x.dh, s, sp, false, x.causal ? kColumns : kNone, i0);
      for (int64_t r = 0; r < rows; ++r) {  // p unnormalised: o's rows are divided by their sums below
        float* row = s + r * sp;
        const int64_t n = x.visible(i0 + r);
        mask_logits(row, m, n);
        const float top = max_row(row, n) * scale, l = exp_row(row, row, n, width, scale, top);
        drop_masked(row, m, n);
        w.inverse_sums[r] = 1.0f / l;
        lb[i0 + r] = top + std::log(l);
      }
      float* out = ob + i0 * ld;
      matmul(s, sp, 1, rows, vb, ld, x.dh, keys, out, ld, false, x.causal ? kKeys : kNone, i0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < x.dh; d += kLanes) *(vec*)(out + r * ld + d) *= w.inverse_sums[r];
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, int64_t causal) {
  Shape x = shape_of(q, k, causal);
  if (auto err = check(x); err.failure()) return err;
  if (auto err = check_mask(mask, x); err.failure()) return err;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = o.typed_data();
  const float *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const int64_t ld = x.ld(), sp = widen(x.s), tasks = x.b * x.h;
  const float scale = x.scale();
  parallel_for(pool, tasks, num_workers(pool, tasks), [=](int64_t task, int64_t) {
    thread_local Scratch w;
    w.kt.resize(x.dh * sp);
    w.vt.resize(x.dh * sp);
    w.s.resize(kQueryBlock * sp);
    w.dp.resize(kQueryBlock * sp);
    const int64_t qoff = x.query_offset(task), koff = x.key_offset(task);
    const KeyMask m = key_mask(mask, x, task);
    const float *qb = qp + qoff, *kb = kp + koff, *ob = op + qoff, *gb = gp + qoff, *lb = lp + task * x.t;
    float *dqb = dqp + qoff, *dkb = dkp + koff, *dvb = dvp + koff;
    transpose(kb, ld, x.s, sp, x.dh, w.kt.data());
    transpose(vp + koff, ld, x.s, sp, x.dh, w.vt.data());
    for (int64_t j = 0; j < x.s; ++j) {
      std::memset(dkb + j * ld, 0, x.dh * sizeof(float));
      std::memset(dvb + j * ld, 0, x.dh * sizeof(float));
    }
    for (int64_t i0 = 0; i0 < x.t; i0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, x.t - i0), keys = x.keys(i0, rows), width = widen(keys);
      float *s = w.s.data(), *dp = w.dp.data();
      const Causal columns = x.causal ? kColumns : kNone;
      matmul(qb + i0 * ld, ld, 1, rows, w.kt.data(), sp, width, x.dh, s, sp, false, columns, i0);
      matmul(gb + i0 * ld, ld, 1, rows, w.vt.data(), sp, width, x.dh, dp, sp, false, columns, i0);
      for (int64_t r = 0; r < rows; ++r) {  // p from the forward's log-sum-exp; ds = p (dp - rowsum(do o)) scale
        const int64_t i = i0 + r, n = x.visible(i);
        float* row = s + r * sp;
        mask_logits(row, m, n);
        exp_row(row, row, n, width, scale, lb[i]);
        drop_masked(row, m, n);
        vec products = {};
        for (int64_t d = 0; d < x.dh; d += kLanes)
          products += *(const vec*)(gb + i * ld + d) * *(const vec*)(ob + i * ld + d);
        const float delta = sum_lanes(products);
        float* drow = dp + r * sp;
        for (int64_t j = 0; j < n; ++j) drow[j] = row[j] * (drow[j] - delta) * scale;
        std::fill(m.blank ? drow : drow + n, drow + width, 0.0f);  // a blank batch's constant logits: no ds
      }
      matmul(dp, sp, 1, rows, kb, ld, x.dh, keys, dqb + i0 * ld, ld, false, x.causal ? kKeys : kNone, i0);
      const Causal queries = x.causal ? kQueries : kNone;
      matmul(dp, 1, sp, keys, qb + i0 * ld, ld, x.dh, rows, dkb, ld, true, queries, i0);
      matmul(s, 1, sp, keys, gb + i0 * ld, ld, x.dh, rows, dvb, ld, true, queries, i0);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabAttention, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabAttentionGrad, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("causal"));
