// C++ CPU kernels of the fused ConvLSTM cell (eq. 6): at::parallel_for over (batch chunk,
// column block) tasks, per-element math from convlstm_cell.h. Inside a task the batch loop
// is outermost and the columns innermost, so every plane is streamed contiguously and the
// peephole partial sums of the task's columns stay in its own slice of the partial buffer.
//
// Speed: for float, half and bfloat16 the column loop runs the shared element formulas on
// 8-lane GCC vectors (v8f) with VecMath, a branch-free exp (common/exp.h: Cody-Waite reduction +
// the Cephes degree-6 polynomial, ~1 ulp) in place of libm's scalar expf/tanhf; on x86 the task
// bodies are compiled a second time for AVX2+FMA, picked at run time. float64 keeps scalar libm
// (it is the gradcheck precision, not a speed path).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

// v8f values only ever live inside always-inlined code: the vector-ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "convlstm_cell/convlstm_cell_host.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TCLOSS_X86_DISPATCH 1
#define TCLOSS_AVX2 __attribute__((target("avx2,fma")))
#else
#define TCLOSS_X86_DISPATCH 0
#define TCLOSS_AVX2
#endif

#if defined(__GNUC__)
#define TCLOSS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TCLOSS_ALWAYS_INLINE inline
#endif

namespace tcloss {
namespace {

constexpr int64_t kColBlock = 2048;

#include "common/exp.h"

// 8 float lanes as a GCC vector type: the element formulas of convlstm_cell.h run on it
// unchanged (one SSE/AVX instruction per operation; AVX2+FMA in the *_avx2 clones below).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

TCLOSS_ALWAYS_INLINE v8f splat(float x) { return v8f{} + x; }

// Vectorised transcendentals (v8f); scalar double goes to libm (the gradcheck precision).
struct VecMath {
  static TCLOSS_ALWAYS_INLINE v8f exp(v8f x) {
    // 2^k e^r, k = round(x log2 e) (common/exp.h). Outside [-87, 88] the result is 0 or inf
    // (the true values there are below 1.7e-38 or above 1.6e38: no difference to a sigmoid or
    // tanh in float).
    const v8f lo = splat(-87.0f), hi = splat(88.0f);
    v8f xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const v8f fx = xc * 1.44269504088896341f;
    const v8i k = __builtin_convertvector(fx + (fx >= 0 ? splat(0.5f) : splat(-0.5f)), v8i);
    v8f y = exp_reduced<v8f, v8i>(xc, __builtin_convertvector(k, v8f));
    y = x > hi ? splat(__builtin_inff()) : y;
    y = x < lo ? splat(0.0f) : y;
    return x != x ? x : y;  // NaN propagates
  }
  static TCLOSS_ALWAYS_INLINE v8f tanh(v8f x) {
    const v8f ax = x < 0 ? -x : x;
    const v8f e = exp(-2.0f * ax);
    v8f t = (1.0f - e) / (1.0f + e);
    t = x < 0 ? -t : t;
    // Near 0, 1 - e cancels: odd Taylor series there (next term 62x^9/2835 < 3e-11 relative at 0.1).
    const v8f x2 = x * x;
    const v8f s = x + x * x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.053968254f));
    return ax < 0.1f ? s : t;
  }
};

// Lane loads/stores of n <= 8 elements (a short tail is zero-padded and not stored back).
template <typename T>
TCLOSS_ALWAYS_INLINE v8f load8(const T* p, int64_t n) {
  v8f v;
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) {
      std::memcpy(&v, p, sizeof(v));  // one unaligned vector load
      return v;
    }
  }
  float tmp[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t l = 0; l < n; ++l) tmp[l] = static_cast<float>(p[l]);
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

template <typename T>
TCLOSS_ALWAYS_INLINE void store8(T* p, v8f v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) {
      std::memcpy(p, &v, sizeof(v));
      return;
    }
  }
  float tmp[kLanes];
  std::memcpy(tmp, &v, sizeof(tmp));
  for (int64_t l = 0; l < n; ++l) p[l] = static_cast<T>(tmp[l]);
}

// Columns [j0, j1) of one batch item. float / half / bfloat16: 8 lanes of float math.
template <typename scalar_t, typename acc_t, bool PEEP>
TCLOSS_ALWAYS_INLINE void fwd_cols(const scalar_t* __restrict__ g, const scalar_t* __restrict__ c,
                                   const acc_t* __restrict__ peep, scalar_t* __restrict__ h_new,
                                   scalar_t* __restrict__ c_new, int64_t N, int64_t j0, int64_t j1) {
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t j = j0; j < j1; j += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, j1 - j);
      const v8f zero = splat(0.0f);
      const v8f wi = PEEP ? load8(peep + j, n) : zero, wf = PEEP ? load8(peep + N + j, n) : zero,
                wo = PEEP ? load8(peep + 2 * N + j, n) : zero;
      const LstmElem<v8f> E = convlstm_fwd_elem<v8f, PEEP, VecMath>(
          load8(g + j, n), load8(g + N + j, n), load8(g + 2 * N + j, n), load8(g + 3 * N + j, n), load8(c + j, n),
          wi, wf, wo);
      store8(c_new + j, E.c_new, n);
      store8(h_new + j, E.o * E.t, n);
    }
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t wi = PEEP ? peep[j] : acc_t(0), wf = PEEP ? peep[N + j] : acc_t(0),
                  wo = PEEP ? peep[2 * N + j] : acc_t(0);
      const LstmElem<acc_t> E = convlstm_fwd_elem<acc_t, PEEP>(g[j], g[N + j], g[2 * N + j], g[3 * N + j], c[j], wi,
                                                               wf, wo);
      c_new[j] = E.c_new;
      h_new[j] = E.o * E.t;
    }
  }
}

template <typename scalar_t, typename acc_t, bool PEEP, bool DH, bool DCN, bool GP>
TCLOSS_ALWAYS_INLINE void bwd_cols(const scalar_t* __restrict__ g, const scalar_t* __restrict__ c,
                                   const acc_t* __restrict__ peep, const scalar_t* __restrict__ dh,
                                   const scalar_t* __restrict__ dcn, scalar_t* __restrict__ gg,
                                   scalar_t* __restrict__ gc, acc_t* __restrict__ part, int64_t N, int64_t j0,
                                   int64_t j1) {
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t j = j0; j < j1; j += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, j1 - j);
      const v8f zero = splat(0.0f);
      const v8f wi = PEEP ? load8(peep + j, n) : zero, wf = PEEP ? load8(peep + N + j, n) : zero,
                wo = PEEP ? load8(peep + 2 * N + j, n) : zero;
      v8f da[4], dc, pi, pf, po;
      convlstm_bwd_elem<v8f, PEEP, VecMath>(load8(g + j, n), load8(g + N + j, n), load8(g + 2 * N + j, n),
                                            load8(g + 3 * N + j, n), load8(c + j, n), wi, wf, wo,
                                            DH ? load8(dh + j, n) : zero, DCN ? load8(dcn + j, n) : zero, da, dc, pi,
                                            pf, po);
      for (int k = 0; k < 4; ++k) store8(gg + k * N + j, da[k], n);
      store8(gc + j, dc, n);
      if (GP) {
        store8(part + j, load8(part + j, n) + pi, n);
        store8(part + N + j, load8(part + N + j, n) + pf, n);
        store8(part + 2 * N + j, load8(part + 2 * N + j, n) + po, n);
      }
    }
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t wi = PEEP ? peep[j] : acc_t(0), wf = PEEP ? peep[N + j] : acc_t(0),
                  wo = PEEP ? peep[2 * N + j] : acc_t(0);
      acc_t da[4], dc, pi, pf, po;
      convlstm_bwd_elem<acc_t, PEEP>(g[j], g[N + j], g[2 * N + j], g[3 * N + j], c[j], wi, wf, wo,
                                     DH ? dh[j] : acc_t(0), DCN ? dcn[j] : acc_t(0), da, dc, pi, pf, po);
      for (int k = 0; k < 4; ++k) gg[k * N + j] = da[k];
      gc[j] = dc;
      if (GP) {
        part[j] += pi;
        part[N + j] += pf;
        part[2 * N + j] += po;
      }
    }
  }
}

// One task: batch items [b0, b1) x columns [j0, j1).
template <typename scalar_t, typename acc_t, bool PEEP>
TCLOSS_ALWAYS_INLINE void fwd_task_body(const CLTensors& T, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
  const int64_t N = T.P.N;
  const scalar_t* gates = T.gates.data_ptr<scalar_t>();
  const scalar_t* c = T.c.data_ptr<scalar_t>();
  const acc_t* peep = PEEP ? T.peep.data_ptr<acc_t>() : nullptr;
  scalar_t* h_new = T.h_new.data_ptr<scalar_t>();
  scalar_t* c_new = T.c_new.data_ptr<scalar_t>();
  for (int64_t b = b0; b < b1; ++b)
    fwd_cols<scalar_t, acc_t, PEEP>(gates + b * 4 * N, c + b * N, peep, h_new + b * N, c_new + b * N, N, j0, j1);
}

template <typename scalar_t, typename acc_t, bool PEEP, bool DH, bool DCN, bool GP>
TCLOSS_ALWAYS_INLINE void bwd_task_body(const CLTensors& T, int64_t chunk, int64_t b0, int64_t b1, int64_t j0,
                                        int64_t j1) {
  const int64_t N = T.P.N;
  const scalar_t* gates = T.gates.data_ptr<scalar_t>();
  const scalar_t* c = T.c.data_ptr<scalar_t>();
  const acc_t* peep = PEEP ? T.peep.data_ptr<acc_t>() : nullptr;
  const scalar_t* dh = DH ? T.dh.data_ptr<scalar_t>() : nullptr;
  const scalar_t* dcn = DCN ? T.dcn.data_ptr<scalar_t>() : nullptr;
  scalar_t* gg = T.g_gates.data_ptr<scalar_t>();
  scalar_t* gc = T.g_c.data_ptr<scalar_t>();
  acc_t* part = GP ? T.g_peep_part.data_ptr<acc_t>() + chunk * 3 * N : nullptr;
  if (GP)
    for (int64_t j = j0; j < j1; ++j) part[j] = part[N + j] = part[2 * N + j] = acc_t(0);
  for (int64_t b = b0; b < b1; ++b)
    bwd_cols<scalar_t, acc_t, PEEP, DH, DCN, GP>(gates + b * 4 * N, c + b * N, peep, DH ? dh + b * N : nullptr,
                                                 DCN ? dcn + b * N : nullptr, gg + b * 4 * N, gc + b * N, part, N,
                                                 j0, j1);
}

// Each task body twice: baseline ISA and AVX2+FMA (x86), chosen once at run time.
template <typename scalar_t, typename acc_t, bool PEEP>
void fwd_task(const CLTensors& T, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
  fwd_task_body<scalar_t, acc_t, PEEP>(T, b0, b1, j0, j1);
}
template <typename scalar_t, typename acc_t, bool PEEP>
TCLOSS_AVX2 void fwd_task_avx2(const CLTensors& T, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
  fwd_task_body<scalar_t, acc_t, PEEP>(T, b0, b1, j0, j1);
}
template <typename scalar_t, typename acc_t, bool PEEP, bool DH, bool DCN, bool GP>
void bwd_task(const CLTensors& T, int64_t chunk, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
  bwd_task_body<scalar_t, acc_t, PEEP, DH, DCN, GP>(T, chunk, b0, b1, j0, j1);
}
template <typename scalar_t, typename acc_t, bool PEEP, bool DH, bool DCN, bool GP>
TCLOSS_AVX2 void bwd_task_avx2(const CLTensors& T, int64_t chunk, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
  bwd_task_body<scalar_t, acc_t, PEEP, DH, DCN, GP>(T, chunk, b0, b1, j0, j1);
}

bool use_avx2() {
#if TCLOSS_X86_DISPATCH
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// One task = (batch chunk, column block); tasks never share an output element.
// task(chunk, b0, b1, j0, j1) runs for every task, in parallel.
template <typename Task>
void for_each_task(const CLParams& P, int64_t nblk, const Task& task) {
  at::parallel_for(0, P.bchunks * nblk, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t chunk = t / nblk, blk = t % nblk;
      const int64_t b0 = chunk * P.bper, b1 = std::min(P.B, b0 + P.bper);
      const int64_t j0 = blk * kColBlock, j1 = std::min(P.N, j0 + kColBlock);
      task(chunk, b0, b1, j0, j1);
    }
  });
}

template <typename scalar_t, typename acc_t, bool PEEP, bool DH, bool DCN, bool GP>
void run_bwd(const CLTensors& T, int64_t nblk) {
  const bool avx2 = use_avx2();
  for_each_task(T.P, nblk, [&](int64_t chunk, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
    if (avx2) bwd_task_avx2<scalar_t, acc_t, PEEP, DH, DCN, GP>(T, chunk, b0, b1, j0, j1);
    else bwd_task<scalar_t, acc_t, PEEP, DH, DCN, GP>(T, chunk, b0, b1, j0, j1);
  });
}

template <typename scalar_t, typename acc_t, bool PEEP>
void run_fwd(const CLTensors& T, int64_t nblk) {
  const bool avx2 = use_avx2();
  for_each_task(T.P, nblk, [&](int64_t, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
    if (avx2) fwd_task_avx2<scalar_t, acc_t, PEEP>(T, b0, b1, j0, j1);
    else fwd_task<scalar_t, acc_t, PEEP>(T, b0, b1, j0, j1);
  });
}

// Compile-time flags for the loops (no branch inside the vectorised body).
template <typename scalar_t, typename acc_t, bool PEEP, bool DH, bool DCN>
void run_bwd_gp(const CLTensors& T, int64_t nblk) {
  if (T.P.g_peep) run_bwd<scalar_t, acc_t, PEEP, DH, DCN, PEEP>(T, nblk);
  else run_bwd<scalar_t, acc_t, PEEP, DH, DCN, false>(T, nblk);
}

template <typename scalar_t, typename acc_t, bool PEEP>
void run_bwd_flags(const CLTensors& T, int64_t nblk) {
  const CLParams& P = T.P;
  if (P.has_dh && P.has_dcn) run_bwd_gp<scalar_t, acc_t, PEEP, true, true>(T, nblk);
  else if (P.has_dh) run_bwd_gp<scalar_t, acc_t, PEEP, true, false>(T, nblk);
  else if (P.has_dcn) run_bwd_gp<scalar_t, acc_t, PEEP, false, true>(T, nblk);
  else run_bwd_gp<scalar_t, acc_t, PEEP, false, false>(T, nblk);
}

void run_cpu(CLTensors& T, bool backward) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.gates.scalar_type(), "tcloss_convlstm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t nblk = (T.P.N + kColBlock - 1) / kColBlock;
    if (backward) {
      if (T.P.peep) run_bwd_flags<scalar_t, acc_t, true>(T, nblk);
      else run_bwd_flags<scalar_t, acc_t, false>(T, nblk);
    } else {
      if (T.P.peep) run_fwd<scalar_t, acc_t, true>(T, nblk);
      else run_fwd<scalar_t, acc_t, false>(T, nblk);
    }
  });
}

// Enough (chunk, column block) tasks for up to 16 threads, a few per thread for balance. A
// constant, not the thread count: the batch chunks are what the peephole gradient is summed
// over, so the same chunks give the same bits with any number of threads.
constexpr int64_t kCpuMinParallel = 64 * kColBlock;

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& gates, const at::Tensor& c,
                                           const c10::optional<at::Tensor>& peephole) {
  return convlstm_fwd_impl(run_cpu, kCpuMinParallel, int64_t(1) << 30, gates, c, peephole);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const c10::optional<at::Tensor>& grad_h,
                                                       const c10::optional<at::Tensor>& grad_c_new,
                                                       const at::Tensor& gates, const at::Tensor& c,
                                                       const c10::optional<at::Tensor>& peephole, bool grad_peephole) {
  return convlstm_bwd_impl(run_cpu, kCpuMinParallel, int64_t(1) << 30, grad_h, grad_c_new, gates, c, peephole,
                           grad_peephole);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcloss, CPU, m) {
  m.impl("convlstm_cell_fwd", &fwd_cpu);
  m.impl("convlstm_cell_bwd", &bwd_cpu);
}

}  // namespace tcloss
