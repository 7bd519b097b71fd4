"""User-facing functions: argument checks, then dispatch to a backend (see tcloss._backends)."""
from __future__ import annotations

import numbers

import torch

from . import reference
from ._backends import resolve
from ._backends import temporal_loss as _tl

__all__ = ["flow_warp", "occlusion_mask", "temporal_loss"]


def _check_tensor(name: str, t, ndim: int | None = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (B,C,H,W), got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_flow(flow, B: int, H: int, W: int, device: torch.device, name: str = "flow") -> None:
    _check_tensor(name, flow, 4)
    if tuple(flow.shape) != (B, 2, H, W):
        raise ValueError(f"{name} must have shape (B,2,H,W) = {(B, 2, H, W)} (channel 0 = dx, 1 = dy, in pixels), "
                         f"got {tuple(flow.shape)}")
    if flow.device != device:
        raise ValueError(f"{name} must be on {device}, got {flow.device}")
    if H < 2 or W < 2:
        raise ValueError(f"H and W must be at least 2 for bilinear warping, got H={H}, W={W}")


def _check_images(img_t, img_tk, B: int, H: int, W: int, device: torch.device) -> None:
    _check_tensor("img_t", img_t, 4)
    _check_tensor("img_tk", img_tk, 4)
    if img_t.shape[0] != B or tuple(img_t.shape[2:]) != (H, W):
        raise ValueError(f"img_t must be (B,Ci,H,W) with B,H,W = {(B, H, W)} of the predictions, "
                         f"got {tuple(img_t.shape)}")
    if img_tk.shape != img_t.shape:
        raise ValueError(f"img_tk must have the shape of img_t {tuple(img_t.shape)}, got {tuple(img_tk.shape)}")
    if img_t.shape[1] < 1:
        raise ValueError("img_t must have at least one channel")
    for n, t in (("img_t", img_t), ("img_tk", img_tk)):
        if t.device != device:
            raise ValueError(f"{n} must be on {device}, got {t.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{n} requires grad, but the occlusion mask is a constant of the loss (no gradient "
                             f"flows into images): pass {n}.detach()")


def flow_warp(x: torch.Tensor, flow: torch.Tensor, *, padding: str = "border") -> torch.Tensor:
    """Bilinearly warp ``x`` (B,C,H,W) backwards by ``flow`` (B,2,H,W), in pixels.

    ``out[b,c,y,x] = bilinear(x[b,c], y + flow[b,1,y,x], x + flow[b,0,y,x])``. ``padding="border"``
    equals ``grid_sample(align_corners=True, padding_mode="border")``; ``"zeros"`` reads 0
    outside the frame. Differentiable w.r.t. ``x`` and ``flow``. Runs on PyTorch's own
    grid_sample kernels on every device (already a single fused pass for a plain warp).
    """
    _check_tensor("x", x, 4)
    B, _, H, W = x.shape
    _check_flow(flow, B, H, W, x.device)
    _check_choice("padding", padding, reference.PADDINGS)
    return reference.flow_warp(x, flow, padding)


def occlusion_mask(img_t: torch.Tensor, img_tk: torch.Tensor, flow: torch.Tensor, *, mode: str = "signed_sum",
                   padding: str = "border") -> torch.Tensor:
    """Occlusion mask ``V = exp(-r)`` (B,1,H,W) of eq. 1.

    ``d = img_t - flow_warp(img_tk, flow)``; ``r = |sum_c d_c|`` (``signed_sum``, what the paper's
    released code does), ``sum_c |d_c|`` (``l1``) or ``sqrt(sum_c d_c^2)`` (``l2``). The scale of
    the images sets the sharpness of the mask (the released code used normalised images).
    """
    _check_tensor("img_t", img_t, 4)
    B, _, H, W = img_t.shape
    _check_flow(flow, B, H, W, img_t.device)
    _check_tensor("img_tk", img_tk, 4)
    if img_tk.shape != img_t.shape:
        raise ValueError(f"img_tk must have the shape of img_t {tuple(img_t.shape)}, got {tuple(img_tk.shape)}")
    _check_choice("mode", mode, reference.MASK_MODES)
    _check_choice("padding", padding, reference.PADDINGS)
    return reference.occlusion_mask(img_t, img_tk, flow, mode=mode, padding=padding)


def temporal_loss(pred_t: torch.Tensor, pred_tk: torch.Tensor, flow: torch.Tensor, img_t: torch.Tensor,
                  img_tk: torch.Tensor, *, on: str = "prob", mask_mode: str = "signed_sum", mask_power: float = 1,
                  padding: str = "border", detach_target: bool = False, reduction: str = "mean",
                  backend: str = "auto") -> torch.Tensor:
    """Fused temporal loss, eq. 1 of Liu et al. (ECCV 2020).

    Per pixel ``l_i = V_i^mask_power * sum_c (q_t[c,i] - warp(q_tk)[c,i])^2`` with
    ``q = softmax_C(pred)`` (``on="prob"``, fused in the kernel) or ``q = pred`` (``on="logit"``),
    ``warp`` = :func:`flow_warp` by ``flow`` (frame t -> t+k, in pixels) and
    ``V`` = :func:`occlusion_mask` ``(img_t, img_tk, flow, mode=mask_mode)``, a constant.

    Args:
        pred_t, pred_tk: (B,C,H,W) scores of frames t and t+k (float16/bfloat16/float32/float64).
        flow: (B,2,H,W) optical flow t -> t+k in pixels (channel 0 = dx, 1 = dy).
        img_t, img_tk: (B,Ci,H,W) frames for the occlusion mask (must not require grad).
        reduction: ``"mean"`` (sum / (B*H*W)), ``"sum"`` or ``"none"`` ((B,H,W) map).
        detach_target: no gradient into ``pred_tk``.
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns float32 (float64 for float64 inputs); accumulation is in float32 at least.
    Gradients flow into ``pred_t``, ``pred_tk`` (unless ``detach_target``) and ``flow``.

    The paper's released code computes ``MSE(V*z_t, V*warp(z_tk))`` on logits, which is exactly
    ``temporal_loss(z_t, z_tk, flow, I_t, I_tk, on="logit", mask_power=2) / C``.
    """
    _check_tensor("pred_t", pred_t, 4)
    _check_tensor("pred_tk", pred_tk, 4)
    if pred_tk.shape != pred_t.shape:
        raise ValueError(f"pred_tk must have the shape of pred_t {tuple(pred_t.shape)}, got {tuple(pred_tk.shape)}")
    if pred_tk.device != pred_t.device:
        raise ValueError(f"pred_tk must be on {pred_t.device}, got {pred_tk.device}")
    B, C, H, W = pred_t.shape
    if C < 1:
        raise ValueError("pred_t must have at least one channel")
    _check_flow(flow, B, H, W, pred_t.device)
    _check_images(img_t, img_tk, B, H, W, pred_t.device)
    _check_choice("on", on, ("prob", "logit"))
    _check_choice("mask_mode", mask_mode, reference.MASK_MODES)
    _check_choice("padding", padding, reference.PADDINGS)
    _check_choice("reduction", reduction, reference.REDUCTIONS)
    if isinstance(mask_power, bool) or not isinstance(mask_power, numbers.Real) or not mask_power >= 0:
        raise ValueError(f"mask_power must be a non-negative number, got {mask_power!r}")
    if pred_tk.dtype != pred_t.dtype:  # e.g. mixed autocast outputs: compute in the wider type
        dt = torch.promote_types(pred_t.dtype, pred_tk.dtype)
        pred_t, pred_tk = pred_t.to(dt), pred_tk.to(dt)

    name = resolve("temporal_loss", pred_t.device, backend)
    if name == "reference":
        return reference.temporal_loss(pred_t, pred_tk, flow, img_t, img_tk, on=on, mask_mode=mask_mode,
                                       mask_power=mask_power, padding=padding, detach_target=detach_target,
                                       reduction=reduction)
    if detach_target:
        pred_tk = pred_tk.detach()
    red = _tl.REDUCTION[reduction]
    grad_on = torch.is_grad_enabled()
    # Liger-style: for a scalar loss the forward kernel also writes the gradients it will need.
    want = [grad_on and red != 0 and t.requires_grad for t in (pred_t, pred_tk, flow)]
    out = _tl.fwd_op(name)(pred_t, pred_tk, flow, img_t.detach(), img_tk.detach(), on == "prob",
                           _tl.MASK_MODE[mask_mode], float(mask_power), padding == "zeros", red, *want)
    return out[0]
