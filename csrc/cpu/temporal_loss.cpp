// C++ CPU kernels of the fused temporal loss: at::parallel_for over rows, per-pixel math from
// kernels/temporal_loss.h (the same functions the CUDA kernel runs).
//
// CPU-specific: the exponentials. Per chunk of pixels the softmax arguments (pred_t and the four
// bilinear corners of pred_tk, minus their per-pixel log-sum-exp) are gathered into one buffer
// and exponentiated by one vectorised loop (a Cephes-style expf, ~1 ulp, multiversioned for
// AVX2), then the shared per-pixel function reads q from that buffer. The scatter into
// d pred_tk is race-free: plain adds when one thread owns each batch item (or runs alone),
// lock-free compare-and-swap adds otherwise.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
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

// exp(x) for x <= 0 (softmax arguments): 2^n * p(r), r = x - n ln2, Cephes' degree-6
// polynomial; branch-free so the loop below vectorises. NaN stays NaN, x < -87.3 gives 0.
inline float expf_nonpos(float x) {
  const float keep = x >= -87.3f ? 1.f : 0.f;  // NaN: 0, and NaN * 0 stays NaN below
  x = x < -87.3f ? -87.3f : x;
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale * keep;
}

// setup.py compiles the CPU kernels with -fno-trapping-math, which lets GCC if-convert the
// selects above (results are unchanged: it only drops the assumption that FP exceptions trap);
// the vectoriser needs that.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void exp_inplace(float* p, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] = expf_nonpos(p[i]);
}

void exp_inplace(double* p, int64_t n) {  // float64 (gradcheck): the exact libm exp
  for (int64_t i = 0; i < n; ++i) p[i] = std::exp(p[i]);
}

// log-sum-exp over channels for one row of W pixels (channel stride HW), vectorised over x.
template <typename scalar_t, typename acc_t>
void lse_row(const scalar_t* p, int64_t C, int64_t HW, int64_t W, acc_t* out, acc_t* m, acc_t* s, acc_t* tmp) {
  for (int64_t x = 0; x < W; ++x) m[x] = static_cast<acc_t>(p[x]);
  for (int64_t c = 1; c < C; ++c)
    for (int64_t x = 0; x < W; ++x) m[x] = std::max(m[x], static_cast<acc_t>(p[c * HW + x]));
  std::fill(s, s + W, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t x = 0; x < W; ++x) {
      // a non-finite max (inf/NaN logits) is kept as is below; avoid inf - inf here
      const acc_t mx = is_finite(m[x]) ? m[x] : acc_t(0);
      tmp[x] = static_cast<acc_t>(p[c * HW + x]) - mx;
    }
    exp_inplace(tmp, W);
    for (int64_t x = 0; x < W; ++x) s[x] += tmp[x];
  }
  for (int64_t x = 0; x < W; ++x) out[x] = is_finite(m[x]) ? m[x] + std::log(s[x]) : m[x];
}

template <typename scalar_t, typename acc_t>
void lse_pass(const TLTensors& T) {
  const TLParams& P = T.P;
  const int64_t HW = P.H * P.W;
  const scalar_t* pt = T.pt.data_ptr<scalar_t>();
  const scalar_t* ptk = T.ptk.data_ptr<scalar_t>();
  acc_t* lt = T.lse_t.data_ptr<acc_t>();
  acc_t* lk = T.lse_tk.data_ptr<acc_t>();
  at::parallel_for(0, P.B * P.H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(3 * P.W);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / P.H, off = b * P.C * HW + (r % P.H) * P.W;
      lse_row<scalar_t, acc_t>(pt + off, P.C, HW, P.W, lt + r * P.W, buf.data(), buf.data() + P.W, buf.data() + 2 * P.W);
      lse_row<scalar_t, acc_t>(ptk + off, P.C, HW, P.W, lk + r * P.W, buf.data(), buf.data() + P.W, buf.data() + 2 * P.W);
    }
  });
}

template <typename scalar_t, typename acc_t, typename Add>
void rows(const TLTensors& T, int64_t row_lo, int64_t row_hi, Add add) {
  const TLParams& P = T.P;
  const int64_t HW = P.H * P.W, C = P.C;
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
  // q of a chunk of pixels: [pixel][q_t (C) | corner 0..3 (C each)]
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(P.W, 8192 / (5 * C)));
  std::vector<acc_t> q(chunk * 5 * C);
  std::vector<uint8_t> invalid(chunk * 4);
  for (int64_t r = row_lo; r < row_hi; ++r) {
    const int64_t b = r / P.H, y = r % P.H;
    const scalar_t* pt_b = pt + b * C * HW;
    const scalar_t* ptk_b = ptk + b * C * HW;
    for (int64_t x0 = 0; x0 < P.W; x0 += chunk) {
      const int64_t n = std::min(chunk, P.W - x0);
      for (int64_t j = 0; j < n; ++j) {  // gather the softmax arguments
        const int64_t x = x0 + j, pix = y * P.W + x;
        acc_t* qj = q.data() + j * 5 * C;
        const acc_t l = P.on_prob ? lt[b * HW + pix] : acc_t(0);
        for (int64_t c = 0; c < C; ++c) qj[c] = static_cast<acc_t>(pt_b[c * HW + pix]) - l;
        BilinearTaps<acc_t> t;
        bilinear_taps<acc_t>(acc_t(x) + flow[(b * 2) * HW + pix], acc_t(y) + flow[(b * 2 + 1) * HW + pix], P.H, P.W,
                             P.zeros_pad, t);
        for (int k = 0; k < 4; ++k) {
          acc_t* qk = qj + (k + 1) * C;
          invalid[j * 4 + k] = !(t.finite && t.valid[k]);
          if (invalid[j * 4 + k]) {
            std::fill(qk, qk + C, acc_t(0));
          } else {
            const acc_t lkk = P.on_prob ? lk[b * HW + t.off[k]] : acc_t(0);
            for (int64_t c = 0; c < C; ++c) qk[c] = static_cast<acc_t>(ptk_b[c * HW + t.off[k]]) - lkk;
          }
        }
      }
      if (P.on_prob) {
        exp_inplace(q.data(), n * 5 * C);
        for (int64_t j = 0; j < n; ++j)
          for (int k = 0; k < 4; ++k)
            if (invalid[j * 4 + k]) std::fill(q.data() + (j * 5 + k + 1) * C, q.data() + (j * 5 + k + 2) * C, acc_t(0));
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t x = x0 + j, i = r * P.W + x;
        const acc_t g = mul * (grad ? grad[grad_map ? i : 0] : acc_t(1));
        loss[i] = temporal_loss_pixel<scalar_t, acc_t, Add>(P, b, y, x, pt, ptk, flow, it, itk, lt, lk, g, gpt, gptk,
                                                            gfl, add, q.data() + j * 5 * C);
      }
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
