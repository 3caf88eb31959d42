"""``run_distill``: stages in order on one student, through an engine, with checkpoints and resume.

Per stage: the stage objective (:mod:`.stages`), a fresh AdamW over the parameters it trains in two
groups (weight decay, and none for what the mixers declare plus every bias and norm weight),
warm-up then cosine / WSD / constant learning rate, gradient accumulation, gradient clipping, and a
data loader seeded by ``(seed, stage)`` with its own token budget. The engine (:mod:`.engine`: DDP
through accelerate, or FSDP2) owns devices, wrapping, backward, clipping and precision. Every
``checkpoint_every`` optimizer steps and at the end of each stage the whole state is checkpointed
atomically, with no pickle (:mod:`.checkpoint`); ``resume=True`` continues from the latest
checkpoint and reproduces an uninterrupted run exactly. A non-finite loss stops training with a
clear message and leaves the last good checkpoint in place. The student trains in fp32 and is saved
in the teacher's dtype (or ``dtype``), the mixers' fp32 parameters kept fp32, as an ordinary HF
folder written atomically like ``convert``'s.

Distributed: under ``torchrun`` / ``accelerate launch`` each process takes its share of every batch
(``rows[rank::world]``), so N processes with batch size b match one process with batch size N*b.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from .. import __version__
from ..convert.checkpoint_io import (
    atomic_output_dir,
    check_output,
    folder_fingerprint,
    output_lock,
    refuse_non_finite,
    write_whole,
)
from ..convert.gguf import hf_model_path
from ..progress import progress_bar
from .checkpoint import (
    Progress,
    full_model_state,
    latest_checkpoint,
    load_checkpoint,
    load_progress,
    save_checkpoint,
)
from .data import PackedLoader, check_seq_len, check_vocab, held_out_split, read_documents
from .engine import check_precision, make_engine
from .lora import add_lora, merge_lora
from .recipe import DistillRecipe, StageConfig
from .stages import build_stage
from .teacher_cache import TeacherCache
from .validation import HeldOutNLL, StageGuard, eval_rows, perplexity

logger = logging.getLogger(__name__)


class DistillError(RuntimeError):
    """Training cannot continue (e.g. the loss became NaN)."""


@dataclass
class DistillResult:
    out: Path
    perplexity_before: float | None
    perplexity_after: float | None
    history: list
    perplexity_teacher: float | None = None
    stage_perplexity: list = field(default_factory=list)  # [{"stage", "perplexity"}] after each stage


def lr_factor(step: int, total: int, config: StageConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` of ``total``."""
    warm = int(total * config.warmup)
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # WSD: warm-up, stable, then a linear decay over the last 20% of steps
    return 1.0 if progress < 0.8 else 1.0 - (1 - floor) * (progress - 0.8) / 0.2


def work_dir(out: str | Path) -> Path:
    """Checkpoints and logs live next to the output until it is complete."""
    out = Path(out)
    return out.parent / f"{out.name}.work"


def saved_dtype(recipe: DistillRecipe, teacher_path=None) -> torch.dtype:
    """The dtype the distilled student is saved in: ``recipe.dtype``, or the teacher's for ``auto``."""
    if recipe.dtype != "auto":
        return getattr(torch, recipe.dtype)
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(teacher_path or recipe.teacher), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def run_distill(recipe: DistillRecipe, **options) -> DistillResult:
    """Distill ``recipe.student`` from ``recipe.teacher``; see the module docstring. Options:
    ``resume``, ``overwrite``, ``progress``, ``keep_checkpoints``.

    The output (and its ``OUT.work`` checkpoints) is locked for the whole run, on the main process:
    a second run on the same ``--out`` fails at once instead of interleaving checkpoints.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return _run_distill(recipe, **options)
    with output_lock(recipe.out):
        return _run_distill(recipe, **options)


def _run_distill(recipe: DistillRecipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                 keep_checkpoints: bool = False, _fail_after_step: int | None = None) -> DistillResult:
    check_precision(recipe)
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import AutoModelForCausalLM

    from ..architectures import MixerSwapForCausalLM

    # never write over an input of the run (or a folder holding one), whatever --overwrite says
    out = check_output(recipe.out, overwrite=overwrite,
                       inputs=(recipe.student, recipe.teacher, recipe.data, recipe.teacher_cache))
    work = work_dir(out)
    student_config = _check_student(recipe.student)
    teacher_path = hf_model_path(recipe.teacher)  # a .gguf teacher: its dequantized HF folder
    _check_teacher_identity(recipe, student_config, teacher_path)
    if not resume and latest_checkpoint(work / "checkpoints") is not None:
        raise FileExistsError(f"{work} holds checkpoints of an earlier run; pass --resume to continue it "
                              "or delete that folder to start over")
    # all of the data is read once now, so a bad line anywhere stops the run before it starts
    documents = read_documents(recipe.data, text_field=recipe.text_field, prompt_field=recipe.prompt_field,
                               response_field=recipe.response_field, messages_field=recipe.messages_field,
                               data_format=recipe.data_format)
    documents.check()

    matrix = any(s.name == "align" and s.mode == "matrix" for s in recipe.stages)
    _forget_other_precision(recipe.mixed_precision)
    accelerator = Accelerator(mixed_precision=recipe.mixed_precision, log_with=recipe.log_with,
                              project_dir=str(work) if recipe.log_with else None,
                              cpu=not torch.cuda.is_available(),  # lets `torchrun` start CPU data parallelism
                              step_scheduler_with_optimizer=False,  # one schedule step per optimizer step
                              # a mixing matrix leaves the mixer's output path without gradient
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=matrix)])
    engine = make_engine(recipe, accelerator)
    device = engine.device
    out_dtype = saved_dtype(recipe, teacher_path)
    student = MixerSwapForCausalLM.from_pretrained(recipe.student, dtype=torch.float32).to(device)
    teacher_dtype = torch.bfloat16 if recipe.mixed_precision == "bf16" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=teacher_dtype,
                                                   **({"attn_implementation": "eager"} if matrix else {}))
    teacher = teacher.eval().requires_grad_(False)
    refuse_non_finite(student, f"student {recipe.student}")
    refuse_non_finite(teacher, f"teacher {recipe.teacher}")
    check_vocab(teacher.config, student.config)
    tokenizer = _load_tokenizer(recipe.student, teacher_path)
    check_seq_len(recipe.seq_len, teacher.config)

    train_docs, held_out = held_out_split(documents, recipe.held_out_docs)
    validation = []
    if recipe.validation_docs:  # the next documents: apart from training and from what the run reports
        train_docs, validation = held_out_split(train_docs, recipe.validation_docs)
    held_rows = eval_rows(held_out, tokenizer, recipe.seq_len, max_rows=recipe.held_out_rows)
    ppl_before = perplexity(lambda o, b: o(b), HeldOutNLL(student), held_rows, device)
    # the teacher runs where setup_teacher will put it: the device, or CPU when its weights are offloaded
    teacher_device = torch.device("cpu") if recipe.teacher_offload else device
    ppl_teacher = perplexity(lambda o, b: o(b), HeldOutNLL(teacher.to(teacher_device)), held_rows, teacher_device)
    student = engine.setup_student(student)
    teacher = engine.setup_teacher(teacher)
    validation_rows = eval_rows(validation, tokenizer, recipe.seq_len, max_rows=recipe.held_out_rows)
    guard = StageGuard(validation_rows, work, device) if validation_rows is not None else None
    validation_start = guard.measure(engine.evaluate, student) if guard else None  # the weights before training

    state = Progress()
    ckpt_root = work / "checkpoints"
    if resume:
        found = latest_checkpoint(ckpt_root)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_root}")
        state = load_progress(found)
        logger.info("resuming from %s (stage %d, step %d)", found, state.stage_index, state.stage_step)
    else:
        torch.manual_seed(recipe.seed)
    metrics_path = work / "metrics.jsonl"
    if resume and accelerator.is_main_process:
        _forget_metrics_after(metrics_path, state.global_step)
    work.mkdir(parents=True, exist_ok=True)

    world, rank, main = engine.world, engine.rank, accelerator.is_main_process

    def held_out_perplexity() -> float | None:  # of the student as it is now, through the engine
        return perplexity(engine.evaluate, HeldOutNLL(student), held_rows, device)

    def finish_stage(config: StageConfig) -> dict:
        """Held-out perplexity after a stage (and the guard's verdict): the stage's record."""
        speed = {"tokens_per_s": (state.tokens_seen - tokens_at_start) / max(time.perf_counter() - started, 1e-9),
                 "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
        record = {"stage": config.name, "perplexity": held_out_perplexity()}
        if guard:
            previous = state.stage_perplexity[-1] if state.stage_perplexity else {}
            before = previous.get("validation_kept", validation_start)
            trained = guard.measure(engine.evaluate, student)
            reverted = guard.end(student, trained, before)
            record.update(validation_perplexity=trained, reverted=reverted, validation_kept=min(before, trained))
            if reverted:
                logger.warning("%s raised validation perplexity %.3f -> %.3f: undone, the student goes on from "
                               "the weights before it", config.name, before, trained)
                record.update(perplexity_trained=record["perplexity"], perplexity=held_out_perplexity())
        if record["perplexity"] is not None:
            logger.info("after %s: held-out perplexity %.3f (teacher %.3f, before distillation %.3f)",
                        config.name, record["perplexity"], ppl_teacher, ppl_before)
        if main:
            with open(metrics_path, "a") as f:
                event = {"event": "stage_end", "global_step": state.global_step, **record,
                         "held_out_perplexity": record["perplexity"], "teacher_perplexity": ppl_teacher,
                         **speed}
                f.write(json.dumps({k: v for k, v in event.items() if k != "perplexity"}) + "\n")
        return record

    lora_added = False
    for stage_index in range(state.stage_index, len(recipe.stages)):
        config = recipe.stages[stage_index]
        resuming, resume = resume, False  # the checkpoint applies to the first stage run after resuming
        if resuming and state.stage_step == 0:  # at a stage boundary: weights and random generators only
            load_checkpoint(latest_checkpoint(ckpt_root), student)
        if recipe.lora and config.name == "kd" and not lora_added:
            add_lora(student, recipe.lora)
            lora_added = True
        stage = build_stage(config, student, teacher)
        if recipe.teacher_cache and config.name == "kd":
            stage.cache = TeacherCache(recipe.teacher_cache, _cache_fingerprint(recipe, world))
        params = stage.select_trainable()
        rows_per_step = recipe.batch_size * recipe.grad_accum * world
        total_steps = max(1, math.ceil(config.tokens / (rows_per_step * recipe.seq_len)))
        groups = [g for g in stage.param_groups(recipe.weight_decay) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=config.peak_lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, c=config, n=total_steps: lr_factor(s, n, c))
        model, optimizer, scheduler = engine.prepare(stage, optimizer, scheduler)
        loader = PackedLoader(train_docs, tokenizer, seq_len=recipe.seq_len, batch_size=recipe.batch_size * world,
                              seed=recipe.seed + stage_index, max_tokens=total_steps * rows_per_step * recipe.seq_len)
        start = state.stage_step if resuming else 0
        if start:  # mid-stage: weights, optimizer, schedule, data position and random generators continue
            load_checkpoint(latest_checkpoint(ckpt_root), student, _unwrap(optimizer), _unwrap(scheduler))
            loader.load_state_dict(state.loader_state)
        if guard:
            guard.begin(stage_index, student, resumed_mid_stage=bool(start))
        batches = iter(loader)
        student.train()
        bar = progress_bar(total=total_steps, initial=start, desc=f"{config.name}", enabled=progress and main)
        if device.type == "cuda":  # the stage_end event reports each stage's own peak
            torch.cuda.reset_peak_memory_stats(device)
        started, tokens_at_start = time.perf_counter(), state.tokens_seen
        for step in range(start, total_steps):
            micros = list(islice(batches, recipe.grad_accum))
            if not micros:
                logger.warning("stage %s: data exhausted after %d steps", config.name, step)
                break
            exhausted = len(micros) < recipe.grad_accum
            optimizer.zero_grad(set_to_none=True)
            step_loss, parts = 0.0, {}
            for micro, batch in enumerate(micros):
                batch = {k: v[rank::world].to(device) for k, v in batch.items()}
                with engine.sync(model, micro == len(micros) - 1):
                    with engine.autocast():
                        loss = model(batch, key=f"stage{stage_index}-step{step:08d}-micro{micro}-rank{rank}")
                    _check_finite(loss, step, config, ckpt_root, stage, batch, engine)
                    engine.backward(loss / recipe.grad_accum)
                parts = stage.metrics
                step_loss += loss.item() / recipe.grad_accum
                state.tokens_seen += batch["input_ids"].numel() * world
            if recipe.max_grad_norm:
                engine.clip_grad_norm_(model, params, recipe.max_grad_norm)
            engine.step(optimizer, scheduler)
            state.stage_step, state.global_step = step + 1, state.global_step + 1
            elapsed = max(time.perf_counter() - started, 1e-9)
            record = {"stage": config.name, "step": step + 1, "global_step": state.global_step, "loss": step_loss,
                      "lr": config.peak_lr * lr_factor(step, total_steps, config), "tokens": state.tokens_seen,
                      "tokens_per_s": (state.tokens_seen - tokens_at_start) / elapsed, **parts}
            state.history.append({"stage": config.name, "step": step + 1, "loss": step_loss})
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if recipe.log_with:
                    accelerator.log({f"{config.name}/loss": step_loss, "lr": record["lr"]}, step=state.global_step)
            last_step = step + 1 == total_steps or exhausted
            if last_step:  # before the stage's last checkpoint, so that it holds the weights the run goes on from
                bar.close()  # the bar's rate is the stage's own, and the perplexity line comes after it
                state.stage_perplexity.append(finish_stage(config))
            if state.global_step % recipe.checkpoint_every == 0 or last_step:
                saved = Progress(**{**state.__dict__, "stage_index": stage_index + 1 if last_step else stage_index,
                                    "stage_step": 0 if last_step else step + 1,
                                    "loader_state": None if last_step else loader.state_dict()})
                save_checkpoint(ckpt_root, student, _unwrap(optimizer), _unwrap(scheduler), saved)
            if _fail_after_step is not None and state.global_step >= _fail_after_step:
                raise RuntimeError(f"simulated crash after step {state.global_step}")
            if exhausted:
                break
        bar.close()
        engine.end_stage()
        del model, optimizer, scheduler
        state.stage_index, state.stage_step = stage_index + 1, 0
        if len(state.stage_perplexity) < stage_index + 1:  # the stage ended before its first step
            state.stage_perplexity.append(finish_stage(config))

    if lora_added:
        merge_lora(student)
    student.eval()
    ppl_after = held_out_perplexity()
    weights = full_model_state(student)
    if main:
        _write_output(student.config, weights, out_dtype, tokenizer, recipe, out, overwrite, metrics_path,
                      {"teacher": ppl_teacher, "before": ppl_before, "stages": state.stage_perplexity,
                       "after": ppl_after})
        if not keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    accelerator.end_training()
    if ppl_after is not None:
        logger.info("wrote %s; held-out perplexity %.3f -> %.3f (teacher %.3f)", out, ppl_before, ppl_after,
                    ppl_teacher)
    else:
        logger.info("wrote %s", out)
    return DistillResult(out, ppl_before, ppl_after, state.history, ppl_teacher, state.stage_perplexity)


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one precision per process; a later run in the same process may ask for another
    (the process group, if any, is kept)."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()


def _unwrap(obj):
    """The torch optimizer / scheduler inside accelerate's wrappers."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    if isinstance(obj, AcceleratedOptimizer):
        return obj.optimizer
    return obj.scheduler if isinstance(obj, AcceleratedScheduler) else obj


def _check_finite(loss: torch.Tensor, step: int, config: StageConfig, ckpt_root: Path, stage, batch: dict,
                  engine) -> None:
    """Stop on a NaN/inf loss, on every rank together when one of them sees it, saying which side went
    non-finite: the teacher's outputs on this batch (its weights or precision), or the student."""
    bad = torch.tensor(float(not torch.isfinite(loss.detach()).item()), device=loss.device)
    if dist.is_initialized():
        dist.all_reduce(bad)
    if not bad.item():
        return
    with torch.no_grad(), engine.autocast():
        hidden = stage.teacher("hidden", {k: v for k, v in batch.items() if k in ("input_ids", "position_ids")})
    teacher_bad = torch.tensor(float(not torch.isfinite(hidden).all().item()), device=loss.device)
    if dist.is_initialized():
        dist.all_reduce(teacher_bad)
    last = latest_checkpoint(ckpt_root)
    where = f"loss became {loss.item()} at step {step + 1} of stage {config.name}; stopping. "
    kept = f"Last good checkpoint: {last or 'none yet'}."
    if teacher_bad.item():
        raise DistillError(f"{where}The teacher's own outputs are NaN/inf on this batch (the student is not at "
                           f"fault): its weights or its precision are; try mixed_precision 'no' (an fp32 teacher) "
                           f"or check the teacher's checkpoint. {kept}")
    raise DistillError(f"{where}The teacher's outputs are finite, so the student's went non-finite: try a lower "
                       f"learning rate for this stage or mixed_precision 'no'. {kept}")


def _forget_metrics_after(path: Path, global_step: int) -> None:
    """On resume, drop the lines a crashed run logged after the checkpoint it resumes from; the steps
    are run again and logged again, so every step has exactly one line."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("global_step", 0) <= global_step]
    write_whole(path, "".join(kept))


def _check_student(student) -> dict:
    """The config of a student folder, read before anything is loaded: a folder that is not a mixerswap
    student (a plain teacher, random files) is refused at once, saying what it is."""
    folder = Path(student)
    config = folder / "config.json"
    if not folder.is_dir():
        text = str(student)
        if folder.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(folder.parts[0]).is_dir():
            raise FileNotFoundError(f"no such student folder: {student}")
        return {}  # a hub id: the model class itself refuses a config that is not a student's
    if not config.is_file():
        raise ValueError(f"{student} has no config.json, so it is not a student; `mixerswap convert TEACHER --out "
                         "DIR` makes students")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err}), so {student} is not a student; `mixerswap convert "
                         "TEACHER --out DIR` makes students") from None
    kind = settings.get("model_type") if isinstance(settings, dict) else None
    if kind != "mixerswap" or not settings.get("teacher_config"):
        what = f"a {kind!r} model" if kind and kind != "mixerswap" else "not a complete student config"
        raise ValueError(f"{student} is {what}, not a mixerswap student; `mixerswap convert TEACHER --out DIR` "
                         "makes students from a teacher")
    return settings


def _check_teacher_identity(recipe: DistillRecipe, student_config: dict, teacher_path) -> None:
    """Refuse a teacher whose weights are not those the student was converted from, unless allowed."""
    if recipe.allow_other_teacher:
        return
    recorded = (student_config.get("conversion") or {}).get("teacher_fingerprint")
    found = folder_fingerprint(teacher_path) if recorded else None
    if found is not None and found != recorded:
        raise ValueError(f"teacher {recipe.teacher} is not the model {recipe.student} was converted from (weights "
                         "fingerprint differs); give that teacher, or allow_other_teacher: true / "
                         "--allow-other-teacher to distill from this one anyway")


def _cache_fingerprint(recipe: DistillRecipe, world: int) -> dict:
    """What cached teacher logits depend on: teacher, data, batching and the stages' budgets."""
    keys = ("teacher", "data", "text_field", "prompt_field", "response_field", "messages_field", "data_format", "seq_len", "batch_size", "grad_accum", "seed", "held_out_docs", "validation_docs")
    stages = [{"name": s.name, "tokens": s.tokens, "teacher_topk": s.teacher_topk} for s in recipe.stages]
    return {**{k: getattr(recipe, k) for k in keys}, "world": world, "stages": stages}


def _load_tokenizer(*folders):
    """The teacher's tokenizer: ``convert`` copies it into the student folder; else the teacher's own."""
    from transformers import AutoTokenizer

    for folder in folders:
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError):
            continue
    raise FileNotFoundError(f"no tokenizer in {' or '.join(map(str, folders))}; copy the teacher's tokenizer files "
                            "into the student folder")


def _write_output(config, weights: dict, dtype: torch.dtype, tokenizer, recipe, out, overwrite, metrics_path,
                  perplexity: dict) -> None:
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_student(config, weights, dtype, tmp)
        tokenizer.save_pretrained(tmp)
        if metrics_path.exists():
            shutil.copy2(metrics_path, tmp / "metrics.jsonl")
        settings = {"mixerswap_version": __version__, "distill": json.loads(recipe.model_dump_json()),
                    "conversion": config.conversion, "dtype": str(dtype).removeprefix("torch."),
                    "held_out_perplexity": perplexity}
        (tmp / "mixerswap.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        stages = ", ".join(f"{s.name}:{s.tokens}" for s in recipe.stages)
        (tmp / "README.md").write_text(
            f"# Distilled mixerswap student\n\nStudent `{recipe.student}` distilled from `{recipe.teacher}` "
            f"on `{recipe.data}` (stages {stages}, seq_len {recipe.seq_len}).\n\n"
            f"Held-out perplexity (next-token, {recipe.held_out_docs} held-out documents of the data, their first "
            f"{recipe.held_out_rows} packed rows of {recipe.seq_len} tokens): teacher {_fmt(perplexity['teacher'])}; student {_fmt(perplexity['before'])} "
            "before, " + "".join(f"{_fmt(s['perplexity'])} after {s['stage']}, " for s in perplexity["stages"])
            + f"{_fmt(perplexity['after'])} at the end. Settings: `mixerswap.yaml`; per-step metrics: "
            "`metrics.jsonl`.\n"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def save_student(config, weights: dict[str, torch.Tensor], dtype: torch.dtype, folder: Path) -> None:
    """Save full ``weights`` (fp32 training weights) as a student folder in ``dtype``, keeping the
    parameters the mixers declare fp32 in fp32 (the model is built on the meta device: no copy)."""
    from ..architectures import MixerSwapForCausalLM
    from ..architectures.mixers import fp32_parameter_names

    with torch.device("meta"):
        model = MixerSwapForCausalLM(config)
    keep = fp32_parameter_names(model)
    cast = {k: (v if k in keep or not v.is_floating_point() else v.to(dtype)) for k, v in weights.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"distilled weights lack {missing[:3]}")
    model.config.dtype = dtype
    model.save_pretrained(folder)
