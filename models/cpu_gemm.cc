// A dense layer's products through a BLAS's sgemm (Intel's MKL where it is installed: models/cpu_kernels.py finds
// it and hands its cblas_sgemm here), one call per thread on a share of the output's rows or columns, the BLAS
// itself single-threaded so that no second thread pool spins beside XLA's on the same cores.
#include "cpu_kernels.h"

typedef void (*Sgemm)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc);
static Sgemm sgemm = nullptr;

extern "C" void ArchlabSetSgemm(void* f) { sgemm = reinterpret_cast<Sgemm>(f); }

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// out (M, N) = op(a) op(b), op transposing where ta / tb: a is (M, K) or (K, M), b (K, N) or (N, K).
static ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> out, int64_t ta, int64_t tb) {
  if (sgemm == nullptr) return ffi::Error::Internal("gemm: no sgemm set (ArchlabSetSgemm)");
  const int64_t lda = a.dimensions()[1], ldb = b.dimensions()[1];
  const int64_t m = out->dimensions()[0], n = out->dimensions()[1];
  const int64_t k = ta ? a.dimensions()[0] : a.dimensions()[1];
  if (m == 0 || n == 0) return ffi::Error::Success();
  const float *ap = a.typed_data(), *bp = b.typed_data();
  float* cp = out->typed_data();
  if (k == 0) {
    std::fill(cp, cp + m * n, 0.0f);
    return ffi::Error::Success();
  }
  const bool by_rows = m >= n;
  const int64_t span = by_rows ? m : n, workers = num_workers(pool, span / 64);
  parallel_for(pool, workers, workers, [=](int64_t w, int64_t) {
    int64_t s0 = w * span / workers, s1 = (w + 1) * span / workers;
    if (by_rows)
      sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, s1 - s0, n, k, 1.0f,
            ta ? ap + s0 : ap + s0 * lda, lda, bp, ldb, 0.0f, cp + s0 * n, n);
    else
      sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, s1 - s0, k, 1.0f, ap, lda,
            tb ? bp + s0 * ldb : bp + s0, ldb, 0.0f, cp + s0, n);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArchlabGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb"));
