"""PyTorch definitions that the shipped code and the test oracle (:mod:`tcloss.reference`) share.

Each defines how an op reads its inputs, rather than an algorithm a kernel is tested on: the
bilinear warp (``grid_sample``, the unfused baseline; the public :func:`tcloss.flow_warp` and
:func:`tcloss.occlusion_mask` run it), the occlusion residual, the saturating conversion of
images, and the power-of-two scale under every unit row (exact: it changes no bit of a cosine).
Used by several ops and by the oracle, so it lives in none of them (tcloss.reference says why
the oracle shares these instead of copying them). Imports no kernel module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def saturate_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` with finite values beyond ``dtype``'s range clamped to its largest finite
    value (a float64 image of 1e300 stays a huge finite number in float32, not inf); inf and NaN
    are kept."""
    if not dtype.is_floating_point or torch.finfo(x.dtype).max <= torch.finfo(dtype).max:
        return x.to(dtype)
    m = torch.finfo(dtype).max
    return torch.where(torch.isfinite(x), x.clamp(-m, m), x).to(dtype)


def _grid(flow: torch.Tensor) -> torch.Tensor:
    """Normalised sampling grid (align_corners=True) of ``x + flow``; (B,H,W,2)."""
    B, _, H, W = flow.shape
    ys = torch.arange(H, device=flow.device, dtype=flow.dtype).view(1, H, 1)
    xs = torch.arange(W, device=flow.device, dtype=flow.dtype).view(1, 1, W)
    # align_corners=True maps -1 -> pixel 0 and +1 -> pixel W-1.
    gx = (xs + flow[:, 0]) * (2.0 / (W - 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / (H - 1)) - 1.0
    return torch.stack((gx, gy), dim=-1)


def flow_warp(x: torch.Tensor, flow: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Bilinear backward warp: ``out[b,c,y,x] = x[b,c](y + flow[b,1,y,x], x + flow[b,0,y,x])``.

    ``padding="border"`` clamps samples to the image (``grid_sample(align_corners=True,
    padding_mode="border")``); ``"zeros"`` reads 0 outside. Returned in ``flow``'s dtype
    promoted with ``x``'s, computed in at least float32 (a float16 grid overflows at flows of a
    few 1e4 pixels). grid_sample's normalised grid leaves weights of ~1e-7 (float32) on the
    neighbours of an integer sample point: exact to that relative level, not beyond (the kernels
    compute the corners from pixel coordinates; an exact warp in PyTorch ops measured 2x slower
    than grid_sample on the CPU, and this is the unfused baseline the kernels are judged by).
    """
    dtype = torch.promote_types(x.dtype, flow.dtype)
    work = torch.promote_types(dtype, torch.float32)
    out = F.grid_sample(x.to(work), _grid(flow.to(work)), mode="bilinear", padding_mode=padding, align_corners=True)
    return out.to(dtype)


def occlusion_residual(img_t: torch.Tensor, img_tk: torch.Tensor, flow: torch.Tensor, mode: str = "signed_sum",
                       padding: str = "border") -> torch.Tensor:
    """``r`` of the occlusion mask ``V = exp(-r)`` (B,1,H,W): ``d = img_t - flow_warp(img_tk, flow)``,
    ``r = |sum_c d_c|`` (signed_sum, the released code), ``sum_c |d_c|`` (l1) or ``sqrt(sum_c d_c^2)`` (l2)."""
    # both images in one dtype (img_t's, img_tk's and flow's promoted): rounded alike
    dtype = torch.promote_types(torch.promote_types(img_t.dtype, img_tk.dtype), flow.dtype)
    d = img_t.to(dtype) - flow_warp(img_tk.to(dtype), flow, padding)
    if mode == "signed_sum":
        return d.sum(1, keepdim=True).abs()
    if mode == "l1":
        return d.abs().sum(1, keepdim=True)
    if mode == "l2":
        return d.pow(2).sum(1, keepdim=True).sqrt()
    # the options' one list is tcloss._backends.temporal_loss.MASK_MODES (checked before any shipped
    # call); a direct caller learns the branches above
    raise ValueError(f"mode must be one of ('signed_sum', 'l1', 'l2'), got {mode!r}")


def occlusion_mask(img_t: torch.Tensor, img_tk: torch.Tensor, flow: torch.Tensor, mode: str = "signed_sum",
                   padding: str = "border") -> torch.Tensor:
    """``V = exp(-r)``, r = :func:`occlusion_residual`. (B,1,H,W)."""
    return torch.exp(-occlusion_residual(img_t, img_tk, flow, mode, padding))


def pow2_scale(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per vector along ``dim``, the power of two ``2^-e`` that brings its largest magnitude into
    [0.5, 1) (``e`` the frexp exponent of ``max |x|``; a constant, no gradient), clamped so the
    scale itself stays representable (tiny vectors are scaled by at most 2^126 in float32).

    Norms are taken of ``x * scale``: they cannot overflow (features of 1e20 or 3e38 whose
    float32 sum of squares is inf) or underflow, and since the scale is a power of two,
    ``(x * scale) / ||x * scale||`` has the bits of ``x / ||x||`` wherever that did not overflow.
    Zero, infinite and NaN vectors get the scale 1 (what they gave before: 0, NaN). The exponent
    goes to ``ldexp`` in ``m``'s dtype: with an integer exponent, torch < 2.6 computed ``2^-e`` in
    float32 (2^-665, the scale of a 1e200 row, was 0)."""
    m = x.detach().abs().amax(dim, keepdim=True)
    e = torch.frexp(m).exponent.clamp_min(round(math.log2(torch.finfo(x.dtype).tiny)))
    return torch.ldexp(torch.ones_like(m), (-e).to(m.dtype))


def unit_vectors(x: torch.Tensor, dim: int, eps: float, detach_norm: bool = False) -> torch.Tensor:
    """``x / max(||x||, eps)`` along ``dim``, computed as ``xs / max(||xs||, eps * s)`` with
    ``xs = x * s``, ``s`` = :func:`pow2_scale`: the same value (and gradient: ``s`` is a
    constant and the expression is invariant to it), but the norm of large finite vectors no
    longer overflows to inf (which made them zero vectors). Where ``||x|| <= eps`` the norm is
    the constant ``eps`` (as ``clamp_min``: no gradient through the norm at a tie either).
    ``detach_norm=True`` makes the norm a constant for autograd."""
    s = pow2_scale(x, dim)
    xs = x * s
    n = torch.linalg.vector_norm(xs, dim=dim, keepdim=True)
    if detach_norm:
        n = n.detach()
    floor = eps * s
    return xs / torch.where(n > floor, n, floor)


def pairwise_normalize(x: torch.Tensor, eps: float = 1e-8, detach_norm: bool = False,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B,C,H,W) or (B,C,N) -> (B,N,C) rows ``x_i / max(||x_i||, eps)`` in ``dtype`` (through
    :func:`unit_vectors`: exact for large finite features too).

    ``detach_norm=True`` makes the norm a constant for autograd (the structured-distillation
    code's convention)."""
    x = x.reshape(x.shape[0], x.shape[1], -1)
    if dtype is not None:
        x = x.to(dtype)
    return unit_vectors(x.transpose(1, 2), 2, eps, detach_norm)
