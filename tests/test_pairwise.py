"""Pair-wise similarity distillation (SF pair-wise / PF, eq. 2): every backend and algorithm
against the naive float64 reference, gradients, dtypes, edge shapes and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

import tcloss
from tcloss import reference as R
from tcloss import backend_status
from tcloss._backends import triton_interpret
from tcloss._backends import pairwise_similarity_loss as pw

from conftest import kernel_params

HAS_CUDA = torch.cuda.is_available()
INTERPRET = triton_interpret()

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
triton_ok = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="triton needs CUDA or TRITON_INTERPRET=1")


def _avail(backend, device):
    return backend_status(backend, "pairwise_similarity_loss", device)[0]


# (backend, device) pairs of the blocked kernels: cpp, triton-interp, cuda, triton-cuda.
KERNELS = kernel_params("pairwise_similarity_loss")


def make(B=2, Cs=5, Ct=7, Na=13, Nb=None, dtype=torch.float64, device="cpu", seed=0, spatial=False):
    g = torch.Generator().manual_seed(seed)
    Nb = Na if Nb is None else Nb

    def t(C, N):
        x = torch.randn(B, C, N, generator=g, dtype=torch.float64)
        if spatial and N % 2 == 0:
            x = x.reshape(B, C, 2, N // 2)
        return x.to(dtype).to(device)

    sa, ta, sb, tb = t(Cs, Na), t(Ct, Na), t(Cs, Nb), t(Ct, Nb)
    return sa.requires_grad_(), ta, sb.requires_grad_(), tb


def ref64(sa, ta, sb, tb, **kw):
    """Naive reference in float64 on the same (possibly low-precision) inputs."""
    d = lambda x: None if x is None else x.detach().double().requires_grad_(x.requires_grad)  # noqa: E731
    a, b = d(sa), d(sb)
    loss = R.pairwise_similarity_loss(a, d(ta), b, d(tb), **kw)
    ins = [x for x in (a, b) if x is not None]
    return loss, torch.autograd.grad(loss, ins)


def run(sa, ta, sb, tb, **kw):
    loss = tcloss.pairwise_similarity_loss(sa, ta, sb, tb, **kw)
    ins = [x for x in (sa, sb) if x is not None]
    return loss, torch.autograd.grad(loss, ins)


# ------------------------------------------------------------------------- semantics


def test_naive_reference_matches_definition():
    """A true cosine with eps on each norm (not the released code's swapped norms)."""
    sa, ta, sb, tb = make(B=1, Cs=3, Ct=4, Na=4, Nb=3)
    sa = sa.detach()
    sa[0, :, 1] = 0  # zero vector: cos = 0 thanks to eps
    eps = 1e-8
    S = torch.empty(1, 4, 3, dtype=torch.float64)
    T = torch.empty_like(S)
    for i in range(4):
        for j in range(3):
            x, y = sa[0, :, i], sb[0, :, j].detach()
            S[0, i, j] = x @ y / (max(x.norm(), eps) * max(y.norm(), eps))
            x, y = ta[0, :, i], tb[0, :, j]
            T[0, i, j] = x @ y / (max(x.norm(), eps) * max(y.norm(), eps))
    got = R.pairwise_similarity_loss(sa, ta, sb.detach(), tb)
    torch.testing.assert_close(got, ((S - T) ** 2).mean())
    tau = 0.5
    p, q = torch.softmax(T / tau, -1), torch.softmax(S / tau, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(R.pairwise_similarity_loss(sa, ta, sb.detach(), tb, loss="kl", temperature=tau), kl)


@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("rect", [False, True])
def test_gram_matches_naive_float64(detach_norm, rect):
    sa, ta, sb, tb = make(Na=11, Nb=7 if rect else None)
    if not rect:
        sb = tb = None
    l1, g1 = ref64(sa, ta, sb, tb, detach_norm=detach_norm)
    l2, g2 = run(sa, ta, sb, tb, algorithm="gram", detach_norm=detach_norm)
    torch.testing.assert_close(l2, l1, atol=1e-14, rtol=1e-12)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-10)


def test_gram_cancellation_error_bounded():
    """The three Gram terms cancel when S ~ T: with student = teacher + 1e-3 noise the float64
    contraction keeps the relative error of the loss below 1e-7 even for float32 inputs (a
    float32 Gram would be off by ~10-100 %)."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 16, 24, 24, generator=g)
    s = (t + 1e-3 * torch.randn(t.shape, generator=g)).requires_grad_()
    exact = R.pairwise_similarity_loss(s.detach().double(), t.double())
    got = tcloss.pairwise_similarity_loss(s, t, algorithm="gram")
    assert exact.item() > 0
    assert abs(got.item() - exact.item()) / exact.item() < 1e-7
    # Gradient: same order of accuracy.
    (gg,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_()
    (ge,) = torch.autograd.grad(R.pairwise_similarity_loss(s64, t.double()), s64)
    assert ((gg.double() - ge).norm() / ge.norm()).item() < 1e-5


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_naive_gradcheck(loss):
    sa, ta, sb, tb = make(B=1, Cs=2, Ct=3, Na=4, Nb=3)
    f = lambda a, b: R.pairwise_similarity_loss(a, ta, b, tb, loss=loss, temperature=0.6)  # noqa: E731
    assert torch.autograd.gradcheck(f, (sa, sb))


def test_gram_gradcheck():
    sa, ta, sb, tb = make(B=1, Cs=2, Ct=3, Na=4, Nb=3)
    f = lambda a, b: tcloss.pairwise_similarity_loss(a, ta, b, tb, algorithm="gram")  # noqa: E731
    assert torch.autograd.gradcheck(f, (sa, sb))


# ------------------------------------------------------------------------- blocked kernels


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("shape", ["self", "rect"])
def test_blocked_float64(backend, device, loss, detach_norm, shape):
    """Rectangular N_a != N_b, C_s != C_t, odd N (not a multiple of any tile), batch > 1."""
    if shape == "self":
        sa, ta, _, _ = make(B=2, Cs=5, Ct=3, Na=37, device=device, spatial=False)
        sb = tb = None
    else:
        sa, ta, sb, tb = make(B=2, Cs=3, Ct=6, Na=29, Nb=18, device=device, spatial=True)
    kw = dict(loss=loss, temperature=0.7, detach_norm=detach_norm)
    l_ref, g_ref = ref64(sa, ta, sb, tb, **kw)
    l, g = run(sa, ta, sb, tb, algorithm="blocked", backend=backend, **kw)
    assert l.dtype == torch.float64
    torch.testing.assert_close(l, l_ref, atol=1e-13, rtol=1e-11)
    for a, b in zip(g, g_ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-9)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_blocked_gradcheck(backend, device, loss):
    sa, ta, sb, tb = make(B=1 if backend == "triton" else 2, Cs=2, Ct=3, Na=3, Nb=4, device=device)
    # (detach_norm=True is deliberately not the derivative: checked against the reference above.)
    f = lambda a, b: tcloss.pairwise_similarity_loss(a, ta, b, tb, loss=loss, temperature=1.3,  # noqa: E731
                                                     algorithm="blocked", backend=backend)
    assert torch.autograd.gradcheck(f, (sa, sb))
    # Self-similarity: student_a enters as both rows and columns; autograd adds both gradients.
    f = lambda a: tcloss.pairwise_similarity_loss(a, ta, loss=loss, algorithm="blocked", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (sa,))


TOL = {  # (atol, rtol) of loss and gradients against float64 on the same inputs
    torch.float32: (1e-6, 1e-4),
    torch.float16: (1e-5, 1e-2),
    torch.bfloat16: (1e-4, 2e-2),
}


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_blocked_low_precision(backend, device, dtype, loss):
    small = backend == "triton" and device == "cpu"  # the interpreter is slow
    sa, ta, sb, tb = make(B=2, Cs=8, Ct=16, Na=21 if small else 70, Nb=18 if small else 45, device=device,
                          dtype=dtype)
    kw = dict(loss=loss, temperature=0.5)
    l_ref, g_ref = ref64(sa, ta, sb, tb, **kw)
    l, g = run(sa, ta, sb, tb, algorithm="blocked", backend=backend, **kw)
    assert l.dtype == torch.float32
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(l.double(), l_ref, atol=atol, rtol=rtol)
    for a, b in zip(g, g_ref):
        assert a.dtype == dtype
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, atol=atol + rtol * scale, rtol=rtol)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
@pytest.mark.parametrize("shape", ["self", "rect"])
def test_blocked_many_tiles(backend, device, loss, shape):
    """Several row blocks and column tiles, none full (the CPU kernel: 128 x 256 tiles; its
    backward sums the d A shares of column chunks, float tiles through the SIMD exp): float64
    to ~1e-12 and float32 to its tolerance against the float64 reference."""
    if backend == "triton" and device == "cpu":
        pytest.skip("the interpreter is too slow for N of several tiles")
    Nb = None if shape == "self" else 601
    for dtype in (torch.float64, torch.float32):
        sa, ta, sb, tb = make(B=2, Cs=5, Ct=7, Na=300, Nb=Nb, dtype=dtype, device=device, seed=4)
        if shape == "self":
            sb = tb = None
        kw = dict(loss=loss, temperature=0.3)
        l_ref, g_ref = ref64(sa, ta, sb, tb, **kw)
        l, g = run(sa, ta, sb, tb, algorithm="blocked", backend=backend, **kw)
        atol, rtol = (1e-13, 1e-10) if dtype == torch.float64 else TOL[dtype]
        torch.testing.assert_close(l.double(), l_ref, atol=atol, rtol=rtol)
        for a, b in zip(g, g_ref):
            scale = b.abs().max().item()
            torch.testing.assert_close(a.double(), b, atol=atol + rtol * scale, rtol=rtol)


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_cpp_same_bits_for_any_thread_count(loss):
    """The CPU kernel's sums run in an order fixed by the shape: loss and gradients are bitwise
    equal with 1, 2 and 3 threads (several row blocks and column chunks)."""
    if not _avail("cpp", "cpu"):
        pytest.skip("no cpp backend")
    sa, ta, sb, tb = make(B=1, Cs=6, Ct=9, Na=260, Nb=1300, dtype=torch.float32, seed=5)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            l, g = run(sa, ta, sb, tb, loss=loss, algorithm="blocked", backend="cpp")
            out.append((l, *g))
    finally:
        torch.set_num_threads(before)
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16])
def test_blocked_self_similarity_float16_gradient_beyond_range(backend, device, loss, teacher_dtype):
    """Self-similarity in float16 with a zero feature vector (gradient ~g/eps = -1.2e6 there, kl):
    the kernels return d student_a of the row and of the column side, and autograd added them
    in float16, each already rounded to an inf of its own sign: NaN. The sum is rounded once:
    -inf where the float64 gradient is beyond the float16 range, the float64 value elsewhere.
    A bfloat16 teacher promotes the op to float32: the two sides were converted back to float16
    one by one (the fuzz suite's find), now the one float32 tensor of both sides is."""
    sa = torch.tensor([[[0.0, -0.5869]]], dtype=torch.float16, device=device, requires_grad=True)
    ta = torch.tensor([[[1.3223, 0.5337], [0.1234, 1.2422]]], dtype=teacher_dtype, device=device)
    got = tcloss.pairwise_similarity_loss(sa, ta, loss=loss, algorithm="blocked", backend=backend)
    (g,) = torch.autograd.grad(got, sa)
    s64 = sa.detach().cpu().double().requires_grad_()
    (want,) = torch.autograd.grad(R.pairwise_similarity_loss(s64, ta.cpu().double(), loss=loss), s64)
    assert not torch.isnan(g).any(), g
    torch.testing.assert_close(g.cpu().double(), want.to(torch.float16).double(), atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_blocked_edge_shapes(backend, device):
    """N = 1, C = 1, a zero feature vector (finite thanks to eps), non-contiguous inputs."""
    for loss in ("mse", "kl"):
        # N = 1 on both sides, C = 1
        sa, ta, sb, tb = make(B=1, Cs=1, Ct=1, Na=1, Nb=1, device=device)
        l_ref, g_ref = ref64(sa, ta, sb, tb, loss=loss)
        l, g = run(sa, ta, sb, tb, loss=loss, algorithm="blocked", backend=backend)
        torch.testing.assert_close(l, l_ref)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b)
        # zero vectors in student and teacher
        sa, ta, sb, tb = make(B=2, Cs=1, Ct=3, Na=9, Nb=5, device=device)
        with torch.no_grad():
            sa[0, :, 2] = 0
            sb[1, :, 0] = 0
            ta[1, :, 4] = 0
        l_ref, g_ref = ref64(sa, ta, sb, tb, loss=loss)
        l, g = run(sa, ta, sb, tb, loss=loss, algorithm="blocked", backend=backend)
        assert torch.isfinite(l) and all(torch.isfinite(x).all() for x in g)
        torch.testing.assert_close(l, l_ref)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b)
    # non-contiguous: channels-last-like permutation and a strided slice
    base = torch.randn(2, 6, 5, 4, dtype=torch.float64, device=device)
    sa = base.permute(0, 1, 3, 2).requires_grad_()  # (2,6,4,5) non-contiguous
    ta = torch.randn(2, 12, 4, 5, dtype=torch.float64, device=device)[:, ::2]
    assert not sa.is_contiguous() and not ta.is_contiguous()
    l_ref, g_ref = ref64(sa, ta, None, None, loss="kl")
    l, g = run(sa, ta, None, None, loss="kl", algorithm="blocked", backend=backend)
    torch.testing.assert_close(l, l_ref)
    torch.testing.assert_close(g[0], g_ref[0])


@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck(backend, device):
    sa, ta, sb, tb = make(B=2, Cs=3, Ct=4, Na=7, Nb=5, device=device, dtype=torch.float32)
    sa, sb = sa.detach().requires_grad_(), sb.detach().requires_grad_()
    if backend == "triton":
        from tcloss._backends import pairwise_similarity_loss_triton as pt
        op = pt.pairwise_similarity_loss_fwd_triton
    else:
        op = torch.ops.tcloss.pairwise_similarity_loss_fwd.default
    # The Triton interpreter cannot run kernels on the functional tensors of aot_dispatch: on CPU
    # only the schema/fake/autograd-registration checks; everything on a GPU.
    utils = ("test_schema", "test_faketensor", "test_autograd_registration") if (
        backend == "triton" and device == "cpu") else None
    extra = ("ieee",) if backend == "triton" else ()  # the Triton ops' precision
    for loss in (0, 1):
        torch.library.opcheck(op, (sa, ta, sb, tb, loss, 0.8, 1e-8, False, *extra),
                              **({"test_utils": utils} if utils else {}))
    if backend == "triton":  # self-similarity: student_b = teacher_b = None
        torch.library.opcheck(op, (sa, ta, None, None, 1, 0.8, 1e-8, False, "tf32"),
                              **({"test_utils": utils} if utils else {}))
    _, stats = op(sa, ta, sb, tb, 1, 0.8, 1e-8, False, *extra)
    g = torch.ones((), device=device)
    if backend == "triton":
        bwd = pt.pairwise_similarity_loss_bwd_triton
    else:
        bwd = torch.ops.tcloss.pairwise_similarity_loss_bwd.default
    torch.library.opcheck(bwd,
                          (g, sa.detach(), ta, sb.detach(), tb, stats, 1, 0.8, 1e-8, False, *extra, True, True),
                          test_utils=("test_schema", "test_faketensor"))  # bwd: its autograd only refuses


@pytest.mark.skipif(not _avail("cpp", "cpu"), reason="tcloss._C not built")
def test_torch_compile_fullgraph():
    sa, ta, sb, tb = make(B=1, Cs=2, Ct=3, Na=6, Nb=4, dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(a, t, b, u):
        return tcloss.pairwise_similarity_loss(a, t, b, u, loss="kl", algorithm="blocked", backend="cpp")

    l = f(sa, ta, sb, tb)
    l.backward()
    l_ref, g_ref = ref64(sa, ta, sb, tb, loss="kl")
    torch.testing.assert_close(l.double(), l_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sa.grad.double(), g_ref[0], atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------- API


def test_auto_algorithm_rule():
    """The measured CPU rule (benchmarks/results/cpu/pairwise_auto.md) and the GPU one."""
    choose = pw.choose_algorithm
    assert choose("auto", "mse", "cpp", "cpu", 2304, 2304, 19, 19) == "gram"
    assert choose("auto", "mse", "cpp", "cpu", 2304, 2304, 128, 512) == "gram"
    assert choose("auto", "mse", "cpp", "cpu", 1024, 1024, 128, 512) == "naive"
    assert choose("auto", "mse", "cpp", "cpu", 576, 576, 128, 512) == "naive"  # gram 1.4x behind there
    assert choose("auto", "mse", "cpp", "cpu", 256, 256, 64, 64) == "naive"
    # GPU (benchmarks/results/NVIDIA_H200/pairwise/bench.md)
    assert choose("auto", "mse", "triton", "cuda", 2304, 2304, 128, 512) == "naive"
    assert choose("auto", "kl", "triton", "cuda", 2304, 2304, 19, 19) == "naive"
    assert choose("auto", "mse", "triton", "cuda", 8192, 8192, 19, 19) == "gram"
    assert choose("auto", "mse", "triton", "cuda", 8192, 8192, 128, 512) == "gram"
    assert choose("auto", "kl", "triton", "cuda", 8192, 8192, 19, 19) == "blocked"
    assert choose("auto", "kl", "triton", "cuda", 8192, 8192, 128, 512) == "naive"  # naive 2.4x ahead (ieee)
    assert choose("auto", "kl", "triton", "cuda", 8192, 8192, 128, 512, precision="bf16") == "blocked"
    assert choose("auto", "kl", "triton", "cuda", 8192, 8192, 128, 512, B=4) == "naive"  # 2^28 pairs
    assert choose("auto", "kl", "triton", "cuda", 8192, 8192, 128, 512, B=5) == "blocked"  # maps > 2^28 pairs
    assert choose("auto", "kl", "triton", "cuda", 32768, 32768, 128, 512) == "blocked"
    assert choose("auto", "kl", "triton", "cuda", 4096, 4096, 19, 19, B=32) == "blocked"  # small maps, but 32 of them
    assert choose("auto", "mse", "triton", "cuda", 4096, 4096, 19, 19, B=32) == "gram"
    assert choose("auto", "kl", "reference", "cuda", 32768, 32768, 19, 19) == "naive"
    assert choose("auto", "kl", "cpp", "cpu", 2304, 2304, 19, 19) == "blocked"
    assert choose("auto", "kl", "cpp", "cpu", 576, 576, 19, 19) == "blocked"
    assert choose("auto", "kl", "cpp", "cpu", 256, 256, 19, 19) == "naive"
    assert choose("auto", "kl", "cpp", "cpu", 576, 576, 64, 64) == "naive"
    assert choose("auto", "kl", "cpp", "cpu", 1024, 1024, 64, 64) == "blocked"
    assert choose("auto", "kl", "cpp", "cpu", 1024, 1024, 128, 512) == "naive"
    assert choose("auto", "kl", "cpp", "cpu", 2304, 2304, 128, 512) == "blocked"
    assert choose("auto", "kl", "reference", "cpu", 2304, 2304, 19, 19) == "naive"
    assert choose("naive", "mse", "cpp", "cpu", 2304, 2304, 19, 19) == "naive"


def test_auto_matches_reference_both_losses():
    sa, ta, sb, tb = make(Na=40, Nb=30, Cs=4, Ct=4)
    for loss in ("mse", "kl"):
        l_ref, g_ref = ref64(sa, ta, sb, tb, loss=loss)
        l, g = run(sa, ta, sb, tb, loss=loss)
        torch.testing.assert_close(l, l_ref)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b)


def test_nn_module_and_mixed_dtypes():
    m = tcloss.nn.PairwiseSimilarityLoss(loss="kl", temperature=0.5)
    assert "kl" in repr(m)
    sa, ta, sb, tb = make(dtype=torch.float32)
    l = m(sa, ta.half(), sb, tb.half())  # an fp16 teacher: computed in float32
    l_ref, _ = ref64(sa, ta.half(), sb, tb.half(), loss="kl", temperature=0.5)
    torch.testing.assert_close(l.double(), l_ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="loss"):
        tcloss.nn.PairwiseSimilarityLoss(loss="l1")
    with pytest.raises(ValueError, match="gram"):
        tcloss.nn.PairwiseSimilarityLoss(loss="kl", algorithm="gram")
    with pytest.raises(ValueError, match="temperature"):
        tcloss.nn.PairwiseSimilarityLoss(temperature=0)


def test_bad_inputs():
    sa, ta, sb, tb = make()
    f = tcloss.pairwise_similarity_loss
    with pytest.raises(ValueError, match="batch"):
        f(sa, ta[:1])
    with pytest.raises(ValueError, match="teacher_a must have the pixels"):
        f(sa, ta[..., :-1])
    with pytest.raises(ValueError, match="teacher_b must have the pixels"):
        f(sa, ta, sb, tb[..., :-1])
    with pytest.raises(ValueError, match="channels"):
        f(sa, ta, sb[:, :-1], tb)
    with pytest.raises(ValueError, match=r"\(B,C,H,W\) or \(B,C,N\)"):
        f(sa[0], ta[0])
    with pytest.raises(TypeError, match="floating"):
        f(sa, ta.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        f(sa, 3.0)
    with pytest.raises(ValueError, match="requires grad"):
        f(sa, ta.clone().requires_grad_())
    with pytest.raises(ValueError, match="loss"):
        f(sa, ta, loss="l2")
    with pytest.raises(ValueError, match="algorithm"):
        f(sa, ta, algorithm="fast")
    with pytest.raises(ValueError, match="only"):
        f(sa, ta, loss="kl", algorithm="gram")
    with pytest.raises(ValueError, match="temperature"):
        f(sa, ta, temperature=-1.0)
    with pytest.raises(ValueError, match="eps"):
        f(sa, ta, eps=-1.0)
    with pytest.raises(ValueError, match="kernel backend"):
        f(sa, ta, algorithm="blocked", backend="reference")
    with pytest.raises(ValueError, match="backend"):
        f(sa, ta, backend="nope")


def test_pixelwise_kd():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64)
    tau = 2.0
    got = tcloss.pixelwise_kd(s, t, temperature=tau)
    ls = torch.log_softmax(s / tau, 1).permute(0, 2, 3, 1).reshape(-1, 5)
    lt = torch.log_softmax(t / tau, 1).permute(0, 2, 3, 1).reshape(-1, 5)
    want = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="batchmean") * tau**2
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda x: tcloss.pixelwise_kd(x, t, temperature=tau), (s,))
    m = tcloss.nn.PixelwiseKD(temperature=tau)
    torch.testing.assert_close(m(s, t), want)
    with pytest.raises(ValueError, match="shape"):
        tcloss.pixelwise_kd(s, t[:, :4])
    with pytest.raises(ValueError, match="requires grad"):
        tcloss.pixelwise_kd(s, t.clone().requires_grad_())
    with pytest.raises(ValueError, match="temperature"):
        tcloss.nn.PixelwiseKD(temperature=0.0)
    assert math.isfinite(tcloss.pixelwise_kd(s.float(), t.float()).item())


# ------------------------------------------------------------------------- issue 12: reliability


def _unit_scale_inputs(dtype, device="cpu"):
    """Inputs whose largest magnitude is exactly 1 (so any scale up to the dtype's max is finite)."""
    sa, ta, sb, tb = make(B=2, Cs=4, Ct=5, Na=9, Nb=7, seed=3)
    out = []
    for x in (sa, ta, sb, tb):
        x = x.detach()
        out.append((x / x.abs().max()).to(dtype).to(device))
    return out


BIG = {torch.float32: (1e20, 3e38), torch.float64: (1e20, 1e200, 1e300)}


def _check_large_features(run_kw, dtype, device="cpu"):
    """Large finite features have the cosines of the same features at unit scale: the norm is
    taken of power-of-two-scaled rows, never overflowing (it was inf -> zero vectors)."""
    sa, ta, sb, tb = _unit_scale_inputs(dtype, device)
    for loss in ("mse", "kl"):
        if loss == "kl" and run_kw.get("algorithm") == "gram":
            continue
        l_ref, g_ref = ref64(sa.requires_grad_(), ta, sb.requires_grad_(), tb, loss=loss)
        for sc in BIG[dtype]:
            a = (sa.detach() * sc).requires_grad_()
            b = (sb.detach() * sc).requires_grad_()
            assert torch.isfinite(a).all() and torch.isfinite(b).all()
            l, g = run(a, ta * sc, b, tb * sc, loss=loss, **run_kw)
            assert torch.isfinite(l), (loss, sc)
            torch.testing.assert_close(l.double(), l_ref, atol=1e-6, rtol=1e-5, msg=f"{loss} x{sc}")
            for x, y in zip(g, g_ref):  # d/d(sc x) = (d/dx) / sc
                assert torch.isfinite(x).all()
                # float32 gradients of 3e38-features are ~1e-40, subnormal: ~17 significant bits
                torch.testing.assert_close(x.double() * sc, y, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_large_finite_features(backend, device, dtype):
    _check_large_features(dict(algorithm="blocked", backend=backend), dtype, device)


@pytest.mark.parametrize("algorithm", ["naive", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_large_finite_features(algorithm, dtype):
    _check_large_features(dict(algorithm=algorithm, backend="reference"), dtype)


def test_normalization_bits_unchanged_for_ordinary_features():
    """The power-of-two scale changes nothing for ordinary features: the unit rows have the bits
    of x / max(|x|, eps), and tiny vectors (|x| < eps) are still x / eps."""
    x = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(2))
    x[0, :, 3] *= 1e-12  # below eps
    x[1, :, 4] = 0
    xt = x.transpose(1, 2)
    plain = xt / torch.linalg.vector_norm(xt, dim=2, keepdim=True).clamp_min(1e-8)
    assert torch.equal(R.pairwise_normalize(x, 1e-8), plain)
    s, iv, full = pw.row_scales(x, 1e-8, False, torch.float32).unbind(1)  # the kernels' x s iv
    torch.testing.assert_close((x * s[:, None] * iv[:, None]).transpose(1, 2), plain, rtol=2e-7, atol=0)
    assert full[0, 3] == 0 and full[1, 4] == 0 and full[0, 2] == 1


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_double_backward_refused(backend, device, loss):
    """The blocked kernels' backward is not differentiable: differentiating the gradient again is
    one clear RuntimeError (not an internal ATen / register_autograd message)."""
    sa, ta, sb, tb = make(B=1, Cs=3, Ct=4, Na=6, Nb=5, device=device)
    l = tcloss.pairwise_similarity_loss(sa, ta, sb, tb, loss=loss, algorithm="blocked", backend=backend)
    ga, = torch.autograd.grad(l, sa, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through pairwise_similarity_loss is not supported"):
        ga.sum().backward()
    # the reference (naive) supports it
    l = tcloss.pairwise_similarity_loss(sa.cpu(), ta.cpu(), loss=loss, algorithm="naive", backend="reference")
    ga, = torch.autograd.grad(l, sa, create_graph=True)
    ga.pow(2).sum().backward()


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(detach_norm="false"), TypeError, "detach_norm must be a bool"),
    (dict(detach_norm=1), TypeError, "detach_norm must be a bool"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature="2"), TypeError, "temperature must be a real number"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(eps=float("inf")), ValueError, "eps must be finite"),
    (dict(eps=-1e-9), ValueError, "eps must be a non-negative number"),
    (dict(loss=None), TypeError, "loss must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend=1), TypeError, "backend must be one of"),
    (dict(precision="fp16"), ValueError, r"precision must be one of \('ieee', 'tf32', 'bf16'\)"),
    (dict(precision=None), TypeError, "precision must be one of"),
])
def test_bad_options_function_and_module_alike(kw, exc, msg):
    """Every option is checked by the same helper in the function and in the module's __init__."""
    sa, ta, sb, tb = make()
    with pytest.raises(exc, match=msg):
        tcloss.pairwise_similarity_loss(sa, ta, **kw)
    with pytest.raises(exc, match=msg):
        tcloss.nn.PairwiseSimilarityLoss(**kw)


def test_native_op_refuses_non_finite_options():
    if not _avail("cpp", "cpu"):
        pytest.skip("tcloss._C not built")
    sa, ta, sb, tb = (x.detach() for x in make())
    op = torch.ops.tcloss.pairwise_similarity_loss_fwd
    with pytest.raises(RuntimeError, match="temperature must be a finite positive"):
        op(sa, ta, sb, tb, 1, float("inf"), 1e-8, False)
    with pytest.raises(RuntimeError, match="eps must be a finite non-negative"):
        op(sa, ta, sb, tb, 0, 1.0, float("nan"), False)


# pixel-wise KD

def _kd64(s, t, tau):
    """tau^2 mean_pixels sum_{c: p_c > 0} p_c (log p_c - log q_c), in float64 on the given values."""
    s, t = s.double(), t.double()
    logq = torch.log_softmax(s / tau, 1)
    logp = torch.log_softmax(t / tau, 1)
    p = logp.exp()
    terms = p * (logp - logq)
    terms = torch.where(p > 0, terms, torch.zeros_like(terms))
    return terms.sum(1).mean() * tau * tau


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 0.25, 4.0])
def test_pixelwise_kd_masked_teacher_class_is_finite(dtype, tau):
    """A teacher class masked with -inf has p = 0 and contributes 0 log 0 = 0: the loss and the
    student gradient are finite (they were NaN) and equal the KL over the other classes."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    t[:, 1] = float("-inf")          # a class masked everywhere
    t[0, 3, 1, 2] = float("-inf")    # and one at a single pixel
    s = s.to(dtype).requires_grad_()
    t = t.to(dtype)
    got = tcloss.pixelwise_kd(s, t, temperature=tau)
    (gs,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_()
    want = _kd64(s64, t, tau)
    (gw,) = torch.autograd.grad(want, s64)
    assert torch.isfinite(got) and torch.isfinite(gs).all()
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(gs.double(), gw, **tol)
    assert torch.isfinite(tcloss.nn.PixelwiseKD(temperature=tau)(s, t))


@pytest.mark.parametrize("tau", [1.0, 0.1, 1e-3])
def test_pixelwise_kd_large_finite_logits(tau):
    """float32 logits of +-3e38 (teacher: probabilities that underflow to 0; student: logits / tau
    beyond the float32 range, a sum of per-pixel KLs beyond it) give the float64 result on the
    same values, not NaN or inf."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 4, 6, generator=g)
    t = torch.randn(2, 4, 6, generator=g)
    t[:, 0] = 3e38
    t[:, 2] = -3e38
    s[0, 1] = 3e38 * 0.5             # dominant student class, its gap / tau overflows float32
    got = tcloss.pixelwise_kd(s, t, temperature=tau)
    want = _kd64(s, t, tau)  # ~7.5e37 * tau: representable, though tau^2 KL / pixel is not always
    assert math.isfinite(want.item()) and math.isfinite(got.item())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    # where every term fits float32 the result is finite and equal
    s2 = torch.randn(2, 4, 6, generator=g) * 1e3
    got = tcloss.pixelwise_kd(s2, t, temperature=tau)
    want = _kd64(s2, t, tau)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tau", [1.0, 0.25, 0.5])
def test_pixelwise_kd_logit_gap_beyond_float32(tau):
    """Student logits of +3e38 and -3e38 at one pixel: the gap z - max (-6e38) and the
    log-probability difference overflowed float32 (the loss was inf), though tau^2 KL (~1.8e38
    tau for a teacher mass of 0.3 on the -3e38 class) is finite; it is the float64 value on the
    same inputs, with a finite gradient."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(1, 3, 4, generator=g)
    t = torch.randn(1, 3, 4, generator=g)
    s[0, 0, :2] = 3.05e38
    s[0, 2, :2] = -3.05e38
    s.requires_grad_()
    got = tcloss.pixelwise_kd(s, t, temperature=tau)
    (gs,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_()
    want = _kd64(s64, t.double(), tau)
    (gw,) = torch.autograd.grad(want, s64)
    assert want.item() < 3e38 and torch.isfinite(got), (got, want)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(gs).all()
    torch.testing.assert_close(gs.double(), gw, atol=1e-5, rtol=1e-4)


def test_pixelwise_kd_options_and_empty_batch():
    s = torch.randn(2, 3, 4)
    for kw, exc, msg in ((dict(temperature=float("inf")), ValueError, "temperature must be finite"),
                         (dict(temperature=0), ValueError, "temperature must be a positive number"),
                         (dict(temperature="1"), TypeError, "temperature must be a real number")):
        with pytest.raises(exc, match=msg):
            tcloss.pixelwise_kd(s, s, **kw)
        with pytest.raises(exc, match=msg):
            tcloss.nn.PixelwiseKD(**kw)
    # the mean over no pixels is NaN, as torch.mean (and the temporal loss's reduction="mean")
    assert torch.isnan(tcloss.pixelwise_kd(s[:0], s[:0]))


# ------------------------------------------------------------------------- precision, one-pass backward

# precision -> (loss, gradient) bound relative to float64 (the gradient's as a fraction of its
# largest entry). Measured under the interpreter, which emulates the tensor cores' operand
# rounding (tcloss._backends.pairwise_similarity_loss_triton._mma; TF32 truncated, the worst case), at C 5/3 to
# 64/32, N 20-33, tau 1 and 0.1: ieee <= 6e-6 / 2e-6 (the float32 KL cancellation: the exact
# cpp kernel shows the same 5.7e-6), tf32 <= 3.8e-3 / 3.4e-3, bf16 <= 3.0e-2 / 2.5e-2.
PRECISION_BOUND = {"ieee": (1e-5, 1e-4), "tf32": (1e-2, 1e-2), "bf16": (1e-1, 1e-1)}


def _rel_errors(l, g, l_ref, g_ref):
    el = abs(l.double() - l_ref).item() / abs(l_ref).item()
    eg = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(g, g_ref))
    return el, eg


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_precision_accuracy(backend, device, precision, loss):
    """Each precision against the float64 naive reference on float32 inputs; the native kernels
    are exact at every precision (allowed: precision is the least accuracy accepted)."""
    for shape in ("self", "rect"):
        sa, ta, sb, tb = make(B=2, Cs=64, Ct=32, Na=33, Nb=33 if shape == "self" else 20, device=device,
                              dtype=torch.float32, seed=1)
        if shape == "self":
            sb = tb = None
        kw = dict(loss=loss, temperature=0.1 if loss == "kl" else 1.0)
        l_ref, g_ref = ref64(sa, ta, sb, tb, **kw)
        l, g = run(sa, ta, sb, tb, algorithm="blocked", backend=backend, precision=precision, **kw)
        bound = PRECISION_BOUND[precision if backend == "triton" else "ieee"]
        el, eg = _rel_errors(l, g, l_ref, g_ref)
        assert el <= bound[0] and eg <= bound[1], (shape, el, eg)
        if backend == "triton" and precision != "ieee":
            assert el > 1e-5 or eg > 1e-5  # the rounding is really there (emulated or on tensor cores)


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_precision_ignored_where_exact(precision):
    """naive, gram and float64 inputs compute exactly whatever precision is asked."""
    sa, ta, sb, tb = make(dtype=torch.float64)
    for alg in ("naive", "gram"):
        l_ref, g_ref = ref64(sa, ta, sb, tb)
        l, g = run(sa, ta, sb, tb, algorithm=alg, backend="reference", precision=precision)
        torch.testing.assert_close(l, l_ref)


def test_auto_backend_on_cuda_prefers_triton():
    """backend="auto" on CUDA tensors takes triton first: faster than the cuda kernel on the H200
    at every N >= 8192, and the only tensor-core tiles (a precision below ieee reaches them)."""
    from tcloss._backends import OPS
    assert OPS["pairwise_similarity_loss"][0] == "triton"


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_blocked_one_side_gradient(backend, device, loss):
    """Only d student_a (the backward owns row blocks, no tickets) or only d student_b (no
    row-side accumulation) asked."""
    sa, ta, sb, tb = make(B=2, Cs=3, Ct=5, Na=19, Nb=23, device=device)
    l_ref, g_ref = ref64(sa, ta, sb, tb, loss=loss, temperature=0.6)
    for a, b, want in ((sa, sb.detach(), 0), (sa.detach(), sb, 1)):
        l = tcloss.pairwise_similarity_loss(a, ta, b, tb, loss=loss, temperature=0.6, algorithm="blocked",
                                            backend=backend)
        g, = torch.autograd.grad(l, (a, b)[want])
        torch.testing.assert_close(g, g_ref[want], atol=1e-13, rtol=1e-9)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("self_sim", [False, True])
def test_blocked_deterministic(backend, device, self_sim):
    """Two runs give identical bits (the Triton backward adds the row side in a fixed order)."""
    sa, ta, sb, tb = make(B=2, Cs=6, Ct=4, Na=37, Nb=21, device=device, dtype=torch.float32)
    if self_sim:
        sb = tb = None
    outs = [run(sa, ta, sb, tb, loss="kl", temperature=0.5, algorithm="blocked", backend=backend) for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)
