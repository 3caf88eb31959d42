"""Reference causal depthwise 1-D convolution with a rolling state, as used in front of Mamba-2's SSD.

``out[t, d] = bias[d] + sum_i weight[d, i] * x[t - (K - 1) + i, d]``: the last tap looks at the
current token. The state is the last ``K - 1`` inputs, so decoding one token at a time gives the
same numbers as the full pass. With ``seq_idx`` a token never sees inputs of an earlier document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in (None, "identity"):
        return y
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"unknown activation {activation!r}; use 'silu' or 'identity'")


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution over time.

    Args:
        x: ``[B, T, D]`` inputs.
        weight: ``[D, K]`` one filter per channel.
        bias: ``[D]`` or ``None``.
        initial_state: ``[B, D, K - 1]`` the inputs before ``x`` (oldest first), or ``None`` for zeros.
        seq_idx: ``[B, T]`` non-decreasing document ids; the initial state belongs to ``seq_idx[:, 0]``.
        activation: ``None``/``"identity"`` or ``"silu"``.
    Returns:
        ``y`` ``[B, T, D]`` and the final state ``[B, D, K - 1]`` (inputs of the last document only).
    """
    batch, seqlen, dim = x.shape
    width = weight.shape[-1]
    if weight.shape != (dim, width):
        raise ValueError(f"weight must be [D={dim}, K], got {tuple(weight.shape)}")
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, width - 1)
    history = torch.cat([initial_state.transpose(1, 2).to(x.dtype), x], dim=1)  # [b, K-1+T, d]
    if seq_idx is not None:
        history_sid = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=1)
    y = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand(batch, seqlen, dim).clone()
    for i in range(width):
        window = history[:, i : i + seqlen]
        if seq_idx is not None:
            window = window * (history_sid[:, i : i + seqlen] == seq_idx)[..., None]
        y = y + window * weight[:, i].to(x.dtype)
    final = history[:, -(width - 1) :] if width > 1 else history[:, :0]
    if seq_idx is not None and width > 1:
        final = final * (history_sid[:, -(width - 1) :] == seq_idx[:, -1:])[..., None]
    return _activate(y, activation), final.transpose(1, 2).contiguous()


def causal_conv1d_step_ref(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, updating ``state`` in place.

    Args:
        x: ``[B, D]`` the new input; weight: ``[D, K]``; bias: ``[D]`` or ``None``.
        state: ``[B, D, K - 1]`` the previous ``K - 1`` inputs (oldest first). It is overwritten with
            the inputs after this token (shifted by one, ``x`` last), so a cache can allocate it once.
    Returns:
        ``y`` ``[B, D]`` and ``state`` itself (the same tensor object).
    """
    window = torch.cat([state.to(x.dtype), x[:, :, None]], dim=-1)  # [b, d, K], a new tensor
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    state.copy_(window[:, :, 1:])
    return _activate(y, activation), state
