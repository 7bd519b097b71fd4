// The row-vectorised CPU orchestration of the temporal loss (float/half/bfloat16 inputs, float
// math), written once over L-lane vectors and compiled once per instruction set by
// temporal_loss_cpu.cpp through common/isa.h (which provides L, vf, vi, loadn, storen and the
// helpers of common/vec.h).
// Formulas: temporal_loss.h (tl_channel_accumulate, tl_channel_grads) and
// common/host_device.h (bilinear_taps), the per-pixel code the CUDA kernel and the float64 path
// run; here every loop runs along x over a chunk of kTile pixels of one row, channel plane by
// channel plane, except the four-corner fetch, which reads the corner source in a
// pixel-major layout (see Channels).

static_assert(kTile % L == 0, "a chunk is a whole number of vectors");

// The next chunk's rows of `planes` planar planes, prefetched while this one is computed (many
// short strided streams, which the hardware prefetcher picks up late).
template <typename S>
TC_INLINE void prefetch_planes(const S* p, int64_t planes, int64_t HW, int64_t n) {
  for (int64_t c = 0; c < planes; ++c)
    for (int64_t b = 0; b < n * int64_t(sizeof(S)); b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p + c * HW) + b);
}

// Channels [c0, c0 + C) of one batch item's buffer, read in nb = ceil(C/L) blocks of balanced
// width (19 = 10 + 9 at L = 16): pixel p's channels of block g at block(g) + p * pstride(g), one
// vector load per corner and block instead of one gather element per channel, and a scatter
// into a corner one vector add.
//  - pixel-major (stride > 0): pixel p's channel c at q[p * stride + c], so that all channels of
//    a bilinear corner lie in two or three cache lines and the corner at x + 1 follows the one
//    at x. The corner source: img_tk and then q_tk (= softmax_C(pred_tk), or pred_tk as float)
//    per pixel (stride Ci + C); d q_tk where one thread scatters all its channels (stride C).
//  - channel-blocked (stride 0): block g's channels of every pixel contiguous, the blocks one
//    after another (HW pixels each): d q_tk where each thread scatters a block of channels
//    (pass B), so that threads write disjoint cache lines.
struct Channels {
  float* q;
  int64_t stride, c0, C, HW;
  TC_INLINE int64_t blocks() const { return (C + L - 1) / L; }
  TC_INLINE int64_t lo(int64_t g) const { return c0 + g * C / blocks(); }
  TC_INLINE int width(int64_t g) const { return static_cast<int>(lo(g + 1) - lo(g)); }
  TC_INLINE float* block(int64_t g) const { return stride ? q + lo(g) : q + (lo(g) - c0) * HW; }
  TC_INLINE int64_t pstride(int64_t g) const { return stride ? stride : width(g); }
};

// Bilinear taps of a chunk (bilinear_taps of common/host_device.h), structure of arrays: pix, the
// pixel of corner k of pixel j, and oq, where it starts in the corner source (pix * its stride,
// in floats; int32: run_rows takes buffers of fewer than 2^31 floats). An invalid corner
// (outside the image, non-finite flow, a lane past the chunk) has weight 0, reads the pixel of
// zeros past the corner source (never 0 * whatever lies at pixel 0) and is never scattered into
// (pix 0). ax, ay: the flow derivatives' weights of the corner differences (BilinearTaps::ax, ay).
struct Taps {
  alignas(64) int32_t pix[4][kTile];
  alignas(64) int32_t oq[4][kTile];
  alignas(64) float w[4][kTile];
  alignas(64) float ax[2][kTile];
  alignas(64) float ay[2][kTile];
  alignas(64) int32_t finite[kTile];
};

TC_INLINE void chunk_taps(const float* fu, const float* fv, int64_t x0, int64_t y, int64_t n, int64_t H, int64_t W,
                          bool zeros_pad, int32_t sq, Taps& t) {
  const vi pad = splati(static_cast<int32_t>(H * W) * sq);
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
    for (int k = 0; k < 4; ++k) {
      const vi xs = ix + (k & 1), ys = iy + (k >> 1);
      const vi v = ok & (xs >= 0) & (xs < static_cast<int32_t>(W)) & (ys >= 0) & (ys < static_cast<int32_t>(H));
      const vi pix = ys * static_cast<int32_t>(W) + xs;
      vputi(t.pix[k], j, v ? pix : splati(0));
      vputi(t.oq[k], j, v ? pix * sq : pad);
      vput(t.w[k], j, sel(v, wk[k], zero));
    }
    // (0 where the pixel reads nothing: ok is false)
    vput(t.ax[0], j, sel(ok, (1 - ty) * gx, zero)), vput(t.ax[1], j, sel(ok, ty * gx, zero));
    vput(t.ay[0], j, sel(ok, (1 - tx) * gy, zero)), vput(t.ay[1], j, sel(ok, tx * gy, zero));
    vputi(t.finite, j, fin);
  }
}

// The taps of pixels [x0, x0 + kTile) of row y of batch item b.
template <typename S>
TC_INLINE void chunk_taps_at(const Ctx<S>& X, int64_t b, int64_t y, int64_t x0, Taps& t) {
  const int64_t pix0 = y * X.W + x0;
  chunk_taps(X.flow + (b * 2) * X.HW + pix0, X.flow + (b * 2 + 1) * X.HW + pix0, x0, y, std::min(kTile, X.W - x0), X.H,
             X.W, X.zeros_pad, static_cast<int32_t>(X.C + X.Ci), t);
}

// The four corners of pixel j in one block (q: the block's first channel, w channels), with
// those of pixel j + kAhead prefetched (random flows miss the L2 cache).
constexpr int64_t kAhead = 8;
TC_INLINE void fetch_corners(const float* q, int w, const Taps& t, int64_t j, int64_t n, vf c[4]) {
  if (j + kAhead < n)
    for (int k = 0; k < 4; ++k) __builtin_prefetch(q + t.oq[k][j + kAhead]);
  for (int k = 0; k < 4; ++k) c[k] = loadn(q + t.oq[k][j], w);
}
TC_INLINE void prefetch_corners(const float* q, const Taps& t, int64_t n) {
  for (int64_t j = 0; j < std::min(n, kAhead); ++j)
    for (int k = 0; k < 4; ++k) __builtin_prefetch(q + t.oq[k][j]);
}
// Every corner of a chunk, prefetched a whole chunk before its use: a random flow's corners reach
// lines no earlier chunk touched (L3 or DRAM latency, which a few pixels of prefetch distance do
// not hide). A buffer of `stride` floats a pixel (pixel-major, or one block of a channel-blocked
// one; corner k at q + off[k] * scale): corners 0 and 1 (and 2 and 3) are neighbours, 2 * stride
// floats from corner 0 (2).
TC_INLINE void prefetch_chunk(const float* q, int64_t stride, const int32_t (&off)[4][kTile], int64_t scale,
                              int64_t n) {
  const int64_t last = 2 * stride * int64_t(sizeof(float)) - 1;
  for (int64_t j = 0; j < n; ++j)
    for (int k = 0; k < 4; k += 2) {
      const char* p = reinterpret_cast<const char*>(q + off[k][j] * scale);
      for (int64_t b = 0; b < last; b += 64) __builtin_prefetch(p + b);
      __builtin_prefetch(p + last);
    }
}
// The fused multiply-adds are explicit: the scatter's dq, from pass A (fused) or pass B, must have
// the same bits, and the compiler contracts a sum of products differently in different places.
TC_INLINE vf blend(const float* wk, int64_t j, const vf c[4]) {
  return vfma(splat(wk[3 * kTile + j]), c[3],
              vfma(splat(wk[2 * kTile + j]), c[2], vfma(splat(wk[kTile + j]), c[1], wk[j] * c[0])));
}

// The backward's scatter of pixel j: w_k (-dq) added into the four corners of d q_tk (G: block g
// of d pred_tk's buffer, w channels), with those of pixel j + kAhead prefetched. Pixels without
// gradient (k2 = 0) and corners of zero weight (outside the image included; an invalid corner's
// pixel is never used) add nothing: not 0 * a possibly infinite dq.
TC_INLINE void scatter_corners(const Channels& G, int64_t g, int w, const Taps& t, int64_t j, int64_t n, float k2,
                               vf dq) {
  float* const b = G.block(g);
  const int64_t ps = G.pstride(g);
  if (j + kAhead < n)
    for (int k = 0; k < 4; ++k) __builtin_prefetch(b + t.pix[k][j + kAhead] * ps, 1);
  if (k2 == 0.f) return;
  // all loads before the stores: a masked store blocks a later load of the next 64 bytes
  // (corner 1 follows corner 0 in memory) until it retires
  vf v[4] = {};
  for (int k = 0; k < 4; ++k)
    if (t.w[k][j] != 0.f) v[k] = loadn(b + t.pix[k][j] * ps, w);
  for (int k = 0; k < 4; ++k)
    if (t.w[k][j] != 0.f) storen(b + t.pix[k][j] * ps, v[k] - t.w[k][j] * dq, w);
}

// Pixels [j0, j0 + L) of w planar rows (kTile apart) as one vector per pixel, lanes past w 0.
TC_INLINE void pixel_lanes(const float* rows, int w, int64_t j0, vf out[L]) {
  for (int c = 0; c < L; ++c) out[c] = c < w ? vget(rows + c * kTile, j0) : splat(0.f);
  transpose(out);
}

// The fused backward's scatter inside pass A (one thread owns the batch item, so its pixels
// scatter in the order pass B would: the same bits): d q_tk (blocks as Q's), and the chunk's
// planar q_t rows and 2 g V^p.
struct ChunkScatter {
  const Channels* G;
  const float* qt;
  const float* k2;
};

// The warped channels of Q over the chunk, planar: out[c][j] (rows kTile long, c counted from
// Q.c0) = sum_k w_k q_k[c], and with kGrads also the flow derivatives ox = ax_0 (q_1 - q_0) +
// ax_1 (q_3 - q_2) and oy = ay_0 (q_2 - q_0) + ay_1 (q_3 - q_1). Per pixel, one vector load per
// corner and block; per L pixels, one transpose per output.
template <bool kGrads>
TC_INLINE void warp_channels(const Channels& Q, const Taps& t, int64_t n, float* out, float* ox, float* oy,
                             const ChunkScatter* sc = nullptr) {
  vf r[3][L];
  for (int64_t g = 0; g < Q.blocks(); ++g) {
    const int w = Q.width(g);
    const int64_t row = Q.lo(g) - Q.c0;
    const float* src = Q.block(g);
    prefetch_corners(src, t, n);
    for (int64_t j0 = 0; j0 < n; j0 += L) {
      vf qt[L];
      if (sc) pixel_lanes(sc->qt + row * kTile, w, j0, qt);
      for (int l = 0; l < L; ++l) {
        const int64_t j = j0 + l;
        vf q[4];
        fetch_corners(src, w, t, j, n, q);
        r[0][l] = blend(t.w[0], j, q);
        if (kGrads) {
          r[1][l] = t.ax[0][j] * (q[1] - q[0]) + t.ax[1][j] * (q[3] - q[2]);
          r[2][l] = t.ay[0][j] * (q[2] - q[0]) + t.ay[1][j] * (q[3] - q[1]);
        }
        if (sc && j < n) scatter_corners(*sc->G, g, w, t, j, n, sc->k2[j], sc->k2[j] * (qt[l] - r[0][l]));
      }
      float* dst[3] = {out, ox, oy};
      for (int a = 0; a < (kGrads ? 3 : 1); ++a) {
        transpose(r[a]);
        for (int c = 0; c < w; ++c) vput(dst[a] + (row + c) * kTile, j0, r[a][c]);
      }
    }
  }
}

// Planar rows src[c * ss + j] (c < w, j < n) into pixels dst[j * ds + c], L pixels per
// transpose; nothing past a row's n floats is read.
TC_INLINE void rows_to_pixels(const float* src, int64_t ss, int w, int64_t n, float* dst, int64_t ds) {
  for (int64_t j0 = 0; j0 < n; j0 += L) {
    vf r[L];
    const int64_t m = std::min<int64_t>(L, n - j0);
    for (int c = 0; c < L; ++c) r[c] = c < w ? loadn(src + c * ss + j0, static_cast<int>(m)) : splat(0.f);
    transpose(r);
    for (int64_t l = 0; l < m; ++l) storen(dst + (j0 + l) * ds, r[l], w);
  }
}

// --- pass 0: the corner source, pixel-major ------------------------------------------------------

// Channel statistics of a chunk of n pixels, plane by plane (each plane's run is contiguous; the
// per-pixel arrays stay in L1): mo = the max, so = sum_c exp(z_c - max), and, when dst is
// given, dst[c * ds] = exp(z_c - max).
template <typename S>
TC_INLINE void chunk_softmax_sums(const S* src, int64_t C, int64_t HW, int64_t n, float* mo, float* so, float* dst,
                                  int64_t ds) {
  for (int64_t j = 0; j < n; j += L) vput(mo, j, load(src + j, std::min<int64_t>(L, n - j)));
  for (int64_t c = 1; c < C; ++c)
    for (int64_t j = 0; j < n; j += L) vput(mo, j, vmax(load(src + c * HW + j, std::min<int64_t>(L, n - j)), vget(mo, j)));
  for (int64_t j = 0; j < n; j += L) vput(so, j, splat(0.f));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; j += L) {
      const vf e = vexp_nonpos(load(src + c * HW + j, std::min<int64_t>(L, n - j)) - vget(mo, j));
      if (dst) vput(dst + c * ds, j, e);
      vput(so, j, vget(so, j) + e);
    }
}

// 1/sum, or NaN where the max is not finite (temporal_loss.h: softmax_rinv).
TC_INLINE vf vrinv(vf mx, vf s) { return sel(vfinite(mx), 1.f / s, splat(std::numeric_limits<float>::quiet_NaN())); }

// q = softmax over channels of a chunk of n pixels (src planar, stride HW) into scratch rows
// dst[c * kTile + j]; mo, so: kTile floats of scratch.
template <typename S>
TC_INLINE void softmax_chunk(const S* src, float* dst, int64_t C, int64_t HW, int64_t n, float* mo, float* so) {
  chunk_softmax_sums(src, C, HW, n, mo, so, dst, kTile);
  for (int64_t j = 0; j < n; j += L) vput(so, j, vrinv(vget(mo, j), vget(so, j)));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; j += L) vput(dst + c * kTile, j, vget(dst + c * kTile, j) * vget(so, j));
}

// q = softmax_C (on="prob", mo/so then hold the max and 1/sum) or the scores themselves, of a
// chunk of n pixels, into planar scratch rows dst[c * kTile + j].
template <typename S>
TC_INLINE void source_rows(const S* src, bool on_prob, int64_t C, int64_t HW, int64_t n, float* dst, float* mo,
                           float* so) {
  if (on_prob) return softmax_chunk<S>(src, dst, C, HW, n, mo, so);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; j += L) vput(dst + c * kTile, j, load(src + c * HW + j, std::min<int64_t>(L, n - j)));
}

struct SourceScratch {
  alignas(64) float mo[kTile];
  alignas(64) float so[kTile];
  std::vector<float> q;  // Ci + C rows of kTile: img_tk, then q_tk
  SourceScratch(int64_t C, int64_t Ci) : q(static_cast<size_t>((C + Ci) * kTile)) {}
};

// Rows [r0, r1) of batch item ptk (planar) and img_tk into the corner source A (all its channels,
// img_tk's then q_tk's): per chunk, the planar rows in scratch, then per block and L pixels one
// transpose and L stores of w(g) floats.
template <typename S>
TC_INLINE void corner_source_rows(const Ctx<S>& X, const S* ptk, const Channels& A, const float* itk, int64_t r0,
                                  int64_t r1, SourceScratch& Sc) {
  for (int64_t y = r0; y < r1; ++y)
    for (int64_t x0 = 0; x0 < X.W; x0 += kTile) {
      const int64_t n = std::min(kTile, X.W - x0), pix0 = y * X.W + x0;
      prefetch_planes(ptk + pix0 + n, X.C, X.HW, std::min(kTile, X.HW - pix0 - n));
      prefetch_planes(itk + pix0 + n, X.Ci, X.HW, std::min(kTile, X.HW - pix0 - n));
      for (int64_t ci = 0; ci < X.Ci; ++ci) std::memcpy(Sc.q.data() + ci * kTile, itk + ci * X.HW + pix0, n * sizeof(float));
      source_rows<S>(ptk + pix0, X.on_prob, X.C, X.HW, n, Sc.q.data() + X.Ci * kTile, Sc.mo, Sc.so);
      for (int64_t g = 0; g < A.blocks(); ++g)
        rows_to_pixels(Sc.q.data() + A.lo(g) * kTile, kTile, A.width(g), n, A.block(g) + pix0 * A.stride, A.stride);
    }
}

// --- pass A: rows ----------------------------------------------------------------------------------

struct RowScratch {
  Taps tb[2];
  Taps *t = &tb[0], *next = &tb[1];  // this chunk's taps and the next one's
  alignas(64) float vp[kTile];
  alignas(64) float k2[kTile];
  alignas(64) float m[kTile];
  alignas(64) float rinv[kTile];
  alignas(64) float sumsq[kTile];
  alignas(64) float dt[kTile];
  alignas(64) float gx[kTile];
  alignas(64) float gy[kTile];
  // rows of kTile: q_t (C), the warped corner source and its flow derivatives (C, or Ci + C
  // merged: then the warped img_tk comes first), the warped img_tk (Ci, unmerged)
  std::vector<float> qt, warped, wx, wy, img;
  RowScratch(int64_t C, int64_t Ci)
      : qt(C * kTile), warped((C + Ci) * kTile), wx((C + Ci) * kTile), wy((C + Ci) * kTile), img(Ci * kTile) {}
};

// V^p of the chunk (mask_weight of temporal_loss.h), from img_tk warped like the corner source:
// `img` its planar rows (kTile long).
template <typename S>
TC_INLINE void occlusion_weight(const Ctx<S>& X, const float* img, int64_t b, int64_t pix0, int64_t n, RowScratch& R) {
  const vf p = splat(X.mask_power);
  for (int64_t j = 0; j < n; j += L) {
    const int64_t m = std::min<int64_t>(L, n - j);
    vf s = splat(0.f);
    for (int64_t ci = 0; ci < X.Ci; ++ci) {
      const vf d = load(X.it + (b * X.Ci + ci) * X.HW + pix0 + j, m) - vget(img + ci * kTile, j);
      s += X.mask_mode == kSignedSum ? d : (X.mask_mode == kL1 ? vabs(d) : d * d);
    }
    const vf r = X.mask_mode == kSignedSum ? vabs(s) : (X.mask_mode == kL1 ? s : vsqrt(s));
    vput(R.vp, j, X.mask_power == 0.f ? splat(1.f) : vexp_nonpos(-p * r));
  }
}

// The channel loop of a chunk (tl_channel_accumulate along x), plane by plane: each channel's
// run of pred_t is contiguous, and the accumulators stay in L1.
template <typename S, bool kGrads>
TC_INLINE void chunk_accumulate(const Ctx<S>& X, int64_t n, const float* warped, const float* wxs, const float* wys,
                                RowScratch& R) {
  const vf zero = splat(0.f);
  for (int64_t j = 0; j < n; j += L) {
    vput(R.sumsq, j, zero);
    if (kGrads) vput(R.dt, j, zero), vput(R.gx, j, zero), vput(R.gy, j, zero);
  }
  for (int64_t c = 0; c < X.C; ++c) {
    const float *q = R.qt.data() + c * kTile, *wq = warped + c * kTile, *wx = wxs + c * kTile, *wy = wys + c * kTile;
    for (int64_t j = 0; j < n; j += L) {
      const vf qt = vget(q, j);
      const vf diff = qt - vget(wq, j);
      vput(R.sumsq, j, vget(R.sumsq, j) + diff * diff);
      if (kGrads) {
        const vf dq = vget(R.k2, j) * diff;
        vput(R.dt, j, vget(R.dt, j) + qt * dq);
        vput(R.gx, j, vget(R.gx, j) - dq * vget(wx, j));
        vput(R.gy, j, vget(R.gy, j) - dq * vget(wy, j));
      }
    }
  }
}

// Pixels [x0, x0 + kTile) of row y, with the chunk's taps in R.t. Chunks run down kTile-wide
// strips of the image (see run), so that the corners a random flow reaches stay in the L2 cache
// from one chunk to the next. Backward (kGrads): d flow, d pred_t = q_t (dq - <q_t, dq>) (or dq),
// and, given d q_tk (G; fused: this thread owns the batch item), the scatter.
template <typename S, bool kGrads>
TC_INLINE void pass_a_chunk(const Ctx<S>& X, const Channels& Q, const Channels& I, const Channels* G, int64_t b, int64_t y,
                            int64_t x0, RowScratch& R) {
  const int64_t W = X.W;
  const vf nan = splat(std::numeric_limits<float>::quiet_NaN());
  const int64_t n = std::min(kTile, W - x0), pix0 = y * W + x0, i0 = b * X.HW + pix0;
  // merged: Q's blocks hold img_tk too (its rows first), so V^p comes after the warp (no scatter)
  const bool merged = Q.C > X.C;
  const int64_t qrow = merged ? X.Ci * kTile : 0;
  const float* warped = R.warped.data() + qrow;
  const auto weights = [&] {
    occlusion_weight(X, merged ? R.warped.data() : R.img.data(), b, pix0, n, R);
    if (kGrads)
      for (int64_t j = 0; j < n; j += L) {
        const int64_t m = std::min<int64_t>(L, n - j);
        const vf g = splat(X.grad_mul) * (X.grad_map ? load(X.grad + i0 + j, m) : splat(X.grad[0]));
        // a non-finite flow gives a NaN loss and no gradient, as in the reference
        vput(R.k2, j, sel(vgeti(R.t->finite, j), 2.f * g * vget(R.vp, j), splat(0.f)));  // dl/d(diff) = 2 g V^p diff
      }
  };
  if (!merged) {  // the scatter inside the warp needs 2 g V^p first
    warp_channels<false>(I, *R.t, n, R.img.data(), nullptr, nullptr);
    weights();
  }
  if (y + 1 < X.H) {  // the next chunk's rows, and the flow of the one after (its taps come a chunk early)
    prefetch_planes(X.pt + b * X.C * X.HW + pix0 + W, X.C, X.HW, n);
    prefetch_planes(X.it + b * X.Ci * X.HW + pix0 + W, X.Ci, X.HW, n);
    if (y + 2 < X.H) prefetch_planes(X.flow + b * 2 * X.HW + pix0 + 2 * W, 2, X.HW, n);
  }
  source_rows<S>(X.pt + b * X.C * X.HW + pix0, X.on_prob, X.C, X.HW, n, R.qt.data(), R.m, R.rinv);
  const ChunkScatter sc{G, R.qt.data(), R.k2};
  warp_channels<kGrads>(Q, *R.t, n, R.warped.data(), R.wx.data(), R.wy.data(), kGrads && G ? &sc : nullptr);
  if (merged) weights();
  chunk_accumulate<S, kGrads>(X, n, warped, R.wx.data() + qrow, R.wy.data() + qrow, R);
  for (int64_t j = 0; j < n; j += L) {
    const int64_t m = std::min<int64_t>(L, n - j);
    if (X.loss) store(X.loss + i0 + j, sel(vgeti(R.t->finite, j), vget(R.sumsq, j) * vget(R.vp, j), nan), m);
    if (X.gfl) {
      store_out(X.gfl + (b * 2) * X.HW + pix0 + j, vget(R.gx, j), m);
      store_out(X.gfl + (b * 2 + 1) * X.HW + pix0 + j, vget(R.gy, j), m);
    }
    if (kGrads && X.st_m) {
      store(X.st_m + pix0 + j, vget(R.m, j), m);
      store(X.st_r + pix0 + j, vget(R.rinv, j), m);
      store(X.st_k2 + pix0 + j, vget(R.k2, j), m);
    }
  }
  if (kGrads && X.gpt)
    for (int64_t c = 0; c < X.C; ++c) {
      const float *q = R.qt.data() + c * kTile, *wq = warped + c * kTile;
      S* dst = X.gpt + (b * X.C + c) * X.HW + pix0;
      for (int64_t j = 0; j < n; j += L) {
        const vf qt = vget(q, j), dq = vget(R.k2, j) * (qt - vget(wq, j));
        store_out(dst + j, X.on_prob ? qt * (dq - vget(R.dt, j)) : dq, std::min<int64_t>(L, n - j));
      }
    }
}

// q_t of a vector of the chunk from pass A's softmax statistics (on="prob") or the scores.
template <typename S>
TC_INLINE vf q_t(const Ctx<S>& X, const S* zt, int64_t j, int64_t m, const float* mx, const float* rinv) {
  const vf z = load(zt + j, m);
  return X.on_prob ? vexp_nonpos(z - vget(mx, j)) * vget(rinv, j) : z;
}

// --- pass B: one block of channels of one batch item, backward only ----------------------------

struct BlockScratch {
  Taps tb[2];
  Taps *t = &tb[0], *next = &tb[1];  // this chunk's taps and the next one's
  alignas(64) float qt[L][kTile];
};

// The scatter of tl_channel_grads, in the block's channel lanes: q_t (planar, transposed), the
// warped corners, dq, and w_k (-dq) added into the four corners of d q_tk (G, blocks as Q's) in
// pixel order, so the result does not depend on the number of threads.
template <typename S>
TC_INLINE void pass_b_block(const Ctx<S>& X, const Channels& Q, const Channels& G, int64_t b, int64_t g,
                            BlockScratch& B) {
  const int64_t W = X.W, H = X.H, c0 = Q.lo(g) - Q.c0, strips = (W + kTile - 1) / kTile;
  const int w = Q.width(g);
  const float* src = Q.block(g);
  if (strips * H == 0) return;
  chunk_taps_at(X, b, 0, 0, *B.t);
  for (int64_t i = 0; i < strips * H; ++i) {  // strip by strip, as pass A
    const int64_t y = i % H, x0 = i / H * kTile, n = std::min(kTile, W - x0), pix0 = y * W + x0;
    if (i + 1 < strips * H) {  // the next chunk's taps, its corners on their way, and its rows
      const int64_t x1 = (i + 1) / H * kTile, y1 = (i + 1) % H, n1 = std::min(kTile, W - x1), pix1 = y1 * W + x1;
      chunk_taps_at(X, b, y1, x1, *B.next);
      prefetch_chunk(Q.q, Q.stride, B.next->oq, 1, n1);
      prefetch_chunk(G.block(g), G.pstride(g), B.next->pix, G.pstride(g), n1);
      prefetch_planes(X.pt + (b * X.C + c0) * X.HW + pix1, w, X.HW, n1);
      for (const float* st : {X.st_m, X.st_r, X.st_k2}) prefetch_planes(st + pix1, 1, X.HW, n1);
    }
    const Taps& t = *B.t;
    for (int c = 0; c < w; ++c) {
      const S* zt = X.pt + (b * X.C + c0 + c) * X.HW + pix0;
      for (int64_t j = 0; j < n; j += L) vput(B.qt[c], j, q_t(X, zt, j, std::min<int64_t>(L, n - j), X.st_m + pix0, X.st_r + pix0));
    }
    const float* k2 = X.st_k2 + pix0;
    prefetch_corners(src, t, n);
    for (int64_t j0 = 0; j0 < n; j0 += L) {
      vf qt[L];
      pixel_lanes(B.qt[0], w, j0, qt);
      for (int64_t j = j0; j < std::min(n, j0 + L); ++j) {
        vf q[4];
        fetch_corners(src, w, t, j, n, q);
        const vf dq = k2[j] * (qt[j - j0] - blend(t.w[0], j, q));
        scatter_corners(G, g, w, t, j, n, k2[j], dq);
      }
    }
    std::swap(B.t, B.next);
  }
}

// --- pass C: d pred_tk from d q_tk --------------------------------------------------------------

// The pixels [j, j + L) of a pixel-major buffer, or of each block of a channel-blocked one,
// prefetched: pass C reads them a few cache lines at a time per stream, and on the machine
// measured (AMD EPYC VM) the hardware prefetcher did not keep ahead (fwd+bwd 43-46 vs 50-53 ms).
TC_INLINE void prefetch_pixels(const Channels& A, int64_t j, bool write) {
  for (int64_t g = 0; g < (A.stride ? 1 : A.blocks()); ++g) {
    const char* p = reinterpret_cast<const char*>(A.stride ? A.q + j * A.stride : A.block(g) + j * A.pstride(g));
    const int64_t bytes = L * (A.stride ? A.stride : A.pstride(g)) * int64_t(sizeof(float));
    for (int64_t b = 0; b < bytes; b += 64) write ? __builtin_prefetch(p + b, 1) : __builtin_prefetch(p + b);
  }
}
constexpr int64_t kStreamAhead = 4 * L;  // pixels

// In place over Q's channels (its q_tk), pixels [p0, p1): q (G - <q, G>) (the softmax backward,
// on="prob"), or G. Per L pixels, every load before the first store: a masked store blocks a
// later load of its 64 bytes (here the next block of the same pixel) until it retires. sq, sg:
// scratch of blocks() * L * L floats.
TC_INLINE void softmax_backward_pixels(const Channels& Q, const Channels& G, bool on_prob, int64_t p0,
                                       int64_t p1, float* sq, float* sg) {
  const int64_t nb = Q.blocks();
  for (int64_t j0 = p0; j0 < p1; j0 += L) {
    const int64_t m = std::min<int64_t>(L, p1 - j0);
    if (j0 + kStreamAhead + L <= p1) prefetch_pixels(Q, j0 + kStreamAhead, true), prefetch_pixels(G, j0 + kStreamAhead, false);
    vf acc[L];
    for (int l = 0; l < L; ++l) acc[l] = splat(0.f);
    for (int64_t g = 0; g < nb; ++g) {
      const int w = Q.width(g);
      const int64_t gs = G.pstride(g);
      const float *q0 = Q.block(g) + j0 * Q.stride, *g0 = G.block(g) + j0 * gs;
      for (int64_t l = 0; l < m; ++l) {
        const vf q = loadn(q0 + l * Q.stride, w), gq = loadn(g0 + l * gs, w);
        vput(sq, (g * L + l) * L, q), vput(sg, (g * L + l) * L, gq);
        acc[l] += q * gq;
      }
    }
    vf s{};
    if (on_prob) {
      transpose(acc);
      for (int l = 0; l < L; ++l) s += acc[l];
    }
    for (int64_t g = 0; g < nb; ++g) {
      const int w = Q.width(g);
      float* q0 = Q.block(g) + j0 * Q.stride;
      for (int64_t l = 0; l < m; ++l) {
        const vf gq = vget(sg, (g * L + l) * L);
        storen(q0 + l * Q.stride, on_prob ? vget(sq, (g * L + l) * L) * (gq - s[l]) : gq, w);
      }
    }
  }
}

// Pixels [p0, p1) of Q's channels into planar rows of dst (stride HW), L pixels at a time.
TC_INLINE void pixels_to_rows(const Channels& Q, float* dst, int64_t HW, int64_t p0, int64_t p1) {
  for (int64_t j0 = p0; j0 < p1; j0 += L) {
    const int64_t m = std::min<int64_t>(L, p1 - j0);
    if (j0 + kStreamAhead + L <= p1) prefetch_pixels(Q, j0 + kStreamAhead, false);
    for (int64_t g = 0; g < Q.blocks(); ++g) {
      const int w = Q.width(g);
      const float* q0 = Q.block(g) + j0 * Q.stride;
      float* d0 = dst + (Q.lo(g) - Q.c0) * HW + j0;
      vf r[L];
      for (int l = 0; l < L; ++l) r[l] = l < m ? loadn(q0 + l * Q.stride, w) : splat(0.f);
      transpose(r);
      for (int c = 0; c < w; ++c) store_out(d0 + c * HW, r[c], m);
    }
  }
}

// --- the passes, one batch item at a time ---------------------------------------------------------

// Items [0, n) of one pass: by parallel_items, or by the calling thread alone (serial).
// Each worker's non-temporal stores (store_out) are ordered before the pass ends.
template <typename MakeWorker>
TC_INLINE void pass_items(bool serial, int64_t n, int64_t chunk, MakeWorker make) {
  const auto fenced = [&] {
    return [w = make()](int64_t lo, int64_t hi) mutable {
      w(lo, hi);
      stream_fence();
    };
  };
  if (!serial) return parallel_items(n, chunk, fenced);
  if (n > 0) fenced()(0, n);
}

// The passes of batch item b, over its corner source buffer q ((Ci + C)(HW + 1) floats: img_tk
// and q_tk per pixel, then a pixel of zeros that invalid corners read).
// fused (backward): this thread alone runs them, and pass A scatters into d q_tk (no pass B).
template <typename S>
void run_item(const Ctx<S>& X, const S* ptk, int64_t b, float* q, bool fused) {
  const int64_t C = X.C, Ci = X.Ci, H = X.H, HW = X.HW;
  // Without a scatter into d pred_tk, img_tk and q_tk are read in shared blocks (merged: one
  // gather fewer per pixel); with it, the blocks of q_tk alone, matching d q_tk's.
  const bool merged = !X.gptk;
  const Channels A{q, Ci + C, 0, Ci + C, HW}, I{q, Ci + C, 0, Ci, HW};
  const Channels Q = merged ? A : Channels{q, Ci + C, Ci, C, HW};
  // d q_tk accumulates in d pred_tk's (zeroed) buffer, in blocks as Q's (pixel-major, or
  // channel-blocked where pass B's threads scatter a block each); pass C then turns it into
  // d pred_tk over Q (whose source is no longer needed) and transposes that to planar.
  const Channels G{X.gptk ? X.gptk + b * C * HW : nullptr, fused ? C : 0, 0, C, HW};
  const int64_t strips = (X.W + kTile - 1) / kTile;
  const S* ptk_b = ptk + b * C * HW;
  pass_items(fused, H, 8, [&] {
    return [&, Sc = std::make_unique<SourceScratch>(C, Ci)](int64_t lo, int64_t hi) {
      corner_source_rows<S>(X, ptk_b, A, X.itk + b * Ci * HW, lo, hi, *Sc);
    };
  });
  pass_items(fused, strips * H, 8, [&] {
    return [&, R = std::make_unique<RowScratch>(C, Ci)](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t y = i % H, x0 = i / H * kTile;
        if (i == lo) chunk_taps_at(X, b, y, x0, *R->t);
        if (i + 1 < hi) {  // the next chunk's taps, and its corners on their way
          const int64_t x1 = (i + 1) / H * kTile, n1 = std::min(kTile, X.W - x1);
          chunk_taps_at(X, b, (i + 1) % H, x1, *R->next);
          prefetch_chunk(q, A.stride, R->next->oq, 1, n1);
          if (fused && G.q) prefetch_chunk(G.q, G.stride, R->next->pix, G.stride, n1);
        }
        if (X.grads) pass_a_chunk<S, true>(X, Q, I, fused && G.q ? &G : nullptr, b, y, x0, *R);
        else pass_a_chunk<S, false>(X, Q, I, nullptr, b, y, x0, *R);
        std::swap(R->t, R->next);
      }
    };
  });
  if (!X.gptk) return;
  if (!fused)
    parallel_items(Q.blocks(), 1, [&] {
      return [&, S_ = std::make_unique<BlockScratch>()](int64_t lo, int64_t hi) {
        for (int64_t g = lo; g < hi; ++g) pass_b_block<S>(X, Q, G, b, g, *S_);
      };
    });
  const int64_t span = 64 * kTile;
  pass_items(fused, (HW + span - 1) / span, 1, [&] {
    return [&, sc = std::vector<float>(2 * Q.blocks() * L * L)](int64_t lo, int64_t hi) mutable {
      softmax_backward_pixels(Q, G, X.on_prob, lo * span, std::min(HW, hi * span), sc.data(), sc.data() + Q.blocks() * L * L);
    };
  });
  pass_items(fused, (HW + span - 1) / span, 1, [&] {
    return [&](int64_t lo, int64_t hi) { pixels_to_rows(Q, G.q, HW, lo * span, std::min(HW, hi * span)); };
  });
}

// One batch item at a time, each pass in parallel; or, fused, one batch item per thread, each
// with its own corner source buffer.
template <typename S>
void run(const Ctx<S>& X, const S* ptk) {
  if (!X.fused) {
    for (int64_t b = 0; b < X.B; ++b) run_item(X, ptk, b, X.q, false);
    return;
  }
  std::atomic<int64_t> slot{0};  // each worker its own buffer (run_rows allocates one per worker
                                 // parallel_items can make: min(threads, B))
  parallel_items(X.B, 1, [&] {
    return [&, q = X.q + slot.fetch_add(1) * X.q_size](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) run_item(X, ptk, b, q, true);
    };
  });
}

void run_f32(const Ctx<float>& X, const float* ptk) { run<float>(X, ptk); }
void run_f16(const Ctx<at::Half>& X, const at::Half* ptk) { run<at::Half>(X, ptk); }
void run_bf16(const Ctx<at::BFloat16>& X, const at::BFloat16* ptk) { run<at::BFloat16>(X, ptk); }
