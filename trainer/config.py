"""Config: nested defaults, YAML files, presets and ``--set key.sub=value`` overrides.

Every key a YAML file or ``--set`` may use exists in ``DEFAULTS``; anything else is a
``ConfigError`` (a typo must not silently train the wrong thing). Dict-valued keys listed in
``FREE_FORM`` (options passed through to a constructor) accept any sub-keys.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import yaml

from .errors import ConfigError  # also trainer.config.ConfigError

# Loss terms of eq. 3. ce/aux are the supervised terms; the others are multiplied by lambda.
STUDENT_TERMS = ("ce", "aux", "kd", "pa", "tl", "pf", "mf")
TEACHER_TERMS = ("ce", "aux", "tl")

DEFAULTS = {
    "run_dir": "runs/synthetic",
    "seed": 0,
    "device": "auto",            # auto | cpu | cuda
    "stages": "all",             # all | teacher | student | baseline | eval | list of these
    "run_baseline": False,       # 'all' also trains a CE-only student (Table 1 (a))
    "overwrite": False,          # a fresh run (no --resume) may replace an earlier run's checkpoints
    "data": {
        "name": "synthetic",
        "root": None,
        "seed": None,            # synthetic clips' seed (None: the run's seed); fixed across an ablation's seeds
        "num_classes": 6,
        "train_split": "train",
        "val_split": "val",
        "max_distance": 5,       # triplet neighbours at random distances <= this (the paper's policy)
        "size": None,            # deterministic resize before augmentation
        "crop_size": None,       # TripletAugment crop (paper: 769 Cityscapes, 640 CamVid)
        "scale": [0.5, 2.0],
        "hflip": True,
        "augment": True,
        "clip_length": 10,       # evaluation windows of consecutive frames (TC)
        "val_max_clips": None,   # cap on evaluation clips (CPU budgets)
        "flow": "gt",            # gt (the data set's exact flow) | dis | raft_small | raft_large
        "flow_weights": None,
        "num_workers": 0,
        "train_options": {},     # extra options for build_dataset (train)
        "val_options": {},       # extra options for build_dataset (val)
    },
    "teacher": {
        "model": "tiny",
        "model_options": {},
        "weights": None,              # start from / use these weights (local file)
        "pretrained_backbone": None,  # ImageNet backbone (local file)
        "train": True,                # False: use `weights` as is (frozen), skip the teacher stage
        "iters": 200,
        "epochs": None,               # if set, iters = epochs * ceil(len(train) / global batch)
        "lr": 0.01,
        "losses": {"ce": True, "aux": True, "tl": True},
        "loss_weights": {"ce": 1.0, "aux": 0.4, "tl": 1.0},
    },
    "student": {
        "model": "tiny",
        "model_options": {"width": 8},
        "weights": None,
        "pretrained_backbone": None,
        "iters": 200,
        "epochs": None,
        "lr": 0.01,
        "losses": {"ce": True, "aux": True, "kd": True, "pa": True, "tl": True, "pf": True, "mf": True},
        "loss_weights": {"ce": 1.0, "aux": 0.4, "kd": 1.0, "pa": 1.0, "tl": 1.0, "pf": 1.0, "mf": 1.0},
        "forward_triplet": "auto",    # auto: all 3 frames through the student only when tl/pf/mf need them
                                      # (else the labelled frame); always: in every scheme (same BatchNorm batch)
        "kd_temperature": 1.0,
        "pa_pool": None,              # avg-pool features to this grid before pair-wise SF (None = full)
        "pf_pool": None,              # same for the pair-wise-frame term on predictions
        "mf": {"hidden_channels": 4, "kernel_size": 3, "pool": 8, "clip": 0.1, "regularizer": "std",
               "lr_mult": 1.0},
    },
    "loss": {
        "lambda": 0.1,                # eq. 3
        "semantics": "paper",         # paper: the terms as the paper writes them (eq. 1 on probabilities);
                                      # released: kd, pa, tl weighed as the released code (trainer/losses.py)
        "tl_on": "prob",              # semantics=paper: temporal loss on probabilities (eq. 1) or logit
        "tl_mask_power": 1,           # semantics=paper: the power of the occlusion mask
        "backend": "auto",
    },
    "train": {
        "batch_size": 4,              # per process
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "poly_power": 0.9,
        "head_lr_mult": 10.0,         # 10x lr on everything but the backbone (the paper's recipe)
        "amp": "none",                # none | bf16 | fp16 (fp16 only on CUDA)
        "sync_bn": False,
        "ckpt_every": 50,
        "log_every": 10,
        "max_iters_this_run": None,   # stop (after a checkpoint) after this many iterations: tests, preemptible jobs
        "progress": True,
        "tensorboard": "auto",        # auto (when installed) | true | false
        "rank_checkpoints": False,    # every DDP rank also writes its final weights (sync checks)
    },
    "eval": {
        "batch_size": 8,              # frames per forward pass in evaluation (bounds memory; fps is timed at batch 1)
        "fps_iters": 20,
        "fps_size": None,             # [H, W] of the latency measurement (default: eval frames)
    },
    "plots": True,
}

FREE_FORM = {("data", "train_options"), ("data", "val_options"), ("teacher", "model_options"),
             ("student", "model_options")}

PRESETS = {
    # The same path as the default, small enough for CI (< 3 min on 2 cores).
    "smoke": {
        "run_dir": "runs/smoke",
        "overwrite": True,
        "data": {"train_options": {"num_clips": 2, "length": 12, "size": [64, 64], "num_objects": 3},
                 "val_options": {"num_clips": 1, "length": 8, "size": [64, 64], "num_objects": 3},
                 "clip_length": 8, "max_distance": 3},
        "teacher": {"iters": 12},
        "student": {"iters": 12},
        "train": {"batch_size": 2, "ckpt_every": 6, "log_every": 2, "progress": False},
        "eval": {"fps_iters": 3},
    },
}


def _merge(base: dict, override: dict, where: str = "") -> dict:
    for key, value in override.items():
        path = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}")
        parent = tuple(where.rstrip(".").split(".")) if where else ()
        if isinstance(base[key], dict) and (parent + (key,)) in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            base[key] = {**base[key], **value}
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            _merge(base[key], value, path + ".")
        else:
            base[key] = value
    return base


def parse_set(item: str) -> dict:
    """``a.b=value`` -> {"a": {"b": value}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"bad --set key {key!r}")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path=None, sets=(), preset=None) -> dict:
    """Defaults <- YAML file <- preset <- --set overrides (later wins)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}" if not p.exists() else f"config {p} is not a file")
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                              f"{exc.start})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {p}: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping at the top level")
        _merge(cfg, data)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        _merge(cfg, copy.deepcopy(PRESETS[preset]))
    for item in sets:
        _merge(cfg, parse_set(item))
    validate(cfg)
    return cfg


STAGE_NAMES = ("teacher", "baseline", "student", "eval")


def resolve_stages(cfg) -> list:
    st = cfg["stages"]
    if st == "all":
        return ["teacher"] + (["baseline"] if cfg["run_baseline"] else []) + ["student", "eval"]
    st = [st] if isinstance(st, str) else st
    if not isinstance(st, (list, tuple)) or not st:
        raise ConfigError(f"stages must be all, one of {', '.join(STAGE_NAMES)} or a non-empty list of them, "
                          f"got {cfg['stages']!r}")
    for s in st:
        if s not in STAGE_NAMES:
            raise ConfigError(f"unknown stage {s!r}; choose from all, {', '.join(STAGE_NAMES)}")
    return [s for s in STAGE_NAMES if s in st]  # always in dependency order


def trained_stages(cfg) -> list:
    """The stages this config trains (a teacher with ``teacher.train: false`` is used as it is)."""
    return [s for s in resolve_stages(cfg) if s != "eval" and not (s == "teacher" and not cfg["teacher"]["train"])]


# ------------------------------------------------------------------ validation
#
# Every option is checked here, once, before train.py writes or deletes anything: a value of the
# wrong type, out of range or not one of the choices is a ConfigError naming the key. Checkers
# return the value normalised (a numeric string such as "1e-3", which YAML leaves a string, becomes
# a float); validate() stores it back, so the trainer only ever sees checked values.

def _show(v) -> str:
    """repr of a bad value, cut to fit an error line."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_float(v):
    """A finite float from a number or a numeric string, else None."""
    try:
        f = float(v) if isinstance(v, str) or _is_num(v) else None
    except (ValueError, OverflowError):
        return None
    return f if f is not None and math.isfinite(f) else None


def _as_int(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    f = _as_float(v)
    return int(f) if f is not None and f.is_integer() else None


def _int(lo=None, hi=None, null=False):
    what = "an int" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
    what += " or null" if null else ""

    def check(key, v):
        if v is None and null:
            return None
        i = _as_int(v)
        if i is None or (lo is not None and i < lo) or (hi is not None and i > hi):
            raise ConfigError(f"{key} must be {what}, got {_show(v)}")
        return i
    return check


def _num(lo=None, hi=None, lo_open=False, hi_open=False, null=False):
    if lo is not None and hi is not None:
        what = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    else:
        what = "a number" + (f" {'>' if lo_open else '>='} {lo}" if lo is not None else "")
    what += " or null" if null else ""

    def check(key, v):
        if v is None and null:
            return None
        f = _as_float(v)
        if (f is None or (lo is not None and (f <= lo if lo_open else f < lo))
                or (hi is not None and (f >= hi if hi_open else f > hi))):
            raise ConfigError(f"{key} must be {what}, got {_show(v)}")
        return f
    return check


def _bool(key, v):
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false, got {_show(v)}")
    return v


def _choice(*options, aliases=None):
    def check(key, v):
        if isinstance(v, str):
            v = (aliases or {}).get(v, v)
        if isinstance(v, (str, bool)):
            for o in options:  # == would let 1 pass for true
                if type(o) is type(v) and o == v:
                    return v
        raise ConfigError(f"{key} must be one of {', '.join(str(o).lower() for o in options)}, got {_show(v)}")
    return check


def _text(null=False):
    def check(key, v):
        if v is None and null:
            return None
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{key} must be a non-empty string{' or null' if null else ''}, got {_show(v)}")
        return v
    return check


def _file(key, v):
    """A local file (weights are never downloaded), or null."""
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key} must be the path of a local file or null, got {_show(v)}")
    if not Path(v).is_file():
        raise ConfigError(f"{key}: file not found: {v}")
    return v


def _size(null=True, pair_only=False):
    """[h, w] of positive ints (or, unless ``pair_only``, an int n for n x n)."""
    what = "a pair [h, w] of positive ints" if pair_only else "a positive int or a pair [h, w] of positive ints"
    what += " or null" if null else ""

    def check(key, v):
        if v is None and null:
            return None
        if not pair_only and not isinstance(v, str) and _as_int(v) is not None and _as_int(v) >= 1:
            return _as_int(v)
        if (isinstance(v, (list, tuple)) and len(v) == 2 and not any(isinstance(x, str) for x in v)
                and all(_as_int(x) is not None and _as_int(x) >= 1 for x in v)):
            return [_as_int(x) for x in v]
        raise ConfigError(f"{key} must be {what}, got {_show(v)}")
    return check


def _scale(key, v):
    if (isinstance(v, (list, tuple)) and len(v) == 2 and all(_as_float(x) is not None for x in v)
            and 0 < _as_float(v[0]) <= _as_float(v[1])):
        return [_as_float(x) for x in v]
    raise ConfigError(f"{key} must be a pair [min, max] of numbers with 0 < min <= max, got {_show(v)}")


def _mapping(key, v):
    if not isinstance(v, dict):
        raise ConfigError(f"{key} must be a mapping, got {_show(v)}")
    return v


def _stages(key, v):
    resolve_stages({"stages": v, "run_baseline": False})
    return v


def _data_name(key, v):
    import videodata
    if not isinstance(v, str) or v.lower() not in videodata.DATASETS:
        raise ConfigError(f"unknown {key} {v!r}; choose from {sorted(videodata.DATASETS)}")
    return v.lower()


def _model(key, v):
    import models
    if models.model_key(v) is None:
        raise ConfigError(f"unknown {key} {v!r}; choose from {sorted(models.SEGMENTATION_MODELS)}")
    return v


def _backend(key, v):
    import tcloss
    names = {b: None for op in tcloss.available_backends(verbose=True).values() for dev in op.values() for b in dev}
    return _choice("auto", *names)(key, v)


_POOL = _size(null=True)
SCHEMA = {
    "run_dir": _text(),
    "seed": _int(0),
    "device": _choice("auto", "cpu", "cuda"),
    "stages": _stages,
    "run_baseline": _bool,
    "overwrite": _bool,
    "data.name": _data_name,
    "data.root": _text(null=True),
    "data.seed": _int(0, null=True),
    "data.num_classes": _int(2, 254),  # 255 is the ignore label
    "data.train_split": _text(),
    "data.val_split": _text(),
    "data.max_distance": _int(1),
    "data.size": _size(),
    "data.crop_size": _size(),
    "data.scale": _scale,
    "data.hflip": _bool,
    "data.augment": _bool,
    "data.clip_length": _int(1, null=True),  # null: whole sequences
    "data.val_max_clips": _int(1, null=True),
    "data.flow": _choice("gt", "dis", "raft_small", "raft_large"),
    "data.flow_weights": _file,
    "data.num_workers": _int(0),
    "data.train_options": _mapping,
    "data.val_options": _mapping,
    **{f"{role}.{key}": check for role in ("teacher", "student") for key, check in {
        "model": _model,
        "model_options": _mapping,
        "weights": _file,
        "pretrained_backbone": _file,
        "iters": _int(1),
        "epochs": _int(1, null=True),
        "lr": _num(0, lo_open=True),
    }.items()},
    "teacher.train": _bool,
    **{f"teacher.losses.{t}": _bool for t in TEACHER_TERMS},
    **{f"teacher.loss_weights.{t}": _num(0) for t in TEACHER_TERMS},
    **{f"student.losses.{t}": _bool for t in STUDENT_TERMS},
    **{f"student.loss_weights.{t}": _num(0) for t in STUDENT_TERMS},
    "student.forward_triplet": _choice("auto", "always"),
    "student.kd_temperature": _num(0, lo_open=True),
    "student.pa_pool": _POOL,
    "student.pf_pool": _POOL,
    "student.mf.hidden_channels": _int(1),
    "student.mf.kernel_size": _int(1),
    "student.mf.pool": _POOL,
    "student.mf.clip": _num(0, lo_open=True, null=True),
    "student.mf.regularizer": _choice("std", "released", "none"),
    "student.mf.lr_mult": _num(0),
    "loss.lambda": _num(0),
    "loss.semantics": _choice("paper", "released"),
    "loss.tl_on": _choice("prob", "logit", aliases={"logits": "logit"}),
    "loss.tl_mask_power": _num(0),
    "loss.backend": _backend,
    "train.batch_size": _int(1),
    "train.momentum": _num(0, 1, hi_open=True),
    "train.weight_decay": _num(0),
    "train.poly_power": _num(0),
    "train.head_lr_mult": _num(0, lo_open=True),
    "train.amp": _choice("none", "bf16", "fp16"),
    "train.sync_bn": _bool,
    "train.ckpt_every": _int(1),
    "train.log_every": _int(1),
    "train.max_iters_this_run": _int(1, null=True),
    "train.progress": _bool,
    "train.tensorboard": _choice("auto", True, False),
    "train.rank_checkpoints": _bool,
    "eval.batch_size": _int(1),
    "eval.fps_iters": _int(1),
    "eval.fps_size": _size(pair_only=True),
    "plots": _bool,
}


def _leaves(d: dict, where: str = ""):
    """Dotted keys of the config's values (free-form mappings are one value)."""
    for k, v in d.items():
        key = f"{where}{k}"
        if isinstance(v, dict) and tuple(key.split(".")) not in FREE_FORM:
            yield from _leaves(v, key + ".")
        else:
            yield key


def _value(cfg: dict, key: str):
    """The value of a dotted key."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def validate(cfg) -> None:
    """Check every option of a merged config (types, ranges, choices, local files) and the
    combinations that cannot run; normalises values in place. Reads no more than file names:
    what depends on this machine (the device, kernels, the run folder) is check_environment's."""
    for key in _leaves(DEFAULTS):
        if key not in SCHEMA:  # a new option needs its check here
            raise AssertionError(f"config key {key!r} has no check in trainer/config.py SCHEMA")
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = SCHEMA[key](key, node[last])
    d = cfg["data"]
    if d["name"] != "synthetic":
        if not d["root"]:
            raise ConfigError(f"data.root is required for data set {d['name']!r}")
        if not Path(d["root"]).is_dir():
            raise ConfigError(f"data root not found: {d['root']}")
        if d["flow"] == "gt":
            raise ConfigError(f"data.flow=gt needs ground-truth flow, which only the synthetic data has; "
                              f"use data.flow=dis (or raft_small / raft_large)")
    if cfg["loss"]["semantics"] == "released":
        fixed = [k for k in ("loss.tl_on", "loss.tl_mask_power", "student.pa_pool")
                 if _value(cfg, k) != _value(DEFAULTS, k)]
        if fixed:
            raise ConfigError(f"loss.semantics=released fixes the temporal loss (on logits, mask power 2, / C) and "
                              f"the pair-wise pooling (2x2): {', '.join(fixed)} apply to semantics=paper only")
    if cfg["student"]["mf"]["kernel_size"] % 2 == 0:
        raise ConfigError(f"student.mf.kernel_size must be odd, got {cfg['student']['mf']['kernel_size']}")
    stages = resolve_stages(cfg)
    trained = trained_stages(cfg)
    if "teacher" in stages and not cfg["teacher"]["train"] and cfg["teacher"]["weights"] is None:
        raise ConfigError("teacher.train=false uses teacher.weights as the teacher: set teacher.weights")
    for stage in trained:
        sec = cfg["teacher" if stage == "teacher" else "student"]
        terms = ("ce", "aux") if stage == "baseline" else sec["losses"]
        if not any(sec["losses"][t] for t in terms):
            raise ConfigError(f"{stage} stage: every loss term is switched off")
    if "student" in trained and cfg["student"]["losses"]["mf"]:
        import tcloss
        m = cfg["student"]["mf"]
        try:
            tcloss.nn.MultiFrameDistillation(m["hidden_channels"], m["kernel_size"], pool=m["pool"], clip=m["clip"],
                                             regularizer=m["regularizer"], backend=cfg["loss"]["backend"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"student.mf: {exc}") from None


# Terms of eq. 3 -> the tcloss ops that run them (their kernels are picked by loss.backend).
_TERM_OPS = {"tl": ("temporal_loss",), "pa": ("pairwise_similarity_loss",), "pf": ("pairwise_similarity_loss",),
             "mf": ("convlstm_cell",)}


def check_environment(cfg, run_dir: bool = True) -> None:
    """What a valid config needs from this machine, checked before anything is written: the
    device, the kernels of ``loss.backend`` on it, and (``run_dir``) a run folder that is a
    writable folder, or can be created as one."""
    import torch

    import tcloss

    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available here (use device=cpu or device=auto)")
    dev = "cuda" if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available()) else "cpu"
    backend, key = cfg["loss"]["backend"], "loss.backend"
    if backend == "auto" and os.environ.get("TCLOSS_BACKEND", "auto") not in ("", "auto"):
        key = "TCLOSS_BACKEND"  # the environment variable: tcloss's override of auto
        backend = _backend(key, os.environ["TCLOSS_BACKEND"])
    if backend != "auto":
        ops = {op for stage in trained_stages(cfg)
               for t, on in cfg["teacher" if stage == "teacher" else "student"]["losses"].items()
               if on and stage != "baseline" for op in _TERM_OPS.get(t, ())}
        status = tcloss.available_backends(verbose=True)
        for op in sorted(ops):
            why = status.get(op, {}).get(dev, {}).get(backend, "unknown op")
            if why != "ok":
                raise ConfigError(f"{key}={backend} cannot run {op} on {dev}: {why}")
    if run_dir:
        check_run_dir(cfg["run_dir"])


def check_run_dir(run_dir) -> None:
    """The run folder (and its checkpoints/) must be folders, or creatable, and writable: a file in
    the way or a read-only file system is a ConfigError now rather than a failed save later."""
    import tempfile

    p = Path(run_dir)
    existing = next(q for q in (p, *p.parents) if q.exists() or q == q.parent)
    if not existing.is_dir():
        raise ConfigError(f"run_dir {p}: {existing} is a file, not a folder")
    if (p / "checkpoints").exists() and not (p / "checkpoints").is_dir():
        raise ConfigError(f"run_dir {p}: {p / 'checkpoints'} is a file, not a folder")
    if (p / "log.jsonl").is_dir():
        raise ConfigError(f"run_dir {p}: {p / 'log.jsonl'} is a folder, not a file")
    for q in (existing, p / "checkpoints"):
        if not q.is_dir():
            continue
        try:  # a real write: os.access says yes to root on a read-only mount
            fd, probe = tempfile.mkstemp(prefix=".write_test", dir=q)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"run_dir {p} is not writable ({q}: {exc.strerror})") from None
