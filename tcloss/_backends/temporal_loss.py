"""torch.library glue of the temporal loss: fake (meta) kernels and autograd for the native op
pair ``tcloss::temporal_loss_fwd/bwd`` and the Triton pair ``tcloss::temporal_loss_{fwd,bwd}_triton``.

Autograd: the forward computes the loss only; backward runs the bwd op, which recomputes the
per-pixel terms from the inputs and writes all gradients in one pass, scaled by grad_output
inside the kernel. Nothing but the inputs is kept (no warped tensor, mask, softmax or early
gradient). Computing the gradients already in the forward (Liger-Kernel's approach) measured
no faster on an H200 once the grad_output scaling pass was counted, held two gradient-sized
tensors from the forward to the backward, and cannot serve reduction="none".
"""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from . import fwd_op as _fwd_op
from . import register_op_pair

REDUCTION = {"none": 0, "mean": 1, "sum": 2}
MASK_MODE = {"signed_sum": 0, "l1": 1, "l2": 2}


def _fake(pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power, zeros_padding, reduction):
    B, _, H, W = pred_t.shape
    return pred_t.new_empty((B, H, W) if reduction == 0 else (), dtype=acc_dtype(pred_t.dtype))


def _fake_bwd(grad, pred_t, pred_tk, flow, img_t, img_tk, on_prob, mask_mode, mask_power, zeros_padding,
              reduction, grad_pred_t, grad_pred_tk, grad_flow):
    return (pred_t.new_empty(pred_t.shape if grad_pred_t else (0,)),
            pred_tk.new_empty(pred_tk.shape if grad_pred_tk else (0,)),
            flow.new_empty(flow.shape if grad_flow else (0,)))


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        pred_t, pred_tk, flow, img_t, img_tk, *args = inputs
        ctx.args = tuple(args[:5])  # on_prob, mask_mode, mask_power, zeros_padding, reduction
        ctx.save_for_backward(pred_t, pred_tk, flow, img_t, img_tk)

    def backward(ctx, grad_loss):
        # One fused pass recomputes the per-pixel terms and writes every gradient, already
        # multiplied by grad_loss (read in the kernel): nothing but the inputs is kept from the
        # forward, and no second copy of the gradients is made.
        need = ctx.needs_input_grad[:3]
        grads = bwd_op(grad_loss, *ctx.saved_tensors, *ctx.args, *need)
        out = [g if want else None for g, want in zip(grads, need)]
        return (*out, None, None, None, None, None, None, None)

    return setup_context, backward


def register() -> None:
    """Register fake + autograd implementations (idempotent)."""
    register_op_pair("temporal_loss", "temporal_loss_triton", _fake, _fake_bwd, _make_autograd,
                     triton_fakes=True)


def fwd_op(backend: str):
    return _fwd_op("temporal_loss", "temporal_loss_triton", backend)
