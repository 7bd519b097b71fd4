"""Assembly of the training objective, eq. 3 of Liu et al. (ECCV 2020):

    L = sum l_ce + lambda * (l_SF + sum l_tl + sum l_PF + l_MF)

with l_SF = pixel-wise KD + pair-wise similarity (SF, sec. 3.2), l_tl the temporal loss (eq. 1),
l_PF the pair-wise-frame term (eq. 2) and l_MF the multi-frame ConvLSTM term (eqs. 4-6).
Every term comes from ``tcloss``; this module only decides which inputs go where. The triplet is
[prev, labelled, next]; the labelled frame is t, each neighbour is a t+k.

``semantics`` (``loss.semantics``) says how kd, pa and tl are weighed:

* ``paper``: eq. 1 as written (``temporal_loss(on=loss.tl_on, mask_power=loss.tl_mask_power)``,
  by default on probabilities), pixel-wise KD and pair-wise SF on the labelled frame.
* ``released``: each term as the paper's released code weighs it (the mappings of
  docs/PORTING.md; tests/test_train.py checks these terms against them), per (t, t+k) pair:
  tl = ``temporal_loss(on="logit", mask_power=2) / C``; kd = sum over the pair's two frames of
  ``pixelwise_kd(S upsampled to T's size, T, tau) / (C tau^2)``, averaged over the triplet's two
  pairs as tl and pf are under both semantics; pa = the self-similarity
  (``pairwise_similarity_loss``) of 2x2 average-pooled (floor) features of frame t plus 0.4 x
  those of frames t-k and t+k (ETC's CriterionSDcos_self: no map crosses frames). kd and pa
  then need the whole triplet too.

pf and mf are the same under both (the released cross-frame term divides by swapped norms, which
tcloss does not reproduce).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

import models
import tcloss

SUPERVISED = ("ce", "aux")


def effective_weights(section: dict, lam: float) -> Dict[str, float]:
    """Weight of each enabled term: ce/aux as given, the rest times lambda (eq. 3). Off = absent."""
    out = {}
    for term, on in section["losses"].items():
        if on:
            w = float(section["loss_weights"][term])
            out[term] = w if term in SUPERVISED else lam * w
    return out


SEMANTICS = ("paper", "released")
RELEASED_NEIGHBOUR_WEIGHT = 0.4  # the released code's weight of each neighbour frame's pair-wise SF


def triplet_terms(semantics: str = "paper") -> tuple:
    """Terms that need the outputs of all three frames of the triplet."""
    return ("tl", "pf", "mf") + (("kd", "pa") if semantics == "released" else ())


def stage_weights(cfg: dict, stage: str) -> Dict[str, float]:
    """Weights of the terms a stage trains: the teacher's and the student's from their sections
    (:func:`effective_weights`); the baseline's are the student's supervised terms only."""
    if stage == "baseline":
        return {k: float(cfg["student"]["loss_weights"][k]) for k in SUPERVISED if cfg["student"]["losses"][k]}
    return effective_weights(cfg[stage], cfg["loss"]["lambda"])


def loss_options(cfg: dict) -> dict:
    """The keyword options of :func:`compute_losses` that a config sets."""
    s, lc = cfg["student"], cfg["loss"]
    return dict(kd_temperature=s["kd_temperature"], pa_pool=s["pa_pool"], pf_pool=s["pf_pool"], tl_on=lc["tl_on"],
                tl_mask_power=lc["tl_mask_power"], semantics=lc["semantics"], backend=lc["backend"])


def needs_triplet(cfg: dict, stage: str, weights: Dict[str, float]) -> bool:
    """Whether a stage puts all three frames through the network (BatchNorm then sees 3x the
    images): when a term needs them, or always with ``student.forward_triplet: always``, which gives
    every scheme the same BatchNorm statistics (the ablation compares loss terms, not batch sizes)."""
    if any(k in weights for k in triplet_terms(cfg["loss"]["semantics"])):
        return True
    return stage != "teacher" and cfg["student"]["forward_triplet"] == "always"


def _pool(x: torch.Tensor, size) -> torch.Tensor:
    return x if size is None else F.adaptive_avg_pool2d(x, size)


def _full(logits: torch.Tensor, size) -> torch.Tensor:
    return models.upsample_logits(logits, size)


def released_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The released code's pixel-wise KD of one frame: the student's logits upsampled (bilinear,
    align_corners=True) to the teacher's size, ``pixelwise_kd / (C tau^2)`` (its element-wise mean)."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=True)
    return tcloss.pixelwise_kd(student, teacher, temperature=temperature) / (student.shape[1] * temperature ** 2)


def _pool2(x: torch.Tensor) -> torch.Tensor:
    """The released code's 2x2 average pooling of features before its pair-wise SF (floor: an odd
    size drops its last row or column)."""
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def compute_losses(weights: Dict[str, float], frames: torch.Tensor, label: torch.Tensor, flow: torch.Tensor,
                   s_out: Dict[str, torch.Tensor], t_out: Optional[Dict[str, torch.Tensor]] = None,
                   mf_module=None, *, kd_temperature: float = 1.0, pa_pool=None, pf_pool=None,
                   tl_on: str = "prob", tl_mask_power: float = 1, semantics: str = "paper",
                   backend: str = "auto", ignore_index: int = 255):
    """Loss terms and the weighted total.

    frames (B,3,3,H,W) float 0..255, label (B,H,W), flow (B,2,2,H,W) labelled->prev / ->next.
    ``s_out``: the trained network's outputs on the frames flattened frame-major per sample,
    i.e. logits (B*F,K,h,w) with F = 3 (the triplet) or F = 1 (only the labelled frame: allowed
    when no temporal term is on). ``t_out``: the frozen teacher's outputs on the same frames
    (needed by kd/pa/pf/mf). ``semantics``: paper | released (see the module docstring; under
    released, ``tl_on``, ``tl_mask_power`` and ``pa_pool`` do not apply). Returns (total,
    {term: unweighted value}).
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {', '.join(SEMANTICS)}, got {semantics!r}")
    released = semantics == "released"
    B = frames.shape[0]
    H, W = frames.shape[-2:]
    nf = s_out["logits"].shape[0] // B

    def frame(out, key, i):  # (B, ...) of frame i of the triplet
        x = out[key]
        return x.view(B, nf, *x.shape[1:])[:, i if nf == 3 else 0]

    lab = 1 if nf == 3 else 0
    terms: Dict[str, torch.Tensor] = {}
    if "ce" in weights:
        terms["ce"] = F.cross_entropy(_full(frame(s_out, "logits", lab), (H, W)), label, ignore_index=ignore_index)
    if "aux" in weights and "aux" in s_out:
        terms["aux"] = F.cross_entropy(_full(frame(s_out, "aux", lab), (H, W)), label, ignore_index=ignore_index)
    temporal = [k for k in triplet_terms(semantics) if k in weights]
    if temporal and nf != 3:
        raise ValueError(f"terms {temporal} need the outputs of all three frames")
    if any(k in weights for k in ("kd", "pa", "pf", "mf")) and t_out is None:
        raise ValueError("distillation terms need the teacher's outputs")
    if "kd" in weights and released:  # frame t, plus the mean over the pairs of frame t+k
        kd = [released_kd(frame(s_out, "logits", i), frame(t_out, "logits", i).detach(), kd_temperature)
              for i in range(3)]
        terms["kd"] = kd[1] + (kd[0] + kd[2]) / 2
    elif "kd" in weights:  # SF, pixel-wise: KL(q_T || q_S) at every pixel of the labelled frame
        terms["kd"] = tcloss.pixelwise_kd(frame(s_out, "logits", lab), frame(t_out, "logits", lab).detach(),
                                         temperature=kd_temperature)
    if "pa" in weights and released:  # self-similarity of frame t + 0.4 x those of its neighbours
        sim = [tcloss.pairwise_similarity_loss(_pool2(frame(s_out, "feat", i)),
                                               _pool2(frame(t_out, "feat", i)).detach(), backend=backend)
               for i in range(3)]
        terms["pa"] = sim[1] + RELEASED_NEIGHBOUR_WEIGHT * (sim[0] + sim[2])
    elif "pa" in weights:  # SF, pair-wise (eq. 5): self-similarity of the last feature maps
        terms["pa"] = tcloss.pairwise_similarity_loss(_pool(frame(s_out, "feat", lab), pa_pool),
                                                      _pool(frame(t_out, "feat", lab), pa_pool).detach(),
                                                      backend=backend)
    if "tl" in weights:  # eq. 1, labelled frame t against each neighbour t+k, flow t -> t+k
        z_t = _full(frame(s_out, "logits", 1), (H, W))
        # The occlusion mask exp(-|sum_c dI_c|) depends on the image scale: on raw 0..255 values
        # it is ~0 wherever the warp is off by a few intensity levels (noise included), which
        # switches TL off almost everywhere. Frames in [0, 1] keep it a soft mask (the released
        # code fed ImageNet-normalised images, a similar scale).
        img = frames / 255.0
        # released: MSE(V z_t, V warp(z_tk)) over B*C*H*W
        on, power, scale = ("logit", 2, z_t.shape[1]) if released else (tl_on, tl_mask_power, 1)
        vals = []
        for j, nb in ((0, 0), (1, 2)):
            z_k = _full(frame(s_out, "logits", nb), (H, W))
            vals.append(tcloss.temporal_loss(z_t, z_k, flow[:, j], img[:, 1], img[:, nb], on=on, mask_power=power,
                                             backend=backend) / scale)
        terms["tl"] = sum(vals) / 2
    if "pf" in weights:  # eq. 2: cross-frame similarity of the predictions, student vs teacher
        vals = []
        for nb in (0, 2):
            vals.append(tcloss.pairwise_similarity_loss(
                _pool(frame(s_out, "logits", 1), pf_pool), _pool(frame(t_out, "logits", 1), pf_pool).detach(),
                _pool(frame(s_out, "logits", nb), pf_pool), _pool(frame(t_out, "logits", nb), pf_pool).detach(),
                backend=backend))
        terms["pf"] = sum(vals) / 2
    if "mf" in weights:  # eqs. 4-6: ConvLSTM over the triplet's self-similarity maps
        if mf_module is None:
            raise ValueError("the mf term needs a MultiFrameDistillation module")
        terms["mf"] = mf_module([frame(s_out, "feat", i) for i in range(3)],
                                [frame(t_out, "feat", i).detach() for i in range(3)])
    total = sum(weights[k] * v.float() for k, v in terms.items())
    if not terms:
        raise ValueError("no loss term is enabled")
    return total, terms
