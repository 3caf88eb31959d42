"""Attention → Mamba-2 initialization (``mamba2_from_attention``).

Linear attention is an SSM without decay, and Mamba-2's SSD is linear attention with a learned,
input-dependent decay (Dao & Gu 2024, section 5). So the attention projections seed the mixer
directly, as in MambaInLlama and MOHAWK:

==========  ===========================  ======================================================
mixer       from the teacher             why
==========  ===========================  ======================================================
c_proj      W_q (+ bias)                 C plays the query: ``y_t = S_t C_t``
b_proj      W_k (+ bias)                 B plays the key: ``S_t += dt_t x_t B_t^T``
x_proj      W_v (+ bias)                 x plays the value
out_proj    W_o (+ bias)                 same output projection
b/c norm    k_norm / q_norm (Qwen3,      keeps the teacher's per-head normalization of q and k
            Gemma-3), offset folded in
==========  ===========================  ======================================================

GQA carries over: ``B`` and ``x`` keep the teacher's key/value heads as groups, ``C`` its query
heads. RoPE is dropped (the decay carries position). Everything attention has no counterpart for
(A, dt, D, conv, gate, output norm) gets the initialization documented in
:meth:`~mixerswap.architectures.mixers.mamba2.Mamba2Mixer.init_ssm_parameters`; the conv starts
as the identity (last tap 1) so the first forward sees the raw projections. The scale
``1/sqrt(head_dim)`` of attention scores is not folded in: the per-head output norm removes any
global scale of ``C``.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedConfig

from ..architectures.mixers.mamba2 import Mamba2Mixer, Mamba2Settings
from .adapters import AttentionWeights
from .converters import AttentionLayout, LayerStats, MixerConverter, place_attention


class Mamba2Converter(MixerConverter):
    """Attention → Mamba-2; see the module docstring."""

    # Settings a user may change at conversion; the rest are dictated by the teacher's shapes.
    tunable = frozenset(Mamba2Settings.model_fields) - {"n_heads", "n_groups", "head_dim", "d_state", "qkv_bias",
                                                         "out_bias", "bc_norm"}

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout,
                 overrides: dict | None = None) -> Mamba2Settings:
        """The plan settings of a Mamba-2 mixer that inherits a teacher attention layer's weights."""
        overrides = self.check_overrides(Mamba2Mixer.kind, overrides)
        overrides.setdefault("norm_eps", getattr(teacher_config, "rms_norm_eps", 1e-6))
        shape = layout.shape
        return Mamba2Settings(
            n_heads=shape.num_heads,
            n_groups=shape.num_kv_heads,
            head_dim=shape.head_dim,
            d_state=shape.head_dim,
            qkv_bias=layout.qkv_bias,
            out_bias=layout.out_bias,
            bc_norm=layout.qk_norm,
            **overrides,
        )

    def from_attention(self, attn: AttentionWeights, settings: Mamba2Settings, teacher_config: PreTrainedConfig, *,
                       stats: LayerStats | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The mixer's state dict (names relative to the mixer) seeded from one attention layer.

        Args:
            attn: the layer's attention weights (see :func:`~mixerswap.convert.adapters.read_attention`).
            settings: from :meth:`settings`.
            teacher_config: the teacher's config (its ``hidden_size``).
            stats: calibration statistics; when given, per-head output scales are fitted to the teacher
                (:func:`calibrated_head_scales`).
            seed: seeds the random parts (A, dt); conversions are reproducible.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mixer = Mamba2Mixer(settings, teacher_config.hidden_size, layer_idx=0)
            mixer.init_parameters()
        state = {name: t.detach() for name, t in mixer.state_dict().items()}
        state = place_attention(state, attn, {"q": "c_proj", "k": "b_proj", "v": "x_proj", "o": "out_proj",
                                              "q_norm": "c_norm_weight", "k_norm": "b_norm_weight"})
        if stats is not None and stats.attention_reach is not None:
            state["dt_proj.bias"] = dt_bias_from_reach(stats.attention_reach, state["A_log"])
        if stats is not None and stats.head_outputs is not None:
            mixer.load_state_dict(state)
            state.update(calibrated_head_scales(mixer, stats))
        return {name: t.contiguous() for name, t in state.items()}


def dt_bias_from_reach(reach: torch.Tensor, A_log: torch.Tensor) -> torch.Tensor:
    """dt per head such that the head's memory reaches as far back as the teacher head's attention.

    With ``dt`` constant the SSD weighs the token ``k`` steps back by ``exp(-lambda k)``,
    ``lambda = dt |A|``; half of that weight lies within the last ``m + 1`` tokens when
    ``lambda = ln 2 / (m + 1)``. Setting ``m`` to the teacher head's median attention distance
    (:func:`~mixerswap.convert.calibration.attention_reach`) gives heads that attend locally a fast
    decay and heads that look far back a slow one, instead of random log-uniform ``dt``. ``A`` keeps
    its initialization; the result is the inverse softplus of ``dt`` (``dt_proj`` weight stays 0).
    """
    lam = math.log(2.0) / (reach.double() + 1.0)
    dt = (lam / torch.exp(A_log.double())).clamp(1e-4, 10.0)
    return (dt + torch.log(-torch.expm1(-dt))).float()


def calibrated_head_scales(mixer: Mamba2Mixer, stats: LayerStats) -> dict[str, torch.Tensor]:
    """Per-head output scales fitted to the teacher (:func:`~.calibration.head_output_scales`).

    The per-head norm makes every head emit unit RMS whatever the teacher's value scale (on SmolLM2
    the converted outputs were 2-23x too large); the fitted scale goes into the norm weight (or,
    without a norm, the columns of ``out_proj`` that read the head).
    """
    from .calibration import head_output_scales

    s = mixer.settings
    scale = head_output_scales(mixer, stats, heads=s.n_heads, capture="out_proj").repeat_interleave(s.head_dim)
    if s.norm != "none":
        return {"norm_weight": mixer.norm_weight.detach().float() * scale}
    return {"out_proj.weight": mixer.out_proj.weight.detach().float() * scale}


CONVERTER = Mamba2Converter()
