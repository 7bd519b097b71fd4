"""tcloss inside someone else's training loop: a torchvision segmentation network (random init,
nothing downloaded) trained for a few iterations on a synthetic two-frame video, with the
temporal loss (eq. 1), pair-wise similarity distillation from a frozen teacher, and tcloss's
metrics. It uses only tcloss's public API (and torchvision), the way a user's code would; CI runs
it against an installed copy of tcloss from outside the repository.

    python examples/foreign_training_loop.py [--iters 20] [--size 96 128] [--device cpu]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

import tcloss
from tcloss.metrics import SegmentationMetrics, TemporalConsistency
from tcloss.nn import PairwiseSimilarityLoss, TemporalLoss

NUM_CLASSES = 4


def synthetic_clip(batch, size, generator):
    """Two frames of moving discs on a textured background: images (B,3,H,W) in [0,1], labels
    (B,H,W) of frame t, and the exact flow from frame t to frame t+1 (a shift per clip)."""
    H, W = size
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    frames, labels, flows = [], [], []
    for _ in range(batch):
        shift = (torch.rand(2, generator=generator) - 0.5) * 8  # (dx, dy) in pixels
        centres = torch.rand(NUM_CLASSES - 1, 2, generator=generator) * torch.tensor([W, H])
        colours = torch.rand(NUM_CLASSES, 3, generator=generator)
        pair = []
        for t in range(2):
            lab = torch.zeros(H, W, dtype=torch.long)
            for k, (cx, cy) in enumerate(centres):
                cx, cy = cx + t * shift[0], cy + t * shift[1]
                lab[(xs - cx) ** 2 + (ys - cy) ** 2 < (min(H, W) / 5) ** 2] = k + 1
            texture = 0.1 * torch.sin(xs / 3 + t * shift[0] / 3) * torch.cos(ys / 4 + t * shift[1] / 4)
            pair.append((colours[lab].permute(2, 0, 1) + texture).clamp(0, 1))
            if t == 0:
                labels.append(lab)
        frames.append(torch.stack(pair))
        # pixel (x, y) of frame t is at (x + dx, y + dy) in frame t+1 (tcloss's convention)
        flows.append(shift.view(2, 1, 1).expand(2, H, W))
    frames = torch.stack(frames)  # (B, 2, 3, H, W)
    return frames[:, 0], frames[:, 1], torch.stack(labels), torch.stack(flows).contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=2, default=[96, 128])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    student = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(dev)
    teacher = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    temporal = TemporalLoss()                         # eq. 1 on softmax probabilities
    pairwise = PairwiseSimilarityLoss(loss="mse")     # N x N cosine maps, never materialised
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    for it in range(a.iters):
        img_t, img_t1, label, flow = (x.to(dev) for x in synthetic_clip(a.batch, a.size, g))
        feats = student.backbone(torch.cat([img_t, img_t1]))   # both frames in one pass
        logits = F.interpolate(student.classifier(feats), size=a.size, mode="bilinear", align_corners=False)
        logits_t, logits_t1 = logits.chunk(2)
        with torch.no_grad():
            t_feats = teacher.backbone(img_t)["high"]
        loss_ce = F.cross_entropy(logits_t, label)
        loss_tl = temporal(logits_t, logits_t1, flow, img_t, img_t1)
        loss_pa = pairwise(feats["high"][: a.batch], t_feats)
        loss = loss_ce + 0.1 * loss_tl + 0.1 * loss_pa
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"non-finite loss at iteration {it}")
        if it % 5 == 0 or it == a.iters - 1:
            print(f"iter {it:3d}  ce {loss_ce.item():.4f}  tl {loss_tl.item():.4f}  pa {loss_pa.item():.5f}")

    student.eval()
    seg, tc = SegmentationMetrics(NUM_CLASSES), TemporalConsistency(NUM_CLASSES)
    with torch.no_grad():
        for _ in range(4):
            img_t, img_t1, label, flow = (x.to(dev) for x in synthetic_clip(a.batch, a.size, g))
            pred = student(torch.cat([img_t, img_t1]))["out"].argmax(1)
            seg.update(pred[: a.batch], label)
            tc.update(pred[: a.batch], pred[a.batch:], flow)
    m = seg.compute()
    print(f"tcloss {tcloss.__version__} from {tcloss.__file__}")
    print(f"backends {tcloss.available_backends()}")
    print(f"mIoU {m['miou']:.1f}  pixel acc {m['pixel_acc']:.1f}  TC {tc.compute()['tc']:.1f}")


if __name__ == "__main__":
    main()
