"""Reference (pure PyTorch) state-space duality (SSD) scan of Mamba-2.

This file is the specification every faster backend is tested against. It follows the chunked SSD
algorithm of Dao & Gu, "Transformers are SSMs" (2024), Listing 1 ("ssd_minimal"), extended with
what a converted attention layer needs:

* grouped heads: ``x`` and ``B`` come from the teacher's K/V projections and have ``G`` groups,
  ``C`` comes from its Q projection and has ``H = G * R`` heads. Heads of one group share ``x``
  and ``B`` without materializing repeated copies.
* document boundaries (``seq_idx``): no state crosses from one packed document into the next.
* an initial state (continuing a cached prefix) and the final state (to start decoding).

Notation, per head ``h`` and position ``t`` (``g`` is the group of ``h``)::

    a_t   = dt[t, h] * A[h]                        (log of the decay, <= 0)
    S_t   = exp(a_t) * S_{t-1} + dt[t, h] * x[t, g] B[t, g]^T        S: [P, N]
    y_t   = S_t C[t, h] + D[h] * x[t, g]

A position whose ``dt`` is zero neither decays nor writes the state, which is how padding is made
invisible. A position whose document id differs from its predecessor's starts from a zero state.
"""

from __future__ import annotations

import torch

from ..precision import acc_dtype


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums ``out[..., i, j] = sum(a[..., j+1 : i+1])`` for ``j <= i``, ``-inf`` above.

    Args:
        a: ``[..., L]``.
    Returns:
        ``[..., L, L]``. Computed with a masked cumulative sum rather than a difference of
        cumulative sums, so long chunks with strong decay lose no precision.
    """
    length = a.size(-1)
    a = a[..., None].expand(*a.shape, length)  # [..., k, j] = a_k
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), -1)
    a = a.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(a, dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), 0)
    return out.masked_fill(~lower, float("-inf"))


def _check_shapes(x, dt, A, B, C):
    batch, seqlen, groups, _ = x.shape
    heads = C.shape[2]
    if B.shape[:3] != (batch, seqlen, groups):
        raise ValueError(f"B must be [batch, seqlen, groups={groups}, N], got {tuple(B.shape)}")
    if C.shape[:2] != (batch, seqlen) or C.shape[3] != B.shape[3]:
        raise ValueError(f"C must be [batch, seqlen, H, N={B.shape[3]}], got {tuple(C.shape)}")
    if heads % groups:
        raise ValueError(f"number of heads {heads} must be a multiple of the number of groups {groups}")
    if dt.shape != (batch, seqlen, heads) or A.shape != (heads,):
        raise ValueError(f"dt must be [batch, seqlen, H={heads}] and A [H], got {tuple(dt.shape)}, {tuple(A.shape)}")
    return batch, seqlen, groups, heads // groups


def ssd_chunk_scan_ref(
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
    """Chunked SSD scan: quadratic attention-like form inside chunks, a recurrence across chunks.

    Args:
        x: ``[B, T, G, P]`` inputs (values), shared by the ``R = H / G`` heads of a group.
        dt: ``[B, T, H]`` step sizes, already positive (softplus applied) and zero at padding.
        A: ``[H]`` negative decay rates.
        B: ``[B, T, G, N]`` input projections (keys).
        C: ``[B, T, H, N]`` output projections (queries).
        chunk_size: length of the chunks; any ``T`` is accepted (the tail is zero-padded).
        D: ``[H]`` skip connection, or ``None``.
        initial_state: ``[B, H, P, N]`` state before the first position, or ``None`` for zeros.
        seq_idx: ``[B, T]`` non-decreasing document ids; state never crosses a change of id.
    Returns:
        ``y`` of shape ``[B, T, H, P]`` in ``x.dtype`` and the final state ``[B, H, P, N]`` in fp32 (fp64 for fp64 inputs).
    """
    batch, seqlen, groups, rep = _check_shapes(x, dt, A, B, C)
    heads, headdim, dstate = groups * rep, x.shape[-1], B.shape[-1]
    out_dtype, acc = x.dtype, acc_dtype(x.dtype)
    x, dt, A, B, C = (t.to(acc) for t in (x, dt, A, B, C))

    pad = (-seqlen) % chunk_size
    if pad:
        x, B, C, dt = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, B, C, dt))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
    nchunks = x.shape[1] // chunk_size
    L = chunk_size

    xc = x.view(batch, nchunks, L, groups, headdim)
    Bc = B.view(batch, nchunks, L, groups, dstate)
    Cc = C.view(batch, nchunks, L, groups, rep, dstate)
    dtc = dt.view(batch, nchunks, L, groups, rep)
    a = (dtc * A.view(groups, rep)).permute(0, 1, 3, 4, 2)  # [b, c, g, r, l]
    a_cum = torch.cumsum(a, dim=-1)

    # 1. Inside each chunk: y = (C B^T ∘ decay mask) (dt x), a masked linear attention.
    decay = torch.exp(segsum(a))  # [b, c, g, r, l, s]
    if seq_idx is not None:
        sid = seq_idx.view(batch, nchunks, L)
        same_doc = sid[:, :, :, None] == sid[:, :, None, :]  # [b, c, l, s]
        decay = decay * same_doc[:, :, None, None]
    scores = torch.einsum("bclgrn,bcsgn->bcgrls", Cc, Bc) * decay
    y = torch.einsum("bcgrls,bcsgr,bcsgp->bclgrp", scores, dtc, xc)

    # 2. The state each chunk adds, decayed to the chunk's end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, c, g, r, l]
    if seq_idx is not None:
        decay_to_end = decay_to_end * (sid == sid[:, :, -1:])[:, :, None, None]
    chunk_states = torch.einsum("bcsgn,bcgrs,bcsgr,bcsgp->bcgrpn", Bc, decay_to_end, dtc, xc)

    # 3. Recurrence across chunks (a short loop: T / chunk_size steps).
    if initial_state is None:
        state = x.new_zeros(batch, groups, rep, headdim, dstate)
    else:
        state = initial_state.to(acc).reshape(batch, groups, rep, headdim, dstate)
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, c, g, r]
    prev_sid = seq_idx[:, 0] if seq_idx is not None else None
    entering = []
    for c in range(nchunks):
        entering.append(state)
        carry = chunk_decay[:, c]
        if seq_idx is not None:
            carry = carry * (sid[:, c, -1] == prev_sid).view(batch, 1, 1)
            prev_sid = sid[:, c, -1]
        state = state * carry[..., None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b, c, g, r, p, n]

    # 4. What the state entering a chunk contributes to each of its positions.
    decay_from_start = torch.exp(a_cum)  # [b, c, g, r, l]
    if seq_idx is not None:
        sid_before = torch.cat([seq_idx[:, :1], sid[:, :-1, -1]], dim=1)  # [b, c]
        decay_from_start = decay_from_start * (sid == sid_before[:, :, None])[:, :, None, None]
    y = y + torch.einsum("bclgrn,bcgrpn,bcgrl->bclgrp", Cc, entering, decay_from_start)

    if D is not None:
        y = y + D.to(acc).view(groups, rep, 1) * xc[:, :, :, :, None, :]
    y = y.reshape(batch, nchunks * L, heads, headdim)[:, :seqlen]
    return y.to(out_dtype), state.reshape(batch, heads, headdim, dstate)


def ssd_step_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step of the SSD recurrence (decoding), updating ``state`` in place.

    Args:
        state: ``[B, H, P, N]`` state before this token (fp32; fp64 in exactness tests). It is
            overwritten with the state after the token, so a cache can allocate it once.
        x: ``[B, G, P]``; dt: ``[B, H]``; A: ``[H]``; B: ``[B, G, N]``; C: ``[B, H, N]``; D: ``[H]``.
    Returns:
        ``y`` of shape ``[B, H, P]`` in ``x.dtype`` and ``state`` itself (the same tensor object).
    """
    batch, groups, headdim = x.shape
    heads, dstate = C.shape[1], C.shape[2]
    rep = heads // groups
    out_dtype, acc = x.dtype, acc_dtype(x.dtype)
    xf, dtf, Bf, Cf = x.to(acc), dt.to(acc).view(batch, groups, rep), B.to(acc), C.to(acc)
    decay = torch.exp(dtf * A.to(acc).view(groups, rep))
    write = (dtf[..., None] * xf[:, :, None, :])[..., None] * Bf[:, :, None, None, :]  # dt x B^T [b, g, r, p, n]
    if torch.is_grad_enabled() or state.dtype != acc:
        # A copy, not a view: ``state`` is overwritten below while autograd may still need the old values.
        s = state.to(acc, copy=True).view(batch, groups, rep, headdim, dstate)
        s = s * decay[..., None, None] + write
        state.copy_(s.view(batch, heads, headdim, dstate))
    else:  # decoding: the same arithmetic where the state lies, no copy
        s = state.view(batch, groups, rep, headdim, dstate)
        s.mul_(decay[..., None, None]).add_(write)
    y = torch.bmm(s.reshape(batch * heads, headdim, dstate), Cf.reshape(batch * heads, dstate, 1))  # [b * h, p, 1]
    y = y.view(batch, groups, rep, headdim)
    if D is not None:
        y = y + D.to(acc).view(groups, rep, 1) * xf[:, :, None, :]
    return y.reshape(batch, heads, headdim).to(out_dtype), state


def ssd_recurrent_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence with the same contract as :func:`ssd_chunk_scan_ref` (slow, for tests).

    ``initial_state`` is copied, not updated: only the per-token :func:`ssd_step_ref` works in place.
    """
    batch, seqlen, groups, rep = _check_shapes(x, dt, A, B, C)
    heads, headdim, dstate = groups * rep, x.shape[-1], B.shape[-1]
    state = (
        torch.zeros(batch, heads, headdim, dstate, device=x.device, dtype=acc_dtype(x.dtype))
        if initial_state is None
        else initial_state.to(acc_dtype(x.dtype), copy=True)
    )
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).view(batch, 1, 1, 1)
            state = state.masked_fill(new_doc, 0.0)
        y, state = ssd_step_ref(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state
