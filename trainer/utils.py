"""Small helpers: distributed setup, seeding, checkpoints (atomic writes, the one reader), JSONL logging."""
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

from .errors import ConfigError, one_line


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
            raise ConfigError("device=cuda but no CUDA GPU is available here (use device=cpu or device=auto)")
        if use_cuda and self.local_rank >= torch.cuda.device_count():
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
    """The RNG states of torch, numpy and Python as tensors, numbers and strings: what a checkpoint
    loaded with ``weights_only=True`` may hold."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"name": np_name, "key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                    "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
          "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_states(st: dict) -> None:
    """Restore :func:`rng_states`; also the tuples of checkpoints written before it (numpy's state
    with its array, Python's as ``random.getstate()`` returns it)."""
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    if isinstance(n, dict):
        n = (n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    p = st["python"]
    if isinstance(p, dict):
        p = (p["version"], tuple(p["state"].tolist()), p["gauss"])
    random.setstate(p)
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# Checkpoints of train.py before their RNG states were tensors hold numpy's as an array: the
# numpy globals its unpickling needs (an array of plain numbers; nothing else is allowed).
_OLD_CHECKPOINT_GLOBALS = [np.dtype, np.ndarray, np.dtypes.UInt32DType,
                           (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct]
_NEEDS = {"last": ("model", "iteration", "optimizer", "rng"), "final": ("model",)}


def read_checkpoint(path: Path, kind: str, mmap: bool = False, hint: str = "delete it to train that stage again"):
    """A ``<stage>_<kind>.pt`` of train.py (kind: last | final), read with ``weights_only=True``
    (tensors and plain data: resume, eval and predict all read checkpoints through here), or a
    ConfigError saying why not: empty or truncated (a killed copy), not a torch file, not a
    train.py checkpoint. ``hint``: what the user can do about an unreadable file."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if size == 0:
        raise ConfigError(f"checkpoint {path} is empty (0 bytes){tail}")
    try:
        with torch.serialization.safe_globals(_OLD_CHECKPOINT_GLOBALS):
            st = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - truncated, not a zip, other objects pickled ...
        raise ConfigError(f"checkpoint {path} is truncated or not a PyTorch file of tensors and plain data "
                          f"({one_line(exc)}){tail}") from None
    missing = [k for k in _NEEDS[kind] if not isinstance(st, dict) or k not in st]
    if missing or not isinstance(st["model"], dict):
        raise ConfigError(f"{path} is not a <stage>_{kind}.pt checkpoint of train.py "
                          f"(no {' or '.join(repr(k) for k in missing or ['model'])})")
    return st


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
