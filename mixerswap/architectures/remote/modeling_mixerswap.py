"""Model class of a mixerswap student, for ``trust_remote_code=True`` (needs the mixerswap package installed).

Optional fast kernels (Triton, mamba-ssm) are imported by mixerswap itself inside try/except.
"""

try:
    from mixerswap.architectures.modeling import MixerSwapForCausalLM
except ImportError as err:  # pragma: no cover - exercised only without the package
    raise ImportError(
        "this checkpoint is a mixerswap student; install the package to load it: pip install -e <mixerswap source "
        "folder> (a clone of its repository)"
    ) from err

__all__ = ["MixerSwapForCausalLM"]
