"""Training side of tcloss (not part of the library): config, loss assembly, stages, eval.

``train.py`` is the entry point; tests import the pieces from here.
"""
from .config import DEFAULTS, PRESETS, ConfigError, load_config, resolve_stages  # noqa: F401
from .losses import compute_losses, effective_weights  # noqa: F401
