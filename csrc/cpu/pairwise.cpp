// C++ CPU kernel of the blocked pair-wise similarity loss. Tiles of kBM rows x kBN columns: the
// two GEMMs of a tile (S = A_s B_s^T, T = A_t B_t^T over unit rows) go to ATen's BLAS, the
// element math (kernels/pairwise.h) runs over the tile in place, and the tile is discarded:
// memory is O((Na + Nb) C) plus two tiles per thread. at::parallel_for splits row blocks
// (forward, d A) or column blocks (d B): each task is the only writer of its rows of the
// output, so there are no races and the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../pairwise_host.h"

namespace tcloss {
namespace {

constexpr int64_t kBM = 128;  // rows of a tile
constexpr int64_t kBN = 256;  // columns of a tile (two acc_t tiles ~ 256 KiB in float)

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile (b, rows i0.., columns j0..) of S and T into S, Tt (contiguous bm x bn).
inline void sim_tiles(const PWTensors& T, int64_t b, int64_t i0, int64_t bm, int64_t j0, int64_t bn, at::Tensor& S,
                      at::Tensor& Tt) {
  at::mm_out(S, T.as.select(0, b).narrow(0, i0, bm), T.bs.select(0, b).narrow(0, j0, bn).t());
  at::mm_out(Tt, T.ats.select(0, b).narrow(0, i0, bm), T.bts.select(0, b).narrow(0, j0, bn).t());
}

template <typename acc_t>
void run_fwd(PWTensors& T) {
  const PWParams P = T.P;
  const acc_t inv_tau = static_cast<acc_t>(P.inv_tau);
  const int64_t nrb = cdiv(P.Na, kBM);
  acc_t* rowloss = T.rowloss.data_ptr<acc_t>();
  acc_t* stats = P.loss == kPairwiseKL ? T.stats.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, P.B * nrb, 1, [&](int64_t lo, int64_t hi) {
    at::Tensor sbuf = at::empty({kBM * kBN}, T.as.options()), tbuf = at::empty({kBM * kBN}, T.as.options());
    std::vector<PWRowState<acc_t>> st(kBM);
    std::vector<acc_t> sq(kBM);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nrb, i0 = (task % nrb) * kBM, bm = std::min(kBM, P.Na - i0);
      for (int64_t r = 0; r < bm; ++r) {
        pw_state_init(st[r]);
        sq[r] = acc_t(0);
      }
      for (int64_t j0 = 0; j0 < P.Nb; j0 += kBN) {
        const int64_t bn = std::min(kBN, P.Nb - j0);
        at::Tensor S = sbuf.narrow(0, 0, bm * bn).view({bm, bn}), Tt = tbuf.narrow(0, 0, bm * bn).view({bm, bn});
        sim_tiles(T, b, i0, bm, j0, bn, S, Tt);
        const acc_t* s = S.data_ptr<acc_t>();
        const acc_t* t = Tt.data_ptr<acc_t>();
        for (int64_t r = 0; r < bm; ++r) {
          if (P.loss == kPairwiseMSE) {
            acc_t a = acc_t(0);
            for (int64_t c = 0; c < bn; ++c) a += pw_sq(s[r * bn + c], t[r * bn + c]);
            sq[r] += a;
          } else {
            pw_state_span(st[r], s + r * bn, t + r * bn, bn, inv_tau);
          }
        }
      }
      for (int64_t r = 0; r < bm; ++r) {
        const int64_t i = b * P.Na + i0 + r;
        if (P.loss == kPairwiseMSE) {
          rowloss[i] = sq[r];
        } else {
          acc_t ls, lt;
          rowloss[i] = pw_state_finish(st[r], ls, lt);
          stats[2 * i] = ls;
          stats[2 * i + 1] = lt;
        }
      }
    }
  });
}

// The tile of G = dL/dS (scaled by 1/dL/dloss) into S, in place.
template <typename acc_t>
void grad_tile(const PWTensors& T, int64_t b, int64_t i0, int64_t bm, int64_t j0, int64_t bn, at::Tensor& S,
               at::Tensor& Tt) {
  const PWParams& P = T.P;
  sim_tiles(T, b, i0, bm, j0, bn, S, Tt);
  acc_t* s = S.data_ptr<acc_t>();
  const acc_t* t = Tt.data_ptr<acc_t>();
  const acc_t* stats = P.loss == kPairwiseKL ? T.stats.data_ptr<acc_t>() : nullptr;
  const acc_t inv_tau = static_cast<acc_t>(P.inv_tau), c = static_cast<acc_t>(P.scale);
  for (int64_t r = 0; r < bm; ++r) {
    const int64_t i = b * P.Na + i0 + r;
    const acc_t ls = stats ? stats[2 * i] : acc_t(0), lt = stats ? stats[2 * i + 1] : acc_t(0);
    for (int64_t k = r * bn; k < (r + 1) * bn; ++k) s[k] = pw_grad(P.loss, s[k], t[k], inv_tau, ls, lt, c);
  }
}

template <typename acc_t>
void run_bwd(PWTensors& T) {
  const PWParams P = T.P;
  const auto opts = T.as.options();
  if (T.ga.defined()) {  // d A_s[i] = sum_j G_ij B_s[j]: tasks own row blocks
    const int64_t nrb = cdiv(P.Na, kBM);
    at::parallel_for(0, P.B * nrb, 1, [&](int64_t lo, int64_t hi) {
      at::Tensor sbuf = at::empty({kBM * kBN}, opts), tbuf = at::empty({kBM * kBN}, opts);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / nrb, i0 = (task % nrb) * kBM, bm = std::min(kBM, P.Na - i0);
        at::Tensor g = T.ga.select(0, b).narrow(0, i0, bm);
        for (int64_t j0 = 0; j0 < P.Nb; j0 += kBN) {
          const int64_t bn = std::min(kBN, P.Nb - j0);
          at::Tensor S = sbuf.narrow(0, 0, bm * bn).view({bm, bn}), Tt = tbuf.narrow(0, 0, bm * bn).view({bm, bn});
          grad_tile<acc_t>(T, b, i0, bm, j0, bn, S, Tt);
          g.addmm_(S, T.bs.select(0, b).narrow(0, j0, bn));
        }
      }
    });
  }
  if (T.gb.defined()) {  // d B_s[j] = sum_i G_ij A_s[i]: tasks own column blocks
    const int64_t ncb = cdiv(P.Nb, kBN);
    at::parallel_for(0, P.B * ncb, 1, [&](int64_t lo, int64_t hi) {
      at::Tensor sbuf = at::empty({kBM * kBN}, opts), tbuf = at::empty({kBM * kBN}, opts);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / ncb, j0 = (task % ncb) * kBN, bn = std::min(kBN, P.Nb - j0);
        at::Tensor g = T.gb.select(0, b).narrow(0, j0, bn);
        for (int64_t i0 = 0; i0 < P.Na; i0 += kBM) {
          const int64_t bm = std::min(kBM, P.Na - i0);
          at::Tensor S = sbuf.narrow(0, 0, bm * bn).view({bm, bn}), Tt = tbuf.narrow(0, 0, bm * bn).view({bm, bn});
          grad_tile<acc_t>(T, b, i0, bm, j0, bn, S, Tt);
          g.addmm_(S.t(), T.as.select(0, b).narrow(0, i0, bm));
        }
      }
    });
  }
}

void fwd_dispatch(PWTensors& T) {
  AT_DISPATCH_FLOATING_TYPES(T.as.scalar_type(), "tcloss_pairwise_fwd_cpu", [&] { run_fwd<scalar_t>(T); });
}

void bwd_dispatch(PWTensors& T) {
  AT_DISPATCH_FLOATING_TYPES(T.as.scalar_type(), "tcloss_pairwise_bwd_cpu", [&] { run_bwd<scalar_t>(T); });
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& sa, const at::Tensor& ta, const at::Tensor& sb,
                                           const at::Tensor& tb, int64_t loss, double temperature, double eps,
                                           bool detach_norm) {
  return pairwise_fwd_impl(fwd_dispatch, sa, ta, sb, tb, loss, temperature, eps, detach_norm);
}

std::tuple<at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& grad, const at::Tensor& sa, const at::Tensor& ta,
                                           const at::Tensor& sb, const at::Tensor& tb, const at::Tensor& stats,
                                           int64_t loss, double temperature, double eps, bool detach_norm,
                                           bool grad_a, bool grad_b) {
  return pairwise_bwd_impl(bwd_dispatch, grad, sa, ta, sb, tb, stats, loss, temperature, eps, detach_norm, grad_a,
                           grad_b);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcloss, CPU, m) {
  m.impl("pairwise_similarity_fwd", &fwd_cpu);
  m.impl("pairwise_similarity_bwd", &bwd_cpu);
}

}  // namespace tcloss
