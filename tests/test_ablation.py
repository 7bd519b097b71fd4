"""train.py --ablation: the scheme plan, the per-scheme loss switches, the table, and one small
end-to-end run (smoke budget: a teacher and four students, well under a minute on 2 cores)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.ablation import ARMS, RELEASED, SCHEMES, paired, paired_table, plan, run_name, student_overrides, table
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


def test_released_arms():
    """E and H (issue 17's e' and h'): the terms of e and h with loss.semantics=released; every
    lower-case scheme runs with loss.semantics=paper whatever the config says."""
    assert ARMS == tuple("abcdefghEH") and RELEASED == {"E": "e", "H": "h"}
    assert plan("aeEH", 0, 2, seeded="aeEH") == [("a", 0), ("e", 0), ("E", 0), ("H", 0),
                                                 ("a", 1), ("e", 1), ("E", 1), ("H", 1)]
    for arm, base in RELEASED.items():
        cfg = load_config(ROOT / "configs" / "ablation.yaml", ["loss.semantics=paper", *student_overrides(arm)])
        assert cfg["loss"]["semantics"] == "released"
        assert {t for t, v in cfg["student"]["losses"].items() if v} == {"ce", "aux", *SCHEMES[base][1]}
    cfg = load_config(ROOT / "configs" / "ablation.yaml", ["loss.semantics=released", *student_overrides("e")])
    assert cfg["loss"]["semantics"] == "paper"
    assert run_name("E", 3) == "e_released_seed3" and run_name("e", 3) == "e_seed3"
    res = {"e": [{"miou": 41.0, "pixel_acc": 81.0, "tc": 70.0}], "E": [{"miou": 40.0, "pixel_acc": 80.0, "tc": 72.0}]}
    md = table(res, None, load_config(None, []))
    assert "| (e) TL | TL | 1 | 41.0 | 81.0 | 70.0 |" in md
    assert "| (e') TL, released | TL | 1 | 40.0 | 80.0 | 72.0 |" in md


def test_paired_differences():
    """Differences to (a) of the same seed: mean, 95 % t interval, exact sign-flip p-value."""
    res = {"a": [{"seed": s, "tc": 70.0, "miou": 50.0} for s in range(4)],
           "E": [{"seed": s, "tc": 70.0 + d, "miou": 50.0} for s, d in zip(range(3), (1.0, 2.0, 3.0))]}
    st = paired(res, "E", "tc")
    assert st["n"] == 3 and st["mean"] == pytest.approx(2.0)
    assert st["ci95"] == pytest.approx(4.303 / 3 ** 0.5)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert st["p"] == pytest.approx(2 / 8)  # only all-plus and all-minus reach |mean| 2
    assert paired(res, "E", "miou")["mean"] == 0 and paired(res, "e", "tc") is None
    ten = {"a": [{"seed": s, "tc": 0.0} for s in range(10)], "H": [{"seed": s, "tc": 1.0 + s % 2} for s in range(10)]}
    assert paired(ten, "H", "tc")["p"] == pytest.approx(2 / 1024)
    assert "| (e') TL, released | 3 | +2.00 ± 2.48 | 0.250 | +0.00 ± 0.00 | 1.000 |" in paired_table(res)


def test_ablation_released_arm_end_to_end(tmp_path):
    """--schemes eE on the smoke preset: both arms share the teacher, data and seed, and differ
    only in loss.semantics."""
    run_dir = tmp_path / "abl"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--ablation", "--preset", "smoke", "--schemes", "eE",
                        "--seeds", "1", "--jobs", "2", "--run-dir", str(run_dir), "--set", "teacher.iters=4",
                        "--set", "student.iters=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["schemes"]["E"]["semantics"] == "released" and res["schemes"]["e"]["semantics"] == "paper"
    assert [x["seed"] for x in res["schemes"]["E"]["runs"]] == [0] and not res["failed"]
    cfg_e, cfg_r = (json.loads((run_dir / d / "config.json").read_text()) for d in ("e_seed0", "e_released_seed0"))
    assert cfg_e["loss"].pop("semantics") == "paper" and cfg_r["loss"].pop("semantics") == "released"
    cfg_e.pop("run_dir"), cfg_r.pop("run_dir")
    assert cfg_e == cfg_r
    logs = [[json.loads(x) for x in (run_dir / d / "log.jsonl").read_text().splitlines()]
            for d in ("e_seed0", "e_released_seed0")]
    assert logs[0][-1]["tl"] != logs[1][-1]["tl"]
    assert "| (e') TL, released | TL | 1 |" in (run_dir / "table.md").read_text()
    assert res["schemes"]["E"]["paired_to_a"] == {"tc": None, "miou": None}  # no (a) run here


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
