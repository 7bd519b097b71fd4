"""User-facing functions: argument checks, then dispatch to a backend (see tcloss._backends).

Each op's options, their checks and its PyTorch paths live in its module ``tcloss/_backends/<op>.py``;
this module imports :mod:`tcloss.reference` for the ``reference`` backend (and the pair-wise
loss's ``naive`` algorithm, which is the reference) only.
"""
from __future__ import annotations

import torch

from . import _math
from . import reference
from ._dtypes import acc_dtype
from ._backends import resolve
from ._checks import check_choice, check_kd_options, check_tensor
from ._backends import temporal_loss as _tl
from ._backends import pairwise_similarity_loss as _pw
from ._backends import convlstm_cell as _cl

__all__ = ["flow_warp", "occlusion_mask", "temporal_loss", "pairwise_similarity_loss", "pixelwise_kd",
           "convlstm_cell"]


_check_tensor = check_tensor  # short local names of the shared checks (tcloss._checks)
_check_choice = check_choice


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
    _check_choice("padding", padding, _tl.PADDINGS)
    return _math.flow_warp(x, flow, padding)


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
    _check_choice("mode", mode, _tl.MASK_MODES)
    _check_choice("padding", padding, _tl.PADDINGS)
    return _math.occlusion_mask(img_t, img_tk, flow, mode=mode, padding=padding)


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
        mask_power: a finite number >= 0 (``V^0 = 1`` everywhere, even where a residual is
            infinite).
        reduction: ``"mean"`` (sum / (B*H*W); NaN for B = 0, as ``torch.mean`` of nothing),
            ``"sum"`` or ``"none"`` ((B,H,W) map).
        detach_target: no gradient into ``pred_tk`` (a ``bool``).
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns float32 (float64 for float64 inputs); accumulation is in float32 at least.
    Gradients flow into ``pred_t``, ``pred_tk`` (unless ``detach_target``) and ``flow``; double
    backward is a RuntimeError on the kernel backends (the reference supports it).

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
    _tl.check_options(on, mask_mode, mask_power, padding, reduction, detach_target, backend)
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
    # forward: the loss only (gradients come from one recomputing pass in backward)
    return _tl.fwd_op(name)(pred_t, pred_tk, flow, img_t.detach(), img_tk.detach(),
                            *_tl.kernel_options(on, mask_mode, mask_power, padding, reduction))


def _check_pairwise_input(name: str, t, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (3, 4):
        raise ValueError(f"{name} must be (B,C,H,W) or (B,C,N), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.shape[1] < 1 or t.numel() == 0:
        raise ValueError(f"{name} must have at least one channel and one pixel, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def pairwise_similarity_loss(student_a: torch.Tensor, teacher_a: torch.Tensor, student_b: torch.Tensor | None = None,
                             teacher_b: torch.Tensor | None = None, *, loss: str = "mse", temperature: float = 1.0,
                             algorithm: str = "auto", detach_norm: bool = False, eps: float = 1e-8,
                             backend: str = "auto", precision: str = "ieee") -> torch.Tensor:
    """Pair-wise cosine-similarity distillation: SF "pa" loss and the PF loss (eq. 2) of Liu et al.

    ``S[b,i,j] = cos(student_a[b,:,i], student_b[b,:,j])``, ``T`` likewise from the teachers, with
    ``cos(x,y) = x.y / (max(|x|,eps) max(|y|,eps))`` over channels; pixels i of ``*_a`` index rows,
    pixels j of ``*_b`` columns (``*_b`` default to ``*_a``: self-similarity).

    * ``loss="mse"``: ``mean_{b,i,j} (S - T)^2`` (eq. 2 / eq. 5).
    * ``loss="kl"``: ``mean_{b,i} KL(softmax_j(T_i/temperature) || softmax_j(S_i/temperature))``.

    Args:
        student_a, teacher_a: (B,C_s,H,W) / (B,C_t,H,W) or (B,C,N); channel counts may differ.
        student_b, teacher_b: the column side (frame t+k for PF); N_b may differ from N_a.
        algorithm: ``"blocked"`` (tiles of S and T computed on the fly and discarded, O(N C)
            memory, both losses), ``"gram"`` (mse only: C x C Gram identity in float64,
            O(N C^2)), ``"naive"`` (materialises S and T in PyTorch), ``"auto"`` (the fastest
            as measured per device, except that on a GPU naive's maps are kept under ~7 GiB
            (B N_a N_b <= 2^28): naive where the maps are small (CPU: N_a N_b <= 4096 (C_s +
            C_t); GPU: N_a N_b <= 4096^2); else gram for mse when C_s + C_t <= r min(N_a, N_b),
            r = 1 on the CPU and 2 on a GPU; else, on a GPU, naive where the channels are many
            for the precision (C_s + C_t > 192 at ieee, 448 at tf32, 1024 at bf16); else blocked
            (the rule and its measurements: tcloss._backends.pairwise_similarity_loss.choose_algorithm).
        detach_norm: the norms are constants in backward (structured-distillation convention);
            otherwise the gradient through the normalisation is exact.
        backend: kernel of the blocked algorithm (``auto``/``cpp``/``cuda``/``triton``;
            ``reference`` runs naive/gram only). gram and naive are PyTorch on every device.
            ``auto`` on a CUDA device prefers triton (faster on an H200, and the only
            tensor-core tiles).
        precision: the least accuracy of the blocked tiles the caller accepts (an exact result
            is always allowed). Relative to float64 (loss; gradients as a fraction of their
            largest entry), as tested: ``"ieee"`` (default: float32 accuracy; Triton computes
            each tile product as the 3xTF32 split on tensor cores) within 1e-5 (loss) and 1e-4
            (gradients); ``"tf32"`` (operands with 10 mantissa bits) within 1e-2; ``"bf16"``
            (bfloat16 operands, 7 bits) within 1e-1; all accumulate in float32. Only the Triton
            kernels have tensor-core tiles: cpp, cuda, naive and gram compute float32 exactly at
            every precision, and float64 inputs are exact everywhere.

    Gradients flow into the students only; teachers that require grad are an error (detach them).
    Returns float32 (float64 for float64 inputs). Norms are taken of rows scaled by a power of two
    (:func:`tcloss._math.unit_vectors`), so large finite features keep exact cosines. The
    blocked kernels refuse double backward (a RuntimeError); naive and gram are plain autograd.
    """
    _check_pairwise_input("student_a", student_a)
    dev = student_a.device
    _check_pairwise_input("teacher_a", teacher_a, dev)
    if student_b is not None:
        _check_pairwise_input("student_b", student_b, dev)
    if teacher_b is not None:
        _check_pairwise_input("teacher_b", teacher_b, dev)
    sb_in = student_a if student_b is None else student_b
    tb_in = teacher_a if teacher_b is None else teacher_b
    B = student_a.shape[0]
    flat = {}
    for name, t in (("student_a", student_a), ("teacher_a", teacher_a), ("student_b", sb_in), ("teacher_b", tb_in)):
        if t.shape[0] != B:
            raise ValueError(f"{name} must have batch size {B} (that of student_a), got shape {tuple(t.shape)}")
        flat[name] = t.reshape(t.shape[0], t.shape[1], -1)
    Na, Nb = flat["student_a"].shape[2], flat["student_b"].shape[2]
    if flat["teacher_a"].shape[2] != Na:
        raise ValueError(f"teacher_a must have the pixels of student_a (N_a = {Na}), got shape {tuple(teacher_a.shape)}")
    if flat["teacher_b"].shape[2] != Nb:
        raise ValueError(f"teacher_b must have the pixels of student_b (N_b = {Nb}), got shape {tuple(tb_in.shape)}")
    Cs, Ct = student_a.shape[1], teacher_a.shape[1]
    if sb_in.shape[1] != Cs:
        raise ValueError(f"student_b must have the channels of student_a (C_s = {Cs}), got shape {tuple(sb_in.shape)}")
    if tb_in.shape[1] != Ct:
        raise ValueError(f"teacher_b must have the channels of teacher_a (C_t = {Ct}), got shape {tuple(tb_in.shape)}")
    if torch.is_grad_enabled():
        for name, t in (("teacher_a", teacher_a), ("teacher_b", teacher_b)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but the teacher is a constant of the distillation loss: "
                                 f"pass {name}.detach()")
    _pw.check_options(loss, temperature, algorithm, detach_norm, eps, backend, precision)

    # Mixed dtypes (e.g. an fp16 teacher): compute in the widest.
    dt = student_a.dtype
    for t in flat.values():
        dt = torch.promote_types(dt, t.dtype)
    sa, ta, sb, tb = (flat[k].to(dt) for k in ("student_a", "teacher_a", "student_b", "teacher_b"))
    if student_b is None:  # one tensor for both sides: autograd sums their gradients before any conversion
        sb = sa
    name = resolve("pairwise_similarity_loss", dev, backend)
    alg = _pw.choose_algorithm(algorithm, loss, name, dev.type, Na, Nb, Cs, Ct, B, precision)
    kw = dict(detach_norm=detach_norm, eps=float(eps))
    sb_opt = None if student_b is None else sb
    tb_opt = None if teacher_b is None else tb
    if alg == "naive":  # the naive algorithm is the reference implementation itself
        return reference.pairwise_similarity_loss(sa, ta, sb_opt, tb_opt, loss=loss, temperature=float(temperature), **kw)
    if alg == "gram":
        return _pw.gram_loss(sa, ta, sb_opt, tb_opt, **kw)
    if name == "reference":
        raise ValueError("algorithm='blocked' needs a kernel backend (cpp, cuda or triton); the reference backend "
                         "implements 'naive' and 'gram'")
    args = _pw.kernel_options(loss, temperature, eps, detach_norm)
    if name == "triton":  # self-similarity: one set of inputs (None, None), and the precision
        self_sim = student_b is None and teacher_b is None
        return _pw.fwd_op(name)(sa, ta.detach(), None if self_sim else sb, None if self_sim else tb.detach(), *args,
                                precision)[0]
    if student_b is None and sa.dtype not in (torch.float32, torch.float64):
        # self-similarity: autograd adds the op's d student_a and d student_b; in float16 each
        # may round to an inf of its own sign (inf - inf = NaN) where their sum does not: pass
        # float32, so that the sum is rounded to the input dtype once
        sa, ta = sa.float(), ta.float()
        sb, tb = sa, (ta if teacher_b is None else tb.float())
    return _pw.fwd_op(name)(sa, ta.detach(), sb, tb.detach(), *args)[0]


def pixelwise_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Pixel-wise distillation (the SF "pi" term): ``tau^2 * mean_pixels KL(softmax_C(T/tau) || softmax_C(S/tau))``.

    Logits (B,C,H,W) or (B,C,N), classes on dim 1; the mean is over the B*H*W pixels. Computed
    in float32 (float64 for float64 inputs); the teacher is a constant (must not require grad).
    ``KL = sum_c p_c (log p_c - log q_c)`` with ``0 log 0 = 0``: a class the teacher masks with
    ``-inf`` (or whose probability underflows to 0, e.g. logits of +-3e38) contributes nothing,
    and the result stays finite. Large finite logits stay finite too: the log-probabilities are
    formed times tau from logits centred on their maximum (``z / tau`` never overflows where the
    result does not; taken at half scale, so a logit gap of 3e38 - (-3e38) does not either), and
    the mean over pixels is taken in float64. A per-pixel ``tau^2 KL`` beyond the float32 range
    is inf. A batch of no pixels gives NaN (the mean of nothing, as ``torch.mean``).
    """
    _check_tensor("student_logits", student_logits)
    _check_tensor("teacher_logits", teacher_logits)
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must be (B,C,H,W) or (B,C,N), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on {student_logits.device}, got {teacher_logits.device}")
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher_logits requires grad, but the teacher is a constant of the distillation loss: "
                         "pass teacher_logits.detach()")
    check_kd_options(temperature)
    tau = float(temperature)
    acc = acc_dtype(student_logits.dtype, teacher_logits.dtype)

    def half_scaled_log_probs(z):
        # u / 2 with u = tau * log_softmax(z / tau), formed as h - (tau / 2) lse(h / (tau / 2)),
        # h = z / 2 - max / 2 = (z - max) / 2: every term is bounded by half the logit gap (lse is
        # in [0, log C]), so nothing overflows where tau^2 KL itself is finite, not even z - max
        # (a gap of 3e38 - (-3e38)) or u_t - u_s; halving is exact, so ordinary logits give the
        # bits of the unhalved formula
        z = z.to(acc) / 2
        h = z - z.detach().amax(1, keepdim=True)  # softmax is shift-invariant: a constant
        return h - (tau / 2) * torch.logsumexp(h / (tau / 2), dim=1, keepdim=True)

    u_s = half_scaled_log_probs(student_logits)
    u_t = half_scaled_log_probs(teacher_logits)
    p = torch.exp(u_t / (tau / 2))
    # tau^2 KL = 2 tau sum_c p_c (u_t - u_s) (halves); 0 log 0 = 0: where p = 0 the term is 0
    # (not 0 * (-inf) = NaN), and so is its gradient
    kl = torch.where(p > 0, p * (u_t - u_s), torch.zeros((), dtype=acc, device=p.device)).sum(1)
    # the mean over pixels in float64: a sum of large per-pixel KLs cannot overflow
    return (kl.to(torch.float64).mean() * (2 * tau)).to(acc)


def _check_peephole(peephole, Hd: int, H: int, W: int, device: torch.device) -> tuple:
    if not isinstance(peephole, (tuple, list)) or len(peephole) != 3:
        raise TypeError("peephole must be None or a tuple (w_i, w_f, w_o) of three tensors, got "
                        f"{type(peephole).__name__}" + (f" of length {len(peephole)}" if isinstance(peephole, (tuple, list)) else ""))
    for name, w in zip(("w_i", "w_f", "w_o"), peephole):
        _check_tensor(f"peephole {name}", w)
        ok = w.dim() <= 3
        if ok:
            try:
                ok = torch.broadcast_shapes(tuple(w.shape), (Hd, H, W)) == (Hd, H, W)
            except RuntimeError:
                ok = False
        if not ok:
            raise ValueError(f"peephole {name} must be broadcastable to (Hd,h,w) = {(Hd, H, W)} (e.g. (Hd,h,w) or "
                             f"(Hd,1,1)), got shape {tuple(w.shape)}")
        if w.device != device:
            raise ValueError(f"peephole {name} must be on {device}, got {w.device}")
    return tuple(peephole)


def convlstm_cell(gates: torch.Tensor, c: torch.Tensor, *, peephole=None, backend: str = "auto"):
    """Fused pointwise part of one ConvLSTM step (eq. 6 of the supplement; Shi et al. 2015).

    ``gates`` (B,4*Hd,h,w) are the pre-activations of one convolution over ``cat(x_t, h_{t-1})``
    (computed by cuDNN/ATen, not here), in PyTorch's gate order i, f, g, o; ``c`` (B,Hd,h,w) is
    the previous cell state. With ``peephole = (w_i, w_f, w_o)``, each broadcastable to (Hd,h,w)
    (Hadamard peepholes (Hd,h,w), per-channel (Hd,1,1), ...)::

        i = sigmoid(a_i + w_i*c)   f = sigmoid(a_f + w_f*c)   g = tanh(a_g)
        c' = f*c + i*g             o = sigmoid(a_o + w_o*c')  h' = o*tanh(c')

    Without peepholes the w terms vanish. Returns ``(h', c')`` in the promoted dtype of ``gates``
    and ``c``; the math runs in float32 (float64 for float64). Differentiable w.r.t. ``gates``,
    ``c`` and the peephole weights (their gradient is summed over the batch, and over the
    broadcast dimensions, e.g. space for per-channel weights). The kernels save only their
    inputs for backward and recompute the gates there; double backward through them is a
    RuntimeError (the reference backend supports it).

    backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.
    """
    _check_tensor("gates", gates, 4)
    B, C4, H, W = gates.shape
    if C4 == 0 or C4 % 4 != 0:
        raise ValueError(f"gates must be (B,4*Hd,h,w) with gates i, f, g, o stacked on dim 1: the channel count "
                         f"must be a positive multiple of 4, got shape {tuple(gates.shape)}")
    Hd = C4 // 4
    _check_tensor("c", c, 4)
    if tuple(c.shape) != (B, Hd, H, W):
        raise ValueError(f"c must have shape (B,Hd,h,w) = {(B, Hd, H, W)} to match gates {tuple(gates.shape)}, "
                         f"got {tuple(c.shape)}")
    if c.device != gates.device:
        raise ValueError(f"c must be on {gates.device}, got {c.device}")
    if peephole is not None:
        peephole = _check_peephole(peephole, Hd, H, W, gates.device)
    dt = torch.promote_types(gates.dtype, c.dtype)  # e.g. fp16 autocast gates with a float32 state
    gates, c = gates.to(dt), c.to(dt)

    name = resolve("convlstm_cell", gates.device, backend)
    if name == "reference":
        return reference.convlstm_cell(gates, c, peephole)
    p = None
    if peephole is not None:
        # The kernels take one (3,Hd,h,w) tensor in the accumulation dtype (small next to the
        # gates); expand's backward sums its gradient back to each weight's own shape.
        acc = acc_dtype(dt)
        p = torch.stack([w.to(acc).expand(Hd, H, W) for w in peephole])
    h_new, c_new = _cl.fwd_op(name)(gates, c, p)
    return h_new, c_new
