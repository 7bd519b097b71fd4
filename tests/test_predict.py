"""train.py --stage predict: per-frame inference of checkpoints on a folder of frames or a video.

Checkpoints are built directly (an untrained ``tiny`` network), nothing is trained; the whole
file takes a few seconds on one CPU thread.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.config import load_config
from trainer.engine import build_model
from trainer.predict import CAMVID_PALETTE, CITYSCAPES_PALETTE, palette

H, W, N = 40, 56, 4


def _checkpoint(path: Path, stage: str, seed: int, num_classes: int = 6) -> Path:
    cfg = load_config(None, ["student.model=tiny", f"data.num_classes={num_classes}"])
    torch.manual_seed(seed)
    model = build_model(cfg, "student")
    # non-trivial BatchNorm statistics, so that eval mode differs from train mode
    with torch.no_grad():
        model.train()
        model(torch.rand(2, 3, H, W) * 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"stage": stage, "iteration": 1, "model": model.state_dict(), "config": cfg}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    ckdir = tmp_path_factory.mktemp("run") / "synth" / "checkpoints"
    return (_checkpoint(ckdir / "baseline_final.pt", "baseline", 0),
            _checkpoint(ckdir / "student_final.pt", "student", 1))


def _frames(seed: int = 0):
    """N RGB frames: a bright square moving over smooth noise."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (7, 7), 0)
    out = []
    for t in range(N):
        f = base.copy()
        f[10:26, 5 + 6 * t:21 + 6 * t] = (250, 60, 20)
        out.append(f)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames")
    for t, f in enumerate(_frames()):
        cv2.imwrite(str(d / f"frame_{t:03d}.png"), f[..., ::-1])
    return d


def _predict(ckpt_paths, inp, out, *extra):
    args = ["--stage", "predict", "--input", str(inp), "--output", str(out), "--device", "cpu", *extra]
    for p in ckpt_paths:
        args += ["--checkpoint", str(p)]
    return main(args)


def _rgb(path):
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return img[..., ::-1]


def _write_video(path, frames, fps=10.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write mp4v video here")
    for f in frames:
        writer.write(np.ascontiguousarray(f[..., ::-1]))
    writer.release()


def _video_frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


# ------------------------------------------------------------------ outputs

def test_folder_one_checkpoint(ckpts, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(ckpts[1:], folder, out) == 0
    pngs = sorted((out / "synth" / "student").glob("*.png"))
    assert [p.stem for p in pngs] == [f"frame_{t:03d}" for t in range(N)]
    colours = {tuple(c) for c in palette(6)[:6]}
    for p in pngs:
        img = _rgb(p)
        assert img.shape == (H, W, 3)
        assert {tuple(c) for c in img.reshape(-1, 3)} <= colours
    first = _rgb(out / "side_by_side_first.png")
    assert first.shape == (H, 2 * W, 3)
    assert not (out / "side_by_side.mp4").exists()
    lat = json.loads((out / "latency.json").read_text())
    assert lat["device"] == "cpu" and lat["frames"] == N and lat["input_size"] == [H, W]
    r = lat["models"]["synth/student"]
    assert r["timed_frames"] == N - 1  # first frame = warm-up
    assert 0 < r["median_ms"] and 0 < r["mean_ms"] and r["fps"] == pytest.approx(1e3 / r["mean_ms"])
    stdout = capsys.readouterr().out
    assert "median ms" in stdout and "synth/student" in stdout


def test_two_checkpoints_side_by_side(ckpts, folder, tmp_path):
    out = tmp_path / "out"
    assert _predict(ckpts, folder, out) == 0
    for label in ("baseline", "enhanced"):
        assert len(list((out / label).glob("*.png"))) == N
    assert _rgb(out / "side_by_side_first.png").shape == (H, 3 * W, 3)
    lat = json.loads((out / "latency.json").read_text())
    assert set(lat["models"]) == {"baseline", "enhanced"}
    assert lat["models"]["enhanced"]["name"] == "synth/student"
    probe = tmp_path / "probe.mp4"
    _write_video(probe, _frames()[:1])  # skips when this OpenCV has no mp4v encoder
    frames = _video_frames(out / "side_by_side.mp4")
    assert len(frames) == N and frames[0].shape == (H, 3 * W, 3)


def test_video_writer_unavailable(ckpts, folder, tmp_path, capsys, monkeypatch):
    """No mp4v encoder: a warning, and every PNG is still written."""

    class Closed:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

    monkeypatch.setattr(cv2, "VideoWriter", Closed)
    out = tmp_path / "out"
    assert _predict(ckpts, folder, out) == 0
    assert "warning" in capsys.readouterr().err
    assert not (out / "side_by_side.mp4").exists()
    assert len(list((out / "enhanced").glob("*.png"))) == N and (out / "side_by_side_first.png").is_file()


def test_video_input(ckpts, tmp_path):
    video = tmp_path / "clip.mp4"
    _write_video(video, _frames())
    out = tmp_path / "out"
    assert _predict(ckpts[:1], video, out) == 0
    pngs = sorted((out / "synth" / "baseline").glob("*.png"))
    assert [p.name for p in pngs] == [f"{t:06d}.png" for t in range(N)]
    assert all(_rgb(p).shape == (H, W, 3) for p in pngs)
    assert json.loads((out / "latency.json").read_text())["frames"] == N


def test_stateless(ckpts, folder, tmp_path):
    """A frame's prediction is the same with or without the frames before it."""
    assert _predict(ckpts, folder, tmp_path / "all") == 0
    k = 2
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / f"frame_{k:03d}.png").write_bytes((folder / f"frame_{k:03d}.png").read_bytes())
    assert _predict(ckpts, alone, tmp_path / "one") == 0
    for label in ("baseline", "enhanced"):
        a = _rgb(tmp_path / "all" / label / f"frame_{k:03d}.png")
        b = _rgb(tmp_path / "one" / label / f"frame_{k:03d}.png")
        assert np.array_equal(a, b), label
    # the two checkpoints really are different networks
    a = _rgb(tmp_path / "all" / "baseline" / f"frame_{k:03d}.png")
    b = _rgb(tmp_path / "all" / "enhanced" / f"frame_{k:03d}.png")
    assert not np.array_equal(a, b)


def test_max_frames(ckpts, folder, tmp_path):
    out = tmp_path / "out"
    assert _predict(ckpts[1:], folder, out, "--max-frames", "2") == 0
    assert [p.stem for p in sorted((out / "synth" / "student").glob("*.png"))] == ["frame_000", "frame_001"]
    lat = json.loads((out / "latency.json").read_text())
    assert lat["frames"] == 2 and lat["models"]["synth/student"]["timed_frames"] == 1


def test_palettes():
    assert np.array_equal(palette(11)[:11], CAMVID_PALETTE)
    assert np.array_equal(palette(19)[:19], CITYSCAPES_PALETTE)
    for k in (6, 11, 19, 40):
        lut = palette(k)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        assert len({tuple(c) for c in lut[:k]}) == k  # distinct
        assert (0, 0, 0) not in {tuple(c) for c in lut[:k]}
        assert tuple(lut[255]) == (0, 0, 0)  # ignore label


# ------------------------------------------------------------------ errors

def _error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: ") and "\n" not in err, err
    return err


def test_checkpoint_count(ckpts, folder, tmp_path, capsys):
    assert "got 0" in _error(capsys, _predict([], folder, tmp_path / "o"))
    assert "got 3" in _error(capsys, _predict([ckpts[0]] * 3, folder, tmp_path / "o"))


def test_bad_checkpoints(ckpts, folder, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert str(missing) in _error(capsys, _predict([missing], folder, tmp_path / "o"))
    keyless = tmp_path / "keyless.pt"
    torch.save({"state_dict": {}}, keyless)
    err = _error(capsys, _predict([keyless], folder, tmp_path / "o"))
    assert str(keyless) in err and "'model'" in err
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert str(junk) in _error(capsys, _predict([junk], folder, tmp_path / "o"))
    no_cfg = tmp_path / "no_cfg.pt"
    torch.save({"stage": "student", "model": {}, "config": {}}, no_cfg)
    assert "not a train.py config" in _error(capsys, _predict([no_cfg], folder, tmp_path / "o"))
    other = _checkpoint(tmp_path / "k19.pt", "student", 0, num_classes=19)
    ck = torch.load(other, weights_only=False)
    ck["config"]["data"]["num_classes"] = 6  # weights of a 19-class head, config of a 6-class one
    torch.save(ck, other)
    assert "do not fit" in _error(capsys, _predict([other], folder, tmp_path / "o"))


def test_missing_arguments(ckpts, folder, tmp_path, capsys):
    base = ["--stage", "predict", "--checkpoint", str(ckpts[0])]
    assert "--input" in _error(capsys, main(base + ["--output", str(tmp_path / "o")]))
    assert "--output" in _error(capsys, main(base + ["--input", str(folder)]))
    assert "--max-frames" in _error(capsys, _predict(ckpts[:1], folder, tmp_path / "o", "--max-frames", "0"))


def test_bad_inputs(ckpts, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert str(missing) in _error(capsys, _predict(ckpts[:1], missing, tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no frames here")
    err = _error(capsys, _predict(ckpts[:1], empty, tmp_path / "o"))
    assert str(empty) in err and "no images" in err
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    err = _error(capsys, _predict(ckpts[:1], bad, tmp_path / "o"))
    assert str(bad) in err and "cannot read video" in err


def test_bad_device(ckpts, folder, tmp_path, capsys):
    assert "--device" in _error(capsys, _predict(ckpts[:1], folder, tmp_path / "o", "--device", "tpu"))
    if not torch.cuda.is_available():
        args = ["--stage", "predict", "--checkpoint", str(ckpts[0]), "--input", str(folder),
                "--output", str(tmp_path / "o"), "--device", "cuda"]
        assert "CUDA is not available" in _error(capsys, main(args))


def test_training_options_refused_with_predict(capsys):
    from trainer.cli import main
    assert main(["--stage", "predict", "--set", "seed=1", "--checkpoint", "x.pt", "--input", "a", "--output", "b"]) == 2
    assert "--set do not apply" in capsys.readouterr().err
