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
from .gdn import GDNMixer, GDNSettings
from .gla import GLAMixer, GLASettings
from .linear import LinearAttentionMixer, LinearSettings
from .mamba2 import Mamba2Mixer, Mamba2Settings
from .mla import MLAMixer, MLASettings
from .swa import SlidingWindowMixer, SWASettings

register_mixer(MixerKind(Mamba2Mixer, "mixerswap.convert.mamba2:CONVERTER"))
register_mixer(MixerKind(MLAMixer, "mixerswap.convert.mla:CONVERTER"))
register_mixer(MixerKind(GDNMixer, "mixerswap.convert.gdn:CONVERTER"))
register_mixer(MixerKind(SlidingWindowMixer, "mixerswap.convert.swa:CONVERTER"))
register_mixer(MixerKind(GLAMixer, "mixerswap.convert.gla:CONVERTER"))
register_mixer(MixerKind(LinearAttentionMixer, "mixerswap.convert.linear:CONVERTER"))

__all__ = [
    "GDNMixer",
    "GDNSettings",
    "GLAMixer",
    "GLASettings",
    "LinearAttentionMixer",
    "LinearSettings",
    "MLAMixer",
    "MLASettings",
    "Mamba2Mixer",
    "Mamba2Settings",
    "Mixer",
    "MixerKind",
    "SWASettings",
    "SlidingWindowMixer",
    "fp32_parameter_names",
    "is_mixer",
    "keep_fp32",
    "mixer_kind",
    "register_mixer",
    "registered_kinds",
    "unregister_mixer",
]
