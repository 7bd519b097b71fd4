"""Config: nested defaults, YAML files, presets and ``--set key.sub=value`` overrides.

Every key a YAML file or ``--set`` may use exists in ``DEFAULTS``; anything else is a
``ConfigError`` (a typo must not silently train the wrong thing). Dict-valued keys listed in
``FREE_FORM`` (options passed through to a constructor) accept any sub-keys.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A user error in the config or command line: reported as one line, exit code 2."""


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
        "tl_on": "prob",              # temporal loss on probabilities (eq. 1) or logits (released code)
        "tl_mask_power": 1,
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
        "batch_size": 1,
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
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
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
    st = [st] if isinstance(st, str) else list(st)
    for s in st:
        if s not in STAGE_NAMES:
            raise ConfigError(f"unknown stage {s!r}; choose from all, {', '.join(STAGE_NAMES)}")
    return [s for s in STAGE_NAMES if s in st]  # always in dependency order


def validate(cfg) -> None:
    import models
    import videodata
    resolve_stages(cfg)
    for role in ("teacher", "student"):
        name = cfg[role]["model"]
        key = models.segmentation._ALIASES.get(str(name).lower(), str(name).lower())
        if key not in models.SEGMENTATION_MODELS:
            raise ConfigError(f"unknown {role}.model {name!r}; choose from {sorted(models.SEGMENTATION_MODELS)}")
        for section, terms in (("losses", STUDENT_TERMS if role == "student" else TEACHER_TERMS),
                               ("loss_weights", STUDENT_TERMS if role == "student" else TEACHER_TERMS)):
            for t in terms:
                if t not in cfg[role][section]:
                    raise ConfigError(f"{role}.{section}.{t} missing")
    d = cfg["data"]
    if str(d["name"]).lower() not in videodata.DATASETS:
        raise ConfigError(f"unknown data.name {d['name']!r}; choose from {sorted(videodata.DATASETS)}")
    if d["name"] != "synthetic":
        if not d["root"]:
            raise ConfigError(f"data.root is required for data set {d['name']!r}")
        if not Path(d["root"]).is_dir():
            raise ConfigError(f"data root not found: {d['root']}")
    if cfg["train"]["amp"] not in ("none", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be none, bf16 or fp16, got {cfg['train']['amp']!r}")
    if cfg["student"]["forward_triplet"] not in ("auto", "always"):
        raise ConfigError(f"student.forward_triplet must be auto or always, got {cfg['student']['forward_triplet']!r}")
    if cfg["data"]["seed"] is not None and not isinstance(cfg["data"]["seed"], int):
        raise ConfigError(f"data.seed must be an int or null, got {cfg['data']['seed']!r}")
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg['device']!r}")
    if not isinstance(cfg["train"]["batch_size"], int) or cfg["train"]["batch_size"] < 1:
        raise ConfigError("train.batch_size must be a positive int")
