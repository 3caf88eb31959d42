"""Perplexity on documents kept out of training, and the stage guard built on it.

* :func:`eval_rows` packs held-out documents into rows (batches of at most ``EVAL_BATCH_ROWS``); :class:`HeldOutNLL` is the
  evaluation objective (summed next-token NLL and token count) and :func:`perplexity` turns it into a
  token-weighted perplexity. ``distill`` reports it before training, after every stage and at the end.
* :class:`StageGuard` undoes a stage that made the student worse end to end. Every stage optimizes
  its own objective (layer outputs, hidden states, KL to the teacher); none of them is the next-token
  perplexity the student is judged by, and a short ``align`` or ``hidden`` stage can raise it while
  lowering its own loss (SmolLM2-135M, 64k tokens: ``swa`` at 25% attention 45.3 -> 45.6 after align
  -> 46.1 after hidden; ``mla`` at 25% KV 187.6 -> 197.4 after hidden). With ``validation_docs`` set,
  the perplexity on those documents (kept out of training *and* apart from the held-out documents the
  run reports, so the choice does not flatter the reported figure) is measured before training and
  after each stage; a stage that raised it is undone: the student goes on from the weights the stage
  started from. Those weights are kept in memory and in ``OUT.work/stage-start`` (written atomically,
  safetensors), so a run resumed in the middle of a stage can still undo it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import full_model_state, is_main, load_model_state
from .data import PackedLoader


EVAL_BATCH_ROWS = 8  # rows per forward when scoring: memory stays that of one small batch however many rows


def eval_rows(documents: list, tokenizer, seq_len: int, max_rows: int = 8) -> list[dict] | None:
    """The first ``max_rows`` packed rows of ``seq_len`` tokens of ``documents`` (fewer if the documents run
    out), as batches of at most ``EVAL_BATCH_ROWS`` rows; ``None`` if there are none."""
    if not documents:
        return None
    loader = PackedLoader(documents, tokenizer, seq_len=seq_len, batch_size=min(max_rows, EVAL_BATCH_ROWS),
                          shuffle=False)
    batches, rows = [], 0
    for batch in loader:
        take = min(len(batch["input_ids"]), max_rows - rows)
        batches.append({k: v[:take] for k, v in batch.items()})
        rows += take
        if rows >= max_rows:
            break
    return batches or None


class HeldOutNLL(nn.Module):
    """Objective for evaluation: ``batch -> [summed next-token NLL, number of predicted tokens]``."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, batch: dict, key: str | None = None) -> torch.Tensor:
        from .masks import next_token_labels

        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids")}
        labels = next_token_labels({**inputs, "labels": batch.get("labels")})  # responses only for chat data
        logits = self.student(**inputs, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                reduction="sum")
        return torch.stack([nll, (labels != -100).sum().to(nll.dtype)])


@torch.no_grad()
def perplexity(run, objective: HeldOutNLL, batches: list[dict] | None, device) -> float | None:
    """Token-weighted perplexity of next-token prediction over ``batches`` (rows of documents kept apart,
    from :func:`eval_rows`); ``run(objective, batch)`` evaluates the objective (through the engine once the
    student is wrapped)."""
    if batches is None:
        return None
    student = objective.student
    was_training = student.training
    student.eval()
    nll = count = 0.0
    for batch in batches:
        batch_nll, batch_count = run(objective, {k: v.to(device) for k, v in batch.items()}).tolist()
        nll, count = nll + batch_nll, count + batch_count
    student.train(was_training)
    return math.exp(nll / max(1.0, count))


class StageGuard:
    """Keeps a stage only if it lowered perplexity on the validation rows (see the module docstring).

    Collective under ``torch.distributed`` (every rank calls :meth:`begin` and :meth:`end`; rank 0 holds
    the weights, every rank evaluates the same rows and so takes the same decision).
    """

    def __init__(self, rows: dict, folder: Path, device):
        self.rows, self.folder, self.device = rows, Path(folder), device
        self.start_weights: dict[str, torch.Tensor] | None = None

    def measure(self, run, student: nn.Module) -> float:
        return perplexity(run, HeldOutNLL(student), self.rows, self.device)

    def begin(self, stage_index: int, student: nn.Module, resumed_mid_stage: bool) -> None:
        """Remember the weights stage ``stage_index`` starts from; a run resumed in the middle of the stage
        reads those its first run saved (the student has already moved on from them)."""
        path = self.folder / "stage-start.safetensors"
        if resumed_mid_stage:
            if is_main():
                if _stage_of(path) != stage_index:
                    raise FileNotFoundError(f"{path} does not hold the weights stage {stage_index} started from; "
                                            "the stage cannot be checked (delete the work folder to start over)")
                with safe_open(str(path), "pt") as f:
                    self.start_weights = {k: f.get_tensor(k) for k in f.keys()}
            else:
                self.start_weights = {}
            return
        # a copy: on one CPU process the state dict holds the parameters themselves, which training changes
        self.start_weights = {k: v.detach().clone() for k, v in full_model_state(student).items()}
        if is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in self.start_weights.items()}, str(tmp),
                      metadata={"stage": json.dumps(stage_index)})
            os.replace(tmp, path)

    def end(self, student: nn.Module, trained: float, before: float) -> bool:
        """``True`` (and the student's weights put back) when ``trained`` is worse than ``before``."""
        worse = trained > before
        if worse:
            load_model_state(student, self.start_weights)
        self.start_weights = None
        return worse


def _stage_of(path: Path) -> int | None:
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("stage", "null"))
