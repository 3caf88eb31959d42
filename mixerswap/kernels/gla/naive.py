"""Reference (pure PyTorch) gated linear attention with one data-dependent decay per head.

This file is the specification every faster backend is tested against. Notation, per head ``h`` and
position ``t``::

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T          S: [K, V]; g_t <= 0 is the log of the decay
    o_t = scale * S_t^T q_t                        o: [V]

i.e. causal linear attention whose past is discounted by ``prod_{s=j+1..t} exp(g_s)`` (Yang et al.,
"Gated Linear Attention Transformers with Hardware-Efficient Training", 2024, with the scalar-per-head
gate of Mamba-2 / RetNet rather than GLA's per-channel one, so the chunked form needs no division by
decays and stays exact for any gate strength). A normalized variant (LAWCAT) appends a channel of
ones to ``v``: that channel of ``o`` is then the normalizer ``q_t . z_t``, ``z_t = exp(g_t) z_{t-1} + k_t``.

The chunked form (prefill, training) is quadratic inside chunks of ``chunk_size`` tokens and a
recurrence across chunks, as :mod:`mixerswap.kernels.ssd.naive`; the step form (decoding) updates the
state in place. Both accumulate in fp32 (fp64 for fp64 inputs). A position with ``g = 0`` and
``k = 0`` neither decays nor writes the state (padding); a change of ``seq_idx`` starts from zero.
"""

from __future__ import annotations

import torch

from ..precision import acc_dtype
from ..ssd.naive import segsum


def _check_shapes(q, k, v, g):
    batch, seqlen, heads, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must be [B, T, H, K] like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (batch, seqlen, heads):
        raise ValueError(f"v must be [B={batch}, T={seqlen}, H={heads}, V], got {tuple(v.shape)}")
    if g.shape != (batch, seqlen, heads):
        raise ValueError(f"g must be [B={batch}, T={seqlen}, H={heads}], got {tuple(g.shape)}")
    return batch, seqlen, heads, dk, v.shape[-1]


def gla_chunk_ref(
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
    """Chunked gated linear attention.

    Args:
        q: ``[B, T, H, K]`` queries (feature-mapped).
        k: ``[B, T, H, K]`` keys (feature-mapped; zero at padding).
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H]`` log decays (<= 0; zero at padding).
        scale: multiplies ``o``; ``None``: ``K ** -0.5``.
        chunk_size: length of the chunks; any ``T`` is accepted (the tail is zero-padded).
        initial_state: ``[B, H, K, V]`` state before the first position, or ``None`` for zeros.
        seq_idx: ``[B, T]`` non-decreasing document ids; state never crosses a change of id.
    Returns:
        ``o`` ``[B, T, H, V]`` in ``v.dtype`` and the final state ``[B, H, K, V]`` in fp32 (fp64 for fp64).
    """
    batch, seqlen, heads, dk, dv = _check_shapes(q, k, v, g)
    scale = dk**-0.5 if scale is None else scale
    out_dtype, acc = v.dtype, acc_dtype(v.dtype)
    q, k, v, g = (t.to(acc) for t in (q, k, v, g))

    pad = (-seqlen) % chunk_size
    if pad:
        q, k, v, g = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (q, k, v, g))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
    nchunks, L = q.shape[1] // chunk_size, chunk_size
    qc, kc, vc = (t.view(batch, nchunks, L, heads, -1) for t in (q, k, v))
    a = g.view(batch, nchunks, L, heads).permute(0, 1, 3, 2)  # [b, c, h, l]
    a_cum = torch.cumsum(a, dim=-1)

    # 1. Inside each chunk: o = (q k^T ∘ decay mask) v, a masked linear attention.
    decay = torch.exp(segsum(a))  # [b, c, h, l, s]
    if seq_idx is not None:
        sid = seq_idx.view(batch, nchunks, L)
        decay = decay * (sid[:, :, :, None] == sid[:, :, None, :])[:, :, None]
    scores = torch.einsum("bclhk,bcshk->bchls", qc, kc) * decay
    o = torch.einsum("bchls,bcshv->bclhv", scores, vc)

    # 2. The state each chunk adds, decayed to the chunk's end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, c, h, l]
    if seq_idx is not None:
        decay_to_end = decay_to_end * (sid == sid[:, :, -1:])[:, :, None]
    chunk_states = torch.einsum("bcshk,bchs,bcshv->bchkv", kc, decay_to_end, vc)

    # 3. Recurrence across chunks (T / chunk_size steps).
    state = q.new_zeros(batch, heads, dk, dv) if initial_state is None else initial_state.to(acc)
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, c, h]
    prev_sid = seq_idx[:, 0] if seq_idx is not None else None
    entering = []
    for c in range(nchunks):
        entering.append(state)
        carry = chunk_decay[:, c]
        if seq_idx is not None:
            carry = carry * (sid[:, c, -1] == prev_sid)[:, None]
            prev_sid = sid[:, c, -1]
        state = state * carry[..., None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b, c, h, k, v]

    # 4. What the state entering a chunk contributes to each of its positions.
    decay_from_start = torch.exp(a_cum)  # [b, c, h, l]
    if seq_idx is not None:
        sid_before = torch.cat([seq_idx[:, :1], sid[:, :-1, -1]], dim=1)  # [b, c]
        decay_from_start = decay_from_start * (sid == sid_before[:, :, None])[:, :, None]
    o = o + torch.einsum("bclhk,bchkv,bchl->bclhv", qc, entering, decay_from_start)
    o = (o * scale).reshape(batch, nchunks * L, heads, dv)[:, :seqlen]
    return o.to(out_dtype), state


def gla_step_ref(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step (decoding), updating ``state`` in place.

    Args:
        state: ``[B, H, K, V]`` state before this token (fp32; fp64 in exactness tests), overwritten
            with the state after it, so a cache can allocate it once.
        q, k: ``[B, H, K]``; v: ``[B, H, V]``; g: ``[B, H]``; scale: as :func:`gla_chunk_ref`.
    Returns:
        ``o`` ``[B, H, V]`` in ``v.dtype`` and ``state`` itself (the same tensor object).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype, acc = v.dtype, acc_dtype(v.dtype)
    decay, write = torch.exp(g.to(acc))[..., None, None], k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    if torch.is_grad_enabled() or state.dtype != acc:
        # A copy, not a view: ``state`` is overwritten below while autograd may still need the old values.
        s = state.to(acc, copy=True) * decay + write
        state.copy_(s)
    else:  # decoding: the same arithmetic where the state lies, no copy
        s = state.mul_(decay).add_(write)
    batch, heads, dk, dv = s.shape
    o = torch.bmm(q.to(acc).reshape(batch * heads, 1, dk), s.reshape(batch * heads, dk, dv))  # [b * h, 1, v]
    o = o.view(batch, heads, dv) * scale
    return o.to(out_dtype), state


def gla_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence with the contract of :func:`gla_chunk_ref` (slow, for tests).

    ``initial_state`` is copied, not updated: only the per-token :func:`gla_step_ref` works in place.
    """
    batch, seqlen, heads, dk, dv = _check_shapes(q, k, v, g)
    acc = acc_dtype(v.dtype)
    state = q.new_zeros(batch, heads, dk, dv, dtype=acc) if initial_state is None else initial_state.to(acc, copy=True)
    outs = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            state = state.masked_fill((seq_idx[:, t] != seq_idx[:, t - 1]).view(batch, 1, 1, 1), 0.0)
        o, state = gla_step_ref(state, q[:, t], k[:, t], v[:, t], g[:, t], scale)
        outs.append(o)
    return torch.stack(outs, dim=1), state
