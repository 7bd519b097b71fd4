"""torch.library glue of the fused ConvLSTM cell: fake (meta) kernels and autograd for the native op
pair ``tcloss::convlstm_cell_fwd/bwd`` and the Triton pair ``tcloss::convlstm_cell_{fwd,bwd}_triton``.

What backward keeps: the inputs only (``gates``, ``c`` and the small peephole tensor). The gate
pre-activations hold exactly as many values as the activated gates a workspace would, and
backward recomputes i, f, g, o, c' and tanh(c') from them in registers, so the forward kernel
writes nothing but h' and c' (as PyTorch's fused LSTM cell recomputes tanh(c') from a workspace).
Upstream gradients that are not used (h' or c' does not reach the loss) arrive as ``None``
(``set_materialize_grads(False)``) and the kernels treat them as zeros without reading a buffer.
"""
from __future__ import annotations

import torch

from . import native_status


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(gates, c, peephole):
    return c.new_empty(c.shape), c.new_empty(c.shape)


def _fake_bwd(grad_h, grad_c_new, gates, c, peephole, grad_peephole):
    gp = peephole.new_empty(peephole.shape) if grad_peephole else gates.new_empty((0,), dtype=_acc(gates.dtype))
    return gates.new_empty(gates.shape), c.new_empty(c.shape), gp


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        gates, c, peephole = inputs
        ctx.save_for_backward(gates, c, peephole)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_h, grad_c_new):
        gates, c, peephole = ctx.saved_tensors
        need_g, need_c, need_p = ctx.needs_input_grad[:3]
        if grad_h is None and grad_c_new is None:
            return None, None, None
        want_p = bool(need_p) and peephole is not None
        gg, gc, gp = bwd_op(grad_h, grad_c_new, gates, c, peephole, want_p)
        return (gg if need_g else None), (gc if need_c else None), (gp if want_p else None)

    return setup_context, backward


_registered = False


def register() -> None:
    """Register fake + autograd implementations (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    if native_status()[0] and hasattr(torch.ops.tcloss, "convlstm_cell_fwd"):
        torch.library.register_fake("tcloss::convlstm_cell_fwd")(_fake_fwd)
        torch.library.register_fake("tcloss::convlstm_cell_bwd")(_fake_bwd)
        sc, bw = _make_autograd(torch.ops.tcloss.convlstm_cell_bwd)
        torch.library.register_autograd("tcloss::convlstm_cell_fwd", bw, setup_context=sc)
    try:
        from . import convlstm_triton as ct
    except Exception:  # noqa: BLE001 - no triton: the backend reports itself unavailable
        return
    sc, bw = _make_autograd(ct.convlstm_cell_bwd_triton)
    ct.convlstm_cell_fwd_triton.register_autograd(bw, setup_context=sc)


def fwd_op(backend: str):
    if backend in ("cpp", "cuda"):
        return torch.ops.tcloss.convlstm_cell_fwd
    if backend == "triton":
        from . import convlstm_triton as ct
        return ct.convlstm_cell_fwd_triton
    raise ValueError(backend)
