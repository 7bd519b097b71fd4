"""CamVid in the SegNet layout: ``{root}/{split}/0016E5_07959.png`` + ``{root}/{split}annot/``
(same names, uint8 ids 0..10, 11 = void -> 255)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List

import numpy as np

from .base import VideoSegDataset, read_image, read_label

__all__ = ["CamVid", "CAMVID_CLASSES"]

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")

_LUT = np.full(256, 255, dtype=np.int64)
_LUT[:11] = np.arange(11)  # 11 (void) and anything above -> ignore


def _split_name(stem: str):
    """'0016E5_07959' -> ('0016E5', 7959); sequences are the part before the last '_'."""
    m = re.match(r"^(.*)_(\d+)$", stem)
    if m is None:
        return stem, None
    return m.group(1), int(m.group(2))


class CamVid(VideoSegDataset):
    """CamVid (11 classes, ignore 255), SegNet layout.

    ``root``: folder holding ``{split}/`` and ``{split}annot/``. ``frames_dir``: optional
    folder of all video frames (same naming) for denser triplet neighbours; by default the
    neighbours are the other frames of ``{split}/`` of the same sequence (the prefix before
    the last '_'), ordered by frame number. Other options: see ``VideoSegDataset``.
    """

    num_classes = 11
    class_names = CAMVID_CLASSES

    def __init__(self, root, split: str = "train", frames_dir=None, **options):
        root = Path(os.fspath(root))
        if not root.is_dir():
            raise FileNotFoundError(f"CamVid root not found: {root}")
        img_dir, ann_dir = root / split, root / f"{split}annot"
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"CamVid split folder not found: {d}")
        pool_dir = Path(os.fspath(frames_dir)) if frames_dir is not None else img_dir
        if not pool_dir.is_dir():
            raise FileNotFoundError(f"CamVid frames_dir not found: {pool_dir}")
        labels = sorted(ann_dir.glob("*.png"))
        if not labels:
            raise ValueError(f"empty CamVid split {split!r}: no .png labels in {ann_dir}")
        pool: Dict[str, List[tuple]] = {}
        for p in pool_dir.glob("*.png"):
            seq, num = _split_name(p.stem)
            pool.setdefault(seq, []).append((num if num is not None else -1, p.stem, p))
        self.seq_names, self.seq_lengths, self.seq_labelled = [], [], []
        self._frames: List[List[Path]] = []
        self._labels: List[Dict[int, Path]] = []
        by_seq: Dict[str, Dict[str, Path]] = {}
        for lab in labels:
            frame = pool_dir / lab.name
            if not frame.is_file():
                raise FileNotFoundError(f"CamVid label {lab} has no frame: expected {frame}")
            by_seq.setdefault(_split_name(lab.stem)[0], {})[lab.stem] = lab
        for seq in sorted(by_seq):
            entries = sorted(pool[seq], key=lambda e: (e[0], e[1]))
            stems = [e[1] for e in entries]
            pos = {s: i for i, s in enumerate(stems)}
            self.seq_names.append(seq)
            self.seq_lengths.append(len(entries))
            self._frames.append([e[2] for e in entries])
            lab_map = {pos[stem]: path for stem, path in by_seq[seq].items()}
            self._labels.append(lab_map)
            self.seq_labelled.append(sorted(lab_map))
        self.root, self.split = root, split
        self._setup(**options)

    def _load_frames(self, seq, indices):
        import torch

        return torch.stack([read_image(self._frames[seq][i]) for i in indices])

    def _load_label(self, seq, index):
        return read_label(self._labels[seq][index], _LUT)
