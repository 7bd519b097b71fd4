"""Times the temporal loss on the GPU per backend, pass, dtype and flow field, with CUDA events
(median of --iters after warm-up), and prints each time beside its speed of light (compulsory
bytes / the device's measured copy bandwidth). --once runs one forward+backward of each
backend and nothing else (for ncu).

Flows: "iid" is the benchmark suite's (independent N(0, 8^2) pixels per pixel: the worst case
for the gathers); "smooth" is a random field at 1/32 resolution upsampled bilinearly, 8 px
standard deviation, as optical flow of real video is locally smooth.

    python3 scripts/profile_temporal_loss.py [--shape 8 19 512 1024] [--once]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

import tcloss


def make(shape, flow, dtype, seed=0):
    B, C, H, W = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    pt = torch.randn(B, C, H, W, device="cuda", generator=g).to(dtype)
    ptk = torch.randn(B, C, H, W, device="cuda", generator=g).to(dtype)
    if flow == "iid":
        fl = torch.randn(B, 2, H, W, device="cuda", generator=g) * 8
    else:
        coarse = torch.randn(B, 2, max(H // 32, 2), max(W // 32, 2), device="cuda", generator=g) * 8
        fl = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False).contiguous()
    it = torch.rand(B, 3, H, W, device="cuda", generator=g)
    itk = torch.rand(B, 3, H, W, device="cuda", generator=g)
    return pt, ptk, fl, it, itk


def compulsory_bytes(inputs, backward):
    """Bytes a call must move at least: the forward reads the inputs once; the backward (a
    separate call: autograd keeps nothing of the forward) reads them again and writes the
    gradients of pred_t, pred_tk and flow once."""
    n = sum(t.numel() * t.element_size() for t in inputs)
    return n + (n + sum(t.numel() * t.element_size() for t in inputs[:3]) if backward else 0)


def copy_bandwidth():
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB, several times the L2
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); y.copy_(x); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return 2 * x.numel() / min(ts)


def time_it(fn, iters):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def step_for(backend, inputs, backward):
    pt, ptk, fl, it, itk = inputs
    if not backward:
        def fwd():
            with torch.no_grad():
                tcloss.temporal_loss(pt, ptk, fl, it, itk, backend=backend)
        return fwd
    leaves = [t.detach().requires_grad_(True) for t in (pt, ptk, fl)]

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        tcloss.temporal_loss(*leaves, it, itk, backend=backend).backward()
    return fwd_bwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=4, default=[8, 19, 512, 1024])
    ap.add_argument("--backends", nargs="+", default=["reference", "cuda", "triton"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--flows", nargs="+", default=["iid", "smooth"])
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--once", action="store_true")
    a = ap.parse_args()
    shape = tuple(a.shape)
    avail = tcloss.available_backends()["cuda"]
    backends = [b for b in a.backends if b in avail]
    if a.once:
        inputs = make(shape, "smooth", torch.float32)
        for b in backends:
            if b != "reference":
                step_for(b, inputs, True)()
        torch.cuda.synchronize()
        return
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s  shape {shape}  "
          f"(median of {a.iters} CUDA-event timings)")
    print(f"{'pass':<8} {'dtype':<9} {'flow':<7} {'backend':<10} {'ms':>8} {'SOL ms':>7} {'% SOL':>6} {'vs ref':>7}")
    for pass_, dt, flow in itertools.product(a.passes, a.dtypes, a.flows):
        inputs = make(shape, flow, getattr(torch, dt))
        sol = compulsory_bytes(inputs, pass_ != "fwd") / bw * 1e3
        ref = None
        for b in backends:
            try:
                ms = time_it(step_for(b, inputs, pass_ != "fwd"), a.iters)
            except Exception as exc:  # report and go on: one failing backend must not hide the others
                print(f"{pass_:<8} {dt:<9} {flow:<7} {b:<10} failed: {type(exc).__name__}: {exc}"[:300])
                continue
            ref = ms if b == "reference" else ref
            vs = f"{ref / ms:.2f}x" if ref else "-"
            print(f"{pass_:<8} {dt:<9} {flow:<7} {b:<10} {ms:8.3f} {sol:7.3f} {100 * sol / ms:5.1f}% {vs:>7}",
                  flush=True)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
