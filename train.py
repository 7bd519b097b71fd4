#!/usr/bin/env python
"""Train and evaluate the method of Liu et al., "Efficient Semantic Video Segmentation with
Per-frame Inference" (ECCV 2020): teacher (CE + lambda TL) -> student (eq. 3) -> eval.

    python train.py                          # synthetic video, CPU, tiny nets, <= 10 min on 2 cores
    python train.py --preset smoke           # the same path in < 3 min
    python train.py -c configs/cityscapes_pspnet18.yaml --set data.root=/data/cityscapes
    torchrun --nproc_per_node=4 train.py -c configs/cityscapes_pspnet18.yaml ...
    python train.py --resume                 # continue a killed run from its last checkpoints
    python train.py --ablation               # Table 1's schemes a-h on the synthetic video (~25 min on 2 cores)
    python train.py --stage predict --checkpoint run/checkpoints/student_final.pt --input frames/ --output out/

See trainer/ for the pieces and configs/ for the recipes.
"""
import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
