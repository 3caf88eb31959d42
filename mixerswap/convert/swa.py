"""Attention → sliding-window attention (``swa``): everything starts equal to the teacher.

==========  ===========================  ======================================================
mixer       from the teacher             why
==========  ===========================  ======================================================
q/k/v/o     W_q, W_k, W_v, W_o (+ bias)  the same attention, only restricted to a window
q/k norm    q_norm / k_norm (Qwen3,      per-head RMSNorm before RoPE, Gemma's ``1 + w`` folded
            Gemma-3)
scaling     ``query_pre_attn_scalar``    Gemma-2/3 scale scores by it, not by ``head_dim``
softcap     ``attn_logit_softcapping``   Gemma-2's tanh cap on the scores
RoPE        (not a weight)               the decoder layer's ``(cos, sin)`` are reused as is
==========  ===========================  ======================================================

What cannot start equal: nothing, as long as the window covers the sequence; beyond it a query
loses the keys that left its window, which is what distillation then trains q/k/v/o to live with.
Defaults: a teacher layer with a ``sliding_window`` gives its window and no sinks (the student of a
Mistral or of Gemma's local layers is then the teacher itself); a full-attention layer a window of 512
tokens with StreamingLLM's 4 attention sinks, which keep the softmax from dumping its mass on
whatever tokens remain once the true first tokens have left the window.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from ..architectures.mixers.swa import SlidingWindowMixer, SWASettings
from .adapters import AttentionWeights
from .converters import AttentionLayout, LayerStats, MixerConverter, place_attention

DEFAULT_WINDOW = 512
DEFAULT_SINKS = 4


def teacher_attention_settings(teacher_config: PreTrainedConfig, layout: AttentionLayout) -> dict:
    """What the teacher's attention dictates: heads, biases, norms, score scale and softcap."""
    shape = layout.shape
    pre_attn_scalar = getattr(teacher_config, "query_pre_attn_scalar", None)
    return dict(
        n_heads=shape.num_heads,
        n_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        scaling=pre_attn_scalar**-0.5 if pre_attn_scalar else None,
        softcap=getattr(teacher_config, "attn_logit_softcapping", None) or None,
        qk_norm=layout.qk_norm,
        norm_eps=getattr(teacher_config, "rms_norm_eps", 1e-6),
        qkv_bias=layout.qkv_bias,
        out_bias=layout.out_bias,
    )


def teacher_window(teacher_config: PreTrainedConfig, layer_idx: int) -> int | None:
    """The window of the teacher's own attention in layer ``layer_idx``, or ``None`` if it is full
    (Gemma-2/3 alternate sliding and full layers: ``config.layer_types``)."""
    window = getattr(teacher_config, "sliding_window", None)
    layer_types = getattr(teacher_config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return int(window) if window else None


# The teacher's projections keep their names in the window / linear-attention mixers.
QKVO_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "q_norm": "q_norm_weight",
              "k_norm": "k_norm_weight"}


class SWAConverter(MixerConverter):
    """Attention → sliding-window attention; see the module docstring."""

    tunable = frozenset({"window", "sinks"})

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout,
                 overrides: dict | None = None) -> SWASettings:
        overrides = self.check_overrides(SlidingWindowMixer.kind, overrides)
        window = teacher_window(teacher_config, layout.layer_idx)
        overrides.setdefault("window", window or DEFAULT_WINDOW)
        overrides.setdefault("sinks", 0 if window else DEFAULT_SINKS)
        return SWASettings(**teacher_attention_settings(teacher_config, layout), **overrides)

    def from_attention(self, attn: AttentionWeights, settings: SWASettings, teacher_config: PreTrainedConfig, *,
                       stats: LayerStats | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The teacher's attention weights under the mixer's names (``stats`` and ``seed`` are unused:
        nothing is fitted or random)."""
        with torch.device("meta"):
            mixer = SlidingWindowMixer(settings, teacher_config.hidden_size, layer_idx=0)
        state = {name: torch.empty(t.shape) for name, t in mixer.state_dict().items()}
        state = place_attention(state, attn, QKVO_NAMES)
        return {name: t.contiguous() for name, t in state.items()}


CONVERTER = SWAConverter()
