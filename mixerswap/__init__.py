"""mixerswap: turn a pretrained Hugging Face Transformer into a cheaper hybrid student.

Importing the package registers the student with ``AutoConfig`` / ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .architectures import MixerSwapConfig, MixerSwapForCausalLM

__version__ = "0.1.0"

AutoConfig.register(MixerSwapConfig.model_type, MixerSwapConfig, exist_ok=True)
AutoModelForCausalLM.register(MixerSwapConfig, MixerSwapForCausalLM, exist_ok=True)

__all__ = ["MixerSwapConfig", "MixerSwapForCausalLM", "__version__"]
