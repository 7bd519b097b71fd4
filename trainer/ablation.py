"""Ablation of the loss terms (the structure of Table 1 of Liu et al., ECCV 2020).

``python train.py --ablation`` trains one teacher (CE + aux + lambda TL), then one student per
scheme and seed, each in its own run folder under ``run_dir``, all with the same data, network,
budget and teacher; only the switched-on terms of eq. 3 differ:

    a baseline (CE + aux)       e TL
    b SF (pixel KD + pair-wise) f PF + MF
    c PF                        g SF + PF + MF
    d MF                        h SF + PF + MF + TL (all)

with the terms as the paper writes them (``loss.semantics=paper``: TL is eq. 1 on probabilities).
Two more arms run a scheme's terms with the released code's semantics
(``loss.semantics=released``, see trainer/losses.py), written as capitals on the command line:

    E  (e') TL, released        H  (h') all, released

e.g. ``--schemes aeEH --seeded aeEH``; their run folders are ``e_released_seed<n>`` and
``h_released_seed<n>``. The teacher is shared by every arm (trained with the config's semantics).

Schemes a and h (``--seeded``) run with ``--seeds`` seeds (seed, seed+1, ...), the others with
the config's seed; the seed changes the student's initialisation and batch order, not the data
(``data.seed`` stays fixed). Students run as ``train.py`` subprocesses, ``--jobs`` at a time
(one thread each on CPU). Written to ``run_dir``: ``table.md`` (mean ± std where seeded, and the
paired differences to (a), see :func:`paired`), ``results.json``, ``miou_vs_tc.png``; ``--resume``
keeps finished runs.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import check_environment, check_run_dir, load_config
from .errors import ConfigError, error
from .plots import pyplot, save
from .utils import read_jsonl

SCHEMES = {
    "a": ("baseline", ()),
    "b": ("SF", ("kd", "pa")),
    "c": ("PF", ("pf",)),
    "d": ("MF", ("mf",)),
    "e": ("TL", ("tl",)),
    "f": ("PF+MF", ("pf", "mf")),
    "g": ("SF+PF+MF", ("kd", "pa", "pf", "mf")),
    "h": ("SF+PF+MF+TL (all)", ("kd", "pa", "pf", "mf", "tl")),
}
SWITCHED = ("kd", "pa", "tl", "pf", "mf")  # ce and aux stay on in every scheme
RELEASED = {"E": "e", "H": "h"}  # arm -> the scheme whose terms it runs with loss.semantics=released
ARMS = (*SCHEMES, *RELEASED)
SEEDED = ("a", "h")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "ablation.yaml"


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _fmt(m, s):
    if m is None:
        return "-"
    return f"{m:.1f}" if s is None else f"{m:.1f} ± {s:.1f}"


def arm_terms(arm: str) -> tuple:
    return SCHEMES[RELEASED.get(arm, arm)][1]


def arm_label(arm: str) -> str:
    """(e') for E: the letter and the name of an arm in tables and plots."""
    if arm in RELEASED:
        return f"({RELEASED[arm]}') {SCHEMES[RELEASED[arm]][0]}, released"
    return f"({arm}) {SCHEMES[arm][0]}"


def run_name(arm: str, seed: int) -> str:
    """The run folder of an arm and seed (no two differ only in case)."""
    return f"{RELEASED[arm]}_released_seed{seed}" if arm in RELEASED else f"{arm}_seed{seed}"


def plan(schemes: str, seed: int, seeds: int, seeded: str = "".join(SEEDED)):
    """[(scheme, seed), ...] in running order (every scheme's first seed before extra seeds);
    the schemes in ``seeded`` get ``seeds`` seeds, the others one."""
    for name, val in (("--schemes", schemes), ("--seeded", seeded)):
        if set(val) - set(ARMS) or (name == "--schemes" and not val):
            raise ConfigError(f"{name} must be letters of {''.join(ARMS)}, got {val!r}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    order = [s for s in ARMS if s in schemes]
    tasks = [(s, seed) for s in order]
    tasks += [(s, seed + k) for k in range(1, seeds) for s in order if s in seeded]
    return tasks


def student_overrides(arm: str) -> list:
    """--set values of an arm's student: its terms on, the others off, and its semantics."""
    on = arm_terms(arm)
    return ([f"student.losses.{t}={'true' if t in on else 'false'}" for t in SWITCHED]
            + [f"loss.semantics={'released' if arm in RELEASED else 'paper'}"])


# Two-sided 95 % quantiles of Student's t by degrees of freedom (beyond 30: the value at 30, a
# slightly wider interval).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired(results: dict, arm: str, key: str, base: str = "a"):
    """The paired difference arm - base of a metric over the seeds both ran: {n, mean, ci95 (the
    half-width of the t interval), p (two-sided, exact sign-flip test: every +-1 pattern of the
    differences, up to 16 seeds)}, or None below 2 seeds."""
    ref = {r["seed"]: r[key] for r in results.get(base, []) if r.get(key) is not None}
    d = [r[key] - ref[r["seed"]] for r in results.get(arm, []) if r.get(key) is not None and r["seed"] in ref]
    n = len(d)
    if n < 2:
        return None
    mean = statistics.fmean(d)
    ci = _T975[min(n - 1, len(_T975)) - 1] * statistics.stdev(d) / math.sqrt(n)
    p = None
    if n <= 16:
        flips = [abs(sum(x * s for x, s in zip(d, signs))) / n for signs in itertools.product((1, -1), repeat=n)]
        p = sum(f >= abs(mean) - 1e-12 for f in flips) / len(flips)
    return {"n": n, "mean": mean, "ci95": ci, "p": p}


def paired_table(results: dict, base: str = "a") -> str:
    """Markdown: per arm, the paired differences to ``base`` in TC and mIoU (see :func:`paired`)."""
    lines = [f"| arm - ({base}) | seeds | ΔTC [95 % CI] | p (TC) | ΔmIoU [95 % CI] | p (mIoU) |",
             "|---|---|---|---|---|---|"]
    for s in ARMS:
        stats = [paired(results, s, k, base) for k in ("tc", "miou")]
        if s == base or stats[0] is None:
            continue
        cells = [f"{x['mean']:+.2f} ± {x['ci95']:.2f} | {'-' if x['p'] is None else format(x['p'], '.3f')}"
                 for x in stats]
        lines.append(f"| {arm_label(s)} | {stats[0]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: dict, teacher: dict | None, cfg: dict) -> str:
    """Markdown table: one row per arm, mean ± std over its seeds."""
    lines = ["| scheme | terms (+ CE, aux) | seeds | mIoU | pixel acc. | TC |",
             "|---|---|---|---|---|---|"]
    if teacher:
        lines.append(f"| teacher ({cfg['teacher']['model']} {cfg['teacher']['model_options']}) | CE + TL | 1 | "
                     f"{teacher['miou']:.1f} | {teacher['pixel_acc']:.1f} | {teacher['tc']:.1f} |")
    for s in ARMS:
        runs = [r for r in results.get(s, []) if r.get("miou") is not None]
        if not runs:
            continue
        cols = [_fmt(*_mean_std([r[k] for r in runs])) for k in ("miou", "pixel_acc", "tc")]
        lines.append(f"| {arm_label(s)} | {' + '.join(t.upper() for t in arm_terms(s)) or '-'} | {len(runs)} | "
                     + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(results: dict, teacher: dict | None, path: Path) -> None:
    """mIoU vs TC: one colour per scheme, mean ± std bars, the single seeds as small dots."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    colours = plt.get_cmap("tab10")
    for i, s in enumerate(ARMS):
        runs = [r for r in results.get(s, []) if r.get("miou") is not None]
        if not runs:
            continue
        (mi, si), (mt, st) = _mean_std([r["miou"] for r in runs]), _mean_std([r["tc"] for r in runs])
        c = colours(i)
        ax.errorbar(mt, mi, xerr=st or 0, yerr=si or 0, fmt="o", ms=7, capsize=3, color=c, alpha=0.9,
                    label=arm_label(s) + (f", {len(runs)} seeds" if len(runs) > 1 else ""))
        ax.annotate(s, (mt, mi), textcoords="offset points", xytext=(4, 4), fontsize=10, color=c, weight="bold")
        if len(runs) > 1:
            ax.scatter([r["tc"] for r in runs], [r["miou"] for r in runs], s=10, color=c, alpha=0.45)
    if teacher:
        ax.plot(teacher["tc"], teacher["miou"], "k*", ms=11, label="teacher")
    ax.set_xlabel("temporal consistency TC (%)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Loss-term ablation (Table 1 schemes): mean ± std, dots = seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path, dpi=120)


def _run(cmd, log: Path, threads: int) -> tuple[int, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)).returncode
    return rc, time.time() - t0


def main(args) -> int:
    config = Path(args.config) if args.config else DEFAULT_CONFIG
    sets = list(args.sets)
    if args.stage:
        return error("--ablation runs its own stages; drop --stage")
    if args.run_dir:
        sets.append(f"run_dir={args.run_dir}")
    cfg = load_config(config, sets, args.preset)  # a ConfigError is reported by trainer.cli.main
    tasks = plan(args.schemes, int(cfg["seed"]), args.seeds, args.seeded)
    check_environment(cfg, run_dir=False)
    check_run_dir(cfg["run_dir"])
    if not cfg["teacher"]["train"] and cfg["teacher"]["weights"] is None:
        raise ConfigError("teacher.train=false needs teacher.weights")
    run_dir = Path(cfg["run_dir"]).resolve()
    if run_dir.exists() and not args.resume and any(run_dir.iterdir()) and not cfg["overwrite"]:
        return error(f"{run_dir} is not empty: pass --resume to keep its finished runs, or --set overwrite=true")
    run_dir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    on_cpu = cfg["device"] == "cpu" or (cfg["device"] == "auto" and not _cuda())
    jobs = args.jobs or (max(1, min(cores, len(tasks))) if on_cpu else 1)
    threads = max(1, cores // jobs) if on_cpu else max(1, cores)
    base = [sys.executable, str(ROOT / "train.py"), "-c", str(config)]
    if args.preset:
        base += ["--preset", args.preset]
    common = [a for s in sets + ["overwrite=true", "plots=false", "train.progress=false",
                                 f"data.seed={cfg['data']['seed'] if cfg['data']['seed'] is not None else cfg['seed']}"]
              for a in ("--set", s)]
    out = print
    t_all = time.time()

    # -- teacher (once) ------------------------------------------------------
    tdir = run_dir / "teacher"
    tfinal = tdir / "checkpoints" / "teacher_final.pt"
    if cfg["teacher"]["train"]:
        if not (args.resume and tfinal.is_file() and (tdir / "metrics.json").is_file()):
            tdir.mkdir(parents=True, exist_ok=True)
            out(f"[ablation] teacher -> {tdir}")
            rc, dt = _run(base + common + ["--set", "stages=[teacher,eval]", "--run-dir", str(tdir)],
                          tdir / "stdout.log", threads)  # 2 OpenMP threads beside a busy job: ~18x slower here
            if rc != 0:
                return error(f"teacher training failed (exit {rc}); see {tdir / 'stdout.log'}")
            out(f"[ablation] teacher done in {dt:.0f} s")
        teacher_weights = tfinal
    else:
        if cfg["teacher"]["weights"] is None:
            return error("teacher.train=false needs teacher.weights")
        teacher_weights = Path(cfg["teacher"]["weights"]).resolve()
    teacher_metrics = None
    if (tdir / "metrics.json").is_file():
        teacher_metrics = json.loads((tdir / "metrics.json").read_text()).get("teacher")

    # -- students ------------------------------------------------------------
    def one(task):
        scheme, seed = task
        d = run_dir / run_name(scheme, seed)
        if args.resume and (d / "metrics.json").is_file():
            return task, 0, None
        d.mkdir(parents=True, exist_ok=True)
        cmd = base + common + ["--set", "stages=[student,eval]", "--set", f"seed={seed}",
                               "--set", "teacher.train=false", "--set", f"teacher.weights={teacher_weights}",
                               "--run-dir", str(d)]
        for o in student_overrides(scheme):
            cmd += ["--set", o]
        rc, dt = _run(cmd, d / "stdout.log", threads)
        out(f"[ablation] {arm_label(scheme)} seed {seed}: "
            + ("done" if rc == 0 else f"FAILED (exit {rc}, see {d / 'stdout.log'})") + f" in {dt:.0f} s")
        return task, rc, dt

    out(f"[ablation] {len(tasks)} student runs, {jobs} at a time ({threads} thread(s) each)")
    failed = []
    times = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for (scheme, seed), rc, dt in pool.map(one, tasks):
            if rc != 0:
                failed.append(run_name(scheme, seed))
            if dt is not None:
                times[run_name(scheme, seed)] = round(dt, 1)

    results: dict = {}
    for scheme, seed in tasks:
        m = run_dir / run_name(scheme, seed) / "metrics.json"
        if m.is_file():
            st = json.loads(m.read_text()).get("student")
            if st:
                results.setdefault(scheme, []).append({"seed": seed, **st, "train_s": _train_seconds(m.parent)})
    md = ["# Ablation of the loss terms (Table 1 structure)", "",
          f"Command: `python train.py --ablation -c {os.path.relpath(config, ROOT)}"
          + "".join(f" --set {s}" for s in args.sets) + f" --seeds {args.seeds} --seeded {args.seeded} --schemes {args.schemes}`"
          + (" (continued with --resume: the runs of an earlier call were kept)" if args.resume else ""), "",
          f"Machine: {platform.machine()} {platform.system()}, {cores} cores, device {cfg['device']}; "
          f"{jobs} run(s) at a time; total wall time {time.time() - t_all:.0f} s "
          "(finished runs kept by --resume are not re-timed).", "",
          f"Data: {cfg['data']['name']} (train {cfg['data']['train_options']}, val {cfg['data']['val_options']}), "
          f"flow {cfg['data']['flow']}. Student: {cfg['student']['model']} {cfg['student']['model_options']}, "
          f"{cfg['student']['iters']} iterations, batch {cfg['train']['batch_size']}, lambda "
          f"{cfg['loss']['lambda']}. mean ± std over seeds (sample std).", "",
          table(results, teacher_metrics, cfg), "",
          "Paired differences to the baseline of the same seed: mean ± the half-width of the 95 % t "
          "interval; p: two-sided exact sign-flip test.", "",
          paired_table(results), "",
          "Per run (training time of the student stage, from its log.jsonl; runs shared the cores):", "",
          "| run | mIoU | pixel acc. | TC | training s |", "|---|---|---|---|---|"]
    for scheme in ARMS:
        for r in results.get(scheme, []):
            k = run_name(scheme, r["seed"])
            ts = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
            md.append(f"| {k} | {r['miou']:.1f} | {r['pixel_acc']:.1f} | {r['tc']:.1f} | {ts} |")
    if failed:
        md += ["", f"FAILED runs: {', '.join(failed)}"]
    (run_dir / "table.md").write_text("\n".join(md) + "\n")
    (run_dir / "results.json").write_text(json.dumps(
        {"teacher": teacher_metrics,
         "schemes": {s: {"name": SCHEMES[RELEASED.get(s, s)][0], "terms": list(arm_terms(s)),
                         "semantics": "released" if s in RELEASED else "paper", "runs": results.get(s, []),
                         "paired_to_a": {k: paired(results, s, k) for k in ("tc", "miou")}} for s in ARMS},
         "times_s": times, "failed": failed}, indent=2))
    if results and cfg["plots"]:
        plot(results, teacher_metrics, run_dir / "miou_vs_tc.png")
    out(table(results, teacher_metrics, cfg))
    out(f"[ablation] wrote {run_dir / 'table.md'}, results.json, miou_vs_tc.png")
    return 1 if failed else 0


def _train_seconds(run: Path):
    """Training time of the student stage: the last record of the run's log.jsonl."""
    recs = [r for r in read_jsonl(run / "log.jsonl") if r.get("stage") == "student"]
    return recs[-1].get("time") if recs else None


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
