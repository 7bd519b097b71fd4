"""Shared test helpers: which backends run where, tolerances, the shared sample data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tcloss
from tcloss import _backends

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
INTERPRET = _backends.triton_interpret()
HAS_CUDA = torch.cuda.is_available()

# Per-dtype (atol, rtol) of a kernel against the float64 reference on the same inputs.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.5e-2, 5e-2),
}

def grid_warp(img, flow):
    """Reference warp of the project convention (independent of tcloss): grid_sample of img at
    x + flow, bilinear, border padding, align_corners=True."""
    b, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs + flow[:, 0]) * 2 / (w - 1) - 1, (ys + flow[:, 1]) * 2 / (h - 1) - 1], -1)
    return torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


def kernel_params(op: str = "temporal_loss"):
    """(backend, device) pairs for the kernels under test; reference is the oracle, not a param."""
    return [
        pytest.param("cpp", "cpu", id="cpp",
                     marks=pytest.mark.skipif(not tcloss.backend_status("cpp", op, "cpu")[0], reason="tcloss._C has no CPU kernel")),
        pytest.param("triton", "cpu", id="triton-interp",
                     marks=[pytest.mark.triton,
                            pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")]),
        pytest.param("cuda", "cuda", id="cuda",
                     marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]),
        pytest.param("triton", "cuda", id="triton-cuda",
                     marks=[pytest.mark.cuda, pytest.mark.triton,
                            pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="no CUDA GPU")]),
    ]

def pytest_report_header(config):
    return f"tcloss backends: {tcloss.available_backends()}; TRITON_INTERPRET={int(INTERPRET)}; cuda={HAS_CUDA}"

@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA}")
    return SHARED_DATA
