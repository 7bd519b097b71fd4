// Device-independent host side of the temporal-loss ops: argument checks, allocation and the
// final reduction. temporal_loss_cpu.cpp and temporal_loss_cuda.cu provide run_kernels().
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "temporal_loss/temporal_loss.h"

namespace tcloss {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

struct TLTensors {
  TLParams P;
  at::Tensor pt, ptk, flow, it, itk;  // contiguous; flow/images in the accumulation dtype
  at::Tensor loss_map;                // (B,H,W) acc dtype; forward only (undefined in backward)
  at::Tensor g_pt, g_ptk_acc, g_flow; // gradients (undefined when not requested)
  at::Tensor grad;                    // dL/dl: scalar or (B,H,W), acc dtype; backward only
  double grad_mul = 1.0;              // 1/(BHW) for mean
};

inline at::ScalarType acc_type_of(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-pixel softmax statistics (temporal_loss.h: SoftmaxStats) of a (B,C,H,W) input:
// (B,H,W,2) in the accumulation dtype, viewed by the kernels as SoftmaxStats<acc_t>.
inline at::Tensor tl_softmax_stats_buffer(const TLParams& P, const at::Tensor& like) {
  return at::empty({P.B, P.H, P.W, 2}, like.options());
}

// img.to(acc) with finite float64 values beyond float32's range clamped to its largest finite
// value rather than turned into inf (tcloss._math.saturate_to).
inline at::Tensor tl_saturate_to(const at::Tensor& img, at::ScalarType acc) {
  if (!(img.scalar_type() == at::kDouble && acc == at::kFloat)) return img.to(acc);
  const double m = std::numeric_limits<float>::max();
  return at::where(at::isfinite(img), at::clamp(img, -m, m), img).to(acc);
}

inline TLTensors tl_prepare(const at::Tensor& pred_t, const at::Tensor& pred_tk, const at::Tensor& flow,
                            const at::Tensor& img_t, const at::Tensor& img_tk, bool on_prob,
                            int64_t mask_mode, double mask_power, bool zeros_padding, bool g_pt,
                            bool g_ptk, bool g_flow) {
  TORCH_CHECK(pred_t.dim() == 4, "tcloss: pred_t must be (B,C,H,W), got ", pred_t.sizes());
  TORCH_CHECK(pred_tk.sizes() == pred_t.sizes(), "tcloss: pred_tk must match pred_t ", pred_t.sizes(), ", got ", pred_tk.sizes());
  TORCH_CHECK(pred_tk.scalar_type() == pred_t.scalar_type(), "tcloss: pred_t and pred_tk must share a dtype");
  const int64_t B = pred_t.size(0), C = pred_t.size(1), H = pred_t.size(2), W = pred_t.size(3);
  TORCH_CHECK(flow.dim() == 4 && flow.size(0) == B && flow.size(1) == 2 && flow.size(2) == H && flow.size(3) == W,
              "tcloss: flow must be (B,2,H,W) = (", B, ",2,", H, ",", W, "), got ", flow.sizes());
  TORCH_CHECK(img_t.dim() == 4 && img_t.size(0) == B && img_t.size(2) == H && img_t.size(3) == W,
              "tcloss: img_t must be (B,Ci,H,W) with B,H,W of pred_t, got ", img_t.sizes());
  TORCH_CHECK(img_tk.sizes() == img_t.sizes(), "tcloss: img_tk must match img_t");
  TORCH_CHECK(mask_mode >= 0 && mask_mode <= 2, "tcloss: mask_mode must be 0, 1 or 2");
  TORCH_CHECK(std::isfinite(mask_power) && mask_power >= 0, "tcloss: mask_power must be a finite non-negative number, got ",
              mask_power);
  for (const auto* t : {&pred_tk, &flow, &img_t, &img_tk})
    TORCH_CHECK(t->device() == pred_t.device(), "tcloss: all inputs must be on ", pred_t.device());
  TLTensors T;
  const auto acc = acc_type_of(pred_t.scalar_type());
  // float32 kernels: a positive mask_power stays positive and finite in float32 (below its
  // smallest subnormal it would round to 0 and make V^p = 1 where V = 0)
  if (acc == at::kFloat && mask_power > 0)
    mask_power = std::min(std::max(mask_power, double(std::numeric_limits<float>::denorm_min())),
                          double(std::numeric_limits<float>::max()));
  T.P = TLParams{B, C, img_t.size(1), H, W, on_prob, static_cast<int>(mask_mode), mask_power,
                 zeros_padding, g_pt, g_ptk, g_flow};
  T.pt = pred_t.contiguous();
  T.ptk = pred_tk.contiguous();
  T.flow = flow.to(acc).contiguous();
  T.it = tl_saturate_to(img_t, acc).contiguous();
  T.itk = tl_saturate_to(img_tk, acc).contiguous();
  auto opts = pred_t.options().dtype(acc);
  if (g_pt) T.g_pt = at::empty_like(T.pt);
  // zeroed here; on the CPU the SIMD path writes every element and the per-pixel one zeroes it
  if (g_ptk) T.g_ptk_acc = pred_tk.is_cpu() ? at::empty(pred_tk.sizes(), opts) : at::zeros(pred_tk.sizes(), opts);
  if (g_flow) T.g_flow = at::empty({B, 2, H, W}, opts);
  return T;
}

// Gradient outputs: requested ones in the dtype of their input, others empty (0,).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> tl_grads(TLTensors& T, const at::Tensor& pred_t,
                                                               const at::Tensor& flow) {
  at::Tensor gpt = T.P.g_pt ? T.g_pt : at::empty({0}, pred_t.options());
  at::Tensor gptk = T.P.g_ptk ? T.g_ptk_acc.to(pred_t.scalar_type()) : at::empty({0}, pred_t.options());
  at::Tensor gfl = T.P.g_flow ? T.g_flow.to(flow.scalar_type()) : at::empty({0}, flow.options());
  return {gpt, gptk, gfl};
}

inline at::Tensor tl_reduce(const at::Tensor& loss_map, int64_t reduction) {
  if (reduction == kNone) return loss_map;
  at::Tensor s = at::sum(loss_map);
  // mean of no pixels (B = 0): 0/0 = NaN, as torch.mean of an empty tensor and the reference
  if (reduction == kMean) s = at::div(s, static_cast<double>(loss_map.numel()));
  return s;
}

inline double tl_grad_mul(const TLParams& P, int64_t reduction) {
  return reduction == kMean ? 1.0 / static_cast<double>(P.B * P.H * P.W) : 1.0;
}

// The two schemas, written once over a device-specific run_kernels(T).
template <typename Run>
at::Tensor temporal_loss_fwd_impl(Run run, const at::Tensor& pred_t, const at::Tensor& pred_tk,
                                  const at::Tensor& flow, const at::Tensor& img_t, const at::Tensor& img_tk,
                                  bool on_prob, int64_t mask_mode, double mask_power, bool zeros_padding,
                                  int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "tcloss: reduction must be 0 (none), 1 (mean) or 2 (sum)");
  TLTensors T = tl_prepare(pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power,
                           zeros_padding, false, false, false);
  T.loss_map = at::empty({T.P.B, T.P.H, T.P.W}, T.flow.options());
  run(T);
  return tl_reduce(T.loss_map, reduction);
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_loss_bwd_impl(
    Run run, const at::Tensor& grad, const at::Tensor& pred_t, const at::Tensor& pred_tk,
    const at::Tensor& flow, const at::Tensor& img_t, const at::Tensor& img_tk, bool on_prob,
    int64_t mask_mode, double mask_power, bool zeros_padding, int64_t reduction, bool g_pt,
    bool g_ptk, bool g_flow) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "tcloss: reduction must be 0 (none), 1 (mean) or 2 (sum)");
  TLTensors T = tl_prepare(pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power,
                           zeros_padding, g_pt, g_ptk, g_flow);
  if (reduction == kNone) {
    TORCH_CHECK(grad.dim() == 3 && grad.size(0) == T.P.B && grad.size(1) == T.P.H && grad.size(2) == T.P.W,
                "tcloss: grad must be (B,H,W) for reduction none, got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, "tcloss: grad must be a scalar for reduction mean/sum");
  }
  T.grad = grad.to(T.flow.scalar_type()).contiguous();
  T.grad_mul = tl_grad_mul(T.P, reduction);
  run(T);
  return tl_grads(T, pred_t, flow);
}

}  // namespace tcloss
