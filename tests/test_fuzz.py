"""Property-based fuzz suite (issue 12): every public function, module and CPU backend of tcloss
on random shapes (size 1, odd sizes, B = 0 where allowed), dtypes, strided / expanded views,
extreme finite values and option values, valid and invalid.

Each example is either compared with the float64 reference on the same values (per-dtype
tolerances of conftest.TOL, scaled by the magnitudes involved; gradients too) or must raise a
TypeError / ValueError whose message names the offending argument. Nothing may crash, hang, or
return NaN where the reference is finite.

Profiles (registered here, chosen by the environment variable TCLOSS_FUZZ):

* ``ci`` (default): few examples, ``derandomize=True`` (the same examples on every run, no
  example database), ``deadline=None``; the whole file stays well under a minute on 2 cores.
* ``long`` (``TCLOSS_FUZZ=long``): many more examples, random seeds, for local fuzzing runs, e.g.
  ``TCLOSS_FUZZ=long pytest tests/test_fuzz.py -x``.

Backends: ``reference`` and ``cpp`` always (cpp skipped when tcloss._C is not built); ``triton``
only under ``TRITON_INTERPRET=1``, on tiny shapes and an eighth of the examples (the interpreter
is slow).

The float64 oracle sees the values the library computes with: inputs the library casts to its
accumulation dtype first (flow and images of temporal_loss, peephole weights of convlstm_cell)
are cast the same way before they are widened to float64.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import given
from hypothesis import strategies as st

import tcloss
from tcloss import reference as R
from tcloss import _backends
from tcloss._backends import pairwise_similarity_loss as PW
from tcloss._backends import temporal_loss as TL
from conftest import INTERPRET, TOL

# ------------------------------------------------------------------------- profiles -------------

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=50, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=600, derandomize=False, **_COMMON)
PROFILE = "long" if os.environ.get("TCLOSS_FUZZ", "").strip().lower() in ("long", "fuzz", "1") else "ci"
settings.load_profile(PROFILE)
if PROFILE == "ci":
    # Hypothesis (since 6.131) also draws the literal constants it finds in the source of every
    # local, non-test module in sys.modules. Which of those are loaded depends on the other test
    # files pytest collected (tests/test_temporal_loss.py imports models and videodata), so the
    # derandomized examples changed with the selection: this file alone and after
    # test_temporal_loss.py fuzzed different inputs. No setting turns that off; ci empties the
    # pool (through Hypothesis internals, where they exist) so its examples depend on this file
    # alone. The long profile keeps the constants.
    try:
        from hypothesis.internal.conjecture import providers as _providers

        _NO_CONSTANTS = _providers.Constants()
        if callable(getattr(_providers, "_get_local_constants", None)):
            _providers._get_local_constants = lambda: _NO_CONSTANTS
    except (ImportError, AttributeError):  # another Hypothesis: nothing to pin
        pass

# Triton under the interpreter: an eighth of the examples (at least 3), tiny shapes only.
TRITON_SETTINGS = settings(max_examples=max(3, settings.default.max_examples // 8))
# Option / argument-check tests are cheap: more examples.
CHEAP_SETTINGS = settings(max_examples=settings.default.max_examples * 2)

HAS_CPP = {op: tcloss.backend_status("cpp", op, "cpu")[0]
           for op in ("temporal_loss", "pairwise_similarity_loss", "convlstm_cell")}


def cpu_backends(op):
    return [pytest.param("reference", id="reference"),
            pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not HAS_CPP[op], reason="tcloss._C not built"))]


triton_interp = [pytest.mark.triton,
                 pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")]

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
dtypes = st.sampled_from(DTYPES)
F32MAX = float(torch.finfo(torch.float32).max)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tol(*dts):
    """The loosest (atol, rtol) of conftest.TOL over the given dtypes."""
    return max(TOL[d][0] for d in dts), max(TOL[d][1] for d in dts)


# ------------------------------------------------------------------------- value generation -----

STYLES = ("normal", "large", "offset", "equal", "tiny", "huge", "zero")


def values(shape, dtype, style, seed, *, huge_frac=0.9):
    """A float64 tensor of ``shape`` whose values are exact in ``dtype`` (returned in ``dtype``).

    normal: N(0, 2); large: +-1e4 scale; offset: 1e4 + N(0, 3) (large, O(1) differences);
    equal: equal along dim 1 (all-equal channels); tiny: subnormals of ``dtype`` (and zeros);
    huge: about half the elements +-huge_frac * finfo(dtype).max, the rest N(0, 1);
    zero: all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    fi = torch.finfo(dtype)
    if style == "normal":
        x = x * 2
    elif style == "large":
        x = x * 1e4
    elif style == "offset":
        x = 1e4 + 3 * x
    elif style == "equal":
        if len(shape) >= 2 and shape[1] > 0:
            x = x.narrow(1, 0, 1).expand(shape).clone()
    elif style == "tiny":
        x = x * fi.tiny * 0.3  # below the smallest normal: subnormal (or 0 after rounding)
    elif style == "huge":
        pick = torch.rand(shape, generator=g) < 0.5
        x = torch.where(pick, x.sign() * fi.max * huge_frac, x)
    elif style == "zero":
        x = torch.zeros(shape, dtype=torch.float64)
    else:
        raise AssertionError(style)
    x = x.clamp(-fi.max, fi.max).to(dtype)
    assert torch.isfinite(x).all()
    return x


LAYOUTS = ("contiguous", "channels_last", "transposed", "stepped", "expanded")


def layout(x, kind):
    """The same values as ``x`` in another memory layout (a view, not contiguous), or, for
    ``expanded``, batch item 0 broadcast over the batch (stride 0). Differentiable."""
    if kind == "contiguous" or x.dim() < 2:
        return x.clone()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.clone()
    if kind == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "stepped":
        z = torch.zeros_like(x)
        return torch.stack((x, z), -1).flatten(-2)[..., ::2]
    if kind == "expanded":
        if x.shape[0] == 0:
            return x.clone()
        return x[:1].expand(x.shape)
    raise AssertionError(kind)


def expanded(x, kind):
    """The values ``layout(x, kind)`` holds (``expanded`` repeats batch item 0)."""
    if kind == "expanded" and x.dim() >= 2 and x.shape[0] > 0:
        return x[:1].expand(x.shape).clone()
    return x


def leaf_view(base, kind, requires_grad=True):
    """(leaf, view): gradients are taken w.r.t. the view (a non-leaf of the graph)."""
    leaf = base.detach().clone().requires_grad_(requires_grad)
    return leaf, layout(leaf, kind)


# ------------------------------------------------------------------------- comparison -----------

def check_close(got, want, atol, rtol, what, *, overflow_ok=False, range_of=None):
    """``got`` against the float64 ``want``: NaN where the reference is finite is always a
    failure; where the reference is NaN anything goes; ``overflow_ok``: where |want| is beyond
    the range of ``got``'s dtype (or of ``range_of``), ``got`` may be inf of the same sign."""
    range_of = got.dtype if range_of is None else range_of
    assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g = got.detach().to("cpu", torch.float64)
    w = want.detach().to("cpu", torch.float64)
    nan_bad = torch.isnan(g) & ~torch.isnan(w)
    if nan_bad.any():
        i = tuple(nan_bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: NaN at {i} where the reference is {w[i].item()!r} "
                             f"({int(nan_bad.sum())} NaN element(s) of {g.numel()})")
    keep = ~torch.isnan(w)
    if overflow_ok:
        # (within rtol of the largest finite value: the rounding of the kernel may cross it)
        big = keep & (w.abs() > float(torch.finfo(range_of).max) * (1 - rtol))
        if big.any():
            ok = (g[big] == w[big].sign() * math.inf) | ((g[big] - w[big]).abs() <= rtol * w[big].abs())
            assert ok.all(), f"{what}: reference beyond the {range_of} range is {w[big]}, got {g[big]}"
            keep &= ~big
    torch.testing.assert_close(g[keep], w[keep], atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def finite_absmax(*ts):
    m = 0.0
    for t in ts:
        if t is None or t.numel() == 0:
            continue
        a = t.detach().double().abs()
        a = a[torch.isfinite(a)]
        if a.numel():
            m = max(m, a.max().item())
    return m


def check_grad(got, want, dtype_tol, what, mask=None, slack=None):
    """Gradients: atol scaled by the largest reference gradient (as tests/test_pairwise.py);
    ``slack`` (broadcast to ``got``): per-element differences forgiven on top, for rounding the
    caller can bound."""
    if want is None:
        want = torch.zeros(got.shape, dtype=torch.float64)
    assert got is not None, f"{what}: no gradient"
    atol, rtol = dtype_tol
    scale = finite_absmax(want)
    g, w = got.detach().double(), want.detach().double()
    if slack is not None:  # shrink |g - w| by slack where the reference is finite (NaN, inf kept)
        diff = g - w
        g = torch.where(torch.isfinite(w), w + diff.sign() * (diff.abs() - slack).clamp_min(0), g)
    if mask is not None:
        g, w = g[mask], w[mask]
    # a gradient beyond the range of its (input) dtype may be inf, e.g. float16 flow gradients of
    # logits of 1e4; never NaN
    check_close(g, w, atol + rtol * min(scale, float(torch.finfo(got.dtype).max)), rtol, what, overflow_ok=True,
                range_of=got.dtype)


# ------------------------------------------------------------------------- float64 oracle --------
# An independent float64 bilinear warp from the definition (no normalised grid: the sample
# position is x + flow exactly), and the temporal loss / occlusion mask built on it, with the
# reference's conventions (mask a constant; non-finite flow -> NaN loss, no gradient).

def warp64(x, flow, padding):
    """``out[b,c,y,x] = bilinear(x[b,c], y + flow[b,1,y,x], x + flow[b,0,y,x])``, float64;
    border: the position is clamped to the frame; zeros: corners outside read 0."""
    B, C, H, W = x.shape
    xs = torch.arange(W, dtype=torch.float64).view(1, 1, W)
    ys = torch.arange(H, dtype=torch.float64).view(1, H, 1)
    px, py = xs + flow[:, 0], ys + flow[:, 1]
    if padding == "border":
        px, py = px.clamp(0, W - 1), py.clamp(0, H - 1)
    x0, y0 = px.detach().floor(), py.detach().floor()
    wx1, wy1 = px - x0, py - y0
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    flat = x.reshape(B, C, H * W)
    for xi, wx in ((x0, 1 - wx1), (x0 + 1, wx1)):
        for yi, wy in ((y0, 1 - wy1), (y0 + 1, wy1)):
            valid = (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)
            idx = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).long().reshape(B, 1, H * W).expand(B, C, H * W)
            v = flat.gather(2, idx).view(B, C, H, W)
            w = (wx * wy).unsqueeze(1)
            use = (valid.unsqueeze(1) & (w != 0)).expand(B, C, H, W)
            out = out + torch.where(use, w * v, torch.zeros((), dtype=torch.float64))
    return out


def residual64(img_t, img_tk, flow, mode, padding, limit=None):
    """r of the occlusion mask; ``limit``: the largest finite value of the accumulation dtype the
    library computes r in. Where r, a channel difference or a partial sum of the channel terms
    (d_c, |d_c| or d_c^2, in channel order) is beyond it, r is inf, as the library's is: the
    documented limit (README) that makes V^p = 0 there for every p > 0, where float64 would give
    ~1 for p ~ 1e-67."""
    d = img_t - warp64(img_tk, flow, padding)
    terms = {"signed_sum": d, "l1": d.abs(), "l2": d * d}[mode]
    r = terms.sum(1, keepdim=True)
    r = r.sqrt() if mode == "l2" else r.abs()
    if limit is not None:
        over = (d.abs() > limit).any(1, keepdim=True) | (terms.cumsum(1).abs() > limit).any(1, keepdim=True)
        r = torch.where(over | (r > limit), torch.full_like(r, math.inf), r)
    return r


def occlusion64(img_t, img_tk, flow, mode, padding):
    return torch.exp(-residual64(img_t, img_tk, flow, mode, padding))


def temporal64(pt, ptk, flow, it, itk, *, on, mask_mode, mask_power, padding, detach_target, reduction, limit=None,
               r=None):
    """``limit``: as residual64; ``r``: the residual (B,H,W) to use instead of the oracle's own."""
    finite = torch.isfinite(flow).all(1)
    fs = torch.where(finite.unsqueeze(1), flow, torch.zeros((), dtype=flow.dtype))
    with torch.no_grad():
        # V^p = exp(-p r) (exp(-r)^p underflows to 0 first for a small p); V^0 = 1 at r = inf
        if r is None:
            r = residual64(it, itk, fs.detach(), mask_mode, padding, limit)[:, 0]
        vp = torch.exp(-float(mask_power) * r) if mask_power != 0 else torch.ones_like(r)
    if detach_target:
        ptk = ptk.detach()
    qt, qtk = (torch.softmax(pt, 1), torch.softmax(ptk, 1)) if on == "prob" else (pt, ptk)
    loss = vp * (qt - warp64(qtk, fs, padding)).pow(2).sum(1)
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
    return {"none": lambda: loss, "sum": loss.sum, "mean": loss.mean}[reduction]()


# ------------------------------------------------------------------------- temporal_loss -------

def _draw_temporal(data, tiny):
    d = data.draw
    B = d(st.integers(0 if not tiny else 1, 1 if tiny else 3), label="B")
    C = d(st.integers(1, 3 if tiny else 6), label="C")
    H = d(st.integers(2, 3 if tiny else 7), label="H")
    W = d(st.integers(2, 4 if tiny else 9), label="W")
    Ci = d(st.integers(1, 3), label="img channels")
    dt = d(dtypes, label="pred dtype")
    dt_tk = d(st.one_of(st.just(dt), dtypes), label="pred_tk dtype")
    fdt = d(st.sampled_from([torch.float32, torch.float64, dt]), label="flow dtype")
    idt = d(dtypes, label="image dtype")
    on = d(st.sampled_from(["prob", "logit"]), label="on")
    # logits beyond ~1e19 square beyond the float32 range in on="logit": only in on="prob"
    pstyles = STYLES if on == "prob" else ("normal", "large", "offset", "equal", "tiny", "zero")
    ps = d(st.sampled_from(pstyles), label="pred style")
    pks = d(st.sampled_from(pstyles), label="pred_tk style")
    fstyle = d(st.sampled_from(["small", "out", "far", "zero", "integer"]), label="flow style")
    istyle = d(st.sampled_from(["unit", "scaled", "equal", "huge"]), label="image style")
    opts = dict(
        mask_mode=d(st.sampled_from(["signed_sum", "l1", "l2"]), label="mask_mode"),
        # 1e-46, 1e-67: positive, but 0 in float32 (the library keeps them positive: V^p is ~1,
        # not 1 by p = 0); where r overflows float32 (images of ~3e38) V^p is 0 for every p > 0,
        # the documented limit of float32 accumulation that the oracle emulates (residual64)
        mask_power=d(st.one_of(st.sampled_from([0, 1, 2, 0.5, 1e-30, 1e-46, 1e-67]), st.floats(0, 4)),
                     label="mask_power"),
        padding=d(st.sampled_from(["border", "zeros"]), label="padding"),
        reduction=d(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
        detach_target=d(st.booleans(), label="detach_target"),
    )
    lay = [d(st.sampled_from(LAYOUTS), label=f"layout {n}") for n in ("pred_t", "pred_tk", "flow", "img_t", "img_tk")]
    seed = d(st.integers(0, 2**16), label="seed")
    return B, C, H, W, Ci, dt, dt_tk, fdt, idt, on, ps, pks, fstyle, istyle, opts, lay, seed


def _flow(B, H, W, fdt, style, seed):
    g = torch.Generator().manual_seed(seed + 1)
    f = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64)
    if style == "small":
        f = f * 2
    elif style == "out":  # most samples outside the frame, a few inside
        f = f * 2 * max(H, W)
    elif style == "far":
        big = 1e5 if fdt != torch.float16 else 6e4
        f = torch.where(torch.rand(f.shape, generator=g) < 0.5, f.sign() * big, f * 3)
    elif style == "zero":
        f = torch.zeros_like(f)
    elif style == "integer":
        f = (f * 3).round()
    return f.to(fdt)


def _images(B, Ci, H, W, idt, style, seed):
    g = torch.Generator().manual_seed(seed + 2)
    a = torch.rand(B, Ci, H, W, generator=g, dtype=torch.float64)
    b = torch.rand(B, Ci, H, W, generator=g, dtype=torch.float64)
    if style == "scaled":
        a, b = a * 5, b * 5
    elif style == "equal":
        b = a.clone()
    elif style == "huge":  # a few pixels at +-0.9 max: residual overflows, V = 0 there
        m = torch.finfo(idt).max * 0.9
        pick = torch.rand(B, 1, H, W, generator=g) < 0.3
        a = torch.where(pick, torch.full_like(a, m), a)
        b = torch.where(pick, torch.full_like(b, -m), b)
    return a.to(idt), b.to(idt)


def _flow_kink_mask(flow_acc, H, W):
    """Pixels whose sample position is within 1e-3 of an integer near the frame (bilinear
    kinks and the border clamp): their flow gradient is one-sided, not compared there."""
    f = flow_acc.detach().double()
    xs = torch.arange(W, dtype=torch.float64).view(1, 1, W)
    ys = torch.arange(H, dtype=torch.float64).view(1, H, 1)
    px, py = xs + f[:, 0], ys + f[:, 1]

    def near(p, n):
        return ((p - p.round()).abs() < 1e-3) & (p > -2.5) & (p < n + 1.5)

    bad = near(px, W) | near(py, H) | ~torch.isfinite(px) | ~torch.isfinite(py)
    return (~bad).unsqueeze(1).expand(f.shape)


def _prop_temporal(data, backend, tiny=False):
    _check_temporal(backend, *_draw_temporal(data, tiny))


def _check_temporal(backend, B, C, H, W, Ci, dt, dt_tk, fdt, idt, on, ps, pks, fstyle, istyle, opts, lay, seed):
    pt0 = values((B, C, H, W), dt, ps, seed)
    ptk0 = values((B, C, H, W), dt_tk, pks, seed + 7)
    fl0 = _flow(B, H, W, fdt, fstyle, seed)
    it0, itk0 = _images(B, Ci, H, W, idt, istyle, seed)
    pt0, ptk0, fl0, it0, itk0 = (expanded(t, k) for t, k in zip((pt0, ptk0, fl0, it0, itk0), lay))
    pt_leaf, pt = leaf_view(pt0, lay[0])
    ptk_leaf, ptk = leaf_view(ptk0, lay[1])
    fl_leaf, fl = leaf_view(fl0, lay[2])
    it = layout(it0, lay[3])
    itk = layout(itk0, lay[4])

    loss = tcloss.temporal_loss(pt, ptk, fl, it, itk, on=on, backend=backend, **opts)
    cdt = torch.promote_types(dt, dt_tk)
    acc = acc_of(cdt)
    assert loss.dtype == acc, f"loss dtype {loss.dtype}, expected {acc}"
    red = opts["reduction"]
    assert loss.shape == ((B, H, W) if red == "none" else ()), loss.shape

    # the float64 oracle on the values the library computes with
    o = [t.detach().to(cdt).double().requires_grad_() for t in (pt0, ptk0)]
    ofl = fl0.to(acc).double().requires_grad_()
    r_lib = None
    if backend == "reference":
        # the reference's residual goes through grid_sample, whose normalised grid leaves weights
        # of ~1e-7 on the neighbours of an integer sample point (documented): next to images of
        # 6e4 (float16) or 3e38 that moves r by far more than 1, so V^p is only bounded there.
        # That residual is checked against the oracle's within this bound by
        # test_fuzz_flow_warp_and_occlusion_mask; here the loss is checked given it.
        r_lib = R.occlusion_residual(R.saturate_to(it0, acc), R.saturate_to(itk0, acc), fl0.to(acc),
                                     opts["mask_mode"], opts["padding"])[:, 0].double()
    # images as every backend reads them: saturated to acc (float64 images of 1e308 stay finite)
    want = temporal64(o[0], o[1], ofl, R.saturate_to(it0, acc).double(), R.saturate_to(itk0, acc).double(), on=on, **opts,
                      limit=torch.finfo(acc).max, r=r_lib)

    atol, rtol = tol(acc)
    mag = 1.0 if on == "prob" else max(1.0, finite_absmax(pt0, ptk0)) ** 2 * C
    if red == "sum":
        mag *= max(1, B * H * W)
    check_close(loss, want, atol * mag, rtol, f"loss ({backend})")

    # on="logit": q_tk is warped at its own magnitude, so every implementation (the float32
    # reference too) rounds the warp to ~eps |q| while the differences that the gradients are
    # made of are of the size of the logits' spread: relative error ~ eps |q| / spread
    grad_rtol = 0.0
    if on == "logit":
        v = torch.cat([pt0.detach().double().flatten(), ptk0.detach().double().flatten()])
        v = v[torch.isfinite(v)]
        spread = v.std().item() if v.numel() > 1 else 0.0
        if spread > 0:
            grad_rtol = 16 * torch.finfo(acc).eps * finite_absmax(v) / spread

    # gradients, with a random cotangent for reduction="none"
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ins = [pt, fl] if opts["detach_target"] else [pt, ptk, fl]
    grads = torch.autograd.grad(loss, ins, go.to(loss.dtype), allow_unused=True)
    oins = [o[0], ofl] if opts["detach_target"] else [o[0], o[1], ofl]
    rgrads = torch.autograd.grad(want, oins, go, allow_unused=True)
    names = ["pred_t", "flow"] if opts["detach_target"] else ["pred_t", "pred_tk", "flow"]
    for name, g, rg, x in zip(names, grads, rgrads, ins):
        assert g is not None and g.shape == x.shape and g.dtype == x.dtype, (name, None if g is None else g.dtype)
        if name == "flow":
            # flow gradients: float32 sums of C products of low-precision values
            atol, rtol = tol(cdt, fdt, acc)
            check_grad(g, rg, (atol, rtol + grad_rtol), f"grad flow ({backend})", _flow_kink_mask(fl0.to(acc), H, W))
        else:
            atol, rtol = tol(x.dtype, acc)
            check_grad(g, rg, (atol, rtol + grad_rtol), f"grad {name} ({backend})")


@pytest.mark.parametrize("backend", cpu_backends("temporal_loss"))
@given(data=st.data())
def test_fuzz_temporal_loss(backend, data):
    _prop_temporal(data, backend)


# Examples the long profile found (issue 12), drawn values spelled out
FOUND_TEMPORAL = {
    # bfloat16 images of +-3e38: r overflows float32, so V^p = 0 (documented); float64 gives ~1
    "tiny p, r beyond float32": (1, 2, 2, 2, 1, torch.float16, torch.float16, torch.float32, torch.bfloat16, "prob",
                                 "normal", "normal", "small", "huge", 5.7759346343868075e-210, "border"),
    # float16 images of +-6e4, zero flow: grid_sample's ~1e-7 weights on the neighbours of the
    # integer sample point move the reference's r by ~1e-2 (documented)
    "reference r through grid_sample": (1, 2, 3, 6, 1, torch.float16, torch.float16, torch.float32, torch.float16,
                                        "prob", "normal", "normal", "zero", "huge", 1, "border"),
    # float64 images of 1.6e308 with float32 accumulation: the oracle cast them to inf, every
    # backend saturates them to 3.4e38 (a finite r next to them, V^p ~ 1 for p = 1e-46)
    "float64 images saturated": (1, 1, 2, 2, 1, torch.float16, torch.float16, torch.float32, torch.float64, "prob",
                                 "normal", "normal", "small", "huge", 1e-46, "zeros"),
}


@pytest.mark.parametrize("backend", cpu_backends("temporal_loss"))
@pytest.mark.parametrize("case", list(FOUND_TEMPORAL))
def test_found_temporal_loss(backend, case):
    *head, p, padding = FOUND_TEMPORAL[case]
    opts = dict(mask_mode="signed_sum", mask_power=p, padding=padding, reduction="mean", detach_target=False)
    _check_temporal(backend, *head, opts, ["contiguous"] * 5, 0)


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
@TRITON_SETTINGS
@given(data=st.data())
def test_fuzz_temporal_loss_triton(data):
    _prop_temporal(data, "triton", tiny=True)


# ------------------------------------------------------------------------- flow_warp / occlusion_mask

@given(data=st.data())
def test_fuzz_flow_warp_and_occlusion_mask(data):
    d = data.draw
    B, C = d(st.integers(0, 2), label="B"), d(st.integers(1, 4), label="C")
    H, W = d(st.integers(2, 7), label="H"), d(st.integers(2, 7), label="W")
    xdt, fdt = d(dtypes, label="x dtype"), d(dtypes, label="flow dtype")
    xs = d(st.sampled_from(["normal", "large", "equal", "tiny", "zero"]), label="x style")
    fstyle = d(st.sampled_from(["small", "out", "far", "zero", "integer"]), label="flow style")
    padding = d(st.sampled_from(["border", "zeros"]), label="padding")
    mode = d(st.sampled_from(["signed_sum", "l1", "l2"]), label="mode")
    istyle = d(st.sampled_from(["unit", "scaled", "equal", "huge"]), label="image style")
    lx, lf = d(st.sampled_from(LAYOUTS), label="layout x"), d(st.sampled_from(LAYOUTS), label="layout flow")
    seed = d(st.integers(0, 2**16), label="seed")
    x0 = values((B, C, H, W), xdt, xs, seed)
    fl0 = expanded(_flow(B, H, W, fdt, fstyle, seed), lf)
    x0 = expanded(x0, lx)
    x, fl = layout(x0, lx), layout(fl0, lf)

    out = tcloss.flow_warp(x, fl, padding=padding)
    dt = torch.promote_types(xdt, fdt)
    assert out.dtype == dt and out.shape == (B, C, H, W)
    want = warp64(x0.double(), fl0.to(dt).double(), padding)
    # the library samples in the promoted dtype: positions carry its rounding (eps * (size + |flow|))
    eps = torch.finfo(dt).eps
    pos_err = eps * (max(H, W) + finite_absmax(fl0)) * 2
    atol, rtol = tol(dt)
    xm = max(1.0, finite_absmax(x0))
    check_close(out, want, (atol + pos_err) * xm, rtol, "flow_warp")

    it0, itk0 = (expanded(t, lx) for t in _images(B, C, H, W, xdt, istyle, seed + 3))
    m = tcloss.occlusion_mask(layout(it0, lx), layout(itk0, lx), fl, mode=mode, padding=padding)
    assert m.shape == (B, 1, H, W)
    mw = occlusion64(it0.double(), itk0.double(), fl0.to(dt).double(), mode, padding)
    # V = exp(-r): an absolute error dr of r is a relative error dr of V. The warp goes through
    # grid_sample's normalised grid, which leaves weights of ~1e-7 (float32 eps) on the neighbours
    # of an integer sample point (documented in tcloss._math.flow_warp): with images of ~3e38 that
    # alone moves r by far more than 1, so V is only bounded there.
    gs_err = 4 * torch.finfo(torch.float32).eps * C * max(finite_absmax(it0), finite_absmax(itk0))
    check_close(m, mw, atol + (pos_err + eps) * 8 * C + gs_err, rtol + (pos_err + eps) * 8 * C * 4, "occlusion_mask")


# ------------------------------------------------------------------------- pairwise_similarity_loss

PW_STYLES = ("normal", "large", "equal", "tiny", "huge", "zero", "zero_rows")


def _pw_values(shape, dtype, style, seed):
    if style == "zero_rows":  # some pixels' feature vectors are exactly zero (finite thanks to eps)
        x = values(shape, dtype, "normal", seed)
        g = torch.Generator().manual_seed(seed + 11)
        pick = torch.rand((shape[0], 1) + tuple(shape[2:]), generator=g) < 0.4
        return torch.where(pick, torch.zeros((), dtype=dtype), x)
    return values(shape, dtype, style, seed, huge_frac=0.5)


def _prop_pairwise(data, backend, tiny=False):
    d = data.draw
    B = d(st.integers(1, 2), label="B")
    Cs, Ct = d(st.integers(1, 3 if tiny else 6), label="C_s"), d(st.integers(1, 3 if tiny else 6), label="C_t")
    Na = d(st.integers(1, 5 if tiny else 12), label="N_a")
    two = d(st.booleans(), label="separate *_b")
    Nb = d(st.integers(1, 5 if tiny else 12), label="N_b") if two else Na
    spatial = d(st.booleans(), label="(B,C,H,W) form")
    sdt, tdt = d(dtypes, label="student dtype"), d(dtypes, label="teacher dtype")
    ss, ts = d(st.sampled_from(PW_STYLES), label="student style"), d(st.sampled_from(PW_STYLES), label="teacher style")
    loss = d(st.sampled_from(["mse", "kl"]), label="loss")
    algs = {"reference": ["auto", "naive", "gram"], "cpp": ["auto", "naive", "gram", "blocked"],
            "triton": ["blocked"]}[backend]
    algorithm = d(st.sampled_from(algs), label="algorithm")
    if loss == "kl" and algorithm == "gram":
        algorithm = "naive"
    temperature = d(st.one_of(st.sampled_from([1.0, 0.5, 0.1]), st.floats(0.05, 5)), label="temperature")
    eps = d(st.sampled_from([1e-8, 1e-3, 1e-12]), label="eps")
    detach_norm = d(st.booleans(), label="detach_norm")
    lays = [d(st.sampled_from(LAYOUTS), label=f"layout {n}") for n in ("student_a", "teacher_a", "student_b")]
    seed = d(st.integers(0, 2**16), label="seed")

    def shp(C, N):
        if spatial and N % 2 == 0:
            return (B, C, 2, N // 2)
        return (B, C, N)

    sa0 = _pw_values(shp(Cs, Na), sdt, ss, seed)
    ta0 = _pw_values(shp(Ct, Na), tdt, ts, seed + 1)
    sb0 = _pw_values(shp(Cs, Nb), sdt, ss, seed + 2) if two else None
    tb0 = _pw_values(shp(Ct, Nb), tdt, ts, seed + 3) if two else None
    sa0, ta0 = expanded(sa0, lays[0]), expanded(ta0, lays[1])
    sb0 = None if sb0 is None else expanded(sb0, lays[2])
    tb0 = None if tb0 is None else expanded(tb0, lays[1])
    _, sa = leaf_view(sa0, lays[0])
    ta = layout(ta0, lays[1])
    sb = None if sb0 is None else leaf_view(sb0, lays[2])[1]
    tb = None if tb0 is None else layout(tb0, lays[1])
    kw = dict(loss=loss, temperature=temperature, eps=eps, detach_norm=detach_norm)
    got = tcloss.pairwise_similarity_loss(sa, ta, sb, tb, algorithm=algorithm, backend=backend, **kw)
    cdt = torch.promote_types(sdt, tdt)
    acc = acc_of(cdt)
    assert got.dtype == acc and got.shape == (), (got.dtype, got.shape)

    o_sa = sa0.to(cdt).double().requires_grad_()
    o_sb = None if sb0 is None else sb0.to(cdt).double().requires_grad_()
    o_t = (ta0.to(cdt).double(), None if tb0 is None else tb0.to(cdt).double())
    want = R.pairwise_similarity_loss(o_sa, o_t[0], o_sb, o_t[1], **kw)
    atol, rtol = tol(acc)
    check_close(got, want, atol, rtol, f"loss ({backend}, {algorithm})")
    ins = [sa] + ([sb] if sb is not None else [])
    grads = torch.autograd.grad(got, ins, allow_unused=True)
    check_pairwise_grads(grads, ins, o_sa, o_sb, o_t, kw, acc, f"{backend}, {algorithm}")


def check_pairwise_grads(grads, ins, o_sa, o_sb, o_t, kw, acc, label):
    """The students' gradients against the float64 reference on (o_sa, o_t[0], o_sb, o_t[1]).

    d x of x / max(|x|, eps) is (g - u <u, g>) / |x| (g / eps at |x| <= eps), g = d L / d u a sum
    of terms bounded by b = c (N_a + N_b) (4 for mse, 2 / tau for kl; c = 1 / the number of
    averaged terms). Where that cancels (rows parallel to g: C = 1 gives exactly 0; uniform S and
    T rows in kl) its float32 rounding, ~eps b / max(|x|, eps), does not, and for a zero row
    (1 / eps = 1e8) or a subnormal float16 one (~1e7) that is O(1): forgiven per row, on top of
    the tolerance relative to the largest reference gradient."""
    oins = [o_sa] + ([o_sb] if o_sb is not None else [])
    rgrads = torch.autograd.grad(R.pairwise_similarity_loss(o_sa, o_t[0], o_sb, o_t[1], **kw), oins, allow_unused=True)
    B, Na = o_sa.shape[0], o_sa[0, 0].numel()
    Nb = Na if o_sb is None else o_sb[0, 0].numel()
    c = 1.0 / (B * Na * (Nb if kw["loss"] == "mse" else 1))
    b = c * (Na + Nb) * (4.0 if kw["loss"] == "mse" else 2.0 / kw["temperature"])
    C = o_sa.shape[1] + o_t[0].shape[1]
    for name, g, rg, x, ox in zip(("student_a", "student_b"), grads, rgrads, ins, oins):
        assert g is not None and g.shape == x.shape and g.dtype == x.dtype, name
        norm = torch.linalg.vector_norm(ox.detach(), dim=1, keepdim=True).clamp_min(kw["eps"])
        slack = 8 * torch.finfo(acc).eps * C * b / norm
        check_grad(g, rg, tol(x.dtype, acc), f"grad {name} ({label})", slack=slack)


@pytest.mark.parametrize("case", ["mse, one channel, subnormal rows", "kl, zero row, uniform rows"])
def test_pairwise_grad_tolerance_found_cases(case):
    """Cases the long profile found (reference backend), where every exact gradient is 0 and a
    tolerance relative to the largest reference gradient (0) rejected float32 rounding
    amplified by 1 / |x|: one channel (x / |x| is the sign) with subnormal float16 rows (2^-6
    left); kl with a zero student row (1 / eps) whose S and T rows are uniform (~4 left)."""
    if case.startswith("mse"):
        sa0, sb0 = values((1, 1, 3), torch.float16, "tiny", 1), None
        ta0, tb0 = values((1, 1, 3), torch.float16, "normal", 2), None
        kw = dict(loss="mse", temperature=1.0, eps=1e-8, detach_norm=False)
    else:
        sa0, sb0 = _pw_values((1, 1, 1), torch.float16, "zero_rows", 0), _pw_values((1, 1, 3), torch.float16, "zero_rows", 2)
        ta0, tb0 = _pw_values((1, 1, 1), torch.float16, "normal", 1), _pw_values((1, 1, 3), torch.float16, "normal", 3)
        kw = dict(loss="kl", temperature=1.0, eps=1e-8, detach_norm=False)
    ins = [t.clone().requires_grad_() for t in (sa0, sb0) if t is not None]
    got = tcloss.pairwise_similarity_loss(ins[0], ta0, ins[1] if sb0 is not None else None, tb0, algorithm="naive",
                                          backend="reference", **kw)
    grads = torch.autograd.grad(got, ins)
    assert grads[0].abs().max() > 0  # the rounding this is about
    check_pairwise_grads(grads, ins, sa0.double().requires_grad_(), None if sb0 is None else sb0.double().requires_grad_(),
                         (ta0.double(), None if tb0 is None else tb0.double()), kw, torch.float32, "reference, naive")


def test_pixelwise_kd_tolerance_found_case():
    """Found by the long profile: tiny float16 logits, tau = 13: KL ~ 2e-12, but the float32 result
    is 1.2e-5, the rounding of tau lse (tau^2 eps log C), which the tolerance now includes."""
    s, t = values((1, 2), torch.float16, "tiny", 1), values((1, 2), torch.float16, "tiny", 2)
    got, want = tcloss.pixelwise_kd(s, t, temperature=13.0), _kd64(s.double(), t.double(), 13.0)[0]
    assert abs(got.item() - want.item()) > 1e-5  # what the old tolerance rejected
    lse_err = 8 * torch.finfo(torch.float32).eps * 13.0 ** 2 * max(1.0, math.log(2))
    check_close(got, want, TOL[torch.float32][0] + lse_err, TOL[torch.float32][1], "pixelwise_kd")


@pytest.mark.parametrize("backend", cpu_backends("pairwise_similarity_loss"))
@given(data=st.data())
def test_fuzz_pairwise_similarity_loss(backend, data):
    _prop_pairwise(data, backend)


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
@TRITON_SETTINGS
@given(data=st.data())
def test_fuzz_pairwise_similarity_loss_triton(data):
    _prop_pairwise(data, "triton", tiny=True)


# ------------------------------------------------------------------------- pixelwise_kd ---------

def _kd64(s, t, tau):
    """tau^2 mean_pixels sum_{c: p_c > 0} p_c (log p_c - log q_c) in float64, and the per-pixel terms."""
    logq = torch.log_softmax(s / tau, 1)
    logp = torch.log_softmax(t / tau, 1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    per_pixel = terms.sum(1) * tau * tau
    return per_pixel.mean(), per_pixel


@given(data=st.data())
def test_fuzz_pixelwise_kd(data):
    d = data.draw
    nd = d(st.integers(2, 4), label="ndim")
    B = d(st.integers(0, 3), label="B")
    C = d(st.integers(1, 6), label="C")
    rest = tuple(d(st.integers(1, 5), label=f"dim {i}") for i in range(2, nd))
    shape = (B, C) + rest
    sdt, tdt = d(dtypes, label="student dtype"), d(dtypes, label="teacher dtype")
    ss = d(st.sampled_from(STYLES), label="student style")
    ts = d(st.sampled_from(STYLES + ("masked",)), label="teacher style")
    tau = d(st.one_of(st.sampled_from([1.0, 4.0, 0.25]), st.floats(1e-3, 1e2)), label="temperature")
    ls, lt = d(st.sampled_from(LAYOUTS), label="layout student"), d(st.sampled_from(LAYOUTS), label="layout teacher")
    module = d(st.booleans(), label="nn.PixelwiseKD")
    seed = d(st.integers(0, 2**16), label="seed")
    # the float64 oracle forms (z - max) / tau: huge float64 logits are kept where that is finite
    # (at 0.9 max a gap over tau = 0.25 is ~1e309; float32 inputs are far from it)
    frac = {"huge_frac": 0.45 * min(tau, 1.0)}
    s0 = values(shape, sdt, ss, seed, **(frac if sdt == torch.float64 else {}))
    if ts == "masked":  # -inf teacher classes (never every class of a pixel)
        t0 = values(shape, tdt, "normal", seed + 1).clone()
        g = torch.Generator().manual_seed(seed + 5)
        mask = torch.rand(shape, generator=g) < 0.5
        if C > 0 and mask.numel():
            first = torch.zeros_like(mask)
            first.narrow(1, 0, 1).fill_(True)
            mask &= ~(mask.all(1, keepdim=True) & first)
        t0 = t0.masked_fill(mask, float("-inf"))
    else:
        t0 = values(shape, tdt, ts, seed + 1, **(frac if tdt == torch.float64 else {}))
    s0, t0 = expanded(s0, ls), expanded(t0, lt)
    s_leaf, s = leaf_view(s0, ls)
    t = layout(t0, lt)
    got = tcloss.nn.PixelwiseKD(temperature=tau)(s, t) if module else tcloss.pixelwise_kd(s, t, temperature=tau)
    acc = torch.float64 if torch.float64 in (sdt, tdt) else torch.float32
    assert got.dtype == acc and got.shape == ()
    o_s = s0.double().requires_grad_()
    want, per_pixel = _kd64(o_s, t0.double(), tau)
    atol, rtol = tol(acc)
    M = finite_absmax(s0, t0)
    # documented: a per-pixel tau^2 KL beyond the float32 range may make the result inf (not NaN)
    overflow = acc == torch.float32 and per_pixel.numel() and finite_absmax(per_pixel) > F32MAX
    if overflow:
        g = got.double()
        assert not torch.isnan(g) and (torch.isinf(g) or math.isclose(g.item(), want.item(), rel_tol=1e-3)), (g, want)
        return
    # tau^2 KL = tau sum_c p_c (u_t - u_s), u = tau log_softmax(z / tau) (functional.pixelwise_kd):
    # each u carries tau lse(.), in [0, tau log C], rounded in acc: the result has an absolute
    # rounding of ~eps tau^2 log C however small KL is (tiny logits: KL ~ 1e-12)
    lse_err = 8 * torch.finfo(acc).eps * tau * tau * max(1.0, math.log(C)) if C > 1 else 0.0
    check_close(got, want, atol * max(1.0, M * tau) + lse_err, rtol, "pixelwise_kd", overflow_ok=True)
    if B == 0:
        return
    (gs,) = torch.autograd.grad(got, s)
    (gw,) = torch.autograd.grad(want, o_s)
    assert gs.dtype == sdt
    check_grad(gs, gw, tol(sdt, acc), "grad student_logits")


# ------------------------------------------------------------------------- convlstm_cell --------

def _prop_convlstm(data, backend, tiny=False):
    d = data.draw
    B = d(st.integers(0 if not tiny else 1, 1 if tiny else 3), label="B")
    Hd = d(st.integers(1, 2 if tiny else 4), label="Hd")
    H, W = d(st.integers(1, 3 if tiny else 6), label="h"), d(st.integers(1, 3 if tiny else 7), label="w")
    gdt, cdt_ = d(dtypes, label="gates dtype"), d(dtypes, label="c dtype")
    gs = d(st.sampled_from(STYLES), label="gates style")
    cs = d(st.sampled_from(("normal", "large", "tiny", "zero", "huge")), label="c style")
    peep = d(st.sampled_from([None, "channel", "position", "mixed"]), label="peephole")
    pdt = d(dtypes, label="peephole dtype")
    upstream = d(st.sampled_from(["h", "c", "both"]), label="upstream")
    lg, lc = d(st.sampled_from(LAYOUTS), label="layout gates"), d(st.sampled_from(LAYOUTS), label="layout c")
    seed = d(st.integers(0, 2**16), label="seed")
    dt = torch.promote_types(gdt, cdt_)
    acc = acc_of(dt)
    g0 = values((B, 4 * Hd, H, W), gdt, gs, seed)
    # the state must stay within the output dtype's range: c' = f c + i g
    c0 = values((B, Hd, H, W), cdt_, cs, seed + 1, huge_frac=0.45 * min(1.0, torch.finfo(dt).max / torch.finfo(cdt_).max))
    shapes = {None: None, "channel": [(Hd, 1, 1)] * 3, "position": [(Hd, H, W)] * 3,
              "mixed": [(Hd, 1, 1), (Hd, H, W), (1, H, W)]}[peep]
    p0 = None if shapes is None else [values(sh, pdt, "normal", seed + 2 + i) * 0.3 for i, sh in enumerate(shapes)]
    g0, c0 = expanded(g0, lg), expanded(c0, lc)
    _, gates = leaf_view(g0, lg)
    _, c = leaf_view(c0, lc)
    p = None if p0 is None else tuple(w.clone().requires_grad_() for w in p0)
    h_new, c_new = tcloss.convlstm_cell(gates, c, peephole=p, backend=backend)
    for n, t in (("h'", h_new), ("c'", c_new)):
        assert t.dtype == dt and t.shape == (B, Hd, H, W), (n, t.dtype, t.shape)

    og = g0.to(dt).double().requires_grad_()
    oc = c0.to(dt).double().requires_grad_()
    op = None if p0 is None else tuple(w.to(acc).double().requires_grad_() for w in p0)
    rh, rc = R.convlstm_cell(og, oc, op)
    atol, rtol = tol(dt)
    # with peepholes a gate's pre-activation g + w c is a rounded sum in acc: off by eps times
    # its terms, which a gate off saturation (sigma' <= 1/4) passes on to h' whole
    pmax = 0.0 if p0 is None else max(finite_absmax(w) for w in p0)
    pre = torch.finfo(acc).eps * (finite_absmax(g0) + pmax * finite_absmax(c0)) if p0 is not None else 0.0
    check_close(h_new, rh, atol + pre, rtol, f"h' ({backend})")
    check_close(c_new, rc, atol * max(1.0, finite_absmax(c0)), rtol, f"c' ({backend})", overflow_ok=True)

    gen = torch.Generator().manual_seed(seed + 9)
    gh = torch.randn(rh.shape, generator=gen, dtype=torch.float64) if upstream in ("h", "both") else None
    gc = torch.randn(rh.shape, generator=gen, dtype=torch.float64) if upstream in ("c", "both") else None
    outs = [o for o, u in ((h_new, gh), (c_new, gc)) if u is not None]
    routs = [o for o, u in ((rh, gh), (rc, gc)) if u is not None]
    us = [u for u in (gh, gc) if u is not None]
    ins = [gates, c] + list(p or ())
    oins = [og, oc] + list(op or ())
    grads = torch.autograd.grad(outs, ins, [u.to(dt) for u in us], allow_unused=True)
    rgrads = torch.autograd.grad(routs, oins, us, allow_unused=True)
    names = ["gates", "c", "w_i", "w_f", "w_o"]
    for name, gr, rg, x in zip(names, grads, rgrads, ins):
        if gr is None:  # e.g. w_o does not reach c'
            assert rg is None or not rg.any(), name
            continue
        assert gr.shape == x.shape and gr.dtype == x.dtype, (name, gr.dtype, x.dtype)
        atol_, rtol_ = tol(x.dtype, dt)
        # the rounded pre-activation moves each gate derivative by up to |sigma''| pre <= pre / 10,
        # times the upstream gradient, times c (peephole weights) or w (c)
        atol_ += pre * sum(finite_absmax(u) for u in us) * (1 + pmax + finite_absmax(c0) + finite_absmax(rc)) / 10
        if name.startswith("w_"):
            # peephole gradients are acc-dtype sums over batch and space of (gate gradient * c)
            # terms that may cancel: their rounding is relative to the sum of |terms|
            gmax = finite_absmax(rgrads[0])
            # ... and each term's gate derivative, formed from the rounded gate (sigma (1 - sigma)),
            # is off by ~eps absolute even where the gate saturates and the exact gradient vanishes:
            # eps times the upstream gradient (dL/dc' <= |dL/dc'| + |dL/dh'|) times c per term
            umax = sum(finite_absmax(u) for u in us)
            atol_ += 8 * torch.finfo(acc).eps * (gmax + umax) * (finite_absmax(c0) + finite_absmax(rc)) * max(1, B * H * W)
        check_grad(gr, rg, (atol_, rtol_), f"grad {name} ({backend})")


@pytest.mark.parametrize("backend", cpu_backends("convlstm_cell"))
@given(data=st.data())
def test_fuzz_convlstm_cell(backend, data):
    _prop_convlstm(data, backend)


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
@TRITON_SETTINGS
@given(data=st.data())
def test_fuzz_convlstm_cell_triton(data):
    _prop_convlstm(data, "triton", tiny=True)


@pytest.mark.parametrize("backend", cpu_backends("convlstm_cell"))
@given(data=st.data())
def test_fuzz_convlstm_modules(backend, data):
    """nn.ConvLSTMCell / nn.ConvLSTM with the backend's cell equal the same modules on the reference."""
    d = data.draw
    T = d(st.integers(1, 3), label="T")
    B = d(st.integers(0, 2), label="B")
    Cin, Hd = d(st.integers(1, 3), label="in_channels"), d(st.integers(1, 3), label="hidden_channels")
    H, W = d(st.integers(1, 5), label="H"), d(st.integers(1, 5), label="W")
    k = d(st.sampled_from([1, 3, (1, 3), (3, 1), 5]), label="kernel_size")
    peep = d(st.booleans(), label="peephole")
    spatial = d(st.booleans(), label="spatial_size") and peep
    as_tensor = d(st.booleans(), label="seq as a tensor")
    seed = d(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    kw = dict(kernel_size=k, peephole=peep, spatial_size=(H, W) if spatial else None)
    m = tcloss.nn.ConvLSTM(Cin, Hd, backend=backend, **kw).double()
    ref = tcloss.nn.ConvLSTM(Cin, Hd, backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for prm in m.parameters():
            prm.uniform_(-0.5, 0.5)
    ref.load_state_dict(m.state_dict())
    seq = values((T, B, Cin, H, W), torch.float64, "normal", seed)
    x = seq if as_tensor else list(seq.unbind(0))
    hs, (h, c) = m(x)
    rhs, (rh, rc) = ref(x)
    assert hs.shape == (T, B, Hd, H, W)
    for n, a, b in (("hs", hs, rhs), ("h", h, rh), ("c", c, rc)):
        check_close(a, b, *TOL[torch.float64], n)


# ------------------------------------------------------------------------- metrics --------------

def _confusion(ref, other, valid, C):
    conf = np.zeros((C, C), np.int64)
    for r, o, v in zip(ref.ravel(), other.ravel(), valid.ravel()):
        if v:
            conf[r, o] += 1
    return conf


def _iou(conf):
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
    return iou


def _same(a, b, what):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert a.shape == b.shape and np.allclose(a, b, equal_nan=True, rtol=1e-9, atol=1e-9), f"{what}: {a} != {b}"


@given(data=st.data())
def test_fuzz_segmentation_metrics(data):
    d = data.draw
    C = d(st.integers(1, 5), label="num_classes")
    ignore = d(st.sampled_from([255, -1, C, 1000]), label="ignore_index")
    n = d(st.integers(1, 3), label="updates")
    ldt = d(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]), label="label dtype")
    if ldt == torch.uint8 and not 0 <= ignore <= 255:
        ignore = 255
    m = tcloss.metrics.SegmentationMetrics(C, ignore_index=ignore)
    conf = np.zeros((C, C), np.int64)
    for u in range(n):
        B = d(st.integers(0, 2), label=f"B{u}")
        H, W = d(st.integers(1, 5), label=f"H{u}"), d(st.integers(1, 5), label=f"W{u}")
        logits = d(st.booleans(), label=f"logits{u}")
        seed = d(st.integers(0, 2**16), label=f"seed{u}")
        g = torch.Generator().manual_seed(seed)
        target = torch.randint(0, C, (B, H, W), generator=g)
        target[torch.rand(B, H, W, generator=g) < 0.2] = ignore
        if logits:
            lg = torch.randn(B, C, H, W, generator=g)
            pred_lbl = lg.argmax(1)
            pred = lg
        else:
            pred_lbl = torch.randint(0, C, (B, H, W), generator=g)
            pred = pred_lbl.to(ldt)
        m.update(pred, target.to(ldt) if ldt != torch.uint8 or ignore <= 255 else target)
        t = target.numpy()
        valid = t != ignore
        conf += _confusion(np.where(valid, t, 0), pred_lbl.numpy(), valid, C)
    r = m.compute()
    iou = _iou(conf)
    _same(r["iou"], iou * 100, "iou")
    present = ~np.isnan(iou)
    _same(r["miou"], iou[present].mean() * 100 if present.any() else np.nan, "miou")
    total = conf.sum()
    _same(r["pixel_acc"], np.diag(conf).sum() / total * 100 if total else np.nan, "pixel_acc")


@given(data=st.data())
def test_fuzz_temporal_consistency(data):
    d = data.draw
    C = d(st.integers(1, 5), label="num_classes")
    ignore = d(st.sampled_from([255, -1]), label="ignore_index")
    oof = d(st.booleans(), label="exclude_out_of_frame")
    occl = d(st.booleans(), label="exclude_occluded")
    average = d(st.sampled_from(["present", "all"]), label="average")
    B = d(st.integers(0, 2), label="B")
    H, W = d(st.integers(1, 6), label="H"), d(st.integers(1, 6), label="W")
    fdt = d(dtypes, label="flow dtype")
    fstyle = d(st.sampled_from(["small", "out", "far", "zero", "integer", "half"]), label="flow style")
    use_occ = d(st.booleans(), label="occlusion given")
    seed = d(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randint(0, C, (B, H, W), generator=g)
    p1 = torch.randint(0, C, (B, H, W), generator=g)
    p0[torch.rand(B, H, W, generator=g) < 0.1] = ignore
    p1[torch.rand(B, H, W, generator=g) < 0.1] = ignore
    if fstyle == "half":  # exact .5 positions: rounding half up
        fl = (torch.randint(-4, 5, (B, 2, H, W), generator=g).double() + 0.5).to(fdt)
    else:
        fl = _flow(B, H, W, fdt, fstyle, seed)
    occ = torch.rand(B, H, W, generator=g) < 0.3 if use_occ else None
    m = tcloss.metrics.TemporalConsistency(C, ignore_index=ignore, exclude_out_of_frame=oof,
                                           exclude_occluded=occl, average=average)
    m.update(p0, p1, fl, occ)
    r = m.compute()
    # oracle: nearest warp, half up, in float32 as documented
    f32 = fl.float().numpy()
    conf = np.zeros((C, C), np.int64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                sx = np.floor(np.float32(x) + f32[b, 0, y, x] + np.float32(0.5))
                sy = np.floor(np.float32(y) + f32[b, 1, y, x] + np.float32(0.5))
                inside = np.isfinite(sx) and np.isfinite(sy) and 0 <= sx <= W - 1 and 0 <= sy <= H - 1
                cx = int(min(max(sx, 0), W - 1)) if np.isfinite(sx) else 0
                cy = int(min(max(sy, 0), H - 1)) if np.isfinite(sy) else 0
                a, w = int(p0[b, y, x]), int(p1[b, cy, cx])
                if a == ignore or w == ignore:
                    continue
                if oof and not inside:
                    continue
                if occ is not None and occl and bool(occ[b, y, x]):
                    continue
                conf[a, w] += 1
    iou = _iou(conf)
    total = conf.sum()
    _same(r["iou"], iou * 100, "iou")
    assert r["num_pixels"] == total
    if average == "all":
        tc = np.nan_to_num(iou, nan=0.0).mean() * 100 if total else np.nan
    else:
        present = ~np.isnan(iou)
        tc = iou[present].mean() * 100 if present.any() else np.nan
    _same(r["tc"], tc, "tc")


# ------------------------------------------------------------------------- option values --------
# Invalid values by kind, with the exception the documented convention (tcloss._checks) asks
# for: a wrong type is a TypeError, a value of the right type outside its range a ValueError.

NON_FINITE = [float("nan"), float("inf"), float("-inf"), np.float64("nan")]


def bad_choice(choices):
    return st.one_of(
        st.sampled_from([None, 1, 1.5, True, b"x", ["x"], ("x",)]).map(lambda v: (v, TypeError)),
        st.sampled_from(["", "unknown", "auto ", " none", "NONE", "Mean", "prob\x00", "🙂"])
        .filter(lambda v: v not in choices).map(lambda v: (v, ValueError)))


def bad_bool():
    return st.sampled_from(["false", "true", "False", "", 0, 1, 0.0, None, [], torch.tensor(True)]) \
        .map(lambda v: (v, TypeError))


def bad_real(minimum=None, strict=False):
    wrong = st.sampled_from(["1", "2.0", None, True, False, 1 + 0j, [1.0], torch.tensor(1.0)]).map(lambda v: (v, TypeError))
    out = [wrong, st.sampled_from(NON_FINITE).map(lambda v: (v, ValueError))]
    if minimum is not None:
        below = st.floats(max_value=minimum, allow_nan=False, allow_infinity=False, exclude_max=not strict)
        out.append(st.one_of(below, st.sampled_from([-1, minimum - 1])).filter(lambda v: v < minimum or (strict and v == minimum))
                   .map(lambda v: (v, ValueError)))
    return st.one_of(*out)


def bad_positive_int():
    return st.one_of(st.sampled_from(["3", 2.0, 3.5, None, True, [2]]).map(lambda v: (v, TypeError)),
                     st.integers(max_value=0).map(lambda v: (v, ValueError)))


BACKEND_CHOICES = ("auto",) + _backends.BACKENDS


def _tl_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 3, 4, 5, generator=g), torch.randn(1, 3, 4, 5, generator=g),
            torch.randn(1, 2, 4, 5, generator=g), torch.rand(1, 3, 4, 5, generator=g),
            torch.rand(1, 3, 4, 5, generator=g))


def _pw_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 6, generator=g), torch.randn(1, 4, 6, generator=g)


TL_OPTS = {"on": bad_choice(("prob", "logit")), "mask_mode": bad_choice(TL.MASK_MODES),
           "padding": bad_choice(TL.PADDINGS), "reduction": bad_choice(TL.REDUCTIONS),
           "mask_power": bad_real(0), "detach_target": bad_bool(), "backend": bad_choice(BACKEND_CHOICES)}
PW_OPTS = {"loss": bad_choice(PW.LOSSES), "algorithm": bad_choice(PW.ALGORITHMS),
           "temperature": bad_real(0, strict=True), "eps": bad_real(0), "detach_norm": bad_bool(),
           "backend": bad_choice(BACKEND_CHOICES)}


def _entry_points():
    """name -> (callable(**options), {option: invalid-value strategy})."""
    tl, pw = _tl_inputs(), _pw_inputs()
    g = torch.Generator().manual_seed(1)
    gates, c = torch.randn(1, 8, 3, 3, generator=g), torch.randn(1, 2, 3, 3, generator=g)
    x, fl = torch.randn(1, 2, 4, 5, generator=g), torch.randn(1, 2, 4, 5, generator=g)
    return {
        "temporal_loss": (lambda **kw: tcloss.temporal_loss(*tl, **kw), TL_OPTS),
        "nn.TemporalLoss": (lambda **kw: tcloss.nn.TemporalLoss(**kw)(*tl), TL_OPTS),
        "pairwise_similarity_loss": (lambda **kw: tcloss.pairwise_similarity_loss(*pw, **kw), PW_OPTS),
        "nn.PairwiseSimilarityLoss": (lambda **kw: tcloss.nn.PairwiseSimilarityLoss(**kw)(*pw), PW_OPTS),
        "pixelwise_kd": (lambda **kw: tcloss.pixelwise_kd(x, fl, **kw), {"temperature": bad_real(0, strict=True)}),
        "nn.PixelwiseKD": (lambda **kw: tcloss.nn.PixelwiseKD(**kw)(x, fl), {"temperature": bad_real(0, strict=True)}),
        "convlstm_cell": (lambda **kw: tcloss.convlstm_cell(gates, c, **kw), {"backend": bad_choice(BACKEND_CHOICES)}),
        "flow_warp": (lambda **kw: tcloss.flow_warp(x, fl, **kw), {"padding": bad_choice(TL.PADDINGS)}),
        "occlusion_mask": (lambda **kw: tcloss.occlusion_mask(x, x, fl, **kw),
                           {"mode": bad_choice(TL.MASK_MODES), "padding": bad_choice(TL.PADDINGS)}),
        "nn.ConvLSTMCell": (lambda **kw: tcloss.nn.ConvLSTMCell(**{"in_channels": 1, "hidden_channels": 2, **kw}),
                            {"in_channels": bad_positive_int(), "hidden_channels": bad_positive_int(),
                             # a list / tuple of the wrong length is a ValueError of nn._pair
                             "kernel_size": st.one_of(bad_positive_int().filter(lambda v: not isinstance(v[0], list)),
                                                      st.sampled_from([(2, ValueError), (4, ValueError), ([2], ValueError),
                                                                       ((3, 3, 3), ValueError)])),
                             "peephole": bad_bool(), "bias": bad_bool(), "backend": bad_choice(BACKEND_CHOICES)}),
        "nn.ConvLSTM": (lambda **kw: tcloss.nn.ConvLSTM(**{"in_channels": 1, "hidden_channels": 2, **kw}),
                        {"peephole": bad_bool(), "bias": bad_bool(), "backend": bad_choice(BACKEND_CHOICES),
                         "spatial_size": st.sampled_from([((0, 3), ValueError), (("3", 3), TypeError),
                                                          ((3, 3, 3), ValueError), ((2.5, 3), TypeError)])}),
        "nn.MultiFrameDistillation": (lambda **kw: tcloss.nn.MultiFrameDistillation(**kw),
                                      {"regularizer": bad_choice(("std", "released", "none")),
                                       "reg_weight": bad_real(0), "reg_margin": bad_real(0),
                                       "eps": bad_real(0, strict=True), "backend": bad_choice(BACKEND_CHOICES),
                                       "hidden_channels": bad_positive_int(),
                                       "clip": st.sampled_from([("0.1", (TypeError, ValueError)),
                                                                ((0.2, 0.1), ValueError), (-0.1, ValueError),
                                                                (float("nan"), ValueError),
                                                                ((float("-inf"), float("nan")), ValueError),
                                                                (True, (TypeError, ValueError))]),
                                       "pool": st.one_of(bad_positive_int().filter(lambda v: not isinstance(v[0], list)
                                                                                   and v[0] is not None),  # None: no pooling
                                                         st.just(((1, 2, 3), ValueError)))}),
        "metrics.SegmentationMetrics": (
            lambda **kw: tcloss.metrics.SegmentationMetrics(**{"num_classes": 3, **kw}),
            {"num_classes": bad_positive_int(),
             "ignore_index": st.one_of(st.sampled_from(["255", 2.0, None, True]).map(lambda v: (v, TypeError)),
                                       st.integers(0, 2).map(lambda v: (v, ValueError)))}),
        "metrics.TemporalConsistency": (
            lambda **kw: tcloss.metrics.TemporalConsistency(**{"num_classes": 3, **kw}),
            {"num_classes": bad_positive_int(), "exclude_out_of_frame": bad_bool(), "exclude_occluded": bad_bool(),
             "average": bad_choice(("present", "all")),
             "ignore_index": st.one_of(st.sampled_from(["255", 2.0, None]).map(lambda v: (v, TypeError)),
                                       st.integers(0, 2).map(lambda v: (v, ValueError)))}),
    }


ENTRY = _entry_points()


@pytest.mark.parametrize("entry", list(ENTRY))
@CHEAP_SETTINGS
@given(data=st.data())
def test_fuzz_bad_option_values(entry, data):
    """One invalid option value: a TypeError / ValueError (per the convention) naming the option;
    never another exception, a crash, or silent acceptance."""
    fn, opts = ENTRY[entry]
    name = data.draw(st.sampled_from(sorted(opts)), label="option")
    value, exc = data.draw(opts[name], label="value")
    with pytest.raises((TypeError, ValueError)) as info:
        fn(**{name: value})
    assert name in str(info.value), f"{entry}({name}={value!r}): message does not name {name!r}: {info.value}"
    assert isinstance(info.value, exc), (f"{entry}({name}={value!r}) raised {type(info.value).__name__}, "
                                         f"expected {exc}: {info.value}")


# valid option values, including numpy scalars: accepted and equal to the plain-Python value

def valid_real(lo, hi):
    return st.one_of(st.floats(lo, hi), st.integers(int(math.ceil(lo)), int(hi)),
                     st.floats(lo, hi).map(np.float64), st.floats(lo, hi).map(np.float32))


@CHEAP_SETTINGS
@given(data=st.data())
def test_fuzz_valid_option_values_temporal(data):
    d = data.draw
    kw = dict(on=d(st.sampled_from(["prob", "logit"])), mask_mode=d(st.sampled_from(TL.MASK_MODES)),
              padding=d(st.sampled_from(TL.PADDINGS)), reduction=d(st.sampled_from(TL.REDUCTIONS)),
              mask_power=d(valid_real(0, 4)), detach_target=d(st.sampled_from([True, False, np.bool_(True)])))
    backend = d(st.sampled_from(["auto", "reference"] + (["cpp"] if HAS_CPP["temporal_loss"] else [])))
    tl = _tl_inputs()
    got = tcloss.temporal_loss(*tl, backend=backend, **kw)
    mod = tcloss.nn.TemporalLoss(backend=backend, **kw)(*tl)
    plain = dict(kw, mask_power=float(kw["mask_power"]), detach_target=bool(kw["detach_target"]))
    want = R.temporal_loss(*(t.double() for t in tl), **plain)
    check_close(got, want, *TOL[torch.float32], "temporal_loss")
    check_close(mod, want, *TOL[torch.float32], "nn.TemporalLoss")


@CHEAP_SETTINGS
@given(data=st.data())
def test_fuzz_valid_option_values_pairwise_kd(data):
    d = data.draw
    loss = d(st.sampled_from(PW.LOSSES))
    algorithm = d(st.sampled_from(["auto", "naive"] + (["gram"] if loss == "mse" else [])))
    kw = dict(loss=loss, algorithm=algorithm, temperature=d(valid_real(0.05, 5).filter(lambda v: v > 0)),
              eps=d(valid_real(0, 1e-3)), detach_norm=d(st.sampled_from([True, False, np.bool_(False)])))
    sa, ta = _pw_inputs()
    got = tcloss.pairwise_similarity_loss(sa, ta, **kw)
    mod = tcloss.nn.PairwiseSimilarityLoss(**kw)(sa, ta)
    want = R.pairwise_similarity_loss(sa.double(), ta.double(), loss=loss, temperature=float(kw["temperature"]),
                                      eps=float(kw["eps"]), detach_norm=bool(kw["detach_norm"]))
    check_close(got, want, *TOL[torch.float32], "pairwise_similarity_loss")
    check_close(mod, want, *TOL[torch.float32], "nn.PairwiseSimilarityLoss")
    tau = d(valid_real(1e-3, 50).filter(lambda v: v > 0), label="kd temperature")
    s, t = sa.reshape(1, 3, 2, 3), ta[:, :3].reshape(1, 3, 2, 3)
    check_close(tcloss.pixelwise_kd(s, t, temperature=tau), _kd64(s.double(), t.double(), float(tau))[0],
                TOL[torch.float32][0] * max(1.0, float(tau) * 5), TOL[torch.float32][1], "pixelwise_kd")


# ------------------------------------------------------------------------- bad tensor arguments --

def _mutations():
    """(entry, argument, how) -> builder of the call; each must raise naming the argument."""
    tl = _tl_inputs()
    TL = ("pred_t", "pred_tk", "flow", "img_t", "img_tk")

    def tl_call(i, bad):
        args = list(tl)
        args[i] = bad
        return lambda: tcloss.temporal_loss(*args, backend="auto")

    out = {}
    for i, n in enumerate(TL):
        t = tl[i]
        out[("temporal_loss", n, "not a tensor")] = (tl_call(i, t.numpy()), TypeError)
        out[("temporal_loss", n, "integer dtype")] = (tl_call(i, t.long()), TypeError)
        out[("temporal_loss", n, "3-d")] = (tl_call(i, t[0]), ValueError)
        out[("temporal_loss", n, "wrong spatial size")] = (tl_call(i, t[..., :-1]), ValueError)
        out[("temporal_loss", n, "wrong batch")] = (tl_call(i, torch.cat([t, t])), ValueError)
    out[("temporal_loss", "flow", "3 channels")] = (tl_call(2, torch.cat([tl[2], tl[2][:, :1]], 1)), ValueError)
    out[("temporal_loss", "pred_t", "no channels")] = (
        lambda: tcloss.temporal_loss(tl[0][:, :0], tl[1][:, :0], *tl[2:]), ValueError)
    out[("temporal_loss", "img_t", "no channels")] = (
        lambda: tcloss.temporal_loss(*tl[:3], tl[3][:, :0], tl[4][:, :0]), ValueError)
    out[("temporal_loss", "img_t", "requires grad")] = (tl_call(3, tl[3].clone().requires_grad_()), ValueError)
    out[("temporal_loss", "H and W", "H = 1")] = (
        lambda: tcloss.temporal_loss(*(t[:, :, :1] for t in tl)), ValueError)
    sa, ta = _pw_inputs()
    out[("pairwise_similarity_loss", "student_a", "empty batch")] = (
        lambda: tcloss.pairwise_similarity_loss(sa[:0], ta[:0]), ValueError)
    out[("pairwise_similarity_loss", "teacher_a", "integer dtype")] = (
        lambda: tcloss.pairwise_similarity_loss(sa, ta.long()), TypeError)
    out[("pairwise_similarity_loss", "teacher_a", "requires grad")] = (
        lambda: tcloss.pairwise_similarity_loss(sa, ta.clone().requires_grad_()), ValueError)
    out[("pairwise_similarity_loss", "student_b", "5-d")] = (
        lambda: tcloss.pairwise_similarity_loss(sa, ta, sa[None, None]), ValueError)
    out[("pairwise_similarity_loss", "teacher_b", "other pixels")] = (
        lambda: tcloss.pairwise_similarity_loss(sa, ta, sa, ta[..., :-1]), ValueError)
    out[("pixelwise_kd", "teacher_logits", "other shape")] = (
        lambda: tcloss.pixelwise_kd(sa, sa[..., :-1]), ValueError)
    out[("pixelwise_kd", "student_logits", "1-d")] = (lambda: tcloss.pixelwise_kd(sa[0, 0], sa[0, 0]), ValueError)
    out[("pixelwise_kd", "teacher_logits", "integer dtype")] = (lambda: tcloss.pixelwise_kd(sa, sa.long()), TypeError)
    out[("pixelwise_kd", "teacher_logits", "requires grad")] = (
        lambda: tcloss.pixelwise_kd(sa, sa.clone().requires_grad_()), ValueError)
    g, c = torch.randn(1, 8, 3, 3), torch.randn(1, 2, 3, 3)
    out[("convlstm_cell", "gates", "channels not 4*Hd")] = (lambda: tcloss.convlstm_cell(g[:, :7], c), ValueError)
    out[("convlstm_cell", "c", "wrong shape")] = (lambda: tcloss.convlstm_cell(g, c[:, :1]), ValueError)
    out[("convlstm_cell", "c", "integer dtype")] = (lambda: tcloss.convlstm_cell(g, c.long()), TypeError)
    out[("convlstm_cell", "peephole", "two weights")] = (
        lambda: tcloss.convlstm_cell(g, c, peephole=(c[0], c[0])), TypeError)
    out[("convlstm_cell", "peephole w_f", "not broadcastable")] = (
        lambda: tcloss.convlstm_cell(g, c, peephole=(c[0], torch.zeros(3, 1, 1), c[0])), ValueError)
    out[("flow_warp", "flow", "wrong shape")] = (lambda: tcloss.flow_warp(c, torch.zeros(1, 2, 3, 2)), ValueError)
    out[("flow_warp", "x", "integer dtype")] = (lambda: tcloss.flow_warp(c.long(), torch.zeros(1, 2, 3, 3)), TypeError)
    out[("occlusion_mask", "img_tk", "other shape")] = (
        lambda: tcloss.occlusion_mask(c, c[:, :1], torch.zeros(1, 2, 3, 3)), ValueError)
    return out


MUTATIONS = _mutations()


@pytest.mark.parametrize("key", list(MUTATIONS), ids=[" / ".join(k) for k in MUTATIONS])
def test_bad_tensor_arguments(key):
    fn, exc = MUTATIONS[key]
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    arg = key[1]
    assert arg in str(info.value), f"{key}: message does not name {arg!r}: {info.value}"
    assert isinstance(info.value, exc), f"{key}: raised {type(info.value).__name__}, expected {exc.__name__}: {info.value}"
