// The row-vectorised CPU orchestration of the temporal loss (float/half/bfloat16 inputs, float
// math), written once over L-lane vectors (GCC vector extensions) and included by
// cpu/temporal_loss.cpp once per instruction set, each inside its own namespace and
// `#pragma GCC target` region. Before including, the includer defines:
//   L                      lanes (a constant: 16 for AVX-512, 8 for AVX2, 4 for the baseline)
//   vf, vi                 L floats, L int32 (GCC vector extensions)
//   gather(p, idx, valid)  vf of p[idx[l]] where valid[l], else 0
// Formulas: kernels/temporal_loss.h (tl_channel_accumulate, tl_channel_grads) and
// kernels/common.h (bilinear_taps), the per-pixel code the CUDA kernel and the float64 path
// run; here every loop runs along x over a chunk of kTile pixels of one row, channel plane by
// channel plane.

static_assert(kTile % L == 0, "a chunk is a whole number of vectors");

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

// exp(x) for x <= 0 (softmax arguments, -p r): 2^n * p(r), r = x - n ln2, Cephes' degree-6
// polynomial (~1 ulp). NaN stays NaN, x < -87.3 gives 0.
TC_INLINE vf vexp_nonpos(vf x) {
  const vi keep = x >= -87.3f;  // false for NaN and -inf
  const vf xc = keep ? x : splat(-87.3f);
  const vf n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const vf scale = (vf)((__builtin_convertvector(n, vi) + 127) << 23);
  return keep ? y * scale : (x == x ? vf{} : x);  // below -87.3 (-inf too): 0; NaN: NaN
}

// Contiguous loads/stores of m <= L elements (a chunk's last vector may be partial: the lanes
// past m read 0 and are not written).
template <typename S>
TC_INLINE vf load(const S* p, int64_t m) {
  vf v{};
  if (std::is_same_v<S, float> && m == L) std::memcpy(&v, p, sizeof(v));
  else
    for (int64_t l = 0; l < m; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
template <typename S>
TC_INLINE void store(S* p, vf v, int64_t m) {
  if (std::is_same_v<S, float> && m == L) std::memcpy(p, &v, sizeof(v));
  else
    for (int64_t l = 0; l < m; ++l) p[l] = static_cast<S>(v[l]);
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

// Bilinear taps of a chunk (bilinear_taps of kernels/common.h), structure of arrays; an
// invalid corner (outside the image, non-finite flow, a lane past the chunk) has weight 0,
// index 0 and valid 0, and every read through it is masked.
struct Taps {
  alignas(64) int32_t idx[4][kTile];
  alignas(64) int32_t valid[4][kTile];
  alignas(64) float w[4][kTile];
  alignas(64) float dwx[4][kTile];
  alignas(64) float dwy[4][kTile];
  alignas(64) int32_t finite[kTile];
};

TC_INLINE void chunk_taps(const float* fu, const float* fv, int64_t x0, int64_t y, int64_t n, int64_t H, int64_t W,
                          bool zeros_pad, Taps& t) {
  const vf xmax = splat(static_cast<float>(W - 1)), ymax = splat(static_cast<float>(H - 1));
  const vf zero = splat(0.f), one = splat(1.f);
  vf lane;
  for (int l = 0; l < L; ++l) lane[l] = static_cast<float>(l);
  for (int64_t j = 0; j < n; j += L) {
    const int64_t m = std::min<int64_t>(L, n - j);
    vi inlane = __builtin_convertvector(lane, vi) < static_cast<int32_t>(m);
    vf px = splat(static_cast<float>(x0 + j)) + lane + load(fu + j, m);
    vf py = splat(static_cast<float>(y)) + load(fv + j, m);
    const vi fin = vfinite(px) & vfinite(py) & inlane;
    px = sel(fin, px, zero);
    py = sel(fin, py, zero);
    vf gx = one, gy = one;
    vi ok = fin;
    if (!zeros_pad) {  // border: clamp, and no gradient on or beyond the border
      gx = sel((px <= 0.f) | (px >= xmax), zero, one);
      gy = sel((py <= 0.f) | (py >= ymax), zero, one);
      px = sel(px <= 0.f, zero, sel(px >= xmax, xmax, px));
      py = sel(py <= 0.f, zero, sel(py >= ymax, ymax, py));
    } else {  // far outside: nothing is read (also keeps the conversion below in range)
      const vi inside = (px >= -1.f) & (px <= static_cast<float>(W)) & (py >= -1.f) & (py <= static_cast<float>(H));
      ok &= inside;
      px = sel(inside, px, zero);
      py = sel(inside, py, zero);
    }
    const vf flx = vfloor(px), fly = vfloor(py);
    const vi ix = __builtin_convertvector(flx, vi), iy = __builtin_convertvector(fly, vi);
    const vf tx = px - flx, ty = py - fly;
    const vf wk[4] = {(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty};
    const vf dxk[4] = {-(1 - ty), (1 - ty), -ty, ty};
    const vf dyk[4] = {-(1 - tx), -tx, (1 - tx), tx};
    for (int k = 0; k < 4; ++k) {
      const vi xs = ix + (k & 1), ys = iy + (k >> 1);
      const vi v = ok & (xs >= 0) & (xs < static_cast<int32_t>(W)) & (ys >= 0) & (ys < static_cast<int32_t>(H));
      vputi(t.valid[k], j, v);
      vputi(t.idx[k], j, v ? ys * static_cast<int32_t>(W) + xs : splati(0));
      vput(t.w[k], j, sel(v, wk[k], zero));
      vput(t.dwx[k], j, sel(v, dxk[k] * gx, zero));
      vput(t.dwy[k], j, sel(v, dyk[k] * gy, zero));
    }
    vputi(t.finite, j, fin);
  }
}

// The four corners of one plane at vector j of the chunk, and their bilinear blend.
struct Corners {
  vf q[4];
  vf w;
};
TC_INLINE Corners corners(const Taps& t, const float* plane, int64_t j) {
  if (j + 4 * L < kTile) {
    __builtin_prefetch(plane + t.idx[0][j + 4 * L]);
    __builtin_prefetch(plane + t.idx[0][j + 5 * L - 1]);
    __builtin_prefetch(plane + t.idx[3][j + 4 * L]);
    __builtin_prefetch(plane + t.idx[3][j + 5 * L - 1]);
  }
  Corners c;
  c.w = splat(0.f);
  for (int k = 0; k < 4; ++k) {
    c.q[k] = gather(plane, vgeti(t.idx[k], j), vgeti(t.valid[k], j));
    c.w += vget(t.w[k], j) * c.q[k];
  }
  return c;
}

// --- pass 0: q_tk = softmax over channels (or pred_tk as float) ------------------------------

// Channel statistics of a chunk of n pixels, plane by plane (each plane's run is contiguous; the
// per-pixel arrays stay in L1): mo = the max, so = sum_c exp(z_c - max), and, when dst is
// given, dst[c] = exp(z_c - max).
template <typename S>
TC_INLINE void chunk_softmax_sums(const S* src, int64_t C, int64_t HW, int64_t n, float* mo, float* so, float* dst) {
  for (int64_t j = 0; j < n; j += L) vput(mo, j, load(src + j, std::min<int64_t>(L, n - j)));
  for (int64_t c = 1; c < C; ++c)
    for (int64_t j = 0; j < n; j += L) vput(mo, j, vmax(load(src + c * HW + j, std::min<int64_t>(L, n - j)), vget(mo, j)));
  for (int64_t j = 0; j < n; j += L) vput(so, j, splat(0.f));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; j += L) {
      const int64_t m = std::min<int64_t>(L, n - j);
      const vf e = vexp_nonpos(load(src + c * HW + j, m) - vget(mo, j));
      if (dst) store(dst + c * HW + j, e, m);
      vput(so, j, vget(so, j) + e);
    }
}

// 1/sum, or NaN where the max is not finite (kernels/temporal_loss.h: softmax_rinv).
TC_INLINE vf vrinv(vf mx, vf s) { return sel(vfinite(mx), 1.f / s, splat(std::numeric_limits<float>::quiet_NaN())); }

template <typename S>
TC_INLINE void softmax_chunk(const S* src, float* dst, int64_t C, int64_t HW, int64_t n, float* mo, float* so) {
  chunk_softmax_sums(src, C, HW, n, mo, so, dst);
  for (int64_t j = 0; j < n; j += L) vput(so, j, vrinv(vget(mo, j), vget(so, j)));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; j += L) {
      const int64_t m = std::min<int64_t>(L, n - j);
      store(dst + c * HW + j, load(dst + c * HW + j, m) * vget(so, j), m);
    }
}

template <typename S>
TC_INLINE void corner_source_rows(const Ctx<S>& X, const S* ptk, float* q, int64_t r0, int64_t r1) {
  alignas(64) float mo[kTile], so[kTile];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = (r / X.H) * X.C * X.HW + (r % X.H) * X.W;
    if (X.on_prob) {
      for (int64_t x0 = 0; x0 < X.W; x0 += kTile)
        softmax_chunk<S>(ptk + off + x0, q + off + x0, X.C, X.HW, std::min(kTile, X.W - x0), mo, so);
    } else {
      for (int64_t c = 0; c < X.C; ++c)
        for (int64_t j = 0; j < X.W; j += L) {
          const int64_t m = std::min<int64_t>(L, X.W - j);
          store(q + off + c * X.HW + j, load(ptk + off + c * X.HW + j, m), m);
        }
    }
  }
}

// --- pass A: rows ----------------------------------------------------------------------------------

struct RowScratch {
  Taps t;
  alignas(64) float vp[kTile];
  alignas(64) float k2[kTile];
  alignas(64) float m[kTile];
  alignas(64) float rinv[kTile];
  alignas(64) float sumsq[kTile];
  alignas(64) float dt[kTile];
  alignas(64) float gx[kTile];
  alignas(64) float gy[kTile];
  alignas(64) float dk[4][kTile];
};

// V^p of the chunk (mask_weight of kernels/temporal_loss.h).
template <typename S>
TC_INLINE void occlusion_weight(const Ctx<S>& X, int64_t b, int64_t pix0, int64_t n, RowScratch& R) {
  const vf p = splat(X.mask_power);
  for (int64_t j = 0; j < n; j += L) {
    const int64_t m = std::min<int64_t>(L, n - j);
    vf s = splat(0.f);
    for (int64_t ci = 0; ci < X.Ci; ++ci) {
      const float* plane = X.itk + (b * X.Ci + ci) * X.HW;
      const vf d = load(X.it + (b * X.Ci + ci) * X.HW + pix0 + j, m) - corners(R.t, plane, j).w;
      s += X.mask_mode == kSignedSum ? d : (X.mask_mode == kL1 ? vabs(d) : d * d);
    }
    const vf r = X.mask_mode == kSignedSum ? vabs(s) : (X.mask_mode == kL1 ? s : vsqrt(s));
    vput(R.vp, j, X.mask_power == 0.f ? splat(1.f) : vexp_nonpos(-p * r));
  }
}

// Softmax statistics of pred_t over the chunk (channel_softmax_stats of kernels/temporal_loss.h).
template <typename S>
TC_INLINE void pt_stats(const S* p, int64_t C, int64_t HW, int64_t n, float* mo, float* ro) {
  chunk_softmax_sums<S>(p, C, HW, n, mo, ro, nullptr);
  for (int64_t j = 0; j < n; j += L) vput(ro, j, vrinv(vget(mo, j), vget(ro, j)));
}

template <typename S>
TC_INLINE vf q_t(const Ctx<S>& X, const S* zt, int64_t j, int64_t m, const float* mx, const float* rinv) {
  const vf z = load(zt + j, m);
  return X.on_prob ? vexp_nonpos(z - vget(mx, j)) * vget(rinv, j) : z;
}

// The channel loop of a chunk (tl_channel_accumulate along x), plane by plane: each channel's
// run of pred_t is contiguous, and the accumulators stay in L1.
template <typename S, bool kGrads>
TC_INLINE void chunk_accumulate(const Ctx<S>& X, int64_t b, int64_t pix0, int64_t n, RowScratch& R) {
  const Taps& t = R.t;
  const vf zero = splat(0.f);
  for (int64_t j = 0; j < n; j += L) {
    vput(R.sumsq, j, zero);
    if (kGrads) {
      vput(R.dt, j, zero), vput(R.gx, j, zero), vput(R.gy, j, zero);
      for (int k = 0; k < 4; ++k) vput(R.dk[k], j, zero);
    }
  }
  for (int64_t c = 0; c < X.C; ++c) {
    const S* zt = X.pt + (b * X.C + c) * X.HW + pix0;
    const float* plane = X.qsrc + (b * X.C + c) * X.HW;
    for (int64_t j = 0; j < n; j += L) {
      const int64_t m = std::min<int64_t>(L, n - j);
      const vf qt = q_t(X, zt, j, m, R.m, R.rinv);
      const Corners q = corners(t, plane, j);
      const vf diff = qt - q.w;
      vput(R.sumsq, j, vget(R.sumsq, j) + diff * diff);
      if (kGrads) {
        vf wx = zero, wy = zero;
        for (int k = 0; k < 4; ++k) {
          wx += vget(t.dwx[k], j) * q.q[k];
          wy += vget(t.dwy[k], j) * q.q[k];
        }
        const vf dq = vget(R.k2, j) * diff;
        vput(R.dt, j, vget(R.dt, j) + qt * dq);
        for (int k = 0; k < 4; ++k) vput(R.dk[k], j, vget(R.dk[k], j) - q.q[k] * dq);
        vput(R.gx, j, vget(R.gx, j) - dq * wx);
        vput(R.gy, j, vget(R.gy, j) - dq * wy);
      }
    }
  }
}

template <typename S, bool kGrads>
TC_INLINE void pass_a_row(const Ctx<S>& X, int64_t r, RowScratch& R) {
  const int64_t b = r / X.H, y = r % X.H, W = X.W;
  const vf nan = splat(std::numeric_limits<float>::quiet_NaN());
  for (int64_t x0 = 0; x0 < W; x0 += kTile) {
    const int64_t n = std::min(kTile, W - x0), pix0 = y * W + x0, i0 = b * X.HW + pix0;
    chunk_taps(X.flow + (b * 2) * X.HW + pix0, X.flow + (b * 2 + 1) * X.HW + pix0, x0, y, n, X.H, W, X.zeros_pad,
               R.t);
    occlusion_weight(X, b, pix0, n, R);
    if (X.on_prob) pt_stats(X.pt + b * X.C * X.HW + pix0, X.C, X.HW, n, R.m, R.rinv);
    if (kGrads)
      for (int64_t j = 0; j < n; j += L) {
        const int64_t m = std::min<int64_t>(L, n - j);
        const vf g = splat(X.grad_mul) * (!X.grad ? splat(1.f) : X.grad_map ? load(X.grad + i0 + j, m) : splat(X.grad[0]));
        // a non-finite flow gives a NaN loss and no gradient, as in the reference
        vput(R.k2, j, sel(vgeti(R.t.finite, j), 2.f * g * vget(R.vp, j), splat(0.f)));  // dl/d(diff) = 2 g V^p diff
      }
    chunk_accumulate<S, kGrads>(X, b, pix0, n, R);
    for (int64_t j = 0; j < n; j += L) {
      const int64_t m = std::min<int64_t>(L, n - j);
      if (X.loss) store(X.loss + i0 + j, sel(vgeti(R.t.finite, j), vget(R.sumsq, j) * vget(R.vp, j), nan), m);
      if (X.gfl) {
        store(X.gfl + (b * 2) * X.HW + pix0 + j, vget(R.gx, j), m);
        store(X.gfl + (b * 2 + 1) * X.HW + pix0 + j, vget(R.gy, j), m);
      }
      if (kGrads && X.st_m) {
        store(X.st_m + i0 + j, vget(R.m, j), m);
        store(X.st_r + i0 + j, vget(R.rinv, j), m);
        store(X.st_k2 + i0 + j, vget(R.k2, j), m);
        store(X.st_dt + i0 + j, vget(R.dt, j), m);
        for (int k = 0; k < 4; ++k) store(X.st_dk[k] + i0 + j, vget(R.dk[k], j), m);
      }
    }
  }
}

template <typename S>
TC_INLINE void pass_a_rows(const Ctx<S>& X, int64_t lo, int64_t hi, RowScratch& R) {
  for (int64_t r = lo; r < hi; ++r) {
    if (X.grads) pass_a_row<S, true>(X, r, R);
    else pass_a_row<S, false>(X, r, R);
  }
}

// --- pass B: one (batch item, channel) plane -----------------------------------------------------

struct PlaneScratch {
  Taps t;
  alignas(64) float gk[4][kTile];
};

// tl_channel_grads along x for channels [c0, c1) of batch item b (planes[c - c0] is channel c's
// corner source): per row, the taps once, then per channel d pred_t written and the scatter
// into d pred_tk in pixel order (so a plane's result does not depend on how channels are
// grouped into items).
template <typename S>
TC_INLINE void pass_b_planes(const Ctx<S>& X, int64_t b, int64_t c0, int64_t c1, const float* const* planes,
                             PlaneScratch& P) {
  const int64_t W = X.W;
  const Taps& t = P.t;
  for (int64_t y = 0; y < X.H; ++y)
    for (int64_t x0 = 0; x0 < W; x0 += kTile) {
      const int64_t n = std::min(kTile, W - x0), pix0 = y * W + x0, i0 = b * X.HW + pix0;
      chunk_taps(X.flow + (b * 2) * X.HW + pix0, X.flow + (b * 2 + 1) * X.HW + pix0, x0, y, n, X.H, W, X.zeros_pad,
                 P.t);
      for (int64_t c = c0; c < c1; ++c) {
        const S* zt = X.pt + (b * X.C + c) * X.HW + pix0;
        const float* plane = planes[c - c0];
        for (int64_t j = 0; j < n; j += L) {
          const int64_t m = std::min<int64_t>(L, n - j);
          const vf qt = q_t(X, zt, j, m, X.st_m + i0, X.st_r + i0);
          const Corners q = corners(t, plane, j);
          const vf k2 = load(X.st_k2 + i0 + j, m);
          const vf dq = k2 * (qt - q.w);
          // corners of zero weight (outside the image included) and pixels without gradient
          // scatter nothing (an explicit 0, not 0 * a possibly infinite q)
          for (int k = 0; k < 4; ++k) {
            const vf wk = vget(t.w[k], j);
            const vf g = wk * (X.on_prob ? q.q[k] * (-dq - load(X.st_dk[k] + i0 + j, m)) : -dq);
            vput(P.gk[k], j, sel((wk != 0.f) & (k2 != 0.f), g, splat(0.f)));
          }
          if (X.gpt) store(X.gpt + (b * X.C + c) * X.HW + pix0 + j, X.on_prob ? qt * (dq - load(X.st_dt + i0 + j, m)) : dq, m);
        }
        if (X.gptk) {  // branch-free: a corner that scatters nothing adds +0 (to element 0)
          float* g = X.gptk + (b * X.C + c) * X.HW;
          for (int64_t j = 0; j < n; ++j)
            for (int k = 0; k < 4; ++k) g[t.idx[k][j]] += P.gk[k][j];
        }
      }
    }
}

// --- the three passes ----------------------------------------------------------------------------

template <typename S>
void run(const Ctx<S>& X, const S* ptk) {
  const int64_t rows = X.B * X.H;
  if (X.q_out)
    parallel_items(rows, 8, [&] { return [&](int64_t lo, int64_t hi) { corner_source_rows<S>(X, ptk, X.q_out, lo, hi); }; });
  parallel_items(rows, 4, [&] {
    return [&, R = std::make_unique<RowScratch>()](int64_t lo, int64_t hi) { pass_a_rows<S>(X, lo, hi, *R); };
  });
  if (!X.st_m) return;
  // Pass B items: (batch item, group of G channels), G chosen so there are a few items per
  // thread. When d pred_tk holds the corner source, a group's planes are copied out before
  // they are zeroed and scattered into: at most ~4 MiB of copies per thread.
  const int64_t per_b = std::max<int64_t>(1, std::min<int64_t>(X.C, (4 * at::get_num_threads() + X.B - 1) / X.B));
  int64_t G = (X.C + per_b - 1) / per_b;
  const bool aliased = X.gptk && X.gptk == X.qsrc;
  if (aliased) G = std::max<int64_t>(1, std::min<int64_t>(G, (int64_t(1) << 20) / std::max<int64_t>(X.HW, 1)));
  const int64_t groups = (X.C + G - 1) / G;
  parallel_items(X.B * groups, 1, [&] {
    return [&, P = std::make_unique<PlaneScratch>(), copy = std::vector<float>(aliased ? G * X.HW : 0),
            planes = std::vector<const float*>(G)](int64_t lo, int64_t hi) mutable {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t b = item / groups, c0 = (item % groups) * G, c1 = std::min(X.C, c0 + G);
        for (int64_t c = c0; c < c1; ++c) {
          const float* plane = X.qsrc + (b * X.C + c) * X.HW;
          if (aliased) {
            float* dst = copy.data() + (c - c0) * X.HW;
            std::memcpy(dst, plane, X.HW * sizeof(float));
            std::memset(X.gptk + (b * X.C + c) * X.HW, 0, X.HW * sizeof(float));
            plane = dst;
          }
          planes[c - c0] = plane;
        }
        pass_b_planes<S>(X, b, c0, c1, planes.data(), *P);
      }
    };
  });
}

void run_f32(const Ctx<float>& X, const float* ptk) { run<float>(X, ptk); }
void run_f16(const Ctx<at::Half>& X, const at::Half* ptk) { run<at::Half>(X, ptk); }
void run_bf16(const Ctx<at::BFloat16>& X, const at::BFloat16* ptk) { run<at::BFloat16>(X, ptk); }
