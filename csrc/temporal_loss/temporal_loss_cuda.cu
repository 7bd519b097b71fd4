// CUDA kernels of the fused temporal loss, per-pixel math from temporal_loss.h.
//
// One thread per pixel; a warp's threads read adjacent x, so every channel plane is read
// coalesced. Blocks are 32x8 tiles of one batch item (blockIdx.y), and offsets inside an item
// are 32-bit where every plane set fits (int64 otherwise). Per call:
//  - on="prob": one pre-pass writes the softmax statistics (max, 1/sum) of pred_tk, 8 bytes a
//    pixel, since every pixel gathers four corners of it; those of pred_t are computed by the
//    thread that owns the pixel (its channel vector is read coalesced, pass 1 re-reads it from
//    the cache).
//  - forward: the loss only (kGrads = false: none of the gradient state takes registers).
//  - backward: pass 1 over channels (reductions), pass 2 writes d pred_t and scatters d pred_tk
//    with atomics. Under a locally smooth flow, thread j's right corners (x0+1) are thread
//    j+1's left corners (x0): WarpScatter hands them over with a shuffle so each address gets
//    one atomic per warp, about halving the atomics (H200, 8x19x512x1024 fp32, smooth flow:
//    forward+backward 3.49 ms against 3.92 without; no difference under the iid flow).
//    d flow is reduced in registers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "temporal_loss/temporal_loss_host.h"

namespace tcloss {
namespace {

constexpr int kThreads = 256;

// Scatter of one pixel's four corners (nw, ne, sw, se) into a d pred_tk plane. A corner is
// emitted where it lies inside the image with nonzero weight. Lane j takes over lane j-1's ne
// (se) contribution when that lands on the address of its own nw (sw), and lane j-1 then skips
// it. Lanes are paired only inside the group of lanes that runs pass 2 together (the mask taken
// in prepare); every lane of that group runs the same channel loop, so the shuffles are legal.
template <typename acc_t, typename index_t>
struct WarpScatter {
  unsigned mask = 0;
  bool take_top = false, take_bot = false, give_top = false, give_bot = false;

  __device__ __forceinline__ void prepare(const BilinearTaps<acc_t, index_t>& t) {
    mask = __activemask();
    const int lane = threadIdx.x & 31;
    auto key = [&](int k) { return t.valid[k] && t.w[k] != acc_t(0) ? t.off[k] : index_t(-1); };
    const index_t ne_prev = __shfl_up_sync(mask, key(1), 1), se_prev = __shfl_up_sync(mask, key(3), 1);
    const bool prev_in = lane > 0 && ((mask >> (lane - 1)) & 1u);
    take_top = prev_in && key(0) >= 0 && ne_prev == key(0);
    take_bot = prev_in && key(2) >= 0 && se_prev == key(2);
    const bool next_in = lane < 31 && ((mask >> (lane + 1)) & 1u);
    const bool next_top = __shfl_down_sync(mask, take_top, 1), next_bot = __shfl_down_sync(mask, take_bot, 1);
    give_top = next_in && next_top;
    give_bot = next_in && next_bot;
  }

  __device__ __forceinline__ void operator()(acc_t* plane, const BilinearTaps<acc_t, index_t>& t,
                                             const acc_t gk[4]) const {
    const acc_t from_ne = __shfl_up_sync(mask, gk[1], 1), from_se = __shfl_up_sync(mask, gk[3], 1);
    const acc_t g[4] = {gk[0] + (take_top ? from_ne : acc_t(0)), gk[1], gk[2] + (take_bot ? from_se : acc_t(0)),
                        gk[3]};
    const bool skip[4] = {false, give_top, false, give_bot};
    for (int k = 0; k < 4; ++k)
      if (t.valid[k] && t.w[k] != acc_t(0) && !skip[k]) atomicAdd(plane + t.off[k], g[k]);
  }
};

// The main kernels run 32x8 tiles of pixels (a warp is 32 pixels of one row): the corner rows
// of vertically neighbouring pixels are shared, so under a smooth flow a block's gathers hit
// in L1 what a row-segment block would fetch from L2 again.
constexpr int kTileX = 32, kTileY = kThreads / kTileX;

dim3 grid_1d(const TLParams& P) {
  const int64_t bx = std::min<int64_t>((P.H * P.W + kThreads - 1) / kThreads, 1 << 20);
  return dim3(static_cast<unsigned>(std::max<int64_t>(bx, 1)), static_cast<unsigned>(std::min<int64_t>(P.B, 65535)));
}

// blockIdx.x: the tile (row-major over the tiles of an image), blockIdx.y: the batch item.
dim3 grid_tiles(const TLParams& P) {
  const int64_t tiles = ((P.W + kTileX - 1) / kTileX) * ((P.H + kTileY - 1) / kTileY);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min<int64_t>(P.B, 65535)));
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) softmax_stats_kernel(TLParams P, const scalar_t* __restrict__ p,
                                                                 SoftmaxStats<acc_t>* __restrict__ st) {
  const index_t HW = static_cast<index_t>(P.H * P.W), C = static_cast<index_t>(P.C);
  for (int64_t b = blockIdx.y; b < P.B; b += gridDim.y)
    for (index_t pix = blockIdx.x * kThreads + threadIdx.x; pix < HW; pix += gridDim.x * kThreads)
      st[b * HW + pix] = channel_softmax_stats<scalar_t, acc_t, index_t>(p + b * P.C * HW + pix, C, HW);
}

// kGrads = false: the forward (loss map). true: the backward (gradients scaled by dL/dl_i =
// grad_mul * grad[i or 0]; the loss map too where `loss` is given).
// The forward is gather-latency bound: held to 48 registers (ptxas picks 48-57 on its own) so
// that 5 blocks (62.5 % occupancy) fit a multiprocessor, without spills for 32-bit offsets. The
// backward is left at the 80 ptxas picks (0: no minimum); held lower, it spills.
template <bool kGrads, typename acc_t, typename index_t>
constexpr int kMinBlocks = !kGrads && sizeof(acc_t) == 4 && sizeof(index_t) == 4 ? 5 : 0;

template <bool kGrads, typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<kGrads, acc_t, index_t>)) temporal_loss_kernel(
    TLParams P, const scalar_t* __restrict__ pt, const scalar_t* __restrict__ ptk, const acc_t* __restrict__ flow,
    const acc_t* __restrict__ it, const acc_t* __restrict__ itk, const SoftmaxStats<acc_t>* __restrict__ st_tk,
    const acc_t* __restrict__ grad, bool grad_map, acc_t grad_mul, acc_t* __restrict__ loss,
    scalar_t* __restrict__ gpt, acc_t* __restrict__ gptk, acc_t* __restrict__ gfl) {
  const index_t H = static_cast<index_t>(P.H), W = static_cast<index_t>(P.W), HW = H * W;
  const index_t tiles_x = (W + kTileX - 1) / kTileX, tile_y = blockIdx.x / tiles_x;
  const index_t x = (blockIdx.x - tile_y * tiles_x) * kTileX + threadIdx.x, y = tile_y * kTileY + threadIdx.y;
  if (x >= W || y >= H) return;
  const index_t pix = y * W + x;
  for (int64_t b = blockIdx.y; b < P.B; b += gridDim.y) {
    const TLItem<scalar_t, acc_t> I = tl_item<scalar_t, acc_t>(P, b, pt, ptk, flow, it, itk, st_tk, gpt, gptk, gfl);
    const acc_t g = kGrads ? grad_mul * grad[grad_map ? b * HW + pix : 0] : acc_t(0);
    WarpScatter<acc_t, index_t> scatter;
    const acc_t l = temporal_loss_pixel<kGrads, scalar_t, acc_t, index_t>(P, I, y, x, g, scatter);
    if (loss) loss[b * HW + pix] = l;
  }
}

template <typename scalar_t, typename index_t>
void launch(TLTensors& T, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const TLParams& P = T.P;
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
  at::Tensor st_tk;
  SoftmaxStats<acc_t>* st = nullptr;
  if (P.on_prob) {
    st_tk = tl_softmax_stats_buffer(P, T.flow);
    st = reinterpret_cast<SoftmaxStats<acc_t>*>(st_tk.data_ptr<acc_t>());
    softmax_stats_kernel<scalar_t, acc_t, index_t><<<grid_1d(P), kThreads, 0, stream>>>(P, T.ptk.data_ptr<scalar_t>(), st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const bool grads = P.g_pt || P.g_ptk || P.g_flow;
  auto kernel = grads ? temporal_loss_kernel<true, scalar_t, acc_t, index_t>
                      : temporal_loss_kernel<false, scalar_t, acc_t, index_t>;
  kernel<<<grid_tiles(P), dim3(kTileX, kTileY), 0, stream>>>(
      P, T.pt.data_ptr<scalar_t>(), T.ptk.data_ptr<scalar_t>(), ptr(T.flow), ptr(T.it), ptr(T.itk), st,
      ptr(T.grad), T.grad.defined() && T.grad.numel() > 1, static_cast<acc_t>(T.grad_mul), ptr(T.loss_map),
      T.g_pt.defined() ? T.g_pt.data_ptr<scalar_t>() : nullptr, ptr(T.g_ptk_acc), ptr(T.g_flow));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_cuda(TLTensors& T) {
  const c10::cuda::CUDAGuard guard(T.pt.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const TLParams& P = T.P;
  if (P.B * P.H * P.W == 0) return;
  // 32-bit offsets inside a batch item when its largest tensor (C, Ci or 2 planes) fits.
  const int64_t planes = std::max<int64_t>({P.C, P.Ci, 2});
  const bool small = planes * P.H * P.W < std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T.pt.scalar_type(), "tcloss_temporal_loss_cuda", [&] {
    if (small) launch<scalar_t, int32_t>(T, stream);
    else launch<scalar_t, int64_t>(T, stream);
  });
}

at::Tensor fwd_cuda(const at::Tensor& pred_t, const at::Tensor& pred_tk, const at::Tensor& flow,
                   const at::Tensor& img_t, const at::Tensor& img_tk, bool on_prob, int64_t mask_mode,
                   double mask_power, bool zeros_padding, int64_t reduction) {
  return temporal_loss_fwd_impl(run_cuda, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power,
                                zeros_padding, reduction);
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
