"""LoRA adapters (peft) during distillation, merged back before saving.

What gets adapters is ``LoraOptions.layers``: ``attention`` (default) = the ``target_modules``
projections of the attention layers the plan keeps; ``mixers`` = the ``nn.Linear`` submodules each
mixer declares in its ``lora_targets`` (see the mixer contract); ``all`` = both. After training the
adapters are merged into the base weights and the wrappers removed, so the saved student is an
ordinary mixerswap checkpoint with the teacher's parameter names.
"""

from __future__ import annotations

from torch import nn

from .capture import decoder_layers
from .recipe import LoraOptions


def lora_targets(student, options: LoraOptions) -> list[str]:
    """Full module names that get adapters (see the module docstring)."""
    mixers = student.mixer_layers()
    prefix = student.family.layers_path
    attr = student.family.attention_attr
    targets = []
    if options.layers in ("attention", "all"):
        kept = [i for i in range(len(decoder_layers(student))) if i not in mixers]
        if not kept and options.layers == "attention":
            raise ValueError("lora: the student keeps no attention layer to adapt (try lora.layers: mixers)")
        targets += [f"{prefix}.{i}.{attr}.{name}" for i in kept for name in options.target_modules]
    if options.layers in ("mixers", "all"):
        for i, mixer in mixers.items():
            names = [n for n in mixer.lora_targets if isinstance(getattr(mixer, n, None), nn.Linear)]
            targets += [f"{prefix}.{i}.{attr}.{name}" for name in names]
        if options.layers == "mixers" and not targets:
            raise ValueError("lora: no mixer of the student declares lora_targets")
    return targets


def add_lora(student, options: LoraOptions) -> list[nn.Parameter]:
    """Inject adapters into :func:`lora_targets`; returns the adapter parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'mixerswap[lora]'") from None
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=lora_targets(student, options))
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
