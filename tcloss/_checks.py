"""The argument checks shared by the functional API (tcloss.functional), the modules (tcloss.nn),
the ops' glue modules (tcloss/_backends/<op>.py: ``check_options``) and the backend registry:
every option is checked by one of these, so a value is refused (or accepted) the same way
whatever entry point it came through.

Convention: a value of the wrong type is a ``TypeError``, a value of the right type outside its
range (or not one of the choices) a ``ValueError``; every message names the argument and what
was expected. ``tcloss.metrics`` keeps its own copies: it imports nothing from tcloss.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_tensor", "check_choice", "check_bool", "check_real", "check_positive_int", "check_backend",
           "check_kd_options"]


def check_tensor(name: str, t, ndim: int | None = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (B,C,H,W), got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_choice(name: str, value, choices) -> None:
    """``value`` must be one of ``choices`` (strings): a non-string is a TypeError."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)} (a string), got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value) -> bool:
    """A real ``bool`` (or numpy's bool_): strings such as ``"false"`` and numbers are refused."""
    if not (isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_real(name: str, value, *, minimum: float | None = None, strict: bool = False) -> float:
    """A finite real number (not a bool), ``>= minimum`` (``> minimum`` when ``strict``); returns it
    as a float. Infinite and NaN values are refused: no option of tcloss has a meaning there."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        if minimum == 0:
            what = "a positive number" if strict else "a non-negative number"
        else:
            what = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_positive_int(name: str, value) -> int:
    """An integral number >= 1 (int, numpy integer, ...; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_backend(backend) -> None:
    """``backend=``: ``"auto"`` or one of tcloss._backends.BACKENDS (availability is checked when
    a call resolves it)."""
    from ._backends import BACKENDS  # here, not at import: _backends imports this module
    check_choice("backend", backend, ("auto",) + BACKENDS)


# --- options without a glue module (each op's own: tcloss/_backends/<op>.py: check_options) -------

def check_kd_options(temperature) -> None:
    """Options of pixelwise_kd / nn.PixelwiseKD."""
    check_real("temperature", temperature, minimum=0, strict=True)
