"""How an op reaches a kernel: which backends this install has, and which one a call gets.

Backends: ``reference`` (pure PyTorch, always), ``cpp`` (C++ CPU kernels in ``tcloss._C``),
``cuda`` (CUDA kernels in ``tcloss._C``, when it was built with nvcc), ``triton`` (Triton
kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

``backend="auto"`` picks per device: CUDA tensors -> the preferred of cuda / triton for that op
(its entry in ``OPS``, from GPU measurements) that is available, else reference; CPU tensors ->
cpp if built, else reference. ``TCLOSS_BACKEND`` overrides ``auto``.

One stem per op names everything of it: the public function ``tcloss.<op>``, the glue module
``_backends/<op>.py`` (options, checks, fakes, autograd, PyTorch paths), the Triton module
``_backends/<op>_triton.py``, the native schemas ``tcloss::<op>_fwd/_bwd`` and their kernels in
``csrc/<op>/``, the Triton ops ``tcloss::<op>_{fwd,bwd}_triton``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import warnings

import torch

from .._checks import check_choice

BACKENDS = ("reference", "cpp", "cuda", "triton")

# The registry: every op by its stem (each has a native cpp/cuda and a Triton kernel), with the
# order backend="auto" tries for its CUDA tensors (fastest first, as measured on a GPU: see
# benchmarks/results/). A new op adds one line here (docs/ARCHITECTURE.md: Adding an op).
OPS: dict[str, tuple[str, ...]] = {
    # H200 fwd+bwd, 8x19x512x1024 and 769x769 fp32: cuda 1.75x the reference, triton 1.56-1.62x
    "temporal_loss": ("cuda", "triton"),
    # H200: cuda ahead on the feature path (1.68x vs 0.86x), triton on the MF path (5.0x vs 4.35x)
    "convlstm_cell": ("cuda", "triton"),
    # H200 (2026-11-30, blocked fwd+bwd): triton ahead at every N >= 8192 (kl N=32768 C 19/19: 29.8 vs
    # 43.8 ms before its tiles were tuned), and naive is picked below that
    "pairwise_similarity_loss": ("triton", "cuda"),
}


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What setup.py tried and built (``tcloss/_build_info.json``), or {} for a tree never built
    by it (the file is written by every build of the extension, in place or installed)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _build_errors(info: dict) -> str:
    return "; ".join(info.get("errors", [])) or "no error recorded"


def missing_native_reason(info: dict, installed: bool) -> str:
    """Why ``tcloss._C`` is not there, in plain words, from the build record."""
    fix = "reinstall with a C++ compiler and torch present: pip install --no-build-isolation ."
    if installed:
        return f"tcloss._C is installed but does not load; {fix}"
    if not info:
        return f"tcloss._C was never built here (no build record: TCLOSS_BUILD_EXT=0, or torch was missing at build time); {fix}"
    return f"tcloss._C failed to build ({_build_errors(info)}); {fix}"


def build_warning(info: dict, native_ok: bool, cuda_kernels: bool) -> str | None:
    """The one warning ``import tcloss`` gives when a kernel backend the build attempted is
    missing (None when everything attempted is there, or nothing was recorded)."""
    if not info:
        return None
    if not native_ok:
        return f"tcloss: the native kernels are missing, running on Triton/reference: {missing_native_reason(info, False)}"
    if info.get("cuda_attempted") and not cuda_kernels:
        return (f"tcloss: the CUDA kernels failed to build ({_build_errors(info)}); the cuda backend is missing, "
                f"CUDA tensors run on Triton/reference")
    return None


def warn_if_build_incomplete() -> None:
    """Called once by ``import tcloss``: a RuntimeWarning if a kernel backend the build attempted
    is missing (not when the user disabled the extension)."""
    if os.environ.get("TCLOSS_DISABLE_NATIVE", "0") not in ("", "0"):
        return
    ok = native_status()[0]
    msg = build_warning(build_info(), ok, ok and _has_native_kernel("tcloss::temporal_loss_fwd", "CUDA"))
    if msg:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def native_status() -> tuple[bool, str]:
    """(loaded, reason) for the native extension ``tcloss._C``."""
    if os.environ.get("TCLOSS_DISABLE_NATIVE", "0") not in ("", "0"):
        return False, "disabled by TCLOSS_DISABLE_NATIVE"
    # find the file first: importing a missing _C from inside tcloss's own import reports a
    # misleading "partially initialized module (circular import)"
    if importlib.util.find_spec(f"{__package__.rpartition('.')[0]}._C") is None:
        return False, missing_native_reason(build_info(), installed=False)
    built_for = build_info().get("torch")
    if built_for and built_for != torch.__version__:
        # an extension built against another torch (e.g. by pip's isolated build) breaks on load
        return False, (f"tcloss._C was built against torch {built_for} but this is torch {torch.__version__}; "
                       f"rebuild it against yours: pip install --no-build-isolation --force-reinstall .")
    try:
        from .. import _C  # noqa: F401  (loading registers the ops)
    except ImportError as e:
        return False, f"tcloss._C does not load ({e}); was it built against another torch? " \
                      f"{missing_native_reason(build_info(), installed=True)}"
    except OSError as e:
        return False, f"tcloss._C failed to load ({e}); was it built against another torch?"
    return True, "ok"


def _has_native_kernel(opname: str, key: str) -> bool:
    ok, _ = native_status()
    if not ok:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(opname, key)
    except RuntimeError:
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        return False, f"triton not importable ({e})"
    return True, "ok"


def backend_status(backend: str, op: str, device_type: str) -> tuple[bool, str]:
    """``(available, reason)`` of ``backend`` for ``op`` on tensors of ``device_type`` ("cpu" or
    "cuda") in this install: reason is "ok", or why not in plain words (what
    ``available_backends(verbose=True)`` and ``python -m tcloss`` print)."""
    _check_op(op)
    schema = f"tcloss::{op}_fwd"
    if backend == "reference":
        return True, "ok"
    if backend == "cpp":
        if device_type != "cpu":
            return False, "the cpp backend runs on CPU tensors only"
        ok, why = native_status()
        if not ok:
            return False, why
        return (True, "ok") if _has_native_kernel(schema, "CPU") else (False, f"tcloss._C has no CPU kernel for {op}")
    if backend == "cuda":
        if device_type != "cuda":
            return False, "the cuda backend runs on CUDA tensors only"
        ok, why = native_status()
        if not ok:
            return False, why
        if not _has_native_kernel(schema, "CUDA"):
            info = build_info()
            if info.get("cuda_attempted"):
                return False, f"tcloss._C's CUDA kernels failed to build ({_build_errors(info)})"
            why = info.get("cuda_note") or (_build_errors(info) if info.get("errors") else
                                             "no nvcc or a CPU-only torch at build time")
            return False, f"tcloss._C was built without CUDA kernels ({why})"
        return True, "ok"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if op in _TRITON_IMPORT_ERROR:
            return False, _TRITON_IMPORT_ERROR[op]
        if device_type == "cuda" or (device_type == "cpu" and triton_interpret()):
            return True, "ok"
        return False, "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")


ENV_BACKEND = "TCLOSS_BACKEND"


@torch.compiler.assume_constant_result  # a trace-time decision: keeps torch.compile(fullgraph=True) whole
def resolve(op: str, device: torch.device, backend: str = "auto") -> str:
    """The backend a call of ``op`` on ``device`` runs on; a clear error if unavailable.

    ``backend="auto"`` defers to the environment variable ``TCLOSS_BACKEND`` when it is set;
    a bad value there is reported as that variable's, not as a bad ``backend=`` argument."""
    check_choice("backend", backend, ("auto",) + BACKENDS)
    source = "backend"
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_BACKEND} must be one of {('auto',) + BACKENDS} "
                                 f"(or unset), got {env!r}")
            backend, source = env, f"backend {env!r} (from the environment variable {ENV_BACKEND})"
    _check_op(op)
    dt = device.type
    if backend == "auto":
        order = OPS[op] if dt == "cuda" else ("cpp",)
        for name in order:
            if backend_status(name, op, dt)[0]:
                return name
        return "reference"
    ok, why = backend_status(backend, op, dt)
    if not ok:
        avail = [b for b in BACKENDS if backend_status(b, op, dt)[0]]
        what = f"backend {backend!r}" if source == "backend" else source
        raise RuntimeError(f"{what} is not available for {op} on {dt} tensors: {why}. Available here: {avail}")
    return backend


def available_backends(verbose: bool = False):
    """Backends this install can run, per device kind.

    Returns ``{"cpu": [...], "cuda": [...]}`` (names usable as ``backend=``), or with
    ``verbose=True`` ``{op: {device: {backend: "ok" | reason}}}``.
    """
    devices = ("cpu", "cuda")
    if verbose:
        return {op: {d: {b: backend_status(b, op, d)[1] for b in BACKENDS} for d in devices} for op in OPS}
    out = {}
    for d in devices:
        names = []
        for b in BACKENDS:
            if any(backend_status(b, op, d)[0] for op in OPS):
                names.append(b)
        out[d] = names
    return out


# --- torch.library registration shared by every op's glue module --------------------------------

_REGISTERED: set[str] = set()
# Triton forward ops by op, filled at registration (looked up, not imported, inside traced code:
# torch.compile cannot trace importlib).
_TRITON_FWD: dict[str, object] = {}
# Why an op's Triton module did not import although triton does (an older torch without
# torch.library.triton_op / wrap_triton, say): the triton backend reports this reason.
_TRITON_IMPORT_ERROR: dict[str, str] = {}


def register_ops() -> None:
    """Register every op of ``OPS``: its glue module ``_backends/<op>.py`` registers its fakes and
    autograd (``register()``; called once by ``import tcloss``)."""
    for op in OPS:
        importlib.import_module(f".{op}", __name__).register()


def register_op_pair(op: str, fake_fwd, fake_bwd, make_autograd, *, triton_fakes: bool = False) -> None:
    """Register fake kernels and autograd for the native pair ``tcloss::{op}_fwd/_bwd`` (when
    ``tcloss._C`` has them) and the Triton pair ``tcloss::{op}_{fwd,bwd}_triton`` of module
    ``_backends/{op}_triton.py`` (when Triton imports). ``make_autograd(bwd_op) ->
    (setup_context, backward)``. ``triton_fakes``: give the Triton ops explicit fakes instead of
    traced ones. The bwd ops of every kernel backend refuse double backward with one clear error
    (their kernels are not differentiable). Idempotent."""
    if op in _REGISTERED:
        return
    _REGISTERED.add(op)

    def refuse(ctx, *grads):
        raise RuntimeError(f"tcloss: double backward through {op} is not supported by its kernel backends "
                           f"(cpp, cuda, triton): their backward is not differentiable. For higher-order "
                           f"gradients use backend='reference'.")

    def no_context(ctx, inputs, output):
        pass

    if native_status()[0] and hasattr(torch.ops.tcloss, f"{op}_fwd"):
        torch.library.register_fake(f"tcloss::{op}_fwd")(fake_fwd)
        torch.library.register_fake(f"tcloss::{op}_bwd")(fake_bwd)
        sc, bw = make_autograd(getattr(torch.ops.tcloss, f"{op}_bwd"))
        torch.library.register_autograd(f"tcloss::{op}_fwd", bw, setup_context=sc)
        torch.library.register_autograd(f"tcloss::{op}_bwd", refuse, setup_context=no_context)
    try:
        mod = importlib.import_module(f".{op}_triton", __name__)
    except Exception as e:  # noqa: BLE001 - the backend reports itself unavailable, with this reason
        if triton_status()[0]:
            first = (str(e).splitlines() or [""])[0][:200]
            _TRITON_IMPORT_ERROR[op] = (f"tcloss's Triton kernels for {op} do not load with torch "
                                          f"{torch.__version__} ({type(e).__name__}: {first}); they need a newer "
                                          f"torch (see docs/VERSIONS.md)")
        return
    fwd, bwd = getattr(mod, f"{op}_fwd_triton"), getattr(mod, f"{op}_bwd_triton")
    _TRITON_FWD[op] = fwd
    if triton_fakes:
        fwd.register_fake(fake_fwd)
        bwd.register_fake(fake_bwd)
    sc, bw = make_autograd(bwd)
    fwd.register_autograd(bw, setup_context=sc)
    bwd.register_autograd(refuse, setup_context=no_context)


def fwd_op(op: str, backend: str):
    """The forward op of ``op`` for a kernel backend (``cpp``/``cuda`` share the native op)."""
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.tcloss, f"{op}_fwd")
    if backend == "triton":
        if op not in _TRITON_FWD:
            raise RuntimeError(f"backend 'triton' is not available for {op}: module "
                               f"tcloss._backends.{op}_triton did not import")
        return _TRITON_FWD[op]
    raise ValueError(f"no kernel op for backend {backend!r}")
