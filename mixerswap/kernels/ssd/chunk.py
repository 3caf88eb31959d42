"""Triton kernels of the chunked SSD scan, forward and backward, and the functions that launch them.

The algorithm is that of :func:`~mixerswap.kernels.ssd.naive.ssd_chunk_scan_ref`; the backward pass is
derived in ``README.md`` beside this file. :mod:`mixerswap.kernels.ssd.triton` computes the cheap
per-position quantities in PyTorch and calls the launchers below for everything that costs
``O(T * chunk * dim)`` or ``O(T * P * N)``.

Layouts shared by all kernels (``Tp`` is ``T`` padded to a multiple of the chunk, ``nc = Tp / chunk``):

* ``x`` ``[B, T, G, P]``, ``B`` ``[B, T, G, N]``, ``C`` ``[B, T, H, N]``, ``y`` / ``dy`` ``[B, T, H, P]``,
  any strides; rows at ``t >= T`` are never read or written.
* per-position scalars ``dt``, ``acum`` (within-chunk cumulative sum of ``dt * A``), ``w`` (weight of a
  position in its chunk's state) and ``v`` (weight of the entering state at a position): ``[B, H, Tp]``
  fp32, contiguous, zero ``dt`` on the padding.
* ``seq_idx`` ``[B, Tp]`` int32, the padding repeating the last id.
* states ``[B, nc, H, P, N]`` fp32, contiguous.

The scan kernels take the whole padded head size ``P_PAD`` and state size ``N_PAD`` in one tile, split
the chunk into blocks of ``BLOCK_L`` positions and read a ``[P, N]`` fp32 state ``BLOCK_K`` rows or
columns at a time (a whole one would not fit in registers). Dots run on the input dtype (tensor cores for bf16/fp16)
with fp32 accumulation; with fp32 inputs ``PRECISION`` is ``"ieee"`` so they match the reference to
rounding. On CUDA each kernel is autotuned over a few configurations; under ``TRITON_INTERPRET=1``
one configuration is chosen from the shapes (autotuning under the interpreter is very slow).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import triton_support


def _pad(n: int) -> int:
    """Block size covering ``n`` whole (``tl.dot`` wants at least 16)."""
    return max(16, triton.next_power_of_2(n))


def _autotuned(configs: dict[str, list[triton.Config]], key: list[str]):
    """``triton.autotune`` on a GPU over ``configs[PRECISION]``; the bare kernel under the interpreter
    (the launcher then passes its meta-parameters).

    fp32 inputs (``"ieee"``) have their own list: their dots run without tensor cores and want smaller
    tiles than bf16 / fp16 (``"tf32"``) to stay in registers.
    """

    def prune(candidates, named_args, **kwargs):
        return [c for c in candidates if c in configs[kwargs["PRECISION"]]]

    def wrap(kernel):
        if triton_support.interpreting():
            return kernel
        every = [c for choices in configs.values() for c in choices]
        return triton.autotune(configs=every, key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    return wrap


def _interpreter_meta(**meta) -> dict:
    """Meta-parameters to pass explicitly: ``meta`` under the interpreter, none on a GPU (autotuned)."""
    return meta if triton_support.interpreting() else {}


# Largest block the interpreter uses (it takes the whole chunk, P and N up to this): tests lower it to
# run the multi-block loops and grids that the GPU configurations take.
INTERPRETER_MAX_BLOCK = 64


def _chunk_block(chunk_size: int) -> int:
    return min(INTERPRETER_MAX_BLOCK, _pad(chunk_size))


def _state_k_block(headdim: int, dstate: int) -> int:
    """Rows / columns of a ``[P, N]`` fp32 state that the scan kernels hold at once."""
    cap = INTERPRETER_MAX_BLOCK if triton_support.interpreting() else 32
    return min(cap, _pad(max(headdim, dstate)))


_SCAN_CONFIGS = {
    "tf32": [
        triton.Config({"BLOCK_L": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_L": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_L": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_L": 32}, num_warps=8, num_stages=2),
    ],
    "ieee": [
        triton.Config({"BLOCK_L": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_L": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_L": 32}, num_warps=8, num_stages=1),
    ],
}
_OUTER_CONFIGS = {
    "tf32": [
        triton.Config({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BLOCK_N": 128, "BLOCK_L": 32}, num_warps=8, num_stages=2),
    ],
    "ieee": [
        triton.Config({"BLOCK_P": 32, "BLOCK_N": 64, "BLOCK_L": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 32, "BLOCK_N": 32, "BLOCK_L": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_L": 32}, num_warps=8, num_stages=1),
    ],
}
_STATE_BLOCK = 1024  # elements of a [P, N] state per program in the (memory-bound) state passing


# The interpreter runs functions that triton.language defines with ``@triton.jit`` (``tl.sum``,
# ``tl.zeros``) only when TRITON_INTERPRET=1 was set before triton was first imported, which a host
# program may not guarantee; builtins (``tl.full``, ``tl.reduce``) and our own kernels, defined at
# this module's lazy import, always work.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@_autotuned(_OUTER_CONFIGS, key=["CHUNK", "P", "N"])
@triton.jit
def _chunk_outer_kernel(
    u_ptr, v_ptr, w_ptr, out_ptr,
    T, Tp, nchunks, H,
    s_ub, s_ut, s_uh, s_up,
    s_vb, s_vt, s_vh, s_vn,
    U_DIV: tl.constexpr, V_DIV: tl.constexpr,
    P: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """``out[b, c, h] = sum_l u[b, t, h // U_DIV]^T w[b, h, t] v[b, t, h // V_DIV]`` over chunk ``c``: ``[P, N]``.

    With ``u = x``, ``v = B`` and ``w`` the decay to the chunk's end times ``dt`` this is the state a
    chunk adds; with ``u = dy``, ``v = C`` and ``w`` the decay from the chunk's start it is the gradient
    of the state entering the chunk through that chunk's outputs.
    """
    pid_bch = tl.program_id(0).to(tl.int64)
    h = pid_bch % H
    c = (pid_bch // H) % nchunks
    b = pid_bch // (H * nchunks)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    u_ptr += b * s_ub + (h // U_DIV) * s_uh
    v_ptr += b * s_vb + (h // V_DIV) * s_vh
    w_ptr += (b * H + h) * Tp
    acc = tl.full((BLOCK_P, BLOCK_N), 0.0, tl.float32)
    for l0 in range(0, CHUNK, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        t = c * CHUNK + offs_l
        mask_l = (offs_l < CHUNK) & (t < T)
        u = tl.load(u_ptr + t[None, :] * s_ut + offs_p[:, None] * s_up,
                    mask=mask_l[None, :] & (offs_p[:, None] < P), other=0.0)
        v = tl.load(v_ptr + t[:, None] * s_vt + offs_n[None, :] * s_vn,
                    mask=mask_l[:, None] & (offs_n[None, :] < N), other=0.0)
        w = tl.load(w_ptr + t, mask=mask_l, other=0.0)
        acc += tl.dot(u, (v * w[:, None]).to(u.dtype), input_precision=PRECISION)
    out_ptr += pid_bch * P * N
    tl.store(out_ptr + offs_p[:, None] * N + offs_n[None, :], acc, mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, carry_ptr, init_ptr, final_ptr,
    nchunks, H, PN,
    HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Replace each chunk's own state by the state entering it; write the final state.

    ``S_in[c + 1] = carry[c] * S_in[c] + states[c]`` with ``S_in[0]`` the initial state; ``carry``
    ``[B, H, nc]`` is the chunk's total decay (zero when a document starts inside it). In place: the
    program reads ``states[c]`` before writing ``S_in[c]`` over it.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    h = pid_bh % H
    b = pid_bh // H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_INIT:
        s = tl.load(init_ptr + pid_bh * PN + offs, mask=mask, other=0.0)
    else:
        s = tl.full((BLOCK,), 0.0, tl.float32)
    for c in range(nchunks):
        ptr = states_ptr + ((b * nchunks + c) * H + h) * PN + offs
        own = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, s, mask=mask)
        s = tl.load(carry_ptr + pid_bh * nchunks + c) * s + own
    tl.store(final_ptr + pid_bh * PN + offs, s, mask=mask)


@triton.jit
def _state_passing_bwd_kernel(
    dstates_ptr, entering_ptr, carry_ptr, dfinal_ptr, dinit_ptr, dcarry_ptr,
    nchunks, H, PN, nblocks,
    HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward of the state passing, from the last chunk to the first.

    On entry ``dstates[c]`` holds the gradient of ``S_in[c]`` through chunk ``c``'s outputs; on exit
    the gradient of the state chunk ``c`` adds (that of ``S_in[c + 1]``, or of the final state). Also
    writes the gradient of the initial state and, per block of state elements, of ``carry``
    (``dcarry`` ``[B, H, nc, nblocks]``, summed by the caller).
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    h = pid_bh % H
    b = pid_bh // H
    offs = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_DFINAL:
        g = tl.load(dfinal_ptr + pid_bh * PN + offs, mask=mask, other=0.0)
    else:
        g = tl.full((BLOCK,), 0.0, tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        base = ((b * nchunks + c) * H + h) * PN
        through_outputs = tl.load(dstates_ptr + base + offs, mask=mask, other=0.0)
        tl.store(dstates_ptr + base + offs, g, mask=mask)
        entering = tl.load(entering_ptr + base + offs, mask=mask, other=0.0)
        tl.store(dcarry_ptr + (pid_bh * nchunks + c) * nblocks + pid_k, _sum(g * entering, axis=0))
        g = tl.load(carry_ptr + pid_bh * nchunks + c) * g + through_outputs
    tl.store(dinit_ptr + pid_bh * PN + offs, g, mask=mask)


@_autotuned(_SCAN_CONFIGS, key=["CHUNK", "P_PAD", "N_PAD"])
@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, B_ptr, C_ptr, y_ptr, dt_ptr, acum_ptr, v_ptr, entering_ptr, D_ptr, seq_ptr,
    T, Tp, nchunks, H, R,
    s_xb, s_xt, s_xg, s_xp,
    s_bb, s_bt, s_bg, s_bn,
    s_cb, s_ct, s_ch, s_cn,
    s_yb, s_yt, s_yh, s_yp,
    P: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
    P_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Outputs of ``BLOCK_L`` positions of one chunk and head.

    ``y_l = v_l C_l S_in^T + sum_{s <= l} (C_l . B_s) exp(acum_l - acum_s) dt_s x_s + D x_l``, the sum
    running over positions ``s`` of the same chunk and document.
    """
    pid_bch = tl.program_id(0).to(tl.int64)
    h = pid_bch % H
    c = (pid_bch // H) % nchunks
    b = pid_bch // (H * nchunks)
    g = h // R
    l0 = tl.program_id(1) * BLOCK_L
    offs_l = l0 + tl.arange(0, BLOCK_L)
    t_l = c * CHUNK + offs_l
    in_chunk_l = offs_l < CHUNK
    mask_l = in_chunk_l & (t_l < T)
    offs_p = tl.arange(0, P_PAD)
    offs_n = tl.arange(0, N_PAD)
    x_ptr += b * s_xb + g * s_xg
    B_ptr += b * s_bb + g * s_bg
    C_ptr += b * s_cb + h * s_ch
    row = (b * H + h) * Tp

    acum_l = tl.load(acum_ptr + row + t_l, mask=in_chunk_l, other=0.0)
    v_l = tl.load(v_ptr + row + t_l, mask=in_chunk_l, other=0.0)
    acc = tl.full((BLOCK_L, P_PAD), 0.0, tl.float32)
    for k0 in range(0, N, BLOCK_K):  # the entering state, BLOCK_K columns at a time (fewer registers)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        C_k = tl.load(C_ptr + t_l[:, None] * s_ct + offs_k[None, :] * s_cn,
                      mask=mask_l[:, None] & (offs_k[None, :] < N), other=0.0)
        entering = tl.load(entering_ptr + pid_bch * P * N + offs_k[:, None] + offs_p[None, :] * N,
                           mask=(offs_k[:, None] < N) & (offs_p[None, :] < P), other=0.0)  # [K, P]
        acc += tl.dot(C_k.to(tl.float32), entering, input_precision=PRECISION)
    acc *= v_l[:, None]
    C_l = tl.load(C_ptr + t_l[:, None] * s_ct + offs_n[None, :] * s_cn,
                  mask=mask_l[:, None] & (offs_n[None, :] < N), other=0.0)
    if HAS_SEQ:
        sid_l = tl.load(seq_ptr + b * Tp + t_l, mask=in_chunk_l, other=0)

    for s0 in range(0, l0 + BLOCK_L, BLOCK_L):
        offs_s = s0 + tl.arange(0, BLOCK_L)
        t_s = c * CHUNK + offs_s
        in_chunk_s = offs_s < CHUNK
        mask_s = in_chunk_s & (t_s < T)
        B_s = tl.load(B_ptr + t_s[:, None] * s_bt + offs_n[None, :] * s_bn,
                      mask=mask_s[:, None] & (offs_n[None, :] < N), other=0.0)
        x_s = tl.load(x_ptr + t_s[:, None] * s_xt + offs_p[None, :] * s_xp,
                      mask=mask_s[:, None] & (offs_p[None, :] < P), other=0.0)
        dt_s = tl.load(dt_ptr + row + t_s, mask=in_chunk_s, other=0.0)
        acum_s = tl.load(acum_ptr + row + t_s, mask=in_chunk_s, other=0.0)
        keep = (offs_l[:, None] >= offs_s[None, :]) & mask_s[None, :]
        if HAS_SEQ:
            sid_s = tl.load(seq_ptr + b * Tp + t_s, mask=in_chunk_s, other=-1)
            keep = keep & (sid_l[:, None] == sid_s[None, :])
        decay = tl.exp(tl.where(keep, acum_l[:, None] - acum_s[None, :], float("-inf")))
        scores = tl.dot(C_l, tl.trans(B_s), input_precision=PRECISION)
        acc += tl.dot((scores * decay * dt_s[None, :]).to(x_s.dtype), x_s, input_precision=PRECISION)

    if HAS_D:
        x_l = tl.load(x_ptr + t_l[:, None] * s_xt + offs_p[None, :] * s_xp,
                      mask=mask_l[:, None] & (offs_p[None, :] < P), other=0.0)
        acc += tl.load(D_ptr + h).to(tl.float32) * x_l.to(tl.float32)
    y_ptr += b * s_yb + h * s_yh
    tl.store(y_ptr + t_l[:, None] * s_yt + offs_p[None, :] * s_yp, acc.to(y_ptr.dtype.element_ty),
             mask=mask_l[:, None] & (offs_p[None, :] < P))


@_autotuned(_SCAN_CONFIGS, key=["CHUNK", "P_PAD", "N_PAD"])
@triton.jit
def _chunk_scan_bwd_dc_kernel(
    x_ptr, B_ptr, C_ptr, dy_ptr, dt_ptr, acum_ptr, v_ptr, entering_ptr, seq_ptr,
    dC_ptr, dacum_ptr, dv_ptr,
    T, Tp, nchunks, H, R,
    s_xb, s_xt, s_xg, s_xp,
    s_bb, s_bt, s_bg, s_bn,
    s_cb, s_ct, s_ch, s_cn,
    s_yb, s_yt, s_yh, s_yp,
    P: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    P_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients carried by the rows ``l`` of one chunk and head: ``dC_l``, and of ``acum_l`` and ``v_l``.

    With ``G[l, s] = dy_l . x_s`` and ``dS[l, s] = G exp(acum_l - acum_s) dt_s`` (causal, same document):
    ``dC_l = sum_s dS[l, s] B_s + v_l dy_l S_in``, ``dacum_l = sum_s dS[l, s] (C_l . B_s)`` (the part
    through the rows of the decay) and ``dv_l = C_l . (dy_l S_in)``.
    """
    pid_bch = tl.program_id(0).to(tl.int64)
    h = pid_bch % H
    c = (pid_bch // H) % nchunks
    b = pid_bch // (H * nchunks)
    g = h // R
    l0 = tl.program_id(1) * BLOCK_L
    offs_l = l0 + tl.arange(0, BLOCK_L)
    t_l = c * CHUNK + offs_l
    in_chunk_l = offs_l < CHUNK
    mask_l = in_chunk_l & (t_l < T)
    offs_p = tl.arange(0, P_PAD)
    offs_n = tl.arange(0, N_PAD)
    x_ptr += b * s_xb + g * s_xg
    B_ptr += b * s_bb + g * s_bg
    C_ptr += b * s_cb + h * s_ch
    dy_ptr += b * s_yb + h * s_yh
    row = (b * H + h) * Tp

    C_l = tl.load(C_ptr + t_l[:, None] * s_ct + offs_n[None, :] * s_cn,
                  mask=mask_l[:, None] & (offs_n[None, :] < N), other=0.0)
    dy_l = tl.load(dy_ptr + t_l[:, None] * s_yt + offs_p[None, :] * s_yp,
                   mask=mask_l[:, None] & (offs_p[None, :] < P), other=0.0)
    acum_l = tl.load(acum_ptr + row + t_l, mask=in_chunk_l, other=0.0)
    v_l = tl.load(v_ptr + row + t_l, mask=in_chunk_l, other=0.0)
    if HAS_SEQ:
        sid_l = tl.load(seq_ptr + b * Tp + t_l, mask=in_chunk_l, other=0)
    dC = tl.full((BLOCK_L, N_PAD), 0.0, tl.float32)
    dacum = tl.full((BLOCK_L,), 0.0, tl.float32)

    for s0 in range(0, l0 + BLOCK_L, BLOCK_L):
        offs_s = s0 + tl.arange(0, BLOCK_L)
        t_s = c * CHUNK + offs_s
        in_chunk_s = offs_s < CHUNK
        mask_s = in_chunk_s & (t_s < T)
        B_s = tl.load(B_ptr + t_s[:, None] * s_bt + offs_n[None, :] * s_bn,
                      mask=mask_s[:, None] & (offs_n[None, :] < N), other=0.0)
        x_s = tl.load(x_ptr + t_s[:, None] * s_xt + offs_p[None, :] * s_xp,
                      mask=mask_s[:, None] & (offs_p[None, :] < P), other=0.0)
        dt_s = tl.load(dt_ptr + row + t_s, mask=in_chunk_s, other=0.0)
        acum_s = tl.load(acum_ptr + row + t_s, mask=in_chunk_s, other=0.0)
        keep = (offs_l[:, None] >= offs_s[None, :]) & mask_s[None, :]
        if HAS_SEQ:
            sid_s = tl.load(seq_ptr + b * Tp + t_s, mask=in_chunk_s, other=-1)
            keep = keep & (sid_l[:, None] == sid_s[None, :])
        decay = tl.exp(tl.where(keep, acum_l[:, None] - acum_s[None, :], float("-inf")))
        grad_scores = tl.dot(dy_l, tl.trans(x_s), input_precision=PRECISION) * decay * dt_s[None, :]
        scores = tl.dot(C_l, tl.trans(B_s), input_precision=PRECISION)
        dC += tl.dot(grad_scores.to(B_s.dtype), B_s, input_precision=PRECISION)
        dacum += _sum(grad_scores * scores, axis=1)

    dC_inter = tl.full((BLOCK_L, N_PAD), 0.0, tl.float32)  # dy_l S_in, BLOCK_K rows of the state at a time
    for k0 in range(0, P, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        dy_k = tl.load(dy_ptr + t_l[:, None] * s_yt + offs_k[None, :] * s_yp,
                       mask=mask_l[:, None] & (offs_k[None, :] < P), other=0.0)
        entering = tl.load(entering_ptr + pid_bch * P * N + offs_k[:, None] * N + offs_n[None, :],
                           mask=(offs_k[:, None] < P) & (offs_n[None, :] < N), other=0.0)  # [K, N]
        dC_inter += tl.dot(dy_k.to(tl.float32), entering, input_precision=PRECISION)
    dC += v_l[:, None] * dC_inter
    dv = _sum(dC_inter * C_l.to(tl.float32), axis=1)

    dC_ptr += b * s_cb + h * s_ch
    tl.store(dC_ptr + t_l[:, None] * s_ct + offs_n[None, :] * s_cn, dC.to(dC_ptr.dtype.element_ty),
             mask=mask_l[:, None] & (offs_n[None, :] < N))
    tl.store(dacum_ptr + row + t_l, dacum, mask=in_chunk_l)
    tl.store(dv_ptr + row + t_l, dv, mask=in_chunk_l)


@_autotuned(_SCAN_CONFIGS, key=["CHUNK", "P_PAD", "N_PAD"])
@triton.jit
def _chunk_scan_bwd_dxdb_kernel(
    x_ptr, B_ptr, C_ptr, dy_ptr, dt_ptr, acum_ptr, w_ptr, dstates_ptr, D_ptr, seq_ptr,
    dx_ptr, dB_ptr, ddt_ptr, dacum_ptr, dw_ptr,
    T, Tp, nchunks, H, R,
    s_xb, s_xt, s_xg, s_xp,
    s_bb, s_bt, s_bg, s_bn,
    s_cb, s_ct, s_ch, s_cn,
    s_yb, s_yt, s_yh, s_yp,
    P: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
    P_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients carried by the columns ``s`` of one chunk and group, summed over the group's heads.

    Per head ``h`` (``M[l, s] = (C_l . B_s) exp(acum_l - acum_s)``, causal, same document; ``dS_h`` the
    gradient of the state the chunk adds):
    ``dx_s += dt_s sum_l M[l, s] dy_l + w_s B_s dS_h^T + D_h dy_s``,
    ``dB_s += dt_s sum_l G[l, s] exp(acum_l - acum_s) C_l + w_s x_s dS_h``, and per head the gradients
    of ``dt_s`` through the intra-chunk outputs, of ``acum_s`` through the columns of the decay, and of
    ``w_s``.
    """
    pid_bcg = tl.program_id(0).to(tl.int64)
    G = H // R
    g = pid_bcg % G
    c = (pid_bcg // G) % nchunks
    b = pid_bcg // (G * nchunks)
    s0 = tl.program_id(1) * BLOCK_L
    offs_s = s0 + tl.arange(0, BLOCK_L)
    t_s = c * CHUNK + offs_s
    in_chunk_s = offs_s < CHUNK
    mask_s = in_chunk_s & (t_s < T)
    offs_p = tl.arange(0, P_PAD)
    offs_n = tl.arange(0, N_PAD)
    x_ptr += b * s_xb + g * s_xg
    B_ptr += b * s_bb + g * s_bg
    mask_sp = mask_s[:, None] & (offs_p[None, :] < P)
    mask_sn = mask_s[:, None] & (offs_n[None, :] < N)
    x_s = tl.load(x_ptr + t_s[:, None] * s_xt + offs_p[None, :] * s_xp, mask=mask_sp, other=0.0)
    B_s = tl.load(B_ptr + t_s[:, None] * s_bt + offs_n[None, :] * s_bn, mask=mask_sn, other=0.0)
    if HAS_SEQ:
        sid_s = tl.load(seq_ptr + b * Tp + t_s, mask=in_chunk_s, other=-1)
    dx = tl.full((BLOCK_L, P_PAD), 0.0, tl.float32)
    dB = tl.full((BLOCK_L, N_PAD), 0.0, tl.float32)

    for r in range(R):
        h = g * R + r
        row = (b * H + h) * Tp
        dt_s = tl.load(dt_ptr + row + t_s, mask=in_chunk_s, other=0.0)
        acum_s = tl.load(acum_ptr + row + t_s, mask=in_chunk_s, other=0.0)
        w_s = tl.load(w_ptr + row + t_s, mask=in_chunk_s, other=0.0)
        C_head = C_ptr + b * s_cb + h * s_ch
        dy_head = dy_ptr + b * s_yb + h * s_yh
        dx_intra = tl.full((BLOCK_L, P_PAD), 0.0, tl.float32)  # sum_l M[l, s] dy_l
        dacum = tl.full((BLOCK_L,), 0.0, tl.float32)
        for l0 in range(s0, CHUNK, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            t_l = c * CHUNK + offs_l
            in_chunk_l = offs_l < CHUNK
            mask_l = in_chunk_l & (t_l < T)
            C_l = tl.load(C_head + t_l[:, None] * s_ct + offs_n[None, :] * s_cn,
                          mask=mask_l[:, None] & (offs_n[None, :] < N), other=0.0)
            dy_l = tl.load(dy_head + t_l[:, None] * s_yt + offs_p[None, :] * s_yp,
                           mask=mask_l[:, None] & (offs_p[None, :] < P), other=0.0)
            acum_l = tl.load(acum_ptr + row + t_l, mask=in_chunk_l, other=0.0)
            keep = (offs_l[None, :] >= offs_s[:, None]) & mask_l[None, :]  # [s, l]
            if HAS_SEQ:
                sid_l = tl.load(seq_ptr + b * Tp + t_l, mask=in_chunk_l, other=-2)
                keep = keep & (sid_s[:, None] == sid_l[None, :])
            decay = tl.exp(tl.where(keep, acum_l[None, :] - acum_s[:, None], float("-inf")))
            scores_t = tl.dot(B_s, tl.trans(C_l), input_precision=PRECISION)
            dx_intra += tl.dot((scores_t * decay).to(dy_l.dtype), dy_l, input_precision=PRECISION)
            grad_scores_t = tl.dot(x_s, tl.trans(dy_l), input_precision=PRECISION) * decay * dt_s[:, None]
            dB += tl.dot(grad_scores_t.to(C_l.dtype), C_l, input_precision=PRECISION)
            dacum -= _sum(grad_scores_t * scores_t, axis=1)
        ddt = _sum(dx_intra * x_s.to(tl.float32), axis=1)
        dx += dt_s[:, None] * dx_intra

        # Through the chunk's state dS_h [P, N], BLOCK_K rows or columns of it at a time.
        dstate_ptr = dstates_ptr + ((b * nchunks + c) * H + h) * P * N
        x_dstate = tl.full((BLOCK_L, N_PAD), 0.0, tl.float32)  # x_s dS_h
        for k0 in range(0, P, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_k = tl.load(x_ptr + t_s[:, None] * s_xt + offs_k[None, :] * s_xp,
                          mask=mask_s[:, None] & (offs_k[None, :] < P), other=0.0)
            dstate = tl.load(dstate_ptr + offs_k[:, None] * N + offs_n[None, :],
                             mask=(offs_k[:, None] < P) & (offs_n[None, :] < N), other=0.0)  # [K, N]
            x_dstate += tl.dot(x_k.to(tl.float32), dstate, input_precision=PRECISION)
        dB += w_s[:, None] * x_dstate
        dw = _sum(x_dstate * B_s.to(tl.float32), axis=1)
        B_dstate = tl.full((BLOCK_L, P_PAD), 0.0, tl.float32)  # B_s dS_h^T
        for k0 in range(0, N, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            B_k = tl.load(B_ptr + t_s[:, None] * s_bt + offs_k[None, :] * s_bn,
                          mask=mask_s[:, None] & (offs_k[None, :] < N), other=0.0)
            dstate = tl.load(dstate_ptr + offs_p[None, :] * N + offs_k[:, None],
                             mask=(offs_p[None, :] < P) & (offs_k[:, None] < N), other=0.0)  # [K, P]
            B_dstate += tl.dot(B_k.to(tl.float32), dstate, input_precision=PRECISION)
        dx += w_s[:, None] * B_dstate
        if HAS_D:
            dy_s = tl.load(dy_head + t_s[:, None] * s_yt + offs_p[None, :] * s_yp, mask=mask_sp, other=0.0)
            dx += tl.load(D_ptr + h).to(tl.float32) * dy_s.to(tl.float32)
        tl.store(ddt_ptr + row + t_s, ddt, mask=in_chunk_s)
        tl.store(dacum_ptr + row + t_s, dacum, mask=in_chunk_s)
        tl.store(dw_ptr + row + t_s, dw, mask=in_chunk_s)

    dx_ptr += b * s_xb + g * s_xg
    dB_ptr += b * s_bb + g * s_bg
    tl.store(dx_ptr + t_s[:, None] * s_xt + offs_p[None, :] * s_xp, dx.to(dx_ptr.dtype.element_ty), mask=mask_sp)
    tl.store(dB_ptr + t_s[:, None] * s_bt + offs_n[None, :] * s_bn, dB.to(dB_ptr.dtype.element_ty), mask=mask_sn)


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def chunk_outer(u, v, w, *, chunk_size: int, heads: int) -> torch.Tensor:
    """``[B, nc, H, P, N]`` fp32: per chunk and head, ``sum_l u_l^T w_l v_l`` (see :func:`_chunk_outer_kernel`).

    ``u`` ``[B, T, Hu, P]`` and ``v`` ``[B, T, Hv, N]`` in one dtype, with ``Hu`` and ``Hv`` dividing
    ``heads``; ``w`` ``[B, H, Tp]`` fp32.
    """
    batch, seqlen, u_heads, headdim = u.shape
    dstate = v.shape[-1]
    tp = w.shape[-1]
    nchunks = tp // chunk_size
    out = torch.empty(batch, nchunks, heads, headdim, dstate, device=u.device, dtype=torch.float32)
    cap = INTERPRETER_MAX_BLOCK
    meta = _interpreter_meta(BLOCK_P=min(cap, _pad(headdim)), BLOCK_N=min(cap, _pad(dstate)),
                             BLOCK_L=_chunk_block(chunk_size))

    def grid(m):
        return (batch * nchunks * heads, triton.cdiv(headdim, m["BLOCK_P"]), triton.cdiv(dstate, m["BLOCK_N"]))

    _chunk_outer_kernel[grid](
        u, v, w, out, seqlen, tp, nchunks, heads, *_strides(u), *_strides(v),
        U_DIV=heads // u_heads, V_DIV=heads // v.shape[2], P=headdim, N=dstate, CHUNK=chunk_size,
        PRECISION=_precision(u), **meta,
    )
    return out


def _state_block(numel: int) -> int:
    whole = triton.next_power_of_2(numel)
    return whole if triton_support.interpreting() else min(_STATE_BLOCK, whole)


def state_passing_fwd(states, carry, initial_state):
    """In place, ``states`` ``[B, nc, H, P, N]`` becomes the states entering each chunk; returns the final
    state ``[B, H, P, N]`` fp32. ``carry`` ``[B, H, nc]``; ``initial_state`` fp32 contiguous or ``None``."""
    batch, nchunks, heads, headdim, dstate = states.shape
    numel = headdim * dstate
    block = _state_block(numel)
    final = torch.empty(batch, heads, headdim, dstate, device=states.device, dtype=torch.float32)
    _state_passing_fwd_kernel[(batch * heads, triton.cdiv(numel, block))](
        states, carry, initial_state if initial_state is not None else final, final, nchunks, heads, numel,
        HAS_INIT=initial_state is not None, BLOCK=block,
    )
    return final


def state_passing_bwd(dstates, entering, carry, dfinal):
    """In place, ``dstates`` (gradients of the entering states through the outputs) becomes the
    gradients of the chunks' own states. Returns ``(d initial state [B, H, P, N], d carry [B, H, nc])``."""
    batch, nchunks, heads, headdim, dstate = dstates.shape
    numel = headdim * dstate
    block = _state_block(numel)
    nblocks = triton.cdiv(numel, block)
    dinit = torch.empty(batch, heads, headdim, dstate, device=dstates.device, dtype=torch.float32)
    dcarry = torch.empty(batch, heads, nchunks, nblocks, device=dstates.device, dtype=torch.float32)
    _state_passing_bwd_kernel[(batch * heads, nblocks)](
        dstates, entering, carry, dfinal if dfinal is not None else dinit, dinit, dcarry,
        nchunks, heads, numel, nblocks, HAS_DFINAL=dfinal is not None, BLOCK=block,
    )
    return dinit, dcarry.sum(-1)


def chunk_scan_fwd(x, B, C, dt, acum, v, entering, D, seq_idx, *, chunk_size: int) -> torch.Tensor:
    """``y`` ``[B, T, H, P]`` in ``x.dtype`` (see :func:`_chunk_scan_fwd_kernel`)."""
    batch, seqlen, _, headdim = x.shape
    heads, dstate = C.shape[2], C.shape[3]
    tp = dt.shape[-1]
    nchunks = tp // chunk_size
    y = torch.empty(batch, seqlen, heads, headdim, device=x.device, dtype=x.dtype)
    meta = _interpreter_meta(BLOCK_L=_chunk_block(chunk_size))

    def grid(m):
        return (batch * nchunks * heads, triton.cdiv(chunk_size, m["BLOCK_L"]))

    _chunk_scan_fwd_kernel[grid](
        x, B, C, y, dt, acum, v, entering, D if D is not None else dt, seq_idx if seq_idx is not None else dt,
        seqlen, tp, nchunks, heads, heads // x.shape[2],
        *_strides(x), *_strides(B), *_strides(C), *_strides(y),
        P=headdim, N=dstate, CHUNK=chunk_size, PRECISION=_precision(x), HAS_D=D is not None,
        HAS_SEQ=seq_idx is not None, P_PAD=_pad(headdim), N_PAD=_pad(dstate),
        BLOCK_K=_state_k_block(headdim, dstate), **meta,
    )
    return y


def chunk_scan_bwd_dc(x, B, C, dy, dt, acum, v, entering, seq_idx, *, chunk_size: int):
    """``(dC [B, T, H, N] in C.dtype, d acum (rows) [B, H, Tp], dv [B, H, Tp])``."""
    batch, seqlen, _, headdim = x.shape
    heads, dstate = C.shape[2], C.shape[3]
    tp = dt.shape[-1]
    nchunks = tp // chunk_size
    dC = torch.empty_like(C)
    dacum, dv = torch.empty_like(dt), torch.empty_like(dt)
    meta = _interpreter_meta(BLOCK_L=_chunk_block(chunk_size))

    def grid(m):
        return (batch * nchunks * heads, triton.cdiv(chunk_size, m["BLOCK_L"]))

    _chunk_scan_bwd_dc_kernel[grid](
        x, B, C, dy, dt, acum, v, entering, seq_idx if seq_idx is not None else dt, dC, dacum, dv,
        seqlen, tp, nchunks, heads, heads // x.shape[2],
        *_strides(x), *_strides(B), *_strides(C), *_strides(dy),
        P=headdim, N=dstate, CHUNK=chunk_size, PRECISION=_precision(x), HAS_SEQ=seq_idx is not None,
        P_PAD=_pad(headdim), N_PAD=_pad(dstate), BLOCK_K=_state_k_block(headdim, dstate), **meta,
    )
    return dC, dacum, dv


def chunk_scan_bwd_dxdb(x, B, C, dy, dt, acum, w, dstates, D, seq_idx, *, chunk_size: int):
    """``(dx [B, T, G, P], dB [B, T, G, N], ddt (intra) [B, H, Tp], d acum (columns) [B, H, Tp], dw [B, H, Tp])``."""
    batch, seqlen, groups, headdim = x.shape
    heads, dstate = C.shape[2], C.shape[3]
    tp = dt.shape[-1]
    nchunks = tp // chunk_size
    dx, dB = torch.empty_like(x), torch.empty_like(B)
    ddt, dacum, dw = torch.empty_like(dt), torch.empty_like(dt), torch.empty_like(dt)
    meta = _interpreter_meta(BLOCK_L=_chunk_block(chunk_size))

    def grid(m):
        return (batch * nchunks * groups, triton.cdiv(chunk_size, m["BLOCK_L"]))

    _chunk_scan_bwd_dxdb_kernel[grid](
        x, B, C, dy, dt, acum, w, dstates, D if D is not None else dt, seq_idx if seq_idx is not None else dt,
        dx, dB, ddt, dacum, dw,
        seqlen, tp, nchunks, heads, heads // groups,
        *_strides(x), *_strides(B), *_strides(C), *_strides(dy),
        P=headdim, N=dstate, CHUNK=chunk_size, PRECISION=_precision(x), HAS_D=D is not None,
        HAS_SEQ=seq_idx is not None, P_PAD=_pad(headdim), N_PAD=_pad(dstate),
        BLOCK_K=_state_k_block(headdim, dstate), **meta,
    )
    return dx, dB, ddt, dacum, dw
