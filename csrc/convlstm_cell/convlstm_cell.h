// Per-element math of the fused ConvLSTM cell (eq. 6 of the supplement of Liu et al., ECCV 2020,
// after Shi et al. 2015), shared by the CPU kernel (convlstm_cell_cpu.cpp) and the CUDA kernel
// (convlstm_cell_cuda.cu). The convolution that makes the gate pre-activations stays in cuDNN/ATen;
// only the pointwise part is fused, as in PyTorch's fused LSTM cell (RNN.cu).
//
// Per element (b, k, y, x), gate pre-activations a_i, a_f, a_g, a_o (PyTorch order i, f, g, o),
// peephole weights w_i, w_f, w_o (zero without peepholes):
//   i  = sigmoid(a_i + w_i c)           f = sigmoid(a_f + w_f c)          g = tanh(a_g)
//   c' = f c + i g                      o = sigmoid(a_o + w_o c')         h' = o tanh(c')
// Nothing but the inputs is kept for backward: the gate pre-activations are saved (they are the
// conv output, 4 values per element, as many as the activated gates would be) and backward
// recomputes i, f, g, o, c' and tanh(c') from them, so the forward writes only h' and c'.
// With upstream gradients dh = dL/dh', dc' = dL/dc' (direct), t = tanh(c'):
//   da_o = dh t o (1 - o)
//   dC   = dc' + dh o (1 - t^2) + da_o w_o          total gradient reaching c'
//   da_i = dC g i (1 - i)      da_f = dC (c f (1 - f))    da_g = dC i (1 - g^2)
//   dc   = dC f + da_i w_i + da_f w_f
//   dw_i = sum_b da_i c        dw_f = sum_b da_f c        dw_o = sum_b da_o c'
#pragma once
#include "common/host_device.h"

// Forced inlining on the host too: the CPU kernel's column loop only vectorises when the whole
// element computation is inlined into it.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define TCLOSS_CL_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define TCLOSS_CL_INLINE inline __attribute__((always_inline))
#else
#define TCLOSS_CL_INLINE inline
#endif

namespace tcloss {

// The formulas are written with plain literals (1, not acc_t(1)) so that acc_t may also be a GCC
// vector type: the CPU float kernel evaluates them on 8 lanes at once.
//
// Transcendentals of the cell, as a policy: LibmMath (CUDA, and CPU float64) calls expf/tanhf or
// exp/tanh of the matching precision; the CPU float kernel passes a branch-free polynomial
// version that the compiler can vectorise (convlstm_cell_cpu.cpp). The gate formulas below are the
// same for every device.
struct LibmMath {
  static TCLOSS_CL_INLINE float exp(float x) { return expf(x); }
  static TCLOSS_CL_INLINE double exp(double x) { return ::exp(x); }
  static TCLOSS_CL_INLINE float tanh(float x) { return tanhf(x); }
  static TCLOSS_CL_INLINE double tanh(double x) { return ::tanh(x); }
};

template <typename M, typename acc_t>
TCLOSS_CL_INLINE acc_t lstm_sigmoid(acc_t x) {
  return 1 / (1 + M::exp(-x));
}

// The activated gates of one element, the new cell state and its tanh.
template <typename acc_t>
struct LstmElem {
  acc_t i, f, g, o, c_new, t;
};

// Forward of one element (h' = o * t). Without peepholes (PEEP = false) the products w*c are
// skipped rather than taken with w = 0, so that a non-finite c propagates as in the reference.
template <typename acc_t, bool PEEP, typename M = LibmMath>
TCLOSS_CL_INLINE LstmElem<acc_t> convlstm_fwd_elem(acc_t ai, acc_t af, acc_t ag, acc_t ao, acc_t c, acc_t wi,
                                                     acc_t wf, acc_t wo) {
  LstmElem<acc_t> E;
  E.i = lstm_sigmoid<M>(PEEP ? ai + wi * c : ai);
  E.f = lstm_sigmoid<M>(PEEP ? af + wf * c : af);
  E.g = M::tanh(ag);
  E.c_new = E.f * c + E.i * E.g;
  E.o = lstm_sigmoid<M>(PEEP ? ao + wo * E.c_new : ao);  // the output peephole looks at the new cell state
  E.t = M::tanh(E.c_new);
  return E;
}

// Gradients of one element, recomputing the forward from the pre-activations (memory-bound
// kernels: five transcendentals are cheaper than writing and re-reading a workspace). dh, dcn:
// upstream gradients (0 where absent). Outputs: the pre-activation gradients da[4] (i, f, g, o),
// dc, and the peephole products pi, pf, po (summed over the batch by the caller).
template <typename acc_t, bool PEEP, typename M = LibmMath>
TCLOSS_CL_INLINE void convlstm_bwd_elem(acc_t ai, acc_t af, acc_t ag, acc_t ao, acc_t c, acc_t wi, acc_t wf,
                                          acc_t wo, acc_t dh, acc_t dcn, acc_t* da, acc_t& dc, acc_t& pi,
                                          acc_t& pf, acc_t& po) {
  const LstmElem<acc_t> E = convlstm_fwd_elem<acc_t, PEEP, M>(ai, af, ag, ao, c, wi, wf, wo);
  const acc_t dao = dh * E.t * E.o * (1 - E.o);
  acc_t dC = dcn + dh * E.o * (1 - E.t * E.t);
  if (PEEP) dC += dao * wo;
  const acc_t dai = dC * E.g * E.i * (1 - E.i);
  // c times the sigmoid's derivative first (at most |c| / 4): dC * c alone overflows for a cell
  // state of ~1e38, and inf * 0 (a saturated f) would be NaN where the gradient is 0
  const acc_t daf = dC * (c * (E.f * (1 - E.f)));
  const acc_t dag = dC * E.i * (1 - E.g * E.g);
  da[0] = dai;
  da[1] = daf;
  da[2] = dag;
  da[3] = dao;
  dc = PEEP ? dC * E.f + dai * wi + daf * wf : dC * E.f;
  pi = dai * c;
  pf = daf * c;
  po = dao * E.c_new;
}

}  // namespace tcloss
