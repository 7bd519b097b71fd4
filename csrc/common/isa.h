// Explicit SIMD for the CPU kernels, written once over L-lane GCC vector extensions and compiled
// once per instruction set: AVX-512 (L = 16), AVX2 (8) and the baseline (4), each inside its own
// namespace (v16, v8, v4) and `#pragma GCC target` region; cpu_isa() picks one at run time.
//
// Usage, inside the includer's namespace: #define TC_ISA_BODY "the_op_simd.h", then include this
// file. The body is included once per ISA after the lane count L, the vector types vf / vi,
// loadn / storen (masked loads and stores of the first n lanes, touching no memory past them),
// stream (a non-temporal store of a whole vector to an aligned address; stream_fence orders
// such stores before later ones) and the helpers of vec.h. No include guard: each kernel file
// includes it once with its own body.
#ifndef TC_ISA_BODY
#error "define TC_ISA_BODY (the header compiled once per instruction set) before including isa.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef TC_INLINE
#define TC_INLINE inline __attribute__((always_inline))
#endif

namespace v4 {  // the x86-64 baseline (SSE2), and any other architecture
constexpr int L = 4;
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
TC_INLINE vf loadn(const float* p, int n) {
  vf r{};
  for (int l = 0; l < n; ++l) r[l] = p[l];
  return r;
}
TC_INLINE void storen(float* p, vf v, int n) {
  for (int l = 0; l < n; ++l) p[l] = v[l];
}
TC_INLINE vf vfma(vf a, vf b, vf c) { return a * b + c; }
TC_INLINE void stream(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
TC_INLINE void stream_fence() {}
#include "vec.h"
#include TC_ISA_BODY
}  // namespace v4
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TC_HAVE_X86_ISAS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace v8 {
constexpr int L = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
TC_INLINE __m256i lanes_below(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
TC_INLINE vf loadn(const float* p, int n) { return (vf)_mm256_maskload_ps(p, lanes_below(n)); }
TC_INLINE void storen(float* p, vf v, int n) { _mm256_maskstore_ps(p, lanes_below(n), (__m256)v); }
TC_INLINE vf vfma(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
TC_INLINE void stream(float* p, vf v) { _mm256_stream_ps(p, (__m256)v); }
TC_INLINE void stream_fence() { _mm_sfence(); }
#include "vec.h"
#include TC_ISA_BODY
}  // namespace v8
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace v16 {
constexpr int L = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
TC_INLINE __mmask16 lanes_below(int n) { return static_cast<__mmask16>((1u << n) - 1); }
TC_INLINE vf loadn(const float* p, int n) { return (vf)_mm512_maskz_loadu_ps(lanes_below(n), p); }
TC_INLINE void storen(float* p, vf v, int n) { _mm512_mask_storeu_ps(p, lanes_below(n), (__m512)v); }
TC_INLINE vf vfma(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
TC_INLINE void stream(float* p, vf v) { _mm512_stream_ps(p, (__m512)v); }
TC_INLINE void stream_fence() { _mm_sfence(); }
#include "vec.h"
#include TC_ISA_BODY
}  // namespace v16
#pragma GCC pop_options
#endif

// The widest instruction set this CPU (and OS) supports, capped by TCLOSS_CPU_ISA=base|avx2|avx512
// (tests run every variant on one machine with it).
enum class Isa { kBase, kAvx2, kAvx512 };
inline Isa cpu_isa() {
#ifdef TC_HAVE_X86_ISAS
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kBase;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      best = Isa::kAvx512;
    const char* cap = std::getenv("TCLOSS_CPU_ISA");
    if (cap && std::strcmp(cap, "base") == 0) return Isa::kBase;
    if (cap && std::strcmp(cap, "avx2") == 0) return std::min(best, Isa::kAvx2);
    return best;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

// Calls ns::fn(args...) for the ISA cpu_isa() picked, ns one of v16, v8, v4.
#ifdef TC_HAVE_X86_ISAS
#define TC_ISA_CALL(fn, ...)                                   \
  switch (cpu_isa()) {                                         \
    case Isa::kAvx512: return v16::fn(__VA_ARGS__);            \
    case Isa::kAvx2: return v8::fn(__VA_ARGS__);               \
    default: return v4::fn(__VA_ARGS__);                       \
  }
#else
#define TC_ISA_CALL(fn, ...) return v4::fn(__VA_ARGS__);
#endif
