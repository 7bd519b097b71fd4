"""Per-frame inference of trained checkpoints: ``python train.py --stage predict``.

Each frame of the input (a folder of images sorted by file name, or a video file) goes through
each model on its own: batch 1, ``torch.inference_mode()``, no state carried from one frame to
the next, so the prediction of a frame does not depend on the frames around it. Written to
``--output``:

* ``<label>/<frame-stem>.png``: the colour-coded prediction of every frame, per model; the label
  is ``<run folder>/<stage>`` (e.g. ``synthetic/student``) for one checkpoint, ``baseline`` and
  ``enhanced`` for two; a video's frame stems are the zero-padded frame indices;
* ``side_by_side_first.png``: the first frame's panels [input | prediction(s)], captioned;
* ``side_by_side.mp4`` (two checkpoints): [input | baseline | enhanced] for every frame;
* ``latency.json``: per-frame latency of each model (forward + upsample + argmax).
"""
from __future__ import annotations

import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import models
import videodata

from .engine import build_model
from .errors import ConfigError, error, one_line
from .utils import read_checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
FOLDER_FPS = 15.0  # frame rate of side_by_side.mp4 for a folder of frames
IGNORE_INDEX = 255  # drawn black

# CamVid, 11 classes in the SegNet order of videodata.camvid.CAMVID_CLASSES (Sky, Building, Pole,
# Road, Pavement, Tree, SignSymbol, Fence, Car, Pedestrian, Bicyclist); RGB, the SegNet tutorial's colours.
CAMVID_PALETTE = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
], dtype=np.uint8)

# Cityscapes, the 19 train ids of videodata.cityscapes.CITYSCAPES_CLASSES (road ... bicycle); RGB,
# the colours of cityscapesScripts' labels.py.
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def _distinct_palette(n: int) -> np.ndarray:
    """Any other class count: the PASCAL VOC bit-interleaved colours of ids 1..n (id 0, black, is
    skipped so that no class looks like the ignore label). Fixed and pairwise distinct."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k + 1, 0, 0, 0
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        out[k] = (r, g, b)
    return out


def palette(num_classes: int) -> np.ndarray:
    """RGB lookup table (max(256, K), 3) uint8 for class ids: CamVid's colours for K = 11,
    Cityscapes' for K = 19, ``_distinct_palette`` otherwise; unused ids (the ignore label 255) black."""
    colours = {11: CAMVID_PALETTE, 19: CITYSCAPES_PALETTE}.get(num_classes)
    if colours is None:
        colours = _distinct_palette(num_classes)
    lut = np.zeros((max(256, num_classes), 3), dtype=np.uint8)
    lut[:num_classes] = colours
    if num_classes <= IGNORE_INDEX:
        lut[IGNORE_INDEX] = 0
    return lut


# ------------------------------------------------------------------ models

def load_trained(path: Path):
    """A ``<stage>_final.pt`` of train.py -> (network in eval mode on the CPU, its config, the
    checkpoint dict). The network is rebuilt from the config stored in the checkpoint, reading
    nothing else from disk; any problem is a one-line ``ConfigError`` naming the file."""
    path = Path(path)
    ckpt = read_checkpoint(path, "final", hint="")
    if "optimizer" in ckpt:
        final = path.with_name(path.name[:-len("_last.pt")] + "_final.pt") if path.name.endswith("_last.pt") else None
        raise ConfigError(f"{path} is a resume checkpoint of train.py (optimizer and RNG state); --stage predict "
                          f"takes the weights of a finished stage"
                          + ("" if final is None else f": {final}" + (
                              "" if final.is_file() else " (not written yet: finish the run with --resume)")))
    if "config" not in ckpt:
        raise ConfigError(f"{path} is not a <stage>_final.pt checkpoint of train.py (no 'config')")
    stage = str(ckpt.get("stage") or path.stem.split("_")[0])
    role = "teacher" if stage == "teacher" else "student"
    cfg = copy.deepcopy(ckpt["config"])
    try:
        # the weights are in the checkpoint: read nothing else from disk
        cfg[role]["weights"] = None
        cfg[role]["pretrained_backbone"] = None
        model = build_model(cfg, role)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: its config is not a train.py config ({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ConfigError(f"{path}: the weights do not fit the network of its config ({one_line(exc)})") from None
    return model.eval(), cfg, ckpt


class Predictor:
    """One checkpoint: the rebuilt network in eval mode, its palette and its latency record."""

    def __init__(self, path: Path, device: torch.device):
        self.path = path
        model, cfg, ckpt = load_trained(path)
        self.stage = str(ckpt.get("stage") or path.stem.split("_")[0])
        self.num_classes = int(cfg["data"]["num_classes"])
        self.model = model.to(device)
        self.device = device
        self.lut = palette(self.num_classes)
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        self.name = f"{run.name}/{self.stage}"  # e.g. synthetic/student
        self.times_ms: list = []

    def __call__(self, frame: torch.Tensor) -> np.ndarray:
        """(3, H, W) float 0..255 on the device -> class ids (H, W) numpy; the time of forward +
        upsample + argmax is appended to ``times_ms``."""
        cuda = self.device.type == "cuda"
        x = frame.unsqueeze(0)
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        logits = self.model(x)["logits"]
        pred = models.upsample_logits(logits, frame.shape[-2:]).argmax(1)[0]
        if cuda:
            torch.cuda.synchronize(self.device)
        self.times_ms.append((time.perf_counter() - t0) * 1e3)
        return pred.cpu().numpy()

    def colourize(self, pred: np.ndarray) -> np.ndarray:
        """Class ids (H, W) -> RGB (H, W, 3) uint8."""
        return self.lut[pred]


# ------------------------------------------------------------------ frames

class FolderFrames:
    """The images of a folder sorted by file name; frames (stem, (3, H, W) float 0..255)."""

    def __init__(self, folder: Path):
        self.files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f"no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in input folder {folder}")
        stems = [p.stem for p in self.files]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise ConfigError(f"input folder {folder} holds several images named {dup[0]!r} "
                              f"(their outputs would collide)")
        self.count, self.fps = len(self.files), FOLDER_FPS

    def __iter__(self):
        for p in self.files:
            try:
                yield p.stem, videodata.read_image(p)
            except (FileNotFoundError, ValueError) as exc:  # removed or undecodable meanwhile
                raise ConfigError(str(exc)) from None

    def close(self):
        """Nothing to release (the same interface as VideoFrames)."""


class VideoFrames:
    """The frames of a video file (OpenCV, BGR -> RGB); stems are the zero-padded frame indices."""

    def __init__(self, path: Path):
        import cv2

        self.cap = cv2.VideoCapture(str(path))
        ok, self.first = self.cap.read() if self.cap.isOpened() else (False, None)
        if not ok:
            self.cap.release()
            raise ConfigError(f"cannot read video {path} (not a video OpenCV can decode, or no frames)")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and np.isfinite(fps) and fps > 0 else FOLDER_FPS
        count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))  # a container's estimate: the progress bar's total
        self.count = count if count > 0 else None

    def __iter__(self):
        img, i = self.first, 0
        while img is not None:
            rgb = np.ascontiguousarray(img[..., ::-1])
            yield f"{i:06d}", torch.from_numpy(rgb).permute(2, 0, 1).float()
            ok, img = self.cap.read()
            img, i = (img if ok else None), i + 1

    def close(self):
        self.cap.release()


# ------------------------------------------------------------------ side by side

def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    """Write a small caption (white on a dark band) at the top-left of an RGB panel, in place."""
    import cv2

    h, w = panel.shape[:2]
    scale = float(np.clip(min(h, w) / 480, 0.3, 0.8))
    thick = 1 if scale < 0.6 else 2
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(2, th // 3)
    cv2.rectangle(panel, (0, 0), (min(w, tw + 2 * pad), th + base + 2 * pad), (0, 0, 0), thickness=-1)
    cv2.putText(panel, text, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return panel


def _panel_row(frame: torch.Tensor, colours: list, captions: list) -> np.ndarray:
    """[input | colour maps ...] as one RGB image, each panel captioned."""
    image = frame.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    panels = [np.ascontiguousarray(image)] + [c.copy() for c in colours]
    return np.concatenate([_caption(p, t) for p, t in zip(panels, captions)], axis=1)


class _VideoOut:
    """side_by_side.mp4 (mp4v), opened at the first row; a writer that cannot open is a warning."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self.writer, self.size = path, fps, None, None

    def write(self, row_rgb: np.ndarray):
        import cv2

        if self.size is None:
            self.size = (row_rgb.shape[1], row_rgb.shape[0])
            writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if writer.isOpened():
                self.writer = writer
            else:
                print(f"train.py: warning: cannot open a mp4v video writer for {self.path}; "
                      f"writing the PNG frames only", file=sys.stderr)
        if self.writer is None:
            return
        if (row_rgb.shape[1], row_rgb.shape[0]) != self.size:  # frames of another size in a folder
            row_rgb = cv2.resize(row_rgb, self.size, interpolation=cv2.INTER_NEAREST)
        self.writer.write(np.ascontiguousarray(row_rgb[..., ::-1]))

    def close(self):
        if self.writer is not None:
            self.writer.release()


# ------------------------------------------------------------------ main

def _device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available (use --device cpu)")
    return dev


def _check_args(args):
    """The paths of the arguments; every user error is a ConfigError."""
    ckpts = [Path(p) for p in args.checkpoint]
    if len(ckpts) not in (1, 2):
        raise ConfigError(f"--stage predict takes one --checkpoint, or two (baseline, enhanced) for a side-by-side "
                          f"video; got {len(ckpts)}")
    for p in ckpts:
        if not p.is_file():
            raise ConfigError(f"checkpoint file not found: {p}")
    if not args.input:
        raise ConfigError("--stage predict needs --input (a folder of frames or a video file)")
    if not args.output:
        raise ConfigError("--stage predict needs --output (a folder)")
    inp, out = Path(args.input), Path(args.output)
    if not inp.exists():
        raise ConfigError(f"input not found: {inp}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} exists and is not a folder")
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError(f"--max-frames must be >= 1, got {args.max_frames}")
    return ckpts, inp, out


def _latency(pred: Predictor) -> dict:
    """Mean / median ms per frame and fps, the first frame skipped as warm-up when there are more."""
    t = pred.times_ms[1:] if len(pred.times_ms) > 1 else pred.times_ms
    mean = statistics.fmean(t)
    return {"checkpoint": str(pred.path), "name": pred.name, "timed_frames": len(t), "mean_ms": mean,
            "median_ms": statistics.median(t), "fps": 1e3 / mean}


def _imwrite(path: Path, rgb: np.ndarray):
    import cv2

    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise ConfigError(f"cannot write {path}")


def run(args, out=print) -> int:
    """Predict every frame with every checkpoint and write the outputs (see the module docstring)."""
    from tqdm import tqdm

    ckpts, inp, out_dir = _check_args(args)
    device = _device(args.device)
    preds = [Predictor(p, device) for p in ckpts]
    labels = [p.name for p in preds] if len(preds) == 1 else ["baseline", "enhanced"]
    captions = ["input"] + ([preds[0].name] if len(preds) == 1 else
                            [f"{lab}: {p.name}" for lab, p in zip(labels, preds)])
    frames = FolderFrames(inp) if inp.is_dir() else VideoFrames(inp)
    count = frames.count
    if args.max_frames is not None:
        count = args.max_frames if count is None else min(count, args.max_frames)
    video = _VideoOut(out_dir / "side_by_side.mp4", frames.fps) if len(preds) == 2 else None
    n, size = 0, None
    bar = tqdm(total=count, desc="predict", unit="frame", dynamic_ncols=True, disable=not sys.stderr.isatty())
    try:
        for lab in labels:
            (out_dir / lab).mkdir(parents=True, exist_ok=True)
        with torch.inference_mode():
            for stem, frame in itertools.islice(frames, args.max_frames):
                frame = frame.to(device)
                size = size or list(frame.shape[-2:])
                colours = []
                for lab, pred in zip(labels, preds):
                    rgb = pred.colourize(pred(frame))
                    _imwrite(out_dir / lab / f"{stem}.png", rgb)
                    colours.append(rgb)
                if n == 0 or video is not None:
                    row = _panel_row(frame, colours, captions)
                    if n == 0:
                        _imwrite(out_dir / "side_by_side_first.png", row)
                    if video is not None:
                        video.write(row)
                n += 1
                bar.update(1)
    finally:
        bar.close()
        if video is not None:
            video.close()
        frames.close()

    report = {"device": str(device), "input": str(inp), "input_size": size, "frames": n,
              "models": {lab: _latency(p) for lab, p in zip(labels, preds)}}
    (out_dir / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    wl = max(len("model"), *map(len, labels))
    wn = max(len("checkpoint"), *(len(p.name) for p in preds))
    out(f"{'model':<{wl}}  {'checkpoint':<{wn}}  {'mean ms':>9}  {'median ms':>9}  {'fps':>8}")
    for lab, r in report["models"].items():
        out(f"{lab:<{wl}}  {r['name']:<{wn}}  {r['mean_ms']:>9.2f}  {r['median_ms']:>9.2f}  {r['fps']:>8.1f}")
    timed = next(iter(report["models"].values()))["timed_frames"]
    out(f"{n} frames of {size[0]}x{size[1]} on {device}, batch 1, {timed} timed "
        f"(forward + upsample + argmax); outputs in {out_dir}")
    return 0


def main(args) -> int:
    """Entry point of ``train.py --stage predict``: 0, or 2 with a one-line error on stderr."""
    try:
        return run(args)
    except ConfigError as exc:  # also caught by trainer.cli.main; here for callers of this main
        return error(str(exc))
