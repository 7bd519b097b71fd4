"""Triton kernels of the blocked pair-wise similarity loss: kernel -> launcher -> torch.library op.

The kernels read the ``(B,C,N)`` inputs as they are (any float dtype) and normalise on the fly
from per-pixel row scales ``(B,3,N)`` (:func:`row_scales`): a tile of unit rows is
``x s_n`` (``s`` a power of two, exact) times ``1/max(||x s||, eps s)``, so no normalised copy
of any input exists. The forward program owns BLOCK_M rows of S and T and sweeps the columns in
tiles of BLOCK_N: each tile ``S = A_s B_s^T``, ``T = A_t B_t^T`` is a pair of ``tl.dot`` GEMMs
over channel chunks, reduced into per-row accumulators and discarded. For ``loss="kl"`` the row
log-sum-exps of S/tau and T/tau are tracked online (FlashAttention) and saved as the only
statistics.

Backward (FlashAttention-2 ordering): one launch; each S/T tile is recomputed once and its
``G = dloss/dS`` feeds both operands' gradients. A program owns a block of "owner" rows and
sweeps the other side's blocks:

* self-similarity (``student_b is None``): owner = rows = columns. S and T are symmetric, so the
  tile (j, i) gives both G_ij and G_ji and ``d a_j = sum_i (G_ij + G_ji) a_i`` is accumulated by
  its owner alone: no partial sums, no ordering.
* cross (two tensors): the owner is a column block j of B (``d b_j = sum_i G_ij a_i``, its own
  rows). The row-side ``d a_i = sum_j G_ij b_j`` is added by every column program in the fixed
  order j = 0, 1, ... through a per-row-block ticket (the deterministic backward of
  FlashAttention-3): a program waits until the ticket of row block i reads j, adds, and passes it
  on; the last one finishes the row block. Programs start at row block 0, so program j trails
  j-1 by one tile (a wavefront). Only ``d a`` asked: the owner is the row block, no tickets.

Each program finishes its rows with the normalisation's backward (:func:`_unit_rows_bwd`) and
writes the gradient in the input dtype; float32 inputs accumulate in the output itself. Extra
memory: the row scales, the tickets, and a float32 accumulator only for half-precision inputs.

``precision``: ``"ieee"`` (3xTF32 on tensor cores, ~fp32), ``"tf32"``, ``"bf16"`` (bf16 operands),
all accumulating in float32; float64 inputs are always exact (fp64 dot). The Triton interpreter's
``tl.dot`` is a float32 numpy matmul that ignores ``input_precision`` and reads bfloat16 bit
patterns as integers, so under it :func:`_mma` performs the roundings explicitly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._dtypes import acc_dtype
from . import triton_interpret
from .pairwise_similarity_loss import PRECISIONS, row_scales


@triton.jit
def _tf32(x, NEAREST: tl.constexpr):
    """x rounded to TF32 (10 mantissa bits): to nearest, ties away (the cvt.rna of 3xTF32's split),
    or truncated (what a tensor core reads of a raw float32 operand: the worst case)."""
    u = x.to(tl.uint32, bitcast=True)
    if NEAREST:
        u = u + 0x1000
    return (u & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mma(acc, x, y, PREC: tl.constexpr, IS_F64: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + x @ y`` at precision PREC (0 ieee = 3xTF32, 1 tf32, 2 bf16 operands; float32
    accumulation); float64 exact. EMULATE (the interpreter): the same roundings, explicitly.
    One return at the end: Triton still generates the code after a constexpr ``if: return``."""
    if IS_F64:  # out_dtype named: Triton < 3.7 takes float32 by default, whatever acc is
        out = tl.dot(x, y, acc, input_precision="ieee", out_dtype=tl.float64)
    elif PREC == 2:
        if EMULATE:
            out = tl.dot(x.to(tl.bfloat16).to(tl.float32), y.to(tl.bfloat16).to(tl.float32), acc,
                         input_precision="ieee")
        else:
            out = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), acc)
    elif EMULATE:
        xh = _tf32(x, PREC == 0)
        yh = _tf32(y, PREC == 0)
        if PREC == 0:  # Triton's 3xTF32: small*big + big*small + big*big
            acc = tl.dot(_tf32(x - xh, True), yh, acc, input_precision="ieee")
            acc = tl.dot(xh, _tf32(y - yh, True), acc, input_precision="ieee")
        out = tl.dot(xh, yh, acc, input_precision="ieee")
    elif PREC == 0:
        out = tl.dot(x, y, acc, input_precision="tf32x3")
    else:
        out = tl.dot(x, y, acc, input_precision="tf32")
    return out


@triton.jit
def _rows(x_ptr, C, N, k0, offs, m, s, BK: tl.constexpr):
    """(BK, len(offs)) chunk ``x[c, n] * s[n]`` (channels k0.., pixels offs) of one (C,N) image."""
    offs_k = k0 + tl.arange(0, BK)
    v = tl.load(x_ptr + offs_k[:, None].to(tl.int64) * N + offs[None, :], mask=(offs_k < C)[:, None] & m[None, :],
                other=0.0)
    return v.to(s.dtype) * s[None, :]


@triton.jit
def _cos_tile(x_ptr, sx, ivx, y_ptr, sy, ivy, C, Nx, Ny, offs_x, offs_y, xm, ym,
              PREC: tl.constexpr, IS_F64: tl.constexpr, EMULATE: tl.constexpr,
              BX: tl.constexpr, BY: tl.constexpr, BK: tl.constexpr):
    """``cos(x_i, y_j)`` (BX, BY) for pixels offs_x of x and offs_y of y, with row scales s, 1/norm."""
    if IS_F64:
        acc = tl.zeros((BX, BY), dtype=tl.float64)
    else:
        acc = tl.zeros((BX, BY), dtype=tl.float32)
    for k0 in range(0, C, BK):
        acc = _mma(acc, tl.trans(_rows(x_ptr, C, Nx, k0, offs_x, xm, sx, BK)), _rows(y_ptr, C, Ny, k0, offs_y, ym, sy, BK),
                   PREC, IS_F64, EMULATE)
    return acc * ivx[:, None] * ivy[None, :]


@triton.jit
def _scales(r_ptr, N, offs, m):
    """Row scales of pixels offs: s (power of two), 1/max(||x s||, eps s), full (1: the gradient
    goes through the norm)."""
    return (tl.load(r_ptr + offs, mask=m, other=1.0), tl.load(r_ptr + N + offs, mask=m, other=0.0),
            tl.load(r_ptr + 2 * N + offs, mask=m, other=0.0))


@triton.jit
def _unit_rows_bwd(g_ptr, out_ptr, x_ptr, s, iv, full, C, N, offs, m, BK: tl.constexpr, BLK: tl.constexpr):
    """d x of the unit rows ``xh = x s iv`` from ``g = d xh`` ((C,N) images, pixels offs):
    ``(g - xh <xh, g> full) iv s`` (full = 0: clamped norm or detach_norm, ``g / max(|x|, eps)``)."""
    d = tl.zeros((BLK,), dtype=s.dtype)
    for k0 in range(0, C, BK):
        offs_k = k0 + tl.arange(0, BK)
        gm = (offs_k < C)[:, None] & m[None, :]
        g = tl.load(g_ptr + offs_k[:, None].to(tl.int64) * N + offs[None, :], mask=gm, other=0.0, cache_modifier=".cg")
        d += tl.sum(_rows(x_ptr, C, N, k0, offs, m, s, BK) * g, axis=0)
    d = d * iv * (iv * full)
    for k0 in range(0, C, BK):
        offs_k = k0 + tl.arange(0, BK)
        gm = (offs_k < C)[:, None] & m[None, :]
        gp = offs_k[:, None].to(tl.int64) * N + offs[None, :]
        g = tl.load(g_ptr + gp, mask=gm, other=0.0, cache_modifier=".cg")
        dx = (g - _rows(x_ptr, C, N, k0, offs, m, s, BK) * d[None, :]) * iv[None, :] * s[None, :]
        tl.store(out_ptr + gp, dx.to(out_ptr.dtype.element_ty), mask=gm)


@triton.jit
def _pairwise_fwd_kernel(
    as_ptr, at_ptr, bs_ptr, bt_ptr, ras_ptr, rat_ptr, rbs_ptr, rbt_ptr, par_ptr, rowloss_ptr, stats_ptr,
    Na, Nb, Cs, Ct,
    LOSS: tl.constexpr, PREC: tl.constexpr, IS_F64: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row i of batch b, over all columns j (S, T cosines):
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
    as_ptr += b * Cs * Na
    at_ptr += b * Ct * Na
    bs_ptr += b * Cs * Nb
    bt_ptr += b * Ct * Nb
    sas, ivas, _ = _scales(ras_ptr + b * 3 * Na, Na, offs_m, mm)
    sat, ivat, _ = _scales(rat_ptr + b * 3 * Na, Na, offs_m, mm)
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
        sbs, ivbs, _fbs = _scales(rbs_ptr + b * 3 * Nb, Nb, offs_n, nm)
        sbt, ivbt, _fbt = _scales(rbt_ptr + b * 3 * Nb, Nb, offs_n, nm)
        S = _cos_tile(as_ptr, sas, ivas, bs_ptr, sbs, ivbs, Cs, Na, Nb, offs_m, offs_n, mm, nm,
                      PREC, IS_F64, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K)
        T = _cos_tile(at_ptr, sat, ivat, bt_ptr, sbt, ivbt, Ct, Na, Nb, offs_m, offs_n, mm, nm,
                      PREC, IS_F64, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K)
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
def _g_term(S, T, inv_tau, stats_ptr, offs, m, LOSS: tl.constexpr, ROWS_ARE_OWNER: tl.constexpr):
    """dloss/dS_ij / c of the tile (owner pixel o, other pixel x), the row i of S being the owner
    pixel (ROWS_ARE_OWNER) or the other one; ``offs`` are the row pixels (stats of row i):
        mse: 2 (S - T);   kl: (softmax_j(S_i/tau) - softmax_j(T_i/tau)) / tau from the saved lse."""
    if LOSS == 0:  # if/else, one return: Triton generates the code after a constexpr ``if: return``
        g = 2.0 * (S - T)
    else:
        lse_s = tl.load(stats_ptr + offs * 2, mask=m, other=0.0)
        lse_t = tl.load(stats_ptr + offs * 2 + 1, mask=m, other=0.0)
        if ROWS_ARE_OWNER:
            g = (tl.exp(S * inv_tau - lse_s[:, None]) - tl.exp(T * inv_tau - lse_t[:, None])) * inv_tau
        else:
            g = (tl.exp(S * inv_tau - lse_s[None, :]) - tl.exp(T * inv_tau - lse_t[None, :])) * inv_tau
    return g


@triton.jit
def _pairwise_bwd_kernel(
    os_ptr, ot_ptr, xs_ptr, xt_ptr, ros_ptr, rot_ptr, rxs_ptr, rxt_ptr, par_ptr, stats_ptr,
    go_ptr, do_ptr, gx_ptr, dx_ptr, tick_ptr,
    No, Nx, Cs, Ct,
    LOSS: tl.constexpr, OWNER_ROWS: tl.constexpr, X_ROWS: tl.constexpr, GRAD_X: tl.constexpr,
    PREC: tl.constexpr, IS_F64: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One pass over the tiles (o = this program's pixels, x = the other side's). The tile is
    ``S[o, x] = cos(o_s, x_s)`` (T likewise); with c = par[1] = dL/dloss / (#terms), its
    gradient ``G[o, x] = c * (g_term(rows = o) if OWNER_ROWS + g_term(rows = x) if X_ROWS)`` (both:
    self-similarity, G_ox + G_xo). ``d o += G x_hat`` (owned, read-modify-write);
    GRAD_X: ``d x += G^T o_hat`` in ticket order, the last program finishing x's rows.
    Accumulators ``go``/``gx`` and outputs ``do``/``dx`` are (B,Cs,N) (the same buffer for float32).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_o = pid.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    om = offs_o < No
    os_ptr += b * Cs * No
    ot_ptr += b * Ct * No
    xs_ptr += b * Cs * Nx
    xt_ptr += b * Ct * Nx
    go_ptr += b * Cs * No
    do_ptr += b * Cs * No
    gx_ptr += b * Cs * Nx
    dx_ptr += b * Cs * Nx
    stats_ptr += b * (No if OWNER_ROWS else Nx) * 2
    s_os, iv_os, full_o = _scales(ros_ptr + b * 3 * No, No, offs_o, om)
    s_ot, iv_ot, _ = _scales(rot_ptr + b * 3 * No, No, offs_o, om)
    inv_tau = tl.load(par_ptr)
    c = tl.load(par_ptr + 1)
    zero = inv_tau * 0.0
    n_x = tl.cdiv(Nx, BLOCK_X)
    for xb in range(0, n_x):
        offs_x = xb * BLOCK_X + tl.arange(0, BLOCK_X).to(tl.int64)
        xm = offs_x < Nx
        s_xs, iv_xs, full_x = _scales(rxs_ptr + b * 3 * Nx, Nx, offs_x, xm)
        s_xt, iv_xt, _fxt = _scales(rxt_ptr + b * 3 * Nx, Nx, offs_x, xm)
        S = _cos_tile(os_ptr, s_os, iv_os, xs_ptr, s_xs, iv_xs, Cs, No, Nx, offs_o, offs_x, om, xm,
                      PREC, IS_F64, EMULATE, BLOCK_O, BLOCK_X, BLOCK_K)
        T = _cos_tile(ot_ptr, s_ot, iv_ot, xt_ptr, s_xt, iv_xt, Ct, No, Nx, offs_o, offs_x, om, xm,
                      PREC, IS_F64, EMULATE, BLOCK_O, BLOCK_X, BLOCK_K)
        if OWNER_ROWS:
            G = _g_term(S, T, inv_tau, stats_ptr, offs_o, om, LOSS, True)
            if X_ROWS:
                G += _g_term(S, T, inv_tau, stats_ptr, offs_x, xm, LOSS, False)
        else:
            G = _g_term(S, T, inv_tau, stats_ptr, offs_x, xm, LOSS, False)
        G = tl.where(om[:, None] & xm[None, :], G * c, zero)
        # d o (transposed, (C, N) like the inputs) += x_s^T (G diag(iv_x))^T: owned rows
        gxo = tl.trans(G * iv_xs[None, :])
        for k0 in range(0, Cs, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            gp = go_ptr + offs_k[:, None].to(tl.int64) * No + offs_o[None, :]
            gm = (offs_k < Cs)[:, None] & om[None, :]
            cur = tl.load(gp, mask=gm, other=0.0)
            tl.store(gp, _mma(cur, _rows(xs_ptr, Cs, Nx, k0, offs_x, xm, s_xs, BLOCK_K), gxo, PREC, IS_F64, EMULATE),
                     mask=gm)
        if GRAD_X:
            # d x (transposed) += o_s^T diag(iv_o) G, added in program order j = 0, 1, ...
            gox = G * iv_os[:, None]
            ticket = tick_ptr + b * n_x + xb
            while tl.atomic_add(ticket, 0, sem="acquire") != pid:
                pass
            for k0 in range(0, Cs, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                gp = gx_ptr + offs_k[:, None].to(tl.int64) * Nx + offs_x[None, :]
                gm = (offs_k < Cs)[:, None] & xm[None, :]
                cur = tl.load(gp, mask=gm, other=0.0, cache_modifier=".cg")
                tl.store(gp, _mma(cur, _rows(os_ptr, Cs, No, k0, offs_o, om, s_os, BLOCK_K), gox, PREC, IS_F64,
                                  EMULATE), mask=gm)
            tl.debug_barrier()
            if pid == tl.num_programs(0) - 1:
                _unit_rows_bwd(gx_ptr, dx_ptr, xs_ptr, s_xs, iv_xs, full_x, Cs, Nx, offs_x, xm, BLOCK_K, BLOCK_X)
            tl.atomic_xchg(ticket, pid + 1, sem="release")
    tl.debug_barrier()
    _unit_rows_bwd(go_ptr, do_ptr, os_ptr, s_os, iv_os, full_o, Cs, No, offs_o, om, BLOCK_K, BLOCK_O)


def _blocks(x: torch.Tensor, Cs: int, Ct: int, precision: str):
    """(rows, columns, channels) of a tile, num_warps, num_stages. Measured on an H200
    (scripts/pairwise_triton_sweep.py, benchmarks/results/NVIDIA_H200/pairwise/sweep*.md): few
    channels (C = 19) run fastest with 16-channel chunks and 4 warps, unpipelined (1.7x the
    8-warp tile at ieee); many (128/512) with 64-channel chunks, two stages, and for bf16 128
    columns. float64 (exactness and gradcheck only) keeps the tile it was tested with."""
    if x.device.type != "cuda" or triton_interpret():
        return 16, 16, 16, 1, 1  # the interpreter: small tiles run fastest
    if x.dtype == torch.float64:
        return 64, 64, 16, 8, 1
    if max(Cs, Ct) <= 32:
        return 64, 64, 16, 4, 1
    return 64, 128 if precision == "bf16" else 64, 64, 4, 2


def _check(sa, ta, sb, tb, loss, temperature, eps, precision):
    # the native ops' host checks (csrc/pairwise_similarity_loss/pairwise_similarity_loss_host.h), for a
    # direct call of the op
    if loss not in (0, 1):
        raise ValueError("pairwise_similarity_loss: loss must be 0 (mse) or 1 (kl)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError("pairwise_similarity_loss: temperature must be a finite positive number")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError("pairwise_similarity_loss: eps must be a finite non-negative number")
    if precision not in PRECISIONS:
        raise ValueError(f"pairwise_similarity_loss: precision must be one of {PRECISIONS}")
    if (sb is None) != (tb is None):
        raise ValueError("pairwise_similarity_loss: student_b and teacher_b are both given or both None (self-similarity)")
    sb, tb = (sa, ta) if sb is None else (sb, tb)
    for n, t in (("teacher_a", ta), ("student_b", sb), ("teacher_b", tb)):
        if t.dim() != 3 or t.shape[0] != sa.shape[0]:
            raise ValueError(f"{n} must be (B,C,N) with the batch of student_a, got {tuple(t.shape)}")
    if sa.dim() != 3 or ta.shape[2] != sa.shape[2] or tb.shape[2] != sb.shape[2]:
        raise ValueError("pairwise_similarity_loss: student and teacher of a side must share N")
    if sb.shape[1] != sa.shape[1] or tb.shape[1] != ta.shape[1]:
        raise ValueError("pairwise_similarity_loss: the two sides must share the channel counts")


def _sides(sa, ta, sb, tb, eps: float, detach_norm: bool):
    """The set-up of both launchers: each side's inputs made contiguous with their row scales
    (:func:`row_scales`, in the accumulation dtype), as ``(acc, (sa, ta, r_sa, r_ta), (sb, tb,
    r_sb, r_tb))``. Self-similarity (``sb is None``): the column side is the row side itself, one
    set of inputs and scales."""
    acc = acc_dtype(sa.dtype)
    sa, ta = sa.contiguous(), ta.contiguous()
    rows = (sa, ta, row_scales(sa, eps, detach_norm, acc), row_scales(ta, eps, detach_norm, acc))
    if sb is None:
        return acc, rows, rows
    sb, tb = sb.contiguous(), tb.contiguous()
    return acc, rows, (sb, tb, row_scales(sb, eps, detach_norm, acc), row_scales(tb, eps, detach_norm, acc))


def _consts(sa: torch.Tensor, precision: str):
    """Constexprs shared by both kernels: precision code (float64: exact), float64, interpreter."""
    f64 = sa.dtype == torch.float64
    return dict(PREC=0 if f64 else PRECISIONS.index(precision), IS_F64=f64, EMULATE=triton_interpret())


@triton_op("tcloss::pairwise_similarity_loss_fwd_triton", mutates_args=())
def pairwise_similarity_loss_fwd_triton(sa: torch.Tensor, ta: torch.Tensor, sb: Optional[torch.Tensor],
                                        tb: Optional[torch.Tensor], loss: int, temperature: float, eps: float,
                                        detach_norm: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of the native ``tcloss::pairwise_similarity_loss_fwd``, plus: ``sb = tb = None`` is
    self-similarity (one set of inputs for rows and columns), and ``precision`` of the tiles."""
    _check(sa, ta, sb, tb, loss, temperature, eps, precision)
    acc, (sa, ta, ras, rat), (sb, tb, rbs, rbt) = _sides(sa, ta, sb, tb, eps, False)
    B, Cs, Na = sa.shape
    Ct, Nb = ta.shape[1], sb.shape[2]
    par = torch.tensor([1.0 / temperature, 0.0], dtype=acc, device=sa.device)
    rowloss = torch.empty((B, Na), dtype=acc, device=sa.device)
    stats = torch.empty((B, Na, 2) if loss == 1 else (0,), dtype=acc, device=sa.device)
    BM, BN, BK, nw, ns = _blocks(sa, Cs, Ct, precision)
    wrap_triton(_pairwise_fwd_kernel)[(triton.cdiv(Na, BM), B)](
        sa, ta, sb, tb, ras, rat, rbs, rbt, par, rowloss, stats, Na, Nb, Cs, Ct,
        LOSS=int(loss), **_consts(sa, precision), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=nw, num_stages=ns)
    denom = B * Na * (Nb if loss == 0 else 1)
    return rowloss.sum() / denom, stats


@triton_op("tcloss::pairwise_similarity_loss_bwd_triton", mutates_args=())
def pairwise_similarity_loss_bwd_triton(grad: torch.Tensor, sa: torch.Tensor, ta: torch.Tensor,
                                        sb: Optional[torch.Tensor], tb: Optional[torch.Tensor], stats: torch.Tensor,
                                        loss: int, temperature: float, eps: float, detach_norm: bool, precision: str,
                                        grad_a: bool, grad_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of the native ``tcloss::pairwise_similarity_loss_bwd`` (self-similarity: the whole
    gradient is d student_a), plus ``precision``; one pass over the tiles."""
    _check(sa, ta, sb, tb, loss, temperature, eps, precision)
    self_sim = sb is None
    want_a, want_b = grad_a, grad_b and not self_sim
    empty = sa.new_empty((0,))
    if not (want_a or want_b):
        return empty, empty
    acc, (sa, ta, ras, rat), (sb, tb, rbs, rbt) = _sides(sa, ta, sb, tb, eps, detach_norm)
    B, Cs, Na = sa.shape
    Nb = sb.shape[2]
    denom = B * Na * (Nb if loss == 0 else 1)
    # c = dL/dloss / (#terms), without a host sync
    par = torch.stack([torch.full_like(grad, 1.0 / temperature, dtype=acc), grad.to(acc) / denom])
    stats = stats.to(acc).contiguous()

    def buffers(x):  # (accumulator, output): one buffer when the output is the accumulation dtype
        out = torch.empty_like(x)
        return (out.zero_() if x.dtype == acc else torch.zeros_like(x, dtype=acc)), out

    # owner side: the columns (B) when d b is wanted (d a then in ticket order), else the rows
    own_b = want_b
    o_s, o_t, r_os, r_ot, x_s, x_t, r_xs, r_xt = (sb, tb, rbs, rbt, sa, ta, ras, rat) if own_b else \
        (sa, ta, ras, rat, sb, tb, rbs, rbt)
    No, Nx = o_s.shape[2], x_s.shape[2]
    go, do = buffers(o_s)
    grad_x = own_b and want_a
    gx, dx = buffers(x_s) if grad_x else (go, do)
    BO, BX, BK, nw, ns = _blocks(sa, Cs, ta.shape[1], precision)
    ticks = torch.zeros((B, triton.cdiv(Nx, BX)) if grad_x else (0,), dtype=torch.int32, device=sa.device)
    wrap_triton(_pairwise_bwd_kernel)[(triton.cdiv(No, BO), B)](
        o_s, o_t, x_s, x_t, r_os, r_ot, r_xs, r_xt, par, stats, go, do, gx, dx, ticks, No, Nx, Cs, ta.shape[1],
        LOSS=int(loss), OWNER_ROWS=not own_b, X_ROWS=own_b or self_sim, GRAD_X=grad_x, **_consts(sa, precision),
        BLOCK_O=BO, BLOCK_X=BX, BLOCK_K=BK, num_warps=nw, num_stages=ns)
    if own_b:
        return (dx if grad_x else empty), do
    return do, empty
