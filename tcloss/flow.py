"""Optical flow for tcloss: estimators (OpenCV DIS, torchvision RAFT), Middlebury ``.flo`` I/O
and flow resizing. An optional part of the library: ``pip install tcloss[flow]`` (OpenCV and
torchvision are imported inside the functions that need them, never at import).

Convention (the one :func:`tcloss.temporal_loss`, :func:`tcloss.flow_warp` and
:func:`tcloss.occlusion_mask` expect, and the one every function here reads and returns):
``flow`` is the optical flow from frame t (``img_a``) to frame t+k (``img_b``), in pixels,
float32; as a tensor (B, 2, H, W) with channel 0 = dx (u, along the width) and channel 1 = dy
(v, along the height); as a numpy array (H, W, 2), the layout of OpenCV and ``.flo`` files.
``flow[:, y, x]`` is the displacement of pixel (x, y) of frame t to its position in frame t+k,
so warping frame t+k with it reproduces frame t::

    tcloss.flow_warp(img_b, flow)[b, :, y, x] = bilinear(img_b[b], y + flow[b, 1, y, x], x + flow[b, 0, y, x])
                                             ~= img_a[b, :, y, x]   (where the pixel is visible in both)

Pixel (x, y) is the centre of column x and row y (integer coordinates, as in ``flow_warp``).
This is also the convention of FlyingChairs / Sintel / Middlebury ground truth and of
``cv2.DISOpticalFlow.calc(prev, next)``, so those pass through unchanged.

Images given to the estimators are RGB in 0..255 (uint8 or float, not normalised).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FLO_MAGIC", "read_flo", "write_flo", "resize_flow", "DIS_PRESETS", "DISFlow", "dis_flow",
           "RAFT_VARIANTS", "RAFTFlow", "raft_cache_path"]

FLO_MAGIC = 202021.25  # the float32 tag of a Middlebury .flo file ("PIEH" in ASCII, little-endian)
DIS_PRESETS = ("ultrafast", "fast", "medium")
RAFT_VARIANTS = ("small", "large")
_FLO_MAX_SIDE = 1 << 16  # sanity bound on a .flo header's width / height

_INSTALL_HINT = "pip install tcloss[flow]"


def _import_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(f"tcloss.flow's DIS estimator needs OpenCV, which is not installed: {_INSTALL_HINT} "
                          f"(or pip install opencv-python-headless)") from exc
    return cv2


def _import_tv_optical_flow():
    try:
        from torchvision.models import optical_flow
    except ImportError as exc:
        raise ImportError(f"tcloss.flow's RAFT estimator needs torchvision, which is not installed: {_INSTALL_HINT} "
                          f"(or pip install torchvision matching your torch)") from exc
    return optical_flow


# --------------------------------------------------------------------------- .flo I/O


def read_flo(path) -> np.ndarray:
    """Read a Middlebury ``.flo`` file into an (H, W, 2) float32 array (u, v).

    Raises FileNotFoundError for a missing file and ValueError for anything that is not a
    well-formed ``.flo`` file (bad magic number, e.g. a big-endian file; non-positive or
    implausible width/height; truncated data or trailing bytes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"flow file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = np.fromfile(f, "<f4", count=1)
        if magic.size != 1 or magic[0] != np.float32(FLO_MAGIC):
            got = f"{magic[0]!r}" if magic.size else "end of file"
            raise ValueError(f"{path} is not a .flo file: bad magic number ({got}, expected {FLO_MAGIC})")
        dims = np.fromfile(f, "<i4", count=2)
        if dims.size != 2:
            raise ValueError(f"{path}: truncated .flo header (no width/height)")
        w, h = int(dims[0]), int(dims[1])
        if not (0 < w <= _FLO_MAX_SIDE and 0 < h <= _FLO_MAX_SIDE):
            raise ValueError(f"{path}: invalid .flo header width/height ({w}, {h})")
        expected = 12 + 8 * w * h
        if size < expected:
            raise ValueError(f"{path}: truncated .flo file ({(size - 12) // 4} of {2 * w * h} values "
                             f"for {w} x {h})")
        if size > expected:
            raise ValueError(f"{path}: {size - expected} trailing bytes after the {w} x {h} flow of a .flo file")
        data = np.fromfile(f, "<f4", count=2 * w * h)
    return data.astype(np.float32, copy=False).reshape(h, w, 2)


def write_flo(path, flow) -> None:
    """Write one flow field as a Middlebury ``.flo`` file (little-endian float32).

    ``flow``: an (H, W, 2) array, or a (2, H, W) / (1, 2, H, W) tensor (channel 0 = u).
    """
    if isinstance(flow, torch.Tensor):
        flow = flow.detach().cpu()
        if flow.dim() == 4 and flow.shape[0] == 1:
            flow = flow[0]
        if flow.dim() != 3 or flow.shape[0] != 2:
            raise ValueError(f"flow tensor must have shape (2, H, W) or (1, 2, H, W), got {tuple(flow.shape)}")
        flow = flow.permute(1, 2, 0).float().numpy()
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow array must have shape (H, W, 2), got {flow.shape}")
    h, w = flow.shape[:2]
    if not (0 < w <= _FLO_MAX_SIDE and 0 < h <= _FLO_MAX_SIDE):
        raise ValueError(f"flow must have 1..{_FLO_MAX_SIDE} rows and columns, got {h} x {w}")
    with open(os.fspath(path), "wb") as f:
        np.array([FLO_MAGIC], "<f4").tofile(f)
        np.array([w, h], "<i4").tofile(f)
        np.ascontiguousarray(flow, dtype="<f4").tofile(f)


# --------------------------------------------------------------------------- resizing


def resize_flow(flow: torch.Tensor, size: Sequence[int], mode: str = "bilinear", *,
                align_corners: bool = False) -> torch.Tensor:
    """Resample a flow field (..., 2, H, W) to ``size = (H', W')`` and rescale its vectors.

    ``align_corners`` says how the frames were (or will be) resized, with the meaning of
    ``F.interpolate``: ``False`` (the default, and what ``F.interpolate`` / ``cv2.resize`` do
    by default) maps pixel-centre coordinates as ``x' = (x + 0.5) * W'/W - 0.5``, so u is
    multiplied by W'/W and v by H'/H; ``True`` maps the corner pixel centres onto each other,
    ``x' = x * (W'-1)/(W-1)``, so u is multiplied by (W'-1)/(W-1) and v by (H'-1)/(H-1). The
    field itself is resampled with the same ``align_corners`` (``mode`` "bilinear", "bicubic",
    "nearest" or "nearest-exact"; the nearest modes have no ``align_corners`` and always use the
    first mapping). A constant field stays constant, scaled. Returns ``flow`` itself if the
    size is unchanged.
    """
    if not isinstance(flow, torch.Tensor):
        raise TypeError(f"flow must be a tensor, got {type(flow).__name__}")
    if flow.dim() < 3 or flow.shape[-3] != 2:
        raise ValueError(f"flow must have shape (..., 2, H, W), got {tuple(flow.shape)}")
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"size must be (height, width) with positive entries, got {size!r}")
    if mode not in ("bilinear", "bicubic", "nearest", "nearest-exact"):
        raise ValueError(f"mode must be 'bilinear', 'bicubic', 'nearest' or 'nearest-exact', got {mode!r}")
    h, w = flow.shape[-2:]
    nh, nw = int(size[0]), int(size[1])
    if (nh, nw) == (h, w):
        return flow
    lead = flow.shape[:-3]
    f = flow.reshape(-1, 2, h, w)
    if not f.is_floating_point():
        f = f.float()
    if mode in ("bilinear", "bicubic"):
        f = F.interpolate(f, size=(nh, nw), mode=mode, align_corners=align_corners)
    else:
        f = F.interpolate(f, size=(nh, nw), mode=mode)
        align_corners = False
    if align_corners:
        sx = (nw - 1) / (w - 1) if w > 1 else float(nw)
        sy = (nh - 1) / (h - 1) if h > 1 else float(nh)
    else:
        sx, sy = nw / w, nh / h
    f = f * torch.tensor([sx, sy], dtype=f.dtype, device=f.device).view(1, 2, 1, 1)
    return f.reshape(*lead, 2, nh, nw)


# --------------------------------------------------------------------------- image checks


def _check_pair(img_a, img_b, channels=(1, 3)) -> None:
    """Both (B, C, H, W) tensors of one shape, C in ``channels`` (3 = RGB 0..255, 1 = grey)."""
    want = " or ".join(f"(B, {c}, H, W)" + (" (RGB, 0..255)" if c == 3 else " (grey)") for c in channels)
    for name, img in (("img_a", img_a), ("img_b", img_b)):
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(img).__name__}")
        if img.dim() != 4 or img.shape[1] not in channels:
            raise ValueError(f"{name} must have shape {want}, got {tuple(img.shape)}")
    if img_a.shape != img_b.shape:
        raise ValueError(f"img_a {tuple(img_a.shape)} and img_b {tuple(img_b.shape)} must have the same shape")


def _gray_u8_tensor(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) RGB / grey 0..255 -> (H, W) uint8; ITU-R BT.601 luma, as cv2.COLOR_RGB2GRAY."""
    x = img.detach().float().cpu().clamp(0, 255)
    gray = x[0] if x.shape[0] == 1 else 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    return np.ascontiguousarray(gray.round().to(torch.uint8).numpy())


def _gray_u8_array(img: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3) RGB / (H, W) grey 0..255 numpy image -> (H, W) uint8."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] == 3:
        x = img.astype(np.float32)
        img = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    elif img.ndim != 2:
        raise ValueError(f"{name} must be an (H, W, 3) RGB or (H, W) grey image, got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float32)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------- DIS


class DISFlow:
    """OpenCV Dense Inverse Search flow (Kroeger et al., ECCV 2016): CPU, no weights.

    ``DISFlow(preset)(img_a, img_b)`` with ``preset`` one of ``ultrafast``, ``fast``,
    ``medium`` (OpenCV's ``DISOPTICAL_FLOW_PRESET_*``; slower is more accurate). Images are
    converted to grey (BT.601). Inputs: tensors (B, 3, H, W) RGB (or (B, 1, H, W) grey) in
    0..255 -> (B, 2, H, W) float32 on the input's device; or numpy (H, W, 3) RGB / (H, W)
    grey images in 0..255 -> (H, W, 2) float32 (images read with ``cv2.imread`` are BGR:
    convert them, or pass grey). Keeps one OpenCV object (not thread-safe: one instance per
    thread); picklable, e.g. into DataLoader workers.
    """

    def __init__(self, preset: str = "medium"):
        if preset not in DIS_PRESETS:
            raise ValueError(f"preset must be one of {DIS_PRESETS}, got {preset!r}")
        _import_cv2()  # fail here, not at the first frame pair
        self.preset = preset
        self._dis = None

    def __getstate__(self):  # the OpenCV object does not pickle
        state = dict(self.__dict__)
        state["_dis"] = None
        return state

    def _calc(self, a_u8: np.ndarray, b_u8: np.ndarray) -> np.ndarray:
        if self._dis is None:
            cv2 = _import_cv2()
            preset_id = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                         "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[self.preset]
            self._dis = cv2.DISOpticalFlow_create(preset_id)
        # calc(prev, next): prev(y, x) ~ next(y + v, x + u), the module's convention.
        return self._dis.calc(a_u8, b_u8, None)

    def __call__(self, img_a, img_b):
        if isinstance(img_a, np.ndarray) or isinstance(img_b, np.ndarray):
            if not (isinstance(img_a, np.ndarray) and isinstance(img_b, np.ndarray)):
                raise TypeError("img_a and img_b must both be numpy arrays or both be tensors")
            if img_a.shape != img_b.shape:
                raise ValueError(f"img_a {img_a.shape} and img_b {img_b.shape} must have the same shape")
            return self._calc(_gray_u8_array(img_a, "img_a"), _gray_u8_array(img_b, "img_b")).astype(np.float32)
        _check_pair(img_a, img_b)
        flows = [torch.from_numpy(self._calc(_gray_u8_tensor(a), _gray_u8_tensor(b))).permute(2, 0, 1)
                 for a, b in zip(img_a, img_b)]
        return torch.stack(flows).to(device=img_a.device, dtype=torch.float32)

    def __repr__(self):
        return f"DISFlow(preset={self.preset!r})"


def dis_flow(img_a, img_b, *, preset: str = "medium"):
    """One-off DIS flow from ``img_a`` to ``img_b``: ``DISFlow(preset)(img_a, img_b)`` (see :class:`DISFlow`)."""
    return DISFlow(preset)(img_a, img_b)


# --------------------------------------------------------------------------- RAFT


def _raft_default_weights(variant: str):
    tvof = _import_tv_optical_flow()
    return (tvof.Raft_Small_Weights if variant == "small" else tvof.Raft_Large_Weights).DEFAULT


def raft_cache_path(variant: str = "small", weights=None) -> str:
    """Where torchvision's cache keeps RAFT ``weights`` (a torchvision ``Raft_*_Weights`` member;
    default: the variant's ``DEFAULT``): ``<torch.hub.get_dir()>/checkpoints/<file name of its URL>``."""
    if variant not in RAFT_VARIANTS:
        raise ValueError(f"variant must be one of {RAFT_VARIANTS}, got {variant!r}")
    if weights is None:
        weights = _raft_default_weights(variant)
    name = os.path.basename(weights.url.split("?")[0])
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def _read_state_dict(path: str) -> "Mapping[str, torch.Tensor]":
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {path} as a PyTorch state dict ({type(exc).__name__}: {exc}); "
                         "save one with torch.save(model.state_dict(), path)") from exc
    return obj


def _unwrap_state_dict(obj, where: str) -> "dict[str, torch.Tensor]":
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{where} does not hold a state dict (a mapping of parameter names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


class RAFTFlow:
    """torchvision RAFT (Teed & Deng, ECCV 2020), ``raft_small`` or ``raft_large``; never downloads.

    ``weights``: a path to a local state dict (``torch.save(model.state_dict(), path)``; a
    ``state_dict`` / ``model`` wrapper and a ``module.`` prefix are accepted), a state dict, or
    None / a torchvision ``Raft_Small_Weights`` / ``Raft_Large_Weights`` member to read
    torchvision's own file from its cache (:func:`raft_cache_path`; ``None`` = the variant's
    ``DEFAULT``). A missing file raises FileNotFoundError that says where to put it; weights
    of the wrong variant raise ValueError.

    ``RAFTFlow(...)(img_a, img_b)``: (B, 3, H, W) RGB in 0..255 -> (B, 2, H, W) float32 on
    the input's device. Frames are scaled to [-1, 1] (RAFT's input) and replicate-padded at
    the bottom/right to a multiple of 8 and at least 128 x 128 (RAFT's correlation pyramid);
    ``num_flow_updates`` trades accuracy for time (12 is torchvision's default). Runs on
    ``device`` (default: CPU), under ``torch.no_grad``.
    """

    def __init__(self, variant: str = "small", weights=None, *, num_flow_updates: int = 12, device=None):
        if variant not in RAFT_VARIANTS:
            raise ValueError(f"variant must be one of {RAFT_VARIANTS}, got {variant!r}")
        if isinstance(num_flow_updates, bool) or not isinstance(num_flow_updates, int) or num_flow_updates < 1:
            raise ValueError(f"num_flow_updates must be a positive int, got {num_flow_updates!r}")
        tvof = _import_tv_optical_flow()
        name = f"raft_{variant}"
        if isinstance(weights, (str, os.PathLike)):
            path = os.fspath(weights)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name} weights file not found: {path} (weights are only read from local "
                                        f"files; nothing is downloaded)")
            state, where = _unwrap_state_dict(_read_state_dict(path), path), path
        elif isinstance(weights, Mapping):
            state, where = _unwrap_state_dict(weights, "weights"), "the given state dict"
        elif weights is None or hasattr(weights, "url"):
            enum = type(_raft_default_weights(variant))
            if weights is not None and not isinstance(weights, enum):
                raise ValueError(f"{name} needs {enum.__name__} weights, got {weights!r}")
            path = raft_cache_path(variant, weights)
            if not os.path.isfile(path):
                w = weights if weights is not None else _raft_default_weights(variant)
                raise FileNotFoundError(
                    f"{name} weights not found: tcloss never downloads, and torchvision's cache has no {path}. "
                    f"Put the file there (it is {w.url}, e.g. fetched on a machine with network access by "
                    f"torchvision.models.optical_flow.{name}(weights='DEFAULT') and copied from its "
                    f"torch.hub checkpoints folder), or pass weights='/path/to/state_dict.pth'.")
            state, where = _unwrap_state_dict(_read_state_dict(path), path), path
        else:
            raise TypeError(f"weights must be a path, a state dict, a torchvision Raft weights member or None, "
                            f"got {type(weights).__name__}")
        model = tvof.raft_small(weights=None) if variant == "small" else tvof.raft_large(weights=None)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            msg = str(exc).replace("\n", " ")
            raise ValueError(f"checkpoint {where} does not match torchvision {name}: "
                             f"{msg[:600]}{' ...' if len(msg) > 600 else ''}") from exc
        self.variant = variant
        self.num_flow_updates = num_flow_updates
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, img_a: torch.Tensor, img_b: torch.Tensor) -> torch.Tensor:
        _check_pair(img_a, img_b, channels=(3,))
        dev = self.device
        h, w = img_a.shape[-2:]
        ph, pw = max((-h) % 8, 128 - h), max((-w) % 8, 128 - w)  # to max(ceil8(h), 128)
        a = img_a.to(dev, torch.float32) / 127.5 - 1.0
        b = img_b.to(dev, torch.float32) / 127.5 - 1.0
        if ph or pw:
            a = F.pad(a, (0, pw, 0, ph), mode="replicate")
            b = F.pad(b, (0, pw, 0, ph), mode="replicate")
        flow = self.model(a, b, num_flow_updates=self.num_flow_updates)[-1]
        return flow[..., :h, :w].to(device=img_a.device, dtype=torch.float32)

    def __repr__(self):
        return f"RAFTFlow(variant={self.variant!r}, num_flow_updates={self.num_flow_updates}, device={self.device})"
