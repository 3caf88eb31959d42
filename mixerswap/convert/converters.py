"""The converter half of the mixer contract (:mod:`mixerswap.architectures.mixers.contract`).

A converter turns one teacher attention layer into one mixer:

* ``settings(teacher_config, layout, overrides)`` → the mixer's pydantic ``Settings`` (one plan
  entry): what the teacher's shapes dictate (heads, head size, biases, q/k norms: ``layout``) plus
  the user's ``overrides``, of which only ``tunable`` names may be given.
* ``from_attention(attn, settings, teacher_config, *, stats, seed)`` → the mixer's state dict (names
  relative to the mixer), from the layer's attention weights, the teacher config (RoPE, norms, ...)
  and optional calibration statistics of the layer. Tensors come back in any floating dtype; the
  pipeline casts them to the output dtype, except the mixer's declared ``fp32_parameters``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel
from transformers import PreTrainedConfig

from .adapters import AttentionShape, AttentionWeights


@dataclass(frozen=True)
class AttentionLayout:
    """What a teacher's attention layer looks like, as far as a converter's settings care."""

    shape: AttentionShape
    layer_idx: int = 0  # which teacher layer (e.g. to read ``config.layer_types[layer_idx]``)
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False


@dataclass
class LayerStats:
    """Calibration statistics of one teacher layer (see :mod:`mixerswap.convert.calibration`).

    Attributes:
        inputs: ``[B, T, hidden]`` the attention module's input hidden states on calibration text.
        outputs: ``[B, T, hidden]`` the attention module's output.
        head_outputs: ``[B, T, heads * head_dim]`` per-head attention outputs (input of ``o_proj``).
        kwargs: what the attention module was called with besides ``hidden_states``
            (``position_embeddings`` = RoPE ``(cos, sin)``, ``position_ids``), to replay a mixer.
        attention_reach: ``[heads]`` how far back each head attends (median attention-weighted
            distance, see :func:`~mixerswap.convert.calibration.attention_reach`).
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    head_outputs: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)
    attention_reach: torch.Tensor | None = None


def place_attention(state: dict[str, torch.Tensor], attn: AttentionWeights,
                    names: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state`` (a mixer's own initialization) with the teacher's attention tensors put in place.

    ``names`` maps the roles ``q``, ``k``, ``v``, ``o`` to the mixer's linear layers (weight and
    bias go to ``<layer>.weight`` / ``<layer>.bias``) and ``q_norm`` / ``k_norm`` to the mixer's norm
    weights. A teacher tensor the mixer has no place for is an error (its settings do not fit the
    teacher); a bias the mixer has but the teacher lacks for that projection becomes zero.
    """
    state = dict(state)
    for role, target in names.items():
        pairs = [(role, target)] if role.endswith("norm") else [(role, f"{target}.weight"), (f"{role}_bias", f"{target}.bias")]
        for field_name, name in pairs:
            tensor = getattr(attn, field_name)
            if tensor is not None:
                if name not in state:
                    raise ValueError(f"the teacher has {field_name} weights but the mixer settings have no place for "
                                     f"them ({name})")
                state[name] = tensor
            elif field_name.endswith("_bias") and name in state:
                state[name] = torch.zeros_like(state[name])
    return state


class MixerConverter:
    """Base of converters; subclasses set ``tunable`` and implement the two methods."""

    tunable: frozenset[str] = frozenset()

    def check_overrides(self, kind: str, overrides: dict | None) -> dict:
        """The user's settings for ``kind``, refused (one line) if unknown or not tunable."""
        from ..architectures.mixers import mixer_kind

        overrides = dict(overrides or {})
        known = set(mixer_kind(kind).module.Settings.model_fields)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{kind} has no setting {', '.join(map(repr, unknown))}; "
                             f"tunable: {', '.join(sorted(self.tunable)) or 'none'}")
        fixed = set(overrides) - self.tunable
        if fixed:
            raise ValueError(
                f"{kind} settings {sorted(fixed)} follow from the teacher's attention and cannot be set; "
                f"tunable: {', '.join(sorted(self.tunable)) or 'none'}"
            )
        return overrides

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout, overrides: dict | None) -> BaseModel:
        raise NotImplementedError

    def from_attention(self, attn: AttentionWeights, settings: BaseModel, teacher_config: PreTrainedConfig, *,
                       stats: LayerStats | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        raise NotImplementedError
