"""Times the temporal loss on the GPU per backend, pass, dtype and flow field, with CUDA events
(median of --iters after warm-up), and prints each time beside its speed of light. Inputs,
compulsory bytes and the copy bandwidth are the benchmark suite's (bench_temporal_loss.make and
compulsory_bytes, conftest.copy_bandwidth); flows "iid" (the suite's) and "smooth" (see make).
--once runs one forward+backward of each backend and nothing else (for ncu).

    python3 benchmarks/profile_temporal_loss.py [--shape 8 19 512 1024] [--once]
"""
from __future__ import annotations

import argparse
import itertools

import torch

import tcloss
from bench_temporal_loss import compulsory_bytes, make  # this folder is on sys.path when run as a script
from conftest import copy_bandwidth


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
        inputs = make(shape, "cuda", flow="smooth")
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
        inputs = make(shape, "cuda", getattr(torch, dt), flow=flow)
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
