"""Pair-wise similarity distillation (SF pair-wise / PF, eq. 2) forward+backward: naive
(materialises the N x N maps) vs gram (C x C identity, mse) vs blocked (each kernel backend),
same inputs, time and peak extra memory in one run. Self-similarity of B=1 feature maps,
student (C_s) vs teacher (C_t).

GPU runs also time the Triton kernels at each ``precision`` (``blocked-triton`` = ``"ieee"``,
``blocked-triton-tf32``, ``blocked-triton-bf16``) and record the executed FLOP rate of the
blocked kernels (:func:`executed_flops`) beside the device's dense tensor-core peak for that
precision (:data:`DENSE_PEAK_TFLOPS`), and the peak extra memory as a multiple of the inputs'
size. An
implementation that runs out of memory is recorded as ``oom`` (CUDA: caught in process; CPU:
the RSS child fails and the timing is skipped).

    pytest benchmarks/bench_pairwise.py --benchmark-json=out.json
"""
from __future__ import annotations

import pytest
import torch

import tcloss
from conftest import HAS_CUDA, backends_for, cpu_peak_extra, cuda_peak_extra, rss_rise, sync

CHANNELS = [(19, 19), (128, 512)]  # predictions, features
CPU_N = [576, 2304]
GPU_N = [2304, 8192, 32768]
GPU_PRECISIONS = ["ieee", "tf32", "bf16"]  # of the blocked-triton rows
# Dense (no sparsity) tensor-core peak per device, TFLOP/s, from NVIDIA's H200 datasheet (the
# H200 SXM: TF32 989.4 and BF16 1978.9 with sparsity, half that dense). "ieee" runs 3xTF32: three
# TF32 MMAs per product, measured against the TF32 peak (its ceiling is a third of it).
DENSE_PEAK_TFLOPS = {"NVIDIA H200": {"ieee": 494.7, "tf32": 494.7, "bf16": 989.4}}
# Backward tile GEMMs of the blocked kernels on a self-similarity, in units of 2 N^2 C: the S,T
# tiles recomputed (C_s + C_t) per pass, and G multiplied by student rows. triton: one pass, and
# by symmetry one G GEMM per tile (G_ij + G_ji); cpp: one pass, G into both sides; cuda: one
# pass per owner side (rows, then columns), every tile recomputed twice.
BACKWARD_GEMMS = {
    "triton": lambda Cs, Ct: (Cs + Ct) + Cs,
    "cpp": lambda Cs, Ct: (Cs + Ct) + 2 * Cs,
    "cuda": lambda Cs, Ct: 2 * ((Cs + Ct) + Cs),
}


def make(N, Cs, Ct, device, dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(1, Cs, N, device=device, dtype=dtype, generator=g).requires_grad_()
    t = torch.randn(1, Ct, N, device=device, dtype=dtype, generator=g)
    return s, t


def parse(impl):
    """``algorithm[-backend[-precision]]`` -> (algorithm, backend, precision)."""
    algorithm, backend, precision = (impl.split("-") + ["auto", "ieee"][impl.count("-"):])[:3]
    return algorithm, backend, precision


def fwd_bwd(impl, loss, inputs):
    s, t = inputs
    s.grad = None
    algorithm, backend, precision = parse(impl)
    out = tcloss.pairwise_similarity_loss(s, t, loss=loss, algorithm=algorithm, backend=backend, precision=precision)
    out.backward()
    return out


def cpu_rss_fwd_bwd(impl, loss, N, Cs, Ct):
    """Entry point for the isolated child process (see conftest.cpu_peak_extra)."""
    inputs = make(N, Cs, Ct, "cpu")
    return rss_rise(lambda: fwd_bwd(impl, loss, inputs))


def executed_flops(impl, loss, N, Cs, Ct):
    """Multiply-adds x 2 of the blocked kernels on the self-similarity of N pixels: the forward's
    S,T tiles, 2 N^2 (C_s + C_t), and the backward's (BACKWARD_GEMMS)."""
    algorithm, backend, _ = parse(impl)
    if algorithm != "blocked":
        return None
    return 2 * float(N) * N * ((Cs + Ct) + BACKWARD_GEMMS[backend](Cs, Ct))


def _impls(device, loss):
    names = ["naive"] + (["gram"] if loss == "mse" else [])
    for b in backends_for("pairwise_similarity_loss", device):
        if b == "triton":
            names += ["blocked-triton"] + [f"blocked-triton-{p}" for p in GPU_PRECISIONS if p != "ieee"]
        elif b != "reference":
            names.append(f"blocked-{b}")
    return names


def _params():
    out = []
    for loss in ("mse", "kl"):
        for (cs, ct) in CHANNELS:
            for n in CPU_N:
                for impl in _impls("cpu", loss):
                    out.append(pytest.param("cpu", impl, loss, n, cs, ct, id=f"cpu-{loss}-{impl}-N{n}-C{cs}x{ct}"))
            if HAS_CUDA:
                for n in GPU_N:
                    for impl in _impls("cuda", loss):
                        out.append(pytest.param("cuda", impl, loss, n, cs, ct,
                                                id=f"cuda-{loss}-{impl}-N{n}-C{cs}x{ct}"))
    return out


@pytest.mark.parametrize("device,impl,loss,N,Cs,Ct", _params())
def test_pairwise_fwd_bwd(benchmark, device_info, device, impl, loss, N, Cs, Ct):
    inputs = make(N, Cs, Ct, device)
    in_bytes = sum(x.numel() * x.element_size() for x in inputs)
    benchmark.group = f"pairwise {loss} fwd+bwd {device} N={N} C={Cs}x{Ct}"
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(op="pairwise_similarity_loss", pass_="fwd+bwd", impl=impl, loss=loss, N=N, Cs=Cs,
                                Ct=Ct, device=device, input_bytes=in_bytes)

    def step():
        fwd_bwd(impl, loss, inputs)
        sync(device)

    if device == "cuda":
        try:
            step()  # warm-up (compiles Triton kernels, allocator)
            peak = cuda_peak_extra(step)
        except torch.cuda.OutOfMemoryError:
            inputs[0].grad = None
            torch.cuda.empty_cache()
            benchmark.extra_info["peak_extra_bytes"] = "oom"
            pytest.skip("out of memory (recorded)")
    else:
        step()
        peak = cpu_peak_extra("bench_pairwise", "cpu_rss_fwd_bwd", impl, loss, N, Cs, Ct)
        if peak is None:
            benchmark.extra_info["peak_extra_bytes"] = "oom"
    if peak is not None:
        benchmark.extra_info["peak_extra_bytes"] = peak
        benchmark.extra_info["peak_over_inputs"] = peak / in_bytes
    benchmark.pedantic(step, rounds=5 if device == "cuda" else 3, warmup_rounds=1 if device == "cuda" else 0)
    fl = executed_flops(impl, loss, N, Cs, Ct)
    if fl is not None:
        benchmark.extra_info["executed_TFLOPs"] = fl / benchmark.stats.stats.min / 1e12
        peak = DENSE_PEAK_TFLOPS.get(device_info.get("gpu"), {}).get(parse(impl)[2]) if device == "cuda" else None
        if peak:
            benchmark.extra_info["dense_peak_TFLOPs"] = peak
