"""Triton kernel of one SSD decoding step, updating the state in place (see :func:`ssd_step_triton`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import triton_support
from ..precision import acc_dtype

_BLOCK_P = 32  # head-size rows of the [P, N] state per program


@triton.jit
def _add(a, b):  # tl.sum itself needs TRITON_INTERPRET=1 before triton's import (see chunk.py)
    return a + b


@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
    H, R,
    s_sb, s_sh, s_sp, s_sn,
    s_xb, s_xg, s_xp,
    s_db, s_dh,
    s_bb, s_bg, s_bn,
    s_cb, s_ch, s_cn,
    s_yb, s_yh, s_yp,
    P: tl.constexpr, N: tl.constexpr, HAS_D: tl.constexpr,
    BLOCK_P: tl.constexpr, N_PAD: tl.constexpr,
):
    """``S = exp(dt A) S + dt x B^T`` and ``y = S C + D x`` for ``BLOCK_P`` rows of one head's state."""
    pid_bh = tl.program_id(0).to(tl.int64)
    h = pid_bh % H
    b = pid_bh // H
    g = h // R
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, N_PAD)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask = mask_p[:, None] & mask_n[None, :]

    dt = tl.load(dt_ptr + b * s_db + h * s_dh).to(tl.float32)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * s_xb + g * s_xg + offs_p * s_xp, mask=mask_p, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + b * s_bb + g * s_bg + offs_n * s_bn, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + b * s_cb + h * s_ch + offs_n * s_cn, mask=mask_n, other=0.0).to(tl.float32)
    state_ptrs = state_ptr + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    state = state * decay + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.reduce(state * C[None, :], 1, _add)
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + b * s_yb + h * s_yh + offs_p * s_yp, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def ssd_step(state, x, dt, A, B, C, D) -> torch.Tensor:
    """Launch :func:`_ssd_step_kernel`; returns ``y`` ``[B, H, P]`` in ``x.dtype``, ``state`` updated."""
    batch, groups, headdim = x.shape
    heads, dstate = C.shape[1], C.shape[2]
    if acc_dtype(x.dtype) != torch.float32:
        raise TypeError(f"the triton ssd_step supports fp32, bf16 and fp16 inputs, got {x.dtype}")
    if state.shape != (batch, heads, headdim, dstate):
        raise ValueError(f"state must be [B, H, P, N] = {(batch, heads, headdim, dstate)}, got {tuple(state.shape)}")
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    y = torch.empty(batch, heads, headdim, device=x.device, dtype=x.dtype)
    block_p = max(16, triton.next_power_of_2(headdim))
    if not triton_support.interpreting():  # the interpreter is fastest with one program per head
        block_p = min(_BLOCK_P, block_p)
    _ssd_step_kernel[(batch * heads, triton.cdiv(headdim, block_p))](
        state, x, dt, A, B, C, D if D is not None else A, y,
        heads, heads // groups,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
        P=headdim, N=dstate, HAS_D=D is not None, BLOCK_P=block_p, N_PAD=max(16, triton.next_power_of_2(dstate)),
    )
    return y
