"""train.py / trainer: end-to-end smoke run, resume, config errors, loss assembly, DDP.

The whole file runs in well under 4 minutes on 2 CPU cores (``pytest tests/test_train.py``);
nothing here is marked slow.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tcloss
import trainer
from trainer.cli import main
from trainer.losses import compute_losses, effective_weights

ROOT = Path(__file__).resolve().parents[1]
TERMS = ("ce", "aux", "kd", "pa", "tl", "pf", "mf")


def _run(args, timeout=170):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ end to end

def test_smoke_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    r = _run(["--preset", "smoke", "--set", f"run_dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mIoU" in r.stdout and "teacher" in r.stdout and "student" in r.stdout
    for name in ("teacher_final.pt", "teacher_last.pt", "baseline_final.pt", "student_final.pt", "student_last.pt"):
        assert (run_dir / "checkpoints" / name).is_file(), name
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temp file
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in recs} == {"teacher", "baseline", "student"}
    assert set(TERMS) <= set(recs[-1])  # every student term logged
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for model in ("teacher", "baseline", "student"):
        for key in ("miou", "pixel_acc", "tc", "fps", "params_m"):
            assert key in metrics[model], (model, key)
        assert 0 <= metrics[model]["miou"] <= 100 and 0 <= metrics[model]["tc"] <= 100
    for png in ("loss_curves.png", "miou_vs_tc.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    # eval alone reuses the trained checkpoints of the same folder and reproduces the metrics
    (run_dir / "metrics.json").unlink()
    assert main(["--preset", "smoke", "--set", f"run_dir={run_dir}", "--stage", "eval"]) == 0
    again = json.loads((run_dir / "metrics.json").read_text())
    for model in ("teacher", "baseline", "student"):
        assert again[model]["miou"] == metrics[model]["miou"] and again[model]["tc"] == metrics[model]["tc"]


# ------------------------------------------------------------------ resume

SMALL = ["--preset", "smoke", "--set", "stages=[teacher,student]", "--set", "plots=false",
         "--set", "teacher.iters=8", "--set", "student.iters=8", "--set", "train.ckpt_every=3",
         "--set", "train.tensorboard=false"]


def test_resume_equals_uninterrupted(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(SMALL + ["--set", f"run_dir={a}"]) == 0
    # killed mid-teacher, then mid-student, then finished: three processes' worth of runs
    assert main(SMALL + ["--set", f"run_dir={b}", "--set", "train.max_iters_this_run=5"]) == 0
    assert not (b / "checkpoints" / "teacher_final.pt").exists()
    assert _state(b / "checkpoints" / "teacher_last.pt")["iteration"] == 5
    assert main(SMALL + ["--set", f"run_dir={b}", "--set", "train.max_iters_this_run=6", "--resume"]) == 0
    assert _state(b / "checkpoints" / "student_last.pt")["iteration"] == 3
    assert main(SMALL + ["--set", f"run_dir={b}", "--resume"]) == 0
    for stage in ("teacher", "student"):
        _same_state(_state(a / "checkpoints" / f"{stage}_final.pt")["model"],
                    _state(b / "checkpoints" / f"{stage}_final.pt")["model"])
    sa, sb = _state(a / "checkpoints" / "student_last.pt"), _state(b / "checkpoints" / "student_last.pt")
    _same_state(sa["mf"], sb["mf"])  # the ConvLSTM of the MF term too


# ------------------------------------------------------------------ config errors

@pytest.mark.parametrize("args, words", [
    (["--set", "train.bogus=1"], "unknown config key 'train.bogus'"),
    (["--set", "data.name=cityscapes", "--set", "data.root=/nonexistent/cityscapes"], "data root not found"),
    (["--set", "data.name=camvid"], "data.root is required"),
    (["--set", "student.model=resnet9000"], "unknown student.model"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["--preset", "nope"], "unknown preset"),
    (["--stage", "distill"], "unknown stage"),
])
def test_bad_config_in_process(args, words, capsys, tmp_path):
    assert main(args + ["--set", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


def test_bad_config_subprocess(tmp_path):
    r = _run(["--set", "teacher.model=nope", "--set", f"run_dir={tmp_path}"], timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown teacher.model" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_yaml_configs_load():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for c in configs:
        cfg = trainer.load_config(c, ["data.name=synthetic"])  # real roots are not here: check keys only
        assert cfg["loss"]["lambda"] == 0.1


def test_set_overrides_types():
    cfg = trainer.load_config(None, ["train.batch_size=3", "student.losses.mf=false", "data.scale=[1, 1.5]",
                                     "student.model_options.width=4", "teacher.weights=null"])
    assert cfg["train"]["batch_size"] == 3 and cfg["student"]["losses"]["mf"] is False
    assert cfg["data"]["scale"] == [1, 1.5] and cfg["student"]["model_options"]["width"] == 4


# ------------------------------------------------------------------ loss assembly

def _fake_outputs(B=2, K=4, h=4, w=5, C=6, teacher=False):
    g = torch.Generator().manual_seed(1 if teacher else 0)
    out = {"logits": torch.randn(B * 3, K, h, w, generator=g), "aux": torch.randn(B * 3, K, h, w, generator=g),
           "feat": torch.randn(B * 3, C + (2 if teacher else 0), h, w, generator=g)}
    if not teacher:
        for v in out.values():
            v.requires_grad_(True)
    return out


def _inputs(B=2, K=4, H=32, W=40):
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(B, 3, 3, H, W, generator=g) * 255
    label = torch.randint(0, K, (B, H, W), generator=g)
    label[:, :3] = 255
    flow = torch.randn(B, 2, 2, H, W, generator=g) * 2
    return frames, label, flow


@pytest.mark.parametrize("term", TERMS)
def test_each_loss_term_on_alone(term):
    frames, label, flow = _inputs()
    s, t = _fake_outputs(), _fake_outputs(teacher=True)
    mf = __import__("tcloss").nn.MultiFrameDistillation(2, pool=4)
    total, terms = compute_losses({term: 0.5}, frames, label, flow, s, t, mf)
    assert set(terms) == {term}
    assert torch.isfinite(total) and torch.allclose(total, 0.5 * terms[term].float())
    total.backward()
    used = {"ce": ["logits"], "aux": ["aux"], "kd": ["logits"], "pa": ["feat"], "tl": ["logits"],
            "pf": ["logits"], "mf": ["feat"]}[term]
    for k, v in s.items():
        has = v.grad is not None and v.grad.abs().sum() > 0
        assert has == (k in used), (term, k)


@pytest.mark.parametrize("term", TERMS)
def test_each_loss_term_off(term):
    frames, label, flow = _inputs()
    s, t = _fake_outputs(), _fake_outputs(teacher=True)
    mf = __import__("tcloss").nn.MultiFrameDistillation(2, pool=4)
    weights = {k: 1.0 for k in TERMS if k != term}
    total, terms = compute_losses(weights, frames, label, flow, s, t, mf)
    assert set(terms) == set(TERMS) - {term}
    assert torch.allclose(total, sum(terms.values()))


def test_effective_weights_lambda():
    cfg = trainer.load_config(None, ["student.losses.pf=false", "student.loss_weights.kd=10", "loss.lambda=0.2"])
    w = effective_weights(cfg["student"], cfg["loss"]["lambda"])
    assert "pf" not in w
    assert w["ce"] == 1.0 and w["aux"] == 0.4  # supervised terms are not scaled by lambda (eq. 3)
    assert w["kd"] == pytest.approx(2.0) and w["tl"] == pytest.approx(0.2) and w["mf"] == pytest.approx(0.2)


def test_no_temporal_terms_use_one_frame():
    frames, label, flow = _inputs()
    s = {k: v[::3] for k, v in _fake_outputs().items()}  # only the labelled frame
    total, terms = compute_losses({"ce": 1.0, "aux": 0.4}, frames, label, None, s)
    assert set(terms) == {"ce", "aux"}
    with pytest.raises(ValueError, match="three frames"):
        compute_losses({"ce": 1.0, "tl": 0.1}, frames, label, flow, s)


# ------------------------------------------------------------------ loss.semantics=released
#
# Each released term through compute_losses against the released code's math on the same
# inputs (the mappings of tests/test_porting.py), per (t, t+k) pair and averaged over the
# triplet's two pairs.

def _released(term, **opts):
    frames, label, flow = _inputs()
    s, t = _fake_outputs(), _fake_outputs(teacher=True)
    _, terms = compute_losses({term: 1.0}, frames, label, flow, s, t, semantics="released", backend="reference",
                              **opts)
    paper = compute_losses({term: 1.0}, frames, label, flow, s, t, backend="reference")[1][term]
    assert not torch.allclose(terms[term], paper)  # the option changes the term
    frame = {k: v.detach().view(2, 3, *v.shape[1:]) for k, v in s.items()}
    tframe = {k: v.view(2, 3, *v.shape[1:]) for k, v in t.items()}
    return terms[term], frames, flow, frame, tframe


def test_released_tl_is_temporal_loss_on_logits_mask_power_2_over_c():
    got, frames, flow, s, _ = _released("tl")
    H, W = frames.shape[-2:]
    z = [torch.nn.functional.interpolate(s["logits"][:, i], size=(H, W), mode="bilinear", align_corners=False)
         for i in range(3)]
    img = frames / 255.0
    C = z[1].shape[1]
    pairs = [tcloss.temporal_loss(z[1], z[nb], flow[:, j], img[:, 1], img[:, nb], on="logit", mask_power=2,
                                  backend="reference") / C for j, nb in ((0, 0), (1, 2))]
    torch.testing.assert_close(got, (pairs[0] + pairs[1]) / 2)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_released_kd_is_frame_sum_of_elementwise_kl_mean(tau):
    got, _, _, s, t = _released("kd", kd_temperature=tau)

    def theirs(i):  # ETC CriterionKD of one frame: the mean over B*C*H*W of the element-wise KL
        zt = t["logits"][:, i] / tau
        zs = s["logits"][:, i] / tau
        return (torch.softmax(zt, 1) * (torch.log_softmax(zt, 1) - torch.log_softmax(zs, 1))).mean()
    torch.testing.assert_close(got, theirs(1) + (theirs(0) + theirs(2)) / 2)


def test_released_kd_upsamples_the_student_to_the_teachers_size():
    from trainer.losses import released_kd
    g = torch.Generator().manual_seed(3)
    small, big = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 6, 8, generator=g)
    up = torch.nn.functional.interpolate(small, size=(6, 8), mode="bilinear", align_corners=True)
    torch.testing.assert_close(released_kd(small, big, 1.0), tcloss.pixelwise_kd(up, big) / 5)


def test_released_pa_is_pooled_self_similarity_of_the_three_frames():
    """ETC's CriterionSDcos_self (docs/PORTING.md): the self-similarity of frame t plus 0.4 x
    those of its two neighbours, on 2x2 average-pooled (floor) features."""
    got, _, _, s, t = _released("pa")

    def sim(a):  # cosine similarity of every pixel of a with every other, (B, N, N)
        a = torch.nn.functional.normalize(a.flatten(2), dim=1, eps=1e-8)
        return a.transpose(1, 2) @ a

    def term(i):
        ps, pt = (torch.nn.functional.avg_pool2d(x["feat"][:, i], 2) for x in (s, t))
        return ((sim(pt) - sim(ps)) ** 2).mean()
    torch.testing.assert_close(got, term(1) + 0.4 * (term(0) + term(2)))


def test_released_semantics_in_the_trainer():
    from trainer.losses import loss_options, needs_triplet, stage_weights
    cfg = trainer.load_config(None, ["loss.semantics=released", "student.forward_triplet=auto"])
    assert loss_options(cfg)["semantics"] == "released"
    kd_only = [f"student.losses.{t}=false" for t in ("pa", "tl", "pf", "mf")]
    for semantics, whole in (("paper", False), ("released", True)):  # released kd needs the neighbours
        c = trainer.load_config(None, kd_only + [f"loss.semantics={semantics}", "student.forward_triplet=auto"])
        assert needs_triplet(c, "student", stage_weights(c, "student")) is whole
    frames, label, flow = _inputs()
    one = {k: v[::3] for k, v in _fake_outputs().items()}
    with pytest.raises(ValueError, match="three frames"):
        compute_losses({"kd": 1.0}, frames, label, flow, one, _fake_outputs(teacher=True), semantics="released")
    with pytest.raises(ValueError, match="semantics"):
        compute_losses({"ce": 1.0}, frames, label, flow, _fake_outputs(), semantics="eq1")


@pytest.mark.parametrize("args, words", [
    (["--set", "loss.semantics=eq1"], "loss.semantics must be one of paper, released, got 'eq1'"),
    (["--set", "loss.semantics=released", "--set", "loss.tl_on=logit"], "loss.tl_on apply to semantics=paper"),
    (["--set", "loss.semantics=released", "--set", "student.pa_pool=4"], "student.pa_pool apply to semantics=paper"),
])
def test_semantics_option_is_validated(args, words, capsys, tmp_path):
    assert main(args + ["--set", f"run_dir={tmp_path / 'never'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------ checkpoints and evaluation

def test_resume_checkpoint_is_weights_only_and_old_ones_resume(tmp_path, capsys):
    """A <stage>_last.pt holds tensors and plain data only (torch.load(weights_only=True) reads it
    with no allow-list); one written before (numpy's RNG state as an array) still resumes."""
    import numpy as np
    run = tmp_path / "run"
    argv = ["--preset", "smoke", "--set", f"run_dir={run}", "--set", "stages=teacher", "--set", "teacher.iters=4",
            "--set", "plots=false", "--set", "train.tensorboard=false"]
    assert main(argv + ["--set", "train.max_iters_this_run=2"]) == 0
    last = run / "checkpoints" / "teacher_last.pt"
    st = torch.load(last, map_location="cpu", weights_only=True)
    rng = st["rng"]
    old = dict(rng, numpy=(rng["numpy"]["name"], rng["numpy"]["key"].numpy().astype(np.uint32), rng["numpy"]["pos"],
                           rng["numpy"]["has_gauss"], rng["numpy"]["cached_gaussian"]),
               python=(rng["python"]["version"], tuple(rng["python"]["state"].tolist()), rng["python"]["gauss"]))
    torch.save({**st, "rng": old}, last)
    with pytest.raises(Exception):
        torch.load(last, map_location="cpu", weights_only=True)  # the old format needs numpy's globals
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    assert "resuming at iteration 2/4" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "teacher_final.pt", weights_only=True)["iteration"] == 4


def test_rng_states_round_trip():
    import random

    import numpy as np

    from trainer.utils import rng_states, set_rng_states
    st = rng_states()
    draw = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(st)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draw[0], again[0]) and np.array_equal(draw[1], again[1]) and draw[2] == again[2]


def test_eval_batch_size_is_the_forward_batch():
    from trainer.engine import build_data, build_model, evaluate
    from trainer.utils import Dist
    seen = {}
    for bs in (3, 8):
        cfg = trainer.load_config(None, [f"eval.batch_size={bs}", "eval.fps_iters=1"], preset="smoke")
        torch.manual_seed(0)
        model = build_model(cfg, "student")
        sizes = []
        model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        res = evaluate(cfg, model, Dist("cpu"), build_data(cfg, "val"))
        seen[bs] = (sizes, res)
    clip = trainer.load_config(None, [], preset="smoke")["data"]["clip_length"]  # 8 frames per clip
    assert seen[3][0][:3] == [3, 3, clip - 6] and seen[8][0][0] == clip
    assert seen[3][1]["miou"] == pytest.approx(seen[8][1]["miou"], abs=0.1)  # per-frame predictions either way


# ------------------------------------------------------------------ DDP (gloo, 2 ranks on CPU)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rc = main(argv)
    if rc != 0:
        raise SystemExit(rc)


def test_ddp_two_ranks_identical_weights(tmp_path):
    run_dir = tmp_path / "ddp"
    argv = ["--preset", "smoke", "--set", f"run_dir={run_dir}", "--set", "teacher.iters=4", "--set",
            "student.iters=4", "--set", "train.rank_checkpoints=true", "--set", "train.tensorboard=false"]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
    ck = run_dir / "checkpoints"
    for stage in ("teacher", "student"):
        r0, r1 = _state(ck / f"{stage}_final_rank0.pt"), _state(ck / f"{stage}_final_rank1.pt")
        _same_state(r0["model"], r1["model"])
        _same_state(r0["model"], _state(ck / f"{stage}_final.pt")["model"])
        if r0["mf"] is not None:
            _same_state(r0["mf"], r1["mf"])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert {"teacher", "student"} <= set(m)


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "teacher_last.pt").write_bytes(b"x")
    assert main(["--preset", "smoke", "--set", f"run_dir={tmp_path}", "--set", "overwrite=false"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and err.count("\n") == 1


def test_baseline_is_the_paired_control_of_the_student(tmp_path):
    """Baseline and student draw the same init, batches and augmentation; with forward_triplet=always
    and every non-CE term off the two stages are the same computation, bit for bit."""
    run_dir = tmp_path / "pair"
    off = [a for t in ("kd", "pa", "tl", "pf", "mf") for a in ("--set", f"student.losses.{t}=false")]
    r = _run(["--preset", "smoke", "--set", f"run_dir={run_dir}", "--set", "stages=[baseline,student]",
              "--set", "student.forward_triplet=always", "--set", "student.iters=4", *off])
    assert r.returncode == 0, r.stderr[-3000:]
    a = _state(run_dir / "checkpoints" / "baseline_final.pt")["model"]
    b = _state(run_dir / "checkpoints" / "student_final.pt")["model"]
    _same_state(a, b)
    # with forward_triplet=auto and no temporal term both forward only the labelled frame: still paired,
    # but BatchNorm sees other batches than with whole triplets, so the weights differ from the above
    run2 = tmp_path / "auto"
    r = _run(["--preset", "smoke", "--set", f"run_dir={run2}", "--set", "stages=[baseline,student]",
              "--set", "student.forward_triplet=auto", "--set", "student.iters=4", *off])
    assert r.returncode == 0, r.stderr[-3000:]
    b2 = _state(run2 / "checkpoints" / "baseline_final.pt")["model"]
    _same_state(b2, _state(run2 / "checkpoints" / "student_final.pt")["model"])
    assert any(not torch.equal(a[k], b2[k]) for k in a)
