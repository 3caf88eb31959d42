"""Distillation settings, declared once (pydantic): they validate YAML recipes and CLI options alike.

A recipe file is a YAML mapping of :class:`DistillRecipe` fields; unknown keys are errors that name
the key. ``--stages align:20M,hidden:40M,kd:200M`` is shorthand for three :class:`StageConfig`
entries with their defaults.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)
STAGE_NAMES = ("align", "hidden", "kd")
# Peak learning rate per stage when a stage gives none: measured on CPU budgets (~64k-120k tokens) by
# benchmarks/lr_sweep.py (benchmarks/RESULTS.md, "Stage learning rates"): on SmolLM2-135M the best of the
# triples tried, on stories260k far better than 1e-3/5e-4/1e-4 (which was the worst of six for every row).
DEFAULT_LR = {"align": 3e-3, "hidden": 1e-3, "kd": 5e-4}
# Adam moves every weight by about the learning rate per step, whatever its size: right for the projections
# taken from the teacher (entries ~0.02-0.1), slow for the new O(1)-scale parts (decay and gate logits, conv
# taps) that the mixers declare as ``fast_parameters``. They train at this multiple of the stage's rate
# (benchmarks/RESULTS.md, "Fast parameters").
DEFAULT_FAST_LR_SCALE = 10.0


class RecipeError(ValueError):
    """A recipe or stage specification is invalid."""


def parse_tokens(value: int | str) -> int:
    """``20M`` → 20_000_000; ``1.5B``, ``300k`` and plain integers too."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace("_", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    try:
        if text and text[-1] in scale:
            return int(float(text[:-1]) * scale[text[-1]])
        return int(text)
    except ValueError:
        raise ValueError(f"cannot read token count {value!r}; write it like 20M, 300k or 1.5B") from None


class StageConfig(BaseModel):
    """One distillation stage.

    * ``align``: each replaced layer's mixer, fed the teacher's attention inputs, learns to
      reproduce the teacher's attention output (``mode: output``, MSE) or its attention matrix
      (``mode: matrix``, MSE between the materialized mixing matrix and the attention
      probabilities, on the first ``matrix_len`` tokens). Only mixers train.
    * ``hidden``: each replaced block, fed the teacher's block input, reproduces the teacher's
      block output (per-layer MSE). Mixers train, and the block's MLP with ``unfreeze_mlp``.
    * ``kd``: end-to-end logit distillation (forward/reverse KL or a mix, temperature, optional CE).
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["align", "hidden", "kd"]
    tokens: int = Field(gt=0, description="token budget of the stage")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default per stage)")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warm-up")
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    fast_lr_scale: float = Field(DEFAULT_FAST_LR_SCALE, gt=0,
                                 description="learning-rate multiple for the mixers' fast_parameters (1: none)")
    mode: Literal["output", "matrix"] = "output"
    matrix_len: int = Field(128, gt=1)
    unfreeze_mlp: bool = False
    trainable: Literal["mixers", "mixers+mlp", "all"] | None = None
    kd_kind: Literal["forward", "reverse", "mix"] = "forward"
    kd_mix: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    chunk_tokens: int = Field(1024, gt=0, description="tokens per chunk of the vocabulary-sized KD loss")
    teacher_topk: int | None = Field(None, gt=0, description="kd: keep the teacher's k largest logits per token")

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, value):
        return parse_tokens(value)

    @model_validator(mode="after")
    def _topk_needs_forward_kl(self):
        if self.teacher_topk is not None and self.kd_kind != "forward":
            raise ValueError("teacher_topk keeps only part of the teacher's distribution; it works with "
                             "kd_kind 'forward' only")
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.name]

    @property
    def trainable_set(self) -> str:
        if self.trainable:
            return self.trainable
        if self.name == "kd":
            return "all"
        return "mixers+mlp" if self.unfreeze_mlp else "mixers"


class LoraOptions(BaseModel):
    """LoRA adapters (peft) during ``kd``, merged at the end.

    ``layers`` picks what gets adapters: ``attention`` = the ``target_modules`` projections of the
    kept attention layers; ``mixers`` = the ``lora_targets`` each mixer declares (its ``nn.Linear``
    submodules); ``all`` = both. Whatever gets adapters trains only through them.
    """

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    layers: Literal["attention", "mixers", "all"] = "attention"
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="projections of kept attention layers that get adapters")


class DistillRecipe(BaseModel):
    """Everything ``mixerswap distill`` needs; a YAML recipe holds these keys."""

    model_config = ConfigDict(extra="forbid")

    student: str = Field(description="student folder written by `mixerswap convert`")
    teacher: str = Field(description="teacher folder or hub id (default: the one recorded in the student's "
                                     "mixerswap.yaml, when it is there)")
    data: str = Field(description="text/jsonl/parquet file, folder of them, or a datasets name/path")
    out: str
    stages: list[StageConfig] = Field(min_length=1)
    text_field: str = "text"
    data_format: Literal["auto", "text", "prompt", "chat"] = Field(
        "auto", description="auto: per file from its first record (text, prompt/response or chat messages)")
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    seq_len: int = Field(2048, gt=1)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    seed: int = 0
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast precision of the forward; master weights stay fp32 (fp16: CUDA with ddp only)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved student ('auto' = the teacher's); mixers' fp32 parameters stay fp32")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="engine under torchrun/accelerate: data parallel (ddp) or FSDP2 sharding (fsdp)")
    teacher_offload: bool = Field(False, description="fsdp: keep the teacher's shards in CPU memory (GPUs)")
    checkpoint_every: int = Field(200, gt=0, description="optimizer steps between checkpoints")
    held_out_docs: int = Field(32, ge=0, description="documents kept out of training for perplexity")
    held_out_rows: int = Field(8, gt=0, description="packed rows of seq_len tokens of the held-out (and "
                               "validation) documents scored for perplexity, 8 per forward")
    validation_docs: int = Field(0, ge=0, description="documents after the held-out ones, also kept out of "
                                                       "training: a stage that raises their perplexity is undone "
                                                       "(0: every stage is kept)")
    lora: LoraOptions | None = None
    log_with: Literal["tensorboard"] | None = None
    allow_other_teacher: bool = Field(False, description="distill from a teacher other than the one the student "
                                                          "was converted from (its fingerprint differs)")
    teacher_cache: str | None = Field(None, description="folder of cached top-k teacher logits for kd stages")

    @model_validator(mode="after")
    def _cache_needs_topk(self):
        if self.teacher_cache and any(s.name == "kd" and s.teacher_topk is None for s in self.stages):
            raise ValueError("teacher_cache stores top-k teacher logits: set teacher_topk on every kd stage")
        return self

    @model_validator(mode="after")
    def _engine_options(self):
        if self.distributed == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError("mixed_precision 'fp16' needs loss scaling, which the fsdp engine does not do; "
                             "use 'bf16' or distributed 'ddp'")
        if self.distributed == "fsdp" and self.lora is not None:
            raise ValueError("lora is not supported with distributed 'fsdp' (adapters are merged in place); use 'ddp'")
        if self.teacher_offload and self.distributed != "fsdp":
            raise ValueError("teacher_offload offloads the teacher's FSDP shards: it needs distributed 'fsdp'")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> DistillRecipe:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"recipe {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path} must be a mapping of settings")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validated(data, source=str(path))

    @classmethod
    def validated(cls, data: dict, source: str = "options") -> DistillRecipe:
        if data.get("teacher") is None and data.get("student") is not None:
            data = {**data, "teacher": recorded_teacher(data["student"])}
        try:
            return cls(**data)
        except ValidationError as err:
            raise RecipeError(f"{source}: " + "; ".join(_describe(e) for e in err.errors())) from None


def recorded_teacher(student: str | Path) -> str:
    """The teacher ``student`` was converted from, as its ``mixerswap.yaml`` records it (``teacher``, or
    ``conversion.teacher`` in a distilled student's), when that path exists here; else a one-line error."""
    settings_file = Path(student) / "mixerswap.yaml"
    if not Path(student).is_dir():
        raise RecipeError(f"no --teacher given, and {student} is not a student folder here to read it from; "
                          "pass --teacher, or check the student's path")
    from ..convert.pipeline import load_conversion_settings  # torch and transformers: only when asked

    try:
        settings = load_conversion_settings(student)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        settings = {}
    if not isinstance(settings, dict):
        settings = {}
    conversion = settings.get("conversion") if isinstance(settings.get("conversion"), dict) else {}
    teacher = settings.get("teacher") or conversion.get("teacher")
    if not teacher:
        raise RecipeError(f"no --teacher given, and {student} records none (no readable {settings_file.name} with "
                          "a teacher); pass --teacher")
    if not Path(teacher).expanduser().exists():
        raise RecipeError(f"no --teacher given, and the teacher recorded in {settings_file}, {teacher}, is not "
                          "here; pass --teacher (a folder or hub id)")
    logger.info("teacher %s, as recorded in %s", teacher, settings_file)
    return str(teacher)


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "recipe"
    if error["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    if error["type"] == "missing":
        return f"missing key {where!r}"
    return f"{where}: {error['msg']}"


def parse_stages(text: str) -> list[dict]:
    """``align:20M,hidden:40M,kd:200M`` → stage dicts (other settings at their defaults)."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, tokens = part.partition(":")
        if not sep or name not in STAGE_NAMES:
            raise RecipeError(f"bad stage {part!r}: write NAME:TOKENS with NAME in {', '.join(STAGE_NAMES)}")
        stages.append({"name": name, "tokens": parse_tokens(tokens)})
    if not stages:
        raise RecipeError("no stages given; e.g. --stages align:20M,hidden:40M,kd:200M")
    return stages
