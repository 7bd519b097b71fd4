"""Cityscapes video snippets: ``leftImg8bit_sequence/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png``
and ``gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png`` (19 train ids, others 255)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .base import VideoSegDataset, read_image, read_label

__all__ = ["Cityscapes", "CITYSCAPES_CLASSES", "LABEL_ID_TO_TRAIN_ID"]

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
# The standard labelIds -> trainIds mapping of cityscapesScripts (labels.py).
LABEL_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_LUT = np.full(256, 255, dtype=np.int64)
for _k, _v in LABEL_ID_TO_TRAIN_ID.items():
    _LUT[_k] = _v

_LABEL_RE = re.compile(r"^(?P<city>.+)_(?P<seq>\d+)_(?P<frame>\d+)_gtFine_labelIds\.png$")
_FRAME_RE = re.compile(r"^(?P<city>.+)_(?P<seq>\d+)_(?P<frame>\d+)_leftImg8bit\.png$")


class Cityscapes(VideoSegDataset):
    """Cityscapes with its 30-frame video snippets (19 classes, ignore 255).

    Each labelled frame f is one sequence: the snippet frames f-``before`` ... f+``after``
    (19 and 10 in the data set) that exist on disk, contiguous around f. A label whose own
    frame is missing raises FileNotFoundError. Other options: see ``VideoSegDataset``.
    """

    num_classes = 19
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root, split: str = "train", before: int = 19, after: int = 10, **options):
        root = Path(os.fspath(root))
        if not root.is_dir():
            raise FileNotFoundError(f"Cityscapes root not found: {root}")
        seq_root, gt_root = root / "leftImg8bit_sequence" / split, root / "gtFine" / split
        for d in (seq_root, gt_root):
            if not d.is_dir():
                raise FileNotFoundError(f"Cityscapes split folder not found: {d}")
        if before < 0 or after < 0:
            raise ValueError(f"before and after must be >= 0, got {before}, {after}")
        labels = sorted(gt_root.glob("*/*_gtFine_labelIds.png"))
        if not labels:
            raise ValueError(f"empty Cityscapes split {split!r}: no *_gtFine_labelIds.png under {gt_root}")
        scanned = {}
        self.seq_names, self.seq_lengths, self.seq_labelled = [], [], []
        self._frames, self._label_paths = [], []
        for lab in labels:
            m = _LABEL_RE.match(lab.name)
            if m is None:
                raise ValueError(f"unexpected Cityscapes label name: {lab}")
            city, seq, f = m.group("city"), m.group("seq"), int(m.group("frame"))
            width = len(m.group("frame"))
            city_dir = seq_root / lab.parent.name
            if city_dir not in scanned:
                have = set()
                if city_dir.is_dir():
                    for p in city_dir.glob("*_leftImg8bit.png"):
                        fm = _FRAME_RE.match(p.name)
                        if fm:
                            have.add((fm.group("seq"), int(fm.group("frame"))))
                scanned[city_dir] = have
            have = scanned[city_dir]
            path = lambda k: city_dir / f"{city}_{seq}_{k:0{width}d}_leftImg8bit.png"  # noqa: E731
            if (seq, f) not in have:
                raise FileNotFoundError(f"Cityscapes label {lab} has no frame: expected {path(f)}")
            lo = f
            while lo - 1 >= f - before and (seq, lo - 1) in have:
                lo -= 1
            hi = f
            while hi + 1 <= f + after and (seq, hi + 1) in have:
                hi += 1
            self.seq_names.append(f"{city}_{seq}_{f:0{width}d}")
            self.seq_lengths.append(hi - lo + 1)
            self.seq_labelled.append([f - lo])
            self._frames.append([path(k) for k in range(lo, hi + 1)])
            self._label_paths.append(lab)
        self.root, self.split = root, split
        self._setup(**options)

    def _load_frames(self, seq, indices):
        import torch

        return torch.stack([read_image(self._frames[seq][i]) for i in indices])

    def _load_label(self, seq, index):
        if index != self.seq_labelled[seq][0]:
            raise ValueError(f"frame {index} of {self.seq_names[seq]} has no label")
        return read_label(self._label_paths[seq], _LUT)
