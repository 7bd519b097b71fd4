"""Pure-PyTorch reference of every tcloss op: the test oracle and the fallback backend.

Written from the paper's equations (Liu et al., ECCV 2020) with plain differentiable PyTorch
ops, so autograd supplies the gradients. Conventions: NCHW; flow in pixels, channel 0 = dx,
channel 1 = dy; ``out[b,:,y,x] = bilinear(x[b], y + flow[b,1,y,x], x + flow[b,0,y,x])``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dtypes import acc_dtype

MASK_MODES = ("signed_sum", "l1", "l2")
PADDINGS = ("border", "zeros")
REDUCTIONS = ("none", "mean", "sum")


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
    raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")


def occlusion_mask(img_t: torch.Tensor, img_tk: torch.Tensor, flow: torch.Tensor, mode: str = "signed_sum",
                   padding: str = "border") -> torch.Tensor:
    """``V = exp(-r)``, r = :func:`occlusion_residual`. (B,1,H,W)."""
    return torch.exp(-occlusion_residual(img_t, img_tk, flow, mode, padding))


def temporal_loss(pred_t: torch.Tensor, pred_tk: torch.Tensor, flow: torch.Tensor, img_t: torch.Tensor,
                  img_tk: torch.Tensor, on: str = "prob", mask_mode: str = "signed_sum", mask_power: float = 1,
                  padding: str = "border", detach_target: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Temporal loss, eq. 1: ``l_i = V_i^p * sum_c (q_t[c,i] - warp(q_tk)[c,i])^2``.

    ``q = softmax_C(pred)`` (on="prob") or ``pred`` (on="logit"); V = :func:`occlusion_mask`,
    a constant (no gradient). ``mean`` divides the sum by B*H*W; ``none`` returns (B,H,W).
    Computed in float32 (float64 for float64 inputs). A pixel whose flow is not finite gets
    a NaN loss and contributes no gradient (the kernels do the same).
    """
    acc = acc_dtype(pred_t.dtype)
    flow = flow.to(acc)
    finite = torch.isfinite(flow).all(1)  # (B,H,W)
    flow_safe = torch.where(finite.unsqueeze(1), flow, torch.zeros_like(flow))
    with torch.no_grad():
        r = occlusion_residual(saturate_to(img_t, acc), saturate_to(img_tk, acc), flow_safe.detach(), mode=mask_mode,
                               padding=padding)[:, 0]
        # V^p = exp(-p r), not exp(-r)^p: exp(-r) underflows to 0 long before exp(-p r) does for a
        # small p; V^0 = 1 even where r is infinite
        if mask_power == 0:
            vp = torch.ones_like(r)
        else:  # p as a positive number of r's dtype (1e-46 would round to 0 in float32), as the kernels
            fi = torch.finfo(r.dtype)
            vp = torch.exp(-min(max(float(mask_power), fi.smallest_normal * fi.eps), fi.max) * r)
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

PAIRWISE_LOSSES = ("mse", "kl")
PAIRWISE_ALGORITHMS = ("auto", "blocked", "gram", "naive")
PAIRWISE_PRECISIONS = ("ieee", "tf32", "bf16")


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


def pairwise_similarity_loss(student_a: torch.Tensor, teacher_a: torch.Tensor, student_b: torch.Tensor | None = None,
                             teacher_b: torch.Tensor | None = None, loss: str = "mse", temperature: float = 1.0,
                             detach_norm: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """Naive pair-wise distillation (eq. 2 / eq. 5 of Liu et al.): materialises the N_a x N_b maps
    ``S[b,i,j] = cos(student_a[b,:,i], student_b[b,:,j])`` and ``T`` (teacher) likewise, with
    ``cos(x,y) = x.y / (max(|x|,eps) max(|y|,eps))``.

    ``loss="mse"``: ``mean_{b,i,j} (S - T)^2``. ``loss="kl"``: ``mean_{b,i} KL(softmax_j(T_i/tau) ||
    softmax_j(S_i/tau))`` (row-wise relational distillation, no tau^2 factor). ``*_b`` default to
    ``*_a`` (self-similarity). Computed in float32 (float64 for float64 inputs).
    """
    acc = acc_dtype(student_a.dtype)
    sa = pairwise_normalize(student_a, eps, detach_norm, acc)
    ta = pairwise_normalize(teacher_a, eps, detach_norm, acc)
    sb = sa if student_b is None else pairwise_normalize(student_b, eps, detach_norm, acc)
    tb = ta if teacher_b is None else pairwise_normalize(teacher_b, eps, detach_norm, acc)
    S = sa @ sb.transpose(1, 2)
    T = ta @ tb.transpose(1, 2)
    if loss == "mse":
        return (S - T).pow(2).mean()
    if loss == "kl":
        logq = torch.log_softmax(S / temperature, dim=-1)
        logp = torch.log_softmax(T / temperature, dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()
    raise ValueError(f"loss must be one of {PAIRWISE_LOSSES}, got {loss!r}")


def pairwise_similarity_loss_gram(student_a: torch.Tensor, teacher_a: torch.Tensor,
                                  student_b: torch.Tensor | None = None, teacher_b: torch.Tensor | None = None,
                                  detach_norm: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """MSE pair-wise loss through C x C Gram matrices, never forming an N x N map.

    With row-normalised A_s (N_a x C_s), B_s, A_t, B_t (S = A_s B_s^T, T = A_t B_t^T):
    ``sum (S-T)^2 = <A_s^T A_s, B_s^T B_s> + <A_t^T A_t, B_t^T B_t> - 2 <A_s^T A_t, B_s^T B_t>``
    (Frobenius products of C_s x C_s, C_t x C_t and C_s x C_t matrices): O(N C^2) instead of
    O(N^2 C). The three terms nearly cancel when S ~ T, so the normalisation, the Gram matrices
    and the contraction are all in float64 (relative error ~1e-16 x sum S^2 / sum (S-T)^2).
    Backward is autograd through the same float64 matmuls (C x C products again).
    """
    acc = acc_dtype(student_a.dtype)
    d = torch.float64
    sa = pairwise_normalize(student_a, eps, detach_norm, d)
    ta = pairwise_normalize(teacher_a, eps, detach_norm, d)
    self_sim = student_b is None and teacher_b is None
    sb = sa if student_b is None else pairwise_normalize(student_b, eps, detach_norm, d)
    tb = ta if teacher_b is None else pairwise_normalize(teacher_b, eps, detach_norm, d)
    B, Na, Nb = sa.shape[0], sa.shape[1], sb.shape[1]

    def gram(x, y):  # (B,N,Cx),(B,N,Cy) -> (B,Cx,Cy)
        return x.transpose(1, 2) @ y

    g_ss_a, g_tt_a, g_st_a = gram(sa, sa), gram(ta, ta), gram(sa, ta)
    if self_sim:
        g_ss_b, g_tt_b, g_st_b = g_ss_a, g_tt_a, g_st_a
    else:
        g_ss_b, g_tt_b, g_st_b = gram(sb, sb), gram(tb, tb), gram(sb, tb)
    total = (g_ss_a * g_ss_b).sum() + (g_tt_a * g_tt_b).sum() - 2.0 * (g_st_a * g_st_b).sum()
    return (total / (B * Na * Nb)).to(acc)


# --- ConvLSTM cell (convlstm_cell) -------------------------------------------------------------


def convlstm_cell(gates: torch.Tensor, c: torch.Tensor, peephole=None):
    """Pointwise part of one ConvLSTM step, eq. 6 of the supplement (Shi et al. 2015), unfused.

    ``gates`` (B,4*Hd,h,w): pre-activations of the convolution over ``cat(x_t, h_{t-1})`` in
    PyTorch's order i, f, g, o; ``c`` (B,Hd,h,w); ``peephole`` = ``(w_i, w_f, w_o)``, each
    broadcastable to (Hd,h,w), or None::

        i = sigmoid(a_i + w_i*c)   f = sigmoid(a_f + w_f*c)   g = tanh(a_g)
        c' = f*c + i*g             o = sigmoid(a_o + w_o*c')  h' = o*tanh(c')

    Computed in float32 (float64 for float64 inputs); returns (h', c') in the promoted dtype of
    ``gates`` and ``c``.
    """
    dt = torch.promote_types(gates.dtype, c.dtype)
    acc = acc_dtype(dt)
    a_i, a_f, a_g, a_o = gates.to(acc).chunk(4, 1)
    c = c.to(acc)
    if peephole is None:
        i = torch.sigmoid(a_i)
        z_f = a_f
    else:
        w_i, w_f, w_o = (w.to(acc) for w in peephole)
        i = torch.sigmoid(a_i + w_i * c)
        z_f = a_f + w_f * c
    # f*c through float64: autograd forms d(f*c)/df = dC*c before the sigmoid's derivative scales
    # it down, and in float32 that overflows for a cell state of ~1e38 (inf * 0 = NaN at a
    # saturated f, where the gradient is 0). The kernels take c * f(1-f) first instead.
    fc = (torch.sigmoid(z_f.double()) * c.double()).to(acc)
    c_new = fc + i * torch.tanh(a_g)
    o = torch.sigmoid(a_o if peephole is None else a_o + w_o * c_new)
    h_new = o * torch.tanh(c_new)
    return h_new.to(dt), c_new.to(dt)


def mf_self_similarity(feat: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B,C,H,W) -> (B,N,N), N = H*W: ``A[b,i,j] = x_i.x_j / (max(|x_i|,eps) max(|x_j|,eps))`` with
    x_i = feat[b,:,i]: the self-similarity map A(F_t, F_t) of multi-frame distillation."""
    x = unit_vectors(feat.flatten(2), 1, eps)
    return torch.bmm(x.transpose(1, 2), x)
