"""Attention (MHA/GQA) → multi-head latent attention, exact or compressed (``mla_from_attention``).

Notation: ``H`` query heads, ``G`` key/value heads, head size ``d``, the teacher's rotary width
``r`` (``d``, or less with Phi-3's partial rotary: the first ``r`` channels of a head rotate, in the
rotate-half layout, frequency ``f`` on channels ``f`` and ``f + r / 2``).

**Exact** (``--exact``; TransMLA's GQA→MLA construction, kept lossless). Every rotating key channel
stays a RoPE key channel, one RoPE key head per KV head (``rope_heads = G``, ``rope_dim = r``); the
latent is the teacher's own non-rotating key channels and values of its KV heads,
``c = [K_pass; V]`` (``kv_rank = G (d - r) + G d``); ``k_up``/``v_up`` are 0/1 matrices that hand
every query head its group's slice (the "replication" of GQA, now a weight instead of a repeat).
q keeps its weights, channels reordered to ``[pass | rotary]``; q/k norms (Qwen3, Gemma-3) stay
(q's over its whole head, k's over its RoPE key head, which is its whole head: both families rotate
fully), as do biases, Gemma's ``query_pre_attn_scalar`` scale, Gemma-2's score softcap and sliding
windows. The mixer computes the teacher's function, up to rounding; its cache per token is
``G (d - r) + G d + G r = 2 G d`` values, the teacher's KV cache.

**Compressed** (``kv_rank``, ``rope_dim``):

1. *Partial RoPE* (MHA2MLA, Ji et al. 2025): each KV head keeps RoPE on ``rope_dim / 2`` frequency
   pairs, the same for every head, chosen by ``rope_freqs`` (default: the highest frequencies,
   MHA2MLA's ``S_high``, the sound choice that needs no data; their data-driven ``S_2-norm``
   selection needs a setting that depends on the weights, which the pipeline cannot record yet).
   The other key channels lose RoPE (the approximation) and join the latent; the query channels
   that meet them lose it too.
2. *Joint low-rank factorization* of ``M = [K_nope; V]`` (all KV heads, ``G (d - rope_dim) + G d``
   rows; biases as one more input column fed by a constant 1), minimizing
   ``E_x || D (M - U A) [x; 1] ||^2``: with the calibration inputs' second moment ``S``
   (activation-aware, when statistics are given; else ``S = I``, weight-only SVD),
   ``U = D^-1 P_k`` and ``A = P_k^T D M`` where ``P_k`` are the top ``kv_rank`` left singular vectors of
   ``D M S^{1/2}``. ``D`` balances keys against values (TransMLA): key rows are scaled so both parts
   carry the same mean energy per row, so neither dominates the factorization.
3. *q/k norms* (Qwen3, Gemma-3): a key's RMSNorm spans channels that end up in the latent and in
   the RoPE key, so it cannot be kept. It is linearized: ``k_norm(k) ≈ w * k * c_g`` per KV head,
   ``c_g = E[rms] / E[rms^2]`` of the head's pre-norm keys on the calibration inputs (the
   least-squares scalar), or ``1 / rms`` of the weights without them. The query norm stays exact.

Cache per token: ``kv_rank + G * rope_dim`` values. Defaults: ``rope_dim`` = half the rotary
width (even, at least 2), ``kv_rank = G d`` (so 3/4 of the teacher's KV cache for a fully rotary
teacher).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

from ..architectures.mixers.mla import MLAMixer, MLASettings
from .adapters import AttentionShape, AttentionWeights
from .converters import AttentionLayout, LayerStats, MixerConverter

COMPRESSION = ("kv_rank", "rope_dim", "rope_freqs", "latent_norm")


def rotary_width(config: PreTrainedConfig, head_dim: int) -> int:
    """Channels per head the teacher's RoPE rotates (``head_dim * partial_rotary_factor``)."""
    factor = getattr(config, "partial_rotary_factor", None)
    params = getattr(config, "rope_parameters", None)
    if factor is None and isinstance(params, dict):
        factor = params.get("partial_rotary_factor")
    return int(head_dim * (factor or 1.0))


def sliding_settings(config: PreTrainedConfig) -> dict:
    """``sliding_window`` and ``sliding_layers`` of the teacher, as its cache lays them out."""
    types, _ = get_layer_types_and_kwargs(config)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"mla cannot reproduce {', '.join(unknown)} layers")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return {"sliding_window": None, "sliding_layers": None}
    return {"sliding_window": config.sliding_window, "sliding_layers": None if len(sliding) == len(types) else sliding}


class MLAConverter(MixerConverter):
    """Attention → MLA; see the module docstring."""

    tunable = frozenset({"exact", "cache_block", *COMPRESSION})

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout,
                 overrides: dict | None = None) -> MLASettings:
        """The plan settings of an MLA mixer for one teacher attention layer; bad sizes are one-line errors."""
        overrides = self.check_overrides(MLAMixer.kind, overrides)
        shape = layout.shape
        H, G, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        rot = rotary_width(teacher_config, d)
        scalar = getattr(teacher_config, "query_pre_attn_scalar", None)
        common = dict(
            n_heads=H, rope_heads=G, v_head_dim=d, scaling=(scalar or d) ** -0.5,
            softcap=getattr(teacher_config, "attn_logit_softcapping", None), q_norm=layout.qk_norm,
            norm_eps=getattr(teacher_config, "rms_norm_eps", 1e-6), qkv_bias=layout.qkv_bias,
            out_bias=layout.out_bias, **sliding_settings(teacher_config),
        )
        if overrides.pop("exact", False):
            given = sorted(set(overrides) & set(COMPRESSION))
            if given:
                raise ValueError(f"exact mla fixes {', '.join(given)}; drop them or drop --exact")
            if layout.qk_norm and rot < d:
                raise ValueError("exact mla of a teacher with k norms needs full rotary (the norm spans rotary "
                                 "and pass-through channels)")
            return MLASettings(kv_rank=G * (2 * d - rot), rope_dim=rot, nope_dim=d - rot, k_norm=layout.qk_norm,
                               exact=True, **common, **overrides)
        rope_dim = overrides.pop("rope_dim", max(2, rot // 4 * 2))
        if not isinstance(rope_dim, int) or rope_dim <= 0 or rope_dim % 2:
            raise ValueError(f"rope_dim must be a positive even number (RoPE rotates channel pairs), got {rope_dim}")
        if rope_dim > d:
            raise ValueError(f"rope_dim {rope_dim} exceeds head_dim {d}")
        if rope_dim > rot:
            raise ValueError(f"rope_dim {rope_dim} exceeds the teacher's {rot} rotary channels per head")
        freqs = overrides.get("rope_freqs")
        if freqs is not None and any(not 0 <= f < rot // 2 for f in freqs):
            raise ValueError(f"rope_freqs must index the teacher's {rot // 2} RoPE frequencies, got {freqs}")
        rows = G * (2 * d - rope_dim)
        max_rank = min(rows, shape.hidden_size + int(layout.qkv_bias))
        kv_rank = overrides.pop("kv_rank", min(G * d, max_rank))
        if not isinstance(kv_rank, int) or not 0 < kv_rank <= max_rank:
            raise ValueError(f"kv_rank must be in 1..{max_rank} (the rank of [K_nope; V] with rope_dim {rope_dim}), "
                             f"got {kv_rank}; --exact converts without compression")
        return MLASettings(kv_rank=kv_rank, rope_dim=rope_dim, nope_dim=d - rope_dim, k_norm=False, **common,
                           **overrides)

    def from_attention(self, attn: AttentionWeights, settings: MLASettings, teacher_config: PreTrainedConfig, *,
                       stats: LayerStats | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The mixer's state dict (names relative to the mixer) from one attention layer; see the module docstring.

        Args:
            attn: the layer's attention weights.
            settings: from :meth:`settings`.
            teacher_config: the teacher's config (head layout, rotary width).
            stats: calibration statistics; their inputs make the factorization activation-aware.
            seed: unused (nothing is random).
        """
        s = settings
        shape = AttentionShape.from_config(teacher_config)
        H, G, d, hidden = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size
        rot = rotary_width(teacher_config, d)
        freqs = s.rope_freqs if s.rope_freqs is not None else list(range(s.rope_dim // 2))
        rope_idx = freqs + [f + rot // 2 for f in freqs]
        nope_idx = [i for i in range(d) if i not in set(rope_idx)]
        order = nope_idx + rope_idx  # the mixer's channel order in a query head
        f64 = torch.float64
        inputs = None if stats is None else stats.inputs.reshape(-1, hidden).to(f64)

        def bias(t, rows):
            return t.to(f64) if t is not None else torch.zeros(rows, dtype=f64)

        wq = attn.q.to(f64).view(H, d, hidden)[:, order]
        wk = attn.k.to(f64).view(G, d, hidden)
        bk = bias(attn.k_bias, G * d).view(G, d)
        if attn.k_norm is not None and not s.k_norm:  # compressed: the k norm is linearized
            scale = attn.k_norm.to(f64)[None] * key_norm_scale(wk, bk, inputs, s.norm_eps)[:, None]  # [G, d]
            wk, bk = wk * scale[..., None], bk * scale
        state = {
            "q_proj.weight": wq.reshape(H * d, hidden),
            "k_rope_proj.weight": wk[:, rope_idx].reshape(-1, hidden),
            "o_proj.weight": attn.o.to(f64),
        }
        if s.qkv_bias:
            state["q_proj.bias"] = bias(attn.q_bias, H * d).view(H, d)[:, order].reshape(-1)
            state["k_rope_proj.bias"] = bk[:, rope_idx].reshape(-1)
        if s.out_bias:
            state["o_proj.bias"] = attn.o_bias.to(f64)
        if s.q_norm:
            state["q_norm"] = attn.q_norm.to(f64)[order]
        if s.k_norm:
            state["k_norm"] = attn.k_norm.to(f64)[rope_idx]

        nope = len(nope_idx)
        m = torch.cat([wk[:, nope_idx].reshape(G * nope, hidden), attn.v.to(f64)])
        b = torch.cat([bk[:, nope_idx].reshape(-1), bias(attn.v_bias, G * d)]) if s.qkv_bias else None
        if s.exact:
            down, down_bias, up = m, b, torch.eye(m.shape[0], dtype=f64)
        else:
            down, down_bias, up = factorize_kv(m, b, s.kv_rank, inputs=inputs, key_rows=G * nope)
        state["kv_down.weight"] = down
        if down_bias is not None:
            state["kv_down.bias"] = down_bias
        rep = H // G
        if nope:
            state["k_up.weight"] = up[: G * nope].view(G, nope, -1).repeat_interleave(rep, 0).reshape(H * nope, -1)
        state["v_up.weight"] = up[G * nope :].view(G, d, -1).repeat_interleave(rep, 0).reshape(H * d, -1)
        if s.latent_norm:
            state["latent_norm"] = latent_norm_weight(down, down_bias, inputs)
        return {name: t.float().contiguous() if t.dtype == f64 and attn.q.dtype != f64 else t.contiguous()
                for name, t in state.items()}


def key_norm_scale(wk: torch.Tensor, bk: torch.Tensor, inputs: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``[G]``: the scalar per KV head that best replaces its key RMSNorm's ``1 / rms`` (least squares)."""
    if inputs is None:  # inputs of unit second moment per channel: E||W x + b||^2 = ||W||^2 + ||b||^2
        ms = (wk.pow(2).sum((1, 2)) + bk.pow(2).sum(1)) / wk.shape[1]
        return torch.rsqrt(ms + eps)
    keys = torch.einsum("nh,gdh->ngd", inputs, wk) + bk  # [tokens, G, d]
    rms = (keys.pow(2).mean(-1) + eps).sqrt()
    return rms.mean(0) / rms.pow(2).mean(0)


def factorize_kv(m: torch.Tensor, b: torch.Tensor | None, rank: int, *, inputs: torch.Tensor | None = None,
                 key_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Rank-``rank`` factorization ``[m | b] ≈ up @ [down | down_bias]``, activation-aware when ``inputs`` are given.

    Args:
        m: ``[R, hidden]`` stacked key (first ``key_rows`` rows) and value projections; b: ``[R]`` or ``None``.
        inputs: ``[tokens, hidden]`` calibration inputs; the error is measured on them (else on unit inputs).
    Returns:
        ``down [rank, hidden]``, ``down_bias [rank]`` (``None`` without ``b``), ``up [R, rank]``.
    """
    a = m if b is None else torch.cat([m, b[:, None]], 1)
    if inputs is not None:
        x = inputs if b is None else torch.cat([inputs, inputs.new_ones(len(inputs), 1)], 1)
        evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
        root = evecs * evals.clamp_min(0).sqrt()  # S = root root^T
    else:
        root = None
    seen = a if root is None else a @ root
    weight = torch.ones(a.shape[0], dtype=a.dtype)
    energy = seen.pow(2).sum(1)
    if 0 < key_rows < a.shape[0] and energy[:key_rows].sum() > 0:
        weight[:key_rows] = (energy[key_rows:].mean() / energy[:key_rows].mean()).sqrt()
    left, _, _ = torch.linalg.svd(weight[:, None] * seen, full_matrices=False)
    top = left[:, :rank]
    down = top.T @ (weight[:, None] * a)
    up = top / weight[:, None]
    return (down, None, up) if b is None else (down[:, :-1], down[:, -1], up)


def latent_norm_weight(down: torch.Tensor, down_bias: torch.Tensor | None, inputs: torch.Tensor | None) -> torch.Tensor:
    """The latent norm's weight: the latent's typical RMS, so the normalized latent keeps its scale."""
    if inputs is None:
        ms = down.pow(2).sum() / down.shape[0] + (0 if down_bias is None else down_bias.pow(2).mean())
        return ms.sqrt().expand(down.shape[0]).clone()
    latent = inputs @ down.T + (0 if down_bias is None else down_bias)
    return latent.pow(2).mean(-1).sqrt().mean().expand(down.shape[0]).clone()


CONVERTER = MLAConverter()
