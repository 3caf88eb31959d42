"""Triton kernels for gated linear attention with a per-head decay (backend ``triton``).

Same contract as :mod:`mixerswap.kernels.gla.naive` (the specification): ``gla_chunk_triton`` is
:func:`~mixerswap.kernels.gla.naive.gla_chunk_ref` and ``gla_step_triton`` is
:func:`~mixerswap.kernels.gla.naive.gla_step_ref`. Notation, per batch row, head and chunk of ``BT``
tokens, with ``b_i = g_1 + ... + g_i`` the log-decay accumulated from the chunk's start to its
position ``i`` (so every exponential below is of a number <= 0 and cannot overflow)::

    A_ij   = (q_i . k_j) exp(b_i - b_j)             j <= i, same document
    o_i    = scale (sum_j A_ij v_j + exp(b_i) S^T q_i)  S: state entering the chunk, [K, V]
    S'     = exp(b_L) S + sum_j exp(b_L - b_j) k_j v_j^T

Because the decay is one scalar per head and position, ``b_i - b_j`` is a segment sum of gates inside the
chunk (summed, not subtracted, see ``_chunk_decays``) and no division by a decay is ever needed (GLA's
per-channel form needs secondary chunking for that; the reference accepts only the per-head form, so
neither does this).
A change of ``seq_idx`` masks the pairs, the state carried into a chunk and the keys written into the
state that cross it, exactly as the reference's masks.

Four kernels. Forward: ``_gla_fwd_states_kernel`` (one program per block of ``V`` and batch row x head)
walks the chunks in order with the state in registers and writes the state entering every chunk and
the final one; ``_gla_fwd_output_kernel`` then computes every chunk's outputs in parallel. Backward:
``_gla_bwd_states_kernel`` walks the chunks in reverse with the state gradient ``dS`` in registers and
writes the gradient of the state leaving every chunk and of the initial state; ``_gla_bwd_chunk_kernel``
computes ``dq``, ``dk`` (partial sums over the ``V`` blocks, added up in torch) and ``dv`` of every chunk in
parallel, with ``db_i``, the gradient of ``b_i`` (see there). The gate gradient follows in torch (O(T H)
glue): ``<dS', S'>`` added at each chunk's last position, then a reversed cumulative sum inside each chunk. Everything accumulates in fp32; fp32
inputs multiply with ``input_precision="ieee"``, 16-bit ones with tf32. The decode step is one more
kernel, ``_gla_step_kernel``, which reads and overwrites the state in place.

The chunk length only tiles the computation (the result does not depend on it beyond rounding): the
kernels use ``chunk_size`` when it is a power of two in [16, 128] and 64 otherwise. ``K`` up to 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import naive
from ..triton_support import interpreting, launch_fitting

MAX_K = 256
BWD_WIDTHS = (64, 32, 16)  # V tiles of the backward, widest first; the first that fits in shared memory runs


def _block_t(chunk_size: int, dk: int) -> int:
    block = chunk_size if 16 <= chunk_size <= 128 and chunk_size & (chunk_size - 1) == 0 else 64
    # keys above 128: the backward's tiles at 64 positions need more shared memory than an H100 has
    return min(block, 32) if dk > 128 else block


def _blocks(dk: int, dv: int) -> tuple[int, int]:
    """``(BK, BV)``: all of ``K`` in one block (tl.dot needs at least 16), ``V`` split in blocks of <= 64."""
    if dk > MAX_K:
        raise ValueError(f"gla triton kernels support a key size up to {MAX_K}, got {dk}")
    bk = max(16, triton.next_power_of_2(dk))
    bv = max(16, min(64 if bk <= 128 else 32, triton.next_power_of_2(dv)))
    return bk, bv


def _bwd_widths(dk: int, dv: int) -> list[int]:
    """The backward's V tiles, widest first, from the forward's down to 16 (the first that fits runs)."""
    return [w for w in BWD_WIDTHS if w <= _blocks(dk, dv)[1]]


def _launch_options(*blocks: int) -> dict:
    # No autotuning: each program walks its chunks in order, so the tile sizes follow from the shapes,
    # and only the warp count is chosen (more warps for the larger tiles); the interpreter ignores it.
    return {} if interpreting() else {"num_warps": 8 if max(blocks) >= 128 else 4}


@triton.jit
def _chunk_masks(seq_ptr, i_b, c, T, BT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """``(pair, carry_in, write, carry)`` of one chunk: ``pair [BT, BT]`` j <= i in one document,
    ``carry_in [BT]`` position i still sees the state entering the chunk, ``write [BT]`` key j
    reaches the state leaving it, ``carry`` the entering state reaches the leaving one."""
    offs = tl.arange(0, BT)
    pair = offs[:, None] >= offs[None, :]
    if HAS_SEQ:
        t = tl.minimum(c * BT + offs, T - 1)  # the reference pads ids with the last one
        sid = tl.load(seq_ptr + i_b * T + t)
        sid_last = tl.load(seq_ptr + i_b * T + tl.minimum(c * BT + BT - 1, T - 1))
        sid_before = tl.load(seq_ptr + i_b * T + tl.maximum(c * BT - 1, 0))
        pair = pair & (sid[:, None] == sid[None, :])
        carry_in = sid == sid_before
        write = sid == sid_last
        carry = sid_last == sid_before
    else:  # all true, as tensors (c is the loop's induction variable)
        carry_in = offs >= 0
        write = offs >= 0
        carry = c >= 0
    return pair, carry_in, write, carry


@triton.jit
def _load_tile(ptr, i_b, i_h, c, T, H: tl.constexpr, D: tl.constexpr, offs_d, BT: tl.constexpr):
    """Rows ``t`` of chunk ``c`` and columns ``offs_d`` of a ``[B, T, H, D]`` tensor in fp32, zero outside."""
    t = c * BT + tl.arange(0, BT)
    row = (i_b * T + t) * H + i_h
    mask = (t < T)[:, None] & (offs_d < D)[None, :]
    return tl.load(ptr + row[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, x, i_b, i_h, c, T, H: tl.constexpr, D: tl.constexpr, offs_d, BT: tl.constexpr):
    """Store ``x [BT, len(offs_d)]`` where :func:`_load_tile` loads, in ``ptr``'s dtype."""
    t = c * BT + tl.arange(0, BT)
    row = (i_b * T + t) * H + i_h
    mask = (t < T)[:, None] & (offs_d < D)[None, :]
    tl.store(ptr + row[:, None] * D + offs_d[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_decays(g_ptr, seq_ptr, i_b, i_h, c, T, H: tl.constexpr, BT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The decays of one chunk, zero across a document boundary: ``pair [BT, BT]`` exp(b_i - b_j) for
    j <= i, ``from_start [BT]`` exp(b_i) (the entering state's share), ``to_end [BT]`` exp(b_L - b_j)
    (key j's share of the leaving state), ``carried`` exp(b_L) (the entering state's share of the
    leaving one). Positions beyond ``T`` have ``g = 0``, so ``b_L`` is the last real position's.

    ``b_i - b_j`` is summed as ``g_{j+1} + ... + g_i`` (a masked cumulative sum, as the reference's
    ``segsum``), not subtracted: after a strong decay ``b`` is large and the difference would lose the
    small gates that follow."""
    offs = tl.arange(0, BT)
    t = c * BT + offs
    g = tl.load(g_ptr + (i_b * T + t) * H + i_h, mask=t < T, other=0.0).to(tl.float32)
    segment = tl.cumsum(tl.where(offs[:, None] > offs[None, :], g[:, None], 0.0), 0)  # [i, j]: b_i - b_j
    to_last = tl.sum(tl.where(offs[:, None] == BT - 1, segment, 0.0), 0)  # b_L - b_j
    b_last = tl.sum(g, 0)
    pair, carry_in, write, carry = _chunk_masks(seq_ptr, i_b, c, T, BT, HAS_SEQ)
    # masked before exp: the upper triangle is not a segment sum
    pair = tl.exp(tl.where(pair, segment, float("-inf")))
    from_start = tl.where(carry_in, tl.exp(tl.cumsum(g, 0)), 0.0)
    to_end = tl.where(write, tl.exp(to_last), 0.0)
    carried = tl.where(carry, tl.exp(b_last), 0.0)
    return pair, from_start, to_end, carried


@triton.jit
def _gla_fwd_states_kernel(
    k_ptr, v_ptr, g_ptr, seq_ptr, h0_ptr, states_ptr, ht_ptr,
    T, n_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr,
):
    """Inter-chunk state passing. Grid ``(NV, B * H)``; ``k [B, T, H, K]``, ``v [B, T, H, V]``,
    ``g [B, T, H]``, ``seq [B, T]``; writes ``states [B, H, NC, K, V]`` (entering each chunk) and
    ``ht [B, H, K, V]`` (leaving the last), fp32, from ``h0 [B, H, K, V]``."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_state = (offs_k < K)[:, None] & (offs_v < V)[None, :]
    p_state = offs_k[:, None] * V + offs_v[None, :]
    state = tl.full([BK, BV], 0.0, tl.float32)
    if HAS_H0:
        state = tl.load(h0_ptr + i_bh * K * V + p_state, mask=m_state, other=0.0).to(tl.float32)
    for c in range(n_chunks):
        tl.store(states_ptr + (i_bh * n_chunks + c) * K * V + p_state, state, mask=m_state)
        k = _load_tile(k_ptr, i_b, i_h, c, T, H, K, offs_k, BT)
        v = _load_tile(v_ptr, i_b, i_h, c, T, H, V, offs_v, BT)
        _, _, to_end, carried = _chunk_decays(g_ptr, seq_ptr, i_b, i_h, c, T, H, BT, HAS_SEQ)
        state = state * carried + tl.dot(tl.trans(k * to_end[:, None]), v, input_precision=PREC)
    tl.store(ht_ptr + i_bh * K * V + p_state, state, mask=m_state)


@triton.jit
def _gla_fwd_output_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, seq_ptr, states_ptr, o_ptr,
    scale, T, n_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_SEQ: tl.constexpr, PREC: tl.constexpr,
):
    """Outputs, every chunk in parallel. Grid ``(NC, NV, B * H)``; inputs as
    :func:`_gla_fwd_states_kernel` and ``q [B, T, H, K]``; writes ``o [B, T, H, V]``."""
    c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    q = _load_tile(q_ptr, i_b, i_h, c, T, H, K, offs_k, BT)
    k = _load_tile(k_ptr, i_b, i_h, c, T, H, K, offs_k, BT)
    v = _load_tile(v_ptr, i_b, i_h, c, T, H, V, offs_v, BT)
    m_state = (offs_k < K)[:, None] & (offs_v < V)[None, :]
    state = tl.load(states_ptr + (i_bh * n_chunks + c) * K * V + offs_k[:, None] * V + offs_v[None, :],
                    mask=m_state, other=0.0)
    pair, from_start, _, _ = _chunk_decays(g_ptr, seq_ptr, i_b, i_h, c, T, H, BT, HAS_SEQ)
    scores = tl.dot(q, tl.trans(k), input_precision=PREC) * pair
    o = tl.dot(scores, v, input_precision=PREC)
    o += tl.dot(q * from_start[:, None], state, input_precision=PREC)
    _store_tile(o_ptr, o * scale, i_b, i_h, c, T, H, V, offs_v, BT)


@triton.jit
def _gla_bwd_states_kernel(
    q_ptr, g_ptr, seq_ptr, do_ptr, dht_ptr, d_states_ptr, dh0_ptr,
    scale, T, n_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DHT: tl.constexpr, PREC: tl.constexpr,
):
    """State gradients, chunks in reverse. Grid ``(NV, B * H)``; ``do [B, T, H, V]``, ``dht [B, H, K, V]``.
    Writes ``d_states [B, H, NC, K, V]`` (gradient of the state leaving each chunk) and ``dh0 [B, H, K, V]``."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_state = (offs_k < K)[:, None] & (offs_v < V)[None, :]
    p_state = offs_k[:, None] * V + offs_v[None, :]
    d_state = tl.full([BK, BV], 0.0, tl.float32)
    if HAS_DHT:
        d_state = tl.load(dht_ptr + i_bh * K * V + p_state, mask=m_state, other=0.0).to(tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tl.store(d_states_ptr + (i_bh * n_chunks + c) * K * V + p_state, d_state, mask=m_state)
        q = _load_tile(q_ptr, i_b, i_h, c, T, H, K, offs_k, BT)
        do = _load_tile(do_ptr, i_b, i_h, c, T, H, V, offs_v, BT)
        _, from_start, _, carried = _chunk_decays(g_ptr, seq_ptr, i_b, i_h, c, T, H, BT, HAS_SEQ)
        d_state = d_state * carried + tl.dot(tl.trans(q * (from_start * scale)[:, None]), do, input_precision=PREC)
    tl.store(dh0_ptr + i_bh * K * V + p_state, d_state, mask=m_state)


@triton.jit
def _gla_bwd_chunk_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, seq_ptr, do_ptr, states_ptr, d_states_ptr, dq_ptr, dk_ptr, dv_ptr, db_ptr,
    scale, T, n_chunks, BH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_SEQ: tl.constexpr, PREC: tl.constexpr,
):
    """Input gradients, every chunk in parallel. Grid ``(NC, NV, B * H)``; writes ``dq, dk [NV, B, T, H, K]``
    and ``db [NV, B, T, H]`` fp32 (partial sums over the ``V`` blocks) and ``dv [B, T, H, V]``.

    ``db_i`` is the gradient of ``b_i``: ``sum_j m_ij - sum_j m_ji`` through the pairs (``m_ij``: the
    gradient of pair (i, j)'s decay times that decay), ``+ q_i . dq_i(state)`` through the entering state,
    ``- k_i . dk_i(state)`` through key i's write ``exp(b_L - b_i)``, and at the last position ``L`` the
    sum of the ``b_L`` parts: ``exp(b_L) <dS', S> + sum_j k_j . dk_j(state)``. Terms whose decay is
    ``exp(0)`` (the pairs (i, i), key L's write) cancel and are left out, so the gate gradient carries no
    rounding noise where it is zero (a difference of the full ``q . dq`` and ``k . dk`` would)."""
    c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    q = _load_tile(q_ptr, i_b, i_h, c, T, H, K, offs_k, BT)
    k = _load_tile(k_ptr, i_b, i_h, c, T, H, K, offs_k, BT)
    v = _load_tile(v_ptr, i_b, i_h, c, T, H, V, offs_v, BT)
    do = _load_tile(do_ptr, i_b, i_h, c, T, H, V, offs_v, BT)
    m_state = (offs_k < K)[:, None] & (offs_v < V)[None, :]
    p_state = (i_bh * n_chunks + c) * K * V + offs_k[:, None] * V + offs_v[None, :]
    state = tl.load(states_ptr + p_state, mask=m_state, other=0.0)
    d_state = tl.load(d_states_ptr + p_state, mask=m_state, other=0.0)
    pair, from_start, to_end, carried = _chunk_decays(g_ptr, seq_ptr, i_b, i_h, c, T, H, BT, HAS_SEQ)
    do_v = tl.dot(do, tl.trans(v), input_precision=PREC) * scale  # gradient of o_i . v_j, [BT, BT]
    scores = tl.dot(q, tl.trans(k), input_precision=PREC) * pair  # without scale
    d_scores = do_v * pair  # gradient of q_i . k_j
    dq_state = tl.dot(do, tl.trans(state), input_precision=PREC) * (from_start * scale)[:, None]
    dk_state = tl.dot(v, tl.trans(d_state), input_precision=PREC) * to_end[:, None]
    dq = tl.dot(d_scores, k, input_precision=PREC) + dq_state
    dk = tl.dot(tl.trans(d_scores), q, input_precision=PREC) + dk_state
    dv = tl.dot(tl.trans(scores), do, input_precision=PREC) * scale
    dv += tl.dot(k, d_state, input_precision=PREC) * to_end[:, None]
    m = tl.where(offs_t[:, None] > offs_t[None, :], do_v * scores, 0.0)
    is_last = c * BT + offs_t == tl.minimum(c * BT + BT, T) - 1
    writes = tl.where(is_last, 0.0, tl.sum(k * dk_state, 1))
    at_last = carried * tl.sum(tl.sum(d_state * state, 1), 0) + tl.sum(writes, 0)
    db = tl.sum(m, 1) - tl.sum(m, 0) + tl.sum(q * dq_state, 1) - writes + tl.where(is_last, at_last, 0.0)
    _store_tile(dq_ptr + i_v * BH * T * K, dq, i_b, i_h, c, T, H, K, offs_k, BT)
    _store_tile(dk_ptr + i_v * BH * T * K, dk, i_b, i_h, c, T, H, K, offs_k, BT)
    _store_tile(dv_ptr, dv, i_b, i_h, c, T, H, V, offs_v, BT)
    t = c * BT + offs_t
    tl.store(db_ptr + i_v * BH * T + (i_b * T + t) * H + i_h, db, mask=t < T)


@triton.jit
def _gla_step_kernel(
    state_ptr, q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(V, BV), B * H)``. ``state [B, H, K, V]`` updated in place, ``q, k [B, H, K]``,
    ``v, o [B, H, V]``, ``g [B, H]``."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < K, offs_v < V
    m_state = mk[:, None] & mv[None, :]
    p_state = state_ptr + i_bh * K * V + offs_k[:, None] * V + offs_v[None, :]
    state = tl.load(p_state, mask=m_state, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + i_bh * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + i_bh * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + i_bh * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i_bh).to(tl.float32)
    state = state * tl.exp(g) + k[:, None] * v[None, :]
    o = tl.sum(state * q[:, None], 0) * scale
    tl.store(p_state, state.to(state_ptr.dtype.element_ty), mask=m_state)
    tl.store(o_ptr + i_bh * V + offs_v, o.to(o_ptr.dtype.element_ty), mask=mv)


def _precision(*tensors: torch.Tensor) -> str:
    return "ieee" if all(t.dtype == torch.float32 for t in tensors) else "tf32"


def _forward(q, k, v, g, scale, block_t, initial_state, seq_idx):
    """``(o [B, T, H, V] in v.dtype, final state [B, H, K, V], states [B, H, NC, K, V] entering each chunk)``."""
    batch, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    bk, bv = _blocks(dk, dv)
    n_chunks, n_v = triton.cdiv(seqlen, block_t), triton.cdiv(dv, bv)
    final = q.new_empty(batch, heads, dk, dv, dtype=torch.float32)
    states = q.new_empty(batch, heads, n_chunks, dk, dv, dtype=torch.float32)
    o = torch.empty_like(v)
    seq = seq_idx if seq_idx is not None else g  # an unused pointer when there are no documents
    shapes = dict(H=heads, K=dk, V=dv, BT=block_t, BK=bk, BV=bv, HAS_SEQ=seq_idx is not None,
                  PREC=_precision(q, k, v), **_launch_options(block_t, bk, bv))
    _gla_fwd_states_kernel[(n_v, batch * heads)](
        k, v, g, seq, initial_state if initial_state is not None else final, states, final, seqlen, n_chunks,
        HAS_H0=initial_state is not None, **shapes,
    )
    _gla_fwd_output_kernel[(n_chunks, n_v, batch * heads)](q, k, v, g, seq, states, o, scale, seqlen, n_chunks,
                                                          **shapes)
    return o, final, states


def _backward(q, k, v, g, seq_idx, states, final, d_o, d_final, scale, block_t):
    """``(dq, dk, dv, dg, d initial_state)``: ``dq, dk, dg`` in fp32, ``dv`` in ``v.dtype``, ``dh0`` fp32."""
    batch, seqlen, heads, dk = q.shape
    dv_size = v.shape[-1]
    bk = _blocks(dk, dv_size)[0]
    n_chunks = triton.cdiv(seqlen, block_t)
    d_o = torch.zeros_like(v) if d_o is None else d_o.contiguous()
    d_states = torch.empty_like(states)
    dh0 = torch.empty_like(final)
    dv = torch.empty_like(v)
    seq = seq_idx if seq_idx is not None else g
    precision = _precision(q, k, v)

    def launch(bv: int):  # the V tile sets the grid and the partial sums; narrower tiles need less shared memory
        n_v = triton.cdiv(dv_size, bv)
        dq = q.new_empty(n_v, batch, seqlen, heads, dk, dtype=torch.float32)
        dk_ = torch.empty_like(dq)
        d_b = q.new_empty(n_v, batch, seqlen, heads, dtype=torch.float32)
        shapes = dict(H=heads, K=dk, V=dv_size, BT=block_t, BK=bk, BV=bv, HAS_SEQ=seq_idx is not None,
                      PREC=precision, **_launch_options(block_t, bk, bv))
        _gla_bwd_states_kernel[(n_v, batch * heads)](
            q, g, seq, d_o, d_final.contiguous() if d_final is not None else final, d_states, dh0, scale, seqlen,
            n_chunks, HAS_DHT=d_final is not None, **shapes,
        )
        _gla_bwd_chunk_kernel[(n_chunks, n_v, batch * heads)](
            q, k, v, g, seq, d_o, states, d_states, dq, dk_, dv, d_b, scale, seqlen, n_chunks, batch * heads,
            **shapes,
        )
        return dq, dk_, d_b

    key = ("gla backward", dk, dv_size, block_t, q.dtype, seq_idx is not None, d_final is not None, q.device.index)
    dq, dk_, d_b = launch_fitting(key, _bwd_widths(dk, dv_size), launch)
    # d_b: gradient of b_i, the log-decay accumulated from the chunk start; g_t enters every b_i with
    # i >= t of its chunk.
    d_b = torch.nn.functional.pad(d_b.sum(0), (0, 0, 0, n_chunks * block_t - seqlen))
    d_b = d_b.view(batch, n_chunks, block_t, heads)
    dg = d_b.flip(2).cumsum(2).flip(2).reshape(batch, n_chunks * block_t, heads)[:, :seqlen]
    dq, dk_ = dq.sum(0), dk_.sum(0)
    return dq, dk_, dv, dg, dh0


class GLAChunkFn(torch.autograd.Function):
    """Autograd for :func:`gla_chunk_triton`; every tensor argument is contiguous (see there)."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, block_t, initial_state, seq_idx):
        o, final, states = _forward(q, k, v, g, scale, block_t, initial_state, seq_idx)
        ctx.save_for_backward(q, k, v, g, seq_idx, states, final)
        ctx.scale, ctx.block_t = scale, block_t
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final):
        q, k, v, g, seq_idx, states, final = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = _backward(q, k, v, g, seq_idx, states, final, d_o, d_final, ctx.scale, ctx.block_t)
        dh0 = dh0.to(ctx.initial_dtype) if ctx.initial_dtype is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype), None, None, dh0, None


def gla_chunk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated linear attention in Triton; the contract of :func:`~mixerswap.kernels.gla.naive.gla_chunk_ref`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H]`` log decays (<= 0).
        scale: multiplies ``o``; ``None``: ``K ** -0.5``.
        chunk_size: tiles the computation (a power of two in [16, 128] is used as given, else 64).
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros); not modified.
        seq_idx: ``[B, T]`` non-decreasing document ids, or ``None``.
    Returns:
        ``o`` ``[B, T, H, V]`` in ``v.dtype`` and the final state ``[B, H, K, V]`` in fp32.
    """
    batch, seqlen, heads, dk, dv = naive._check_shapes(q, k, v, g)
    if seqlen == 0:  # nothing to launch
        return naive.gla_chunk_ref(q, k, v, g, scale=scale, chunk_size=chunk_size, initial_state=initial_state,
                                   seq_idx=seq_idx)
    scale = dk**-0.5 if scale is None else float(scale)
    q, k, v, g = (t.contiguous() for t in (q, k, v, g))
    if initial_state is not None:
        if initial_state.shape != (batch, heads, dk, dv):
            raise ValueError(f"initial_state must be [B, H, K, V]={(batch, heads, dk, dv)}, "
                             f"got {tuple(initial_state.shape)}")
        initial_state = initial_state.contiguous()
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    block_t = _block_t(chunk_size, dk)
    tensors = (q, k, v, g) if initial_state is None else (q, k, v, g, initial_state)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return GLAChunkFn.apply(q, k, v, g, scale, block_t, initial_state, seq_idx)
    o, final, _ = _forward(q, k, v, g, scale, block_t, initial_state, seq_idx)
    return o, final


def gla_step_triton(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step in Triton, updating ``state`` in place; the contract of
    :func:`~mixerswap.kernels.gla.naive.gla_step_ref` (no autograd).

    Args:
        state: ``[B, H, K, V]`` fp32, overwritten with the state after this token.
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; g: ``[B, H]``; scale: ``None``: ``K ** -0.5``.
    Returns:
        ``o`` ``[B, H, V]`` in ``v.dtype`` and ``state`` itself (the same tensor object).
    """
    batch, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else float(scale)
    bk, bv = _blocks(dk, dv)
    work = state if state.is_contiguous() else state.contiguous()
    o = torch.empty_like(v, memory_format=torch.contiguous_format)
    _gla_step_kernel[(triton.cdiv(dv, bv), batch * heads)](
        work, q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), o, scale,
        H=heads, K=dk, V=dv, BK=bk, BV=bv, **_launch_options(bk, bv),
    )
    if work is not state:
        state.copy_(work)
    return o, state
