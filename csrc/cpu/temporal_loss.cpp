// C++ CPU kernels of the fused temporal loss: at::parallel_for over rows, math from
// kernels/temporal_loss.h (the same functions the CUDA kernel runs). float64 runs the GPU's
// per-pixel orchestration verbatim (its scatter into d pred_tk: plain adds when one thread owns
// each batch item or runs alone, lock-free compare-and-swap adds otherwise);
// float/half/bfloat16 run a blocked one (run_blocked) that walks channel planes in order,
// exponentiates gathered softmax arguments with one vectorised loop (a Cephes-style expf,
// ~1 ulp, multiversioned for AVX2) and parallelises the scatter over channels (race-free and
// deterministic without atomics). Both call the same per-channel pieces
// (tl_channel_accumulate / tl_channel_grads).
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

// The GPU's orchestration, verbatim: one pixel at a time (used for float64, so the float64
// tests, gradcheck included, run exactly the per-pixel code of the CUDA kernel).
template <typename scalar_t, typename acc_t, typename Add>
void rows_per_pixel(const TLTensors& T, int64_t row_lo, int64_t row_hi, Add add) {
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
  for (int64_t r = row_lo; r < row_hi; ++r) {
    for (int64_t x = 0; x < P.W; ++x) {
      const int64_t i = r * P.W + x;
      const acc_t g = mul * (grad ? grad[grad_map ? i : 0] : acc_t(1));
      loss[i] = temporal_loss_pixel<scalar_t, acc_t, Add>(
          P, r / P.H, r % P.H, x, T.pt.data_ptr<scalar_t>(), T.ptk.data_ptr<scalar_t>(), T.flow.data_ptr<acc_t>(),
          T.it.data_ptr<acc_t>(), T.itk.data_ptr<acc_t>(), lt, lk, g, gpt, gptk, gfl, add);
    }
  }
}

// The CPU orchestration for float/half/bfloat16, over blocks of rows:
//  pass 1, parallel over rows: per pixel the taps, V^p and the channel reductions
//          (tl_channel_accumulate), kept for the block; loss and d flow written;
//  pass 2, parallel over channels: d pred_t and the scatter into d pred_tk
//          (tl_channel_grads). A channel's scatter only touches that channel's plane, so each
//          thread owns what it writes: plain adds, no atomics, deterministic.
// Channel planes are always walked along x (one element per plane per pixel would thrash the
// TLB), and softmax arguments are exponentiated by one vectorised loop per gathered run.
template <typename scalar_t, typename acc_t>
struct Block {
  const TLTensors& T;
  const TLParams& P;
  int64_t HW;
  std::vector<BilinearTaps<acc_t>> taps;
  std::vector<TLAccum<acc_t>> acc;
  std::vector<acc_t> vp, k2;
  int64_t NB;               // pixels per block
  std::vector<acc_t> qbuf;  // q of the block, [channel][slot][pixel]: pass 2 reuses pass 1's

  Block(const TLTensors& T_, int64_t max_pixels, bool keep_q)
      : T(T_), P(T_.P), HW(T_.P.H * T_.P.W), taps(max_pixels), acc(max_pixels), vp(max_pixels), k2(max_pixels),
        NB(max_pixels), qbuf(keep_q ? 5 * T_.P.C * max_pixels : 0) {}
  acc_t* qc(int64_t c) { return qbuf.data() + c * 5 * NB; }

  const scalar_t* pt() const { return T.pt.template data_ptr<scalar_t>(); }
  const scalar_t* ptk() const { return T.ptk.template data_ptr<scalar_t>(); }
  const acc_t* lse(const at::Tensor& l) const { return l.defined() ? l.template data_ptr<acc_t>() : nullptr; }

  // q of channel c for pixels j0..j0+n of the block (first pixel pix0 of the run): slot 0 =
  // q_t, slots 1..4 = the corners (0 outside the image). Layout q[slot * ns + j].
  void gather_channel(int64_t b, int64_t c, int64_t pix0, int64_t j0, int64_t n, acc_t* q, int64_t ns) const {
    const acc_t* lt = lse(T.lse_t);
    const acc_t* lk = lse(T.lse_tk);
    const scalar_t* ptc = pt() + (b * P.C + c) * HW + pix0;
    const scalar_t* pkc = ptk() + (b * P.C + c) * HW;
    for (int64_t j = 0; j < n; ++j) q[j] = static_cast<acc_t>(ptc[j]) - (P.on_prob ? lt[b * HW + pix0 + j] : acc_t(0));
    for (int k = 0; k < 4; ++k)
      for (int64_t j = 0; j < n; ++j) {
        const BilinearTaps<acc_t>& t = taps[j0 + j];
        q[(k + 1) * ns + j] = t.valid[k] ? static_cast<acc_t>(pkc[t.off[k]]) - (P.on_prob ? lk[b * HW + t.off[k]] : acc_t(0))
                                         : acc_t(0);
      }
    if (P.on_prob) {
      for (int slot = 0; slot < 5; ++slot) exp_inplace(q + slot * ns, n);
      for (int k = 0; k < 4; ++k)
        for (int64_t j = 0; j < n; ++j)
          if (!taps[j0 + j].valid[k]) q[(k + 1) * ns + j] = acc_t(0);
    }
  }

  // Pass 1 for row r (its pixels start at j0 in the block): fills taps/vp/k2/acc.
  void pass1(int64_t r, int64_t j0, std::vector<acc_t>& q) {
    const int64_t b = r / P.H, y = r % P.H, W = P.W, pix0 = y * W;
    const acc_t* flow = T.flow.template data_ptr<acc_t>();
    const acc_t* it = T.it.template data_ptr<acc_t>() + b * P.Ci * HW;
    const acc_t* itk = T.itk.template data_ptr<acc_t>() + b * P.Ci * HW;
    const acc_t* grad = T.grad.defined() ? T.grad.template data_ptr<acc_t>() : nullptr;
    const bool grad_map = grad && T.grad.numel() > 1;
    const acc_t mul = static_cast<acc_t>(T.grad_mul);
    const bool want_grads = P.g_pt || P.g_ptk || P.g_flow;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t j = j0 + x, pix = pix0 + x;
      BilinearTaps<acc_t>& t = taps[j];
      bilinear_taps<acc_t>(acc_t(x) + flow[(b * 2) * HW + pix], acc_t(y) + flow[(b * 2 + 1) * HW + pix], P.H, W,
                           P.zeros_pad, t);
      const acc_t g = mul * (grad ? grad[grad_map ? r * W + x : 0] : acc_t(1));
      vp[j] = t.finite ? mask_weight<acc_t>(P, it, itk, pix, t) : acc_t(0);
      k2[j] = want_grads ? acc_t(2) * g * vp[j] : acc_t(0);  // dl/d(diff) = 2 g V^p diff
      acc[j] = TLAccum<acc_t>();
    }
    const bool keep = !qbuf.empty();
    for (int64_t c = 0; c < P.C; ++c) {
      // into the block buffer when pass 2 will need it, else a row-sized scratch
      acc_t* qq = keep ? qc(c) + j0 : q.data();
      const int64_t ns = keep ? NB : W;
      gather_channel(b, c, pix0, j0, W, qq, ns);
      for (int64_t x = 0; x < W; ++x) {
        const int64_t j = j0 + x;
        const acc_t qk[4] = {qq[ns + x], qq[2 * ns + x], qq[3 * ns + x], qq[4 * ns + x]};
        tl_channel_accumulate<acc_t>(taps[j], qq[x], qk, k2[j] != acc_t(0), k2[j], acc[j]);
      }
    }
    acc_t* loss = T.loss_map.template data_ptr<acc_t>() + r * W;
    acc_t* gfl = T.g_flow.defined() ? T.g_flow.template data_ptr<acc_t>() : nullptr;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t j = j0 + x;
      // a non-finite flow gives a NaN loss and no gradient (k2 = 0), as in the reference
      loss[x] = taps[j].finite ? acc[j].sumsq * vp[j] : acc_t(NAN);
      if (gfl) {
        gfl[(b * 2) * HW + pix0 + x] = acc[j].gx;
        gfl[(b * 2 + 1) * HW + pix0 + x] = acc[j].gy;
      }
    }
  }

  // Pass 2 for channel c over the block rows [r0, r1), from the q kept by pass 1.
  void pass2(int64_t c, int64_t r0, int64_t r1) {
    const int64_t W = P.W, ns = NB;
    scalar_t* gpt = T.g_pt.defined() ? T.g_pt.template data_ptr<scalar_t>() : nullptr;
    acc_t* gptk = T.g_ptk_acc.defined() ? T.g_ptk_acc.template data_ptr<acc_t>() : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / P.H, pix0 = (r % P.H) * W, j0 = (r - r0) * W;
      const acc_t* q = qc(c) + j0;
      scalar_t* gptc = gpt ? gpt + (b * P.C + c) * HW + pix0 : nullptr;
      acc_t* gpkc = gptk ? gptk + (b * P.C + c) * HW : nullptr;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t j = j0 + x;
        const BilinearTaps<acc_t>& t = taps[j];
        const acc_t qk[4] = {q[ns + x], q[2 * ns + x], q[3 * ns + x], q[4 * ns + x]};
        acc_t gk[4];
        const acc_t d = tl_channel_grads<acc_t>(t, q[x], qk, k2[j], P.on_prob, acc[j], gk);
        if (gptc) gptc[x] = static_cast<scalar_t>(d);
        if (gpkc && k2[j] != acc_t(0))
          for (int k = 0; k < 4; ++k)
            if (t.valid[k] && t.w[k] != acc_t(0)) gpkc[t.off[k]] += gk[k];
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
void run_blocked(const TLTensors& T) {
  const TLParams& P = T.P;
  const int64_t nrows = P.B * P.H;
  const bool pass2 = P.g_pt || P.g_ptk;
  // rows per block: enough pixels to amortise the two parallel regions, few enough to stay
  // in cache: about 16K pixels of per-pixel state, and at most ~8 MB of kept q (5 C values a
  // pixel) when pass 2 runs
  const int64_t want_px = pass2 ? std::min<int64_t>(16384, (int64_t(1) << 21) / (5 * P.C)) : 16384;
  const int64_t block_rows = std::max<int64_t>(1, std::min<int64_t>(nrows, want_px / std::max<int64_t>(P.W, 1)));
  Block<scalar_t, acc_t> blk(T, block_rows * P.W, pass2);
  for (int64_t r0 = 0; r0 < nrows; r0 += block_rows) {
    const int64_t r1 = std::min(nrows, r0 + block_rows);
    at::parallel_for(r0, r1, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> q(5 * P.W);
      for (int64_t r = lo; r < hi; ++r) blk.pass1(r, (r - r0) * P.W, q);
    });
    if (pass2)
      at::parallel_for(0, P.C, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t c = lo; c < hi; ++c) blk.pass2(c, r0, r1);
      });
  }
}

void run_cpu(TLTensors& T) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.pt.scalar_type(), "tcloss_temporal_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (T.P.on_prob) lse_pass<scalar_t, acc_t>(T);
    if constexpr (!std::is_same_v<scalar_t, double>) {
      run_blocked<scalar_t, acc_t>(T);
    } else {
      const TLParams& P = T.P;
      const int64_t nrows = P.B * P.H;
      const int nthreads = at::get_num_threads();
      if (!P.g_ptk || nthreads == 1) {
        // No scatter, or a single thread: rows may run in any order.
        at::parallel_for(0, nrows, 4, [&](int64_t lo, int64_t hi) { rows_per_pixel<scalar_t, acc_t>(T, lo, hi, PlainAdd{}); });
      } else if (P.B >= nthreads) {
        // One thread per batch item owns its slice of d pred_tk: deterministic plain adds.
        at::parallel_for(0, P.B, 1, [&](int64_t lo, int64_t hi) {
          rows_per_pixel<scalar_t, acc_t>(T, lo * P.H, hi * P.H, PlainAdd{});
        });
      } else {
        at::parallel_for(0, nrows, 4, [&](int64_t lo, int64_t hi) { rows_per_pixel<scalar_t, acc_t>(T, lo, hi, CasAdd{}); });
      }
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
