"""The install's self-report: `python -m tcloss`, the build record (tcloss/_build_info.json) and
the reasons and the import-time warning derived from it (issue 13: a failed native build must
never be silent)."""
from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys

import pytest
import torch

import tcloss
from tcloss import _backends as B

FAILED_CUDA = {"torch": "2.x", "cuda_attempted": True, "cuda_built": False, "cpu_built": True,
               "errors": ["CUDA build failed: command 'nvcc' failed with exit code 1"]}
FAILED_ALL = {"torch": "2.x", "cuda_attempted": False, "cuda_built": False, "cpu_built": False,
              "errors": ["CPU build failed: command 'c++' failed with exit code 1"]}


def test_python_m_tcloss_reports_every_op_backend_and_auto():
    out = subprocess.run([sys.executable, "-m", "tcloss"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"tcloss {tcloss.__version__}" in text and "torch " in text and "native build:" in text
    for op in B.OPS:
        assert f"{op}" in text
    assert text.count("auto -> ") == 2 * len(B.OPS)
    if B.native_status()[0]:
        assert "tcloss._C: loaded" in text and "cpp       ok" in text
    else:
        assert B.native_status()[1] in text


def test_missing_extension_reason_names_the_build_error_and_the_fix():
    why = B.missing_native_reason(FAILED_ALL, installed=False)
    assert "failed to build" in why and "c++' failed" in why and "pip install --no-build-isolation" in why
    assert "never built" in B.missing_native_reason({}, installed=False)
    assert "does not load" in B.missing_native_reason(FAILED_ALL, installed=True)


def test_import_warning_only_when_an_attempted_backend_is_missing():
    assert B.build_warning({}, native_ok=False, cuda_kernels=False) is None  # no record: nothing to say
    assert B.build_warning(FAILED_CUDA, native_ok=True, cuda_kernels=True) is None
    msg = B.build_warning(FAILED_CUDA, native_ok=True, cuda_kernels=False)
    assert "CUDA kernels failed to build" in msg and "nvcc' failed" in msg
    msg = B.build_warning(FAILED_ALL, native_ok=False, cuda_kernels=False)
    assert "native kernels are missing" in msg and "c++' failed" in msg
    ok = {"cuda_attempted": False, "cpu_built": True, "errors": []}
    assert B.build_warning(ok, native_ok=True, cuda_kernels=False) is None  # CUDA never attempted


def test_warning_is_raised_at_import_from_the_record(monkeypatch):
    monkeypatch.setattr(B, "build_info", lambda: FAILED_CUDA)
    monkeypatch.setattr(B, "_has_native_kernel", lambda op, key: False)
    monkeypatch.setattr(B, "native_status", lambda: (True, "ok"))
    with pytest.warns(RuntimeWarning, match="CUDA kernels failed to build"):
        B.warn_if_build_incomplete()


def test_this_build_recorded_what_it_built():
    info = B.build_info()
    if not info:
        pytest.skip("no build record: the extension was not built by setup.py here")
    assert info["cpu_built"] == B.native_status()[0]
    assert {"torch", "cuda_attempted", "cuda_built", "errors"} <= set(info)


def test_extension_built_against_another_torch_is_refused_with_the_fix(monkeypatch):
    """An isolated `pip install .` may build _C against another torch than the user's: that is
    reported (with the command that fixes it) instead of loading an incompatible library."""
    monkeypatch.setattr(B, "build_info", lambda: {"torch": "0.0.1", "cpu_built": True, "errors": []})
    B.native_status.cache_clear()
    try:
        if B.importlib.util.find_spec("tcloss._C") is None:
            pytest.skip("no extension here")
        ok, why = B.native_status()
        assert not ok and "built against torch 0.0.1" in why and "--no-build-isolation" in why
    finally:
        monkeypatch.undo()
        B.native_status.cache_clear()
    assert B.native_status()[0]


def test_triton_module_that_does_not_import_makes_the_triton_backend_unavailable_with_its_reason(monkeypatch):
    """With triton importable but an op's Triton module failing to import (an older torch without
    torch.library.triton_op), the triton backend is reported unavailable for that op, with the
    import error, rather than listed and failing at the call."""
    if not B.triton_status()[0]:
        pytest.skip("triton is not importable here: the backend reports that instead")
    monkeypatch.setattr(B, "_REGISTERED", set(B._REGISTERED))
    monkeypatch.setattr(B, "_TRITON_IMPORT_ERROR", dict(B._TRITON_IMPORT_ERROR))
    B.register_op_pair("no_such_op", None, None, None)  # its Triton module: _backends/no_such_op_triton.py
    why = B._TRITON_IMPORT_ERROR["no_such_op"]
    assert "do not load with torch" in why and "no_such_op_triton" in why
    # the reason reaches the report and the error of an explicit backend="triton"
    monkeypatch.setitem(B._TRITON_IMPORT_ERROR, "temporal_loss", why)
    assert B.available_backends(verbose=True)["temporal_loss"]["cuda"]["triton"] == why
    assert B.available_backends(verbose=True)["convlstm_cell"]["cuda"]["triton"] != why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="do not load with torch"):
        B.resolve("temporal_loss", torch.device("cpu"), "triton")


def test_backend_status_is_public_and_checks_its_arguments():
    assert tcloss.backend_status("reference", "temporal_loss", "cpu") == (True, "ok")
    ok, why = tcloss.backend_status("cuda", "pairwise_similarity_loss", "cpu")
    assert not ok and "CUDA tensors" in why
    with pytest.raises(ValueError, match="op must be one of temporal_loss, convlstm_cell, pairwise_similarity_loss"):
        tcloss.backend_status("cpp", "flow_warp", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        tcloss.backend_status("opencl", "temporal_loss", "cpu")


def test_import_boundaries():
    """The library stands alone: importing tcloss (with its reference and every glue module) loads
    nothing of the training side (models, videodata, trainer), and tcloss.reference, the oracle
    the kernels are tested against, imports no kernel module (native, glue or Triton)."""
    code = ("import sys, tcloss, tcloss.reference, tcloss.nn, tcloss.metrics\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'videodata', 'trainer'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", out.stdout
    kernels = ("_backends", "tcloss._backends", "tcloss._C", "_C", "triton")
    for oracle in (tcloss.reference, tcloss._math):  # the oracle, and the definitions it shares
        imported = _imports(inspect.getsource(oracle))
        assert not any(m.startswith(kernels) for m in imported), (oracle.__name__, imported)


def _imports(source: str, package: str = "tcloss") -> set:
    """The modules and names ``source`` (a module of ``package``) imports, as dotted names
    (``from . import reference`` -> ``reference``, ``from ..reference import x`` -> ``reference.x``)."""
    tree = ast.parse(source)
    imported = {f"{n.module or ''}.{a.name}".lstrip(".") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                for a in n.names}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {m[len(package) + 1:] if m.startswith(package + ".") else m for m in imported}


def test_only_the_reference_backend_imports_the_oracle():
    """tcloss.reference is the test oracle and the reference backend: no module of the package
    imports it but the one that dispatches backend="reference" (and algorithm="naive", the
    reference itself) and the package's __init__, which exposes it as tcloss.reference."""
    root = os.path.dirname(tcloss.__file__)
    allowed = {"__init__.py", "functional.py", "reference.py"}
    importers = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if not name.endswith(".py") or rel in allowed:
                continue
            with open(path) as f:
                imported = _imports(f.read())
            if any(m == "reference" or m.startswith("reference.") for m in imported):
                importers.append(rel)
    assert importers == [], importers
