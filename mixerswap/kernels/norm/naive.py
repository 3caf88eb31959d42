"""Reference gated RMSNorm of Mamba-2: ``rmsnorm(y * silu(z))`` over groups of channels, times a weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..precision import acc_dtype


def gated_rmsnorm_ref(
    y: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    group_size: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Normalize each group of ``group_size`` channels to unit RMS after gating by ``silu(z)``.

    Args:
        y: ``[..., D]``; z: ``[..., D]`` or ``None`` (no gate); weight: ``[D]``.
        group_size: channels per normalization group (Mamba-2 uses one group per head here).
    Returns:
        ``[..., D]`` in ``y.dtype``; the arithmetic is done in fp32 (fp64 for fp64 inputs).
    """
    dim = y.shape[-1]
    if dim % group_size:
        raise ValueError(f"channel count {dim} is not a multiple of group_size {group_size}")
    out_dtype, acc = y.dtype, acc_dtype(y.dtype)
    h = y.to(acc)
    if z is not None:
        h = h * F.silu(z.to(acc))
    h = h.view(*h.shape[:-1], dim // group_size, group_size)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.view(*y.shape) * weight.to(acc)).to(out_dtype)
