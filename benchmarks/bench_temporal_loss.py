"""Temporal loss (eq. 1) forward+backward: reference vs every available kernel backend, same
inputs, time and peak extra memory in one run. GPU runs also time the forward alone and report
its achieved bandwidth (bytes of the inputs read once / time) against the measured copy
bandwidth of the device.

    pytest benchmarks/bench_temporal_loss.py --benchmark-json=out.json
"""
from __future__ import annotations

import pytest
import torch

import tcloss
from conftest import HAS_CUDA, backend_params, backends_for, peak_extra, rss_rise, sync

CPU_SHAPES = [(2, 19, 256, 512), (1, 19, 512, 1024)]
GPU_SHAPES = [(8, 19, 512, 1024), (8, 19, 769, 769)]


def make(shape, device, dtype=torch.float32, seed=0):
    B, C, H, W = shape
    g = torch.Generator(device=device).manual_seed(seed)
    pt = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g)
    ptk = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g)
    fl = torch.randn(B, 2, H, W, device=device, generator=g) * 8
    it = torch.rand(B, 3, H, W, device=device, generator=g)
    itk = torch.rand(B, 3, H, W, device=device, generator=g)
    return pt.requires_grad_(True), ptk.requires_grad_(True), fl.requires_grad_(True), it, itk


def fwd_bwd(backend, inputs):
    pt, ptk, fl, it, itk = inputs
    for t in (pt, ptk, fl):
        t.grad = None
    loss = tcloss.temporal_loss(pt, ptk, fl, it, itk, backend=backend)
    loss.backward()
    return loss


def cpu_rss_fwd_bwd(backend, shape):
    """Entry point for the isolated child process (see conftest.cpu_peak_extra)."""
    inputs = make(tuple(shape), "cpu")
    return rss_rise(lambda: fwd_bwd(backend, inputs))


@pytest.mark.parametrize("device,backend,shape", backend_params("temporal_loss", CPU_SHAPES, GPU_SHAPES))
def test_temporal_loss_fwd_bwd(benchmark, device_info, device, backend, shape):
    inputs = make(shape, device)
    benchmark.group = f"temporal_loss fwd+bwd {device} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(op="temporal_loss", pass_="fwd+bwd", backend=backend, shape=list(shape), device=device)

    def step():
        fwd_bwd(backend, inputs)
        sync(device)

    step()  # warm-up (compiles Triton kernels, allocator)
    benchmark.extra_info["peak_extra_bytes"] = peak_extra(device, step, "bench_temporal_loss", "cpu_rss_fwd_bwd",
                                                          backend, shape)
    benchmark.pedantic(step, rounds=10 if device == "cuda" else 3, warmup_rounds=1 if device == "cuda" else 0)


@pytest.mark.skipif(not HAS_CUDA, reason="bandwidth is measured on a GPU")
@pytest.mark.parametrize("backend", backends_for("temporal_loss", "cuda") if HAS_CUDA else [])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_temporal_loss_forward_bandwidth(benchmark, device_info, backend, shape):
    inputs = [t.detach() for t in make(shape, "cuda")]
    B, C, H, W = shape
    # bytes that must be read at least once: both predictions, flow and both images
    nbytes = sum(t.numel() * t.element_size() for t in inputs)
    benchmark.group = f"temporal_loss forward cuda {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(op="temporal_loss", pass_="fwd", backend=backend, shape=list(shape), device="cuda",
                                bytes_min=nbytes)

    def step():
        with torch.no_grad():
            tcloss.temporal_loss(*inputs, backend=backend)
        torch.cuda.synchronize()

    step()
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    t = benchmark.stats.stats.mean
    benchmark.extra_info["achieved_GBps"] = nbytes / t / 1e9
    if "copy_bandwidth_GBps" in device_info:
        benchmark.extra_info["fraction_of_copy_bw"] = nbytes / t / 1e9 / device_info["copy_bandwidth_GBps"]
