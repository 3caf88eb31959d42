"""The accumulation dtype every operator and mixer computes in: fp32, or fp64 for fp64 inputs."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """``torch.promote_types(dtype, torch.float32)`` for the dtypes models run in, without a call into
    the dispatcher (a decode step asks this a few times per layer)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
