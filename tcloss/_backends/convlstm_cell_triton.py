"""Triton kernels of the fused ConvLSTM cell (eq. 6 of the supplement): kernel -> launcher ->
torch.library op.

Program (pid0, pid1) owns BLOCK columns j = (k, y, x) of Hd*h*w and the batch items of chunk
pid1, which it walks in a loop: every gate plane is read contiguously, and the per-position
peephole gradient of its columns is summed over the chunk in registers (no atomics). The
(bchunks, 3, Hd, h, w) partial sums are added by the launcher when there is more than one chunk.
Math in the accumulation dtype (float32; float64 for float64 inputs). tanh is written with exp
(libdevice's tanh has no interpreter implementation): an odd Taylor polynomial below 0.1,
(1 - e^{-2|x|}) / (1 + e^{-2|x|}) above, both accurate to a few ulp.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._dtypes import acc_dtype

BLOCK = 256


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    # tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925 + O(x^13): integer
    # constants only (exact in float32), so nothing is rounded on the way into float64 math.
    x2 = x * x
    x3 = x2 * x
    x5 = x3 * x2
    x7 = x5 * x2
    x9 = x7 * x2
    small = (x - x3 / 3.0 + 2.0 * x5 / 15.0 - 17.0 * x7 / 315.0 + 62.0 * x9 / 2835.0
             - 1382.0 * (x9 * x2) / 155925.0)
    return tl.where(ax < 0.1, small, big)


@triton.jit
def _gates(ai, af, ag, ao, c, wi, wf, wo, HAS_PEEP: tl.constexpr):
    """i, f, g, o, c' and tanh(c') of eq. 6 (peepholes w_i, w_f on c, w_o on c')."""
    if HAS_PEEP:
        i = _sigmoid(ai + wi * c)
        f = _sigmoid(af + wf * c)
    else:
        i = _sigmoid(ai)
        f = _sigmoid(af)
    g = _tanh(ag)
    cn = f * c + i * g
    if HAS_PEEP:
        o = _sigmoid(ao + wo * cn)
    else:
        o = _sigmoid(ao)
    t = _tanh(cn)
    return i, f, g, o, cn, t


@triton.jit
def _acc(x, IS_F64: tl.constexpr):
    if IS_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _peepholes(peep_ptr, N, j, jm, HAS_PEEP: tl.constexpr):
    """w_i, w_f, w_o at elements j (0.0 without peepholes)."""
    wi = 0.0
    wf = 0.0
    wo = 0.0
    if HAS_PEEP:
        wi = tl.load(peep_ptr + j, mask=jm, other=0.0)
        wf = tl.load(peep_ptr + N + j, mask=jm, other=0.0)
        wo = tl.load(peep_ptr + 2 * N + j, mask=jm, other=0.0)
    return wi, wf, wo


@triton.jit
def _cell(gates_ptr, c_ptr, o4, o1, N, m, wi, wf, wo, HAS_PEEP: tl.constexpr, IS_F64: tl.constexpr):
    """c and i, f, g, o, c', tanh(c') of the elements at offsets o4 (gates: a_i there, a_f, a_g,
    a_o N apart) and o1 (c)."""
    ai = _acc(tl.load(gates_ptr + o4, mask=m, other=0.0), IS_F64)
    af = _acc(tl.load(gates_ptr + o4 + N, mask=m, other=0.0), IS_F64)
    ag = _acc(tl.load(gates_ptr + o4 + 2 * N, mask=m, other=0.0), IS_F64)
    ao = _acc(tl.load(gates_ptr + o4 + 3 * N, mask=m, other=0.0), IS_F64)
    c = _acc(tl.load(c_ptr + o1, mask=m, other=0.0), IS_F64)
    i, f, g, o, cn, t = _gates(ai, af, ag, ao, c, wi, wf, wo, HAS_PEEP)
    return c, i, f, g, o, cn, t


@triton.jit
def _convlstm_fwd_kernel(gates_ptr, c_ptr, peep_ptr, h_ptr, cn_ptr, B, N, BPER,
                         HAS_PEEP: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    """Per element (b, j), a_* = gates[b, {0,1,2,3}*Hd + k, y, x] (order i, f, g, o):
        i = sigmoid(a_i + w_i c), f = sigmoid(a_f + w_f c), g = tanh(a_g)
        c' = f c + i g,  o = sigmoid(a_o + w_o c'),  h' = o tanh(c')
    (w = 0 terms dropped without peepholes). Writes h', c' only."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    jm = j < N
    b0 = tl.program_id(1).to(tl.int64) * BPER
    wi, wf, wo = _peepholes(peep_ptr, N, j, jm, HAS_PEEP)
    for bb in range(0, BPER):
        b = b0 + bb
        m = jm & (b < B)
        o4 = b * 4 * N + j
        o1 = b * N + j
        c, i, f, g, o, cn, t = _cell(gates_ptr, c_ptr, o4, o1, N, m, wi, wf, wo, HAS_PEEP, IS_F64)
        tl.store(cn_ptr + o1, cn.to(cn_ptr.dtype.element_ty), mask=m)
        tl.store(h_ptr + o1, (o * t).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _convlstm_bwd_kernel(gates_ptr, c_ptr, peep_ptr, dh_ptr, dcn_ptr, ggates_ptr, gc_ptr, gpeep_ptr, B, N, BPER,
                         HAS_PEEP: tl.constexpr, HAS_DH: tl.constexpr, HAS_DCN: tl.constexpr,
                         G_PEEP: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    """Recomputes i, f, g, o, c', t = tanh(c') from the pre-activations, then with dh = dL/dh',
    dc' = dL/dc' (absent = 0):
        da_o = dh t o(1-o);  dC = dc' + dh o (1-t^2) + da_o w_o
        da_i = dC g i(1-i);  da_f = dC (c f(1-f));  da_g = dC i (1-g^2)
        dc = dC f + da_i w_i + da_f w_f
        dw_i += da_i c, dw_f += da_f c, dw_o += da_o c'  (summed over the chunk's batch items)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    jm = j < N
    chunk = tl.program_id(1).to(tl.int64)
    b0 = chunk * BPER
    wi, wf, wo = _peepholes(peep_ptr, N, j, jm, HAS_PEEP)
    if IS_F64:
        zero = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        zero = tl.zeros([BLOCK], dtype=tl.float32)
    si = zero
    sf = zero
    so = zero
    for bb in range(0, BPER):
        b = b0 + bb
        m = jm & (b < B)
        o4 = b * 4 * N + j
        o1 = b * N + j
        c, i, f, g, o, cn, t = _cell(gates_ptr, c_ptr, o4, o1, N, m, wi, wf, wo, HAS_PEEP, IS_F64)
        dC = zero
        dao = zero
        if HAS_DH:
            dh = _acc(tl.load(dh_ptr + o1, mask=m, other=0.0), IS_F64)
            dao = dh * t * o * (1.0 - o)
            dC = dh * o * (1.0 - t * t)
        if HAS_DCN:
            dC = dC + _acc(tl.load(dcn_ptr + o1, mask=m, other=0.0), IS_F64)
        if HAS_PEEP:
            dC = dC + dao * wo
        dai = dC * g * i * (1.0 - i)
        daf = dC * (c * (f * (1.0 - f)))  # not (dC c) first: inf * 0 at a saturated f and c of ~1e38
        dag = dC * i * (1.0 - g * g)
        dc = dC * f
        if HAS_PEEP:
            dc = dc + dai * wi + daf * wf
        ety = ggates_ptr.dtype.element_ty
        tl.store(ggates_ptr + o4, dai.to(ety), mask=m)
        tl.store(ggates_ptr + o4 + N, daf.to(ety), mask=m)
        tl.store(ggates_ptr + o4 + 2 * N, dag.to(ety), mask=m)
        tl.store(ggates_ptr + o4 + 3 * N, dao.to(ety), mask=m)
        tl.store(gc_ptr + o1, dc.to(gc_ptr.dtype.element_ty), mask=m)
        if G_PEEP:
            si += tl.where(m, dai * c, 0.0)
            sf += tl.where(m, daf * c, 0.0)
            so += tl.where(m, dao * cn, 0.0)
    if G_PEEP:
        base = chunk * 3 * N + j
        tl.store(gpeep_ptr + base, si, mask=jm)
        tl.store(gpeep_ptr + base + N, sf, mask=jm)
        tl.store(gpeep_ptr + base + 2 * N, so, mask=jm)


def _check(gates, c, peephole):
    if gates.dim() != 4 or gates.shape[1] % 4 != 0 or gates.shape[1] == 0:
        raise ValueError(f"gates must be (B,4*Hd,h,w), got {tuple(gates.shape)}")
    B, C4, H, W = gates.shape
    Hd = C4 // 4
    if tuple(c.shape) != (B, Hd, H, W) or c.dtype != gates.dtype:
        raise ValueError(f"c must be (B,Hd,h,w) = {(B, Hd, H, W)} of dtype {gates.dtype}, got "
                         f"{tuple(c.shape)} {c.dtype}")
    acc = acc_dtype(gates.dtype)
    if peephole is not None and (tuple(peephole.shape) != (3, Hd, H, W) or peephole.dtype != acc):
        raise ValueError(f"peephole must be (3,Hd,h,w) = {(3, Hd, H, W)} of dtype {acc}, got "
                         f"{tuple(peephole.shape)} {peephole.dtype}")
    return B, Hd, H, W, acc


def _chunks(B: int, N: int, device: torch.device) -> tuple[int, int]:
    """(bchunks, items per chunk): enough programs x columns to fill the device."""
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count * 4096
    else:
        target = 1
    ch = max(1, min(B, -(-target // max(N, 1)), 65535))
    bper = -(-B // ch) if B > 0 else 1
    return (-(-B // bper) if B > 0 else 1), bper


@triton_op("tcloss::convlstm_cell_fwd_triton", mutates_args=())
def convlstm_cell_fwd_triton(gates: torch.Tensor, c: torch.Tensor,
                             peephole: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the native ``tcloss::convlstm_cell_fwd``."""
    B, Hd, H, W, _ = _check(gates, c, peephole)
    gates, c = gates.contiguous(), c.contiguous()
    peep = peephole.contiguous() if peephole is not None else None
    h_new = torch.empty_like(c)
    c_new = torch.empty_like(c)
    N = Hd * H * W
    if B * N > 0:
        bchunks, bper = _chunks(B, N, gates.device)
        grid = (triton.cdiv(N, BLOCK), bchunks)
        wrap_triton(_convlstm_fwd_kernel)[grid](
            gates, c, peep, h_new, c_new, B, N, bper,
            HAS_PEEP=peep is not None, IS_F64=gates.dtype == torch.float64, BLOCK=BLOCK)
    return h_new, c_new


@triton_op("tcloss::convlstm_cell_bwd_triton", mutates_args=())
def convlstm_cell_bwd_triton(grad_h: Optional[torch.Tensor], grad_c_new: Optional[torch.Tensor],
                             gates: torch.Tensor, c: torch.Tensor, peephole: Optional[torch.Tensor],
                             grad_peephole: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the native ``tcloss::convlstm_cell_bwd``."""
    B, Hd, H, W, acc = _check(gates, c, peephole)
    if grad_peephole and peephole is None:
        raise ValueError("grad_peephole needs peephole weights")
    gates, c = gates.contiguous(), c.contiguous()
    peep = peephole.contiguous() if peephole is not None else None
    dh = grad_h.to(c.dtype).contiguous() if grad_h is not None else None
    dcn = grad_c_new.to(c.dtype).contiguous() if grad_c_new is not None else None
    N = Hd * H * W
    bchunks, bper = _chunks(B, N, gates.device)
    g_gates = torch.empty_like(gates)
    g_c = torch.empty_like(c)
    part = torch.zeros((bchunks, 3, Hd, H, W), device=gates.device, dtype=acc) if grad_peephole else None
    if B * N > 0:
        grid = (triton.cdiv(N, BLOCK), bchunks)
        wrap_triton(_convlstm_bwd_kernel)[grid](
            gates, c, peep, dh, dcn, g_gates, g_c, part, B, N, bper,
            HAS_PEEP=peep is not None, HAS_DH=dh is not None, HAS_DCN=dcn is not None, G_PEEP=bool(grad_peephole),
            IS_F64=gates.dtype == torch.float64, BLOCK=BLOCK)
    if not grad_peephole:
        gp = gates.new_empty((0,), dtype=acc)
    elif bchunks == 1:
        gp = part[0]
    else:
        gp = part.sum(0)
    return g_gates, g_c, gp
