// CUDA kernels of the fused ConvLSTM cell (eq. 6). Grid: x over columns j = (k, y, x) (adjacent
// threads read adjacent positions, so every gate plane is read coalesced), y over batch chunks;
// each thread loops over the batch items of its chunk, which sums the per-position peephole
// gradient in registers (no atomics, deterministic). Per-element math from convlstm_cell.h.
// Offsets advance by pointer increments per batch item, so no 64-bit division per element.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "convlstm_cell/convlstm_cell_host.h"

namespace tcloss {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t, bool PEEP>
__global__ void convlstm_fwd_kernel(CLParams P, const scalar_t* __restrict__ gates, const scalar_t* __restrict__ c,
                                    const acc_t* __restrict__ peep, scalar_t* __restrict__ h_new,
                                    scalar_t* __restrict__ c_new) {
  const int64_t N = P.N;
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= N) return;
  const int64_t b0 = blockIdx.y * P.bper;
  const int64_t b1 = b0 + P.bper < P.B ? b0 + P.bper : P.B;
  const acc_t wi = PEEP ? peep[j] : acc_t(0), wf = PEEP ? peep[N + j] : acc_t(0),
              wo = PEEP ? peep[2 * N + j] : acc_t(0);
  const scalar_t* g = gates + b0 * 4 * N + j;
  const scalar_t* cp = c + b0 * N + j;
  scalar_t* hp = h_new + b0 * N + j;
  scalar_t* cnp = c_new + b0 * N + j;
  for (int64_t b = b0; b < b1; ++b, g += 4 * N, cp += N, hp += N, cnp += N) {
    const LstmElem<acc_t> E = convlstm_fwd_elem<acc_t, PEEP>(
        static_cast<acc_t>(g[0]), static_cast<acc_t>(g[N]), static_cast<acc_t>(g[2 * N]),
        static_cast<acc_t>(g[3 * N]), static_cast<acc_t>(*cp), wi, wf, wo);
    *cnp = static_cast<scalar_t>(E.c_new);
    *hp = static_cast<scalar_t>(E.o * E.t);
  }
}

template <typename scalar_t, typename acc_t, bool PEEP>
__global__ void convlstm_bwd_kernel(CLParams P, const scalar_t* __restrict__ gates, const scalar_t* __restrict__ c,
                                    const acc_t* __restrict__ peep, const scalar_t* __restrict__ dh,
                                    const scalar_t* __restrict__ dcn, scalar_t* __restrict__ g_gates,
                                    scalar_t* __restrict__ g_c, acc_t* __restrict__ g_peep_part) {
  const int64_t N = P.N;
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= N) return;
  const int64_t b0 = blockIdx.y * P.bper;
  const int64_t b1 = b0 + P.bper < P.B ? b0 + P.bper : P.B;
  const acc_t wi = PEEP ? peep[j] : acc_t(0), wf = PEEP ? peep[N + j] : acc_t(0),
              wo = PEEP ? peep[2 * N + j] : acc_t(0);
  acc_t si = acc_t(0), sf = acc_t(0), so = acc_t(0);
  const int64_t o4 = b0 * 4 * N + j, o1 = b0 * N + j;
  const scalar_t* g = gates + o4;
  scalar_t* gg = g_gates + o4;
  const scalar_t* cp = c + o1;
  scalar_t* gcp = g_c + o1;
  const scalar_t* dhp = dh ? dh + o1 : nullptr;
  const scalar_t* dcp = dcn ? dcn + o1 : nullptr;
  for (int64_t b = b0; b < b1; ++b) {
    acc_t da[4], dc, pi, pf, po;
    convlstm_bwd_elem<acc_t, PEEP>(static_cast<acc_t>(g[0]), static_cast<acc_t>(g[N]), static_cast<acc_t>(g[2 * N]),
                             static_cast<acc_t>(g[3 * N]), static_cast<acc_t>(*cp), wi, wf, wo,
                             dhp ? static_cast<acc_t>(*dhp) : acc_t(0), dcp ? static_cast<acc_t>(*dcp) : acc_t(0),
                             da, dc, pi, pf, po);
#pragma unroll
    for (int k = 0; k < 4; ++k) gg[k * N] = static_cast<scalar_t>(da[k]);
    *gcp = static_cast<scalar_t>(dc);
    si += pi;
    sf += pf;
    so += po;
    g += 4 * N;
    gg += 4 * N;
    cp += N;
    gcp += N;
    if (dhp) dhp += N;
    if (dcp) dcp += N;
  }
  if (g_peep_part) {
    acc_t* part = g_peep_part + blockIdx.y * 3 * N;
    part[j] = si;
    part[N + j] = sf;
    part[2 * N + j] = so;
  }
}

void run_cuda(CLTensors& T, bool backward) {
  const c10::cuda::CUDAGuard guard(T.gates.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const CLParams P = T.P;
  const dim3 grid(static_cast<unsigned>((P.N + kThreads - 1) / kThreads), static_cast<unsigned>(P.bchunks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.gates.scalar_type(), "tcloss_convlstm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* peep = P.peep ? T.peep.data_ptr<acc_t>() : nullptr;
    auto launch = [&](auto peep_tag) {
      constexpr bool PEEP = decltype(peep_tag)::value;
      if (!backward) {
        convlstm_fwd_kernel<scalar_t, acc_t, PEEP><<<grid, kThreads, 0, stream>>>(
            P, T.gates.data_ptr<scalar_t>(), T.c.data_ptr<scalar_t>(), peep, T.h_new.data_ptr<scalar_t>(),
            T.c_new.data_ptr<scalar_t>());
      } else {
        convlstm_bwd_kernel<scalar_t, acc_t, PEEP><<<grid, kThreads, 0, stream>>>(
            P, T.gates.data_ptr<scalar_t>(), T.c.data_ptr<scalar_t>(), peep,
            P.has_dh ? T.dh.data_ptr<scalar_t>() : nullptr, P.has_dcn ? T.dcn.data_ptr<scalar_t>() : nullptr,
            T.g_gates.data_ptr<scalar_t>(), T.g_c.data_ptr<scalar_t>(),
            P.g_peep ? T.g_peep_part.data_ptr<acc_t>() : nullptr);
      }
    };
    if (P.peep) launch(std::true_type{});
    else launch(std::false_type{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Enough threads to fill the device twice over (columns x batch chunks); gridDim.y <= 65535.
int64_t cuda_min_parallel(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.device().index()));
  return static_cast<int64_t>(sms > 0 ? sms : 80) * 2048 * 2;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& gates, const at::Tensor& c,
                                            const c10::optional<at::Tensor>& peephole) {
  const c10::cuda::CUDAGuard guard(gates.device());
  return convlstm_fwd_impl(run_cuda, cuda_min_parallel(gates), 65535, gates, c, peephole);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const c10::optional<at::Tensor>& grad_h,
                                                        const c10::optional<at::Tensor>& grad_c_new,
                                                        const at::Tensor& gates, const at::Tensor& c,
                                                        const c10::optional<at::Tensor>& peephole,
                                                        bool grad_peephole) {
  const c10::cuda::CUDAGuard guard(gates.device());
  return convlstm_bwd_impl(run_cuda, cuda_min_parallel(gates), 65535, grad_h, grad_c_new, gates, c, peephole,
                           grad_peephole);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcloss, CUDA, m) {
  m.impl("convlstm_cell_fwd", &fwd_cuda);
  m.impl("convlstm_cell_bwd", &bwd_cuda);
}

}  // namespace tcloss
