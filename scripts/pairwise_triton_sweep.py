"""Time the Triton pair-wise kernels' tile configurations on a GPU: forward and backward apart,
per precision, on self-similarities at the shapes of the benchmark's targets.

Every configuration (tile rows, columns, channels, num_warps, num_stages; the launchers' choice
is ``pairwise_similarity_loss_triton._blocks``) is compiled first in parallel processes, which fill Triton's disk
cache at the same specialisation (N divisible by 16, same channel counts), then timed one at a
time in this process: median of ``triton.testing.do_bench``; beside them, the naive PyTorch
fwd+bwd (materialises the N x N maps) on the same shape. Each row also gives the loss's
relative difference to the first configuration at the same precision (a broken tile shows
there) and the executed TFLOP/s (bench_pairwise.executed_flops).

    python3 scripts/pairwise_triton_sweep.py [--out FILE] [--workers 12] [--precisions ieee,tf32,bf16]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]  # tcloss and bench_pairwise, here and in the workers

# (BLOCK rows, BLOCK columns, BLOCK channels, num_warps, num_stages)
CONFIGS = [
    (64, 64, 16, 4, 1), (64, 64, 64, 4, 2), (128, 64, 16, 4, 1), (128, 64, 16, 8, 1),
    (64, 128, 16, 4, 1), (64, 32, 16, 4, 1), (128, 64, 64, 8, 2), (64, 128, 64, 4, 2),
    (128, 128, 64, 8, 2), (64, 64, 64, 4, 3), (64, 64, 128, 4, 2), (128, 64, 32, 4, 3),
]
SHAPES = [("kl", 32768, 19, 19), ("kl", 8192, 128, 512)]


def _calls(cfg, loss, N, Cs, Ct, prec, seed=0):
    from tcloss._backends import pairwise_similarity_loss_triton as P
    P._blocks = lambda *args: cfg
    g = torch.Generator(device="cuda").manual_seed(seed)
    sa = torch.randn(1, Cs, N, device="cuda", generator=g)
    ta = torch.randn(1, Ct, N, device="cuda", generator=g)
    L = 0 if loss == "mse" else 1
    one = torch.ones((), device="cuda")
    fwd = lambda: P.pairwise_similarity_loss_fwd_triton(sa, ta, None, None, L, 1.0, 1e-8, False, prec)  # noqa: E731
    value, stats = fwd()
    bwd = lambda: P.pairwise_similarity_loss_bwd_triton(one, sa, ta, None, None, stats, L, 1.0, 1e-8, False, prec,  # noqa: E731
                                                     True, False)
    return fwd, bwd, value.item()


def _compile(args):
    cfg, loss, Cs, Ct, prec = args
    try:
        fwd, bwd, _ = _calls(cfg, loss, 2048, Cs, Ct, prec)
        bwd()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported per configuration
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--precisions", default="ieee,tf32,bf16")
    a = ap.parse_args()
    precisions = a.precisions.split(",")
    import triton
    import tcloss
    from bench_pairwise import executed_flops
    jobs = [(cfg, loss, Cs, Ct, prec) for loss, _, Cs, Ct in SHAPES for prec in precisions for cfg in CONFIGS]
    with cf.ProcessPoolExecutor(a.workers, mp_context=mp.get_context("spawn")) as ex:
        errors = dict(zip(jobs, ex.map(_compile, jobs)))
    lines = [f"# Triton pair-wise tile sweep: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}; self-similarity, B=1, median of do_bench\n"]
    for loss, N, Cs, Ct in SHAPES:
        lines += [f"\n## {loss} N={N} C {Cs}/{Ct}\n",
                  "| BM, BN, BK, warps, stages | precision | fwd ms | bwd ms | fwd+bwd ms | TFLOP/s | loss vs first |",
                  "|---|---|---|---|---|---|---|"]
        fl = executed_flops("blocked-triton", loss, N, Cs, Ct)
        s, t = torch.randn(1, Cs, N, device="cuda", requires_grad=True), torch.randn(1, Ct, N, device="cuda")
        naive = lambda: tcloss.pairwise_similarity_loss(s, t, loss=loss, algorithm="naive").backward()  # noqa: E731
        tn = triton.testing.do_bench(naive, warmup=10, rep=100, grad_to_none=[s], return_mode="median")
        lines.append(f"| naive (PyTorch autograd) | fp32 | | | {tn:.2f} | | |")
        del s, t
        for prec in precisions:
            first = None
            for cfg in CONFIGS:
                err = errors[(cfg, loss, Cs, Ct, prec)]
                if err:
                    lines.append(f"| {cfg} | {prec} | {err} | | | | |")
                    continue
                fwd, bwd, v = _calls(cfg, loss, N, Cs, Ct, prec)
                tf = triton.testing.do_bench(fwd, warmup=10, rep=60, return_mode="median")
                tb = triton.testing.do_bench(bwd, warmup=10, rep=60, return_mode="median")
                first = v if first is None else first
                lines.append(f"| {cfg} | {prec} | {tf:.2f} | {tb:.2f} | {tf + tb:.2f} | {fl / (tf + tb) / 1e9:.1f} "
                             f"| {abs(v - first) / abs(first):.1e} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
