"""Triton kernel of the fused temporal loss (eq. 1): kernel -> launcher -> torch.library op.

One thread per pixel: a program owns a tile of BLOCK_P = 32 * num_warps pixels (4 rows of
32), and every tensor in the kernel is a (BLOCK_P,) vector, walked over the channels with
loops. So the 32 lanes of a warp read, write and scatter 32 adjacent pixels of one channel
plane (coalesced; the corners of neighbouring pixels are neighbours under a smooth flow), the
channel sums stay in the thread (no shuffles or barriers), there is one layout (no
shared-memory conversions) and the registers do not grow with C (no spills, no padding of C
to a power of two):
  pre-pass (on="prob"): softmax statistics (max, 1/sum) of pred_tk, 8 bytes a pixel, which
          the four corners of every pixel read instead of C values each;
  pass 1: the same statistics of pred_t[:, i] from its own channels (max, then sum);
  pass 2: the loss and, for the gradients, the channel sums <q_t, dq>, <q_k, dq> of the
          softmax Jacobians and the d flow sums (d flow is stored after it);
  pass 3 (gradients only): d pred_t is stored and d pred_tk is scattered with atomics.
Passes 2 and 3 re-read the channel planes, which the first pass has just brought into L1/L2.
The atomics are relaxed (sem="relaxed", scope "gpu"): the sums need no ordering, and the
default acq_rel makes each one a fenced ATOM instead of a fire-and-forget RED. The backward op
writes no loss map (WRITE_LOSS=False). Nothing of size (B,C,H,W) is written except the
gradients themselves. ``scripts/static_resources.py`` shows the compiled registers, spills and
atomics for sm_90.

The ops are opaque ``torch.library.custom_op``s (torch.compile sees their fake kernels and calls
the launcher at run time), not ``triton_op``s: on an H200 (torch 2.11, triton 3.6) the
``triton_op`` form failed the torch.compile test: inductor's mutation analysis could not trace
this kernel, assumed every argument mutated, and the reference loss computed from the same
inputs after the compiled call no longer matched (the compiled loss itself did). The
opaque form is how the native op is compiled (exact there); on CPU it also lets the Triton
interpreter run under torch.compile, which the tests now do.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from .._dtypes import acc_dtype
from .._math import saturate_to

NUM_WARPS = 4  # BLOCK_P = 32 * NUM_WARPS pixels a program
_F32_TINY, _F32_MAX = float(torch.finfo(torch.float32).smallest_normal) * 2.0 ** -23, float(torch.finfo(torch.float32).max)
TILE_W = 32  # the main kernel's programs are (BLOCK_P // TILE_W) x TILE_W tiles


@triton.jit
def _temporal_loss_kernel(
    pt_ptr, ptk_ptr, st_ptr, flow_ptr, it_ptr, itk_ptr, grad_ptr, loss_ptr, gpt_ptr, gptk_ptr, gflow_ptr,
    C, CI, H, W, mask_power,
    ON_PROB: tl.constexpr, MASK_MODE: tl.constexpr, ZEROS_PAD: tl.constexpr, GRAD_MODE: tl.constexpr,
    G_PT: tl.constexpr, G_PTK: tl.constexpr, G_FLOW: tl.constexpr, WRITE_LOSS: tl.constexpr,
    BLOCK_P: tl.constexpr, TILE_W: tl.constexpr,
):
    """Per pixel i = (b,y,x), flow (u,v), a_k the bilinear weights at (x+u, y+v):
        q_t = softmax_C(pred_t[:, i]),  w = sum_k a_k softmax_C(pred_tk[:, corner_k])
        V^p = exp(-p * r(img_t[:, i] - sum_k a_k img_tk[:, corner_k]))
        l_i = V^p * sum_c (q_t - w)^2
    and with g = dL/dl_i, dq = 2 g V^p (q_t - w), J z = q (z - <q, z>):
        d pred_t = J_t dq;  d pred_tk[:, corner_k] += a_k J_k(-dq);
        d flow = -sum_c dq * sum_k (d a_k / d(px, py)) q_k.
    GRAD_MODE: 0 no gradients, 1 one dL/dl for all pixels (grad_ptr[0]), 2 a (B,H,W) map
    grad_ptr[i]. The scalar comes through memory, not as an argument, so that float64 runs stay
    float64 (Python floats reach a kernel as float32). WRITE_LOSS: store the loss map (the
    backward op has no use for it).
    """
    # A program is a tile of BLOCK_P // TILE_W rows x TILE_W pixels of one batch item (a warp is
    # 32 pixels of one row): vertically neighbouring pixels share corner rows, so under a smooth
    # flow the gathers find in L1 what a row-segment program would fetch from L2 again.
    pid = tl.program_id(0).to(tl.int64)
    TILE_H: tl.constexpr = BLOCK_P // TILE_W
    tiles_x = tl.cdiv(W, TILE_W)
    tiles = tiles_x * tl.cdiv(H, TILE_H)
    b = pid // tiles
    tile_y = (pid - b * tiles) // tiles_x
    tile_x = pid - b * tiles - tile_y * tiles_x
    lane = tl.arange(0, BLOCK_P)
    y = tile_y * TILE_H + lane // TILE_W
    x = tile_x * TILE_W + lane % TILE_W
    pmask = (y < H) & (x < W)
    HW = H.to(tl.int64) * W
    pix = y * W + x
    offs = b * HW + pix
    fl_base = b * 2 * HW + pix
    u = tl.load(flow_ptr + fl_base, mask=pmask, other=0.0)
    v = tl.load(flow_ptr + fl_base + HW, mask=pmask, other=0.0)
    px = x.to(u.dtype) + u
    py = y.to(u.dtype) + v
    finite = ((px - px) == 0) & ((py - py) == 0)
    xmax = (W - 1).to(u.dtype)
    ymax = (H - 1).to(u.dtype)
    if ZEROS_PAD:
        inside = finite & (px >= -1) & (px <= W) & (py >= -1) & (py <= H)
        px = tl.where(inside, px, -2.0)  # -2: every corner falls outside
        py = tl.where(inside, py, -2.0)
        gxs = tl.where(inside, 1.0, 0.0)
        gys = gxs
    else:
        gxs = tl.where((px <= 0) | (px >= xmax), 0.0, 1.0)  # clamped: no gradient
        gys = tl.where((py <= 0) | (py >= ymax), 0.0, 1.0)
        px = tl.where(finite, tl.minimum(tl.maximum(px, 0.0), xmax), 0.0)
        py = tl.where(finite, tl.minimum(tl.maximum(py, 0.0), ymax), 0.0)
    fx = tl.floor(px)
    fy = tl.floor(py)
    tx = px - fx
    ty = py - fy
    x0 = fx.to(tl.int64)
    y0 = fy.to(tl.int64)
    x1 = x0 + 1
    y1 = y0 + 1
    ok = pmask & finite
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x1 >= 0) & (x1 < W)
    vy0 = (y0 >= 0) & (y0 < H)
    vy1 = (y1 >= 0) & (y1 < H)
    v00 = ok & vx0 & vy0
    v01 = ok & vx1 & vy0
    v10 = ok & vx0 & vy1
    v11 = ok & vx1 & vy1
    o00 = tl.where(v00, y0 * W + x0, 0)
    o01 = tl.where(v01, y0 * W + x1, 0)
    o10 = tl.where(v10, y1 * W + x0, 0)
    o11 = tl.where(v11, y1 * W + x1, 0)
    a00 = tl.where(v00, (1 - tx) * (1 - ty), 0.0)
    a01 = tl.where(v01, tx * (1 - ty), 0.0)
    a10 = tl.where(v10, (1 - tx) * ty, 0.0)
    a11 = tl.where(v11, tx * ty, 0.0)

    # Occlusion weight V^p (a constant for the gradients), r summed over the image channels.
    ib = b * CI * HW
    zero = tl.zeros((BLOCK_P,), dtype=u.dtype)
    r = zero
    for ci in range(CI):
        co = ci * HW
        d = tl.load(it_ptr + ib + pix + co, mask=pmask, other=0.0)
        d -= tl.load(itk_ptr + ib + o00 + co, mask=v00, other=0.0) * a00
        d -= tl.load(itk_ptr + ib + o01 + co, mask=v01, other=0.0) * a01
        d -= tl.load(itk_ptr + ib + o10 + co, mask=v10, other=0.0) * a10
        d -= tl.load(itk_ptr + ib + o11 + co, mask=v11, other=0.0) * a11
        if MASK_MODE == 0:
            r += d
        elif MASK_MODE == 1:
            r += tl.abs(d)
        else:
            r += d * d
    if MASK_MODE == 0:
        r = tl.abs(r)
    elif MASK_MODE == 2:
        r = tl.sqrt(r)
    # V^p = exp(-p r); p = 0 gives 1 even where r is infinite or NaN (V^0 = 1, as the reference's
    # pow and the native kernels), not exp(-0 * inf) = NaN
    vp = tl.where(mask_power == 0, 1.0, tl.exp(-mask_power * r))

    # Per-pixel offsets of pixel i and of the four corners in a (B,C,H,W) tensor; channel c
    # adds c*HW. Corners outside the image read 0 (their weight a_k is 0).
    pb = b * C * HW
    ot = pb + pix
    k00 = pb + o00
    k01 = pb + o01
    k10 = pb + o10
    k11 = pb + o11

    # Pass 1: softmax statistics (max m, 1/sum s) of pred_t[:, i] from its own channels; those
    # of the four corners come from the pre-pass over pred_tk (st_ptr: (B,H,W) pairs).
    if ON_PROB:
        mt, st = _softmax_stats(pt_ptr, ot, pmask, C, HW, u.dtype)
        sb = b * HW
        m00 = tl.load(st_ptr + 2 * (sb + o00), mask=v00, other=0.0)
        m01 = tl.load(st_ptr + 2 * (sb + o01), mask=v01, other=0.0)
        m10 = tl.load(st_ptr + 2 * (sb + o10), mask=v10, other=0.0)
        m11 = tl.load(st_ptr + 2 * (sb + o11), mask=v11, other=0.0)
        s00 = tl.load(st_ptr + 2 * (sb + o00) + 1, mask=v00, other=0.0)
        s01 = tl.load(st_ptr + 2 * (sb + o01) + 1, mask=v01, other=0.0)
        s10 = tl.load(st_ptr + 2 * (sb + o10) + 1, mask=v10, other=0.0)
        s11 = tl.load(st_ptr + 2 * (sb + o11) + 1, mask=v11, other=0.0)
    else:
        mt = zero
        m00 = zero
        m01 = zero
        m10 = zero
        m11 = zero
        st = zero
        s00 = zero
        s01 = zero
        s10 = zero
        s11 = zero

    if GRAD_MODE == 0:
        kk = zero
    else:
        if GRAD_MODE == 1:
            g = tl.load(grad_ptr).to(u.dtype)
        else:
            g = tl.load(grad_ptr + offs, mask=pmask, other=0.0).to(u.dtype)
        kk = tl.where(ok, 2.0 * g * vp, 0.0)  # dq = kk * (q_t - w) = d l / d q_t ; d l / d w = -dq

    # Pass 2: loss sum_c (q_t - w)^2 and, for the gradients, the channel sums
    # <q_t, dq>, <q_k, dq> (softmax Jacobians) and <dq, d w / d(px, py)> (d flow).
    acc = zero
    sqt = zero
    sq00 = zero
    sq01 = zero
    sq10 = zero
    sq11 = zero
    sfx = zero
    sfy = zero
    for c in range(C):
        co = c * HW
        qt, q00, q01, q10, q11 = _probs(pt_ptr, ptk_ptr, ot, k00, k01, k10, k11, co, pmask, v00, v01, v10, v11,
                                        mt, m00, m01, m10, m11, st, s00, s01, s10, s11, u.dtype, ON_PROB)
        diff = qt - (a00 * q00 + a01 * q01 + a10 * q10 + a11 * q11)
        acc += diff * diff
        if GRAD_MODE != 0:
            dq = kk * diff
            if G_PT:
                sqt += qt * dq
            if G_PTK:
                sq00 += q00 * dq
                sq01 += q01 * dq
                sq10 += q10 * dq
                sq11 += q11 * dq
            if G_FLOW:
                # sum_k (d a_k / d px) q_k with corners outside the image contributing nothing
                z00 = tl.where(v00, q00, 0.0)
                z01 = tl.where(v01, q01, 0.0)
                z10 = tl.where(v10, q10, 0.0)
                z11 = tl.where(v11, q11, 0.0)
                sfx += dq * ((z01 - z00) * (1 - ty) + (z11 - z10) * ty)
                sfy += dq * ((z10 - z00) * (1 - tx) + (z11 - z01) * tx)
    if WRITE_LOSS:
        loss = vp * acc
        loss = tl.where(finite, loss, float("nan"))
        tl.store(loss_ptr + offs, loss, mask=pmask)

    if GRAD_MODE != 0:
        if G_FLOW:
            # times the border-clamp gradient
            tl.store(gflow_ptr + fl_base, -sfx * gxs, mask=pmask)
            tl.store(gflow_ptr + fl_base + HW, -sfy * gys, mask=pmask)
        if G_PT or G_PTK:
            # Pass 3: d pred_t = J_t dq, d pred_tk[:, corner_k] += a_k J_k (-dq) (atomics).
            e00 = v00 & (a00 != 0)
            e01 = v01 & (a01 != 0)
            e10 = v10 & (a10 != 0)
            e11 = v11 & (a11 != 0)
            for c in range(C):
                co = c * HW
                qt, q00, q01, q10, q11 = _probs(pt_ptr, ptk_ptr, ot, k00, k01, k10, k11, co, pmask, v00, v01, v10,
                                                v11, mt, m00, m01, m10, m11, st, s00, s01, s10, s11, u.dtype, ON_PROB)
                dq = kk * (qt - (a00 * q00 + a01 * q01 + a10 * q10 + a11 * q11))
                if G_PT:
                    if ON_PROB:
                        gpt = qt * (dq - sqt)
                    else:
                        gpt = dq
                    tl.store(gpt_ptr + ot + co, gpt, mask=pmask)
                if G_PTK:
                    _scatter(gptk_ptr + co, k00, a00, e00, q00, dq, sq00, ON_PROB)
                    _scatter(gptk_ptr + co, k01, a01, e01, q01, dq, sq01, ON_PROB)
                    _scatter(gptk_ptr + co, k10, a10, e10, q10, dq, sq10, ON_PROB)
                    _scatter(gptk_ptr + co, k11, a11, e11, q11, dq, sq11, ON_PROB)


@triton.jit
def _softmax_stats(p_ptr, off, mask, C, HW, DT: tl.constexpr):
    # max m and 1/sum_c exp(z_c - m) of the channel vectors at `off` (channel stride HW): the
    # max first, then the sum from the cache, one exp an element. A non-finite max (inf or NaN
    # logits, or all -inf) gives NaN probabilities, as torch.softmax does.
    m = tl.load(p_ptr + off, mask=mask, other=0.0).to(DT)
    for c in range(1, C):
        m = tl.maximum(m, tl.load(p_ptr + off + c * HW, mask=mask, other=0.0).to(DT))
    s = tl.zeros(m.shape, dtype=DT)
    for c in range(C):
        s += tl.exp(tl.load(p_ptr + off + c * HW, mask=mask, other=0.0).to(DT) - m)
    finite = (m - m) == 0
    return tl.where(finite, m, 0.0), tl.where(finite, 1.0 / s, float("nan"))


@triton.jit
def _softmax_stats_kernel(p_ptr, st_ptr, n_pix, C, HW, F64: tl.constexpr, BLOCK_P: tl.constexpr):
    """Softmax statistics (max, 1/sum) of every pixel's channel vector of a (B,C,H,W) tensor,
    stored as (B,H,W) pairs: the corners of the main kernel read 8 bytes instead of C values."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = offs < n_pix
    HW64 = HW.to(tl.int64)
    b = offs // HW64
    m, r = _softmax_stats(p_ptr, b * C * HW64 + (offs - b * HW64), pmask, C, HW64,
                          tl.float64 if F64 else tl.float32)
    tl.store(st_ptr + 2 * offs, m, mask=pmask)
    tl.store(st_ptr + 2 * offs + 1, r, mask=pmask)


@triton.jit
def _probs(pt_ptr, ptk_ptr, ot, k00, k01, k10, k11, co, pmask, v00, v01, v10, v11,
           mt, m00, m01, m10, m11, st, s00, s01, s10, s11, DT: tl.constexpr, ON_PROB: tl.constexpr):
    # channel c (co = c*HW) of q_t and of the four corner q_k (softmax from the pass-1 statistics)
    zt = tl.load(pt_ptr + ot + co, mask=pmask, other=0.0).to(DT)
    z00 = tl.load(ptk_ptr + k00 + co, mask=v00, other=0.0).to(DT)
    z01 = tl.load(ptk_ptr + k01 + co, mask=v01, other=0.0).to(DT)
    z10 = tl.load(ptk_ptr + k10 + co, mask=v10, other=0.0).to(DT)
    z11 = tl.load(ptk_ptr + k11 + co, mask=v11, other=0.0).to(DT)
    if ON_PROB:
        return (tl.exp(zt - mt) * st, tl.exp(z00 - m00) * s00, tl.exp(z01 - m01) * s01,
                tl.exp(z10 - m10) * s10, tl.exp(z11 - m11) * s11)
    else:
        return zt, z00, z01, z10, z11


@triton.jit
def _scatter(gptk_ptr, off, a, emit, q, dq, sq, ON_PROB: tl.constexpr):
    # a_k J_k (-dq) at one channel: a_k q_k (-dq + <q_k, dq>); a_k (-dq) on logits
    if ON_PROB:
        contrib = a * (q * (sq - dq))
    else:
        contrib = -a * dq
    # Plain reductions: the sums need no ordering against other memory operations, and the
    # default acq_rel would make each one a fenced atom (read-back included) instead of a red.
    tl.atomic_add(gptk_ptr + off, contrib, mask=emit, sem="relaxed", scope="gpu")


def _launch(grad, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power, zeros_padding,
            reduction, g_pt, g_ptk, g_flow):
    """The forward (grad None: the loss) or the backward (grad: the gradients asked for)."""
    if not (math.isfinite(mask_power) and mask_power >= 0):  # as the native ops' host check
        raise ValueError(f"tcloss: mask_power must be a finite non-negative number, got {mask_power}")
    if mask_power > 0:  # the scalar reaches the kernel as float32: keep it positive and finite there
        mask_power = min(max(mask_power, _F32_TINY), _F32_MAX)
    B, C, H, W = pred_t.shape
    acc = acc_dtype(pred_t.dtype)
    pt, ptk = pred_t.contiguous(), pred_tk.contiguous()
    fl = flow.to(acc).contiguous()
    it, itk = saturate_to(img_t, acc).contiguous(), saturate_to(img_tk, acc).contiguous()
    CI = it.shape[1]
    write_loss = grad is None
    loss = torch.empty((B, H, W) if write_loss else (1,), device=pt.device, dtype=acc)
    gpt = torch.empty_like(pt) if g_pt else None
    gptk = torch.zeros(pt.shape, device=pt.device, dtype=acc) if g_ptk else None
    gfl = torch.empty((B, 2, H, W), device=pt.device, dtype=acc) if g_flow else None
    any_grad = g_pt or g_ptk or g_flow
    if not any_grad:
        grad_mode = 0
    elif grad.numel() == 1:
        grad_mode = 1
    else:
        grad_mode = 2
    n_pix = B * H * W
    mul = (1.0 / max(n_pix, 1)) if reduction == 1 else 1.0
    if grad_mode == 1:  # dL/dl_i, the same for every pixel
        grad = grad.to(acc).reshape(()) * mul
    elif grad_mode == 2:
        grad = grad.to(acc).contiguous()
    # one pixel per thread: every tensor of the kernel is a (BLOCK_P,) vector in one layout
    BLOCK_P = 32 * NUM_WARPS
    grid = (triton.cdiv(n_pix, BLOCK_P),)
    tiles = (B * triton.cdiv(W, TILE_W) * triton.cdiv(H, BLOCK_P // TILE_W),)
    if n_pix > 0:
        stats = None
        if on_prob:  # softmax statistics of pred_tk, read at the four corners of every pixel
            stats = torch.empty((B, H, W, 2), device=pt.device, dtype=acc)
            _softmax_stats_kernel[grid](ptk, stats, n_pix, C, H * W, F64=acc == torch.float64, BLOCK_P=BLOCK_P,
                                        num_warps=NUM_WARPS)
        # unused pointers get a 1-element dummy rather than None (the constexpr flags prune
        # every access), which keeps one argument signature for eager and inductor launches
        dummy = torch.empty((1,), device=pt.device, dtype=acc)
        _temporal_loss_kernel[tiles](
            pt, ptk, dummy if stats is None else stats, fl, it, itk, dummy if grad is None else grad, loss,
            torch.empty((1,), device=pt.device, dtype=pt.dtype) if gpt is None else gpt,
            dummy if gptk is None else gptk, dummy if gfl is None else gfl,
            C, CI, H, W, float(mask_power),
            ON_PROB=bool(on_prob), MASK_MODE=int(mask_mode), ZEROS_PAD=bool(zeros_padding), GRAD_MODE=grad_mode,
            G_PT=bool(g_pt), G_PTK=bool(g_ptk), G_FLOW=bool(g_flow), WRITE_LOSS=bool(write_loss),
            BLOCK_P=BLOCK_P, TILE_W=TILE_W, num_warps=NUM_WARPS,
        )
    grads = (gpt if g_pt else pred_t.new_empty((0,)),
             gptk.to(pred_t.dtype) if g_ptk else pred_t.new_empty((0,)),
             gfl.to(flow.dtype) if g_flow else flow.new_empty((0,)))
    if not write_loss:
        out = None
    elif reduction == 0:
        out = loss
    else:
        out = loss.sum() / n_pix if reduction == 1 else loss.sum()
    return out, grads


@custom_op("tcloss::temporal_loss_fwd_triton", mutates_args=())
def temporal_loss_fwd_triton(pred_t: torch.Tensor, pred_tk: torch.Tensor, flow: torch.Tensor, img_t: torch.Tensor,
                             img_tk: torch.Tensor, on_prob: bool, mask_mode: int, mask_power: float,
                             zeros_padding: bool, reduction: int) -> torch.Tensor:
    """Same contract as the native ``tcloss::temporal_loss_fwd``."""
    return _launch(None, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power, zeros_padding,
                   reduction, False, False, False)[0]


@custom_op("tcloss::temporal_loss_bwd_triton", mutates_args=())
def temporal_loss_bwd_triton(grad: torch.Tensor, pred_t: torch.Tensor, pred_tk: torch.Tensor, flow: torch.Tensor,
                             img_t: torch.Tensor, img_tk: torch.Tensor, on_prob: bool, mask_mode: int,
                             mask_power: float, zeros_padding: bool, reduction: int, grad_pred_t: bool,
                             grad_pred_tk: bool, grad_flow: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the native ``tcloss::temporal_loss_bwd``."""
    _, grads = _launch(grad, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power,
                       zeros_padding, reduction, grad_pred_t, grad_pred_tk, grad_flow)
    return grads
