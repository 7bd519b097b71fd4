// C++ CPU kernels of the fused temporal loss, math from temporal_loss.h.
//
// float64 runs the GPU's per-pixel function temporal_loss_pixel verbatim (so the float64 tests,
// gradcheck included, exercise the CUDA kernel's code). float/half/bfloat16 run the same
// formulas with explicit SIMD (temporal_loss_simd.h, compiled for AVX-512, AVX2 and the
// baseline and picked at run time): per-pixel and per-channel work runs along x over chunks of
// kTile pixels, channel plane by channel plane, while the bilinear corners are read from (and
// the gradient scattered into) pixel-major rows (each pixel's channels contiguous), one vector
// per corner and block of L channels instead of one gather element per channel.
//
// The image is cut into strips (kStrip columns in the backward; in the forward as wide as leaves
// two per thread), each run down the image by one thread (work items handed out from a shared
// counter, so a thread slowed by another process takes fewer).
// A strip's corners come from a window of the rows and columns its flow reaches (strip_window,
// from the flow before anything else): a ring of pixel-major rows of img_tk and q_tk =
// softmax_C(pred_tk) (on="logit": pred_tk as float), and in the backward of d q_tk: a few MiB
// per thread for flows of tens of pixels at any image size (it grows with the flow's reach, up to
// the whole image), mostly in the caches, instead of copies of whole images. Per row of a strip:
//  - rows the strip now reaches enter the window (softmax and transpose of pred_tk's rows);
//  - pass A over the row's chunks: taps, occlusion weight V^p, q_t, the warped corners and their
//    flow derivatives (transposed to planar), the channel loop (loss, d flow, d pred_t), and in
//    the backward d q_tk = sum of w_k (-dq) scattered into the window in pixel order;
//  - rows no later row reaches leave it (backward): d pred_tk = q (d q - <q, d q>) of the
//    strip's part of d q_tk (the softmax backward is linear, so the parts of strips whose
//    windows overlap add up), transposed into d pred_tk's planar rows.
// The backward's strips of a batch item run in phases, the windows of one phase disjoint: no
// atomics, and each pixel of d pred_tk receives its parts in the same order for any number of
// threads (the same bits).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "temporal_loss/temporal_loss_host.h"

namespace tcloss {
namespace {

constexpr int64_t kTile = 128;  // pixels per chunk (19 channels: ~40 KiB of rows)
// Columns per strip. A strip's window reaches as far as its flow beyond it on both sides, so
// each column of the corner source is built (and of d q_tk flushed) by ~1 + 2 reach / kStrip
// strips: two chunks a row measured faster than one (AMD EPYC, fwd+bwd 2x19x256x512 min 36-37 vs
// 39-42 ms with 1 thread, 18.5-18.6 vs 20.5-20.7 ms with 2; 1x19x512x1024 106-108 vs 116-119 ms).
constexpr int64_t kStrip = 2 * kTile;

// Items [0, n) handed out `chunk` at a time from a shared counter to at most get_num_threads()
// threads; make() builds one thread's worker (its scratch), called as work(lo, hi). The result
// of an item must not depend on which thread runs it (true of every use).
template <typename MakeWorker>
void parallel_items(int64_t n, int64_t chunk, MakeWorker make) {
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    auto work = make();
    for (int64_t i; (i = next.fetch_add(chunk, std::memory_order_relaxed)) < n;) work(i, std::min(n, i + chunk));
  });
}

// What the float orchestration reads and writes; planes are (B, C or Ci or 2, H, W).
template <typename S>
struct Ctx {
  const S* pt;
  const float *flow, *it, *itk, *grad;
  bool grad_map;
  float grad_mul;
  int64_t B, C, Ci, H, W, HW;
  bool on_prob, zeros_pad;
  int mask_mode;
  float mask_power;
  bool grads;   // pass A accumulates the gradient reductions
  float* loss;  // (B,H,W) or null
  float* gfl;   // (B,2,H,W) or null
  S* gpt;       // (B,C,H,W) or null
  float* gptk;  // (B,C,H,W) or null
};

// Asks for transparent huge pages on a fresh buffer's whole 2 MiB pages, before it is first
// touched: corners read or scattered at random cost a TLB miss per corner row on 4 KiB pages,
// and a buffer allocated anew by every call one page fault per 4 KiB. A hint only: ignored
// where THP is off.
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr), e = p + bytes;
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = e & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)ptr, (void)bytes;
#endif
}

// temporal_loss_simd.h once per instruction set (common/isa.h); run_isa() picks one at first use.
#define TC_ISA_BODY "temporal_loss/temporal_loss_simd.h"
#include "common/isa.h"
#undef TC_ISA_BODY

void run_isa(const Ctx<float>& X, const float* ptk) { TC_ISA_CALL(run_f32, X, ptk) }
void run_isa(const Ctx<at::Half>& X, const at::Half* ptk) { TC_ISA_CALL(run_f16, X, ptk) }
void run_isa(const Ctx<at::BFloat16>& X, const at::BFloat16* ptk) { TC_ISA_CALL(run_bf16, X, ptk) }

template <typename S>
void run_rows(const TLTensors& T) {
  const TLParams& P = T.P;
  const int64_t HW = P.H * P.W;
  Ctx<S> X{};
  X.pt = T.pt.data_ptr<S>();
  X.flow = T.flow.data_ptr<float>();
  X.it = T.it.data_ptr<float>();
  X.itk = T.itk.data_ptr<float>();
  X.grad = T.grad.defined() ? T.grad.data_ptr<float>() : nullptr;
  X.grad_map = T.grad.defined() && T.grad.numel() > 1;
  X.grad_mul = static_cast<float>(T.grad_mul);
  X.B = P.B, X.C = P.C, X.Ci = P.Ci, X.H = P.H, X.W = P.W, X.HW = HW;
  X.on_prob = P.on_prob, X.zeros_pad = P.zeros_pad, X.mask_mode = P.mask_mode;
  X.mask_power = static_cast<float>(P.mask_power);
  X.grads = P.g_pt || P.g_ptk || P.g_flow;
  X.loss = T.loss_map.defined() ? T.loss_map.data_ptr<float>() : nullptr;
  X.gfl = P.g_flow ? T.g_flow.data_ptr<float>() : nullptr;
  X.gpt = P.g_pt ? T.g_pt.data_ptr<S>() : nullptr;
  X.gptk = P.g_ptk ? T.g_ptk_acc.data_ptr<float>() : nullptr;

  run_isa(X, T.ptk.data_ptr<S>());
}

// --- float64: the GPU's per-pixel orchestration ------------------------------------------------

// d pred_tk adds of one pixel's four corners (the Scatter of temporal_loss_pixel): plain adds,
// each batch item's rows run by one thread.
struct CornerScatter {
  template <typename TAPS>
  void prepare(const TAPS&) const {}
  template <typename T, typename TAPS>
  void operator()(T* plane, const TAPS& t, const T gk[4]) const {
    for (int k = 0; k < 4; ++k)
      if (t.valid[k] && t.w[k] != T(0)) plane[t.off[k]] += gk[k];
  }
};

template <typename scalar_t, typename acc_t>
void rows_per_pixel(const TLTensors& T, const SoftmaxStats<acc_t>* st_tk, int64_t row_lo, int64_t row_hi) {
  const TLParams& P = T.P;
  const acc_t* grad = T.grad.defined() ? T.grad.data_ptr<acc_t>() : nullptr;
  const bool grad_map = grad && T.grad.numel() > 1;
  const acc_t mul = static_cast<acc_t>(T.grad_mul);
  scalar_t* gpt = T.g_pt.defined() ? T.g_pt.data_ptr<scalar_t>() : nullptr;
  acc_t* gptk = T.g_ptk_acc.defined() ? T.g_ptk_acc.data_ptr<acc_t>() : nullptr;
  acc_t* gfl = T.g_flow.defined() ? T.g_flow.data_ptr<acc_t>() : nullptr;
  acc_t* loss = T.loss_map.defined() ? T.loss_map.data_ptr<acc_t>() : nullptr;
  CornerScatter scatter;
  for (int64_t r = row_lo; r < row_hi; ++r) {
    const TLItem<scalar_t, acc_t> I =
        tl_item<scalar_t, acc_t>(P, r / P.H, T.pt.data_ptr<scalar_t>(), T.ptk.data_ptr<scalar_t>(),
                                 T.flow.data_ptr<acc_t>(), T.it.data_ptr<acc_t>(), T.itk.data_ptr<acc_t>(), st_tk,
                                 gpt, gptk, gfl);
    for (int64_t x = 0; x < P.W; ++x) {
      const int64_t i = r * P.W + x;
      acc_t l;
      if (P.g_pt || P.g_ptk || P.g_flow) {
        const acc_t g = mul * grad[grad_map ? i : 0];
        l = temporal_loss_pixel<true, scalar_t, acc_t, int64_t>(P, I, r % P.H, x, g, scatter);
      } else {
        l = temporal_loss_pixel<false, scalar_t, acc_t, int64_t>(P, I, r % P.H, x, acc_t(0), scatter);
      }
      if (loss) loss[i] = l;
    }
  }
}

template <typename scalar_t, typename acc_t>
void run_per_pixel(const TLTensors& T) {
  const TLParams& P = T.P;
  const int64_t HW = P.H * P.W, nrows = P.B * P.H;
  if (P.g_ptk) {  // scattered into at random corners: huge pages, then zeros
    advise_huge_pages(T.g_ptk_acc.data_ptr(), T.g_ptk_acc.nbytes());
    T.g_ptk_acc.zero_();
  }
  at::Tensor st_tk;
  const SoftmaxStats<acc_t>* pst_tk = nullptr;
  if (P.on_prob) {
    st_tk = tl_softmax_stats_buffer(P, T.flow);
    auto* k = reinterpret_cast<SoftmaxStats<acc_t>*>(st_tk.data_ptr<acc_t>());
    const scalar_t* ptk = T.ptk.data_ptr<scalar_t>();
    at::parallel_for(0, P.B * HW, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) k[i] = channel_softmax_stats<scalar_t, acc_t>(ptk + (i / HW) * P.C * HW + i % HW, P.C, HW);
    });
    pst_tk = k;
  }
  if (!P.g_ptk) {
    // No scatter: rows may run in any order.
    at::parallel_for(0, nrows, 4, [&](int64_t lo, int64_t hi) { rows_per_pixel<scalar_t, acc_t>(T, pst_tk, lo, hi); });
  } else {
    // One thread per batch item owns its slice of d pred_tk: the same bits for any number of
    // threads (float64 is the exactness path, not a speed path).
    at::parallel_for(0, P.B, 1, [&](int64_t lo, int64_t hi) {
      rows_per_pixel<scalar_t, acc_t>(T, pst_tk, lo * P.H, hi * P.H);
    });
  }
}

void run_cpu(TLTensors& T) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.pt.scalar_type(), "tcloss_temporal_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<scalar_t, double>) {
      run_per_pixel<scalar_t, acc_t>(T);
    } else {
      // int32 offsets into a strip's window (at most (C + Ci)(H W + 1) floats); larger images
      // take the per-pixel path
      if ((T.P.C + T.P.Ci) * (T.P.H * T.P.W + 1) < (int64_t(1) << 31)) run_rows<scalar_t>(T);
      else run_per_pixel<scalar_t, acc_t>(T);
    }
  });
}

at::Tensor fwd_cpu(const at::Tensor& pred_t, const at::Tensor& pred_tk, const at::Tensor& flow,
                   const at::Tensor& img_t, const at::Tensor& img_tk, bool on_prob, int64_t mask_mode,
                   double mask_power, bool zeros_padding, int64_t reduction) {
  return temporal_loss_fwd_impl(run_cpu, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power,
                                zeros_padding, reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad, const at::Tensor& pred_t, const at::Tensor& pred_tk, const at::Tensor& flow,
    const at::Tensor& img_t, const at::Tensor& img_tk, bool on_prob, int64_t mask_mode, double mask_power,
    bool zeros_padding, int64_t reduction, bool g_pt, bool g_ptk, bool g_flow) {
  return temporal_loss_bwd_impl(run_cpu, grad, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode,
                                mask_power, zeros_padding, reduction, g_pt, g_ptk, g_flow);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcloss, CPU, m) {
  m.impl("temporal_loss_fwd", &fwd_cpu);
  m.impl("temporal_loss_bwd", &bwd_cpu);
}

}  // namespace tcloss
