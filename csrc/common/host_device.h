// Shared by the C++ CPU kernels (<op>/<op>_cpu.cpp) and the CUDA kernels (<op>/<op>_cuda.cu): plain C++ that
// both compilers accept, so the CPU tests exercise the very math the GPU runs.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE_INLINE inline
#endif

namespace tcloss {

// Unroll hint for the GPU's channel loops (more gathers in flight per thread); the CPU
// compilers decide for themselves.
#if defined(__CUDA_ARCH__)
#define TC_PRAGMA(x) _Pragma(#x)
#define TC_UNROLL(n) TC_PRAGMA(unroll n)
#else
#define TC_UNROLL(n)
#endif

// Float overloads on both compilers (an unqualified exp(float) may resolve to the double C
// function on the host and make the CPU kernel several times slower).
#if defined(__CUDA_ARCH__)
#define TC_MATH(name) \
  template <typename T> __device__ __forceinline__ T m_##name(T x) { return name(x); }
#else
#define TC_MATH(name) \
  template <typename T> inline T m_##name(T x) { return std::name(x); }
#endif
TC_MATH(exp)
TC_MATH(log)
#if defined(__CUDA_ARCH__)
// float exp/log on the GPU: the hardware approximations (2 ulp), well inside the float32
// tolerances; float64 keeps the exact functions above.
template <> __device__ __forceinline__ float m_exp<float>(float x) { return __expf(x); }
template <> __device__ __forceinline__ float m_log<float>(float x) { return __logf(x); }
#endif
TC_MATH(sqrt)
TC_MATH(fabs)
TC_MATH(floor)
#undef TC_MATH

template <typename T>
HOST_DEVICE_INLINE bool is_finite(T v) {
  // isfinite without relying on a fast-math-unsafe builtin: NaN != NaN, inf - inf = NaN.
  return (v - v) == (v - v);
}

// Bilinear taps of one sample point: four corners (nw, ne, sw, se), their weights, whether each
// lies inside the image, and d(weight)/d(px), d(weight)/d(py) (already multiplied by the
// border-clamp gradient, as PyTorch's GridSampler does: clamped coordinates get no gradient).
// index_t: the integer type of plane offsets (int32_t where every plane fits, as on the GPU).
template <typename acc_t, typename index_t = int64_t>
struct BilinearTaps {
  index_t off[4];  // y*W + x of each corner (only meaningful where valid)
  bool valid[4];
  acc_t w[4];
  // d/dpx of the sample = ax[0] (q1 - q0) + ax[1] (q3 - q2), d/dpy = ay[0] (q2 - q0) +
  // ay[1] (q3 - q1), with q = 0 at a corner outside the image (and the border clamp's zero
  // gradient folded in): differences first, so that equal corners give exactly 0 however
  // large they are (a sum of w'_k q_k loses that to rounding, worse under FMA contraction)
  acc_t ax[2];
  acc_t ay[2];
  bool finite;  // false when the sample coordinate is NaN/inf: nothing is read
};

// px, py: sample coordinates in pixels (x + flow_x, y + flow_y). zeros_pad=false is
// grid_sample(align_corners=True, padding_mode="border"); true is padding_mode="zeros".
template <typename acc_t, typename index_t>
HOST_DEVICE_INLINE void bilinear_taps(acc_t px, acc_t py, index_t H, index_t W, bool zeros_pad,
                                      BilinearTaps<acc_t, index_t>& t) {
  t.finite = is_finite(px) && is_finite(py);
  for (int k = 0; k < 4; ++k) {
    t.valid[k] = false;
    t.w[k] = acc_t(0);
    t.off[k] = 0;
  }
  t.ax[0] = t.ax[1] = t.ay[0] = t.ay[1] = acc_t(0);
  if (!t.finite) return;
  acc_t gx = acc_t(1), gy = acc_t(1);
  const acc_t xmax = acc_t(W - 1), ymax = acc_t(H - 1);
  if (!zeros_pad) {
    // Border: clamp the coordinate; on or beyond the border the gradient is zero.
    if (px <= acc_t(0)) { px = acc_t(0); gx = acc_t(0); }
    else if (px >= xmax) { px = xmax; gx = acc_t(0); }
    if (py <= acc_t(0)) { py = acc_t(0); gy = acc_t(0); }
    else if (py >= ymax) { py = ymax; gy = acc_t(0); }
  } else {
    // Far outside: every corner is outside, nothing to read (also keeps floor() in int range).
    if (!(px >= acc_t(-1) && px <= acc_t(W) && py >= acc_t(-1) && py <= acc_t(H))) return;
  }
  const acc_t fx = m_floor(px), fy = m_floor(py);
  // -1 <= fx <= W, -1 <= fy <= H here: the offsets fit index_t
  const index_t x0 = static_cast<index_t>(fx), y0 = static_cast<index_t>(fy);
  const acc_t tx = px - fx, ty = py - fy;
  const index_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const index_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t w[4] = {(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty};
  t.ax[0] = (1 - ty) * gx, t.ax[1] = ty * gx;
  t.ay[0] = (1 - tx) * gy, t.ay[1] = tx * gy;
  for (int k = 0; k < 4; ++k) {
    const bool v = xs[k] >= 0 && xs[k] < W && ys[k] >= 0 && ys[k] < H;
    t.valid[k] = v;
    if (v) {
      t.off[k] = ys[k] * W + xs[k];
      t.w[k] = w[k];
    }
  }
}

}  // namespace tcloss
