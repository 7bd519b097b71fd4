"""Fused ConvLSTM cell (eq. 6 of the supplement), ConvLSTM and multi-frame distillation: every kernel
backend against the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import tcloss
from tcloss import reference as R
from tcloss._backends import pairwise_similarity_loss as PW
from conftest import HAS_CUDA, INTERPRET, TOL, kernel_params

KERNELS = kernel_params("convlstm_cell")
PEEPS = (None, "channel", "position", "mixed")
UPSTREAM = ("h", "c", "both")


def make_inputs(B=2, Hd=3, H=4, W=5, *, peep="channel", dtype=torch.float64, peep_dtype=None, device="cpu", seed=0):
    """gates (B,4Hd,H,W), c (B,Hd,H,W), peephole tuple or None (per channel, per position, or one of each
    kind plus a (1,H,W) per-position-shared weight)."""
    g = torch.Generator().manual_seed(seed)
    gates = torch.randn(B, 4 * Hd, H, W, generator=g, dtype=torch.float64) * 1.5
    c = torch.randn(B, Hd, H, W, generator=g, dtype=torch.float64)
    shapes = {None: None, "channel": [(Hd, 1, 1)] * 3, "position": [(Hd, H, W)] * 3,
              "mixed": [(Hd, 1, 1), (Hd, H, W), (1, H, W)]}[peep]
    pd = peep_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    peephole = None if shapes is None else tuple(
        (torch.randn(s, generator=g, dtype=torch.float64) * 0.7).to(device=device, dtype=pd) for s in shapes)
    return gates.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype), peephole


def upstream_grads(h_shape, upstream, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    gh = torch.randn(h_shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    gc = torch.randn(h_shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return (gh if upstream in ("h", "both") else None), (gc if upstream in ("c", "both") else None)


def cell(backend, gates, c, peephole):
    if backend == "reference":
        return R.convlstm_cell(gates, c, peephole)
    return tcloss.convlstm_cell(gates, c, peephole=peephole, backend=backend)


def run(backend, gates, c, peephole, upstream="both"):
    """(h', c') and the gradients w.r.t. (gates, c, *peephole) of <dh, h'> + <dc, c'>."""
    gates = gates.detach().clone().requires_grad_(True)
    c = c.detach().clone().requires_grad_(True)
    peephole = None if peephole is None else tuple(w.detach().clone().requires_grad_(True) for w in peephole)
    h_new, c_new = cell(backend, gates, c, peephole)
    gh, gc = upstream_grads(h_new.shape, upstream, h_new.dtype, h_new.device)
    outs = [o for o, g in ((h_new, gh), (c_new, gc)) if g is not None]
    gos = [g for g in (gh, gc) if g is not None]
    inputs = (gates, c) + (peephole or ())
    grads = torch.autograd.grad(outs, inputs, gos, allow_unused=True)
    return (h_new.detach(), c_new.detach()), grads


def ref64(gates, c, peephole, upstream="both"):
    cpu64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    return run("reference", cpu64(gates), cpu64(c), None if peephole is None else tuple(map(cpu64, peephole)),
               upstream)


def assert_close(a, b, dtype, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64),
                               atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_against_reference(backend, gates, c, peephole, upstream="both", peep_tol=None):
    dtype = gates.dtype
    outs, grads = run(backend, gates, c, peephole, upstream)
    routs, rgrads = ref64(gates, c, peephole, upstream)
    for name, o, ro in zip(("h_new", "c_new"), outs, routs):
        assert o.dtype == dtype and o.shape == c.shape and o.device == c.device, name
        assert_close(o, ro, dtype, name)
    names = ("grad gates", "grad c", "grad w_i", "grad w_f", "grad w_o")
    inputs = (gates, c) + (peephole or ())
    for name, g, rg, inp in zip(names, grads, rgrads, inputs):
        assert g is not None, name
        if rg is None:  # w_o does not reach c': the reference's autograd reports it unused
            assert name == "grad w_o" and upstream == "c"
            rg = torch.zeros(inp.shape, dtype=torch.float64)
        assert g.dtype == inp.dtype and g.shape == inp.shape, name
        # peephole gradients: float32 sums over batch (and space) of products of low-precision values
        tol = dtype if not name.startswith("grad w") else (peep_tol or inp.dtype)
        assert_close(g, rg, tol, name)


# ---------------------------------------------------------------- exactness (float64) ------------

@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("peep", PEEPS)
@pytest.mark.parametrize("upstream", UPSTREAM)
def test_float64_matches_reference(backend, device, peep, upstream):
    gates, c, p = make_inputs(3, 3, 5, 7, peep=peep, device=device)
    check_against_reference(backend, gates, c, p, upstream)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("peep,upstream", [(None, "both"), ("channel", "h"), ("position", "c"), ("mixed", "both")])
def test_gradcheck(backend, device, peep, upstream):
    gates, c, p = make_inputs(2, 2, 2, 3, peep=peep, device=device, seed=3)
    gh, gc = upstream_grads(c.shape, upstream, torch.float64, device)
    n_p = 0 if p is None else 3

    def f(gates, c, *ws):
        h_new, c_new = tcloss.convlstm_cell(gates, c, peephole=ws if ws else None, backend=backend)
        out = 0
        if gh is not None:
            out = out + (h_new * gh).sum()
        if gc is not None:
            out = out + (c_new * gc).sum()
        return out

    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (gates, c) + (p or ()))
    assert len(inputs) == 2 + n_p
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradcheck_outputs_directly(backend, device):
    """Both outputs as outputs of the checked function (backward gets a None for the unused one)."""
    gates, c, p = make_inputs(1, 1, 2, 2, peep="mixed", device=device, seed=4)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (gates, c) + p)
    f = lambda g, c, *ws: tcloss.convlstm_cell(g, c, peephole=ws, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")


# ---------------------------------------------------------------- dtypes, shapes, layouts --------

@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("peep", [None, "mixed"])
def test_low_precision(backend, device, dtype, peep):
    gates, c, p = make_inputs(2, 4, 6, 9, peep=peep, dtype=dtype, device=device, seed=5)
    check_against_reference(backend, gates, c, p, peep_tol=dtype)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 5, 3), (3, 5, 7, 11), (2, 1, 13, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shapes(backend, device, shape, dtype):
    # float32 runs the CPU kernel's 8-lane path, here with partial (zero-padded) lane groups
    B, Hd, H, W = shape
    gates, c, p = make_inputs(B, Hd, H, W, peep="mixed", dtype=dtype, device=device, seed=6)
    check_against_reference(backend, gates, c, p)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_and_tiny_values(backend, device, dtype):
    """Saturated gates (|a| up to 200, past every exp clamp), and values near 0 where tanh switches
    to its series in the vectorised / Triton math."""
    gates, c, p = make_inputs(2, 3, 5, 7, peep="channel", dtype=dtype, device=device, seed=12)
    perm = torch.randperm(gates.numel(), generator=torch.Generator().manual_seed(0))
    scale = torch.logspace(-9, 2.3, gates.numel(), dtype=torch.float64)[perm].view(gates.shape).to(device)
    gates = (gates.double().sign() * scale).to(dtype)
    c = (c.double() * torch.logspace(-8, 1.5, c.numel(), dtype=torch.float64).view(c.shape).to(device)).to(dtype)
    check_against_reference(backend, gates, c, p)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_many_batch_chunks(backend, device):
    """Few columns, many batch items: the batch is split into chunks whose peephole partials are summed."""
    gates, c, p = make_inputs(37, 1, 2, 3, peep="position", device=device, seed=7)
    check_against_reference(backend, gates, c, p)


@pytest.mark.parametrize("peep", ["channel", "position"])
def test_cpp_gradients_are_the_same_bits_for_any_thread_count(peep):
    """The peephole gradient is summed over batch chunks fixed by the shape alone, not by the
    number of threads: 1, 2 and 4 threads give identical bits (2048 columns and 37 batch items:
    a chunking sized by the thread count would split the batch into 4, 8 or 16 chunks)."""
    if "cpp" not in tcloss.available_backends()["cpu"]:
        pytest.skip("C++ extension not built")
    gates, c, p = make_inputs(37, 2, 32, 32, peep=peep, dtype=torch.float32, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = run("cpp", gates, c, p)
        for n in (2, 4):
            torch.set_num_threads(n)
            again = run("cpp", gates, c, p)
            for a, b in zip(first[0] + first[1], again[0] + again[1]):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_non_contiguous(backend, device):
    gates, c, p = make_inputs(2, 3, 5, 6, peep="mixed", device=device, seed=8)
    big = torch.randn(2, 4 * 3 + 2, 5, 12, dtype=gates.dtype, device=device)
    big[:, 1:-1, :, ::2] = gates
    g_nc = big[:, 1:-1, :, ::2]
    c_nc = c.transpose(2, 3).contiguous().transpose(2, 3)
    w_nc = tuple(w.transpose(-1, -2).contiguous().transpose(-1, -2) for w in p)
    assert not g_nc.is_contiguous() and not c_nc.is_contiguous()
    check_against_reference(backend, g_nc, c_nc, w_nc)
    cl = gates.to(memory_format=torch.channels_last)  # what cuDNN may hand over
    check_against_reference(backend, cl, c, p)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_partial_requires_grad(backend, device):
    gates, c, p = make_inputs(2, 2, 3, 4, peep="channel", device=device, seed=9)
    g = gates.clone().requires_grad_(True)
    h_new, c_new = tcloss.convlstm_cell(g, c, peephole=p, backend=backend)  # c and peepholes are constants
    (dg,) = torch.autograd.grad(h_new.sum() + c_new.sum(), g)
    rg = gates.clone().requires_grad_(True)
    rh, rc = R.convlstm_cell(rg, c, p)
    (rdg,) = torch.autograd.grad(rh.sum() + rc.sum(), rg)
    assert_close(dg, rdg, torch.float64, "grad gates")
    with torch.no_grad():
        h2, _ = tcloss.convlstm_cell(g, c, peephole=p, backend=backend)
    assert not h2.requires_grad
    assert_close(h2, rh, torch.float64, "h_new under no_grad")


@pytest.mark.parametrize("backend,device", KERNELS)
def test_empty_batch(backend, device):
    gates, c, p = make_inputs(0, 2, 3, 4, peep="channel", device=device)
    outs, grads = run(backend, gates, c, p)
    assert outs[0].shape == (0, 2, 3, 4)
    assert grads[2].shape == (2, 1, 1) and torch.all(grads[2] == 0)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("peep", [None, "channel"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_finite_propagates(backend, device, peep, dtype):
    gates, c, p = make_inputs(1, 2, 3, 3, peep=peep, dtype=dtype, device=device, seed=10)
    c[0, 0, 1, 1] = float("inf")
    c[0, 1, 0, 2] = float("nan")
    gates[0, 3, 2, 2] = float("-inf")
    h, cn = tcloss.convlstm_cell(gates, c, peephole=p, backend=backend)
    rh, rc = R.convlstm_cell(gates.cpu().double(), c.cpu().double(), None if p is None else tuple(w.cpu().double() for w in p))
    assert_close(h, rh, dtype, "h_new")
    assert_close(cn, rc, dtype, "c_new")


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference")] + KERNELS)
@pytest.mark.parametrize("peep", [None, "channel"])
def test_huge_cell_state_gradients_are_finite(backend, device, peep):
    """A float32 cell state of +-3e38 with saturated forget gates (a_f = +-200, or w_f c huge):
    d(f c)/df = dC c overflows float32 and the sigmoid's derivative there is 0, which was inf * 0 =
    NaN in every gradient; they are the float64 reference's (0 through the saturated gate)."""
    gates, c, p = make_inputs(1, 2, 3, 4, peep=peep, dtype=torch.float32, device=device, seed=12)
    c[0, 0] = 3e38  # dC c overflows wherever |dC| > 1.2
    c[0, 1, :2] = -3e38
    gates[0, 2:4, 0] = 200.0  # a_f: f = 1
    gates[0, 2:4, 1] = -200.0  # f = 0
    outs, grads = run(backend, gates, c, p)
    assert all(torch.isfinite(g).all() for g in grads), [torch.isfinite(g).all().item() for g in grads]
    check_against_reference(backend, gates, c, p)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_mixed_dtypes_and_autocast(backend, device):
    """fp16 gates (an autocast conv output) with a float32 state: computed and returned in float32."""
    gates, c, p = make_inputs(2, 2, 3, 5, peep="channel", dtype=torch.float32, device=device, seed=11)
    h, cn = tcloss.convlstm_cell(gates.half(), c, peephole=p, backend=backend)
    assert h.dtype == cn.dtype == torch.float32
    rh, rc = R.convlstm_cell(gates.half().double(), c.double(), tuple(w.double() for w in p))
    assert_close(h, rh, torch.float32, "h_new")
    cell_mod = tcloss.nn.ConvLSTMCell(3, 2, backend=backend).to(device)
    x = torch.randn(2, 3, 5, 4, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
        hh, cc = cell_mod(x)
        hh2, cc2 = cell_mod(x, (hh, cc))
    assert cc2.dtype == torch.float32  # the cell state stays float32
    (hh2.float().sum() + cc2.sum()).backward()
    assert cell_mod.conv.weight.grad is not None and cell_mod.w_o.grad is not None


# ---------------------------------------------------------------- modules -------------------------

def unrolled_reference(cell: tcloss.nn.ConvLSTMCell, frames, state=None):
    """ConvLSTM over frames with F.conv2d + reference.convlstm_cell, written out step by step."""
    hs = []
    B, _, H, W = frames[0].shape
    h = frames[0].new_zeros(B, cell.hidden_channels, H, W) if state is None else state[0]
    c = torch.zeros_like(h) if state is None else state[1]
    pad = (cell.kernel_size[0] // 2, cell.kernel_size[1] // 2)
    for x in frames:
        gates = TF.conv2d(torch.cat((x, h), 1), cell.conv.weight, cell.conv.bias, padding=pad)
        h, c = R.convlstm_cell(gates, c, cell.peephole)
        hs.append(h)
    return torch.stack(hs), (h, c)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference")] + KERNELS)
@pytest.mark.parametrize("spatial", [None, (6, 7)])
def test_convlstm_sequence_matches_unrolled_reference(backend, device, spatial):
    torch.manual_seed(0)
    m = tcloss.nn.ConvLSTM(3, 4, kernel_size=3, spatial_size=spatial, backend=backend).double().to(device)
    with torch.no_grad():
        for w in m.cell.peephole:
            w.normal_(0, 0.5)
    seq = torch.randn(5, 2, 3, 6, 7, dtype=torch.float64, device=device, requires_grad=True)
    hs, (h, c) = m(seq)
    assert hs.shape == (5, 2, 4, 6, 7)
    rhs, (rh, rc) = unrolled_reference(m.cell, list(seq.unbind(0)))
    assert_close(hs, rhs, torch.float64, "hidden states")
    assert_close(c, rc, torch.float64, "final c")
    params = [seq] + list(m.parameters())
    grads = torch.autograd.grad(hs.sum() + (c * c).sum(), params)
    rgrads = torch.autograd.grad(rhs.sum() + (rc * rc).sum(), params)
    for g, rg in zip(grads, rgrads):
        assert_close(g, rg, torch.float64, "sequence gradient")
    # a list input gives the same result, and the returned state continues the sequence
    hs2, st = m(list(seq.unbind(0))[:3])
    hs3, _ = m(list(seq.unbind(0))[3:], st)
    assert_close(torch.cat((hs2, hs3)), hs, torch.float64, "split sequence")


def test_convlstm_cell_module_options():
    m = tcloss.nn.ConvLSTMCell(2, 3, kernel_size=(3, 5), peephole=False, bias=False)
    assert m.peephole is None and m.conv.bias is None
    h, c = m(torch.randn(1, 2, 4, 6))
    assert h.shape == c.shape == (1, 3, 4, 6)
    assert "peephole=none" in repr(m)
    m2 = tcloss.nn.ConvLSTMCell(2, 3, spatial_size=(4, 6))
    assert m2.w_i.shape == (3, 4, 6)
    with pytest.raises(ValueError, match="spatial_size"):
        m2(torch.randn(1, 2, 5, 6))


def feats(T=3, B=2, C=6, H=8, W=8, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, H, W, generator=g, **kw) for _ in range(T)]


@pytest.mark.parametrize("regularizer", ["std", "released", "none"])
def test_mf_zero_when_identical_positive_otherwise(regularizer):
    torch.manual_seed(0)
    mf = tcloss.nn.MultiFrameDistillation(hidden_channels=3, pool=4, regularizer=regularizer)
    s = feats(seed=1)
    t = feats(C=10, seed=2)  # the teacher has more channels
    assert mf(s, [x.clone() for x in s]).item() == 0.0
    assert mf(s, t).item() > 0
    # the same through a (T,B,C,H,W) tensor, and the loss is mean (E^T - E^S)^2 of the states
    e_s, e_t = mf.states(torch.stack(s), torch.stack(t))
    assert e_s.shape == (2, 3, 16, 16)
    torch.testing.assert_close(mf(torch.stack(s), torch.stack(t)), (e_t - e_s).pow(2).mean())


def test_mf_similarity_map_definition():
    mf = tcloss.nn.MultiFrameDistillation(pool=None)
    f = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    f[0, :, 1, 2] = 0  # zero vector: eps clamp, no NaN
    (a,) = mf.similarity_maps([f])
    x = f.flatten(2)
    want = torch.einsum("bci,bcj->bij", x, x) / (
        x.norm(dim=1).clamp_min(1e-8)[:, :, None] * x.norm(dim=1).clamp_min(1e-8)[:, None, :])
    assert a.shape == (2, 1, 12, 12)
    torch.testing.assert_close(a[:, 0], want)
    assert torch.isfinite(a).all()


def test_mf_teacher_gets_no_gradient_and_student_does():
    torch.manual_seed(0)
    mf = tcloss.nn.MultiFrameDistillation(hidden_channels=2, pool=(3, 4))
    s = [x.requires_grad_(True) for x in feats(H=6, W=8, seed=3)]
    t = [x.requires_grad_(True) for x in feats(H=9, W=8, seed=4)]  # other size: pooled to the same grid
    mf(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    assert all(p.grad is not None for p in mf.parameters())


def test_mf_regularizer_acts_through_gradient_only():
    torch.manual_seed(0)
    s, t = feats(seed=5), feats(seed=6)
    mf = tcloss.nn.MultiFrameDistillation(hidden_channels=2, pool=4, reg_margin=10.0)  # hinge active
    mf0 = tcloss.nn.MultiFrameDistillation(hidden_channels=2, pool=4, regularizer="none")
    mf0.load_state_dict(mf.state_dict())
    l1, l0 = mf(s, t), mf0(s, t)
    assert l1.item() == l0.item()
    g1 = torch.autograd.grad(l1, mf.convlstm.conv.weight)[0]
    g0 = torch.autograd.grad(l0, mf0.convlstm.conv.weight)[0]
    _, e_t = mf.states(s, t)
    assert mf.regularization(e_t).item() > 0
    assert not torch.allclose(g1, g0)


def test_mf_trains_on_a_toy_problem():
    """A student 1x1 conv learns to reproduce the teacher's self-similarity over 3 frames."""
    torch.manual_seed(0)
    T, B = 3, 2
    frames = [torch.randn(B, 3, 8, 8) for _ in range(T)]
    teacher = torch.nn.Conv2d(3, 8, 1)
    student = torch.nn.Conv2d(3, 4, 1)
    mf = tcloss.nn.MultiFrameDistillation(hidden_channels=2, pool=4, clip=0.5)
    opt = torch.optim.Adam(list(student.parameters()) + list(mf.parameters()), lr=2e-2)
    with torch.no_grad():
        t_feats = [teacher(x) for x in frames]
    losses = []
    for _ in range(25):
        loss = mf([student(x) for x in frames], t_feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mf.clip_()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_mf_clip_bounds_weights():
    mf = tcloss.nn.MultiFrameDistillation(hidden_channels=2, clip=(-0.05, 0.02))
    for p in mf.parameters():  # clamped at construction
        assert p.min() >= -0.05 and p.max() <= 0.02
    with torch.no_grad():
        for p in mf.parameters():
            p.normal_(0, 3)
    assert max(p.abs().max().item() for p in mf.parameters()) > 1
    assert mf.clip_() is mf
    for p in mf.parameters():
        assert p.min() >= -0.05 and p.max() <= 0.02
    free = tcloss.nn.MultiFrameDistillation(clip=None)
    with torch.no_grad():
        free.convlstm.w_i.fill_(5.0)
    free.clip_()
    assert free.convlstm.w_i.max() == 5.0


# ---------------------------------------------------------------- torch.library -------------------

def _native_ok():
    return tcloss.backend_status("cpp", "convlstm_cell", "cpu")[0]


@pytest.mark.skipif(not _native_ok(), reason="tcloss._C has no CPU kernel")
def test_opcheck_native():
    gates, c, p = make_inputs(2, 3, 4, 5, peep="position", dtype=torch.float32)
    peep = torch.stack(p)
    fwd, bwd = torch.ops.tcloss.convlstm_cell_fwd, torch.ops.tcloss.convlstm_cell_bwd
    torch.library.opcheck(fwd, (gates.requires_grad_(), c.requires_grad_(), peep.requires_grad_()))
    torch.library.opcheck(fwd, (gates.detach(), c.detach(), None))
    gh, gc = upstream_grads(c.shape, "both", torch.float32, "cpu")
    torch.library.opcheck(bwd, (gh, gc, gates.detach(), c.detach(), peep.detach(), True))
    torch.library.opcheck(bwd, (None, gc, gates.detach(), c.detach(), None, False))
    torch.library.opcheck(bwd, (gh, None, gates.detach(), c.detach(), peep.detach(), False))


@pytest.mark.triton
@pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_opcheck_triton():
    from tcloss._backends import convlstm_cell_triton as ct
    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    gates, c, p = make_inputs(2, 2, 3, 4, peep="channel", dtype=torch.float32, device=device)
    peep = torch.stack([w.expand(2, 3, 4) for w in p]).contiguous()
    # The interpreter would run the kernel on fake tensors: the fake-tensor check needs a real GPU.
    utils = ("test_schema", "test_autograd_registration") + (() if INTERPRET else ("test_faketensor",))
    torch.library.opcheck(ct.convlstm_cell_fwd_triton, (gates.requires_grad_(), c.requires_grad_(),
                                                         peep.requires_grad_()), test_utils=utils)
    gh, gc = upstream_grads(c.shape, "both", torch.float32, device)
    torch.library.opcheck(ct.convlstm_cell_bwd_triton, (gh, gc, gates.detach(), c.detach(), peep.detach(), True),
                          test_utils=utils)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_torch_compile_fullgraph(backend, device):
    """One ConvLSTM step (conv + fused cell) and its backward under torch.compile(fullgraph=True)."""
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter cannot run under torch.compile's tracing; checked on CUDA")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = tcloss.nn.ConvLSTMCell(2, 3, backend=backend).to(device)
    x = torch.randn(2, 2, 5, 6, device=device)
    c0 = torch.randn(2, 3, 5, 6, device=device)
    h0 = torch.randn(2, 3, 5, 6, device=device)

    def step(x, h0, c0):
        h, c = m(x, (h0, c0))
        return h.sum() + (c * c).mean()

    eager = step(x, h0, c0)
    ge = torch.autograd.grad(eager, m.conv.weight)[0]
    # aot_eager exercises the fake and autograd registrations without a C++ toolchain for inductor
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    out = compiled(x, h0, c0)
    gc = torch.autograd.grad(out, m.conv.weight)[0]
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- errors --------------------------

def _good():
    gates, c, p = make_inputs(2, 3, 4, 5, peep="channel", dtype=torch.float32)
    return {"gates": gates, "c": c, "peephole": p}


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda a: a.update(gates=a["gates"][:, :11]), ValueError, "multiple of 4"),
    (lambda a: a.update(gates=a["gates"][0]), ValueError, "gates must have 4 dimensions"),
    (lambda a: a.update(gates=a["gates"].long()), TypeError, "gates must be a floating-point"),
    (lambda a: a.update(gates="x"), TypeError, "gates must be a torch.Tensor"),
    (lambda a: a.update(c=a["c"][:, :2]), ValueError, r"c must have shape \(B,Hd,h,w\)"),
    (lambda a: a.update(c=a["c"][:1]), ValueError, r"c must have shape \(B,Hd,h,w\)"),
    (lambda a: a.update(peephole=a["peephole"][:2]), TypeError, "peephole must be None or a tuple"),
    (lambda a: a.update(peephole=torch.zeros(3, 3, 1, 1)), TypeError, "peephole must be None or a tuple"),
    (lambda a: a.update(peephole=(torch.zeros(3, 4, 4),) * 3), ValueError, "peephole w_i must be broadcastable"),
    (lambda a: a.update(peephole=(torch.zeros(2, 3, 1, 1),) * 3), ValueError, "peephole w_i must be broadcastable"),
    (lambda a: a.update(peephole=(torch.zeros(3, 1, 1, dtype=torch.int32),) * 3), TypeError, "peephole w_i"),
])
def test_bad_inputs(mutate, exc, msg):
    a = _good()
    mutate(a)
    with pytest.raises(exc, match=msg):
        tcloss.convlstm_cell(a["gates"], a["c"], peephole=a["peephole"])


def test_bad_backend_and_module_options():
    a = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        tcloss.convlstm_cell(a["gates"], a["c"], backend="nope")
    with pytest.raises(RuntimeError, match="not available"):
        tcloss.convlstm_cell(a["gates"], a["c"], backend="cuda")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        tcloss.nn.ConvLSTMCell(2, 3, kernel_size=2)
    with pytest.raises(ValueError, match="hidden_channels must be a positive int"):
        tcloss.nn.ConvLSTMCell(2, 0)
    with pytest.raises(ValueError, match="needs peephole=True"):
        tcloss.nn.ConvLSTMCell(2, 3, peephole=False, spatial_size=(4, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        tcloss.nn.ConvLSTMCell(2, 3, backend="gpu")
    with pytest.raises(ValueError, match="x must have in_channels=2"):
        tcloss.nn.ConvLSTMCell(2, 3)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="state c must have shape"):
        tcloss.nn.ConvLSTMCell(2, 3)(torch.randn(1, 2, 4, 4), (torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5)))
    with pytest.raises(ValueError, match="seq must be a"):
        tcloss.nn.ConvLSTM(2, 3)(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="at least one frame"):
        tcloss.nn.ConvLSTM(2, 3)([])
    with pytest.raises(ValueError, match="clip must be"):
        tcloss.nn.MultiFrameDistillation(clip=(0.1, -0.1))
    with pytest.raises(ValueError, match="regularizer must be one of"):
        tcloss.nn.MultiFrameDistillation(regularizer="l2")
    with pytest.raises(ValueError, match="pool must be"):
        tcloss.nn.MultiFrameDistillation(pool=0)
    mf = tcloss.nn.MultiFrameDistillation(pool=None)
    with pytest.raises(ValueError, match="same number of frames"):
        mf(feats(T=3), feats(T=2))
    with pytest.raises(ValueError, match="set pool"):
        mf(feats(H=8), feats(H=6))
    with pytest.raises(ValueError, match="batch sizes differ"):
        mf(feats(B=2), feats(B=3))
    with pytest.raises(ValueError, match=r"every frame of student_feats"):
        mf([torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 7)], feats(T=2))


# ---------------------------------------------------------------- issue 12: reliability ----------

@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("peep", [None, "channel"])
def test_double_backward_refused(backend, device, peep):
    """The kernels' backward is not differentiable: a second derivative is one clear RuntimeError
    on every kernel backend (the C++ backend returned None, silently)."""
    gates, c, p = make_inputs(1, 2, 3, 4, peep=peep, device=device)
    gates, c = gates.requires_grad_(), c.requires_grad_()
    h, c_new = tcloss.convlstm_cell(gates, c, peephole=p, backend=backend)
    gg, gc = torch.autograd.grad((h * h).sum() + c_new.sum(), (gates, c), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through convlstm_cell is not supported"):
        (gg.pow(2).sum() + gc.sum()).backward()
    # the reference is plain autograd: second derivatives work there
    h, _ = tcloss.convlstm_cell(gates, c, peephole=p, backend="reference")
    (gg,) = torch.autograd.grad((h * h).sum(), gates, create_graph=True)
    gg.pow(2).sum().backward()
    assert gates.grad is not None and torch.isfinite(gates.grad).all()


def test_module_option_types():
    """One set of checks: integral numbers of any kind are accepted, bools and strings refused
    with a TypeError, out-of-range or non-finite values with a ValueError naming the argument."""
    np = pytest.importorskip("numpy")
    cell = tcloss.nn.ConvLSTMCell(np.int64(2), np.int32(3), kernel_size=np.int64(3))
    assert cell.in_channels == 2 and cell.hidden_channels == 3 and type(cell.hidden_channels) is int
    for kw, exc, msg in (
            (dict(peephole="yes"), TypeError, "peephole must be a bool"),
            (dict(bias=1), TypeError, "bias must be a bool"),
            (dict(backend=None), TypeError, "backend must be one of"),
    ):
        with pytest.raises(exc, match=msg):
            tcloss.nn.ConvLSTMCell(2, 3, **kw)
    with pytest.raises(TypeError, match="hidden_channels must be a positive int"):
        tcloss.nn.ConvLSTMCell(2, True)
    with pytest.raises(TypeError, match="in_channels must be a positive int"):
        tcloss.nn.ConvLSTMCell(2.0, 3)
    for kw, exc, msg in (
            (dict(reg_weight=float("inf")), ValueError, "reg_weight must be finite"),
            (dict(reg_margin=float("nan")), ValueError, "reg_margin must be finite"),
            (dict(reg_weight=-1), ValueError, "reg_weight must be a non-negative number"),
            (dict(eps=0), ValueError, "eps must be a positive number"),
            (dict(eps="1e-8"), TypeError, "eps must be a real number"),
            (dict(pool=2.5), TypeError, "pool must be a positive int"),
            (dict(regularizer=None), TypeError, "regularizer must be one of"),
            (dict(backend="gpu"), ValueError, "backend must be one of"),
    ):
        with pytest.raises(exc, match=msg):
            tcloss.nn.MultiFrameDistillation(**kw)


def test_mf_similarity_of_large_finite_features():
    """Features of 1e20 (float32 norm overflows to inf) have the cosine map of the same features
    at unit scale, not an all-zero map."""
    f = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    f = f / f.abs().max()
    want = PW.mf_self_similarity(f.double())
    for sc in (1.0, 1e20, 3e38):
        got = PW.mf_self_similarity(f * sc)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    mf = tcloss.nn.MultiFrameDistillation(pool=None, backend="reference")
    a = mf.similarity_maps([f * 1e20])[0]
    torch.testing.assert_close(a.double(), want.unsqueeze(1), atol=1e-6, rtol=1e-5)
