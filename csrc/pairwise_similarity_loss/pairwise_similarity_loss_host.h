// Device-independent host side of the blocked pair-wise similarity ops: checks, normalisation
// to unit rows (O(N C), the only copies made), allocation, the final reduction and the backward
// through the normalisation. pairwise_similarity_loss_cpu.cpp and pairwise_similarity_loss_cuda.cu
// provide the tile loops.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/frexp.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/ldexp.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

#include "pairwise_similarity_loss/pairwise_similarity_loss.h"

namespace tcloss {


inline at::ScalarType pw_acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Per row of xt (B,N,C), the power of two 2^-e that brings max |x| into [0.5, 1) (e the frexp
// exponent, clamped so that 2^-e stays a normal number: at most 2^126 in float32), (B,N,1).
// Zero, infinite and NaN rows get 1. As tcloss._math.pow2_scale (max |x| taken as
// max(max x, -min x): no temporary of the size of x). The exponent is passed to ldexp in m's
// dtype: with an integer exponent, torch < 2.6 computed 2^-e in float32 (2^-665, the scale of a
// 1e200 row, was 0).
inline at::Tensor pw_pow2_scale(const at::Tensor& xt) {
  at::Tensor m = at::maximum(at::amax(xt, at::IntArrayRef{2}, /*keepdim=*/true),
                             at::neg(at::amin(xt, at::IntArrayRef{2}, /*keepdim=*/true)));
  at::Tensor e = std::get<1>(at::frexp(m));
  const int64_t emin = xt.scalar_type() == at::kDouble ? -1022 : -126;
  return at::ldexp(at::ones_like(m), at::neg(at::clamp_min(e, emin)).to(m.scalar_type()));
}

// (B,C,N) -> unit rows (B,N,C) contiguous in acc, with the norms ns (B,N,1) of the rows scaled
// by the power of two s = pw_pow2_scale (kept for backward): |x| = ns / s is never formed, so
// large finite features (1e20, 3e38: a float32 sum of squares of inf) keep their direction,
// and for ordinary ones xs / max(ns, eps s) has the bits of x / max(|x|, eps). One buffer of the
// size of x: the transposed copy, scaled and divided in place.
struct PWUnit {
  at::Tensor xh, ns, s;
};

inline PWUnit pw_normalize(const at::Tensor& x, double eps, at::ScalarType acc) {
  at::Tensor xh = at::empty({x.size(0), x.size(2), x.size(1)}, x.options().dtype(acc));
  xh.copy_(x.transpose(1, 2));
  at::Tensor s = pw_pow2_scale(xh);
  xh.mul_(s);
  at::Tensor ns = at::linalg_vector_norm(xh, 2, at::IntArrayRef{2}, /*keepdim=*/true, c10::nullopt);
  xh.div_(at::maximum(ns, at::mul(s, eps)));
  return {xh, ns, s};
}

// d/dx of x / max(|x|, eps) from g = d/d(unit row), in place over g: (g - xh <xh,g>)/|x| where
// |x| > eps (as autograd through the reference's clamp: a tie counts as clamped), g/eps below;
// g / max(|x|,eps) with detach_norm. Every 1/|x| is applied as (. / max(ns, eps s)) * s.
// -> (B,C,N) in dtype.
// g may be a transposed view of a (B,C,N) buffer: the result is then that buffer itself
// (no copy) where dtype is the accumulation dtype. <xh, g> is reduced in slices of rows, so
// that no temporary of the size of g exists.
inline at::Tensor pw_norm_backward(const at::Tensor& g, const PWUnit& u, double eps, bool detach_norm,
                                   at::ScalarType dtype) {
  at::Tensor floor = at::mul(u.s, eps);
  if (!detach_norm) {
    at::Tensor dot = at::empty_like(u.ns);
    constexpr int64_t kRows = 1024;
    for (int64_t i = 0; i < g.size(1); i += kRows) {
      const int64_t n = std::min(kRows, g.size(1) - i);
      dot.narrow(1, i, n).copy_(at::sum(at::mul(u.xh.narrow(1, i, n), g.narrow(1, i, n)), at::IntArrayRef{2},
                                        /*keepdim=*/true));
    }
    g.addcmul_(u.xh, at::where(at::gt(u.ns, floor), dot, at::zeros_like(dot)), -1);
  }
  g.div_(at::maximum(u.ns, floor)).mul_(u.s);
  return g.transpose(1, 2).to(dtype).contiguous();
}

struct PWTensors {
  PWParams P;
  at::Tensor as, ats, bs, bts;  // unit rows (student a, teacher a, student b, teacher b) (B,N,C), accumulation dtype, contiguous
  PWUnit ua, ub;              // the student sides' unit rows with their scaled norms (backward only)
  at::Tensor rowloss;         // (B,Na) per-row sums (forward)
  at::Tensor stats;           // (B,Na,2) lse of S_i/tau and T_i/tau (kl), else (0,)
  // dL/d(unit student rows), (B,N,Cs) in shape, undefined when not wanted; with
  // grads_cn, transposed views of (B,Cs,N) buffers (the kernel accumulates into those: the
  // gradient then needs no transposed copy at the end)
  at::Tensor ga, gb;
};

inline PWTensors pw_prepare(const at::Tensor& sa, const at::Tensor& ta, const at::Tensor& sb, const at::Tensor& tb,
                            int64_t loss, double temperature, double eps, bool keep_norms) {
  TORCH_CHECK(sa.dim() == 3 && ta.dim() == 3 && sb.dim() == 3 && tb.dim() == 3,
              "tcloss: pairwise_similarity_loss inputs must be (B,C,N)");
  const int64_t B = sa.size(0), Cs = sa.size(1), Na = sa.size(2), Ct = ta.size(1), Nb = sb.size(2);
  TORCH_CHECK(ta.size(0) == B && sb.size(0) == B && tb.size(0) == B, "tcloss: pairwise_similarity_loss: batch mismatch");
  TORCH_CHECK(ta.size(2) == Na, "tcloss: teacher_a must have N_a = ", Na, " pixels, got ", ta.sizes());
  TORCH_CHECK(tb.size(2) == Nb, "tcloss: teacher_b must have N_b = ", Nb, " pixels, got ", tb.sizes());
  TORCH_CHECK(sb.size(1) == Cs && tb.size(1) == Ct, "tcloss: the b side must have the channels of the a side");
  TORCH_CHECK(Cs >= 1 && Ct >= 1 && Na >= 1 && Nb >= 1, "tcloss: pairwise_similarity_loss needs C >= 1 and N >= 1");
  TORCH_CHECK(loss == kPairwiseMSE || loss == kPairwiseKL, "tcloss: loss must be 0 (mse) or 1 (kl)");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "tcloss: temperature must be a finite positive number");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "tcloss: eps must be a finite non-negative number");
  for (const auto* t : {&ta, &sb, &tb}) {
    TORCH_CHECK(t->device() == sa.device(), "tcloss: all inputs must be on ", sa.device());
    TORCH_CHECK(t->scalar_type() == sa.scalar_type(), "tcloss: all inputs must share a dtype");
  }
  const auto acc = pw_acc_type(sa.scalar_type());
  PWTensors T;
  const double terms = static_cast<double>(B) * static_cast<double>(Na) * (loss == kPairwiseMSE ? Nb : 1);
  T.P = PWParams{B, Na, Nb, Cs, Ct, static_cast<int>(loss), 1.0 / temperature, 1.0 / terms};
  // self-similarity passes the same tensor as both sides: normalised once
  auto same = [](const at::Tensor& a, const at::Tensor& b) {
    return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
  };
  PWUnit ua = pw_normalize(sa, eps, acc);
  PWUnit ub = same(sa, sb) ? ua : pw_normalize(sb, eps, acc);
  T.as = ua.xh;
  T.bs = ub.xh;
  T.ats = pw_normalize(ta, eps, acc).xh;
  T.bts = same(ta, tb) ? T.ats : pw_normalize(tb, eps, acc).xh;
  if (keep_norms) {
    T.ua = std::move(ua);
    T.ub = std::move(ub);
  }
  return T;
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor> pairwise_fwd_impl(Run run, const at::Tensor& sa, const at::Tensor& ta,
                                                     const at::Tensor& sb, const at::Tensor& tb, int64_t loss,
                                                     double temperature, double eps, bool /*detach_norm*/) {
  PWTensors T = pw_prepare(sa, ta, sb, tb, loss, temperature, eps, false);
  auto opts = T.as.options();
  T.rowloss = at::empty({T.P.B, T.P.Na}, opts);
  T.stats = loss == kPairwiseKL ? at::empty({T.P.B, T.P.Na, 2}, opts) : at::empty({0}, opts);
  run(T);
  return {at::div(at::sum(T.rowloss), 1.0 / T.P.scale), T.stats};
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor> pairwise_bwd_impl(Run run, const at::Tensor& grad, const at::Tensor& sa,
                                                     const at::Tensor& ta, const at::Tensor& sb, const at::Tensor& tb,
                                                     const at::Tensor& stats, int64_t loss, double temperature,
                                                     double eps, bool detach_norm, bool grad_a, bool grad_b,
                                                     bool grads_cn) {
  TORCH_CHECK(grad.numel() == 1, "tcloss: pairwise_similarity_loss_bwd: grad must be a scalar");
  PWTensors T = pw_prepare(sa, ta, sb, tb, loss, temperature, eps, true);
  auto opts = T.as.options();
  if (loss == kPairwiseKL) {
    TORCH_CHECK(stats.dim() == 3 && stats.size(0) == T.P.B && stats.size(1) == T.P.Na && stats.size(2) == 2,
                "tcloss: pairwise_similarity_loss_bwd: stats must be (B,Na,2) for kl, got ", stats.sizes());
    T.stats = stats.to(T.as.scalar_type()).contiguous();
  }
  auto grads = [&](int64_t N) {
    return grads_cn ? at::zeros({T.P.B, T.P.Cs, N}, opts).transpose(1, 2) : at::zeros({T.P.B, N, T.P.Cs}, opts);
  };
  if (grad_a) T.ga = grads(T.P.Na);
  if (grad_b) T.gb = grads(T.P.Nb);
  run(T);
  at::Tensor g = grad.to(T.as.scalar_type()).reshape({});  // dL/dloss, applied without a host sync
  at::Tensor da = grad_a ? pw_norm_backward(T.ga.mul_(g), T.ua, eps, detach_norm, sa.scalar_type())
                         : at::empty({0}, sa.options());
  T.ga = at::Tensor();
  at::Tensor db = grad_b ? pw_norm_backward(T.gb.mul_(g), T.ub, eps, detach_norm, sb.scalar_type())
                         : at::empty({0}, sb.options());
  return {da, db};
}

}  // namespace tcloss
