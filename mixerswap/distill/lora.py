"""LoRA adapters (peft) on the kept attention layers during distillation, merged back before saving.

Only attention layers the plan keeps get adapters (mixers train in full). After training the
adapters are merged into the base weights and the wrappers removed, so the saved student is an
ordinary mixerswap checkpoint with the teacher's parameter names.
"""

from __future__ import annotations

from torch import nn

from ..architectures.plan import ATTENTION
from .capture import decoder_layers
from .recipe import LoraOptions


def add_lora(student, options: LoraOptions) -> list[nn.Parameter]:
    """Inject adapters into the projections ``options.target_modules`` of kept attention layers.

    Returns the adapter parameters (the only trainable ones among those layers' attention weights).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'mixerswap[lora]'") from None
    kept = [i for i, kind in enumerate(student.config.layer_kinds()) if kind == ATTENTION]
    if not kept:
        raise ValueError("lora: the student keeps no attention layer to adapt")
    prefix = student.family.attention_prefix(0).split(".0.")[0]  # e.g. "model.layers"
    targets = [f"{prefix}.{i}.{student.family.attention_attr}.{name}" for i in kept for name in options.target_modules]
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=targets)
    inject_adapter_in_model(config, student)
    return [p for n, p in student.named_parameters() if "lora_" in n]


def merge_lora(student) -> int:
    """Fold every adapter into its base layer and restore plain modules; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for layer in decoder_layers(student):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    child.merge()
                    setattr(parent, name, child.get_base_layer())
                    merged += 1
    return merged
