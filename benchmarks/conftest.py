"""Helpers shared by the benchmark suites: device selection, synchronised timing, peak memory.

Peak memory: on CUDA, ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was
allocated before the step (the step's extra memory: activations, saved tensors, gradients);
on CPU, the rise of the peak resident set of an isolated child process over its level once the
inputs exist (``ru_maxrss``), so one benchmark cannot hide another's allocations.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

import tcloss

HAS_CUDA = torch.cuda.is_available()


def backends_for(op: str, device: str) -> list[str]:
    names = ["reference"]
    for b in ("cpp", "cuda", "triton"):
        if tcloss.backend_status(b, op, device)[0] and not (b == "triton" and device == "cpu"):
            names.append(b)
    return names


def backend_params(op: str, cpu_shapes, gpu_shapes, name=lambda s: "x".join(map(str, s))) -> list:
    """pytest params (device, backend, shape): every backend of ``op`` on the CPU shapes, and on
    the GPU shapes when CUDA is present."""
    out = []
    for device, shapes in (("cpu", cpu_shapes), ("cuda", gpu_shapes if HAS_CUDA else [])):
        for b in backends_for(op, device) if shapes else []:
            out += [pytest.param(device, b, s, id=f"{device}-{b}-{name(s)}") for s in shapes]
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_peak_extra(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak_extra(module: str, func: str, *args) -> int | None:
    """Run ``module.func(*args)`` in a fresh interpreter; it returns the peak RSS rise in bytes."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import {module} as m; "
            f"print(json.dumps(m.{func}(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_extra(device: str, step, module: str, worker: str, backend: str, shape) -> int | None:
    """Peak extra memory of one ``step``: the CUDA allocator's peak over its start on a GPU; on
    the CPU the peak RSS rise of ``module.worker(backend, list(shape))`` in a fresh interpreter."""
    if device == "cuda":
        return cuda_peak_extra(step)
    return cpu_peak_extra(module, worker, backend, list(shape))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def rss_rise(step) -> int:
    """Peak-RSS rise (bytes) of ``step()`` over the current RSS (meant for a fresh child process).

    Linux: the high-water mark VmHWM is reset through /proc/self/clear_refs ("5"), so the peak
    of the step alone is read, not one left by imports or input creation.
    """
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) * 1024


def cpu_copy_bandwidth() -> float:
    """Measured CPU copy bandwidth (bytes/s, read + write) of a 256 MiB buffer with the current
    torch thread count: best of 6, measured once per thread count in a session."""
    n = torch.get_num_threads()
    if n not in _CPU_COPY_BW:
        _CPU_COPY_BW[n] = _measure_cpu_copy()
    return _CPU_COPY_BW[n]


_CPU_COPY_BW: dict[int, float] = {}


def _measure_cpu_copy() -> float:
    import time
    x = torch.ones(1 << 26)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


@contextlib.contextmanager
def busy_neighbour(on: bool = True):
    """Another process spinning on one core for the duration (how a kernel behaves when the
    machine is shared: data loaders, a second job)."""
    if not on:
        yield
        return
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        p.kill()
        p.wait()


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth (bytes/s, read + write): the practical ceiling."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(10):
        y.copy_(x)
    ev1.record()
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() * 4 / (ev0.elapsed_time(ev1) / 1e3)


@pytest.fixture(scope="session")
def device_info():
    info = {"torch": torch.__version__, "backends": tcloss.available_backends()}
    if HAS_CUDA:
        info["gpu"] = torch.cuda.get_device_name()
        info["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info
