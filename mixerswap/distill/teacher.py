"""``TeacherModel``: the frozen teacher behind a single ``forward``, whatever a stage needs from it.

FSDP2 gathers a module's parameters only inside that module's own ``forward``; so that a sharded
teacher works like a whole one, every read of the teacher goes through this wrapper's forward,
which is the teacher's FSDP root (see :mod:`.engine`). Modes:

* ``attention`` / ``blocks``: run the teacher and return what each listed layer's attention module
  / decoder block saw and returned (:class:`~.capture.Captured`: inputs, replayable kwargs, output);
* ``attention_probs``: ``(captured attention, attention probabilities per layer)`` (eager attention);
* ``hidden``: final hidden states ``[B, T, H]`` (after the final norm);
* ``head``: hidden states ``[n, H]`` → logits ``[n, V]`` exactly as the teacher's forward computes them;
* ``topk``: packed top-k logits ``[B, T, 2k]`` (see :mod:`.teacher_cache`), computed chunk by chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures.modeling import lm_logits
from .capture import attention_modules, block_modules, capture
from .teacher_cache import topk_pack

MODES = ("attention", "attention_probs", "blocks", "hidden", "head", "topk")


class TeacherModel(nn.Module):
    """A frozen HF causal LM (``.model``), always in eval mode, read through :meth:`forward`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, mode: str, inputs, layers: list[int] | None = None, topk: int | None = None,
                chunk_tokens: int = 1024):
        """``inputs``: the model inputs (``input_ids``, ``position_ids``, ``attention_mask``), or hidden
        states ``[n, H]`` for ``head``. ``layers``: the layers to capture; ``topk``: k for ``topk``."""
        if mode == "head":
            return lm_logits(self.model, inputs)
        if mode in ("attention", "attention_probs", "blocks"):
            modules = (block_modules if mode == "blocks" else attention_modules)(self.model, layers or [])
            with capture(modules) as seen:
                out = self.model(**inputs, use_cache=False, **({"output_attentions": True}
                                                               if mode == "attention_probs" else {}))
            return (dict(seen), out.attentions) if mode == "attention_probs" else dict(seen)
        if mode == "hidden":
            return self.model.model(**inputs, use_cache=False).last_hidden_state
        if mode == "topk":
            hidden = self.model.model(**inputs, use_cache=False).last_hidden_state
            rows = max(1, chunk_tokens // hidden.shape[1])
            return torch.cat([topk_pack(lm_logits(self.model, h), topk) for h in hidden.split(rows)])
        raise ValueError(f"unknown teacher mode {mode!r}; one of {', '.join(MODES)}")


def as_teacher_model(teacher: nn.Module) -> TeacherModel:
    return teacher if isinstance(teacher, TeacherModel) else TeacherModel(teacher)
