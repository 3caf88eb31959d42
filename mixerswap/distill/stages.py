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

from ..architectures.mixers import is_mixer
from ..architectures.mixers.common import PADDING_MASK_KWARG
from ..architectures.modeling import lm_logits
from ..architectures.plan import ATTENTION
from .capture import Captured, decoder_layers
from .losses import chunked_kd_loss, mse_loss
from .masks import next_token_labels, prediction_mask, token_mask
from .recipe import StageConfig
from .teacher import as_teacher_model
from .teacher_cache import TeacherCache, topk_head


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if batch.get(k) is not None}


def replaced_layers(student) -> list[int]:
    return [i for i, kind in enumerate(student.config.layer_kinds()) if kind != ATTENTION]


class Stage(nn.Module):
    """Base: a module objective ``forward(batch) -> loss`` over the student, which it holds as its only
    submodule; the frozen teacher is held beside it, unregistered, and read through
    :class:`~.teacher.TeacherModel`'s forward only. The last batch's per-part values (floats, for the
    log) are kept on the side in ``self.metrics``.
    """

    def __init__(self, config: StageConfig, student, teacher):
        super().__init__()
        self.config, self.student = config, student
        object.__setattr__(self, "teacher", as_teacher_model(teacher))  # not a submodule: never wrapped, never saved
        self.layers = replaced_layers(student)
        self.metrics: dict = {}

    @property
    def name(self) -> str:
        return self.config.name

    def forward(self, batch: dict, key: str | None = None) -> torch.Tensor:
        loss, self.metrics = self.loss(batch, key)
        return loss

    def loss(self, batch: dict, key: str | None = None) -> tuple[torch.Tensor, dict]:
        """``(loss, parts)`` of one batch; ``key`` names the micro-batch (for caches of teacher outputs)."""
        raise NotImplementedError

    def mixers(self) -> dict[int, nn.Module]:
        """``{layer index: mixer}`` of the replaced layers (the student's own view, see the mixer contract)."""
        return {i: self.student.layer_mixer(i) for i in self.layers}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """What this stage trains, by full parameter name (the contract's parameter groups, not names)."""
        which = self.config.trainable_set
        named = dict(self.student.named_parameters())
        adapted = any("lora_" in n for n in named)
        if which == "all":
            return {n: p for n, p in named.items() if "lora_" in n or not (adapted and ".base_layer." in n)}
        chosen: set[int] = set()
        blocks = decoder_layers(self.student)
        for i, mixer in self.mixers().items():
            params = mixer.align_parameters() if self.name == "align" else mixer.parameters()
            chosen |= {id(p) for p in params}
            if which == "mixers+mlp":
                chosen |= {id(p) for p in self.student.family.mlp_of(blocks[i]).parameters()}
        return {n: p for n, p in named.items() if id(p) in chosen or "lora_" in n}

    def select_trainable(self) -> list[nn.Parameter]:
        """Freeze everything, unfreeze what this stage trains; returns those parameters (in order).

        ``align`` trains each replaced layer's ``mixer.align_parameters()``, ``hidden`` its mixers
        (and MLPs with ``unfreeze_mlp``), ``kd`` everything. LoRA adapters, if the student carries
        them, always train; the weights they adapt stay frozen (that is the point of LoRA).
        """
        chosen = self.trainable_parameters()
        if not chosen:
            raise ValueError(f"stage {self.name} has nothing to train: the student has no replaced layers")
        ids = {id(p) for p in chosen.values()}
        for p in self.student.parameters():
            p.requires_grad_(id(p) in ids)
        return [p for p in self.student.parameters() if p.requires_grad]

    def no_decay_names(self) -> set[str]:
        """Full names of the parameters that get no weight decay: inside a mixer, what the mixer says
        (``no_decay_parameter_names``: its declared ones, biases, norm weights); elsewhere every bias
        and every norm weight."""
        names, in_mixers = set(), set()
        for prefix, module in self.student.named_modules():
            if is_mixer(module):
                names |= {f"{prefix}.{n}" for n in module.no_decay_parameter_names()}
                in_mixers |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
        for prefix, module in self.student.named_modules():
            norm = "norm" in type(module).__name__.lower() or "norm" in prefix.rsplit(".", 1)[-1]
            for name, _ in module.named_parameters(recurse=False):
                full = f"{prefix}.{name}" if prefix else name
                if full not in in_mixers and (norm or name.endswith("bias")):
                    names.add(full)
        return names

    def fast_names(self) -> set[str]:
        """Full names of the mixers' declared ``fast_parameters`` (they train at ``fast_lr_scale`` x lr)."""
        return {f"{prefix}.{n}" for prefix, module in self.student.named_modules() if is_mixer(module)
                for n in module.parameter_names(module.fast_parameters)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups of the trainable parameters: decayed and not (see :meth:`no_decay_names`), each
        split into the ordinary and the fast parameters (:meth:`fast_names`; their groups carry
        ``lr = fast_lr_scale * lr``). Empty groups are left out.

        Call after :meth:`select_trainable`.
        """
        no_decay, fast = self.no_decay_names(), self.fast_names()
        lr, scale = self.config.peak_lr, self.config.fast_lr_scale
        groups = {(wd, speed): [] for speed in (1.0, scale) for wd in (weight_decay, 0.0)}
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                wd = 0.0 if name in no_decay else weight_decay
                groups[(wd, scale if name in fast else 1.0)].append(p)
        return [{"params": params, "weight_decay": wd, "lr": lr * speed}
                for (wd, speed), params in groups.items() if params]


class AlignStage(Stage):
    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        if config.mode == "matrix":
            for i, mixer in self.mixers().items():
                if not hasattr(mixer, "mixing_matrix"):
                    raise ValueError(f"align mode 'matrix' needs mixers that materialize their mixing matrix; the "
                                     f"{getattr(mixer, 'kind', type(mixer).__name__)} mixer of layer {i} has no "
                                     "mixing_matrix (use mode 'output')")

    def loss(self, batch, key=None):
        if self.config.mode == "matrix":
            return self._matrix_loss(batch)
        mask = token_mask(batch)
        seen = self.teacher("attention", model_inputs(batch), layers=self.layers)
        losses = {}
        for i, mixer in self.mixers().items():
            out, _ = mixer(seen[i].inputs.to(_dtype(mixer)), **_replay_kwargs(seen[i], batch))
            losses[i] = mse_loss(out.float(), seen[i].output.float(), mask)
        return _mean(losses)

    def _matrix_loss(self, batch):
        n = self.config.matrix_len
        short = {k: v[:, :n] for k, v in model_inputs(batch).items()}
        mask = token_mask({**batch, **short})
        seen, attn = self.teacher("attention_probs", short, layers=self.layers)
        if attn is None or attn[self.layers[0]] is None:
            raise ValueError("matrix alignment needs the teacher's attention probabilities: load it with "
                             "attn_implementation='eager'")
        pair = mask[:, None, :, None] * mask[:, None, None, :]  # [B, 1, T, T]: real query and key
        losses = {}
        for i, mixer in self.mixers().items():
            matrix = mixer.mixing_matrix(seen[i].inputs.to(_dtype(mixer)), **_replay_kwargs(seen[i], short))
            diff = (matrix.float() - attn[i].float()).square() * pair
            losses[i] = diff.sum() / (pair.sum() * matrix.shape[1]).clamp_min(1)
        return _mean(losses)


class HiddenStage(Stage):
    def loss(self, batch, key=None):
        mask = token_mask(batch)
        extra = _padding_kwargs(batch)
        seen = self.teacher("blocks", model_inputs(batch), layers=self.layers)
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
            return self.teacher("hidden", inputs), functools.partial(self.teacher, "head")
        packed = self.cache.get(key) if self.cache is not None and key is not None else None
        if packed is None:
            packed = self.teacher("topk", inputs, topk=k, chunk_tokens=self.config.chunk_tokens)
            if self.cache is not None and key is not None:
                self.cache.put(key, packed)
        return packed.to(inputs["input_ids"].device), topk_head(self.student.config.vocab_size)

    def loss(self, batch, key: str | None = None):
        c = self.config
        mask = prediction_mask(batch)  # the positions that predict a labelled token, as CE counts them
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
            labels=next_token_labels(batch) if c.ce_weight else None,
            chunk_tokens=c.chunk_tokens,
        )
        return loss, {"kd": loss.item()}


STAGES = {"align": AlignStage, "hidden": HiddenStage, "kd": KDStage}


def build_stage(config: StageConfig, student, teacher) -> Stage:
    return STAGES[config.name](config, student, teacher)


def _head(model):
    """hidden → logits exactly as the model's forward computes them (incl. Gemma's final softcap)."""
    return functools.partial(lm_logits, model)


def _replay_kwargs(seen: Captured, batch: dict) -> dict:
    """What the teacher's attention was called with (RoPE ``position_embeddings``, ``position_ids``, its
    mask), for the mixer in its place, plus the 2-D padding mask; mixers take what they need of it."""
    kwargs = {"position_ids": batch.get("position_ids"), **seen.kwargs, **_padding_kwargs(batch)}
    rope = kwargs.get("position_embeddings")
    if isinstance(rope, tuple):  # the teacher may run in bf16; the mixer reads RoPE in its input dtype
        kwargs["position_embeddings"] = tuple(t.to(seen.inputs.dtype) for t in rope)
    return kwargs


def _padding_kwargs(batch: dict) -> dict:
    mask = batch.get("attention_mask")
    return {PADDING_MASK_KWARG: mask} if mask is not None else {}


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _mean(losses: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    total = torch.stack(list(losses.values())).mean()
    return total, {f"layer{i}": v.item() for i, v in losses.items()}
