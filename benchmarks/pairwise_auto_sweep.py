"""The measurements behind ``algorithm="auto"`` of the pair-wise loss on the CPU
(tcloss/_backends/pairwise_similarity_loss.py: choose_algorithm): forward+backward of a self-similarity of B=1,
naive vs blocked-cpp (vs gram for mse), over N and (C_s, C_t), min of 5 interleaved rounds.

    python benchmarks/pairwise_auto_sweep.py [threads] > benchmarks/results/cpu/pairwise_auto.md
"""
from __future__ import annotations

import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pairwise import fwd_bwd, make  # noqa: E402

CHANNELS = [(19, 19), (64, 64), (128, 512)]
NS = [256, 576, 1024, 2304, 4096]


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"Machine: {platform.processor() or platform.machine()}, {threads} thread(s), torch {torch.__version__}; "
          "min of 5 rounds, fwd+bwd, ms\n")
    print("| loss | C_s/C_t | N | naive | blocked-cpp | gram | blocked / naive | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    from tcloss._backends import pairwise_similarity_loss as pw
    for loss in ("kl", "mse"):
        for Cs, Ct in CHANNELS:
            for N in NS:
                inputs = make(N, Cs, Ct, "cpu")
                impls = ["naive", "blocked-cpp"] + (["gram"] if loss == "mse" else [])
                for impl in impls:
                    fwd_bwd(impl, loss, inputs)
                best = dict.fromkeys(impls, float("inf"))
                for _ in range(5):
                    for impl in impls:
                        t = time.perf_counter()
                        fwd_bwd(impl, loss, inputs)
                        best[impl] = min(best[impl], time.perf_counter() - t)
                ms = {k: v * 1e3 for k, v in best.items()}
                pick = pw.choose_algorithm("auto", loss, "cpp", "cpu", N, N, Cs, Ct)
                gram = f"{ms['gram']:.2f}" if "gram" in ms else "–"
                print(f"| {loss} | {Cs}/{Ct} | {N} | {ms['naive']:.2f} | {ms['blocked-cpp']:.2f} | {gram} | "
                      f"{ms['blocked-cpp'] / ms['naive']:.2f} | {pick} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
