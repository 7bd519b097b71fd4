"""torch.library glue of the fused ConvLSTM cell (``tcloss.convlstm_cell``): fake (meta) kernels and
autograd for the native op pair ``tcloss::convlstm_cell_fwd/bwd`` (csrc/convlstm_cell/) and the
Triton pair ``tcloss::convlstm_cell_{fwd,bwd}_triton`` (convlstm_cell_triton.py). Its PyTorch path
is the reference backend (:func:`tcloss.reference.convlstm_cell`); it has no options to check.

What backward keeps: the inputs only (``gates``, ``c`` and the small peephole tensor). The gate
pre-activations hold exactly as many values as the activated gates a workspace would, and
backward recomputes i, f, g, o, c' and tanh(c') from them in registers, so the forward kernel
writes nothing but h' and c' (as PyTorch's fused LSTM cell recomputes tanh(c') from a workspace).
Upstream gradients that are not used (h' or c' does not reach the loss) arrive as ``None``
(``set_materialize_grads(False)``) and the kernels treat them as zeros without reading a buffer.
"""
from __future__ import annotations

from .._dtypes import acc_dtype
from . import fwd_op as _fwd_op
from . import register_op_pair


def _fake_fwd(gates, c, peephole):
    return c.new_empty(c.shape), c.new_empty(c.shape)


def _fake_bwd(grad_h, grad_c_new, gates, c, peephole, grad_peephole):
    gp = peephole.new_empty(peephole.shape) if grad_peephole else gates.new_empty((0,), dtype=acc_dtype(gates.dtype))
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


def register() -> None:
    """Register fake + autograd implementations (idempotent)."""
    register_op_pair("convlstm_cell", _fake_fwd, _fake_bwd, _make_autograd)


def fwd_op(backend: str):
    return _fwd_op("convlstm_cell", backend)
