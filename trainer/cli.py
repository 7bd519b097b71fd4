"""Command line of train.py."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .config import check_environment, load_config, resolve_stages, trained_stages
from .engine import Stopped, Trainer, evaluate
from .errors import ConfigError, error
from .utils import Dist, atomic_write_text, remove_stale_temp_files


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
    g = p.add_argument_group("ablation (Table 1, schemes a-h; E, H: e and h with the released code's loss semantics)")
    g.add_argument("--ablation", action="store_true",
                   help="train one teacher, then a student per scheme and seed; write table.md and the plot")
    g.add_argument("--schemes", default="abcdefgh",
                   help="which schemes, e.g. aeh (default: a-h; E, H: e, h with loss.semantics=released)")
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


def run(cfg, resume=False, out=print) -> int:
    """The stages of ``cfg`` in its run folder. Every check that can fail on user input runs
    before the folder is touched (config.validate at load, check_environment, the existing-run
    rule, Trainer.preflight); finished checkpoints are replaced, never deleted first (see Trainer)."""
    check_environment(cfg)
    torch.manual_seed(cfg["seed"])
    dist = Dist(cfg["device"])
    tr = None
    try:
        if dist.device.type == "cpu":
            # determinism of resume on CPU does not depend on the thread count, but keep it sane
            torch.set_num_threads(max(1, torch.get_num_threads() // max(1, dist.world)))
        run_dir = Path(cfg["run_dir"])
        stages = resolve_stages(cfg)
        trained = trained_stages(cfg)
        # A fresh run replaces only what it retrains: `--stage eval` or `--stage student` reuse the
        # earlier stages' checkpoints in the same folder.
        old = [] if resume else [p for s in trained for p in (run_dir / "checkpoints").glob(f"{s}_*.pt")]
        if old and not cfg["overwrite"]:
            raise ConfigError(f"{run_dir} already holds {', '.join(sorted({p.name.split('_')[0] for p in old}))} "
                              f"checkpoints: pass --resume to continue, --set overwrite=true to start over, "
                              f"or choose another run_dir")
        tr = Trainer(cfg, dist, run_dir, resume, out)
        tr.preflight(stages)
        # -- from here on the run folder is written ------------------------------
        dist.barrier()
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            for folder in (run_dir, run_dir / "checkpoints"):
                remove_stale_temp_files(folder)  # left by a killed save
            atomic_write_text(run_dir / "config.json", json.dumps(cfg, indent=2))
        dist.barrier()
        tr.start()
        t0 = time.time()
        for stage in trained:
            tr.train_stage(stage)
        if "eval" in stages:
            mpath = run_dir / "metrics.json"
            metrics = {}
            for name in ("teacher", "baseline", "student"):
                model = tr.load_final(name)
                if model is None:
                    continue
                res = evaluate(cfg, model, dist, tr.val_ds)
                res["net"] = cfg["teacher" if name == "teacher" else "student"]["model"]
                metrics[name] = res
            if not metrics:
                raise ConfigError(f"nothing to evaluate in {run_dir}: no checkpoints/<stage>_final.pt")
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
        if tr is not None and tr.tb is not None:
            tr.tb.close()
        dist.close()
    return 0


def main(argv=None) -> int:
    """Entry point of train.py: 0; or 2 with one line on stderr for a user error (every
    ConfigError raised in trainer/, and what the file system refuses: a read-only or full disk)."""
    try:
        return _main(argv)
    except ConfigError as exc:
        return error(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return error(f"{where}{exc.strerror or exc}")


def _main(argv=None) -> int:
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
    return run(load_config(config, sets, args.preset), resume=args.resume)
