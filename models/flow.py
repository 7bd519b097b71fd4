"""Optical-flow estimators behind one interface, plus Middlebury ``.flo`` I/O.

Convention (the project's): ``flow`` is (B, 2, H, W) float32 in pixels, channel 0 = dx,
channel 1 = dy, mapping each pixel of ``img_a`` to its position in ``img_b``, so that
warping ``img_b`` with it reproduces ``img_a``:
``out[b, :, y, x] = bilinear(img_b, y + flow[b,1,y,x], x + flow[b,0,y,x])`` (``warp``).

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

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FLO_MAGIC", "read_flo", "write_flo", "resize_flow", "warp", "FlowEstimator", "DISFlow", "RAFTFlow",
           "GTFlow", "FloFileFlow", "build_flow_estimator", "FLOW_ESTIMATORS"]

FLO_MAGIC = 202021.25


# --------------------------------------------------------------------------- .flo I/O


def read_flo(path) -> np.ndarray:
    """Read a Middlebury ``.flo`` file into an (H, W, 2) float32 array (u, v)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"flow file not found: {path}")
    with open(path, "rb") as f:
        magic = np.fromfile(f, np.float32, count=1)
        if magic.size != 1 or magic[0] != np.float32(FLO_MAGIC):
            raise ValueError(f"{path} is not a .flo file (bad magic number {magic[:1]})")
        dims = np.fromfile(f, np.int32, count=2)
        if dims.size != 2 or dims[0] <= 0 or dims[1] <= 0:
            raise ValueError(f"{path}: invalid .flo header width/height {dims}")
        w, h = int(dims[0]), int(dims[1])
        data = np.fromfile(f, np.float32, count=2 * w * h)
    if data.size != 2 * w * h:
        raise ValueError(f"{path}: truncated .flo file ({data.size} of {2 * w * h} values)")
    return data.reshape(h, w, 2)


def write_flo(path, flow) -> None:
    """Write a flow field, (H, W, 2) array or (2, H, W) tensor, as a Middlebury ``.flo`` file."""
    if isinstance(flow, torch.Tensor):
        flow = flow.detach().cpu()
        if flow.dim() == 4 and flow.shape[0] == 1:
            flow = flow[0]
        if flow.dim() != 3 or flow.shape[0] != 2:
            raise ValueError(f"flow tensor must have shape (2, H, W), got {tuple(flow.shape)}")
        flow = flow.permute(1, 2, 0).numpy()
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow array must have shape (H, W, 2), got {flow.shape}")
    h, w = flow.shape[:2]
    with open(os.fspath(path), "wb") as f:
        np.array([FLO_MAGIC], np.float32).tofile(f)
        np.array([w, h], np.int32).tofile(f)
        np.ascontiguousarray(flow, dtype=np.float32).tofile(f)


# --------------------------------------------------------------------------- helpers


def resize_flow(flow: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Resize a flow field (B, 2, H, W) to ``size`` and rescale its vectors with the frames."""
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must have shape (B, 2, H, W), got {tuple(flow.shape)}")
    h, w = flow.shape[-2:]
    nh, nw = int(size[0]), int(size[1])
    if (nh, nw) == (h, w):
        return flow
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flow, size=(nh, nw), mode=mode, **kw)
    scale = torch.tensor([nw / w, nh / h], dtype=out.dtype, device=out.device).view(1, 2, 1, 1)
    return out * scale


def warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "border", mode: str = "bilinear") -> torch.Tensor:
    """``out[b,:,y,x] = x[b,:, y+flow[b,1,y,x], x+flow[b,0,y,x]]`` (grid_sample, align_corners=True)."""
    if x.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2 or x.shape[0] != flow.shape[0] \
            or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"x (B,C,H,W) and flow (B,2,H,W) must agree, got {tuple(x.shape)} and {tuple(flow.shape)}")
    b, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(x.to(flow.dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def _check_pair(img_a, img_b):
    for name, img in (("img_a", img_a), ("img_b", img_b)):
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(img).__name__}")
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3, H, W) (RGB, 0..255), got {tuple(img.shape)}")
    if img_a.shape != img_b.shape:
        raise ValueError(f"img_a {tuple(img_a.shape)} and img_b {tuple(img_b.shape)} must have the same shape")


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


def _to_gray_u8(img: torch.Tensor) -> np.ndarray:
    # ITU-R BT.601 luma, as cv2.COLOR_RGB2GRAY.
    rgb = img.detach().float().cpu().clamp(0, 255)
    gray = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.ascontiguousarray(gray.round().to(torch.uint8).numpy())


class DISFlow(FlowEstimator):
    """OpenCV Dense Inverse Search flow (Kroeger et al. 2016) on grey images; CPU, no weights."""

    name = "dis"
    PRESETS = ("ultrafast", "fast", "medium")

    def __init__(self, preset: str = "medium", size=None):
        super().__init__(size)
        if preset not in self.PRESETS:
            raise ValueError(f"preset must be one of {self.PRESETS}, got {preset!r}")
        import cv2  # local import: opencv is only needed for this backend

        self._cv2 = cv2
        self.preset = preset
        self._preset_id = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                           "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                           "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[preset]
        self._dis = None

    def __getstate__(self):  # the cv2 object does not pickle (DataLoader workers)
        state = dict(self.__dict__)
        state["_dis"] = None
        state["_cv2"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        import cv2

        self._cv2 = cv2

    def _estimate(self, img_a, img_b, **extra):
        if self._dis is None:
            self._dis = self._cv2.DISOpticalFlow_create(self._preset_id)
        flows = []
        for a, b in zip(img_a, img_b):
            # calc(prev, next) returns flow with prev(y, x) ~ next(y + v, x + u): our convention.
            f = self._dis.calc(_to_gray_u8(a), _to_gray_u8(b), None)
            flows.append(torch.from_numpy(f).permute(2, 0, 1))
        return torch.stack(flows)

    def __repr__(self):
        return f"DISFlow(preset={self.preset!r}, size={self.size})"


class RAFTFlow(FlowEstimator):
    """torchvision RAFT (small or large) with weights read from a local file.

    Frames are scaled to [-1, 1] as RAFT expects and replicate-padded to a multiple of 8
    and at least 128 x 128 (RAFT's correlation pyramid needs it);
    ``num_flow_updates`` trades accuracy for time (12 in torchvision's default).
    """

    def __init__(self, variant: str = "small", weights=None, num_flow_updates: int = 12, device=None, size=None):
        super().__init__(size)
        if variant not in ("small", "large"):
            raise ValueError(f"variant must be 'small' or 'large', got {variant!r}")
        if weights is None:
            raise ValueError(f"raft_{variant} needs weights=<path to a local state dict>; nothing is downloaded")
        if not isinstance(num_flow_updates, int) or num_flow_updates < 1:
            raise ValueError(f"num_flow_updates must be a positive int, got {num_flow_updates!r}")
        from torchvision.models import optical_flow as tvof

        from .segmentation import load_weights

        self.name = f"raft_{variant}"
        self.variant = variant
        self.num_flow_updates = num_flow_updates
        model = tvof.raft_small(weights=None) if variant == "small" else tvof.raft_large(weights=None)
        load_weights(model, weights)
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)

    @torch.no_grad()
    def _estimate(self, img_a, img_b, **extra):
        dev = next(self.model.parameters()).device
        h, w = img_a.shape[-2:]
        # RAFT needs sizes divisible by 8 and >= 128 (its 4-level correlation pyramid at 1/8)
        ph, pw = max((-h) % 8, 128 - h), max((-w) % 8, 128 - w)
        a = img_a.to(dev, torch.float32) / 127.5 - 1.0
        b = img_b.to(dev, torch.float32) / 127.5 - 1.0
        if ph or pw:
            a = F.pad(a, (0, pw, 0, ph), mode="replicate")
            b = F.pad(b, (0, pw, 0, ph), mode="replicate")
        flow = self.model(a, b, num_flow_updates=self.num_flow_updates)[-1]
        return flow[..., :h, :w]

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
            f = torch.from_numpy(read_flo(p).copy()).permute(2, 0, 1).unsqueeze(0)
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
