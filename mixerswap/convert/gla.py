"""Attention → gated linear attention with conv (``gla``, after LAWCAT).

==========  ===========================  ======================================================
mixer       from the teacher             why
==========  ===========================  ======================================================
q/k/v/o     W_q, W_k, W_v, W_o (+ bias)  linear attention keeps attention's roles for q, k, v, o
q/k norm    q_norm / k_norm (Qwen3,      the teacher's per-head normalization of q and k, before
            Gemma-3)                     the conv and the feature map
conv        identity (last tap 1)        the untrained mixer sees exactly the teacher's q and k
==========  ===========================  ======================================================

What cannot start equal: the similarity. ``phi(q) . phi(k)`` is not ``exp(q . k / sqrt(d))`` for any
fixed feature map, RoPE is gone (the decay carries position) and the decay gate has no counterpart;
the gate starts input-independent with a log-uniform spread of per-head memories (see
:meth:`~mixerswap.architectures.mixers.gla.GLAMixer.init_new_parameters`). The normalization makes
each head return a weighted mean of its values, as softmax attention does, so the output scale
starts close to the teacher's; with calibration statistics the remaining per-head scale is fitted
by least squares (:func:`calibrated_head_scales`) and folded into ``o_proj``'s columns.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from ..architectures.mixers.gla import GLAMixer, GLASettings
from .adapters import AttentionWeights
from .converters import AttentionLayout, LayerStats, MixerConverter, place_attention
from .swa import QKVO_NAMES


class GLAConverter(MixerConverter):
    """Attention → gated linear attention; see the module docstring."""

    tunable = frozenset({"conv", "feature_map", "normalize", "output_gate", "chunk_size", "decay_min_len",
                         "decay_max_len"})

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout,
                 overrides: dict | None = None) -> GLASettings:
        overrides = self.check_overrides(GLAMixer.kind, overrides)
        shape = layout.shape
        return GLASettings(n_heads=shape.num_heads, n_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                           qk_norm=layout.qk_norm, norm_eps=getattr(teacher_config, "rms_norm_eps", 1e-6),
                           qkv_bias=layout.qkv_bias, out_bias=layout.out_bias, **overrides)

    def from_attention(self, attn: AttentionWeights, settings: GLASettings, teacher_config: PreTrainedConfig, *,
                       stats: LayerStats | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The mixer's state dict: the teacher's projections, identity conv, spread decays; with
        ``stats``, per-head output scales fitted to the teacher. Nothing is random (``seed`` unused)."""
        mixer = GLAMixer(settings, teacher_config.hidden_size, layer_idx=0)
        mixer.init_parameters()
        state = place_attention({n: t.detach() for n, t in mixer.state_dict().items()}, attn, QKVO_NAMES)
        if stats is not None and stats.head_outputs is not None:
            mixer.load_state_dict(state)
            state.update(calibrated_head_scales(mixer, stats))
        return {name: t.contiguous() for name, t in state.items()}


def calibrated_head_scales(mixer: GLAMixer, stats: LayerStats) -> dict[str, torch.Tensor]:
    """``o_proj`` with each head's columns scaled by its fitted output scale
    (:func:`~.calibration.head_output_scales`)."""
    from .calibration import head_output_scales

    s = mixer.settings
    scale = head_output_scales(mixer, stats, heads=s.n_heads, capture="o_proj").repeat_interleave(s.head_dim)
    return {"o_proj.weight": mixer.o_proj.weight.detach().float() * scale}


CONVERTER = GLAConverter()
