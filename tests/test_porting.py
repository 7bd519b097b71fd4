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


# ---------------------------------------------------------------------------------------------
# Pair-wise similarity distillation. Each peer's similarity map is written out here as the math
# it computes: rows are pixels, S[b,i,j] = <x_i, x_j> / (n(x_i) n(x_j)) with the peer's own norm
# n (F.normalize: max(|x|, 1e-12); SKD: |x| + 1e-8, detached; ETC: |x|, no floor).

def cos_map(xa, xb, norm):
    """(B,C,H,W) x2 -> (B, N_a, N_b): <xa_i, xb_j> / (norm(xa_i) norm(xb_j)), channels on dim 1."""
    a = xa.flatten(2).transpose(1, 2)  # (B,N_a,C)
    b = xb.flatten(2).transpose(1, 2)
    a = a / norm(a.pow(2).sum(-1, keepdim=True).sqrt())
    b = b / norm(b.pow(2).sum(-1, keepdim=True).sqrt())
    return a @ b.transpose(1, 2)


def features(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_cirkd_structural_kd_is_pairwise_on_2x2_ceil_max_pooled():
    """CIRKD CriterionStructuralKD: 2x2 max pooling with stride 2 and ceil_mode=True (an odd H or W
    keeps its last row/column as a 1-wide window), F.normalize over channels, self-similarity,
    then the mean of (S - T)^2 over B*N*N."""
    s, t = features(B, 8, H, W), features(B, 6, H, W)  # H=6, W=7: the ceil window matters on W
    ps, pt = (F.max_pool2d(x, 2, 2, ceil_mode=True) for x in (s, t))
    assert ps.shape[-2:] == (3, 4)
    norm = lambda n: n.clamp_min(1e-12)
    theirs = ((cos_map(ps, ps, norm) - cos_map(pt, pt, norm)) ** 2).mean()
    ours = tcloss.pairwise_similarity_loss(ps, pt)
    torch.testing.assert_close(ours, theirs)
    # floor pooling would drop the last column and give another number
    fs, ft = (F.max_pool2d(x, 2, 2) for x in (s, t))
    assert not torch.allclose(tcloss.pairwise_similarity_loss(fs, ft), theirs)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_cirkd_minibatch_cross_image_pair_is_mean_over_b2_image_pairs_of_pairwise_kl(tau):
    """CIRKD CriterionMiniBatchCrossImagePair (pooling=False): for every ordered image pair (i, j)
    of the batch, rows of image i against columns of image j, log_softmax/softmax over j of the
    maps / tau, kl_div(..., reduction="batchmean") = the sum over the N_i x N_j map / N_i (no
    tau^2), and the sum over the B^2 pairs divided by B^2."""
    b = 3
    s, t = features(b, 8, H, W), features(b, 6, H, W)
    norm = lambda n: n.clamp_min(1e-12)
    total = 0.0
    for i in range(b):
        for j in range(b):
            ms = cos_map(s[i:i + 1], s[j:j + 1], norm)[0] / tau
            mt = cos_map(t[i:i + 1], t[j:j + 1], norm)[0] / tau
            p = torch.softmax(mt, 1)
            total = total + (p * (torch.log_softmax(mt, 1) - torch.log_softmax(ms, 1))).sum() / ms.shape[0]
    theirs = total / b ** 2
    # the per-pair form, as docs/PORTING.md writes it (a slice keeps the batch dimension)
    ours = sum(tcloss.pairwise_similarity_loss(s[i:i + 1], t[i:i + 1], s[j:j + 1], t[j:j + 1], loss="kl",
                                               temperature=tau, eps=1e-12)
               for i in range(b) for j in range(b)) / b ** 2
    torch.testing.assert_close(ours, theirs)
    # the same in one call: the B^2 pairs laid out as a batch of B^2
    rows = dict(student_a=s.repeat_interleave(b, 0), teacher_a=t.repeat_interleave(b, 0),
                student_b=s.repeat(b, 1, 1, 1), teacher_b=t.repeat(b, 1, 1, 1))
    one_call = tcloss.pairwise_similarity_loss(rows["student_a"], rows["teacher_a"], rows["student_b"],
                                               rows["teacher_b"], loss="kl", temperature=tau, eps=1e-12)
    torch.testing.assert_close(one_call, theirs)
    # the diagonal pairs alone (self-similarity per image) are not the same loss
    assert not torch.allclose(tcloss.pairwise_similarity_loss(s, t, loss="kl", temperature=tau), theirs)


@pytest.mark.parametrize("scale", [0.5, 0.34])
def test_skd_pairwise_after_pool_is_mse_on_max_pooled_with_detached_norms(scale):
    """SKD CriterionPairWiseforWholeFeatAfterPool: max pooling with kernel = stride =
    (int(H*scale), int(W*scale)) and ceil_mode=True; rows divided by their L2 norm + 1e-8, the norm
    detached; sum of (T - S)^2 / N^2 / B, i.e. the mean over B*N*N. Value and student gradient:
    detach_norm=True is what makes the gradients agree (up to the 1e-8, ~1e-8 relative)."""
    s, t = features(B, 8, H, W), features(B, 6, H, W)
    k = (int(H * scale), int(W * scale))
    ps_theirs = F.max_pool2d(s.clone().requires_grad_(), k, k, ceil_mode=True)
    pt = F.max_pool2d(t, k, k, ceil_mode=True)
    norm = lambda n: n.detach() + 1e-8
    theirs = ((cos_map(pt, pt, norm) - cos_map(ps_theirs, ps_theirs, norm)) ** 2).sum() / pt[0, 0].numel() ** 2 / B
    (g_theirs,) = torch.autograd.grad(theirs, ps_theirs)

    ps = F.max_pool2d(s, k, k, ceil_mode=True).requires_grad_()
    ours = tcloss.pairwise_similarity_loss(ps, pt, detach_norm=True)
    (g_ours,) = torch.autograd.grad(ours, ps)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # the 1e-8 on the norm moves each entry by ~1e-8 of the gradient's scale (more, relatively, on
    # entries that nearly cancel)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-7 * g_theirs.abs().max().item())
    # with the exact gradient through the norm (the default) the gradients differ
    ps2 = ps.detach().requires_grad_()
    (g_exact,) = torch.autograd.grad(tcloss.pairwise_similarity_loss(ps2, pt), ps2)
    assert not torch.allclose(g_exact, g_theirs, rtol=1e-3)


def test_etc_sdcos_self_is_pairwise_on_2x2_avg_pooled_frames_with_04_on_the_neighbours():
    """ETC CriterionSDcos_self: each of its three frames (frame 0, `preds`, and its forward and
    backward neighbours) average-pooled 2x2, stride 2 (floor: an odd H or W drops its last
    row/column), its self-similarity of cosines (x_i.x_j / (|x_i| |x_j|)) for student and
    teacher, MSELoss (the mean over B*N*N); loss_0 + 0.4 * (loss_f + loss_b). Each term is the
    self-similarity of one frame: no map crosses frames."""
    frames = [(features(B, 8, H, W), features(B, 6, H, W)) for _ in range(3)]  # (S, T): t, t_f, t_b
    pooled = [tuple(F.avg_pool2d(x, 2, 2) for x in st) for st in frames]
    assert pooled[0][0].shape[-2:] == (3, 3)
    plain = lambda n: n
    terms = [((cos_map(ps, ps, plain) - cos_map(pt, pt, plain)) ** 2).mean() for ps, pt in pooled]
    theirs = terms[0] + 0.4 * (terms[1] + terms[2])
    ours = [tcloss.pairwise_similarity_loss(ps, pt) for ps, pt in pooled]
    torch.testing.assert_close(ours[0] + 0.4 * (ours[1] + ours[2]), theirs)
    # ceil pooling (as CIRKD's) would keep the last column and change the number
    ceil = [tuple(F.avg_pool2d(x, 2, 2, ceil_mode=True) for x in st) for st in frames]
    other = [tcloss.pairwise_similarity_loss(ps, pt) for ps, pt in ceil]
    assert not torch.allclose(other[0] + 0.4 * (other[1] + other[2]), theirs)
