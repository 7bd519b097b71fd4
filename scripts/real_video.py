#!/usr/bin/env python
"""Real-video experiment (issue 7): a compact student trained with and without the temporal
loss (TL) on one real CamVid sequence, scored on held-out frames of that sequence and on the
real Sintel frames.

    OMP_NUM_THREADS=1 python scripts/real_video.py              # train (baseline + TL student), evaluate
    OMP_NUM_THREADS=1 python scripts/real_video.py --eval-only  # only re-evaluate the run's checkpoints
    python scripts/real_video.py --variant lam1:loss.lambda=1   # also train + score another TL student
    python scripts/real_video.py --only-variants --variant lam1:loss.lambda=1   # ... only what is not trained yet

Training is ``train.py -c configs/camvid_0016E5_cpu.yaml`` (a subprocess: stages baseline ->
student -> eval in ``--run-dir``); a ``--variant LABEL:key=value[;key=value]`` trains one more
student (stage ``student`` only) in ``<run-dir>_<LABEL>`` with those overrides. Evaluation
loads ``checkpoints/{baseline,student}_final.pt`` (the config is read from the checkpoint) and
measures

* mIoU, pixel accuracy and TC on the held-out CamVid frames (``trainer.engine.evaluate`` on the
  config's validation set: one clip of consecutive frames, DIS flow t -> t+1);
* TC on the Sintel frames (``../shared/data/sintel_frames``, 10 frames 1024x436, no labels):
  frames resized to the training height (``data.size[0]``, aspect kept), OpenCV DIS flow between
  consecutive resized frames, ``tcloss.metrics.TemporalConsistency`` over the 9 pairs.

Writes ``table.md`` and ``results.json`` to ``--out`` (default
``benchmarks/results/real_video``) and the training output to ``<out>/train*.log``. Relative
paths (config, run folders, ``--out``, ``--sintel``, the config's ``data.root``) are taken from
the repository root, whatever the current directory. ``OMP_NUM_THREADS`` defaults to 1 for the
training subprocesses.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = "configs/camvid_0016E5_cpu.yaml"
DEFAULT_RUN_DIR = "runs/camvid_0016E5_cpu"
DEFAULT_OUT = "benchmarks/results/real_video"
DEFAULT_SINTEL = "../shared/data/sintel_frames"
MACHINE = "2-core x86-64 CPU, no GPU"


# ------------------------------------------------------------------ training


def _train_cmd(config, run_dir, sets):
    cmd = ["python", "train.py", "-c", str(config), "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _run_logged(cmd, log_path):
    """Run cmd (argv; 'python' = this interpreter) in the repository root, tee its output to log_path."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    argv = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        rc = proc.wait()
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"real_video.py: training failed (exit code {rc}): {shlex.join(cmd)}; see {log_path}")
    return wall


def parse_variant(text):
    """'LABEL:key=value;key=value' -> (label, [key=value, ...])."""
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"--variant expects LABEL:key=value[;key=value], got {text!r}")
    label, sets = text.split(":", 1)
    label = label.strip()
    if not label or not label.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"--variant label must be alphanumeric (and _ -), got {label!r}")
    sets = [s.strip() for s in sets.split(";") if s.strip()]
    if not sets or not all("=" in s for s in sets):
        raise argparse.ArgumentTypeError(f"--variant {label}: expected key=value overrides, got {text!r}")
    return label, sets


# ------------------------------------------------------------------ evaluation


def load_frames(folder, height=None):
    """Sorted *.png frames of a folder -> (T, 3, H, W) float 0..255, resized to ``height`` (aspect kept)."""
    import torch

    from videodata import read_image, resize_sample

    paths = sorted(Path(folder).glob("*.png"))
    if len(paths) < 2:
        raise FileNotFoundError(f"need at least 2 .png frames in {folder}, found {len(paths)}")
    frames = torch.stack([read_image(p) for p in paths])
    if height is not None:
        h, w = frames.shape[-2:]
        size = (int(height), max(1, round(w * height / h)))
        frames = resize_sample({"frames": frames}, size)["frames"]
    return frames, [p.name for p in paths]


def dis_flow(frames):
    """OpenCV DIS flow t -> t+1 between consecutive frames: (T-1, 2, H, W)."""
    import models

    est = models.build_flow_estimator("dis")
    return est(frames[:-1], frames[1:])


def video_tc(model, frames, flow, num_classes):
    """TC of a model's per-frame predictions over consecutive frames (no labels needed)."""
    import torch

    import tcloss
    from trainer.engine import predict

    model.eval()
    with torch.no_grad():
        pred = predict(model, frames, frames.shape[-2:])
    tc = tcloss.metrics.TemporalConsistency(num_classes)
    tc.update(pred[:-1], pred[1:], flow)
    res = tc.compute()
    counts = torch.bincount(pred.flatten(), minlength=num_classes).double()
    return {"tc": res["tc"], "agreement": res["agreement"], "num_pixels": res["num_pixels"],
            "class_fraction": (counts / counts.sum()).tolist()}


def log_summary(log_path, stage, w_tl, tail=0.2):
    """Loss terms of a stage from log.jsonl: means over the last ``tail`` of the logged records;
    ``w_tl`` is the TL weight in the total (lambda x student.loss_weights.tl)."""
    from trainer.utils import read_jsonl

    recs = [r for r in read_jsonl(log_path) if r.get("stage") == stage]
    if not recs:
        return None
    last = recs[-max(1, round(len(recs) * tail)):]
    out = {"iters": recs[-1]["iter"], "train_time_s": recs[-1].get("time")}
    for k in ("ce", "aux", "tl", "total"):
        vals = [r[k] for r in last if k in r]
        if vals:
            out[f"{k}_tail_mean"] = sum(vals) / len(vals)
    if "tl_tail_mean" in out and out.get("ce_tail_mean"):
        out["weighted_tl_over_ce"] = w_tl * out["tl_tail_mean"] / out["ce_tail_mean"]
    return out


def evaluate_runs(entries, sintel_dir):
    """entries: [(row name, run_dir, stage)] -> list of result rows."""
    import models
    from trainer.engine import build_data, evaluate
    from trainer.predict import load_trained
    from trainer.utils import Dist

    dist = Dist("cpu")
    rows, sintel_cache, val_cache = [], {}, {}
    for name, run_dir, stage in entries:
        ckpt = Path(run_dir) / "checkpoints" / f"{stage}_final.pt"
        if not ckpt.is_file():
            raise SystemExit(f"real_video.py: checkpoint not found: {ckpt} (train first, without --eval-only)")
        t0 = time.time()
        model, cfg, st = load_trained(ckpt)
        iters = st.get("iteration")
        key = json.dumps(cfg["data"], sort_keys=True)
        if key not in val_cache:
            val_cache[key] = build_data(cfg, "val")
        val = val_cache[key]
        cam = evaluate(cfg, model, dist, val)
        height = (cfg["data"]["size"] or [None])[0]
        if height not in sintel_cache:
            frames, names = load_frames(sintel_dir, height)
            sintel_cache[height] = (frames, dis_flow(frames), names)
        frames, flow, names = sintel_cache[height]
        sin = video_tc(model, frames, flow, cfg["data"]["num_classes"])
        lam = float(cfg["loss"]["lambda"])
        tl_on = bool(cfg["student"]["losses"]["tl"]) and stage == "student"
        w_tl = lam * float(cfg["student"]["loss_weights"]["tl"]) if tl_on else None
        rows.append({
            "model": name, "run_dir": str(run_dir), "checkpoint": str(ckpt), "stage": stage, "iterations": iters,
            "net": f"{cfg['student']['model']} {cfg['student']['model_options']}",
            "losses": f"CE + aux + {w_tl:g} TL" if tl_on else "CE + aux",
            "lambda": lam if tl_on else None, "tl_weight": w_tl,
            "params_m": models.count_parameters(model) / 1e6,
            "train_frame_range": cfg["data"]["train_options"].get("frame_range"),
            "camvid": {"miou": cam["miou"], "pixel_acc": cam["pixel_acc"], "tc": cam["tc"],
                       "agreement": cam["agreement"],
                       "frame_range": cfg["data"]["val_options"].get("frame_range"),
                       "num_frames": sum(len(range(*ix[1:])) for ix in val._index),
                       "size": cfg["data"]["size"], "fps_batch1_shared_cpu": cam.get("fps")},
            "sintel": {**sin, "size": list(frames.shape[-2:]), "frames": [names[0], names[-1]], "pairs": len(names) - 1},
            "train_log": log_summary(Path(run_dir) / "log.jsonl", stage, w_tl or 0.0),
            "eval_wall_s": time.time() - t0,
        })
        print(f"{name:<22} mIoU {cam['miou']:.1f}  pixAcc {cam['pixel_acc']:.1f}  TC camvid {cam['tc']:.2f}  "
              f"TC sintel {sin['tc']:.2f}", flush=True)
        del model
    return rows


# ------------------------------------------------------------------ report


def _f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def _intro(res):
    r0 = res["rows"][0]
    cam = r0["camvid"]
    tr, va = r0.get("train_frame_range"), cam.get("frame_range")
    h, w = cam["size"] if cam.get("size") else ("?", "?")
    n_val = cam.get("num_frames")
    train_part = f"frames [{tr[0]}, {tr[1]})" if tr else "all frames"
    val_part = f"the held-out frames [{va[0]}, {va[1]})" if va else "the validation frames"
    return (
        f"A compact student (`{r0['net']}`, trained from scratch: no pretrained weights offline) trained on "
        f"{train_part} of the 15 Hz CamVid sequence 0016E5 (`../shared/data/camvid_0016E5/val`), evaluated on "
        f"{val_part} ({n_val} frames, consecutive clips) at {w}x{h}: mIoU and pixel accuracy over the labelled "
        f"frames, TC over the consecutive pairs (OpenCV DIS flow t -> t+1); and for TC only on the "
        f"{r0['sintel']['pairs'] + 1} Sintel frames `{r0['sintel']['frames'][0]}`..`{r0['sintel']['frames'][1]}` "
        f"(no labels; resized to {r0['sintel']['size'][1]}x{r0['sintel']['size'][0]}, the training height; DIS flow). "
        "Baseline = CE + aux (stage `baseline`); student = the same network, data and iterations with "
        "+ weight x TL (eq. 1, DIS flow on the augmented training crops; stage `student`). Both stages start "
        "from the same initial weights, see the same crops and put whole triplets through the network "
        "(`student.forward_triplet: always`, so BatchNorm sees the same images): they differ only in the TL "
        "gradient, and the baseline is the TL-weight-0 control. TC = mIoU between "
        "the prediction of frame t and the nearest-warped prediction of t+1 "
        "(`tcloss.metrics.TemporalConsistency`, classes present), so it is only comparable between rows with "
        "the same flow. One seed per row.")


def render_table(res):
    agreement = ("The agreement columns are the fraction of compared pixels (same flow, same valid pixels as TC) "
                 "whose labels agree: TC averages the per-class IoU over the classes present, so a rare class "
                 "flickering in a few pixels moves TC much more than agreement.")
    header = ("| model | losses | net | params (M) | iters | mIoU (%) | pixel acc. (%) | TC CamVid held-out (%) "
              "| TC Sintel (%) | agreement CamVid (%) | agreement Sintel (%) |")
    lines = ["# Real video: CamVid 0016E5 (held-out frames) and MPI Sintel, CPU", "",
             "Written by `scripts/real_video.py` (do not edit by hand; analysis in `NOTES.md` beside it).", "",
             _intro(res), "", agreement, "", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        loss = r["losses"]
        lines.append(f"| {r['model']} | {loss} | {r['net']} | {r['params_m']:.3f} | {r['iterations']} | "
                     f"{r['camvid']['miou']:.1f} | {r['camvid']['pixel_acc']:.1f} | {r['camvid']['tc']:.2f} | "
                     f"{r['sintel']['tc']:.2f} | {_f(r['camvid'].get('agreement'), '.2f')} | "
                     f"{r['sintel']['agreement']:.2f} |")
    lines += ["", "Training losses (means over the last 20 % of the logged iterations):", "",
              "| model | CE | aux | TL (unweighted) | weighted TL / CE |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lg = r["train_log"] or {}
        lines.append(f"| {r['model']} | {_f(lg.get('ce_tail_mean'), '.3f')} | {_f(lg.get('aux_tail_mean'), '.3f')} | "
                     f"{_f(lg.get('tl_tail_mean'), '.4f')} | {_f(lg.get('weighted_tl_over_ce'), '.4f')} |")
    lines += ["", "## Commands", "", "Run from the repository root (Python of `.venv`):", "", "```bash"]
    lines += res["commands"]
    machine = (f"Machine: {res['machine']} ({res['platform']}; torch {res['torch']}, {res['threads']} thread(s); "
               "another training job shared the machine, so times are indicative).")
    lines += ["```", "", "## Machine and wall times", "", machine, ""]
    lines += ["| what | wall time (s) |", "|---|---|"]
    for k, v in res["wall_times_s"].items():
        lines.append(f"| {k} | {v:.0f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"train.py config (default {DEFAULT_CONFIG})")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"run folder (default {DEFAULT_RUN_DIR})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.py override for the main run (repeatable)")
    p.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="LABEL:K=V[;K=V]",
                   help="also train a TL student with these overrides in <run-dir>_<LABEL> (repeatable)")
    p.add_argument("--eval-only", action="store_true", help="do not train: re-evaluate the existing checkpoints")
    p.add_argument("--only-variants", action="store_true",
                   help="do not retrain the main run; train the --variant runs that have no "
                        "checkpoints/student_final.pt yet; then evaluate all")
    p.add_argument("--sintel", default=DEFAULT_SINTEL, help=f"folder of consecutive frames (default {DEFAULT_SINTEL})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = p.parse_args(argv)

    import torch

    cwd = Path.cwd()
    os.chdir(ROOT)  # config paths (data.root) are relative to the repository root
    try:
        return _main(args, torch)
    finally:
        os.chdir(cwd)


def _main(args, torch):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prev = {}
    if (out / "results.json").is_file():
        prev = json.loads((out / "results.json").read_text())
    walls = {}
    commands = []
    main_cmd = _train_cmd(args.config, args.run_dir, args.sets)
    variant_cmds = [(label, f"{args.run_dir}_{label}",
                     _train_cmd(args.config, f"{args.run_dir}_{label}", ["stages=[student,eval]", *sets]))
                    for label, sets in args.variant]
    commands.append("OMP_NUM_THREADS=1 " + shlex.join(main_cmd) + "   # baseline + student + eval")
    for label, _, cmd in variant_cmds:
        commands.append("OMP_NUM_THREADS=1 " + shlex.join(cmd) + f"   # variant {label}")
    # keep the training wall times of the runs that produced checkpoints not retrained now
    walls.update({k: v for k, v in prev.get("wall_times_s", {}).items() if k.startswith("train.py")})
    if not args.eval_only:
        if not args.only_variants:
            walls["train.py (baseline + student + eval)"] = _run_logged(main_cmd, out / "train.log")
        for label, run_dir, cmd in variant_cmds:
            if args.only_variants and (Path(run_dir) / "checkpoints" / "student_final.pt").is_file():
                print(f"variant {label}: {run_dir} already trained; not retraining (--only-variants)")
                continue
            walls[f"train.py variant {label} (student + eval)"] = _run_logged(cmd, out / f"train_{label}.log")
    wanted = {"train.py (baseline + student + eval)"} | {f"train.py variant {label} (student + eval)"
                                                          for label, _, _ in variant_cmds}
    walls = {k: v for k, v in walls.items() if k in wanted}
    script_args = []
    if args.config != DEFAULT_CONFIG:
        script_args += ["--config", args.config]
    if args.run_dir != DEFAULT_RUN_DIR:
        script_args += ["--run-dir", args.run_dir]
    for s in args.sets:
        script_args += ["--set", s]
    for label, sets in args.variant:
        script_args += ["--variant", label + ":" + ";".join(sets)]
    if args.out != DEFAULT_OUT:
        script_args += ["--out", args.out]
    script_cmd = "OMP_NUM_THREADS=1 " + shlex.join(["python", "scripts/real_video.py", *script_args])
    commands.insert(0, "# all of it (training, evaluation, this table):")
    commands.insert(1, script_cmd)
    commands.insert(2, "# or step by step:")
    commands.append(script_cmd + " --eval-only   # re-evaluate existing checkpoints, rewrite this table")

    entries = [("baseline", args.run_dir, "baseline"), ("student (TL)", args.run_dir, "student")]
    entries += [(f"student ({label})", run_dir, "student") for label, run_dir, _ in variant_cmds]
    t0 = time.time()
    rows = evaluate_runs(entries, args.sintel)
    walls["evaluation (this script, all rows)"] = time.time() - t0
    for r in rows:
        lg = r["train_log"] or {}
        if lg.get("train_time_s") is not None:
            walls[f"training stage of {r['model']} ({lg['iters']} iterations, from log.jsonl)"] = lg["train_time_s"]

    res = {"machine": MACHINE, "platform": f"{platform.machine()}, {platform.system()} {platform.release()}",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "commands": commands,
           "wall_times_s": walls, "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "table.md").write_text(render_table(res))
    print(f"wrote {out / 'table.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
