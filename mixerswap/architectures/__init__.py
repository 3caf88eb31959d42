"""Student architecture: config with a layer plan, the HF model, mixers and the hybrid cache."""

from .cache import HybridMixerCache, MixerCacheLayer, RecurrentStateLayer, cache_nbytes
from .configuration import MixerSwapConfig
from .families import FAMILIES, TeacherFamily, UnsupportedTeacherError, family_for, supported_model_types
from .modeling import MixerSwapForCausalLM, MixerSwapPreTrainedModel
from .plan import ATTENTION, PlanError, describe_plan, validate_plan

__all__ = [
    "ATTENTION",
    "FAMILIES",
    "HybridMixerCache",
    "MixerCacheLayer",
    "MixerSwapConfig",
    "MixerSwapForCausalLM",
    "MixerSwapPreTrainedModel",
    "PlanError",
    "RecurrentStateLayer",
    "TeacherFamily",
    "cache_nbytes",
    "UnsupportedTeacherError",
    "describe_plan",
    "family_for",
    "supported_model_types",
    "validate_plan",
]
