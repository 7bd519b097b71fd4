"""Command line of train.py."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .config import ConfigError, load_config, resolve_stages
from .engine import Stopped, Trainer, build_data, build_model, evaluate
from .utils import Dist, atomic_write_text


def error(message: str) -> int:
    """A user error: one line on stderr; returns exit code 2 (argparse's own convention)."""
    print(f"train.py: error: {message}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(error(message))


def parse_args(argv=None):
    p = _Parser(description="Teacher/student training with temporal losses (Liu et al., ECCV 2020).")
    p.add_argument("--config", "-c", help="YAML config (default: the synthetic CPU config)")
    p.add_argument("--preset", help="smoke: the same path in < 3 min")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set student.losses.mf=false (repeatable)")
    p.add_argument("--stage", help="all | teacher | baseline | student | eval (same as --set stages=...)")
    p.add_argument("--run-dir", help="output folder (same as --set run_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoints in the run folder")
    g = p.add_argument_group("per-frame inference (--stage predict)")
    g.add_argument("--checkpoint", action="append", default=[], metavar="PT",
                   help="a <stage>_final.pt of a run folder; give two (baseline, enhanced) for a side-by-side video")
    g.add_argument("--input", help="a folder of frames (sorted by name) or a video file")
    g.add_argument("--output", help="folder for the colour-coded frames (and side_by_side.mp4)")
    g.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    g.add_argument("--max-frames", type=int, default=None, help="only the first N frames of the input")
    g = p.add_argument_group("ablation (Table 1, schemes a-h)")
    g.add_argument("--ablation", action="store_true",
                   help="train one teacher, then a student per scheme and seed; write table.md and the plot")
    g.add_argument("--schemes", default="abcdefgh", help="which schemes, e.g. aeh (default: all)")
    g.add_argument("--seeds", type=int, default=3, help="seeds for the --seeded schemes (default 3)")
    g.add_argument("--seeded", default="ah", help="schemes run with --seeds seeds, the others with one (default ah)")
    g.add_argument("--jobs", type=int, default=None, help="student runs at once (default: one per CPU core on CPU, 1 on CUDA)")
    return p.parse_args(argv)


def fmt(v, spec=".1f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def results_table(metrics: dict) -> str:
    rows = [f"{'model':<10} {'net':<16} {'params(M)':>9} {'mIoU':>6} {'pixAcc':>6} {'TC':>6} {'fps':>7}"]
    for name in ("teacher", "baseline", "student"):
        m = metrics.get(name)
        if m:
            rows.append(f"{name:<10} {m.get('net', ''):<16} {fmt(m['params_m'], '.2f'):>9} {fmt(m['miou']):>6} "
                        f"{fmt(m['pixel_acc']):>6} {fmt(m['tc']):>6} {fmt(m.get('fps'), '.0f'):>7}")
    return "\n".join(rows)


def _stage_of(line):
    try:
        return json.loads(line).get("stage")
    except json.JSONDecodeError:  # a line cut by a kill
        return None


def run(cfg, resume=False, out=print) -> int:
    torch.manual_seed(cfg["seed"])
    dist = Dist(cfg["device"])
    if dist.device.type == "cpu":
        # determinism of resume on CPU does not depend on the thread count, but keep it sane
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, dist.world)))
    run_dir = Path(cfg["run_dir"])
    stages = resolve_stages(cfg)
    trained = [s for s in stages if s != "eval"]
    # A fresh run replaces only what it retrains: `--stage eval` or `--stage student` reuse the
    # earlier stages' checkpoints in the same folder.
    old = [] if resume else [p for s in trained for p in (run_dir / "checkpoints").glob(f"{s}_*.pt")]
    if old and not cfg["overwrite"]:
        dist.close()
        raise ConfigError(f"{run_dir} already holds {', '.join(sorted({p.name.split('_')[0] for p in old}))} "
                          f"checkpoints: pass --resume to continue, --set overwrite=true to start over, "
                          f"or choose another run_dir")
    dist.barrier()
    if dist.is_main and old:
        for p in old:
            p.unlink(missing_ok=True)
        log = run_dir / "log.jsonl"
        if log.is_file():
            keep = [ln for ln in log.read_text().splitlines() if _stage_of(ln) not in trained]
            atomic_write_text(log, "".join(ln + "\n" for ln in keep))
    dist.barrier()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg, indent=2))
    tr = Trainer(cfg, dist, run_dir, resume, out)
    t0 = time.time()
    try:
        for stage in stages:
            if stage == "teacher" and not cfg["teacher"]["train"]:
                continue
            if stage in ("teacher", "baseline", "student"):
                tr.train_stage(stage)
        if "eval" in stages:
            val = build_data(cfg, "val")
            mpath = run_dir / "metrics.json"
            metrics = {}
            for name in ("teacher", "baseline", "student"):
                model = tr.load_final(name)
                if model is None and name == "teacher" and cfg["teacher"]["weights"] is not None:
                    model = build_model(cfg, "teacher").to(dist.device)
                if model is None:
                    continue
                res = evaluate(cfg, model, dist, val)
                res["net"] = cfg["teacher" if name == "teacher" else "student"]["model"]
                metrics[name] = res
            if dist.is_main:
                atomic_write_text(mpath, json.dumps(metrics, indent=2))
                if cfg["plots"]:
                    from .plots import loss_curves, miou_vs_tc
                    loss_curves(run_dir / "log.jsonl", run_dir / "loss_curves.png")
                    miou_vs_tc(metrics, run_dir / "miou_vs_tc.png")
                out(results_table(metrics))
                out(f"run folder: {run_dir}  (metrics.json, log.jsonl, checkpoints/, *.png)  "
                    f"total {time.time() - t0:.0f} s")
        elif dist.is_main and cfg["plots"] and (run_dir / "log.jsonl").is_file():
            from .plots import loss_curves
            loss_curves(run_dir / "log.jsonl", run_dir / "loss_curves.png")
    except Stopped as s:
        out(str(s))
    finally:
        if tr.tb is not None:
            tr.tb.close()
        dist.close()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage == "predict":
        extra = [f for f, v in (("--config", args.config), ("--preset", args.preset), ("--set", args.sets),
                                ("--resume", args.resume), ("--ablation", args.ablation), ("--run-dir", args.run_dir))
                 if v]
        if extra:
            return error(f"--stage predict takes the model and its config from --checkpoint; "
                         f"{', '.join(extra)} do not apply")
        from .predict import main as predict_main
        return predict_main(args)
    if args.ablation:
        from .ablation import main as ablation_main
        return ablation_main(args)
    sets = list(args.sets)
    if args.stage:
        sets.append(f"stages={args.stage}")
    if args.run_dir:
        sets.append(f"run_dir={args.run_dir}")
    config = args.config
    if config is None:
        default = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"
        config = default if default.is_file() else None
    try:
        cfg = load_config(config, sets, args.preset)
        return run(cfg, resume=args.resume)
    except ConfigError as exc:
        return error(str(exc))
