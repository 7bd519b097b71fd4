"""The pair-wise similarity loss (``tcloss.pairwise_similarity_loss``) apart from its kernels: its
options and their checks, the choice of algorithm, its PyTorch algorithms (gram; naive is
:func:`tcloss.reference.pairwise_similarity_loss`), the self-similarity map of multi-frame
distillation, and the torch.library glue of the blocked algorithm: fake (meta) kernels and
autograd for the native pair ``tcloss::pairwise_similarity_loss_fwd/bwd`` (csrc/pairwise_similarity_loss/)
and the Triton pair ``tcloss::pairwise_similarity_loss_{fwd,bwd}_triton``
(pairwise_similarity_loss_triton.py).

FlashAttention-style: the forward keeps only per-row statistics (the log-sum-exp of S_i/tau and
T_i/tau for ``loss="kl"``, nothing for ``"mse"``); backward recomputes every S/T tile from the
inputs, so no N x N map exists in either pass.

Op contract (every backend): inputs ``(B,C,N)`` (student a, teacher a, student b, teacher b; the
native ops take student_a twice for the self-similarity loss and autograd adds the two
gradients, the Triton ops take ``None, None`` and return the whole gradient as d student_a);
returns the scalar loss (float32, float64 for float64 inputs) and the stats ``(B,N_a,2)`` (kl) or
``(0,)`` (mse). Backward returns d student_a, d student_b (input dtype, ``(0,)`` where not
requested). The teacher is a constant. The Triton ops take one more argument, ``precision``.
"""
from __future__ import annotations

import torch

from .._checks import check_backend, check_bool, check_choice, check_real
from .._dtypes import acc_dtype
from .._math import pairwise_normalize, pow2_scale, unit_vectors
from . import fwd_op as _fwd_op
from . import register_op_pair

# The options: the one list of each. The kernels' ``loss`` is the index in LOSSES (csrc/tcloss.cpp),
# the Triton kernels' precision code the index in PRECISIONS (pairwise_similarity_loss_triton._mma).
LOSSES = ("mse", "kl")
ALGORITHMS = ("auto", "blocked", "gram", "naive")
PRECISIONS = ("ieee", "tf32", "bf16")
_LOSS_CODE = {name: i for i, name in enumerate(LOSSES)}  # a dict lookup traces under torch.compile


def check_options(loss, temperature, algorithm, detach_norm, eps, backend, precision) -> None:
    """Options of pairwise_similarity_loss / nn.PairwiseSimilarityLoss."""
    check_choice("loss", loss, LOSSES)
    check_choice("algorithm", algorithm, ALGORITHMS)
    check_choice("precision", precision, PRECISIONS)
    check_real("temperature", temperature, minimum=0, strict=True)
    check_real("eps", eps, minimum=0)
    check_bool("detach_norm", detach_norm)
    check_backend(backend)
    if loss == "kl" and algorithm == "gram":
        raise ValueError("algorithm='gram' is an identity for loss='mse' only; use 'blocked' or 'naive' for 'kl'")


def kernel_options(loss: str, temperature, eps, detach_norm: bool) -> tuple:
    """The options as the fwd/bwd ops take them: ``(loss code, temperature, eps, detach_norm)``."""
    return _LOSS_CODE[loss], float(temperature), float(eps), detach_norm


def _fake_fwd(sa, ta, sb, tb, loss, temperature, eps, detach_norm, precision=None):
    B, _, Na = sa.shape
    stats = sa.new_empty((B, Na, 2) if loss == 1 else (0,), dtype=acc_dtype(sa.dtype))
    return sa.new_empty((), dtype=acc_dtype(sa.dtype)), stats


def _fake_bwd(grad, sa, ta, sb, tb, stats, *args):
    grad_a, grad_b = args[-2:]  # after loss, temperature, eps, detach_norm (, precision)
    return sa.new_empty(sa.shape if grad_a else (0,)), sa.new_empty(sb.shape if grad_b and sb is not None else (0,))


def _make_autograd(bwd_op):
    """Autograd of a fwd op ``(sa, ta, sb, tb, *options)``: ``bwd_op(grad, sa, ta, sb, tb, stats,
    *options, grad_a, grad_b)``."""
    def setup_context(ctx, inputs, output):
        sa, ta, sb, tb, *options = inputs
        ctx.options = options
        ctx.save_for_backward(sa, ta, sb, tb, output[1])

    def backward(ctx, grad_loss, _grad_stats):
        sa, ta, sb, tb, stats = ctx.saved_tensors
        ga, gb = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        nones = (None,) * len(ctx.options)
        if not (ga or gb):
            return (None, None, None, None) + nones
        da, db = bwd_op(grad_loss, sa, ta, sb, tb, stats, *ctx.options, ga, gb)
        return (da if ga else None), None, (db if gb else None), None, *nones

    return setup_context, backward


def register() -> None:
    """Register fake + autograd implementations (idempotent). The Triton ops get explicit fakes:
    tracing the launcher instead would run the interpreter on fake tensors."""
    register_op_pair("pairwise_similarity_loss", _fake_fwd, _fake_bwd, _make_autograd, triton_fakes=True)


def fwd_op(backend: str):
    return _fwd_op("pairwise_similarity_loss", backend)


# algorithm="auto". gram costs ~2 N (C_s+C_t)^2 against ~N_a N_b (C_s+C_t) for naive and
# blocked, so its rule is on the ratio (C_s + C_t) / N.
#
# CPU (benchmarks/pairwise_auto_sweep.py, forward+backward, 2 threads; three runs, the last in
# benchmarks/results/cpu/pairwise_auto.md; blocked / naive ranges over the three): blocked falls
# behind naive where the maps are small (they stay in cache) and the channels many (the tiles'
# GEMMs, recomputed in the backward, dominate): 0.97-1.34x at N = 256 for every C, 1.08-1.31x
# at N = 576 and C 64/64, 1.18-1.65x up to N = 1024 at C 128/512; it is even or ahead beyond
# (0.59-0.75x at N = 576, C 19/19; 0.82-1.01x at N = 1024, C 64/64; 0.83-0.97x at N = 2304,
# C 128/512): naive up to N_a N_b = 4096 (C_s + C_t) pairs. gram was 1.41-1.56x behind naive at
# C_s + C_t > N (C 128/512, N = 576), 0.90-0.96x at N = 1024, and ahead beyond.
#
# GPU (H200, benchmarks/results/NVIDIA_H200/pairwise/bench.md, B = 1, the Triton tiles): naive
# is ahead of blocked and gram at N = 2304 for every C and loss (blocked 0.38-0.74x, gram
# 0.78-0.89x): naive up to 4096^2 pairs. Beyond, mse takes gram (2.0-24x naive at N >= 8192,
# C 128/512 and N = 32768, C 19/19; 0.85x at N = 8192, C 19/19). For kl blocked costs about
# N_a N_b (a + b (C_s + C_t)) and naive N_a N_b (c + d (C_s + C_t)); from C 19/19 and 128/512
# at N = 32768 (blocked 18.5 / 131 ms at ieee, 11.9 / 83 tf32, 9.95 / 53 bf16; naive 40.2 /
# 71.0) they cross at C_s + C_t ~ 200 (ieee), ~460 (tf32) and beyond 1000 (bf16): blocked
# below (1.10x naive at N = 8192, C 19/19; 2.15x at N = 32768), naive above, as long as its
# maps are modest: naive's peak is ~28 bytes a pair (kl; 28 GiB at N = 32768), so above
# 2^28 pairs (B N_a N_b; ~7 GiB) auto never takes naive, whatever it costs in time (0.54x naive
# at N = 32768, C 128/512, ieee), rather than run a 24-80 GB card out of memory.
GRAM_MAX_CHANNEL_RATIO = {"cpu": 1.0, "other": 2.0}
CPU_NAIVE_PAIRS_PER_CHANNEL = 4096
GPU_NAIVE_PAIRS = 4096 * 4096
GPU_NAIVE_MAX_PAIRS = 2 ** 28
GPU_BLOCKED_MAX_CHANNELS = {"ieee": 192, "tf32": 448, "bf16": 1024}


def choose_algorithm(algorithm: str, loss: str, backend: str, device_type: str, Na: int, Nb: int, Cs: int,
                     Ct: int, B: int = 1, precision: str = "ieee") -> str:
    """The algorithm a call runs; ``auto``: on the CPU naive where the maps are small (``N_a N_b
    <= 4096 (C_s + C_t)``), else gram for mse when ``C_s + C_t <= min(N_a, N_b)``, else blocked;
    on a GPU, where naive's maps stay modest (``B N_a N_b <= 2^28``), naive up to ``N_a N_b =
    4096^2`` or where the channels are many for the precision (``GPU_BLOCKED_MAX_CHANNELS``), else
    gram for mse when ``C_s + C_t <= 2 min(N_a, N_b)``, else blocked. The reference backend (no blocked
    kernel) takes naive where blocked would be chosen."""
    if algorithm != "auto":
        return algorithm
    cpu = device_type == "cpu"
    C = Cs + Ct
    modest = B * Na * Nb <= GPU_NAIVE_MAX_PAIRS  # naive's maps, on a GPU
    small = (Na * Nb <= CPU_NAIVE_PAIRS_PER_CHANNEL * C) if cpu else (Na * Nb <= GPU_NAIVE_PAIRS and modest)
    if small:
        return "naive"
    if loss == "mse" and C <= GRAM_MAX_CHANNEL_RATIO["cpu" if cpu else "other"] * min(Na, Nb):
        return "gram"
    if backend == "reference":
        return "naive"
    if not cpu and C > GPU_BLOCKED_MAX_CHANNELS[precision] and modest:
        return "naive"
    return "blocked"


def row_scales(x: torch.Tensor, eps: float, detach_norm: bool, acc: torch.dtype) -> torch.Tensor:
    """Per pixel of ``x`` (B,C,N), the scales of its unit row ``x / max(||x||, eps) = x s iv``
    (B,3,N) in ``acc``: ``s`` the power of two of :func:`tcloss._math.pow2_scale` (exact, so
    the norm ``ns = ||x s||`` never overflows), ``iv = 1 / max(ns, eps s)``, and ``full`` = 1
    where the gradient goes through the norm (``ns > eps s`` and not ``detach_norm``: the rule of
    autograd through the reference's clamp, a tie counting as clamped), else 0."""
    x = x.detach().to(acc)
    s = pow2_scale(x, 1)
    ns = torch.linalg.vector_norm(x * s, dim=1, keepdim=True)
    floor = eps * s
    full = (ns > floor).to(acc) * (not detach_norm)
    return torch.cat([s, 1.0 / torch.maximum(ns, floor), full], dim=1)


# --- the PyTorch algorithms -------------------------------------------------------------------

def gram_loss(student_a: torch.Tensor, teacher_a: torch.Tensor, student_b: torch.Tensor | None = None,
              teacher_b: torch.Tensor | None = None, detach_norm: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """MSE pair-wise loss through C x C Gram matrices, never forming an N x N map.

    With row-normalised A_s (N_a x C_s), B_s, A_t, B_t (S = A_s B_s^T, T = A_t B_t^T):
    ``sum (S-T)^2 = <A_s^T A_s, B_s^T B_s> + <A_t^T A_t, B_t^T B_t> - 2 <A_s^T A_t, B_s^T B_t>``
    (Frobenius products of C_s x C_s, C_t x C_t and C_s x C_t matrices): O(N C^2) instead of
    O(N^2 C). The three terms nearly cancel when S ~ T, so the normalisation, the Gram matrices
    and the contraction are all in float64 (relative error ~1e-16 x sum S^2 / sum (S-T)^2).
    Backward is autograd through the same float64 matmuls (C x C products again).
    """
    acc = acc_dtype(student_a.dtype)
    d = torch.float64
    sa = pairwise_normalize(student_a, eps, detach_norm, d)
    ta = pairwise_normalize(teacher_a, eps, detach_norm, d)
    self_sim = student_b is None and teacher_b is None
    sb = sa if student_b is None else pairwise_normalize(student_b, eps, detach_norm, d)
    tb = ta if teacher_b is None else pairwise_normalize(teacher_b, eps, detach_norm, d)
    B, Na, Nb = sa.shape[0], sa.shape[1], sb.shape[1]

    def gram(x, y):  # (B,N,Cx),(B,N,Cy) -> (B,Cx,Cy)
        return x.transpose(1, 2) @ y

    g_ss_a, g_tt_a, g_st_a = gram(sa, sa), gram(ta, ta), gram(sa, ta)
    if self_sim:
        g_ss_b, g_tt_b, g_st_b = g_ss_a, g_tt_a, g_st_a
    else:
        g_ss_b, g_tt_b, g_st_b = gram(sb, sb), gram(tb, tb), gram(sb, tb)
    total = (g_ss_a * g_ss_b).sum() + (g_tt_a * g_tt_b).sum() - 2.0 * (g_st_a * g_st_b).sum()
    return (total / (B * Na * Nb)).to(acc)


def mf_self_similarity(feat: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B,C,H,W) -> (B,N,N), N = H*W: ``A[b,i,j] = x_i.x_j / (max(|x_i|,eps) max(|x_j|,eps))`` with
    x_i = feat[b,:,i]: the self-similarity map A(F_t, F_t) of multi-frame distillation."""
    x = unit_vectors(feat.flatten(2), 1, eps)
    return torch.bmm(x.transpose(1, 2), x)
