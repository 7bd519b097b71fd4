// Device-independent host side of the fused ConvLSTM cell ops: argument checks, allocation and
// the final reduction of the peephole gradients. convlstm_cell_cpu.cpp and convlstm_cell_cuda.cu provide
// the run functions.
//
// Work layout (both devices): a "column" j = (k, y, x) in [0, Hd*h*w) is one hidden unit at one
// position; the batch is split into `bchunks` contiguous ranges. One worker owns (chunk, column)
// and loops over the batch items of its chunk, so the per-position peephole gradient of a column
// is summed over the batch in registers without atomics (deterministic); the `bchunks` partial
// sums (bchunks, 3, Hd, h, w) are added with at::sum when there is more than one chunk. More
// chunks only when there are too few columns to fill the device.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <tuple>

#include "convlstm_cell/convlstm_cell.h"

namespace tcloss {

struct CLParams {
  int64_t B, Hd, HW;  // batch, hidden channels, h*w
  int64_t N;          // Hd*HW columns
  int64_t bchunks, bper;  // batch chunks and batch items per chunk
  bool peep;          // peephole weights given
  bool has_dh, has_dcn;
  bool g_peep;        // write the peephole gradient partials
};

struct CLTensors {
  CLParams P;
  at::Tensor gates, c, peep;   // contiguous; peep (3,Hd,h,w) in the accumulation dtype
  at::Tensor h_new, c_new;     // forward outputs
  at::Tensor dh, dcn;          // backward inputs (undefined when absent)
  at::Tensor g_gates, g_c;     // backward outputs
  at::Tensor g_peep_part;      // (bchunks,3,Hd,h,w) accumulation dtype
};

inline at::ScalarType cl_acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Choose the batch chunking so that about `min_parallel` (chunk, column) workers exist.
inline void cl_chunk(CLParams& P, int64_t min_parallel, int64_t max_chunks) {
  int64_t ch = P.N > 0 ? (min_parallel + P.N - 1) / P.N : 1;
  ch = std::max<int64_t>(1, std::min<int64_t>({ch, P.B, max_chunks}));
  P.bper = P.B > 0 ? (P.B + ch - 1) / ch : 1;
  P.bchunks = P.B > 0 ? (P.B + P.bper - 1) / P.bper : 1;
}

inline CLTensors cl_prepare(const at::Tensor& gates, const at::Tensor& c, const c10::optional<at::Tensor>& peephole) {
  TORCH_CHECK(gates.dim() == 4, "tcloss: gates must be (B,4*Hd,h,w), got ", gates.sizes());
  TORCH_CHECK(gates.size(1) % 4 == 0 && gates.size(1) > 0,
              "tcloss: gates must have 4*Hd channels (i, f, g, o), got ", gates.size(1));
  const int64_t B = gates.size(0), Hd = gates.size(1) / 4, H = gates.size(2), W = gates.size(3);
  TORCH_CHECK(c.dim() == 4 && c.size(0) == B && c.size(1) == Hd && c.size(2) == H && c.size(3) == W,
              "tcloss: c must be (B,Hd,h,w) = (", B, ",", Hd, ",", H, ",", W, "), got ", c.sizes());
  TORCH_CHECK(c.scalar_type() == gates.scalar_type(), "tcloss: gates and c must share a dtype, got ",
              gates.scalar_type(), " and ", c.scalar_type());
  TORCH_CHECK(c.device() == gates.device(), "tcloss: c must be on ", gates.device());
  TORCH_CHECK(at::isFloatingType(gates.scalar_type()), "tcloss: gates must be floating point");
  const auto acc = cl_acc_type(gates.scalar_type());
  CLTensors T;
  T.P.B = B;
  T.P.Hd = Hd;
  T.P.HW = H * W;
  T.P.N = Hd * H * W;
  T.P.peep = peephole.has_value() && peephole->defined();
  T.P.has_dh = T.P.has_dcn = T.P.g_peep = false;
  T.P.bchunks = T.P.bper = 1;
  if (T.P.peep) {
    const at::Tensor& p = *peephole;
    TORCH_CHECK(p.dim() == 4 && p.size(0) == 3 && p.size(1) == Hd && p.size(2) == H && p.size(3) == W,
                "tcloss: peephole must be (3,Hd,h,w) = (3,", Hd, ",", H, ",", W, ") (w_i, w_f, w_o), got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == acc, "tcloss: peephole must be ", acc, " (the accumulation dtype), got ",
                p.scalar_type());
    TORCH_CHECK(p.device() == gates.device(), "tcloss: peephole must be on ", gates.device());
    T.peep = p.contiguous();
  }
  T.gates = gates.contiguous();
  T.c = c.contiguous();
  return T;
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor> convlstm_fwd_impl(Run run, int64_t min_parallel, int64_t max_chunks,
                                                     const at::Tensor& gates, const at::Tensor& c,
                                                     const c10::optional<at::Tensor>& peephole) {
  CLTensors T = cl_prepare(gates, c, peephole);
  cl_chunk(T.P, min_parallel, max_chunks);
  T.h_new = at::empty_like(T.c);
  T.c_new = at::empty_like(T.c);
  if (T.P.B * T.P.N > 0) run(T, /*backward=*/false);
  return {T.h_new, T.c_new};
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> convlstm_bwd_impl(
    Run run, int64_t min_parallel, int64_t max_chunks, const c10::optional<at::Tensor>& grad_h,
    const c10::optional<at::Tensor>& grad_c_new, const at::Tensor& gates, const at::Tensor& c,
    const c10::optional<at::Tensor>& peephole, bool grad_peephole) {
  CLTensors T = cl_prepare(gates, c, peephole);
  TORCH_CHECK(!grad_peephole || T.P.peep, "tcloss: grad_peephole needs peephole weights");
  for (const auto* g : {&grad_h, &grad_c_new}) {
    if (g->has_value() && (*g)->defined()) {
      TORCH_CHECK((*g)->sizes() == c.sizes(), "tcloss: upstream gradients must be (B,Hd,h,w) ", c.sizes(),
                  ", got ", (*g)->sizes());
      TORCH_CHECK((*g)->device() == c.device(), "tcloss: upstream gradients must be on ", c.device());
    }
  }
  if (grad_h.has_value() && grad_h->defined()) {
    T.dh = grad_h->to(T.c.scalar_type()).contiguous();
    T.P.has_dh = true;
  }
  if (grad_c_new.has_value() && grad_c_new->defined()) {
    T.dcn = grad_c_new->to(T.c.scalar_type()).contiguous();
    T.P.has_dcn = true;
  }
  T.P.g_peep = grad_peephole;
  cl_chunk(T.P, min_parallel, max_chunks);
  T.g_gates = at::empty_like(T.gates);
  T.g_c = at::empty_like(T.c);
  const auto acc = cl_acc_type(gates.scalar_type());
  if (grad_peephole)
    T.g_peep_part = at::empty({T.P.bchunks, 3, T.P.Hd, gates.size(2), gates.size(3)}, T.gates.options().dtype(acc));
  if (T.P.B * T.P.N > 0) {
    run(T, /*backward=*/true);
  } else if (grad_peephole) {
    T.g_peep_part.zero_();
  }
  at::Tensor gp;
  if (!grad_peephole) gp = at::empty({0}, T.gates.options().dtype(acc));
  else if (T.P.bchunks == 1) gp = T.g_peep_part[0];
  else gp = at::sum(T.g_peep_part, {0});
  return {T.g_gates, T.g_c, gp};
}

}  // namespace tcloss
