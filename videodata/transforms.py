"""Triplet sampling and the joint augmentation of a triplet (frames, label, flow, occlusion).

All frames of a sample get the same random scale, crop and flip; flow is transformed
consistently: resized with its vectors scaled by the resize factors, cropped with the
frames (vectors unchanged), x component negated on a horizontal flip.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from tcloss.flow import resize_flow  # one home for it; re-exported for the data pipeline

__all__ = ["sample_triplet", "TripletAugment", "resize_sample", "resize_flow", "new_rng"]


def new_rng(seed: Optional[int] = None) -> np.random.Generator:
    """A numpy Generator; without a seed it is drawn from torch's global RNG, so that
    ``torch.manual_seed`` and DataLoader worker seeding control data randomness."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()).item())
    return np.random.default_rng(seed)


def sample_triplet(label_index: int, num_frames: int, max_distance: int, rng: np.random.Generator,
                   min_distance: int = 1) -> Tuple[int, int, int]:
    """(previous, labelled, next) frame indices of a clip of ``num_frames`` frames.

    Distances are uniform in [min_distance, max_distance], then clamped to the clip
    (so at a clip end the neighbour may be the labelled frame itself).
    """
    if not 0 <= label_index < num_frames:
        raise ValueError(f"label_index {label_index} outside the clip [0, {num_frames})")
    if not isinstance(max_distance, (int, np.integer)) or max_distance < 0:
        raise ValueError(f"max_distance must be a non-negative int, got {max_distance!r}")
    lo = min(min_distance, max_distance)
    d_prev = int(rng.integers(lo, max_distance + 1))
    d_next = int(rng.integers(lo, max_distance + 1))
    return max(label_index - d_prev, 0), label_index, min(label_index + d_next, num_frames - 1)


def _resize_frames(frames: torch.Tensor, size) -> torch.Tensor:
    h, w = frames.shape[-2:]
    if tuple(size) == (h, w):
        return frames
    lead = frames.shape[:-3]
    x = frames.reshape(-1, frames.shape[-3], h, w)
    # antialias when shrinking, so that textures do not alias into noise
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                      antialias=size[0] < h or size[1] < w)
    return x.reshape(*lead, x.shape[-3], *size)


def _resize_nearest(x: torch.Tensor, size) -> torch.Tensor:
    h, w = x.shape[-2:]
    if tuple(size) == (h, w):
        return x
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(1, -1, h, w).float(), size=tuple(size), mode="nearest-exact")
    return y.reshape(*lead, *size).to(x.dtype)


def resize_sample(sample: Dict[str, torch.Tensor], size) -> Dict[str, torch.Tensor]:
    """Resize every spatial entry of a sample dict to ``size`` = (H, W) (labels nearest)."""
    size = (int(size[0]), int(size[1]))
    out = dict(sample)
    out["frames"] = _resize_frames(sample["frames"], size)
    for key in ("label", "labels"):
        if key in sample:
            out[key] = _resize_nearest(sample[key], size)
    if "flow" in sample:
        out["flow"] = resize_flow(sample["flow"], size)
    if "occlusion" in sample:
        out["occlusion"] = _resize_nearest(sample["occlusion"], size)
    return out


def _pad_to(sample, size, ignore_index, pad_value):
    h, w = sample["frames"].shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if not (ph or pw):
        return sample
    pad = (0, pw, 0, ph)
    out = dict(sample)
    out["frames"] = F.pad(sample["frames"], pad, value=pad_value)
    for key in ("label", "labels"):
        if key in sample:
            out[key] = F.pad(sample[key], pad, value=ignore_index)
    if "flow" in sample:
        out["flow"] = F.pad(sample["flow"], pad, value=0.0)
    if "occlusion" in sample:
        # padded pixels have no correspondence: mark them occluded
        out["occlusion"] = F.pad(sample["occlusion"], pad, value=True)
    return out


class TripletAugment:
    """Random scale, crop and horizontal flip shared by all frames of a sample.

    ``scale``: (min, max) resize factor (uniform); ``crop_size``: (H, W) or None (no crop;
    smaller images are padded: frames with ``pad_value``, label with ``ignore_index``, flow
    with 0, occlusion with True); ``hflip``: flip probability 0.5 when True.
    Call: ``aug(sample, rng)`` with a dict holding ``frames`` (K, 3, H, W) and optionally
    ``label`` (H, W), ``labels`` (K, H, W), ``flow`` (M, 2, H, W), ``occlusion`` (M, H, W).
    """

    def __init__(self, scale: Sequence[float] = (0.5, 2.0), crop_size=None, hflip: bool = True,
                 ignore_index: int = 255, pad_value: float = 0.0):
        scale = tuple(float(s) for s in scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale!r}")
        if crop_size is not None:
            if isinstance(crop_size, int):
                crop_size = (crop_size, crop_size)
            crop_size = (int(crop_size[0]), int(crop_size[1]))
            if min(crop_size) < 1:
                raise ValueError(f"crop_size must be positive, got {crop_size!r}")
        self.scale = scale
        self.crop_size = crop_size
        self.hflip = bool(hflip)
        self.ignore_index = ignore_index
        self.pad_value = pad_value

    def __call__(self, sample: Dict[str, torch.Tensor], rng: Optional[np.random.Generator] = None):
        rng = rng if rng is not None else new_rng()
        h, w = sample["frames"].shape[-2:]
        s = float(rng.uniform(*self.scale))
        if s != 1.0:
            size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
            sample = resize_sample(sample, size)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            sample = _pad_to(sample, (ch, cw), self.ignore_index, self.pad_value)
            h, w = sample["frames"].shape[-2:]
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            sample = {k: (v[..., y0:y0 + ch, x0:x0 + cw] if k in _SPATIAL else v) for k, v in sample.items()}
        if self.hflip and rng.random() < 0.5:
            sample = {k: (v.flip(-1) if k in _SPATIAL else v) for k, v in sample.items()}
            if "flow" in sample:
                flow = sample["flow"].clone()
                flow[..., 0, :, :] = -flow[..., 0, :, :]
                sample["flow"] = flow
        return {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}

    def __repr__(self):
        return f"TripletAugment(scale={self.scale}, crop_size={self.crop_size}, hflip={self.hflip})"


_SPATIAL = ("frames", "label", "labels", "flow", "occlusion")
