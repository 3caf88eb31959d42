"""``MixerSwapConfig``: the teacher's own config plus the layer plan."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto import CONFIG_MAPPING

from .plan import validate_plan

# Attributes read from the top-level config by generation, tying, lm-eval and friends; they are
# copies of the teacher's values (the teacher config stays the source of truth).
MIRRORED_ATTRIBUTES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@strict
class MixerSwapConfig(PreTrainedConfig):
    """Config of a mixerswap student.

    Args:
        teacher_config: the teacher's config (a ``PreTrainedConfig`` or its dict with ``model_type``).
            The student builds the teacher's architecture from it, so everything except the
            replaced attention modules is the teacher's own code.
        plan: one entry per layer, ``{"kind": "attention"}`` or ``{"kind": "<mixer>", **settings}``
            (see :mod:`mixerswap.architectures.plan`).
        conversion: free-form provenance written by ``mixerswap convert`` (teacher, options, version).
    """

    model_type = "mixerswap"
    sub_configs = {"teacher_config": AutoConfig}

    teacher_config: dict | PreTrainedConfig | None = None
    plan: list | None = None
    conversion: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.teacher_config, dict):
            if "model_type" not in self.teacher_config:
                raise ValueError("teacher_config needs a 'model_type'")
            self.teacher_config = CONFIG_MAPPING[self.teacher_config["model_type"]](**self.teacher_config)
        elif self.teacher_config is None:
            # A bare config (transformers builds one to find default values): no teacher, no model.
            # MixerSwapForCausalLM refuses it rather than silently building some default architecture.
            super().__post_init__(**kwargs)
            return
        teacher = self.teacher_config
        if self.plan is None:
            self.plan = [{"kind": "attention"} for _ in range(teacher.num_hidden_layers)]
        # Store every setting explicitly (defaults included) so config.json describes the model fully.
        self.plan = [
            {"kind": kind, **(settings.model_dump() if settings is not None else {})}
            for kind, settings in validate_plan(list(self.plan), teacher.num_hidden_layers)
        ]
        self.tie_word_embeddings = bool(getattr(teacher, "tie_word_embeddings", False))
        for name in MIRRORED_ATTRIBUTES:
            if hasattr(teacher, name):
                kwargs.setdefault(name, getattr(teacher, name))
        super().__post_init__(**kwargs)

    def require_teacher(self) -> PreTrainedConfig:
        """The teacher config, or a clear error for a config that is not a student's."""
        if self.teacher_config is None:
            raise ValueError("this config has no teacher_config, so it does not describe a mixerswap student; "
                             "`mixerswap convert TEACHER --out DIR` makes students")
        return self.teacher_config

    def layer_kinds(self) -> list[str]:
        return [entry["kind"] for entry in self.plan]
