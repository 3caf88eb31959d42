"""The three stages of progressive distillation (MOHAWK, Bick et al. 2024; LoLCATs, Zhang et al. 2024).

Each stage says which student parameters train and computes its loss on one batch::

    align   mixer_i(teacher attention input_i)  ≈ teacher attention output_i     (every replaced layer)
            or mixing_matrix_i ≈ teacher attention probabilities_i               (mode: matrix)
    hidden  student block_i(teacher block input_i) ≈ teacher block output_i      (every replaced layer)
    kd      student logits ≈ teacher logits (KL), end to end

``align`` and ``hidden`` replay the teacher's own inputs, so layers learn independently and one
teacher forward serves every layer. A batch is a dict with ``input_ids [B, T]``, ``position_ids
[B, T]`` (restarting at document starts, for packed rows) and optionally ``attention_mask [B, T]``
and ``labels [B, T]`` (-100 = ignored).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..architectures.mixers.common import PADDING_MASK_KWARG
from ..architectures.modeling import lm_logits
from ..architectures.plan import ATTENTION
from .capture import attention_modules, block_modules, capture, decoder_layers
from .losses import chunked_kd_loss, mse_loss
from .recipe import StageConfig
from .teacher_cache import TeacherCache, topk_head, topk_pack


def token_mask(batch: dict) -> torch.Tensor:
    """``[B, T]`` float mask of the tokens that count: not padding, and not labelled -100."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask.float()
    if batch.get("labels") is not None:
        mask = mask * (batch["labels"] != -100).float()
    return mask


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if batch.get(k) is not None}


def replaced_layers(student) -> list[int]:
    return [i for i, kind in enumerate(student.config.layer_kinds()) if kind != ATTENTION]


class Stage:
    """Base: picks trainable parameters, computes the loss of one batch."""

    def __init__(self, config: StageConfig, student, teacher):
        self.config, self.student, self.teacher = config, student, teacher.requires_grad_(False)
        self.layers = replaced_layers(student)

    @property
    def name(self) -> str:
        return self.config.name

    def select_trainable(self) -> list[nn.Parameter]:
        """Freeze everything, unfreeze what this stage trains; returns those parameters (in order).

        LoRA adapters, if the student carries them, always train; with ``trainable: all`` the
        weights they adapt stay frozen (that is the point of LoRA).
        """
        which = self.config.trainable_set
        has_lora = any("lora_" in n for n, _ in self.student.named_parameters())
        for name, p in self.student.named_parameters():
            adapted = has_lora and ".base_layer." in name
            p.requires_grad_("lora_" in name or (which == "all" and not adapted))
        if which != "all":
            blocks = decoder_layers(self.student)
            for i in self.layers:
                blocks[i].self_attn.requires_grad_(True)
                if which == "mixers+mlp":
                    blocks[i].mlp.requires_grad_(True)
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {self.name} has nothing to train: the student has no replaced layers")
        return params

    def loss(self, batch: dict, key: str | None = None) -> tuple[torch.Tensor, dict]:
        """Loss of one batch; ``key`` names the micro-batch (for caches of teacher outputs)."""
        raise NotImplementedError


class AlignStage(Stage):
    def loss(self, batch, key=None):
        if self.config.mode == "matrix":
            return self._matrix_loss(batch)
        mask = token_mask(batch)
        extra = _padding_kwargs(batch)
        with torch.no_grad(), capture(attention_modules(self.teacher, self.layers)) as seen:
            self.teacher(**model_inputs(batch), use_cache=False)
        blocks = decoder_layers(self.student)
        losses = {}
        for i in self.layers:
            mixer = blocks[i].self_attn
            inputs = seen[i].inputs.to(_dtype(mixer))
            out, _ = mixer(inputs, position_ids=batch.get("position_ids"), **extra)
            losses[i] = mse_loss(out.float(), seen[i].output.float(), mask)
        return _mean(losses)

    def _matrix_loss(self, batch):
        n = self.config.matrix_len
        short = {k: v[:, :n] for k, v in model_inputs(batch).items()}
        mask = token_mask({**batch, **short, "labels": None})
        with torch.no_grad(), capture(attention_modules(self.teacher, self.layers)) as seen:
            attn = self.teacher(**short, use_cache=False, output_attentions=True).attentions
        if attn is None or attn[self.layers[0]] is None:
            raise ValueError("matrix alignment needs the teacher's attention probabilities: load it with "
                             "attn_implementation='eager'")
        blocks = decoder_layers(self.student)
        pair = mask[:, None, :, None] * mask[:, None, None, :]  # [B, 1, T, T]: real query and key
        losses = {}
        for i in self.layers:
            mixer = blocks[i].self_attn
            inputs = seen[i].inputs.to(_dtype(mixer))
            matrix = mixer.mixing_matrix(inputs, position_ids=short.get("position_ids"), **_padding_kwargs(short))
            diff = (matrix.float() - attn[i].float()).square() * pair
            losses[i] = diff.sum() / (pair.sum() * matrix.shape[1]).clamp_min(1)
        return _mean(losses)


class HiddenStage(Stage):
    def loss(self, batch, key=None):
        mask = token_mask(batch)
        extra = _padding_kwargs(batch)
        with torch.no_grad(), capture(block_modules(self.teacher, self.layers)) as seen:
            self.teacher(**model_inputs(batch), use_cache=False)
        blocks = decoder_layers(self.student)
        losses = {}
        for i in self.layers:
            block = blocks[i]
            out = block(seen[i].inputs.to(_dtype(block)), **seen[i].kwargs, **extra)
            out = out[0] if isinstance(out, tuple) else out
            losses[i] = mse_loss(out.float(), seen[i].output.float(), mask)
        return _mean(losses)


class KDStage(Stage):
    """End-to-end KD; teacher logits on the fly, or as top-k (``teacher_topk``), optionally cached."""

    cache: TeacherCache | None = None

    def _teacher(self, inputs: dict, key: str | None) -> tuple[torch.Tensor, object]:
        """``(teacher tensor, teacher head)`` for ``chunked_kd_loss``: hidden states + lm head, or packed top-k."""
        k = self.config.teacher_topk
        if k is None:
            with torch.no_grad():
                return self.teacher.model(**inputs, use_cache=False).last_hidden_state, _head(self.teacher)
        packed = self.cache.get(key) if self.cache is not None and key is not None else None
        if packed is None:
            with torch.no_grad():
                hidden = self.teacher.model(**inputs, use_cache=False).last_hidden_state
                packed = torch.cat([topk_pack(lm_logits(self.teacher, h), k)
                                    for h in hidden.split(max(1, self.config.chunk_tokens // hidden.shape[1]))])
            if self.cache is not None and key is not None:
                self.cache.put(key, packed)
        return packed.to(inputs["input_ids"].device), topk_head(self.student.config.vocab_size)

    def loss(self, batch, key: str | None = None):
        c = self.config
        mask = token_mask(batch)
        inputs = model_inputs(batch)
        teacher, teacher_head = self._teacher(inputs, key)
        student_hidden = self.student.model(**inputs, use_cache=False, **_padding_kwargs(batch)).last_hidden_state
        loss = chunked_kd_loss(
            student_hidden,
            _head(self.student),
            teacher,
            teacher_head,
            mask,
            kind=c.kd_kind,
            mix=c.kd_mix,
            temperature=c.temperature,
            ce_weight=c.ce_weight,
            labels=_next_token_labels(batch) if c.ce_weight else None,
            chunk_tokens=c.chunk_tokens,
        )
        return loss, {"kd": loss.item()}


STAGES = {"align": AlignStage, "hidden": HiddenStage, "kd": KDStage}


def build_stage(config: StageConfig, student, teacher) -> Stage:
    return STAGES[config.name](config, student, teacher)


def _head(model):
    """hidden → logits exactly as the model's forward computes them (incl. Gemma's final softcap)."""
    return functools.partial(lm_logits, model)


def _next_token_labels(batch: dict) -> torch.Tensor:
    """Labels for CE aligned with positions: position t predicts token t+1 (last position ignored)."""
    labels = batch.get("labels", batch["input_ids"])
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    if batch.get("position_ids") is not None:  # do not predict across a packed document boundary
        starts = batch["position_ids"][:, 1:] == 0
        shifted[:, :-1][starts] = -100
    if batch.get("attention_mask") is not None:
        shifted[batch["attention_mask"] == 0] = -100
    return shifted


def _padding_kwargs(batch: dict) -> dict:
    mask = batch.get("attention_mask")
    return {PADDING_MASK_KWARG: mask} if mask is not None else {}


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _mean(losses: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    total = torch.stack(list(losses.values())).mean()
    return total, {f"layer{i}": v.item() for i, v in losses.items()}
