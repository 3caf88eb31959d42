"""mixerswap: turn a pretrained Hugging Face Transformer into a cheaper hybrid student.

Importing the package registers the student with ``AutoConfig`` / ``AutoModelForCausalLM``. It does so
through an import hook (:mod:`mixerswap.auto_registration`), so that ``import mixerswap`` and the
command line start without importing torch and transformers' model code; the classes below are
imported on first access.
"""

from . import auto_registration

__version__ = "0.1.0"
__all__ = ["MixerSwapConfig", "MixerSwapForCausalLM", "__version__"]

auto_registration.install()


def __getattr__(name: str):
    if name == "MixerSwapConfig":
        from .architectures.configuration import MixerSwapConfig

        return MixerSwapConfig
    if name == "MixerSwapForCausalLM":
        from .architectures.modeling import MixerSwapForCausalLM

        return MixerSwapForCausalLM
    raise AttributeError(f"module 'mixerswap' has no attribute {name!r}")
