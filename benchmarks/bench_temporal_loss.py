"""Temporal loss (eq. 1) forward+backward: reference vs every available kernel backend, same
inputs, time and peak extra memory in one run. GPU runs also time the forward alone and report
its achieved bandwidth (bytes of the inputs read once / time) against the measured copy
bandwidth of the device.

On the CPU every case runs with 1 thread, 2 threads, and 2 threads beside a busy process (one
core's worth of other work), forward+backward and forward alone (forward+backward's peak extra
memory with 1 and with 2 threads: the cpp kernel takes a window buffer per thread), each row
with its speed of light: the compulsory bytes of the call (inputs read once; gradients written
once) over this machine's copy bandwidth measured with the same thread count.

    pytest benchmarks/bench_temporal_loss.py --benchmark-json=out.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tcloss
from conftest import (HAS_CUDA, backend_params, backends_for, busy_neighbour, cpu_copy_bandwidth, cpu_peak_extra,
                      peak_extra, rss_rise, sync)

CPU_SHAPES = [(2, 19, 256, 512), (1, 19, 512, 1024)]
GPU_SHAPES = [(8, 19, 512, 1024), (8, 19, 769, 769)]


def make(shape, device, dtype=torch.float32, seed=0, flow="iid"):
    """Inputs of the benchmark (pred_t, pred_tk and flow require grad). ``flow="iid"``:
    independent N(0, 8^2) displacements per pixel, the worst case for the gathers (the suite's);
    ``"smooth"``: a random field at 1/32 resolution upsampled bilinearly, 8 px standard
    deviation, as optical flow of real video is locally smooth."""
    B, C, H, W = shape
    g = torch.Generator(device=device).manual_seed(seed)
    pt = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g)
    ptk = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g)
    if flow == "iid":
        fl = torch.randn(B, 2, H, W, device=device, generator=g) * 8
    else:
        coarse = torch.randn(B, 2, max(H // 32, 2), max(W // 32, 2), device=device, generator=g) * 8
        fl = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False).contiguous()
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


def cpu_rss_fwd_bwd(backend, shape, threads=None):
    """Entry point for the isolated child process (see conftest.cpu_peak_extra)."""
    if threads is not None:
        torch.set_num_threads(threads)
    inputs = make(tuple(shape), "cpu")
    return rss_rise(lambda: fwd_bwd(backend, inputs))


def compulsory_bytes(inputs, backward):
    """Bytes a call must move at least: the forward reads the inputs once; the backward (a
    separate call: autograd keeps nothing of the forward) reads them again and writes the
    gradients of pred_t, pred_tk and flow once."""
    n = sum(t.numel() * t.element_size() for t in inputs)
    return n + (n + sum(t.numel() * t.element_size() for t in inputs[:3]) if backward else 0)


@pytest.mark.parametrize("device,backend,shape", backend_params("temporal_loss", [], GPU_SHAPES))
def test_temporal_loss_fwd_bwd(benchmark, device_info, device, backend, shape):
    inputs = make(shape, device)
    benchmark.group = f"temporal_loss fwd+bwd {device} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(op="temporal_loss", pass_="fwd+bwd", backend=backend, shape=list(shape), device=device,
                                sol_bytes=compulsory_bytes(inputs, True))

    def step():
        fwd_bwd(backend, inputs)
        sync(device)

    step()  # warm-up (compiles Triton kernels, allocator)
    benchmark.extra_info["peak_extra_bytes"] = peak_extra(device, step, "bench_temporal_loss", "cpu_rss_fwd_bwd",
                                                          backend, shape)
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)


CPU_THREADS = ["1", "2", "2+busy"]


@pytest.mark.parametrize("pass_", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("threads", CPU_THREADS)
@pytest.mark.parametrize("device,backend,shape", backend_params("temporal_loss", CPU_SHAPES, []))
def test_temporal_loss_cpu(benchmark, device_info, device, backend, shape, threads, pass_):
    inputs = make(shape, "cpu")
    nthreads = int(threads[0])
    benchmark.group = f"temporal_loss {pass_} cpu {'x'.join(map(str, shape))} threads={threads}"
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(op="temporal_loss", pass_=pass_, backend=backend, shape=list(shape), device="cpu",
                                threads=threads, sol_bytes=compulsory_bytes(inputs, pass_ == "fwd+bwd"))
    saved = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        benchmark.extra_info["copy_bandwidth_GBps"] = cpu_copy_bandwidth() / 1e9
        if pass_ == "fwd+bwd":
            step = lambda: fwd_bwd(backend, inputs)  # noqa: E731
            if not threads.endswith("busy"):  # the cpp kernel takes a window buffer per thread
                benchmark.extra_info["peak_extra_bytes"] = cpu_peak_extra("bench_temporal_loss", "cpu_rss_fwd_bwd",
                                                                          backend, list(shape), nthreads)
        else:
            detached = [t.detach() for t in inputs]

            def step():
                with torch.no_grad():
                    tcloss.temporal_loss(*detached, backend=backend)
        step()
        with busy_neighbour(threads.endswith("busy")):
            benchmark.pedantic(step, rounds=10, warmup_rounds=1)  # this shared VM varies 20 % run to run
    finally:
        torch.set_num_threads(saved)


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
