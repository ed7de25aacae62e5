// What archlab's CPU kernels (cpu_kernels.cc, cpu_attention.cc) share: the machine's vector of floats, a masked
// store, and a parallel loop over XLA's intra-op threads.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifdef __AVX__
#include <immintrin.h>
#endif

// The machine's vector of floats, and how many of them the blocks below keep as accumulators: the rest of the
// vector registers hold weights and inputs (a block that does not fit its registers runs 10x slower).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32, kAccumulators = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegisters = 16, kAccumulators = 12;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kRegisters = 32, kAccumulators = 16;  // NEON
#else
constexpr int kLanes = 4, kRegisters = 16, kAccumulators = 12;  // SSE
#endif
typedef float vec __attribute__((vector_size(4 * kLanes), aligned(4)));  // unaligned access

// Pins v to a register where it is: GCC otherwise folds a vector's load into each multiply-add that reads it, one
// load per row of a register block, and on AVX2 (two loads a cycle) the loads, not the multiply-adds, set the pace.
static inline void in_register(vec& v) {
#if defined(__x86_64__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// The sum of v's lanes.
static inline float sum_lanes(vec v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
#endif
}

// A vector of floats on 64-byte boundaries: the kernels' buffers (padded images, packed weights, partial sums,
// transposed keys) are read a cache line at a time, and from a plain std::vector's 16-byte-aligned start every
// 64-byte load spans two lines. Which start malloc gave decided a process's speed: LeNet's conv2 input gradient
// ran 0.21-0.23 ms in some processes and 0.33 ms in others.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
using Floats = std::vector<float, CacheLineAllocator<float>>;

#ifdef __AVX512F__
// The mask of a vector's first n lanes (none for n <= 0, all for n >= 16).
static inline __mmask16 first_lanes(int64_t n) {
  return (__mmask16)(n >= kLanes ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
}
#endif

// Stores the first n lanes of v at p.
static inline void store(float* p, vec v, int n) {
  if (n == kLanes) {
    *(vec*)p = v;
    return;
  }
#ifdef __AVX512F__
  _mm512_mask_storeu_ps(p, first_lanes(n), (__m512)v);
#else
  for (int l = 0; l < n; ++l) p[l] = v[l];
#endif
}

typedef int32_t ivec __attribute__((vector_size(4 * kLanes), aligned(4)));  // vec's lanes as integers

#if defined(__AVX2__) && !defined(__AVX512F__)
static inline __m256i lanes_below(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// The first n (<= kLanes) floats at p, the other lanes zero.
static inline vec load_lanes(const float* p, int n) {
  if (n == kLanes) return *(const vec*)p;
#if defined(__AVX512F__)
  return (vec)_mm512_maskz_loadu_ps(first_lanes(n), p);
#elif defined(__AVX2__)
  return (vec)_mm256_maskload_ps(p, lanes_below(n));
#else
  vec v = {};
  for (int l = 0; l < n; ++l) v[l] = p[l];
  return v;
#endif
}

// e^x for x <= 0 (the softmax's shifted logits, a state space model's dt A): Cephes' expf, a degree-6 polynomial on
// x - n ln 2, times 2^n; x below -87 gives 2^-126 rather than 0.
static inline vec exp_neg(vec x) {
  const vec lo = vec{} - 87.0f;
  x = x < lo ? lo : x;
  vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  return p * (vec)bits;
}

// Runs f(i, slot) for i in [0, count) on the caller and up to workers - 1 of XLA's intra-op threads; slot < workers
// names the participant. Late tasks find no work left; the shared state outlives the call for them.
template <class F>
static void parallel_for(ffi::ThreadPool& pool, int64_t count, int64_t workers, F f) {
  struct State {
    std::atomic<int64_t> next{0}, active{0}, slots{0};
    int64_t count;
    F f;
    State(int64_t c, F fn) : count(c), f(std::move(fn)) {}
    void run() {
      active.fetch_add(1);
      if (next.load() < count) {
        int64_t slot = slots.fetch_add(1);
        for (int64_t i; (i = next.fetch_add(1)) < count;) f(i, slot);
      }
      active.fetch_sub(1);
    }
  };
  auto s = std::make_shared<State>(count, std::move(f));
  for (int64_t t = 1; t < workers; ++t) pool.Schedule([s] { s->run(); });
  s->run();
  while (s->active.load() != 0) std::this_thread::yield();
}

static int64_t num_workers(ffi::ThreadPool& pool, int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>(count, pool.num_threads()));
}
