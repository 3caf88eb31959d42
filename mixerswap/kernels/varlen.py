"""Our ``seq_idx`` convention translated to the variable-length one of third-party kernels (``cu_seqlens``).

We mark packed documents with ``seq_idx`` ``[B, T]`` (non-decreasing ids per row; the state never
crosses a change of id, and the initial state of a row belongs to its first document). Kernels in the
FlashAttention style (fla) instead take one row ``[1, N_tokens, ...]`` and ``cu_seqlens`` ``[S + 1]``,
the offsets of ``S`` sequences, with one initial and one final state per sequence. A row start or a
change of id starts a sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """``B`` rows of ``T`` tokens as ``S`` sequences of one row of ``B * T`` tokens."""

    cu_seqlens: torch.Tensor  # [S + 1] int64 offsets into the flattened row
    first: torch.Tensor  # [B] index of each row's first sequence
    last: torch.Tensor  # [B] index of each row's last sequence

    @property
    def sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def initial_states(self, state: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, ...]`` per row → ``[S, ...]`` per sequence: each row's state starts its first sequence, zeros
        start the others."""
        if state is None:
            return None
        out = state.new_zeros(self.sequences, *state.shape[1:])
        out[self.first] = state
        return out

    def final_states(self, states: torch.Tensor) -> torch.Tensor:
        """``[S, ...]`` per sequence → ``[B, ...]``: the state after each row's last position."""
        return states[self.last]


def pack(seq_idx: torch.Tensor) -> Packing:
    """The sequences of ``seq_idx`` ``[B, T]`` (``T >= 1``) once its rows are laid end to end."""
    batch, seqlen = seq_idx.shape
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    offsets = starts.flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([batch * seqlen])])
    first = torch.searchsorted(offsets, torch.arange(batch, device=seq_idx.device) * seqlen)
    last = torch.cat([first[1:], first.new_tensor([offsets.numel()])]) - 1
    return Packing(cu_seqlens, first, last)


def call_varlen(fn: Callable, tensors: tuple[torch.Tensor, ...], initial_state: torch.Tensor | None,
                seq_idx: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(*tensors, initial_state=..., output_final_state=True[, cu_seqlens=...], **kwargs)`` for an
    fla-style chunked op on ``[B, T, ...]`` tensors: with ``seq_idx`` the rows are laid end to end as
    variable-length sequences and the result put back. Returns ``o [B, T, ...]`` and the final state per
    row in fp32."""
    batch, seqlen = tensors[0].shape[:2]
    if seq_idx is None:
        o, final = fn(*tensors, initial_state=initial_state, output_final_state=True, **kwargs)
        return o, final.float()
    packing = pack(seq_idx)
    o, finals = fn(*(t.flatten(0, 1)[None] for t in tensors), initial_state=packing.initial_states(initial_state),
                   output_final_state=True, cu_seqlens=packing.cu_seqlens, **kwargs)
    return o.view(batch, seqlen, *o.shape[2:]), packing.final_states(finals).float()
