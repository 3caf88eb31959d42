"""Attention → LoLCATs linear attention (``linear``).

==========  ===========================  ======================================================
mixer       from the teacher             why
==========  ===========================  ======================================================
q/k/v/o     W_q, W_k, W_v, W_o (+ bias)  the window part is the teacher's softmax attention
q/k norm,   q_norm / k_norm, RoPE,       as for ``swa`` (:mod:`mixerswap.convert.swa`): scores
scale,      ``query_pre_attn_scalar``,   inside the window are the teacher's scores exactly
softcap     ``attn_logit_softcapping``
==========  ===========================  ======================================================

What starts equal: every query's weights over the last ``window`` tokens are, up to one common
factor, the teacher's softmax weights. What cannot: the tokens older than the window, whose
``exp(q . k)`` the feature map only approximates. The feature maps start as the identity on the
rotated q and k (LoLCATs; Hedgehog then takes ``softmax([x, -x])``, a positive map that keeps the
dot product's ordering), and the softmax share ``sigmoid(mix_init)`` is the same in every head; both
are what the ``align`` stage (LoLCATs' attention transfer) trains, with LoRA on q/k/v/o afterwards.
Calibration statistics are not used: no closed form fits a feature map.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from ..architectures.mixers.linear import LinearAttentionMixer, LinearSettings
from .adapters import AttentionWeights
from .converters import AttentionLayout, LayerStats, MixerConverter, place_attention
from .swa import QKVO_NAMES, teacher_attention_settings


class LinearConverter(MixerConverter):
    """Attention → LoLCATs linear attention; see the module docstring."""

    tunable = frozenset({"window", "feature_map", "feature_dim", "mix_init"})

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout,
                 overrides: dict | None = None) -> LinearSettings:
        overrides = self.check_overrides(LinearAttentionMixer.kind, overrides)
        return LinearSettings(**teacher_attention_settings(teacher_config, layout), **overrides)

    def from_attention(self, attn: AttentionWeights, settings: LinearSettings, teacher_config: PreTrainedConfig, *,
                       stats: LayerStats | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The teacher's attention weights, identity feature maps and the initial mixing factors
        (nothing random; ``stats`` and ``seed`` are unused)."""
        mixer = LinearAttentionMixer(settings, teacher_config.hidden_size, layer_idx=0)
        mixer.init_parameters()
        state = place_attention({n: t.detach() for n, t in mixer.state_dict().items()}, attn, QKVO_NAMES)
        return {name: t.contiguous() for name, t in state.items()}


CONVERTER = LinearConverter()
