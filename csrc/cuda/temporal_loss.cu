// CUDA kernels of the fused temporal loss: one thread per pixel (adjacent threads read adjacent
// x, so every channel plane is read coalesced), per-pixel math from kernels/temporal_loss.h,
// atomicAdd for the bilinear scatter into d pred_tk, flow gradient reduced in registers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../temporal_loss_host.h"

namespace tcloss {
namespace {

constexpr int kThreads = 256;

struct AtomicAdd {
  template <typename T>
  __device__ __forceinline__ void operator()(T* p, T v) const { atomicAdd(p, v); }
};

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? (b > 0 ? b : 1) : 65535 * 32);
}

template <typename scalar_t, typename acc_t>
__global__ void softmax_stats_kernel(TLParams P, const scalar_t* __restrict__ pt, const scalar_t* __restrict__ ptk,
                                     SoftmaxStats<acc_t>* __restrict__ st_t, SoftmaxStats<acc_t>* __restrict__ st_tk) {
  const int64_t HW = P.H * P.W, n = P.B * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / HW, pix = i - b * HW;
    st_t[i] = channel_softmax_stats<scalar_t, acc_t>(pt + b * P.C * HW + pix, P.C, HW);
    st_tk[i] = channel_softmax_stats<scalar_t, acc_t>(ptk + b * P.C * HW + pix, P.C, HW);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void temporal_loss_kernel(TLParams P, const scalar_t* __restrict__ pt, const scalar_t* __restrict__ ptk,
                                     const acc_t* __restrict__ flow, const acc_t* __restrict__ it,
                                     const acc_t* __restrict__ itk, const SoftmaxStats<acc_t>* __restrict__ st_t,
                                     const SoftmaxStats<acc_t>* __restrict__ st_tk, const acc_t* __restrict__ grad, bool grad_map,
                                     acc_t grad_mul, acc_t* __restrict__ loss, scalar_t* __restrict__ gpt,
                                     acc_t* __restrict__ gptk, acc_t* __restrict__ gfl) {
  const int64_t HW = P.H * P.W, n = P.B * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / HW, pix = i - b * HW, y = pix / P.W, x = pix - y * P.W;
    const acc_t g = grad_mul * (grad ? grad[grad_map ? i : 0] : acc_t(1));
    const acc_t l = temporal_loss_pixel<scalar_t, acc_t, AtomicAdd>(P, b, y, x, pt, ptk, flow, it, itk, st_t, st_tk,
                                                                    g, gpt, gptk, gfl, AtomicAdd{});
    if (loss) loss[i] = l;  // the backward writes gradients only
  }
}

void run_cuda(TLTensors& T) {
  const c10::cuda::CUDAGuard guard(T.pt.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const TLParams P = T.P;
  const int64_t n = P.B * P.H * P.W;
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.pt.scalar_type(), "tcloss_temporal_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
    auto stats = [](const at::Tensor& t) {
      return t.defined() ? reinterpret_cast<SoftmaxStats<acc_t>*>(t.data_ptr<acc_t>()) : nullptr;
    };
    at::Tensor st_t, st_tk;
    if (P.on_prob) {
      st_t = tl_softmax_stats_buffer(P, T.flow);
      st_tk = tl_softmax_stats_buffer(P, T.flow);
      softmax_stats_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
          P, T.pt.data_ptr<scalar_t>(), T.ptk.data_ptr<scalar_t>(), stats(st_t), stats(st_tk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    temporal_loss_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        P, T.pt.data_ptr<scalar_t>(), T.ptk.data_ptr<scalar_t>(), ptr(T.flow), ptr(T.it), ptr(T.itk),
        stats(st_t), stats(st_tk), ptr(T.grad), T.grad.defined() && T.grad.numel() > 1,
        static_cast<acc_t>(T.grad_mul), ptr(T.loss_map), T.g_pt.defined() ? T.g_pt.data_ptr<scalar_t>() : nullptr,
        ptr(T.g_ptk_acc), ptr(T.g_flow));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& pred_t, const at::Tensor& pred_tk, const at::Tensor& flow, const at::Tensor& img_t,
    const at::Tensor& img_tk, bool on_prob, int64_t mask_mode, double mask_power, bool zeros_padding,
    int64_t reduction, bool g_pt, bool g_ptk, bool g_flow) {
  return temporal_loss_fwd_impl(run_cuda, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power,
                                zeros_padding, reduction, g_pt, g_ptk, g_flow);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad, const at::Tensor& pred_t, const at::Tensor& pred_tk, const at::Tensor& flow,
    const at::Tensor& img_t, const at::Tensor& img_tk, bool on_prob, int64_t mask_mode, double mask_power,
    bool zeros_padding, int64_t reduction, bool g_pt, bool g_ptk, bool g_flow) {
  return temporal_loss_bwd_impl(run_cuda, grad, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode,
                                mask_power, zeros_padding, reduction, g_pt, g_ptk, g_flow);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcloss, CUDA, m) {
  m.impl("temporal_loss_fwd", &fwd_cuda);
  m.impl("temporal_loss_bwd", &bwd_cuda);
}

}  // namespace tcloss
