// The element math of the blocked pair-wise loss (pairwise_similarity_loss.h) over float tiles, written
// once over L-lane vectors and compiled once per instruction set by pairwise_similarity_loss_cpu.cpp through
// common/isa.h. A tile is bm rows of bn contiguous floats; the exponentials are vexp_nonpos (every
// argument is <= 0 up to rounding: values minus their running max or their log-sum-exp).

TC_INLINE float hsum(vf v) {
  float r = 0.f;
  for (int l = 0; l < L; ++l) r += v[l];
  return r;
}
TC_INLINE float hmax(vf v) {  // NaN lanes are skipped, as pw_state_span's comparisons do
  float r = v[0];
  for (int l = 1; l < L; ++l) r = v[l] > r ? v[l] : r;
  return r;
}
TC_INLINE vi lanes_lt(int64_t m) {
  vi lane;
  for (int l = 0; l < L; ++l) lane[l] = l;
  return lane < static_cast<int32_t>(m);
}

// Forward of a tile: mse adds sum_j (s - t)^2 of row r to sq[r]; kl folds row r into st[r]
// (pw_state_span: one rescale of the old sums per row of the tile).
inline void fwd_tile(int loss, const float* s, const float* t, int64_t bm, int64_t bn, float inv_tau,
                     PWRowState<float>* st, float* sq) {
  const vf ninf = splat(-INFINITY), zero = splat(0.f);
  for (int64_t r = 0; r < bm; ++r) {
    const float *sr = s + r * bn, *tr = t + r * bn;
    if (loss == kPairwiseMSE) {
      vf a = zero;
      for (int64_t j = 0; j < bn; j += L) {
        const int m = static_cast<int>(std::min<int64_t>(L, bn - j));
        const vf d = loadn(sr + j, m) - loadn(tr + j, m);  // 0 past the row
        a += d * d;
      }
      sq[r] += hsum(a);
      continue;
    }
    vf mx = ninf, my = ninf;
    for (int64_t j = 0; j < bn; j += L) {
      const int m = static_cast<int>(std::min<int64_t>(L, bn - j));
      const vi in = lanes_lt(m);
      mx = vmax(sel(in, loadn(sr + j, m) * inv_tau, ninf), mx);
      my = vmax(sel(in, loadn(tr + j, m) * inv_tau, ninf), my);
    }
    const float ms = std::max(st[r].ms, hmax(mx)), mt = std::max(st[r].mt, hmax(my));
    vf ls = zero, lt = zero, w = zero;
    for (int64_t j = 0; j < bn; j += L) {
      const int m = static_cast<int>(std::min<int64_t>(L, bn - j));
      const vi in = lanes_lt(m);
      const vf x = loadn(sr + j, m) * inv_tau, y = loadn(tr + j, m) * inv_tau;
      const vf e = sel(in, vexp_nonpos(y - mt), zero);
      ls += sel(in, vexp_nonpos(x - ms), zero);
      lt += e;
      w += e * (y - x);
    }
    // the old sums rescaled to the new maxima (an empty state has nothing to rescale)
    PWRowState<float>& S = st[r];
    const float rs = S.ls == 0.f ? 0.f : std::exp(S.ms - ms), rt = S.lt == 0.f ? 0.f : std::exp(S.mt - mt);
    S.ls = S.ls * rs + hsum(ls);
    S.lt = S.lt * rt + hsum(lt);
    S.w = S.w * rt + hsum(w);
    S.ms = ms;
    S.mt = mt;
  }
}

// G = dL/dS of a tile (pw_grad; times 1/c: PWParams::scale), in place over s; stats: the
// (lse_s, lse_t) pairs of the tile's rows (kl).
inline void grad_tile(int loss, float* s, const float* t, int64_t bm, int64_t bn, float inv_tau, const float* stats,
                      float c) {
  for (int64_t r = 0; r < bm; ++r) {
    float* sr = s + r * bn;
    const float* tr = t + r * bn;
    const vf ls = splat(loss == kPairwiseKL ? stats[2 * r] : 0.f), lt = splat(loss == kPairwiseKL ? stats[2 * r + 1] : 0.f);
    for (int64_t j = 0; j < bn; j += L) {
      const int m = static_cast<int>(std::min<int64_t>(L, bn - j));
      const vf x = loadn(sr + j, m), y = loadn(tr + j, m);
      const vf g = loss == kPairwiseMSE ? 2.f * c * (x - y)
                                        : c * inv_tau * (vexp_nonpos(x * inv_tau - ls) - vexp_nonpos(y * inv_tau - lt));
      storen(sr + j, g, m);
    }
  }
}
