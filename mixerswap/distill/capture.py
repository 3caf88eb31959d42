"""Read a teacher's intermediate tensors with forward hooks: attention inputs/outputs, block inputs/outputs.

One teacher forward feeds every replaced layer of a stage (layers are aligned independently), so
the hooks record, per layer index, what went in and what came out, including the keyword
arguments (RoPE ``position_embeddings``, masks, ``position_ids``) needed to replay the block.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

REPLAY_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


@dataclass
class Captured:
    """What one module saw in one forward: its input hidden states, replayable kwargs and output."""

    inputs: torch.Tensor
    output: torch.Tensor
    kwargs: dict = field(default_factory=dict)


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def capture(modules: dict[int, torch.nn.Module]):
    """Record ``Captured`` per key while the context is open; yields the (filled-in) dict."""
    records: dict[int, Captured] = {}

    def hook_for(key):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            replay = {k: kwargs[k] for k in REPLAY_KWARGS if k in kwargs}
            records[key] = Captured(hidden.detach(), _first_tensor(output).detach(), replay)

        return hook

    handles = [m.register_forward_hook(hook_for(k), with_kwargs=True) for k, m in modules.items()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def model_family(model):
    """The teacher family of a student or of a plain HF teacher of a supported family."""
    if hasattr(model, "family"):
        return model.family
    from ..architectures.families import family_for

    return family_for(model.config.model_type)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a student or of a plain HF teacher of a supported family."""
    if hasattr(model, "decoder_layers"):
        return model.decoder_layers()
    module = model
    for name in model_family(model).layers_path.split("."):
        module = getattr(module, name)
    return module


def attention_modules(model, layers: list[int]) -> dict[int, torch.nn.Module]:
    """The module in each layer's attention slot (the teacher's attention, or a student's mixer)."""
    family, blocks = model_family(model), decoder_layers(model)
    return {i: family.mixer_of(blocks[i]) for i in layers}


def block_modules(model, layers: list[int]) -> dict[int, torch.nn.Module]:
    return {i: decoder_layers(model)[i] for i in layers}
