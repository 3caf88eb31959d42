"""``causal_conv1d`` on the CUDA kernel of Dao-AILab's ``causal-conv1d`` package (``causal_conv1d_fn``).

Registered as backend ``causal_conv1d`` only when the package imports (CUDA builds). Written against
``causal_conv1d/causal_conv1d_interface.py`` and the checks in ``csrc/causal_conv1d.cpp`` of
Dao-AILab/causal-conv1d; it has not been run on a GPU in this repository yet.
"""

from __future__ import annotations

import torch

from ..dispatch import cuda_floats, import_optional
from .naive import causal_conv1d_ref

causal_conv1d_fn = import_optional("causal_conv1d", "causal_conv1d_fn", "causal_conv1d")

supports = cuda_floats  # CUDA tensors in fp16, bf16 or fp32, forward and backward


def causal_conv1d_dao(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`~mixerswap.kernels.conv1d.naive.causal_conv1d_ref`.

    The kernel takes ``x`` as ``[B, D, T]``; our ``[B, T, D]`` transposed is its channel-last
    layout, the only one that accepts ``seq_idx`` and initial states. It accepts widths 2 to 4,
    ``D`` divisible by 8, and not ``seq_idx`` together with an initial state; other calls run the
    reference, because ``supports`` sees only device and dtype (the choice is cached on them).
    The final state is read from the last ``K - 1`` inputs by the reference, since the kernel
    does not return it when ``seq_idx`` is given.
    """
    width, dim = weight.shape[-1], x.shape[-1]
    if not 2 <= width <= 4 or dim % 8 or (seq_idx is not None and initial_state is not None):
        with torch.autocast(x.device.type, enabled=False):
            return causal_conv1d_ref(x, weight, bias, initial_state=initial_state, seq_idx=seq_idx,
                                     activation=activation)
    channel_last = x.contiguous().transpose(1, 2)  # [B, D, T] with stride 1 over D
    if initial_state is not None:
        initial_state = initial_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    y = causal_conv1d_fn(
        channel_last,
        weight,
        None if bias is None else bias.to(weight.dtype),
        seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
        initial_states=initial_state,
        activation=None if activation in (None, "identity") else activation,
    )
    tail = slice(-(width - 1), None)
    _, final_state = causal_conv1d_ref(x[:, tail], weight, bias, initial_state=initial_state,
                                       seq_idx=None if seq_idx is None else seq_idx[:, tail])
    return y.transpose(1, 2), final_state
