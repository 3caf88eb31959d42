"""Causal depthwise conv1d in Triton: full pass (forward and backward) and the decode step.

Same contract as :func:`~mixerswap.kernels.conv1d.naive.causal_conv1d_ref` and
:func:`~mixerswap.kernels.conv1d.naive.causal_conv1d_step_ref`, which are the specification.

Notation. The *history* of a row is ``h = [initial_state | x]`` along time, ``K - 1 + T`` long, and
``sid_h`` its document ids (the initial state belongs to ``seq_idx[:, 0]``). With ``u = t + i``::

    pre[t] = bias + sum_i w[i] * h[t + i] * (sid_h[t + i] == sid[t])      y[t] = act(pre[t])
    final[j] = h[T + j] * (sid_h[T + j] == sid[T - 1])                    j < K - 1

so the backward pass, with ``g_i[u] = dpre[u - i] * (sid_h[u] == sid[u - i])``, is::

    dh[u] = sum_i w[i] * g_i[u] + dfinal[u - T] * (sid_h[u] == sid[T - 1])
    dw[i] = sum_{b, u} h[u] * g_i[u]          dbias = sum_{b, t} dpre[t]

``dh`` is ``dx`` for ``u >= K - 1`` and ``d initial_state`` below. One backward program owns a tile of
history positions ``u`` and recomputes the ``dpre`` it needs (for ``silu`` that means the forward
conv again at ``K`` shifts), so no intermediate goes through memory; ``dw`` and ``dbias`` are summed
per tile into fp32 partials and reduced by torch. Everything accumulates in fp32. The layout is the
reference's (``[B, T, D]``, any strides): one program per time x channel tile, the ``K`` taps unrolled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_support import interpreting

# The interpreter runs one program at a time in Python: one fixed, largish tile. The tests put a
# document boundary at a multiple of INTERPRET_BLOCK_T to cross a tile edge.
INTERPRET_BLOCK_T, INTERPRET_BLOCK_D = 64, 16
BWD_BLOCK_T = 64  # fixed on GPU too: it sets the number of dw/dbias partials allocated before launch
STEP_BLOCK_D = 16 if interpreting() else 128


def _silu_flag(activation: str | None) -> bool:
    if activation in (None, "identity"):
        return False
    if activation == "silu":
        return True
    raise ValueError(f"unknown activation {activation!r}; use 'silu' or 'identity'")


def _autotune(configs: list[triton.Config], key: list[str]):
    """Autotune on GPU; the interpreter gets the fixed block sizes passed at launch instead."""
    return (lambda fn: fn) if interpreting() else triton.autotune(configs=configs, key=key)


# Only builtins of triton.language below, no functions of its jit'd standard library (tl.sum, tl.zeros,
# tl.sigmoid): when triton was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it),
# those stay compiled-only and the interpreter refuses to call them. The reduction keeps tl.sum's own
# combine function, which the interpreter recognizes and runs as one numpy sum.
@triton.jit
def _sum(v, axis: tl.constexpr):
    return tl.reduce(v, axis, tl.standard._sum_combine)


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _history(x_ptr, init_ptr, b, u, d, T, D, stride_xb, stride_xt, stride_xd, stride_ib, stride_id, stride_ik,
             WIDTH: tl.constexpr, HAS_INIT: tl.constexpr):
    """``h[b, u, d]`` in fp32 (zero outside the history); ``u`` ``[BT, 1]``, ``d`` ``[1, BD]``."""
    t = u - (WIDTH - 1)
    d_ok = d < D
    h = tl.load(x_ptr + b * stride_xb + t * stride_xt + d * stride_xd, mask=(t >= 0) & (t < T) & d_ok,
                other=0.0).to(tl.float32)
    if HAS_INIT:
        # The reference casts the initial state to x's dtype before using it: so do we.
        h0 = tl.load(init_ptr + b * stride_ib + d * stride_id + u * stride_ik, mask=(u >= 0) & (t < 0) & d_ok,
                     other=0.0)
        h += h0.to(x_ptr.dtype.element_ty).to(tl.float32)
    return h


@triton.jit
def _seq_at(seq_ptr, b, t, T, stride_sb, stride_st):
    """``seq_idx[b, t]`` with ``t`` clamped into ``[0, T)`` (the initial state belongs to ``t = 0``)."""
    t = tl.minimum(tl.maximum(t, 0), T - 1)
    return tl.load(seq_ptr + b * stride_sb + t * stride_st)


@triton.jit
def _conv_pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, b, t, d, T, D,
              stride_xb, stride_xt, stride_xd, stride_wd, stride_wk, stride_ib, stride_id, stride_ik,
              stride_sb, stride_st,
              WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """``pre[b, t, d]`` (before the activation) in fp32; ``t`` ``[BT, 1]``, ``d`` ``[1, BD]``."""
    d_ok = d < D
    acc = tl.full(t.shape, 0.0, tl.float32) + tl.full(d.shape, 0.0, tl.float32)
    if HAS_SEQ:
        sid_t = _seq_at(seq_ptr, b, t, T, stride_sb, stride_st)
    for i in tl.static_range(WIDTH):
        h = _history(x_ptr, init_ptr, b, t + i, d, T, D, stride_xb, stride_xt, stride_xd,
                     stride_ib, stride_id, stride_ik, WIDTH, HAS_INIT)
        if HAS_SEQ:
            h = tl.where(_seq_at(seq_ptr, b, t + i - (WIDTH - 1), T, stride_sb, stride_st) == sid_t, h, 0.0)
        w = tl.load(w_ptr + d * stride_wd + i * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
        acc += h * w
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    return acc


@_autotune([triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=4) for bt in (64, 128) for bd in (32, 64)],
           key=["D", "WIDTH"])
@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, y_ptr, final_ptr, T, D,
    stride_xb, stride_xt, stride_xd, stride_wd, stride_wk, stride_ib, stride_id, stride_ik,
    stride_sb, stride_st, stride_yb, stride_yt, stride_yd, stride_fb, stride_fd, stride_fk,
    WIDTH: tl.constexpr, STATE_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B, cdiv(T, BLOCK_T), cdiv(D, BLOCK_D))``; the programs of the first time tile also
    write the final state (``STATE_POW2`` >= ``K - 1`` rows)."""
    b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T))[:, None].to(tl.int64)  # T * stride may pass 2**31
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    pre = _conv_pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, b, t, d, T, D,
                    stride_xb, stride_xt, stride_xd, stride_wd, stride_wk, stride_ib, stride_id, stride_ik,
                    stride_sb, stride_st, WIDTH, HAS_BIAS, HAS_INIT, HAS_SEQ)
    if SILU:
        pre = pre * _sigmoid(pre)
    tl.store(y_ptr + b * stride_yb + t * stride_yt + d * stride_yd, pre.to(y_ptr.dtype.element_ty),
             mask=(t < T) & (d < D))
    if WIDTH > 1:
        if pid_t == 0:
            j = tl.arange(0, STATE_POW2)[:, None]
            h = _history(x_ptr, init_ptr, b, T + j, d, T, D, stride_xb, stride_xt, stride_xd,
                         stride_ib, stride_id, stride_ik, WIDTH, HAS_INIT)
            if HAS_SEQ:
                sid_last = _seq_at(seq_ptr, b, T - 1, T, stride_sb, stride_st)
                h = tl.where(_seq_at(seq_ptr, b, T + j - (WIDTH - 1), T, stride_sb, stride_st) == sid_last, h, 0.0)
            tl.store(final_ptr + b * stride_fb + d * stride_fd + j * stride_fk, h.to(final_ptr.dtype.element_ty),
                     mask=(j < WIDTH - 1) & (d < D))


@_autotune([triton.Config({"BLOCK_D": bd}, num_warps=4) for bd in (32, 64)], key=["D", "WIDTH"])
@triton.jit
def _causal_conv1d_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dfinal_ptr, dx_ptr, dinit_ptr, dw_part_ptr, db_part_ptr,
    T, D, stride_xb, stride_xt, stride_xd, stride_wd, stride_wk, stride_ib, stride_id, stride_ik,
    stride_sb, stride_st, stride_dyb, stride_dyt, stride_dyd, stride_dfb, stride_dfd, stride_dfk,
    stride_dxb, stride_dxt, stride_dxd, stride_dib, stride_did, stride_dik,
    stride_pb, stride_pu, stride_pd, stride_qb, stride_qu, stride_qd,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_DFINAL: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B, cdiv(K - 1 + T, BLOCK_T), cdiv(D, BLOCK_D))`` over history positions ``u``.

    Writes ``dh`` (to ``dx`` or ``d initial_state``) and this tile's fp32 partial sums ``dw_part``
    ``[B, U, D, K]`` (strides ``p``, the last one 1) and ``db_part`` ``[B, U, D]`` (strides ``q``).
    """
    b = tl.program_id(0).to(tl.int64)
    pid_u = tl.program_id(1)
    u = (pid_u * BLOCK_T + tl.arange(0, BLOCK_T))[:, None].to(tl.int64)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    d_ok = d < D
    h_u = _history(x_ptr, init_ptr, b, u, d, T, D, stride_xb, stride_xt, stride_xd,
                   stride_ib, stride_id, stride_ik, WIDTH, HAS_INIT)
    if HAS_SEQ:
        sid_u = _seq_at(seq_ptr, b, u - (WIDTH - 1), T, stride_sb, stride_st)
    dh = tl.full(u.shape, 0.0, tl.float32) + tl.full(d.shape, 0.0, tl.float32)
    part = dw_part_ptr + b * stride_pb + pid_u * stride_pu + d * stride_pd  # [1, BD]
    for i in tl.static_range(WIDTH):
        t = u - i
        g = tl.load(dy_ptr + b * stride_dyb + t * stride_dyt + d * stride_dyd, mask=(t >= 0) & (t < T) & d_ok,
                    other=0.0).to(tl.float32)
        if SILU:
            pre = _conv_pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, b, t, d, T, D,
                            stride_xb, stride_xt, stride_xd, stride_wd, stride_wk, stride_ib, stride_id,
                            stride_ik, stride_sb, stride_st, WIDTH, HAS_BIAS, HAS_INIT, HAS_SEQ)
            s = _sigmoid(pre)
            g = g * s * (1.0 + pre * (1.0 - s))
        if HAS_BIAS:
            if i == WIDTH - 1:  # t = u - (K - 1) visits every output position exactly once
                tl.store(db_part_ptr + b * stride_qb + pid_u * stride_qu + d * stride_qd,
                         _sum(g, axis=0)[None, :], mask=d_ok)
        if HAS_SEQ:
            g = tl.where(sid_u == _seq_at(seq_ptr, b, t, T, stride_sb, stride_st), g, 0.0)
        w = tl.load(w_ptr + d * stride_wd + i * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
        dh += g * w
        tl.store(part + i, _sum(g * h_u, axis=0)[None, :], mask=d_ok)
    if HAS_DFINAL:
        j = u - T
        df = tl.load(dfinal_ptr + b * stride_dfb + d * stride_dfd + j * stride_dfk,
                     mask=(j >= 0) & (j < WIDTH - 1) & d_ok, other=0.0).to(tl.float32)
        if HAS_SEQ:
            df = tl.where(sid_u == _seq_at(seq_ptr, b, T - 1, T, stride_sb, stride_st), df, 0.0)
        dh += df
    t = u - (WIDTH - 1)
    tl.store(dx_ptr + b * stride_dxb + t * stride_dxt + d * stride_dxd, dh.to(dx_ptr.dtype.element_ty),
             mask=(t >= 0) & (t < T) & d_ok)
    if HAS_INIT:
        tl.store(dinit_ptr + b * stride_dib + d * stride_did + u * stride_dik, dh.to(dinit_ptr.dtype.element_ty),
                 mask=(u < WIDTH - 1) & d_ok)


@triton.jit
def _causal_conv1d_step_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, D,
    stride_xb, stride_xd, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk, stride_yb, stride_yd,
    WIDTH: tl.constexpr, WIDTH_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(B, cdiv(D, BLOCK_D))``: ``y = act(bias + sum_k w[k] * window[k])`` with
    ``window = [state | x]`` (``K`` columns), then ``state <- window[1:]`` in place."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    k = tl.arange(0, WIDTH_POW2)[None, :]
    d_ok = d < D
    x = tl.load(x_ptr + b * stride_xb + d * stride_xd, mask=d_ok, other=0.0)  # [BD, 1]
    row = state_ptr + b * stride_sb + d * stride_sd
    # As in the reference, the state is used in x's dtype.
    window = tl.load(row + k * stride_sk, mask=d_ok & (k < WIDTH - 1), other=0.0).to(x.dtype)
    window = tl.where(k == WIDTH - 1, x, window).to(tl.float32)
    shifted = tl.load(row + (k + 1) * stride_sk, mask=d_ok & (k + 1 < WIDTH - 1), other=0.0).to(x.dtype)
    shifted = tl.where(k + 1 == WIDTH - 1, x, shifted)
    w = tl.load(w_ptr + d * stride_wd + k * stride_wk, mask=d_ok & (k < WIDTH), other=0.0).to(tl.float32)
    y = _sum(window * w, axis=1)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    if SILU:
        y = y * _sigmoid(y)
    tl.store(y_ptr + b * stride_yb + d * stride_yd, y.to(y_ptr.dtype.element_ty), mask=d_ok)
    # Every thread of the program must have read the old state before any of it is overwritten.
    tl.debug_barrier()
    tl.store(row + k * stride_sk, shifted.to(state_ptr.dtype.element_ty), mask=d_ok & (k < WIDTH - 1))


def _blocks(**gpu_only) -> dict:
    """Launch keywords: the fixed interpreter tile, or on GPU ``gpu_only`` (the autotuner picks the rest)."""
    return dict(BLOCK_T=INTERPRET_BLOCK_T, BLOCK_D=INTERPRET_BLOCK_D) if interpreting() else gpu_only


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return (0,) * ndim if t is None or t.numel() == 0 else tuple(t.stride())


class CausalConv1dFn(torch.autograd.Function):
    """Autograd around the forward and backward kernels; ``seq_idx`` and ``activation`` get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seq_idx, activation):
        silu = _silu_flag(activation)
        batch, seqlen, dim = x.shape
        width = weight.shape[-1]
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        final = x.new_empty(batch, dim, width - 1)

        def grid(meta):
            return batch, triton.cdiv(seqlen, meta["BLOCK_T"]), triton.cdiv(dim, meta["BLOCK_D"])

        _causal_conv1d_fwd_kernel[grid](
            x, weight, bias, initial_state, seq_idx, y, final, seqlen, dim,
            *x.stride(), *weight.stride(), *_strides(initial_state, 3), *_strides(seq_idx, 2),
            *y.stride(), *_strides(final, 3),
            WIDTH=width, STATE_POW2=triton.next_power_of_2(max(width - 1, 1)), HAS_BIAS=bias is not None,
            HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None, SILU=silu, **_blocks(),
        )
        ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
        ctx.silu = silu
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
        batch, seqlen, dim = x.shape
        width = weight.shape[-1]
        if dy is None:
            dy = torch.zeros_like(x)
        has_dfinal = dfinal is not None and width > 1
        block_t = INTERPRET_BLOCK_T if interpreting() else BWD_BLOCK_T
        tiles = triton.cdiv(width - 1 + seqlen, block_t)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dinit = None if initial_state is None else torch.empty_like(initial_state,
                                                                    memory_format=torch.contiguous_format)
        dw_part = x.new_empty(batch, tiles, dim, width, dtype=torch.float32)
        db_part = None if bias is None else x.new_empty(batch, tiles, dim, dtype=torch.float32)

        def grid(meta):
            return batch, tiles, triton.cdiv(dim, meta["BLOCK_D"])

        _causal_conv1d_bwd_kernel[grid](
            x, weight, bias, initial_state, seq_idx, dy, dfinal if has_dfinal else None, dx, dinit, dw_part, db_part,
            seqlen, dim, *x.stride(), *weight.stride(), *_strides(initial_state, 3), *_strides(seq_idx, 2),
            *dy.stride(), *_strides(dfinal if has_dfinal else None, 3), *dx.stride(), *_strides(dinit, 3),
            *dw_part.stride()[:3], *_strides(db_part, 3),
            WIDTH=width, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
            HAS_DFINAL=has_dfinal, SILU=ctx.silu,
            **_blocks(BLOCK_T=BWD_BLOCK_T),
        )
        dw = dw_part.sum((0, 1)).to(weight.dtype)
        db = None if bias is None else db_part.sum((0, 1)).to(bias.dtype)
        return dx, dw, db, dinit, None, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution over time, with gradients for ``x``, ``weight``, ``bias`` and
    ``initial_state`` (and through the final state).

    Args:
        x: ``[B, T, D]`` inputs.
        weight: ``[D, K]`` one filter per channel.
        bias: ``[D]`` or ``None``.
        initial_state: ``[B, D, K - 1]`` the inputs before ``x`` (oldest first), or ``None`` for zeros.
        seq_idx: ``[B, T]`` non-decreasing document ids; the initial state belongs to ``seq_idx[:, 0]``.
        activation: ``None``/``"identity"`` or ``"silu"``.
    Returns:
        ``y`` ``[B, T, D]`` in ``x.dtype`` and the final state ``[B, D, K - 1]`` in ``x.dtype`` (inputs of
        the last document only).
    """
    batch, seqlen, dim = x.shape
    width = weight.shape[-1]
    if weight.shape != (dim, width):
        raise ValueError(f"weight must be [D={dim}, K], got {tuple(weight.shape)}")
    _silu_flag(activation)
    if seqlen == 0:  # no program to launch; the reference's answer is the initial state itself
        from .naive import causal_conv1d_ref

        return causal_conv1d_ref(x, weight, bias, initial_state=initial_state, seq_idx=seq_idx, activation=activation)
    return CausalConv1dFn.apply(x, weight, bias, initial_state, seq_idx, activation)


def causal_conv1d_step_triton(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, updating ``state`` in place (no autograd).

    Args:
        x: ``[B, D]`` the new input; weight: ``[D, K]``; bias: ``[D]`` or ``None``.
        state: ``[B, D, K - 1]`` the previous ``K - 1`` inputs (oldest first). It is overwritten with
            the inputs after this token (shifted by one, ``x`` last).
    Returns:
        ``y`` ``[B, D]`` in ``x.dtype`` and ``state`` itself (the same tensor object).
    """
    silu = _silu_flag(activation)
    batch, dim = x.shape
    width = weight.shape[-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _causal_conv1d_step_kernel[(batch, triton.cdiv(dim, STEP_BLOCK_D))](
        x, state, weight, bias, y, dim, *x.stride(), *_strides(state, 3), *weight.stride(), *y.stride(),
        WIDTH=width, WIDTH_POW2=triton.next_power_of_2(width), HAS_BIAS=bias is not None, SILU=silu,
        BLOCK_D=STEP_BLOCK_D,
    )
    return y, state
