"""Mixers that replace attention, and the registry of mixer kinds (see :mod:`.contract`).

Adding a kind is its module, its converter (in :mod:`mixerswap.convert`) and one
:func:`register_mixer` call, here for the kinds that ship with the package.
"""

from .contract import (
    Mixer,
    MixerKind,
    fp32_parameter_names,
    is_mixer,
    keep_fp32,
    mixer_kind,
    register_mixer,
    registered_kinds,
    unregister_mixer,
)
from .mamba2 import Mamba2Mixer, Mamba2Settings

register_mixer(MixerKind(Mamba2Mixer, "mixerswap.convert.mamba2:CONVERTER"))

__all__ = [
    "Mamba2Mixer",
    "Mamba2Settings",
    "Mixer",
    "MixerKind",
    "fp32_parameter_names",
    "is_mixer",
    "keep_fp32",
    "mixer_kind",
    "register_mixer",
    "registered_kinds",
    "unregister_mixer",
]
