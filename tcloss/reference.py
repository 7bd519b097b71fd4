"""Pure-PyTorch reference of every tcloss op: the test oracle, and the ``reference`` backend.

Written from the paper's equations (Liu et al., ECCV 2020) with plain differentiable PyTorch
ops, so autograd supplies the gradients. Shipped code calls this module only as the
``reference`` backend (and as ``algorithm="naive"`` of the pair-wise loss, which is this
module's :func:`pairwise_similarity_loss`): nothing else in tcloss imports it, and it imports
no kernel module (tests/test_environment_report.py::test_import_boundaries).

What the oracle checks, the ops' formulas (softmax, mask weights, reductions, cosine maps, KL,
the cell's gates), is written here and nowhere else. The helpers under them come from
:mod:`tcloss._math`, shared with the shipped PyTorch paths rather than copied: the warp
(``grid_sample``, the unfused baseline the kernels are judged by), the occlusion residual, the
saturating conversion of images and the power-of-two scale of unit rows define how an op reads
its inputs. The native kernels implement every one of them on their own; the Triton launchers
call ``saturate_to`` and ``pow2_scale`` (a clamp and an exact power-of-two scale, each tested on
its own in tests/test_fuzz.py and tests/test_pairwise.py).

Conventions: NCHW; flow in pixels, channel 0 = dx, channel 1 = dy;
``out[b,:,y,x] = bilinear(x[b], y + flow[b,1,y,x], x + flow[b,0,y,x])``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dtypes import acc_dtype
from ._math import flow_warp, occlusion_mask, occlusion_residual, pairwise_normalize, saturate_to


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
    raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got {reduction!r}")


def released_code_temporal_loss(z_t, z_tk, flow, img_t, img_tk):
    """The paper's released temporal loss, transcribed: ``MSE(V*z_t, V*warp(z_tk))`` on logits with
    ``V = exp(-|sum_c (I_t - warp(I_tk))_c|)``, border warping, a mean over B*C*H*W. Only for
    parity tests: equals ``temporal_loss(..., on="logit", mask_power=2) / C``."""
    with torch.no_grad():
        v = occlusion_mask(img_t, img_tk, flow, mode="signed_sum", padding="border")
    return F.mse_loss(v * z_t, v * flow_warp(z_tk, flow, "border"))


# --- pair-wise cosine-similarity distillation (pairwise_similarity_loss) -----------------------

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
    raise ValueError(f"loss must be one of ('mse', 'kl'), got {loss!r}")


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
