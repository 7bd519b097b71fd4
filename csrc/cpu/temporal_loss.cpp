// C++ CPU kernels of the fused temporal loss: at::parallel_for over rows, per-pixel math from
// kernels/temporal_loss.h. The scatter into d pred_tk is race-free: plain adds when one thread
// owns each batch item (or runs alone), lock-free compare-and-swap adds otherwise.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../temporal_loss_host.h"

namespace tcloss {
namespace {

struct PlainAdd {
  template <typename T>
  void operator()(T* p, T v) const { *p += v; }
};

struct CasAdd {
  template <typename T>
  void operator()(T* p, T v) const {
    using I = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    I* ip = reinterpret_cast<I*>(p);
    I old = __atomic_load_n(ip, __ATOMIC_RELAXED), nxt;
    do {
      T cur;
      std::memcpy(&cur, &old, sizeof(T));
      const T s = cur + v;
      std::memcpy(&nxt, &s, sizeof(T));
    } while (!__atomic_compare_exchange_n(ip, &old, nxt, /*weak=*/true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  }
};

template <typename scalar_t, typename acc_t>
void lse_pass(const TLTensors& T) {
  const TLParams& P = T.P;
  const int64_t HW = P.H * P.W;
  const scalar_t* pt = T.pt.data_ptr<scalar_t>();
  const scalar_t* ptk = T.ptk.data_ptr<scalar_t>();
  acc_t* lt = T.lse_t.data_ptr<acc_t>();
  acc_t* lk = T.lse_tk.data_ptr<acc_t>();
  at::parallel_for(0, P.B * HW, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / HW, pix = i % HW;
      lt[i] = channel_lse<scalar_t, acc_t>(pt + b * P.C * HW + pix, P.C, HW);
      lk[i] = channel_lse<scalar_t, acc_t>(ptk + b * P.C * HW + pix, P.C, HW);
    }
  });
}

template <typename scalar_t, typename acc_t, typename Add>
void rows(const TLTensors& T, int64_t row_lo, int64_t row_hi, Add add) {
  const TLParams& P = T.P;
  const acc_t* grad = T.grad.defined() ? T.grad.data_ptr<acc_t>() : nullptr;
  const bool grad_map = grad && T.grad.numel() > 1;
  const acc_t mul = static_cast<acc_t>(T.grad_mul);
  const acc_t* lt = T.lse_t.defined() ? T.lse_t.data_ptr<acc_t>() : nullptr;
  const acc_t* lk = T.lse_tk.defined() ? T.lse_tk.data_ptr<acc_t>() : nullptr;
  scalar_t* gpt = T.g_pt.defined() ? T.g_pt.data_ptr<scalar_t>() : nullptr;
  acc_t* gptk = T.g_ptk_acc.defined() ? T.g_ptk_acc.data_ptr<acc_t>() : nullptr;
  acc_t* gfl = T.g_flow.defined() ? T.g_flow.data_ptr<acc_t>() : nullptr;
  acc_t* loss = T.loss_map.data_ptr<acc_t>();
  const scalar_t* pt = T.pt.data_ptr<scalar_t>();
  const scalar_t* ptk = T.ptk.data_ptr<scalar_t>();
  const acc_t* flow = T.flow.data_ptr<acc_t>();
  const acc_t* it = T.it.data_ptr<acc_t>();
  const acc_t* itk = T.itk.data_ptr<acc_t>();
  const bool need_scratch = (P.g_pt || P.g_ptk) && (grad || mul != acc_t(0));
  std::vector<acc_t> scratch(need_scratch ? 5 * P.C : 0);
  for (int64_t r = row_lo; r < row_hi; ++r) {
    const int64_t b = r / P.H, y = r % P.H;
    for (int64_t x = 0; x < P.W; ++x) {
      const int64_t i = r * P.W + x;
      const acc_t g = mul * (grad ? grad[grad_map ? i : 0] : acc_t(1));
      loss[i] = temporal_loss_pixel<scalar_t, acc_t, Add>(
          P, b, y, x, pt, ptk, flow, it, itk, lt, lk, g, gpt, gptk, gfl, add,
          need_scratch ? scratch.data() : nullptr);
    }
  }
}

void run_cpu(TLTensors& T) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.pt.scalar_type(), "tcloss_temporal_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (T.P.on_prob) lse_pass<scalar_t, acc_t>(T);
    const TLParams& P = T.P;
    const int64_t nrows = P.B * P.H;
    const int nthreads = at::get_num_threads();
    if (!P.g_ptk || nthreads == 1) {
      // No scatter, or a single thread: rows may run in any order.
      at::parallel_for(0, nrows, 4, [&](int64_t lo, int64_t hi) { rows<scalar_t, acc_t>(T, lo, hi, PlainAdd{}); });
    } else if (P.B >= nthreads) {
      // One thread per batch item owns its slice of d pred_tk: deterministic plain adds.
      at::parallel_for(0, P.B, 1, [&](int64_t lo, int64_t hi) {
        rows<scalar_t, acc_t>(T, lo * P.H, hi * P.H, PlainAdd{});
      });
    } else {
      at::parallel_for(0, nrows, 4, [&](int64_t lo, int64_t hi) { rows<scalar_t, acc_t>(T, lo, hi, CasAdd{}); });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& pred_t, const at::Tensor& pred_tk, const at::Tensor& flow, const at::Tensor& img_t,
    const at::Tensor& img_tk, bool on_prob, int64_t mask_mode, double mask_power, bool zeros_padding,
    int64_t reduction, bool g_pt, bool g_ptk, bool g_flow) {
  return temporal_loss_fwd_impl(run_cpu, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power,
                                zeros_padding, reduction, g_pt, g_ptk, g_flow);
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
