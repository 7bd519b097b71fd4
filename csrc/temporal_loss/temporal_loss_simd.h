// The row-vectorised CPU orchestration of the temporal loss (float/half/bfloat16 inputs, float
// math), written once over L-lane vectors and compiled once per instruction set by
// temporal_loss_cpu.cpp through common/isa.h (which provides L, vf, vi, loadn, storen and the
// helpers of common/vec.h).
// Formulas: temporal_loss.h (tl_channel_accumulate, tl_channel_grads) and
// common/host_device.h (bilinear_taps), the per-pixel code the CUDA kernel and the float64 path
// run; here every loop runs along x over a chunk of kTile pixels of one row, channel plane by
// channel plane, except the four-corner fetch, which reads a strip's window of the corner
// source in a pixel-major layout (see Channels and Window).

static_assert(kTile % L == 0, "a chunk is a whole number of vectors");

// The next chunk's rows of `planes` planar planes, prefetched while this one is computed (many
// short strided streams, which the hardware prefetcher picks up late).
template <typename S>
TC_INLINE void prefetch_planes(const S* p, int64_t planes, int64_t HW, int64_t n) {
  for (int64_t c = 0; c < planes; ++c)
    for (int64_t b = 0; b < n * int64_t(sizeof(S)); b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p + c * HW) + b);
}

// Channels [c0, c0 + C) of a pixel-major buffer (pixel p's channel c at q[p * stride + c]),
// read in nb = ceil(C/L) blocks of balanced width (19 = 10 + 9 at L = 16): pixel p's channels of
// block g at block(g) + p * stride, one vector load per corner and block instead of one gather
// element per channel, and a scatter into a corner one vector add. All channels of a bilinear
// corner lie in two or three cache lines, and the corner at x + 1 follows the one at x. The
// corner source: img_tk and then q_tk (= softmax_C(pred_tk), or pred_tk as float) per pixel
// (stride Ci + C); d q_tk: stride C.
struct Channels {
  float* q;
  int64_t stride, c0, C;
  TC_INLINE int64_t blocks() const { return (C + L - 1) / L; }
  TC_INLINE int64_t lo(int64_t g) const { return c0 + g * C / blocks(); }
  TC_INLINE int width(int64_t g) const { return static_cast<int>(lo(g + 1) - lo(g)); }
  TC_INLINE float* block(int64_t g) const { return q + lo(g); }
};

// The part of batch item b's corner source (and of d q_tk) that the strip of columns
// [x0, x0 + n) reaches as it runs down the image: columns [c0, c0 + w) of rows y + lo .. y + hi
// while pass A is at row y (lo <= 0 <= hi; every corner a pixel of the strip reads, found by
// strip_window), held in R rows of w pixels (R = hi - lo + 1, or H if fewer): row r in ring row
// r mod R. Rows enter as the strip moves down and leave (d q_tk: flushed into d pred_tk) once
// no later row reaches them; a pixel of zeros after the R w pixels is what invalid corners read.
struct Window {
  int64_t x0, n, c0, w, lo, hi, R;
  TC_INLINE int64_t pixels() const { return R * w; }
  TC_INLINE int64_t at(int64_t r) const { return r % R * w; }  // the first pixel of row r
};

// Bilinear taps of a chunk (bilinear_taps of common/host_device.h), structure of arrays: pix, the
// window pixel of corner k of pixel j, and oq, where it starts in the corner source (pix * its
// stride, in floats; int32: run_rows takes images of fewer than 2^31 floats). An invalid corner
// (outside the image, non-finite flow, a lane past the chunk) has weight 0, reads the pixel of
// zeros past the window and is never scattered into (pix 0). ax, ay: the flow derivatives'
// weights of the corner differences (BilinearTaps::ax, ay).
struct Taps {
  alignas(64) int32_t pix[4][kTile];
  alignas(64) int32_t oq[4][kTile];
  alignas(64) float w[4][kTile];
  alignas(64) float ax[2][kTile];
  alignas(64) float ay[2][kTile];
  alignas(64) int32_t finite[kTile];
};

// The sample point of pixels [x0 + j, x0 + j + L) of row y (n: the chunk's pixels) as
// bilinear_taps computes it: ix, iy the top-left corner, tx, ty the fractions, gx, gy the
// border's gradient gates, ok where it reads anything, fin where the flow is finite.
struct Point {
  vf tx, ty, gx, gy;
  vi ix, iy, ok, fin;
};
TC_INLINE Point sample_point(const float* fu, const float* fv, int64_t x0, int64_t y, int64_t j, int64_t n,
                             int64_t H, int64_t W, bool zeros_pad) {
  const vf xmax = splat(static_cast<float>(W - 1)), ymax = splat(static_cast<float>(H - 1));
  const vf zero = splat(0.f), one = splat(1.f);
  vf lane;
  for (int l = 0; l < L; ++l) lane[l] = static_cast<float>(l);
  const int64_t m = std::min<int64_t>(L, n - j);
  const vi inlane = __builtin_convertvector(lane, vi) < static_cast<int32_t>(m);
  vf px = splat(static_cast<float>(x0 + j)) + lane + load(fu + j, m);
  vf py = splat(static_cast<float>(y)) + load(fv + j, m);
  Point p;
  p.fin = vfinite(px) & vfinite(py) & inlane;
  px = sel(p.fin, px, zero);
  py = sel(p.fin, py, zero);
  p.gx = one, p.gy = one;
  p.ok = p.fin;
  if (!zeros_pad) {  // border: clamp, and no gradient on or beyond the border
    p.gx = sel((px <= 0.f) | (px >= xmax), zero, one);
    p.gy = sel((py <= 0.f) | (py >= ymax), zero, one);
    px = sel(px <= 0.f, zero, sel(px >= xmax, xmax, px));
    py = sel(py <= 0.f, zero, sel(py >= ymax, ymax, py));
  } else {  // far outside: nothing is read (also keeps the conversion below in range)
    const vi inside = (px >= -1.f) & (px <= static_cast<float>(W)) & (py >= -1.f) & (py <= static_cast<float>(H));
    p.ok &= inside;
    px = sel(inside, px, zero);
    py = sel(inside, py, zero);
  }
  const vf flx = vfloor(px), fly = vfloor(py);
  p.ix = __builtin_convertvector(flx, vi), p.iy = __builtin_convertvector(fly, vi);
  p.tx = px - flx, p.ty = py - fly;
  return p;
}

// The taps of pixels [x0, x0 + n) of row y, their corners in window V.
TC_INLINE void chunk_taps(const float* fu, const float* fv, int64_t x0, int64_t y, int64_t n, int64_t H, int64_t W,
                          bool zeros_pad, const Window& V, int32_t sq, Taps& t) {
  const vi pad = splati(static_cast<int32_t>(V.pixels()) * sq);
  const vf zero = splat(0.f);
  // rows [r0, r0 + R) are in the window, row r0 in ring row s0 (a corner's ring row: ys - r0 + s0,
  // less R past the last)
  const int64_t r0 = std::max<int64_t>(0, y + V.lo), s0 = r0 % V.R;
  for (int64_t j = 0; j < n; j += L) {
    const Point p = sample_point(fu, fv, x0, y, j, n, H, W, zeros_pad);
    const vf wk[4] = {(1 - p.tx) * (1 - p.ty), p.tx * (1 - p.ty), (1 - p.tx) * p.ty, p.tx * p.ty};
    for (int k = 0; k < 4; ++k) {
      const vi xs = p.ix + (k & 1), ys = p.iy + (k >> 1);
      const vi v = p.ok & (xs >= 0) & (xs < static_cast<int32_t>(W)) & (ys >= 0) & (ys < static_cast<int32_t>(H));
      vi ring = ys - static_cast<int32_t>(r0 - s0);
      ring = ring >= static_cast<int32_t>(V.R) ? ring - static_cast<int32_t>(V.R) : ring;
      const vi pix = ring * static_cast<int32_t>(V.w) + xs - static_cast<int32_t>(V.c0);
      vputi(t.pix[k], j, v ? pix : splati(0));
      vputi(t.oq[k], j, v ? pix * sq : pad);
      vput(t.w[k], j, sel(v, wk[k], zero));
    }
    // (0 where the pixel reads nothing: ok is false)
    vput(t.ax[0], j, sel(p.ok, (1 - p.ty) * p.gx, zero)), vput(t.ax[1], j, sel(p.ok, p.ty * p.gx, zero));
    vput(t.ay[0], j, sel(p.ok, (1 - p.tx) * p.gy, zero)), vput(t.ay[1], j, sel(p.ok, p.tx * p.gy, zero));
    vputi(t.finite, j, p.fin);
  }
}

// The taps of pixels [x0, x0 + kTile) of row y of batch item b.
template <typename S>
TC_INLINE void chunk_taps_at(const Ctx<S>& X, int64_t b, int64_t y, int64_t x0, const Window& V, Taps& t) {
  const int64_t pix0 = y * X.W + x0;
  chunk_taps(X.flow + (b * 2) * X.HW + pix0, X.flow + (b * 2 + 1) * X.HW + pix0, x0, y, std::min(kTile, X.W - x0), X.H,
             X.W, X.zeros_pad, V, static_cast<int32_t>(X.C + X.Ci), t);
}

// The window of the strip of columns [x0, x0 + n) of batch item b: every corner its pixels read
// (the same sample points as chunk_taps), and the strip itself.
template <typename S>
Window strip_window(const Ctx<S>& X, int64_t b, int64_t x0, int64_t n) {
  constexpr int32_t kBig = std::numeric_limits<int32_t>::max();
  vi xlo = splati(kBig), xhi = splati(-kBig), ylo = splati(kBig), yhi = splati(-kBig);
  for (int64_t y = 0; y < X.H; ++y) {
    const int64_t pix0 = y * X.W + x0;
    for (int64_t j = 0; j < n; j += L) {
      const Point p = sample_point(X.flow + (b * 2) * X.HW + pix0, X.flow + (b * 2 + 1) * X.HW + pix0, x0, y, j, n,
                                   X.H, X.W, X.zeros_pad);
      const vi dy = p.iy - static_cast<int32_t>(y);
      xlo = (p.ok & (p.ix < xlo)) ? p.ix : xlo, xhi = (p.ok & (p.ix > xhi)) ? p.ix : xhi;
      ylo = (p.ok & (dy < ylo)) ? dy : ylo, yhi = (p.ok & (dy > yhi)) ? dy : yhi;
    }
  }
  int64_t c0 = x0, c1 = x0 + n, lo = 0, hi = 0;  // the strip itself, and its own row
  for (int l = 0; l < L; ++l) {  // corners ix .. ix + 1, iy .. iy + 1, clipped to the image
    if (xlo[l] <= xhi[l]) {
      c0 = std::min<int64_t>(c0, std::max<int64_t>(0, xlo[l]));
      c1 = std::max<int64_t>(c1, std::min<int64_t>(X.W, xhi[l] + 2));
    }
    if (ylo[l] <= yhi[l]) {
      lo = std::min<int64_t>(lo, std::max<int64_t>(-X.H, ylo[l]));
      hi = std::max<int64_t>(hi, std::min<int64_t>(X.H, yhi[l] + 1));
    }
  }
  return Window{x0, n, c0, c1 - c0, lo, hi, std::min(X.H, hi - lo + 1)};
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
// lines no earlier chunk touched (L2 or L3 latency, which a few pixels of prefetch distance do
// not hide). A pixel-major buffer of `stride` floats a pixel (corner k at q + off[k] * scale):
// corners 0 and 1 (and 2 and 3) are neighbours, 2 * stride floats from corner 0 (2).
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
// The fused multiply-adds are explicit: the compiler contracts a sum of products differently in
// different places, and the warped value (so the scatter's dq) must not depend on where.
TC_INLINE vf blend(const float* wk, int64_t j, const vf c[4]) {
  return vfma(splat(wk[3 * kTile + j]), c[3],
              vfma(splat(wk[2 * kTile + j]), c[2], vfma(splat(wk[kTile + j]), c[1], wk[j] * c[0])));
}

// The backward's scatter of pixel j: w_k (-dq) added into the four corners of d q_tk (G: block g
// of the window's, w channels), with those of pixel j + kAhead prefetched. Pixels without
// gradient (k2 = 0) and corners of zero weight (outside the image included; an invalid corner's
// pixel is never used) add nothing: not 0 * a possibly infinite dq.
TC_INLINE void scatter_corners(const Channels& G, int64_t g, int w, const Taps& t, int64_t j, int64_t n, float k2,
                               vf dq) {
  float* const b = G.block(g);
  const int64_t ps = G.stride;
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

// The backward's scatter inside pass A: d q_tk (the window's, blocks as Q's), and the chunk's
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

// --- the corner source's rows, pixel-major ---------------------------------------------------------

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

// Columns [c0, c1) of row y of batch item ptk (planar) and img_tk into the corner source A (all
// its channels, img_tk's then q_tk's) from its pixel p on: per kTile pixels, the planar rows in
// scratch, then per block and L pixels one transpose and L stores of w(g) floats.
template <typename S>
TC_INLINE void source_row(const Ctx<S>& X, const S* ptk, const float* itk, int64_t y, int64_t c0, int64_t c1,
                          const Channels& A, int64_t p, SourceScratch& Sc) {
  if (y + 1 < X.H) {  // the row after, which the strip reads next
    prefetch_planes(ptk + (y + 1) * X.W + c0, X.C, X.HW, c1 - c0);
    prefetch_planes(itk + (y + 1) * X.W + c0, X.Ci, X.HW, c1 - c0);
  }
  for (int64_t x0 = c0; x0 < c1; x0 += kTile) {
    const int64_t n = std::min(kTile, c1 - x0), pix0 = y * X.W + x0;
    for (int64_t ci = 0; ci < X.Ci; ++ci) std::memcpy(Sc.q.data() + ci * kTile, itk + ci * X.HW + pix0, n * sizeof(float));
    source_rows<S>(ptk + pix0, X.on_prob, X.C, X.HW, n, Sc.q.data() + X.Ci * kTile, Sc.mo, Sc.so);
    for (int64_t g = 0; g < A.blocks(); ++g)
      rows_to_pixels(Sc.q.data() + A.lo(g) * kTile, kTile, A.width(g), n, A.block(g) + (p + x0 - c0) * A.stride, A.stride);
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

// Pixels [x0, x0 + kTile) of row y, with the chunk's taps in R.t and its corners in the strip's
// window (Q, I; see run_strip). Backward (kGrads): d flow, d pred_t = q_t (dq - <q_t, dq>) (or
// dq), and, given the window's d q_tk (G), the scatter.
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

// --- leaving rows: d pred_tk from d q_tk ----------------------------------------------------------

// In place over Q's channels (its q_tk), pixels [p0, p1): q (G - <q, G>) (the softmax backward,
// on="prob"), or G. Per L pixels, every load before the first store: a masked store blocks a
// later load of its 64 bytes (here the next block of the same pixel) until it retires. sq, sg:
// scratch of blocks() * L * L floats.
TC_INLINE void softmax_backward_pixels(const Channels& Q, const Channels& G, bool on_prob, int64_t p0,
                                       int64_t p1, float* sq, float* sg) {
  const int64_t nb = Q.blocks();
  for (int64_t j0 = p0; j0 < p1; j0 += L) {
    const int64_t m = std::min<int64_t>(L, p1 - j0);
    vf acc[L];
    for (int l = 0; l < L; ++l) acc[l] = splat(0.f);
    for (int64_t g = 0; g < nb; ++g) {
      const int w = Q.width(g);
      const float *q0 = Q.block(g) + j0 * Q.stride, *g0 = G.block(g) + j0 * G.stride;
      for (int64_t l = 0; l < m; ++l) {
        const vf q = loadn(q0 + l * Q.stride, w), gq = loadn(g0 + l * G.stride, w);
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

// Pixels [p, p + n) of Q's channels into the planar rows of dst (stride HW, n floats each): where
// add[j] is set, added to what an earlier strip wrote there.
TC_INLINE void pixels_to_rows(const Channels& Q, int64_t p, int64_t n, float* dst, int64_t HW, const int32_t* add) {
  for (int64_t j0 = 0; j0 < n; j0 += L) {
    const int64_t m = std::min<int64_t>(L, n - j0);
    const vi a = vgeti(add, j0);
    bool any = false;
    for (int64_t l = 0; l < m; ++l) any |= a[l] != 0;
    for (int64_t g = 0; g < Q.blocks(); ++g) {
      const int w = Q.width(g);
      const float* q0 = Q.block(g) + (p + j0) * Q.stride;
      float* d0 = dst + (Q.lo(g) - Q.c0) * HW + j0;
      vf r[L];
      for (int l = 0; l < L; ++l) r[l] = l < m ? loadn(q0 + l * Q.stride, w) : splat(0.f);
      transpose(r);
      for (int c = 0; c < w; ++c)
        if (any) store(d0 + c * HW, sel(a, r[c] + load(d0 + c * HW, m), r[c]), m);
        else store_out(d0 + c * HW, r[c], m);
    }
  }
}

// --- the strips -------------------------------------------------------------------------------------

// One worker's buffers: the window's corner source ((Ci + C) floats a pixel, then a pixel of
// zeros) and d q_tk (C floats a pixel), and the scratch of the passes.
struct StripScratch {
  float* buf;  // one worker's part of run's buffer
  RowScratch R;
  SourceScratch Sc;
  std::vector<float> sb;     // softmax_backward_pixels' scratch
  std::vector<int32_t> add;  // pixels_to_rows' add, per window column
  StripScratch(float* buf, int64_t C, int64_t Ci, int64_t W)
      : buf(buf), R(C, Ci), Sc(C, Ci), sb(2 * ((C + L - 1) / L) * L * L), add((W + L - 1) / L * L) {}
};

// The floats of StripScratch::buf for window V.
template <typename S>
TC_INLINE int64_t window_floats(const Ctx<S>& X, const Window& V) {
  return (V.pixels() + 1) * (X.Ci + X.C) + (X.gptk ? V.pixels() * X.C : 0);
}

// Strip s of batch item b down the image in window V[s] (V: the item's `strips` windows), pass A
// chunk by chunk: rows enter the window's corner source as the strip reaches them, and (backward) leave
// it for d pred_tk's planar buffer, softmax backward applied to the strip's own part of d q_tk
// (it is linear: the parts of overlapping strips add up), added where a strip of an earlier
// phase (phase: s mod P) already wrote.
template <typename S>
void run_strip(const Ctx<S>& X, const S* ptk, int64_t b, int64_t s, const Window* V, int64_t strips, int64_t P,
               StripScratch& K) {
  const Window& win = V[s];
  const int64_t C = X.C, Ci = X.Ci, H = X.H, W = X.W, HW = X.HW, x0 = win.x0;
  const int64_t np = win.pixels();
  float *q = K.buf, *dq = q + (np + 1) * (Ci + C);
  std::fill(q + np * (Ci + C), q + (np + 1) * (Ci + C), 0.f);
  // Without a scatter into d pred_tk, img_tk and q_tk are read in shared blocks (merged: one
  // gather fewer per pixel); with it, the blocks of q_tk alone, matching d q_tk's.
  const bool merged = !X.gptk;
  const Channels A{q, Ci + C, 0, Ci + C}, I{q, Ci + C, 0, Ci};
  const Channels Q = merged ? A : Channels{q, Ci + C, Ci, C}, G{dq, C, 0, C};
  const S* ptk_b = ptk + b * C * HW;
  const float* itk_b = X.itk + b * Ci * HW;
  float* dptk = X.gptk ? X.gptk + b * C * HW + win.c0 : nullptr;
  if (dptk)
    for (int64_t j = 0; j < win.w; ++j) {
      const int64_t c = win.c0 + j;
      K.add[j] = 0;
      for (int64_t t = 0; t < strips; ++t) K.add[j] |= t % P < s % P && c >= V[t].c0 && c < V[t].c0 + V[t].w;
    }
  RowScratch& R = K.R;
  int64_t entered = 0, left = 0;
  const auto leave_until = [&](int64_t r1) {
    for (; left < r1; ++left) {
      if (!dptk) continue;
      const int64_t p = win.at(left);
      softmax_backward_pixels(Q, G, X.on_prob, p, p + win.w, K.sb.data(), K.sb.data() + K.sb.size() / 2);
      pixels_to_rows(Q, p, win.w, dptk + left * W, HW, K.add.data());
    }
  };
  const int64_t per_row = (win.n + kTile - 1) / kTile;  // chunks
  chunk_taps_at(X, b, 0, x0, win, *R.t);
  for (int64_t i = 0; i < H * per_row; ++i) {
    const int64_t y = i / per_row, xc = x0 + i % per_row * kTile;
    if (xc == x0) {
      leave_until(y + win.lo);
      for (; entered <= std::min(H - 1, y + win.hi); ++entered) {
        const int64_t p = win.at(entered);
        source_row<S>(X, ptk_b, itk_b, entered, win.c0, win.c0 + win.w, A, p, K.Sc);
        if (dptk) std::fill(dq + p * C, dq + (p + win.w) * C, 0.f);
      }
    }
    if (i + 1 < H * per_row) {  // the next chunk's taps, and its corners on their way
      const int64_t y1 = (i + 1) / per_row, x1 = x0 + (i + 1) % per_row * kTile, n1 = std::min(kTile, W - x1);
      chunk_taps_at(X, b, y1, x1, win, *R.next);
      prefetch_chunk(q, A.stride, R.next->oq, 1, n1);
      if (dptk) prefetch_chunk(dq, C, R.next->pix, C, n1);
    }
    if (X.grads) pass_a_chunk<S, true>(X, Q, I, dptk ? &G : nullptr, b, y, xc, R);
    else pass_a_chunk<S, false>(X, Q, I, nullptr, b, y, xc, R);
    std::swap(R.t, R.next);
  }
  leave_until(H);
}

// Every strip of every batch item, each worker with a window buffer of its own. The backward's
// strips of one batch item run in phases: those of phase p (s mod P = p, P the least number for
// which no two strips of a phase share a window column) in parallel, then the next phase; so the
// additions into each pixel of d pred_tk come in the same order for any number of threads.
template <typename S>
void run(const Ctx<S>& X, const S* ptk) {
  if (X.B * X.HW == 0) return;
  // Strips of kStrip columns in the backward, whose d pred_tk sums follow them; the forward's
  // (bits independent of the strips) as wide as leaves two per thread: fewer columns built twice
  const int64_t chunks = (X.W + kTile - 1) / kTile;
  const int64_t per_item = std::min(chunks, (2 * at::get_num_threads() + X.B - 1) / X.B);
  const int64_t sw = X.gptk ? kStrip : (chunks + per_item - 1) / per_item * kTile;
  const int64_t strips = (X.W + sw - 1) / sw, units = X.B * strips;
  std::vector<Window> V(units);
  parallel_items(units, 1, [&] {
    return [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        const int64_t x0 = u % strips * sw;
        V[u] = strip_window(X, u / strips, x0, std::min(sw, X.W - x0));
      }
    };
  });
  std::vector<int64_t> P(X.B, 1);
  int64_t phases = 1, floats = 0;
  for (int64_t b = 0; b < X.B; ++b) {
    const Window* v = V.data() + b * strips;
    const auto overlap = [&](int64_t s, int64_t t) { return v[s].c0 < v[t].c0 + v[t].w && v[t].c0 < v[s].c0 + v[s].w; };
    for (bool clash = X.gptk != nullptr; clash; P[b] += clash) {
      clash = false;
      for (int64_t s = 0; s < strips; ++s)
        for (int64_t t = s + P[b]; t < strips; t += P[b]) clash |= overlap(s, t);
    }
    phases = std::max(phases, P[b]);
    for (int64_t s = 0; s < strips; ++s) floats = std::max(floats, window_floats(X, v[s]));
  }
  // the units of each phase, and a window buffer per worker, the most parallel_items makes in one
  std::vector<std::vector<int64_t>> order(phases);
  for (int64_t u = 0; u < units; ++u) order[u % strips % P[u / strips]].push_back(u);
  int64_t workers = 0;
  for (const auto& units_p : order)
    workers = std::max<int64_t>(workers, std::min<int64_t>(units_p.size(), at::get_num_threads()));
  // one allocation for them all: the next call's buffers (sized anew by its flow) then reuse its
  // memory, where per-worker ones stayed in malloc's per-thread arenas once freed and grew
  // resident memory by both (fwd+bwd 1x19x512x1024 with 2 threads: 90 MiB with 80 of gradients;
  // pages from the OS for each call cost ~10 % in page faults)
  const std::unique_ptr<float[]> pages(new float[std::max<int64_t>(workers * floats, 1)]);
  for (const auto& units_p : order) {
    std::atomic<int64_t> slot{0};
    parallel_items(static_cast<int64_t>(units_p.size()), 1, [&] {
      const int64_t k = slot.fetch_add(1);
      TORCH_CHECK(k < workers, "temporal_loss: more workers than window buffers");
      float* buf = pages.get() + k * floats;
      return [&, K = std::make_unique<StripScratch>(buf, X.C, X.Ci, X.W)](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t b = units_p[i] / strips;
          run_strip(X, ptk, b, units_p[i] % strips, V.data() + b * strips, strips, P[b], *K);
        }
        stream_fence();
      };
    });
  }
}

void run_f32(const Ctx<float>& X, const float* ptk) { run<float>(X, ptk); }
void run_f16(const Ctx<at::Half>& X, const at::Half* ptk) { run<at::Half>(X, ptk); }
void run_bf16(const Ctx<at::BFloat16>& X, const at::BFloat16* ptk) { run<at::BFloat16>(X, ptk); }
