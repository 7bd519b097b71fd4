// Vector helpers of the CPU kernels over L lanes (GCC vector extensions), included by
// isa.h once per instruction set, after L, vf, vi, loadn and storen are defined.
#include "exp.h"

TC_INLINE vf splat(float v) { return vf{} + v; }
TC_INLINE vi splati(int32_t v) { return vi{} + v; }
TC_INLINE vf sel(vi m, vf a, vf b) { return m ? a : b; }
TC_INLINE vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }
TC_INLINE vi vfinite(vf v) { return (v - v) == (v - v); }
TC_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }  // b when a is NaN (NaN then shows up in the sum)
TC_INLINE vf vsqrt(vf v) {
  for (int l = 0; l < L; ++l) v[l] = std::sqrt(v[l]);
  return v;
}
// floor for |v| < 2^31 (callers clamp the coordinates into that range first)
TC_INLINE vf vfloor(vf v) {
  const vf t = __builtin_convertvector(__builtin_convertvector(v, vi), vf);
  return t > v ? t - 1.f : t;
}

// exp(x) for x <= 0 (softmax arguments, -p r): 2^n e^r with n = round(x / ln2) (exp.h). NaN
// stays NaN, x < -87.3 gives 0.
TC_INLINE vf vexp_nonpos(vf x) {
  const vi keep = x >= -87.3f;  // false for NaN and -inf
  const vf xc = keep ? x : splat(-87.3f);
  const vf n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  return keep ? exp_reduced<vf, vi>(xc, n) : (x == x ? vf{} : x);  // below -87.3 (-inf too): 0; NaN: NaN
}

// Contiguous loads/stores of m <= L elements (a chunk's last vector may be partial: the lanes
// past m read 0 and are not written).
template <typename S>
TC_INLINE vf load(const S* p, int64_t m) {
  if constexpr (std::is_same_v<S, float>) {
    return loadn(p, static_cast<int>(m));
  } else {
    vf v{};
    for (int64_t l = 0; l < m; ++l) v[l] = static_cast<float>(p[l]);
    return v;
  }
}
template <typename S>
TC_INLINE void store(S* p, vf v, int64_t m) {
  if constexpr (std::is_same_v<S, float>) {
    storen(p, v, static_cast<int>(m));
  } else {
    for (int64_t l = 0; l < m; ++l) p[l] = static_cast<S>(v[l]);
  }
}
// A store of m <= L elements to an output no later pass reads: a whole aligned vector bypasses the
// caches (no read of the line before it is written; call stream_fence before the pass ends).
template <typename S>
TC_INLINE void store_out(S* p, vf v, int64_t m) {
  if constexpr (std::is_same_v<S, float>) {
    if (m == L && reinterpret_cast<uintptr_t>(p) % sizeof(vf) == 0) return stream(p, v);
  }
  store(p, v, m);
}
TC_INLINE vf vget(const float* a, int64_t j) {  // a full vector of an L-aligned scratch array
  vf v;
  std::memcpy(&v, a + j, sizeof(v));
  return v;
}
TC_INLINE vi vgeti(const int32_t* a, int64_t j) {
  vi v;
  std::memcpy(&v, a + j, sizeof(v));
  return v;
}
TC_INLINE void vput(float* a, int64_t j, vf v) { std::memcpy(a + j, &v, sizeof(v)); }
TC_INLINE void vputi(int32_t* a, int64_t j, vi v) { std::memcpy(a + j, &v, sizeof(v)); }

// In-register transpose of an L x L block (r[i][l] -> r[l][i]): log2(L) stages, each swapping
// the off-diagonal h x h blocks of every 2h x 2h block with two-source shuffles.
template <int h>
TC_INLINE void transpose_stage(vf* r) {
  vi lo, hi;
  for (int l = 0; l < L; ++l) {
    lo[l] = (l & h) ? L + l - h : l;
    hi[l] = (l & h) ? L + l : l + h;
  }
  for (int i = 0; i < L; ++i)
    if (!(i & h)) {
      const vf a = r[i], b = r[i + h];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + h] = __builtin_shuffle(a, b, hi);
    }
}
TC_INLINE void transpose(vf* r) {
  if constexpr (L >= 16) transpose_stage<8>(r);
  if constexpr (L >= 8) transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
}

