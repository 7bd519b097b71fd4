"""Segmentation and temporal-consistency metrics (mIoU, pixel accuracy, TC).

Self-contained: imports only ``torch`` and ``numpy`` (no other tcloss module), so it can be
used to score any segmentation model's predictions.

Both accumulators keep a ``(C, C)`` int64 confusion matrix built with ``torch.bincount``;
they are exact over a whole data set (sums of counts, not means of per-image scores),
mergeable (``merge``) and reducible across processes (``all_reduce``).

Temporal consistency (TC), as in Liu et al. (ECCV 2020), sec. 4: the prediction of frame
t+1 is warped back onto frame t with the optical flow t -> t+1, and the mean IoU between
the prediction of frame t and the warped prediction is accumulated over all consecutive
pairs. Differences from the released evaluation script (``tool/eval_tc.py``), so that the
numbers here are *not* directly the paper's:

* class ids are warped with NEAREST sampling (rounded flow, gather). The released script
  warped the id map bilinearly (``Resample2d``) and truncated to uint8, which invents
  classes along boundaries (ids between two neighbours) and lowers TC;
* pixels whose flow leaves the frame are excluded by default (the released script clamped
  them to the border); occluded pixels are excluded when an occlusion mask is given (the
  released script had none);
* the mean is over classes present in the pair statistics (non-empty union); the released
  script averaged over all classes, counting absent ones as 0 (``average="all"`` does that);
* the paper used FlowNet2 flow on Cityscapes snippets; TC depends on the flow used, so only
  compare TC numbers obtained with the same flow estimator.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List

import numpy as np  # noqa: F401  (numpy inputs are accepted via torch.as_tensor)
import torch

__all__ = ["SegmentationMetrics", "TemporalConsistency", "nearest_warp_labels"]


def _as_label_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name} must be a tensor or array of class ids, got {type(x).__name__}") from exc
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {x.dtype}")
    # Compare in int64: in a narrow dtype ignore_index=-1 would wrap (uint8 255 == -1) and a
    # class id of 255 would silently count as ignored.
    return x.to(torch.int64)


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must be a label map of shape (B, H, W) or (H, W), got {tuple(x.shape)}")
    return x


def _check_num_classes(num_classes) -> int:
    """Any integral number (int, numpy integer, ...; not a bool) >= 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be a positive int, got {type(num_classes).__name__} {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _check_bool(name: str, value) -> bool:
    """A real bool (or numpy's): strings such as "false" and numbers are refused."""
    if not (isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


class _ConfusionAccumulator:
    """Shared bookkeeping: a (C, C) int64 confusion matrix (rows: reference, cols: other)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes = _check_num_classes(num_classes)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        ignore_index = int(ignore_index)
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} collides with a class id in [0, {num_classes})")
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def _accumulate(self, ref: torch.Tensor, other: torch.Tensor, valid: torch.Tensor) -> None:
        c = self.num_classes
        ref = ref[valid].to(torch.int64)
        other = other[valid].to(torch.int64)
        counts = torch.bincount(ref * c + other, minlength=c * c).reshape(c, c)
        if self.confusion.device != counts.device:
            self.confusion = self.confusion.to(counts.device)
        self.confusion += counts

    def _check_range(self, x: torch.Tensor, name: str) -> None:
        bad = (x != self.ignore_index) & ((x < 0) | (x >= self.num_classes))
        if bool(bad.any()):
            v = int(x[bad][0])
            raise ValueError(
                f"{name} holds class id {v} outside [0, {self.num_classes}) "
                f"that is not ignore_index={self.ignore_index}")

    def merge(self, other: "_ConfusionAccumulator") -> "_ConfusionAccumulator":
        """Add the counts of another accumulator of the same kind (in place); returns self."""
        if type(other) is not type(self):
            raise TypeError(f"other must be a {type(self).__name__}, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"other has num_classes={other.num_classes}, expected {self.num_classes}")
        self.confusion = self.confusion + other.confusion.to(self.confusion.device)
        return self

    def all_reduce(self, group=None) -> "_ConfusionAccumulator":
        """Sum the counts over all processes when torch.distributed is initialised (no-op otherwise)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            conf = self.confusion
            if dist.get_backend(group) == "nccl" and not conf.is_cuda:
                conf = conf.cuda()
            dist.all_reduce(conf, op=dist.ReduceOp.SUM, group=group)
            self.confusion = conf.to(self.confusion.device)
        return self

    def _iou(self) -> torch.Tensor:
        conf = self.confusion.double().cpu()
        inter = conf.diag()
        union = conf.sum(0) + conf.sum(1) - inter
        iou = inter / union
        iou[union == 0] = float("nan")
        return iou


def _mean_present(iou: torch.Tensor) -> float:
    present = ~torch.isnan(iou)
    if not bool(present.any()):
        return float("nan")
    return float(iou[present].mean()) * 100.0


def _to_list(t: torch.Tensor) -> List[float]:
    return [float(v) * 100.0 if not math.isnan(float(v)) else float("nan") for v in t]


class SegmentationMetrics(_ConfusionAccumulator):
    """mIoU / per-class IoU / pixel accuracy over a data set, in percent.

    ``update(pred, target)`` takes label maps (B, H, W) (or (H, W)) of any integer dtype,
    compared in int64 (so ``ignore_index=-1`` never matches a uint8 255); ``pred`` may also be
    logits (B, C, H, W), reduced by argmax. Pixels where ``target == ignore_index`` are
    skipped. ``compute()`` returns ``miou`` (mean over classes that occur in ``pred`` or
    ``target``; NaN if none), ``iou`` (per-class list, NaN for absent classes),
    ``acc`` (per-class recall), ``macc``, ``pixel_acc``.
    """

    @torch.no_grad()
    def update(self, pred, target) -> None:
        target = _as_batch(_as_label_tensor(target, "target"), "target")
        if isinstance(pred, torch.Tensor) and pred.is_floating_point():
            if pred.dim() == 3:
                pred = pred.unsqueeze(0)
            if pred.dim() != 4 or pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"pred given as logits must have shape (B, {self.num_classes}, H, W), got {tuple(pred.shape)}")
            pred = pred.argmax(1)
        pred = _as_batch(_as_label_tensor(pred, "pred"), "pred")
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        pred = pred.to(target.device)
        self._check_range(target, "target")
        valid = target != self.ignore_index
        # Every valid pixel needs a real class prediction (argmax never yields ignore_index).
        if bool((((pred < 0) | (pred >= self.num_classes)) & valid).any()):
            raise ValueError(f"pred holds class ids outside [0, {self.num_classes}) on labelled pixels")
        self._accumulate(target, pred, valid)

    def compute(self) -> Dict[str, object]:
        conf = self.confusion.double().cpu()
        iou = self._iou()
        total = conf.sum()
        row = conf.sum(1)
        acc = conf.diag() / row
        acc[row == 0] = float("nan")
        return {
            "miou": _mean_present(iou),
            "iou": _to_list(iou),
            "acc": _to_list(acc),
            "macc": _mean_present(acc),
            "pixel_acc": float(conf.diag().sum() / total) * 100.0 if total > 0 else float("nan"),
        }


def nearest_warp_labels(labels: torch.Tensor, flow: torch.Tensor):
    """Warp label maps (B, H, W) with flow (B, 2, H, W) by nearest sampling.

    ``out[b, y, x] = labels[b, round(y + flow[b,1,y,x]), round(x + flow[b,0,y,x])]`` with
    rounding half up. Returns ``(warped, inside)``; ``inside`` (B, H, W) bool is False where
    the rounded position falls outside the frame (those samples are border-clamped).
    """
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must have shape (B, 2, H, W), got {tuple(flow.shape)}")
    b, h, w = labels.shape
    if flow.shape[0] != b or flow.shape[2:] != (h, w):
        raise ValueError(f"flow shape {tuple(flow.shape)} does not match labels shape {tuple(labels.shape)}")
    if not flow.is_floating_point():
        raise TypeError(f"flow must be floating point, got {flow.dtype}")
    flow = flow.to(labels.device, torch.float32)
    ys = torch.arange(h, device=labels.device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=labels.device, dtype=torch.float32).view(1, 1, w)
    # floor(v + 0.5): deterministic half-up rounding (torch.round is half-to-even).
    sx = torch.floor(xs + flow[:, 0] + 0.5)
    sy = torch.floor(ys + flow[:, 1] + 0.5)
    finite = torch.isfinite(sx) & torch.isfinite(sy)
    inside = finite & (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    sx = torch.nan_to_num(sx, nan=0.0).clamp(0, w - 1).long()
    sy = torch.nan_to_num(sy, nan=0.0).clamp(0, h - 1).long()
    idx = (sy * w + sx).reshape(b, h * w)  # explicit sizes: -1 is ambiguous for an empty batch
    warped = labels.reshape(b, h * w).gather(1, idx).view(b, h, w)
    return warped, inside


class TemporalConsistency(_ConfusionAccumulator):
    """Temporal consistency (TC) of per-frame predictions, in percent.

    ``update(pred_t, pred_t1, flow, occlusion=None)``: label maps (B, H, W) of frames t and
    t+1, ``flow`` (B, 2, H, W) in pixels from t to t+1 (channel 0 = dx, 1 = dy; maps pixels
    of t to their position in t+1), optional ``occlusion`` (B, H, W) bool, True = occluded
    (pixel of t not visible in t+1). ``pred_t1`` is warped back onto frame t with nearest
    sampling and per-class intersection / union with ``pred_t`` are accumulated over all
    pairs; ``compute()`` returns ``tc`` = mIoU over classes present (``average="present"``)
    or over all classes with absent ones as 0 (``average="all"``, the released code's way),
    plus ``iou`` per class and ``agreement`` (fraction of compared pixels whose labels
    agree) and ``num_pixels`` compared.

    Options: ``exclude_out_of_frame`` drops pixels whose flow leaves the frame (otherwise
    they are border-clamped); ``exclude_occluded`` drops pixels flagged in ``occlusion`` (both
    ``bool``). Pixels where either label is ``ignore_index`` are skipped. An empty batch adds
    nothing.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, exclude_out_of_frame: bool = True,
                 exclude_occluded: bool = True, average: str = "present"):
        super().__init__(num_classes, ignore_index)
        if not isinstance(average, str):  # the convention of tcloss._checks.check_choice
            raise TypeError(f"average must be 'present' or 'all' (a string), got {type(average).__name__} {average!r}")
        if average not in ("present", "all"):
            raise ValueError(f"average must be 'present' or 'all', got {average!r}")
        self.exclude_out_of_frame = _check_bool("exclude_out_of_frame", exclude_out_of_frame)
        self.exclude_occluded = _check_bool("exclude_occluded", exclude_occluded)
        self.average = average

    @torch.no_grad()
    def update(self, pred_t, pred_t1, flow, occlusion=None) -> None:
        pred_t = _as_batch(_as_label_tensor(pred_t, "pred_t"), "pred_t")
        pred_t1 = _as_batch(_as_label_tensor(pred_t1, "pred_t1"), "pred_t1").to(pred_t.device)
        if pred_t1.shape != pred_t.shape:
            raise ValueError(f"pred_t1 shape {tuple(pred_t1.shape)} does not match pred_t shape {tuple(pred_t.shape)}")
        if not isinstance(flow, torch.Tensor):
            flow = torch.as_tensor(flow)
        if flow.dim() == 3:
            flow = flow.unsqueeze(0)
        b, h, w = pred_t.shape
        if flow.dim() != 4 or flow.shape[0] != b or flow.shape[1] != 2 or flow.shape[2:] != (h, w):
            raise ValueError(f"flow must have shape ({b}, 2, {h}, {w}), got {tuple(flow.shape)}")
        if not flow.is_floating_point():
            raise TypeError(f"flow must be floating point, got {flow.dtype}")
        self._check_range(pred_t, "pred_t")
        self._check_range(pred_t1, "pred_t1")
        warped, inside = nearest_warp_labels(pred_t1, flow.to(pred_t.device))
        valid = (pred_t != self.ignore_index) & (warped != self.ignore_index)
        if self.exclude_out_of_frame:
            valid &= inside
        if occlusion is not None and self.exclude_occluded:
            occ = torch.as_tensor(occlusion, device=pred_t.device)
            if occ.dim() == 2:
                occ = occ.unsqueeze(0)
            if occ.shape != pred_t.shape:
                raise ValueError(f"occlusion must have shape {tuple(pred_t.shape)}, got {tuple(occ.shape)}")
            if occ.dtype != torch.bool:
                raise TypeError(f"occlusion must be a bool mask (True = occluded), got {occ.dtype}")
            valid &= ~occ
        self._accumulate(pred_t, warped, valid)

    def compute(self) -> Dict[str, object]:
        conf = self.confusion.double().cpu()
        iou = self._iou()
        total = conf.sum()
        if self.average == "all":
            tc = float(torch.nan_to_num(iou, nan=0.0).mean()) * 100.0 if total > 0 else float("nan")
        else:
            tc = _mean_present(iou)
        return {
            "tc": tc,
            "iou": _to_list(iou),
            "agreement": float(conf.diag().sum() / total) * 100.0 if total > 0 else float("nan"),
            "num_pixels": int(total),
        }
