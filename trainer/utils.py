"""Small helpers: distributed setup, seeding, atomic checkpoints, JSONL logging."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
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
            from .config import ConfigError
            raise ConfigError("device=cuda but no CUDA GPU is available here (use device=cpu or device=auto)")
        if use_cuda and self.local_rank >= torch.cuda.device_count():
            from .config import ConfigError
            raise ConfigError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA GPU(s) here")
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


_TMP = re.compile(r"^\..+\.tmp(\d+)$")  # .<name>.tmp<pid>: atomic_save's temp files


def _atomic_write(path: Path, write) -> None:
    """write(file) into a temp file beside ``path`` (flushed to disk), then os.replace: a kill
    mid-write never leaves a truncated file under the real name, and a failed write (full disk)
    removes its temp file. A kill can leave the temp file: remove_stale_temp_files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj, path: Path) -> None:
    """torch.save, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list:
    """Remove the temp files of atomic writes killed mid-way (``.<name>.tmp<pid>`` whose process
    is gone: empty or partial); a live process's (another DDP rank's) are left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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
