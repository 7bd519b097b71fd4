"""Demo of the fused temporal loss on real frames (until train.py exists, `make train` runs this).

Reads the FlyingChairs pairs of ../shared/data (ground-truth flow) when present, else makes a
synthetic shifted pair. A fixed random 1x1 "segmentation head" turns each frame into class
scores; the temporal loss with the true flow is far below the loss with no flow (the warp
explains the motion), and every available backend gives the same number.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: models/, videodata/
import tcloss  # noqa: E402
from models import read_flo  # noqa: E402
from videodata import read_image  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flyingchairs_examples"


def pairs(n):
    if DATA.is_dir():
        for k in range(n):
            flow = torch.from_numpy(read_flo(DATA / f"{k:07d}-gt.flo")).permute(2, 0, 1)[None].float()
            yield (f"flyingchairs {k:07d}", read_image(DATA / f"{k:07d}-img0.ppm")[None] / 255,
                   read_image(DATA / f"{k:07d}-img1.ppm")[None] / 255, flow)
    else:
        g = torch.Generator().manual_seed(0)
        img1 = torch.rand(1, 3, 96, 128, generator=g)
        img0 = torch.roll(img1, shifts=(-2, -3), dims=(2, 3))  # img0(y, x) = img1(y + 2, x + 3)
        flow = torch.zeros(1, 2, 96, 128)
        flow[:, 0], flow[:, 1] = 3, 2
        yield "synthetic shift", img0, img1, flow


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--classes", type=int, default=19)
    args = ap.parse_args()
    torch.manual_seed(0)
    head = torch.nn.Conv2d(3, args.classes, 1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("available backends:", tcloss.available_backends())
    for name, img0, img1, flow in pairs(args.pairs):
        with torch.no_grad():
            z0, z1 = head(img0 * 4), head(img1 * 4)
        print(f"\n{name}: {tuple(img0.shape[-2:])}, |flow| mean {flow.norm(dim=1).mean():.2f} px")
        for dev in devices:
            for backend in tcloss.available_backends()[dev]:
                if backend == "triton" and dev == "cpu":
                    continue
                a = [t.to(dev) for t in (z0, z1, flow, img0, img1)]
                t0 = time.perf_counter()
                with_flow = tcloss.temporal_loss(*a, backend=backend).item()
                dt = time.perf_counter() - t0
                no_flow = tcloss.temporal_loss(a[0], a[1], torch.zeros_like(a[2]), *a[3:], backend=backend).item()
                print(f"  {dev:4s} {backend:9s}  TL(true flow) = {with_flow:.5f}   TL(no flow) = {no_flow:.5f}"
                      f"   ({dt * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
