"""torch.library glue of the pair-wise similarity loss (blocked algorithm): fake (meta) kernels
and autograd for the native pair ``tcloss::pairwise_similarity_fwd/bwd`` and the Triton pair
``tcloss::pairwise_similarity_{fwd,bwd}_triton``; plus the choice of algorithm.

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

from .._dtypes import acc_dtype
from ..reference import pow2_scale
from . import register_op_pair
from . import fwd_op as _fwd_op

LOSS = {"mse": 0, "kl": 1}
# precision= of the tiles -> the Triton kernels' code (tcloss._backends.pairwise_triton._mma)
PRECISION = {"ieee": 0, "tf32": 1, "bf16": 2}




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
    register_op_pair("pairwise_similarity", "pairwise_triton", _fake_fwd, _fake_bwd, _make_autograd,
                     triton_fakes=True)


def fwd_op(backend: str):
    return _fwd_op("pairwise_similarity", "pairwise_triton", backend)


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
# 2^28 pairs (B N_a N_b; ~7 GiB) auto takes blocked whatever it costs in time (0.54x naive at
# N = 32768, C 128/512, ieee), rather than run a 24-80 GB card out of memory.
GRAM_MAX_CHANNEL_RATIO = {"cpu": 1.0, "other": 2.0}
CPU_NAIVE_PAIRS_PER_CHANNEL = 4096
GPU_NAIVE_PAIRS = 4096 * 4096
GPU_NAIVE_MAX_PAIRS = 2 ** 28
GPU_BLOCKED_MAX_CHANNELS = {"ieee": 192, "tf32": 448, "bf16": 1024}


def choose_algorithm(algorithm: str, loss: str, backend: str, device_type: str, Na: int, Nb: int, Cs: int,
                     Ct: int, B: int = 1, precision: str = "ieee") -> str:
    """The algorithm a call runs; ``auto``: on the CPU naive where the maps are small (``N_a N_b
    <= 4096 (C_s + C_t)``), else gram for mse when ``C_s + C_t <= min(N_a, N_b)``, else blocked;
    on a GPU naive up to ``N_a N_b = 4096^2``, else gram for mse when ``C_s + C_t <= 2 min(N_a,
    N_b)``, else naive where the channels are many for the precision (``GPU_BLOCKED_MAX_CHANNELS``)
    and the maps modest (``B N_a N_b <= 2^28``), else blocked. The reference backend (no blocked
    kernel) takes naive where blocked would be chosen."""
    if algorithm != "auto":
        return algorithm
    cpu = device_type == "cpu"
    C = Cs + Ct
    if Na * Nb <= (CPU_NAIVE_PAIRS_PER_CHANNEL * C if cpu else GPU_NAIVE_PAIRS):
        return "naive"
    if loss == "mse" and C <= GRAM_MAX_CHANNEL_RATIO["cpu" if cpu else "other"] * min(Na, Nb):
        return "gram"
    if backend == "reference":
        return "naive"
    if not cpu and C > GPU_BLOCKED_MAX_CHANNELS[precision] and B * Na * Nb <= GPU_NAIVE_MAX_PAIRS:
        return "naive"
    return "blocked"


def row_scales(x: torch.Tensor, eps: float, detach_norm: bool, acc: torch.dtype) -> torch.Tensor:
    """Per pixel of ``x`` (B,C,N), the scales of its unit row ``x / max(||x||, eps) = x s iv``
    (B,3,N) in ``acc``: ``s`` the power of two of :func:`tcloss.reference.pow2_scale` (exact, so
    the norm ``ns = ||x s||`` never overflows), ``iv = 1 / max(ns, eps s)``, and ``full`` = 1
    where the gradient goes through the norm (``ns > eps s`` and not ``detach_norm``: the rule of
    autograd through the reference's clamp, a tie counting as clamped), else 0."""
    x = x.detach().to(acc)
    s = pow2_scale(x, 1)
    ns = torch.linalg.vector_norm(x * s, dim=1, keepdim=True)
    floor = eps * s
    full = (ns > floor).to(acc) * (not detach_norm)
    return torch.cat([s, 1.0 / torch.maximum(ns, floor), full], dim=1)
