"""Teacher families as data: where the attention module of each layer sits and how its weights are named.

Families differ only here. The student model uses ``layers_path`` / ``attention_attr`` to swap
mixers in; the converter uses the projection names, biases and norms to read the attention weights.
Adding a family is adding one entry (and a pico-model test).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherFamily:
    """How one HF architecture family lays out its attention.

    Attributes:
        name: human name for messages.
        model_types: ``config.model_type`` values of this family.
        layers_path: dotted path from the ``*ForCausalLM`` module to the decoder layer list.
        attention_attr: attribute of a decoder layer holding the attention module (or its mixer).
        mlp_attr: attribute of a decoder layer holding the MLP.
        q, k, v, o: projection names inside the attention module (``None`` when fused).
        qkv: name of a fused q/k/v projection (Phi-3), split in q, k, v order.
        q_norm, k_norm: per-head RMSNorm applied to q and k before RoPE (Qwen3, Gemma-3).
        norm_weight_offset: the norm multiplies by ``offset + weight`` (Gemma: 1.0, others: 0.0).
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attention_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    norm_weight_offset: float = 0.0

    def mixer_of(self, layer):
        """The module in a decoder layer's attention slot (the teacher's attention or its mixer)."""
        return getattr(layer, self.attention_attr)

    def mlp_of(self, layer):
        return getattr(layer, self.mlp_attr)

    def attention_prefix(self, layer_idx: int) -> str:
        """State-dict prefix of layer ``layer_idx``'s attention module, e.g. ``model.layers.3.self_attn.``."""
        return f"{self.layers_path}.{layer_idx}.{self.attention_attr}."


FAMILIES: tuple[TeacherFamily, ...] = (
    TeacherFamily("Llama (1/2/3.x)", ("llama",)),
    TeacherFamily("Mistral", ("mistral",)),
    TeacherFamily("Qwen2/2.5", ("qwen2",)),
    TeacherFamily("Qwen3", ("qwen3",), q_norm="q_norm", k_norm="k_norm"),
    TeacherFamily("Phi-3", ("phi3",), q=None, k=None, v=None, qkv="qkv_proj"),
    TeacherFamily("Gemma-2", ("gemma2",), norm_weight_offset=1.0),
    TeacherFamily("Gemma-3", ("gemma3_text",), q_norm="q_norm", k_norm="k_norm", norm_weight_offset=1.0),
)


class UnsupportedTeacherError(ValueError):
    """The teacher's architecture is not one mixerswap knows how to convert."""


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_type: str) -> TeacherFamily:
    """The family of ``config.model_type``, or a clear error naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    hint = ""
    if model_type == "gemma3":
        hint = " (for Gemma-3 multimodal checkpoints, convert the text model: model_type 'gemma3_text')"
    raise UnsupportedTeacherError(
        f"unsupported teacher architecture {model_type!r}{hint}; supported model types: "
        f"{', '.join(supported_model_types())}"
    )
