"""torch.library glue of the pair-wise similarity loss (blocked algorithm): fake (meta) kernels
and autograd for the native pair ``tcloss::pairwise_similarity_fwd/bwd`` and the Triton pair
``tcloss::pairwise_similarity_{fwd,bwd}_triton``; plus the choice of algorithm.

FlashAttention-style: the forward keeps only per-row statistics (the log-sum-exp of S_i/tau and
T_i/tau for ``loss="kl"``, nothing for ``"mse"``); backward recomputes every S/T tile from the
inputs (re-normalised, O(N C)), so no N x N map exists in either pass.

Op contract (every backend): inputs ``(B,C,N)`` (student a, teacher a, student b, teacher b; the
self-similarity loss passes student_a twice and autograd adds the two gradients); returns the
scalar loss (float32, float64 for float64 inputs) and the stats ``(B,N_a,2)`` (kl) or ``(0,)``
(mse). Backward returns d student_a, d student_b (input dtype, ``(0,)`` where not requested).
The teacher is a constant.
"""
from __future__ import annotations

import torch

from ..reference import pow2_scale
from . import fwd_op as _fwd_op
from . import register_op_pair

LOSS = {"mse": 0, "kl": 1}


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fake_fwd(sa, ta, sb, tb, loss, temperature, eps, detach_norm):
    B, _, Na = sa.shape
    stats = sa.new_empty((B, Na, 2) if loss == 1 else (0,), dtype=_acc(sa))
    return sa.new_empty((), dtype=_acc(sa)), stats


def _fake_bwd(grad, sa, ta, sb, tb, stats, loss, temperature, eps, detach_norm, grad_a, grad_b):
    return sa.new_empty(sa.shape if grad_a else (0,)), sb.new_empty(sb.shape if grad_b else (0,))


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        sa, ta, sb, tb, loss, temperature, eps, detach_norm = inputs
        ctx.args = (loss, temperature, eps, detach_norm)
        ctx.save_for_backward(sa, ta, sb, tb, output[1])

    def backward(ctx, grad_loss, _grad_stats):
        sa, ta, sb, tb, stats = ctx.saved_tensors
        ga, gb = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (ga or gb):
            return None, None, None, None, None, None, None, None
        loss, temperature, eps, detach_norm = ctx.args
        da, db = bwd_op(grad_loss, sa, ta, sb, tb, stats, loss, temperature, eps, detach_norm, ga, gb)
        return (da if ga else None), None, (db if gb else None), None, None, None, None, None

    return setup_context, backward


def register() -> None:
    """Register fake + autograd implementations (idempotent). The Triton ops get explicit fakes:
    tracing the launcher instead would run the interpreter on fake tensors."""
    register_op_pair("pairwise_similarity", "pairwise_triton", _fake_fwd, _fake_bwd, _make_autograd,
                     triton_fakes=True)


def fwd_op(backend: str):
    return _fwd_op("pairwise_similarity", "pairwise_triton", backend)


# Crossover of algorithm="auto" for loss="mse", measured on CPU (benchmarks/bench_pairwise.py,
# forward+backward, 2 cores): gram (C x C identity, float64) vs blocked are even at
# N = 256, C_s + C_t = 640 and gram wins by 2-8x from there on (N = 2304: 2.6 ms vs 21 ms at
# C = 19+19, 32 ms vs 151 ms at C = 128+512). Gram costs ~2 N (C_s+C_t)^2 against
# ~6 N_a N_b (C_s+C_t) for blocked, so the rule is on the ratio (C_s + C_t) / N.
GRAM_MAX_CHANNEL_RATIO = 2.0


def choose_algorithm(algorithm: str, loss: str, backend: str, Na: int, Nb: int, Cs: int, Ct: int) -> str:
    """The algorithm a call runs: ``auto`` -> gram for mse when ``C_s + C_t <= 2 * min(N_a, N_b)``,
    otherwise blocked (naive where no blocked kernel exists: the reference backend)."""
    if algorithm != "auto":
        return algorithm
    if loss == "mse" and Cs + Ct <= GRAM_MAX_CHANNEL_RATIO * min(Na, Nb):
        return "gram"
    return "naive" if backend == "reference" else "blocked"


def normalize_rows(x: torch.Tensor, eps: float, acc: torch.dtype):
    """(B,C,N) -> unit rows (B,N,C) contiguous in ``acc``, and ``(ns, s)`` for backward: the norms
    ``ns`` (B,N,1) of the rows scaled by ``s`` (B,N,1), the power of two of
    :func:`tcloss.reference.pow2_scale`, so ``||x|| = ns / s`` never has to be formed (it
    overflows for large finite features). Unit rows ``xs / max(ns, eps s)``, ``xs = x s``: the
    bits of ``x / max(||x||, eps)`` wherever that does not overflow."""
    xt = x.to(acc).transpose(1, 2)
    s = pow2_scale(xt, 2)
    xs = xt * s
    ns = torch.linalg.vector_norm(xs, dim=2, keepdim=True)
    return (xs / torch.maximum(ns, eps * s)).contiguous(), (ns, s)


def norm_backward(g: torch.Tensor, xh: torch.Tensor, norms, eps: float, detach_norm: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """d/dx of ``xh = x / max(|x|, eps)`` given ``g`` = d/d xh (B,N,C) and ``norms = (ns, s)`` of
    :func:`normalize_rows`; returns (B,C,N) in ``dtype``.

    Where |x| > eps: ``(g - xh <xh, g>) / |x|`` (exact), else ``g / eps``; ``detach_norm``:
    ``g / max(|x|, eps)``. The same rule as autograd through the reference's clamp (a tie
    counts as clamped). Every ``1/|x|`` is applied as ``(. / max(ns, eps s)) * s``: no overflow."""
    ns, s = norms
    floor = eps * s
    nc = torch.maximum(ns, floor)
    if detach_norm:
        dx = g / nc * s
    else:
        full = (g - xh * (xh * g).sum(2, keepdim=True)) / nc * s
        dx = torch.where(ns > floor, full, g / nc * s)
    return dx.transpose(1, 2).to(dtype).contiguous()
