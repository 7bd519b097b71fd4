"""The mappings of docs/PORTING.md: each peer codebase's loss, re-derived here from its math (not
copied code), against the tcloss call the guide gives, on identical float64 inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tcloss
from tcloss import reference as R

torch.manual_seed(0)
B, C, H, W = 2, 5, 6, 7


def logits(*shape, scale=3.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def kl_per_pixel(s, t, tau):
    """KL(softmax(t/tau) || softmax(s/tau)) per pixel, classes on dim 1."""
    p = torch.softmax(t / tau, 1)
    return (p * (torch.log_softmax(t / tau, 1) - torch.log_softmax(s / tau, 1))).sum(1)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cirkd_criterion_kd_is_pixelwise_kd(tau):
    """CIRKD CriterionKD: pixels flattened to rows, kl_div(log_softmax(S/tau), softmax(T/tau),
    reduction="batchmean") * tau^2, i.e. tau^2 * mean over pixels of KL."""
    s, t = logits(B, C, H, W), logits(B, C, H, W)
    rows_s = s.permute(0, 2, 3, 1).reshape(-1, C)
    rows_t = t.permute(0, 2, 3, 1).reshape(-1, C)
    theirs = F.kl_div(F.log_softmax(rows_s / tau, 1), F.softmax(rows_t / tau, 1), reduction="batchmean") * tau ** 2
    torch.testing.assert_close(tcloss.pixelwise_kd(s, t, temperature=tau), theirs)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_torchdistill_kd_soft_term_is_hw_pixelwise_kd_over_tau2(tau):
    """torchdistill KDLoss's soft term on (B,C,H,W) maps: KLDivLoss(reduction="batchmean") of
    log_softmax(S/tau) against softmax(T/tau), the sum over everything divided by B; its total
    multiplies that by tau^2 (times its (1 - alpha))."""
    s, t = logits(B, C, H, W), logits(B, C, H, W)
    soft = F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean")
    torch.testing.assert_close(H * W * tcloss.pixelwise_kd(s, t, temperature=tau) / tau ** 2, soft)


def test_skd_criterion_pixelwise_is_b_times_kd_plus_teacher_entropy():
    """SKD CriterionPixelWise (tau = 1): sum over the batch of the per-pixel soft cross-entropy
    -sum_c softmax(T) log softmax(S), averaged over the H*W pixels of each image."""
    s, t = logits(B, C, H, W), logits(B, C, H, W)
    ce = -(torch.softmax(t, 1) * torch.log_softmax(s, 1)).sum(1)  # (B,H,W)
    theirs = ce.sum() / (H * W)
    entropy = -(torch.softmax(t, 1) * torch.log_softmax(t, 1)).sum(1).mean()
    torch.testing.assert_close(B * (tcloss.pixelwise_kd(s, t) + entropy), theirs)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_etc_criterion_kd_is_frame_sum_of_pixelwise_kd_over_c_tau2(tau):
    """ETC CriterionKD: for each of its two frames, the student's logits upsampled (bilinear,
    align_corners=True) to the teacher's size, then KL(softmax(T/tau) || softmax(S/tau)) summed over
    classes and averaged over B*C*H*W elements (a plain mean of the element-wise KL, not tau^2)."""
    total_theirs, total_ours = 0.0, 0.0
    for _ in range(2):
        s_small, t = logits(B, C, H // 2, W // 2), logits(B, C, H, W)
        s = F.interpolate(s_small, size=(H, W), mode="bilinear", align_corners=True)
        elem = torch.softmax(t / tau, 1) * (torch.log_softmax(t / tau, 1) - torch.log_softmax(s / tau, 1))
        total_theirs = total_theirs + elem.mean()
        total_ours = total_ours + tcloss.pixelwise_kd(s, t, temperature=tau) / (C * tau ** 2)
    torch.testing.assert_close(total_ours, total_theirs)


def test_etc_temporal_loss_is_temporal_loss_on_logits_mask_power_2_over_c():
    """ETC's (the paper's released) temporal loss: MSE(V z_t, V warp(z_tk)) over B*C*H*W with
    V = exp(-|sum_c (I_t - warp(I_tk))_c|), border warping."""
    zt, ztk = logits(B, C, H, W), logits(B, C, H, W)
    flow = torch.randn(B, 2, H, W, dtype=torch.float64) * 2
    it, itk = torch.rand(B, 3, H, W, dtype=torch.float64), torch.rand(B, 3, H, W, dtype=torch.float64)
    d = it - R.flow_warp(itk, flow, "border")
    v = torch.exp(-d.sum(1, keepdim=True).abs())
    theirs = ((v * zt - v * R.flow_warp(ztk, flow, "border")) ** 2).mean()
    ours = tcloss.temporal_loss(zt, ztk, flow, it, itk, on="logit", mask_power=2, backend="reference") / C
    torch.testing.assert_close(ours, theirs)
