"""Small helpers: distributed setup, seeding, atomic checkpoints, JSONL logging."""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def seed_for(*parts) -> int:
    """A deterministic 63-bit seed from (seed, stage, iteration, ...): the randomness of an
    iteration depends only on these, so a resumed run replays exactly what the killed one would have."""
    return int(hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).hexdigest()[:15], 16)


class Dist:
    """World info; initialised from torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK)."""

    def __init__(self, device_pref: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def average_grads(self, params):
        """Average gradients of parameters outside the DDP wrapper (the MF ConvLSTM)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def rng_states() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_states(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then os.replace: a kill mid-write never
    leaves a truncated checkpoint under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class JsonlLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list:
    """Records in order; for a (stage, iter) logged twice (a killed run replayed after resume)
    the later one wins."""
    out = {}
    if not Path(path).is_file():
        return []
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        out[(r.get("stage"), r.get("iter"))] = r
    return sorted(out.values(), key=lambda r: (str(r.get("stage")), r.get("iter", 0)))
