"""The accumulation dtype of every op: float64 where an input is float64 (the exactness and
gradcheck path), float32 otherwise (float16/bfloat16 inputs are computed in float32)."""
from __future__ import annotations

import torch


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32
