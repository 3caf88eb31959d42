"""Mixers that replace attention. Each kind is one module with a ``Settings`` model and ``kind`` name.

Registering a new kind here (plus its converter in ``mixerswap.convert``) plugs it into the plan,
the cache, save/load and generation.
"""

from .mamba2 import Mamba2Mixer, Mamba2Settings

MIXERS: dict[str, type] = {Mamba2Mixer.kind: Mamba2Mixer}

# Mixers that keep a RecurrentStateLayer in the hybrid cache.
RECURRENT_KINDS = frozenset({Mamba2Mixer.kind})

__all__ = ["MIXERS", "RECURRENT_KINDS", "Mamba2Mixer", "Mamba2Settings"]
