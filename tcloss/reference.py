"""Pure-PyTorch reference of every tcloss op: the test oracle and the fallback backend.

Written from the paper's equations (Liu et al., ECCV 2020) with plain differentiable PyTorch
ops, so autograd supplies the gradients. Conventions: NCHW; flow in pixels, channel 0 = dx,
channel 1 = dy; ``out[b,:,y,x] = bilinear(x[b], y + flow[b,1,y,x], x + flow[b,0,y,x])``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_MODES = ("signed_sum", "l1", "l2")
PADDINGS = ("border", "zeros")
REDUCTIONS = ("none", "mean", "sum")


def _grid(flow: torch.Tensor) -> torch.Tensor:
    """Normalised sampling grid (align_corners=True) of ``x + flow``; (B,H,W,2)."""
    B, _, H, W = flow.shape
    ys = torch.arange(H, device=flow.device, dtype=flow.dtype).view(1, H, 1)
    xs = torch.arange(W, device=flow.device, dtype=flow.dtype).view(1, 1, W)
    px = xs + flow[:, 0]
    py = ys + flow[:, 1]
    # align_corners=True maps -1 -> pixel 0 and +1 -> pixel W-1.
    gx = px * (2.0 / (W - 1)) - 1.0
    gy = py * (2.0 / (H - 1)) - 1.0
    return torch.stack((gx, gy), dim=-1)


def flow_warp(x: torch.Tensor, flow: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Bilinear backward warp: ``out[b,c,y,x] = x[b,c](y + flow[b,1,y,x], x + flow[b,0,y,x])``.

    ``padding="border"`` clamps samples to the image (``grid_sample(align_corners=True,
    padding_mode="border")``); ``"zeros"`` reads 0 outside. Computed in ``flow``'s dtype
    promoted with ``x``'s.
    """
    dtype = torch.promote_types(x.dtype, flow.dtype)
    return F.grid_sample(x.to(dtype), _grid(flow.to(dtype)), mode="bilinear", padding_mode=padding,
                         align_corners=True)


def occlusion_mask(img_t: torch.Tensor, img_tk: torch.Tensor, flow: torch.Tensor, mode: str = "signed_sum",
                   padding: str = "border") -> torch.Tensor:
    """``V = exp(-r)`` with ``d = img_t - flow_warp(img_tk, flow)`` and ``r`` = ``|sum_c d_c|``
    (signed_sum, the released code), ``sum_c |d_c|`` (l1) or ``sqrt(sum_c d_c^2)`` (l2). (B,1,H,W)."""
    d = img_t.to(flow.dtype) - flow_warp(img_tk, flow, padding)
    if mode == "signed_sum":
        r = d.sum(1, keepdim=True).abs()
    elif mode == "l1":
        r = d.abs().sum(1, keepdim=True)
    elif mode == "l2":
        r = d.pow(2).sum(1, keepdim=True).sqrt()
    else:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    return torch.exp(-r)


def temporal_loss(pred_t: torch.Tensor, pred_tk: torch.Tensor, flow: torch.Tensor, img_t: torch.Tensor,
                  img_tk: torch.Tensor, on: str = "prob", mask_mode: str = "signed_sum", mask_power: float = 1,
                  padding: str = "border", detach_target: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Temporal loss, eq. 1: ``l_i = V_i^p * sum_c (q_t[c,i] - warp(q_tk)[c,i])^2``.

    ``q = softmax_C(pred)`` (on="prob") or ``pred`` (on="logit"); V = :func:`occlusion_mask`,
    a constant (no gradient). ``mean`` divides the sum by B*H*W; ``none`` returns (B,H,W).
    Computed in float32 (float64 for float64 inputs). A pixel whose flow is not finite gets
    a NaN loss and contributes no gradient (the kernels do the same).
    """
    acc = torch.float64 if pred_t.dtype == torch.float64 else torch.float32
    flow = flow.to(acc)
    finite = torch.isfinite(flow).all(1)  # (B,H,W)
    flow_safe = torch.where(finite.unsqueeze(1), flow, torch.zeros_like(flow))
    with torch.no_grad():
        v = occlusion_mask(img_t.to(acc), img_tk.to(acc), flow_safe.detach(), mode=mask_mode, padding=padding)
        vp = v.pow(mask_power)[:, 0] if mask_power != 1 else v[:, 0]
    zt, ztk = pred_t.to(acc), pred_tk.to(acc)
    if detach_target:
        ztk = ztk.detach()
    if on == "prob":
        qt, qtk = torch.softmax(zt, 1), torch.softmax(ztk, 1)
    elif on == "logit":
        qt, qtk = zt, ztk
    else:
        raise ValueError(f"on must be 'prob' or 'logit', got {on!r}")
    warped = flow_warp(qtk, flow_safe, padding)
    loss = vp * (qt - warped).pow(2).sum(1)
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def released_code_temporal_loss(z_t, z_tk, flow, img_t, img_tk):
    """The paper's released temporal loss, transcribed: ``MSE(V*z_t, V*warp(z_tk))`` on logits with
    ``V = exp(-|sum_c (I_t - warp(I_tk))_c|)``, border warping, a mean over B*C*H*W. Only for
    parity tests: equals ``temporal_loss(..., on="logit", mask_power=2) / C``."""
    with torch.no_grad():
        v = occlusion_mask(img_t, img_tk, flow, mode="signed_sum", padding="border")
    return F.mse_loss(v * z_t, v * flow_warp(z_tk, flow, "border"))


# --- pair-wise cosine-similarity distillation (pairwise_similarity_loss) -----------------------


# --- ConvLSTM cell (convlstm_cell) -------------------------------------------------------------
