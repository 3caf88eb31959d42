"""Backend ``triton`` of ``ssd_chunk_scan`` and ``ssd_step``: our own Triton kernels.

Same contract as the reference in ``naive.py`` (the specification). The chunked SSD algorithm of
Dao & Gu (2024), as in state-spaces/mamba ``ops/triton/ssd_*.py``, split into kernels (``chunk.py``):

forward
    1. the state each chunk adds, ``sum_s x_s^T w_s B_s`` (``w_s`` = ``dt_s`` times the decay to the
       chunk's end);
    2. a sequential pass over chunks that turns those into the states entering each chunk, and the
       final state;
    3. the outputs: the entering state read through ``C`` and decayed from the chunk's start, plus the
       masked quadratic (attention-like) form inside the chunk, plus ``D x``.
backward
    the same three steps in reverse (derivation in ``README.md``): gradients of the entering states
    through the outputs (the kernel of step 1 on ``dy`` and ``C``), a reverse pass over chunks, and two
    kernels for the rows (``dC``) and the columns (``dx``, ``dB``, summed over the heads of a group) of
    the intra-chunk form.

What costs ``O(T * H)`` runs in PyTorch around the kernels: the within-chunk cumulative sum of
``dt * A``, the per-position decay weights with the document masks of ``seq_idx``, and at the end of
the backward the reverse cumulative sum that turns gradients of those weights into ``ddt`` and ``dA``.

Grouped heads are never repeated in memory: ``x`` and ``B`` (``G`` groups) are indexed by ``h // R``
inside the kernels. All accumulation is fp32; fp32 inputs use full-precision (``ieee``) dots, bf16 and
fp16 inputs use tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import chunk, step
from ..precision import acc_dtype
from .naive import _check_shapes


@dataclass
class _Positions:
    """Per-position fp32 quantities, ``[B, H, Tp]`` (``Tp`` = ``T`` padded to whole chunks), contiguous."""

    dt: torch.Tensor  # dt, zero on the padding
    acum: torch.Tensor  # within-chunk cumulative sum of dt * A
    to_end: torch.Tensor  # exp(acum[last] - acum), zero before a document start inside the chunk
    w: torch.Tensor  # to_end * dt: weight of a position in the state its chunk adds
    v: torch.Tensor  # exp(acum), zero after a document start inside the chunk: weight of the entering state
    carry: torch.Tensor  # [B, H, nc] decay of the whole chunk, zero when a document starts inside it
    seq_idx: torch.Tensor | None  # [B, Tp] int32, the padding repeating the last id


def _positions(dt: torch.Tensor, A: torch.Tensor, seq_idx: torch.Tensor | None, chunk_size: int) -> _Positions:
    batch, seqlen, heads = dt.shape
    pad = (-seqlen) % chunk_size
    nchunks = (seqlen + pad) // chunk_size
    dt_h = F.pad(dt.float().transpose(1, 2), (0, pad)).contiguous()
    acum = (dt_h * A.float()[:, None]).view(batch, heads, nchunks, chunk_size).cumsum(-1)
    last = acum[..., -1:]
    to_end, v, carry = torch.exp(last - acum), torch.exp(acum), torch.exp(last[..., 0])
    sid = None
    if seq_idx is not None:
        sid = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], 1).to(torch.int32).contiguous()
        by_chunk = sid.view(batch, nchunks, chunk_size)
        before = torch.cat([by_chunk[:, :1, 0], by_chunk[:, :-1, -1]], 1)  # id just before each chunk
        same_as_end = (by_chunk == by_chunk[..., -1:])[:, None]
        same_as_before = (by_chunk == before[..., None])[:, None]
        to_end = to_end * same_as_end
        v = v * same_as_before
        carry = carry * same_as_before[..., -1]
    flat = (batch, heads, nchunks * chunk_size)
    to_end = to_end.reshape(flat)
    return _Positions(dt=dt_h, acum=acum.reshape(flat), to_end=to_end, w=to_end * dt_h, v=v.reshape(flat),
                      carry=carry.contiguous(), seq_idx=sid)


class SsdChunkScanFn(torch.autograd.Function):
    """Chunked SSD scan with Triton forward and backward; see :func:`ssd_chunk_scan_triton`."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, seq_idx, chunk_size):
        heads = C.shape[2]
        ctx.dtypes = (B.dtype, C.dtype, None if initial_state is None else initial_state.dtype)
        x = x.contiguous()
        B, C = B.to(x.dtype).contiguous(), C.to(x.dtype).contiguous()
        pos = _positions(dt, A, seq_idx, chunk_size)
        states = chunk.chunk_outer(x, B, pos.w, chunk_size=chunk_size, heads=heads)
        init = None if initial_state is None else initial_state.to(torch.float32).contiguous()
        final = chunk.state_passing_fwd(states, pos.carry, init)  # states now hold the entering states
        y = chunk.chunk_scan_fwd(x, B, C, pos.dt, pos.acum, pos.v, states, D, pos.seq_idx, chunk_size=chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, D, seq_idx, states)
        ctx.chunk_size = chunk_size
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, seq_idx, entering = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        batch, seqlen, groups, headdim = x.shape
        heads = C.shape[2]
        dy = dy.to(x.dtype).contiguous()
        pos = _positions(dt, A, seq_idx, chunk_size)

        dstates = chunk.chunk_outer(dy, C, pos.v, chunk_size=chunk_size, heads=heads)
        dinit, dcarry = chunk.state_passing_bwd(dstates, entering, pos.carry, dfinal.float().contiguous())
        dC, dacum_rows, dv = chunk.chunk_scan_bwd_dc(x, B, C, dy, pos.dt, pos.acum, pos.v, entering, pos.seq_idx,
                                                     chunk_size=chunk_size)
        dx, dB, ddt, dacum_cols, dw = chunk.chunk_scan_bwd_dxdb(x, B, C, dy, pos.dt, pos.acum, pos.w, dstates, D,
                                                                 pos.seq_idx, chunk_size=chunk_size)

        # Gradients of the per-position weights -> of acum (within-chunk cumsum of dt * A) -> of dt and A.
        w_grad = dw * pos.w
        dacum = (dacum_rows + dacum_cols + dv * pos.v - w_grad).view(batch, heads, -1, chunk_size)
        dacum[..., -1] += w_grad.view_as(dacum).sum(-1) + dcarry * pos.carry
        da = dacum.flip(-1).cumsum(-1).flip(-1).view_as(pos.dt)
        ddt = ddt + dw * pos.to_end + da * A.float()[:, None]
        dA = (da * pos.dt).sum((0, 2))
        ddt = ddt[..., :seqlen].transpose(1, 2).to(dt.dtype)

        dD = None
        if D is not None:
            dy_groups = dy.float().view(batch, seqlen, groups, heads // groups, headdim)
            dD = torch.einsum("btgrp,btgp->gr", dy_groups, x.float()).reshape(heads).to(D.dtype)
        b_dtype, c_dtype, init_dtype = ctx.dtypes
        dinit = None if init_dtype is None else dinit.to(init_dtype)
        return dx, ddt, dA.to(A.dtype), dB.to(b_dtype), dC.to(c_dtype), dD, dinit, None, None


def ssd_chunk_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan on Triton kernels, forward and backward.

    Args:
        x: ``[B, T, G, P]`` inputs, shared by the ``R = H / G`` heads of a group.
        dt: ``[B, T, H]`` step sizes (positive, zero at padding).
        A: ``[H]`` negative decay rates.
        B: ``[B, T, G, N]`` input projections.
        C: ``[B, T, H, N]`` output projections.
        chunk_size: chunk length (any ``T`` is accepted).
        D: ``[H]`` skip connection, or ``None``.
        initial_state: ``[B, H, P, N]`` state before the first position, or ``None``; never modified.
        seq_idx: ``[B, T]`` non-decreasing document ids, or ``None``.
    Returns:
        ``y`` ``[B, T, H, P]`` in ``x.dtype`` and the final state ``[B, H, P, N]`` in fp32, with gradients
        for ``x``, ``dt``, ``A``, ``B``, ``C``, ``D`` and ``initial_state``.
    """
    _check_shapes(x, dt, A, B, C)
    if acc_dtype(x.dtype) != torch.float32:
        raise TypeError(f"the triton ssd_chunk_scan supports fp32, bf16 and fp16 inputs, got {x.dtype}")
    return SsdChunkScanFn.apply(x, dt, A, B, C, D, initial_state, seq_idx, chunk_size)


def ssd_step_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step in a Triton kernel, updating ``state`` in place (no autograd).

    Args:
        state: ``[B, H, P, N]`` fp32 state before the token, overwritten with the state after it.
        x: ``[B, G, P]``; dt: ``[B, H]``; A: ``[H]``; B: ``[B, G, N]``; C: ``[B, H, N]``; D: ``[H]`` or ``None``.
    Returns:
        ``y`` ``[B, H, P]`` in ``x.dtype`` and ``state`` itself (the same tensor object).
    """
    return step.ssd_step(state, x, dt, A, B, C, D), state
