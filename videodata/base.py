"""Common machinery of the video segmentation data sets: sequences of frames with some
labelled frames, served as training triplets or as evaluation clips."""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import new_rng, resize_sample, sample_triplet

__all__ = ["VideoSegDataset", "read_image", "read_label"]


def read_image(path) -> torch.Tensor:
    """RGB image file -> float32 (3, H, W) in 0..255."""
    import cv2  # local: only the file-based data sets need OpenCV

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot decode image {path}")
    return torch.from_numpy(np.ascontiguousarray(img[..., ::-1])).permute(2, 0, 1).float()


def read_label(path, lut: Optional[np.ndarray] = None) -> torch.Tensor:
    """Single-channel label image -> int64 (H, W), optionally mapped through a 256-entry LUT."""
    import cv2

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label file not found: {path}")
    lab = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError(f"cannot decode label image {path}")
    if lab.ndim != 2:
        raise ValueError(f"label image {path} must be single-channel class ids, got shape {lab.shape}")
    if lut is not None:
        if lab.dtype != np.uint8:
            raise ValueError(f"label image {path} must be 8-bit, got {lab.dtype}")
        lab = lut[lab]
    return torch.from_numpy(lab.astype(np.int64))


class VideoSegDataset(Dataset):
    """Base class. Subclasses fill ``self.seq_names``, ``self.seq_lengths`` and
    ``self.seq_labelled`` (labelled frame indices per sequence) and implement
    ``_load_frames(seq, indices)`` -> (K, 3, H, W) and ``_load_label(seq, index)`` -> (H, W);
    ``_gt_flow(seq, t, targets)`` -> (flow (M, 2, H, W), occlusion (M, H, W)) or None.

    Options: ``mode`` ``"triplet"`` (training; one item per labelled frame) or ``"clip"``
    (evaluation; windows of ``clip_length`` consecutive frames, whole sequences if None);
    ``max_distance`` / ``min_distance`` of the triplet neighbours (in frames of the
    sequence); ``size`` (H, W): deterministic resize before augmentation; ``augment``: a
    callable ``(sample, rng) -> sample`` such as ``TripletAugment``; ``flow_estimator``:
    a callable ``(img_a, img_b) -> flow`` run on the final (augmented) frames when the data
    set has no ground-truth flow; ``sample_seed``: fixes the random choices per item
    (reproducible validation), otherwise they come from torch's global RNG.
    """

    num_classes: int = 0
    ignore_index: int = 255
    class_names: Sequence[str] = ()

    def _setup(self, mode="triplet", max_distance=5, min_distance=1, size=None, augment=None,
               flow_estimator: Optional[Callable] = None, clip_length=None, sample_seed=None):
        if mode not in ("triplet", "clip"):
            raise ValueError(f"mode must be 'triplet' or 'clip', got {mode!r}")
        if not isinstance(max_distance, int) or max_distance < 0:
            raise ValueError(f"max_distance must be a non-negative int, got {max_distance!r}")
        if not isinstance(min_distance, int) or not 0 <= min_distance:
            raise ValueError(f"min_distance must be a non-negative int, got {min_distance!r}")
        if size is not None:
            if isinstance(size, int):
                size = (size, size)
            size = (int(size[0]), int(size[1]))
        if clip_length is not None and (not isinstance(clip_length, int) or clip_length < 1):
            raise ValueError(f"clip_length must be a positive int or None, got {clip_length!r}")
        if augment is not None and not callable(augment):
            raise TypeError("augment must be callable (sample, rng) -> sample")
        if flow_estimator is not None and not callable(flow_estimator):
            raise TypeError("flow_estimator must be callable (img_a, img_b) -> flow")
        self.mode = mode
        self.max_distance = max_distance
        self.min_distance = min_distance
        self.size = size
        self.augment = augment
        self.flow_estimator = flow_estimator
        self.clip_length = clip_length
        self.sample_seed = sample_seed
        self._index: List[tuple] = []
        if mode == "triplet":
            for s, labelled in enumerate(self.seq_labelled):
                self._index.extend((s, i) for i in labelled)
        else:
            for s, n in enumerate(self.seq_lengths):
                step = clip_length or n
                self._index.extend((s, a, min(a + step, n)) for a in range(0, n, step))

    # subclass hooks ---------------------------------------------------------------
    def _load_frames(self, seq: int, indices: Sequence[int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _load_label(self, seq: int, index: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _gt_flow(self, seq: int, t: int, targets: Sequence[int]):
        return None

    # Dataset API --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def _rng(self, idx):
        return new_rng(None if self.sample_seed is None else hash((int(self.sample_seed), idx)) % (2 ** 63))

    def __getitem__(self, idx: int):
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} items")
        idx = idx % len(self)
        rng = self._rng(idx)
        if self.mode == "triplet":
            return self._triplet(idx, rng)
        return self._clip(idx, rng)

    def _finish(self, sample, rng, pairs):
        if self.size is not None:
            sample = resize_sample(sample, self.size)
        if self.augment is not None:
            sample = self.augment(sample, rng)
        if "flow" not in sample and self.flow_estimator is not None and pairs:
            frames = sample["frames"]
            a = frames[[p[0] for p in pairs]]
            b = frames[[p[1] for p in pairs]]
            with torch.no_grad():
                sample["flow"] = self.flow_estimator(a, b).float().cpu()
        return sample

    def _triplet(self, idx, rng):
        seq, t = self._index[idx]
        ip, il, inx = sample_triplet(t, self.seq_lengths[seq], self.max_distance, rng, self.min_distance)
        sample = {"frames": self._load_frames(seq, [ip, il, inx]), "label": self._load_label(seq, il)}
        gt = self._gt_flow(seq, il, [ip, inx])
        if gt is not None:
            sample["flow"], sample["occlusion"] = gt
        sample = self._finish(sample, rng, pairs=[(1, 0), (1, 2)])
        sample["offsets"] = torch.tensor([ip - il, 0, inx - il], dtype=torch.int64)
        sample["index"] = torch.tensor(idx, dtype=torch.int64)
        sample["name"] = f"{self.seq_names[seq]}/{il}"
        return sample

    def _clip(self, idx, rng):
        seq, a, b = self._index[idx]
        indices = list(range(a, b))
        frames = self._load_frames(seq, indices)
        h, w = frames.shape[-2:]
        labels = torch.full((len(indices), h, w), self.ignore_index, dtype=torch.int64)
        labelled = torch.zeros(len(indices), dtype=torch.bool)
        lab_set = set(self.seq_labelled[seq])
        for k, i in enumerate(indices):
            if i in lab_set:
                labels[k] = self._load_label(seq, i)
                labelled[k] = True
        sample = {"frames": frames, "labels": labels}
        flows, occs = [], []
        for i in indices[:-1]:
            gt = self._gt_flow(seq, i, [i + 1])
            if gt is None:
                break
            flows.append(gt[0][0])
            occs.append(gt[1][0])
        if flows:
            sample["flow"], sample["occlusion"] = torch.stack(flows), torch.stack(occs)
        sample = self._finish(sample, rng, pairs=[(k, k + 1) for k in range(len(indices) - 1)])
        sample["labelled"] = labelled
        sample["index"] = torch.tensor(idx, dtype=torch.int64)
        sample["name"] = f"{self.seq_names[seq]}/{a}"
        return sample
