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
    """'0016E5_07959' -> ('0016E5', 7959), '0006R0_f00930' -> ('0006R0', 930); sequences are the
    part before the last '_', the frame number the digits after it (CamVid names the frames of
    0006R0 and Seq05VD with an 'f' before the number)."""
    m = re.match(r"^(.*)_[A-Za-z]*(\d+)$", stem)
    if m is None:
        return stem, None
    return m.group(1), int(m.group(2))


class CamVid(VideoSegDataset):
    """CamVid (11 classes, ignore 255), SegNet layout.

    ``root``: folder holding ``{split}/`` and ``{split}annot/``. ``frames_dir``: optional
    folder of all video frames (same naming) for denser triplet neighbours; by default the
    neighbours are the other frames of ``{split}/`` of the same sequence (the prefix before
    the last '_'), ordered by frame number.

    ``frame_range``: ``[start, stop)`` (Python slice semantics, ``0 <= start < stop <= N``)
    over the split's N labelled frames sorted by sequence name, then frame number: only those
    frames are used, so one sequence can be split in time (e.g. ``[0, 64]`` for training and
    ``[72, 101]`` held out on the 101 frames of 0016E5). Triplet neighbours and evaluation
    clips are taken only inside the range: a sequence keeps just the frames (of ``{split}/``
    or ``frames_dir``) from its first to its last selected labelled frame, and neighbours are
    clamped at those ends, so disjoint ranges never share a frame. A gap between a training
    and a held-out range (e.g. 8 frames) also keeps the two from being near-duplicates in
    time. Other options: see ``VideoSegDataset``.
    """

    num_classes = 11
    class_names = CAMVID_CLASSES

    def __init__(self, root, split: str = "train", frames_dir=None, frame_range=None, **options):
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
        seqs = []  # (name, sorted pool entries, {position in entries: label path})
        for seq in sorted(by_seq):
            entries = sorted(pool[seq], key=lambda e: (e[0], e[1]))
            pos = {e[1]: i for i, e in enumerate(entries)}
            seqs.append((seq, entries, {pos[stem]: path for stem, path in by_seq[seq].items()}))
        if frame_range is not None:
            seqs = _apply_frame_range(seqs, frame_range, len(labels))
        for seq, entries, lab_map in seqs:
            self.seq_names.append(seq)
            self.seq_lengths.append(len(entries))
            self._frames.append([e[2] for e in entries])
            self._labels.append(lab_map)
            self.seq_labelled.append(sorted(lab_map))
        self.root, self.split = root, split
        self.frame_range = None if frame_range is None else (int(frame_range[0]), int(frame_range[1]))
        self._setup(**options)

    def _load_frames(self, seq, indices):
        import torch

        return torch.stack([read_image(self._frames[seq][i]) for i in indices])

    def _load_label(self, seq, index):
        return read_label(self._labels[seq][index], _LUT)


def _apply_frame_range(seqs, frame_range, n_labelled):
    """Keep the labelled frames [start, stop) of the split (in sequence, frame order) and, per
    sequence, only the frames from its first to its last kept labelled frame."""
    ok = (isinstance(frame_range, (list, tuple)) and len(frame_range) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in frame_range))
    if not ok:
        raise ValueError(f"frame_range must be [start, stop) as two ints, got {frame_range!r}")
    start, stop = int(frame_range[0]), int(frame_range[1])
    if not 0 <= start < stop <= n_labelled:
        raise ValueError(f"frame_range [{start}, {stop}) must satisfy 0 <= start < stop <= {n_labelled} "
                         f"(the number of labelled frames of the split)")
    out, offset = [], 0
    for seq, entries, lab_map in seqs:
        positions = sorted(lab_map)
        keep = [p for k, p in enumerate(positions) if start <= offset + k < stop]
        offset += len(positions)
        if not keep:
            continue
        lo, hi = keep[0], keep[-1]
        out.append((seq, entries[lo:hi + 1], {p - lo: lab_map[p] for p in keep}))
    return out
