"""The temporal loss (``tcloss.temporal_loss``) apart from its kernels: its options and their
checks, and the torch.library glue: fake (meta) kernels and autograd for the native op pair
``tcloss::temporal_loss_fwd/bwd`` (csrc/temporal_loss/) and the Triton pair
``tcloss::temporal_loss_{fwd,bwd}_triton`` (temporal_loss_triton.py). Its PyTorch path is the
reference backend (:func:`tcloss.reference.temporal_loss`, over the warp of :mod:`tcloss._math`).

Autograd: the forward computes the loss only; backward runs the bwd op, which recomputes the
per-pixel terms from the inputs and writes all gradients in one pass, scaled by grad_output
inside the kernel. Nothing but the inputs is kept (no warped tensor, mask, softmax or early
gradient). Computing the gradients already in the forward (Liger-Kernel's approach) measured
no faster on an H200 once the grad_output scaling pass was counted, held two gradient-sized
tensors from the forward to the backward, and cannot serve reduction="none".
"""
from __future__ import annotations

from .._checks import check_backend, check_bool, check_choice, check_real
from .._dtypes import acc_dtype
from . import fwd_op as _fwd_op
from . import register_op_pair

# The options: the one list of each. The kernels' mask_mode and reduction are the index in these
# (csrc/tcloss.cpp), padding reaches them as zeros_padding and on as on_prob.
ONS = ("prob", "logit")
MASK_MODES = ("signed_sum", "l1", "l2")
PADDINGS = ("border", "zeros")
REDUCTIONS = ("none", "mean", "sum")
_CODE = {"mask_mode": {name: i for i, name in enumerate(MASK_MODES)},  # dict lookups trace under torch.compile
         "reduction": {name: i for i, name in enumerate(REDUCTIONS)}}


def check_options(on, mask_mode, mask_power, padding, reduction, detach_target, backend) -> None:
    """Options of temporal_loss / nn.TemporalLoss."""
    check_choice("on", on, ONS)
    check_choice("mask_mode", mask_mode, MASK_MODES)
    check_choice("padding", padding, PADDINGS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_real("mask_power", mask_power, minimum=0)
    check_bool("detach_target", detach_target)
    check_backend(backend)


def kernel_options(on: str, mask_mode: str, mask_power, padding: str, reduction: str) -> tuple:
    """The options as the fwd/bwd ops take them: ``(on_prob, mask_mode code, mask_power,
    zeros_padding, reduction code)``."""
    return (on == "prob", _CODE["mask_mode"][mask_mode], float(mask_power), padding == "zeros",
            _CODE["reduction"][reduction])


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
    register_op_pair("temporal_loss", _fake, _fake_bwd, _make_autograd, triton_fakes=True)


def fwd_op(backend: str):
    return _fwd_op("temporal_loss", backend)
