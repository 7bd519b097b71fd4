"""Temporal loss (eq. 1), flow_warp and occlusion_mask: every kernel backend against the reference."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tcloss
from tcloss import reference as R
from conftest import INTERPRET, TOL, kernel_params

from models import read_flo  # noqa: E402  (repo root is on sys.path under pytest)
from videodata import read_image  # noqa: E402

KERNELS = kernel_params("temporal_loss")


def make_inputs(B=2, C=5, H=7, W=9, *, dtype=torch.float64, device="cpu", flow_scale=3.0, seed=0, img_c=3):
    g = torch.Generator().manual_seed(seed)
    pt = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    ptk = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    fl = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) * flow_scale
    it = torch.rand(B, img_c, H, W, generator=g, dtype=torch.float64)
    itk = torch.rand(B, img_c, H, W, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(pt), cast(ptk), fl.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype), \
        cast(it), cast(itk)


def run(backend, inputs, grad_out=None, **kw):
    """Loss and gradients w.r.t. (pred_t, pred_tk, flow)."""
    pt, ptk, fl, it, itk = [t.detach().clone() for t in inputs]
    for t in (pt, ptk, fl):
        t.requires_grad_(True)
    if backend == "reference":
        loss = R.temporal_loss(pt, ptk, fl, it, itk, **kw)
    else:
        loss = tcloss.temporal_loss(pt, ptk, fl, it, itk, backend=backend, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, (pt, ptk, fl), grad_out, allow_unused=True)
    return loss.detach(), grads


def ref64(inputs, grad_out=None, **kw):
    """The float64 reference on the same (possibly low-precision) inputs."""
    cpu64 = [t.detach().to("cpu", torch.float64) for t in inputs]
    go = None if grad_out is None else grad_out.detach().to("cpu", torch.float64)
    return run("reference", cpu64, go, **kw)


def assert_close(a, b, dtype, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64),
                               atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_against_reference(backend, inputs, dtype, **kw):
    red = kw.get("reduction", "mean")
    loss, grads = run(backend, inputs, **kw)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss) if red == "none" else None
    if go is not None:
        loss, grads = run(backend, inputs, go, **kw)
    rloss, rgrads = ref64(inputs, go, **kw)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == out_dtype
    assert_close(loss, rloss, torch.float32 if dtype != torch.float64 else dtype, "loss")
    names = ("grad pred_t", "grad pred_tk", "grad flow")
    for name, g, rg, inp in zip(names, grads, rgrads, inputs):
        if g is None:
            assert kw.get("detach_target") and name == "grad pred_tk"
            continue
        assert g.dtype == inp.dtype and g.shape == inp.shape, name
        # flow gradients are float32 but sum C channel terms of low-precision products
        assert_close(g, rg, dtype if name != "grad flow" else (torch.float32 if dtype == torch.float32 else dtype), name)


# ---------------------------------------------------------------- exactness (float64) ------------

@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("on", ["prob", "logit"])
@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_reference(backend, device, on, padding, reduction):
    inputs = make_inputs(device=device)
    check_against_reference(backend, inputs, torch.float64, on=on, padding=padding, reduction=reduction)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("mask_mode", ["signed_sum", "l1", "l2"])
@pytest.mark.parametrize("mask_power", [0, 1, 2, 0.5])
def test_mask_modes_and_powers(backend, device, mask_mode, mask_power):
    inputs = make_inputs(B=1, C=4, H=5, W=6, device=device, seed=3)
    check_against_reference(backend, inputs, torch.float64, mask_mode=mask_mode, mask_power=mask_power)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("on,padding,reduction", [("prob", "border", "mean"), ("logit", "zeros", "none"),
                                                  ("prob", "zeros", "sum"), ("logit", "border", "mean")])
def test_gradcheck(backend, device, on, padding, reduction):
    pt, ptk, fl, it, itk = make_inputs(B=1 if INTERPRET else 2, C=3, H=4, W=5, device=device, seed=5)
    # keep sample points away from the bilinear kinks at integer coordinates
    fl = fl.round() + 0.3 + 0.4 * torch.rand_like(fl)
    for t in (pt, ptk, fl):
        t.requires_grad_(True)

    def f(a, b, c, mask_power):
        return tcloss.temporal_loss(a, b, c, it, itk, on=on, padding=padding, reduction=reduction,
                                    mask_power=mask_power, backend=backend)

    # The mask depends on the flow but is a constant of the loss by definition (no gradient), so
    # the flow gradient is checked numerically with V^0 = 1, and the prediction gradients with V.
    # GPU kernels scatter with atomics: summation order, hence the last bits, may vary per run
    nondet = 1e-12 if device == "cuda" else 0.0
    assert torch.autograd.gradcheck(lambda a, b, c: f(a, b, c, 0), (pt, ptk, fl), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    nondet_tol=nondet)
    assert torch.autograd.gradcheck(lambda a, b: f(a, b, fl.detach(), 1), (pt, ptk), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    nondet_tol=nondet)


# ---------------------------------------------------------------- dtypes and shapes --------------

@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("on", ["prob", "logit"])
def test_low_precision(backend, device, dtype, on):
    shape = dict(B=1, C=19, H=9, W=13) if INTERPRET else dict(B=2, C=19, H=24, W=40)
    inputs = make_inputs(**shape, dtype=dtype, device=device, flow_scale=4.0, seed=7)
    check_against_reference(backend, inputs, dtype, on=on)


SHAPES = {
    "odd": (1, 19, 37, 53),
    "C1": (2, 1, 8, 11),
    "realistic": (2, 19, 64, 96),
    "many-classes": (1, 150, 6, 7),
    "tall": (1, 4, 31, 2),
    "wide": (1, 5, 3, 300),  # the CPU kernel's row chunks (256 pixels) and a partial vector
}


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_shapes(backend, device, shape):
    B, C, H, W = SHAPES[shape]
    if INTERPRET and shape in ("realistic", "odd"):
        B, H, W = 1, 11, 13
    inputs = make_inputs(B, C, H, W, dtype=torch.float32, device=device, seed=11)
    check_against_reference(backend, inputs, torch.float32)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_non_contiguous(backend, device):
    pt, ptk, fl, it, itk = make_inputs(2, 6, 10, 12, dtype=torch.float32, device=device, seed=2)
    # channels-last storage, a strided slice and a transposed image
    pt = pt.contiguous(memory_format=torch.channels_last)
    ptk = torch.cat([ptk, ptk], 3)[..., ::2]
    fl = fl.transpose(2, 3).contiguous().transpose(2, 3)
    it = it.contiguous(memory_format=torch.channels_last)
    assert not ptk.is_contiguous() and not fl.is_contiguous()
    check_against_reference(backend, (pt, ptk, fl, it, itk), torch.float32)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_flow_far_out_of_frame(backend, device, padding):
    pt, ptk, fl, it, itk = make_inputs(2, 5, 9, 10, dtype=torch.float32, device=device, seed=4)
    fl = fl * 40.0
    fl[0, :, :3] = 1e6
    fl[1, 0, 2:4] = -1e7
    check_against_reference(backend, (pt, ptk, fl, it, itk), torch.float32, padding=padding)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_zero_flow_is_identity(backend, device):
    pt, _, fl, it, _ = make_inputs(2, 5, 9, 10, dtype=torch.float32, device=device, seed=4)
    zero = torch.zeros_like(fl)
    loss = tcloss.temporal_loss(pt, pt, zero, it, it, reduction="none", backend=backend)
    # zero up to rounding: compiled GPU code may evaluate the two softmaxes in different orders
    assert loss.abs().max() < 1e-12
    # with a different target, zero flow compares pixel with pixel, mask = 1 for equal images
    other = torch.randn_like(pt)
    loss = tcloss.temporal_loss(pt, other, zero, it, it, reduction="none", backend=backend)
    expect = (torch.softmax(pt.double(), 1) - torch.softmax(other.double(), 1)).pow(2).sum(1)
    torch.testing.assert_close(loss.double(), expect, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_integer_flow_is_exact_shift(backend, device):
    pt, ptk, _, it, _ = make_inputs(1, 4, 8, 9, dtype=torch.float32, device=device, seed=9)
    dx, dy = 2, -1
    fl = torch.zeros(1, 2, 8, 9, device=device)
    fl[:, 0], fl[:, 1] = dx, dy
    loss = tcloss.temporal_loss(pt, ptk, fl, it, it, on="logit", mask_power=0, reduction="none", backend=backend)
    # inside the frame: out[y, x] = ptk[y + dy, x + dx]
    inner = (pt[0, :, 1:, :-2] - ptk[0, :, :-1, 2:]).pow(2).sum(0)
    torch.testing.assert_close(loss[0, 1:, :-2], inner, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_released_code_parity(backend, device):
    """The released code's MSE(V z_t, V warp(z_tk)) equals temporal_loss(on=logit, mask_power=2) / C."""
    pt, ptk, fl, it, itk = make_inputs(2, 7, 9, 11, dtype=torch.float64, device=device, seed=13)
    a = [t.clone().requires_grad_(True) for t in (pt, ptk, fl)]
    b = [t.clone().requires_grad_(True) for t in (pt, ptk, fl)]
    ours = tcloss.temporal_loss(*a, it, itk, on="logit", mask_power=2, backend=backend) / pt.shape[1]
    theirs = R.released_code_temporal_loss(*b, it, itk)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
    for ga, gb in zip(torch.autograd.grad(ours, a), torch.autograd.grad(theirs, b)):
        torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_detach_target_and_partial_grads(backend, device):
    pt, ptk, fl, it, itk = make_inputs(1, 4, 6, 7, device=device)
    pt.requires_grad_(True)
    ptk.requires_grad_(True)
    loss = tcloss.temporal_loss(pt, ptk, fl, it, itk, detach_target=True, backend=backend)
    g_pt, g_ptk = torch.autograd.grad(loss, (pt, ptk), allow_unused=True)
    assert g_ptk is None and g_pt is not None and g_pt.abs().sum() > 0
    # only flow requires grad
    fl.requires_grad_(True)
    (g_fl,) = torch.autograd.grad(tcloss.temporal_loss(pt.detach(), ptk.detach(), fl, it, itk, backend=backend), (fl,))
    (r_fl,) = torch.autograd.grad(R.temporal_loss(pt.detach(), ptk.detach(), fl, it, itk), (fl,))
    torch.testing.assert_close(g_fl, r_fl)
    # no grad needed at all: forward only
    with torch.no_grad():
        v = tcloss.temporal_loss(pt, ptk, fl, it, itk, backend=backend)
    torch.testing.assert_close(v, R.temporal_loss(pt, ptk, fl, it, itk))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_non_finite_propagates(backend, device):
    pt, ptk, fl, it, itk = make_inputs(1, 3, 5, 6, dtype=torch.float32, device=device)
    fl[0, 0, 2, 3] = float("nan")
    fl[0, 1, 1, 1] = float("inf")
    loss = tcloss.temporal_loss(pt, ptk, fl, it, itk, reduction="none", backend=backend)
    ref = R.temporal_loss(pt, ptk, fl, it, itk, reduction="none")
    assert torch.isnan(loss[0, 2, 3]) and torch.isnan(loss[0, 1, 1])
    torch.testing.assert_close(loss, ref, equal_nan=True)
    assert torch.isnan(tcloss.temporal_loss(pt, ptk, fl, it, itk, backend=backend))
    pt2 = pt.clone()
    pt2[0, 1, 0, 0] = float("nan")
    assert torch.isnan(tcloss.temporal_loss(pt2, ptk, torch.zeros_like(fl), it, itk, backend=backend))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_module_matches_functional(backend, device):
    inputs = make_inputs(2, 4, 6, 7, dtype=torch.float32, device=device)
    m = tcloss.nn.TemporalLoss(on="logit", mask_mode="l1", mask_power=2, padding="zeros", backend=backend)
    torch.testing.assert_close(m(*inputs), R.temporal_loss(*inputs, on="logit", mask_mode="l1", mask_power=2,
                                                          padding="zeros"))
    assert "logit" in repr(m)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_autocast_returns_float32(backend, device):
    inputs = make_inputs(1, 5, 6, 7, dtype=torch.float32, device=device)
    dt = torch.bfloat16
    with torch.autocast(device_type=device, dtype=dt):
        pt = F.conv2d(inputs[0], torch.eye(5, device=device).view(5, 5, 1, 1))  # a bf16 autocast output
        loss = tcloss.temporal_loss(pt, inputs[1], *inputs[2:], backend=backend)
    assert pt.dtype == dt and loss.dtype == torch.float32
    torch.testing.assert_close(loss, R.temporal_loss(pt.float(), inputs[1], *inputs[2:]), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------- torch.library integration -------

def test_opcheck_native():
    if not tcloss.backend_status("cpp", "temporal_loss", "cpu")[0]:
        pytest.skip("no native CPU kernel")
    pt, ptk, fl, it, itk = make_inputs(1, 3, 4, 5)
    for t in (pt, ptk, fl):
        t.requires_grad_(True)
    op = torch.ops.tcloss.temporal_loss_fwd
    torch.library.opcheck(op, (pt, ptk, fl, it, itk, True, 0, 1.0, False, 1))
    torch.library.opcheck(op, (pt, ptk, fl, it, itk, False, 2, 2.0, True, 0))
    torch.library.opcheck(torch.ops.tcloss.temporal_loss_bwd,
                          (torch.rand(1, 4, 5, dtype=torch.float64), pt.detach(), ptk.detach(), fl.detach(), it, itk,
                           True, 1, 1.0, False, 0, True, True, True))
    # backward of the backward is refused with a clear error, not silently wrong
    g = torch.rand(1, 4, 5, dtype=torch.float64, requires_grad=True)
    out = torch.ops.tcloss.temporal_loss_bwd(g, pt, ptk, fl, it, itk, True, 1, 1.0, False, 0, True, True, True)
    with pytest.raises(RuntimeError, match="double backward"):
        out[0].sum().backward()


@pytest.mark.parametrize("backend,device", KERNELS)
def test_torch_compile_fullgraph(backend, device):
    inputs = make_inputs(1, 3, 5, 6, dtype=torch.float32, device=device)
    pt = inputs[0].clone().requires_grad_(True)

    def step(p, ptk, fl, it, itk):
        return tcloss.temporal_loss(p * 2.0, ptk, fl, it, itk, backend=backend) + p.mean()

    # aot_eager exercises the fake and autograd registrations without a C++ toolchain for inductor
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    out = compiled(pt, *inputs[1:])
    (g,) = torch.autograd.grad(out, pt)
    p2 = inputs[0].clone().requires_grad_(True)
    ref = R.temporal_loss(p2 * 2.0, *inputs[1:]) + p2.mean()
    (rg,) = torch.autograd.grad(ref, p2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, rg)


# ---------------------------------------------------------------- flow_warp / occlusion_mask -----

@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_flow_warp_matches_definition(padding):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    fl = torch.randn(2, 2, 6, 7, dtype=torch.float64) * 2
    out = tcloss.flow_warp(x, fl, padding=padding)
    # direct bilinear interpolation from the definition
    exp = torch.zeros_like(out)
    H, W = 6, 7
    for b in range(2):
        for y in range(H):
            for xx in range(W):
                px, py = xx + fl[b, 0, y, xx].item(), y + fl[b, 1, y, xx].item()
                if padding == "border":
                    px, py = min(max(px, 0), W - 1), min(max(py, 0), H - 1)
                x0, y0 = int(np.floor(px)), int(np.floor(py))
                for yy, xq, wgt in ((y0, x0, (1 - (px - x0)) * (1 - (py - y0))), (y0, x0 + 1, (px - x0) * (1 - (py - y0))),
                                    (y0 + 1, x0, (1 - (px - x0)) * (py - y0)), (y0 + 1, x0 + 1, (px - x0) * (py - y0))):
                    if 0 <= yy < H and 0 <= xq < W:
                        exp[b, :, y, xx] += wgt * x[b, :, yy, xq]
    torch.testing.assert_close(out, exp)


def test_occlusion_mask_modes():
    it = torch.rand(1, 3, 4, 5, dtype=torch.float64)
    itk = torch.rand(1, 3, 4, 5, dtype=torch.float64)
    zero = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
    d = it - itk
    for mode, r in (("signed_sum", d.sum(1, keepdim=True).abs()), ("l1", d.abs().sum(1, keepdim=True)),
                    ("l2", d.pow(2).sum(1, keepdim=True).sqrt())):
        torch.testing.assert_close(tcloss.occlusion_mask(it, itk, zero, mode=mode), torch.exp(-r))
    assert tcloss.occlusion_mask(it, it, zero).eq(1).all()


# ---------------------------------------------------------------- real data ----------------------

@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference")] + KERNELS)
def test_flyingchairs_gt_flow_reproduces_img0(shared_data, backend, device):
    root = shared_data / "flyingchairs_examples"
    n = 1 if INTERPRET else 3
    for k in range(n):
        img0 = read_image(root / f"{k:07d}-img0.ppm")[None] / 255
        img1 = read_image(root / f"{k:07d}-img1.ppm")[None] / 255
        flow = torch.from_numpy(read_flo(root / f"{k:07d}-gt.flo")).permute(2, 0, 1)[None].float()
        if INTERPRET:  # the interpreter is slow: a crop
            img0, img1, flow = img0[..., 100:164, 200:264], img1[..., 100:164, 200:264], flow[..., 100:164, 200:264]
        img0, img1, flow = img0.to(device), img1.to(device), flow.to(device)
        kw = dict(on="logit", mask_power=0, reduction="none", backend=backend)
        err_warp = tcloss.temporal_loss(img0, img1, flow, img0, img1, **kw)
        err_none = tcloss.temporal_loss(img0, img1, torch.zeros_like(flow), img0, img1, **kw)
        H, W = flow.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
        inside = ((xs + flow[0, 0]).clamp(-1, W) == xs + flow[0, 0]) & ((ys + flow[0, 1]).clamp(-1, H) == ys + flow[0, 1])
        # non-occluded pixels: the GT warp explains them (the 80% best-explained inside the frame)
        e = err_warp[0][inside]
        keep = e <= e.quantile(0.8)
        assert e[keep].mean() < 0.1 * err_none[0][inside][keep].mean(), (k, e[keep].mean(), err_none.mean())
        ref = R.temporal_loss(img0.cpu(), img1.cpu(), flow.cpu(), img0.cpu(), img1.cpu(), on="logit", mask_power=0,
                              reduction="none")
        torch.testing.assert_close(err_warp.cpu(), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- bad input ----------------------

def _good():
    return make_inputs(1, 3, 4, 5, dtype=torch.float32)


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda a: (a[0][0],) + a[1:], ValueError, "pred_t must have 4 dimensions"),
    (lambda a: (a[0], a[1][:, :2]) + a[2:], ValueError, "pred_tk must have the shape"),
    (lambda a: (a[0], a[1], torch.zeros(1, 3, 4, 5)) + a[3:], ValueError, r"flow must have shape \(B,2,H,W\)"),
    (lambda a: (a[0], a[1], a[2][..., :4]) + a[3:], ValueError, "flow must have shape"),
    (lambda a: (a[0].long(),) + a[1:], TypeError, "pred_t must be a floating-point"),
    (lambda a: a[:2] + (a[2].int(),) + a[3:], TypeError, "flow must be a floating-point"),
    (lambda a: a[:3] + (a[3][..., :3], a[4]), ValueError, "img_t must be"),
    (lambda a: a[:4] + (a[4][:, :2],), ValueError, "img_tk must have the shape"),
    (lambda a: a[:3] + (a[3].clone().requires_grad_(True), a[4]), ValueError, "img_t requires grad"),
    (lambda a: (a[0].numpy(),) + a[1:], TypeError, "pred_t must be a torch.Tensor"),
    (lambda a: (a[0].to("meta"),) + a[1:], ValueError, "pred_tk must be on meta"),
    (lambda a: tuple(t[..., :1, :] for t in a), ValueError, "H and W must be at least 2"),
])
def test_bad_inputs(mutate, exc, msg):
    with pytest.raises(exc, match=msg):
        tcloss.temporal_loss(*mutate(_good()))


@pytest.mark.parametrize("kw,msg", [
    (dict(on="softmax"), "on must be one of"), (dict(mask_mode="l3"), "mask_mode must be one of"),
    (dict(padding="reflect"), "padding must be one of"), (dict(reduction="avg"), "reduction must be one of"),
    (dict(mask_power=-1), "mask_power must be a non-negative"), (dict(backend="opencl"), "backend must be one of"),
])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tcloss.temporal_loss(*_good(), **kw)
    if "backend" not in kw:
        with pytest.raises(ValueError, match=msg):
            tcloss.nn.TemporalLoss(**kw)


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not available for temporal_loss on cpu"):
        tcloss.temporal_loss(*_good(), backend="cuda")
    if not INTERPRET:
        # an older torch that cannot load the Triton module gives that reason instead
        from tcloss._backends import _TRITON_IMPORT_ERROR
        why = "do not load with torch" if "temporal_loss" in _TRITON_IMPORT_ERROR else "TRITON_INTERPRET"
        with pytest.raises(RuntimeError, match=why):
            tcloss.temporal_loss(*_good(), backend="triton")


def test_available_backends_and_env_override():
    av = tcloss.available_backends()
    assert "reference" in av["cpu"] and set(av) == {"cpu", "cuda"}
    detail = tcloss.available_backends(verbose=True)
    assert detail["temporal_loss"]["cpu"]["reference"] == "ok"
    code = ("import tcloss, torch; from tcloss._backends import resolve; "
            "print(resolve('temporal_loss', torch.device('cpu')))")
    env = dict(os.environ, TCLOSS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def needs_cpp():
    if not tcloss.backend_status("cpp", "temporal_loss", "cpu")[0]:
        pytest.skip("no native CPU kernel")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_gradients_are_deterministic(dtype, batch):
    """The CPU kernels scatter without atomics, in a fixed order: bitwise repeatable, and the
    same bits with 1 and 2 threads. float32: strips of 256 columns, those of one batch item in
    phases whose corner windows are disjoint (here 3 strips, neighbours overlapping), with 2
    threads running the strips of a phase (B = 1) or of several batch items (B = 3) at once.
    float64: one thread per batch item. (reduction="none": the kernel's own loss map; a scalar
    loss is ATen's sum of it, whose order may follow the number of threads.)"""
    needs_cpp()
    inputs = make_inputs(batch, 19, 33, 600, dtype=dtype, flow_scale=6.0, seed=21)  # 2 blocks of channels at AVX-512
    first = run("cpp", inputs, reduction="none")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            again = run("cpp", inputs, reduction="none")
            assert torch.equal(first[0], again[0])
            for a, b in zip(first[1], again[1]):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def _flows(B, H, W, g):
    """Flows that give the CPU kernel's strips (256 columns) windows of every kind."""
    small = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) * 2
    far = small.clone()
    far[:, :, H // 2, 290] = torch.tensor([-289.5, 0.25], dtype=torch.float64)  # one pixel reaching the other edge
    down = torch.full((B, 2, H, W), 0.25, dtype=torch.float64)  # (no integer sample points: one-sided derivatives)
    down[:, 1] = torch.linspace(-H - 3, H + 3, W, dtype=torch.float64) + 0.1  # rows above and below, none aside
    wild = small.clone()
    wild[:, :, ::3] = torch.randn(B, 2, (H + 2) // 3, W, generator=g, dtype=torch.float64) * 400
    wild[0, 0, 1, ::7] = float("nan")
    wild[0, 1, 2, ::5] = float("inf")
    return dict(small=small, far=far, down=down, wild=wild)


@pytest.mark.parametrize("flow", ["small", "far", "down", "wild"])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_cpp_corner_windows(flow, padding):
    """Each strip of the float kernel reads its corners from (and scatters d pred_tk into) a
    window of the rows and columns its flow reaches: windows of a few columns more than the strip
    (small), one stretched across the image by a single pixel (far), a tall one (down), and ones
    as large as the image next to non-finite flows (wild); against the float64 reference, with
    1 and 2 threads alike."""
    needs_cpp()
    B, C, H, W = 2, 19, 11, 300
    pt, ptk, _, it, itk = make_inputs(B, C, H, W, dtype=torch.float32, seed=5)
    fl = _flows(B, H, W, torch.Generator().manual_seed(6))[flow].float()
    inputs = (pt, ptk, fl, it, itk)
    kw = dict(padding=padding, reduction="sum")
    loss, grads = run("cpp", inputs, **kw)
    rloss, rgrads = ref64(inputs, **kw)
    atol, rtol = TOL[torch.float32]
    # (wild: NaN, as the reference)
    torch.testing.assert_close(loss.double(), rloss, atol=atol, rtol=rtol, equal_nan=True)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g.double(), rg, atol=atol, rtol=rtol)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpp", inputs, **kw)
        torch.set_num_threads(2)
        two = run("cpp", inputs, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) or (one[0].isnan() and two[0].isnan())
    for a, b in zip(one[1], two[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpp_every_instruction_set(isa):
    """The float kernel is compiled for AVX-512, AVX2 and the baseline and picked at run time;
    TCLOSS_CPU_ISA caps the choice, so each variant is checked here against the float64
    reference (on a CPU without the ISA the cap changes nothing and the test still passes)."""
    needs_cpp()
    code = """
import sys, torch
sys.path[:0] = [{tests!r}]
from test_temporal_loss import make_inputs, check_against_reference
for dtype in (torch.float32, torch.bfloat16):
    # (float32 pixel coordinates near x = 300 resolve 3e-5 px: logit gradients of a 'none'
    # reduction then differ from float64 by more than the float32 tolerance, in the reference too)
    for kw in (dict(), dict(on="logit", padding="zeros"), dict(reduction="none", padding="zeros"),
               dict(detach_target=True, mask_mode="l2")):
        inputs = make_inputs(2, 5, 6, 300, dtype=dtype, flow_scale=5.0, seed=4)
        inputs[2][1, :, 2, :40] = 400.0  # far out of the frame
        check_against_reference("cpp", inputs, dtype, **kw)
print("ok")
""".format(tests=os.path.dirname(__file__))
    env = dict(os.environ, TCLOSS_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("backend,device", KERNELS)
def test_large_logits_as_accurate_as_the_reference(backend, device):
    """Softmax statistics are kept as (max, 1/sum), not one log-sum-exp rounded to float32: at
    logits of 1e4 a rounded lse would be off by ~1e-3 in every probability, and two tied maxima
    of 1e8 would each get probability 1 (a loss of 3 where 1.5 is right)."""
    inputs = make_inputs(1, 6, 5, 7, dtype=torch.float32, device=device, seed=9)
    big = [inputs[0] * 1e4, inputs[1] * 1e4, *inputs[2:]]
    big[0] = big[0] / 1e4 * 3 + 1e4  # large offset, O(1) differences: the probabilities stay smooth
    big[1] = big[1] / 1e4 * 3 + 1e4
    check_against_reference(backend, big, torch.float32)
    pt = torch.full((1, 3, 2, 2), -1e8, device=device)
    pt[:, :2] = 1e8  # two tied maxima: q = (0.5, 0.5, 0)
    ptk = torch.zeros_like(pt)  # q = (1/3, 1/3, 1/3)
    zero = torch.zeros(1, 2, 2, 2, device=device)
    img = torch.zeros(1, 3, 2, 2, device=device)
    loss = tcloss.temporal_loss(pt, ptk, zero, img, img, backend=backend, reduction="none")
    expected = 2 * (0.5 - 1 / 3) ** 2 + (1 / 3) ** 2
    torch.testing.assert_close(loss.cpu(), torch.full((1, 2, 2), expected), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_flow_gradient_of_equal_large_corners_is_zero(backend, device, padding):
    """The flow derivative of the warp takes corner differences first (as grid_sample does):
    where the four corners agree it is exactly 0, however large they are. Summed as
    sum_k (d a_k / d px) q_k, logits of 1e4 left ~1e-3 of rounding per channel, times dq of
    ~1e3 (the fuzz suite's find: d flow 0.16 where the reference has 0)."""
    g = torch.Generator().manual_seed(3)
    pt = (torch.randn(1, 2, 4, 9, generator=g) + 1e4).to(device).requires_grad_()
    ptk = torch.full((1, 2, 4, 9), 1e4, device=device).requires_grad_()  # every corner equal
    flow = (torch.rand(1, 2, 4, 9, generator=g) * 4 - 2).to(device).requires_grad_()
    img = torch.zeros(1, 3, 4, 9, device=device)
    loss = tcloss.temporal_loss(pt, ptk, flow, img, img, on="logit", padding=padding, backend=backend)
    loss.backward()
    if padding == "border":
        assert torch.equal(flow.grad, torch.zeros_like(flow.grad)), flow.grad.abs().max()
    else:  # zeros padding: only samples whose corners all lie inside the image see equal corners
        x = torch.arange(9, device=device).view(1, 9) + flow[0, 0].detach()
        y = torch.arange(4, device=device).view(4, 1) + flow[0, 1].detach()
        inside = (x >= 0) & (x <= 8) & (y >= 0) & (y <= 3)
        inside &= (x.floor() + 1 <= 8) & (y.floor() + 1 <= 3)
        assert inside.sum() >= 6
        assert torch.equal(flow.grad[0][:, inside], torch.zeros(2, int(inside.sum()), device=device))


# ---------------------------------------------------------------- issue 12: reliability ----------

@pytest.mark.parametrize("kw,exc,msg", [
    (dict(detach_target="false"), TypeError, "detach_target must be a bool"),
    (dict(detach_target=0), TypeError, "detach_target must be a bool"),
    (dict(mask_power=float("inf")), ValueError, "mask_power must be finite"),
    (dict(mask_power=float("nan")), ValueError, "mask_power must be finite"),
    (dict(mask_power="2"), TypeError, "mask_power must be a real number"),
    (dict(mask_power=True), TypeError, "mask_power must be a real number"),
    (dict(on=None), TypeError, "on must be one of"),
    (dict(reduction=1), TypeError, "reduction must be one of"),
    (dict(backend=None), TypeError, "backend must be one of"),
    (dict(backend="opencl"), ValueError, "backend must be one of"),
])
def test_bad_option_types_function_and_module_alike(kw, exc, msg):
    """Bool options must be real bools (a string "false" was taken as True), numbers finite;
    the function and the module's __init__ run the same checks."""
    with pytest.raises(exc, match=msg):
        tcloss.temporal_loss(*_good(), **kw)
    with pytest.raises(exc, match=msg):
        tcloss.nn.TemporalLoss(**kw)


def test_numpy_option_values_accepted():
    inputs = _good()
    want = R.temporal_loss(*inputs, mask_power=2.0, detach_target=True)
    got = tcloss.temporal_loss(*inputs, mask_power=np.float64(2.0), detach_target=np.bool_(True))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(tcloss.nn.TemporalLoss(mask_power=np.int64(2))(*inputs), want)


def _all_backends():
    return [pytest.param("reference", "cpu", id="reference")] + list(KERNELS)


@pytest.mark.parametrize("backend,device", _all_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_power_zero_at_infinite_image(backend, device, dtype):
    """V^0 = 1 wherever the residual is infinite or NaN (an infinite image value in img_t, in a
    warped corner of img_tk, or both): every backend gives the reference's finite loss."""
    pt, ptk, fl, it, itk = make_inputs(1, 3, 5, 6, dtype=dtype, device=device, seed=7)
    fl = torch.zeros_like(fl)
    it, itk = it.clone(), itk.clone()
    it[0, 0, 1, 1] = float("inf")                                    # r = inf
    itk[0, 1, 2, 3] = float("-inf")                                  # r = inf
    it[0, 2, 3, 4], itk[0, 2, 3, 4] = float("inf"), float("inf")     # r = NaN
    ref = R.temporal_loss(pt.cpu(), ptk.cpu(), fl.cpu(), it.cpu(), itk.cpu(), mask_power=0, reduction="none")
    assert torch.isfinite(ref).all()
    got = tcloss.temporal_loss(pt, ptk, fl, it, itk, mask_power=0, reduction="none", backend=backend)
    assert torch.isfinite(got).all()
    assert_close(got, ref, dtype)


@pytest.mark.parametrize("backend,device", _all_backends())
def test_mask_power_beyond_float32_range(backend, device):
    """A finite mask_power the float kernels cannot hold (1e39 > FLT_MAX) is clamped to FLT_MAX
    for them, not turned into inf (inf * 0 = NaN at V = 1). Residuals are kept below 1 here:
    with p r beyond FLT_MAX the C++ CPU float kernel has its own NaN (see
    test_large_finite_images_give_zero_weight)."""
    pt, ptk, fl, it, itk = make_inputs(1, 3, 5, 6, dtype=torch.float32, device=device, seed=8)
    it, itk = it * 0.3, itk * 0.3
    it[0, :, 2, 2] = itk[0, :, 2, 2]  # V = 1 at pixels whose residual is 0
    fl = torch.zeros_like(fl)
    ref = R.temporal_loss(pt.cpu(), ptk.cpu(), fl.cpu(), it.cpu(), itk.cpu(), mask_power=1e39, reduction="none")
    got = tcloss.temporal_loss(pt, ptk, fl, it, itk, mask_power=1e39, reduction="none", backend=backend)
    assert torch.isfinite(got).all() and got[0, 2, 2] > 0
    assert_close(got, ref, torch.float32)


@pytest.mark.parametrize("backend,device", _all_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_finite_images_give_zero_weight(backend, device, dtype):
    """Finite images whose residual overflows (3e38 - (-3e38)) or whose p * r does: V^p = 0 there,
    as in the reference, not NaN."""
    pt, ptk, fl, it, itk = make_inputs(1, 3, 5, 6, dtype=dtype, device=device, seed=9)
    fl = torch.zeros_like(fl)
    it, itk = it.clone(), itk.clone()
    it[0, :, 1, 1], itk[0, :, 1, 1] = 3e38, -3e38
    it[0, :, 3, 2] = 1e30
    for p in (1, 1e10):
        ref = R.temporal_loss(pt.cpu(), ptk.cpu(), fl.cpu(), it.cpu(), itk.cpu(), mask_power=p, reduction="none")
        got = tcloss.temporal_loss(pt, ptk, fl, it, itk, mask_power=p, reduction="none", backend=backend)
        assert got[0, 1, 1] == 0 and got[0, 3, 2] == 0
        assert_close(got, ref, dtype)


@pytest.mark.parametrize("backend,device", _all_backends())
def test_empty_batch_reductions(backend, device):
    """B = 0: reduction="mean" is NaN on every backend (the mean of nothing, as torch.mean and the
    reference; one backend returned 0.0), "sum" is 0, "none" an empty (0,H,W) map; backward
    gives empty gradients."""
    pt, ptk, fl, it, itk = (t[:0] for t in make_inputs(2, 3, 4, 5, dtype=torch.float32, device=device))
    for t in (pt, ptk, fl):
        t.requires_grad_(True)
    mean = tcloss.temporal_loss(pt, ptk, fl, it, itk, backend=backend)
    assert mean.shape == () and torch.isnan(mean)
    total = tcloss.temporal_loss(pt, ptk, fl, it, itk, reduction="sum", backend=backend)
    assert total.item() == 0
    none = tcloss.temporal_loss(pt, ptk, fl, it, itk, reduction="none", backend=backend)
    assert none.shape == (0, 4, 5)
    grads = torch.autograd.grad(mean, (pt, ptk, fl))
    assert [g.shape for g in grads] == [pt.shape, ptk.shape, fl.shape]


@pytest.mark.parametrize("backend,device", KERNELS)
def test_double_backward_refused(backend, device):
    pt, ptk, fl, it, itk = make_inputs(1, 3, 4, 5, device=device)
    for t in (pt, ptk, fl):
        t.requires_grad_(True)
    loss = tcloss.temporal_loss(pt, ptk, fl, it, itk, backend=backend)
    g = torch.autograd.grad(loss, (pt, ptk, fl), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through temporal_loss is not supported"):
        sum(x.pow(2).sum() for x in g).backward()


def test_bad_environment_backend_names_the_variable(monkeypatch):
    """A bad TCLOSS_BACKEND is reported as that variable's value, not as a bad backend= argument."""
    monkeypatch.setenv("TCLOSS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="environment variable TCLOSS_BACKEND must be one of.*got 'gpu'"):
        tcloss.temporal_loss(*_good())
    monkeypatch.setenv("TCLOSS_BACKEND", "cuda")  # a real name, not available for CPU tensors
    with pytest.raises(RuntimeError, match="from the environment variable TCLOSS_BACKEND.*not available"):
        tcloss.temporal_loss(*_good())
    # an explicit backend= wins over the variable
    torch.testing.assert_close(tcloss.temporal_loss(*_good(), backend="reference"), R.temporal_loss(*_good()))
    monkeypatch.setenv("TCLOSS_BACKEND", "")
    tcloss.temporal_loss(*_good())


@pytest.mark.parametrize("backend,device", _all_backends())
def test_tiny_mask_power_is_not_rounded_to_zero(backend, device):
    """V^p = exp(-p r) with p = 1e-46 (below float32's smallest subnormal): ~1 where r is finite
    and 0 where r overflows float32 (images of 3e38), not V^0 = 1 everywhere (p rounded to 0)
    nor 0 everywhere (exp(-r)^p with exp(-r) underflowed)."""
    pt, ptk, fl, it, itk = make_inputs(1, 3, 5, 6, dtype=torch.float32, device=device, seed=4)
    fl = torch.zeros_like(fl)
    it, itk = it.clone() * 1e3, itk.clone()
    it[0, :, 1, 1], itk[0, :, 1, 1] = 3e38, -3e38
    got = tcloss.temporal_loss(pt, ptk, fl, it, itk, mask_power=1e-46, reduction="none", backend=backend)
    plain = tcloss.temporal_loss(pt, ptk, fl, it, itk, mask_power=0, reduction="none", backend=backend)
    assert got[0, 1, 1] == 0 and plain[0, 1, 1] > 0
    keep = torch.ones_like(got, dtype=torch.bool)
    keep[0, 1, 1] = False
    torch.testing.assert_close(got[keep], plain[keep])
