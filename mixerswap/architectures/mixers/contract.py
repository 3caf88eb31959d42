"""The mixer contract: what a kind of mixer declares once, and the registry that holds the declarations.

A *mixer kind* (``mamba2``, later ``swa``, ``gla``, ``mla`` ...) is three things and one registration:

1. **a module**, a subclass of :class:`Mixer` with a pydantic ``Settings`` model (one plan entry) and
   the call signature of an HF attention module::

       forward(hidden_states [B, T, hidden], attention_mask=None, position_ids=None,
               past_key_values=None, **kwargs) -> (output [B, T, hidden], None)

   ``kwargs`` carry what the teacher's decoder layer passes to its attention (``position_embeddings``
   = the teacher's RoPE ``(cos, sin)``, ...) and the 2-D padding mask under
   :data:`~mixerswap.architectures.mixers.common.PADDING_MASK_KWARG` (``None`` when the model found no
   padding: a mixer never reads the mask back from the device). The module declares
   its parameter groups as class attributes (names relative to the mixer, ``fnmatch`` patterns):
   ``fp32_parameters`` (kept in fp32 in every checkpoint and at load time), ``no_weight_decay``
   (besides every bias and every norm weight, which never decay), ``fast_parameters`` (what
   attention has no counterpart for that lives on an O(1) scale: gate and decay logits, log-rates,
   conv taps; they train at a multiple of the stage's learning rate), ``lora_targets`` (``nn.Linear``
   submodules LoRA may adapt), ``output_projection`` (the ``nn.Linear`` whose output is the mixer's
   output, read from the heads' outputs: ``convert --output-refit`` refits it to the teacher), and
   ``kernel_ops`` (the :mod:`mixerswap.kernels` operators it calls, for reports). It builds its own
   cache layer (:meth:`Mixer.new_cache_layer`, a
   :class:`~mixerswap.architectures.cache.MixerCacheLayer` that reports its bytes exactly and is
   updated in place), may restrict what ``align`` trains (:meth:`Mixer.align_parameters`) and may
   offer ``mixing_matrix(hidden_states, position_ids=None, **kwargs) -> [B, H, T, T]`` for matrix
   alignment.
2. **a converter** (see :class:`~mixerswap.convert.converters.MixerConverter`): settings from the
   teacher config plus user overrides, and the mixer's state dict from one layer's attention
   weights, the teacher config and optional calibration statistics.
3. **one registration**: ``register_mixer(MixerKind(Module, converter))``. The converter may be given
   as ``"package.module:attribute"`` so that the architecture layer never imports the conversion
   layer (imports go downwards only); it is resolved on first use.

Nothing else in the package is per kind: the plan, the model, the cache, save/load, generation,
the distillation stages, LoRA, weight decay, precision and the speed report all read these
declarations. ``tests/contract`` runs every registered kind through the same checks.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

if TYPE_CHECKING:
    from ..cache import MixerCacheLayer


class Mixer(nn.Module):
    """Base class of every mixer module; see the module docstring for the contract."""

    kind: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]
    fp32_parameters: ClassVar[tuple[str, ...]] = ()
    no_weight_decay: ClassVar[tuple[str, ...]] = ()
    fast_parameters: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = ()
    output_projection: ClassVar[str | None] = None
    kernel_ops: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: BaseModel, hidden_size: int, layer_idx: int):
        super().__init__()
        self.settings = settings
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx

    def init_parameters(self, std: float = 0.02) -> None:
        """Random initialization for a student built without converted weights.

        Use ``transformers.initialization`` functions so parameters loaded from a checkpoint are left alone.
        """
        raise NotImplementedError

    def new_cache_layer(self) -> MixerCacheLayer:
        """An empty cache layer for this mixer (default: named recurrent states)."""
        from ..cache import RecurrentStateLayer

        return RecurrentStateLayer()

    def cache_layer(self, past_key_values) -> MixerCacheLayer | None:
        """This layer's entry of the model's cache (``None`` without a cache), type-checked."""
        if past_key_values is None:
            return None
        from ..cache import HybridMixerCache

        if not isinstance(past_key_values, HybridMixerCache):
            raise TypeError(
                f"layer {self.layer_idx} is a {self.kind} mixer and needs a HybridMixerCache, got "
                f"{type(past_key_values).__name__}; let the model create its cache (model.make_cache())"
            )
        expected = self.__dict__.get("_cache_layer_type")
        if expected is None:  # built once: every decode step of every layer asks
            expected = self.__dict__["_cache_layer_type"] = type(self.new_cache_layer())
        return past_key_values.mixer_layer(self.layer_idx, expected)

    def align_parameters(self) -> Iterator[nn.Parameter]:
        """What the ``align`` stage trains (default: every parameter of the mixer)."""
        return self.parameters()

    def parameter_names(self, patterns: tuple[str, ...]) -> list[str]:
        """Names (relative to the mixer) of the parameters matching any of ``patterns``."""
        return [n for n, _ in self.named_parameters() if any(fnmatch(n, p) for p in patterns)]

    def parameters_matching(self, patterns: tuple[str, ...]) -> list[nn.Parameter]:
        """The parameters whose names match any of ``patterns`` (a declared group)."""
        return [p for n, p in self.named_parameters() if any(fnmatch(n, pattern) for pattern in patterns)]

    def no_decay_parameter_names(self) -> list[str]:
        """Parameters that get no weight decay: declared ones, biases and norm weights."""
        return [n for n, _ in self.named_parameters()
                if n.endswith("bias") or "norm" in n or any(fnmatch(n, p) for p in self.no_weight_decay)]


@dataclass(frozen=True)
class MixerKind:
    """One registered kind: its module and its converter (an object or a ``"module:attribute"`` path)."""

    module: type[Mixer]
    converter: Any

    @property
    def name(self) -> str:
        return self.module.kind

    def load_converter(self):
        """The converter object, importing it on first use when registered by path."""
        if isinstance(self.converter, str):
            module_name, _, attribute = self.converter.partition(":")
            return getattr(importlib.import_module(module_name), attribute)
        return self.converter


_KINDS: dict[str, MixerKind] = {}


def register_mixer(kind: MixerKind, *, replace: bool = False) -> MixerKind:
    """Add a mixer kind to the registry (``replace=True`` to redefine one, e.g. in tests)."""
    module = kind.module
    if not (isinstance(module, type) and issubclass(module, Mixer)):
        raise TypeError(f"a mixer kind's module must subclass Mixer, got {module!r}")
    for attribute in ("kind", "Settings"):
        if not hasattr(module, attribute):
            raise TypeError(f"mixer module {module.__name__} must define {attribute!r}")
    if kind.name == "attention":
        raise ValueError("'attention' names the teacher's own attention; choose another kind name")
    if kind.name in _KINDS and not replace and _KINDS[kind.name] != kind:
        raise ValueError(f"mixer kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister_mixer(name: str) -> None:
    _KINDS.pop(name, None)


def registered_kinds() -> dict[str, MixerKind]:
    """Registered kinds by name (a copy)."""
    return dict(_KINDS)


def mixer_kind(name: str) -> MixerKind:
    if name not in _KINDS:
        raise KeyError(f"unknown mixer kind {name!r}; known: attention, {', '.join(_KINDS)}")
    return _KINDS[name]


def is_mixer(module: nn.Module) -> bool:
    return isinstance(module, Mixer)


def fp32_parameter_names(model: nn.Module) -> set[str]:
    """Full names of every parameter the mixers of ``model`` keep in fp32."""
    return {f"{prefix}.{name}" for prefix, m in model.named_modules() if isinstance(m, Mixer)
            for name in m.parameter_names(m.fp32_parameters)}


def keep_fp32(model: nn.Module) -> nn.Module:
    """Cast the declared fp32 parameters of every mixer back to fp32 (after a ``model.to(dtype)``)."""
    for module in model.modules():
        if isinstance(module, Mixer):
            for name in module.parameter_names(module.fp32_parameters):
                param = module.get_parameter(name)
                if param.dtype != torch.float32 and param.is_floating_point():
                    param.data = param.data.float()
    return model
