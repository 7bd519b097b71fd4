"""train.py --ablation: the scheme plan, the per-scheme loss switches, the table, and one small
end-to-end run (smoke budget: a teacher and four students, well under a minute on 2 cores)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.ablation import SCHEMES, plan, student_overrides, table
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_schemes_are_table1():
    assert list(SCHEMES) == list("abcdefgh")
    assert SCHEMES["a"][1] == ()
    assert set(SCHEMES["h"][1]) == {"kd", "pa", "pf", "mf", "tl"}
    # every combined scheme is the union of single ones
    assert set(SCHEMES["f"][1]) == set(SCHEMES["c"][1]) | set(SCHEMES["d"][1])
    assert set(SCHEMES["g"][1]) == set(SCHEMES["b"][1]) | set(SCHEMES["f"][1])
    assert set(SCHEMES["h"][1]) == set(SCHEMES["g"][1]) | set(SCHEMES["e"][1])


def test_plan_seeds_only_baseline_and_all():
    tasks = plan("abceh", 5, 3)
    assert tasks[:5] == [("a", 5), ("b", 5), ("c", 5), ("e", 5), ("h", 5)]
    assert sorted(tasks[5:]) == [("a", 6), ("a", 7), ("h", 6), ("h", 7)]
    assert plan("e", 0, 3) == [("e", 0)]
    assert plan("ae", 0, 2, seeded="abcdefgh") == [("a", 0), ("e", 0), ("a", 1), ("e", 1)]
    with pytest.raises(ConfigError, match="--seeded"):
        plan("a", 0, 2, seeded="q")
    with pytest.raises(ConfigError, match="--schemes"):
        plan("az", 0, 1)
    with pytest.raises(ConfigError, match="--seeds"):
        plan("a", 0, 0)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_overrides_switch_exactly_the_scheme_terms(scheme):
    cfg = load_config(ROOT / "configs" / "ablation.yaml", student_overrides(scheme))
    on = {t for t, v in cfg["student"]["losses"].items() if v}
    assert on == {"ce", "aux", *SCHEMES[scheme][1]}


def test_table_mean_and_std():
    cfg = load_config(None, [])
    res = {"a": [{"miou": 40.0, "pixel_acc": 80.0, "tc": 60.0}, {"miou": 42.0, "pixel_acc": 82.0, "tc": 64.0}],
           "e": [{"miou": 41.0, "pixel_acc": 81.0, "tc": 70.0}]}
    md = table(res, None, cfg)
    assert "| (a) baseline | - | 2 | 41.0 ± 1.4 | 81.0 ± 1.4 | 62.0 ± 2.8 |" in md
    assert "| (e) TL | TL | 1 | 41.0 | 81.0 | 70.0 |" in md
    assert "(b)" not in md


def test_ablation_end_to_end(tmp_path):
    run_dir = tmp_path / "abl"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--ablation", "--preset", "smoke", "--schemes", "ae",
                        "--seeds", "2", "--jobs", "2", "--run-dir", str(run_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert [x["seed"] for x in res["schemes"]["a"]["runs"]] == [0, 1]
    assert [x["seed"] for x in res["schemes"]["e"]["runs"]] == [0]
    assert res["teacher"] is not None and not res["failed"]
    # each student used the shared teacher and exactly its scheme's terms
    cfg_e = json.loads((run_dir / "e_seed0" / "config.json").read_text())
    assert cfg_e["student"]["losses"]["tl"] and not cfg_e["student"]["losses"]["pf"]
    assert cfg_e["teacher"]["weights"] == str(run_dir.resolve() / "teacher" / "checkpoints" / "teacher_final.pt")
    assert cfg_e["data"]["seed"] == 0
    # seeds give different students on the same data
    a0 = torch.load(run_dir / "a_seed0" / "checkpoints" / "student_final.pt", weights_only=False)["model"]
    a1 = torch.load(run_dir / "a_seed1" / "checkpoints" / "student_final.pt", weights_only=False)["model"]
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)
    md = (run_dir / "table.md").read_text()
    assert "| (a) baseline | - | 2 |" in md and "(e) TL" in md and "teacher" in md
    assert (run_dir / "miou_vs_tc.png").read_bytes()[:4] == b"\x89PNG"
    # --resume keeps finished runs: nothing is retrained
    r2 = subprocess.run([sys.executable, str(ROOT / "train.py"), "--ablation", "--preset", "smoke", "--schemes", "ae",
                         "--seeds", "2", "--run-dir", str(run_dir), "--resume"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "teacher ->" not in r2.stdout and "seed 0: done" not in r2.stdout


def test_ablation_refuses_stage_and_bad_schemes(capsys):
    from trainer.cli import main
    assert main(["--ablation", "--stage", "student"]) == 2
    assert "--stage" in capsys.readouterr().err
    assert main(["--ablation", "--schemes", "xyz", "--run-dir", "/tmp/never-created-abl"]) == 2
    assert "--schemes" in capsys.readouterr().err
