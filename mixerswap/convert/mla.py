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

**Compressed** (``kv_rank``, ``rope_dim``, ``rope_select``):

1. *Which key channels keep RoPE* (``rope_select``: ``high``, ``norm`` or ``rorope``, the default;
   ``rope_dim`` RoPE channels per KV head, so ``G * rope_dim`` cached RoPE values per token whichever
   is chosen). The other key channels lose RoPE (the approximation: ``q^T R(theta (t - s)) k`` becomes
   ``q^T k``) and join the latent. The choices, how each lays out the heads, and what they measure on
   stories260k are in :mod:`mixerswap.convert.mla_rope`.
2. *Joint low-rank factorization* of ``M = [K_nope; V]`` (all KV heads, ``G nope_dim + G d``
   rows; biases as one more input column fed by a constant 1), minimizing
   ``E_x || D (M - U A) [x; 1] ||^2``: with the calibration inputs' second moment ``S``
   (activation-aware, when statistics are given; else ``S = I``, weight-only SVD),
   ``U = D^-1 P_k`` and ``A = P_k^T D M`` where ``P_k`` are the top ``kv_rank`` left singular vectors of
   ``D M S^{1/2}``. ``D`` weighs each row's error by what it does to the layer (*output-aware*,
   :func:`output_row_weights`): a key error ``dk`` moves a score by ``q^T dk``, so each KV head's keys
   are weighted by the square root of its query heads' second moment ``sum_h E[q_h q_h^T]`` (on the
   calibration inputs, or the query weights' without them); a value error ``dv`` reaches the output as
   ``W_o,h dv``, so each KV head's values are weighted by ``(sum_h W_o,h^T W_o,h)^{1/2}``. On top, a
   scalar balances keys against values (TransMLA): key rows are scaled so both parts carry the same mean
   energy per row, so neither dominates the factorization (scaled up at most ``MAX_KEY_WEIGHT`` times:
   what RoRoPE leaves of dependent heads' keys can be rounding noise). ``kv_weights = balance`` keeps the
   scalar balance alone; the output-aware weights' measured effect is in ``benchmarks/RESULTS.md``
   ("Conversion before any training").
3. *q/k norms* (Qwen3, Gemma-3): a key's RMSNorm spans channels that end up in the latent and in
   the RoPE key, so it cannot be kept. It is linearized: ``k_norm(k) ≈ w * k * c_g`` per KV head,
   ``c_g = E[rms] / E[rms^2]`` of the head's pre-norm keys on the calibration inputs (the
   least-squares scalar), or ``1 / rms`` of the weights without them. The query norm stays exact.

4. *Rank per layer under a global budget* (``kv_budget = F``, instead of ``kv_rank``): the MLA
   layers together cache at most ``F`` times the teacher's ``2 G d`` values per token and layer.
   Before any weight is written, each layer is profiled alone (:meth:`MLAConverter.profile`): its
   error at every rank, measured as the converted mixer's output error against the teacher
   attention output on the calibration inputs (the factorization's own error, weight-only,
   without calibration). After the RoPE keys, the latent channels are shared greedily, each to the
   layer whose error drops most (:func:`allocate_kv_ranks`); the chosen ranks are ordinary
   ``kv_rank`` settings in the plan. Without an explicit ``rope_dim``, the RoPE key takes at most
   half the budget (``rope_dim <= F d``).

Cache per token: ``kv_rank + G * rope_dim`` values (``rope_heads * rope_dim`` in the plan). Defaults:
``rope_dim`` = half the rotary width (even, at least 2), ``rope_select = rorope``, ``kv_rank = G d``
(so 3/4 of the teacher's KV cache for a fully rotary teacher).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

from ..architectures.mixers.mla import MLAMixer, MLASettings, rms_norm
from .adapters import AttentionShape, AttentionWeights
from .calibration import replay_mixer
from .converters import AttentionLayout, LayerStats, MixerConverter
from .mla_rope import HeadSplit, bias64, rope_layout, select_rope_freqs, split_heads

logger = logging.getLogger(__name__)

COMPRESSION = ("kv_rank", "rope_dim", "rope_freqs", "latent_norm", "kv_weights")
ROPE_SELECT = ("high", "norm", "rorope")
DEFAULT_ROPE_SELECT = "rorope"  # measured best (mla_rope docstring)
MIN_RANK = 1  # latent channels every layer keeps under a kv_budget
PROFILE_POINTS = 24  # ranks at which a layer's error is measured for a kv_budget
# keys are scaled up at most this much to balance the values: a key part orders of magnitude smaller (what
# RoRoPE leaves of keys whose heads' positional parts are dependent: rounding noise) is not worth latent channels
MAX_KEY_WEIGHT = 1e3
WEIGHT_FLOOR = 1e-3  # of the output-aware row weights' mean eigenvalue: directions nothing reads still count a little


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
    plan_wide = frozenset({"kv_budget", "rope_select"})  # rope_select norm is chosen in profile()

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout,
                 overrides: dict | None = None) -> MLASettings:
        """The plan settings of an MLA mixer for one teacher attention layer; bad sizes are one-line errors."""
        overrides = self.check_overrides(MLAMixer.kind, overrides)
        shape = layout.shape
        H, G, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        rot = rotary_width(teacher_config, d)
        scalar = getattr(teacher_config, "query_pre_attn_scalar", None)
        common = dict(
            n_heads=H, v_head_dim=d, scaling=(scalar or d) ** -0.5,
            softcap=getattr(teacher_config, "attn_logit_softcapping", None), q_norm=layout.qk_norm,
            norm_eps=getattr(teacher_config, "rms_norm_eps", 1e-6), qkv_bias=layout.qkv_bias,
            out_bias=layout.out_bias, **sliding_settings(teacher_config),
        )
        budget = overrides.pop("kv_budget", None)
        select_given = "rope_select" in overrides
        select = overrides.pop("rope_select", DEFAULT_ROPE_SELECT)
        if select not in ROPE_SELECT:
            raise ValueError(f"rope_select must be one of {', '.join(ROPE_SELECT)}, got {select!r}")
        if overrides.pop("exact", False):
            given = sorted(set(overrides) & set(COMPRESSION) | ({"kv_budget"} if budget is not None else set())
                           | ({"rope_select"} if select_given else set()))
            if given:
                raise ValueError(f"exact mla fixes {', '.join(given)}; drop them or drop --exact")
            if layout.qk_norm and rot < d:
                raise ValueError("exact mla of a teacher with k norms needs full rotary (the norm spans rotary "
                                 "and pass-through channels)")
            return MLASettings(kv_rank=G * (2 * d - rot), rope_dim=rot, rope_heads=G, nope_dim=d - rot,
                               k_norm=layout.qk_norm, exact=True, **common, **overrides)
        rope_dim = max(2, rot // 4 * 2)
        if budget is not None:
            check_kv_budget(budget, overrides)
            rope_dim = max(2, min(rope_dim, int(budget * d) // 2 * 2))  # the RoPE key takes at most half the budget
        rope_dim = overrides.pop("rope_dim", rope_dim)
        if not isinstance(rope_dim, int) or rope_dim <= 0 or rope_dim % 2:
            raise ValueError(f"rope_dim must be a positive even number (RoPE rotates channel pairs), got {rope_dim}")
        if rope_dim > d:
            raise ValueError(f"rope_dim {rope_dim} exceeds head_dim {d}")
        if rope_dim > rot:
            raise ValueError(f"rope_dim {rope_dim} exceeds the teacher's {rot} rotary channels per head")
        rope = rope_layout(select, rope_dim, overrides.pop("rope_freqs", None), G, d, rot, layout.qk_norm)
        rows = G * (rope["nope_dim"] + d)
        max_rank = min(rows, shape.hidden_size + int(layout.qkv_bias))
        rope_values = rope["rope_heads"] * rope["rope_dim"]
        if budget is not None and budget * 2 * G * d < rope_values + MIN_RANK:
            raise ValueError(f"kv_budget {budget} leaves {budget * 2 * G * d:g} cached values per token of the "
                             f"teacher's {2 * G * d}, less than the RoPE key ({rope_values}) plus {MIN_RANK} latent "
                             "channel; lower rope_dim or raise the budget")
        kv_rank = overrides.pop("kv_rank", min(G * d, max_rank))  # under a kv_budget: until allocate() sets it
        if not isinstance(kv_rank, int) or not 0 < kv_rank <= max_rank:
            raise ValueError(f"kv_rank must be in 1..{max_rank} (the rank of the latent's keys and values with "
                             f"rope_dim {rope_dim}, rope_select {rope['rope_select']}), got {kv_rank}; --exact "
                             "converts without compression")
        return MLASettings(kv_rank=kv_rank, k_norm=False, **rope, **common, **overrides)

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
        f64 = torch.float64
        inputs = None if stats is None else stats.inputs.reshape(-1, hidden).to(f64)
        split = split_heads(attn, s, shape, rotary_width(teacher_config, d), inputs)
        state = {
            "q_proj.weight": split.q.reshape(-1, hidden),
            "k_rope_proj.weight": split.k_rope,
            "o_proj.weight": attn.o.to(f64),
        }
        if s.qkv_bias:
            state["q_proj.bias"] = split.q_bias.reshape(-1)
            state["k_rope_proj.bias"] = split.k_rope_bias
        if s.out_bias:
            state["o_proj.bias"] = attn.o_bias.to(f64)
        if s.q_norm:
            state["q_norm"] = split.q_norm
        if s.k_norm:
            state["k_norm"] = split.k_norm

        nope = s.nope_dim
        m, b = _latent_rows(attn, s, split)
        if s.exact:
            down, down_bias, up = m, b, torch.eye(m.shape[0], dtype=f64)
        else:
            blocks = output_row_weights(attn, s, split, shape, inputs)
            down, down_bias, up = factorize_kv(m, b, s.kv_rank, inputs=inputs, key_rows=G * nope, blocks=blocks)
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

    def profile(self, attn: AttentionWeights, settings: MLASettings, teacher_config: PreTrainedConfig, *,
                stats: LayerStats | None = None, layer_idx: int = 0) -> MLAProfile:
        """What :meth:`allocate` needs of one layer: the ``norm`` choice of ``rope_freqs`` (see
        :func:`select_rope_freqs`), then, with those, the layer's error at every ``kv_rank``.

        The error, with calibration statistics, is the measured squared error of the converted mixer's output
        against the teacher attention output on the calibration inputs (what a rank costs where it
        matters, keys through the softmax and values through ``o_proj``), at up to
        ``PROFILE_POINTS`` ranks, linear in between; the factorization is computed once, as rank
        ``k`` keeps its first ``k`` latent channels. Without them, :func:`kv_error_curve` (weight-only).
        """
        shape = AttentionShape.from_config(teacher_config)
        G, d = shape.num_kv_heads, shape.head_dim
        rot = rotary_width(teacher_config, d)
        if settings.rope_select == "norm" and settings.rope_freqs is None:
            freqs = select_rope_freqs(attn, settings, shape, rot, stats, layer_idx)
            if freqs is None:
                logger.warning("layer %d: rope_select norm needs calibration statistics; keeping the highest "
                               "frequencies (rope_select high)", layer_idx)
            settings = settings.model_copy(update={"rope_freqs": freqs, "rope_select": "norm" if freqs else "high"})
        chosen = {"rope_freqs": settings.rope_freqs, "rope_select": settings.rope_select}
        if stats is None:
            split = split_heads(attn, settings, shape, rot, None)
            m, b = _latent_rows(attn, settings, split)
            blocks = output_row_weights(attn, settings, split, shape, None)
            return MLAProfile(kv_error_curve(m, b, key_rows=G * settings.nope_dim, blocks=blocks), **chosen)
        inputs = stats.inputs.reshape(-1, shape.hidden_size).to(torch.float64)
        top = min(G * (settings.nope_dim + d), shape.hidden_size + int(settings.qkv_bias))
        full = self.from_attention(attn, settings.model_copy(update={"kv_rank": top}), teacher_config, stats=stats)
        ranks = torch.linspace(MIN_RANK, top, min(PROFILE_POINTS, top)).round().long().unique().tolist()
        errors = []
        for k in ranks:
            state = {name: t[:k] if name.startswith(("kv_down", "latent_norm")) else
                     t[:, :k] if name in ("k_up.weight", "v_up.weight") else t for name, t in full.items()}
            if settings.latent_norm:
                state["latent_norm"] = latent_norm_weight(state["kv_down.weight"].double(),
                                                          state.get("kv_down.bias"), inputs).to(full["latent_norm"])
            mixer = MLAMixer(settings.model_copy(update={"kv_rank": k}), shape.hidden_size, layer_idx)
            mixer.load_state_dict(state)
            errors.append((replay_mixer(mixer, stats).double() - stats.outputs.double()).pow(2).sum())
        curve = torch.stack(errors) / stats.outputs.double().pow(2).sum().clamp_min(1e-300)
        at = torch.arange(top + 1, dtype=torch.float64).clamp_min(MIN_RANK)
        return MLAProfile(_interpolate(at, torch.tensor(ranks, dtype=torch.float64), curve), **chosen)

    def allocate(self, layers: dict[int, tuple[MLASettings, MLAProfile]], teacher_config: PreTrainedConfig,
                 request: dict) -> dict[int, MLASettings]:
        """Each layer's ``rope_freqs`` as profiled and, under ``request["kv_budget"]``, its ``kv_rank`` (see
        :func:`allocate_kv_ranks`)."""
        chosen = {idx: MLASettings(**{**s.model_dump(), "rope_freqs": p.rope_freqs, "rope_select": p.rope_select})
                  for idx, (s, p) in layers.items()}
        if "kv_budget" not in request:
            return chosen
        shape = AttentionShape.from_config(teacher_config)
        budget = request["kv_budget"]
        total = math.floor(budget * 2 * shape.num_kv_heads * shape.head_dim * len(layers) + 1e-9)
        rope = {idx: s.rope_heads * s.rope_dim for idx, s in chosen.items()}
        latent = total - sum(rope.values())
        ranks = allocate_kv_ranks({idx: p.curve for idx, (_, p) in layers.items()}, latent)
        if ranks is None:
            raise ValueError(f"kv_budget {budget} allows {total} cached values per token over the {len(layers)} "
                             f"layers, less than their RoPE keys ({sum(rope.values())}) plus {MIN_RANK} latent "
                             "channel each; lower rope_dim or raise the budget")
        if sum(ranks.values()) < latent:
            logger.info("kv_budget %s: %d of %d latent channels used; more would lower no layer's measured error",
                        budget, sum(ranks.values()), latent)
        return {idx: MLASettings(**{**s.model_dump(), "kv_rank": ranks[idx]}) for idx, s in chosen.items()}


@dataclass
class MLAProfile:
    """One layer's profile: its error at every ``kv_rank`` (``[max_rank + 1]``, entry 0 unused) and its RoPE choice."""

    curve: torch.Tensor
    rope_freqs: list[int] | None
    rope_select: str


def check_kv_budget(budget, overrides: dict) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"kv_budget must be a fraction of the teacher's KV cache in (0, 1], got {budget!r}")
    if "kv_rank" in overrides:
        raise ValueError("kv_budget chooses kv_rank per layer; give kv_budget or kv_rank, not both")


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``fp(xp)`` at ``x`` (``xp`` increasing, ``x`` within its range)."""
    if len(xp) == 1:
        return fp.expand(len(x)).clone()
    i = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, len(xp) - 2)
    t = (x - xp[i]) / (xp[i + 1] - xp[i])
    return fp[i] + t * (fp[i + 1] - fp[i])


def _latent_rows(attn: AttentionWeights, s: MLASettings, split: HeadSplit) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``M = [K_nope; V]`` ``[G nope_dim + G d, hidden]`` and its bias (``None`` without qkv biases)."""
    hidden = split.keys.shape[-1]
    m = torch.cat([split.keys.reshape(-1, hidden), attn.v.to(torch.float64)])
    b = torch.cat([split.key_bias.reshape(-1), bias64(attn.v_bias, attn.v.shape[0])]) if s.qkv_bias else None
    return m, b


def _balanced_kv(m: torch.Tensor, b: torch.Tensor | None, inputs: torch.Tensor | None, key_rows: int,
                 rows: torch.Tensor | None = None):
    """``a = B [m | b]`` (``B = rows``, the block-diagonal output-aware weights, when given), the scalar
    key/value balance ``w`` per row and ``w a S^{1/2}``, whose truncated SVD is the best factorization (``S``
    the inputs' second moment, ``I`` without inputs); ``D = diag(w) B``."""
    a = m if b is None else torch.cat([m, b[:, None]], 1)
    if rows is not None:
        a = rows @ a
    seen = a
    if inputs is not None:
        x = inputs if b is None else torch.cat([inputs, inputs.new_ones(len(inputs), 1)], 1)
        evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
        seen = a @ (evecs * evals.clamp_min(0).sqrt())  # S = root root^T
    weight = torch.ones(a.shape[0], dtype=a.dtype)
    energy = seen.pow(2).sum(1)
    if 0 < key_rows < a.shape[0] and energy[:key_rows].sum() > 0:
        ratio = (energy[key_rows:].mean() / energy[:key_rows].mean()).sqrt()
        weight[:key_rows] = ratio.clamp_max(MAX_KEY_WEIGHT)
    return a, weight, weight[:, None] * seen


def factorize_kv(m: torch.Tensor, b: torch.Tensor | None, rank: int, *, inputs: torch.Tensor | None = None,
                 key_rows: int = 0, blocks: list[torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Rank-``rank`` factorization ``[m | b] ≈ up @ [down | down_bias]``, activation-aware when ``inputs`` are given.

    Args:
        m: ``[R, hidden]`` stacked key (first ``key_rows`` rows) and value projections; b: ``[R]`` or ``None``.
        inputs: ``[tokens, hidden]`` calibration inputs; the error is measured on them (else on unit inputs).
        key_rows: how many of ``m``'s rows are keys (balanced against the values by a scalar).
        blocks: square row weights in row order (:func:`output_row_weights`); ``None`` weighs rows alike.
    Returns:
        ``down [rank, hidden]``, ``down_bias [rank]`` (``None`` without ``b``), ``up [R, rank]``.
    """
    rows = None if blocks is None else torch.block_diag(*blocks)
    a, weight, seen = _balanced_kv(m, b, inputs, key_rows, rows)
    left, _, _ = torch.linalg.svd(seen, full_matrices=False)
    top = left[:, :rank]
    down = top.T @ (weight[:, None] * a)
    up = top / weight[:, None]
    if rows is not None:
        up = torch.linalg.solve(rows, up)
    return (down, None, up) if b is None else (down[:, :-1], down[:, -1], up)


def kv_error_curve(m: torch.Tensor, b: torch.Tensor | None, *, inputs: torch.Tensor | None = None,
                   key_rows: int = 0, blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``[max_rank + 1]``: :func:`factorize_kv`'s relative error at every rank ``k``,
    ``E||D (M - U A) [x; 1]||^2 / E||D M [x; 1]||^2`` (the tail of the squared singular values; 1 at
    rank 0, 0 at full rank), ``x`` the calibration inputs or unit inputs without them."""
    _, _, seen = _balanced_kv(m, b, inputs, key_rows, None if blocks is None else torch.block_diag(*blocks))
    energy = torch.linalg.svdvals(seen).pow(2)
    tail = energy.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)]) / tail[0].clamp_min(1e-300)


def allocate_kv_ranks(curves: dict[int, torch.Tensor], values: int) -> dict[int, int] | None:
    """Share ``values`` latent channels among layers, greedy on measured error (``None`` if too few).

    ``curves[idx][k]`` is layer ``idx``'s error at rank ``k``. Every layer starts at ``MIN_RANK``;
    each further channel goes to the layer whose error drops most by it (a channel costs every
    layer the same: one cached value per token), the drops read from the curve's lower convex
    hull (so a measured curve that flattens and then falls again is seen as falling all along,
    and the greedy choice is the best split of the channels). Stops when the channels are spent,
    every layer has its full rank, or no error would drop any more (no channel is wasted on a layer
    already exact).
    """
    if values < MIN_RANK * len(curves):
        return None
    drops = {idx: -convex_minorant(c[MIN_RANK:]).diff() for idx, c in curves.items()}
    ranks = {idx: MIN_RANK for idx in curves}
    heap = [(-d[0].item(), idx) for idx, d in drops.items() if len(d)]
    heapq.heapify(heap)
    for _ in range(values - MIN_RANK * len(curves)):
        if not heap or -heap[0][0] <= 1e-12 * max(c[MIN_RANK].item() for c in curves.values()):
            break
        _, idx = heapq.heappop(heap)
        ranks[idx] += 1
        step = ranks[idx] - MIN_RANK
        if step < len(drops[idx]):
            heapq.heappush(heap, (-drops[idx][step].item(), idx))
    return ranks


def convex_minorant(y: torch.Tensor) -> torch.Tensor:
    """The lower convex hull of the points ``(k, y[k])``, at every ``k`` (its steps only grow)."""
    hull = [0]
    for k in range(1, len(y)):
        while len(hull) > 1:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (k - a) >= (y[k] - y[a]) * (b - a):  # b lies on or above the chord a-k
                hull.pop()
            else:
                break
        hull.append(k)
    xs = torch.tensor(hull, dtype=torch.float64)
    return _interpolate(torch.arange(len(y), dtype=torch.float64), xs, y[hull].double())


def _psd_root(c: torch.Tensor) -> torch.Tensor:
    """``c^{1/2}`` of a PSD matrix, its eigenvalues floored at ``WEIGHT_FLOOR`` times their mean (so it inverts)."""
    evals, evecs = torch.linalg.eigh(c)
    evals = evals.clamp_min(0)
    evals = evals + WEIGHT_FLOOR * evals.mean().clamp_min(1e-300)
    return (evecs * evals.sqrt()) @ evecs.T


def output_row_weights(attn: AttentionWeights, s: MLASettings, split: HeadSplit, shape: AttentionShape,
                       inputs: torch.Tensor | None) -> list[torch.Tensor] | None:
    """``None`` with ``kv_weights = balance``; else the blocks of ``D``'s output-aware part (module docstring,
    step 2), in the row order of ``[K_nope; V]``: per KV head ``g``, ``(sum_h E[q_h q_h^T])^{1/2}`` over its
    query heads' no-RoPE channels (a key error ``dk`` changes a score by ``q^T dk``), then per KV head
    ``(sum_h W_o,h^T W_o,h)^{1/2}`` (a value error ``dv`` reaches the output as ``W_o,h dv``); each part
    normalized by :func:`_unit_scale`. Queries on the calibration inputs (q norm applied), or their weights'
    second moment on unit inputs without them."""
    if s.kv_weights == "balance":
        return None
    H, G, d, hidden = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size
    nope = s.nope_dim
    if inputs is None:
        wq, bq = split.q[:, :nope], split.q_bias[:, :nope]
        second = torch.einsum("hix,hjx->hij", wq, wq) + torch.einsum("hi,hj->hij", bq, bq)
    else:
        q = torch.einsum("nx,hcx->nhc", inputs, split.q) + split.q_bias
        if s.q_norm:
            q = rms_norm(q, split.q_norm, s.norm_eps, s.q_norm_dims)
        q = q[..., :nope]
        second = torch.einsum("nhi,nhj->hij", q, q) / len(q)
    keys = second.view(G, H // G, nope, nope).sum(1)  # the score scale would cancel in the key/value balance
    wo = attn.o.to(torch.float64).view(hidden, H, d)
    values = torch.einsum("xhi,xhj->hij", wo, wo).view(G, H // G, d, d).sum(1)
    return _unit_scale([_psd_root(c) for c in keys]) * bool(nope) + _unit_scale([_psd_root(c) for c in values])


def _unit_scale(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """``blocks`` divided by their mean eigenvalue (their relative sizes kept). The factorization's function does
    not depend on an overall scale of ``D``, but its split between ``kv_down`` and the up-projections does
    (``up = D^-1 ...``): unscaled, SmolLM2's large queries and ``o_proj`` made the up-projections ~0.01 in RMS,
    and the align stage's first Adam step (3e-3 per weight) took the loss from 2.8 to 49."""
    scale = torch.stack([b.diagonal().mean() for b in blocks]).mean().clamp_min(1e-300)
    return [b / scale for b in blocks]


def latent_norm_weight(down: torch.Tensor, down_bias: torch.Tensor | None, inputs: torch.Tensor | None) -> torch.Tensor:
    """The latent norm's weight: the latent's typical RMS, so the normalized latent keeps its scale."""
    if inputs is None:
        ms = down.pow(2).sum() / down.shape[0] + (0 if down_bias is None else down_bias.pow(2).mean())
        return ms.sqrt().expand(down.shape[0]).clone()
    latent = inputs @ down.T + (0 if down_bias is None else down_bias)
    return latent.pow(2).mean(-1).sqrt().mean().expand(down.shape[0]).clone()


CONVERTER = MLAConverter()
