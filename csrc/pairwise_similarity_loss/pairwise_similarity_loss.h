// Per-tile math of the blocked pair-wise similarity loss (SF pair-wise / PF, eq. 2 and eq. 5 of
// Liu et al., ECCV 2020), shared by the CPU kernel (pairwise_similarity_loss_cpu.cpp) and the CUDA kernel
// (pairwise_similarity_loss_cuda.cu). Inputs are unit rows (x / max(|x|, eps)), so a tile of S or T is a plain
// GEMM of row blocks; what follows is everything done to an element of the tile.
//
// mse: loss = 1/(B Na Nb) sum_ij (S_ij - T_ij)^2,            G_ij = dL/dS_ij = 2 c (S_ij - T_ij)
// kl:  x = S_i/tau, y = T_i/tau, p = softmax(y), q = softmax(x):
//      KL_i = sum_j p_j (y_j - x_j) - lse(y) + lse(x),      G_ij = c/tau (q_j - p_j)
//      loss = 1/(B Na) sum_i KL_i.  (c = dL/dloss / (number of terms))
// The row log-sum-exps are built online over column tiles (FlashAttention): a row state keeps
// the running max m and l = sum exp(. - m) for x and y, and w = sum exp(y_j - m_y)(y_j - x_j).
#pragma once
#include "common/host_device.h"

namespace tcloss {

enum PairwiseLoss : int { kPairwiseMSE = 0, kPairwiseKL = 1 };

struct PWParams {
  int64_t B, Na, Nb, Cs, Ct;
  int loss;
  double inv_tau;  // 1 / temperature
  double scale;    // c = 1 / (number of averaged terms); the host multiplies by dL/dloss afterwards
};

template <typename acc_t>
struct PWRowState {
  acc_t ms, ls;     // x = S/tau: running max, sum exp(x - ms)
  acc_t mt, lt, w;  // y = T/tau: running max, sum exp(y - mt), sum exp(y - mt) (y - x)
};

template <typename acc_t>
HOST_DEVICE_INLINE void pw_state_init(PWRowState<acc_t>& st) {
  st.ms = -INFINITY;
  st.mt = -INFINITY;
  st.ls = acc_t(0);
  st.lt = acc_t(0);
  st.w = acc_t(0);
}

// One element (s, t) of the row. NaN propagates into l (exp(NaN)).
template <typename acc_t>
HOST_DEVICE_INLINE void pw_state_push(PWRowState<acc_t>& st, acc_t s, acc_t t, acc_t inv_tau) {
  const acc_t x = s * inv_tau, y = t * inv_tau;
  if (x > st.ms) {
    st.ls = st.ls * exp(st.ms - x) + acc_t(1);
    st.ms = x;
  } else {
    st.ls += exp(x - st.ms);
  }
  if (y > st.mt) {
    const acc_t r = exp(st.mt - y);
    st.lt = st.lt * r + acc_t(1);
    st.w = st.w * r + (y - x);
    st.mt = y;
  } else {
    const acc_t e = exp(y - st.mt);
    st.lt += e;
    st.w += e * (y - x);
  }
}

// A contiguous span of n elements of the row (CPU): one rescale per span, not per element.
template <typename acc_t>
HOST_DEVICE_INLINE void pw_state_span(PWRowState<acc_t>& st, const acc_t* s, const acc_t* t, int64_t n,
                                      acc_t inv_tau) {
  acc_t mx = st.ms, my = st.mt;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = s[j] * inv_tau, y = t[j] * inv_tau;
    mx = x > mx ? x : mx;
    my = y > my ? y : my;
  }
  acc_t ls = acc_t(0), lt = acc_t(0), w = acc_t(0);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = s[j] * inv_tau, y = t[j] * inv_tau;
    ls += exp(x - mx);
    const acc_t e = exp(y - my);
    lt += e;
    w += e * (y - x);
  }
  // Old sums rescaled to the new maxima (exp(-inf) = 0 for an empty state).
  const acc_t rs = st.ls == acc_t(0) ? acc_t(0) : exp(st.ms - mx);
  const acc_t rt = st.lt == acc_t(0) ? acc_t(0) : exp(st.mt - my);
  st.ls = st.ls * rs + ls;
  st.lt = st.lt * rt + lt;
  st.w = st.w * rt + w;
  st.ms = mx;
  st.mt = my;
}

// a <- a (+) b: the state of the union of two disjoint column sets.
template <typename acc_t>
HOST_DEVICE_INLINE void pw_state_merge(PWRowState<acc_t>& a, const PWRowState<acc_t>& b) {
  if (b.ls == acc_t(0) && b.lt == acc_t(0)) return;
  if (a.ls == acc_t(0) && a.lt == acc_t(0)) {
    a = b;
    return;
  }
  const acc_t ms = a.ms > b.ms ? a.ms : b.ms;
  a.ls = a.ls * exp(a.ms - ms) + b.ls * exp(b.ms - ms);
  a.ms = ms;
  const acc_t mt = a.mt > b.mt ? a.mt : b.mt;
  const acc_t ra = exp(a.mt - mt), rb = exp(b.mt - mt);
  a.lt = a.lt * ra + b.lt * rb;
  a.w = a.w * ra + b.w * rb;
  a.mt = mt;
}

// KL_i of a finished row, and its log-sum-exps (the statistics saved for backward).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t pw_state_finish(const PWRowState<acc_t>& st, acc_t& lse_s, acc_t& lse_t) {
  lse_s = st.ms + log(st.ls);
  lse_t = st.mt + log(st.lt);
  return st.w / st.lt - lse_t + lse_s;
}

template <typename acc_t>
HOST_DEVICE_INLINE acc_t pw_sq(acc_t s, acc_t t) {
  const acc_t d = s - t;
  return d * d;
}

// dL/dS_ij (times 1/c: see PWParams::scale); lse_* are those of row i (kl only).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t pw_grad(int loss, acc_t s, acc_t t, acc_t inv_tau, acc_t lse_s, acc_t lse_t, acc_t c) {
  if (loss == kPairwiseMSE) return acc_t(2) * c * (s - t);
  return c * inv_tau * (exp(s * inv_tau - lse_s) - exp(t * inv_tau - lse_t));
}

}  // namespace tcloss
