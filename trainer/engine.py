"""Stages of the method: teacher (CE + lambda TL), student (eq. 3), baseline (CE only), eval."""
from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data._utils.collate import default_collate

import models
import tcloss
import videodata

from .config import trained_stages
from .errors import ConfigError, one_line
from .losses import compute_losses, loss_options, needs_triplet, stage_weights
from .utils import JsonlLog, atomic_save, atomic_write_text, read_checkpoint, rng_states, seed_for, set_rng_states

STAGE_ID = {"teacher": 1, "baseline": 2, "student": 3}


class Stopped(Exception):
    """max_iters_this_run reached; the checkpoint is written."""


# ------------------------------------------------------------------ data

def _flow_estimator(cfg):
    name = cfg["data"]["flow"]
    if name == "gt":
        return None
    opts = {"weights": cfg["data"]["flow_weights"]} if name.startswith("raft") else {}
    return models.build_flow_estimator(name, **opts)


def build_data(cfg, split: str):
    d = cfg["data"]
    train = split == "train"
    opts = dict(mode="triplet" if train else "clip")
    if d["name"] == "synthetic":
        # validation clips come from other seeds than the training clips
        base = cfg["seed"] if d["seed"] is None else d["seed"]
        opts.update(seed=base + (0 if train else 10_000), num_classes=d["num_classes"])
    else:
        opts.update(root=d["root"], split=d["train_split"] if train else d["val_split"])
    if d["size"] is not None:
        opts["size"] = d["size"]
    try:
        if d["name"] != "synthetic":
            opts["flow_estimator"] = _flow_estimator(cfg)
        if train:
            opts["max_distance"] = d["max_distance"]
            if d["augment"]:
                crop = d["crop_size"] or d["size"] or d["train_options"].get("size")
                if crop is None and tuple(d["scale"]) != (1.0, 1.0):
                    raise ConfigError("data.crop_size is required with random scaling (batches need one size)")
                opts["augment"] = videodata.TripletAugment(scale=d["scale"], crop_size=crop, hflip=d["hflip"])
            opts.update(d["train_options"])
        else:
            opts["clip_length"] = d["clip_length"]
            opts["sample_seed"] = cfg["seed"]
            opts.update(d["val_options"])
        ds = videodata.build_dataset(d["name"], **opts)
    except (FileNotFoundError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build the {split} data set: {one_line(exc)}") from None
    if getattr(ds, "num_classes", d["num_classes"]) != d["num_classes"]:
        raise ConfigError(f"data.num_classes={d['num_classes']} but the {d['name']} data set has {ds.num_classes}")
    if len(ds) == 0:
        raise ConfigError(f"the {split} data set is empty ({d['name']}, split "
                          f"{d['train_split'] if train else d['val_split']})")
    return ds


class _SeededItems(Dataset):
    """Items addressed by (index, seed): the augmentation of an item depends only on the seed
    (videodata draws it from torch's global RNG), whichever process or worker loads it."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        idx, seed = key
        torch.manual_seed(seed)
        return self.ds[idx]


class IterationBatches:
    """Batches for iterations [start, stop): the data order is a function of (seed, epoch) through
    DistributedSampler (also for one process), so resuming at iteration i gives the same batches."""

    def __init__(self, n_items, batch, world, rank, seed, stage_id, start, stop):
        self.sampler = DistributedSampler(range(n_items), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=n_items >= world)
        per_rank = len(self.sampler)
        self.batch = batch
        self.per_epoch = max(1, per_rank // batch)
        self.seed, self.stage_id, self.start, self.stop = seed, stage_id, start, stop
        self._epoch, self._order = None, None

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        for it in range(self.start, self.stop):
            epoch, pos = divmod(it, self.per_epoch)
            if epoch != self._epoch:
                self.sampler.set_epoch(epoch)
                self._order, self._epoch = list(self.sampler), epoch
            idx = [self._order[(pos * self.batch + j) % len(self._order)] for j in range(self.batch)]
            yield [(i, seed_for(self.seed, self.stage_id, epoch, i)) for i in idx]


def iters_for(section, n_items, global_batch) -> int:
    if section["epochs"] is not None:
        return int(section["epochs"]) * max(1, math.ceil(n_items / global_batch))
    return int(section["iters"])


# ------------------------------------------------------------------ models

def build_model(cfg, role: str, weights=None, *, meta: bool = False):
    """The network of a role (teacher / baseline / student) with its configured weights.
    ``meta``: on the meta device, no memory and no init, to check the options and the weight
    files (read and matched, not copied) or to get the parameter shapes."""
    sec = cfg[role if role != "baseline" else "student"]
    try:
        with (torch.device("meta") if meta else contextlib.nullcontext()), warnings.catch_warnings():
            if meta:  # "copying ... to a meta parameter is a no-op": that is the point here
                warnings.simplefilter("ignore")
            return models.build_segmentation_model(sec["model"], cfg["data"]["num_classes"],
                                                   weights=weights if weights is not None else sec["weights"],
                                                   pretrained_backbone=sec["pretrained_backbone"],
                                                   **sec["model_options"])
    except (FileNotFoundError, ValueError, TypeError) as exc:
        which = "teacher" if role == "teacher" else "student"
        raise ConfigError(f"cannot build the {role} network ({which}.model={sec['model']}): {one_line(exc)}") from None


def check_fits(cfg, role: str, state: dict, path: Path) -> None:
    """The weights of a checkpoint must fit the network this config builds (another model's or
    another class count's checkpoint is a ConfigError, not a load_state_dict traceback)."""
    sec = "teacher" if role == "teacher" else "student"
    bare = {**cfg, sec: {**cfg[sec], "weights": None, "pretrained_backbone": None}}
    problems = models.mismatch_report(build_model(bare, role, meta=True).state_dict(), state)
    if problems:
        raise ConfigError(f"checkpoint {path} does not fit the {role} network of this config ({cfg[sec]['model']}, "
                          f"{cfg['data']['num_classes']} classes): {'; '.join(problems)}")


def param_groups(model, lr, head_mult):
    """The paper's recipe: 10x lr on the randomly initialised heads, 1x on the backbone."""
    back, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (back if name.startswith(("backbone.", "encoder.")) else head).append(p)
    groups = [{"params": back, "lr_mult": 1.0}, {"params": head, "lr_mult": head_mult}]
    return [g for g in groups if g["params"]]


def _unwrap(m):
    return m.module if hasattr(m, "module") else m


def _autocast(cfg, device):
    amp = cfg["train"]["amp"]
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        return contextlib.nullcontext()  # fp16 autocast is a GPU feature; warned at setup
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ------------------------------------------------------------------ training

def _load_weights(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # preflight checked it; the file changed since
        raise ConfigError(f"checkpoint {path} does not fit the network of this config ({one_line(exc)})") from None


def _distills(cfg) -> bool:
    """Whether the student stage needs the frozen teacher."""
    return any(cfg["student"]["losses"][k] for k in ("kd", "pa", "pf", "mf"))


@dataclass
class _StageRun:
    """One training stage while it runs: what :meth:`Trainer._setup` built, advanced by the iterations."""
    stage: str
    run_id: str                  # written into this stage's checkpoints and log records
    lr: float                    # the section's base learning rate
    weights: dict                # term -> weight (see losses.stage_weights)
    loss_options: dict           # the keyword options of compute_losses (see losses.loss_options)
    teacher: Optional[nn.Module]
    model: nn.Module
    net: nn.Module               # the model, or its DDP wrapper
    mf: Optional[nn.Module]
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rng_id: int
    total_iters: int
    last: Path
    final: Path
    whole: bool                  # all three frames of the triplet through the network
    it: int = 0
    vals: dict = field(default_factory=dict)
    bar: Any = None
    t0: float = 0.0

    def checkpoint(self, cfg) -> dict:
        """The ``<stage>_last.pt`` of now: everything resume needs, as tensors and plain data."""
        return {"stage": self.stage, "iteration": self.it, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "mf": None if self.mf is None else self.mf.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_states(), "config": cfg, "run": self.run_id}


class Trainer:
    """The stages of one run folder. Nothing is written before :meth:`start`; :meth:`preflight`
    checks (reading only) everything the stages will need.

    A finished checkpoint is never deleted before its replacement exists: a fresh run of a stage
    writes ``<stage>_last.pt`` beside the old ``<stage>_final.pt``, whose ``os.replace`` by the new
    final is the switch; only then are the stage's other old files and its old log.jsonl lines
    dropped. Every checkpoint and log record carries the id of the training run that wrote it,
    which tells a resumable ``last`` from the ``last`` of the finished final beside it."""

    def __init__(self, cfg, dist, run_dir: Path, resume: bool, out=print):
        self.cfg, self.dist, self.run_dir, self.resume = cfg, dist, Path(run_dir), resume
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log = JsonlLog(self.run_dir / "log.jsonl", enabled=dist.is_main)
        self.out = out if dist.is_main else (lambda *a, **k: None)
        self.iters_this_run = 0
        self.tb = None
        self._train_ds = None
        self._val_ds = None
        # The run: an id written into every checkpoint and log record, and the stages it retrains
        # (checkpoints/run.json, written by a fresh run; --resume continues that run).
        self.plan_path = self.ckpt_dir / "run.json"
        plan = self._read_plan() if resume else None
        self.run_id = plan["run"] if plan else uuid.uuid4().hex[:12]
        self.redo = set(plan["stages"]) if plan else (set() if resume else set(trained_stages(cfg)))

    def _read_plan(self):
        try:
            plan = json.loads(self.plan_path.read_text())
        except (OSError, ValueError):  # none (a run folder of an older train.py), or cut
            return None
        ok = isinstance(plan, dict) and isinstance(plan.get("run"), str) and isinstance(plan.get("stages"), list)
        return plan if ok else None

    def start(self):
        """Side effects of a run that passed preflight: the run's plan (a fresh run), TensorBoard,
        warnings."""
        cfg, dist = self.cfg, self.dist
        if dist.is_main and not self.resume and self.redo:  # (an eval-only run keeps a killed run's plan)
            atomic_write_text(self.plan_path, json.dumps({"run": self.run_id, "stages": sorted(self.redo)}) + "\n")
        tb = cfg["train"]["tensorboard"]
        if dist.is_main and tb in ("auto", True):
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except Exception:  # not installed: TensorBoard is optional
                if tb is True:
                    self.out("warning: tensorboard requested but not installed")
        if cfg["train"]["amp"] == "fp16" and dist.device.type != "cuda":
            self.out("warning: train.amp=fp16 needs CUDA; running in float32")

    @property
    def train_ds(self):
        if self._train_ds is None:
            self._train_ds = build_data(self.cfg, "train")
        return self._train_ds

    @property
    def val_ds(self):
        if self._val_ds is None:
            self._val_ds = build_data(self.cfg, "val")
        return self._val_ds

    def ckpt(self, stage, kind):
        return self.ckpt_dir / f"{stage}_{kind}.pt"

    # -- what the stages read ------------------------------------------------
    def source(self, name):
        """Where the weights of a finished model come from: ("final", path of its <name>_final.pt),
        ("weights", teacher.weights) for a teacher used as given, or None."""
        t = self.cfg["teacher"]
        if name == "teacher" and not t["train"] and t["weights"] is not None:
            return "weights", t["weights"]  # teacher.train=false: the given weights are the teacher
        final = self.ckpt(name, "final")
        if final.is_file():
            return "final", final
        if name == "teacher" and t["weights"] is not None:
            return "weights", t["weights"]
        return None

    def preflight(self, stages):
        """Everything the stages will read, checked before anything is written: the data sets,
        the networks' options and weight files, and the checkpoints to resume from, distil from
        or evaluate (readable, and of the network this config builds). Raises ConfigError."""
        cfg = self.cfg
        trained = trained_stages(cfg)
        for stage in trained:
            build_model(cfg, stage, meta=True)
            if self.resume:
                for kind in ("last", "final"):
                    p = self.ckpt(stage, kind)
                    if p.is_file():
                        check_fits(cfg, stage, read_checkpoint(p, kind, mmap=True)["model"], p)
        if trained:
            self.train_ds
        if "student" in trained and _distills(cfg) and "teacher" not in trained:
            if self.source("teacher") is None:
                raise ConfigError("the student stage needs a teacher: run the teacher stage first "
                                  "(stages=all or teacher) or set teacher.weights")
        needed = [n for n in ("teacher", "baseline", "student") if n not in trained and (
            "eval" in stages or (n == "teacher" and "student" in trained and _distills(cfg)))]
        found = [n for n in needed if self._check_source(n)]
        if "eval" in stages:
            self.val_ds
            if not trained and not found:
                raise ConfigError(f"nothing to evaluate in {self.run_dir}: no checkpoints/<stage>_final.pt "
                                  f"(train first, e.g. --stage all, or point run_dir at a finished run)")

    def _check_source(self, name) -> bool:
        src = self.source(name)
        if src is None:
            return False
        if src[0] == "final":
            check_fits(self.cfg, name, read_checkpoint(src[1], "final", mmap=True)["model"], src[1])
        else:
            build_model(self.cfg, name, meta=True)  # reads and matches teacher.weights
        return True

    def load_final(self, name):
        """The finished model of a stage on the device (see :meth:`source`), or None."""
        src = self.source(name)
        if src is None:
            return None
        if src[0] == "weights":
            return build_model(self.cfg, name).to(self.dist.device)
        model = build_model(self.cfg, name)
        _load_weights(model, read_checkpoint(src[1], "final")["model"], src[1])
        return model.to(self.dist.device)

    def teacher_model(self):
        model = self.load_final("teacher")
        if model is None:
            raise ConfigError("the student stage needs a teacher: run the teacher stage first "
                              "(stages=all or teacher) or set teacher.weights")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    # -- one training stage ------------------------------------------------
    def train_stage(self, stage: str):
        """Train one stage in named steps: what is left to do (:meth:`_pending`), :meth:`_setup`,
        :meth:`_resume`, :meth:`_iteration` per batch with a checkpoint every ``train.ckpt_every``,
        :meth:`_finish`. ``train.max_iters_this_run`` ends the run with :class:`Stopped` (after a
        checkpoint, or after the stage's final when its last iteration spent the budget)."""
        pending = self._pending(stage)
        if pending is None:
            self.out(f"[{stage}] already finished ({self.ckpt(stage, 'final')}); skipping")
            return
        resumed, run_id = pending
        run = self._setup(stage, run_id)
        if resumed is not None:
            self._resume(run, resumed)
        self._parallelise(run)
        tcfg = self.cfg["train"]
        stop = False
        try:
            for batch in self._loader(run):
                self._iteration(run, batch)
                stop = tcfg["max_iters_this_run"] is not None and self.iters_this_run >= tcfg["max_iters_this_run"]
                if run.it < run.total_iters and (stop or run.it % tcfg["ckpt_every"] == 0):
                    if self.dist.is_main:
                        atomic_save(run.checkpoint(self.cfg), run.last)
                    if stop:
                        self.dist.barrier()
                        raise Stopped(f"[{stage}] stopped at iteration {run.it}/{run.total_iters} "
                                      f"(max_iters_this_run); continue with --resume")
        finally:
            if run.bar is not None:
                run.bar.close()
        self._finish(run, legacy_log=resumed is not None and "run" not in resumed)
        if stop:
            raise Stopped(f"[{stage}] finished; stopped (max_iters_this_run); continue with --resume")

    def _pending(self, stage):
        """None if this run has nothing left to do for ``stage``; else (the ``last`` checkpoint to
        continue or None, the run id its records are written with)."""
        final, last = self.ckpt(stage, "final"), self.ckpt(stage, "last")
        resumed = read_checkpoint(last, "last") if self.resume and last.is_file() else None
        done_run = None
        if self.resume and final.is_file():
            done_run = read_checkpoint(final, "final", mmap=True).get("run", "")
        if stage in self.redo:
            # retrained by the fresh run that --resume continues: done only when its own final exists
            if done_run == self.run_id:
                return None
            if resumed is not None and resumed.get("run") != self.run_id:
                resumed = None  # the `last` of an earlier run: start this stage over
        elif done_run is not None and (resumed is None or resumed.get("run", "") == done_run):
            return None
        # else: `last` is a later run of this stage, killed before replacing its final: continue it
        return resumed, (resumed or {}).get("run") or self.run_id

    def _setup(self, stage, run_id) -> "_StageRun":
        """The networks, the MF module, the optimizer and the grad scaler of a stage at iteration 0."""
        cfg, dev, dist = self.cfg, self.dist.device, self.dist
        sec = cfg["teacher"] if stage == "teacher" else cfg["student"]
        tcfg = cfg["train"]
        weights = stage_weights(cfg, stage)
        teacher = self.teacher_model() if stage == "student" and any(
            k in weights for k in ("kd", "pa", "pf", "mf")) else None
        total_iters = iters_for(sec, len(self.train_ds), tcfg["batch_size"] * dist.world)
        # The baseline draws from the student's streams: the same initial weights, batches and
        # augmentation, so baseline vs student differ only in the loss terms (a paired comparison).
        rng_id = STAGE_ID["student" if stage == "baseline" else stage]
        torch.manual_seed(seed_for(cfg["seed"], rng_id, 0, 0, 1))  # same init on every rank
        model = build_model(cfg, stage).to(dev)
        mf = None
        if "mf" in weights:
            m = cfg["student"]["mf"]
            mf = tcloss.nn.MultiFrameDistillation(m["hidden_channels"], m["kernel_size"], pool=m["pool"],
                                                  clip=m["clip"], regularizer=m["regularizer"],
                                                  backend=cfg["loss"]["backend"]).to(dev)
            if dist.enabled:  # outside the DDP wrapper: start from rank 0's weights explicitly
                for p in mf.parameters():
                    torch.distributed.broadcast(p.data, 0)
        groups = param_groups(model, sec["lr"], tcfg["head_lr_mult"])
        if mf is not None:
            groups.append({"params": list(mf.parameters()), "lr_mult": cfg["student"]["mf"]["lr_mult"]})
        opt = torch.optim.SGD(groups, lr=sec["lr"], momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"])
        scaler = torch.amp.GradScaler(dev.type, enabled=tcfg["amp"] == "fp16" and dev.type == "cuda")
        return _StageRun(stage=stage, run_id=run_id, lr=sec["lr"], weights=weights, loss_options=loss_options(cfg),
                         teacher=teacher, model=model, net=model, mf=mf, opt=opt, scaler=scaler, rng_id=rng_id,
                         total_iters=total_iters, last=self.ckpt(stage, "last"), final=self.ckpt(stage, "final"),
                         whole=needs_triplet(cfg, stage, weights))

    def _resume(self, run: "_StageRun", st: dict):
        """Continue from a ``last`` checkpoint: weights, optimizer, MF, scaler, RNG states, iteration."""
        _load_weights(run.model, st["model"], run.last)
        run.opt.load_state_dict(st["optimizer"])
        if run.mf is not None and st.get("mf") is not None:
            run.mf.load_state_dict(st["mf"])
        if st.get("scaler"):
            run.scaler.load_state_dict(st["scaler"])
        set_rng_states(st["rng"])
        run.it = st["iteration"]
        self.out(f"[{run.stage}] resuming at iteration {run.it}/{run.total_iters}")

    def _parallelise(self, run: "_StageRun"):
        """SyncBatchNorm (CUDA) and the DDP wrapper, when there are several processes."""
        dev, dist = self.dist.device, self.dist
        if self.cfg["train"]["sync_bn"] and dist.enabled:
            if dev.type == "cuda":
                run.model = run.net = nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
            else:
                self.out("warning: train.sync_bn needs CUDA; using per-process BatchNorm")
        if dist.enabled:
            run.net = nn.parallel.DistributedDataParallel(
                run.model, device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters="aux" not in run.weights)

    def _loader(self, run: "_StageRun"):
        """The batches of iterations [run.it, total) (see IterationBatches), and the progress bar."""
        cfg, dist = self.cfg, self.dist
        batches = IterationBatches(len(self.train_ds), cfg["train"]["batch_size"], dist.world, dist.rank, cfg["seed"],
                                   run.rng_id, run.it, run.total_iters)
        if dist.is_main and cfg["train"]["progress"]:
            from tqdm import tqdm
            run.bar = tqdm(total=run.total_iters, initial=run.it, desc=run.stage, dynamic_ncols=True, leave=False)
        run.t0 = time.time()
        run.model.train()
        return DataLoader(_SeededItems(self.train_ds), batch_sampler=batches, num_workers=cfg["data"]["num_workers"],
                          collate_fn=default_collate)

    def _iteration(self, run: "_StageRun", batch):
        """One optimizer step on one batch, then its loss values (checked finite) to the log."""
        cfg, dev, dist = self.cfg, self.dist.device, self.dist
        tcfg = cfg["train"]
        # dropout etc. of this iteration: a function of (seed, stage, iteration, rank) only
        torch.manual_seed(seed_for(cfg["seed"], run.rng_id, run.it, dist.rank, 7))
        lr_scale = (1 - run.it / run.total_iters) ** tcfg["poly_power"]
        for g in run.opt.param_groups:
            g["lr"] = run.lr * g["lr_mult"] * lr_scale
        frames = batch["frames"].to(dev, non_blocking=True)
        label = batch["label"].to(dev)
        flow = batch["flow"].to(dev) if "flow" in batch else None
        if flow is None and any(k in run.weights for k in ("tl", "pf", "mf")):
            raise ConfigError("temporal terms need flow: set data.flow (dis, raft_*) for data without GT flow")
        inp = frames.flatten(0, 1) if run.whole else frames[:, 1]
        with _autocast(cfg, dev):
            s_out = run.net(inp)
            t_out = None
            if run.teacher is not None:
                with torch.no_grad():
                    t_out = run.teacher(inp)
            total, terms = compute_losses(run.weights, frames, label, flow, s_out, t_out, run.mf, **run.loss_options)
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(total).backward()
        if run.mf is not None:
            dist.average_grads(run.mf.parameters())
        run.scaler.step(run.opt)
        run.scaler.update()
        if run.mf is not None:
            run.mf.clip_()  # keep the ConvLSTM weights in range (sec. 3.3), after every step
        run.it += 1
        self.iters_this_run += 1
        vals = {k: float(v.detach()) for k, v in terms.items()}
        vals["total"] = float(total.detach())
        run.vals = vals
        if not math.isfinite(vals["total"]):
            bad = ", ".join(f"{k} {v}" for k, v in vals.items() if not math.isfinite(v))
            raise ConfigError(f"[{run.stage}] non-finite loss at iteration {run.it} ({bad}): lower "
                              f"{'teacher' if run.stage == 'teacher' else 'student'}.lr or the loss weights "
                              f"(finished checkpoints of earlier runs are kept)")
        if run.bar is not None:
            run.bar.update(1)
            run.bar.set_postfix({k: f"{v:.3f}" for k, v in vals.items()}, refresh=False)
        if run.it % tcfg["log_every"] == 0 or run.it == run.total_iters:
            self.log.write({"stage": run.stage, "iter": run.it, "lr": run.opt.param_groups[0]["lr"], **vals,
                            "time": round(time.time() - run.t0, 3), "run": run.run_id})
            if self.tb is not None:
                for k, v in vals.items():
                    self.tb.add_scalar(f"{run.stage}/{k}", v, run.it)

    def _finish(self, run: "_StageRun", legacy_log: bool):
        """The stage's last and final checkpoints (the final replaces an old one only now), per-rank
        finals, and the files and log records of the runs it replaces dropped."""
        dist = self.dist
        if dist.enabled:
            # DDP keeps parameters in sync but BN running stats only at each forward's start
            # (broadcast_buffers): make rank 0's the final ones everywhere.
            for b in run.model.buffers():
                torch.distributed.broadcast(b, 0)
        if dist.is_main:
            atomic_save(run.checkpoint(self.cfg), run.last)
            atomic_save({"stage": run.stage, "iteration": run.it, "model": run.model.state_dict(), "config": self.cfg,
                         "run": run.run_id}, run.final)  # the switch: the old final (if any) is replaced only now
        ranks = self.cfg["train"]["rank_checkpoints"] and dist.enabled
        if ranks:
            atomic_save({"model": run.model.state_dict(), "mf": None if run.mf is None else run.mf.state_dict()},
                        self.ckpt(run.stage, f"final_rank{dist.rank}"))
        dist.barrier()
        if dist.is_main:
            keep = {run.last.name, run.final.name} | (
                {f"{run.stage}_final_rank{r}.pt" for r in range(dist.world)} if ranks else set())
            self._drop_replaced(run.stage, run.run_id, keep, legacy_log=legacy_log)
        self.out(f"[{run.stage}] done: {run.total_iters} iterations, " +
                 ", ".join(f"{k} {v:.4f}" for k, v in run.vals.items()) + f" ({time.time() - run.t0:.1f} s)")

    def _drop_replaced(self, stage, run_id, keep, legacy_log):
        """After a stage's new final exists: drop the stage's files of earlier runs (old per-rank
        finals) and its log.jsonl records of other runs (``legacy_log``: records without a run id
        are this run's, resumed from a checkpoint written before run ids existed)."""
        for p in self.ckpt_dir.glob(f"{stage}_*.pt"):
            if p.name not in keep:
                p.unlink(missing_ok=True)
        path = self.log.path
        if not path.is_file():
            return
        lines = []
        for ln in path.read_text().splitlines():
            try:
                r = json.loads(ln)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            mine = r.get("run") == run_id or (legacy_log and "run" not in r)
            if r.get("stage") != stage or mine:
                lines.append(ln)
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))


# ------------------------------------------------------------------ evaluation

@torch.no_grad()
def predict(model, frames, size, batch_size=8):
    """Class ids (T, H, W) of frames (T, 3, H, W), ``batch_size`` frames per forward pass (in eval
    mode each frame's prediction is its own: the batch size only bounds memory)."""
    out = []
    for i in range(0, frames.shape[0], batch_size):
        logits = model(frames[i:i + batch_size])["logits"]
        out.append(models.upsample_logits(logits, size).argmax(1))
    return torch.cat(out)


@torch.no_grad()
def measure_fps(model, size, device, iters):
    """Per-frame latency at batch 1 (the paper's setting: one frame at a time)."""
    x = torch.rand(1, 3, *size, device=device) * 255
    for _ in range(2):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / max(iters, 1)
    return 1.0 / dt if dt > 0 else float("inf")


@torch.no_grad()
def evaluate(cfg, model, dist, val_ds):
    """mIoU / pixel accuracy on labelled frames, TC over consecutive pairs (flow t -> t+1)."""
    model.eval()
    dev = dist.device
    K = cfg["data"]["num_classes"]
    seg = tcloss.metrics.SegmentationMetrics(K)
    tc = tcloss.metrics.TemporalConsistency(K)
    n = len(val_ds)
    if cfg["data"]["val_max_clips"] is not None:
        n = min(n, int(cfg["data"]["val_max_clips"]))
    size = None
    for i in range(dist.rank, n, dist.world):  # clips sharded across ranks, metrics summed below
        clip = val_ds[i]
        frames = clip["frames"].to(dev)
        size = frames.shape[-2:]
        pred = predict(model, frames, size, cfg["eval"]["batch_size"])
        lab = clip["labelled"].to(dev)
        if lab.any():
            seg.update(pred[lab], clip["labels"].to(dev)[lab])
        if "flow" in clip and pred.shape[0] > 1:
            tc.update(pred[:-1], pred[1:], clip["flow"].to(dev), clip.get("occlusion"))
    if dist.enabled:
        seg.all_reduce()
        tc.all_reduce()
    s, t = seg.compute(), tc.compute()
    res = {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "tc": t["tc"], "agreement": t["agreement"],
           "params_m": models.count_parameters(_unwrap(model)) / 1e6}
    if dist.is_main:
        fsize = cfg["eval"]["fps_size"] or (list(size) if size is not None else [128, 128])
        res["fps"] = measure_fps(model, tuple(fsize), dev, cfg["eval"]["fps_iters"])
        res["fps_size"] = list(fsize)
        res["device"] = str(dev)
    return res
