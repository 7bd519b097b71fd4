"""torch.library glue of the temporal loss: fake (meta) kernels and autograd for the native op
pair ``tcloss::temporal_loss_fwd/bwd`` and the Triton pair ``tcloss::temporal_loss_{fwd,bwd}_triton``.

Autograd: the forward computes the loss only; backward runs the bwd op, which recomputes the
per-pixel terms from the inputs and writes all gradients in one pass, scaled by grad_output
inside the kernel. Nothing but the inputs is kept (no warped tensor, mask, softmax or early
gradient). Computing the gradients already in the forward (Liger-Kernel's approach, which the
fwd op still offers through its grad_* flags) measured no faster on an H200 once the
grad_output scaling pass is counted, and held two gradient-sized tensors from the forward to
the backward, so it is not used by autograd.
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
        ctx.save_for_backward(pred_t, pred_tk, flow, img_t, img_tk)

    def backward(ctx, grad_loss, *_unused):
        # One fused pass recomputes the per-pixel terms and writes every gradient, already
        # multiplied by grad_loss (read in the kernel): nothing but the inputs is kept from the
        # forward, and no second copy of the gradients is made.
        need = ctx.needs_input_grad[:3]
        grads = bwd_op(grad_loss, *ctx.saved_tensors, *ctx.args, *need)
        out = [g if want else None for g, want in zip(grads, need)]
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
