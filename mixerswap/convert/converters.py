"""The converter half of the mixer contract (:mod:`mixerswap.architectures.mixers.contract`).

A converter turns one teacher attention layer into one mixer:

* ``settings(teacher_config, layout, overrides)`` → the mixer's pydantic ``Settings`` (one plan
  entry): what the teacher's shapes dictate (heads, head size, biases, q/k norms: ``layout``) plus
  the user's ``overrides``, of which only ``tunable`` names may be given.
* ``from_attention(attn, settings, teacher_config, *, stats, seed)`` → the mixer's state dict (names
  relative to the mixer), from the layer's attention weights, the teacher config (RoPE, norms, ...)
  and optional calibration statistics of the layer. Tensors come back in any floating dtype; the
  pipeline casts them to the output dtype, except the mixer's declared ``fp32_parameters``.

Optionally, a plan-wide request (e.g. MLA's ``kv_budget``: one KV-cache budget shared by all its
layers) that sets per-layer settings from measurements. Its names are the converter's ``plan_wide``
overrides; ``settings`` checks them and completes a provisional entry; then, before any weight is
written, the pipeline calls ``profile(attn, settings, teacher_config, stats=, layer_idx=)`` on each layer that
asked, reading one layer's attention weights at a time (a profile is small, e.g. an error curve),
and ``allocate(layers, teacher_config, request)`` with all profiles, which returns the final
settings per layer (ordinary settings: the saved student loads as usual).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

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
    plan_wide: frozenset[str] = frozenset()  # overrides that request :meth:`allocate` (not settings of one layer)

    def check_overrides(self, kind: str, overrides: dict | None) -> dict:
        """The user's settings for ``kind``, refused (one line) if unknown or not tunable."""
        from ..architectures.mixers import mixer_kind

        overrides = dict(overrides or {})
        known = set(mixer_kind(kind).module.Settings.model_fields) | self.plan_wide
        unknown = sorted(set(overrides) - known)
        if unknown:  # a typo, not a derived setting: name the tunable ones (and the likely intended one)
            guesses = [g for name in unknown for g in difflib.get_close_matches(name, sorted(self.tunable), n=1)]
            hint = f" (did you mean {', '.join(map(repr, guesses))}?)" if guesses else ""
            raise ValueError(f"{kind} has no setting {', '.join(map(repr, unknown))}{hint}; "
                             f"tunable: {', '.join(sorted(self.tunable)) or 'none'}")
        fixed = set(overrides) - self.tunable - self.plan_wide
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

    def profile(self, attn: AttentionWeights, settings: BaseModel, teacher_config: PreTrainedConfig, *,
                stats: LayerStats | None = None, layer_idx: int = 0) -> Any:
        """What :meth:`allocate` needs to know of one layer (kept small: all layers' profiles are held at once)."""
        raise NotImplementedError(f"{type(self).__name__} has no plan-wide settings")

    def allocate(self, layers: dict[int, tuple[BaseModel, Any]], teacher_config: PreTrainedConfig,
                 request: dict) -> dict[int, BaseModel]:
        """Final settings of each layer that asked for ``request`` (the ``plan_wide`` overrides), from
        ``layers[idx] = (provisional settings, profile)``."""
        raise NotImplementedError(f"{type(self).__name__} has no plan-wide settings")
