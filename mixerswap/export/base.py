"""What every stock format declares: whether it expresses a student, and how its tensors map.

A format is a :class:`StockFormat` subclass, built once per export from the student's config and the
names of its stored tensors. :meth:`~StockFormat.issues` lists what the stock architecture cannot
express (empty: exact); :meth:`~StockFormat.route` tells the streaming writer, per student tensor,
whether it is copied byte for byte under a new name or belongs to a group (a layer) that
:meth:`~StockFormat.build` turns into stock tensors once all of the group has been read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..architectures import MixerSwapConfig, family_for
from ..architectures.plan import parse_layer
from ..convert.adapters import AttentionShape


class ExportError(ValueError):
    """The student cannot be written in the asked stock format (one line naming the part)."""


@dataclass(frozen=True)
class Issue:
    """Something the stock format cannot express exactly.

    Attributes:
        message: names the part, e.g. ``layer 3 (mla) attends within a sliding window of 4096``.
        approximable: the format can still be written (``--allow-approximate``), the part dropped or changed.
    """

    message: str
    approximable: bool = True


# teacher families whose blocks are Llama-shaped (RMSNorm pre-norms, SwiGLU MLP): what the stock classes build
LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3", "phi3")


class StockFormat:
    """One stock ``transformers`` architecture a student can be written as; see the module docstring."""

    name: str = ""
    architecture: str = ""
    summary: str = ""
    kinds: frozenset[str] = frozenset()  # mixer kinds this format is the automatic choice for

    def __init__(self, config: MixerSwapConfig, names: set[str]):
        self.config = config
        self.teacher: PreTrainedConfig = config.require_teacher()
        self.family = family_for(self.teacher.model_type)
        self.plan = [parse_layer(entry, i) for i, entry in enumerate(config.plan)]
        self.names = names
        self.shape = AttentionShape.from_config(self.teacher)

    def issues(self) -> list[Issue]:
        raise NotImplementedError

    def stock_config(self) -> PreTrainedConfig:
        raise NotImplementedError

    def route(self, name: str) -> tuple[str, str]:
        """``("copy", new_name)``, ``("group", key)`` or ``("drop", why)`` for one student tensor."""
        raise NotImplementedError

    def build(self, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stock tensors of one group, from all of its student tensors (by student name)."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines for the model card: how the student's parts were expressed."""
        return []


def teacher_rotary(teacher: PreTrainedConfig) -> tuple[torch.Tensor, float]:
    """The teacher's RoPE inverse frequencies ``[r / 2]`` (fp32, as its model computes them) and attention scaling."""
    module = __import__(MODEL_FOR_CAUSAL_LM_MAPPING[type(teacher)].__module__, fromlist=["_"])
    rotary = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    emb = rotary(config=teacher)
    return emb.inv_freq.float(), float(emb.attention_scaling)


def sliding_window_layers(teacher: PreTrainedConfig) -> list[int]:
    """Indices of the teacher's layers that attend within a sliding window."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, _ = get_layer_types_and_kwargs(teacher)
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def common_config(teacher: PreTrainedConfig) -> dict:
    """What every stock config copies from the teacher's: sizes, ids, norms, embeddings tying."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "hidden_act")
    return {k: getattr(teacher, k) for k in keys if getattr(teacher, k, None) is not None}


def like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``reference``'s dtype, contiguous."""
    return tensor.to(reference.dtype).contiguous()
