"""train.py robustness (issue 12, "Reliability"): a user error is one line on stderr and exit
code 2, and no error, however late, costs the finished work of a run folder.

The cases run against copies of one finished smoke run (module fixture): every invalid option,
unusable checkpoint or config file in-process through ``trainer.cli.main`` (what train.py calls),
a sample of them and the run-folder cases as ``train.py`` subprocesses (two at a time), and two
short trainings for the late errors (divergence, a kill). ~1 minute on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--set", "plots=false", "--set", "train.tensorboard=false"]
HAS_CUDA = torch.cuda.is_available()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _train(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("TCLOSS_BACKEND", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _snapshot(folder: Path) -> dict:
    """Every file of a run folder: (size, mtime, sha256)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _assert_user_error(r, words):
    """Exit code 2, exactly one line on stderr naming the problem, no traceback or escapes."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.startswith("train.py: error: ") and r.stderr.endswith("\n"), r.stderr[-3000:]
    assert r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "\x1b" not in r.stderr, r.stderr
    assert words in r.stderr, (words, r.stderr)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished smoke run (teacher, baseline, student, eval; 2 iterations each)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    r = _train(*SMOKE, "--set", f"run_dir={run}", "--set", "teacher.iters=2", "--set", "student.iters=2")
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("teacher", "baseline", "student"):
        assert (run / "checkpoints" / f"{stage}_final.pt").is_file()
    assert (run / "log.jsonl").is_file() and (run / "metrics.json").is_file()
    return run


# ------------------------------------------------------------------ cases
#
# (id, arguments, words of the message, setup(run folder copy, tmp) -> more arguments or None)
# Each runs with the smoke preset (overwrite: true: a fresh run may replace the run's checkpoints)
# in its own copy of the finished run (unless the setup points run_dir elsewhere); afterwards
# every file of the copy must be as it was.

def _truncate(name, keep=0.5):
    def setup(run, tmp):
        p = run / "checkpoints" / name
        data = p.read_bytes()
        p.write_bytes(data[:int(len(data) * keep)])
    return setup


def _swap(src, dst):
    def setup(run, tmp):
        shutil.copy2(run / "checkpoints" / src, run / "checkpoints" / dst)
    return setup


def _latin1_config(run, tmp):
    cfg = tmp / "latin1.yaml"
    cfg.write_bytes(b"seed: 1\n# caf\xe9 (Latin-1, not UTF-8)\n")
    return ["-c", cfg]


def _elsewhere(make):
    """run_dir -> a folder made by ``make(tmp)`` (the finished copy stays as a bystander)."""
    return lambda run, tmp: ["--set", f"run_dir={make(tmp)}"]


def _empty_folder(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _file(tmp):
    (tmp / "file").write_text("a file where the run folder should be")
    return tmp / "file"


def _read_only(tmp):
    if not IS_ROOT:
        (tmp / "ro").mkdir()
        (tmp / "ro").chmod(0o555)
        return tmp / "ro" / "run"
    if sys.platform.startswith("linux") and Path("/sys").is_dir():
        return "/sys/tcloss_robustness_run"  # refuses writes even to root (who ignores permission bits)
    pytest.skip("no read-only location to test as root here")


CASES = [
    # values of the wrong type, out of range, not one of the choices: validated before anything
    ("backend-bogus", ["--set", "loss.backend=bogus"], "loss.backend must be one of auto, reference", None),
    ("backend-unavailable", ["--set", "loss.backend=cuda", "--set", "device=cpu"], "loss.backend=cuda cannot run", None),
    ("iters-not-int", ["--set", "teacher.iters=abc"], "teacher.iters must be an int >= 1, got 'abc'", None),
    ("iters-negative", ["--set", "teacher.iters=-5"], "teacher.iters must be an int >= 1, got -5", None),
    ("iters-fraction", ["--set", "student.iters=1.5"], "student.iters must be an int >= 1", None),
    ("ckpt-every-zero", ["--set", "train.ckpt_every=0"], "train.ckpt_every must be an int >= 1, got 0", None),
    ("lr-zero", ["--set", "student.lr=0"], "student.lr must be a number > 0", None),
    ("momentum-range", ["--set", "train.momentum=1.5"], "train.momentum must be a number in [0, 1)", None),
    ("bool-expected", ["--set", "student.losses.mf=maybe"], "student.losses.mf must be true or false", None),
    ("tensorboard-choice", ["--set", "train.tensorboard=sometimes"], "train.tensorboard must be one of", None),
    ("amp-choice", ["--set", "train.amp=fp8"], "train.amp must be one of none, bf16, fp16", None),
    ("semantics-choice", ["--set", "loss.semantics=eq1"], "loss.semantics must be one of paper, released", None),
    ("scale-order", ["--set", "data.scale=[2, 1]"], "data.scale must be a pair", None),
    ("size-type", ["--set", "data.crop_size=big"], "data.crop_size must be a positive int", None),
    ("stages-empty", ["--set", "stages=[]"], "stages must be all", None),
    ("model-name", ["--set", "student.model=resnet9000"], "unknown student.model 'resnet9000'", None),
    ("model-option", ["--set", "student.model_options.bogus=1"], "cannot build the", None),
    ("data-option", ["--set", "data.train_options.num_clips=0"], "cannot build the train data set", None),
    ("mf-kernel-even", ["--set", "student.mf.kernel_size=2"], "student.mf.kernel_size must be odd", None),
    ("weights-missing", ["--set", "teacher.weights=/nonexistent/teacher.pt"], "teacher.weights: file not found", None),
    ("all-terms-off", ["--set", "teacher.losses.ce=false", "--set", "teacher.losses.aux=false",
                       "--set", "teacher.losses.tl=false"], "teacher stage: every loss term is switched off", None),
    ("non-utf8-config", [], "is not UTF-8 text (byte 0xe9", _latin1_config),
    # checkpoints that cannot be used: refused before the run folder is touched
    ("resume-truncated", ["--resume"], "is truncated or not a PyTorch file", _truncate("student_last.pt")),
    ("resume-empty", ["--resume"], "is empty (0 bytes)", _truncate("teacher_last.pt", 0)),
    ("resume-other-model", ["--resume"], "does not fit the student network", _swap("teacher_last.pt", "student_last.pt")),
    ("eval-truncated", ["--stage", "eval"], "is truncated or not a PyTorch file", _truncate("baseline_final.pt", 0.3)),
    ("eval-other-model", ["--stage", "eval"], "does not fit the student network", _swap("teacher_final.pt", "student_final.pt")),
    ("eval-other-classes", ["--stage", "eval", "--set", "data.num_classes=5"], "does not fit the teacher network", None),
    ("student-without-teacher", ["--stage", "student"], "the student stage needs a teacher",
     lambda run, tmp: (run / "checkpoints" / "teacher_final.pt").unlink()),
    # the run folder
    ("eval-without-checkpoints", ["--stage", "eval"], "nothing to evaluate", _elsewhere(_empty_folder)),
    ("run-dir-is-a-file", [], "is a file, not a folder", _elsewhere(_file)),
    ("run-dir-under-a-file", [], "is a file, not a folder", _elsewhere(lambda tmp: _file(tmp) / "sub")),
    ("run-dir-read-only", [], "is not writable", _elsewhere(_read_only)),
]
if not HAS_CUDA:
    CASES.append(("cuda-without-gpu", ["--set", "device=cuda"], "device=cuda but no CUDA GPU is available", None))


def _prepare(case, finished, tmp):
    """A copy of the finished run for the case, set up; -> (run folder, argv)."""
    cid, args, words, setup = case
    run = tmp / cid / "run"
    shutil.copytree(finished, run)
    extra = (setup(run, tmp / cid) if setup else None) or []
    return run, [*SMOKE, "--set", f"run_dir={run}", *args, *extra]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_touches_nothing(case, finished, tmp_path, capsys):
    """In-process (trainer.cli.main, what train.py calls): exit code 2, one line, and every file of
    the finished run as it was. The process-level contract is checked on a sample below."""
    from trainer.cli import main
    run, argv = _prepare(case, finished, tmp_path)
    before = _snapshot(run)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    _assert_user_error(subprocess.CompletedProcess(argv, rc, out, err), case[2])
    assert out == "", out[-2000:]  # refused before any stage started
    after = _snapshot(run)
    assert after == before, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


# ------------------------------------------------------------------ as a process (two at a time)
#
# id -> setup(finished run, tmp) -> (argv, words, folder that must stay as it was or None)

def _case_as_process(cid):
    case = next(c for c in CASES if c[0] == cid)

    def setup(finished, tmp):
        run, argv = _prepare(case, finished, tmp.parent)
        return argv, case[2], run
    return setup


def _predict_last(finished, tmp):
    (tmp / "frames").mkdir(parents=True)
    argv = ["--stage", "predict", "--checkpoint", finished / "checkpoints" / "student_last.pt",
            "--input", tmp / "frames", "--output", tmp / "out", "--device", "cpu"]
    return argv, "is a resume checkpoint of train.py", tmp


PROCESS_CASES = {
    **{cid: _case_as_process(cid) for cid in ("backend-bogus", "non-utf8-config", "resume-truncated", "eval-other-model",
                                              "eval-without-checkpoints", "run-dir-under-a-file")},
    **({} if HAS_CUDA else {"cuda-without-gpu": _case_as_process("cuda-without-gpu")}),
    "predict-resume-checkpoint": _predict_last,
}


@pytest.fixture(scope="module")
def processes(finished, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("processes")
    prepared = {}
    for cid, setup in PROCESS_CASES.items():
        try:
            argv, words, folder = setup(finished, tmp / cid)
        except pytest.skip.Exception as exc:
            prepared[cid] = exc
            continue
        prepared[cid] = (argv, words, folder, folder and _snapshot(folder))

    def one(item):
        cid, p = item
        return cid, (p if isinstance(p, BaseException) else (_train(*p[0]), *p[1:]))
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, prepared.items()))


@pytest.mark.parametrize("cid", list(PROCESS_CASES))
def test_user_error_as_a_process(processes, cid):
    """train.py itself: exit code 2, exactly one line on stderr (no warning, no traceback)."""
    res = processes[cid]
    if isinstance(res, BaseException):
        pytest.skip(str(res))
    r, words, folder, before = res
    _assert_user_error(r, words)
    assert r.stdout == ""
    if folder is not None:
        after = _snapshot(folder)
        assert after == before, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if cid == "predict-resume-checkpoint":
        assert "student_final.pt" in r.stderr


# ------------------------------------------------------------------ late errors and kills

def test_late_training_error_keeps_the_finished_run(finished, tmp_path):
    """A fresh run over a finished one that fails mid-training (diverges): the finished
    checkpoints and log are those of the finished run, byte for byte."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    r = _train(*SMOKE, "--set", f"run_dir={run}", "--set", "teacher.lr=1e30", "--set", "teacher.iters=4")
    _assert_user_error(r, "non-finite loss")
    after = _snapshot(run)
    for name in ("log.jsonl", "metrics.json", *(f"checkpoints/{s}_final.pt" for s in ("teacher", "baseline", "student"))):
        assert after[name] == before[name], name


def test_killed_fresh_run_keeps_finals_and_resume_replaces_them(finished, tmp_path):
    """A fresh run (teacher + baseline) stopped mid-teacher, as by a kill, leaves the finished
    run's finals in place; --resume continues that run: the teacher from its checkpoint, then the
    baseline retrained (not the old one kept); each final and its log records are replaced only
    when the new final exists. Temp files of killed saves are removed at start."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ck = run / "checkpoints"
    before = _snapshot(run)
    stale = [ck / f".teacher_last.pt.tmp{2 ** 22 + 7}", run / f".log.jsonl.tmp{2 ** 22 + 9}"]  # no such pids
    for p in stale:
        p.write_bytes(b"")  # a save killed mid-write
    live = ck / f".student_last.pt.tmp{os.getpid()}"
    live.write_bytes(b"partial")  # a live process's: left alone
    argv = [*SMOKE, "--set", f"run_dir={run}", "--set", "stages=[teacher,baseline]", "--set", "teacher.iters=4",
            "--set", "student.iters=2"]
    r = _train(*argv, "--set", "train.max_iters_this_run=2")
    assert r.returncode == 0 and "stopped at iteration 2/4" in r.stdout, r.stderr[-3000:]
    assert not any(p.exists() for p in stale) and live.exists()
    after = _snapshot(run)
    for s in ("teacher", "baseline", "student"):
        assert after[f"checkpoints/{s}_final.pt"] == before[f"checkpoints/{s}_final.pt"], s
    old_log = (finished / "log.jsonl").read_text()
    assert (run / "log.jsonl").read_text().startswith(old_log)  # the new run's records are appended
    r = _train(*argv, "--resume")
    assert r.returncode == 0 and "resuming at iteration 2/4" in r.stdout, r.stderr[-3000:]
    assert "[baseline] done" in r.stdout and "already finished" not in r.stdout
    teacher, baseline = (torch.load(ck / f"{s}_final.pt", map_location="cpu", weights_only=False)
                         for s in ("teacher", "baseline"))
    assert teacher["iteration"] == 4 and baseline["run"] == teacher["run"]
    assert (ck / "student_final.pt").read_bytes() == (finished / "checkpoints" / "student_final.pt").read_bytes()
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["iter"]) for x in recs if x["stage"] != "student"] == [
        ("teacher", 2), ("teacher", 4), ("baseline", 2)]
    assert {x["run"] for x in recs if x["stage"] != "student"} == {teacher["run"]}
    old = [json.loads(line) for line in old_log.splitlines()]
    assert [x for x in recs if x["stage"] == "student"] == [x for x in old if x["stage"] == "student"]
    live.unlink()


# ------------------------------------------------------------------ message hygiene, coverage

def test_error_line_has_no_escapes_or_newlines(capsys):
    from trainer.cli import error
    assert error("bad \x1b[1mthing\x1b[0m\n\tsecond line\r") == 2
    assert capsys.readouterr().err == "train.py: error: bad thing second line\n"


def test_every_option_has_a_check():
    from trainer.config import DEFAULTS, SCHEMA, _leaves
    assert sorted(_leaves(DEFAULTS)) == sorted(SCHEMA)
