"""Reference (pure PyTorch) gated delta rule: the specification every faster backend is tested against.

Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
2024), the linear layers of Qwen3-Next. Per head, with the state ``S`` kept as ``[K, V]`` (keys by
values, so ``o = S^T q``)::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

i.e. decay the memory, read what it holds for ``k_t``, and move that reading a fraction ``beta_t``
towards ``v_t`` (a delta-rule step of online regression). Written as the state a token sees::

    S' = exp(g_t) S_{t-1};   u_t = beta_t (v_t - S'^T k_t);   S_t = S' + k_t u_t^T

A position with ``beta = 0`` and ``g = 0`` neither decays nor writes the state, which is how padding
is made invisible; a position whose document id (``seq_idx``) differs from its predecessor's starts
from a zero state.

Chunked form (the WY / UT transform, Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", section 3). Inside a chunk of ``L`` positions entered with state
``S0``, let ``G_i`` be the cumulative log-decay from the chunk start to ``i`` (inclusive) and
``D[i, j] = exp(G_i - G_j)`` for ``j <= i``. Unrolling ``u`` gives a unit lower-triangular system::

    (I + A) U = diag(beta) V - diag(beta exp(G)) K S0,     A[i, j] = beta_i D[i, j] k_i . k_j  (j < i)

so ``U = U~ - W S0`` with ``U~ = (I + A)^{-1} diag(beta) V`` and ``W = (I + A)^{-1} diag(beta exp(G)) K``,
both independent of ``S0`` (computed for all chunks at once). Then::

    O    = scale * (diag(exp(G)) Q S0 + (Q K^T o D) U)
    S_L  = exp(G_L) S0 + (diag(exp(G_L - G)) K)^T U

and only the ``T / L`` state hand-offs run in a loop. Document boundaries mask ``D`` (and hence ``A``)
to pairs of one document and drop ``S0`` for positions of a later document.
"""

from __future__ import annotations

import torch

from ..precision import acc_dtype
from ..ssd.naive import segsum


def _check_shapes(q, k, v, g, beta):
    batch, seqlen, heads, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must be shaped like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (batch, seqlen, heads):
        raise ValueError(f"v must be [B, T, H={heads}, V], got {tuple(v.shape)}")
    if g.shape != (batch, seqlen, heads) or beta.shape != (batch, seqlen, heads):
        raise ValueError(f"g and beta must be [B, T, H] = {(batch, seqlen, heads)}, "
                         f"got {tuple(g.shape)} and {tuple(beta.shape)}")
    return batch, seqlen, heads, dk, v.shape[-1]


def delta_rule_chunk_ref(
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
    """Chunked gated delta rule: WY/UT transform inside chunks, a recurrence across chunks.

    Args:
        q: ``[B, T, H, K]`` queries (the mixer L2-normalizes them; the op does not).
        k: ``[B, T, H, K]`` keys; the delta rule is a contraction only for ``||k|| <= 1`` (L2-normalized).
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H]`` log of the per-token decay (``<= 0``; ``0`` = no decay), zero at padding.
        beta: ``[B, T, H]`` write strengths in ``[0, 1]``, zero at padding.
        chunk_size: length of the chunks; any ``T`` is accepted (the tail is padded with no-op tokens).
        initial_state: ``[B, H, K, V]`` state before the first position (belongs to document
            ``seq_idx[:, 0]``), or ``None`` for zeros. Never modified.
        seq_idx: ``[B, T]`` non-decreasing document ids; state never crosses a change of id.
        scale: multiplies the output (``o = scale * S^T q``); ``None`` means ``K ** -0.5``.
    Returns:
        ``o`` ``[B, T, H, V]`` in ``v.dtype`` and the final state ``[B, H, K, V]`` in fp32 (fp64 for
        fp64 inputs).
    """
    batch, seqlen, heads, dk, dv = _check_shapes(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = dk**-0.5 if scale is None else scale
    out_dtype, acc = v.dtype, acc_dtype(v.dtype)
    q, k, v, g, beta = (t.to(acc) for t in (q, k, v, g, beta))

    pad = (-seqlen) % chunk_size
    if pad:  # padded positions have g = beta = 0: they change nothing
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (g, beta))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
    nchunks, L = q.shape[1] // chunk_size, chunk_size

    def chunked(t):  # [b, c*L, h, ...] -> [b, c, h, L, ...]
        return t.reshape(batch, nchunks, L, heads, *t.shape[3:]).transpose(2, 3)

    qc, kc, vc, gc, bc = (chunked(t) for t in (q * scale, k, v, g, beta))
    g_cum = gc.cumsum(-1)  # [b, c, h, L]: G_i
    decay = torch.exp(segsum(gc))  # [b, c, h, L, L]: D[i, j] = exp(G_i - G_j), 0 above the diagonal
    from_start = torch.exp(g_cum)  # [b, c, h, L]: decay of the entering state up to position i
    to_end = torch.exp(g_cum[..., -1:] - g_cum)  # [b, c, h, L]: decay from position j to the chunk end
    if seq_idx is not None:
        sid = seq_idx.view(batch, nchunks, L)
        decay = decay * (sid[:, :, :, None] == sid[:, :, None, :])[:, :, None]
        sid_entering = torch.cat([seq_idx[:, :1], sid[:, :-1, -1]], dim=1)  # [b, c]: document of S0
        from_start = from_start * (sid == sid_entering[..., None])[:, :, None]
        to_end = to_end * (sid == sid[:, :, -1:])[:, :, None]

    # WY/UT: U~ and W for every chunk at once, by one unit lower-triangular solve each.
    eye = torch.eye(L, dtype=acc, device=q.device)
    system = eye + (bc[..., None] * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)  # I + A
    u_free = torch.linalg.solve_triangular(system, bc[..., None] * vc, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, (bc * from_start)[..., None] * kc, upper=False, unitriangular=True)
    scores = (qc @ kc.transpose(-1, -2)) * decay  # [b, c, h, L, L], causal inside the chunk

    if initial_state is None:
        state = q.new_zeros(batch, heads, dk, dv)
    else:
        state = initial_state.to(acc)
    outs = []
    for c in range(nchunks):  # a short loop: T / chunk_size state hand-offs
        u = u_free[:, c] - w[:, c] @ state  # [b, h, L, V]
        outs.append((qc[:, c] * from_start[:, c, ..., None]) @ state + scores[:, c] @ u)
        state = from_start[:, c, :, -1, None, None] * state + (kc[:, c] * to_end[:, c, ..., None]).transpose(-1, -2) @ u
    o = torch.stack(outs, dim=1).transpose(2, 3).reshape(batch, nchunks * L, heads, dv)[:, :seqlen]
    return o.to(out_dtype), state


def _row_times(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x [B, H, K]`` times ``s [B, H, K, V]`` per head → ``[B, H, V]`` (one batched matrix product)."""
    batch, heads, dk, dv = s.shape
    return torch.bmm(x.reshape(batch * heads, 1, dk), s.reshape(batch * heads, dk, dv)).view(batch, heads, dv)


def delta_rule_step_ref(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule (decoding), updating ``state`` in place.

    Args:
        state: ``[B, H, K, V]`` state before this token (fp32; fp64 in exactness tests). It is
            overwritten with the state after the token, so a cache can allocate it once.
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; g, beta: ``[B, H]``; scale: as in :func:`delta_rule_chunk_ref`.
    Returns:
        ``o`` ``[B, H, V]`` in ``v.dtype`` and ``state`` itself (the same tensor object).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype, acc = v.dtype, acc_dtype(v.dtype)
    qf, kf, vf, gf, bf = (t.to(acc) for t in (q, k, v, g, beta))
    decay = torch.exp(gf)[..., None, None]
    in_place = not torch.is_grad_enabled() and state.dtype == acc  # decoding: no copy of the state
    # Otherwise a copy, not a view: ``state`` is overwritten below while autograd may still need the old values.
    s = state.mul_(decay) if in_place else state.to(acc, copy=True) * decay
    u = bf[..., None] * (vf - _row_times(kf, s))
    write = kf[..., :, None] * u[..., None, :]
    s = s.add_(write) if in_place else s + write
    o = _row_times(qf, s) * scale
    if not in_place:
        state.copy_(s)
    return o.to(out_dtype), state


def delta_rule_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token loop with the same contract as :func:`delta_rule_chunk_ref` (slow, for tests).

    ``initial_state`` is copied, not updated: only the per-token :func:`delta_rule_step_ref` works in place.
    """
    batch, seqlen, heads, dk, dv = _check_shapes(q, k, v, g, beta)
    acc = acc_dtype(v.dtype)
    state = (torch.zeros(batch, heads, dk, dv, device=v.device, dtype=acc) if initial_state is None
             else initial_state.to(acc, copy=True))
    outs = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).view(batch, 1, 1, 1)
            state = state.masked_fill(new_doc, 0.0)
        o, state = delta_rule_step_ref(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], scale)
        outs.append(o)
    return torch.stack(outs, dim=1), state
