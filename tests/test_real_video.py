"""scripts/real_video.py: the evaluation part (Sintel TC, checkpoint loading, the table), on tiny inputs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("real_video", ROOT / "scripts" / "real_video.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Const(torch.nn.Module):
    """Predicts class 2 everywhere: perfectly consistent."""

    def forward(self, x):
        b, _, h, w = x.shape
        logits = torch.zeros(b, 4, (h + 7) // 8, (w + 7) // 8)
        logits[:, 2] = 1
        return {"logits": logits}


def test_sintel_tc_of_constant_and_random_models(shared_data):
    sintel = shared_data / "sintel_frames"
    if not sintel.is_dir():
        pytest.skip(f"Sintel frames not found at {sintel}")
    rv = _script()
    frames, names = rv.load_frames(sintel, height=48)
    assert frames.shape == (10, 3, 48, round(1024 * 48 / 436)) and names[0] == "frame_0016.png"
    flow = rv.dis_flow(frames)
    assert flow.shape == (9, 2, 48, frames.shape[-1]) and torch.isfinite(flow).all()
    res = rv.video_tc(_Const(), frames, flow, 4)
    assert res["tc"] == pytest.approx(100.0) and res["class_fraction"][2] == pytest.approx(1.0)
    import models

    torch.manual_seed(0)
    net = models.build_segmentation_model("tiny", 4, width=4)
    res = rv.video_tc(net, frames, flow, 4)
    assert 0 <= res["tc"] <= 100 and res["num_pixels"] > 0


def test_parse_variant():
    rv = _script()
    assert rv.parse_variant("lam1:loss.lambda=1;seed=3") == ("lam1", ["loss.lambda=1", "seed=3"])
    import argparse

    for bad in ("nolabel", ":loss.lambda=1", "x y:a=1", "lab:novalue"):
        with pytest.raises(argparse.ArgumentTypeError):
            rv.parse_variant(bad)


def test_eval_only_writes_table(shared_data, tmp_path):
    """--eval-only on two untrained checkpoints of a tiny config: results.json and table.md."""
    if not (shared_data / "camvid_0016E5").is_dir() or not (shared_data / "sintel_frames").is_dir():
        pytest.skip("shared CamVid / Sintel samples not found")
    from trainer.config import load_config
    from trainer.engine import build_model

    run_dir = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "camvid_0016E5_cpu.yaml",
                      [f"run_dir={run_dir}", "data.size=[36, 48]", "student.model_options.width=4",
                       "data.val_options.frame_range=[96, 101]"])
    cfg["data"]["root"] = str(shared_data / "camvid_0016E5")
    for stage in ("baseline", "student"):
        torch.manual_seed(0)
        model = build_model(cfg, stage)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"stage": stage, "iteration": 0, "model": model.state_dict(), "config": cfg},
                   run_dir / "checkpoints" / f"{stage}_final.pt")
    out = tmp_path / "out"
    rv = _script()
    assert rv.main(["--eval-only", "--run-dir", str(run_dir), "--out", str(out),
                    "--sintel", str(shared_data / "sintel_frames")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in res["rows"]] == ["baseline", "student (TL)"]
    for r in res["rows"]:
        assert 0 <= r["camvid"]["miou"] <= 100 and 0 <= r["camvid"]["tc"] <= 100 and 0 <= r["sintel"]["tc"] <= 100
        assert r["sintel"]["size"] == [36, round(1024 * 36 / 436)] and r["sintel"]["pairs"] == 9
    table = (out / "table.md").read_text()
    assert "| baseline |" in table and "--eval-only" in table and "2-core x86-64 CPU, no GPU" in table
