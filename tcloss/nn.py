"""nn.Module wrappers of the tcloss losses (options validated in __init__)."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from . import functional as F
from . import reference

__all__ = ["TemporalLoss"]


class TemporalLoss(nn.Module):
    """Module form of :func:`tcloss.temporal_loss` (eq. 1); same options, checked here.

    ``forward(pred_t, pred_tk, flow, img_t, img_tk)``.
    """

    def __init__(self, *, on: str = "prob", mask_mode: str = "signed_sum", mask_power: float = 1,
                 padding: str = "border", detach_target: bool = False, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        F._check_choice("on", on, ("prob", "logit"))
        F._check_choice("mask_mode", mask_mode, reference.MASK_MODES)
        F._check_choice("padding", padding, reference.PADDINGS)
        F._check_choice("reduction", reduction, reference.REDUCTIONS)
        if isinstance(mask_power, bool) or not isinstance(mask_power, numbers.Real) or not mask_power >= 0:
            raise ValueError(f"mask_power must be a non-negative number, got {mask_power!r}")
        self.on, self.mask_mode, self.mask_power = on, mask_mode, mask_power
        self.padding, self.detach_target, self.reduction, self.backend = padding, detach_target, reduction, backend

    def forward(self, pred_t, pred_tk, flow, img_t, img_tk) -> torch.Tensor:
        return F.temporal_loss(pred_t, pred_tk, flow, img_t, img_tk, on=self.on, mask_mode=self.mask_mode,
                               mask_power=self.mask_power, padding=self.padding, detach_target=self.detach_target,
                               reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"on={self.on!r}, mask_mode={self.mask_mode!r}, mask_power={self.mask_power}, "
                f"padding={self.padding!r}, reduction={self.reduction!r}, backend={self.backend!r}")
