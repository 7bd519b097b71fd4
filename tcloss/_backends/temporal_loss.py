"""torch.library glue of the temporal loss: fake (meta) kernels and autograd for the native op
pair ``tcloss::temporal_loss_fwd/bwd`` and the Triton pair ``tcloss::temporal_loss_{fwd,bwd}_triton``.

Autograd follows Liger-Kernel: for a scalar loss (mean/sum) the forward kernel already writes
the gradients (scaled by the reduction), and backward only multiplies them by grad_output, so
nothing but the gradients themselves is kept. For reduction="none" backward runs the bwd op,
which recomputes everything from the inputs (no warped tensor, mask or softmax is saved).
"""
from __future__ import annotations

import torch

from . import native_status

REDUCTION = {"none": 0, "mean": 1, "sum": 2}
MASK_MODE = {"signed_sum": 0, "l1": 1, "l2": 2}


def _fake(pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power, zeros_padding, reduction,
          grad_pred_t, grad_pred_tk, grad_flow):
    acc = torch.float64 if pred_t.dtype == torch.float64 else torch.float32
    B, _, H, W = pred_t.shape
    loss = pred_t.new_empty((B, H, W) if reduction == 0 else (), dtype=acc)
    return (loss,
            pred_t.new_empty(pred_t.shape if grad_pred_t else (0,)),
            pred_tk.new_empty(pred_tk.shape if grad_pred_tk else (0,)),
            flow.new_empty(flow.shape if grad_flow else (0,)))


def _fake_bwd(grad, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power, zeros_padding,
              reduction, grad_pred_t, grad_pred_tk, grad_flow):
    return _fake(pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power, zeros_padding, reduction,
                 grad_pred_t, grad_pred_tk, grad_flow)[1:]


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        pred_t, pred_tk, flow, img_t, img_tk, *args = inputs
        ctx.args = tuple(args[:5])  # on_prob, mask_mode, mask_power, zeros_padding, reduction
        ctx.reduction = args[4]
        ctx.flags = tuple(args[5:8])
        if ctx.reduction == 0:
            ctx.save_for_backward(pred_t, pred_tk, flow, img_t, img_tk)
        else:
            ctx.save_for_backward(*output[1:])

    def backward(ctx, grad_loss, *_unused):
        need = ctx.needs_input_grad[:3]
        if ctx.reduction == 0:
            pred_t, pred_tk, flow, img_t, img_tk = ctx.saved_tensors
            grads = bwd_op(grad_loss, pred_t, pred_tk, flow, img_t, img_tk, *ctx.args, *need)
            scale = None
        else:
            grads = ctx.saved_tensors
            scale = grad_loss
        out = []
        for g, want, computed in zip(grads, need, ctx.flags if scale is not None else need):
            if not want:
                out.append(None)
            elif not computed:
                raise RuntimeError("tcloss: temporal_loss forward was run without the gradient for an input "
                                   "that now needs one (was requires_grad set after the call?)")
            else:
                out.append(g * scale.to(g.dtype) if scale is not None else g)
        return (*out, None, None, None, None, None, None, None, None, None, None)

    return setup_context, backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError("tcloss: double backward through temporal_loss is not supported")


def _bwd_setup(ctx, inputs, output):
    pass


_registered = False


def register() -> None:
    """Register fake + autograd implementations (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    if native_status()[0]:
        torch.library.register_fake("tcloss::temporal_loss_fwd")(_fake)
        torch.library.register_fake("tcloss::temporal_loss_bwd")(_fake_bwd)
        sc, bw = _make_autograd(torch.ops.tcloss.temporal_loss_bwd)
        torch.library.register_autograd("tcloss::temporal_loss_fwd", bw, setup_context=sc)
        torch.library.register_autograd("tcloss::temporal_loss_bwd", _no_double_backward, setup_context=_bwd_setup)
    try:
        from . import temporal_loss_triton as tt
    except Exception:  # noqa: BLE001 - no triton: the backend reports itself unavailable
        return
    sc, bw = _make_autograd(tt.temporal_loss_bwd_triton)
    tt.temporal_loss_fwd_triton.register_autograd(bw, setup_context=sc)
    tt.temporal_loss_bwd_triton.register_autograd(_no_double_backward, setup_context=_bwd_setup)


def fwd_op(backend: str):
    if backend in ("cpp", "cuda"):
        return torch.ops.tcloss.temporal_loss_fwd
    if backend == "triton":
        from . import temporal_loss_triton as tt
        return tt.temporal_loss_fwd_triton
    raise ValueError(backend)
