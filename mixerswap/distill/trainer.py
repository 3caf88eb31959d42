"""``run_distill``: stages in order on one student, with accelerate, checkpoints and resume.

Per stage: a fresh AdamW over the parameters the stage trains, warm-up then cosine / WSD /
constant learning rate, gradient accumulation, gradient clipping, and a data loader seeded by
``(seed, stage)`` with its own token budget. Every ``checkpoint_every`` optimizer steps and at the
end of each stage the whole state is checkpointed atomically; ``resume=True`` continues from the
latest checkpoint and reproduces an uninterrupted run exactly. A non-finite loss stops training
with a clear message and leaves the last good checkpoint in place. The result is an ordinary HF
folder, written atomically like ``convert``'s.

Distributed: run under ``accelerate launch``; each process takes its share of every batch and
gradients are averaged across processes before each optimizer step (data-parallel). Stages call
submodules (mixers, blocks) directly, so the averaging is explicit rather than left to a DDP
wrapper's forward hooks.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .. import __version__
from ..convert.checkpoint_io import atomic_output_dir
from .checkpoint import Progress, latest_checkpoint, load_checkpoint, load_progress, save_checkpoint
from .data import PackedLoader, check_seq_len, check_vocab, held_out_split, read_documents
from .lora import add_lora, merge_lora
from .recipe import DistillRecipe, StageConfig
from .stages import build_stage
from .teacher_cache import TeacherCache

logger = logging.getLogger(__name__)


class DistillError(RuntimeError):
    """Training cannot continue (e.g. the loss became NaN)."""


@dataclass
class DistillResult:
    out: Path
    perplexity_before: float | None
    perplexity_after: float | None
    history: list


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


def run_distill(recipe: DistillRecipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                keep_checkpoints: bool = False, _fail_after_step: int | None = None) -> DistillResult:
    """Distill ``recipe.student`` from ``recipe.teacher``; see the module docstring."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from ..architectures import MixerSwapForCausalLM

    out, work = Path(recipe.out), work_dir(recipe.out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    if not resume and latest_checkpoint(work / "checkpoints") is not None:
        raise FileExistsError(f"{work} holds checkpoints of an earlier run; pass --resume to continue it "
                              "or delete that folder to start over")

    accelerator = Accelerator(mixed_precision=recipe.mixed_precision, log_with=recipe.log_with,
                              project_dir=str(work) if recipe.log_with else None,
                              cpu=not torch.cuda.is_available())  # lets `torchrun` start CPU data parallelism
    device = accelerator.device
    student = MixerSwapForCausalLM.from_pretrained(recipe.student, dtype=torch.float32).to(device)
    teacher_dtype = torch.bfloat16 if recipe.mixed_precision == "bf16" else torch.float32
    eager = any(s.name == "align" and s.mode == "matrix" for s in recipe.stages)
    teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher, dtype=teacher_dtype,
                                                   **({"attn_implementation": "eager"} if eager else {}))
    teacher = teacher.to(device).eval().requires_grad_(False)
    check_vocab(teacher.config, student.config)
    tokenizer = _load_tokenizer(recipe.student, recipe.teacher)
    check_seq_len(recipe.seq_len, teacher.config)

    documents = read_documents(recipe.data, text_field=recipe.text_field)
    train_docs, held_out = held_out_split(documents, recipe.held_out_docs)
    eval_rows = _eval_rows(held_out, tokenizer, recipe.seq_len)
    ppl_before = _perplexity(student, eval_rows, device) if eval_rows is not None else None

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
    work.mkdir(parents=True, exist_ok=True)

    world, rank = accelerator.num_processes, accelerator.process_index
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
        optimizer = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=recipe.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, c=config, n=total_steps: lr_factor(s, n, c))
        loader = PackedLoader(train_docs, tokenizer, seq_len=recipe.seq_len, batch_size=recipe.batch_size * world,
                              seed=recipe.seed + stage_index, max_tokens=total_steps * rows_per_step * recipe.seq_len)
        start = state.stage_step if resuming else 0
        if start:  # mid-stage: weights, optimizer, schedule, data position and random generators continue
            load_checkpoint(latest_checkpoint(ckpt_root), student, optimizer, scheduler)
            loader.load_state_dict(state.loader_state)
        batches = iter(loader)
        student.train()
        bar = tqdm(total=total_steps, initial=start, desc=f"{config.name}", disable=not (progress and accelerator.is_main_process))
        started, tokens_at_start = time.perf_counter(), state.tokens_seen
        for step in range(start, total_steps):
            optimizer.zero_grad(set_to_none=True)
            step_loss, parts, exhausted = 0.0, {}, False
            for micro in range(recipe.grad_accum):
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                batch = {k: v[rank::world].to(device) for k, v in batch.items()}
                with accelerator.autocast():
                    loss, parts = stage.loss(batch, key=f"stage{stage_index}-step{step:08d}-micro{micro}-rank{rank}")
                if not torch.isfinite(loss):
                    last = latest_checkpoint(ckpt_root)
                    raise DistillError(
                        f"loss became {loss.item()} at step {step + 1} of stage {config.name}; stopping. "
                        f"Last good checkpoint: {last or 'none yet'}. Try a lower learning rate for this stage "
                        "or mixed_precision 'no'."
                    )
                (loss / recipe.grad_accum).backward()
                step_loss += loss.item() / recipe.grad_accum
                state.tokens_seen += batch["input_ids"].numel() * world
            if exhausted and step_loss == 0.0:
                logger.warning("stage %s: data exhausted after %d steps", config.name, step)
                break
            if world > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            if recipe.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            state.stage_step, state.global_step = step + 1, state.global_step + 1
            elapsed = max(time.perf_counter() - started, 1e-9)
            record = {"stage": config.name, "step": step + 1, "global_step": state.global_step, "loss": step_loss,
                      "lr": scheduler.get_last_lr()[0], "tokens": state.tokens_seen,
                      "tokens_per_s": (state.tokens_seen - tokens_at_start) / elapsed, **parts}
            state.history.append({"stage": config.name, "step": step + 1, "loss": step_loss})
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if accelerator.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if recipe.log_with:
                    accelerator.log({f"{config.name}/loss": step_loss, "lr": record["lr"]}, step=state.global_step)
            last_step = step + 1 == total_steps or exhausted
            if (state.global_step % recipe.checkpoint_every == 0 or last_step) and accelerator.is_main_process:
                state.stage_index = stage_index + 1 if last_step else stage_index
                state.stage_step = 0 if last_step else step + 1
                state.loader_state = None if last_step else loader.state_dict()
                save_checkpoint(ckpt_root, student, optimizer, scheduler, state)
                state.stage_index = stage_index
            if _fail_after_step is not None and state.global_step >= _fail_after_step:
                raise RuntimeError(f"simulated crash after step {state.global_step}")
            if exhausted:
                break
        bar.close()
        state.stage_index, state.stage_step = stage_index + 1, 0

    if lora_added:
        merge_lora(student)
    student.eval()
    ppl_after = _perplexity(student, eval_rows, device) if eval_rows is not None else None
    if accelerator.is_main_process:
        _write_output(student, tokenizer, recipe, out, overwrite, metrics_path, ppl_before, ppl_after)
        if not keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    accelerator.end_training()
    logger.info("wrote %s; held-out perplexity %s -> %s", out, ppl_before, ppl_after)
    return DistillResult(out, ppl_before, ppl_after, state.history)


def _cache_fingerprint(recipe: DistillRecipe, world: int) -> dict:
    """What cached teacher logits depend on: teacher, data, batching and the stages' budgets."""
    keys = ("teacher", "data", "text_field", "seq_len", "batch_size", "grad_accum", "seed", "held_out_docs")
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


def _eval_rows(held_out: list[str], tokenizer, seq_len: int, max_rows: int = 8) -> torch.Tensor | None:
    if not held_out:
        return None
    loader = PackedLoader(held_out, tokenizer, seq_len=seq_len, batch_size=max_rows, shuffle=False)
    return next(iter(loader), None)


@torch.no_grad()
def _perplexity(model, batch: dict, device) -> float:
    """Token-weighted perplexity of next-token prediction over the held-out rows (documents kept apart)."""
    from .stages import _next_token_labels

    was_training = model.training
    model.eval()
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "position_ids")}
    labels = _next_token_labels(inputs)
    logits = model(**inputs, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                            reduction="sum")
    model.train(was_training)
    return math.exp(nll.item() / max(1, int((labels != -100).sum())))


def _write_output(student, tokenizer, recipe, out, overwrite, metrics_path, ppl_before, ppl_after) -> None:
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if metrics_path.exists():
            shutil.copy2(metrics_path, tmp / "metrics.jsonl")
        settings = {"mixerswap_version": __version__, "distill": json.loads(recipe.model_dump_json()),
                    "conversion": student.config.conversion,
                    "held_out_perplexity": {"before": ppl_before, "after": ppl_after}}
        (tmp / "mixerswap.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        stages = ", ".join(f"{s.name}:{s.tokens}" for s in recipe.stages)
        (tmp / "README.md").write_text(
            f"# Distilled mixerswap student\n\nStudent `{recipe.student}` distilled from `{recipe.teacher}` "
            f"on `{recipe.data}` (stages {stages}, seq_len {recipe.seq_len}).\n\n"
            f"Held-out perplexity: {ppl_before} before, {ppl_after} after. Settings: `mixerswap.yaml`; "
            "per-step metrics: `metrics.jsonl`.\n"
        )
