"""RoPE selection of the compressed GQA → MLA conversion: which key channels keep RoPE, how heads are laid out.

Notation as in :mod:`mixerswap.convert.mla` (``H`` query heads, ``G`` key/value heads, head size ``d``,
rotary width ``r``, ``F = r / 2`` frequencies).

Which key channels keep RoPE (``rope_select``; ``rope_dim`` RoPE channels per KV head, so
``G * rope_dim`` cached RoPE values per token whichever is chosen). The other key channels lose
RoPE (the approximation: ``q^T R(theta (t - s)) k`` becomes ``q^T k``) and join the latent.

* ``high`` (MHA2MLA's ``S_high``, Ji et al. 2025): each KV head keeps the ``rope_dim / 2`` highest
  frequencies (or ``rope_freqs``); needs no data.
* ``norm``: the same layout, the frequencies (shared by the KV heads, as the mixer's RoPE keys
  are) chosen on the calibration text by :func:`select_rope_freqs`: MHA2MLA's 2-norm score
  ``sum_h E||q_{h,f}|| E||k_{g(h),f}||`` times how far the pair turns over the calibration rows'
  causal distances, ``E|e^{i theta_f (t - s)} - 1|`` (what removing RoPE changes is at most
  their product; MHA2MLA's score alone prefers the low frequencies, whose keys are largest but
  which barely turn). Set in :meth:`~mixerswap.convert.mla.MLAConverter.profile` and recorded as
  ``rope_freqs``; a per-KV-head choice (MHA2MLA's) did no better in a stories260k test and needs a key layout
  the mixer does not have.
* ``rorope`` (the default; TransMLA's RoRoPE, Meng et al. 2025): RoPE rotates the channel pair of
  frequency ``f`` by the same angle in every KV head, so an orthogonal ``G x G`` mix ``U_f`` of
  the heads commutes with it. :func:`key_rotations` takes ``U_f`` from the keys' energy across
  heads (PCA on the calibration tokens, weight-only without them); the energy gathers in the
  first rotated heads. One shared RoPE key (``rope_heads = 1``) holds ``G * rope_dim / 2``
  *slots*, each frequency ``f`` on its first ``m_f`` rotated heads (``m_f`` equal across
  frequencies, as TransMLA; ``rope_freqs`` lists each slot's frequency, repeated ``m_f`` times);
  a query head ``h`` of group ``g`` reads slot ``(f, j)`` with ``U_f[j, g] q_{h,f}`` (the queries
  absorb ``U``). Each KV head's no-RoPE key is what its keys keep outside the kept rotated heads
  (``k_g - sum_{j < m_f} U_f[j, g] k'_{f,j}``, every channel, so ``nope_dim = d``), read by the
  query head's own channels; a q norm takes its RMS over those (``q_norm_dims``).

Measured on stories260k (``kv_budget``, calibrated on 40 teacher stories, 4096 tokens; held-out
perplexity on 40 other stories, teacher 3.48; calibration error = mean over the 5 layers of the
converted mixer's relative output error on the calibration inputs, what
:meth:`~mixerswap.convert.mla.MLAConverter.profile` measures)::

    KV budget   rope_select           calib. error   held-out ppl
    50%         high (S_high)         0.881          53.0
    50%         MHA2MLA 2-norm        0.741          28.4    (rope_freqs [2, 3] in every layer)
    50%         norm                  0.723          23.7    ([1, 2])
    50%         rorope                0.566           5.85
    25%         high                  0.942          67.9
    25%         MHA2MLA 2-norm        0.921          65.4    ([3])
    25%         norm                  0.900          63.0
    25%         rorope                0.822          33.7

With a full-rank latent (only the RoPE choice loses anything; ``rope_dim`` 4 / 2 per KV head)
``high`` gives perplexity 38.3 / 74.5, ``norm`` 7.6 / 29.2, ``rorope`` 3.66 / 4.83: most of
``high``'s loss at 50% is the RoPE choice, while at 25% the 8 latent values per token and layer
are what remains. Weight-only (no calibration), ``rorope`` gives 9.5 / 61.7 against ``high``'s
43.5 / 86.4. Hence ``rorope`` is the default. The conversion path decides: ``norm`` is chosen in
:meth:`~mixerswap.convert.mla.MLAConverter.profile`, which the pipeline runs when ``kv_budget`` or
``rope_select`` is given; without calibration statistics it keeps ``high`` (logged). A teacher with
one KV head has nothing to rotate: ``rorope`` is ``high`` there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..architectures.mixers.mla import MLASettings, rms_norm
from .adapters import AttentionShape, AttentionWeights
from .converters import LayerStats


def rope_channels(settings: MLASettings, rot: int, d: int) -> tuple[list[int], list[int]]:
    """The teacher's key channels of a head that keep RoPE (``rope_freqs`` pairs, rotate-half) and the rest."""
    freqs = settings.rope_freqs if settings.rope_freqs is not None else list(range(settings.rope_dim // 2))
    rope_idx = freqs + [f + rot // 2 for f in freqs]
    return rope_idx, [i for i in range(d) if i not in set(rope_idx)]


def rorope_freqs(slots: int, F: int) -> list[int]:
    """The default frequency of each of ``slots`` RoRoPE slots: every frequency the same number of times, the
    highest ones (lowest index) once more when the slots do not divide evenly."""
    return [f for f in range(F) for _ in range(slots // F + int(f < slots % F))]


def rope_layout(select: str, rope_dim: int, freqs: list[int] | None, G: int, d: int, rot: int, qk_norm: bool) -> dict:
    """The RoPE settings of a compressed layer for ``rope_select``, ``rope_dim`` RoPE channels per KV head.

    ``high`` / ``norm``: a RoPE key per KV head on ``rope_dim / 2`` frequencies (``rope_freqs``; ``None`` = the
    highest, or for ``norm`` until :meth:`~mixerswap.convert.mla.MLAConverter.allocate` sets them).
    ``rorope``: one shared RoPE key of slots, each a frequency of one rotated KV head; ``rope_freqs`` lists
    each slot's frequency (any number of slots, each frequency at most ``G`` times), or by default
    ``G * rope_dim / 2`` slots (:func:`rorope_freqs`); the query heads keep all their ``d`` channels as no-RoPE
    part. Fewer slots than the default leave more of a budget to the latent (measured in
    ``benchmarks/RESULTS.md``, "A larger budget on stories260k").
    """
    F = rot // 2
    if freqs is not None and any(not 0 <= f < F for f in freqs):
        raise ValueError(f"rope_freqs must index the teacher's {F} RoPE frequencies, got {freqs}")
    if select == "rorope" and G > 1:
        if freqs is None:
            freqs = rorope_freqs(G * rope_dim // 2, F)
        elif not freqs or max(freqs.count(f) for f in freqs) > G:
            raise ValueError(f"rope_freqs of rope_select rorope lists the frequency of each RoPE slot (at least "
                             f"one), each frequency at most {G} times (once per KV head), got {freqs}")
        return dict(rope_select="rorope", rope_heads=1, rope_dim=2 * len(freqs), nope_dim=d, rope_freqs=sorted(freqs),
                    q_norm_dims=d if qk_norm else None)
    if freqs is not None and select == "norm":
        raise ValueError("rope_select norm chooses rope_freqs on the calibration text; give one or the other")
    if freqs is not None and len(set(freqs)) != len(freqs):
        raise ValueError(f"rope_freqs must be distinct (each KV head's RoPE key keeps a frequency once), got {freqs}")
    return dict(rope_select="high" if select == "rorope" else select, rope_heads=G, rope_dim=rope_dim,
                nope_dim=d - rope_dim, rope_freqs=freqs)


def bias64(t: torch.Tensor | None, rows: int) -> torch.Tensor:
    """A bias in fp64, zeros when the teacher has none."""
    return t.to(torch.float64) if t is not None else torch.zeros(rows, dtype=torch.float64)


def key_weights(attn: AttentionWeights, s: MLASettings, shape: AttentionShape,
          inputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key weights ``[G, d, hidden]`` and biases ``[G, d]`` (fp64), the k norm linearized when compressed."""
    G, d = shape.num_kv_heads, shape.head_dim
    wk = attn.k.to(torch.float64).view(G, d, shape.hidden_size)
    bk = bias64(attn.k_bias, G * d).view(G, d)
    if attn.k_norm is not None and not s.k_norm:
        scale = attn.k_norm.to(torch.float64)[None] * key_norm_scale(wk, bk, inputs, s.norm_eps)[:, None]  # [G, d]
        wk, bk = wk * scale[..., None], bk * scale
    return wk, bk


@dataclass
class HeadSplit:
    """A layer's attention weights laid out for the mixer (fp64): query heads ``q [H, nope_dim + rope_dim, hidden]``
    (``q_bias [H, ...]``, ``q_norm`` weight), the RoPE key ``k_rope [rope_heads * rope_dim, hidden]`` (``k_rope_bias``,
    ``k_norm`` weight) and the no-RoPE keys the latent carries, ``keys [G, nope_dim, hidden]``
    (``key_bias [G, nope_dim]``)."""

    q: torch.Tensor
    q_bias: torch.Tensor
    q_norm: torch.Tensor | None
    k_rope: torch.Tensor
    k_rope_bias: torch.Tensor
    k_norm: torch.Tensor | None
    keys: torch.Tensor
    key_bias: torch.Tensor


def split_heads(attn: AttentionWeights, s: MLASettings, shape: AttentionShape, rot: int,
                 inputs: torch.Tensor | None) -> HeadSplit:
    """Split every query and key head into its RoPE and no-RoPE parts (see the module docstring)."""
    H, G, d, hidden = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size
    f64 = torch.float64
    wq, bq = attn.q.to(f64).view(H, d, hidden), bias64(attn.q_bias, H * d).view(H, d)
    q_norm = None if attn.q_norm is None else attn.q_norm.to(f64)
    wk, bk = key_weights(attn, s, shape, inputs)
    if s.rope_select != "rorope":
        rope_idx, nope_idx = rope_channels(s, rot, d)
        order = nope_idx + rope_idx  # the mixer's channel order in a query head
        k_norm = None if attn.k_norm is None else attn.k_norm.to(f64)[rope_idx]
        return HeadSplit(wq[:, order], bq[:, order], None if q_norm is None else q_norm[order],
                         wk[:, rope_idx].reshape(-1, hidden), bk[:, rope_idx].reshape(-1), k_norm,
                         wk[:, nope_idx], bk[:, nope_idx])
    F = rot // 2
    rotation = key_rotations(wk, bk, rot, inputs)  # [F, G, G]
    freq = torch.tensor(s.rope_freqs)
    head = torch.tensor([s.rope_freqs[:i].count(f) for i, f in enumerate(s.rope_freqs)])  # rotated head of each slot
    kept = torch.zeros(F, G, dtype=torch.bool)
    kept[freq, head] = True
    pairs, bias_pairs = wk[:, :rot].view(G, 2, F, hidden), bk[:, :rot].view(G, 2, F)  # channel = half * F + f
    rotated = torch.einsum("fjg,gcfx->jcfx", rotation, pairs)
    rotated_bias = torch.einsum("fjg,gcf->jcf", rotation, bias_pairs)
    dropped = rotation * ~kept[..., None]  # the rotated heads that lose RoPE; their keys stay in the latent
    rest = torch.einsum("fjg,fjh->fgh", dropped, dropped)  # per frequency, the projection onto them
    keys = torch.cat([torch.einsum("fgh,hcfx->gcfx", rest, pairs).reshape(G, rot, hidden), wk[:, rot:]], 1)
    key_bias = torch.cat([torch.einsum("fgh,hcf->gcf", rest, bias_pairs).reshape(G, rot), bk[:, rot:]], 1)
    channels = torch.cat([freq, freq + F])  # the teacher's query channels each RoPE channel reads
    coef = rotation[freq, head].T.repeat(1, 2)[torch.arange(H) // (H // G)]  # [H, 2 * slots]
    return HeadSplit(torch.cat([wq, coef[..., None] * wq[:, channels]], 1), torch.cat([bq, coef * bq[:, channels]], 1),
                     None if q_norm is None else torch.cat([q_norm, q_norm[channels]]),
                     torch.cat([rotated[head, 0, freq], rotated[head, 1, freq]]),
                     torch.cat([rotated_bias[head, 0, freq], rotated_bias[head, 1, freq]]), None, keys, key_bias)


def key_rotations(wk: torch.Tensor, bk: torch.Tensor, rot: int, inputs: torch.Tensor | None) -> torch.Tensor:
    """``[F, G, G]``: per frequency ``f``, the orthogonal mix of the ``G`` key heads (rows, by energy, largest
    first) that puts the keys' energy on that frequency in the fewest heads: the eigenvectors of
    ``C_f[g, h] = E[k_{g,f} . k_{h,f}]`` over the calibration tokens (unit inputs without them), each key's
    channel pair ``(f, f + r/2)`` counted as two samples, since one mix acts on both alike (TransMLA's RoRoPE)."""
    G, _, hidden = wk.shape
    F = rot // 2
    if inputs is None:
        pairs, bias = wk[:, :rot].view(G, 2, F, hidden), bk[:, :rot].view(G, 2, F)
        second = torch.einsum("gcfx,hcfx->fgh", pairs, pairs) + torch.einsum("gcf,hcf->fgh", bias, bias)
    else:
        keys = (torch.einsum("nx,gcx->ngc", inputs, wk[:, :rot]) + bk[:, :rot]).view(-1, G, 2, F)
        second = torch.einsum("ngcf,nhcf->fgh", keys, keys) / len(keys)
    _, vectors = torch.linalg.eigh(second)  # ascending
    return vectors.flip(-1).transpose(1, 2)


def select_rope_freqs(attn: AttentionWeights, s: MLASettings, shape: AttentionShape, rot: int,
                      stats: LayerStats | None, layer_idx: int) -> list[int] | None:
    """``rope_dim / 2`` frequencies (shared by the KV heads) whose removal of RoPE would change the scores most,
    or ``None`` without calibration statistics.

    Per frequency ``f``: ``sum_h E||q_{h,f}|| E||k_{g(h),f}|| * rho_f``. The first factors are MHA2MLA's 2-norm
    score (the largest the pair's contribution ``q^T R(theta_f (t - s)) k`` can be); without RoPE the
    contribution becomes ``q^T k``, off by at most ``||q|| ||k|| |e^{i theta_f (t - s)} - 1|``, so the score is
    weighted by ``rho_f``, that factor's mean over the calibration rows' causal pairs (within the sliding window):
    a low frequency turns little over that distance, and keeping its RoPE buys little however large its keys.
    """
    if stats is None:
        return None
    H, G, d, hidden = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size
    F = rot // 2
    x = stats.inputs.reshape(-1, hidden).to(torch.float64)
    q = (x @ attn.q.to(torch.float64).T + bias64(attn.q_bias, H * d)).view(-1, H, d)
    if attn.q_norm is not None:
        q = rms_norm(q, attn.q_norm.to(torch.float64), s.norm_eps)
    wk, bk = key_weights(attn, s, shape, x)
    k = torch.einsum("nx,gdx->ngd", x, wk) + bk
    q_size = q[..., :rot].reshape(-1, H, 2, F).norm(dim=2).mean(0)  # [H, F]
    k_size = k[..., :rot].reshape(-1, G, 2, F).norm(dim=2).mean(0)  # [G, F]
    sliding = s.sliding_window is not None and (s.sliding_layers is None or layer_idx in s.sliding_layers)
    window = s.sliding_window if sliding else None
    score = (q_size.view(G, H // G, F).sum(1) * k_size).sum(0) * rotation_drift(stats, F, window)
    return sorted(score.topk(s.rope_dim // 2).indices.tolist())


def rotation_drift(stats: LayerStats, F: int, window: int | None) -> torch.Tensor:
    """``[F]``: mean ``|e^{i theta_f (t - s)} - 1| = 2 |sin(theta_f (t - s) / 2)|`` over the causal pairs ``s <= t``
    of a calibration row (``t - s < window``), ``theta_f`` read from the teacher's RoPE at positions 0 and 1."""
    cos, sin = (t.to(torch.float64)[0, :2, :F] for t in stats.kwargs["position_embeddings"])
    T = stats.inputs.shape[1]
    if T < 2:
        return torch.ones(F, dtype=torch.float64)
    angle = torch.atan2(sin, cos)
    theta = torch.remainder(angle[1] - angle[0] + math.pi, 2 * math.pi) - math.pi
    distance = torch.arange(min(T, window or T), dtype=torch.float64)
    pairs = T - distance  # how many causal pairs are this far apart
    return (2 * (theta[:, None] * distance / 2).sin().abs() * pairs).sum(1) / pairs.sum()


def key_norm_scale(wk: torch.Tensor, bk: torch.Tensor, inputs: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``[G]``: the scalar per KV head that best replaces its key RMSNorm's ``1 / rms`` (least squares)."""
    if inputs is None:  # inputs of unit second moment per channel: E||W x + b||^2 = ||W||^2 + ||b||^2
        ms = (wk.pow(2).sum((1, 2)) + bk.pow(2).sum(1)) / wk.shape[1]
        return torch.rsqrt(ms + eps)
    keys = torch.einsum("nh,gdh->ngd", inputs, wk) + bk  # [tokens, G, d]
    rms = (keys.pow(2).mean(-1) + eps).sqrt()
    return rms.mean(0) / rms.pow(2).mean(0)
