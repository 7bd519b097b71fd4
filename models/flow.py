"""Optical-flow estimators behind one interface for the trainer, on top of :mod:`tcloss.flow`.

The flow convention, ``.flo`` I/O (``read_flo`` / ``write_flo``), ``resize_flow`` and the DIS
and RAFT estimators themselves live in :mod:`tcloss.flow` (its module docstring states the
convention: (B, 2, H, W) pixels, channel 0 = dx, from ``img_a`` (frame t) to ``img_b``
(frame t+k), so warping ``img_b`` with it reproduces ``img_a``); ``warp`` is
:func:`tcloss.flow_warp`. This module adds what the training loop needs around them.

Estimators are callables ``est(img_a, img_b, **extra) -> flow`` on (B, 3, H, W) raw RGB
0..255 tensors (not ImageNet-normalised). ``build_flow_estimator(name, **options)``:

* ``dis``        OpenCV DIS (presets ``ultrafast``/``fast``/``medium``), CPU, no weights: the default;
* ``raft_small`` / ``raft_large``  torchvision RAFT with weights from a local file (``weights=path``);
* ``gt``         ground truth passed through: ``est(a, b, gt_flow=flow)`` (synthetic data);
* ``flo``        precomputed ``.flo`` files: ``est(a, b, paths=[...])`` (one per batch item,
  relative to ``root`` if given).

Every estimator accepts ``size=(h, w)`` to estimate at another resolution: frames are
resized, and the flow is resized back with its vectors rescaled by the same factors.
Estimators that do not need ``gt_flow`` / ``paths`` ignore them, so a training loop can
pass them uniformly.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import tcloss
from tcloss import flow as _tflow
from tcloss.flow import FLO_MAGIC, read_flo, resize_flow, write_flo

__all__ = ["FLO_MAGIC", "read_flo", "write_flo", "resize_flow", "warp", "FlowEstimator", "DISFlow", "RAFTFlow",
           "GTFlow", "FloFileFlow", "build_flow_estimator", "FLOW_ESTIMATORS"]


def warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "border", mode: str = "bilinear") -> torch.Tensor:
    """``out[b,:,y,x] = x[b,:, y+flow[b,1,y,x], x+flow[b,0,y,x]]``: :func:`tcloss.flow_warp` (bilinear only)."""
    if mode != "bilinear":
        raise ValueError(f"warp is bilinear (tcloss.flow_warp); got mode={mode!r} "
                         "(label maps: tcloss.metrics.nearest_warp_labels)")
    return tcloss.flow_warp(x, flow, padding=padding_mode)


def _check_pair(img_a, img_b):
    _tflow._check_pair(img_a, img_b, channels=(3,))


def _check_size(size):
    if size is None:
        return None
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"size must be (height, width) with positive entries, got {size!r}")
    return int(size[0]), int(size[1])


class FlowEstimator:
    """Base class: argument checks and optional estimation at another resolution."""

    name = "base"

    def __init__(self, size=None):
        self.size = _check_size(size)

    def __call__(self, img_a: torch.Tensor, img_b: torch.Tensor, **extra) -> torch.Tensor:
        _check_pair(img_a, img_b)
        h, w = img_a.shape[-2:]
        if self.size is not None and self.size != (h, w):
            a = F.interpolate(img_a.float(), size=self.size, mode="bilinear", align_corners=False)
            b = F.interpolate(img_b.float(), size=self.size, mode="bilinear", align_corners=False)
            flow = self._estimate(a, b, **extra)
            flow = resize_flow(flow, (h, w))
        else:
            flow = self._estimate(img_a, img_b, **extra)
        return flow.to(device=img_a.device, dtype=torch.float32)

    def _estimate(self, img_a, img_b, **extra) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size})"


class DISFlow(FlowEstimator):
    """OpenCV Dense Inverse Search flow (Kroeger et al. 2016): :class:`tcloss.flow.DISFlow`."""

    name = "dis"
    PRESETS = _tflow.DIS_PRESETS

    def __init__(self, preset: str = "medium", size=None):
        super().__init__(size)
        self._dis = _tflow.DISFlow(preset)  # checks the preset, imports cv2
        self.preset = preset

    def _estimate(self, img_a, img_b, **extra):
        return self._dis(img_a, img_b)

    def __repr__(self):
        return f"DISFlow(preset={self.preset!r}, size={self.size})"


class RAFTFlow(FlowEstimator):
    """torchvision RAFT (small or large) with weights read from a local file: :class:`tcloss.flow.RAFTFlow`.

    ``weights`` is required here (the trainer never falls back on torchvision's cache).
    Frames are scaled to [-1, 1] and padded as RAFT needs; ``num_flow_updates`` trades
    accuracy for time (12 in torchvision's default).
    """

    def __init__(self, variant: str = "small", weights=None, num_flow_updates: int = 12, device=None, size=None):
        super().__init__(size)
        if variant not in _tflow.RAFT_VARIANTS:
            raise ValueError(f"variant must be 'small' or 'large', got {variant!r}")
        if weights is None:
            raise ValueError(f"raft_{variant} needs weights=<path to a local state dict>; nothing is downloaded")
        self._raft = _tflow.RAFTFlow(variant, weights, num_flow_updates=num_flow_updates, device=device)
        self.name = f"raft_{variant}"
        self.variant = variant
        self.num_flow_updates = num_flow_updates

    @property
    def model(self) -> torch.nn.Module:
        return self._raft.model

    def _estimate(self, img_a, img_b, **extra):
        return self._raft(img_a, img_b)

    def __repr__(self):
        return f"RAFTFlow(variant={self.variant!r}, num_flow_updates={self.num_flow_updates}, size={self.size})"


class GTFlow(FlowEstimator):
    """Ground-truth flow passed through: ``est(a, b, gt_flow=flow)`` (e.g. synthetic data's ``flow``)."""

    name = "gt"

    def __call__(self, img_a, img_b, gt_flow=None, **extra):
        _check_pair(img_a, img_b)
        if gt_flow is None:
            raise ValueError("the 'gt' flow estimator needs gt_flow=(B, 2, H, W) (the data set's ground-truth flow)")
        if not isinstance(gt_flow, torch.Tensor):
            gt_flow = torch.as_tensor(gt_flow)
        b, _, h, w = img_a.shape
        if gt_flow.dim() != 4 or gt_flow.shape[0] != b or gt_flow.shape[1] != 2:
            raise ValueError(f"gt_flow must have shape ({b}, 2, H, W), got {tuple(gt_flow.shape)}")
        return resize_flow(gt_flow.float(), (h, w)).to(img_a.device)


class FloFileFlow(FlowEstimator):
    """Precomputed flow read from ``.flo`` files: ``est(a, b, paths=[p_0, ..., p_{B-1}])``.

    A file of another resolution than the frames is resized with its vectors rescaled.
    """

    name = "flo"

    def __init__(self, root=None):
        super().__init__(None)
        self.root = None if root is None else os.fspath(root)
        if self.root is not None and not os.path.isdir(self.root):
            raise FileNotFoundError(f"flow root directory not found: {self.root}")

    def __call__(self, img_a, img_b, paths: Optional[Sequence] = None, **extra):
        _check_pair(img_a, img_b)
        if paths is None:
            raise ValueError("the 'flo' flow estimator needs paths=[one .flo file per batch item]")
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        b, _, h, w = img_a.shape
        if len(paths) != b:
            raise ValueError(f"paths has {len(paths)} entries for a batch of {b}")
        flows = []
        for p in paths:
            p = os.fspath(p)
            if self.root is not None and not os.path.isabs(p):
                p = os.path.join(self.root, p)
            f = torch.from_numpy(read_flo(p)).permute(2, 0, 1).unsqueeze(0)
            flows.append(resize_flow(f, (h, w))[0])
        return torch.stack(flows).to(img_a.device)


FLOW_ESTIMATORS = {
    "dis": DISFlow,
    "raft_small": lambda **o: RAFTFlow(variant="small", **o),
    "raft_large": lambda **o: RAFTFlow(variant="large", **o),
    "gt": GTFlow,
    "flo": FloFileFlow,
}


def build_flow_estimator(name: str = "dis", **options) -> FlowEstimator:
    """Build a flow estimator: ``dis`` (``preset``, ``size``), ``raft_small`` / ``raft_large``
    (``weights`` path, ``num_flow_updates``, ``device``, ``size``), ``gt``, ``flo`` (``root``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in FLOW_ESTIMATORS:
        raise ValueError(f"unknown flow estimator {name!r}; choose from {sorted(FLOW_ESTIMATORS)}")
    try:
        return FLOW_ESTIMATORS[key](**options)
    except TypeError as exc:
        raise TypeError(f"bad option for flow estimator {key!r}: {exc}") from exc
