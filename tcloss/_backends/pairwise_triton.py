"""Triton kernels of the blocked pair-wise similarity loss: kernel -> launcher -> torch.library op.

Rows are first normalised to unit vectors (``(B,N,C)`` float32/float64, O(N C) memory). The
forward program owns BLOCK_M rows of S and T and sweeps the columns in tiles of BLOCK_N:
each tile ``S = A_s B_s^T``, ``T = A_t B_t^T`` is a pair of ``tl.dot`` GEMMs over channel
chunks, reduced into per-row accumulators and discarded. For ``loss="kl"`` the row
log-sum-exps of S/tau and T/tau are tracked online (FlashAttention) and saved as the only
statistics. Backward recomputes the tiles: one launch whose programs own row blocks
(d A_s = G B_s), one whose programs own column blocks (d B_s = G^T A_s), each program the only
writer of its rows of the gradient (no atomics, deterministic).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import triton_interpret
from .pairwise import norm_backward, normalize_rows


@triton.jit
def _sim_tile(x_ptr, y_ptr, x_base, y_base, offs_x, offs_y, xm, ym, C,
              IS_F64: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile ``out[i, j] = sum_c x[i, c] y[j, c]`` of unit rows x (rows offs_x), y (rows offs_y)."""
    if IS_F64:
        acc = tl.zeros((BX, BY), dtype=tl.float64)
    else:
        acc = tl.zeros((BX, BY), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        km = offs_k < C
        xv = tl.load(x_ptr + x_base + offs_x[:, None] * C + offs_k[None, :], mask=xm[:, None] & km[None, :], other=0.0)
        yv = tl.load(y_ptr + y_base + offs_y[:, None] * C + offs_k[None, :], mask=ym[:, None] & km[None, :], other=0.0)
        acc += tl.dot(xv, tl.trans(yv), input_precision="ieee")
    return acc


@triton.jit
def _pairwise_fwd_kernel(
    as_ptr, at_ptr, bs_ptr, bt_ptr, par_ptr, rowloss_ptr, stats_ptr,
    Na, Nb, Cs, Ct,
    LOSS: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row i of batch b, over all columns j (S, T cosines of unit rows):
        mse: rowloss_i = sum_j (S_ij - T_ij)^2
        kl:  with x_j = S_ij/tau, y_j = T_ij/tau (tau = 1/par[0]), lse_x = log sum_j e^{x_j},
             lse_y likewise, p = softmax(y):
             rowloss_i = KL(p || softmax(x)) = sum_j p_j (y_j - x_j) - lse_y + lse_x,
             via online max/sum: m, l = sum e^{.-m}, w = sum e^{y_j - m_y} (y_j - x_j);
             stats_i = (lse_x, lse_y).
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mm = offs_m < Na
    base_as = b * Na * Cs
    base_at = b * Na * Ct
    base_bs = b * Nb * Cs
    base_bt = b * Nb * Ct
    inv_tau = tl.load(par_ptr)
    zero = inv_tau * 0.0
    sq = tl.zeros((BLOCK_M,), dtype=inv_tau.dtype)
    m_s = sq + float("-inf")
    m_t = sq + float("-inf")
    l_s = sq
    l_t = sq
    w = sq
    for n0 in range(0, Nb, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        nm = offs_n < Nb
        S = _sim_tile(as_ptr, bs_ptr, base_as, base_bs, offs_m, offs_n, mm, nm, Cs, IS_F64, BLOCK_M, BLOCK_N, BLOCK_K)
        T = _sim_tile(at_ptr, bt_ptr, base_at, base_bt, offs_m, offs_n, mm, nm, Ct, IS_F64, BLOCK_M, BLOCK_N, BLOCK_K)
        if LOSS == 0:
            d = tl.where(nm[None, :], S - T, zero)
            sq += tl.sum(d * d, axis=1)
        else:
            x = tl.where(nm[None, :], S * inv_tau, float("-inf"))
            y = tl.where(nm[None, :], T * inv_tau, float("-inf"))
            ms_new = tl.maximum(m_s, tl.max(x, axis=1))
            l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(x - ms_new[:, None]), axis=1)
            m_s = ms_new
            mt_new = tl.maximum(m_t, tl.max(y, axis=1))
            r = tl.exp(m_t - mt_new)
            e = tl.exp(y - mt_new[:, None])
            l_t = l_t * r + tl.sum(e, axis=1)
            w = w * r + tl.sum(e * tl.where(nm[None, :], (T - S) * inv_tau, zero), axis=1)
            m_t = mt_new
    if LOSS == 0:
        tl.store(rowloss_ptr + b * Na + offs_m, sq, mask=mm)
    else:
        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        tl.store(rowloss_ptr + b * Na + offs_m, w / l_t - lse_t + lse_s, mask=mm)
        tl.store(stats_ptr + (b * Na + offs_m) * 2, lse_s, mask=mm)
        tl.store(stats_ptr + (b * Na + offs_m) * 2 + 1, lse_t, mask=mm)


@triton.jit
def _pairwise_bwd_kernel(
    os_ptr, ot_ptr, xs_ptr, xt_ptr, par_ptr, stats_ptr, g_ptr,
    No, Nx, Na, Cs, Ct,
    LOSS: tl.constexpr, OWN_ROWS: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradient w.r.t. the unit student rows of the side this program owns ("o": the rows a when
    OWN_ROWS, else the columns b; "x" is the other side). With c = par[1] = dL/dloss / (#terms):
        mse: G_ij = 2 c (S_ij - T_ij)
        kl:  G_ij = c / tau (softmax_j(S_i/tau) - softmax_j(T_i/tau)), from the saved lse of row i
        d a_i = sum_j G_ij b_j (OWN_ROWS),   d b_j = sum_i G_ij a_i (otherwise).
    The tile is computed as o . x^T, i.e. S^T when the program owns columns.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_o = pid.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    om = offs_o < No
    base_os = b * No * Cs
    base_ot = b * No * Ct
    base_xs = b * Nx * Cs
    base_xt = b * Nx * Ct
    inv_tau = tl.load(par_ptr)
    c = tl.load(par_ptr + 1)
    zero = inv_tau * 0.0
    if LOSS == 1:
        if OWN_ROWS:
            lse_s_o = tl.load(stats_ptr + (b * Na + offs_o) * 2, mask=om, other=0.0)
            lse_t_o = tl.load(stats_ptr + (b * Na + offs_o) * 2 + 1, mask=om, other=0.0)
    for x0 in range(0, Nx, BLOCK_X):
        offs_x = x0 + tl.arange(0, BLOCK_X).to(tl.int64)
        xm = offs_x < Nx
        S = _sim_tile(os_ptr, xs_ptr, base_os, base_xs, offs_o, offs_x, om, xm, Cs, IS_F64, BLOCK_O, BLOCK_X, BLOCK_K)
        T = _sim_tile(ot_ptr, xt_ptr, base_ot, base_xt, offs_o, offs_x, om, xm, Ct, IS_F64, BLOCK_O, BLOCK_X, BLOCK_K)
        if LOSS == 0:
            G = 2.0 * c * (S - T)
        else:
            if OWN_ROWS:
                G = tl.exp(S * inv_tau - lse_s_o[:, None]) - tl.exp(T * inv_tau - lse_t_o[:, None])
            else:
                lse_s_x = tl.load(stats_ptr + (b * Na + offs_x) * 2, mask=xm, other=0.0)
                lse_t_x = tl.load(stats_ptr + (b * Na + offs_x) * 2 + 1, mask=xm, other=0.0)
                G = tl.exp(S * inv_tau - lse_s_x[None, :]) - tl.exp(T * inv_tau - lse_t_x[None, :])
            G = G * (c * inv_tau)
        G = tl.where(om[:, None] & xm[None, :], G, zero)
        # Owned rows of the gradient: read-modify-write by this program only.
        for k0 in range(0, Cs, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            km = offs_k < Cs
            xv = tl.load(xs_ptr + base_xs + offs_x[:, None] * Cs + offs_k[None, :], mask=xm[:, None] & km[None, :],
                         other=0.0)
            gp = g_ptr + base_os + offs_o[:, None] * Cs + offs_k[None, :]
            gm = om[:, None] & km[None, :]
            cur = tl.load(gp, mask=gm, other=0.0)
            tl.store(gp, cur + tl.dot(G, xv, input_precision="ieee"), mask=gm)


def _blocks(device: torch.device):
    if device.type != "cuda" or triton_interpret():
        return 16, 16, 16, 1  # the interpreter: small tiles run fastest
    return 64, 64, 32, 4


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(sa, ta, sb, tb, loss, temperature, eps):
    # the native ops' host checks (csrc/pairwise_host.h), for a direct call of the op
    if loss not in (0, 1):
        raise ValueError("pairwise_similarity: loss must be 0 (mse) or 1 (kl)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError("pairwise_similarity: temperature must be a finite positive number")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError("pairwise_similarity: eps must be a finite non-negative number")
    for n, t in (("teacher_a", ta), ("student_b", sb), ("teacher_b", tb)):
        if t.dim() != 3 or t.shape[0] != sa.shape[0]:
            raise ValueError(f"{n} must be (B,C,N) with the batch of student_a, got {tuple(t.shape)}")
    if sa.dim() != 3 or ta.shape[2] != sa.shape[2] or tb.shape[2] != sb.shape[2]:
        raise ValueError("pairwise_similarity: student and teacher of a side must share N")
    if sb.shape[1] != sa.shape[1] or tb.shape[1] != ta.shape[1]:
        raise ValueError("pairwise_similarity: the two sides must share the channel counts")


@triton_op("tcloss::pairwise_similarity_fwd_triton", mutates_args=())
def pairwise_similarity_fwd_triton(sa: torch.Tensor, ta: torch.Tensor, sb: torch.Tensor, tb: torch.Tensor, loss: int,
                                   temperature: float, eps: float,
                                   detach_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the native ``tcloss::pairwise_similarity_fwd``."""
    _check(sa, ta, sb, tb, loss, temperature, eps)
    acc = _acc(sa)
    B, Cs, Na = sa.shape
    Ct, Nb = ta.shape[1], sb.shape[2]
    ahs, _ = normalize_rows(sa, eps, acc)
    aht, _ = normalize_rows(ta, eps, acc)
    bhs, _ = normalize_rows(sb, eps, acc)
    bht, _ = normalize_rows(tb, eps, acc)
    par = torch.tensor([1.0 / temperature, 0.0], dtype=acc, device=sa.device)
    rowloss = torch.empty((B, Na), dtype=acc, device=sa.device)
    stats = torch.empty((B, Na, 2) if loss == 1 else (0,), dtype=acc, device=sa.device)
    BM, BN, BK, nw = _blocks(sa.device)
    wrap_triton(_pairwise_fwd_kernel)[(triton.cdiv(Na, BM), B)](
        ahs, aht, bhs, bht, par, rowloss, stats, Na, Nb, Cs, Ct,
        LOSS=int(loss), IS_F64=acc == torch.float64, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=nw)
    denom = B * Na * (Nb if loss == 0 else 1)
    return rowloss.sum() / denom, stats


@triton_op("tcloss::pairwise_similarity_bwd_triton", mutates_args=())
def pairwise_similarity_bwd_triton(grad: torch.Tensor, sa: torch.Tensor, ta: torch.Tensor, sb: torch.Tensor,
                                   tb: torch.Tensor, stats: torch.Tensor, loss: int, temperature: float, eps: float,
                                   detach_norm: bool, grad_a: bool,
                                   grad_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the native ``tcloss::pairwise_similarity_bwd``."""
    _check(sa, ta, sb, tb, loss, temperature, eps)
    acc = _acc(sa)
    B, Cs, Na = sa.shape
    Ct, Nb = ta.shape[1], sb.shape[2]
    ahs, na = normalize_rows(sa, eps, acc)
    aht, _ = normalize_rows(ta, eps, acc)
    bhs, nb = normalize_rows(sb, eps, acc)
    bht, _ = normalize_rows(tb, eps, acc)
    denom = B * Na * (Nb if loss == 0 else 1)
    par = torch.tensor([1.0 / temperature, 1.0 / denom], dtype=acc, device=sa.device)
    BM, BN, BK, nw = _blocks(sa.device)
    stats = stats.to(acc).contiguous()
    outs = []
    for want, own_rows in ((grad_a, True), (grad_b, False)):
        if not want:
            outs.append(sa.new_empty((0,)))
            continue
        o_s, o_t, x_s, x_t = (ahs, aht, bhs, bht) if own_rows else (bhs, bht, ahs, aht)
        No, Nx = (Na, Nb) if own_rows else (Nb, Na)
        g = torch.zeros((B, No, Cs), dtype=acc, device=sa.device)
        wrap_triton(_pairwise_bwd_kernel)[(triton.cdiv(No, BM), B)](
            o_s, o_t, x_s, x_t, par, stats, g, No, Nx, Na, Cs, Ct,
            LOSS=int(loss), OWN_ROWS=own_rows, IS_F64=acc == torch.float64,
            BLOCK_O=BM, BLOCK_X=BN, BLOCK_K=BK, num_warps=nw)
        g = g * grad.to(acc)  # dL/dloss, without a host sync
        xh, n = (ahs, na) if own_rows else (bhs, nb)
        outs.append(norm_backward(g, xh, n, eps, detach_norm, sa.dtype))
    return outs[0], outs[1]
