"""Fused ConvLSTM cell (eq. 6 of the supplement): reference (unfused PyTorch pointwise ops) vs every
available kernel backend, same inputs, in one run.

* ``test_cell_fwd_bwd``: the pointwise cell alone (gates, c, per-channel peepholes -> h', c', and
  the backward into all three), time + peak extra memory + bytes saved for backward.
* ``test_step_fwd_bwd``: one ConvLSTM step, conv over cat(x, h) (cuDNN/ATen) + cell, forward and
  backward into x, the state and every parameter.
* ``test_cell_forward_bandwidth`` (GPU): forward alone, achieved bandwidth (gates + c read, h' + c'
  written, each once) against the measured copy bandwidth.

Shapes: the MF path (a one-channel N x N self-similarity image, Hd = 4; N = 48^2 = 2304 on the GPU)
and a feature-map path (Hd = 64, 96 x 96). CPU shapes are scaled down where the conv would dominate.

``saved_bytes``: unique storage bytes that autograd keeps between forward and backward (through
``saved_tensors_hooks``), inputs included: the fused cell keeps its inputs (gates, c) and nothing
else; the reference keeps c, i, f, tanh(g), c', o, tanh(c').

    pytest benchmarks/bench_convlstm.py --benchmark-json=out.json
"""
from __future__ import annotations

import pytest
import torch

import tcloss
from conftest import HAS_CUDA, backend_params, backends_for, peak_extra, rss_rise, sync

# (path, B, Hd, H, W)
CPU_CELL = [("mf", 8, 4, 576, 576), ("feat", 8, 64, 96, 96)]
CPU_STEP = [("mf", 2, 4, 576, 576), ("feat", 2, 32, 48, 48)]
GPU_CELL = [("mf", 8, 4, 2304, 2304), ("feat", 8, 64, 96, 96)]
GPU_STEP = GPU_CELL


def _name(shape):
    return f"{shape[0]}-B{shape[1]}-Hd{shape[2]}-{shape[3]}x{shape[4]}"


def make_cell(shape, device, dtype=torch.float32, seed=0):
    _, B, Hd, H, W = shape
    g = torch.Generator(device=device).manual_seed(seed)
    gates = torch.randn(B, 4 * Hd, H, W, device=device, dtype=dtype, generator=g).requires_grad_(True)
    c = torch.randn(B, Hd, H, W, device=device, dtype=dtype, generator=g).requires_grad_(True)
    peep = tuple((torch.randn(Hd, 1, 1, device=device, generator=g) * 0.1).requires_grad_(True) for _ in range(3))
    gh = torch.randn(B, Hd, H, W, device=device, dtype=dtype, generator=g)
    gc = torch.randn(B, Hd, H, W, device=device, dtype=dtype, generator=g)
    return gates, c, peep, gh, gc


def cell_fwd_bwd(backend, inputs):
    gates, c, peep, gh, gc = inputs
    for t in (gates, c) + peep:
        t.grad = None
    h_new, c_new = tcloss.convlstm_cell(gates, c, peephole=peep, backend=backend)
    torch.autograd.backward((h_new, c_new), (gh, gc))


def make_step(shape, device, backend, seed=0):
    path, B, Hd, H, W = shape
    torch.manual_seed(seed)
    cin = 1 if path == "mf" else Hd
    cell = tcloss.nn.ConvLSTMCell(cin, Hd, 3, peephole=True, backend=backend).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, cin, H, W, device=device, generator=g).requires_grad_(True)
    h0 = torch.randn(B, Hd, H, W, device=device, generator=g)
    c0 = torch.randn(B, Hd, H, W, device=device, generator=g)
    gh = torch.randn(B, Hd, H, W, device=device, generator=g)
    gc = torch.randn(B, Hd, H, W, device=device, generator=g)
    return cell, x, h0, c0, gh, gc


def step_fwd_bwd(inputs):
    cell, x, h0, c0, gh, gc = inputs
    x.grad = None
    cell.zero_grad(set_to_none=True)
    h, c = cell(x, (h0, c0))
    torch.autograd.backward((h, c), (gh, gc))


def saved_bytes(forward) -> int:
    """Unique storage bytes packed for backward while ``forward()`` runs (kept alive by its result)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def cpu_rss_cell(backend, shape):
    """Entry points for the isolated child process (see conftest.cpu_peak_extra)."""
    inputs = make_cell(tuple(shape), "cpu")
    return rss_rise(lambda: cell_fwd_bwd(backend, inputs))


def cpu_rss_step(backend, shape):
    inputs = make_step(tuple(shape), "cpu", backend)
    return rss_rise(lambda: step_fwd_bwd(inputs))


def _record(benchmark, device_info, op, device, backend, shape):
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(op=op, pass_="fwd+bwd", backend=backend, shape=list(shape[1:]), path=shape[0],
                                device=device)


@pytest.mark.parametrize("device,backend,shape", backend_params("convlstm_cell", CPU_CELL, GPU_CELL, _name))
def test_cell_fwd_bwd(benchmark, device_info, device, backend, shape):
    inputs = make_cell(shape, device)
    benchmark.group = f"convlstm_cell fwd+bwd {device} {_name(shape)}"
    _record(benchmark, device_info, "convlstm_cell", device, backend, shape)
    gates, c, peep = inputs[:3]
    benchmark.extra_info["saved_bytes"] = saved_bytes(
        lambda: tcloss.convlstm_cell(gates, c, peephole=peep, backend=backend))

    def step():
        cell_fwd_bwd(backend, inputs)
        sync(device)

    step()  # warm-up (compiles Triton kernels, allocator)
    benchmark.extra_info["peak_extra_bytes"] = peak_extra(device, step, "bench_convlstm", "cpu_rss_cell", backend, shape)
    benchmark.pedantic(step, rounds=10 if device == "cuda" else 5, warmup_rounds=1)


@pytest.mark.parametrize("device,backend,shape", backend_params("convlstm_cell", CPU_STEP, GPU_STEP, _name))
def test_step_fwd_bwd(benchmark, device_info, device, backend, shape):
    inputs = make_step(shape, device, backend)
    benchmark.group = f"convlstm step (conv + cell) fwd+bwd {device} {_name(shape)}"
    _record(benchmark, device_info, "convlstm_step", device, backend, shape)
    cell, x, h0, c0 = inputs[:4]
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: cell(x, (h0, c0)))

    def step():
        step_fwd_bwd(inputs)
        sync(device)

    step()
    benchmark.extra_info["peak_extra_bytes"] = peak_extra(device, step, "bench_convlstm", "cpu_rss_step", backend, shape)
    benchmark.pedantic(step, rounds=10 if device == "cuda" else 3, warmup_rounds=1)


@pytest.mark.skipif(not HAS_CUDA, reason="bandwidth is measured on a GPU")
@pytest.mark.parametrize("backend", backends_for("convlstm_cell", "cuda") if HAS_CUDA else [])
@pytest.mark.parametrize("shape", GPU_CELL, ids=_name)
def test_cell_forward_bandwidth(benchmark, device_info, backend, shape):
    gates, c, peep, _, _ = [t.detach() if isinstance(t, torch.Tensor) else t for t in make_cell(shape, "cuda")]
    peep = tuple(w.detach() for w in peep)
    nbytes = (gates.numel() + 3 * c.numel()) * gates.element_size()  # gates, c in; h', c' out
    benchmark.group = f"convlstm_cell forward cuda {_name(shape)}"
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(op="convlstm_cell", pass_="fwd", backend=backend, shape=list(shape[1:]),
                                path=shape[0], device="cuda", bytes_min=nbytes)

    def step():
        with torch.no_grad():
            tcloss.convlstm_cell(gates, c, peephole=peep, backend=backend)
        torch.cuda.synchronize()

    step()
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    t = benchmark.stats.stats.mean
    benchmark.extra_info["achieved_GBps"] = nbytes / t / 1e9
    if "copy_bandwidth_GBps" in device_info:
        benchmark.extra_info["fraction_of_copy_bw"] = nbytes / t / 1e9 / device_info["copy_bandwidth_GBps"]
