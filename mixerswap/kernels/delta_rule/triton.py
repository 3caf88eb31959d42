"""Triton kernels of the chunked gated delta rule (WY/UT form, forward and backward) and its decode step.

Backend ``triton`` of ``delta_rule_chunk`` and ``delta_rule_step``; :mod:`.naive` is the specification
(shapes, gates, document boundaries) and the notation below is its docstring's. Written for this
package after the structure of flash-linear-attention's ``gated_delta_rule`` (UT transform per chunk,
then a sequential pass over chunk states), with our own kernels and gradient derivation.

Per chunk of ``L`` positions (one program holds the chunk padded to ``BT``, a power of two >= 16,
with no-op tokens ``g = beta = k = 0``), entered with state ``S0`` ``[K, V]``; ``Q`` is ``scale * q``::

    G = cumsum(g)                       a_i = exp(G_i)         (0 for a later document than S0's)
    D_ij = exp(G_i - G_j), j <= i       e_j = exp(G_last - G_j) (0 unless j is in the chunk's last document)
    gamma = a_last                      D is 0 across documents
    A = strictly_lower(diag(beta) (K K^T o D)),   Tinv = (I + A)^-1        (``_wy_kernel``)
    U~ = Tinv diag(beta) V,   W = Tinv diag(beta a) K                       (``_wy_kernel``)
    U = U~ - W S0,   S1 = gamma S0 + (diag(e) K)^T U                        (``_state_fwd_kernel``, a loop)
    O = diag(a) Q S0 + (Q K^T o D) U                                        (``_output_kernel``)

Backward, given ``dO`` and ``dS1`` (the gradient of the state leaving the chunk), ``P = Q K^T o D``::

    dU = P^T dO + diag(e) K dS1;   dS0 = (diag(a) Q)^T dO + gamma dS1 - W^T dU  (``_state_bwd_kernel``)
    dW = -dU S0^T;  dT = dU (diag(beta) V)^T + dW (diag(beta a) K)^T;  dA = -Tinv^T dT Tinv^T (strictly lower)
    dQ = diag(a) dO S0^T + (dO U^T o D) K
    dK = (dO U^T o D)^T Q + diag(e) U dS1^T + diag(beta a) Tinv^T dW + (dA' o D) K + (dA' o D)^T K,
         dA' = diag(beta) dA
    dV = diag(beta) Tinv^T dU
    dbeta = rowsum(V o Tinv^T dU) + a o rowsum(K o Tinv^T dW) + rowsum(dA o K K^T o D)
    dD = (dO U^T) o (Q K^T) + dA' o (K K^T);   da = rowsum(Q o dO S0^T) + beta o rowsum(K o Tinv^T dW);
    de = rowsum(K o U dS1^T);   dgamma = sum(S0 o dS1)
    dG = rowsum(dD o D) - colsum(dD o D) + da o a - de o e,   dG_last += sum(de o e) + dgamma gamma
    dg = reverse_cumsum(dG) + dG_last                                       (``_chunk_bwd_kernel``)

All accumulation is fp32; fp32 inputs use IEEE products (``input_precision="ieee"``), lower precisions
tf32 ones. Under ``TRITON_INTERPRET=1`` every kernel runs with one fixed configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_support import interpreting, launch_fitting
from .naive import _check_shapes


def _configs(*options: tuple[int, int, int]) -> list[triton.Config]:
    """Autotune over ``(BV, num_warps, num_stages)`` on a GPU; one fixed configuration under the interpreter.

    The shallower pipelines are there for shared memory: with 128-wide fp32 keys, prefetching three
    chunks ahead needs more than an H100 has (the autotuner skips configurations that do not fit)."""
    if interpreting():
        return [triton.Config({"BV": 32}, num_warps=4)]
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=st) for bv, w, st in options]


# (BV, num_warps, num_stages) of the backward's chunk kernel, widest first; the first that fits in shared memory runs
CHUNK_BWD_TILES = ((64, 8, 3), (64, 8, 2), (32, 8, 2), (64, 8, 1), (32, 4, 1), (16, 4, 1))
_V_CONFIGS = _configs((32, 4, 3), (64, 4, 3), (64, 8, 3), (32, 4, 2), (64, 4, 2), (32, 4, 1), (64, 4, 1))
# The kernels call only builtins of triton.language, not its jit'd standard library (tl.sum, tl.zeros,
# tl.cumsum): when triton is imported before TRITON_INTERPRET=1 is set (torch._dynamo imports it), those
# stay compiled-only and the interpreter refuses them. Reductions and scans use the standard library's
# combine function, which the interpreter recognizes and runs as one numpy operation.
_add = tl.standard._sum_combine


@triton.jit
def _chunk_gates(gcum_ptr, beta_ptr, sid_ptr, i_b, i_c, i_h, T, H,
                 CHUNK: tl.constexpr, BT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
    """Per position of chunk ``i_c``: validity, beta, G, a, e, document id; and gamma, the chunk's state decay.

    ``gcum`` ``[B, T, H]`` fp32 holds ``G``, the cumulative log decay from the chunk start (made by the
    caller), so the last position's value and document are plain loads rather than reductions.
    """
    offs = tl.arange(0, BT)
    t = i_c * CHUNK + offs
    valid = (offs < CHUNK) & (t < T)
    last = tl.minimum(i_c * CHUNK + CHUNK, T) - 1
    G = tl.load(gcum_ptr + (i_b * T + t) * H + i_h, mask=valid, other=0.0)
    beta = tl.load(beta_ptr + (i_b * T + t) * H + i_h, mask=valid, other=0.0).to(tl.float32)
    G_last = tl.load(gcum_ptr + (i_b * T + last) * H + i_h)
    a = tl.where(valid, tl.exp(G), 0.0)
    e = tl.where(valid, tl.exp(G_last - G), 0.0)
    gamma = tl.exp(G_last)
    if HAS_SEQ_IDX:
        sid = tl.load(sid_ptr + i_b * T + t, mask=valid, other=-1)
        sid_last = tl.load(sid_ptr + i_b * T + last)
        sid_enter = tl.load(sid_ptr + i_b * T + tl.maximum(i_c * CHUNK - 1, 0))
        a = tl.where(sid == sid_enter, a, 0.0)
        e = tl.where(sid == sid_last, e, 0.0)
        gamma = tl.where(sid_last == sid_enter, gamma, 0.0)
    else:
        sid = tl.full([BT], 0, tl.int32)
    return valid, beta, G, a, e, gamma, sid


@triton.jit
def _decay_matrix(valid, G, sid, BT: tl.constexpr):
    """``D [BT, BT]``: ``exp(G_i - G_j)`` for valid ``j <= i`` of one document, else 0."""
    offs = tl.arange(0, BT)
    keep = (offs[:, None] >= offs[None, :]) & valid[:, None] & valid[None, :] & (sid[:, None] == sid[None, :])
    return tl.where(keep, tl.exp(tl.where(keep, G[:, None] - G[None, :], 0.0)), 0.0)


@triton.jit
def _unit_lower_inverse(A, BT: tl.constexpr, LOG_BT: tl.constexpr):
    """``(I + A)^-1`` for a strictly lower triangular ``A [BT, BT]`` (``BT = 2 ** LOG_BT``), in fp32.

    Recursive block inversion, all blocks of a level at once: ``x`` holds the inverses of the diagonal
    blocks of size ``s``; two neighbours merge by ``[[X1, 0], [-X2 A21 X1, X2]]``, i.e.
    ``x -= x A_s x`` with ``A_s`` the entries of ``A`` coupling them. ``log2(BT)`` levels of two products:
    as stable as forward substitution for any beta in [0, 1] (a doubling product
    ``(I - A)(I + A^2)(I + A^4)...`` is not: its powers of ``A`` grow combinatorially and cancel).
    """
    offs = tl.arange(0, BT)
    x = tl.where(offs[:, None] == offs[None, :], 1.0, 0.0)
    for level in range(LOG_BT):
        block = offs >> level  # index of the size-2^level block
        coupling = (block[:, None] == block[None, :] + 1) & ((block[None, :] & 1) == 0)
        x -= tl.dot(x, tl.dot(tl.where(coupling, A, 0.0), x, input_precision="ieee"), input_precision="ieee")
    return x


@triton.jit
def _wy_kernel(k_ptr, v_ptr, gcum_ptr, beta_ptr, sid_ptr, ainv_ptr, w_ptr, u_ptr,
               T, H, K, V, NC,
               CHUNK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               HAS_SEQ_IDX: tl.constexpr, COMPUTE_INV: tl.constexpr, PRECISION: tl.constexpr,
               LOG_BT: tl.constexpr):
    """One chunk: ``Tinv = (I + A)^-1`` (computed and stored, or loaded), then ``W`` and ``U~``.

    Grid ``(NC, B * H)``. ``ainv`` ``[B, NC, H, BT, BT]`` fp32; ``w`` ``[B, T, H, K]`` and ``u`` ``[B, T, H, V]``
    fp32 (rows of this chunk only).
    """
    i_c, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    valid, beta, G, a, e, gamma, sid = _chunk_gates(gcum_ptr, beta_ptr, sid_ptr, i_b, i_c, i_h, T, H,
                                                    CHUNK, BT, HAS_SEQ_IDX)
    offs = tl.arange(0, BT)
    t = i_c * CHUNK + offs
    ok = tl.arange(0, BK)
    k_mask = valid[:, None] & (ok[None, :] < K)
    kc = tl.load(k_ptr + ((i_b * T + t) * H + i_h)[:, None] * K + ok[None, :], mask=k_mask, other=0.0).to(tl.float32)
    a_ptrs = ainv_ptr + ((i_b * NC + i_c) * H + i_h) * BT * BT + offs[:, None] * BT + offs[None, :]
    if COMPUTE_INV:
        D = _decay_matrix(valid, G, sid, BT)
        kk = tl.dot(kc, tl.trans(kc), input_precision=PRECISION)
        A = tl.where(offs[:, None] > offs[None, :], beta[:, None] * kk * D, 0.0)
        tinv = _unit_lower_inverse(A, BT, LOG_BT)
        tl.store(a_ptrs, tinv)
    else:
        tinv = tl.load(a_ptrs)
    w = tl.dot(tinv, (beta * a)[:, None] * kc, input_precision=PRECISION)
    tl.store(w_ptr + ((i_b * T + t) * H + i_h)[:, None] * K + ok[None, :], w, mask=k_mask)
    for v0 in range(0, V, BV):
        ov = v0 + tl.arange(0, BV)
        v_off = ((i_b * T + t) * H + i_h)[:, None] * V + ov[None, :]
        v_mask = valid[:, None] & (ov[None, :] < V)
        vc = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
        u = tl.dot(tinv, beta[:, None] * vc, input_precision=PRECISION)
        tl.store(u_ptr + v_off, u, mask=v_mask)


@triton.autotune(configs=_V_CONFIGS, key=["K", "V", "BT"])
@triton.jit
def _state_fwd_kernel(k_ptr, w_ptr, u_ptr, gcum_ptr, beta_ptr, sid_ptr, h0_ptr, h_ptr, unew_ptr, ht_ptr,
                      T, H, K, V, NC,
                      CHUNK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_SEQ_IDX: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                      PRECISION: tl.constexpr):
    """The sequential pass over chunks for one (batch, head, block of V columns).

    Grid ``(cdiv(V, BV), B * H)``. Stores ``h`` ``[B, NC, H, K, V]`` (the state entering each chunk),
    ``unew`` ``[B, T, H, V]`` (``U = U~ - W S0``) and the final state ``ht`` ``[B, H, K, V]``, all fp32.
    """
    i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    s_off = ok[:, None] * V + ov[None, :]
    s_mask = (ok[:, None] < K) & (ov[None, :] < V)
    if HAS_INIT:
        state = tl.load(h0_ptr + i_bh * K * V + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state = tl.full([BK, BV], 0, tl.float32)
    for i_c in range(NC):
        tl.store(h_ptr + ((i_b * NC + i_c) * H + i_h) * K * V + s_off, state, mask=s_mask)
        valid, beta, G, a, e, gamma, sid = _chunk_gates(gcum_ptr, beta_ptr, sid_ptr, i_b, i_c, i_h, T, H,
                                                        CHUNK, BT, HAS_SEQ_IDX)
        row = (i_b * T + i_c * CHUNK + offs) * H + i_h
        k_off = row[:, None] * K + ok[None, :]
        k_mask = valid[:, None] & (ok[None, :] < K)
        kc = tl.load(k_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k_off, mask=k_mask, other=0.0)
        v_off = row[:, None] * V + ov[None, :]
        v_mask = valid[:, None] & (ov[None, :] < V)
        u = tl.load(u_ptr + v_off, mask=v_mask, other=0.0) - tl.dot(w, state, input_precision=PRECISION)
        tl.store(unew_ptr + v_off, u, mask=v_mask)
        state = gamma * state + tl.dot(tl.trans(e[:, None] * kc), u, input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(ht_ptr + i_bh * K * V + s_off, state, mask=s_mask)


@triton.autotune(configs=_V_CONFIGS, key=["K", "V", "BT"])
@triton.jit
def _output_kernel(q_ptr, k_ptr, gcum_ptr, beta_ptr, sid_ptr, h_ptr, unew_ptr, o_ptr, scale,
                   T, H, K, V, NC,
                   CHUNK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   HAS_SEQ_IDX: tl.constexpr, PRECISION: tl.constexpr):
    """``O = diag(a) Q S0 + (Q K^T o D) U`` for one chunk and block of V columns. Grid ``(cdiv(V, BV), NC, B * H)``."""
    i_v, i_c, i_bh = (tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64),
                     tl.program_id(2).to(tl.int64))
    i_b, i_h = i_bh // H, i_bh % H
    valid, beta, G, a, e, gamma, sid = _chunk_gates(gcum_ptr, beta_ptr, sid_ptr, i_b, i_c, i_h, T, H,
                                                    CHUNK, BT, HAS_SEQ_IDX)
    offs = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    row = (i_b * T + i_c * CHUNK + offs) * H + i_h
    k_off = row[:, None] * K + ok[None, :]
    k_mask = valid[:, None] & (ok[None, :] < K)
    qc = tl.load(q_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32) * scale
    kc = tl.load(k_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32)
    s_off = ok[:, None] * V + ov[None, :]
    s_mask = (ok[:, None] < K) & (ov[None, :] < V)
    state = tl.load(h_ptr + ((i_b * NC + i_c) * H + i_h) * K * V + s_off, mask=s_mask, other=0.0)
    v_off = row[:, None] * V + ov[None, :]
    v_mask = valid[:, None] & (ov[None, :] < V)
    u = tl.load(unew_ptr + v_off, mask=v_mask, other=0.0)
    scores = tl.dot(qc, tl.trans(kc), input_precision=PRECISION) * _decay_matrix(valid, G, sid, BT)
    o = tl.dot(a[:, None] * qc, state, input_precision=PRECISION) + tl.dot(scores, u, input_precision=PRECISION)
    tl.store(o_ptr + v_off, o.to(o_ptr.dtype.element_ty), mask=v_mask)


@triton.autotune(configs=_V_CONFIGS, key=["K", "V", "BT"])
@triton.jit
def _state_bwd_kernel(q_ptr, k_ptr, w_ptr, gcum_ptr, beta_ptr, sid_ptr, do_ptr, dht_ptr, dh_ptr, du_ptr, dh0_ptr,
                      scale, T, H, K, V, NC,
                      CHUNK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_SEQ_IDX: tl.constexpr, HAS_DHT: tl.constexpr, PRECISION: tl.constexpr):
    """The sequential pass backwards over chunks for one (batch, head, block of V columns).

    Grid ``(cdiv(V, BV), B * H)``. Stores ``dh`` ``[B, NC, H, K, V]`` (gradient of the state *leaving*
    each chunk), ``du`` ``[B, T, H, V]`` (gradient of ``U``) and ``dh0`` ``[B, H, K, V]``, all fp32.
    """
    i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    s_off = ok[:, None] * V + ov[None, :]
    s_mask = (ok[:, None] < K) & (ov[None, :] < V)
    if HAS_DHT:
        dstate = tl.load(dht_ptr + i_bh * K * V + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        dstate = tl.full([BK, BV], 0, tl.float32)
    for j in range(NC):
        i_c = NC - 1 - j
        tl.store(dh_ptr + ((i_b * NC + i_c) * H + i_h) * K * V + s_off, dstate, mask=s_mask)
        valid, beta, G, a, e, gamma, sid = _chunk_gates(gcum_ptr, beta_ptr, sid_ptr, i_b, i_c, i_h, T, H,
                                                        CHUNK, BT, HAS_SEQ_IDX)
        row = (i_b * T + i_c * CHUNK + offs) * H + i_h
        k_off = row[:, None] * K + ok[None, :]
        k_mask = valid[:, None] & (ok[None, :] < K)
        qc = tl.load(q_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32) * scale
        kc = tl.load(k_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k_off, mask=k_mask, other=0.0)
        v_off = row[:, None] * V + ov[None, :]
        v_mask = valid[:, None] & (ov[None, :] < V)
        do = tl.load(do_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
        scores = tl.dot(qc, tl.trans(kc), input_precision=PRECISION) * _decay_matrix(valid, G, sid, BT)
        du = (tl.dot(tl.trans(scores), do, input_precision=PRECISION)
              + tl.dot(e[:, None] * kc, dstate, input_precision=PRECISION))
        tl.store(du_ptr + v_off, du, mask=v_mask)
        dstate = (tl.dot(tl.trans(a[:, None] * qc), do, input_precision=PRECISION) + gamma * dstate
                  - tl.dot(tl.trans(w), du, input_precision=PRECISION))
    tl.store(dh0_ptr + i_bh * K * V + s_off, dstate, mask=s_mask)


@triton.jit
def _chunk_bwd_kernel(q_ptr, k_ptr, v_ptr, gcum_ptr, beta_ptr, sid_ptr, ainv_ptr, h_ptr, dh_ptr, unew_ptr, du_ptr,
                      do_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr, scale,
                      T, H, K, V, NC,
                      CHUNK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_SEQ_IDX: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients of q, k, v, g and beta inside one chunk (formulas in the module docstring). Grid ``(NC, B * H)``."""
    i_c, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    valid, beta, G, a, e, gamma, sid = _chunk_gates(gcum_ptr, beta_ptr, sid_ptr, i_b, i_c, i_h, T, H,
                                                    CHUNK, BT, HAS_SEQ_IDX)
    offs = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    row = (i_b * T + i_c * CHUNK + offs) * H + i_h
    k_off = row[:, None] * K + ok[None, :]
    k_mask = valid[:, None] & (ok[None, :] < K)
    tinv = tl.load(ainv_ptr + ((i_b * NC + i_c) * H + i_h) * BT * BT + offs[:, None] * BT + offs[None, :])
    state_base = ((i_b * NC + i_c) * H + i_h) * K * V

    d_o_s = tl.full([BT, BK], 0, tl.float32)   # dO S0^T
    u_ds = tl.full([BT, BK], 0, tl.float32)    # U dS1^T
    du_s = tl.full([BT, BK], 0, tl.float32)    # dU S0^T = -dW
    d_o_u = tl.full([BT, BT], 0, tl.float32)   # dO U^T
    dtinv = tl.full([BT, BT], 0, tl.float32)   # dT
    dgamma = tl.full([], 0, tl.float32)
    dbeta = tl.full([BT], 0, tl.float32)
    for v0 in range(0, V, BV):
        ov = v0 + tl.arange(0, BV)
        s_off = state_base + ok[:, None] * V + ov[None, :]
        s_mask = (ok[:, None] < K) & (ov[None, :] < V)
        s0 = tl.load(h_ptr + s_off, mask=s_mask, other=0.0)
        ds1 = tl.load(dh_ptr + s_off, mask=s_mask, other=0.0)
        v_off = row[:, None] * V + ov[None, :]
        v_mask = valid[:, None] & (ov[None, :] < V)
        do = tl.load(do_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
        u = tl.load(unew_ptr + v_off, mask=v_mask, other=0.0)
        du = tl.load(du_ptr + v_off, mask=v_mask, other=0.0)
        vc = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
        d_o_s += tl.dot(do, tl.trans(s0), input_precision=PRECISION)
        u_ds += tl.dot(u, tl.trans(ds1), input_precision=PRECISION)
        du_s += tl.dot(du, tl.trans(s0), input_precision=PRECISION)
        d_o_u += tl.dot(do, tl.trans(u), input_precision=PRECISION)
        dtinv += tl.dot(du, tl.trans(beta[:, None] * vc), input_precision=PRECISION)
        dgamma += tl.reduce(tl.reduce(s0 * ds1, 1, _add), 0, _add)
        tdu = tl.dot(tl.trans(tinv), du, input_precision=PRECISION)
        tl.store(dv_ptr + v_off, (beta[:, None] * tdu).to(dv_ptr.dtype.element_ty), mask=v_mask)
        dbeta += tl.reduce(vc * tdu, 1, _add)

    # q, k and D are loaded and built only now: fewer tiles live through the loop over V
    qc = tl.load(q_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32) * scale
    kc = tl.load(k_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32)
    D = _decay_matrix(valid, G, sid, BT)
    # W = Tinv diag(beta a) K, with dW = -dU S0^T
    dtinv -= tl.dot(du_s, tl.trans((beta * a)[:, None] * kc), input_precision=PRECISION)
    tdw = -tl.dot(tl.trans(tinv), du_s, input_precision=PRECISION)
    dk = (beta * a)[:, None] * tdw
    k_tdw = tl.reduce(kc * tdw, 1, _add)
    dbeta += a * k_tdw
    da = beta * k_tdw
    # Tinv = (I + A)^-1, A = strictly_lower(diag(beta) (K K^T o D))
    da_mat = -tl.dot(tl.dot(tl.trans(tinv), dtinv, input_precision=PRECISION), tl.trans(tinv),
                     input_precision=PRECISION)
    da_mat = tl.where(offs[:, None] > offs[None, :], da_mat, 0.0)
    kk = tl.dot(kc, tl.trans(kc), input_precision=PRECISION)
    dbeta += tl.reduce(da_mat * kk * D, 1, _add)
    dab = beta[:, None] * da_mat
    dab_d = dab * D
    dk += tl.dot(dab_d, kc, input_precision=PRECISION) + tl.dot(tl.trans(dab_d), kc, input_precision=PRECISION)
    dD = dab * kk
    # O = diag(a) Q S0 + (Q K^T o D) U;  S1 = gamma S0 + (diag(e) K)^T U
    d_o_u_d = d_o_u * D
    dq = a[:, None] * d_o_s + tl.dot(d_o_u_d, kc, input_precision=PRECISION)
    dk += tl.dot(tl.trans(d_o_u_d), qc, input_precision=PRECISION) + e[:, None] * u_ds
    dD += d_o_u * tl.dot(qc, tl.trans(kc), input_precision=PRECISION)
    da += tl.reduce(qc * d_o_s, 1, _add)
    de = tl.reduce(kc * u_ds, 1, _add)
    # back to the per-token log decays: G = cumsum(g), D_ij = exp(G_i - G_j), a = exp(G), e = exp(G_last - G)
    x = dD * D
    dG = tl.reduce(x, 1, _add) - tl.reduce(x, 0, _add) + da * a - de * e
    dG_last = tl.reduce(de * e, 0, _add) + dgamma * gamma
    dg = tl.associative_scan(dG, 0, _add, reverse=True) + dG_last

    tl.store(dq_ptr + k_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dk_ptr + k_off, dk.to(dk_ptr.dtype.element_ty), mask=k_mask)
    t = i_c * CHUNK + offs
    tl.store(dg_ptr + (i_b * T + t) * H + i_h, dg.to(dg_ptr.dtype.element_ty), mask=valid)
    tl.store(dbeta_ptr + (i_b * T + t) * H + i_h, dbeta.to(dbeta_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _step_kernel(state_ptr, q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, scale, K, V,
                 BK: tl.constexpr, BV: tl.constexpr):
    """One token for one (batch, head, block of V columns), ``state`` updated in place. Grid ``(cdiv(V, BV), B * H)``.

    The columns of the state evolve independently (``u`` is per column), so V blocks need no communication.
    """
    i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    s_ptrs = state_ptr + i_bh * K * V + ok[:, None] * V + ov[None, :]
    s_mask = (ok[:, None] < K) & (ov[None, :] < V)
    state = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
    qt = tl.load(q_ptr + i_bh * K + ok, mask=ok < K, other=0.0).to(tl.float32)
    kt = tl.load(k_ptr + i_bh * K + ok, mask=ok < K, other=0.0).to(tl.float32)
    vt = tl.load(v_ptr + i_bh * V + ov, mask=ov < V, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i_bh).to(tl.float32)
    beta = tl.load(beta_ptr + i_bh).to(tl.float32)
    state = state * tl.exp(g)
    u = beta * (vt - tl.reduce(state * kt[:, None], 0, _add))
    state = state + kt[:, None] * u[None, :]
    o = tl.reduce(state * qt[:, None], 0, _add) * scale
    tl.store(s_ptrs, state.to(state_ptr.dtype.element_ty), mask=s_mask)
    tl.store(o_ptr + i_bh * V + ov, o.to(o_ptr.dtype.element_ty), mask=ov < V)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _chunk_bwd_tiles(dv: int) -> list[tuple[int, int, int]]:
    """``CHUNK_BWD_TILES`` no wider than ``V`` needs (at most 64), widest first (the first that fits runs)."""
    return [t for t in CHUNK_BWD_TILES if t[0] <= min(64, _block(dv))]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _common(q, v, chunk_size, seq_idx):
    """Launch constants shared by every chunk kernel, and ``seq_idx`` as contiguous int32 (or a dummy)."""
    batch, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    nchunks = triton.cdiv(seqlen, chunk_size)
    meta = dict(CHUNK=chunk_size, BT=_block(chunk_size), BK=_block(dk), HAS_SEQ_IDX=seq_idx is not None,
                PRECISION=_precision(v.dtype))
    sid = (seq_idx.to(torch.int32).contiguous() if seq_idx is not None
           else torch.zeros(1, dtype=torch.int32, device=q.device))
    return batch, seqlen, heads, dk, dv, nchunks, meta, sid


def _chunk_cumsum(g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, T, H]`` -> fp32 ``G``: the cumulative sum of ``g`` from the start of each position's chunk."""
    batch, seqlen, heads = g.shape
    pad = (-seqlen) % chunk_size
    padded = torch.nn.functional.pad(g.float(), (0, 0, 0, pad))
    return padded.view(batch, -1, chunk_size, heads).cumsum(2).view(batch, -1, heads)[:, :seqlen].contiguous()


def _wy(k, v, gcum, beta, sid, ainv, compute_inv, shape, meta):
    """``(ainv, w, u~)``; ``ainv`` ``[B, NC, H, BT, BT]`` is computed when ``compute_inv``, else reused."""
    batch, seqlen, heads, dk, dv, nchunks = shape
    if compute_inv:
        ainv = k.new_empty(batch, nchunks, heads, meta["BT"], meta["BT"], dtype=torch.float32)
    w = k.new_empty(batch, seqlen, heads, dk, dtype=torch.float32)
    u = k.new_empty(batch, seqlen, heads, dv, dtype=torch.float32)
    _wy_kernel[(nchunks, batch * heads)](k, v, gcum, beta, sid, ainv, w, u, seqlen, heads, dk, dv, nchunks,
                                         BV=min(64, _block(dv)), COMPUTE_INV=compute_inv,
                                         LOG_BT=meta["BT"].bit_length() - 1, **meta)
    return ainv, w, u


def _states(k, w, u, gcum, beta, sid, initial_state, store_final, shape, meta):
    """``(h, U, final_state)``: the state entering every chunk, the corrected ``U`` and the last state."""
    batch, seqlen, heads, dk, dv, nchunks = shape
    h = k.new_empty(batch, nchunks, heads, dk, dv, dtype=torch.float32)
    unew = torch.empty_like(u)
    final = k.new_empty(batch, heads, dk, dv, dtype=torch.float32)
    init = initial_state.contiguous() if initial_state is not None else final
    _state_fwd_kernel[lambda m: (triton.cdiv(dv, m["BV"]), batch * heads)](
        k, w, u, gcum, beta, sid, init, h, unew, final, seqlen, heads, dk, dv, nchunks,
        HAS_INIT=initial_state is not None, STORE_FINAL=store_final, **meta)
    return h, unew, final


class DeltaRuleChunkFn(torch.autograd.Function):
    """Chunked gated delta rule with Triton forward and backward; inputs as in :func:`delta_rule_chunk_triton`."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, seq_idx, chunk_size, scale):
        q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
        batch, seqlen, heads, dk, dv, nchunks, meta, sid = _common(q, v, chunk_size, seq_idx)
        shape = (batch, seqlen, heads, dk, dv, nchunks)
        gcum = _chunk_cumsum(g, chunk_size)
        ainv, w, u = _wy(k, v, gcum, beta, sid, None, True, shape, meta)
        h, unew, final = _states(k, w, u, gcum, beta, sid, initial_state, True, shape, meta)
        o = torch.empty_like(v)
        _output_kernel[lambda m: (triton.cdiv(dv, m["BV"]), nchunks, batch * heads)](
            q, k, gcum, beta, sid, h, unew, o, scale, seqlen, heads, dk, dv, nchunks, **meta)
        ctx.save_for_backward(q, k, v, gcum, beta, initial_state, sid, ainv)
        ctx.g_dtype = g.dtype
        ctx.chunk_size, ctx.scale, ctx.has_seq_idx = chunk_size, scale, seq_idx is not None
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, gcum, beta, initial_state, sid, ainv = ctx.saved_tensors
        batch, seqlen, heads, dk, dv, nchunks, meta, _ = _common(q, v, ctx.chunk_size, None)
        meta["HAS_SEQ_IDX"] = ctx.has_seq_idx
        shape = (batch, seqlen, heads, dk, dv, nchunks)
        do = do.contiguous() if do is not None else torch.zeros_like(v)
        _, w, u = _wy(k, v, gcum, beta, sid, ainv, False, shape, meta)
        h, unew, _ = _states(k, w, u, gcum, beta, sid, initial_state, False, shape, meta)
        dh = torch.empty_like(h)
        du = torch.empty_like(unew)
        dh0 = k.new_empty(batch, heads, dk, dv, dtype=torch.float32)
        dht = dfinal.contiguous() if dfinal is not None else dh0
        _state_bwd_kernel[lambda m: (triton.cdiv(dv, m["BV"]), batch * heads)](
            q, k, w, gcum, beta, sid, do, dht, dh, du, dh0, ctx.scale, seqlen, heads, dk, dv, nchunks,
            HAS_DHT=dfinal is not None, **meta)
        dq, dk_, dv_, dbeta = (torch.empty_like(t) for t in (q, k, v, beta))
        dg = torch.empty_like(gcum, dtype=ctx.g_dtype)

        def launch(tiles: tuple[int, int, int]):  # many live tiles: the widest that fits in shared memory
            bv, warps, stages = tiles
            _chunk_bwd_kernel[(nchunks, batch * heads)](
                q, k, v, gcum, beta, sid, ainv, h, dh, unew, du, do, dq, dk_, dv_, dg, dbeta, ctx.scale,
                seqlen, heads, dk, dv, nchunks, BV=bv,
                **({} if interpreting() else {"num_warps": warps, "num_stages": stages}), **meta)

        launch_fitting(("delta rule backward", dk, dv, q.dtype, ctx.has_seq_idx, q.device.index), _chunk_bwd_tiles(dv),
                       launch)
        dinit = dh0.to(initial_state.dtype) if initial_state is not None else None
        return dq, dk_, dv_, dg, dbeta, dinit, None, None, None


def delta_rule_chunk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule in Triton; the contract of :func:`~.naive.delta_rule_chunk_ref`.

    Args:
        q, k: ``[B, T, H, K]`` (k L2-normalized by the mixer); v: ``[B, T, H, V]``;
        g, beta: ``[B, T, H]`` log decays (``<= 0``) and write strengths (``[0, 1]``);
        chunk_size: any ``>= 1``; a chunk is held padded to a power of two ``>= 16``, so 16, 32 and 64
            waste nothing;
        initial_state: ``[B, H, K, V]`` or ``None``, never modified; seq_idx: ``[B, T]`` non-decreasing ids;
        scale: ``None`` means ``K ** -0.5``.
    Returns:
        ``o`` ``[B, T, H, V]`` in ``v.dtype`` and the final state ``[B, H, K, V]`` fp32. Differentiable in
        q, k, v, g, beta and initial_state.
    """
    _check_shapes(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return DeltaRuleChunkFn.apply(q, k, v, g, beta, initial_state, seq_idx, chunk_size, scale)


def delta_rule_step_triton(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding token in Triton, updating ``state`` in place; the contract of :func:`~.naive.delta_rule_step_ref`.

    Args:
        state: ``[B, H, K, V]`` (fp32), overwritten with the state after the token.
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; g, beta: ``[B, H]``; scale: ``None`` means ``K ** -0.5``.
    Returns:
        ``o`` ``[B, H, V]`` in ``v.dtype`` and ``state`` itself. Not differentiable.
    """
    batch, heads, dk = q.shape
    dv = v.shape[-1]
    if state.shape != (batch, heads, dk, dv):
        raise ValueError(f"state must be [B, H, K, V] = {(batch, heads, dk, dv)}, got {tuple(state.shape)}")
    scale = dk**-0.5 if scale is None else float(scale)
    # A non-contiguous state is updated through a contiguous copy, then written back into the same tensor.
    work = state if state.is_contiguous() else state.contiguous()
    o = v.new_empty(batch, heads, dv)
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    block_v = min(64, _block(dv))  # not autotuned: a benchmark run would update the state several times
    _step_kernel[(triton.cdiv(dv, block_v), batch * heads)](work, q, k, v, g, beta, o, scale, dk, dv,
                                                            BK=_block(dk), BV=block_v)
    if work is not state:
        state.copy_(work)
    return o, state
