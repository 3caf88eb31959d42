"""Attention → Gated DeltaNet initialization.

The gated delta rule is linear attention whose memory is edited rather than only added to: each token
reads what the state holds for its key, moves it a fraction ``beta`` towards its value, and the whole
memory decays by ``alpha``. Queries, keys and values keep their roles, so the attention projections
seed the mixer directly (as for Mamba-2, and as in LoLCATs and LAWCAT):

==============  ===========================  ==================================================
mixer           from the teacher             why
==============  ===========================  ==================================================
q_proj          W_q (+ bias)                 reads the state: ``o_t = S_t^T q_t``
k_proj          W_k (+ bias)                 addresses the state: ``S -= beta k k^T S``
v_proj          W_v (+ bias)                 written into the state: ``S += beta k v^T``
out_proj        W_o (+ bias)                 same output projection
q/k_norm_weight q_norm / k_norm (Qwen3,      the teacher's per-channel weighting of q and k
                Gemma-3), offset folded in   (RMSNorm then L2 norm = weighting then L2 norm)
==============  ===========================  ==================================================

What starts equal to the teacher: the projections and the grouping of key/value heads (each is
repeated for the query heads of its group, as GQA shares it); the conv starts as the identity, so
q, k, v are the teacher's up to the conv activation. That activation is GDN's SiLU by default:
with ``conv_activation: identity`` q, k, v are exactly the teacher's, yet on stories260k the SiLU
student was closer to the teacher after calibration (held-out perplexity 7.1 vs 7.8 with 40% of
the layers kept as attention, 29 vs 59 with none; teacher 4.0), as positive-leaning features make
a better linear-attention kernel. What cannot start equal: the scores (the state
holds an L2-normalized linear memory, no softmax, no RoPE: the decay carries position), the decay
``alpha``, the write strength ``beta``, the output gate and the per-head output norm. Those start as
:meth:`~mixerswap.architectures.mixers.gdn.GDNMixer.init_new_parameters` documents: a spread of
decays across heads, ``beta = beta_init`` everywhere, gate 1, norm 1.

With calibration statistics three of them are fitted to the teacher, in this order:

* decay: where the statistics hold each head's *attention reach* ``r_h`` (the median distance it
  attends over), the head's constant decay is set so that its memory has a half-life of ``r_h + 1``
  tokens, ``alpha_h = 2^(-1 / (r_h + 1))``: the weight the decayed memory gives a token ``d`` back
  falls to one half where the teacher's attention mass does. Only ``A_log`` moves; ``dt_bias`` and
  ``W_a = 0`` stay, so ``alpha`` remains input-independent at first.
* write strength: per head, the ``beta`` of a small grid whose output best fits the teacher's
  head output, after the decays are set (:func:`fitted_write_strengths`; on stories260k one
  ``beta`` for all heads fitted best at 0.75 in some layers and at 0.1 in others).
* output scale: the per-head norm makes every head emit unit RMS whatever the teacher's value
  scale; each head gets the least-squares scalar against the teacher's per-head outputs
  (:func:`calibrated_head_scales`), folded into the norm weight.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedConfig

from ..architectures.mixers.gdn import GDNMixer, GDNSettings
from .adapters import AttentionWeights
from .converters import AttentionLayout, LayerStats, MixerConverter, place_attention


class GDNConverter(MixerConverter):
    """Attention → Gated DeltaNet; see the module docstring."""

    # Settings a user may change at conversion; the rest are dictated by the teacher's shapes.
    tunable = frozenset(GDNSettings.model_fields) - {"n_heads", "n_kv_heads", "head_dim", "qkv_bias", "out_bias",
                                                      "qk_norm"}

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout,
                 overrides: dict | None = None) -> GDNSettings:
        """The plan settings of a Gated DeltaNet mixer that inherits a teacher attention layer's weights."""
        overrides = self.check_overrides(GDNMixer.kind, overrides)
        overrides.setdefault("norm_eps", getattr(teacher_config, "rms_norm_eps", 1e-6))
        shape = layout.shape
        return GDNSettings(
            n_heads=shape.num_heads,
            n_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            qkv_bias=layout.qkv_bias,
            out_bias=layout.out_bias,
            qk_norm=layout.qk_norm,
            **overrides,
        )

    def from_attention(self, attn: AttentionWeights, settings: GDNSettings, teacher_config: PreTrainedConfig, *,
                       stats: LayerStats | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The mixer's state dict (names relative to the mixer) seeded from one attention layer.

        Args:
            attn: the layer's attention weights (see :func:`~mixerswap.convert.adapters.read_attention`).
            settings: from :meth:`settings`.
            teacher_config: the teacher's config (its ``hidden_size``).
            stats: calibration statistics; when given, per-head decays (from the attention reach, if
                recorded) and output scales are fitted to the teacher (see the module docstring).
            seed: seeds the random parts (decay spread); conversions are reproducible.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mixer = GDNMixer(settings, teacher_config.hidden_size, layer_idx=0)
            mixer.init_parameters()
        state = {name: t.detach() for name, t in mixer.state_dict().items()}
        state = place_attention(state, attn, {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj",
                                              "q_norm": "q_norm_weight", "k_norm": "k_norm_weight"})
        if stats is not None:
            if stats.attention_reach is not None:
                state["A_log"] = decay_from_reach(state["dt_bias"], stats.attention_reach)
            if stats.head_outputs is not None:
                mixer.load_state_dict(state)
                state.update(fitted_write_strengths(mixer, stats))
                mixer.load_state_dict(state)
                state.update(calibrated_head_scales(mixer, stats))
        return {name: t.contiguous() for name, t in state.items()}


def decay_from_reach(dt_bias: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """``A_log`` ``[H]`` giving head ``h`` the constant decay ``2^(-1 / (reach_h + 1))`` with its ``dt_bias``.

    ``g = -exp(A_log) softplus(dt_bias)`` (``W_a = 0``), so ``A_log = log(ln 2 / (reach + 1)) -
    log(softplus(dt_bias))``.
    """
    log_decay = math.log(2.0) / (reach.double().clamp_min(0) + 1)
    return (log_decay.log() - torch.nn.functional.softplus(dt_bias.double()).log()).float()


BETA_GRID = (0.1, 0.25, 0.5, 0.75, 0.9)


@torch.no_grad()
def fitted_write_strengths(mixer: GDNMixer, stats: LayerStats) -> dict[str, torch.Tensor]:
    """Per head, the write strength of :data:`BETA_GRID` whose output best fits the teacher's head.

    Heads are independent up to ``out_proj``, so one replay per grid value scores every head at
    once: head ``h``'s output ``y_h`` against the teacher's ``a_h`` by the squared cosine
    ``<y_h, a_h>^2 / (|y_h|^2 |a_h|^2)``, which is what the least-squares scale of
    :func:`calibrated_head_scales` leaves of the error (``|a_h|^2 (1 - cos^2)``). Returns the
    ``b_proj`` bias; ``W_b`` stays zero.
    """
    from .calibration import replay_mixer

    s = mixer.settings
    a = stats.head_outputs.double().reshape(-1, s.n_heads, s.head_dim)
    best_fit = torch.full((s.n_heads,), -1.0, dtype=torch.float64)
    bias = mixer.b_proj.bias.detach().float().clone()
    for beta in BETA_GRID:
        logit = math.log(beta / (1 - beta))
        mixer.b_proj.bias.fill_(logit)
        _, y = replay_mixer(mixer, stats, capture="out_proj")
        y = y.double().reshape(-1, s.n_heads, s.head_dim)
        fit = (y * a).sum((0, 2)).square() / ((y * y).sum((0, 2)) * (a * a).sum((0, 2))).clamp_min(1e-30)
        better = fit > best_fit
        best_fit = torch.where(better, fit, best_fit)
        bias = torch.where(better, torch.full_like(bias, logit), bias)
    return {"b_proj.bias": bias}


def calibrated_head_scales(mixer: GDNMixer, stats: LayerStats) -> dict[str, torch.Tensor]:
    """Per-head output scales fitted to the teacher (:func:`~.calibration.head_output_scales`), folded
    into the output norm's weight."""
    from .calibration import head_output_scales

    s = mixer.settings
    scale = head_output_scales(mixer, stats, heads=s.n_heads, capture="out_proj").repeat_interleave(s.head_dim)
    return {"norm_weight": mixer.norm_weight.detach().float() * scale}


CONVERTER = GDNConverter()
