// C++ CPU kernel of the blocked pair-wise similarity loss. Tiles of kBM rows x kBN columns: the
// two GEMMs of a tile (S = A_s B_s^T, T = A_t B_t^T over unit rows) go to ATen's BLAS, the
// element math (pairwise_similarity_loss.h; for float the SIMD version of
// pairwise_similarity_loss_simd.h) runs over the tile in place, and the tile is discarded:
// memory is O((Na + Nb) C) plus two tiles per thread.
//
// Forward: tasks own row blocks (each task the only writer of its rows' sums and statistics).
// Backward, FlashAttention-2 order: each tile of G = dL/dS is computed once and multiplied into
// both gradients, d A_s[rows] += G B_s[cols] and d B_s[cols] += G^T A_s[rows]. Row blocks run
// in order; inside one, the column tiles are split into a number of chunks fixed by the shape
// (kMaxChunks at most), which run in parallel: chunk k is the only writer of its columns of
// d B_s, and adds its share of d A_s[rows] into a buffer of its own, summed over k in order after
// the chunks. Every sum thus runs in an order fixed by the shape, not by the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "pairwise_similarity_loss/pairwise_similarity_loss_host.h"

namespace tcloss {
namespace {

constexpr int64_t kBM = 128;  // rows of a tile
constexpr int64_t kBN = 256;  // columns of a tile (two acc_t tiles ~ 256 KiB in float)
constexpr int64_t kMaxChunks = 16;  // column chunks per row block in the backward

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

#define TC_ISA_BODY "pairwise_similarity_loss/pairwise_similarity_loss_simd.h"
#include "common/isa.h"
#undef TC_ISA_BODY

// The element math of a tile: float through the SIMD body, double (the exactness path) through
// pairwise_similarity_loss.h element by element.
void fwd_tile(int loss, const float* s, const float* t, int64_t bm, int64_t bn, float inv_tau, PWRowState<float>* st,
              float* sq) {
  TC_ISA_CALL(fwd_tile, loss, s, t, bm, bn, inv_tau, st, sq)
}
void fwd_tile(int loss, const double* s, const double* t, int64_t bm, int64_t bn, double inv_tau,
              PWRowState<double>* st, double* sq) {
  for (int64_t r = 0; r < bm; ++r) {
    if (loss == kPairwiseMSE) {
      double a = 0;
      for (int64_t c = 0; c < bn; ++c) a += pw_sq(s[r * bn + c], t[r * bn + c]);
      sq[r] += a;
    } else {
      pw_state_span(st[r], s + r * bn, t + r * bn, bn, inv_tau);
    }
  }
}
void grad_tile(int loss, float* s, const float* t, int64_t bm, int64_t bn, float inv_tau, const float* stats, float c) {
  TC_ISA_CALL(grad_tile, loss, s, t, bm, bn, inv_tau, stats, c)
}
void grad_tile(int loss, double* s, const double* t, int64_t bm, int64_t bn, double inv_tau, const double* stats,
               double c) {
  for (int64_t r = 0; r < bm; ++r) {
    const double ls = stats ? stats[2 * r] : 0, lt = stats ? stats[2 * r + 1] : 0;
    for (int64_t k = r * bn; k < (r + 1) * bn; ++k) s[k] = pw_grad(loss, s[k], t[k], inv_tau, ls, lt, c);
  }
}

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
        fwd_tile(P.loss, S.data_ptr<acc_t>(), Tt.data_ptr<acc_t>(), bm, bn, inv_tau, st.data(), sq.data());
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

template <typename acc_t>
void run_bwd(PWTensors& T) {
  const PWParams P = T.P;
  const auto opts = T.as.options();
  const acc_t inv_tau = static_cast<acc_t>(P.inv_tau), c = static_cast<acc_t>(P.scale);
  const acc_t* stats = P.loss == kPairwiseKL ? T.stats.data_ptr<acc_t>() : nullptr;
  const int64_t ncb = cdiv(P.Nb, kBN), chunks = std::min(ncb, kMaxChunks), per = cdiv(ncb, chunks);
  // chunk k's share of d A_s of the current row block (only when d A_s is wanted), laid out
  // like T.ga (channels first: see pairwise_bwd_impl)
  at::Tensor part = T.ga.defined() ? at::empty({chunks, P.Cs, kBM}, opts).transpose(1, 2) : at::Tensor();
  for (int64_t b = 0; b < P.B; ++b) {
    for (int64_t i0 = 0; i0 < P.Na; i0 += kBM) {
      const int64_t bm = std::min(kBM, P.Na - i0);
      const at::Tensor a_rows = T.as.select(0, b).narrow(0, i0, bm);
      std::atomic<int64_t> next{0};
      at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
        at::Tensor sbuf = at::empty({kBM * kBN}, opts), tbuf = at::empty({kBM * kBN}, opts);
        for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
          at::Tensor pa = part.defined() ? part.select(0, k).narrow(0, 0, bm) : at::Tensor();
          if (pa.defined()) pa.zero_();
          for (int64_t j0 = k * per * kBN; j0 < std::min(P.Nb, (k + 1) * per * kBN); j0 += kBN) {
            const int64_t bn = std::min(kBN, P.Nb - j0);
            at::Tensor G = sbuf.narrow(0, 0, bm * bn).view({bm, bn}), Tt = tbuf.narrow(0, 0, bm * bn).view({bm, bn});
            sim_tiles(T, b, i0, bm, j0, bn, G, Tt);
            grad_tile(P.loss, G.data_ptr<acc_t>(), Tt.data_ptr<acc_t>(), bm, bn, inv_tau,
                      stats ? stats + 2 * (b * P.Na + i0) : nullptr, c);
            if (pa.defined()) pa.addmm_(G, T.bs.select(0, b).narrow(0, j0, bn));
            if (T.gb.defined()) T.gb.select(0, b).narrow(0, j0, bn).addmm_(G.t(), a_rows);
          }
        }
      });
      if (part.defined()) {
        at::Tensor ga = T.ga.select(0, b).narrow(0, i0, bm);
        for (int64_t k = 0; k < chunks; ++k) ga.add_(part.select(0, k).narrow(0, 0, bm));
      }
    }
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
                           grad_b, /*grads_cn=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcloss, CPU, m) {
  m.impl("pairwise_similarity_loss_fwd", &fwd_cpu);
  m.impl("pairwise_similarity_loss_bwd", &bwd_cpu);
}

}  // namespace tcloss
