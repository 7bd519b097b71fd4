"""A small CUDA forward+backward of every native CUDA op, for compute-sanitizer (memcheck):
flows that leave the frame, odd shapes, all reductions, fp16 and fp32."""
import torch

import tcloss

dev = "cuda"
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16):
    for (B, C, H, W) in ((1, 19, 13, 17), (2, 3, 5, 64)):
        pt = torch.randn(B, C, H, W, device=dev, dtype=dtype, requires_grad=True)
        ptk = torch.randn(B, C, H, W, device=dev, dtype=dtype, requires_grad=True)
        fl = (torch.randn(B, 2, H, W, device=dev) * 10).requires_grad_(True)
        it, itk = torch.rand(B, 3, H, W, device=dev), torch.rand(B, 3, H, W, device=dev)
        for red in ("mean", "none"):
            for pad in ("border", "zeros"):
                loss = tcloss.temporal_loss(pt, ptk, fl, it, itk, padding=pad, reduction=red, backend="cuda")
                loss.sum().backward()
torch.cuda.synchronize()
print("sanitize_small: ok")
