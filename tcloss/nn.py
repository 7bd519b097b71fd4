"""nn.Module wrappers of the tcloss losses (options validated in __init__)."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from . import functional as F
from ._backends import pairwise_similarity_loss as _pw
from ._backends import temporal_loss as _tl
from ._checks import (check_backend, check_bool, check_choice, check_kd_options, check_positive_int, check_real,
                      check_tensor)

__all__ = ["TemporalLoss", "PairwiseSimilarityLoss", "PixelwiseKD", "ConvLSTMCell", "ConvLSTM",
           "MultiFrameDistillation"]


class TemporalLoss(nn.Module):
    """Module form of :func:`tcloss.temporal_loss` (eq. 1); same options, checked here.

    ``forward(pred_t, pred_tk, flow, img_t, img_tk)``.
    """

    def __init__(self, *, on: str = "prob", mask_mode: str = "signed_sum", mask_power: float = 1,
                 padding: str = "border", detach_target: bool = False, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        _tl.check_options(on, mask_mode, mask_power, padding, reduction, detach_target, backend)
        self.on, self.mask_mode, self.mask_power = on, mask_mode, mask_power
        self.padding, self.detach_target, self.reduction, self.backend = padding, detach_target, reduction, backend

    def forward(self, pred_t, pred_tk, flow, img_t, img_tk) -> torch.Tensor:
        return F.temporal_loss(pred_t, pred_tk, flow, img_t, img_tk, on=self.on, mask_mode=self.mask_mode,
                               mask_power=self.mask_power, padding=self.padding, detach_target=self.detach_target,
                               reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"on={self.on!r}, mask_mode={self.mask_mode!r}, mask_power={self.mask_power}, "
                f"padding={self.padding!r}, reduction={self.reduction!r}, backend={self.backend!r}")


class PairwiseSimilarityLoss(nn.Module):
    """Module form of :func:`tcloss.pairwise_similarity_loss` (SF pair-wise and PF, eq. 2); same
    options, checked here.

    ``forward(student_a, teacher_a, student_b=None, teacher_b=None)``.
    """

    def __init__(self, *, loss: str = "mse", temperature: float = 1.0, algorithm: str = "auto",
                 detach_norm: bool = False, eps: float = 1e-8, backend: str = "auto", precision: str = "ieee"):
        super().__init__()
        _pw.check_options(loss, temperature, algorithm, detach_norm, eps, backend, precision)
        self.loss, self.temperature, self.algorithm = loss, temperature, algorithm
        self.detach_norm, self.eps, self.backend, self.precision = detach_norm, eps, backend, precision

    def forward(self, student_a, teacher_a, student_b=None, teacher_b=None) -> torch.Tensor:
        return F.pairwise_similarity_loss(student_a, teacher_a, student_b, teacher_b, loss=self.loss,
                                          temperature=self.temperature, algorithm=self.algorithm,
                                          detach_norm=self.detach_norm, eps=self.eps, backend=self.backend,
                                          precision=self.precision)

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, temperature={self.temperature}, algorithm={self.algorithm!r}, "
                f"detach_norm={self.detach_norm}, eps={self.eps}, backend={self.backend!r}, "
                f"precision={self.precision!r}")


class PixelwiseKD(nn.Module):
    """Module form of :func:`tcloss.pixelwise_kd`: ``forward(student_logits, teacher_logits)``."""

    def __init__(self, *, temperature: float = 1.0):
        super().__init__()
        check_kd_options(temperature)
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits) -> torch.Tensor:
        return F.pixelwise_kd(student_logits, teacher_logits, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# --- ConvLSTM and multi-frame distillation --------------------------------------------------------

def _pair(name: str, v, odd: bool = False) -> tuple[int, int]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    out = tuple(check_positive_int(name, x) for x in vals)
    if odd and not all(x % 2 == 1 for x in out):
        raise ValueError(f"{name} must be odd (the state keeps its spatial size: 'same' padding), got {v!r}")
    return out


def _as_frames(name: str, seq) -> list:
    """A sequence of T frames (list/tuple of (B,C,H,W), or a (T,B,C,H,W) tensor) as a list."""
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 5:
            raise ValueError(f"{name} must be a (T,B,C,H,W) tensor or a sequence of (B,C,H,W) tensors, "
                             f"got shape {tuple(seq.shape)}")
        frames = list(seq.unbind(0))
    elif isinstance(seq, (list, tuple)):
        frames = list(seq)
    else:
        raise TypeError(f"{name} must be a (T,B,C,H,W) tensor or a list/tuple of (B,C,H,W) tensors, "
                        f"got {type(seq).__name__}")
    if not frames:
        raise ValueError(f"{name} must hold at least one frame")
    for t, f in enumerate(frames):
        check_tensor(f"{name}[{t}]", f, 4)
        if f.shape != frames[0].shape or f.device != frames[0].device:
            raise ValueError(f"every frame of {name} must have the shape and device of {name}[0] "
                             f"{tuple(frames[0].shape)} on {frames[0].device}; {name}[{t}] is {tuple(f.shape)} "
                             f"on {f.device}")
    return frames


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step (eq. 6 of the supplement; Shi et al. 2015) with the fused pointwise cell.

    ``gates = conv_k(cat(x, h))`` (one cuDNN/ATen convolution, ``4*hidden_channels`` outputs in the
    order i, f, g, o, 'same' padding), then :func:`tcloss.convlstm_cell` computes (h', c').

    Args:
        peephole: peephole weights ``w_i, w_f, w_o`` (initialised to 0). Per channel, (Hd,1,1),
            unless ``spatial_size=(h, w)`` is given: then per position, (Hd,h,w), the Hadamard
            peepholes of Shi et al. (the cell then only accepts inputs of that size).
        bias: bias of the gate convolution.
        backend: kernel of the pointwise cell (``auto``/``reference``/``cpp``/``cuda``/``triton``).

    ``forward(x, state=None) -> (h, c)``; ``x`` (B,in_channels,H,W), ``state`` = (h, c), each
    (B,hidden_channels,H,W); zeros when None.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size=3, peephole: bool = True,
                 bias: bool = True, *, spatial_size=None, backend: str = "auto"):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.hidden_channels = check_positive_int("hidden_channels", hidden_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, odd=True)
        peephole = check_bool("peephole", peephole)
        bias = check_bool("bias", bias)
        if spatial_size is not None and not peephole:
            raise ValueError("spatial_size only sets the shape of per-position peepholes: it needs peephole=True")
        self.spatial_size = None if spatial_size is None else _pair("spatial_size", spatial_size)
        check_backend(backend)
        self.backend = backend
        Hd = self.hidden_channels
        self.conv = nn.Conv2d(self.in_channels + Hd, 4 * Hd, self.kernel_size,
                              padding=(self.kernel_size[0] // 2, self.kernel_size[1] // 2), bias=bias)
        if peephole:
            shape = (Hd, 1, 1) if self.spatial_size is None else (Hd, *self.spatial_size)
            self.w_i = nn.Parameter(torch.zeros(shape))
            self.w_f = nn.Parameter(torch.zeros(shape))
            self.w_o = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("w_i", None)
            self.register_parameter("w_f", None)
            self.register_parameter("w_o", None)

    @property
    def peephole(self):
        return None if self.w_i is None else (self.w_i, self.w_f, self.w_o)

    def forward(self, x: torch.Tensor, state=None):
        check_tensor("x", x, 4)
        B, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"x must have in_channels={self.in_channels} channels, got shape {tuple(x.shape)}")
        if self.spatial_size is not None and (H, W) != self.spatial_size:
            raise ValueError(f"this cell has per-position peepholes for spatial_size={self.spatial_size}, got an "
                             f"input of spatial size {(H, W)}")
        shape = (B, self.hidden_channels, H, W)
        if state is None:
            h = x.new_zeros(shape)
            c = x.new_zeros(shape)
        else:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError("state must be None or a pair (h, c)")
            h, c = state
            for n, t in (("state h", h), ("state c", c)):
                check_tensor(n, t, 4)
                if tuple(t.shape) != shape:
                    raise ValueError(f"{n} must have shape (B,hidden_channels,H,W) = {shape}, got {tuple(t.shape)}")
        gates = self.conv(torch.cat((x, h.to(x.dtype)), 1))
        return F.convlstm_cell(gates, c, peephole=self.peephole, backend=self.backend)

    def extra_repr(self) -> str:
        peep = "none" if self.w_i is None else ("per-channel" if self.spatial_size is None else
                                                f"per-position {self.spatial_size}")
        return (f"in_channels={self.in_channels}, hidden_channels={self.hidden_channels}, "
                f"kernel_size={self.kernel_size}, peephole={peep}, backend={self.backend!r}")


class ConvLSTM(nn.Module):
    """A :class:`ConvLSTMCell` unrolled over a sequence.

    ``forward(seq, state=None) -> (hs, (h, c))``: ``seq`` is a (T,B,C,H,W) tensor or a list/tuple of
    T (B,C,H,W) tensors; ``hs`` (T,B,hidden_channels,H,W) stacks every hidden state; (h, c) is the
    final state. Zero initial state by default. Same arguments as :class:`ConvLSTMCell`.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size=3, peephole: bool = True,
                 bias: bool = True, *, spatial_size=None, backend: str = "auto"):
        super().__init__()
        self.cell = ConvLSTMCell(in_channels, hidden_channels, kernel_size, peephole, bias,
                                 spatial_size=spatial_size, backend=backend)

    def forward(self, seq, state=None):
        frames = _as_frames("seq", seq)
        hs = []
        for x in frames:
            state = self.cell(x, state)
            hs.append(state[0])
        return torch.stack(hs), state


MF_REGULARIZERS = ("std", "released", "none")


class MultiFrameDistillation(nn.Module):
    """Multi-frame (MF) distillation of Liu et al. (ECCV 2020), with the fused ConvLSTM cell.

    For each of the T frames, each feature map F_t (B,C,H,W) is average-pooled to the grid
    ``pool`` (if given), and its cosine self-similarity A(F_t, F_t) (B,N,N), N = h*w,
    ``A_ij = x_i.x_j / (max(|x_i|,eps) max(|x_j|,eps))`` over channels, becomes a one-channel
    N x N image. One ConvLSTM (eq. 6, peepholes per channel, ``hidden_channels`` states),
    shared by teacher and student, runs over the T images of each; E = its final cell state
    (B,hidden_channels,N,N)::

        loss = mean (E^T - E^S)^2            (value)
        d loss = d mean (E^T - E^S)^2 + reg_weight * d R(E^T)   (gradient)

    Teacher and student channel counts may differ (only N must agree after pooling). The teacher
    maps are computed without gradient (nothing reaches the teacher features); E^T still
    depends on the ConvLSTM weights, which this loss trains together with the student.

    Collapse and the regulariser R. Trained on the distillation term alone the ConvLSTM has a
    trivial optimum: ignore its input and output a constant (e.g. E = 0), so E^T = E^S and
    nothing is distilled. The paper "enlarges" E^T against this; its released code adds
    ``mean(1 - E^T)`` (``regularizer="released"``), a constant push that never switches off: it
    drives the gates into saturation (E^T towards its bound), where the ConvLSTM passes less
    gradient to the student, and it rewards only one sign of E. The default ``"std"`` is a hinge
    on the spread of E^T, ``R = mean_k relu(reg_margin - std(E^T[:, k]))`` (std over batch and
    positions, per hidden channel k): it is exactly zero while the states still vary with the
    input (so it never fights the distillation term), and it pushes back only when a channel
    approaches a constant, whatever the constant. ``"none"`` disables R. R depends on E^T
    alone, so it trains only the ConvLSTM. R enters the loss as ``R - R.detach()``: its
    gradient acts, its value does not, so the returned loss is the distillation term itself (0
    exactly when the student's maps equal the teacher's) and comparable across settings; read
    R with :meth:`regularization` ``(E^T)`` of :meth:`states`.

    Weight clipping. ``clip`` (a bound c for [-c, c], a pair (lo, hi), or None) is the range of
    every ConvLSTM parameter (conv weight and bias, peepholes); it keeps the ConvLSTM from
    amplifying differences without limit (the other way to game a learned distance). The
    module clamps them once at construction; call :meth:`clip_` after each optimizer step::

        loss = mf(student_feats, teacher_feats); loss.backward(); opt.step(); mf.clip_()

    Args:
        hidden_channels: Hd of the ConvLSTM.
        kernel_size: its (odd) convolution size.
        pool: output size (int or (h, w)) of ``adaptive_avg_pool2d`` before the similarity, or
            None for full resolution. The N x N image is N^2 pixels per frame and sample: pool
            feature maps larger than ~48 x 48.
        clip: parameter range, see above.
        regularizer, reg_weight, reg_margin: R above.
        eps: the norm clamp of the cosine (1e-8, as everywhere in tcloss).
        backend: kernel of the fused ConvLSTM cell.

    ``forward(student_feats, teacher_feats)``: two sequences of T frames, each a list/tuple of
    (B,C,H,W) tensors or a (T,B,C,H,W) tensor. Returns a scalar in the dtype of the ConvLSTM's
    parameters (float32 unless the module was converted); the maps are computed in float32 at
    least.
    """

    def __init__(self, hidden_channels: int = 4, kernel_size=3, pool=None, clip=0.1, *,
                 regularizer: str = "std", reg_weight: float = 1.0, reg_margin: float = 0.1, eps: float = 1e-8,
                 backend: str = "auto"):
        super().__init__()
        self.pool = None if pool is None else _pair("pool", pool)
        if clip is None:
            self.clip = None
        else:
            lohi = (-clip, clip) if isinstance(clip, numbers.Real) and not isinstance(clip, bool) else clip
            if (not isinstance(lohi, (tuple, list)) or len(lohi) != 2
                    or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in lohi)
                    or not lohi[0] < lohi[1]):
                raise ValueError(f"clip must be None, a positive number c (range [-c, c]) or a pair (lo, hi) with "
                                 f"lo < hi, got {clip!r}")
            self.clip = (float(lohi[0]), float(lohi[1]))
        check_choice("regularizer", regularizer, MF_REGULARIZERS)
        self.regularizer = regularizer
        self.reg_weight = check_real("reg_weight", reg_weight, minimum=0)
        self.reg_margin = check_real("reg_margin", reg_margin, minimum=0)
        self.eps = check_real("eps", eps, minimum=0, strict=True)
        self.convlstm = ConvLSTMCell(1, hidden_channels, kernel_size, peephole=True, bias=True, backend=backend)
        self.clip_()

    @torch.no_grad()
    def clip_(self) -> "MultiFrameDistillation":
        """Clamp every ConvLSTM parameter to ``clip`` in place (call after each optimizer step)."""
        if self.clip is not None:
            for p in self.convlstm.parameters():
                p.clamp_(*self.clip)
        return self

    def similarity_maps(self, feats, name: str = "feats") -> list:
        """Per frame, the (B,1,N,N) cosine self-similarity image of the (pooled) features."""
        frames = _as_frames(name, feats)
        out = []
        for f in frames:
            if f.dtype in (torch.float16, torch.bfloat16):
                f = f.float()
            if self.pool is not None:
                f = torch.nn.functional.adaptive_avg_pool2d(f, self.pool)
            out.append(_pw.mf_self_similarity(f, self.eps).unsqueeze(1))
        return out

    def states(self, student_feats, teacher_feats):
        """(E^S, E^T): the final ConvLSTM cell states (B,hidden_channels,N,N) of both sequences."""
        s_frames = _as_frames("student_feats", student_feats)
        t_frames = _as_frames("teacher_feats", teacher_feats)
        if len(s_frames) != len(t_frames):
            raise ValueError(f"student_feats and teacher_feats must have the same number of frames, got "
                             f"{len(s_frames)} and {len(t_frames)}")
        s0, t0 = s_frames[0], t_frames[0]
        if s0.shape[0] != t0.shape[0]:
            raise ValueError(f"student and teacher batch sizes differ: {s0.shape[0]} and {t0.shape[0]}")
        if s0.device != t0.device:
            raise ValueError(f"teacher_feats must be on {s0.device}, got {t0.device}")
        if self.pool is None and s0.shape[2:] != t0.shape[2:]:
            raise ValueError(f"without pool, student and teacher maps need the same H,W, got {tuple(s0.shape[2:])} "
                             f"and {tuple(t0.shape[2:])}; set pool=(h, w)")
        a_s = self.similarity_maps(s_frames, "student_feats")
        with torch.no_grad():  # the teacher is a constant: no graph, no gradient into its features
            a_t = self.similarity_maps([f.detach() for f in t_frames], "teacher_feats")
        B = s0.shape[0]
        wdt = self.convlstm.conv.weight.dtype
        # One ConvLSTM over the student and teacher maps side by side (2B): one conv per step.
        state = None
        for xs, xt in zip(a_s, a_t):
            state = self.convlstm(torch.cat((xs, xt), 0).to(wdt), state)
        e = state[1]
        return e[:B], e[B:]

    def regularization(self, e_t: torch.Tensor) -> torch.Tensor:
        if self.regularizer == "none":
            return e_t.new_zeros(())
        if self.regularizer == "released":
            return (1 - e_t).mean()
        std = e_t.transpose(0, 1).flatten(1).std(dim=1, correction=0)  # per hidden channel
        return torch.relu(self.reg_margin - std).mean()

    def forward(self, student_feats, teacher_feats) -> torch.Tensor:
        e_s, e_t = self.states(student_feats, teacher_feats)
        loss = (e_t - e_s).pow(2).mean()
        if self.regularizer != "none" and self.reg_weight != 0:
            r = self.regularization(e_t)
            loss = loss + self.reg_weight * (r - r.detach())  # gradient of R, value of the distillation term
        return loss

    def extra_repr(self) -> str:
        return (f"pool={self.pool}, clip={self.clip}, regularizer={self.regularizer!r}, "
                f"reg_weight={self.reg_weight}, reg_margin={self.reg_margin}")
