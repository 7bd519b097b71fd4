// Per-pixel math of the fused temporal loss (eq. 1 of Liu et al., ECCV 2020), shared by the
// CPU kernel (temporal_loss_cpu.cpp) and the CUDA kernel (temporal_loss_cuda.cu).
//
// For pixel i = (b, y, x) with flow (u, v):
//   q_t  = softmax_C(pred_t[:, i])            (on="prob"; q = pred for on="logit")
//   w    = sum_k a_k q_tk[:, corner_k]        bilinear warp of q_tk at (x + u, y + v)
//   d    = img_t[:, i] - warp(img_tk)         (mask is a constant: no gradient through it)
//   r    = |sum_c d_c| | sum_c |d_c| | sqrt(sum_c d_c^2)     (signed_sum | l1 | l2)
//   l_i  = exp(-p r) * sum_c (q_t[c] - w[c])^2              (V^p with V = exp(-r))
// Gradients (g = dL/dl_i, dq = 2 g V^p (q_t - w)):
//   dpred_t  = J_t dq               J = softmax Jacobian, J z = q * (z - <q, z>)
//   dpred_tk[:, corner_k] += a_k J_k (-dq)     the Jacobian at the *source* pixel is fixed,
//                                              so each contribution is scattered already
//                                              softmax-backpropagated: one pass, no buffer
//   dflow_x  = sum_c (-dq[c]) sum_k (d a_k / d px) q_tk[c, corner_k]   (reduced in registers)
#pragma once
#include "common/host_device.h"

namespace tcloss {

enum MaskMode : int { kSignedSum = 0, kL1 = 1, kL2 = 2 };

struct TLParams {
  int64_t B, C, Ci, H, W;
  bool on_prob;
  int mask_mode;
  double mask_power;
  bool zeros_pad;
  bool g_pt, g_ptk, g_flow;  // which gradients to produce
};

// Softmax statistics of one pixel over channels (channel stride HW): the max m and 1/sum_c
// exp(z_c - m), so q_c = exp(z_c - m) * rinv. Kept as a pair rather than one log-sum-exp: an lse
// rounded to the accumulation dtype is off by up to ulp(lse), which at logits of 1e4 is a
// relative error of 1e-3 in every probability (and ties at 1e8 would sum to 2). z_c - m is
// exact wherever exp(z_c - m) is not negligible. A non-finite max (inf or NaN logits) makes
// every probability NaN, as torch.softmax does.
template <typename acc_t>
struct SoftmaxStats {
  acc_t m, rinv;
};

template <typename acc_t>
HOST_DEVICE_INLINE acc_t softmax_rinv(acc_t m, acc_t sum) {
  return is_finite(m) ? acc_t(1) / sum : acc_t(NAN);
}

template <typename scalar_t, typename acc_t, typename index_t = int64_t>
HOST_DEVICE_INLINE SoftmaxStats<acc_t> channel_softmax_stats(const scalar_t* p, index_t C, index_t HW) {
  acc_t m = static_cast<acc_t>(p[0]);
  for (index_t c = 1; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(p[c * HW]);
    m = v > m ? v : m;
  }
  acc_t s = acc_t(0);
  if (is_finite(m))
    for (index_t c = 0; c < C; ++c) s += m_exp(static_cast<acc_t>(p[c * HW]) - m);
  return {m, softmax_rinv(m, s)};
}

template <typename scalar_t, typename acc_t, typename index_t>
HOST_DEVICE_INLINE acc_t prob_of(const scalar_t* p, index_t idx, SoftmaxStats<acc_t> st, bool on_prob) {
  const acc_t v = static_cast<acc_t>(p[idx]);
  return on_prob ? m_exp(v - st.m) * st.rinv : v;
}

// V^p; p = 0 gives 1 even where r is infinite (V^0 = 1, as the reference's pow).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t mask_from_residual(acc_t r, acc_t p) {
  return p == acc_t(0) ? acc_t(1) : m_exp(-p * r);
}

// Occlusion weight V^p of pixel `pix` (offset y*W + x inside a plane); it_b, itk_b: the images
// of its batch item.
template <typename acc_t, typename index_t>
HOST_DEVICE_INLINE acc_t mask_weight(const TLParams& P, const acc_t* it_b, const acc_t* itk_b, index_t pix,
                                     index_t HW, const BilinearTaps<acc_t, index_t>& t) {
  acc_t s = acc_t(0);
  for (index_t c = 0; c < static_cast<index_t>(P.Ci); ++c) {
    acc_t warped = acc_t(0);
    for (int k = 0; k < 4; ++k)
      if (t.valid[k]) warped += t.w[k] * itk_b[c * HW + t.off[k]];
    const acc_t d = it_b[c * HW + pix] - warped;
    if (P.mask_mode == kSignedSum) s += d;
    else if (P.mask_mode == kL1) s += m_fabs(d);
    else s += d * d;
  }
  const acc_t r = P.mask_mode == kSignedSum ? m_fabs(s) : (P.mask_mode == kL1 ? s : m_sqrt(s));
  return mask_from_residual(r, static_cast<acc_t>(P.mask_power));
}

// The per-channel pieces, shared by the per-pixel orchestration below (GPU, and CPU float64)
// and the CPU's chunked orchestration (temporal_loss_cpu.cpp), which walks channel planes in
// order for the cache and TLB.

// Channel reductions of one pixel that the loss and the gradients need.
template <typename acc_t>
struct TLAccum {
  acc_t sumsq = 0, dot_t = 0, gx = 0, gy = 0;
  acc_t dot_k[4] = {0, 0, 0, 0};
};

// Pass 1, channel c: q_t and the four corners' q (0 outside the image). k2 = 2 g V^p.
template <typename acc_t, typename index_t>
HOST_DEVICE_INLINE void tl_channel_accumulate(const BilinearTaps<acc_t, index_t>& t, acc_t qt, const acc_t qk[4], bool grads,
                                              acc_t k2, TLAccum<acc_t>& A) {
  acc_t w = acc_t(0);
  for (int k = 0; k < 4; ++k) w += t.w[k] * qk[k];
  const acc_t wx = t.ax[0] * (qk[1] - qk[0]) + t.ax[1] * (qk[3] - qk[2]);
  const acc_t wy = t.ay[0] * (qk[2] - qk[0]) + t.ay[1] * (qk[3] - qk[1]);
  const acc_t diff = qt - w;
  A.sumsq += diff * diff;
  if (grads) {
    const acc_t dq = k2 * diff;  // dl/dq_t; dl/dw = -dq
    A.dot_t += qt * dq;
    for (int k = 0; k < 4; ++k) A.dot_k[k] -= qk[k] * dq;  // <q_k, -dq>
    A.gx -= dq * wx;
    A.gy -= dq * wy;
  }
}

// Pass 2, channel c: returns d pred_t[c]; gk[k] = what corner k of pred_tk receives (0 for a
// corner outside the image or of zero weight: the caller skips those).
template <typename acc_t, typename index_t>
HOST_DEVICE_INLINE acc_t tl_channel_grads(const BilinearTaps<acc_t, index_t>& t, acc_t qt, const acc_t qk[4], acc_t k2,
                                          bool on_prob, const TLAccum<acc_t>& A, acc_t gk[4]) {
  acc_t w = acc_t(0);
  for (int k = 0; k < 4; ++k) w += t.w[k] * qk[k];
  const acc_t dq = k2 * (qt - w);
  for (int k = 0; k < 4; ++k) gk[k] = t.w[k] * (on_prob ? qk[k] * (-dq - A.dot_k[k]) : -dq);
  return on_prob ? qt * (dq - A.dot_t) : dq;
}

// The tensors of one batch item (pointers at its first element; offsets inside it are index_t).
// st_tk: softmax statistics of pred_tk (on="prob"); gradients null where not requested.
template <typename scalar_t, typename acc_t>
struct TLItem {
  const scalar_t* pt;
  const scalar_t* ptk;
  const acc_t* flow;
  const acc_t* it;
  const acc_t* itk;
  const SoftmaxStats<acc_t>* st_tk;
  scalar_t* g_pt;
  acc_t* g_ptk;
  acc_t* g_flow;
};

template <typename scalar_t, typename acc_t>
HOST_DEVICE_INLINE TLItem<scalar_t, acc_t> tl_item(const TLParams& P, int64_t b, const scalar_t* pt,
                                                   const scalar_t* ptk, const acc_t* flow, const acc_t* it,
                                                   const acc_t* itk, const SoftmaxStats<acc_t>* st_tk,
                                                   scalar_t* g_pt, acc_t* g_ptk, acc_t* g_flow) {
  const int64_t HW = P.H * P.W, pred = b * P.C * HW, img = b * P.Ci * HW, fl = b * 2 * HW;
  return {pt + pred, ptk + pred, flow + fl, it + img, itk + img, st_tk ? st_tk + b * HW : nullptr,
          g_pt ? g_pt + pred : nullptr, g_ptk ? g_ptk + pred : nullptr, g_flow ? g_flow + fl : nullptr};
}

// One pixel, both passes (the GPU kernel's orchestration: one thread per pixel, q recomputed in
// pass 2 rather than kept; registers are scarce). The softmax statistics of pred_t at the pixel
// are computed here from its own channel vector (a coalesced read that pass 1 reads again from
// the cache); those of pred_tk come precomputed (st_tk), as every pixel reads four corners.
// kGrads = false compiles the loss alone (the forward). d pred_tk goes through `scatter`:
// scatter.prepare(taps) once before pass 2, then scatter(plane, taps, gk) per channel with
// plane = g_ptk + c*HW (plain or atomic adds; the GPU's merges neighbouring threads' corners).
// Returns l_i; `gscale` = dL/dl_i.
template <bool kGrads, typename scalar_t, typename acc_t, typename index_t, typename Scatter>
HOST_DEVICE_INLINE acc_t temporal_loss_pixel(const TLParams& P, const TLItem<scalar_t, acc_t>& I, index_t y,
                                             index_t x, acc_t gscale, Scatter& scatter) {
  const index_t W = static_cast<index_t>(P.W), HW = static_cast<index_t>(P.H) * W;
  const index_t C = static_cast<index_t>(P.C);
  const index_t pix = y * W + x;
  const acc_t u = I.flow[pix], v = I.flow[HW + pix];
  BilinearTaps<acc_t, index_t> t;
  bilinear_taps<acc_t, index_t>(acc_t(x) + u, acc_t(y) + v, static_cast<index_t>(P.H), W, P.zeros_pad, t);
  if (!t.finite) {
    // Non-finite flow: the loss of this pixel is NaN (as in the reference), no gradient.
    if (kGrads && I.g_flow) { I.g_flow[pix] = acc_t(0); I.g_flow[HW + pix] = acc_t(0); }
    if (kGrads && I.g_pt)
      for (index_t c = 0; c < C; ++c) I.g_pt[c * HW + pix] = scalar_t(0);
    return acc_t(NAN);
  }
  const acc_t vp = mask_weight<acc_t, index_t>(P, I.it, I.itk, pix, HW, t);
  const scalar_t* pt_i = I.pt + pix;
  const SoftmaxStats<acc_t> lt =
      P.on_prob ? channel_softmax_stats<scalar_t, acc_t, index_t>(pt_i, C, HW) : SoftmaxStats<acc_t>{0, 1};
  SoftmaxStats<acc_t> lk[4] = {{0, 1}, {0, 1}, {0, 1}, {0, 1}};
  if (P.on_prob)
    for (int k = 0; k < 4; ++k)
      if (t.valid[k]) lk[k] = I.st_tk[t.off[k]];
  auto corners = [&](index_t c, acc_t qk[4]) {
    for (int k = 0; k < 4; ++k)
      qk[k] = t.valid[k] ? prob_of<scalar_t, acc_t, index_t>(I.ptk, c * HW + t.off[k], lk[k], P.on_prob) : acc_t(0);
  };

  const bool grads = kGrads && gscale != acc_t(0) && (P.g_pt || P.g_ptk || P.g_flow);
  const acc_t k2 = acc_t(2) * gscale * vp;  // dl/d(diff) = 2 g V^p diff
  TLAccum<acc_t> A;
  TC_UNROLL((kGrads ? 1 : 2))  // the backward has no registers to spare
  for (index_t c = 0; c < C; ++c) {  // pass 1: loss and the channel reductions
    acc_t qk[4];
    corners(c, qk);
    tl_channel_accumulate<acc_t, index_t>(t, prob_of<scalar_t, acc_t, index_t>(pt_i, c * HW, lt, P.on_prob), qk,
                                          grads, k2, A);
  }
  if (!kGrads) return A.sumsq * vp;
  if (P.g_flow && I.g_flow) {  // zeros where this pixel has no gradient
    I.g_flow[pix] = A.gx;
    I.g_flow[HW + pix] = A.gy;
  }
  if (grads && (P.g_pt || P.g_ptk)) {  // pass 2: write d pred_t, scatter d pred_tk
    if (P.g_ptk) scatter.prepare(t);
    for (index_t c = 0; c < C; ++c) {
      acc_t qk[4], gk[4];
      corners(c, qk);
      const acc_t gpt = tl_channel_grads<acc_t, index_t>(t, prob_of<scalar_t, acc_t, index_t>(pt_i, c * HW, lt, P.on_prob),
                                                         qk, k2, P.on_prob, A, gk);
      if (P.g_pt) I.g_pt[c * HW + pix] = static_cast<scalar_t>(gpt);
      if (P.g_ptk) scatter(I.g_ptk + c * HW, t, gk);
    }
  } else if (P.g_pt && I.g_pt) {
    for (index_t c = 0; c < C; ++c) I.g_pt[c * HW + pix] = scalar_t(0);
  }
  return A.sumsq * vp;
}

}  // namespace tcloss
