"""Config class of a mixerswap student, for ``trust_remote_code=True`` (needs ``pip install mixerswap``)."""

try:
    from mixerswap.architectures.configuration import MixerSwapConfig
except ImportError as err:  # pragma: no cover - exercised only without the package
    raise ImportError(
        "this checkpoint is a mixerswap student; install the package to load it: pip install mixerswap"
    ) from err

__all__ = ["MixerSwapConfig"]
