// CUDA kernel of the blocked pair-wise similarity loss: a shared-memory tiled GEMM per tile of S
// and T (16 x 16 threads, each an R x R register micro-tile; R = 4 in float, 2 in double), the
// element math from pairwise_similarity_loss.h, and no N x N buffer anywhere.
//   forward: one block per (row block, batch item) sweeps the column tiles; per-thread row
//            states (sum of squares, or the online log-sum-exps for kl) are merged across the
//            16 threads of a row with warp shuffles.
//   backward: one launch per student side; a block owns a block of rows of that side's
//            gradient (d A = G B, or d B = G^T A with the tile computed transposed), recomputes
//            each G tile into shared memory and multiplies it by the other side's unit rows.
//            Each gradient element has exactly one writer: no atomics, deterministic.
// Offsets are 64-bit (N^2 exceeds 2^31 at N = 46341; B N C can too).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pairwise_similarity_loss/pairwise_similarity_loss_host.h"

namespace tcloss {
namespace {

constexpr int kThreads = 256;  // 16 x 16
constexpr int kKC = 16;        // channel chunk of the tile GEMM

template <typename acc_t>
struct TileCfg {
  static constexpr int R = sizeof(acc_t) == 4 ? 4 : 2;  // keeps double under 48 KiB of smem
  static constexpr int BM = 16 * R;                    // rows = columns of a tile
};

template <typename acc_t, int BM>
struct SimSmem {
  acc_t x[kKC][BM + 1];  // +1: no bank conflicts on the transposing store
  acc_t y[kKC][BM + 1];
};

// acc[r][c] = <X[x0 + ty + 16 r], Y[y0 + tx + 16 c]> over C channels (unit rows, row-major
// (N, C)); rows outside [0, nx) / [0, ny) give 0. Ends with a barrier (smem reusable).
template <typename acc_t, int R>
__device__ __forceinline__ void sim_tile(const acc_t* __restrict__ X, int64_t x0, int64_t nx,
                                         const acc_t* __restrict__ Y, int64_t y0, int64_t ny, int64_t C,
                                         SimSmem<acc_t, 16 * R>& sm, acc_t (&acc)[R][R]) {
  constexpr int BM = 16 * R;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < R; ++c) acc[r][c] = acc_t(0);
  for (int64_t k0 = 0; k0 < C; k0 += kKC) {
    for (int e = tid; e < BM * kKC; e += kThreads) {
      const int r = e / kKC, k = e % kKC;
      const int64_t gk = k0 + k, gx = x0 + r, gy = y0 + r;
      sm.x[k][r] = (gx < nx && gk < C) ? X[gx * C + gk] : acc_t(0);
      sm.y[k][r] = (gy < ny && gk < C) ? Y[gy * C + gk] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kKC; ++k) {
      acc_t a[R], bv[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        a[r] = sm.x[k][ty + 16 * r];
        bv[r] = sm.y[k][tx + 16 * r];
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < R; ++c) acc[r][c] += a[r] * bv[c];
    }
    __syncthreads();
  }
}

template <typename acc_t>
__device__ __forceinline__ PWRowState<acc_t> shfl_state(const PWRowState<acc_t>& s, int off) {
  PWRowState<acc_t> o;
  o.ms = __shfl_xor_sync(0xffffffffu, s.ms, off);
  o.ls = __shfl_xor_sync(0xffffffffu, s.ls, off);
  o.mt = __shfl_xor_sync(0xffffffffu, s.mt, off);
  o.lt = __shfl_xor_sync(0xffffffffu, s.lt, off);
  o.w = __shfl_xor_sync(0xffffffffu, s.w, off);
  return o;
}

template <typename acc_t, int R>
__global__ void __launch_bounds__(kThreads)
    pairwise_fwd_kernel(PWParams P, const acc_t* __restrict__ as, const acc_t* __restrict__ ats,
                        const acc_t* __restrict__ bs, const acc_t* __restrict__ bts, acc_t* __restrict__ rowloss,
                        acc_t* __restrict__ stats) {
  constexpr int BM = 16 * R;
  __shared__ SimSmem<acc_t, BM> sm;
  const int64_t b = blockIdx.y, i0 = int64_t(blockIdx.x) * BM;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const acc_t* As = as + b * P.Na * P.Cs;
  const acc_t* At = ats + b * P.Na * P.Ct;
  const acc_t* Bs = bs + b * P.Nb * P.Cs;
  const acc_t* Bt = bts + b * P.Nb * P.Ct;
  const acc_t inv_tau = static_cast<acc_t>(P.inv_tau);
  const bool mse = P.loss == kPairwiseMSE;
  PWRowState<acc_t> st[R];
  acc_t sq[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    pw_state_init(st[r]);
    sq[r] = acc_t(0);
  }
  for (int64_t j0 = 0; j0 < P.Nb; j0 += BM) {
    acc_t S[R][R], T[R][R];
    sim_tile<acc_t, R>(As, i0, P.Na, Bs, j0, P.Nb, P.Cs, sm, S);
    sim_tile<acc_t, R>(At, i0, P.Na, Bt, j0, P.Nb, P.Ct, sm, T);
#pragma unroll
    for (int c = 0; c < R; ++c) {
      if (j0 + tx + 16 * c >= P.Nb) continue;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (mse) sq[r] += pw_sq(S[r][c], T[r][c]);
        else pw_state_push(st[r], S[r][c], T[r][c], inv_tau);
      }
    }
  }
  // The 16 threads of a row (same ty) are one half-warp: xor-shuffles 8..1 stay inside it.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int off = 8; off > 0; off >>= 1) {
      if (mse) {
        sq[r] += __shfl_xor_sync(0xffffffffu, sq[r], off);
      } else {
        const PWRowState<acc_t> o = shfl_state(st[r], off);
        pw_state_merge(st[r], o);
      }
    }
    const int64_t i = i0 + ty + 16 * r;
    if (tx == 0 && i < P.Na) {
      const int64_t k = b * P.Na + i;
      if (mse) {
        rowloss[k] = sq[r];
      } else {
        acc_t ls, lt;
        rowloss[k] = pw_state_finish(st[r], ls, lt);
        stats[2 * k] = ls;
        stats[2 * k + 1] = lt;
      }
    }
  }
}

// Gradient rows of the "own" side o (rows a if OWN_ROWS, else columns b); x is the other side.
template <typename acc_t, int R, bool OWN_ROWS>
__global__ void __launch_bounds__(kThreads)
    pairwise_bwd_kernel(PWParams P, const acc_t* __restrict__ os, const acc_t* __restrict__ ots,
                        const acc_t* __restrict__ xs, const acc_t* __restrict__ xts, const acc_t* __restrict__ stats,
                        acc_t* __restrict__ g, int64_t No, int64_t Nx) {
  constexpr int BM = 16 * R;
  __shared__ SimSmem<acc_t, BM> sm;
  __shared__ acc_t gs[BM][BM + 1];  // the G tile (own x other)
  __shared__ acc_t xc[BM][BM + 1];  // a BM-channel slice of the other side's unit rows
  const int64_t b = blockIdx.y, o0 = int64_t(blockIdx.x) * BM;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t Cs = P.Cs, Ct = P.Ct;
  const acc_t* Os = os + b * No * Cs;
  const acc_t* Ot = ots + b * No * Ct;
  const acc_t* Xs = xs + b * Nx * Cs;
  const acc_t* Xt = xts + b * Nx * Ct;
  const acc_t* St = P.loss == kPairwiseKL ? stats + b * P.Na * 2 : nullptr;
  acc_t* G = g + b * No * Cs;
  const acc_t inv_tau = static_cast<acc_t>(P.inv_tau), cscale = static_cast<acc_t>(P.scale);
  for (int64_t x0 = 0; x0 < Nx; x0 += BM) {
    acc_t S[R][R], T[R][R];
    sim_tile<acc_t, R>(Os, o0, No, Xs, x0, Nx, Cs, sm, S);
    sim_tile<acc_t, R>(Ot, o0, No, Xt, x0, Nx, Ct, sm, T);
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int c = 0; c < R; ++c) {
        const int64_t own = o0 + ty + 16 * r, oth = x0 + tx + 16 * c;
        acc_t v = acc_t(0);
        if (own < No && oth < Nx) {
          const int64_t i = OWN_ROWS ? own : oth;  // the row of S: its lse normalises the softmax
          const acc_t ls = St ? St[2 * i] : acc_t(0), lt = St ? St[2 * i + 1] : acc_t(0);
          v = pw_grad(P.loss, S[r][c], T[r][c], inv_tau, ls, lt, cscale);
        }
        gs[ty + 16 * r][tx + 16 * c] = v;
      }
    }
    __syncthreads();
    for (int64_t k0 = 0; k0 < Cs; k0 += BM) {
      for (int e = tid; e < BM * BM; e += kThreads) {
        const int xr = e / BM, k = e % BM;
        const int64_t gx = x0 + xr, gk = k0 + k;
        xc[xr][k] = (gx < Nx && gk < Cs) ? Xs[gx * Cs + gk] : acc_t(0);
      }
      __syncthreads();
      acc_t acc[R][R];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < R; ++c) acc[r][c] = acc_t(0);
      for (int x = 0; x < BM; ++x) {
        acc_t a[R], bv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          a[r] = gs[ty + 16 * r][x];
          bv[r] = xc[x][tx + 16 * r];
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int c = 0; c < R; ++c) acc[r][c] += a[r] * bv[c];
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t own = o0 + ty + 16 * r;
#pragma unroll
        for (int c = 0; c < R; ++c) {
          const int64_t k = k0 + tx + 16 * c;
          if (own < No && k < Cs) G[own * Cs + k] += acc[r][c];  // this block owns the row
        }
      }
      __syncthreads();
    }
  }
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void run_fwd_cuda(PWTensors& T) {
  const c10::cuda::CUDAGuard guard(T.as.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const PWParams P = T.P;
  TORCH_CHECK(P.B <= 65535, "tcloss: pairwise_similarity_loss (cuda): batch size must be <= 65535");
  AT_DISPATCH_FLOATING_TYPES(T.as.scalar_type(), "tcloss_pairwise_fwd_cuda", [&] {
    constexpr int R = TileCfg<scalar_t>::R, BM = TileCfg<scalar_t>::BM;
    const dim3 grid(static_cast<unsigned>(cdiv(P.Na, BM)), static_cast<unsigned>(P.B));
    pairwise_fwd_kernel<scalar_t, R><<<grid, kThreads, 0, stream>>>(
        P, T.as.data_ptr<scalar_t>(), T.ats.data_ptr<scalar_t>(), T.bs.data_ptr<scalar_t>(),
        T.bts.data_ptr<scalar_t>(), T.rowloss.data_ptr<scalar_t>(),
        P.loss == kPairwiseKL ? T.stats.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void run_bwd_cuda(PWTensors& T) {
  const c10::cuda::CUDAGuard guard(T.as.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const PWParams P = T.P;
  TORCH_CHECK(P.B <= 65535, "tcloss: pairwise_similarity_loss (cuda): batch size must be <= 65535");
  AT_DISPATCH_FLOATING_TYPES(T.as.scalar_type(), "tcloss_pairwise_bwd_cuda", [&] {
    constexpr int R = TileCfg<scalar_t>::R, BM = TileCfg<scalar_t>::BM;
    const scalar_t* st = P.loss == kPairwiseKL ? T.stats.data_ptr<scalar_t>() : nullptr;
    if (T.ga.defined()) {
      const dim3 grid(static_cast<unsigned>(cdiv(P.Na, BM)), static_cast<unsigned>(P.B));
      pairwise_bwd_kernel<scalar_t, R, true><<<grid, kThreads, 0, stream>>>(
          P, T.as.data_ptr<scalar_t>(), T.ats.data_ptr<scalar_t>(), T.bs.data_ptr<scalar_t>(),
          T.bts.data_ptr<scalar_t>(), st, T.ga.data_ptr<scalar_t>(), P.Na, P.Nb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (T.gb.defined()) {
      const dim3 grid(static_cast<unsigned>(cdiv(P.Nb, BM)), static_cast<unsigned>(P.B));
      pairwise_bwd_kernel<scalar_t, R, false><<<grid, kThreads, 0, stream>>>(
          P, T.bs.data_ptr<scalar_t>(), T.bts.data_ptr<scalar_t>(), T.as.data_ptr<scalar_t>(),
          T.ats.data_ptr<scalar_t>(), st, T.gb.data_ptr<scalar_t>(), P.Nb, P.Na);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& sa, const at::Tensor& ta, const at::Tensor& sb,
                                            const at::Tensor& tb, int64_t loss, double temperature, double eps,
                                            bool detach_norm) {
  return pairwise_fwd_impl(run_fwd_cuda, sa, ta, sb, tb, loss, temperature, eps, detach_norm);
}

std::tuple<at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad, const at::Tensor& sa, const at::Tensor& ta,
                                            const at::Tensor& sb, const at::Tensor& tb, const at::Tensor& stats,
                                            int64_t loss, double temperature, double eps, bool detach_norm,
                                            bool grad_a, bool grad_b) {
  return pairwise_bwd_impl(run_bwd_cuda, grad, sa, ta, sb, tb, stats, loss, temperature, eps, detach_norm, grad_a,
                           grad_b, /*grads_cn=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcloss, CUDA, m) {
  m.impl("pairwise_similarity_loss_fwd", &fwd_cuda);
  m.impl("pairwise_similarity_loss_bwd", &bwd_cuda);
}

}  // namespace tcloss
