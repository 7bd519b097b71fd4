"""Per-frame inference speed of the students at full Cityscapes resolution (1024x2048, batch 1),
fp32 and bf16 autocast, on the current GPU: the measurement of the paper's Table 5 (MobileNetV2
20.8 fps, PSPNet18 9.5 fps on a GTX 1080Ti). Random weights (speed does not depend on them).

    python3 scripts/inference_fps.py [--iters 20] [--size 1024 2048]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models import build_segmentation_model  # noqa: E402
from trainer.engine import measure_fps  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--size", type=int, nargs=2, default=[1024, 2048])
    ap.add_argument("--models", nargs="+", default=["pspnet18", "mobilenetv2", "hrnet_w18_small"])
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, input 1x3x{a.size[0]}x{a.size[1]}, "
          f"mean over {a.iters} frames after warm-up")
    print(f"{'model':<16} {'fp32 fps':>9} {'bf16 fps':>9}")
    for name in a.models:
        model = build_segmentation_model(name, 19).to(dev).eval()
        fps = []
        for amp in (False, True):
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with ctx:
                fps.append(measure_fps(model, tuple(a.size), dev, a.iters))
        print(f"{name:<16} {fps[0]:9.1f} {fps[1]:9.1f}", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
