"""Read one layer's attention weights from a teacher checkpoint, whatever the family's naming."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig

from ..architectures.families import TeacherFamily


@dataclass
class AttentionShape:
    """Head layout of a teacher's attention."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> AttentionShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        return cls(heads, kv_heads, head_dim, config.hidden_size)


@dataclass
class AttentionWeights:
    """One layer's attention projections (``[out, in]`` like ``nn.Linear``) and optional q/k norms."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # effective multiplier (offset already added)
    k_norm: torch.Tensor | None = None


def attention_tensor_names(family: TeacherFamily, layer_idx: int) -> dict[str, str]:
    """Checkpoint names this layer's attention may use, keyed by role (biases and norms optional)."""
    prefix = family.attention_prefix(layer_idx)
    names = {"o": f"{prefix}{family.o}.weight", "o_bias": f"{prefix}{family.o}.bias"}
    if family.qkv:
        names |= {"qkv": f"{prefix}{family.qkv}.weight", "qkv_bias": f"{prefix}{family.qkv}.bias"}
    else:
        for role in ("q", "k", "v"):
            proj = getattr(family, role)
            names |= {role: f"{prefix}{proj}.weight", f"{role}_bias": f"{prefix}{proj}.bias"}
    if family.q_norm:
        names |= {"q_norm": f"{prefix}{family.q_norm}.weight", "k_norm": f"{prefix}{family.k_norm}.weight"}
    return names


REQUIRED_ROLES = frozenset({"q", "k", "v", "o", "qkv", "q_norm", "k_norm"})


def read_attention(
    family: TeacherFamily,
    shape: AttentionShape,
    layer_idx: int,
    get: Callable[[str], torch.Tensor | None],
) -> AttentionWeights:
    """Collect layer ``layer_idx``'s attention weights through ``get(name)`` (``None`` if absent)."""
    names = attention_tensor_names(family, layer_idx)
    found = {role: get(name) for role, name in names.items()}
    missing = [names[r] for r, t in found.items() if t is None and r in REQUIRED_ROLES]
    if missing:
        raise KeyError(f"teacher checkpoint lacks {', '.join(missing)}")
    if family.qkv:
        sizes = [shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim,
                 shape.num_kv_heads * shape.head_dim]
        found["q"], found["k"], found["v"] = torch.split(found.pop("qkv"), sizes, dim=0)
        bias = found.pop("qkv_bias")
        if bias is not None:
            found["q_bias"], found["k_bias"], found["v_bias"] = torch.split(bias, sizes, dim=0)
    for role in ("q_norm", "k_norm"):
        if found.get(role) is not None:
            found[role] = found[role] + family.norm_weight_offset
    expected = {
        "q": (shape.num_heads * shape.head_dim, shape.hidden_size),
        "k": (shape.num_kv_heads * shape.head_dim, shape.hidden_size),
        "v": (shape.num_kv_heads * shape.head_dim, shape.hidden_size),
        "o": (shape.hidden_size, shape.num_heads * shape.head_dim),
    }
    for role, want in expected.items():
        if tuple(found[role].shape) != want:
            raise ValueError(
                f"layer {layer_idx}: {role} projection has shape {tuple(found[role].shape)}, expected {want} "
                "from the config (heads x head_dim)"
            )
    return AttentionWeights(**found)
